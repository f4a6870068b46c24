"""Mirror roots and TDX's S-EPT hooks: tdx.c's half of the protocol, and the
mirror paths of tdp_mmu.c that call it.

Design note.  This module follows kvm-x86's ``arch/x86/kvm/vmx/tdx.c`` at
commit 09c6f74ecb86 (see the README's kernel map for the commit's subject and
for every function's kernel counterpart).  Private gfns are mapped through a
*mirror* root (``role.is_mirror``, inherited by every child table).  KVM reads
and writes the mirror like any TDP MMU table, and propagates every change of a
mirror SPTE through one hook, ``kvm_x86_ops.set_external_spte(kvm, gfn,
old_spte, new_spte, level)``, TDX's :func:`tdx_sept_set_private_spte`:

1. a leaf that becomes present: TDH.MEM.PAGE.AUG (or PAGE.ADD while the
   initial image is built), with mmu_lock held for read;
2. a non-leaf that becomes present: TDH.MEM.SEPT.ADD, read lock too;
3. a present leaf that goes away: RANGE.BLOCK, TRACK and PAGE.REMOVE, only
   with mmu_lock held for write.

Cases 1 and 2 run with the mirror SPTE *frozen* (FROZEN_SPTE) by
``__tdp_mmu_set_spte_atomic``: while the SEAMCALL runs, the entry is neither
its old value (another task would race to install it) nor its new one (a
fault would walk into a table the S-EPT does not have yet).  A BUSY answer
restores the old value and the fault retries.  Case 3 runs with every other
KVM task excluded by the write lock, but not the vCPUs: TDH.VP.ENTER and the
guest's TDCALLs take the module's locks too, so every call of case 3 goes
through :func:`tdh_do_no_vcpus`: on BUSY, stop vCPUs from entering the TD
(``wait_for_sept_zap``), kick them all out, and retry once, which cannot fail
"absent KVM and/or TDX-Module bugs"; any error left is ``TDX_BUG_ON``.

Mirror page tables are never zapped while the TD runs: read-lock zaps visit
direct roots only, write-lock zaps of mirror roots zap leaves only, and
:func:`tdx_sept_free_private_spt` is ``KVM_BUG_ON(is_hkid_assigned)``: the
tables go at teardown, after the HKID is released, with
TDH.PHYMEM.PAGE.RECLAIM.

Which entries get the hooks is decided by the table's mirror role, not by the
fault's ``is_private``: zaps and teardown have no fault.  The selector, the
atomic update and the hooks are the pieces the variants swap.  The design
that zaps mirror SPTEs and tears mirror tables down with mmu_lock held for
read is kept below as a *proposal* (``mirror-zap-shared``), not as upstream.
"""

from __future__ import annotations

from collections.abc import Callable

from stress.arena import Globals, SpMeta
from stress.model import events
from stress.model.kvm import Kvm
from stress.model.mmu_page import ROLE_MIRROR, external_spt, role_level
from stress.model.spte import (
    FROZEN_SPTE,
    describe,
    is_last_spte,
    is_shadow_present_pte,
    spte_to_child_pt,
    spte_to_pfn,
)
from stress.model.tdp_mmu import (
    __handle_changed_spte,
    handle_changed_spte,
    kvm_tdp_mmu_map_private_pfn,
)
from stress.model.tdx import (
    CALLER_NAMES,
    TD_STATE_RUNNABLE,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_SUCCESS,
    describe_sept,
    error_name,
    tdx_operand_busy,
)
from stress.model.tlb import kvm_make_all_cpus_request

EBUSY = 16
EIO = 5
# KVM_REQ_OUTSIDE_GUEST_MODE: KVM_REQUEST_NO_ACTION | KVM_REQUEST_WAIT, i.e. no
# request bit to service, only the kick and the wait for guest mode to end
KVM_REQ_OUTSIDE_GUEST_MODE = 0

SeamcallFn = Callable[..., int]

# ---------------------------------------------------------------------------
# SEAMCALL issue: counting, tracing, BUSY by the pair that collided
# ---------------------------------------------------------------------------

SEAMCALLS_WITH_LEVEL = ("TDH.MEM.SEPT.ADD", "TDH.MEM.RANGE.BLOCK", "TDH.MEM.SEPT.REMOVE")


def count_busy(kvm: Kvm, name: str) -> None:
    """One TDX_OPERAND_BUSY answer to ``name``, counted under the kind of the
    caller that held the lock (``busy:<call><<holder>``)."""
    assert kvm.tdx is not None
    holder = CALLER_NAMES.get(kvm.tdx.module.last_busy_holder, "?")
    kvm.stats["seamcall_busy"] += 1
    kvm.stats[f"busy:{name}<{holder}"] += 1


