"""The TDP MMU: SPTE writes, page-table removal, page faults and zaps.

Names, contracts and orderings follow ``arch/x86/kvm/mmu/tdp_mmu.c``.  The
concurrency contract in one paragraph: with ``mmu_lock`` held for read, any
number of tasks change SPTEs, but only with a cmpxchg against the snapshot
their iterator took (``tdp_mmu_set_spte_atomic``), so of two tasks racing on
one entry exactly one wins and the loser retries with fresh data.  With
``mmu_lock`` held for write nobody else changes SPTEs (the model has no
lockless fast page fault yet), so plain writes suffice (``tdp_mmu_set_spte``).
A task that unlinks a table owns its removal (``handle_removed_pt``): it
freezes every child so that a task still walking the dead table cannot
install anything into it, and frees the page only after an RCU grace period,
so that those walkers never read a freed page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from stress.arena import WORDS_PER_PAGE, Globals, SpMeta
from stress.model import events, tlb
from stress.model.host import host_mapping_level, hugepage_disallowed
from stress.model.kvm import (
    LOCK_READ,
    Kvm,
    gfn_to_memslot,
    kvm_gfn_direct_bits,
    kvm_mem_is_private,
    signal_pending,
    slot_index,
    vm_dead,
)
from stress.model.memslot import memslot_invalid
from stress.model.mmu_page import (
    ROLE_MIRROR,
    SP_LINKED,
    SP_REMOVED,
    kvm_mmu_alloc_external_spt,
    role_level,
    tdp_mmu_alloc_sp,
    tdp_mmu_free_sp,
    tdp_mmu_free_sp_rcu_callback,
    tdp_mmu_init_sp,
)
from stress.model.roots import (
    KVM_ALL_ROOTS,
    KVM_DIRECT_ROOTS,
    KVM_INVALID_ROOTS,
    KVM_MIRROR_ROOTS,
    KVM_VALID_ROOTS,
    _new_root,
    for_each_tdp_mmu_root_yield_safe,
    is_root_invalid,
    kvm_mmu_reload,
    kvm_mmu_unload,
    kvm_tdp_mmu_invalidate_roots,
    kvm_tdp_mmu_put_root,
    listed_roots,
    refcount_dec_and_test,
    refcount_dec_not_one,
    refcount_set,
    root_xchg_invalid,
    tdp_mmu_free_root,
)
from stress.model.sched import cond_resched_rwlock_read, cond_resched_rwlock_write, need_resched
from stress.model.spte import (
    FROZEN_SPTE,
    KVM_PAGES_PER_HPAGE,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMU_PRESENT_MASK,
    describe,
    is_access_allowed,
    is_frozen_spte,
    is_large_pte,
    is_last_spte,
    is_shadow_present_pte,
    make_nonleaf_spte,
    make_small_spte,
    make_spte,
    shadow_dirty_mask,
    spte_to_child_pt,
    spte_to_pfn,
)
from stress.model.tdp_iter import TdpIter
from stress.model.tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, kvm_make_all_cpus_request
from stress.model.unsync import mmu_try_to_unsync_pages

EBUSY = 16

RET_PF_FIXED = 0
RET_PF_SPURIOUS = 1
RET_PF_RETRY = 2
RET_PF_EMULATE = 3
RET_PF_EXIT = 4  # KVM_EXIT_MEMORY_FAULT: the access type does not match the attributes


@dataclass(slots=True)
class KvmPageFault:
    gfn: int
    write: bool
    pfn: int
    is_private: bool = False
    goal_level: int = PG_LEVEL_4K
    # the host's mapping level, looked up with the pfn (host_pfn_mapping_level;
    # 4K for private gfns: TDX maps them 4K only) and capped by lpage_info
    max_level: int = PG_LEVEL_4K
    req_level: int = PG_LEVEL_4K
    exec: bool = False  # an instruction fetch (the iTLB multihit mitigation)
    # the gpa carries the TD's shared bit (kvm_is_addr_direct): the direct root
    addr_direct: bool = True


def kvm_tdp_mmu_mirror_root(kvm: Kvm) -> int:
    return kvm.w.load(kvm.layout.glob(Globals.MIRROR_ROOT))


def tdp_mmu_get_root_for_fault(kvm: Kvm, fault: KvmPageFault) -> int:
    """The mirror root unless the gpa is direct (on a TD: it has the shared bit,
    kvm_is_addr_direct), the vCPU's direct root otherwise."""
    if kvm.geometry.tdx and not fault.addr_direct:
        return kvm_tdp_mmu_mirror_root(kvm)
    assert kvm.vcpu.root is not None
    return kvm.vcpu.root


def zap_root_types(kvm: Kvm, shared: bool) -> int:
    """The roots the zapper's range zaps visit: all, invalid ones included (an
    mmu_notifier must reach a root still being zapped), except mirror roots on a
    TD.  The zapper plays kvm_zap_gfn_range, the range form of
    kvm_tdp_mmu_zap_sp, NX recovery and dirty logging; on a TD none of them
    reaches private memory (guest_memfd slots have no dirty logging, mirror
    pages are never NX-tracked, kvm_zap_gfn_range's callers do not run for a
    TD), and a private page KVM removed on its own would kill the TD at the
    guest's next access.  Mirror leaves are zapped by the conversion and
    guest_memfd paths (notifier.py), with the PRIVATE filter."""
    if kvm.geometry.tdx:
        return KVM_ALL_ROOTS & ~KVM_MIRROR_ROOTS
    return KVM_ALL_ROOTS


def trace_spte(kvm: Kvm, sptep: int, gfn: int, level: int, b: int, c: int,
               flags: int = 0, dead_table: bool = False) -> None:
    """One SPTE store event, at the store or cmpxchg that makes it: the entry's
    table and root type ride in the kind word (see events.spte_kind); a store
    that happened is also the ``spte_store`` hook point, unless it freezes a
    child of a table handle_removed_pt unlinked (``dead_table``)."""
    kvm.w.trace(events.spte_kind(level, (sptep - kvm.layout.pages) >> 9, flags), gfn, b, c)
    if not flags & events.F_FAILED and not dead_table:
        kvm.hooks.spte_store(kvm, sptep, gfn, level, b, c)


# ---------------------------------------------------------------------------
# Writing SPTEs
# ---------------------------------------------------------------------------

def tdp_mmu_set_spte_atomic(kvm: Kvm, it: TdpIter, new_spte: int) -> int:
    """Set an SPTE with mmu_lock held for read.

    Returns 0 if the SPTE was set; -EBUSY if another task changed it since the
    iterator's snapshot, with no side effect other than refreshing
    ``it.old_spte`` with the current value, so the caller retries on fresh data.
    A frozen entry is never replaced: its owner will write it next.  A mirror
    SPTE is frozen while its external SPTE is set (mirror.py).
    """
    kvm.lockdep_assert_held_read()
    old = it.old_spte
    if is_frozen_spte(old):
        kvm.warn("set_spte_atomic on frozen SPTE", gfn=it.gfn, level=it.level)
        return -EBUSY
    if new_spte != FROZEN_SPTE and kvm.variant.is_mirror_sptep(it):
        # the S-EPT must follow: see mirror.py (freeze, set_external_spte, publish)
        return kvm.variant.set_mirror_spte_atomic(kvm, it, new_spte)
    found = kvm.w.cmpxchg(it.sptep, old, new_spte)
    if found != old:
        trace_spte(kvm, it.sptep, it.gfn, it.level, old, found,
                   events.F_FAILED | (events.F_MIRROR if it.mirror else 0))
        it.old_spte = found
        return -EBUSY
    trace_spte(kvm, it.sptep, it.gfn, it.level, old, new_spte,
               events.F_MIRROR if it.mirror else 0)
    it.check_page()
    kvm.w.store(kvm.layout.sp(it.pt_path[it.level], SpMeta.LAST_WRITER), kvm.me + 1)
    handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True, mirror=it.mirror)
    return 0


