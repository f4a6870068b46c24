"""Mirror roots: KVM's copy of the S-EPT and the external hooks that keep the
TDX module's S-EPT equal to it (seeds 000 and 003; reference 2.2, 2.4, 8).

Design note.  Private gfns are mapped through a *mirror* root
(``role.is_mirror``, inherited by every child table).  KVM reads and writes
the mirror like any TDP MMU table, and for every change of a mirror SPTE it
calls an external hook so the TDX module makes the same change in the S-EPT:

* ``link_external_spt``: a new non-leaf (TDH.MEM.SEPT.ADD);
* ``set_external_spte``: a new leaf (TDH.MEM.PAGE.AUG);
* ``remove_external_spte``: a zapped leaf (RANGE.BLOCK, TRACK, PAGE.REMOVE);
* ``free_external_spt``: a torn-down table, after its children (BLOCK, TRACK,
  SEPT.REMOVE).

With mmu_lock held for read a mirror update is no longer one atomic step: a
SEAMCALL takes microseconds and may answer TDX_OPERAND_BUSY.  The fix (Sean,
seed 000) is to *freeze* the mirror SPTE with FROZEN_SPTE while the SEAMCALLs
run, then publish the new value, or restore the old one if the module said
BUSY.  Every other task sees neither value: faults retry, zaps skip, and
handle_removed_pt's xchg loop waits until the owner publishes.  A zap of a
non-leaf mirror SPTE stays frozen until its whole sub-tree is gone from the
S-EPT, so no fault can SEPT.ADD over the old table.

With mmu_lock held for write nobody else updates SPTEs or issues SEAMCALLs:
the mirror is cleared first and the S-EPT second, in one critical section.

Which entries get the hooks is decided by the table's mirror role, not by the
fault's ``is_private`` (seed 003): zaps and teardown have no fault.  That
choice, the atomic update protocol and the BUSY policy are the pieces the
variants swap.
"""

from __future__ import annotations

from stress.arena import Globals, SpMeta
from stress.atomics import LockAborted
from stress.model import events
from stress.model.kvm import Kvm
from stress.model.mmu_page import ROLE_MIRROR, external_spt
from stress.model.spte import (
    FROZEN_SPTE,
    describe,
    is_last_spte,
    is_shadow_present_pte,
    spte_to_child_pt,
    spte_to_pfn,
)
from stress.model.tdx import (
    TDX_SUCCESS,
    describe_sept,
    error_name,
    tdx_operand_busy,
)

EBUSY = 16
# a SEAMCALL that must succeed (removal) is retried this often before we call
# it a livelock; each BUSY means another SEAMCALL held the lock meanwhile
MUST_SUCCEED_TRIES = 200_000


# ---------------------------------------------------------------------------
# SEAMCALL issue, with the VM's BUSY policy
# ---------------------------------------------------------------------------

SEAMCALLS_WITH_LEVEL = ("TDH.MEM.SEPT.ADD", "TDH.MEM.RANGE.BLOCK", "TDH.MEM.SEPT.REMOVE")


def seamcall(kvm: Kvm, name: str, call, *args: int) -> int:  # noqa: ANN001
    """Issue one SEAMCALL under the configured BUSY policy.

    ``unwind`` (upstream): one attempt; BUSY goes back to the caller, which
    restores the mirror and makes the fault retry.  ``retry``: up to
    ``busy_retries`` attempts in place, the mirror entry still frozen.
    ``serialize``: every SEAMCALL of the VM under one KVM spinlock, so KVM's
    own SEAMCALLs never contend inside the module.
    """
    tdx = kvm.tdx
    kvm.stats["seamcalls"] += 1
    if tdx.policy == "serialize":
        lock_i = kvm.layout.glob(Globals.TDX_SEPT_LOCK)
        kvm.w.spin_lock(lock_i, kvm.pid)
        try:
            err = call(*args)
        finally:
            kvm.w.spin_unlock(lock_i)
    else:
        err = call(*args)
        tries = tdx.busy_retries if tdx.policy == "retry" else 1
        while tdx_operand_busy(err) and tries > 1:
            tries -= 1
            kvm.stats["seamcall_busy"] += 1
            kvm.stats["seamcalls"] += 1
            kvm.w.relax()  # BUSY: another SEAMCALL holds the module's lock
            err = call(*args)
    if tdx_operand_busy(err):
        kvm.stats["seamcall_busy"] += 1
    level = args[1] if len(args) > 1 and name in SEAMCALLS_WITH_LEVEL else 1
    kvm.w.trace(events.kind_word(events.SEAMCALL, level if args else 0),
                events.SEAMCALL_IDS.get(name, 0), args[0] if args else 0, err)
    return err