def seamcall(kvm: Kvm, name: str, call: SeamcallFn, *args: int) -> int:
    """Issue one SEAMCALL from KVM under the configured BUSY policy.

    ``unwind`` (upstream): one attempt; BUSY goes back to the caller (a fault
    restores the mirror and retries; a removal goes through tdh_do_no_vcpus).
    ``retry`` and ``serialize`` are design alternatives for ``bench --policy``:
    up to ``busy_retries`` attempts in place with the mirror entry still frozen,
    or every SEAMCALL of the VM under one KVM spinlock.
    """
    tdx = kvm.tdx
    assert tdx is not None
    kvm.stats["seamcalls"] += 1
    if tdx.policy == "serialize":
        lock_i = kvm.layout.glob(Globals.TDX_SEPT_LOCK)
        kvm.w.spin_lock(lock_i, kvm.pid)
        try:
            err = call(*args)
        finally:
            kvm.spin_unlock(lock_i, "tdx sept lock")
    else:
        err = call(*args)
        tries = tdx.busy_retries if tdx.policy == "retry" else 1
        while tdx_operand_busy(err) and tries > 1:
            tries -= 1
            count_busy(kvm, name)
            kvm.stats["seamcalls"] += 1
            kvm.w.relax()  # BUSY: another caller holds the module's lock
            err = call(*args)
    if tdx_operand_busy(err):
        count_busy(kvm, name)
    level = args[1] if len(args) > 1 and name in SEAMCALLS_WITH_LEVEL else 1
    kvm.w.trace(events.kind_word(events.SEAMCALL, level if args else 0),
                events.SEAMCALL_IDS.get(name, 0), args[0] if args else 0, err)
    return err


def mirror_entry_now(kvm: Kvm, gfn: int, level: int) -> str:
    """Oracle helper: the mirror SPTE for (gfn, level) as it reads now (for reports
    only)."""
    w, lay = kvm.w, kvm.layout
    table = w.load(lay.glob(Globals.MIRROR_ROOT))
    for lvl in range(role_level(w.load(lay.sp(table, SpMeta.ROLE))), level - 1, -1):
        spte = w.load(lay.spt(table) + ((gfn >> (9 * (lvl - 1))) & 511))
        if lvl == level:
            return describe(spte)
        child = spte_to_child_pt(spte, lvl)
        if child is None or child >= lay.n_pages:
            return f"unreachable (level {lvl}: {describe(spte)})"
        table = child
    return "unreachable"


def TDX_BUG_ON(kvm: Kvm, err: int, name: str, gfn: int = 0, level: int = 1,  # noqa: N802
               **extra: object) -> bool:
    """__TDX_BUG_ON: a SEAMCALL error KVM cannot handle bugs the VM (WARN_ON_ONCE,
    kvm_vm_bugged).  The report shows both sides: the S-EPT entry and the mirror
    entry for (gfn, level) now."""
    if not err:
        return False
    assert kvm.tdx is not None
    e = kvm.tdx.module.entry(gfn, level) if name.startswith("TDH.MEM") else None
    sept = describe_sept(e) if e is not None else "unreachable"
    extra.setdefault("mirror", mirror_entry_now(kvm, gfn, level))
    kvm.bug("TDX module error", f"TDX_BUG_ON: SEAMCALL {name} failed with {error_name(err)}",
            seamcall=name, error=error_name(err), gfn=gfn, level=level, sept=sept, **extra)
    return True


def KVM_BUG_ON(kvm: Kvm, cond: bool, invariant: str, message: str,  # noqa: N802
               **details: object) -> bool:
    if cond:
        kvm.bug(invariant, f"KVM_BUG_ON: {message}", **details)
    return cond


def td_state(kvm: Kvm) -> int:
    return kvm.w.load(kvm.layout.glob(Globals.TD_STATE))


def is_hkid_assigned(kvm: Kvm) -> bool:
    return bool(kvm.w.load(kvm.layout.glob(Globals.HKID)))


# ---------------------------------------------------------------------------
# tdx.c: removal with mmu_lock held for write
# ---------------------------------------------------------------------------

def tdh_do_no_vcpus(kvm: Kvm, name: str, call: SeamcallFn, *args: int) -> int:
    """Execute a SEAMCALL that blocks or removes S-EPT entries, with a single
    retry after forcing vCPUs out of the TD and keeping them out.

    Every such flow runs with mmu_lock held for write, so no other KVM task is
    inside the module's S-EPT code; only vCPUs can hold its locks (TDH.VP.ENTER,
    TDCALLs).  On BUSY: ``wait_for_sept_zap`` stops vCPUs from entering the TD,
    KVM_REQ_OUTSIDE_GUEST_MODE kicks every vCPU in it out and waits, so the
    retry meets no other caller and cannot be BUSY.
    """
    kvm.lockdep_assert_held_write()
    err = seamcall(kvm, name, call, *args)
    if tdx_operand_busy(err):
        flag_i = kvm.layout.glob(Globals.WAIT_FOR_SEPT_ZAP)
        kvm.w.store(flag_i, 1)
        kvm.stats["no_vcpus_retries"] += 1
        try:
            kvm_make_all_cpus_request(kvm, KVM_REQ_OUTSIDE_GUEST_MODE)
            err = seamcall(kvm, name, call, *args)
        finally:
            kvm.w.store(flag_i, 0)
    return err


