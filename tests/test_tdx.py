"""The TDX module's S-EPT rules, and upstream's mirror protocol (tdx.c at kvm-x86
09c6f74ecb86) under hand-made interleavings."""

from __future__ import annotations

import pytest

from stress.arena import Globals, Slot
from stress.model.errors import InvariantViolation
from stress.model.mmu_page import external_spt, kvm_mmu_alloc_external_spt
from stress.model.spte import PG_LEVEL_2M, SPTE_INDEX, gfn_to_host_pfn, is_shadow_present_pte
from stress.model.td import (
    GUEST_EPT_VIOLATION,
    GUEST_OK,
    GUEST_PENDING_VIOLATION,
    kvm_arch_vcpu_pre_fault_memory,
    td_exit,
    td_guest_access_private,
    tdx_handle_ept_violation,
    tdx_vcpu_run,
)
from stress.model.tdp_iter import TdpIter
from stress.model.tdp_mmu import (
    RET_PF_FIXED,
    RET_PF_RETRY,
    kvm_mmu_uninit_tdp_mmu,
    kvm_tdp_mmu_zap_leafs,
    kvm_tdp_page_fault,
    tdp_mmu_zap_leafs_atomic,
    tdp_mmu_zap_range_at_level,
)
from stress.model.tdx import (
    CALLER_TDCALL,
    ENTRY_LOCK,
    SEPT_FREE,
    SEPT_MAPPED,
    SEPT_PENDING,
    SEPT_PENDING_BLOCKED,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_EPT_WALK_FAILED,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_ID_SEPT,
    TDX_PREVIOUS_TLB_EPOCH_BUSY,
    TDX_SUCCESS,
    TDX_TLB_TRACKING_NOT_DONE,
    VP_ENTERED,
    VP_EPT_VIOLATION,
    sept_state,
    tdx_operand_busy,
)
from stress.model.tlb import H_MODE, OUTSIDE_GUEST_MODE
from stress.oracles.quiescent import quiescent_check, teardown_check

PRIVATE = 0x12340  # (gfn >> 3) & 1 == 0: private with the default 32k chunks
SHARED = PRIVATE + 8


def sept_leaf(vm, gfn: int) -> int:
    i = vm.kvm.tdx.module._walk(gfn, 1)
    return vm.words.load(i) if i is not None else -1


def mirror_sptep(vm, gfn: int, level: int = 1) -> int:
    it = TdpIter(vm.kvm, vm.mirror_root, gfn)
    while it.level > level:
        assert it.try_step_down()
    return it.sptep


def zap_private(kvm, start: int, end: int) -> int:
    """A guest_memfd punch-hole's zap: the mirror's leaves, mmu_lock for write."""
    kvm.write_lock()
    try:
        return kvm_tdp_mmu_zap_leafs(kvm, kvm.w.load(kvm.layout.glob(Globals.MIRROR_ROOT)),
                                     start, end)
    finally:
        kvm.write_unlock()


@pytest.fixture
def td(make_vm):
    return make_vm(tdx=True)


def test_private_fault_augs_a_pending_page_the_guest_accepts(td) -> None:
    kvm = td.kvm
    before = kvm.stats["seamcalls"]  # the fixture's TDH.MR.FINALIZE
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=False) == RET_PF_FIXED
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_PENDING  # AUGed, not accepted
    assert kvm.stats["seamcalls"] - before == 4  # SEPT.ADD x3 (levels 4, 3, 2), PAGE.AUG
    assert td_guest_access_private(kvm, PRIVATE) == GUEST_OK  # ACCEPT, then the access
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_MAPPED
    assert kvm_tdp_page_fault(kvm, SHARED, write=False) == RET_PF_FIXED
    assert sept_state(sept_leaf(td, SHARED)) == SEPT_FREE  # shared: direct root only
    rep = quiescent_check(kvm)
    assert not rep.violations, rep.violations
    assert rep.tables == 8  # 4 per root
    kvm_mmu_uninit_tdp_mmu(kvm)
    assert not teardown_check(kvm).violations
    assert kvm.stats["sept_removes"] == 1 and kvm.stats["sept_tables_reclaimed"] == 3