def _module_error(kvm: Kvm, name: str, err: int, gfn: int, level: int, **extra: object) -> None:
    """Any non-BUSY SEAMCALL error: KVM_BUG_ON, the VM is dead.  The report shows
    both sides: the S-EPT entry and the mirror entry for (gfn, level) now."""
    entry_i = kvm.tdx.module._walk(gfn, level)
    sept = describe_sept(kvm.w.load(entry_i)) if entry_i is not None else "unreachable"
    extra.setdefault("mirror", mirror_entry_now(kvm, gfn, level))
    kvm.bug("TDX module error", f"{name} failed with {error_name(err)}",
            seamcall=name, error=error_name(err), gfn=gfn, level=level, sept=sept, **extra)


def mirror_entry_now(kvm: Kvm, gfn: int, level: int) -> str:
    """The mirror SPTE for (gfn, level) as it reads now (for reports only)."""
    w, lay = kvm.w, kvm.layout
    table = w.load(lay.glob(Globals.MIRROR_ROOT))
    for lvl in range(kvm.geometry.root_level, level - 1, -1):
        spte = w.load(lay.spt(table) + ((gfn >> (9 * (lvl - 1))) & 511))
        if lvl == level:
            return describe(spte)
        child = spte_to_child_pt(spte, lvl)
        if child is None or child >= lay.n_pages:
            return f"unreachable (level {lvl}: {describe(spte)})"
        table = child
    return "unreachable"


def _must_succeed(kvm: Kvm, name: str, call, gfn: int, level: int, *args: int) -> None:  # noqa: ANN001
    """Removal-side SEAMCALLs cannot be unwound: retry BUSY until done."""
    for _ in range(MUST_SUCCEED_TRIES):
        err = seamcall(kvm, name, call, *args)
        if err == TDX_SUCCESS:
            return
        if not tdx_operand_busy(err):
            _module_error(kvm, name, err, gfn, level)
        if kvm.w.load(kvm.w.abort_i):
            raise LockAborted(name)
        kvm.w.spin_ns(200)
    kvm.bug("SEAMCALL livelock", f"{name} answered BUSY {MUST_SUCCEED_TRIES} times",
            gfn=gfn, level=level)


# ---------------------------------------------------------------------------
# The external hooks (kvm_x86_ops.*_external_*), TDX's implementations
# ---------------------------------------------------------------------------

def link_external_spt(kvm: Kvm, gfn: int, level: int, ext: int) -> int:
    """tdx_sept_link_private_spt: TDH.MEM.SEPT.ADD.  0, -EBUSY, or KVM_BUG_ON."""
    m = kvm.tdx.module
    err = seamcall(kvm, "TDH.MEM.SEPT.ADD", m.tdh_mem_sept_add, gfn, level, ext)
    if tdx_operand_busy(err):
        return -EBUSY
    if err:
        _module_error(kvm, "TDH.MEM.SEPT.ADD", err, gfn, level)
    return 0


def set_external_spte(kvm: Kvm, gfn: int, level: int, pfn: int) -> int:
    """tdx_sept_set_private_spte: TDH.MEM.PAGE.AUG of a 4K page."""
    m = kvm.tdx.module
    if level != 1:
        kvm.bug("mirror huge page", "set_external_spte on a non-4K level", gfn=gfn, level=level)
    err = seamcall(kvm, "TDH.MEM.PAGE.AUG", m.tdh_mem_page_aug, gfn, pfn)
    if tdx_operand_busy(err):
        return -EBUSY
    if err:
        _module_error(kvm, "TDH.MEM.PAGE.AUG", err, gfn, level, pfn=pfn)
    return 0


def remove_external_spte(kvm: Kvm, gfn: int, level: int, old_spte: int,
                         may_unwind: bool) -> int:
    """tdx_sept_remove_private_spte: BLOCK, TRACK, PAGE.REMOVE of a present leaf.

    BLOCK is the only step that may be unwound (``may_unwind``: the caller
    holds the entry frozen and can restore it).  Once blocked, the entry is
    tracked and removed whatever it takes: KVM_BUG_ON(ret) in the kernel.
    """
    if not is_shadow_present_pte(old_spte) or not is_last_spte(old_spte, level):
        return 0
    m = kvm.tdx.module
    if may_unwind:
        err = seamcall(kvm, "TDH.MEM.RANGE.BLOCK", m.tdh_mem_range_block, gfn, level)
        if tdx_operand_busy(err):
            return -EBUSY
        if err:
            _module_error(kvm, "TDH.MEM.RANGE.BLOCK", err, gfn, level, mirror=describe(old_spte))
    else:
        _must_succeed(kvm, "TDH.MEM.RANGE.BLOCK", m.tdh_mem_range_block, gfn, level, gfn, level)
    _must_succeed(kvm, "TDH.MEM.TRACK", m.tdh_mem_track, gfn, level)
    _must_succeed(kvm, "TDH.MEM.PAGE.REMOVE", m.tdh_mem_page_remove, gfn, level, gfn)
    kvm.stats["sept_removes"] += 1
    return 0