def tdx_track(kvm: Kvm) -> None:
    """TDH.MEM.TRACK, then force every vCPU out of the TD once, so none runs with
    the old epoch and the next TRACK can succeed.  The pair must be serialised
    (a TRACK fails while the previous epoch is still in use): write lock."""
    if td_state(kvm) != TD_STATE_RUNNABLE:  # before any vCPU ran
        return
    kvm.lockdep_assert_held_write()
    assert kvm.tdx is not None
    err = kvm.variant.tdh_do_no_vcpus(kvm, "TDH.MEM.TRACK", kvm.tdx.module.tdh_mem_track)
    TDX_BUG_ON(kvm, err, "TDH.MEM.TRACK")
    kvm_make_all_cpus_request(kvm, KVM_REQ_OUTSIDE_GUEST_MODE)
    kvm.stats["tdx_tracks"] += 1


def tdx_sept_remove_leaf_spte(kvm: Kvm, gfn: int, level: int, old_spte: int) -> int:
    """Case 3: BLOCK, track, PAGE.REMOVE of a present 4K leaf (write lock)."""
    kvm.lockdep_assert_held_write()
    assert kvm.tdx is not None
    m = kvm.tdx.module
    # the HKID is released after every private page was removed, and assigned
    # before any could be mapped
    if KVM_BUG_ON(kvm, not is_hkid_assigned(kvm), "private page removed without HKID",
                  "tdx_sept_remove_leaf_spte with the HKID released", gfn=gfn):
        return -EIO
    if KVM_BUG_ON(kvm, level != 1, "mirror huge page", "tdx_sept_remove_leaf_spte: "
                  "level != PG_LEVEL_4K", gfn=gfn, level=level):
        return -EIO
    no_vcpus = kvm.variant.tdh_do_no_vcpus
    err = no_vcpus(kvm, "TDH.MEM.RANGE.BLOCK", m.tdh_mem_range_block, gfn, level)
    if TDX_BUG_ON(kvm, err, "TDH.MEM.RANGE.BLOCK", gfn, level, old=describe(old_spte)):
        return -EIO
    kvm.variant.tdx_track(kvm)  # TLB tracking before the page is dropped
    err = no_vcpus(kvm, "TDH.MEM.PAGE.REMOVE", m.tdh_mem_page_remove, gfn)
    if TDX_BUG_ON(kvm, err, "TDH.MEM.PAGE.REMOVE", gfn, level, old=describe(old_spte)):
        return -EIO
    # TDH.PHYMEM.PAGE.WBINVD and tdx_quirk_reset_paddr: not modelled (no cache)
    kvm.stats["sept_removes"] += 1
    return 0


# ---------------------------------------------------------------------------
# tdx.c: maps with mmu_lock held for read
# ---------------------------------------------------------------------------

def tdx_mem_page_add(kvm: Kvm, gfn: int, level: int, pfn: int) -> int:
    """PAGE.ADD of a page of the initial image (KVM_TDX_INIT_MEM_REGION, under
    slots_lock, before the TD is runnable)."""
    assert kvm.tdx is not None
    if KVM_BUG_ON(kvm, bool(kvm.w.load(kvm.layout.glob(Globals.PRE_FAULT_ALLOWED))),
                  "PAGE.ADD after finalize", "tdx_mem_page_add with pre_fault_allowed",
                  gfn=gfn):
        return -EIO
    err = seamcall(kvm, "TDH.MEM.PAGE.ADD", kvm.tdx.module.tdh_mem_page_add, gfn, pfn)
    if tdx_operand_busy(err):
        return -EBUSY
    if TDX_BUG_ON(kvm, err, "TDH.MEM.PAGE.ADD", gfn, level, pfn=f"{pfn:#x}"):
        return -EIO
    kvm.stats["page_adds"] += 1
    return 0


def tdx_mem_page_aug(kvm: Kvm, gfn: int, level: int, pfn: int) -> int:
    assert kvm.tdx is not None
    err = seamcall(kvm, "TDH.MEM.PAGE.AUG", kvm.tdx.module.tdh_mem_page_aug, gfn, pfn)
    if tdx_operand_busy(err):
        return -EBUSY
    if TDX_BUG_ON(kvm, err, "TDH.MEM.PAGE.AUG", gfn, level, pfn=f"{pfn:#x}"):
        return -EIO
    kvm.stats["page_augs"] += 1
    return 0


def tdx_spte_to_sept_pt(kvm: Kvm, gfn: int, new_spte: int, level: int) -> int | None:
    """The S-EPT page of the child table a new non-leaf mirror SPTE points to."""
    child = spte_to_child_pt(new_spte, level)
    assert child is not None
    ext = external_spt(kvm, child)
    lay = kvm.layout
    if (KVM_BUG_ON(kvm, ext is None, "mirror table without external_spt",
                   "tdx_spte_to_sept_pt: !sp->external_spt", gfn=gfn, level=level,
                   table=child)
            or KVM_BUG_ON(kvm, (kvm.w.load(lay.sp(child, SpMeta.ROLE)) & 0xF) + 1 != level,
                          "mirror table level", "sp->role.level + 1 != level", gfn=gfn,
                          table=child)
            or KVM_BUG_ON(kvm, kvm.w.load(lay.sp(child, SpMeta.GFN)) != gfn,
                          "mirror table gfn", "sp->gfn != gfn", gfn=gfn, table=child)):
        return None
    return ext


