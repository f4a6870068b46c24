"""The TDX module: the Secure-EPT, the SEAMCALLs KVM issues, TDH.VP.ENTER and
the guest's TDCALLs.

Design note.  KVM never writes the S-EPT: it asks the TDX module through
SEAMCALLs, and the module checks every request against the entry's state and
refuses to wait for its internal locks, returning TDX_OPERAND_BUSY instead.
This file is that module; KVM's side (tdx.c's S-EPT hooks) is ``mirror.py``.
The module has three kinds of callers, and each is a real process here:

* KVM tasks (``CALLER_KVM``): faults AUG and SEPT.ADD with ``mmu_lock`` held for
  read; removals BLOCK, TRACK and REMOVE with it held for write;
* a vCPU entering the TD (``CALLER_VP_ENTER``): TDH.VP.ENTER takes the TD
  epoch lock shared and, under zero-step mitigation, the S-EPT tree lock;
* the guest (``CALLER_TDCALL``): TDG.MEM.PAGE.ACCEPT of a page KVM AUGed.

Locks (the TDX module's try-locks; which call takes which in what mode is
the table ``LOCKS`` below, from the TDX module ABI and base architecture
specifications as summarised on LKML, see the README's kernel map; where the
specification is silent the choice is marked *assumed*):

* the per-TD S-EPT tree lock, shared or exclusive;
* a per-entry lock on the S-EPT entry a call changes (bit 63 of the entry);
* the TD epoch lock, exclusive for TDH.MEM.TRACK, shared for TDH.VP.ENTER.

A call that cannot take a lock returns TDX_OPERAND_BUSY and records who held
it (``last_busy_holder``), so ``results.json`` can count BUSY by the pair of
callers that collided.  A call holds its locks for ``latency`` (the real ones
take microseconds): the window in which the others see BUSY.

S-EPT entries (module-private encoding): state in bits 0-2, PFN or child
table in bits 3-42, the TD epoch at which the entry was blocked in bits
43-60, the kind of the lock holder in bits 61-62, the entry lock in bit 63.
An AUGed page is PENDING until the guest accepts it; a guest access to a
PENDING page is an EPT violation of the PENDING type, which KVM treats as
fatal (``tdx_is_sept_violation_unexpected_pending``).  A blocked entry may be
removed only once a TRACK moved the epoch past its block epoch and no vCPU
still runs in the TD with an epoch that old (TLB tracking).
"""

from __future__ import annotations

from stress.arena import WORDS_PER_PAGE, Globals, Slot, SpMeta
from stress.model.kvm import Kvm
from stress.model.mmu_page import SP_EXT_HELD, SP_SEPT

TDX_SUCCESS = 0
TDX_SEAMCALL_STATUS_MASK = 0xFFFFFFFF00000000
TDX_OPERAND_BUSY = 0x8000020000000000
TDX_EPT_WALK_FAILED = 0xC0000B0000000000
TDX_EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
TDX_OP_STATE_INCORRECT = 0xC000060000000000
TDX_PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
# not in KVM's tdx_errno.h (the model's codes): "BLOCK not yet tracked" and
# "a vCPU still runs with the epoch before the current one" (TRACK)
TDX_TLB_TRACKING_NOT_DONE = 0xC0000B0800000000
TDX_PREVIOUS_TLB_EPOCH_BUSY = 0x8000020100000000
# TDH.VP.ENTER / TDCALL outcomes as the model returns them (not module codes)
VP_ENTERED = 0
VP_EPT_VIOLATION = 1  # zero-step mitigation: an EPT violation synthesized, no entry
TDX_OPERAND_ID_SEPT = 0x92
TDX_OPERAND_ID_TD_EPOCH = 0xA9

