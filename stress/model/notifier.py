"""mmu_notifier invalidation, guest_memfd invalidation and memory conversions.

Design note ("KVM: gmem: protect kvm_mmu_invalidate_end()", Aug 2023).  When the primary MMU is
about to change what backs a range (an unmap, a migration, a guest_memfd punch-hole, a
private<->shared conversion), KVM must make sure no SPTE keeps mapping the old page.  Two halves
make that hold:

* the invalidation side, with mmu_lock held for write: ``begin`` raises
  ``mmu_invalidate_in_progress`` and records the range, the range is zapped;
  later ``end`` bumps ``mmu_invalidate_seq`` *then* lowers in_progress;
* the fault side: snapshot ``mmu_invalidate_seq`` *before* looking up the pfn,
  and under mmu_lock (read) retry if an invalidation is in progress over the
  gfn or the sequence moved (``mmu_invalidate_retry_gfn``).

Because both ``begin``/``end`` and the fault's check run under mmu_lock, a fault
either installs its SPTE before the invalidation's zap (which removes it) or
sees the invalidation and retries.  ``end`` outside the lock (the 2023
guest_memfd patch) breaks the first half; the variants below break
each piece.  The on_lock / on_unlock hooks of the seed are named for when
they run here: ``before_unlock`` (end, fixed) and ``after_unlock`` (the bug).
"""

from __future__ import annotations

from collections.abc import Callable

from stress.arena import Globals, Slot
from stress.model import events
from stress.model.host import (
    KVM_LPAGE_MIXED_FLAG,
    KVM_PAGES_PER_2M,
    host_invalidation_range,
    host_page_migrate,
    host_pages_replace,
    host_pfn,
    hugepage_has_uniform_attrs,
    kvm_set_mem_attributes,
    lpage_info_i,
    region_in_memslot,
)
from stress.model.kvm import Kvm, kvm_mem_is_private
from stress.model.memslot import synchronize_srcu
from stress.model.roots import (
    KVM_ALL_ROOTS,
    KVM_DIRECT_ROOTS,
    KVM_INVALID_ROOTS,
    KVM_MIRROR_ROOTS,
    KVM_VALID_ROOTS,
    for_each_tdp_mmu_root_yield_safe,
)
from stress.model.sched import non_block_end, non_block_start
from stress.model.spte import (
    PG_LEVEL_2M,
)
from stress.model.tdp_mmu import (
    kvm_tdp_mmu_zap_leafs_roots,
    tdp_mmu_zap_leafs_atomic,
    zap_subtrees_in_range,
)

INVALID_GFN = (1 << 64) - 1


def _g(kvm: Kvm, off: int) -> int:
    return kvm.layout.glob(off)


def kvm_mmu_invalidate_begin(kvm: Kvm) -> None:
    kvm.lockdep_assert_held_write()
    w = kvm.w
    n = w.fetch_add(_g(kvm, Globals.MMU_INVALIDATE_IN_PROGRESS), 1) + 1
    if n == 1:
        w.store(_g(kvm, Globals.MMU_INVALIDATE_RANGE_START), INVALID_GFN)
        w.store(_g(kvm, Globals.MMU_INVALIDATE_RANGE_END), INVALID_GFN)


def kvm_mmu_invalidate_range_add(kvm: Kvm, start: int, end: int) -> None:
    kvm.lockdep_assert_held_write()
    w = kvm.w
    s_i, e_i = _g(kvm, Globals.MMU_INVALIDATE_RANGE_START), _g(kvm,
                                                                Globals.MMU_INVALIDATE_RANGE_END)
    cur = w.load(s_i)
    if cur == INVALID_GFN:
        w.store(s_i, start)
        w.store(e_i, end)
    else:
        w.store(s_i, min(cur, start))
        w.store(e_i, max(w.load(e_i), end))