def tdx_sept_map_nonleaf_spte(kvm: Kvm, gfn: int, level: int, new_spte: int) -> int:
    """Case 2: TDH.MEM.SEPT.ADD of the child's S-EPT page."""
    assert kvm.tdx is not None
    sept_pt = tdx_spte_to_sept_pt(kvm, gfn, new_spte, level)
    if sept_pt is None:
        return -EIO
    err = seamcall(kvm, "TDH.MEM.SEPT.ADD", kvm.tdx.module.tdh_mem_sept_add, gfn, level,
                   sept_pt)
    if tdx_operand_busy(err):
        return -EBUSY
    if TDX_BUG_ON(kvm, err, "TDH.MEM.SEPT.ADD", gfn, level):
        return -EIO
    kvm.stats["sept_adds"] += 1
    return 0


def tdx_sept_map_leaf_spte(kvm: Kvm, gfn: int, level: int, new_spte: int) -> int:
    """Case 1: PAGE.ADD while the initial image is built, PAGE.AUG afterwards.
    (pre_fault_allowed is read before the TD state: the smp_rmb pairing with
    tdx_td_finalize's smp_wmb; here both are plain shared words.)"""
    if KVM_BUG_ON(kvm, level != 1, "mirror huge page", "tdx_sept_map_leaf_spte: "
                  "level != PG_LEVEL_4K", gfn=gfn, level=level):
        return -EIO
    pfn = spte_to_pfn(new_spte)
    if td_state(kvm) != TD_STATE_RUNNABLE:
        return tdx_mem_page_add(kvm, gfn, level, pfn)
    return tdx_mem_page_aug(kvm, gfn, level, pfn)


def tdx_sept_set_private_spte(kvm: Kvm, gfn: int, old_spte: int, new_spte: int,
                              level: int) -> int:
    """kvm_x86_ops.set_external_spte for TDX: the one hook for mirror SPTE
    changes.  Present -> non-present leaf: removal (write lock); non-present ->
    present: SEPT.ADD or AUG/ADD (read lock, entry frozen).  Promotion and
    demotion are not supported."""
    kvm.lockdep_assert_held()
    if is_shadow_present_pte(old_spte):
        return tdx_sept_remove_leaf_spte(kvm, gfn, level, old_spte)
    if KVM_BUG_ON(kvm, not is_shadow_present_pte(new_spte), "non-present mirror change",
                  "tdx_sept_set_private_spte: !is_shadow_present_pte(new_spte)", gfn=gfn,
                  level=level, old=describe(old_spte), new=describe(new_spte)):
        return -EIO
    if not is_last_spte(new_spte, level):
        return tdx_sept_map_nonleaf_spte(kvm, gfn, level, new_spte)
    return tdx_sept_map_leaf_spte(kvm, gfn, level, new_spte)


def tdx_sept_free_private_spt(kvm: Kvm, sp: int) -> None:
    """kvm_x86_ops.free_external_spt for TDX: a mirror table's S-EPT page goes
    back to KVM.  KVM doesn't zap page-table pages of the mirror while the TD is
    active: only after the HKID is released, with TDH.PHYMEM.PAGE.RECLAIM.  A
    page the module would not give back is leaked on purpose."""
    assert kvm.tdx is not None
    lay = kvm.layout
    ext = external_spt(kvm, sp)
    if KVM_BUG_ON(kvm, is_hkid_assigned(kvm), "mirror table freed while the TD runs",
                  "tdx_sept_free_private_spt: is_hkid_assigned",
                  table=sp, gfn=kvm.w.load(lay.sp(sp, SpMeta.GFN)),
                  level=kvm.w.load(lay.sp(sp, SpMeta.ROLE)) & 0xF):
        return
    if ext is None:
        return
    err = kvm.tdx.module.tdh_phymem_page_reclaim(ext)
    kvm.stats["seamcalls"] += 1
    if TDX_BUG_ON(kvm, err, "TDH.PHYMEM.PAGE.RECLAIM", table=sp):
        return
    kvm.stats["sept_tables_reclaimed"] += 1


# ---------------------------------------------------------------------------
# Which entries are mirrored: the selector
# ---------------------------------------------------------------------------

def is_mirror_sptep_by_role(it) -> bool:  # noqa: ANN001
    """Fixed: the table's role says whether the S-EPT mirrors it."""
    return it.mirror


def is_mirror_sp_by_role(kvm: Kvm, sp: int) -> bool:
    return bool(kvm.w.load(kvm.layout.sp(sp, SpMeta.ROLE)) & ROLE_MIRROR)


def is_mirror_sptep_by_fault(it) -> bool:  # noqa: ANN001
    """Buggy (Rick Edgecombe / Kai Huang, May 2024 review of the mirror series):
    only a fault knows ``is_private``; zaps and teardown walk the mirror root
    without one and skip the S-EPT."""
    return bool(it.fault_private)


def is_mirror_sp_by_fault(kvm: Kvm, sp: int) -> bool:
    """Buggy: the same, for a table (no fault: never a mirror table)."""
    return False