def test_module_enforces_its_state_rules(td) -> None:
    kvm = td.kvm
    m = kvm.tdx.module
    assert m.tdh_mem_page_aug(PRIVATE, 7) == TDX_EPT_WALK_FAILED  # no parent tables
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    assert m.tdh_mem_page_aug(PRIVATE, 7) == TDX_EPT_ENTRY_STATE_INCORRECT  # already mapped
    assert m.tdh_mem_page_remove(PRIVATE) == TDX_EPT_ENTRY_STATE_INCORRECT  # not blocked
    assert m.tdh_mem_range_block(PRIVATE, 1) == TDX_SUCCESS
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_PENDING_BLOCKED
    assert m.tdh_mem_page_remove(PRIVATE) == TDX_TLB_TRACKING_NOT_DONE
    # a vCPU still running with the epoch of the block keeps the tracking open
    td.words.store(td.layout.slot(1, Slot.TD_VCPU_EPOCH), td.words.load(
        td.layout.glob(Globals.TD_EPOCH)) + 1)
    assert m.tdh_mem_track() == TDX_SUCCESS
    assert m.tdh_mem_page_remove(PRIVATE) == TDX_TLB_TRACKING_NOT_DONE
    # ... and the next TRACK too, until KVM has kicked it out
    assert m.tdh_mem_track() == TDX_PREVIOUS_TLB_EPOCH_BUSY
    td.words.store(td.layout.slot(1, Slot.TD_VCPU_EPOCH), 0)
    assert m.tdh_mem_page_remove(PRIVATE) == TDX_SUCCESS
    # a table with a (blocked) child cannot be removed
    assert kvm_tdp_page_fault(kvm, PRIVATE + 2, write=True) == RET_PF_FIXED
    assert m.tdh_mem_range_block(PRIVATE, 2) == TDX_SUCCESS
    assert m.tdh_mem_track() == TDX_SUCCESS
    assert m.tdh_mem_sept_remove(PRIVATE, 2) == TDX_EPT_ENTRY_STATE_INCORRECT
    # the leaf's parent table is blocked: walks through it fail
    assert m.tdh_mem_page_remove(PRIVATE + 2) == TDX_EPT_WALK_FAILED


def test_module_answers_busy_and_names_the_holder(td) -> None:
    kvm = td.kvm
    m = kvm.tdx.module
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    lay = td.layout
    # the guest's TDCALL holds the lock of the entry PAGE.AUG wants
    entry_i = m._walk(PRIVATE + 1, 1)
    td.words.fetch_or(entry_i, ENTRY_LOCK | CALLER_TDCALL << 61)
    err = m.tdh_mem_page_aug(PRIVATE + 1, 5)
    assert err == TDX_OPERAND_BUSY | TDX_OPERAND_ID_SEPT and tdx_operand_busy(err)
    assert m.last_busy_holder == CALLER_TDCALL
    # the fault path turns BUSY into a retry with the mirror restored
    assert kvm_tdp_page_fault(kvm, PRIVATE + 1, write=True) == RET_PF_RETRY
    assert kvm.stats["mirror_restores"] == 1
    assert kvm.stats["busy:TDH.MEM.PAGE.AUG<TDCALL"] == 1
    assert not is_shadow_present_pte(td.words.load(mirror_sptep(td, PRIVATE + 1)))
    td.words.store(entry_i, td.words.load(entry_i) & ~(ENTRY_LOCK | 3 << 61))
    # an exclusive holder of the tree (a zero-step TDH.VP.ENTER) excludes AUG
    assert td.words.write_trylock(lay.glob(Globals.SECURE_EPT_LOCK),
                                  lay.glob(Globals.SECURE_EPT_LOCK_OWNER), 999)
    assert tdx_operand_busy(m.tdh_mem_page_aug(PRIVATE + 1, 5))
    td.words.write_unlock(lay.glob(Globals.SECURE_EPT_LOCK),
                          lay.glob(Globals.SECURE_EPT_LOCK_OWNER))
    assert kvm_tdp_page_fault(kvm, PRIVATE + 1, write=True) == RET_PF_FIXED
    assert not quiescent_check(kvm).violations


