"""Marking shadow pages unsync from TDP MMU faults (seed 004), interleaved by hand."""

from __future__ import annotations

import pytest

from stress.arena import Globals
from stress.model import unsync as u
from stress.model.errors import InvariantViolation
from stress.model.tdp_mmu import RET_PF_EMULATE, RET_PF_FIXED, kvm_tdp_page_fault
from stress.oracles.unsync import check_unsync_state

BASE = 0x8000  # shadowed gfns: BASE + k shadows leaf k; leaves 0 and 1 are siblings


def shadow(vm) -> None:
    vm.shadowed.update({BASE + k: u.leaf_sp(k) for k in range(u.N_LEAVES)})


def word(vm, sp: int, off: int) -> int:
    return vm.words.load(vm.layout.shadow_sp(sp, off))


def sync(kvm) -> list[int]:
    kvm.write_lock()
    try:
        return u.kvm_mmu_sync_roots(kvm)
    finally:
        kvm.write_unlock()


def test_fixed_marks_parents_and_sync_clears_them(vm) -> None:
    shadow(vm)
    a, b = vm.kvm, vm.task(1)
    assert kvm_tdp_page_fault(a, BASE, write=True) == RET_PF_FIXED
    assert kvm_tdp_page_fault(b, BASE + 1, write=True) == RET_PF_FIXED
    mid = u.mid_sp(0)
    assert word(vm, mid, u.UNSYNC_CHILDREN) == 2 and word(vm, mid, u.BITMAP) == 0b11
    assert word(vm, u.ROOT_SP, u.UNSYNC_CHILDREN) == 1
    assert vm.words.load(vm.layout.glob(Globals.STAT_MMU_UNSYNC)) == 2
    assert a.stats["unsync_lock_taken"] == 1 and not check_unsync_state(a)
    assert sorted(sync(a)) == [u.leaf_sp(0), u.leaf_sp(1)]
    assert word(vm, u.ROOT_SP, u.UNSYNC_CHILDREN) == 0 and not check_unsync_state(a)


def _race(vm, variant_target: int, action) -> None:  # noqa: ANN001
    """Task A unsyncs leaf 0; right after A's load of ``variant_target``, B runs."""
    shadow(vm)
    vm.kvm.read_lock()
    a = vm.task(0, words=vm.trigger_words(variant_target, action, on="load"))
    a.lock_mode = vm.kvm.lock_mode
    u.mmu_try_to_unsync_pages(a, u.leaf_sp(0))
    vm.kvm.read_unlock()


def _b_unsyncs(vm, k: int):  # noqa: ANN202
    b = vm.task(1)

    def act() -> None:
        b.read_lock()
        u.mmu_try_to_unsync_pages(b, u.leaf_sp(k))
        b.read_unlock()
    return act


def test_without_lock_a_lost_bit_hides_an_unsync_page(make_vm) -> None:
    vm = make_vm(variant="unsync-without-lock")
    mid = u.mid_sp(0)
    _race(vm, vm.layout.shadow_sp(mid, u.BITMAP), _b_unsyncs(vm, 1))
    # A stored its bit over B's: two unsync children, one bit, count 2
    assert word(vm, mid, u.BITMAP) == 0b01 and word(vm, mid, u.UNSYNC_CHILDREN) == 2
    bad = [name for name, _m, _d in check_unsync_state(vm.kvm)]
    assert "unsync_children != popcount(bitmap)" in bad
    assert "unsync page unreachable" in bad
    with pytest.raises(InvariantViolation) as e:
        sync(vm.kvm)  # the sync never finds leaf 1
    assert e.value.invariant == "missed sync"
    assert e.value.details["shadow_pages"] == [u.leaf_sp(1)]


def test_without_lock_a_lost_increment_underflows(make_vm) -> None:
    vm = make_vm(variant="unsync-without-lock")
    mid = u.mid_sp(0)
    _race(vm, vm.layout.shadow_sp(mid, u.UNSYNC_CHILDREN), _b_unsyncs(vm, 1))
    # both bits are there, but both tasks stored count 1
    assert word(vm, mid, u.BITMAP) == 0b11 and word(vm, mid, u.UNSYNC_CHILDREN) == 1
    with pytest.raises(InvariantViolation) as e:
        sync(vm.kvm)  # clearing the second bit takes the count below zero
    assert e.value.invariant == "unsync_children underflow"


def test_lock_without_recheck_unsyncs_twice(make_vm) -> None:
    vm = make_vm(variant="unsync-lock-no-recheck")
    _race(vm, vm.layout.shadow_sp(u.leaf_sp(0), u.UNSYNC), _b_unsyncs(vm, 0))
    assert vm.words.load(vm.layout.glob(Globals.STAT_MMU_UNSYNC)) == 2  # one page
    bad = check_unsync_state(vm.kvm)
    assert [name for name, _m, _d in bad] == ["kvm->stat.mmu_unsync accounting"]


def test_the_recheck_under_the_lock_skips_a_page_done_meanwhile(vm) -> None:
    _race(vm, vm.layout.shadow_sp(u.leaf_sp(0), u.UNSYNC), _b_unsyncs(vm, 0))
    assert vm.words.load(vm.layout.glob(Globals.STAT_MMU_UNSYNC)) == 1
    assert not check_unsync_state(vm.kvm)


def test_alternative_1_write_protects_and_emulates(make_vm) -> None:
    vm = make_vm(variant="unsync-write-protect")
    shadow(vm)
    assert kvm_tdp_page_fault(vm.kvm, BASE, write=True) == RET_PF_EMULATE
    assert word(vm, u.leaf_sp(0), u.UNSYNC) == 0
    assert kvm_tdp_page_fault(vm.kvm, BASE, write=True) == RET_PF_EMULATE  # every write
    assert vm.kvm.stats["shadowed_writes"] == 2 and not check_unsync_state(vm.kvm)
