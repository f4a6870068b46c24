"""Host memory and memory attributes: what leaves map, and who owns each gfn.

Host pages.  A leaf SPTE maps the host page backing its gfn.  A gfn has two
backings: the VMM's memory (its userspace mapping; what GUP finds for a shared
gfn, and all there is for a VM without TDX) and, on a TD, its guest_memfd page
(what kvm_gmem_get_pfn gives a private gfn).  Each backing page has a
generation (a byte in shared memory per gfn and backing): unmapping or
migrating the page (an mmu_notifier invalidation of the VMM's mapping, a
guest_memfd punch-hole) bumps it, and from then on the old page is *freed*.
The page's PFN encodes (the backing, generation mod 256, the gfn's index in
the memslots' arrays: ``slot_index``), so a leaf that still maps the old PFN
is recognisable: a stale mapping, guest memory corruption in real life.  The
index, not the gfn, is what the PFN holds, so a gfn far up the guest physical
address space still has a small PFN (``pfn_gfn_gen`` maps it back through the
memslots).

A conversion (KVM_SET_MEMORY_ATTRIBUTES) releases no page: KVM's ioctl only
changes which backing the gfn's faults use.  The VMM discards the backing the
range no longer uses afterwards, with the invalidation that discard makes
(``vmm_convert_memory`` in notifier.py).

Memory attributes.  ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` per gfn, one bit in
shared memory (the kernel's xarray), initialised in alternating chunks and
flipped by conversions (KVM_SET_MEMORY_ATTRIBUTES).  Private gfns of a TD map
through the mirror root and the S-EPT, shared ones through the direct root.
"""

from __future__ import annotations

import random

from stress.model.kvm import Kvm, gfn_to_memslot, index_to_gfn, slot_index
from stress.model.spte import HOST_PFN_BASE

# memslot array indices below 2**28 (1 TiB of guest memory in all the slots
# together, wherever they sit); the generation sits above them, the backing above it
GEN_SHIFT = 28
GMEM_SHIFT = GEN_SHIFT + 8


def host_pfn_of(index: int, gen: int, private: bool = False) -> int:
    """The PFN of generation ``gen`` of the page at memslot array ``index``: the
    VMM's page, or with ``private`` the guest_memfd's."""
    return HOST_PFN_BASE + (int(private) << GMEM_SHIFT) + ((gen & 0xFF) << GEN_SHIFT) + index


def pfn_gfn_gen(kvm: Kvm, pfn: int) -> tuple[int, int, bool]:
    """(gfn, generation, guest_memfd's) of the host page ``pfn``; gfn -1 for a
    frame no memslot page ever had."""
    x = pfn - HOST_PFN_BASE
    return (index_to_gfn(kvm, x & ((1 << GEN_SHIFT) - 1)), (x >> GEN_SHIFT) & 0xFF,
            bool((x >> GMEM_SHIFT) & 1))


def _gens(kvm: Kvm, private: bool) -> int:
    return kvm.layout.gmem_gens if private else kvm.layout.host_gens