def test_removal_kicks_vcpus_out_and_retries_once(td) -> None:
    """tdh_do_no_vcpus: BLOCK meets a vCPU's TDCALL holding the entry; KVM sets
    wait_for_sept_zap, kicks every vCPU out of the TD (the TDCALL completes as
    the vCPU leaves guest mode) and the one retry succeeds."""
    kvm = td.kvm
    m = kvm.tdx.module
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    lay, w = td.layout, td.words
    entry_i = m._walk(PRIVATE, 1)
    w.fetch_or(entry_i, ENTRY_LOCK | CALLER_TDCALL << 61)  # vCPU 1's ACCEPT, in the TD
    mode_i = lay.tlb_hdr(1, H_MODE)
    w.store(mode_i, 1)  # IN_GUEST_MODE
    seen_flag = []

    def vcpu1_leaves_the_td() -> None:
        seen_flag.append(w.load(lay.glob(Globals.WAIT_FOR_SEPT_ZAP)))
        w.store(entry_i, w.load(entry_i) & ~(ENTRY_LOCK | 3 << 61))
        w.store(mode_i, OUTSIDE_GUEST_MODE)

    kicker = td.task(0, words=td.trigger_words(mode_i, vcpu1_leaves_the_td))
    assert zap_private(kicker, PRIVATE, PRIVATE + 1) == 1
    assert seen_flag == [1]  # vCPUs were held out of the TD during the retry
    assert kicker.stats["no_vcpus_retries"] == 1
    assert w.load(lay.glob(Globals.WAIT_FOR_SEPT_ZAP)) == 0
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_FREE
    assert not quiescent_check(kvm).violations


def test_retry_that_is_busy_again_is_a_tdx_bug(td) -> None:
    kvm = td.kvm
    m = kvm.tdx.module
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    entry_i = m._walk(PRIVATE, 1)
    td.words.fetch_or(entry_i, ENTRY_LOCK | CALLER_TDCALL << 61)  # never released
    with pytest.raises(InvariantViolation) as e:
        zap_private(kvm, PRIVATE, PRIVATE + 1)
    assert e.value.invariant == "TDX module error"
    assert e.value.details["seamcall"] == "TDH.MEM.RANGE.BLOCK"


def test_atomic_zap_of_a_mirror_spte_is_refused(td) -> None:
    """Upstream zaps mirror SPTEs only with mmu_lock held for write: the removal
    hook asserts it."""
    kvm = td.kvm
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    kvm.read_lock()
    with pytest.raises(InvariantViolation) as e:
        tdp_mmu_zap_leafs_atomic(kvm, td.mirror_root, PRIVATE, PRIVATE + 1)
    kvm.read_unlock()
    assert e.value.invariant == "lockdep"


def test_mirror_tables_are_freed_only_at_teardown(td) -> None:
    kvm = td.kvm
    for g in range(PRIVATE, PRIVATE + 8):
        assert kvm_tdp_page_fault(kvm, g, write=True) == RET_PF_FIXED
    assert zap_private(kvm, PRIVATE, PRIVATE + 4) == 4  # leaves: fine while the TD runs
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_FREE
    assert sept_state(sept_leaf(td, PRIVATE + 5)) == SEPT_PENDING
    assert not quiescent_check(kvm).violations
    start = PRIVATE & ~511
    kvm.write_lock()
    with pytest.raises(InvariantViolation) as e:
        tdp_mmu_zap_range_at_level(kvm, td.mirror_root, start, start + 512, PG_LEVEL_2M,
                                   shared=False)
    kvm.write_unlock()
    assert e.value.invariant == "mirror table freed while the TD runs"


