"""SPTE encoding (arch/x86/kvm/mmu/spte.h, EPT flavour).

Only the bits the protocol needs: hardware R/W/X, the large-page bit, A/D, the
software MMU-present bit 11 that KVM's ``is_shadow_present_pte`` tests, the
PFN in bits 12..51, and bit 63, ``SHADOW_NONPRESENT_VALUE``, which every
non-present SPTE holds instead of 0 (TDX's "suppress #VE").

``FROZEN_SPTE`` is that value | 0x5a0 and ``is_frozen_spte`` is an *exact*
equality test: an atomic bit operation applied to a frozen entry produces some
other non-present value that nobody recognises as frozen.

Non-leaf SPTEs point at page-table pages of the arena's pool and leaves map
host frames.  Frame numbers are labels in one space: page-table page ``p`` sits
at frame ``HOST_PFN_BASE + 512 * p`` (``sp_pfn``), the label of the first 4 KiB
of gfn ``512 * p``'s generation-0 page.  Nothing compares a table's frame with
a leaf's except ``handle_changed_spte``'s PFN test, and only a deliberately
impossible memory map (``pool.alias_tables``: "guest memory overtop a
kernel-allocated SP", c8e5a0d0e9bc) ever places a huge page there.
"""

from __future__ import annotations

VMX_EPT_READABLE_MASK = 1 << 0
PT_WRITABLE_MASK = 1 << 1
VMX_EPT_EXECUTABLE_MASK = 1 << 2
PT_PAGE_SIZE_MASK = 1 << 7
shadow_accessed_mask = 1 << 8
shadow_dirty_mask = 1 << 9
SPTE_MMU_PRESENT_MASK = 1 << 11
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58
SHADOW_NONPRESENT_VALUE = 1 << 63
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0
# slab's POISON_FREE byte: what a freed page-table page is filled with
POISON_SPTE = 0x6B6B6B6B6B6B6B6B

assert not FROZEN_SPTE & SPTE_MMU_PRESENT_MASK

PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
SPTE_LEVEL_BITS = 9
SPTE_ENT_PER_PAGE = 512

# leaves map host frame HOST_PFN_BASE + gfn: a fixed gfn->pfn map that the
# checker can verify (host memory with generations comes with the notifier)
HOST_PFN_BASE = 1 << 32


def KVM_PAGES_PER_HPAGE(level: int) -> int:  # noqa: N802 (kernel name)
    return 1 << (SPTE_LEVEL_BITS * (level - 1))


def SPTE_INDEX(gfn: int, level: int) -> int:  # noqa: N802
    return (gfn >> (SPTE_LEVEL_BITS * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


def round_gfn_for_level(gfn: int, level: int) -> int:
    return gfn & -KVM_PAGES_PER_HPAGE(level)


def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_large_pte(spte: int) -> bool:
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    return level == PG_LEVEL_4K or is_large_pte(spte)


def is_frozen_spte(spte: int) -> bool:
    return spte == FROZEN_SPTE


def is_writable_pte(spte: int) -> bool:
    return bool(spte & PT_WRITABLE_MASK)


def spte_to_pfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> 12


def gfn_to_host_pfn(gfn: int) -> int:
    return HOST_PFN_BASE + gfn


def make_spte(pfn: int, level: int, writable: bool) -> int:
    """A leaf: present, readable, executable, accessed; W and D on write faults."""
    spte = (SPTE_MMU_PRESENT_MASK | VMX_EPT_READABLE_MASK | VMX_EPT_EXECUTABLE_MASK
            | shadow_accessed_mask | EPT_SPTE_HOST_WRITABLE | EPT_SPTE_MMU_WRITABLE
            | (pfn << 12))
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if writable:
        spte |= PT_WRITABLE_MASK | shadow_dirty_mask
    return spte


def make_small_spte(huge_spte: int, index: int) -> int:
    """The 4K child ``index`` of a 2M leaf being split: same permissions and A/D
    bits, the PFN ``index`` frames further, no large-page bit."""
    return (huge_spte & ~PT_PAGE_SIZE_MASK) + (index << 12)


def sp_pfn(page: int) -> int:
    """The frame of page-table page ``page`` (see the module docstring)."""
    return HOST_PFN_BASE + (page << SPTE_LEVEL_BITS)


def pfn_to_sp(pfn: int) -> int:
    """The page-table page at frame ``pfn``; a frame that is no table's gives an
    index past any pool (the callers' "corrupt non-leaf" checks)."""
    off = pfn - HOST_PFN_BASE
    if off < 0 or off & (SPTE_ENT_PER_PAGE - 1):
        return 1 << 62
    return off >> SPTE_LEVEL_BITS


def make_nonleaf_spte(child_page: int) -> int:
    """Non-leaf SPTEs are fully permissive and point at the child table."""
    return (SPTE_MMU_PRESENT_MASK | VMX_EPT_READABLE_MASK | PT_WRITABLE_MASK
            | VMX_EPT_EXECUTABLE_MASK | shadow_accessed_mask | (sp_pfn(child_page) << 12))


def spte_to_child_pt(spte: int, level: int) -> int | None:
    """The child table's page index, or None unless present and non-leaf."""
    if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
        return None
    return pfn_to_sp(spte_to_pfn(spte))


def is_access_allowed(write: bool, spte: int) -> bool:
    return not write or is_writable_pte(spte)


def describe(spte: int) -> str:
    """Human-readable form for reports."""
    if spte == SHADOW_NONPRESENT_VALUE:
        return "SHADOW_NONPRESENT_VALUE"
    if spte == FROZEN_SPTE:
        return "FROZEN_SPTE"
    if spte == POISON_SPTE:
        return "POISON"
    if not is_shadow_present_pte(spte):
        return f"nonpresent({spte:#x})"
    flags = ("W" if spte & PT_WRITABLE_MASK else "") + ("L" if spte & PT_PAGE_SIZE_MASK else "")
    return f"present(pfn={spte_to_pfn(spte):#x}{',' + flags if flags else ''})"