# ---------------------------------------------------------------------------
# tdp_mmu.c: the atomic (mmu_lock held for read) update of a mirror SPTE
# ---------------------------------------------------------------------------

def _check_transition(kvm: Kvm, it, new_spte: int) -> None:  # noqa: ANN001
    """Only non-present -> present changes of a mirror SPTE go through the atomic
    path: permission changes, promotion and demotion are not supported."""
    if is_shadow_present_pte(it.old_spte) and is_shadow_present_pte(new_spte):
        kvm.bug("present to present mirror change",
                "KVM_BUG_ON(was_present): a present mirror SPTE changed under the read lock",
                gfn=it.gfn, level=it.level, old=describe(it.old_spte), new=describe(new_spte))


def _trace(kvm: Kvm, it, b: int, c: int, flags: int = 0) -> None:  # noqa: ANN001
    kvm.w.trace(events.spte_kind(it.level, (it.sptep - kvm.layout.pages) >> 9,
                                 flags | events.F_MIRROR), it.gfn, b, c)
    if not flags & events.F_FAILED:
        kvm.hooks.spte_store(kvm, it.sptep, it.gfn, it.level, b, c)


def _write_frozen(kvm: Kvm, it, value: int, restore: bool = False) -> None:  # noqa: ANN001
    """The owner's plain write of the entry it froze (publish or restore)."""
    _trace(kvm, it, FROZEN_SPTE, value, events.F_RESTORE if restore else 0)
    kvm.w.store(it.sptep, value)


def _freeze(kvm: Kvm, it) -> bool:  # noqa: ANN001
    """try_cmpxchg64(sptep, &iter->old_spte, FROZEN_SPTE): on failure the caller's
    snapshot is refreshed, so it retries on fresh data."""
    old = it.old_spte
    found = kvm.w.cmpxchg(it.sptep, old, FROZEN_SPTE)
    if found != old:
        _trace(kvm, it, old, found, events.F_FAILED)
        it.old_spte = found
        return False
    _trace(kvm, it, old, FROZEN_SPTE)
    it.check_page()
    return True


def _publish(kvm: Kvm, it, old: int, new_spte: int) -> None:  # noqa: ANN001
    _write_frozen(kvm, it, new_spte)
    it.old_spte = new_spte
    handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True, mirror=True,
                        external=False)


def set_mirror_spte_frozen(kvm: Kvm, it, new_spte: int) -> int:  # noqa: ANN001
    """tdp_mmu_set_spte_atomic on a mirror SPTE (fixed): freeze it, let
    __handle_changed_spte set the external SPTE while it is frozen, then
    publish the new value or, if the TDX module refused, restore the old one.

    Returns 0, or -EBUSY with the mirror entry as it was (old value restored,
    ``it.old_spte`` refreshed) when the freeze lost a race or the TDX module
    said BUSY.  While frozen, the S-EPT and the mirror may disagree; nobody can
    observe it because nobody can use a frozen entry.  The TDP MMU has no
    check of its own for an atomic zap of a mirror SPTE any more: TDX's hook
    asserts the write lock for removals (tdx_sept_remove_leaf_spte).
    """
    old = it.old_spte
    if not _freeze(kvm, it):
        return -EBUSY
    r = __handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True, mirror=True)
    if r:
        _write_frozen(kvm, it, old, restore=True)  # the S-EPT did not change
        it.old_spte = old
        kvm.stats["mirror_restores"] += 1
        return r
    _write_frozen(kvm, it, new_spte)
    it.old_spte = new_spte
    return 0


def set_mirror_spte_frozen_v616(kvm: Kvm, it, new_spte: int) -> int:  # noqa: ANN001
    """v6.16's __tdp_mmu_set_spte_atomic mirror path (set_external_spte_present):
    KVM_BUG_ON for an atomic zap and for a present old value; the freeze's
    cmpxchg works on a local copy, so ``it.old_spte`` is not refreshed when it
    fails; the link or set hook runs while frozen, then restore or publish, and
    handle_changed_spte only after success."""
    if KVM_BUG_ON(kvm, not is_shadow_present_pte(new_spte), "atomic zap of mirror SPTE",
                  "__tdp_mmu_set_spte_atomic: !is_shadow_present_pte(new_spte) on a mirror "
                  "SPTE (users of atomic zapping don't operate on mirror roots)",
                  gfn=it.gfn, level=it.level, old=describe(it.old_spte)):
        return -EBUSY
    _check_transition(kvm, it, new_spte)
    old = it.old_spte
    found = kvm.w.cmpxchg(it.sptep, old, FROZEN_SPTE)
    if found != old:
        _trace(kvm, it, old, found, events.F_FAILED)
        return -EBUSY  # iter->old_spte stays stale (fixed in 2026 by [V5] 02/45)
    _trace(kvm, it, old, FROZEN_SPTE)
    it.check_page()
    r = kvm.variant.set_external_spte(kvm, it.gfn, old, new_spte, it.level)
    if r:
        _write_frozen(kvm, it, old, restore=True)
        kvm.stats["mirror_restores"] += 1
        return r
    _publish(kvm, it, old, new_spte)
    return 0