def test_teardown_removes_private_pages_before_the_hkid_goes(td) -> None:
    kvm = td.kvm
    for g in range(PRIVATE, PRIVATE + 8):
        assert kvm_tdp_page_fault(kvm, g, write=True) == RET_PF_FIXED
    kvm_mmu_uninit_tdp_mmu(kvm)
    assert kvm.stats["sept_removes"] == 8  # guest_memfd release, HKID still assigned
    assert kvm.stats["sept_tables_reclaimed"] == 3  # after the HKID release
    assert not td.words.load(td.layout.glob(Globals.HKID))
    assert not teardown_check(kvm).violations


def _link_race(td, variant_words_action):  # noqa: ANN001
    """vCPU1 faults PRIVATE, whose level-1 table does not exist yet; right after
    its cmpxchg on the level-2 entry, ``variant_words_action`` runs."""
    vcpu1_kvm = td.task(1)
    assert kvm_tdp_page_fault(vcpu1_kvm, PRIVATE + 512, write=True) == RET_PF_FIXED
    sptep = mirror_sptep(td, PRIVATE, level=2)
    return td.task(1, words=td.trigger_words(sptep, variant_words_action))


def test_link_race_is_closed_by_the_freeze(td) -> None:
    """Sean's Jan 2023 diagram: vCPU0 must not walk into vCPU1's new mirror table
    before TDH.MEM.SEPT.ADD made it exist in the S-EPT.  Frozen, the entry makes
    vCPU0 retry."""
    vcpu0 = td.task(2)
    seen = []
    vcpu1 = _link_race(td, lambda: seen.append(kvm_tdp_page_fault(vcpu0, PRIVATE + 1, True)))
    assert kvm_tdp_page_fault(vcpu1, PRIVATE, write=True) == RET_PF_FIXED
    assert seen == [RET_PF_RETRY]
    assert kvm_tdp_page_fault(vcpu0, PRIVATE + 1, write=True) == RET_PF_FIXED
    assert not quiescent_check(td.kvm).violations


def test_link_race_without_freeze_is_caught(make_vm) -> None:
    td = make_vm(tdx=True, variant="mirror-no-freeze")
    vcpu0 = td.task(2)
    vcpu1 = _link_race(td, lambda: kvm_tdp_page_fault(vcpu0, PRIVATE + 1, True))
    with pytest.raises(InvariantViolation) as e:
        kvm_tdp_page_fault(vcpu1, PRIVATE, write=True)
    # vCPU0 AUGs under a parent the S-EPT does not have yet: the module refuses
    assert e.value.invariant == "TDX module error"
    assert e.value.details["seamcall"] == "TDH.MEM.PAGE.AUG"
    assert e.value.details["error"] == "TDX_EPT_WALK_FAILED"


def test_page_removed_behind_the_guests_back_kills_the_td(td) -> None:
    kvm = td.kvm
    m = kvm.tdx.module
    assert td_guest_access_private(kvm, PRIVATE) == GUEST_EPT_VIOLATION  # not AUGed yet
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    assert td_guest_access_private(kvm, PRIVATE) == GUEST_OK
    # KVM drops the page without a conversion or punch-hole (the host page is the
    # same), and a fault AUGs it again: the guest finds its accepted page PENDING
    zap_private(kvm, PRIVATE, PRIVATE + 1)
    assert td_guest_access_private(kvm, PRIVATE) == GUEST_EPT_VIOLATION
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    assert quiescent_check(kvm).violations[0].invariant == "accepted private page lost"
    how = td_guest_access_private(kvm, PRIVATE)
    assert how == GUEST_PENDING_VIOLATION
    with pytest.raises(InvariantViolation) as e:
        tdx_handle_ept_violation(kvm, PRIVATE, True, how)
    assert e.value.invariant == "TD killed: guest access before accept"
    assert td.words.load(td.layout.glob(Globals.VM_DEAD)) == 1
    assert sept_state(m.entry(PRIVATE)) == SEPT_PENDING