def _gen_of(kvm: Kvm, i: int, private: bool = False) -> int:
    v = kvm.w.load(_gens(kvm, private) + i // 8)
    return (v >> (8 * (i % 8))) & 0xFF


def host_page_gen(kvm: Kvm, gfn: int, private: bool = False) -> int:
    return _gen_of(kvm, slot_index(kvm, gfn), private)


def host_pfn(kvm: Kvm, gfn: int, private: bool = False) -> int:
    """The PFN of the page backing ``gfn`` now: the VMM's (GUP, hva_to_pfn) or
    with ``private`` the guest_memfd's (kvm_gmem_get_pfn)."""
    i = slot_index(kvm, gfn)
    return host_pfn_of(i, _gen_of(kvm, i, private), private)


def host_page_migrate(kvm: Kvm, gfn: int, private: bool = False) -> None:
    """The primary MMU replaced the VMM's page backing ``gfn`` (with
    ``private``: guest_memfd freed its page, and the next kvm_gmem_get_pfn
    allocates another): the old one is freed.

    The old page's release is a hook point for the oracles (no leaf maps the
    page any more: the caller zapped and flushed under mmu_lock)."""
    kvm.hooks.host_page_release(kvm, gfn, host_pfn(kvm, gfn, private))
    x = slot_index(kvm, gfn)
    i = _gens(kvm, private) + x // 8
    shift = 8 * (x % 8)
    while True:
        v = kvm.w.load(i)
        gen = ((v >> shift) + 1) & 0xFF
        new = (v & ~(0xFF << shift)) | (gen << shift)
        if kvm.w.cmpxchg(i, v, new) == v:
            return


def kvm_set_mem_attributes(kvm: Kvm, start: int, end: int, private: bool) -> None:
    """Update the attribute bits of [start, end) (the xarray store; here the
    slot's bits, so only gfns some memslot holds have attributes)."""
    for gfn in range(start, end):
        if gfn_to_memslot(kvm, gfn) is None:
            continue
        x = slot_index(kvm, gfn)
        i, bit = kvm.layout.attrs + x // 64, 1 << (x % 64)
        if private:
            kvm.w.fetch_or(i, bit)
        else:
            kvm.w.fetch_and(i, ~bit & ((1 << 64) - 1))


def init_mem_attributes(kvm: Kvm) -> None:
    """Private and shared gfns alternate in chunks of 2**private_chunk_shift,
    slot by slot (a slot starts on a 2 MiB boundary, in gfns and in its arrays)."""
    g = kvm.geometry
    if not g.tdx:
        return
    shift = g.private_chunk_shift
    for slot in g.memslots:
        words = slot.frames // 64
        base_i = kvm.layout.attrs + slot.arrays // 64
        if shift < 6:
            chunk = 1 << shift
            pattern = 0
            for bit in range(64):
                if not (bit // chunk) & 1:
                    pattern |= 1 << bit
            kvm.w.fill(base_i, words, pattern)
            continue
        for w in range(words):
            private = not ((slot.base_gfn + w * 64) >> shift) & 1
            kvm.w.store(base_i + w, (1 << 64) - 1 if private else 0)


# ---------------------------------------------------------------------------
# Huge pages: what the host backs with a THP, and KVM's lpage_info
# ---------------------------------------------------------------------------
#
# One word per 2 MiB region (``layout.lpage_info``), KVM's
# ``lpage_info[PG_LEVEL_2M].disallow_lpage`` plus one model-only host bit:
#
# * bits 0-29: the disallow count (a region that sticks out of the memslot,
#   gfns write-tracked for nested TDP: ``kvm_mmu_gfn_disallow_lpage``);
# * ``KVM_LPAGE_MIXED_FLAG`` (bit 31): the region's memory attributes are
#   mixed; set and cleared by KVM_SET_MEMORY_ATTRIBUTES's post step with
#   mmu_lock held for write, read by faults with it held for read;
# * ``LPAGE_HOST_HUGE`` (bit 30, the host's, not KVM's): the host backs the
#   region with a transparent huge page.  The THP is intact while every gfn
#   of the region has the same host page generation (one folio); replacing
#   part of it (a conversion's punch-hole) splits it, and the primary MMU
#   migrating the whole folio (``host_pages_replace`` over the region)
#   makes it whole again.  ``host_mapping_level`` is 2M only for an intact
#   THP: ``host_pfn_mapping_level``.

KVM_LPAGE_MIXED_FLAG = 1 << 31
LPAGE_HOST_HUGE = 1 << 30
KVM_PAGES_PER_2M = 512
_GEN_WORDS_PER_2M = KVM_PAGES_PER_2M // 8
_ATTR_WORDS_PER_2M = KVM_PAGES_PER_2M // 64


def lpage_info_i(kvm: Kvm, gfn: int) -> int:
    """The word of lpage_info_slot(gfn, slot, PG_LEVEL_2M)."""
    return kvm.layout.lpage_info + slot_index(kvm, gfn) // KVM_PAGES_PER_2M


def region_in_memslot(kvm: Kvm, base: int) -> bool:
    """The 2 MiB region at ``base`` lies wholly inside one memslot."""
    slot = gfn_to_memslot(kvm, base)
    return slot is not None and base + KVM_PAGES_PER_2M <= slot.end_gfn


def hugepage_has_uniform_attrs(kvm: Kvm, base: int) -> bool:
    """All 512 gfns of the region at ``base`` share one attribute."""
    if not kvm.geometry.tdx:
        return True
    i = kvm.layout.attrs + slot_index(kvm, base) // 64
    first = kvm.w.load(i)
    return first in (0, (1 << 64) - 1) and kvm.w.count_equal(i, _ATTR_WORDS_PER_2M,
                                                              first) == _ATTR_WORDS_PER_2M


def init_lpage_info(kvm: Kvm, huge_fraction: float, seed: int) -> None:
    """At VM creation (no other task yet): which regions the host backs with a
    THP (``huge_fraction`` of them, placed by the seed), which stick out of
    their memslot, which have mixed attributes (kvm_mmu_init_memslot_memory_attributes)."""
    rng = random.Random(f"thp:{seed}")
    for slot in kvm.geometry.memslots:
        for r in range(slot.frames // KVM_PAGES_PER_2M):
            base = slot.base_gfn + r * KVM_PAGES_PER_2M
            v = 0
            if base + KVM_PAGES_PER_2M > slot.end_gfn:
                v = 1  # the memslot ends inside the region
            elif rng.random() < huge_fraction:
                v |= LPAGE_HOST_HUGE
            if v != 1 and not hugepage_has_uniform_attrs(kvm, base):
                v |= KVM_LPAGE_MIXED_FLAG
            kvm.w.store(kvm.layout.lpage_info + slot.arrays // KVM_PAGES_PER_2M + r, v)


def kvm_mmu_gfn_disallow_lpage(kvm: Kvm, gfn: int) -> None:
    """account_shadowed: a write-tracked gfn (one of L1's page tables) keeps its
    region mapped with 4K pages."""
    kvm.w.fetch_add(lpage_info_i(kvm, gfn), 1)


def hugepage_disallowed(kvm: Kvm, gfn: int) -> bool:
    """KVM's side of the 2M decision (mixed attributes or a disallow count);
    the caller holds mmu_lock, so the mixed flag cannot change under it."""
    return bool(kvm.w.load(lpage_info_i(kvm, gfn)) & ~LPAGE_HOST_HUGE)


def host_folio_intact(kvm: Kvm, base: int) -> bool:
    """Every gfn of the region at ``base`` is backed by the same folio
    generation (one host page table walk in the kernel: a PMD leaf)."""
    i = kvm.layout.host_gens + slot_index(kvm, base) // 8
    first = kvm.w.load(i)
    if first != (first & 0xFF) * 0x0101010101010101:
        return False
    return kvm.w.count_equal(i, _GEN_WORDS_PER_2M, first) == _GEN_WORDS_PER_2M


def host_mapping_level(kvm: Kvm, gfn: int) -> int:
    """host_pfn_mapping_level: 2 for a gfn in an intact THP, else 1.  Read with
    the pfn, after the fault's mmu_invalidate_seq snapshot: an invalidation that
    splits or replaces the THP afterwards makes the fault retry."""
    if not kvm.w.load(lpage_info_i(kvm, gfn)) & LPAGE_HOST_HUGE:
        return 1
    return 2 if host_folio_intact(kvm, gfn & -KVM_PAGES_PER_2M) else 1


def _is_host_huge(kvm: Kvm, gfn: int) -> bool:
    return bool(kvm.w.load(lpage_info_i(kvm, gfn)) & LPAGE_HOST_HUGE)


def host_invalidation_range(kvm: Kvm, start: int, end: int) -> tuple[int, int]:
    """The primary MMU invalidates a THP as a whole: a range that starts or ends
    inside a THP-backed region grows to the region's bounds (within the memslot
    of [start, end), which a region never leaves: slots start 2 MiB aligned)."""
    if _is_host_huge(kvm, start):
        start &= -KVM_PAGES_PER_2M
    if end & (KVM_PAGES_PER_2M - 1) and _is_host_huge(kvm, end - 1):
        slot = gfn_to_memslot(kvm, end - 1)
        assert slot is not None
        end = min(slot.end_gfn, (end | (KVM_PAGES_PER_2M - 1)) + 1)
    return start, end


def host_folio_migrate(kvm: Kvm, base: int) -> None:
    """The primary MMU moved the whole THP at ``base`` to a new folio: every gfn
    gets the same, new generation (which also rejoins a split THP)."""
    for gfn in range(base, base + KVM_PAGES_PER_2M):
        kvm.hooks.host_page_release(kvm, gfn, host_pfn(kvm, gfn))
    w = kvm.w
    i0 = kvm.layout.host_gens + slot_index(kvm, base) // 8
    gen = max(max((w.load(i0 + k) >> (8 * b)) & 0xFF for b in range(8))
              for k in range(_GEN_WORDS_PER_2M))
    new = ((gen + 1) & 0xFF) * 0x0101010101010101
    for k in range(_GEN_WORDS_PER_2M):
        while True:
            v = w.load(i0 + k)
            if w.cmpxchg(i0 + k, v, new) == v:
                break


def host_pages_replace(kvm: Kvm, start: int, end: int) -> None:
    """The primary MMU replaced the pages backing [start, end): whole THPs as
    one folio, other gfns one page at a time."""
    gfn = start
    while gfn < end:
        if (not gfn & (KVM_PAGES_PER_2M - 1) and gfn + KVM_PAGES_PER_2M <= end
                and _is_host_huge(kvm, gfn)):
            host_folio_migrate(kvm, gfn)
            gfn += KVM_PAGES_PER_2M
            continue
        host_page_migrate(kvm, gfn)
        gfn += 1