def tdp_mmu_set_spte(kvm: Kvm, sptep: int, old_spte: int, new_spte: int, gfn: int,
                     level: int, mirror: bool = False, mirror_role: bool | None = None) -> int:
    """Set an SPTE with mmu_lock held for write; return the value replaced.

    No other task may hold a reachable entry frozen while we hold the write
    lock (every freezer finishes before it drops its read lock), so FROZEN here
    means the protocol is broken.  A mirror SPTE's change reaches the S-EPT
    through handle_changed_spte's set_external_spte, inside this write-locked
    section, which is what hides the transient divergence (mirror cleared,
    S-EPT entry still there) from every other KVM task.  ``mirror``: the
    entry gets the external hooks (the variant's selector); ``mirror_role``:
    its table's role (for dirty tracking), when the two differ.
    """
    kvm.lockdep_assert_held_write()
    if is_frozen_spte(old_spte) or is_frozen_spte(new_spte):
        kvm.bug("FROZEN SPTE under write lock",
                "tdp_mmu_set_spte saw a frozen old or new value with mmu_lock held for write",
                gfn=gfn, level=level, old=describe(old_spte), new=describe(new_spte))
    role = mirror if mirror_role is None else mirror_role
    old_spte = kvm.variant.write_spte(kvm, sptep, old_spte, new_spte, level)
    trace_spte(kvm, sptep, gfn, level, old_spte, new_spte, events.F_MIRROR if role else 0)
    handle_changed_spte(kvm, gfn, old_spte, new_spte, level, shared=False, mirror=role,
                        external=mirror)
    return old_spte


def kvm_tdp_mmu_write_spte(kvm: Kvm, sptep: int, old_spte: int, new_spte: int,
                           level: int) -> int:
    """xchg if the old value is a present leaf (spte_has_volatile_bits: the CPU sets
    A/D in it without mmu_lock), else a plain store; returns the value actually
    replaced, so handle_changed_spte sees a D bit set since the snapshot."""
    if is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level):
        return kvm.w.xchg(sptep, new_spte)
    kvm.w.store(sptep, new_spte)
    return old_spte


def kvm_tdp_mmu_write_spte_plain(kvm: Kvm, sptep: int, old_spte: int, new_spte: int,
                                 level: int) -> int:
    """Buggy (before ba3a6120a4e7): WRITE_ONCE of the new value and the caller's
    snapshot returned as the old one.  A D bit the guest's walker set between the
    snapshot and the store is overwritten unseen: the page is never marked dirty."""
    kvm.w.spin_ns(kvm.race_window_ns)
    kvm.w.store(sptep, new_spte)
    return old_spte


def tdp_mmu_iter_set_spte(kvm: Kvm, it: TdpIter, new_spte: int) -> None:
    it.old_spte = tdp_mmu_set_spte(kvm, it.sptep, it.old_spte, new_spte, it.gfn, it.level,
                                   mirror=kvm.variant.is_mirror_sptep(it), mirror_role=it.mirror)


def handle_changed_spte(kvm: Kvm, gfn: int, old_spte: int, new_spte: int, level: int,
                        shared: bool, mirror: bool = False, external: bool | None = None) -> None:
    """handle_changed_spte: __handle_changed_spte, whose failure is a KVM bug
    here (callers are not prepared to handle errors)."""
    r = __handle_changed_spte(kvm, gfn, old_spte, new_spte, level, shared, mirror, external)
    if r:
        kvm.bug("set_external_spte failed", "handle_changed_spte: "
                "KVM_BUG_ON(__handle_changed_spte()) (a mirror change the S-EPT refused)",
                gfn=gfn, level=level, old=describe(old_spte), new=describe(new_spte), ret=r)


def __handle_changed_spte(kvm: Kvm, gfn: int, old_spte: int, new_spte: int, level: int,
                          shared: bool, mirror: bool = False,
                          external: bool | None = None) -> int:
    """Bookkeeping after (or, for a frozen mirror SPTE, while) an SPTE changes:
    tear down a table that lost its parent, propagate any other change of a
    mirror SPTE to the external page table (``set_external_spte``; the table's
    own removal is handle_removed_pt's), propagate a D bit that leaves a leaf
    (``kvm_set_pfn_dirty``; not for mirror SPTEs, which no CPU walks: the TDX
    module tracks private pages).  Returns the hook's error, 0 otherwise.

    A present leaf must never change PFN in place (the kernel's BUG()): it has
    to be zapped, and the TLB flushed, first.  ``mirror``: the SPTE is in a
    mirror table; ``external``: it gets the external hooks (default: mirror).
    """
    was_present = is_shadow_present_pte(old_spte)
    is_present = is_shadow_present_pte(new_spte)
    was_leaf = was_present and is_last_spte(old_spte, level)
    is_leaf = is_present and is_last_spte(new_spte, level)
    pfn_changed = spte_to_pfn(old_spte) != spte_to_pfn(new_spte)

    if was_leaf and is_leaf and pfn_changed:
        kvm.bug("present leaf PFN changed in place",
                "a present leaf SPTE was overwritten with a different PFN without a zap",
                gfn=gfn, level=level, old=describe(old_spte), new=describe(new_spte))
    if old_spte == new_spte:
        return 0
    # pre-6.13 dirty tracking: a D bit leaving a leaf marks the page dirty (counted
    # at the gfn as memslots know it: a whole-root zap walks a TD's direct root
    # with the shared bit in its gfns, as upstream's for_each_tdp_pte_min_level_all)
    old_d = was_leaf and bool(old_spte & shadow_dirty_mask)
    new_d = is_leaf and bool(new_spte & shadow_dirty_mask)
    if not mirror and (old_d != new_d or (old_d and pfn_changed)):
        slot_gfn = gfn & ~kvm_gfn_direct_bits(kvm)
        if old_d:
            tlb.kvm_set_pfn_dirty(kvm, slot_gfn)
        if new_d:
            tlb.dirty_set(kvm, slot_gfn)
    if not was_present and not is_present:
        if not is_frozen_spte(new_spte) and not is_frozen_spte(old_spte):
            kvm.warn("non-present to non-present change", gfn=gfn, level=level,
                     old=f"{old_spte:#x}", new=f"{new_spte:#x}")
        return 0
    if was_present and not was_leaf and kvm.variant.changed_spte_removes_pt(
            kvm, old_spte, new_spte, level):
        # NULL unless old_spte linked a table: handle_removed_pt then faults on it, as
        # the kernel's does (no check in between, as in handle_changed_spte)
        child = cast(int, spte_to_child_pt(old_spte, level))
        handle_removed_pt(kvm, child, shared)  # its mirror-ness is the child's role
    elif mirror if external is None else external:
        return kvm.variant.set_external_spte(kvm, gfn, old_spte, new_spte, level)
    return 0


def child_pt_removed_unless_still_table(kvm: Kvm, old_spte: int, new_spte: int,
                                        level: int) -> bool:
    """Did this change of a present non-leaf SPTE remove its child table?  Yes
    when the entry became a leaf (a huge page over the table) or non-present
    (c8e5a0d0e9bc "KVM: x86/mmu: Check for !leaf=>leaf, not PFN change, in TDP
    MMU SP removal").  A table replaced in place by another table is impossible
    (shadow pages are never migrated): WARN, and tear it down anyway."""
    if not is_shadow_present_pte(new_spte) or is_last_spte(new_spte, level):
        return True
    if spte_to_pfn(old_spte) != spte_to_pfn(new_spte):
        kvm.warn("non-leaf SPTE changed PFN in place")
        return True
    return False