def test_zero_step_mitigation_takes_the_sept_tree(td) -> None:
    """After more entries re-faulting at one RIP than the threshold, TDH.VP.ENTER
    walks the S-EPT with the tree lock held exclusively: it says BUSY while an
    AUG holds the tree shared, and re-raises the EPT violation while the gfn is
    still unmapped."""
    kvm = td.kvm
    lay, w = td.layout, td.words
    m = kvm.tdx.module
    for _ in range(m.zero_step_threshold):
        assert tdx_vcpu_run(kvm, 7, PRIVATE) == VP_ENTERED
        td_exit(kvm)
    assert w.read_trylock(lay.glob(Globals.SECURE_EPT_LOCK))  # another vCPU's AUG
    assert tdx_vcpu_run(kvm, 7, PRIVATE) < 0  # BUSY: no entry
    w.read_unlock(lay.glob(Globals.SECURE_EPT_LOCK))
    assert kvm.stats["busy:TDH.VP.ENTER<?"] == 1
    assert tdx_vcpu_run(kvm, 7, PRIVATE) == VP_EPT_VIOLATION  # still unmapped
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    assert tdx_vcpu_run(kvm, 7, PRIVATE) == VP_ENTERED
    td_exit(kvm)
    assert kvm.stats["zero_step_walks"] == 2  # the BUSY entry never got to walk
    assert tdx_vcpu_run(kvm, None, None) == VP_ENTERED  # progress: the count resets
    assert w.load(lay.slot(0, Slot.ZERO_STEP_COUNT)) == 0
    td_exit(kvm)


def test_vp_enter_holds_the_tdr_until_the_td_exit(td) -> None:
    kvm = td.kvm
    m = kvm.tdx.module
    other = td.task(1)
    assert tdx_vcpu_run(other, None, None) == VP_ENTERED
    assert tdx_operand_busy(m.tdh_mr_extend(PRIVATE))  # MR.EXTEND wants the TDR exclusively
    td_exit(other)
    assert m.tdh_mr_extend(PRIVATE) == TDX_SUCCESS


def test_prefault_maps_shared_gfns_in_the_direct_root(td) -> None:
    kvm = td.kvm
    assert kvm_arch_vcpu_pre_fault_memory(kvm, SHARED, SHARED + 4) == 0
    assert kvm_arch_vcpu_pre_fault_memory(kvm, PRIVATE, PRIVATE + 4) == 0
    assert sept_state(sept_leaf(td, PRIVATE + 3)) == SEPT_PENDING
    assert sept_state(sept_leaf(td, SHARED)) == SEPT_FREE
    assert not quiescent_check(kvm).violations


def test_prefault_without_direct_bits_maps_shared_gfns_in_the_mirror(make_vm) -> None:
    td = make_vm(tdx=True, variant="prefault-gpa-without-direct-bits")
    with pytest.raises(InvariantViolation) as e:
        kvm_arch_vcpu_pre_fault_memory(td.kvm, SHARED, SHARED + 1)
    assert e.value.invariant == "gfn mapped in the wrong root"


def test_prefault_is_refused_before_the_td_is_finalized(make_vm) -> None:
    td = make_vm(tdx=True, runnable=False)
    assert kvm_arch_vcpu_pre_fault_memory(td.kvm, PRIVATE, PRIVATE + 1) == -95


def test_checker_reports_both_sides_of_a_divergence(td) -> None:
    kvm = td.kvm
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    # the S-EPT maps a page behind the mirror's back
    assert kvm.tdx.module.tdh_mem_page_aug(PRIVATE + 1, gfn_to_host_pfn(PRIVATE + 1)) == 0
    v = quiescent_check(kvm).violations[0]
    assert v.invariant == "mirror/S-EPT divergence"
    assert v.details["gfn"] == PRIVATE + 1
    assert v.details["mirror"] == "SHADOW_NONPRESENT_VALUE"
    assert v.details["sept"].startswith("PENDING")


