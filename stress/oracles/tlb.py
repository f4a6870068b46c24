"""TLB flushes and dirty bits: what a vCPU's caches may still hold.

A vCPU may keep using a translation, or a page-table page it walked, until
it is told to flush.  So: when a page-table page is freed, and when a host
page is released, no vCPU may still cache it unless that vCPU has a flush (or
obsolete-root) request pending, which it must service before it next uses
its TLB; when a zap drops mmu_lock to yield, no vCPU may still cache a leaf it
zapped since its last flush (a835429cda91's invariant); and every D bit set
in an SPTE must reach the page (kvm_set_pfn_dirty) before the page goes.
"""

from __future__ import annotations

from stress.arena import TLB_ENTRIES, TLB_MAX_LEVELS
from stress.model.host import pfn_gfn_gen
from stress.model.kvm import Kvm
from stress.model.tlb import (
    H_REQUESTS,
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    KVM_REQ_TLB_FLUSH,
    dirty_index,
)
from stress.oracles.base import oracle

_LOW = (1 << 32) - 1  # the dirty word's halves (see stress.model.tlb)


def _flush_pending(kvm: Kvm, v: int) -> bool:
    req = kvm.w.load(kvm.layout.tlb_hdr(v, H_REQUESTS))
    return bool(req & (KVM_REQ_TLB_FLUSH | KVM_REQ_MMU_FREE_OBSOLETE_ROOTS))


@oracle("stale-tlb-entry-after-free",
        invariant="a page-table page is freed only when no vCPU's paging-structure cache "
                  "holds it, or that vCPU must flush before it next runs the guest",
        hook="sp_free", when="the table's RCU callback, before the page is freed",
        cost="one native count over every vCPU's TLB per freed table")
def check_no_stale_table(kvm: Kvm, page: int) -> None:
    """At a page-table page's RCU callback: no vCPU's paging-structure cache may
    still hold it (unless that vCPU must flush before it next runs the guest)."""
    w, lay = kvm.w, kvm.layout
    per = TLB_ENTRIES * TLB_MAX_LEVELS
    if not w.count_equal(lay.tlb_pts, lay.n_slots * per, page + 1):
        return
    for v in range(lay.n_slots):
        if _flush_pending(kvm, v):
            continue
        for k, val in w.scan_ne(lay.tlb_pts + v * per, per, 0):
            if val == page + 1:
                entry = k // TLB_MAX_LEVELS
                tag = w.load(lay.tlb_tags + v * TLB_ENTRIES + entry)
                kvm.bug("stale-tlb-entry-after-free",
                        "a page-table page was freed while a vCPU's paging-structure cache "
                        "still held it, with no TLB flush pending for that vCPU",
                        table=page, vcpu=v, gfn=tag - 1 if tag else None,
                        level_index=k % TLB_MAX_LEVELS)


@oracle("stale-tlb-entry-after-free",
        invariant="a host page is released only when no vCPU's TLB translates to it, or "
                  "that vCPU must flush before it next runs the guest",
        hook="host_page_release", when="the primary MMU's release of the page",
        cost="one native count over every vCPU's TLB per released page")
def check_no_stale_pfn(kvm: Kvm, gfn: int, pfn: int) -> None:
    """When host page ``pfn`` (backing ``gfn``) is released: no vCPU's TLB may
    still translate to it (unless that vCPU has a flush pending)."""
    w, lay = kvm.w, kvm.layout
    if not w.count_equal(lay.tlb_pfns, lay.n_slots * TLB_ENTRIES, pfn):
        return
    for v in range(lay.n_slots):
        if _flush_pending(kvm, v):
            continue
        if w.count_equal(lay.tlb_pfns + v * TLB_ENTRIES, TLB_ENTRIES, pfn):
            kvm.bug("stale-tlb-entry-after-free",
                    "a host page was released while a vCPU's TLB still translated to it, "
                    "with no TLB flush pending for that vCPU",
                    gfn=gfn, pfn=f"{pfn:#x}", vcpu=v)


@oracle("stale-tlb-entry-after-unlock",
        invariant="a task that zapped leaves flushes remote TLBs before it drops mmu_lock: "
                  "once the lock is gone another task may find the gfn non-present, skip the "
                  "flush and free the page",
        hook="mmu_lock_yield", when="a yielding walk, just before it drops mmu_lock",
        cost="one native count per unflushed leaf of this task")
def check_flushed_before_unlock(kvm: Kvm) -> None:
    """Where mmu_lock is about to be dropped, in the middle of a zap or at its
    end: no vCPU may still cache (and be free to use) a leaf this task zapped
    since its last flush, because once the lock is gone another task may find
    the gfn non-present, skip the flush and free the page."""
    w, lay = kvm.w, kvm.layout
    for root, pfn in kvm.tlb_unflushed:  # empty after a flush: nothing to check
        if not w.count_equal(lay.tlb_pfns, lay.n_slots * TLB_ENTRIES, pfn):
            continue
        for v in range(lay.n_slots):
            if _flush_pending(kvm, v):
                continue
            for e, val in w.scan_ne(lay.tlb_pfns + v * TLB_ENTRIES, TLB_ENTRIES, 0):
                k = (v * TLB_ENTRIES + e) * TLB_MAX_LEVELS
                if val == pfn and w.load(lay.tlb_pts + k) == root + 1:
                    tag = w.load(lay.tlb_tags + v * TLB_ENTRIES + e)
                    kvm.tlb_unflushed.clear()  # reported once, not again at the next unlock
                    kvm.bug("stale-tlb-entry-after-unlock",
                            "mmu_lock was dropped with a TLB flush pending for a leaf this "
                            "task zapped, while a vCPU's TLB still maps it",
                            gfn=tag - 1 if tag else None, pfn=f"{pfn:#x}", root=root, vcpu=v)




@oracle("stale-tlb-entry-after-unlock",
        invariant="(the same, at every release of mmu_lock, not only a yield's)",
        hook="mmu_lock_release", when="read_unlock or write_unlock, just before the release",
        cost="nothing when this task's zaps were flushed (the usual case)")
def check_flushed_at_release(kvm: Kvm) -> None:
    if kvm.tlb_unflushed:
        check_flushed_before_unlock(kvm)


@oracle("lost-dirty-bit",
        invariant="every D bit set in an SPTE mapping a page is seen (kvm_set_pfn_dirty) "
                  "before the page is released",
        hook="host_page_release", when="the primary MMU's release of the page",
        cost="one load per released page")
def check_dirty_propagated(kvm: Kvm, gfn: int, pfn: int) -> None:
    """At a host page's release (no leaf maps it): every D bit set was seen.
    The D bits counted are the direct root's, over the VMM's pages (a mirror
    leaf's are the TDX module's business): a guest_memfd page has none."""
    if pfn_gfn_gen(kvm, pfn)[2]:
        return
    v = kvm.w.load(dirty_index(kvm, gfn))
    set_, seen = v & _LOW, (v >> 32) & _LOW
    if set_ > seen:
        kvm.bug("lost-dirty-bit",
                "a host page is released but a D bit set in an SPTE mapping it was never "
                "propagated (kvm_set_pfn_dirty): the guest's write is lost",
                gfn=gfn, d_bits_set=set_, d_bits_seen=seen)
