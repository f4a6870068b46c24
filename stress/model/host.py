"""Host memory and memory attributes: what leaves map, and who owns each gfn.

Host pages.  A leaf SPTE maps the host page backing its gfn.  Each gfn's
backing page has a generation (a byte in shared memory): unmapping or
migrating the page (an mmu_notifier invalidation, a guest_memfd punch-hole, a
conversion) bumps it, and from then on the old page is *freed*.  The page's
PFN encodes (generation mod 256, gfn), so a leaf that still maps the old PFN
is recognisable: a stale mapping, guest memory corruption in real life.

Memory attributes.  ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` per gfn, one bit in
shared memory (the kernel's xarray), initialised in alternating chunks and
flipped by conversions (KVM_SET_MEMORY_ATTRIBUTES).  Private gfns of a TD map
through the mirror root and the S-EPT, shared ones through the direct root.
"""

from __future__ import annotations

from stress.model.kvm import Kvm
from stress.model.spte import HOST_PFN_BASE

GEN_SHIFT = 28  # gfns below 2**28 (a 1 TiB guest); the generation sits above them


def host_pfn_of(gfn: int, gen: int) -> int:
    return HOST_PFN_BASE + ((gen & 0xFF) << GEN_SHIFT) + gfn


def pfn_gfn_gen(pfn: int) -> tuple[int, int]:
    x = pfn - HOST_PFN_BASE
    return x & ((1 << GEN_SHIFT) - 1), (x >> GEN_SHIFT) & 0xFF


def host_page_gen(kvm: Kvm, gfn: int) -> int:
    v = kvm.w.load(kvm.layout.host_gens + gfn // 8)
    return (v >> (8 * (gfn % 8))) & 0xFF


def host_pfn(kvm: Kvm, gfn: int) -> int:
    """The PFN of the host page backing ``gfn`` now (GUP / kvm_gmem_get_pfn)."""
    return host_pfn_of(gfn, host_page_gen(kvm, gfn))


def host_page_migrate(kvm: Kvm, gfn: int) -> None:
    """The primary MMU replaced the page backing ``gfn``: the old one is freed."""
    i = kvm.layout.host_gens + gfn // 8
    shift = 8 * (gfn % 8)
    while True:
        v = kvm.w.load(i)
        gen = ((v >> shift) + 1) & 0xFF
        new = (v & ~(0xFF << shift)) | (gen << shift)
        if kvm.w.cmpxchg(i, v, new) == v:
            return


def kvm_mem_is_private(kvm: Kvm, gfn: int) -> bool:
    if not kvm.geometry.tdx:
        return False
    return bool(kvm.w.load(kvm.layout.attrs + gfn // 64) >> (gfn % 64) & 1)


def kvm_set_mem_attributes(kvm: Kvm, start: int, end: int, private: bool) -> None:
    """Update the attribute bits of [start, end) (the xarray store)."""
    for gfn in range(start, end):
        i, bit = kvm.layout.attrs + gfn // 64, 1 << (gfn % 64)
        if private:
            kvm.w.fetch_or(i, bit)
        else:
            kvm.w.fetch_and(i, ~bit & ((1 << 64) - 1))


def init_mem_attributes(kvm: Kvm) -> None:
    """Private and shared gfns alternate in chunks of 2**private_chunk_shift."""
    g = kvm.geometry
    if not g.tdx:
        return
    words = (g.n_gfns + 63) // 64
    shift = g.private_chunk_shift
    if shift < 6:
        chunk = 1 << shift
        pattern = 0
        for bit in range(64):
            if not (bit // chunk) & 1:
                pattern |= 1 << bit
        kvm.w.fill(kvm.layout.attrs, words, pattern)
        return
    for w in range(words):
        private = not ((w * 64) >> shift) & 1
        kvm.w.store(kvm.layout.attrs + w, (1 << 64) - 1 if private else 0)