def test_selector_by_fault_skips_the_sept_on_zaps(make_vm) -> None:
    td = make_vm(tdx=True, variant="private-selector-by-fault")
    kvm = td.kvm
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    assert zap_private(kvm, PRIVATE, PRIVATE + 1) == 1
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_PENDING  # never told
    assert quiescent_check(kvm).violations[0].invariant == "mirror/S-EPT divergence"


def test_mirror_tables_carry_their_sept_page(td) -> None:
    kvm = td.kvm
    assert external_spt(kvm, td.mirror_root) == td.words.load(td.layout.glob(Globals.SEPT_ROOT))
    assert kvm_mmu_alloc_external_spt(kvm) is not None
    # ^ an allocated, unused S-EPT page is a leak the checker names
    assert quiescent_check(kvm).violations[0].invariant == "leaked S-EPT page"
    assert SPTE_INDEX(PRIVATE, 1) == PRIVATE & 511


def test_memslot_move_waits_for_srcu_readers_and_zaps_the_slot(td) -> None:
    """A vCPU handling a fault on a slot being moved holds kvm->srcu; the fixed
    local retry loop lets go when the slot is invalid, so the move completes; the
    pre-fault of a gfn of the invalid slot says -EAGAIN."""
    from stress.model.memslot import (
        memslot_invalid,
        srcu_read_lock,
        srcu_read_unlock,
    )
    from stress.model.notifier import kvm_set_memory_region_move

    kvm = td.kvm
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    lay, w = td.layout, td.words
    w.store(lay.glob(Globals.MEMSLOT_INVALID_START), PRIVATE)
    w.store(lay.glob(Globals.MEMSLOT_INVALID_END), PRIVATE + 512)
    assert memslot_invalid(kvm, PRIVATE + 1)
    srcu_read_lock(kvm, PRIVATE + 1)
    assert tdx_handle_ept_violation(kvm, PRIVATE + 1, True, GUEST_EPT_VIOLATION) == RET_PF_RETRY
    srcu_read_unlock(kvm)  # the loop let go: back to the guest, out of kvm->srcu
    assert kvm_arch_vcpu_pre_fault_memory(kvm, PRIVATE + 1, PRIVATE + 2) == -11  # -EAGAIN
    w.store(lay.glob(Globals.MEMSLOT_INVALID_END), 0)
    mover = td.task(1)
    assert kvm_set_memory_region_move(mover, PRIVATE & ~511, (PRIVATE & ~511) + 512) == 1
    assert sept_state(sept_leaf(td, PRIVATE)) == SEPT_FREE
    assert not quiescent_check(kvm).violations


@pytest.mark.parametrize("variant", ["fixed", "mirror-zap-shared"])
def test_memslot_move_zaps_the_mirror_under_every_valid_protocol(make_vm, variant: str) -> None:
    """kvm_mmu_zap_memslot zaps private and shared mappings under the write lock
    (attr_filter KVM_FILTER_PRIVATE | KVM_FILTER_SHARED): the mirror-zap-shared
    proposal moves only the zaps of conversions and punch-holes to the read lock,
    so a memslot move must still take the mirror's leaf and its S-EPT page out."""
    from stress.model.notifier import kvm_set_memory_region_move

    vm = make_vm(tdx=True, variant=variant)
    kvm = vm.kvm
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    assert kvm_tdp_page_fault(kvm, SHARED, write=True) == RET_PF_FIXED
    base = PRIVATE & ~511
    assert kvm_set_memory_region_move(vm.task(1), base, base + 512) == 2
    assert sept_state(sept_leaf(vm, PRIVATE)) == SEPT_FREE
    assert not is_shadow_present_pte(vm.words.load(mirror_sptep(vm, PRIVATE)))
    assert not quiescent_check(kvm).violations


