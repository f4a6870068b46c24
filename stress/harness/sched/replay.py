"""The replay policy: an explicit list of switch points, as the turns' log
records them.

Each switch point is keyed by the position of the worker that gives the turn
away: (worker, op index, access index within the op) -> the worker that gets
it.  Positions, not global step numbers, so that deleting one worker's earlier
ops (shrinking) leaves the other switch points where they were in the program.
Where the list says nothing the worker keeps the turn, except where it must
give it away (a relax, a pause, its exit): then the next worker round-robin.
"""

from __future__ import annotations

from stress.config import ScheduleConfig
from stress.harness.sched.turns import POINT, WINDOW, Turns


class ReplayPolicy:
    def __init__(self, sc: ScheduleConfig, me: int) -> None:
        mine: dict[tuple[int, int], int] = {}
        for worker, op, acc, to in sc.switches:
            if worker == me:
                mine[(op, acc)] = to
        self.explicit = mine

    def decide(self, t: Turns, kind: int) -> int:
        to = self.explicit.get((t.op, t.acc), -1)
        if to >= 0 and not t.done >> to & 1:
            return to
        return -1 if kind in (POINT, WINDOW) else t.next_round_robin()