def set_external_spte_present(kvm: Kvm, gfn: int, level: int, new_spte: int) -> int:
    """The to-present half of the hook (for user variants that build their own
    update protocol, e.g. examples/no_mirror.py)."""
    return tdx_sept_set_private_spte(kvm, gfn, FROZEN_SPTE, new_spte, level)


def set_mirror_spte_then_seamcall(kvm: Kvm, it, new_spte: int) -> int:  # noqa: ANN001
    """Buggy (before the freeze; Sean Christopherson's vCPU0/vCPU1 diagram in his
    Jan 2023 review of the TDX v11 MMU patches): publish the mirror with
    cmpxchg, then issue the SEAMCALL.  Between the two, another task acts on a
    mirror value the S-EPT does not have yet (it walks into a table the S-EPT
    lacks and AUGs under a missing parent)."""
    _check_transition(kvm, it, new_spte)
    old = it.old_spte
    found = kvm.w.cmpxchg(it.sptep, old, new_spte)
    if found != old:
        _trace(kvm, it, old, found, events.F_FAILED)
        it.old_spte = found
        return -EBUSY
    _trace(kvm, it, old, new_spte)
    it.old_spte = new_spte
    if is_shadow_present_pte(new_spte):
        r = kvm.variant.set_external_spte(kvm, it.gfn, FROZEN_SPTE, new_spte, it.level)
        if r:  # too late to take it back cleanly: try to put the old value back
            kvm.w.cmpxchg(it.sptep, new_spte, old)
            return r
        handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True, mirror=True,
                            external=False)
        return 0
    # a zap (only under the proposal's read-lock mirror zaps): cannot be unwound
    if is_last_spte(old, it.level):
        remove_external_spte(kvm, it.gfn, it.level, old, may_unwind=False)
        handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True, mirror=True,
                            external=False)
    else:
        handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True, mirror=True)
    return 0


def set_mirror_spte_frozen_no_restore(kvm: Kvm, it, new_spte: int) -> int:  # noqa: ANN001
    """Buggy: on BUSY the map side publishes the new value anyway."""
    if not is_shadow_present_pte(new_spte):
        return set_mirror_spte_frozen(kvm, it, new_spte)
    _check_transition(kvm, it, new_spte)
    old = it.old_spte
    if not _freeze(kvm, it):
        return -EBUSY
    r = kvm.variant.set_external_spte(kvm, it.gfn, old, new_spte, it.level)
    _publish(kvm, it, old, new_spte)  # even when the module said BUSY
    return r


# ---------------------------------------------------------------------------
# The proposal: mirror zaps and mirror-table teardown with mmu_lock held for read
# ---------------------------------------------------------------------------

def _must_succeed(kvm: Kvm, name: str, call: SeamcallFn, gfn: int, level: int,
                  *args: int) -> None:
    """The proposal's removal SEAMCALLs cannot be unwound: retry BUSY until done
    (vCPUs keep running: nothing like tdh_do_no_vcpus stops them)."""
    while True:
        err = seamcall(kvm, name, call, *args)
        if err == TDX_SUCCESS:
            return
        if not tdx_operand_busy(err):
            TDX_BUG_ON(kvm, err, name, gfn, level)
        kvm.w.check_abort(name)
        kvm.hooks.retry(kvm, "tdh_mem_busy", gfn)
        kvm.w.spin_ns(200)


def proposal_track(kvm: Kvm) -> None:
    """TRACK (retried while BUSY) and the kick, with mmu_lock held for read:
    two removals may track at once, so a TRACK may find the previous epoch
    still in use and is retried after the other's kick."""
    assert kvm.tdx is not None
    m = kvm.tdx.module
    while True:
        err = seamcall(kvm, "TDH.MEM.TRACK", m.tdh_mem_track)
        if err == TDX_SUCCESS:
            break
        kvm_make_all_cpus_request(kvm, KVM_REQ_OUTSIDE_GUEST_MODE)
        kvm.w.check_abort("TDH.MEM.TRACK")
        kvm.hooks.retry(kvm, "tdh_mem_busy", -1)
    kvm_make_all_cpus_request(kvm, KVM_REQ_OUTSIDE_GUEST_MODE)


def remove_external_spte(kvm: Kvm, gfn: int, level: int, old_spte: int,
                         may_unwind: bool) -> int:
    """The proposal's leaf removal under the read lock: BLOCK (unwound on BUSY
    when the caller holds the entry frozen and can restore it), TRACK and kick,
    PAGE.REMOVE whatever it takes."""
    if not is_shadow_present_pte(old_spte) or not is_last_spte(old_spte, level):
        return 0
    assert kvm.tdx is not None
    m = kvm.tdx.module
    if may_unwind:
        err = seamcall(kvm, "TDH.MEM.RANGE.BLOCK", m.tdh_mem_range_block, gfn, level)
        if tdx_operand_busy(err):
            return -EBUSY
        TDX_BUG_ON(kvm, err, "TDH.MEM.RANGE.BLOCK", gfn, level, old=describe(old_spte))
    else:
        _must_succeed(kvm, "TDH.MEM.RANGE.BLOCK", m.tdh_mem_range_block, gfn, level, gfn, level)
    if td_state(kvm) == TD_STATE_RUNNABLE:
        proposal_track(kvm)
    _must_succeed(kvm, "TDH.MEM.PAGE.REMOVE", m.tdh_mem_page_remove, gfn, level, gfn)
    kvm.stats["sept_removes"] += 1
    return 0


