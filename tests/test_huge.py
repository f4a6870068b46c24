"""Huge pages in the direct root: 2M installs, splits, tables replaced by 2M
leaves, zaps, and the two historical bugs that need them (reference 9.13, 9.7),
replayed at the atomics chokepoint."""

from __future__ import annotations

import pytest

from stress.arena import Globals, SpMeta
from stress.model import notifier as n
from stress.model.errors import InvariantViolation
from stress.model.host import (
    KVM_LPAGE_MIXED_FLAG,
    host_folio_intact,
    host_page_migrate,
    host_pfn,
    lpage_info_i,
)
from stress.model.kvm import kvm_mem_is_private, slot_index
from stress.model.mmu_page import SP_LINKED, SP_REMOVED, sp_state
from stress.model.spte import (
    PG_LEVEL_2M,
    is_large_pte,
    is_shadow_present_pte,
    sp_pfn,
    spte_to_child_pt,
    spte_to_pfn,
)
from stress.model.tdp_iter import TdpIter
from stress.model.tdp_mmu import (
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    kvm_mmu_uninit_tdp_mmu,
    kvm_tdp_mmu_zap_leafs,
    kvm_tdp_page_fault,
    tdp_mmu_zap_leafs_atomic,
)
from stress.oracles.quiescent import quiescent_check, teardown_check

REGION = 0x2600  # region 19: shared when attributes alternate in 2M chunks (odd region)
PRIVATE_REGION = 0x2400


def level2_entry(vm, gfn: int, root: int | None = None) -> int:
    it = TdpIter(vm.kvm, root or vm.root, gfn)
    while it.level > PG_LEVEL_2M:
        assert it.try_step_down()
    return it.old_spte


def pages(vm) -> int:
    return vm.words.load(vm.layout.glob(Globals.TDP_MMU_PAGES))


def test_fault_maps_a_2m_leaf_then_split_and_recovered(make_vm) -> None:
    vm = make_vm(huge_pages=1.0)
    k = vm.kvm
    assert kvm_tdp_page_fault(k, REGION + 5, write=True) == RET_PF_FIXED
    e = level2_entry(vm, REGION)
    assert is_shadow_present_pte(e) and is_large_pte(e)
    assert spte_to_pfn(e) == host_pfn(k, REGION)  # the folio's first frame
    assert pages(vm) == 2  # levels 3 and 2: no level-1 table
    assert kvm_tdp_page_fault(k, REGION + 77, write=True) == RET_PF_SPURIOUS  # covered
    assert not quiescent_check(k).violations
    # an instruction fetch maps 4K: the 2M leaf is split into 512 pieces
    assert kvm_tdp_page_fault(k, REGION + 9, write=False, exec_=True) == RET_PF_SPURIOUS
    assert k.stats["huge_splits"] == 1
    table = spte_to_child_pt(level2_entry(vm, REGION), PG_LEVEL_2M)
    assert table is not None and pages(vm) == 3
    for i in (0, 9, 511):
        child = vm.words.load(vm.layout.spt(table) + i)
        assert not is_large_pte(child) and spte_to_pfn(child) == spte_to_pfn(e) + i
    assert not quiescent_check(k).violations
    # a data fault wants 2M again: the table is replaced and torn down
    assert kvm_tdp_page_fault(k, REGION + 300, write=False) == RET_PF_FIXED
    assert is_large_pte(level2_entry(vm, REGION))
    assert sp_state(k, table) == SP_REMOVED and pages(vm) == 2
    rep = quiescent_check(k)
    assert not rep.violations and rep.leaves == 1
    kvm_mmu_uninit_tdp_mmu(k)
    assert not teardown_check(k).violations


@pytest.mark.parametrize("shared", [False, True])
def test_zapping_one_gfn_zaps_the_whole_2m_leaf(make_vm, shared: bool) -> None:
    vm = make_vm(huge_pages=1.0)
    k = vm.kvm
    assert kvm_tdp_page_fault(k, REGION, write=True) == RET_PF_FIXED
    if shared:
        k.read_lock()
        zapped = tdp_mmu_zap_leafs_atomic(k, vm.root, REGION + 100, REGION + 101)
        k.read_unlock()
    else:
        k.write_lock()
        zapped = kvm_tdp_mmu_zap_leafs(k, vm.root, REGION + 100, REGION + 101)
        k.write_unlock()
    assert zapped == 1 and not is_shadow_present_pte(level2_entry(vm, REGION))
    assert not quiescent_check(k).violations


def test_split_thp_and_disallowed_regions_map_4k(make_vm) -> None:
    vm = make_vm(huge_pages=1.0)
    k = vm.kvm
    host_page_migrate(k, REGION + 3)  # the host replaced one page: the THP is split
    assert not host_folio_intact(k, REGION)
    assert kvm_tdp_page_fault(k, REGION + 5, write=True) == RET_PF_FIXED
    assert not is_large_pte(level2_entry(vm, REGION))
    # the primary MMU migrates the whole THP (and invalidates all of it)
    n.mmu_notifier_invalidate_range(k, REGION + 7, REGION + 8)
    assert host_folio_intact(k, REGION)
    assert kvm_tdp_page_fault(k, REGION + 5, write=True) == RET_PF_FIXED
    assert is_large_pte(level2_entry(vm, REGION))
    assert not quiescent_check(k).violations
    other = REGION + 0x200
    vm.words.fetch_add(lpage_info_i(k, other), 1)  # kvm_mmu_gfn_disallow_lpage
    assert kvm_tdp_page_fault(k, other, write=True) == RET_PF_FIXED
    assert not is_large_pte(level2_entry(vm, other))