def free_external_spt(kvm: Kvm, gfn: int, level: int, ext: int | None) -> None:
    """Release a torn-down mirror table's S-EPT table, after all its children:
    block the entry that points at it (one level up), TRACK, SEPT.REMOVE."""
    if ext is None:
        kvm.bug("mirror table without external_spt", "get_external_spt returned NULL",
                gfn=gfn, level=level)
    m = kvm.tdx.module
    _must_succeed(kvm, "TDH.MEM.RANGE.BLOCK", m.tdh_mem_range_block, gfn, level + 1,
                  gfn, level + 1)
    _must_succeed(kvm, "TDH.MEM.TRACK", m.tdh_mem_track, gfn, level + 1)
    _must_succeed(kvm, "TDH.MEM.SEPT.REMOVE", m.tdh_mem_sept_remove, gfn, level + 1,
                  gfn, level + 1)
    kvm.stats["sept_tables_removed"] += 1


def set_external_spte_present(kvm: Kvm, gfn: int, level: int, new_spte: int) -> int:
    """The to-present hook: a leaf is AUG'd, a non-leaf links its child's S-EPT table."""
    if is_last_spte(new_spte, level):
        return set_external_spte(kvm, gfn, level, spte_to_pfn(new_spte))
    child = spte_to_child_pt(new_spte, level)
    assert child is not None
    return link_external_spt(kvm, gfn, level, _get_external_spt(kvm, child, gfn, level))


def _get_external_spt(kvm: Kvm, child: int, gfn: int, level: int) -> int:
    ext = external_spt(kvm, child)
    if ext is None:
        kvm.bug("mirror table without external_spt", "get_external_spt returned NULL",
                gfn=gfn, level=level, table=child)
    return ext  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# Which entries are mirrored: the selector (seed 003)
# ---------------------------------------------------------------------------

def is_mirror_sptep_by_role(it) -> bool:  # noqa: ANN001
    """Fixed: the table's role says whether the S-EPT mirrors it."""
    return it.mirror


def is_mirror_sp_by_role(kvm: Kvm, sp: int) -> bool:
    return bool(kvm.w.load(kvm.layout.sp(sp, SpMeta.ROLE)) & ROLE_MIRROR)


def is_mirror_sptep_by_fault(it) -> bool:  # noqa: ANN001
    """Buggy (seed 003): only a fault knows ``is_private``; zaps and teardown
    walk the mirror root without one and skip the S-EPT."""
    return bool(it.fault_private)


def is_mirror_sp_by_fault(kvm: Kvm, sp: int) -> bool:
    return False


# ---------------------------------------------------------------------------
# Atomic (mmu_lock held for read) update of a mirror SPTE: the protocols
# ---------------------------------------------------------------------------

def _check_transition(kvm: Kvm, it, new_spte: int) -> None:  # noqa: ANN001
    if is_shadow_present_pte(it.old_spte) and is_shadow_present_pte(new_spte):
        kvm.bug("present to present mirror change",
                "set_external_spte_present: KVM_BUG_ON(was_present)", gfn=it.gfn,
                level=it.level, old=describe(it.old_spte), new=describe(new_spte))


def _zap_while_frozen(kvm: Kvm, it, old: int, new_spte: int, shared_zap: bool) -> int:  # noqa: ANN001
    """The S-EPT side of a zap: a leaf is blocked/tracked/removed (BUSY on BLOCK
    unwinds); a non-leaf's sub-tree is torn down by handle_removed_pt."""
    from stress.model.tdp_mmu import handle_changed_spte

    if not shared_zap:
        kvm.bug("atomic zap of mirror SPTE",
                "__tdp_mmu_set_spte_atomic: KVM_BUG_ON(!is_shadow_present_pte(new_spte)) "
                "(v6.16: mirror SPTEs are zapped only under the write lock)",
                gfn=it.gfn, level=it.level, old=describe(old))
    if is_last_spte(old, it.level):
        r = remove_external_spte(kvm, it.gfn, it.level, old, may_unwind=True)
        if r:
            return r
    handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True,
                            mirror=True)
    return 0


def _write_frozen(kvm: Kvm, it, value: int) -> None:  # noqa: ANN001
    """The owner's plain write of the entry it froze (publish or restore)."""
    kvm.w.trace(events.kind_word(events.SPTE_WRITE, it.level), it.gfn, FROZEN_SPTE, value)
    kvm.w.store(it.sptep, value)