ERROR_NAMES = {
    TDX_OPERAND_BUSY: "TDX_OPERAND_BUSY",
    TDX_EPT_WALK_FAILED: "TDX_EPT_WALK_FAILED",
    TDX_EPT_ENTRY_STATE_INCORRECT: "TDX_EPT_ENTRY_STATE_INCORRECT",
    TDX_OP_STATE_INCORRECT: "TDX_OP_STATE_INCORRECT",
    TDX_PAGE_ALREADY_ACCEPTED: "TDX_PAGE_ALREADY_ACCEPTED",
    TDX_TLB_TRACKING_NOT_DONE: "TDX_TLB_TRACKING_NOT_DONE",
    TDX_PREVIOUS_TLB_EPOCH_BUSY: "TDX_PREVIOUS_TLB_EPOCH_BUSY",
}

(SEPT_FREE, SEPT_MAPPED, SEPT_TABLE, SEPT_BLOCKED, SEPT_TABLE_BLOCKED, SEPT_PENDING,
 SEPT_PENDING_BLOCKED) = range(7)
SEPT_STATE_NAMES = ("FREE", "MAPPED", "TABLE", "BLOCKED", "TABLE_BLOCKED", "PENDING",
                    "PENDING_BLOCKED")
_PFN_SHIFT = 3
_PFN_MASK = (1 << 40) - 1
_EPOCH_SHIFT = 43
_EPOCH_BITS = 18
_EPOCH_MASK = (1 << _EPOCH_BITS) - 1
_HOLDER_SHIFT = 61
ENTRY_LOCK = 1 << 63
_VALUE_MASK = (1 << _HOLDER_SHIFT) - 1

# who calls the module (and who held the lock a BUSY call wanted)
CALLER_KVM, CALLER_VP_ENTER, CALLER_TDCALL = 1, 2, 3
CALLER_NAMES = {CALLER_KVM: "KVM", CALLER_VP_ENTER: "VP.ENTER", CALLER_TDCALL: "TDCALL"}

# TD lifecycle (kvm_tdx->state)
TD_STATE_UNINITIALIZED, TD_STATE_INITIALIZED, TD_STATE_RUNNABLE = 0, 1, 2

# Which lock each call takes, and how ("S" shared, "X" exclusive): the TDR, the
# S-EPT tree, the entry the call changes, the TD epoch.  Source: Yan Zhao's
# table of the TDX module's locks (TDX_1.5.05; "Re: [PATCH 09/21] KVM: TDX: Retry
# seamcall when TDX_OPERAND_BUSY with operand SEPT", 13 Sep 2024) and the module's
# source, intel/tdx-module 1666adc494db (the ABI specification 348551-007US does
# not list locks).  TDCS and TDVPR locks, PAMT locks and host priority are not
# modelled: KVM's own locking keeps callers of those apart, and the retry after
# the kick of tdh_do_no_vcpus wins without host priority here.
LOCKS: dict[str, dict[str, str]] = {
    "TDH.MEM.SEPT.ADD": {"tdr": "S", "tree": "S", "entry": "X"},
    "TDH.MEM.PAGE.AUG": {"tdr": "S", "tree": "S", "entry": "X"},
    "TDH.MEM.PAGE.ADD": {"tdr": "X", "entry": "X"},
    "TDH.MEM.RANGE.BLOCK": {"tdr": "S", "tree": "X", "entry": "X"},
    "TDH.MEM.TRACK": {"tdr": "S", "epoch": "X"},
    "TDH.MEM.PAGE.REMOVE": {"tdr": "S", "tree": "S", "entry": "X"},
    "TDH.MEM.SEPT.REMOVE": {"tdr": "S", "tree": "X", "entry": "X"},
    "TDH.MR.EXTEND": {"tdr": "X"},
    "TDH.MR.FINALIZE": {"tdr": "X"},
    "TDH.VP.RD": {"tdr": "S"},
    # TDR held shared until the TD exit; epoch dropped before the guest runs;
    # the tree only under zero-step mitigation
    "TDH.VP.ENTER": {"tdr": "S", "epoch": "S"},
    "TDH.VP.ENTER zero-step": {"tdr": "S", "epoch": "S", "tree": "X"},
    "TDG.MEM.PAGE.ACCEPT": {"entry": "X"},  # no tree lock: the guest's entry lock
}
TDX_OPERAND_ID_TDR = 0x80


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
    return (e >> _EPOCH_SHIFT) & _EPOCH_MASK


