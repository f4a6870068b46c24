"""The TDX module: the Secure-EPT and the SEAMCALLs that change it.

Design note.  KVM never writes the S-EPT: it asks the TDX module through
SEAMCALLs, and the module checks every request against the entry's state
(its own consistency checks) and refuses to wait for its internal locks,
returning TDX_OPERAND_BUSY instead.  This file is that module.  KVM's side
(the mirror root and the external hooks) is ``mirror.py``; the only shared
state between the two is what the SEAMCALLs return.

Locking inside the module (Yan Zhao's 2025 summary, reference 8.2): a per-TD
``secure_ept_lock`` taken *shared* by TDH.MEM.SEPT.ADD, PAGE.AUG and
PAGE.REMOVE, *exclusive* by RANGE.BLOCK and SEPT.REMOVE; the shared holders
also lock the S-EPT table they modify; TDH.MEM.TRACK takes the TD epoch lock.
Every lock is a try-lock: a SEAMCALL that cannot take one returns BUSY with
the operand ID (SEPT or TD_EPOCH) in the low bits.  A SEAMCALL holds its
locks for ``latency`` (the real ones take microseconds): that is the window
in which other SEAMCALLs see BUSY and in which KVM's mirror must stay frozen.

S-EPT entries (module-private encoding): state in bits 0-2, PFN or child
table in bits 3-42, the TD epoch at which the entry was blocked in bits
43-63.  A blocked entry may be removed only once a TRACK has moved the epoch
past its block epoch (the module's "TLB tracking done" check).
"""

from __future__ import annotations

from stress.arena import WORDS_PER_PAGE, Globals, SpMeta
from stress.model.kvm import Kvm
from stress.model.mmu_page import SP_EXT_HELD, SP_SEPT

TDX_SUCCESS = 0
TDX_SEAMCALL_STATUS_MASK = 0xFFFFFFFF00000000
TDX_OPERAND_BUSY = 0x8000020000000000
TDX_EPT_WALK_FAILED = 0xC0000B0000000000
TDX_EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
# not in KVM's tdx_errno.h: the model's code for "BLOCK not yet tracked"
TDX_TLB_TRACKING_NOT_DONE = 0xC0000B0800000000
TDX_OPERAND_ID_SEPT = 0x92
TDX_OPERAND_ID_TD_EPOCH = 0xA9

ERROR_NAMES = {
    TDX_OPERAND_BUSY: "TDX_OPERAND_BUSY",
    TDX_EPT_WALK_FAILED: "TDX_EPT_WALK_FAILED",
    TDX_EPT_ENTRY_STATE_INCORRECT: "TDX_EPT_ENTRY_STATE_INCORRECT",
    TDX_TLB_TRACKING_NOT_DONE: "TDX_TLB_TRACKING_NOT_DONE",
}

SEPT_FREE, SEPT_MAPPED, SEPT_TABLE, SEPT_BLOCKED, SEPT_TABLE_BLOCKED = range(5)
SEPT_STATE_NAMES = ("FREE", "MAPPED", "TABLE", "BLOCKED", "TABLE_BLOCKED")
_PFN_SHIFT = 3
_PFN_MASK = (1 << 40) - 1
_EPOCH_SHIFT = 43
_EPOCH_MASK = (1 << 21) - 1


def tdx_operand_busy(err: int) -> bool:
    return (err & TDX_SEAMCALL_STATUS_MASK) == TDX_OPERAND_BUSY


def error_name(err: int) -> str:
    return ERROR_NAMES.get(err & TDX_SEAMCALL_STATUS_MASK, f"{err:#x}")


def sept_entry(state: int, pfn: int = 0, epoch: int = 0) -> int:
    return state | (pfn & _PFN_MASK) << _PFN_SHIFT | (epoch & _EPOCH_MASK) << _EPOCH_SHIFT


def sept_state(e: int) -> int:
    return e & 7


def sept_pfn(e: int) -> int:
    return (e >> _PFN_SHIFT) & _PFN_MASK


def sept_epoch(e: int) -> int:
    return e >> _EPOCH_SHIFT


def describe_sept(e: int) -> str:
    st = sept_state(e)
    name = SEPT_STATE_NAMES[st] if st < len(SEPT_STATE_NAMES) else f"?{st}"
    if st == SEPT_FREE:
        return "FREE"
    what = "table" if st in (SEPT_TABLE, SEPT_TABLE_BLOCKED) else "pfn"
    return f"{name}({what}={sept_pfn(e):#x})"


def _index(gfn: int, level: int) -> int:
    return (gfn >> (9 * (level - 1))) & (WORDS_PER_PAGE - 1)