def tdp_mmu_unlink_sp(kvm: Kvm, sp: int) -> None:
    """Unaccount a table that lost its parent SPTE (exactly one task does this)."""
    kvm.w.fetch_add(kvm.layout.glob(Globals.TDP_MMU_PAGES), -1)
    kvm.w.store(kvm.layout.sp(sp, SpMeta.STATE), SP_REMOVED)
    kvm.w.store(kvm.layout.sp(sp, SpMeta.REMOVED_BY), kvm.me + 1)


def handle_removed_pt(kvm: Kvm, pt: int, shared: bool) -> None:
    """Tear down a page table that was unlinked from the paging structure.

    The caller's write of the parent SPTE made this task the table's only
    remover.  In shared mode other tasks may still be walking the table (they
    hold only the read lock and RCU): every entry, present or not, is frozen
    with xchg, waiting out another task's transient freeze, so that their late
    cmpxchg fails and they retry from the root.  In exclusive mode nobody
    walks it, and non-present entries are skipped.  Present children are
    handled recursively (a mirror child leaf leaves the S-EPT through
    set_external_spte, children before parents as the TDX module requires);
    then a mirror table's S-EPT page is released (``free_external_spt``) and
    the page itself goes to RCU.
    """
    lay = kvm.layout
    level = role_level(kvm.w.load(lay.sp(pt, SpMeta.ROLE)))
    # sp->gfn, without the root's bits (the model's sp->gfn has them: tdp_iter.py)
    base_gfn = kvm.w.load(lay.sp(pt, SpMeta.GFN)) & ~kvm_gfn_direct_bits(kvm)
    mirror = kvm.variant.is_mirror_sp(kvm, pt)
    if mirror and shared and not kvm.variant.mirror_shared_teardown:
        kvm.bug("mirror table removed in shared mode",
                "handle_removed_pt: KVM_BUG_ON(shared) for a mirror SP (v6.16)",
                table=pt, level=level, gfn=base_gfn)
    tdp_mmu_unlink_sp(kvm, pt)
    kvm.w.trace(events.kind_word(events.REMOVED_PT, level), pt, base_gfn, int(shared))
    role_mirror = bool(kvm.w.load(lay.sp(pt, SpMeta.ROLE)) & ROLE_MIRROR)
    flags = events.F_MIRROR if role_mirror else 0
    base_i = lay.spt(pt)
    for i, old in kvm.variant.freeze_children(kvm, pt, shared):
        gfn = base_gfn + i * KVM_PAGES_PER_HPAGE(level)
        trace_spte(kvm, base_i + i, gfn, level, old, FROZEN_SPTE, flags, dead_table=True)
        handle_changed_spte(kvm, gfn, old, FROZEN_SPTE, level, shared, mirror=role_mirror,
                            external=mirror)
    if mirror:
        kvm.variant.free_external_spt(kvm, pt)
    kvm.variant.free_removed_sp(kvm, pt)


def freeze_removed_children(kvm: Kvm, pt: int, shared: bool) -> list[tuple[int, int]]:
    """handle_removed_pt's loop (fixed): freeze everything in shared mode."""
    return kvm.w.freeze_children(kvm.layout.spt(pt), WORDS_PER_PAGE, FROZEN_SPTE,
                                 SPTE_MMU_PRESENT_MASK, freeze_nonpresent=shared)


# ---------------------------------------------------------------------------
# Page fault
# ---------------------------------------------------------------------------

def tdp_mmu_link_sp(kvm: Kvm, it: TdpIter, sp: int, shared: bool) -> int:
    """Publish a fully initialised child table in the iterator's entry.

    The table's entries and metadata (role, gfn, LINKED) are written before the
    cmpxchg, which is the release point: a walker that sees the new SPTE sees
    an initialised table.
    """
    new_spte = make_nonleaf_spte(sp)
    if shared:
        r = tdp_mmu_set_spte_atomic(kvm, it, new_spte)
        if r:
            return r
    else:
        tdp_mmu_iter_set_spte(kvm, it, new_spte)
    kvm.w.fetch_add(kvm.layout.glob(Globals.TDP_MMU_PAGES), 1)  # tdp_account_mmu_page
    kvm.stats["tables_linked"] += 1
    return 0


def tdp_mmu_alloc_child_sp(kvm: Kvm, it: TdpIter) -> int | None:
    """tdp_mmu_alloc_sp + tdp_mmu_init_child_sp (+ kvm_mmu_alloc_external_spt).

    The child inherits the parent's role one level down, is_mirror included;
    a mirror table gets its S-EPT page now, outside any SEAMCALL.  The table
    is marked LINKED before the cmpxchg that publishes it, so a walker that
    sees the new SPTE sees a fully initialised table.
    """
    prefer = None
    if kvm.alias_floor_words and it.level - 1 == PG_LEVEL_4K:
        # pool.alias_tables: the page whose frame is the region's first host page
        prefer = slot_index(kvm, it.gfn) // KVM_PAGES_PER_HPAGE(PG_LEVEL_2M)
    sp = tdp_mmu_alloc_sp(kvm, prefer)
    if sp is None:
        return None
    # sp->gfn with the root's bits: the frames the table translates (tdp_iter.py)
    tdp_mmu_init_sp(kvm, sp, it.level - 1, it.gfn | it.gfn_bits,
                    ROLE_MIRROR if it.mirror else 0)
    if it.mirror:
        ext = kvm_mmu_alloc_external_spt(kvm)
        if ext is None:
            tdp_mmu_free_sp(kvm, sp)
            return None
        kvm.w.store(kvm.layout.sp(sp, SpMeta.EXTERNAL_SPT), ext + 1)
    kvm.w.store(kvm.layout.sp(sp, SpMeta.STATE), SP_LINKED)
    return sp


def tdp_mmu_split_huge_page(kvm: Kvm, it: TdpIter, sp: int, shared: bool) -> int:
    """Replace the 2M leaf at the iterator with a table of its 512 4K pieces.

    The children are written with ``make_small_spte`` while the table is still
    private to this task; ``tdp_mmu_link_sp``'s cmpxchg then swaps leaf for
    table in one atomic step, so a walker sees either the whole 2M leaf or the
    whole table.  A leaf becoming a table is not a PFN change of a present leaf.
    Returns 0, or -EBUSY (the leaf changed since the snapshot: nothing happened).
    """
    huge = it.old_spte
    base = kvm.layout.spt(sp)
    for i in range(512):
        kvm.w.store(base + i, make_small_spte(huge, i))
    kvm.hooks.huge_split(kvm, it, sp)
    dirty = huge & shadow_dirty_mask and not it.mirror
    r = tdp_mmu_link_sp(kvm, it, sp, shared)
    if r == 0:
        kvm.stats["huge_splits"] += 1
        if dirty:  # the 2M leaf's D bit (seen leaving it) lives on in every piece
            for i in range(512):
                tlb.dirty_set(kvm, it.gfn + i)
    return r


def kvm_mmu_hugepage_adjust(kvm: Kvm, fault: KvmPageFault) -> None:
    """Pick the fault's goal level, with mmu_lock held for read.

    2M only if the host maps the gfn with a huge page (``max_level``, from the
    pfn lookup), lpage_info allows it (no disallow count, attributes not mixed:
    the mixed flag changes only under the write lock) and the fault is not an
    instruction fetch under the iTLB multihit mitigation.  The pfn is then the
    huge page's first frame.
    """
    if fault.max_level == PG_LEVEL_4K or hugepage_disallowed(kvm, fault.gfn):
        return
    fault.req_level = fault.max_level
    if fault.exec:  # fault->huge_page_disallowed
        return
    fault.goal_level = fault.req_level
    fault.pfn &= ~(KVM_PAGES_PER_HPAGE(fault.goal_level) - 1)


