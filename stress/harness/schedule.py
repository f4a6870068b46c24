"""Controlled scheduling: the workers take turns at the atomics chokepoint.

Design note.  In a free run the OS interleaves the workers, so a violation is
a matter of luck and its interleaving is gone once the run ends.  In a
controlled run the same real worker processes run, but only one at a time: a
worker holds *the turn* from one shared access to the next, and before each
access (a *scheduling point*: every method of
:class:`~stress.atomics.ScheduledWords`) the policy decides whether it keeps
the turn or hands it to another worker.  Everything a worker does between two
points (Python code, trace events, process-local state) is therefore
serialised, and a run is a pure function of (config, seed, schedule):

* ``random``: at each point, with probability ``switch_p``, the turn goes to a
  worker drawn uniformly (a hash of the schedule seed and the step, so no
  shared RNG state is needed);
* ``pct``: probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010):
  random distinct priorities, the highest-priority worker runs, and at ``d-1``
  random steps the running worker drops to a low priority;
* ``replay``: an explicit list of switch points, each keyed by the position of
  the worker that gives the turn away: (worker, op index, access index within
  the op) -> worker that gets it.  Positions, not global step numbers, so that
  deleting one worker's earlier ops (shrinking) leaves the other switch points
  where they were in the program.

Every hand-over is recorded in a log in the arena, in the replay format, so a
violation found by ``random`` or ``pct`` replays exactly.

Blocking.  Only the turn holder runs, so a lock held by another worker can
never be released while the holder spins: lock acquisition is a try-loop whose
failure *relaxes* (:meth:`Turns.relax`): the turn goes to another worker (and
under pct the spinner drops below everyone, or a spin-wait would livelock a
strict-priority scheduler).  A worker that models a sleep (a halt, a role's
pause) calls :meth:`Turns.pause`: one forced hand-over, no demotion.

Only the turn holder writes the sched region, so its words need no atomicity
beyond the hand-over's release/acquire, which ``ts_turn_give`` / ``ts_turn_wait``
provide.  The harness's own shared words (heartbeat, counters, run control)
bypass the scheduler: they use a plain :class:`~stress.atomics.Words`.
"""

from __future__ import annotations

import random

from stress.arena import Control, Layout, Sched
from stress.atomics import LockAborted, Words, lib
from stress.config import ScheduleConfig

BIAS = 1 << 32  # pct priorities are stored biased, so demoted ones can go below 0
SETUP_OP = -1  # position of points before a worker's first op
END_OP = 10**9  # ... and after its last (root unload, RCU drain, exit)
MASK64 = (1 << 64) - 1
POINT, RELAX, PAUSE, EXIT, WINDOW = range(5)
WINDOW_P32 = 1 << 30  # a known race window is a preemption with probability 1/4
PARK_MIN, PARK_SPAN = 50, 4000  # random: steps a worker preempted in a window sits out


def mix(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): the random policy's draw at ``step``."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


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


def absent_workers(sc: ScheduleConfig) -> int:
    """Bit mask of the workers capped at 0 ops: they take no part (shrinking)."""
    return sum(1 << k for k, cap in enumerate(sc.max_ops) if cap == 0)


def init_region(w: Words, lay: Layout, sc: ScheduleConfig, n: int) -> None:
    """Supervisor, before GO: priorities, absent workers, and the first turn to
    the first present worker."""
    base = lay.sched
    if sc.mode == "pct":
        for k, p in enumerate(pct_priorities(sc, n)):
            w.store(base + Sched.PRIO + k, p + BIAS)
    w.store(base + Sched.LOW, BIAS)
    absent = absent_workers(sc)
    w.store(base + Sched.DONE, absent)
    first = next((k for k in range(n) if not absent >> k & 1), None)
    if first is not None:
        lib.ts_turn_give(w.base, base + Sched.TURNS + first)


