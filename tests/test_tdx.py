"""The TDX module's S-EPT rules, and the mirror protocol under hand-made interleavings."""

from __future__ import annotations

import pytest

from stress.arena import Globals, SpMeta
from stress.checks import quiescent_check, teardown_check
from stress.model.errors import InvariantViolation
from stress.model.mmu_page import external_spt, kvm_mmu_alloc_external_spt
from stress.model.spte import PG_LEVEL_2M, SPTE_INDEX, gfn_to_host_pfn, is_shadow_present_pte
from stress.model.tdp_iter import TdpIter
from stress.model.tdp_mmu import (
    RET_PF_FIXED,
    RET_PF_RETRY,
    kvm_mmu_uninit_tdp_mmu,
    kvm_tdp_page_fault,
    tdp_mmu_zap_leafs_atomic,
    tdp_mmu_zap_range_at_level,
)
from stress.model.tdx import (
    SEPT_BLOCKED,
    SEPT_FREE,
    SEPT_MAPPED,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_EPT_WALK_FAILED,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_ID_SEPT,
    TDX_SUCCESS,
    TDX_TLB_TRACKING_NOT_DONE,
    sept_state,
    tdx_operand_busy,
)

PRIVATE = 0x12340  # (gfn >> 3) & 1 == 0: private with the default 32k chunks
SHARED = PRIVATE + 8


def sept_leaf(vm, gfn: int) -> int:
    i = vm.kvm.tdx.module._walk(gfn, 1)
    return vm.words.load(i) if i is not None else -1


def mirror_leaf_sptep(vm, gfn: int) -> int:
    it = TdpIter(vm.kvm, vm.mirror_root, 4, gfn)
    while it.level > 1:
        assert it.try_step_down()
    return it.sptep


@pytest.fixture
def td(make_vm):
    return make_vm(tdx=True)


def test_private_fault_maps_mirror_and_sept(td) -> None:
    kvm = td.kvm
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=False) == RET_PF_FIXED
    e = sept_leaf(td, PRIVATE)
    assert sept_state(e) == SEPT_MAPPED
    assert kvm.stats["seamcalls"] == 4  # SEPT.ADD x3 (levels 4, 3, 2), PAGE.AUG
    assert kvm_tdp_page_fault(kvm, SHARED, write=False) == RET_PF_FIXED
    assert sept_state(sept_leaf(td, SHARED)) == SEPT_FREE  # shared: direct root only
    rep = quiescent_check(kvm)
    assert not rep.violations, rep.violations
    assert rep.tables == 8  # 4 per root
    kvm_mmu_uninit_tdp_mmu(kvm)
    assert not teardown_check(kvm).violations


def test_module_enforces_its_state_rules(td) -> None:
    kvm = td.kvm
    m = kvm.tdx.module
    assert m.tdh_mem_page_aug(PRIVATE, 7) == TDX_EPT_WALK_FAILED  # no parent tables
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    assert m.tdh_mem_page_aug(PRIVATE, 7) == TDX_EPT_ENTRY_STATE_INCORRECT  # already mapped
    assert m.tdh_mem_page_remove(PRIVATE) == TDX_EPT_ENTRY_STATE_INCORRECT  # not blocked
    assert m.tdh_mem_range_block(PRIVATE, 1) == TDX_SUCCESS
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_BLOCKED
    assert m.tdh_mem_page_remove(PRIVATE) == TDX_TLB_TRACKING_NOT_DONE
    assert m.tdh_mem_track() == TDX_SUCCESS
    # a table with a (blocked) child cannot be removed
    assert m.tdh_mem_range_block(PRIVATE, 2) == TDX_SUCCESS
    assert m.tdh_mem_track() == TDX_SUCCESS
    assert m.tdh_mem_sept_remove(PRIVATE, 2) == TDX_EPT_ENTRY_STATE_INCORRECT
    # the leaf's parent table is blocked: walks through it fail
    assert m.tdh_mem_page_remove(PRIVATE) == TDX_EPT_WALK_FAILED


def test_module_answers_busy_instead_of_waiting(td) -> None:
    kvm = td.kvm
    m = kvm.tdx.module
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    lay = td.layout
    # another SEAMCALL holds the lock of the leaf's S-EPT table
    table = (m._walk(PRIVATE, 1) - lay.pages) // 512
    assert td.words.spin_trylock(lay.sp(table, SpMeta.SEPT_LOCK), 999)
    err = m.tdh_mem_page_aug(PRIVATE + 1, 5)
    assert err == TDX_OPERAND_BUSY | TDX_OPERAND_ID_SEPT and tdx_operand_busy(err)
    td.words.spin_unlock(lay.sp(table, SpMeta.SEPT_LOCK))
    # an exclusive holder (BLOCK, SEPT.REMOVE) excludes every shared one
    assert td.words.write_trylock(lay.glob(Globals.SECURE_EPT_LOCK),
                                  lay.glob(Globals.SECURE_EPT_LOCK_OWNER), 999)
    assert tdx_operand_busy(m.tdh_mem_page_aug(PRIVATE + 1, 5))
    assert tdx_operand_busy(m.tdh_mem_range_block(PRIVATE, 1))
    # the fault path turns BUSY into a retry with the mirror restored
    assert kvm_tdp_page_fault(kvm, PRIVATE + 1, write=True) == RET_PF_RETRY
    assert kvm.stats["mirror_restores"] == 1
    td.words.write_unlock(lay.glob(Globals.SECURE_EPT_LOCK),
                          lay.glob(Globals.SECURE_EPT_LOCK_OWNER))
    assert kvm_tdp_page_fault(kvm, PRIVATE + 1, write=True) == RET_PF_FIXED
    assert not quiescent_check(kvm).violations


