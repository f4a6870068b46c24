"""Root lifecycle in one process, with hand-made interleavings (seed 001)."""

from __future__ import annotations

import pytest

from stress.arena import SpMeta
from stress.model.errors import InvariantViolation
from stress.model.mmu_page import SP_FREE, tdp_mmu_free_sp_rcu_callback
from stress.model.roots import (
    KVM_DIRECT_ROOTS,
    is_root_invalid,
    kvm_mmu_reload,
    kvm_mmu_unload,
    kvm_tdp_mmu_get_root,
    kvm_tdp_mmu_invalidate_roots,
    kvm_tdp_mmu_put_root,
    listed_roots,
    tdp_mmu_pages_lock,
    tdp_mmu_pages_unlock,
)
from stress.model.roots import _new_root as new_root
from stress.model.tdp_mmu import (
    RET_PF_FIXED,
    kvm_mmu_uninit_tdp_mmu,
    kvm_mmu_zap_all_fast,
    kvm_tdp_page_fault,
)
from stress.oracles.quiescent import quiescent_check, teardown_check
from tests.conftest import tick_clock

GFN = 0x4321


def count(vm, root: int) -> int:
    return vm.words.load(vm.layout.sp(root, SpMeta.ROOT_COUNT))


def reclaim(kvm) -> int:
    return kvm.rcu.reclaim(lambda p: tdp_mmu_free_sp_rcu_callback(kvm, p))


def test_roots_are_shared_refcounted_and_freed_after_invalidation(vm) -> None:
    a, b = vm.kvm, vm.task(1)
    root = vm.root
    assert count(vm, root) == 2  # the creating vCPU's and the TDP MMU's gifted reference
    assert kvm_tdp_page_fault(b, GFN, write=True) == RET_PF_FIXED
    assert b.vcpu.root == root and count(vm, root) == 3  # a valid root is reused
    kvm_mmu_zap_all_fast(a)
    assert is_root_invalid(a, root) and count(vm, root) == 2  # zapped, gifted ref put
    # a vCPU entering next drops its obsolete root and loads a new one
    kvm_mmu_reload(b, b.vcpu)
    assert b.vcpu.root != root and not is_root_invalid(b, b.vcpu.root)
    assert b.stats["obsolete_roots_dropped"] == 1 and count(vm, root) == 1
    kvm_mmu_reload(a, a.vcpu)  # the last holder: the root goes to RCU
    assert root not in listed_roots(a)
    assert reclaim(a) >= 1
    assert vm.words.load(vm.layout.sp(root, SpMeta.STATE)) == SP_FREE
    assert not quiescent_check(a).violations
    kvm_mmu_unload(b, b.vcpu)
    kvm_mmu_uninit_tdp_mmu(a)
    rep = teardown_check(a)
    assert not rep.violations, rep.violations


def test_root_zap_yields_and_restarts_from_the_root(vm) -> None:
    a = vm.kvm
    for g in range(GFN, GFN + 300):
        assert kvm_tdp_page_fault(a, g, write=False) == RET_PF_FIXED
    tick_clock(a, 8)  # need_resched() after 8 iterator steps on average
    kvm_mmu_zap_all_fast(a)
    assert a.stats["yields"] >= 300 // 16
    assert a.stats["root_zaps"] == 1
    kvm_mmu_reload(a, a.vcpu)
    reclaim(a)
    assert not quiescent_check(a).violations


def test_invalid_roots_are_skipped_by_get_users(vm) -> None:
    a = vm.kvm
    a.write_lock()
    assert kvm_tdp_mmu_invalidate_roots(a, KVM_DIRECT_ROOTS) == 1
    a.write_unlock()
    b = vm.task(1)
    kvm_mmu_reload(b, b.vcpu)
    assert b.vcpu.root != vm.root  # never handed an invalid root