def kvm_mmu_invalidate_end(kvm: Kvm) -> None:
    """seq++ then in_progress--, in that order, with mmu_lock held for write:
    a reader under the read lock sees either the invalidation or the new seq."""
    kvm.lockdep_assert_held_write()
    kvm.w.fetch_add(_g(kvm, Globals.MMU_INVALIDATE_SEQ), 1)
    kvm.w.fetch_add(_g(kvm, Globals.MMU_INVALIDATE_IN_PROGRESS), -1)


def end_before_unlock(kvm: Kvm, post: Callable[[], None] | None = None) -> None:
    """Fixed: the end hook runs in the write-locked section (before_unlock),
    after the handler (``post``: a conversion's post_set_memory_attributes)."""
    kvm.write_lock()
    try:
        if post is not None:
            post()
        kvm_mmu_invalidate_end(kvm)
    finally:
        kvm.write_unlock()


def end_after_unlock(kvm: Kvm, post: Callable[[], None] | None = None) -> None:
    """Buggy (before "KVM: gmem: protect kvm_mmu_invalidate_end()", Aug 2023): the end
    hook runs after mmu_lock is dropped.  Unordered against the fault's check,
    a fault can see in_progress == 0 and the old seq: modelled as the
    decrement landing before the increment, with a window between them."""
    if post is not None:
        kvm.write_lock()
        try:
            post()
        finally:
            kvm.write_unlock()
    kvm.w.fetch_add(_g(kvm, Globals.MMU_INVALIDATE_IN_PROGRESS), -1)
    kvm.w.spin_ns(kvm.race_window_ns)
    kvm.w.fetch_add(_g(kvm, Globals.MMU_INVALIDATE_SEQ), 1)


def mmu_invalidate_seq(kvm: Kvm) -> int:
    return kvm.w.load(kvm.layout.globals + Globals.MMU_INVALIDATE_SEQ)


def mmu_invalidate_retry_gfn(kvm: Kvm, mmu_seq: int, gfn: int) -> bool:
    """True if the fault must retry: an invalidation covering gfn is in progress,
    or one completed since the fault's snapshot."""
    w, g = kvm.w, kvm.layout.globals
    if w.load(g + Globals.MMU_INVALIDATE_IN_PROGRESS):
        start = w.load(g + Globals.MMU_INVALIDATE_RANGE_START)
        end = w.load(g + Globals.MMU_INVALIDATE_RANGE_END)
        if start <= gfn < end:
            return True
    return w.load(g + Globals.MMU_INVALIDATE_SEQ) != mmu_seq


def retry_check(kvm: Kvm, mmu_seq: int, gfn: int) -> bool:
    """is_page_fault_stale's invalidation part (fixed)."""
    kvm.lockdep_assert_held_read()
    return mmu_invalidate_retry_gfn(kvm, mmu_seq, gfn)


def no_retry_check(kvm: Kvm, mmu_seq: int, gfn: int) -> bool:
    """Buggy: the fault never asks whether an invalidation raced with it."""
    return False


def faultin_seq_then_pfn(kvm: Kvm, gfn: int, is_private: bool) -> tuple[int, int]:
    """kvm_mmu_faultin_pfn (fixed): snapshot the seq, then look the pfn up
    (guest_memfd's page for a private fault, else GUP of the VMM's)."""
    seq = mmu_invalidate_seq(kvm)
    return seq, host_pfn(kvm, gfn, is_private)


def faultin_pfn_then_seq(kvm: Kvm, gfn: int, is_private: bool) -> tuple[int, int]:
    """Buggy ordering: the pfn is looked up before the seq is snapshotted, so an
    invalidation that completes in between is invisible to the retry check."""
    pfn = host_pfn(kvm, gfn, is_private)
    kvm.w.spin_ns(kvm.race_window_ns)
    return mmu_invalidate_seq(kvm), pfn


# ---------------------------------------------------------------------------
# the invalidation side
# ---------------------------------------------------------------------------

