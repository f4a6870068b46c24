"""Protocol variants: the fixed protocol and the historical bugs, by name.

A variant is a small frozen object holding the pieces of the protocol it
swaps (functions with the kernel's signature: each field's type, in pieces.py,
is a Protocol naming the arguments and stating the contract), its story, where
it comes from and, for a bug, the invariants it is expected to trip.  The model
calls ``kvm.variant.<piece>(...)`` at the one place each piece is used; nothing
else in the model knows which variant runs.

To add a variant: write the replacement piece next to the fixed one (same
signature, a docstring saying what it gets wrong), then register a
``dataclasses.replace(FIXED, name=..., story=..., source=..., piece=...,
expects=(...))`` below.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path

from stress.model import mirror, notifier, roots, td, tdp_mmu, unsync
from stress.model.kvm import Kvm
from stress.model.mmu_page import call_rcu_free_sp, tdp_mmu_free_sp_rcu_callback
from stress.model.pieces import (
    ChangedSpteRemovesPt,
    EptViolationLocalRetry,
    Faultin,
    FaultinInvalidSlot,
    FaultRetryCheck,
    FreeExternalSpt,
    FreeRemovedSp,
    FreezeChildren,
    InstallLeaf,
    InvalidateEnd,
    IsMirrorSp,
    IsMirrorSptep,
    IterCondResched,
    MapInitialPage,
    PrefaultGpaDirect,
    PreSetMemoryAttributes,
    PreSetRangeAdd,
    PutRoot,
    RootFilter,
    SetExternalSpte,
    SetMirrorSpteAtomic,
    TdhDoNoVcpus,
    TdxTrack,
    TdxVmStateGuard,
    TryToUnsync,
    WriteSpte,
    ZapInvalidatedRoots,
    ZapLeafsRoots,
    ZapReleaseRcu,
    ZapSpteAtomic,
)
from stress.model.spte import (
    FROZEN_SPTE,
    SPTE_MMU_PRESENT_MASK,
    is_shadow_present_pte,
    spte_to_pfn,
)
from stress.model.tdp_mmu import (
    child_pt_removed_unless_still_table,
    freeze_removed_children,
)


def freeze_present_children_only(kvm: Kvm, pt: int, shared: bool) -> list[tuple[int, int]]:
    """Buggy handle_removed_pt loop: skips non-present children even in shared mode.

    A vCPU that walked into the table before it was unlinked still holds a
    pointer to it; its cmpxchg of a non-present entry succeeds in the dead
    table, linking a child or mapping a page nobody can reach or zap.
    """
    return kvm.w.freeze_children(kvm.layout.spt(pt), 512, FROZEN_SPTE,
                                 SPTE_MMU_PRESENT_MASK, freeze_nonpresent=False)


def free_sp_without_grace_period(kvm: Kvm, pt: int) -> None:
    """Buggy: runs the RCU callback at once instead of after a grace period, so a
    walker still inside the table reads a freed (poisoned or reused) page."""
    tdp_mmu_free_sp_rcu_callback(kvm, pt)


def child_pt_removed_if_pfn_changed(kvm: Kvm, old_spte: int, new_spte: int,
                                    level: int) -> bool:
    """Buggy (before c8e5a0d0e9bc): a present non-leaf SPTE's child table is torn
    down only if the entry was zapped or its PFN changed.  A huge leaf that
    replaces the table at the table's own frame (guest memory over top of a
    kernel-allocated SP: ``pool.alias_tables``) leaves the table linked to
    nothing: leaked, still counted in tdp_mmu_pages, its leaves never zapped."""
    return not is_shadow_present_pte(new_spte) or spte_to_pfn(old_spte) != spte_to_pfn(new_spte)


@dataclass(frozen=True)
class Variant:
    """One protocol: the pieces it runs (each typed by its signature and
    contract in pieces.py), its story, where it comes from, and what the tool
    is expected to find in it."""

    name: str
    story: str
    source: str
    buggy: bool
    # handle_removed_pt: how the children of a removed table are frozen
    freeze_children: FreezeChildren
    # handle_removed_pt: how the removed table's page is released
    free_removed_sp: FreeRemovedSp
    # the main write sites: the fault's leaf install (tdp_mmu_map_handle_target_level),
    # the read-lock single-leaf zap and its flush (tdp_mmu_zap_leafs_atomic), the
    # yield of every yielding walk, and the root iterator's filter (tdp_mmu_next_root)
    install_leaf: InstallLeaf = tdp_mmu.tdp_mmu_install_leaf_atomic
    zap_spte_atomic: ZapSpteAtomic = tdp_mmu.tdp_mmu_zap_spte_atomic
    iter_cond_resched: IterCondResched = tdp_mmu.tdp_mmu_iter_cond_resched
    root_filter: RootFilter = roots.tdp_mmu_root_match
    # mirror (TDX): does this entry / table get the external hooks?
    is_mirror_sptep: IsMirrorSptep = mirror.is_mirror_sptep_by_role
    is_mirror_sp: IsMirrorSp = mirror.is_mirror_sp_by_role
    # mirror (TDX): an update of a mirror SPTE with mmu_lock held for read
    set_mirror_spte_atomic: SetMirrorSpteAtomic = mirror.set_mirror_spte_frozen
    # mirror (TDX): kvm_x86_ops.set_external_spte(kvm, gfn, old, new, level) and
    # .free_external_spt(kvm, sp): TDX's S-EPT hooks
    set_external_spte: SetExternalSpte = mirror.tdx_sept_set_private_spte
    free_external_spt: FreeExternalSpt = mirror.tdx_sept_free_private_spt
    # TDX removal (write lock): a SEAMCALL's BUSY handling (tdh_do_no_vcpus), TLB
    # tracking (tdx_track), whether tdx_vcpu_run honours wait_for_sept_zap
    tdh_do_no_vcpus: TdhDoNoVcpus = mirror.tdh_do_no_vcpus
    tdx_track: TdxTrack = mirror.tdx_track
    td_honours_wait_for_sept_zap: bool = True
    # TDX vCPU and VM ioctls: when tdx_handle_ept_violation's local retry goes on;
    # whether KVM_PRE_FAULT_MEMORY's gpa carries the shared bit; how a page of the
    # initial image is mapped; which locks KVM_TDX_INIT_MEM_REGION holds
    ept_violation_local_retry: EptViolationLocalRetry = td.local_retry_exits
    prefault_gpa_direct: PrefaultGpaDirect = td.prefault_gpa_with_direct_bits
    map_initial_page: MapInitialPage = tdp_mmu.kvm_tdp_mmu_map_private_pfn
    tdx_vm_state_guard: TdxVmStateGuard = td.tdx_vm_state_guard_all
    # memslots: what a fault on a slot being moved returns (prefetch: -EAGAIN)
    faultin_invalid_slot: FaultinInvalidSlot = tdp_mmu.faultin_invalid_slot_eagain
    # mirror (TDX): the zapper's zaps visit mirror roots too (the mirror-zap-shared
    # proposal; upstream zaps mirror leaves only through guest_memfd and
    # conversions, under the write lock); handle_removed_pt has no
    # KVM_BUG_ON(shared) for a mirror table (v6.16 had one)
    mirror_shared_zaps: bool = False
    mirror_shared_teardown: bool = True
    # the variant only makes sense for a TD / forces a SEAMCALL BUSY policy
    requires_tdx: bool = False
    busy_policy: str | None = None
    # the shipped config that stresses this variant's code path best (zoo, tests)
    config: str = "default.toml"
    # what a bug variant is expected to trip: invariant names as violations name
    # them.  ``expects`` holds on the VM type of ``config`` (as zoo and
    # tests/test_cli.py::test_bug_variant_is_caught run it); ``expects_by_vm``
    # gives the set per VM type for a variant characterised on more than one
    # ((vm_type, invariants) pairs; it wins over ``expects`` for the types it names)
    expects: tuple[str, ...] = ()
    expects_by_vm: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # roots: how the last reference is put; whether a new root carries the TDP
    # MMU's gifted reference; how invalidated roots are zapped and released
    put_root: PutRoot = roots.put_root_final
    root_gifted_ref: bool = True
    zap_invalidated_roots: ZapInvalidatedRoots = tdp_mmu.zap_invalidated_roots_final
    # nested TDP: marking an indirect shadow page unsync from a TDP MMU fault
    try_to_unsync: TryToUnsync = unsync.unsync_double_checked
    # invalidation: the fault's seq snapshot and pfn lookup, its retry check under
    # mmu_lock, where the invalidation's end runs, what a conversion zaps
    faultin: Faultin = notifier.faultin_seq_then_pfn
    fault_retry_check: FaultRetryCheck = notifier.retry_check
    invalidate_end: InvalidateEnd = notifier.end_before_unlock
    pre_set_memory_attributes: PreSetMemoryAttributes = notifier.pre_set_zap_old_owner
    # huge pages: what a conversion adds to the invalidation besides its range;
    # whether a change of a present non-leaf SPTE removed its child table
    pre_set_range_add: PreSetRangeAdd = notifier.range_add_hugepage_head_tail
    changed_spte_removes_pt: ChangedSpteRemovesPt = child_pt_removed_unless_still_table
    # TLBs and A/D bits (tlb.py): how a leaf zap over several roots carries its
    # pending flush into the next root's yields; where a table-freeing zap
    # flushes relative to rcu_read_unlock; how an exclusive write replaces a
    # leaf whose A/D bits the CPU may set concurrently
    zap_leafs_roots: ZapLeafsRoots = tdp_mmu.zap_leafs_flush_threaded
    zap_release_rcu: ZapReleaseRcu = tdp_mmu.flush_then_rcu_unlock
    write_spte: WriteSpte = tdp_mmu.kvm_tdp_mmu_write_spte

    def vm_types(self) -> tuple[str, ...]:
        """The VM types the variant can run on."""
        return ("tdx",) if self.requires_tdx else ("default", "tdx")

    def expectations(self, config_vm_type: str) -> dict[str, tuple[str, ...]]:
        """VM type -> the invariants a run is expected to trip there (any one of
        them), for every VM type the variant is characterised on.
        ``config_vm_type``: the ``vm.type`` of the variant's ``config``."""
        out = dict(self.expects_by_vm)
        if self.expects and config_vm_type not in out:
            out[config_vm_type] = self.expects
        return out


