"""Per-vCPU TLBs, the guest "hardware" walker, remote flushes and A/D bits.

Design note (a835429cda91, ba3a6120a4e7, fcb93eb6d09d).  The TDP MMU's zaps are only
half the story: the CPU caches translations (gfn -> pfn) and the page-table
pages it walked to find them (paging-structure caches), and keeps using them
until it is told to flush.  KVM may therefore free a guest page, or a
page-table page, only after every vCPU's TLB has been flushed of it.

* **TLB.**  Each vCPU (each worker slot) has ``TLB_ENTRIES`` direct-mapped
  entries in shared memory: a tag (gfn + 1), the host pfn, flags (writable,
  dirty as cached) and the table pages walked, root first.  Field-major (see
  ``Layout.tlb_*``), so one native ``count_equal`` tells whether any vCPU
  still holds a page.
* **Walker.**  :func:`guest_access` is the CPU executing a guest load or
  store, in guest mode, without ``mmu_lock`` or RCU: a TLB hit uses the
  cached pfn; a miss walks the vCPU's direct root, sets Accessed (and Dirty on
  a write) in the leaf with a cmpxchg against the value it read, as hardware
  does with a locked update, and fills the TLB.  A non-present, frozen or
  read-only entry is an EPT violation: the vCPU then faults.  On a TD only
  shared gfns are walked here: private ones are translated by the TDX
  module's S-EPT, whose TLB tracking (BLOCK/TRACK) is the module's.
* **Requests and kicks.**  ``kvm_make_all_cpus_request`` sets the request
  bit of every vCPU *first*, then kicks every vCPU in guest mode
  (IN_GUEST_MODE -> EXITING_GUEST_MODE) and waits until it has left: a vCPU
  leaves guest mode only between accesses, i.e. at an instruction boundary,
  as an IPI would find it.  A vCPU entering guest mode publishes
  IN_GUEST_MODE with an xchg (smp_mb) and then reads its requests, so either
  the flusher sees it in guest mode and waits, or it sees the request and
  services it (:func:`kvm_vcpu_flush_tlb_all`) before touching its TLB.
  Hence: when ``kvm_flush_remote_tlbs`` returns, no vCPU can use an entry
  cached before the call.  A vCPU loading a root flushes its TLB (KVM flushes
  on root load, ``kvm_mmu_load``); the model does it when the root is dropped,
  which the guest cannot tell apart.
* **Oracles.**  When a page-table page's RCU callback frees it, and when a
  host page is released, no vCPU may still cache it unless that vCPU has a
  flush (or obsolete-root) request pending, which it must service before it
  uses its TLB again: ``stale-tlb-entry-after-free``.  When a zap yields
  mmu_lock, no vCPU may still cache a leaf it zapped since its last flush
  (a835429cda91's invariant): ``stale-tlb-entry-after-unlock``.  A guest access that
  hits a TLB entry whose host page was released, or walks a freed table, is
  a use-after-free.
* **Dirty bits (9.5).**  One word per gfn counts D-bit 0 -> 1 transitions
  (low half: made by KVM when it installs a writable leaf, or by the walker)
  and D bits seen leaving an SPTE (high half: ``kvm_set_pfn_dirty`` when a
  leaf with D is zapped or overwritten, or the dirty log harvesting and
  clearing D).  When a host page is released every leaf mapping it is gone,
  so the halves must be equal; a smaller high half is a write the host will
  never write back: ``lost-dirty-bit``.
"""

from __future__ import annotations

import os

from stress.arena import TLB_ENTRIES, TLB_MAX_LEVELS
from stress.model import events
from stress.model.kvm import Kvm, kvm_gfn_direct_bits, slot_index
from stress.model.spte import (
    KVM_PAGES_PER_HPAGE,
    POISON_SPTE,
    PT_WRITABLE_MASK,
    SPTE_INDEX,
    is_frozen_spte,
    is_last_spte,
    is_shadow_present_pte,
    round_gfn_for_level,
    shadow_accessed_mask,
    shadow_dirty_mask,
    spte_to_child_pt,
    spte_to_pfn,
)

# vcpu->requests bits
KVM_REQ_TLB_FLUSH = 1 << 0
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = 1 << 1
# vcpu->mode
OUTSIDE_GUEST_MODE, IN_GUEST_MODE, EXITING_GUEST_MODE = 0, 1, 2
H_REQUESTS, H_MODE = 0, 1
# cached flags of a TLB entry
TLB_W, TLB_D = 1, 2