def kvm_unmap_gfn_range(kvm: Kvm, start: int, end: int, types: int,
                        may_block: bool = True) -> int:
    """Zap [start, end) in every root of ``types`` (write lock; the mirror through
    the S-EPT removal path), yielding only if ``may_block``.  Under the
    mirror-zap-shared proposal the mirror part is left to
    :func:`unmap_mirror_shared`, after the write lock."""
    kvm.lockdep_assert_held_write()
    if kvm.variant.mirror_shared_zaps:
        types &= ~KVM_MIRROR_ROOTS
        if not types & KVM_VALID_ROOTS:  # a PRIVATE-filtered unmap: the mirror's only
            return 0
    # flushes before returning
    return kvm_tdp_mmu_zap_leafs_roots(kvm, types, start, end, may_block)


def unmap_mirror_shared(kvm: Kvm, start: int, end: int, types: int) -> int:
    """The mirror-zap-shared proposal: with the invalidation in progress (begun
    under the write lock), zap the mirror's part of [start, end) with mmu_lock
    held for read: the 2M tables wholly inside the range with their sub-trees,
    the other leaves one by one.  Upstream does all of it under the write lock."""
    if not kvm.variant.mirror_shared_zaps or not types & KVM_MIRROR_ROOTS:
        return 0
    n = 0
    kvm.read_lock()
    try:
        for root in for_each_tdp_mmu_root_yield_safe(kvm, KVM_MIRROR_ROOTS):
            lo, hi = (start + KVM_PAGES_PER_2M - 1) & -KVM_PAGES_PER_2M, end & -KVM_PAGES_PER_2M
            if lo < hi:
                n += zap_subtrees_in_range(kvm, root, lo, hi, PG_LEVEL_2M, shared=True)
                n += tdp_mmu_zap_leafs_atomic(kvm, root, start, lo)
                n += tdp_mmu_zap_leafs_atomic(kvm, root, hi, end)
            else:
                n += tdp_mmu_zap_leafs_atomic(kvm, root, start, end)
    finally:
        kvm.read_unlock()
    return n


def mmu_notifier_invalidate_range(kvm: Kvm, start: int, end: int,
                                  attr_filter: str | None = None,
                                  blockable: bool = True, discard: bool = False) -> None:
    """invalidate_range_start, the page change, invalidate_range_end.

    ``blockable`` False: the OOM reaper's
    mmu_notifier_invalidate_range_start_nonblock (mm/oom_kill.c), whose
    callback runs between non_block_start() and non_block_end(): KVM's zap
    passes ``range->may_block`` on and must not yield (mm/mmu_notifier.c,
    virt/kvm/kvm_main.c kvm_mmu_notifier_invalidate_range_start).

    ``attr_filter`` (a TD): ``"shared"`` is the mmu_notifier of the VMM's
    mapping, which backs only shared gfns (kvm_unmap_gfn_range with
    KVM_FILTER_SHARED: direct roots); ``"private"`` is a guest_memfd
    punch-hole the guest agreed to (it stopped using the pages first: the
    caller's :func:`guest_release_private`), which zaps
    the mirror roots (KVM_FILTER_PRIVATE) through the S-EPT removal path.  Only
    the pages of that backing are replaced.  None (a VM without TDX): every root.

    The primary MMU invalidates a THP of the VMM's memory as a whole: the range
    grows to its bounds.  By default the whole folio then moves (a migration);
    with ``discard`` (the VMM's madvise(MADV_DONTNEED) or punch-hole) only the
    pages of [start, end) go and a THP it covers in part is split.  A
    guest_memfd punch-hole is exact (it holds no THP here).
    """
    lo, hi = start, end  # the pages replaced
    if attr_filter != "private":
        start, end = host_invalidation_range(kvm, start, end)
        if not discard:
            lo, hi = start, end
    types = {None: KVM_ALL_ROOTS, "shared": KVM_DIRECT_ROOTS | KVM_INVALID_ROOTS,
             "private": KVM_MIRROR_ROOTS | KVM_INVALID_ROOTS}[attr_filter]
    if not blockable:
        non_block_start(kvm)
    kvm.write_lock()
    try:
        kvm.hooks.invalidate_range_start(kvm, start, end)
        kvm_mmu_invalidate_begin(kvm)
        kvm_mmu_invalidate_range_add(kvm, start, end)
        kvm.w.trace(events.INVALIDATE, start, end, 0)
        kvm.stats["entries_zapped"] += kvm_unmap_gfn_range(kvm, start, end, types, blockable)
    finally:
        kvm.write_unlock()
        if not blockable:
            non_block_end(kvm)
    kvm.stats["entries_zapped"] += unmap_mirror_shared(kvm, start, end, types)
    try:
        if attr_filter == "private":  # guest_memfd frees its pages (kvm_gmem_punch_hole)
            for gfn in range(lo, hi):
                host_page_migrate(kvm, gfn, private=True)
        else:
            host_pages_replace(kvm, lo, hi)  # the primary MMU frees the old pages
    finally:  # even when an oracle fires, so that no fault retries for ever
        kvm.variant.invalidate_end(kvm)
    kvm.w.trace(events.INVALIDATE, start, end, 1)
    kvm.stats["invalidations"] += 1