def kvm_tdp_mmu_map(kvm: Kvm, root: int, fault: KvmPageFault) -> int:
    """Handle a TDP page fault: walk, link missing tables, install the leaf.

    mmu_lock is held for read; the walk runs in an RCU read-side section so the
    tables it passes through stay allocated even if another task unlinks them.
    Any lost race (FROZEN on the path, a cmpxchg lost) returns RET_PF_RETRY and
    the vCPU faults again, as the guest would.  A 2M leaf above a 4K goal is
    split on the way down; a table at a 2M goal is replaced by the 2M leaf.
    """
    kvm.lockdep_assert_held_read()
    kvm_mmu_hugepage_adjust(kvm, fault)
    ret = RET_PF_RETRY
    kvm.rcu.rcu_read_lock()
    try:
        # straight down to the first entry the loop below acts on (one tdp_walk)
        it = TdpIter(kvm, root, fault.gfn,
                     fault_private=fault.is_private, descend_to=fault.goal_level)
        end = fault.gfn + 1
        while it.in_range(end):
            if is_frozen_spte(it.old_spte):
                kvm.stats["retry_frozen"] += 1
                return RET_PF_RETRY
            if it.level == fault.goal_level:
                return tdp_mmu_map_handle_target_level(kvm, fault, it)
            if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
                it.next()
                continue
            sp = tdp_mmu_alloc_child_sp(kvm, it)
            if sp is None:
                kvm.stats["retry_nomem"] += 1
                return RET_PF_RETRY
            if is_shadow_present_pte(it.old_spte):  # a 2M leaf above the goal
                if it.mirror:
                    tdp_mmu_free_sp(kvm, sp)
                    kvm.bug("mirror huge page", "kvm_tdp_mmu_map: KVM_BUG_ON(is_mirror_sptep) "
                            "before splitting a huge page", gfn=it.gfn, level=it.level)
                r = tdp_mmu_split_huge_page(kvm, it, sp, shared=True)
            else:
                r = tdp_mmu_link_sp(kvm, it, sp, shared=True)
            if r:
                # never visible to anyone: free at once
                tdp_mmu_free_sp(kvm, sp)
                kvm.stats["retry_link_lost"] += 1
                return RET_PF_RETRY
            it.next()
        kvm.stats["retry_walk_lost"] += 1  # the table we linked was zapped under us
        return ret
    finally:
        kvm.rcu.rcu_read_unlock()


def tdp_mmu_map_handle_target_level(kvm: Kvm, fault: KvmPageFault, it: TdpIter) -> int:
    old = it.old_spte
    if is_shadow_present_pte(old) and is_last_spte(old, it.level) and is_access_allowed(
            fault.write, old):
        if spte_to_pfn(old) != fault.pfn:
            kvm.warn("spurious fault with different pfn", gfn=it.gfn, level=it.level,
                     old=f"{old:#x}", pfn=f"{fault.pfn:#x}")
        kvm.stats["spurious"] += 1
        return RET_PF_SPURIOUS
    writable = fault.write
    emulate = False
    leaf_sp = kvm.shadowed.get(fault.gfn) if writable and not it.mirror else None
    if leaf_sp is not None:
        # make_spte on a gfn that holds one of L1's page tables (nested TDP)
        kvm.stats["shadowed_writes"] += 1
        if mmu_try_to_unsync_pages(kvm, leaf_sp):
            writable, emulate = False, True  # write-protected: the write is emulated
    new = make_spte(fault.pfn, it.level, writable=writable)
    if new == old:
        kvm.stats["spurious"] += 1
        return RET_PF_EMULATE if emulate else RET_PF_SPURIOUS
    kvm.hooks.leaf_installing(kvm, it)
    if kvm.variant.install_leaf(kvm, it, new):
        kvm.hooks.leaf_install_failed(kvm, it)
        kvm.stats["retry_cmpxchg"] += 1
        return RET_PF_RETRY
    kvm.stats["leaves_installed"] += 1
    kvm.hooks.leaf_installed(kvm, it, fault, old, new)
    if it.level > PG_LEVEL_4K:
        kvm.stats["huge_leaves_installed"] += 1
        if is_shadow_present_pte(old):  # a huge page over a table: its 4K entries go
            kvm_flush_remote_tlbs_gfn(kvm, it.gfn, it.level)
    return RET_PF_EMULATE if emulate else RET_PF_FIXED


def tdp_mmu_install_leaf_atomic(kvm: Kvm, it: TdpIter, new_spte: int) -> int:
    """The fault's leaf install (fixed, the variant's ``install_leaf``): the
    cmpxchg of tdp_mmu_set_spte_atomic against the snapshot the fault decided
    on, through the S-EPT for a mirror entry.  0, or -EBUSY with
    ``it.old_spte`` refreshed (the fault retries)."""
    return tdp_mmu_set_spte_atomic(kvm, it, new_spte)


def kvm_tdp_page_fault(kvm: Kvm, gfn: int, write: bool, exec_: bool = False,
                       addr_direct: bool | None = None, private: bool | None = None,
                       prefetch: bool = False) -> int:
    """One guest entry and fault: kvm_mmu_reload, then the fault path from
    kvm_mmu_faultin_pfn to read_unlock.

    A private gfn (TDX) faults through the mirror root and is always treated
    as a write, as tdx_handle_ept_violation does.  A fault on a root that was
    invalidated meanwhile is stale and retries (the next entry reloads).

    ``gfn`` is the faulting gpa's frame (fault->addr >> PAGE_SHIFT).  On a TD a
    shared access carries the shared bit there; kvm_mmu_do_page_fault strips
    it (fault->gfn = gpa_to_gfn(addr) & ~kvm_gfn_direct_bits) so memslots and
    attributes see the plain gfn, and keeps it in fault->addr, which picks the
    direct root (kvm_is_addr_direct), whose walk ORs it back in
    (kvm_gfn_root_bits).  ``addr_direct`` overrides the bit's verdict; a gpa
    without it and no ``addr_direct`` means the guest's current view of the gfn.

    A fault to be retried leaves RCU's read side first: the task's callbacks
    due by then run (softirq), so a vCPU retrying for lack of memory does not
    sit on the very tables it freed.
    """
    bits = kvm_gfn_direct_bits(kvm)
    if gfn & bits:
        gfn &= ~bits
        if addr_direct is None:
            addr_direct = True
    kvm.w.trace(events.FAULT_BEGIN, gfn, int(write))
    r = _kvm_tdp_page_fault(kvm, gfn, write, exec_, addr_direct, private, prefetch)
    kvm.w.trace(events.FAULT_END, gfn, r)
    if r == RET_PF_RETRY:
        rcu_do_batch(kvm)
    return r