def _publish_map(kvm: Kvm, it, old: int, new_spte: int) -> None:  # noqa: ANN001
    from stress.model.tdp_mmu import handle_changed_spte

    _write_frozen(kvm, it, new_spte)
    it.old_spte = new_spte
    handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True,
                            mirror=True)


def _freeze(kvm: Kvm, it) -> bool:  # noqa: ANN001
    old = it.old_spte
    found = kvm.w.cmpxchg(it.sptep, old, FROZEN_SPTE)
    if found != old:
        it.old_spte = found  # the 2026 fix: the caller retries on fresh data
        return False
    it.check_page()
    kvm.w.trace(events.kind_word(events.SPTE_WRITE, it.level), it.gfn, old, FROZEN_SPTE)
    return True


def set_mirror_spte_frozen(kvm: Kvm, it, new_spte: int, shared_zap: bool = True) -> int:  # noqa: ANN001
    """The fixed protocol: freeze, SEAMCALL(s), then publish or restore.

    Returns 0, or -EBUSY with the mirror entry as it was (old value restored,
    ``it.old_spte`` refreshed) when the freeze lost a race or the TDX module
    said BUSY.  While frozen, the S-EPT and the mirror may disagree; nobody
    can observe it because nobody can use a frozen entry.
    """
    _check_transition(kvm, it, new_spte)
    old = it.old_spte
    if not _freeze(kvm, it):
        return -EBUSY
    if is_shadow_present_pte(new_spte):
        r = set_external_spte_present(kvm, it.gfn, it.level, new_spte)
        if r:
            _write_frozen(kvm, it, old)  # restore: the S-EPT did not change
            it.old_spte = old
            kvm.stats["mirror_restores"] += 1
            return r
        _publish_map(kvm, it, old, new_spte)
        return 0
    r = _zap_while_frozen(kvm, it, old, new_spte, shared_zap)
    if r:
        _write_frozen(kvm, it, old)
        it.old_spte = old
        kvm.stats["mirror_restores"] += 1
        return r
    _write_frozen(kvm, it, new_spte)
    it.old_spte = new_spte
    return 0


def set_mirror_spte_frozen_v616(kvm: Kvm, it, new_spte: int) -> int:  # noqa: ANN001
    """The v6.16 rule: maps freeze as above; an atomic zap is a KVM bug."""
    return set_mirror_spte_frozen(kvm, it, new_spte, shared_zap=False)


def set_mirror_spte_then_seamcall(kvm: Kvm, it, new_spte: int) -> int:  # noqa: ANN001
    """Buggy (seed 000, before the freeze): publish the mirror with cmpxchg, then
    issue the SEAMCALL.  Between the two, another task acts on a mirror value
    the S-EPT does not have yet, and SEAMCALLs of two tasks land in the S-EPT
    in the other order."""
    from stress.model.tdp_mmu import handle_changed_spte

    _check_transition(kvm, it, new_spte)
    old = it.old_spte
    found = kvm.w.cmpxchg(it.sptep, old, new_spte)
    if found != old:
        it.old_spte = found
        return -EBUSY
    it.old_spte = new_spte
    if is_shadow_present_pte(new_spte):
        r = set_external_spte_present(kvm, it.gfn, it.level, new_spte)
        if r:  # too late to take it back cleanly: try to put the old value back
            kvm.w.cmpxchg(it.sptep, new_spte, old)
            return r
        handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True,
                            mirror=True)
        return 0
    if is_last_spte(old, it.level):
        # cannot unwind a published zap: the removal must go through
        remove_external_spte(kvm, it.gfn, it.level, old, may_unwind=False)
    else:
        handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True,
                            mirror=True)
    return 0


def set_mirror_spte_map_frozen_zap_published(kvm: Kvm, it, new_spte: int) -> int:  # noqa: ANN001
    """Buggy (half a fix): maps freeze, zaps publish non-present before BLOCK/REMOVE."""
    if is_shadow_present_pte(new_spte):
        return set_mirror_spte_frozen(kvm, it, new_spte)
    return set_mirror_spte_then_seamcall(kvm, it, new_spte)


def set_mirror_spte_frozen_no_restore(kvm: Kvm, it, new_spte: int) -> int:  # noqa: ANN001
    """Buggy: on BUSY the map side publishes the new value anyway."""
    _check_transition(kvm, it, new_spte)
    old = it.old_spte
    if not is_shadow_present_pte(new_spte):
        return set_mirror_spte_frozen(kvm, it, new_spte)
    if not _freeze(kvm, it):
        return -EBUSY
    r = set_external_spte_present(kvm, it.gfn, it.level, new_spte)
    _publish_map(kvm, it, old, new_spte)  # even when the module said BUSY
    return r