def kvm_vm_set_mem_attributes(kvm: Kvm, start: int, end: int, private: bool) -> None:
    """KVM_SET_MEMORY_ATTRIBUTES on [start, end), under slots_lock (which
    serialises it with memslot updates and other conversions): nothing if the
    whole range has the attribute already (kvm_range_has_memory_attributes);
    else begin and zap the mappings of the root type that no longer owns the
    range (pre_set), store the attributes, then end (post_set).  No page is
    released: the ioctl changes only which backing the range's faults use
    (the VMM discards the other afterwards: :func:`vmm_convert_memory`)."""
    slots_i = kvm.layout.glob(Globals.SLOTS_LOCK)
    kvm.w.spin_lock(slots_i, kvm.pid)
    try:
        if any(kvm_mem_is_private(kvm, gfn) != private for gfn in range(start, end)):
            _set_mem_attributes_locked(kvm, start, end, private)
        kvm.hooks.set_memory_attributes_return(kvm, start, end, private)
    finally:
        kvm.spin_unlock(slots_i, "slots_lock")


def _set_mem_attributes_locked(kvm: Kvm, start: int, end: int, private: bool) -> None:
    """kvm_vm_set_mem_attributes' work, slots_lock held: the attribute change
    inside an invalidation (kvm_handle_gfn_range with the pre_set and post_set
    handlers)."""
    kvm.write_lock()
    try:
        kvm.hooks.invalidate_range_start(kvm, start, end)
        kvm_mmu_invalidate_begin(kvm)
        kvm_mmu_invalidate_range_add(kvm, start, end)
        kvm.variant.pre_set_range_add(kvm, start, end)  # kvm_arch_pre_set_memory_attributes
        _attr_change_mark(kvm, start, end)
        kvm.stats["entries_zapped"] += kvm.variant.pre_set_memory_attributes(
            kvm, start, end, private)
    finally:
        kvm.write_unlock()
    if not private:  # to shared: the mirror's pages go (the proposal: now, read lock)
        kvm.stats["entries_zapped"] += unmap_mirror_shared(kvm, start, end, KVM_MIRROR_ROOTS)
    try:
        kvm_set_mem_attributes(kvm, start, end, private)
    finally:  # even when an oracle fires, so that no fault retries for ever
        kvm.variant.invalidate_end(
            kvm, lambda: kvm_arch_post_set_memory_attributes(kvm, start, end))
    kvm.stats["conversions"] += 1