DIRTY_SET = 1
DIRTY_SEEN = 1 << 32
_LOW = (1 << 32) - 1


# ---------------------------------------------------------------------------
# requests, kicks and flushes
# ---------------------------------------------------------------------------

def kvm_make_all_cpus_request(kvm: Kvm, req: int) -> None:
    """Set ``req`` on every vCPU, then kick the ones in guest mode and wait
    until each has left it (KVM_REQUEST_WAIT).  Requests strictly before IPIs:
    a vCPU entering after its bit was set sees the request."""
    w, lay = kvm.w, kvm.layout
    n = lay.n_slots
    for v in range(n):
        w.fetch_or(lay.tlb_hdr(v, H_REQUESTS), req)
    for v in range(n):
        mode_i = lay.tlb_hdr(v, H_MODE)
        # kvm_request_needs_ipi: a vCPU not OUTSIDE_GUEST_MODE gets the IPI, and
        # KVM_REQUEST_WAIT waits for its ack, so one another task kicked already
        # (EXITING_GUEST_MODE) but still in the guest is waited for too
        if w.cmpxchg(mode_i, IN_GUEST_MODE, EXITING_GUEST_MODE) == OUTSIDE_GUEST_MODE:
            continue
        spins = 0
        while w.load(mode_i) == EXITING_GUEST_MODE:  # the IPI's round trip
            w.relax()  # a hand-over in a controlled run
            spins += 1
            if spins >= 8:  # the vCPU's process may be off-CPU: let it run
                w.check_abort("kick")
                os.sched_yield()
        kvm.stats["kicks"] += 1


def kvm_flush_remote_tlbs(kvm: Kvm) -> None:
    """kvm_flush_remote_tlbs: KVM_REQ_TLB_FLUSH to every vCPU, with the IPI's
    latency.  The _gfn and _range forms fall back to this one (EPT without
    Hyper-V's ranged flush)."""
    kvm_make_all_cpus_request(kvm, KVM_REQ_TLB_FLUSH)
    kvm.w.spin_ns(kvm.tlb_flush_ns)
    kvm.tlb_unflushed.clear()
    kvm.stats["tlb_flushes"] += 1


def kvm_vcpu_flush_tlb_all(kvm: Kvm) -> None:
    """INVEPT on this vCPU: empty its TLB and paging-structure caches.  Only
    while outside guest mode (nothing fills it meanwhile)."""
    w, lay, v = kvm.w, kvm.layout, kvm.me
    for base in (lay.tlb_tags, lay.tlb_pfns, lay.tlb_flags):
        w.fill(base + v * TLB_ENTRIES, TLB_ENTRIES, 0)
    w.fill(lay.tlb_pts + v * TLB_ENTRIES * TLB_MAX_LEVELS, TLB_ENTRIES * TLB_MAX_LEVELS, 0)


# ---------------------------------------------------------------------------
# the guest "hardware" walker
# ---------------------------------------------------------------------------

def guest_access_in_mode(kvm: Kvm, gfn: int, write: bool) -> bool:
    """A guest access by a vCPU already in guest mode (a TD's vCPU between
    TDH.VP.ENTER and its exit): a shared gfn through the direct root."""
    if kvm.vcpu.root is None:
        return False
    return _access(kvm, gfn, write)


def _access(kvm: Kvm, gfn: int, write: bool) -> bool:
    w, lay, v = kvm.w, kvm.layout, kvm.me
    root = kvm.vcpu.root
    if root is None:
        return False  # dropped while servicing an obsolete-root request
    e = v * TLB_ENTRIES + (gfn & (TLB_ENTRIES - 1))
    if w.load(lay.tlb_tags + e) == gfn + 1:
        flags = w.load(lay.tlb_flags + e)
        if not write or flags & TLB_D:  # a write through a clean entry walks to set D
            kvm.hooks.guest_translate(kvm, gfn, w.load(lay.tlb_pfns + e), "TLB hit")
            kvm.stats["tlb_hits"] += 1
            return True
    for _ in range(3):
        r = _walk_and_fill(kvm, root, gfn, write, e)
        if r is not None:
            return r
    return False  # the leaf kept changing under the walk: let KVM sort it out