def test_memslot_move_names_the_reader_it_waits_for(td) -> None:
    from stress.model.memslot import srcu_read_lock
    from stress.model.notifier import kvm_set_memory_region_move

    reader = td.task(1)
    srcu_read_lock(reader, PRIVATE)  # never lets go
    mover = td.task(2)
    with pytest.raises(InvariantViolation) as e:
        kvm_set_memory_region_move(mover, PRIVATE & ~511, (PRIVATE & ~511) + 512)
    assert e.value.invariant == "livelock" and e.value.details["site"] == "synchronize_srcu"
    assert e.value.details["held_by_worker"] == 1 and e.value.details["gfn"] == PRIVATE
    assert "waiting for worker 1" in str(e.value)


@pytest.mark.parametrize("variant", ["fixed", "mirror-zap-shared"])
def test_a_conversion_releases_no_page_and_the_vmm_discards_the_old_backing(
        make_vm, variant: str) -> None:
    """KVM_SET_MEMORY_ATTRIBUTES to private over a range that is partly private
    already releases no page; the VMM's conversion, the ioctl and its discard,
    frees the VMM's pages of the range and no guest_memfd page, so the mirror
    leaf of the gfn that was private already stays current."""
    from stress.model.host import host_page_gen
    from stress.model.kvm import kvm_mem_is_private
    from stress.model.notifier import kvm_vm_set_mem_attributes, vmm_convert_memory

    vm = make_vm(tdx=True, variant=variant)
    kvm = vm.kvm
    assert kvm_tdp_page_fault(kvm, PRIVATE, write=True) == RET_PF_FIXED
    assert td_guest_access_private(kvm, PRIVATE) == GUEST_OK
    assert kvm_tdp_page_fault(kvm, SHARED, write=True) == RET_PF_FIXED

    def gens() -> list[int]:
        return [host_page_gen(kvm, g, p) for g in (PRIVATE, SHARED) for p in (False, True)]

    before = gens()
    kvm_vm_set_mem_attributes(vm.task(1), PRIVATE, SHARED + 8, private=True)
    assert kvm_mem_is_private(kvm, SHARED)
    assert gens() == before  # the ioctl releases nothing
    kvm_vm_set_mem_attributes(vm.task(1), SHARED, SHARED + 8, private=False)
    assert gens() == before
    vmm_convert_memory(vm.task(1), PRIVATE, SHARED + 8, private=True)
    after = gens()
    assert after[0] != before[0] and after[2] != before[2]  # the VMM's pages of the range
    assert after[1::2] == before[1::2]  # and no guest_memfd page
    assert is_shadow_present_pte(vm.words.load(mirror_sptep(vm, PRIVATE)))
    assert sept_state(sept_leaf(vm, PRIVATE)) == SEPT_MAPPED
    assert not quiescent_check(kvm).violations


def test_a_signal_interrupts_init_mem_region_where_it_stopped(make_vm) -> None:
    """KVM_TDX_INIT_MEM_REGION checks signal_pending() before each page and in the
    map loop: a signal (the VMM's kick) ends it with -EINTR, the region advanced
    past the pages already added, so the restart adds each page once; an EINTR
    with the signal pending is no 'EINTR without a signal'."""
    from stress.model.td import tdx_vcpu_init_mem_region

    td = make_vm(tdx=True, runnable=False)
    kvm = td.kvm
    region = [PRIVATE + k for k in range(6)]
    # the next page's check (after one page), then the map loop's (of that next page)
    for arrive, added in ((3, 1), (2, 0)):
        kvm.signal_in = arrive
        before = kvm.stats["init_mem_pages"]
        assert tdx_vcpu_init_mem_region(kvm, region) == -4
        kvm.hooks.sys_exit(kvm, "KVM_TDX_INIT_MEM_REGION", -4)
        assert kvm.stats["init_mem_pages"] - before == added
        kvm.signal_in = -1
    assert region == [PRIVATE + k for k in range(1, 6)]
    assert tdx_vcpu_init_mem_region(kvm, region) == 0 and region == []
    assert kvm.stats["init_mem_pages"] == 6
    assert kvm.stats["page_adds"] == 6
