"""RCU across processes: quiescent-state based reclamation in shared memory.

Design note.  The TDP MMU frees page-table pages with ``call_rcu``: a walker
that entered a table under ``rcu_read_lock()`` may keep reading it after it was
unlinked, and the page must not be reused until every such walker has left.
liburcu is per-process, so this is the DPDK ``rte_rcu_qsbr`` idea on our own
words:

* a global grace-period counter ``gp_ctr`` (starts at 1);
* one reader word per process: 0 outside a read-side section, otherwise the
  ``gp_ctr`` value seen when the section began (outermost lock only);
* ``call_rcu(page)`` unlinks happened before; it takes a ticket
  ``e = ++gp_ctr`` and queues ``(e, page)`` locally;
* a queued page may be freed once every reader word is 0 or ``>= e``: every
  reader that could still hold a pointer into it began before ``e``.

The reader's store of its word must be ordered before its loads of page-table
pointers (a store-load order, which x86 does not give plain stores), so
``rcu_read_lock`` publishes with ``xchg``.  A crashed reader stalls
reclamation until the supervisor clears its word.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from stress.arena import Globals, Layout, Slot
from stress.atomics import Words


class Rcu:
    def __init__(self, words: Words, layout: Layout, me: int) -> None:
        self.w = words
        self.gp_ctr_i = layout.glob(Globals.RCU_GP_CTR)
        self.my_reader_i = layout.slot(me, Slot.RCU_READER)
        self.reader_words = [layout.slot(s, Slot.RCU_READER) for s in range(layout.n_slots)]
        self.nesting = 0
        self.pending: deque[tuple[int, int]] = deque()

    def rcu_read_lock(self) -> None:
        self.nesting += 1
        if self.nesting == 1:
            self.w.xchg_from(self.my_reader_i, self.gp_ctr_i)

    def rcu_read_unlock(self) -> None:
        self.nesting -= 1
        if self.nesting == 0:
            self.w.store(self.my_reader_i, 0)

    def call_rcu(self, page: int) -> int:
        """Queue ``page`` to be freed after a grace period; return its ticket."""
        e = self.w.fetch_add(self.gp_ctr_i, 1) + 1
        self.pending.append((e, page))
        return e

    def oldest_reader(self) -> int | None:
        """The smallest non-zero reader word, or None if no process reads."""
        oldest = None
        for i in self.reader_words:
            v = self.w.load(i)
            if v and (oldest is None or v < oldest):
                oldest = v
        return oldest

    def reclaim(self, free: Callable[[int], None]) -> int:
        """Run the callbacks whose grace period has ended; return how many."""
        if not self.pending:
            return 0
        oldest = self.oldest_reader()
        n = 0
        while self.pending and (oldest is None or self.pending[0][0] <= oldest):
            _e, page = self.pending.popleft()
            free(page)
            n += 1
        return n