# Invariant names as violations give them (the oracles' kvm.bug names), for
# the variants' expectations below.
UAF = "use-after-free of page-table page"
SEPT_ERR = "TDX module error"
DIVERGE = "mirror/S-EPT divergence"
UNDERFLOW = "refcount underflow"
STALE = "stale mapping after invalidate_end"
PFN_CHANGED = "present leaf PFN changed in place"
WRONG_ROOT = "gfn mapped in the wrong root"
REMOVED_TABLE = "SPTE installed in removed table"
# a page released while a leaf still maps it, or a table freed too early, also
# leaves a D bit unpropagated or a vCPU's TLB holding it
LOST_DIRTY = "lost-dirty-bit"
STALE_TLB = "stale-tlb-entry-after-free"
GUEST_UAF = "guest access to freed page"
# a root freed while a task still uses it: usually the refcount or the walker's
# poison check fires first; now and then the freed page, reused as a table,
# takes an SPTE or a SEAMCALL first, or a zap of the reused page misses a leaf
ZAP_LEFT = "zap left a present leaf"
# a root whose references were wiped out can also be found, invalid, by a vCPU's
# root lookup before it is freed
ROOT_UAF = (UNDERFLOW, UAF, SEPT_ERR, REMOVED_TABLE, ZAP_LEFT, "invalid root handed to a vCPU")
# a fault that maps a pfn an invalidation has just taken away
# on a TD the stale fault's mapping of a private gfn is an AUG after the invalidation's
# removal: the guest then finds a page it had accepted PENDING (the TD is killed); a
# stale pfn found over a present SPTE of another pfn is KVM's "spurious fault with
# different pfn" WARNING; a vCPU may cache the stale mapping when its page goes
# (the PFN change is caught at the store itself, as a forbidden transition, or by
# handle_changed_spte's BUG)
INVALIDATION_RACE = (STALE, PFN_CHANGED, LOST_DIRTY, GUEST_UAF, WRONG_ROOT, STALE_TLB,
                     "TD killed: guest access before accept", "kernel WARNING",
                     "forbidden SPTE transition")