def _kvm_tdp_page_fault(kvm: Kvm, gfn: int, write: bool, exec_: bool,
                        addr_direct: bool | None, private: bool | None, prefetch: bool) -> int:
    kvm_mmu_reload(kvm, kvm.vcpu)
    if gfn_to_memslot(kvm, gfn) is None:  # no memslot: MMIO (kvm_handle_noslot_fault)
        kvm.stats["mmio_exits"] += 1
        return RET_PF_EMULATE
    if memslot_invalid(kvm, gfn):  # kvm_mmu_faultin_pfn: the slot is being moved
        kvm.stats["retry_invalid_slot"] += 1
        return kvm.variant.faultin_invalid_slot(kvm, prefetch)
    # PFERR_PRIVATE_ACCESS: fixed by the access (the exit's gpa, the pre-fault's
    # error code); by default the guest's view now
    is_private = kvm_mem_is_private(kvm, gfn) if private is None else private
    if addr_direct is None:
        addr_direct = not is_private
    # kvm_mmu_faultin_pfn: mmu_invalidate_seq snapshot and pfn lookup (GUP or
    # guest_memfd); then the attribute check: a mismatch exits to userspace
    mmu_seq, pfn = kvm.variant.faultin(kvm, gfn, is_private)
    max_level = PG_LEVEL_4K
    if kvm.huge_pages and not is_private:
        max_level = host_mapping_level(kvm, gfn)
    if is_private != kvm_mem_is_private(kvm, gfn):
        kvm.stats["memory_fault_exits"] += 1
        return RET_PF_EXIT
    if mmu_invalidate_retry_gfn_unsafe(kvm, mmu_seq, gfn):
        # an invalidation covers the gfn: retry without contending mmu_lock
        kvm.stats["retry_invalidate_unlocked"] += 1
        return RET_PF_RETRY
    fault = KvmPageFault(gfn=gfn, write=write or is_private, pfn=pfn, is_private=is_private,
                         max_level=max_level, exec=exec_, addr_direct=addr_direct)
    root = tdp_mmu_get_root_for_fault(kvm, fault)
    kvm.read_lock()
    try:
        if is_root_invalid(kvm, root):  # is_page_fault_stale: obsolete root
            kvm.stats["retry_stale_root"] += 1
            return RET_PF_RETRY
        if kvm.variant.fault_retry_check(kvm, mmu_seq, gfn):  # mmu_invalidate_retry_gfn
            kvm.stats["retry_invalidate"] += 1
            return RET_PF_RETRY
        return kvm_tdp_mmu_map(kvm, root, fault)
    finally:
        kvm.read_unlock()


def mmu_invalidate_retry_gfn_unsafe(kvm: Kvm, mmu_seq: int, gfn: int) -> bool:
    """kvm_host.h's mmu_invalidate_retry_gfn without mmu_lock, as
    kvm_mmu_faultin_pfn calls it before taking the lock ("KVM: x86/mmu: Retry
    fault before acquiring mmu_lock if mapping is changing", Sean
    Christopherson, 2023): a fault that is sure to retry does not queue for
    mmu_lock, where it would make the invalidation's zap yield to it
    (rwlock_needbreak) and only delay the invalidation it waits for.  Not the
    check that gates the install: that one is the locked fault_retry_check."""
    w, g = kvm.w, kvm.layout.globals
    if w.load(g + Globals.MMU_INVALIDATE_IN_PROGRESS):
        if (w.load(g + Globals.MMU_INVALIDATE_RANGE_START) <= gfn
                < w.load(g + Globals.MMU_INVALIDATE_RANGE_END)):
            return True
    return w.load(g + Globals.MMU_INVALIDATE_SEQ) != mmu_seq


def faultin_invalid_slot_eagain(kvm: Kvm, prefetch: bool) -> int:
    """kvm_mmu_faultin_pfn on a KVM_MEMSLOT_INVALID slot (fixed, 3ccbf6f47098
    "KVM: x86/mmu: Return -EAGAIN if userspace deletes/moves memslot during
    prefault"): a fault retries (the vCPU re-enters and drops kvm->srcu), a
    prefetch (KVM_PRE_FAULT_MEMORY) gives up with -EAGAIN."""
    return -11 if prefetch else RET_PF_RETRY


def faultin_invalid_slot_retry(kvm: Kvm, prefetch: bool) -> int:
    """Buggy (before 3ccbf6f47098): a prefetch retries too, and
    kvm_tdp_map_page's loop never lets kvm->srcu go while the move waits for it."""
    return RET_PF_RETRY


def kvm_tdp_mmu_map_private_pfn(kvm: Kvm, gfn: int, pfn: int) -> int:
    """Map a guest_memfd pfn into the mirror root at 4K (the initial image; the
    caller holds slots_lock): kvm_tdp_mmu_map under the read lock, retried while
    it says RET_PF_RETRY, until a signal or the VM is dead.  Not a fault: no
    invalidation sequence check (slots_lock and guest_memfd's lock exclude the
    invalidations)."""
    kvm_mmu_reload(kvm, kvm.vcpu)
    fault = KvmPageFault(gfn=gfn, write=True, pfn=pfn, is_private=True, addr_direct=False)
    root = kvm_tdp_mmu_mirror_root(kvm)
    while True:
        if signal_pending(kvm):
            return -4  # -EINTR
        if vm_dead(kvm):
            return -5  # -EIO
        kvm.read_lock()
        try:
            r = kvm_tdp_mmu_map(kvm, root, fault)
        finally:
            kvm.read_unlock()
        if r != RET_PF_RETRY:
            return 0 if r == RET_PF_FIXED else -5
        kvm.stats["map_private_retries"] += 1
        kvm.hooks.retry(kvm, "kvm_tdp_mmu_map_private_pfn", gfn)
        kvm.w.relax()


# ---------------------------------------------------------------------------
# Zaps
# ---------------------------------------------------------------------------

def _zap_present_leafs(kvm: Kvm, root: int, start: int, end: int,
                       zap_one: Callable[[TdpIter], int]) -> int:
    """Walk [start, end) under RCU and ``zap_one`` every present leaf; a non-zero
    return (a lost race) retries the same entry with the refreshed snapshot.
    ``zap_one`` flushes what it zapped itself (tdp_mmu_zap_spte_atomic)."""
    n = 0
    kvm.rcu.rcu_read_lock()
    try:
        it = TdpIter(kvm, root, start, min_level=PG_LEVEL_4K)
        while it.in_range(end):
            if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
                if zap_one(it):
                    kvm.stats["zap_retry"] += 1
                    kvm.hooks.retry(kvm, "tdp_mmu_zap_spte_atomic", it.gfn)
                    continue
                n += 1
            it.next()
    finally:
        kvm.rcu.rcu_read_unlock()
    return n


def tdp_mmu_zap_leafs(kvm: Kvm, root: int, start: int, end: int, can_yield: bool,
                      flush: bool) -> tuple[int, bool]:
    """Zap every present leaf of one root in [start, end), mmu_lock held for write.

    ``flush`` comes in pending from the caller's earlier roots and goes out
    pending: only leaves are zapped, no table is freed, so the flush may wait
    until after rcu_read_unlock, but never past a yield of mmu_lock
    (the variant's ``iter_cond_resched`` services it first).  Returns (leaves zapped,
    flush still pending).
    """
    kvm.lockdep_assert_held_write()
    n = 0
    kvm.rcu.rcu_read_lock()
    try:
        it = TdpIter(kvm, root, start, min_level=PG_LEVEL_4K)
        while it.in_range(end):
            if can_yield and kvm.variant.iter_cond_resched(kvm, it, False, flush):
                flush = False
                it.next()
                continue
            if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
                kvm.tlb_unflushed.append((root, spte_to_pfn(it.old_spte)))
                tdp_mmu_iter_set_spte(kvm, it, SHADOW_NONPRESENT_VALUE)
                flush = True
                n += 1
            it.next()
    finally:
        kvm.rcu.rcu_read_unlock()
    return n, flush


