"""Page faults: what a leaf may be installed over, and where.

Checked when tdp_mmu_map_handle_target_level's cmpxchg has installed a leaf,
with mmu_lock still held for read: attributes and invalidations change only
under the write lock, so what the fault decided on is still what holds.
"""

from __future__ import annotations

from typing import Any

from stress.model.host import hugepage_disallowed
from stress.model.kvm import Kvm, kvm_mem_is_private
from stress.model.mmu_page import SP_LINKED, sp_state
from stress.model.notifier import attr_change_in_progress
from stress.model.spte import (
    KVM_PAGES_PER_HPAGE,
    PG_LEVEL_4K,
    describe,
    is_shadow_present_pte,
    spte_to_child_pt,
)
from stress.oracles.base import oracle


@oracle("gfn mapped in the wrong root",
        invariant="on a TD a leaf goes into the root type that owns the gfn's memory "
                  "attribute: private gfns into the mirror root, shared ones into the direct "
                  "root",
        hook="leaf_installed", when="after the fault's leaf cmpxchg, read lock held",
        cost="one load per installed leaf")
def leaf_in_owning_root(kvm: Kvm, it: Any, fault: Any, old_spte: int,
                       new_spte: int) -> None:
    if not kvm.geometry.tdx:
        return
    private = kvm_mem_is_private(kvm, fault.gfn)
    if private != it.mirror:
        kvm.bug("gfn mapped in the wrong root",
                f"a fault installs a leaf for a {'private' if private else 'shared'} gfn in "
                f"the {'mirror' if it.mirror else 'direct'} root",
                gfn=fault.gfn, mirror=it.mirror, fault_private=fault.is_private,
                addr_direct=fault.addr_direct)


@oracle("leaked page-table page",
        invariant="a table whose parent entry is replaced is unlinked and torn down "
                  "(handle_removed_pt): still linked, it is leaked with everything it maps",
        hook="leaf_installed", when="after a huge leaf replaced a present entry",
        cost="one load per huge leaf installed over a table")
def replaced_table_removed(kvm: Kvm, it: Any, fault: Any, old_spte: int,
                       new_spte: int) -> None:
    if it.level == PG_LEVEL_4K or not is_shadow_present_pte(old_spte):
        return
    child = spte_to_child_pt(old_spte, it.level)
    if child is not None and sp_state(kvm, child) == SP_LINKED:
        kvm.bug("leaked page-table page",
                "a table replaced by a huge leaf was not torn down (handle_removed_pt skipped)",
                gfn=it.gfn, level=it.level, table=child, old=describe(old_spte))


@oracle("huge page during attribute change",
        invariant="no huge leaf is installed while the memory attributes of any gfn it "
                  "covers are being changed (between the conversion's pre and post steps)",
        hook="leaf_installed", when="after a huge leaf's cmpxchg, read lock held",
        cost="one scan of the workers' attribute-change slots per huge leaf")
def no_huge_leaf_over_changing_attrs(kvm: Kvm, it: Any, fault: Any, old_spte: int,
                       new_spte: int) -> None:
    if it.level == PG_LEVEL_4K:
        return
    hit = attr_change_in_progress(kvm, it.gfn, it.gfn + KVM_PAGES_PER_HPAGE(it.level))
    if hit is not None:
        worker, start, end = hit
        kvm.bug("huge page during attribute change",
                "a huge leaf was installed over gfns whose memory attributes are being changed",
                gfn=it.gfn, level=it.level, converting_worker=worker,
                converting=f"[{start:#x}, {end:#x})")


@oracle("huge leaf where lpage_info disallows it",
        invariant="a huge leaf is installed only where lpage_info allows that level: no "
                  "disallow count (dirty logging, write tracking, NX splits) and attributes "
                  "not mixed over the region",
        hook="leaf_installed", when="after a huge leaf's cmpxchg, read lock held (lpage_info "
                                   "changes only under the write lock)",
        cost="one load per huge leaf")
def huge_leaf_allowed(kvm: Kvm, it: Any, fault: Any, old_spte: int, new_spte: int) -> None:
    if it.level == PG_LEVEL_4K:
        return
    gfn = fault.gfn & ~(KVM_PAGES_PER_HPAGE(it.level) - 1)
    if hugepage_disallowed(kvm, gfn):
        kvm.bug("huge leaf where lpage_info disallows it",
                f"a fault installed a level-{it.level} leaf over gfns whose lpage_info "
                "disallows huge pages", gfn=gfn, level=it.level, entry=describe(new_spte))


@oracle("executable huge page",
        invariant="an instruction fetch never maps a huge page: with the iTLB multihit "
                  "workaround (nx_huge_pages) a fetch maps 4K, and huge leaves stay "
                  "non-executable",
        hook="leaf_installed", when="after a fault's leaf cmpxchg, read lock held",
        cost="one comparison per installed leaf")
def fetch_maps_4k(kvm: Kvm, it: Any, fault: Any, old_spte: int, new_spte: int) -> None:
    if fault.exec and it.level > PG_LEVEL_4K:
        kvm.bug("executable huge page",
                f"an instruction fetch at gfn {fault.gfn:#x} installed a level-{it.level} leaf "
                "(the iTLB multihit workaround maps fetches with 4K pages)",
                gfn=fault.gfn, level=it.level, entry=describe(new_spte))