def read_log(w: Words, lay: Layout) -> tuple[list[tuple[int, int, int, int]], list[int], int]:
    """The recorded switch points ([worker, op, access, to]), the kind of each
    (POINT: a preemption, RELAX, PAUSE, EXIT) and how many did not fit."""
    base = lay.sched
    n = min(w.load(base + Sched.LOG_N), lay.sched_log)
    out, kinds = [], []
    for k in range(n):
        a = w.load(base + Sched.LOG + 2 * k)
        b = w.load(base + Sched.LOG + 2 * k + 1)
        out.append((a & 0xFF, (a >> 8) - 1, b & 0xFFFFFFFF, (b >> 32) & 0xFF))
        kinds.append(b >> 40)
    return out, kinds, w.load(base + Sched.LOG_LOST)


class Turns:
    """One worker's side of the turn-taking (see the module docstring).

    ``w`` is the worker's plain (unscheduled) view of the arena.  Between
    :meth:`start` and :meth:`exit` this process holds the turn whenever it runs
    model code.
    """

    def __init__(self, w: Words, lay: Layout, me: int, n: int, sc: ScheduleConfig) -> None:
        self.w = w
        self.base = w.base
        self.me = me
        self.n = n
        self.mode = sc.mode
        self.seed = sc.seed
        self.p32 = int(sc.switch_p * (1 << 32))
        self.max_steps = sc.max_steps
        self.cap = 4 * sc.max_steps + 100_000  # past this the schedule livelocked
        self.region = lay.sched
        self.log_cap = lay.sched_log
        self.turn_i = [lay.sched + Sched.TURNS + k for k in range(n)]
        self.abort_i = lay.ctl(Control.ABORT)
        self.step = 0
        self.done = 0
        self.op = SETUP_OP
        self.acc = 0
        self.holding = False
        self.exited = False
        self.switches = 0
        self.ran = 0  # this worker's own points: its task clock (Words.task_clock_ns)
        self.change = pct_change_points(sc) if sc.mode == "pct" else {}
        mine: dict[tuple[int, int], int] = {}
        for worker, op, acc, to in sc.switches:
            if worker == me:
                mine[(op, acc)] = to
        self.explicit = mine
        self.abort_hook: object = None  # set by ScheduledWords: stop tracing on abort

    # -- positions -------------------------------------------------------------
    def begin_op(self, k: int) -> None:
        self.op, self.acc = k, 0

    def end_phase(self) -> None:
        self.op, self.acc = END_OP, 0

    @property
    def expired(self) -> bool:
        """The step budget is spent: start no new op."""
        return self.step >= self.max_steps

    # -- the turn --------------------------------------------------------------
    def start(self) -> None:
        """Wait for the first turn."""
        self._wait()

    def _wait(self) -> None:
        if lib.ts_turn_wait(self.base, self.turn_i[self.me], self.abort_i):
            if callable(self.abort_hook):
                self.abort_hook()
            raise LockAborted("waiting for the turn")
        self.holding = True
        self.step = lib.ts_load(self.base, self.region + Sched.STEP)
        self.done = lib.ts_load(self.base, self.region + Sched.DONE)

    def _hand_over(self, to: int, kind: int) -> None:
        base, r = self.base, self.region
        lib.ts_store(base, r + Sched.STEP, self.step)
        n = lib.ts_load(base, r + Sched.LOG_N)
        if n < self.log_cap:
            e = r + Sched.LOG + 2 * n
            lib.ts_store(base, e, self.me | (self.op + 1) << 8)
            lib.ts_store(base, e + 1, self.acc | to << 32 | kind << 40)
            lib.ts_store(base, r + Sched.LOG_N, n + 1)
        else:
            lib.ts_store(base, r + Sched.LOG_LOST, lib.ts_load(base, r + Sched.LOG_LOST) + 1)
        self.switches += 1
        self.holding = False
        lib.ts_turn_give(base, self.turn_i[to])

    def _advance(self) -> None:
        self.step += 1
        self.acc += 1
        self.ran += 1
        if self.step > self.cap:
            lib.ts_store(self.base, self.region + Sched.EXHAUSTED, self.me + 1)
            lib.ts_store(self.base, self.abort_i, 1)
            raise LockAborted(f"schedule exhausted after {self.step} steps")

    def point(self, kind: int = POINT) -> bool:
        """A scheduling point (``kind`` POINT: before every shared access); True
        if the turn went to another worker and came back."""
        self._advance()
        to = self._decide(kind)
        if to >= 0 and to != self.me:
            # a preemption in a window is logged as one: it is the policy's choice
            self._hand_over(to, POINT if kind == WINDOW else kind)
            self._wait()
            return True
        return False

    def relax(self) -> None:
        """A spin-wait's failed attempt: let another worker run (cpu_relax)."""
        if not self.point(RELAX) and lib.ts_load(self.base, self.abort_i):
            raise LockAborted("relax")

    def window(self) -> None:
        """A modelled latency or a bug variant's split atomic step: the places a
        preemption matters most, so random and pct preempt here often (1/4)."""
        self.point(WINDOW)

    def pause(self) -> None:
        """A modelled sleep: hand the turn to another worker once."""
        self.point(PAUSE)

    def exit(self) -> None:
        """This worker is done: hand the turn on for good (no-op unless holding)."""
        if not self.holding or self.exited:
            return
        self.exited = True
        self.step += 1
        self.acc += 1
        self.done |= 1 << self.me
        lib.ts_store(self.base, self.region + Sched.DONE, self.done)
        to = self._decide(EXIT)
        if to >= 0 and to != self.me:
            self._hand_over(to, EXIT)
        else:
            lib.ts_store(self.base, self.region + Sched.STEP, self.step)
            self.holding = False

    # -- policies --------------------------------------------------------------
    def _others(self) -> list[int]:
        done = self.done
        return [k for k in range(self.n) if k != self.me and not done >> k & 1]

    def _next_round_robin(self) -> int:
        done = self.done
        for d in range(1, self.n):
            k = (self.me + d) % self.n
            if not done >> k & 1:
                return k
        return -1

    def _decide(self, kind: int) -> int:
        """The worker to run next, or -1 to keep the turn."""
        mode = self.mode
        if mode == "replay":
            to = self.explicit.get((self.op, self.acc), -1)
            if to >= 0 and not self.done >> to & 1:
                return to
            return -1 if kind in (POINT, WINDOW) else self._next_round_robin()
        if mode == "random":
            h = mix(self.seed, self.step)
            if kind == POINT or kind == WINDOW:
                if (h & 0xFFFFFFFF) >= (self.p32 if kind == POINT else WINDOW_P32):
                    return -1
            if kind == WINDOW:
                # preempted inside a race window: stay off for a while, as a task
                # stalled there would while the others run on other CPUs
                self._set_prio(self.me, self.step + PARK_MIN + (h >> 40) % PARK_SPAN)
                cands = self._others()
            elif kind == POINT:
                cands = [k for k in range(self.n) if not self.done >> k & 1]
            else:
                cands = self._others()
            if kind == POINT or kind == WINDOW:  # a spinner may wake a parked holder
                awake = [k for k in cands if self._prio(k) - BIAS <= self.step]
                cands = awake or cands
            return cands[(h >> 32) % len(cands)] if cands else -1
        # pct
        if kind == POINT:
            newp = self.change.get(self.step)
            if newp is None:
                return -1
            self._set_prio(self.me, newp)
            cands = [k for k in range(self.n) if not self.done >> k & 1]
        else:
            if kind == WINDOW and (mix(self.seed, self.step) & 0xFFFFFFFF) >= WINDOW_P32:
                return -1
            if kind == RELAX or kind == WINDOW:
                low = lib.ts_load(self.base, self.region + Sched.LOW) - 1
                lib.ts_store(self.base, self.region + Sched.LOW, low)
                self._set_prio(self.me, low - BIAS)
            cands = self._others()
        if not cands:
            return -1
        return max(cands, key=self._prio)

    def _prio(self, k: int) -> int:
        return lib.ts_load(self.base, self.region + Sched.PRIO + k)

    def _set_prio(self, k: int, p: int) -> None:
        lib.ts_store(self.base, self.region + Sched.PRIO + k, p + BIAS)