def test_zaps_remove_leaves_and_tables_from_the_sept(td) -> None:
    kvm = td.kvm
    for g in range(PRIVATE, PRIVATE + 8):
        assert kvm_tdp_page_fault(kvm, g, write=True) == RET_PF_FIXED
    kvm.read_lock()
    assert tdp_mmu_zap_leafs_atomic(kvm, td.mirror_root, PRIVATE, PRIVATE + 4) == 4
    kvm.read_unlock()
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_FREE
    assert sept_state(sept_leaf(td, PRIVATE + 5)) == SEPT_MAPPED
    assert not quiescent_check(kvm).violations
    kvm.read_lock()
    start = PRIVATE & ~511
    assert tdp_mmu_zap_range_at_level(kvm, td.mirror_root, start, start + 512, PG_LEVEL_2M,
                                      shared=True) == 1
    kvm.read_unlock()
    assert kvm.stats["sept_tables_removed"] == 1
    assert td.kvm.tdx.module._walk(PRIVATE, 1) is None  # the S-EPT table is gone
    assert not quiescent_check(kvm).violations
    kvm_mmu_uninit_tdp_mmu(kvm)
    assert not teardown_check(kvm).violations


def _seed000(td):
    """vCPU1 maps gfn x; right after its mirror cmpxchg, vCPU0 zaps x (shared mode).

    Seed 000's diagram: without the freeze vCPU0 sees the new mirror value, zaps
    it and removes sept[x] before vCPU1's SEAMCALL has created it.
    """
    vcpu1_kvm = td.task(1)
    zapper = td.task(2)
    assert kvm_tdp_page_fault(vcpu1_kvm, PRIVATE + 1, write=True) == RET_PF_FIXED  # path
    sptep = mirror_leaf_sptep(td, PRIVATE)

    def vcpu0_zaps() -> None:
        zapper.read_lock()
        try:
            tdp_mmu_zap_leafs_atomic(zapper, td.mirror_root, PRIVATE, PRIVATE + 1)
        finally:
            zapper.read_unlock()

    vcpu1 = td.task(1, words=td.trigger_words(sptep, vcpu0_zaps))
    return vcpu1, zapper


def test_seed000_race_is_closed_by_the_freeze(td) -> None:
    vcpu1, zapper = _seed000(td)
    assert kvm_tdp_page_fault(vcpu1, PRIVATE, write=True) == RET_PF_FIXED
    assert vcpu1.w.fired  # the zap ran while the entry was frozen: it skipped it
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_MAPPED
    assert is_shadow_present_pte(td.words.load(mirror_leaf_sptep(td, PRIVATE)))
    assert not quiescent_check(td.kvm).violations


def test_seed000_race_without_freeze_is_caught(make_vm) -> None:
    td = make_vm(tdx=True, variant="mirror-no-freeze")
    vcpu1, _zapper = _seed000(td)
    with pytest.raises(InvariantViolation) as e:
        kvm_tdp_page_fault(vcpu1, PRIVATE, write=True)
    # vCPU0 blocks sept[x] that vCPU1 has not AUG'd yet: the module refuses
    assert e.value.invariant == "TDX module error"
    assert e.value.details["seamcall"] == "TDH.MEM.RANGE.BLOCK"
    assert e.value.details["gfn"] == PRIVATE


def test_checker_reports_both_sides_of_a_divergence(td) -> None:
    kvm = td.kvm
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    # the S-EPT maps a page behind the mirror's back
    assert kvm.tdx.module.tdh_mem_page_aug(PRIVATE + 1, gfn_to_host_pfn(PRIVATE + 1)) == 0
    v = quiescent_check(kvm).violations[0]
    assert v.invariant == "mirror/S-EPT divergence"
    assert v.details["gfn"] == PRIVATE + 1
    assert v.details["mirror"] == "SHADOW_NONPRESENT_VALUE"
    assert v.details["sept"].startswith("MAPPED")


def test_selector_by_fault_skips_the_sept_on_zaps(make_vm) -> None:
    td = make_vm(tdx=True, variant="private-selector-by-fault")
    kvm = td.kvm
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    kvm.write_lock()
    from stress.model.tdp_mmu import kvm_tdp_mmu_zap_leafs

    assert kvm_tdp_mmu_zap_leafs(kvm, td.mirror_root, PRIVATE, PRIVATE + 1) == 1
    kvm.write_unlock()
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_MAPPED  # never told
    assert quiescent_check(kvm).violations[0].invariant == "mirror/S-EPT divergence"


def test_mirror_tables_carry_their_sept_page(td) -> None:
    kvm = td.kvm
    assert external_spt(kvm, td.mirror_root) == td.words.load(td.layout.glob(Globals.SEPT_ROOT))
    assert kvm_mmu_alloc_external_spt(kvm) is not None
    # ^ an allocated, unused S-EPT page is a leak the checker names
    assert quiescent_check(kvm).violations[0].invariant == "leaked S-EPT page"
    assert SPTE_INDEX(PRIVATE, 1) == PRIVATE & 511