FIXED = Variant(
    name="fixed",
    story="The upstream protocol: shared-mode removal freezes every child, pages are "
          "freed after an RCU grace period; on a TD, mirror SPTEs are frozen while their "
          "SEAMCALLs (AUG, SEPT.ADD) run with mmu_lock held for read, removed (BLOCK, TRACK, "
          "REMOVE through tdh_do_no_vcpus) only with it held for write, and mirror tables "
          "are freed only at teardown.",
    source="tdx.c at kvm-x86 09c6f74ecb86; tdp_mmu.c of the same era (Yan Zhao, "
           "'[PATCH v3 00/15] TDX MMU refactors', 2026-05-28, on kvm-x86-next-2026.05.26)",
    buggy=False,
    freeze_children=freeze_removed_children,
    free_removed_sp=call_rcu_free_sp,
)

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    FIXED,
    replace(
        FIXED, name="fixed-v6.16",
        story="The v6.16 TDX protocol: four pfn-based hooks; mirror SPTEs frozen on the map "
              "side (KVM_BUG_ON for an atomic zap; a failed freeze does not refresh the "
              "iterator's snapshot), removed only with mmu_lock held for write, mirror "
              "tables never removed while the TD runs (KVM_BUG_ON(shared) in "
              "handle_removed_pt); the initial image premapped (nr_premapped) and ADDed "
              "outside mmu_lock.",
        source="tdp_mmu.c and tdx.c of v6.16 (the TDX merge, 'KVM TDX changes for 6.16')",
        set_mirror_spte_atomic=mirror.set_mirror_spte_frozen_v616,
        set_external_spte=mirror.tdx_sept_set_private_spte_v616,
        map_initial_page=mirror.map_initial_page_premap,
        mirror_shared_teardown=False, requires_tdx=True,
    ),
    replace(
        FIXED, name="mirror-zap-shared", requires_tdx=True, config="convert-huge.toml",
        story="A design proposal, not upstream: conversions and guest_memfd punch-holes zap "
              "the mirror, tables included, with mmu_lock held for read (inside their "
              "invalidation), the entry frozen until the S-EPT has dropped it (BLOCK unwound "
              "on BUSY; TRACK, REMOVE and SEPT.REMOVE retried until they succeed, vCPUs still "
              "running).  Memslot moves still zap the mirror under the write lock "
              "(kvm_mmu_zap_memslot, as upstream).  Valid in the model; compare it with "
              "'bench --compare fixed,mirror-zap-shared'.  (KVM zapping private pages on its "
              "own, outside such flows, kills the TD: the guest finds a page it accepted "
              "PENDING.)",
        source="the model's reading of the 2026 rework before the code was read (kept as a "
               "proposal for comparison)",
        set_mirror_spte_atomic=mirror.set_mirror_spte_frozen_zap_shared,
        set_external_spte=mirror.proposal_set_external_spte,
        free_external_spt=mirror.proposal_free_external_spt,
        mirror_shared_zaps=True, mirror_shared_teardown=True,
    ),
    replace(
        FIXED, name="zap-without-freeze", buggy=True,
        story="handle_removed_pt in shared mode does not freeze non-present children, so a "
              "fault that walked into the table before it was unlinked links a table or "
              "maps a page into the dead table.",
        source="handle_removed_pt's freeze of every child (REMOVED_SPTE, now FROZEN_SPTE), "
               "from the 2021 parallel page fault series ending in a2855afc7ee8 (KVM: x86/mmu: "
               "Allow parallel page faults for the TDP MMU)",
        freeze_children=freeze_present_children_only,
        expects=(REMOVED_TABLE, SEPT_ERR, LOST_DIRTY, STALE_TLB),
        expects_by_vm=(("default", (REMOVED_TABLE, LOST_DIRTY, STALE_TLB)),),
    ),
    replace(
        FIXED, name="free-without-grace-period", buggy=True,
        story="Removed page-table pages are freed at once instead of via call_rcu, so a "
              "walker holding only the read lock and RCU reads a freed or reused page.",
        source="KVM: x86/mmu: Protect TDP MMU page table memory with RCU (Ben Gardon, 2021, "
               "same series)",
        free_removed_sp=free_sp_without_grace_period,
        expects=(UAF, STALE_TLB), expects_by_vm=(("default", (UAF, STALE_TLB)),),
    ),
    replace(
        FIXED, name="root-put-resurrect", config="roots.toml", buggy=False,
        story="Last put of a valid root: mark it invalid with xchg, set the count back to 1, "
              "zap with yielding, put again (Paolo's version; no gifted reference).  Settled "
              "by the tool: safe here (the 0 -> 1 is counted as a warning, no harm follows: "
              "a get at 0 fails, so nobody else holds the root being resurrected).",
        source="Paolo Bonzini / Sean Christopherson, Mar 2022, '[PATCH v3 20/28] KVM: "
               "x86/mmu: Allow yielding when zapping GFNs for defunct TDP MMU root'",
        put_root=tdp_mmu.put_root_resurrect, root_gifted_ref=False,
    ),
    replace(
        FIXED, name="root-put-dec-not-one", config="roots.toml", buggy=True,
        story="Sean's put: refcount_dec_not_one, xchg, zap with yielding, dec_not_one, then "
              "force the count to 0; a reference taken in between is wiped out.",
        source="Sean Christopherson's refcount_dec_not_one proposal in the same thread (Mar "
               "2022, '[PATCH v3 20/28] KVM: x86/mmu: Allow yielding when zapping GFNs for "
               "defunct TDP MMU root')",
        put_root=tdp_mmu.put_root_dec_not_one, root_gifted_ref=False,
        expects=ROOT_UAF,
    ),
    replace(
        FIXED, name="root-put-force-zero", config="roots.toml", buggy=True,
        story="The final put with the last reference found by refcount_dec_not_one and the "
              "count then forced to 0: a concurrent get under the read lock is lost.",
        source="the same Mar 2022 thread: \"KVM should never force a refcount to '0'\"",
        put_root=roots.put_root_force_zero,
        expects=ROOT_UAF,
    ),
    replace(
        FIXED, name="root-double-put", config="roots.toml", buggy=True,
        story="The invalidated-roots zap puts the TDP MMU's reference of every invalid root "
              "it visits, so a root zapped earlier loses it twice and is freed while in use.",
        source="defunct-root refcounting in the 2022 TDP MMU overhaul "
               "(efd995dae5eb, 22b94c4b63eb, edbdb43fc96b)",
        zap_invalidated_roots=tdp_mmu.zap_invalidated_roots_double_put,
        expects=ROOT_UAF,
    ),
    replace(
        FIXED, name="unsync-without-lock", config="unsync.toml", buggy=True,
        story="TDP MMU faults (mmu_lock held for read) mark shadow pages unsync with no lock: "
              "non-atomic bitmap and unsync_children updates race; the count underflows or "
              "reaches 0 while a child is unsync.",
        source="commit ce25681d59ff (KVM: x86/mmu: Protect marking SPs unsync when "
               "using TDP MMU with spinlock)",
        try_to_unsync=unsync.unsync_without_lock,
        expects=("unsync_children underflow", "missed sync",
                 "unsync_children != popcount(bitmap)", "unsync page unreachable",
                 "kvm->stat.mmu_unsync accounting"),
    ),
    replace(
        FIXED, name="unsync-lock-no-recheck", config="unsync.toml", buggy=True,
        story="Takes mmu_unsync_pages_lock but does not test sp->unsync again under it: a page "
              "two faults saw as synced is unsynced twice (kvm->stat.mmu_unsync drifts).",
        source="the double-checked pattern of ce25681d59ff (KVM: x86/mmu: Protect marking SPs "
               "unsync when using TDP MMU with spinlock)",
        try_to_unsync=unsync.unsync_lock_no_recheck,
        expects=("kvm->stat.mmu_unsync accounting",),
    ),
    replace(
        FIXED, name="unsync-write-protect", config="unsync.toml",
        story="Alternative #1 of ce25681d59ff: can_unsync = false, never unsync; writes to "
              "shadowed gfns are write-protected and emulated (valid; slower: see bench).",
        source="commit ce25681d59ff (KVM: x86/mmu: Protect marking SPs unsync when using TDP "
               "MMU with spinlock), 'Alternative #1' of its changelog",
        try_to_unsync=unsync.unsync_never,
    ),
    replace(
        FIXED, name="invalidate-end-after-unlock", buggy=True, config="invalidate.toml",
        story="kvm_mmu_invalidate_end runs after mmu_lock is dropped: a fault under the read "
              "lock sees in_progress == 0 with the old seq and maps the page just freed.",
        source="'KVM: gmem: protect kvm_mmu_invalidate_end()' (LKML, Aug 2023)",
        invalidate_end=notifier.end_after_unlock,
        expects=INVALIDATION_RACE,
    ),
    replace(
        FIXED, name="fault-skips-retry-check", buggy=True, config="invalidate.toml",
        story="The fault never calls mmu_invalidate_retry_gfn under mmu_lock, so a pfn looked "
              "up before an invalidation is mapped after the invalidation's zap.",
        source="mmu.c: is_page_fault_stale and mmu_invalidate_retry_gfn (kvm_host.h)",
        fault_retry_check=notifier.no_retry_check,
        expects=INVALIDATION_RACE,
    ),
    replace(
        FIXED, name="seq-snapshot-after-pfn", buggy=True, config="invalidate.toml",
        story="The fault snapshots mmu_invalidate_seq after looking up the pfn: an "
              "invalidation that completes in between goes unnoticed.",
        source="mmu.c kvm_mmu_faultin_pfn: the mmu_invalidate_seq snapshot (smp_rmb) before "
               "the pfn and attribute reads",
        faultin=notifier.faultin_pfn_then_seq,
        expects=INVALIDATION_RACE,
    ),
    replace(
        FIXED, name="conversion-zaps-direct-only", buggy=True, config="invalidate.toml",
        requires_tdx=True,
        story="A private -> shared conversion zaps only the direct root: the mirror and the "
              "S-EPT keep mapping a gfn that is now shared.",
        source="mmu.c kvm_arch_pre_set_memory_attributes and the KVM_FILTER_PRIVATE root filter",
        pre_set_memory_attributes=notifier.pre_set_zap_direct_only,
        expects=(STALE, WRONG_ROOT, SEPT_ERR, DIVERGE),
    ),
    replace(
        FIXED, name="hugepage-attr-change-exact-range", buggy=True, requires_tdx=True,
        config="huge.toml",
        story="A conversion adds only its exact range to the invalidation: a fault on another "
              "gfn of the same 2M region passes mmu_invalidate_retry_gfn, reads lpage_info's "
              "not-yet-updated 'not mixed' and maps the whole region, gfns whose attributes "
              "are changing included, with a 2M leaf in the direct root.",
        source="9129633d568e (KVM: x86/mmu: Prevent installing hugepages when "
               "mem attributes are changing, 2025)",
        pre_set_range_add=notifier.range_add_exact,
        expects=("huge page during attribute change",),
    ),
    replace(
        FIXED, name="child-removal-on-pfn-change", buggy=True, config="huge-alias.toml",
        story="handle_changed_spte tears a table down only if the PFN changed: a 2M leaf "
              "that replaces a table at the table's own frame (guest memory over top of the "
              "SP, made possible by pool.alias_tables) leaks the table and its leaves.",
        source="c8e5a0d0e9bc (KVM: x86/mmu: Check for !leaf=>leaf, not PFN "
               "change, in TDP MMU SP removal, 2022)",
        changed_spte_removes_pt=child_pt_removed_if_pfn_changed,
        expects=("leaked page-table page", "tdp_mmu_pages accounting"),
    ),
    replace(
        FIXED, name="tlb-no-flush-before-yield", buggy=True, config="tlb.toml",
        story="A leaf zap over several roots hands no pending flush to the next root: a "
              "yield there drops mmu_lock with the earlier roots' zaps unflushed; an "
              "mmu_notifier finds the gfns non-present, skips the flush and frees the page "
              "a vCPU's TLB still maps.",
        source="commit a835429cda91 (KVM: x86/mmu: Ensure TLBs are flushed "
               "when yielding during GFN range zap, 2021)",
        zap_leafs_roots=tdp_mmu.zap_leafs_flush_per_root,
        expects=("stale-tlb-entry-after-unlock", STALE_TLB),
    ),
    replace(
        FIXED, name="tlb-flush-after-rcu-unlock", buggy=True, config="tlb.toml",
        story="A zap that removes page tables releases RCU before its TLB flush: the "
              "tables' grace period ends and their RCU callback frees them while a vCPU's "
              "paging-structure cache still points at them.",
        source="commit fcb93eb6d09d (kvm: x86/mmu: Flush TLB before "
               "zap_gfn_range releases RCU, 2022)",
        zap_release_rcu=tdp_mmu.rcu_unlock_then_flush,
        expects=(STALE_TLB,),
    ),
    replace(
        FIXED, name="lost-dirty-bit", buggy=True, config="dirty.toml",
        story="The exclusive (write-lock) overwrite of a present leaf is a plain store "
              "against the iterator's snapshot: a D bit the guest's walker set in between "
              "is overwritten unseen and the page is released without being marked dirty.",
        source="commit ba3a6120a4e7 (KVM: x86/mmu: Use atomic XCHG to write "
               "TDP MMU SPTEs with volatile bits, 2022)",
        write_spte=tdp_mmu.kvm_tdp_mmu_write_spte_plain,
        expects=(LOST_DIRTY,),
    ),
    replace(
        FIXED, name="mirror-no-freeze", buggy=True, requires_tdx=True, config="tdx-boot.toml",
        story="Mirror SPTEs are published with cmpxchg and the SEAMCALL issued afterwards: a "
              "fault walks into a mirror table the S-EPT does not have yet and AUGs under a "
              "missing parent, or two faults' SEAMCALLs land in the other order.",
        source="Sean Christopherson's review of the TDX MMU patches, Jan 2023 (the "
               "vCPU0/vCPU1 mirror[x]/sept[x] diagram that led to freezing mirror SPTEs)",
        set_mirror_spte_atomic=mirror.set_mirror_spte_then_seamcall,
        expects=(SEPT_ERR, DIVERGE),
    ),
    replace(
        FIXED, name="mirror-zap-no-freeze", buggy=False, requires_tdx=True,
        config="convert-huge.toml",
        story="Only under the mirror-zap-shared proposal: maps freeze, but a read-lock zap "
              "of the mirror publishes non-present before its BLOCK/TRACK/REMOVE.  Settled by "
              "the tool: safe there.  Those zaps run inside an invalidation (a conversion or "
              "a punch-hole), so every fault on the range retries until it ends and none can "
              "AUG over the entry meanwhile; the freeze is not what protects it.",
        source="the mirror-zap-shared proposal's zap side without the freeze",
        set_mirror_spte_atomic=mirror.set_mirror_spte_map_frozen_zap_published,
        set_external_spte=mirror.proposal_set_external_spte,
        free_external_spt=mirror.proposal_free_external_spt,
        mirror_shared_zaps=True, mirror_shared_teardown=True,
    ),
    replace(
        FIXED, name="sept-spinlock-only", buggy=True, requires_tdx=True, config="tdx-boot.toml",
        story="SEAMCALLs serialised by a spinlock but mirror SPTEs not frozen: the lock "
              "orders SEAMCALLs, not the mirror updates around them, so the race stays.",
        source="Sean Christopherson, Jan 2023 review of the TDX MMU patches: \"That doesn't "
               "address the race above either\"",
        set_mirror_spte_atomic=mirror.set_mirror_spte_then_seamcall,
        busy_policy="serialize",
        expects=(SEPT_ERR, DIVERGE),
    ),
    replace(
        FIXED, name="private-selector-by-fault", buggy=True, requires_tdx=True,
        story="External hooks chosen by the fault's is_private instead of the mirror role: "
              "zaps and teardown have no fault, skip the S-EPT and leave it mapped.",
        source="Rick Edgecombe / Kai Huang, May 2024 review of 'KVM: x86/mmu: Support GFN "
               "direct bits' and the mirror-root series (is_private vs role.is_mirror)",
        is_mirror_sptep=mirror.is_mirror_sptep_by_fault,
        is_mirror_sp=mirror.is_mirror_sp_by_fault,
        expects=(SEPT_ERR, DIVERGE, "S-EPT table without live mirror table"),
    ),
    replace(
        FIXED, name="mirror-no-restore", buggy=True, requires_tdx=True, config="tdx-busy.toml",
        story="On TDX_OPERAND_BUSY the map side publishes the new mirror value anyway "
              "instead of restoring the old one: the mirror maps what the S-EPT does not.",
        source="__tdp_mmu_set_spte_atomic / set_external_spte_present: restore on failure",
        set_mirror_spte_atomic=mirror.set_mirror_spte_frozen_no_restore,
        expects=(SEPT_ERR, DIVERGE, UAF),
    ),
    replace(
        FIXED, name="sept-zap-busy-unhandled", buggy=True, requires_tdx=True,
        config="tdx-busy.toml",
        story="Removal of a private page with mmu_lock held for write tries RANGE.BLOCK once "
              "and hands TDX_OPERAND_BUSY to a caller that cannot fail, and spins on TRACK "
              "and PAGE.REMOVE: a vCPU's zero-step TDH.VP.ENTER or TDCALL holding the "
              "module's lock makes the no-fail path fail.",
        source="4b2abc49712b \"KVM: TDX: Kick off vCPUs when SEAMCALL is busy during TD page "
               "removal\" (Yan Zhao, Jan 2025; merged for v6.16): the code before it",
        tdh_do_no_vcpus=mirror.tdh_spin_without_kick,
        expects=(SEPT_ERR,),
    ),
    replace(
        FIXED, name="sept-zap-no-wait-for-sept-zap", buggy=True, requires_tdx=True,
        config="tdx-busy.toml",
        story="Half of the fix: on BUSY the removal kicks every vCPU out and retries once, "
              "but tdx_vcpu_run does not wait for the retry (wait_for_sept_zap ignored), so a "
              "vCPU re-enters at once, takes the module's lock again and the retry, which "
              "must succeed, is BUSY too.",
        source="4b2abc49712b \"KVM: TDX: Kick off vCPUs when SEAMCALL is busy during TD page "
               "removal\": its wait_for_sept_zap check in tdx_vcpu_run",
        td_honours_wait_for_sept_zap=False,
        expects=(SEPT_ERR,),
    ),
    replace(
        FIXED, name="prefault-gpa-without-direct-bits", buggy=True, requires_tdx=True,
        config="tdx-busy.toml",
        story="KVM_PRE_FAULT_MEMORY passes the gpa of a shared gfn without the TD's shared "
              "bit, so tdp_mmu_get_root_for_fault picks the mirror root: a shared page is "
              "mapped in the mirror and AUGed into the S-EPT.",
        source="aa2024c01a9a \"KVM: x86/mmu: Embed direct bits into gpa for "
               "KVM_PRE_FAULT_MEMORY\" (Paolo Bonzini, Jun 2025, 6.16-rc)",
        prefault_gpa_direct=td.prefault_gpa_without_direct_bits,
        expects=(WRONG_ROOT,),
    ),
    replace(
        FIXED, name="local-retry-ignores-invalid-memslot", buggy=True, requires_tdx=True,
        config="tdx-busy.toml",
        story="tdx_handle_ept_violation keeps retrying a private fault locally while the "
              "gfn's memslot is being moved: the vCPU never leaves kvm->srcu's read side, and "
              "the move's synchronize_srcu waits for it for ever.",
        source="2bc2694fe20b \"KVM: TDX: Do not retry locally when the retry is caused by "
               "invalid memslot\" (Sean Christopherson / Yan Zhao, 6.18)",
        ept_violation_local_retry=td.local_retry_ignoring_memslots,
        expects=("livelock",),
    ),
    replace(
        FIXED, name="prefault-retries-invalid-memslot", buggy=True, requires_tdx=True,
        config="tdx-busy.toml",
        story="KVM_PRE_FAULT_MEMORY's fault on a memslot being moved says RET_PF_RETRY, and "
              "kvm_tdp_map_page retries it holding kvm->srcu: the move's synchronize_srcu "
              "waits for it for ever.",
        source="3ccbf6f47098 \"KVM: x86/mmu: Return -EAGAIN if userspace deletes/moves "
               "memslot during prefault\" (Sean Christopherson, 6.18)",
        faultin_invalid_slot=tdp_mmu.faultin_invalid_slot_retry,
        expects=("livelock",),
    ),
    replace(
        FIXED, name="init-mem-region-slots-lock-only", buggy=True, requires_tdx=True,
        config="tdx-busy.toml",
        story="KVM_TDX_INIT_MEM_REGION holds only slots_lock, so userspace's ioctls on the "
              "other vCPUs run meanwhile: their TDH.VP.RD takes the TDR shared while PAGE.ADD "
              "or MR.EXTEND holds it exclusively, and the BUSY is a KVM_BUG_ON.",
        source="15945e9ec195 \"KVM: TDX: Guard VM state transitions with \"all\" the locks\" "
               "(Sean Christopherson, Oct 2025, 6.19)",
        tdx_vm_state_guard=td.tdx_vm_state_guard_slots_only,
        expects=(SEPT_ERR,),
    ),
]}


