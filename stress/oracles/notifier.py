"""Invalidations: what a completed invalidation leaves behind."""

from __future__ import annotations

from collections.abc import Callable

from stress.arena import SpMeta
from stress.model.host import host_folio_intact, host_page_gen, pfn_gfn_gen
from stress.model.kvm import Kvm, kvm_mem_is_private
from stress.model.mmu_page import ROLE_MIRROR
from stress.model.roots import KVM_ALL_ROOTS, for_each_tdp_mmu_root_yield_safe
from stress.model.spte import describe, is_last_spte, is_shadow_present_pte, spte_to_pfn
from stress.model.tdp_iter import TdpIter
from stress.oracles.base import oracle
from stress.oracles.provenance import provenance


def _for_each_present_leaf(kvm: Kvm, start: int, end: int,
                           check: Callable[[bool, TdpIter, int], None]) -> None:
    """``check(mirror, it, spte)`` for every present leaf of [start, end) in
    every root, each root's walk inside an RCU read-side section."""
    for root in for_each_tdp_mmu_root_yield_safe(kvm, KVM_ALL_ROOTS):
        mirror = bool(kvm.w.load(kvm.layout.sp(root, SpMeta.ROLE)) & ROLE_MIRROR)
        kvm.rcu.rcu_read_lock()
        try:
            it = TdpIter(kvm, root, start)
            while it.in_range(end):
                v = it.old_spte
                if is_shadow_present_pte(v) and is_last_spte(v, it.level):
                    check(mirror, it, v)
                it.next()
        finally:
            kvm.rcu.rcu_read_unlock()


@oracle("stale mapping after invalidate_end",
        invariant="after an invalidation of a range completed, no leaf in any root maps a host "
                  "page it released: a fault that raced with it must have retried",
        hook="invalidate_range_start",
        when="the next invalidation of the range, with mmu_lock held for write",
        cost="a walk of the range in every root per invalidation")
def range_maps_current_pages(kvm: Kvm, start: int, end: int) -> None:
    """With mmu_lock held for write: every leaf mapping a gfn of the range
    maps the page that backs it now.  An older generation is a page already
    freed by a completed invalidation: a stale mapping.  A 2M leaf maps one
    folio: every gfn of its region must still be backed by it."""
    kvm.lockdep_assert_held_write()

    def check(mirror: bool, it: TdpIter, v: int) -> None:
        gfn, gen, gmem = pfn_gfn_gen(kvm, spte_to_pfn(v))
        now = host_page_gen(kvm, it.gfn, gmem)
        if gfn == it.gfn and it.level > 1 and not host_folio_intact(kvm, gfn):
            now = -1  # part of the folio was replaced under the 2M leaf
        if gfn == it.gfn and gen != now:
            kvm.bug("stale mapping after invalidate_end",
                    "a leaf maps a host page that a completed invalidation released",
                    gfn=it.gfn, entry=describe(v), mapped_gen=gen, current_gen=now,
                    mirror=mirror, **provenance(kvm, it.sptep, it.level))

    _for_each_present_leaf(kvm, start, end, check)


@oracle("gfn mapped in the wrong root",
        invariant="once a memory attribute change completes, no root maps a gfn of the range "
                  "that its attribute no longer routes to it: a private gfn only in a mirror "
                  "root, a shared one only in a direct root",
        hook="memory_attributes_set",
        when="KVM_SET_MEMORY_ATTRIBUTES's post step, with mmu_lock held for write",
        cost="a walk of the range in every root per conversion")
def conversion_left_no_mapping_of_the_old_kind(kvm: Kvm, start: int, end: int) -> None:
    """The pre-set zap removed the mappings of the root type that loses the
    range; a fault since then saw the invalidation and retried, or saw the new
    attribute.  So with the post step's write lock, the type that lost each gfn
    maps none of it (a TD; without TDX every gfn is shared)."""
    if not kvm.geometry.tdx:
        return
    kvm.lockdep_assert_held_write()

    def check(mirror: bool, it: TdpIter, v: int) -> None:
        if kvm_mem_is_private(kvm, it.gfn) != mirror:
            kvm.bug("gfn mapped in the wrong root",
                    "a memory attribute change completed with a leaf left in the root type "
                    "that no longer maps the gfn: a "
                    + ("mirror root maps a gfn now shared" if mirror else
                       "direct root maps a gfn now private"),
                    gfn=it.gfn, entry=describe(v), mirror=mirror, range=(start, end),
                    **provenance(kvm, it.sptep, it.level))

    _for_each_present_leaf(kvm, start, end, check)