def _last_put_race(vm, on: str):
    """A puts what it thinks is the last reference; right after A's first access to
    the count (``on``), B tries to take a reference."""
    a, b = vm.kvm, vm.task(1)
    root = vm.root
    kvm_mmu_zap_all_fast(a)  # invalid, gifted reference put: only a's remains
    assert count(vm, root) == 1
    got = []

    def b_gets() -> None:
        got.append(kvm_tdp_mmu_get_root(b, root))

    putter = vm.task(0, words=vm.trigger_words(vm.layout.sp(root, SpMeta.ROOT_COUNT),
                                               b_gets, on=on))
    putter.read_lock()
    kvm_tdp_mmu_put_root(putter, root)
    putter.read_unlock()
    vm.putter = putter
    return b, root, got


def _force_zero_race(vm):
    b, root, got = _last_put_race(vm, "load")
    assert got == [True]  # dec_not_one saw 1, then b took a reference
    return b, root


def test_final_put_is_atomic_against_a_concurrent_get(vm) -> None:
    b, root, got = _last_put_race(vm, "fetch_add")
    assert got == [False]  # the count hit 0 in one step: inc_not_zero refuses
    assert root not in listed_roots(b)
    assert reclaim(b) == 0 and reclaim(vm.putter) == 1  # freed once, after RCU
    assert vm.words.load(vm.layout.sp(root, SpMeta.STATE)) == SP_FREE


def test_forced_zero_loses_a_concurrent_reference(make_vm) -> None:
    vm = make_vm(variant="root-put-force-zero")
    b, root = _force_zero_race(vm)
    assert root not in listed_roots(b)  # freed although b holds a reference
    b.read_lock()
    with pytest.raises(InvariantViolation) as e:
        kvm_tdp_mmu_put_root(b, root)
    assert e.value.invariant == "refcount underflow"


def test_double_put_frees_a_root_a_vcpu_still_holds(make_vm) -> None:
    vm = make_vm(variant="root-double-put")
    a, b = vm.kvm, vm.task(1)
    assert kvm_tdp_page_fault(b, GFN, write=True) == RET_PF_FIXED  # b holds vm.root too
    kvm_mmu_zap_all_fast(a)  # pass 1: zap, put the gifted reference
    assert count(vm, vm.root) == 2
    a.vcpu.root = None  # (a's reference is handed to the test: count stays 2)
    kvm_mmu_zap_all_fast(a)  # pass 2 puts it again
    kvm_mmu_zap_all_fast(a)  # and again: the count reaches 0 under b's feet
    assert vm.root not in listed_roots(a)
    with pytest.raises(InvariantViolation) as e:
        kvm_mmu_unload(b, b.vcpu)
    assert e.value.invariant == "refcount underflow"


def test_resurrect_warns_but_frees_once(make_vm) -> None:
    vm = make_vm(variant="root-put-resurrect")
    a = vm.kvm
    root = vm.root
    for g in range(GFN, GFN + 40):
        assert kvm_tdp_page_fault(a, g, write=False) == RET_PF_FIXED
    assert count(vm, root) == 1  # no gifted reference in the 2022 design
    tick_clock(a, 4)
    kvm_mmu_unload(a, a.vcpu)  # last put of a valid root: invalidate, resurrect, zap, put
    assert a.stats["refcount_set_resurrects"] == 1
    assert a.stats["root_zaps"] == 1 and a.stats["yields"] > 0
    assert root not in listed_roots(a) and reclaim(a) >= 1
    assert vm.words.load(vm.layout.sp(root, SpMeta.STATE)) == SP_FREE
    kvm_mmu_uninit_tdp_mmu(a)
    assert not teardown_check(a).violations


def test_two_valid_roots_of_one_role_are_reported(vm) -> None:
    """kvm_tdp_mmu_alloc_root's locked re-check keeps one valid root per role; a
    second one (the search skipped) is what the quiescent walk reports."""
    a = vm.kvm
    assert not quiescent_check(a).violations
    tdp_mmu_pages_lock(a)
    try:
        second = new_root(a, False)  # what a lost re-check would allocate
    finally:
        tdp_mmu_pages_unlock(a)
    rep = quiescent_check(a)
    assert [v.invariant for v in rep.violations] == ["two valid roots of one role"]
    assert {rep.violations[0].details["root"], rep.violations[0].details["other_root"]} == {
        vm.root, second}
