"""The pct policy: probabilistic concurrency testing (Burckhardt et al., ASPLOS
2010).

Every worker gets a random distinct priority (``depth`` .. ``depth + n - 1``),
the highest-priority worker not done runs, and at ``depth - 1`` random steps
the running worker drops to priority ``depth - i``.  A spinner that relaxes, or
a worker preempted at a race window (with probability 1/4), drops below
everyone (the shared LOW word counts down), or a spin-wait would livelock a
strict-priority scheduler.
"""

from __future__ import annotations

import random

from stress.arena import Sched
from stress.atomics import lib
from stress.config import ScheduleConfig
from stress.harness.sched.turns import BIAS, POINT, RELAX, WINDOW, WINDOW_P32, Turns, mix


def pct_priorities(sc: ScheduleConfig, n: int) -> list[int]:
    """Initial pct priorities: a random permutation of d .. d+n-1."""
    prios = list(range(sc.depth, sc.depth + n))
    random.Random(f"pct:{sc.seed}").shuffle(prios)
    return prios


def pct_change_points(sc: ScheduleConfig) -> dict[int, int]:
    """step -> new priority (d - i) of the i-th of the d-1 change points."""
    rng = random.Random(f"pct-change:{sc.seed}")
    steps = sorted(rng.randint(1, sc.max_steps) for _ in range(sc.depth - 1))
    return {s: sc.depth - i for i, s in enumerate(steps, 1)}


class PctPolicy:
    def __init__(self, sc: ScheduleConfig, me: int) -> None:
        self.seed = sc.seed
        self.change = pct_change_points(sc)

    def decide(self, t: Turns, kind: int) -> int:
        if kind == POINT:
            newp = self.change.get(t.step)
            if newp is None:
                return -1
            t.set_prio(t.me, newp)
            cands = t.running()
        else:
            if kind == WINDOW and (mix(self.seed, t.step) & 0xFFFFFFFF) >= WINDOW_P32:
                return -1
            if kind == RELAX or kind == WINDOW:
                low = lib.ts_load(t.base, t.region + Sched.LOW) - 1
                lib.ts_store(t.base, t.region + Sched.LOW, low)
                t.set_prio(t.me, low - BIAS)
            cands = t.others()
        if not cands:
            return -1
        return max(cands, key=t.prio)