def kvm_tdp_mmu_zap_leafs(kvm: Kvm, root: int, start: int, end: int) -> int:
    """Zap every present leaf of one root in [start, end) with mmu_lock held for
    write, no yielding, and flush before returning (the lock is still held)."""
    token = kvm.hooks.zap_start(kvm, 0)
    n, flush = tdp_mmu_zap_leafs(kvm, root, start, end, can_yield=False, flush=False)
    if flush:
        kvm_flush_remote_tlbs_range(kvm, start, end)
    kvm.hooks.zap_done(kvm, [root], 0, start, end, token)
    return n


def zap_leafs_flush_threaded(kvm: Kvm, roots: Iterable[int], start: int,
                             end: int, can_yield: bool) -> tuple[int, bool]:
    """kvm_tdp_mmu_zap_leafs over roots (fixed, a835429cda91): the pending flush
    of the roots zapped so far is handed to the next root's zap, whose yields
    service it before dropping mmu_lock."""
    n, flush = 0, False
    for root in roots:
        k, flush = tdp_mmu_zap_leafs(kvm, root, start, end, can_yield, flush=flush)
        n += k
    return n, flush


def zap_leafs_flush_per_root(kvm: Kvm, roots: Iterable[int], start: int,
                             end: int, can_yield: bool) -> tuple[int, bool]:
    """Buggy (before a835429cda91): each root's zap starts with no pending flush
    and the caller ORs the results, so a yield while walking a later root drops
    mmu_lock with the earlier roots' zaps not yet flushed: an mmu_notifier that
    runs meanwhile finds the gfns already non-present, does not flush, and the
    page is freed while a vCPU's TLB still maps it."""
    n, flush = 0, False
    for root in roots:
        k, f = tdp_mmu_zap_leafs(kvm, root, start, end, can_yield, flush=False)
        n += k
        flush |= f
    return n, flush


def kvm_tdp_mmu_zap_leafs_roots(kvm: Kvm, types: int, start: int, end: int,
                                may_block: bool = True) -> int:
    """kvm_zap_gfn_range's TDP MMU part: zap the leaves of [start, end) in every
    root of ``types``, yielding unless the range may not block (a non-blocking
    mmu_notifier invalidation: kvm_tdp_mmu_unmap_gfn_range passes
    ``range->may_block`` as tdp_mmu_zap_leafs' can_yield), then service the
    pending flush before the caller drops mmu_lock (held for write).  Returns
    the leaves zapped."""
    token = kvm.hooks.zap_start(kvm, types)
    roots = for_each_tdp_mmu_root_yield_safe(kvm, types)
    try:
        n, flush = kvm.variant.zap_leafs_roots(kvm, roots, start, end, may_block)
    finally:
        roots.close()  # puts the root a lost race left pinned, now
    if flush:
        kvm_flush_remote_tlbs_range(kvm, start, end)
    kvm.hooks.zap_done(kvm, None, types, start, end, token)
    return n


def kvm_tdp_mmu_clear_dirty_range(kvm: Kvm, start: int, end: int) -> int:
    """KVM_CLEAR_DIRTY_LOG's clear_dirty_gfn_range on [start, end) of every valid
    direct root, mmu_lock held for read: each present leaf with D loses it by
    cmpxchg (the D bit is harvested, handle_changed_spte marks the page dirty),
    then every TLB is flushed, so the next guest write walks and sets D again.
    Returns the D bits cleared."""
    kvm.lockdep_assert_held_read()
    n = 0
    for root in for_each_tdp_mmu_root_yield_safe(kvm, KVM_DIRECT_ROOTS):
        kvm.rcu.rcu_read_lock()
        try:
            it = TdpIter(kvm, root, start, min_level=PG_LEVEL_4K)
            while it.in_range(end):
                old = it.old_spte
                if (is_shadow_present_pte(old) and is_last_spte(old, it.level)
                        and old & shadow_dirty_mask):
                    if tdp_mmu_set_spte_atomic(kvm, it, old & ~shadow_dirty_mask):
                        kvm.hooks.retry(kvm, "tdp_mmu_set_spte_atomic", it.gfn)
                        continue  # retry with the refreshed snapshot
                    n += 1
                it.next()
        finally:
            kvm.rcu.rcu_read_unlock()
    if n:
        kvm_flush_remote_tlbs_range(kvm, start, end)
    return n


def tdp_mmu_zap_spte_atomic(kvm: Kvm, it: TdpIter) -> int:
    """Zap one SPTE with mmu_lock held for read: freeze, flush, then clear.

    The v5.18..v6.1x shared-mode zap.  FROZEN stops every other task from
    installing a new translation for the gfn until the remote TLB flush has
    removed the stale one; only this task writes the entry afterwards, with a
    plain store, because everyone else either waits on a frozen value or
    cmpxchgs against a non-frozen snapshot, which fails.
    Returns 0, or -EBUSY (old_spte refreshed) if the freeze lost a race.
    The fixed ``zap_spte_atomic`` piece (tdp_mmu_zap_leafs_atomic calls it
    through ``kvm.variant``).
    """
    r = tdp_mmu_set_spte_atomic(kvm, it, FROZEN_SPTE)
    if r:
        return r
    kvm_flush_remote_tlbs_gfn(kvm, it.gfn, it.level)
    trace_spte(kvm, it.sptep, it.gfn, it.level, FROZEN_SPTE, SHADOW_NONPRESENT_VALUE)
    kvm.w.store(it.sptep, SHADOW_NONPRESENT_VALUE)
    return 0


def kvm_flush_remote_tlbs_gfn(kvm: Kvm, gfn: int, level: int) -> None:
    """Flush one gfn from every vCPU's TLB (a full flush: see tlb.py)."""
    tlb.kvm_flush_remote_tlbs(kvm)


def kvm_flush_remote_tlbs_range(kvm: Kvm, start: int, end: int) -> None:
    """Flush [start, end) from every vCPU's TLB (a full flush: see tlb.py)."""
    tlb.kvm_flush_remote_tlbs(kvm)


def rcu_do_batch(kvm: Kvm) -> None:
    """Run this task's RCU callbacks whose grace period has ended, as the RCU
    softirq may on this CPU once it has left its read-side section."""
    if kvm.rcu.pending and not kvm.rcu.nesting:
        kvm.rcu.reclaim(lambda p: tdp_mmu_free_sp_rcu_callback(kvm, p))


def tdp_mmu_zap_leafs_atomic(kvm: Kvm, root: int, start: int, end: int) -> int:
    """Zap every present leaf in [start, end) with mmu_lock held for read, each with
    the variant's ``zap_spte_atomic`` (fixed: tdp_mmu_zap_spte_atomic); a lost
    race retries the same entry."""
    kvm.lockdep_assert_held_read()

    def zap(it: TdpIter) -> int:
        if kvm.variant.is_mirror_sptep(it):  # the mirror freezes by itself
            return tdp_mmu_set_spte_atomic(kvm, it, SHADOW_NONPRESENT_VALUE)
        return kvm.variant.zap_spte_atomic(kvm, it)

    token = kvm.hooks.zap_start(kvm, 0)
    n = _zap_present_leafs(kvm, root, start, end, zap)
    kvm.hooks.zap_done(kvm, [root], 0, start, end, token)
    return n


def tdp_mmu_iter_need_resched(kvm: Kvm, it: TdpIter) -> bool:
    """Time to yield: this task should reschedule or another waits for mmu_lock,
    and the walk made forward progress since its last yield (no livelock)."""
    if not need_resched(kvm) and not kvm.rwlock_needbreak():
        return False
    # Ensure forward progress has been made before yielding.
    return it.next_last_level_gfn != it.yielded_gfn