def vmm_convert_memory(kvm: Kvm, start: int, end: int, private: bool) -> None:
    """Userspace converts [start, end) as QEMU's kvm_convert_memory
    (accel/kvm/kvm-all.c) does: KVM_SET_MEMORY_ATTRIBUTES, then it discards
    the backing the range no longer uses, over the whole range (QEMU's
    ram_block_discard_range and ram_block_discard_guest_memfd_range,
    "physmem: Introduce ram_block_discard_guest_memfd_range()", qemu-devel,
    2024): to private, the VMM's memory (an mmu_notifier invalidation of the
    shared mapping, which splits a THP it covers in part); to shared, the
    guest_memfd pages (a punch-hole, the guest having given them up), whether
    or not the ioctl changed anything.  Between the ioctl's begin and end, the
    VMM's THP over the range is still whole."""
    kvm_vm_set_mem_attributes(kvm, start, end, private)
    if not kvm.geometry.tdx:  # a VM without guest_memfd: its one backing stays
        return
    mmu_notifier_invalidate_range(kvm, start, end, "shared" if private else "private",
                                  discard=True)


def _attr_change_mark(kvm: Kvm, start: int, end: int) -> None:
    """Oracle bookkeeping (not kernel state): this task is changing the
    attributes of [start, end) until its post step (write lock held)."""
    kvm.w.store(kvm.layout.slot(kvm.me, Slot.ATTR_CHANGE_START), start)
    kvm.w.store(kvm.layout.slot(kvm.me, Slot.ATTR_CHANGE_END), end)


def kvm_arch_post_set_memory_attributes(kvm: Kvm, start: int, end: int) -> None:
    """Recompute the mixed flag of every 2M region [start, end) touches, with
    mmu_lock held for write (hugepage_set_mixed / hugepage_clear_mixed): a fault,
    which reads it under the read lock, sees the old or the new flag, never a
    half-updated one."""
    kvm.lockdep_assert_held_write()
    base = start & -KVM_PAGES_PER_2M
    while base < end:
        i = lpage_info_i(kvm, base)
        if hugepage_has_uniform_attrs(kvm, base):
            kvm.w.fetch_and(i, ~KVM_LPAGE_MIXED_FLAG & ((1 << 64) - 1))
        else:
            kvm.w.fetch_or(i, KVM_LPAGE_MIXED_FLAG)
        base += KVM_PAGES_PER_2M
    _attr_change_mark(kvm, 0, 0)
    kvm.hooks.memory_attributes_set(kvm, start, end)


def attr_change_in_progress(kvm: Kvm, start: int, end: int) -> tuple[int, int, int] | None:
    """Oracle: (worker, start, end) of an attribute change in progress that
    intersects [start, end), or None.  Stable under mmu_lock (any mode)."""
    w, lay = kvm.w, kvm.layout
    for k in range(lay.n_slots):
        s = w.load(lay.slot(k, Slot.ATTR_CHANGE_START))
        e = w.load(lay.slot(k, Slot.ATTR_CHANGE_END))
        if s < e and s < end and start < e:
            return k, s, e
    return None


def range_add_hugepage_head_tail(kvm: Kvm, start: int, end: int) -> None:
    """kvm_arch_pre_set_memory_attributes (fixed, 9129633d568e "KVM: x86/mmu:
    Prevent installing hugepages when mem attributes are changing"): when the
    head or tail of the range is part of a 2M region whose attributes are not
    mixed, add the whole region to the invalidation, so a fault on a gfn of it
    outside [start, end) retries instead of mapping the region with a 2M leaf
    until the post step has marked it mixed.  Only the changed gfns are zapped
    (that takes out any 2M leaf over them)."""
    n = KVM_PAGES_PER_2M
    head = start & -n
    tail = (end - 1) & -n
    if ((head != start or head + n > end) and region_in_memslot(kvm, head)
            and not kvm.w.load(lpage_info_i(kvm, head)) & KVM_LPAGE_MIXED_FLAG):
        kvm_mmu_invalidate_range_add(kvm, head, head + n)
    if tail == head:
        return
    if (tail + n > end and region_in_memslot(kvm, tail)
            and not kvm.w.load(lpage_info_i(kvm, tail)) & KVM_LPAGE_MIXED_FLAG):
        kvm_mmu_invalidate_range_add(kvm, tail, tail + n)


