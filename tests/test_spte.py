from stress.model import spte as s


def test_frozen_value_and_predicates() -> None:
    assert s.SHADOW_NONPRESENT_VALUE == 0x8000000000000000
    assert s.FROZEN_SPTE == 0x80000000000005A0
    assert not s.is_shadow_present_pte(s.FROZEN_SPTE)
    assert not s.is_shadow_present_pte(s.SHADOW_NONPRESENT_VALUE)
    assert s.is_frozen_spte(s.FROZEN_SPTE)
    # exact equality: a bit operation on a frozen entry un-freezes it
    assert not s.is_frozen_spte(s.FROZEN_SPTE & ~s.shadow_accessed_mask)
    assert not s.is_frozen_spte(s.SHADOW_NONPRESENT_VALUE)


def test_leaf_and_nonleaf_encoding() -> None:
    leaf = s.make_spte(0x123456, s.PG_LEVEL_4K, writable=True)
    assert s.is_shadow_present_pte(leaf)
    assert s.is_last_spte(leaf, s.PG_LEVEL_4K)
    assert s.spte_to_pfn(leaf) == 0x123456
    assert s.is_writable_pte(leaf) and leaf & s.shadow_dirty_mask
    ro = s.make_spte(7, s.PG_LEVEL_4K, writable=False)
    assert not s.is_access_allowed(True, ro) and s.is_access_allowed(False, ro)
    huge = s.make_spte(512, s.PG_LEVEL_2M, writable=False)
    assert s.is_large_pte(huge) and s.is_last_spte(huge, s.PG_LEVEL_2M)
    nl = s.make_nonleaf_spte(42)
    assert s.spte_to_child_pt(nl, 2) == 42
    assert not s.is_last_spte(nl, 2)
    assert s.spte_to_child_pt(s.FROZEN_SPTE, 2) is None
    assert s.spte_to_child_pt(leaf, 1) is None
    # the PFN field is bits 12..51
    assert s.SPTE_BASE_ADDR_MASK == 0x000FFFFFFFFFF000
    assert s.SPTE_MMU_PRESENT_MASK == 1 << 11


def test_geometry() -> None:
    assert s.KVM_PAGES_PER_HPAGE(1) == 1
    assert s.KVM_PAGES_PER_HPAGE(2) == 512
    assert s.KVM_PAGES_PER_HPAGE(4) == 512**3
    gfn = (3 << 27) | (5 << 18) | (7 << 9) | 11
    assert [s.SPTE_INDEX(gfn, lvl) for lvl in (4, 3, 2, 1)] == [3, 5, 7, 11]
    assert s.round_gfn_for_level(gfn, 2) == gfn & ~511


def test_poison_is_distinguishable() -> None:
    assert s.POISON_SPTE not in (s.FROZEN_SPTE, s.SHADOW_NONPRESENT_VALUE)
    assert s.describe(s.POISON_SPTE) == "POISON"
    assert s.describe(s.FROZEN_SPTE) == "FROZEN_SPTE"