def proposal_set_external_spte(kvm: Kvm, gfn: int, old_spte: int, new_spte: int,
                               level: int) -> int:
    """The hook under the proposal: removal allowed with the read lock held."""
    if is_shadow_present_pte(old_spte):
        return remove_external_spte(kvm, gfn, level, old_spte, may_unwind=False)
    return tdx_sept_set_private_spte(kvm, gfn, old_spte, new_spte, level)


def proposal_free_external_spt(kvm: Kvm, sp: int) -> None:
    """The proposal's table release while the TD runs, after its children:
    block the entry that points at it (one level up), TRACK, SEPT.REMOVE."""
    assert kvm.tdx is not None
    lay = kvm.layout
    if not is_hkid_assigned(kvm):  # teardown: as upstream
        tdx_sept_free_private_spt(kvm, sp)
        return
    gfn = kvm.w.load(lay.sp(sp, SpMeta.GFN))
    level = kvm.w.load(lay.sp(sp, SpMeta.ROLE)) & 0xF
    if external_spt(kvm, sp) is None:
        kvm.bug("mirror table without external_spt", "get_external_spt returned NULL",
                gfn=gfn, level=level)
    m = kvm.tdx.module
    _must_succeed(kvm, "TDH.MEM.RANGE.BLOCK", m.tdh_mem_range_block, gfn, level + 1,
                  gfn, level + 1)
    if td_state(kvm) == TD_STATE_RUNNABLE:
        proposal_track(kvm)
    _must_succeed(kvm, "TDH.MEM.SEPT.REMOVE", m.tdh_mem_sept_remove, gfn, level + 1,
                  gfn, level + 1)
    kvm.stats["sept_tables_removed"] += 1


def set_mirror_spte_frozen_zap_shared(kvm: Kvm, it, new_spte: int) -> int:  # noqa: ANN001
    """The proposal's atomic update: maps as upstream; a zap freezes the entry,
    removes it from the S-EPT (a leaf: BLOCK may be unwound on BUSY; a table:
    its sub-tree through handle_removed_pt in shared mode) and only then
    publishes non-present, so no fault can AUG or SEPT.ADD over the old entry."""
    if is_shadow_present_pte(new_spte):
        return set_mirror_spte_frozen(kvm, it, new_spte)
    old = it.old_spte
    if not _freeze(kvm, it):
        return -EBUSY
    if is_last_spte(old, it.level):
        r = remove_external_spte(kvm, it.gfn, it.level, old, may_unwind=True)
        if r:
            _write_frozen(kvm, it, old, restore=True)
            it.old_spte = old
            kvm.stats["mirror_restores"] += 1
            return r
        handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True, mirror=True,
                            external=False)
    else:
        handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True, mirror=True)
    _write_frozen(kvm, it, new_spte)
    it.old_spte = new_spte
    return 0


def set_mirror_spte_map_frozen_zap_published(kvm: Kvm, it, new_spte: int) -> int:  # noqa: ANN001
    """Buggy half of the proposal: maps freeze, zaps publish non-present before
    BLOCK/REMOVE, so a fault AUGs into an entry the S-EPT still maps."""
    if is_shadow_present_pte(new_spte):
        return set_mirror_spte_frozen(kvm, it, new_spte)
    return set_mirror_spte_then_seamcall(kvm, it, new_spte)


# ---------------------------------------------------------------------------
# v6.16: the four pfn-based hooks, folded into the same signature, and the
# initial image's premap protocol
# ---------------------------------------------------------------------------

def tdx_mem_page_record_premap_cnt(kvm: Kvm, gfn: int) -> int:
    """v6.16, before the TD is runnable: the mirror SPTE is published with no
    S-EPT entry behind it; PAGE.ADD comes later, outside mmu_lock, in
    tdx_gmem_post_populate, and nr_premapped counts the pages in between."""
    if KVM_BUG_ON(kvm, bool(kvm.w.load(kvm.layout.glob(Globals.PRE_FAULT_ALLOWED))),
                  "premap after finalize", "tdx_mem_page_record_premap_cnt with "
                  "pre_fault_allowed", gfn=gfn):
        return -EIO
    kvm.w.fetch_add(kvm.layout.glob(Globals.NR_PREMAPPED), 1)
    return 0