def range_add_exact(kvm: Kvm, start: int, end: int) -> None:
    """Buggy (before 9129633d568e): only [start, end) is in the invalidation; a
    fault on another gfn of the same 2M region passes mmu_invalidate_retry_gfn,
    reads the not-yet-updated "not mixed" and maps the whole region, gfns whose
    attributes are changing included, with a 2M leaf."""


def pre_set_zap_old_owner(kvm: Kvm, start: int, end: int, private: bool) -> int:
    """kvm_arch_pre_set_memory_attributes (fixed): to private, zap the direct
    root's (shared) mappings; to shared, the mirror's (private) ones."""
    types = (KVM_DIRECT_ROOTS if private else KVM_MIRROR_ROOTS) | KVM_INVALID_ROOTS
    return kvm_unmap_gfn_range(kvm, start, end, types)


def pre_set_zap_direct_only(kvm: Kvm, start: int, end: int, private: bool) -> int:
    """Buggy: a conversion zaps only the direct root, so a private -> shared flip
    leaves the mirror (and the S-EPT) mapping a gfn that is now shared."""
    return kvm_unmap_gfn_range(kvm, start, end, KVM_DIRECT_ROOTS | KVM_INVALID_ROOTS)


def is_private_gfn(kvm: Kvm, gfn: int) -> bool:
    return kvm_mem_is_private(kvm, gfn)


def kvm_mmu_zap_memslot(kvm: Kvm, start: int, end: int) -> int:
    """kvm_arch_flush_shadow_memslot -> kvm_mmu_zap_memslot: zap the slot's gfns in
    every root, the mirror's included, with mmu_lock held for write
    (kvm_tdp_mmu_unmap_gfn_range with KVM_FILTER_SHARED | KVM_FILTER_PRIVATE, from Rick
    Edgecombe and Yan Zhao's "KVM: x86/mmu: Implement memslot deletion for TDX", Nov 2024,
    <20241112073426.21997-1-yan.y.zhao@intel.com>, in Paolo Bonzini's TDX MMU series of
    Feb 2025; kvm_mmu_zap_memslot itself from "KVM: x86/mmu: fix
    KVM_X86_QUIRK_SLOT_ZAP_ALL for shadow MMU", Oct 2024).  Not
    an invalidation, so not a flow the mirror-zap-shared proposal changes: the
    proposal moves only the zaps of conversions and punch-holes, which run inside an
    invalidation, to the read lock (:func:`unmap_mirror_shared`); a memslot move has
    no invalidation to keep faults off the range meanwhile, only the invalid slot.
    Returns the leaves zapped."""
    kvm.write_lock()
    try:
        return kvm_tdp_mmu_zap_leafs_roots(kvm, KVM_ALL_ROOTS, start, end)  # flushes
    finally:
        kvm.write_unlock()


def kvm_set_memory_region_move(kvm: Kvm, start: int, end: int) -> int:
    """KVM_SET_USER_MEMORY_REGION2 moving the slot of [start, end) (its memory
    replaced, with the guest's consent for the private part): install it
    invalid, synchronize_srcu, zap it in every root (write lock), replace the
    pages, install the new slot.  Returns the entries zapped."""
    w, lay = kvm.w, kvm.layout
    slots_i = lay.glob(Globals.SLOTS_LOCK)
    w.spin_lock(slots_i, kvm.pid)
    try:
        w.store(lay.glob(Globals.MEMSLOT_INVALID_START), start)
        w.store(lay.glob(Globals.MEMSLOT_INVALID_END), end)
        try:
            synchronize_srcu(kvm)  # kvm_swap_active_memslots
            n = kvm_mmu_zap_memslot(kvm, start, end)
            for gfn in range(start, end):  # the slot's new memory, both backings
                host_page_migrate(kvm, gfn)
                if kvm.geometry.tdx:
                    host_page_migrate(kvm, gfn, private=True)
        finally:
            w.store(lay.glob(Globals.MEMSLOT_INVALID_END), 0)
        synchronize_srcu(kvm)  # the new slot is installed
    finally:
        kvm.spin_unlock(slots_i, "slots_lock")
    kvm.stats["memslot_moves"] += 1
    return n