def tdp_mmu_iter_cond_resched(kvm: Kvm, it: TdpIter, shared: bool, flush: bool = False) -> bool:
    """Yield mmu_lock (and RCU) if tdp_mmu_iter_need_resched says so.  A pending
    TLB flush is serviced first, before RCU is dropped (zapped tables may be
    freed once we leave the read-side section) and before mmu_lock is (another
    task may free a page this task unmapped).  The caller must then restart its
    walk from the root (the tree may have changed completely) and clear its
    flush.  As the kernel's (arch/x86/kvm/mmu/tdp_mmu.c, read at kvm-x86/linux
    2d181d84af38, with David Matlack's tdp_mmu_iter_need_resched of 2024):
    cond_resched_rwlock_{read,write} decide again whether to drop the lock, the
    walk restarts either way.
    The fixed ``iter_cond_resched`` piece: callers go through ``kvm.variant``."""
    if not tdp_mmu_iter_need_resched(kvm, it):
        return False
    if flush:
        tlb.kvm_flush_remote_tlbs(kvm)
    kvm.hooks.mmu_lock_yield(kvm)
    kvm.rcu.rcu_read_unlock()
    rcu_do_batch(kvm)
    if cond_resched_rwlock_read(kvm) if shared else cond_resched_rwlock_write(kvm):
        kvm.stats["yields"] += 1
    kvm.rcu.rcu_read_lock()
    it.yielded = True
    return True


def flush_then_rcu_unlock(kvm: Kvm, flush: bool) -> bool:
    """End of a zap that may have freed tables (fixed, fcb93eb6d09d): the pending
    flush is serviced before rcu_read_unlock, so no vCPU's paging-structure
    cache holds a removed table once its grace period can end.  Returns the
    flush left to the caller: none."""
    if flush:
        tlb.kvm_flush_remote_tlbs(kvm)
    kvm.rcu.rcu_read_unlock()
    return False


def rcu_unlock_then_flush(kvm: Kvm, flush: bool) -> bool:
    """Buggy (before fcb93eb6d09d): RCU is released with the flush still pending
    and the flush left to the caller, so the removed tables' grace period can
    end, and their RCU callbacks free them, while a vCPU still caches them."""
    kvm.rcu.rcu_read_unlock()
    return flush


def tdp_mmu_zap_range_at_level(kvm: Kvm, root: int, start: int, end: int, zap_level: int,
                               shared: bool, may_yield: bool = False,
                               flush_tlb: bool = True, gfn_bits: int | None = None) -> int:
    """Zap every present entry at ``zap_level`` in [start, end), leaf or not.

    The range form of ``__tdp_mmu_zap_root``: a non-leaf zapped here takes its
    whole sub-tree with it through ``handle_removed_pt``.  In shared mode a lost
    cmpxchg retries the same position with the refreshed snapshot; a frozen
    entry is not present and is skipped.  Removed tables go to RCU, so the TLB
    flush (unless ``flush_tlb`` is off: invalid roots, which no vCPU runs on
    once KVM_REQ_MMU_FREE_OBSOLETE_ROOTS was made) is due before RCU is
    released (the variant's ``zap_release_rcu``).  ``gfn_bits``: the walk's
    (default the root's; 0 for a whole-root zap, see TdpIter).
    """
    if shared:
        kvm.lockdep_assert_held_read()
    else:
        kvm.lockdep_assert_held_write()
    n = 0
    flush = False
    kvm.rcu.rcu_read_lock()
    try:
        it = TdpIter(kvm, root, start, min_level=zap_level, gfn_bits=gfn_bits)
        while it.in_range(end):
            if may_yield and kvm.variant.iter_cond_resched(kvm, it, shared, flush):
                flush = False
                it.next()  # restarts from the root at next_last_level_gfn
                continue
            if is_shadow_present_pte(it.old_spte) and it.level == zap_level:
                if shared:
                    if tdp_mmu_set_spte_atomic(kvm, it, SHADOW_NONPRESENT_VALUE):
                        kvm.stats["zap_retry"] += 1
                        kvm.hooks.retry(kvm, "tdp_mmu_zap_spte_atomic", it.gfn)
                        continue  # goto retry with the refreshed old_spte
                else:
                    tdp_mmu_iter_set_spte(kvm, it, SHADOW_NONPRESENT_VALUE)
                flush = flush_tlb
                n += 1
            it.next()
    except BaseException:
        kvm.rcu.rcu_read_unlock()
        raise
    flush = kvm.variant.zap_release_rcu(kvm, flush)
    rcu_do_batch(kvm)
    if flush:  # the caller's deferred flush
        kvm_flush_remote_tlbs_range(kvm, start, end)
    return n


def zap_subtrees_in_range(kvm: Kvm, root: int, start: int, end: int, zap_level: int,
                          shared: bool) -> int:
    """Zap the sub-trees at ``zap_level`` of [start, end) in one root the caller
    holds: :func:`tdp_mmu_zap_range_at_level` as an operation of its own, whose
    result the zap hooks check (nothing at or below ``zap_level`` installed
    before it began is left).  The model's: the zapper role's sub-tree zaps and
    the mirror-zap-shared proposal use it; upstream's only sub-tree zaps are
    __tdp_mmu_zap_root's passes (tdp_mmu_zap_root), whose 4K-first order is an
    optimisation, not a contract, so they are checked as a whole (root_zapped)."""
    token = kvm.hooks.zap_start(kvm, 0)
    n = tdp_mmu_zap_range_at_level(kvm, root, start, end, zap_level, shared)
    kvm.hooks.zap_done(kvm, [root], 0, start, end, token, zap_level)
    return n


# ---------------------------------------------------------------------------
# Root and teardown (the single direct root; the root lifecycle comes later)
# ---------------------------------------------------------------------------

def kvm_tdp_mmu_alloc_mirror_root(kvm: Kvm) -> int:
    """TDX: the VM's mirror root, whose external page becomes the S-EPT root in the
    module.  Mirror roots cannot be fast-zapped; this one lives as long as the VM
    (on the roots list, held by the TDP MMU's reference)."""
    assert kvm.tdx is not None
    root = _new_root(kvm, mirror=True)
    kvm.w.store(kvm.layout.sp(root, SpMeta.ROOT_COUNT), 1)
    ext = kvm_mmu_alloc_external_spt(kvm)
    if ext is None:
        raise MemoryError("page pool cannot hold the S-EPT root")
    kvm.tdx.module.td_init(ext)
    kvm.w.store(kvm.layout.sp(root, SpMeta.EXTERNAL_SPT), ext + 1)
    kvm.w.store(kvm.layout.glob(Globals.MIRROR_ROOT), root)
    return root