def _walk_and_fill(kvm: Kvm, root: int, gfn: int, write: bool, e: int) -> bool | None:
    """One hardware walk from the root; None if the A/D update lost a race.  The
    guest's address is the shared one on a TD (gfn | the shared bit): the CPU
    walks the shared EPT there, in the direct root's upper half."""
    w, lay = kvm.w, kvm.layout
    # the EPTP's page-walk length: the vCPU's mmu->root_role.level, which
    # kvm_mmu_load gave load_mmu_pgd (the run's geometry), not the root page's
    # metadata, which the CPU never reads
    level = kvm.geometry.root_level
    gpa_gfn = gfn | kvm_gfn_direct_bits(kvm)
    pt = root
    path = []
    while True:
        path.append(pt)
        sptep = lay.spt(pt) + SPTE_INDEX(gpa_gfn, level)
        spte = w.load(sptep)
        if spte == POISON_SPTE:
            kvm.hooks.kasan_report(kvm, "poison", table=pt, level=level, gfn=gfn,
                                   walker="guest")
        if is_frozen_spte(spte) or not is_shadow_present_pte(spte):
            kvm.stats["ept_violations"] += 1
            return False
        if is_last_spte(spte, level):
            break
        child = spte_to_child_pt(spte, level)
        if child is None or child >= lay.n_pages:
            kvm.bug("corrupt non-leaf SPTE", "the guest's walker found a non-leaf SPTE that "
                    "points outside the page pool", gfn=gfn, level=level, spte=f"{spte:#x}")
        pt = child
        level -= 1
    if write and not spte & PT_WRITABLE_MASK:
        kvm.stats["ept_violations"] += 1
        return False
    want = spte | shadow_accessed_mask | (shadow_dirty_mask if write else 0)
    if want != spte:
        found = w.cmpxchg(sptep, spte, want)
        # the CPU's locked A/D update, traced at the cmpxchg like KVM's stores
        w.trace(events.spte_kind(level, (sptep - lay.pages) >> 9,
                                 events.F_FAILED if found != spte else 0),
                round_gfn_for_level(gfn, level), spte, found if found != spte else want)
        if found != spte:
            return None  # the entry changed: walk again
        if want & shadow_dirty_mask and not spte & shadow_dirty_mask:
            dirty_set(kvm, round_gfn_for_level(gfn, level))  # counted at the leaf's gfn
            kvm.stats["dirty_bits_set"] += 1
        spte = want
    pfn = spte_to_pfn(spte) + (gfn & (KVM_PAGES_PER_HPAGE(level) - 1))  # 4K piece of a 2M leaf
    kvm.hooks.guest_translate(kvm, gfn, pfn, "walk")
    # fill: invalidate the tag first, so a half-written entry is never a hit
    w.store(lay.tlb_tags + e, 0)
    w.store(lay.tlb_pfns + e, pfn)
    w.store(lay.tlb_flags + e, (TLB_W if spte & PT_WRITABLE_MASK else 0)
            | (TLB_D if spte & shadow_dirty_mask else 0))
    base = lay.tlb_pts + e * TLB_MAX_LEVELS
    for k in range(TLB_MAX_LEVELS):
        w.store(base + k, path[k] + 1 if k < len(path) else 0)
    w.store(lay.tlb_tags + e, gfn + 1)
    kvm.stats["tlb_fills"] += 1
    return True


# ---------------------------------------------------------------------------
# dirty-bit accounting (the kernel's kvm_set_pfn_dirty, counted for the oracles)
# ---------------------------------------------------------------------------

def dirty_set(kvm: Kvm, gfn: int) -> None:
    """A D bit went 0 -> 1 in a leaf mapping ``gfn`` (KVM or the walker)."""
    kvm.w.fetch_add(dirty_index(kvm, gfn), DIRTY_SET)


def kvm_set_pfn_dirty(kvm: Kvm, gfn: int) -> None:
    """A D bit left a leaf mapping ``gfn`` and was seen: the page is dirty."""
    kvm.w.fetch_add(dirty_index(kvm, gfn), DIRTY_SEEN)


def dirty_index(kvm: Kvm, gfn: int) -> int:
    """The word counting ``gfn``'s D bits."""
    return kvm.layout.dirty + slot_index(kvm, gfn)