def tdx_sept_remove_private_spte_v616(kvm: Kvm, gfn: int, level: int, old_spte: int) -> int:
    """v6.16's remove_external_spte: tdx_sept_zap_private_spte (BLOCK, with the
    premap case: a page mapped in the mirror but not yet ADDed is not in the
    S-EPT, BLOCK says ENTRY_STATE_INCORRECT and only nr_premapped drops), then
    tdx_track and tdx_sept_drop_private_spte (PAGE.REMOVE)."""
    kvm.lockdep_assert_held_write()
    assert kvm.tdx is not None
    m = kvm.tdx.module
    if KVM_BUG_ON(kvm, not is_hkid_assigned(kvm), "private page removed without HKID",
                  "tdx_sept_remove_private_spte with the HKID released", gfn=gfn):
        return -EIO
    no_vcpus = kvm.variant.tdh_do_no_vcpus
    err = no_vcpus(kvm, "TDH.MEM.RANGE.BLOCK", m.tdh_mem_range_block, gfn, level)
    if (td_state(kvm) != TD_STATE_RUNNABLE and err == TDX_EPT_ENTRY_STATE_INCORRECT
            and not KVM_BUG_ON(kvm, kvm.w.load(kvm.layout.glob(Globals.NR_PREMAPPED)) == 0,
                               "nr_premapped underflow", "tdx_is_sept_zap_err_due_to_premap "
                               "with nr_premapped 0", gfn=gfn)):
        kvm.w.fetch_add(kvm.layout.glob(Globals.NR_PREMAPPED), -1)
        return 0
    if TDX_BUG_ON(kvm, err, "TDH.MEM.RANGE.BLOCK", gfn, level, old=describe(old_spte)):
        return -EIO
    kvm.variant.tdx_track(kvm)
    err = no_vcpus(kvm, "TDH.MEM.PAGE.REMOVE", m.tdh_mem_page_remove, gfn)
    if TDX_BUG_ON(kvm, err, "TDH.MEM.PAGE.REMOVE", gfn, level, old=describe(old_spte)):
        return -EIO
    kvm.stats["sept_removes"] += 1
    return 0


def tdx_sept_set_private_spte_v616(kvm: Kvm, gfn: int, old_spte: int, new_spte: int,
                                   level: int) -> int:
    """v6.16's hooks behind one signature: remove_external_spte for a present
    old leaf, link_external_spt (SEPT.ADD) for a table, set_external_spte (AUG,
    or the premap count before the TD is runnable) for a leaf."""
    if is_shadow_present_pte(old_spte):
        return tdx_sept_remove_private_spte_v616(kvm, gfn, level, old_spte)
    if not is_last_spte(new_spte, level):
        return tdx_sept_map_nonleaf_spte(kvm, gfn, level, new_spte)
    if KVM_BUG_ON(kvm, level != 1, "mirror huge page", "tdx_sept_set_private_spte: "
                  "level != PG_LEVEL_4K", gfn=gfn, level=level):
        return -EIO
    if td_state(kvm) != TD_STATE_RUNNABLE:
        return tdx_mem_page_record_premap_cnt(kvm, gfn)
    return tdx_mem_page_aug(kvm, gfn, level, spte_to_pfn(new_spte))


def map_initial_page_premap(kvm: Kvm, gfn: int, pfn: int) -> int:
    """v6.16's tdx_gmem_post_populate: fault the page into the mirror (the hook
    only counts it), drop mmu_lock, then TDH.MEM.PAGE.ADD; nr_premapped drops
    once the page is in the S-EPT.  A BUSY PAGE.ADD leaves the mirror entry
    premapped and the ioctl fails with -EBUSY."""
    assert kvm.tdx is not None
    r = kvm_tdp_mmu_map_private_pfn(kvm, gfn, pfn)
    if r:
        return r
    err = seamcall(kvm, "TDH.MEM.PAGE.ADD", kvm.tdx.module.tdh_mem_page_add, gfn, pfn)
    if tdx_operand_busy(err):
        return -EBUSY
    if TDX_BUG_ON(kvm, err, "TDH.MEM.PAGE.ADD", gfn, pfn=f"{pfn:#x}"):
        return -EIO
    if not KVM_BUG_ON(kvm, kvm.w.load(kvm.layout.glob(Globals.NR_PREMAPPED)) == 0,
                      "nr_premapped underflow", "tdx_gmem_post_populate with nr_premapped 0",
                      gfn=gfn):
        kvm.w.fetch_add(kvm.layout.glob(Globals.NR_PREMAPPED), -1)
    kvm.stats["page_adds"] += 1
    return 0


# ---------------------------------------------------------------------------
# Historical bugs of the removal side
# ---------------------------------------------------------------------------

def tdh_spin_without_kick(kvm: Kvm, name: str, call: SeamcallFn, *args: int) -> int:
    """Buggy (before 4b2abc49712b "KVM: TDX: Kick off vCPUs when SEAMCALL is busy
    during TD page removal"): RANGE.BLOCK is tried once and a BUSY answer goes
    back to a caller that cannot fail (KVM_BUG_ON); TRACK and PAGE.REMOVE spin
    while BUSY with mmu_lock held for write, waiting on vCPUs nothing stops."""
    kvm.lockdep_assert_held_write()
    err = seamcall(kvm, name, call, *args)
    if name == "TDH.MEM.RANGE.BLOCK":
        return err
    while tdx_operand_busy(err):
        kvm.w.check_abort(name)
        kvm.hooks.retry(kvm, "tdh_mem_busy", args[0] if args else -1)
        kvm.w.relax()
        err = seamcall(kvm, name, call, *args)
    return err