def kvm_mmu_uninit_tdp_mmu(kvm: Kvm) -> None:
    """VM teardown with no vCPU left: invalidate every root, zap it exclusively,
    put the TDP MMU's references, wait for RCU.

    A TD goes in upstream's order: every guest_memfd is released first (it holds
    a reference to the VM), zapping every private leaf through the S-EPT hooks
    while the HKID is still assigned; then tdx_mmu_release_hkid; then the roots,
    the mirror root with its tables among them, whose S-EPT pages are reclaimed
    (TDH.PHYMEM.PAGE.RECLAIM, allowed only now); last the S-EPT root.

    Afterwards every page of the pool must be free, tdp_mmu_pages zero and the
    roots list empty; the checker verifies that (a leak means a reference or a
    table was lost by the protocol).
    """
    kvm_mmu_unload(kvm, kvm.vcpu)
    mirror_root = kvm.w.load(kvm.layout.glob(Globals.MIRROR_ROOT)) if kvm.geometry.tdx else 0
    if kvm.geometry.tdx:
        assert kvm.tdx is not None
        kvm.write_lock()  # kvm_gmem_release: the PRIVATE-filtered unmap of every binding
        try:
            for slot in kvm.geometry.memslots:
                kvm.stats["entries_zapped"] += kvm_tdp_mmu_zap_leafs_roots(
                    kvm, KVM_MIRROR_ROOTS | KVM_INVALID_ROOTS, slot.base_gfn, slot.end_gfn)
        finally:
            kvm.write_unlock()
        kvm.hooks.hkid_release(kvm)
        kvm.tdx.module.release_hkid()  # tdx_mmu_release_hkid (vm_pre_destroy)
    kvm.write_lock()
    try:
        kvm_tdp_mmu_invalidate_roots(kvm, KVM_VALID_ROOTS)
        scheduled = [r for r in listed_roots(kvm)
                     if kvm.w.load(kvm.layout.sp(r, SpMeta.SCHEDULED_TO_ZAP))]
        for root in scheduled:
            kvm.w.store(kvm.layout.sp(root, SpMeta.SCHEDULED_TO_ZAP), 0)
            tdp_mmu_zap_root(kvm, root, shared=False)
    finally:
        kvm.write_unlock()
    if kvm.geometry.tdx:
        assert kvm.tdx is not None
        kvm.tdx.module.td_teardown()  # tdx_vm_destroy: reclaim what the TD still owns
        kvm.w.store(kvm.layout.glob(Globals.MIRROR_ROOT), 0)
    kvm.read_lock()
    try:
        for root in scheduled:
            kvm_tdp_mmu_put_root(kvm, root)  # the TDP MMU's reference
        if kvm.geometry.tdx and not kvm.variant.root_gifted_ref:
            # without gifted references the VM's own hold on its mirror root goes last
            kvm_tdp_mmu_put_root(kvm, mirror_root)
    finally:
        kvm.read_unlock()
    kvm.rcu.reclaim(lambda p: tdp_mmu_free_sp_rcu_callback(kvm, p))


def _zap_defunct(kvm: Kvm, root: int) -> None:
    tdp_mmu_zap_root(kvm, root, shared=kvm.lock_mode == LOCK_READ)


def put_root_resurrect(kvm: Kvm, root: int) -> None:
    """Seed 001, Paolo's version (v4 of the 2022 overhaul): on the last put of a
    valid root, mark it invalid with xchg, set the count back to 1, zap it
    with yielding, then put again.  Other tasks may take references while the
    zap yields; the count went 0 -> 1 (counted as a warning)."""
    if not refcount_dec_and_test(kvm, root):
        return
    if not root_xchg_invalid(kvm, root):
        refcount_set(kvm, root, 1)
        _zap_defunct(kvm, root)
        if not refcount_dec_and_test(kvm, root):
            return
    tdp_mmu_free_root(kvm, root)


def put_root_dec_not_one(kvm: Kvm, root: int) -> None:
    """Buggy (Sean Christopherson's refcount_dec_not_one proposal, Mar 2022, in "[PATCH v3
    20/28] KVM: x86/mmu: Allow yielding when zapping GFNs for defunct TDP MMU root"):
    refcount_dec_not_one, xchg, zap with yielding,
    dec_not_one again, then force the count to 0 and free.  Between the
    dec_not_one that saw 1 and the forced 0, another task can take a reference
    (a get runs under the read lock since v6.9): it is wiped out."""
    if refcount_dec_not_one(kvm, root):
        return
    if not root_xchg_invalid(kvm, root):
        _zap_defunct(kvm, root)
        if refcount_dec_not_one(kvm, root):
            return
    kvm.w.spin_ns(kvm.race_window_ns)  # the gap a get can fall into
    refcount_set(kvm, root, 0)
    tdp_mmu_free_root(kvm, root)


def zap_invalidated_roots_double_put(kvm: Kvm, shared: bool) -> None:
    """Buggy (the 2022 overhaul's iterations: efd995dae5eb, 22b94c4b63eb, edbdb43fc96b): the
    zap path gives the TDP MMU's reference back for every invalid root it visits, not only
    the ones this invalidation scheduled, so a root zapped by an earlier pass loses a
    reference it no longer had: it is freed while vCPUs still hold it."""
    lay = kvm.layout
    for root in for_each_tdp_mmu_root_yield_safe(kvm, KVM_ALL_ROOTS):
        if not is_root_invalid(kvm, root):
            continue
        if kvm.w.xchg(lay.sp(root, SpMeta.SCHEDULED_TO_ZAP), 0):
            tdp_mmu_zap_root(kvm, root, shared)
        kvm_tdp_mmu_put_root(kvm, root)


def tdp_mmu_zap_root(kvm: Kvm, root: int, shared: bool) -> None:
    """Zap a whole (invalid) root, 4K leaves first then the top level, yielding
    (a hook point: an invalid root is zapped once).  The whole root's range,
    whatever its gfn bits (__tdp_mmu_zap_root's for_each_tdp_pte_min_level_all:
    gfn_bits 0, [0, tdp_mmu_max_gfn_exclusive()))."""
    kvm.hooks.root_zap(kvm, root)
    top = role_level(kvm.w.load(kvm.layout.sp(root, SpMeta.ROLE)))  # root->role.level
    end = KVM_PAGES_PER_HPAGE(top + 1)
    for level in (PG_LEVEL_4K, top):
        # no TLB flush: the root is invalid and every vCPU was made to drop it
        # (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS) before it runs the guest again
        tdp_mmu_zap_range_at_level(kvm, root, 0, end, level, shared, may_yield=True,
                                   flush_tlb=False, gfn_bits=0)
    kvm.hooks.root_zapped(kvm, root)
    kvm.stats["root_zaps"] += 1


def zap_invalidated_roots_final(kvm: Kvm, shared: bool) -> None:
    """kvm_tdp_mmu_zap_invalidated_roots: zap each root scheduled by the
    invalidation, then put the TDP MMU's reference (gifted at allocation, or
    taken at invalidation), exactly once."""
    lay = kvm.layout
    for root in for_each_tdp_mmu_root_yield_safe(kvm, KVM_ALL_ROOTS):
        if not kvm.w.load(lay.sp(root, SpMeta.SCHEDULED_TO_ZAP)):
            continue
        kvm.w.store(lay.sp(root, SpMeta.SCHEDULED_TO_ZAP), 0)
        if not is_root_invalid(kvm, root):
            kvm.bug("scheduled root is valid", "KVM_BUG_ON(!root->role.invalid)", root=root)
        # the reference must be put after zapping: the root has to stay reachable
        # by mmu_notifier callbacks while it is being zapped
        tdp_mmu_zap_root(kvm, root, shared)
        kvm_tdp_mmu_put_root(kvm, root)


def kvm_mmu_zap_all_fast(kvm: Kvm) -> None:
    """Memslot update: invalidate every direct root (write lock), then zap them
    (read lock, yielding).  kvm->slots_lock serialises callers."""
    slots_i = kvm.layout.glob(Globals.SLOTS_LOCK)
    kvm.w.spin_lock(slots_i, kvm.pid)
    try:
        kvm.write_lock()
        try:
            kvm.stats["roots_invalidated"] += kvm_tdp_mmu_invalidate_roots(kvm,
                                                                            KVM_DIRECT_ROOTS)
            # every vCPU leaves guest mode and drops its obsolete root before it
            # runs the guest again: the invalid roots are zapped without a flush
            kvm_make_all_cpus_request(kvm, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
        finally:
            kvm.write_unlock()
        kvm.read_lock()
        try:
            kvm.variant.zap_invalidated_roots(kvm, True)
        finally:
            kvm.read_unlock()
    finally:
        kvm.spin_unlock(slots_i, "slots_lock")
    kvm.stats["fast_zaps"] += 1
