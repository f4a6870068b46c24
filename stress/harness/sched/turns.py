"""Controlled scheduling, the mechanism: the workers take turns at the atomics
chokepoint, and every hand-over is logged.

Design note.  In a free run the OS interleaves the workers, so a violation is
a matter of luck and its interleaving is gone once the run ends.  In a
controlled run the same real worker processes run, but only one at a time: a
worker holds *the turn* from one shared access to the next, and before each
access (a *scheduling point*: every method of
:class:`~stress.atomics.ScheduledWords`) the policy decides whether it keeps
the turn or hands it to another worker.  Everything a worker does between two
points (Python code, trace events, process-local state) is therefore
serialised, and a run is a pure function of (config, seed, schedule).  The
decision is the policy's (a :class:`Policy`, one module each):

* ``random`` (``sched/random.py``): at each point, with probability
  ``switch_p``, the turn goes to a worker drawn uniformly (a hash of the
  schedule seed and the step, so no shared RNG state is needed);
* ``pct`` (``sched/pct.py``): probabilistic concurrency testing (Burckhardt et
  al., ASPLOS 2010): random distinct priorities, the highest-priority worker
  runs, and at ``d-1`` random steps the running worker drops to a low priority;
* ``replay`` (``sched/replay.py``): an explicit list of switch points, each
  keyed by the position of the worker that gives the turn away: (worker, op
  index, access index within the op) -> worker that gets it.  Positions, not
  global step numbers, so that deleting one worker's earlier ops (shrinking)
  leaves the other switch points where they were in the program.

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

from collections.abc import Sequence
from typing import Protocol

from stress.arena import Control, Layout, Sched
from stress.atomics import LockAborted, Words, lib
from stress.config import ScheduleConfig

BIAS = 1 << 32  # pct priorities are stored biased, so demoted ones can go below 0
SETUP_OP = -1  # position of points before a worker's first op
END_OP = 10**9  # ... and after its last (root unload, RCU drain, exit)
MASK64 = (1 << 64) - 1
POINT, RELAX, PAUSE, EXIT, WINDOW = range(5)
WINDOW_P32 = 1 << 30  # a known race window is a preemption with probability 1/4


def mix(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): the random policy's draw at ``step``."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


class Policy(Protocol):
    """Who runs next: one worker's policy (random, pct, replay), asked at every
    scheduling point of its :class:`Turns`."""

    def decide(self, t: Turns, kind: int) -> int:
        """The worker to run next after this ``kind`` of point (POINT, RELAX,
        PAUSE, EXIT, WINDOW), or -1 to keep the turn."""
        ...


def absent_workers(sc: ScheduleConfig) -> int:
    """Bit mask of the workers capped at 0 ops: they take no part (shrinking)."""
    return sum(1 << k for k, cap in enumerate(sc.max_ops) if cap == 0)


def init_region(w: Words, lay: Layout, sc: ScheduleConfig, n: int,
                prios: Sequence[int] = ()) -> None:
    """Supervisor, before GO: the policy's initial priorities, absent workers,
    and the first turn to the first present worker."""
    base = lay.sched
    for k, p in enumerate(prios):
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
    model code.  ``policy`` decides at each point who runs next.
    """

    def __init__(self, w: Words, lay: Layout, me: int, n: int, sc: ScheduleConfig,
                 policy: Policy) -> None:
        self.w = w
        self.base = w.base
        self.me = me
        self.n = n
        self.decide = policy.decide
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
        to = self.decide(self, kind)
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
        to = self.decide(self, EXIT)
        if to >= 0 and to != self.me:
            self._hand_over(to, EXIT)
        else:
            lib.ts_store(self.base, self.region + Sched.STEP, self.step)
            self.holding = False

    # -- for the policies ------------------------------------------------------
    def running(self) -> list[int]:
        """The workers not done yet, this one included."""
        done = self.done
        return [k for k in range(self.n) if not done >> k & 1]

    def others(self) -> list[int]:
        """The other workers not done yet."""
        done = self.done
        return [k for k in range(self.n) if k != self.me and not done >> k & 1]

    def next_round_robin(self) -> int:
        """The next worker after this one not done yet, or -1."""
        done = self.done
        for d in range(1, self.n):
            k = (self.me + d) % self.n
            if not done >> k & 1:
                return k
        return -1

    def prio(self, k: int) -> int:
        """Worker ``k``'s priority word, biased (pct: its priority; random: the
        step it is parked until)."""
        return lib.ts_load(self.base, self.region + Sched.PRIO + k)

    def set_prio(self, k: int, p: int) -> None:
        lib.ts_store(self.base, self.region + Sched.PRIO + k, p + BIAS)