class TdxModule:
    """One process's door into the module: SEAMCALLs on the shared S-EPT."""

    def __init__(self, kvm: Kvm, latency_ns: int) -> None:
        self.kvm = kvm
        self.w = kvm.w
        self.lay = kvm.layout
        self.latency_ns = latency_ns
        self.root_level = kvm.geometry.root_level
        lay = self.lay
        self._lock_i = lay.glob(Globals.SECURE_EPT_LOCK)
        self._lock_owner_i = lay.glob(Globals.SECURE_EPT_LOCK_OWNER)
        self._epoch_i = lay.glob(Globals.TD_EPOCH)
        self._epoch_lock_i = lay.glob(Globals.TD_EPOCH_LOCK)

    # -- module internals ---------------------------------------------------------
    def _work(self) -> None:
        self.w.spin_ns(self.latency_ns)

    def _walk(self, gfn: int, level: int) -> int | None:
        """Word index of the S-EPT entry for (gfn, level), or None if a parent is
        missing (or blocked: a blocked table is not walked through)."""
        w, lay = self.w, self.lay
        table = w.load(lay.glob(Globals.SEPT_ROOT))
        for lvl in range(self.root_level, level, -1):
            e = w.load(lay.spt(table) + _index(gfn, lvl))
            if sept_state(e) != SEPT_TABLE:
                return None
            table = sept_pfn(e)
        return lay.spt(table) + _index(gfn, level)

    def _table_of(self, entry_i: int) -> int:
        return (entry_i - self.lay.pages) // WORDS_PER_PAGE

    def _lock_shared(self) -> bool:
        return self.w.read_trylock(self._lock_i)

    def _unlock_shared(self) -> None:
        self.w.read_unlock(self._lock_i)

    def _lock_exclusive(self) -> bool:
        return self.w.write_trylock(self._lock_i, self._lock_owner_i, self.kvm.pid)

    def _unlock_exclusive(self) -> None:
        self.w.write_unlock(self._lock_i, self._lock_owner_i)

    def _shared_entry_op(self, gfn: int, level: int, op) -> int:  # noqa: ANN001
        """Common frame of the shared-lock SEAMCALLs: lock TD shared, walk, lock the
        table, do the work, run ``op(entry_i, entry)``."""
        if not self._lock_shared():
            return TDX_OPERAND_BUSY | TDX_OPERAND_ID_SEPT
        try:
            entry_i = self._walk(gfn, level)
            if entry_i is None:
                return TDX_EPT_WALK_FAILED
            table_lock = self.lay.sp(self._table_of(entry_i), SpMeta.SEPT_LOCK)
            if not self.w.spin_trylock(table_lock, self.kvm.pid):
                return TDX_OPERAND_BUSY | TDX_OPERAND_ID_SEPT
            try:
                self._work()
                return op(entry_i, self.w.load(entry_i))
            finally:
                self.w.spin_unlock(table_lock)
        finally:
            self._unlock_shared()

    def _exclusive_entry_op(self, gfn: int, level: int, op) -> int:  # noqa: ANN001
        """Common frame of the exclusive SEAMCALLs: lock TD exclusive, do the work,
        walk, run ``op(entry_i, entry)``.  No table lock: nobody else is inside."""
        if not self._lock_exclusive():
            return TDX_OPERAND_BUSY | TDX_OPERAND_ID_SEPT
        try:
            self._work()
            entry_i = self._walk(gfn, level)
            if entry_i is None:
                return TDX_EPT_WALK_FAILED
            return op(entry_i, self.w.load(entry_i))
        finally:
            self._unlock_exclusive()

    # -- SEAMCALLs ------------------------------------------------------------------
    def tdh_mem_sept_add(self, gfn: int, level: int, page: int) -> int:
        """Link S-EPT table ``page`` (of level ``level - 1``) at the entry (gfn, level).
        The entry must be FREE and every parent present."""
        lay = self.lay

        def op(entry_i: int, e: int) -> int:
            if sept_state(e) != SEPT_FREE:
                return TDX_EPT_ENTRY_STATE_INCORRECT
            self.w.fill(lay.spt(page), WORDS_PER_PAGE, sept_entry(SEPT_FREE))
            self.w.store(lay.sp(page, SpMeta.ROLE), level - 1)
            self.w.store(lay.sp(page, SpMeta.GFN), gfn & -(1 << (9 * (level - 1))))
            self.w.store(lay.sp(page, SpMeta.STATE), SP_SEPT)
            self.w.store(entry_i, sept_entry(SEPT_TABLE, page))
            return TDX_SUCCESS

        return self._shared_entry_op(gfn, level, op)

    def tdh_mem_page_aug(self, gfn: int, pfn: int) -> int:
        """Map a 4K private page: the leaf entry must be FREE."""

        def op(entry_i: int, e: int) -> int:
            if sept_state(e) != SEPT_FREE:
                return TDX_EPT_ENTRY_STATE_INCORRECT
            self.w.store(entry_i, sept_entry(SEPT_MAPPED, pfn))
            return TDX_SUCCESS

        return self._shared_entry_op(gfn, 1, op)

    def tdh_mem_range_block(self, gfn: int, level: int) -> int:
        """Block a mapped leaf or a table entry (exclusive): no new translations."""

        def op(entry_i: int, e: int) -> int:
            st = sept_state(e)
            epoch = self.w.load(self._epoch_i)
            if st == SEPT_MAPPED:
                self.w.store(entry_i, sept_entry(SEPT_BLOCKED, sept_pfn(e), epoch))
            elif st == SEPT_TABLE:
                self.w.store(entry_i, sept_entry(SEPT_TABLE_BLOCKED, sept_pfn(e), epoch))
            else:
                return TDX_EPT_ENTRY_STATE_INCORRECT
            return TDX_SUCCESS

        return self._exclusive_entry_op(gfn, level, op)

    def tdh_mem_track(self) -> int:
        """Move the TD's TLB epoch on (KVM then kicks every vCPU out of the guest)."""
        if not self.w.spin_trylock(self._epoch_lock_i, self.kvm.pid):
            return TDX_OPERAND_BUSY | TDX_OPERAND_ID_TD_EPOCH
        try:
            self._work()
            self.w.fetch_add(self._epoch_i, 1)
            return TDX_SUCCESS
        finally:
            self.w.spin_unlock(self._epoch_lock_i)

    def _tracked(self, e: int) -> bool:
        return (self.w.load(self._epoch_i) - sept_epoch(e)) & _EPOCH_MASK != 0

    def tdh_mem_page_remove(self, gfn: int) -> int:
        """Remove a blocked and tracked 4K leaf."""

        def op(entry_i: int, e: int) -> int:
            if sept_state(e) != SEPT_BLOCKED:
                return TDX_EPT_ENTRY_STATE_INCORRECT
            if not self._tracked(e):
                return TDX_TLB_TRACKING_NOT_DONE
            self.w.store(entry_i, sept_entry(SEPT_FREE))
            return TDX_SUCCESS

        return self._shared_entry_op(gfn, 1, op)

    def tdh_mem_sept_remove(self, gfn: int, level: int) -> int:
        """Unlink the empty, blocked and tracked table at (gfn, level) and hand its
        page back to KVM."""

        def op(entry_i: int, e: int) -> int:
            if sept_state(e) != SEPT_TABLE_BLOCKED:
                return TDX_EPT_ENTRY_STATE_INCORRECT
            if not self._tracked(e):
                return TDX_TLB_TRACKING_NOT_DONE
            child = sept_pfn(e)
            if self.w.count_equal(self.lay.spt(child), WORDS_PER_PAGE,
                                  sept_entry(SEPT_FREE)) != WORDS_PER_PAGE:
                return TDX_EPT_ENTRY_STATE_INCORRECT  # the table is not empty
            self.w.store(entry_i, sept_entry(SEPT_FREE))
            self.w.store(self.lay.sp(child, SpMeta.STATE), SP_EXT_HELD)
            return TDX_SUCCESS

        return self._exclusive_entry_op(gfn, level, op)

    # -- TD lifecycle (not SEAMCALLs KVM races on) ------------------------------------
    def td_init(self, page: int) -> None:
        """TDH.MNG.CREATE and friends, reduced to: ``page`` becomes the S-EPT root."""
        lay = self.lay
        self.w.fill(lay.spt(page), WORDS_PER_PAGE, sept_entry(SEPT_FREE))
        self.w.store(lay.sp(page, SpMeta.ROLE), self.root_level)
        self.w.store(lay.sp(page, SpMeta.GFN), 0)
        self.w.store(lay.sp(page, SpMeta.STATE), SP_SEPT)
        self.w.store(lay.glob(Globals.SEPT_ROOT), page)
        self.w.store(self._epoch_i, 1)

    def td_teardown(self) -> int | None:
        """Reclaim the S-EPT root (TDH.PHYMEM.PAGE.RECLAIM); it must be empty.
        Returns the root page, now KVM's, or None if something is still mapped."""
        lay = self.lay
        root = self.w.load(lay.glob(Globals.SEPT_ROOT))
        if self.w.count_equal(lay.spt(root), WORDS_PER_PAGE, sept_entry(SEPT_FREE)) != \
                WORDS_PER_PAGE:
            return None
        self.w.store(lay.sp(root, SpMeta.STATE), SP_EXT_HELD)
        self.w.store(lay.glob(Globals.SEPT_ROOT), 0)
        return root