def sept_value(e: int) -> int:
    """The entry without its lock and holder bits."""
    return e & _VALUE_MASK


def describe_sept(e: int) -> str:
    st = sept_state(e)
    name = SEPT_STATE_NAMES[st] if st < len(SEPT_STATE_NAMES) else f"?{st}"
    if st == SEPT_FREE:
        return "FREE"
    what = "table" if st in (SEPT_TABLE, SEPT_TABLE_BLOCKED) else "pfn"
    return f"{name}({what}={sept_pfn(e):#x})"


def is_sept_leaf_mapped(e: int) -> bool:
    """MAPPED or PENDING: the module holds the page for the TD."""
    return sept_state(e) in (SEPT_MAPPED, SEPT_PENDING)


def _index(gfn: int, level: int) -> int:
    return (gfn >> (9 * (level - 1))) & (WORDS_PER_PAGE - 1)


class TdxModule:
    """One process's door into the module: its calls on the shared S-EPT."""

    def __init__(self, kvm: Kvm, latency_ns: int, zero_step_threshold: int = 6,
                 vp_enter_latency_ns: int | None = None) -> None:
        self.kvm = kvm
        self.w = kvm.w
        self.lay = kvm.layout
        self.latency_ns = latency_ns
        self.vp_enter_latency_ns = latency_ns if vp_enter_latency_ns is None \
            else vp_enter_latency_ns
        self.zero_step_threshold = zero_step_threshold
        self.root_level = kvm.geometry.root_level
        lay = self.lay
        self._tree_i = lay.glob(Globals.SECURE_EPT_LOCK)
        self._tree_owner_i = lay.glob(Globals.SECURE_EPT_LOCK_OWNER)
        self._tree_holders_i = lay.glob(Globals.SEPT_LOCK_HOLDERS)
        self._epoch_i = lay.glob(Globals.TD_EPOCH)
        self._epoch_lock_i = lay.glob(Globals.TD_EPOCH_LOCK)
        self._epoch_owner_i = lay.glob(Globals.TD_EPOCH_LOCK_OWNER)
        self._epoch_holders_i = lay.glob(Globals.EPOCH_LOCK_HOLDERS)
        self._state_i = lay.glob(Globals.TD_STATE)
        self._tdr_i = lay.glob(Globals.TDR_LOCK)
        self._tdr_owner_i = lay.glob(Globals.TDR_LOCK_OWNER)
        self._tdr_holders_i = lay.glob(Globals.TDR_LOCK_HOLDERS)
        # who held the lock the last BUSY call of this process wanted
        self.last_busy_holder = 0
        self.caller = CALLER_KVM

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

    def entry(self, gfn: int, level: int = 1) -> int | None:
        """The S-EPT entry for (gfn, level) as it reads now, or None (oracles,
        reports)."""
        i = self._walk(gfn, level)
        return None if i is None else sept_value(self.w.load(i))

    @staticmethod
    def _holder_of(holders: int) -> int:
        for kind in (CALLER_VP_ENTER, CALLER_TDCALL, CALLER_KVM):
            if (holders >> (16 * kind)) & 0xFFFF:
                return kind
        return 0

    def _busy(self, operand: int, holder: int) -> int:
        self.last_busy_holder = holder
        return TDX_OPERAND_BUSY | operand

    def _rw(self, which: str) -> tuple[int, int, int, int]:
        if which == "tdr":
            return self._tdr_i, self._tdr_owner_i, self._tdr_holders_i, TDX_OPERAND_ID_TDR
        if which == "tree":
            return self._tree_i, self._tree_owner_i, self._tree_holders_i, TDX_OPERAND_ID_SEPT
        return (self._epoch_lock_i, self._epoch_owner_i, self._epoch_holders_i,
                TDX_OPERAND_ID_TD_EPOCH)

    def _lock(self, which: str, mode: str) -> bool:
        """Try-lock the TDR, the tree or the epoch lock; on failure record the
        kind of caller holding it."""
        lock_i, owner_i, holders_i, _op = self._rw(which)
        ok = (self.w.read_trylock(lock_i) if mode == "S"
              else self.w.write_trylock(lock_i, owner_i, self.kvm.pid))
        if ok:
            self.w.fetch_add(holders_i, 1 << (16 * self.caller))
        else:
            self.last_busy_holder = self._holder_of(self.w.load(holders_i))
        return ok

    def _unlock(self, which: str, mode: str) -> None:
        lock_i, owner_i, holders_i, _op = self._rw(which)
        self.w.fetch_add(holders_i, -(1 << (16 * self.caller)))
        if mode == "S":
            self.w.read_unlock(lock_i)
        else:
            self.w.write_unlock(lock_i, owner_i)

    def _take(self, locks: dict[str, str]) -> tuple[list[tuple[str, str]], int]:
        """Take the TDR, epoch and tree locks a call needs, in that order: the
        list taken, and 0 or the BUSY status (nothing held then)."""
        taken: list[tuple[str, str]] = []
        for which in ("tdr", "epoch", "tree"):
            mode = locks.get(which)
            if mode is None:
                continue
            if not self._lock(which, mode):
                holder = self.last_busy_holder
                self._drop(taken)
                return [], self._busy(self._rw(which)[3], holder)
            taken.append((which, mode))
        return taken, 0

    def _drop(self, taken: list[tuple[str, str]]) -> None:
        for which, mode in reversed(taken):
            self._unlock(which, mode)

    def _entry_lock(self, entry_i: int) -> int | None:
        """Take the entry's lock: its value, or None (BUSY, holder recorded)."""
        w = self.w
        mark = ENTRY_LOCK | self.caller << _HOLDER_SHIFT
        v = w.load(entry_i)
        while True:
            if v & ENTRY_LOCK:
                self.last_busy_holder = (v >> _HOLDER_SHIFT) & 3
                return None
            found = w.cmpxchg(entry_i, v, v | mark)
            if found == v:
                return sept_value(v)
            v = found

    def _entry_unlock(self, entry_i: int, value: int) -> None:
        self.w.store(entry_i, sept_value(value))

    def _entry_op(self, name: str, gfn: int, level: int, op) -> int:  # noqa: ANN001
        """The frame of a call on one S-EPT entry: take the call's locks (LOCKS),
        walk, lock the entry, do the work, ``op(entry) -> (err, new entry)``."""
        taken, err = self._take(LOCKS[name])
        if err:
            return err
        try:
            entry_i = self._walk(gfn, level)
            if entry_i is None:
                return TDX_EPT_WALK_FAILED
            e = self._entry_lock(entry_i)
            if e is None:
                return self._busy(TDX_OPERAND_ID_SEPT, self.last_busy_holder)
            new = e
            try:
                self._work()
                err, new = op(e)
                return err
            finally:
                self._entry_unlock(entry_i, new)
        finally:
            self._drop(taken)

    def _simple_op(self, name: str) -> int:
        """A call that takes only the TD-wide locks of LOCKS and does its work."""
        taken, err = self._take(LOCKS[name])
        if err:
            return err
        try:
            self._work()
            return TDX_SUCCESS
        finally:
            self._drop(taken)

    def _vcpus_in_td(self) -> list[tuple[int, int]]:
        """(vCPU slot, epoch it entered with) of every vCPU running in the TD."""
        w, lay = self.w, self.lay
        out = []
        for v in range(lay.n_slots):
            e = w.load(lay.slot(v, Slot.TD_VCPU_EPOCH))
            if e:
                out.append((v, e - 1))
        return out

    def _tracked(self, e: int) -> bool:
        """TLB tracking done for an entry blocked at epoch b: the TD epoch moved
        past b and every vCPU running in the TD entered after b (epochs compared
        by their age, modulo the field's width)."""
        now = self.w.load(self._epoch_i)
        age_b = (now - sept_epoch(e)) & _EPOCH_MASK
        if age_b == 0:
            return False
        return all(((now - ve) & _EPOCH_MASK) < age_b for _v, ve in self._vcpus_in_td())

    # -- SEAMCALLs (KVM) --------------------------------------------------------------
    def tdh_mem_sept_add(self, gfn: int, level: int, page: int) -> int:
        """Link S-EPT table ``page`` (of level ``level - 1``) at the entry (gfn, level).
        The entry must be FREE and every parent present."""
        lay, w = self.lay, self.w

        def op(e: int) -> tuple[int, int]:
            if sept_state(e) != SEPT_FREE:
                return TDX_EPT_ENTRY_STATE_INCORRECT, e
            w.fill(lay.spt(page), WORDS_PER_PAGE, sept_entry(SEPT_FREE))
            w.store(lay.sp(page, SpMeta.ROLE), level - 1)
            w.store(lay.sp(page, SpMeta.GFN), gfn & -(1 << (9 * (level - 1))))
            w.store(lay.sp(page, SpMeta.STATE), SP_SEPT)
            return TDX_SUCCESS, sept_entry(SEPT_TABLE, page)

        return self._entry_op("TDH.MEM.SEPT.ADD", gfn, level, op)

    def tdh_mem_page_aug(self, gfn: int, pfn: int) -> int:
        """Map a 4K private page into a running TD: FREE -> PENDING (the guest
        must accept it before it uses it)."""

        def op(e: int) -> tuple[int, int]:
            if sept_state(e) != SEPT_FREE:
                return TDX_EPT_ENTRY_STATE_INCORRECT, e
            return TDX_SUCCESS, sept_entry(SEPT_PENDING, pfn)

        return self._entry_op("TDH.MEM.PAGE.AUG", gfn, 1, op)

    def tdh_mem_page_add(self, gfn: int, pfn: int) -> int:
        """Add a page of the initial image (before TDH.MR.FINALIZE): FREE ->
        MAPPED, measured and accepted by construction."""
        if self.w.load(self._state_i) == TD_STATE_RUNNABLE:
            return TDX_OP_STATE_INCORRECT

        def op(e: int) -> tuple[int, int]:
            if sept_state(e) != SEPT_FREE:
                return TDX_EPT_ENTRY_STATE_INCORRECT, e
            return TDX_SUCCESS, sept_entry(SEPT_MAPPED, pfn)

        return self._entry_op("TDH.MEM.PAGE.ADD", gfn, 1, op)

    def tdh_mem_range_block(self, gfn: int, level: int) -> int:
        """Block a mapped leaf or a table entry (tree exclusive): no new
        translations through it; the block epoch is recorded."""
        epoch = self.w.load(self._epoch_i)

        def op(e: int) -> tuple[int, int]:
            st = sept_state(e)
            nxt = {SEPT_MAPPED: SEPT_BLOCKED, SEPT_PENDING: SEPT_PENDING_BLOCKED,
                   SEPT_TABLE: SEPT_TABLE_BLOCKED}.get(st)
            if nxt is None:
                return TDX_EPT_ENTRY_STATE_INCORRECT, e
            return TDX_SUCCESS, sept_entry(nxt, sept_pfn(e), epoch)

        return self._entry_op("TDH.MEM.RANGE.BLOCK", gfn, level, op)

    def tdh_mem_track(self) -> int:
        """Move the TD's TLB epoch on (KVM then kicks every vCPU out of the TD).
        Refused while a vCPU still runs with the epoch before the current one:
        the previous tracking has not completed."""
        taken, err = self._take(LOCKS["TDH.MEM.TRACK"])
        if err:
            return err
        try:
            self._work()
            now = self.w.load(self._epoch_i)
            if any((now - ve) & _EPOCH_MASK >= 1 for _v, ve in self._vcpus_in_td()):
                return TDX_PREVIOUS_TLB_EPOCH_BUSY
            self.w.store(self._epoch_i, (now + 1) & _EPOCH_MASK)
            return TDX_SUCCESS
        finally:
            self._drop(taken)

    def tdh_mem_page_remove(self, gfn: int) -> int:
        """Remove a blocked and tracked 4K leaf (tree exclusive)."""

        # TLB tracking is required only once the TD can run: before, no vCPU can
        # cache a translation, and an unblocked leaf may be removed as it is
        running = self.w.load(self._state_i) == TD_STATE_RUNNABLE

        def op(e: int) -> tuple[int, int]:
            st = sept_state(e)
            if st not in (SEPT_BLOCKED, SEPT_PENDING_BLOCKED) and (
                    running or st not in (SEPT_MAPPED, SEPT_PENDING)):
                return TDX_EPT_ENTRY_STATE_INCORRECT, e
            if running and not self._tracked(e):
                return TDX_TLB_TRACKING_NOT_DONE, e
            return TDX_SUCCESS, sept_entry(SEPT_FREE)

        return self._entry_op("TDH.MEM.PAGE.REMOVE", gfn, 1, op)

    def tdh_mem_sept_remove(self, gfn: int, level: int) -> int:
        """Unlink the empty, blocked and tracked table at (gfn, level) and hand its
        page back to KVM (not used by upstream KVM while the TD runs)."""
        w, lay = self.w, self.lay
        running = w.load(self._state_i) == TD_STATE_RUNNABLE

        def op(e: int) -> tuple[int, int]:
            if sept_state(e) != SEPT_TABLE_BLOCKED:
                return TDX_EPT_ENTRY_STATE_INCORRECT, e
            if running and not self._tracked(e):
                return TDX_TLB_TRACKING_NOT_DONE, e
            child = sept_pfn(e)
            if w.count_equal(lay.spt(child), WORDS_PER_PAGE,
                             sept_entry(SEPT_FREE)) != WORDS_PER_PAGE:
                return TDX_EPT_ENTRY_STATE_INCORRECT, e  # the table is not empty
            w.store(lay.sp(child, SpMeta.STATE), SP_EXT_HELD)
            return TDX_SUCCESS, sept_entry(SEPT_FREE)

        return self._entry_op("TDH.MEM.SEPT.REMOVE", gfn, level, op)

    def tdh_phymem_page_reclaim(self, page: int) -> int:
        """Take an S-EPT page back from the module.  Only for a TD being torn down
        (its HKID released): the page's entries are dropped with it."""
        w, lay = self.w, self.lay
        if w.load(lay.glob(Globals.HKID)):
            return TDX_OP_STATE_INCORRECT
        if w.load(lay.sp(page, SpMeta.STATE)) != SP_SEPT:
            return TDX_OP_STATE_INCORRECT
        w.store(lay.sp(page, SpMeta.STATE), SP_EXT_HELD)
        return TDX_SUCCESS

    # -- TDH.VP.ENTER and the guest's TDCALLs -----------------------------------------
    def tdh_vp_enter(self, vcpu: int, rip: int | None, fault_gfn: int | None) -> int:
        """Enter the TD on vCPU slot ``vcpu``.  The TDR is taken shared and held
        until the TD exit (:meth:`td_exit`); the TD epoch lock shared while the
        vCPU records the epoch it runs with.  ``rip``/``fault_gfn``: the guest
        instruction the vCPU re-executes and the private gfn its last EPT
        violation was on (None: the guest made progress since).  After more
        than ``zero_step_threshold`` entries re-faulting at one RIP the module
        suspects a zero-step attack: it takes the S-EPT tree exclusively, walks
        it for the gfn and, if it is still not mapped, synthesizes the EPT
        violation again without entering the guest.
        Returns VP_ENTERED, VP_EPT_VIOLATION or TDX_OPERAND_BUSY."""
        w, lay = self.w, self.lay
        self.caller = CALLER_VP_ENTER
        try:
            count_i = lay.slot(vcpu, Slot.ZERO_STEP_COUNT)
            rip_i = lay.slot(vcpu, Slot.ZERO_STEP_RIP)
            if rip is None or fault_gfn is None:
                w.store(count_i, 0)
                w.store(rip_i, 0)
                zero_step = False
            else:
                n = w.load(count_i) + 1 if w.load(rip_i) == rip + 1 else 1
                w.store(rip_i, rip + 1)
                w.store(count_i, n)
                w.store(lay.slot(vcpu, Slot.ZERO_STEP_GFN), fault_gfn + 1)
                zero_step = n > self.zero_step_threshold
            name = "TDH.VP.ENTER zero-step" if zero_step else "TDH.VP.ENTER"
            taken, err = self._take(LOCKS[name])
            if err:
                return err
            tdr = taken.pop(0)  # kept until the TD exit
            try:
                # the entry itself, with the epoch (and tree) locks held
                self.w.spin_ns(self.vp_enter_latency_ns)
                if zero_step:
                    assert fault_gfn is not None
                    e = self.entry(fault_gfn)
                    self.kvm.stats["zero_step_walks"] += 1
                    if e is None or not is_sept_leaf_mapped(e):
                        self._drop([tdr])
                        return VP_EPT_VIOLATION
                w.store(lay.slot(vcpu, Slot.TD_VCPU_EPOCH), w.load(self._epoch_i) + 1)
                return VP_ENTERED
            finally:
                self._drop(taken)  # the epoch (and tree) locks go before the guest runs
        finally:
            self.caller = CALLER_KVM

    def td_exit(self, vcpu: int) -> None:
        """The vCPU leaves the TD: it no longer runs with an epoch, and the TDR
        it held shared since TDH.VP.ENTER is released."""
        self.w.store(self.lay.slot(vcpu, Slot.TD_VCPU_EPOCH), 0)
        self.caller = CALLER_VP_ENTER
        try:
            self._unlock("tdr", "S")
        finally:
            self.caller = CALLER_KVM

    def tdh_vp_rd(self) -> int:
        """TDH.VP.RD of a vCPU's state (a vCPU ioctl): the TDR shared."""
        return self._simple_op("TDH.VP.RD")

    def tdh_mr_extend(self, gfn: int) -> int:
        """Extend the TD's measurement with a page of the initial image: the TDR
        exclusively."""
        return self._simple_op("TDH.MR.EXTEND")

    def tdg_mem_page_accept(self, gfn: int) -> int:
        """TDG.MEM.PAGE.ACCEPT from the guest: PENDING -> MAPPED.  TDX_SUCCESS,
        TDX_PAGE_ALREADY_ACCEPTED, TDX_OPERAND_BUSY (the guest retries), or an
        error for a page that is not AUGed (the guest then touches it and takes
        the EPT violation that makes KVM AUG it)."""
        self.caller = CALLER_TDCALL
        try:
            def op(e: int) -> tuple[int, int]:
                st = sept_state(e)
                if st == SEPT_PENDING:
                    return TDX_SUCCESS, sept_entry(SEPT_MAPPED, sept_pfn(e))
                if st == SEPT_MAPPED:
                    return TDX_PAGE_ALREADY_ACCEPTED, e
                return TDX_EPT_ENTRY_STATE_INCORRECT, e

            return self._entry_op("TDG.MEM.PAGE.ACCEPT", gfn, 1, op)
        finally:
            self.caller = CALLER_KVM

    def guest_translate(self, gfn: int) -> int:
        """The CPU's walk of the S-EPT for a guest access to private ``gfn``:
        SEPT_MAPPED (the access completes), SEPT_PENDING (an EPT violation of
        the PENDING type), or SEPT_FREE for anything else (an EPT violation)."""
        e = self.entry(gfn)
        if e is None:
            return SEPT_FREE
        st = sept_state(e)
        return st if st in (SEPT_MAPPED, SEPT_PENDING) else SEPT_FREE

    # -- TD lifecycle -------------------------------------------------------------------
    def td_init(self, page: int) -> None:
        """TDH.MNG.CREATE, TDH.MNG.KEY.CONFIG and friends, reduced to: ``page``
        becomes the S-EPT root, the TD has an HKID and is INITIALIZED."""
        lay = self.lay
        self.w.fill(lay.spt(page), WORDS_PER_PAGE, sept_entry(SEPT_FREE))
        self.w.store(lay.sp(page, SpMeta.ROLE), self.root_level)
        self.w.store(lay.sp(page, SpMeta.GFN), 0)
        self.w.store(lay.sp(page, SpMeta.STATE), SP_SEPT)
        self.w.store(lay.glob(Globals.SEPT_ROOT), page)
        self.w.store(self._epoch_i, 1)
        self.w.store(lay.glob(Globals.HKID), 1)
        self.w.store(self._state_i, TD_STATE_INITIALIZED)

    def tdh_mr_finalize(self) -> int:
        """The initial image is complete: the TD becomes RUNNABLE (TDR exclusive)."""
        if self.w.load(self._state_i) != TD_STATE_INITIALIZED:
            return TDX_OP_STATE_INCORRECT
        err = self._simple_op("TDH.MR.FINALIZE")
        if err:
            return err
        self.w.store(self._state_i, TD_STATE_RUNNABLE)
        return TDX_SUCCESS

    def release_hkid(self) -> None:
        """tdx_mmu_release_hkid's module side (TDH.MNG.VPFLUSHDONE, CACHE.WB,
        KEY.FREEID): from now on pages may be reclaimed, nothing may be mapped."""
        self.w.store(self.lay.glob(Globals.HKID), 0)

    def mapped_leaves(self, limit: int = 1) -> list[tuple[int, str]]:
        """(gfn, entry) of up to ``limit`` 4K leaves the S-EPT still maps."""
        w, lay = self.w, self.lay
        out: list[tuple[int, str]] = []
        stack = [(w.load(lay.glob(Globals.SEPT_ROOT)), self.root_level, 0)]
        while stack and len(out) < limit:
            table, level, base = stack.pop()
            for i, e in w.scan_ne(lay.spt(table), WORDS_PER_PAGE, sept_entry(SEPT_FREE)):
                e = sept_value(e)
                gfn = base + (i << (9 * (level - 1)))
                if sept_state(e) in (SEPT_TABLE, SEPT_TABLE_BLOCKED) and level > 1:
                    stack.append((sept_pfn(e), level - 1, gfn))
                elif sept_state(e) != SEPT_FREE:
                    out.append((gfn, describe_sept(e)))
        return out

    def td_teardown(self) -> int:
        """tdx_vm_destroy's reclaim of the S-EPT root (after the HKID release,
        every S-EPT table below it having been reclaimed with its mirror
        table).  Returns the root page, now KVM's."""
        lay = self.lay
        root = self.w.load(lay.glob(Globals.SEPT_ROOT))
        self.w.store(lay.sp(root, SpMeta.STATE), SP_EXT_HELD)
        self.w.store(lay.glob(Globals.SEPT_ROOT), 0)
        return root
