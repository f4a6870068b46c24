"""Controlled scheduling: the workers take turns at the atomics chokepoint.

* ``turns.py``: the mechanism, policy-free: the turn, the scheduling points,
  the hand-over log in the arena (every switch in replay form), the step cap
  that ends a livelocked schedule (see its docstring for the design);
* ``random.py``, ``pct.py``, ``replay.py``: the policies, one each: who runs
  next at a point.

The supervisor sets the sched region up with :func:`init_region` and reads
the log back with :func:`read_log`; each worker builds its side with
:func:`worker_turns`.
"""

from __future__ import annotations

from stress.arena import Layout
from stress.atomics import Words
from stress.config import ScheduleConfig
from stress.harness.sched import turns
from stress.harness.sched.pct import PctPolicy, pct_priorities
from stress.harness.sched.random import RandomPolicy
from stress.harness.sched.replay import ReplayPolicy
from stress.harness.sched.turns import POINT, Policy, Turns, read_log

__all__ = ["POINT", "POLICIES", "Policy", "Turns", "init_region", "make_policy", "read_log",
           "worker_turns"]

POLICIES: dict[str, type[RandomPolicy | PctPolicy | ReplayPolicy]] = {
    "random": RandomPolicy, "pct": PctPolicy, "replay": ReplayPolicy}


def make_policy(sc: ScheduleConfig, me: int) -> Policy:
    """Worker ``me``'s policy for ``sc.mode``."""
    return POLICIES[sc.mode](sc, me)


def worker_turns(w: Words, lay: Layout, me: int, n: int, sc: ScheduleConfig) -> Turns:
    """Worker ``me``'s side of the turn-taking, under ``sc``'s policy."""
    return Turns(w, lay, me, n, sc, make_policy(sc, me))


def init_region(w: Words, lay: Layout, sc: ScheduleConfig, n: int) -> None:
    """Supervisor, before GO: priorities (pct), absent workers, and the first
    turn to the first present worker."""
    turns.init_region(w, lay, sc, n, pct_priorities(sc, n) if sc.mode == "pct" else ())