# -- reference 9.13: hugepage-attr-change-exact-range ------------------------

def _fault_during_conversion(vm):
    """The converter has zapped a 32k piece X of a shared 2M region and is
    storing X's new attributes; right then (its first store to X's attribute
    word, outside mmu_lock, with the invalidation in progress and the region's
    THP whole: a conversion releases no page) a vCPU faults on another gfn of
    the region."""
    x = REGION + 64
    y = REGION + 300
    vcpu = vm.task(1)
    vcpu.vcpu = vm.kvm.vcpu
    result: dict[str, object] = {}

    def fault() -> None:
        try:
            result["r"] = kvm_tdp_page_fault(vcpu, y, write=True)
        except InvariantViolation as v:
            result["v"] = v

    attrs = vm.layout.attrs + slot_index(vm.kvm, x) // 64
    converter = vm.task(2, words=vm.trigger_words(attrs, fault, on="fetch_or"))
    assert kvm_tdp_page_fault(vm.kvm, y, write=True) == RET_PF_FIXED  # a 2M leaf first
    assert is_large_pte(level2_entry(vm, REGION))
    n.kvm_vm_set_mem_attributes(converter, x, x + 8, private=True)
    assert converter.w.fired
    return result, x, y


def test_conversion_keeps_2m_faults_out_of_the_region(make_vm) -> None:
    vm = make_vm(tdx=True, huge_pages=1.0, chunk_shift=9)
    k = vm.kvm
    assert not kvm_mem_is_private(k, REGION) and kvm_mem_is_private(k, PRIVATE_REGION)
    result, x, y = _fault_during_conversion(vm)
    assert result == {"r": RET_PF_RETRY}  # the whole region was in the invalidation
    assert vm.words.load(lpage_info_i(k, REGION)) & KVM_LPAGE_MIXED_FLAG
    assert kvm_tdp_page_fault(k, y, write=True) == RET_PF_FIXED
    assert not is_large_pte(level2_entry(vm, REGION))  # mixed now: 4K
    assert not quiescent_check(k).violations
    n.kvm_vm_set_mem_attributes(k, x, x + 8, private=False)  # back to all shared
    assert not vm.words.load(lpage_info_i(k, REGION)) & KVM_LPAGE_MIXED_FLAG
    assert not quiescent_check(k).violations


def test_exact_range_conversion_maps_changing_gfns_with_a_2m_leaf(make_vm) -> None:
    vm = make_vm(tdx=True, huge_pages=1.0, chunk_shift=9,
                 variant="hugepage-attr-change-exact-range")
    k = vm.kvm
    result, x, y = _fault_during_conversion(vm)
    v = result["v"]
    assert isinstance(v, InvariantViolation)
    assert v.invariant == "huge page during attribute change" and v.details["gfn"] == REGION
    # and the consequence: the direct root maps private gfns through a 2M leaf
    e = level2_entry(vm, REGION)
    assert is_large_pte(e)
    names = {v.invariant for v in quiescent_check(k).violations}
    assert names & {"huge page over mixed attributes", "stale mapping after invalidate_end"}


# -- reference 9.7: child-removal-on-pfn-change -------------------------------

ALIAS_REGION = 100  # pool page 100 is the frame of region 100's first huge page


@pytest.mark.parametrize("variant", ["fixed", "child-removal-on-pfn-change"])
def test_huge_leaf_over_a_table_at_the_same_frame(make_vm, variant: str) -> None:
    vm = make_vm(huge_pages=1.0, variant=variant, alias_floor_words=2)
    k = vm.kvm
    gfn = ALIAS_REGION * 512
    # an instruction fetch links the region's level-1 table, placed at page 100
    assert kvm_tdp_page_fault(k, gfn + 1, write=False, exec_=True) == RET_PF_FIXED
    table = spte_to_child_pt(level2_entry(vm, gfn), PG_LEVEL_2M)
    assert table == ALIAS_REGION
    assert sp_pfn(table) == host_pfn(k, gfn)  # guest memory over top of the SP
    before = pages(vm)
    if variant == "fixed":
        assert kvm_tdp_page_fault(k, gfn + 2, write=True) == RET_PF_FIXED
        assert sp_state(k, table) == SP_REMOVED and pages(vm) == before - 1
        assert not quiescent_check(k).violations
        return
    with pytest.raises(InvariantViolation) as e:
        kvm_tdp_page_fault(k, gfn + 2, write=True)
    assert e.value.invariant == "leaked page-table page" and e.value.details["table"] == table
    assert sp_state(k, table) == SP_LINKED  # never torn down
    names = {v.invariant for v in quiescent_check(k).violations}
    assert names & {"tdp_mmu_pages accounting", "leaked page-table page"}
    assert vm.words.load(vm.layout.sp(table, SpMeta.STATE)) == SP_LINKED
