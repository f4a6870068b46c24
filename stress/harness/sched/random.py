"""The random policy: at each scheduling point, with probability ``switch_p``,
the turn goes to a worker drawn uniformly.

The draw is a hash of the schedule seed and the step (:func:`~.turns.mix`), so
no shared RNG state is needed.  At a known race window (a modelled latency, a
bug variant's split atomic step) the worker is preempted with probability 1/4
and then *parked*: it sits out a few thousand steps, as a task stalled there
would while the others run on other CPUs (its priority word holds the step it
is parked until; a spinner may still wake a parked lock holder).
"""

from __future__ import annotations

from stress.config import ScheduleConfig
from stress.harness.sched.turns import BIAS, POINT, WINDOW, WINDOW_P32, Turns, mix

PARK_MIN, PARK_SPAN = 50, 4000  # steps a worker preempted in a window sits out


class RandomPolicy:
    def __init__(self, sc: ScheduleConfig, me: int) -> None:
        self.seed = sc.seed
        self.p32 = int(sc.switch_p * (1 << 32))

    def decide(self, t: Turns, kind: int) -> int:
        h = mix(self.seed, t.step)
        if kind == POINT or kind == WINDOW:
            if (h & 0xFFFFFFFF) >= (self.p32 if kind == POINT else WINDOW_P32):
                return -1
        if kind == WINDOW:
            # preempted inside a race window: stay off for a while, as a task
            # stalled there would while the others run on other CPUs
            t.set_prio(t.me, t.step + PARK_MIN + (h >> 40) % PARK_SPAN)
            cands = t.others()
        elif kind == POINT:
            cands = t.running()
        else:
            cands = t.others()
        if kind == POINT or kind == WINDOW:  # a spinner may wake a parked holder
            awake = [k for k in cands if t.prio(k) - BIAS <= t.step]
            cands = awake or cands
        return cands[(h >> 32) % len(cands)] if cands else -1