class UnknownVariant(KeyError):
    pass


class VariantLoadError(ValueError):
    pass


ENTRY_POINT_GROUP = "tdp_stress.variants"
_entry_points_loaded = False
_variant_files: dict[str, list[str]] = {}  # resolved path -> the names it registered


def register(*variants: Variant) -> None:
    """Add user variants (from a variant file or an installed package)."""
    for v in variants:
        if not isinstance(v, Variant):
            raise VariantLoadError(f"not a Variant: {v!r}")
        if v.name in VARIANTS and VARIANTS[v.name] is not v:
            raise VariantLoadError(f"variant {v.name!r} is already defined")
        VARIANTS[v.name] = v


def load_variant_file(path: str) -> list[str]:
    """Run a Python file that defines ``VARIANTS = [Variant, ...]`` (usually built
    with ``dataclasses.replace(FIXED, ...)``) and register them.  Returns their
    names.  Workers are forked after this, so they inherit the registry."""
    p = Path(path)
    if not p.is_file():
        raise VariantLoadError(f"{path}: no such variant file")
    key = str(p.resolve())
    if key in _variant_files:  # each config that names it validates it: load once
        return _variant_files[key]
    spec = importlib.util.spec_from_file_location(f"tdp_stress_user_variants_{p.stem}", p)
    if spec is None or spec.loader is None:
        raise VariantLoadError(f"{path}: cannot be loaded as Python")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the user's code: report it in one line
        raise VariantLoadError(f"{path}: {type(e).__name__}: {e}") from None
    found = getattr(mod, "VARIANTS", None)
    if not isinstance(found, list | tuple) or not found:
        raise VariantLoadError(f"{path}: defines no VARIANTS list")
    register(*found)
    _variant_files[key] = [v.name for v in found]
    return _variant_files[key]


def load_entry_point_variants() -> None:
    """Variants of installed packages (entry-point group ``tdp_stress.variants``):
    each entry point names a list of Variant objects."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register(*ep.load())
        except Exception as e:
            raise VariantLoadError(f"entry point {ep.name} ({ep.value}): {e}") from None


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        load_entry_point_variants()
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownVariant(
            f"unknown variant {name!r}; known: {', '.join(sorted(VARIANTS))}") from None
