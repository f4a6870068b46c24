"""The model's functions in one process, interleaved by hand.

Two Kvm objects on the same arena are two tasks: each has its own RCU reader
slot and lock state, so a test can stop one task in the middle of a walk, run
another, and resume the first: the race the stress runs find by chance,
replayed deterministically.
"""

from __future__ import annotations

import pytest

from stress import oracles
from stress.arena import Globals, SpMeta
from stress.atomics import Words
from stress.model.errors import InvariantViolation
from stress.model.mmu_page import (
    SP_FREE,
    SP_LINKED,
    SP_REMOVED,
    tdp_mmu_alloc_sp,
    tdp_mmu_free_sp,
    tdp_mmu_free_sp_rcu_callback,
    tdp_mmu_init_sp,
)
from stress.model.spte import (
    FROZEN_SPTE,
    PG_LEVEL_2M,
    SHADOW_NONPRESENT_VALUE,
    gfn_to_host_pfn,
    is_shadow_present_pte,
    make_spte,
    spte_to_pfn,
)
from stress.model.tdp_iter import TdpIter, walk_params
from stress.model.tdp_mmu import (
    EBUSY,
    RET_PF_FIXED,
    RET_PF_SPURIOUS,
    KvmPageFault,
    kvm_mmu_uninit_tdp_mmu,
    kvm_tdp_mmu_map,
    kvm_tdp_mmu_zap_leafs,
    kvm_tdp_page_fault,
    tdp_mmu_set_spte_atomic,
    tdp_mmu_zap_range_at_level,
    tdp_mmu_zap_root,
)
from stress.oracles.quiescent import quiescent_check, teardown_check

GFN = 0x12345


def leaf_of(vm, gfn: int) -> int:
    it = TdpIter(vm.kvm, vm.root, gfn)
    while it.level > 1 and it.try_step_down():
        pass
    return it.old_spte if it.level == 1 else SHADOW_NONPRESENT_VALUE


def test_fault_installs_leaf_then_spurious(vm) -> None:
    kvm = vm.kvm
    assert kvm_tdp_page_fault(kvm, GFN, write=False) == RET_PF_FIXED
    spte = leaf_of(vm, GFN)
    assert is_shadow_present_pte(spte) and spte_to_pfn(spte) == gfn_to_host_pfn(GFN)
    assert kvm_tdp_page_fault(kvm, GFN, write=False) == RET_PF_SPURIOUS
    # a write to a read-only leaf upgrades it in place (same pfn: legal)
    assert kvm_tdp_page_fault(kvm, GFN, write=True) == RET_PF_FIXED
    assert kvm.stats["tables_linked"] == 3  # levels 3, 2, 1 under the root
    assert vm.words.load(vm.layout.glob(Globals.TDP_MMU_PAGES)) == 3
    rep = quiescent_check(kvm)
    assert not rep.violations and rep.tables == 4 and rep.leaves == 1


def test_leaf_zap_and_teardown_return_every_page(vm) -> None:
    kvm = vm.kvm
    for g in range(GFN, GFN + 600):
        assert kvm_tdp_page_fault(kvm, g, write=True) == RET_PF_FIXED
    kvm.write_lock()
    assert kvm_tdp_mmu_zap_leafs(kvm, vm.root, GFN, GFN + 600) == 600
    kvm.write_unlock()
    assert not is_shadow_present_pte(leaf_of(vm, GFN + 10))
    assert not quiescent_check(kvm).violations
    kvm_mmu_uninit_tdp_mmu(kvm)
    rep = teardown_check(kvm)
    assert not rep.violations, rep.violations
    assert rep.states == {"FREE": vm.layout.n_pages}


def test_shared_subtree_zap_freezes_children_and_frees_after_grace_period(vm) -> None:
    kvm, other = vm.kvm, vm.task(1)
    assert kvm_tdp_page_fault(kvm, GFN, write=True) == RET_PF_FIXED
    leaf_table = TdpIter(kvm, vm.root, GFN)
    while leaf_table.level > 1:
        assert leaf_table.try_step_down()
    table = leaf_table.pt_path[1]
    other.rcu.rcu_read_lock()  # a walker somewhere: the grace period cannot end
    kvm.read_lock()
    start = GFN & ~511
    assert tdp_mmu_zap_range_at_level(kvm, vm.root, start, start + 512, PG_LEVEL_2M,
                                      shared=True) == 1
    kvm.read_unlock()
    lay = vm.layout
    assert vm.words.load(lay.sp(table, SpMeta.STATE)) == SP_REMOVED
    # every child is frozen, present or not
    assert vm.words.count_equal(lay.spt(table), 512, FROZEN_SPTE) == 512
    free = lambda p: tdp_mmu_free_sp_rcu_callback(kvm, p)  # noqa: E731
    assert kvm.rcu.reclaim(free) == 0  # still inside the other task's read section
    other.rcu.rcu_read_unlock()
    assert kvm.rcu.reclaim(free) == 1
    assert vm.words.load(lay.sp(table, SpMeta.STATE)) == SP_FREE
    assert not quiescent_check(kvm).violations


def _late_fault_race(vm):
    """vCPU walks to the leaf table; a zapper unlinks it; the vCPU's cmpxchg comes late."""
    vcpu, zapper = vm.task(1), vm.task(2)
    assert kvm_tdp_page_fault(zapper, GFN + 1, write=False) == RET_PF_FIXED  # build the path
    vcpu.read_lock()
    vcpu.rcu.rcu_read_lock()
    it = TdpIter(vcpu, vm.root, GFN)
    while it.level > 1:
        assert it.try_step_down()
    assert it.old_spte == SHADOW_NONPRESENT_VALUE  # snapshot: empty
    zapper.read_lock()
    start = GFN & ~511
    assert tdp_mmu_zap_range_at_level(zapper, vm.root, start, start + 512, PG_LEVEL_2M,
                                      shared=True) == 1
    zapper.read_unlock()
    r = tdp_mmu_set_spte_atomic(vcpu, it, make_spte(gfn_to_host_pfn(GFN), 1, True))
    vcpu.rcu.rcu_read_unlock()
    vcpu.read_unlock()
    return r, it, zapper


def test_late_fault_into_removed_table_fails_with_freeze(vm) -> None:
    r, it, zapper = _late_fault_race(vm)
    assert r == -EBUSY and it.old_spte == FROZEN_SPTE  # refreshed: retry from the root
    zapper.rcu.reclaim(lambda p: tdp_mmu_free_sp_rcu_callback(zapper, p))
    assert not quiescent_check(vm.kvm).violations


def test_late_fault_into_removed_table_is_caught_without_freeze(make_vm) -> None:
    vm = make_vm(variant="zap-without-freeze")
    r, _it, zapper = _late_fault_race(vm)
    assert r == 0  # the cmpxchg succeeded in a dead table
    assert quiescent_check(vm.kvm).violations[0].invariant == "SPTE installed in removed table"
    with pytest.raises(InvariantViolation) as e:
        zapper.rcu.reclaim(lambda p: tdp_mmu_free_sp_rcu_callback(zapper, p))
    assert e.value.invariant == "SPTE installed in removed table"
    assert e.value.details["gfn"] == GFN


def test_walker_in_freed_table_is_caught_without_grace_period(make_vm) -> None:
    vm = make_vm(variant="free-without-grace-period")
    vcpu, zapper = vm.task(1), vm.task(2)
    assert kvm_tdp_page_fault(zapper, GFN, write=False) == RET_PF_FIXED
    vcpu.read_lock()
    vcpu.rcu.rcu_read_lock()
    it = TdpIter(vcpu, vm.root, GFN)
    while it.level > 1:
        assert it.try_step_down()
    zapper.read_lock()
    start = GFN & ~511
    tdp_mmu_zap_range_at_level(zapper, vm.root, start, start + 512, PG_LEVEL_2M, shared=True)
    zapper.read_unlock()
    with pytest.raises(InvariantViolation) as e:
        it.read_spte()  # the walker re-reads its entry: the page is gone
    assert e.value.invariant == "use-after-free of page-table page"
    vcpu.rcu.rcu_read_unlock()
    vcpu.read_unlock()


def test_lockdep_assertions(vm) -> None:
    with pytest.raises(InvariantViolation) as e:
        kvm_tdp_mmu_zap_leafs(vm.kvm, vm.root, 0, 10)
    assert e.value.invariant == "lockdep"


def test_lockdep_reports_recursive_locking_and_a_bad_unlock(vm) -> None:
    """A task that takes mmu_lock while holding it would wait for itself; one that
    releases a mode it does not hold breaks the lock's count.  Both are lockdep's."""
    kvm = vm.kvm
    for hold, take, drop in ((kvm.write_lock, kvm.read_lock, kvm.write_unlock),
                             (kvm.read_lock, kvm.write_lock, kvm.read_unlock),
                             (kvm.read_lock, kvm.read_lock, kvm.read_unlock)):
        hold()
        with pytest.raises(InvariantViolation, match="recursive locking") as e:
            take()
        assert e.value.invariant == "lockdep"
        drop()
    with pytest.raises(InvariantViolation, match="bad unlock balance"):
        kvm.read_unlock()
    kvm.read_lock()
    with pytest.raises(InvariantViolation, match="bad unlock balance"):
        kvm.write_unlock()
    kvm.read_unlock()
    kvm.write_lock()  # the lock is free again: nothing was left held
    kvm.write_unlock()


def test_checker_finds_corruption(vm) -> None:
    kvm = vm.kvm
    assert kvm_tdp_page_fault(kvm, GFN, write=False) == RET_PF_FIXED
    it = TdpIter(kvm, vm.root, GFN)
    while it.level > 1:
        it.try_step_down()
    vm.words.store(it.sptep, FROZEN_SPTE)
    assert quiescent_check(kvm).violations[0].invariant == "FROZEN SPTE reachable at quiescence"
    vm.words.store(it.sptep, make_spte(gfn_to_host_pfn(GFN + 1), 1, False))
    assert quiescent_check(kvm).violations[0].invariant == "leaf maps wrong pfn"
    vm.words.store(it.sptep, SHADOW_NONPRESENT_VALUE)
    vm.words.fetch_add(vm.layout.glob(Globals.TDP_MMU_PAGES), 1)
    assert quiescent_check(kvm).violations[0].invariant == "tdp_mmu_pages accounting"
    vm.words.fetch_add(vm.layout.glob(Globals.TDP_MMU_PAGES), -1)
    leaked = 200
    vm.words.store(vm.layout.sp(leaked, SpMeta.STATE), SP_LINKED)
    assert quiescent_check(kvm).violations[0].invariant == "leaked page-table page"


def test_walks_take_the_root_level_from_the_root_role(vm) -> None:
    """tdp_iter_start takes root->role.level: a 5-level root, in a run whose
    geometry says 4, is faulted into, walked (step by step and natively) and
    zapped (tdp_mmu_zap_root's last pass at the root's level) from level 5."""
    kvm, w, lay = vm.kvm, vm.words, vm.layout
    assert vm.geometry.root_level == 4
    root5 = tdp_mmu_alloc_sp(kvm)
    assert root5 is not None
    tdp_mmu_init_sp(kvm, root5, 5, 0)
    w.store(lay.sp(root5, SpMeta.STATE), SP_LINKED)
    pages = w.load(lay.glob(Globals.TDP_MMU_PAGES))
    fault = KvmPageFault(gfn=GFN, write=True, pfn=gfn_to_host_pfn(GFN))
    kvm.read_lock()
    try:
        assert kvm_tdp_mmu_map(kvm, root5, fault) == RET_PF_FIXED
    finally:
        kvm.read_unlock()
    assert w.load(lay.glob(Globals.TDP_MMU_PAGES)) == pages + 4  # levels 4, 3, 2, 1
    it = TdpIter(kvm, root5, GFN)
    assert it.root_level == it.level == 5 and len(it.pt_path) == 6
    while it.level > 1 and it.try_step_down():
        pass
    assert it.level == 1 and spte_to_pfn(it.old_spte) == gfn_to_host_pfn(GFN)
    fast = TdpIter(kvm, root5, GFN, descend_to=1)
    assert (fast.root_level, fast.level, fast.sptep, fast.pt_path) == (5, 1, it.sptep,
                                                                        it.pt_path)
    wp = walk_params(lay)
    assert Words.tdp_walk(w, wp, root5, GFN, 0, 1) == w.tdp_walk_stepwise(wp, root5, GFN, 0, 1)
    kvm.write_lock()
    try:
        tdp_mmu_zap_root(kvm, root5, shared=False)
    finally:
        kvm.write_unlock()
    kvm.rcu.reclaim(lambda p: tdp_mmu_free_sp_rcu_callback(kvm, p))
    assert not kvm.rcu.pending and w.load(lay.glob(Globals.TDP_MMU_PAGES)) == pages
    assert all(w.load(lay.sp(t, SpMeta.STATE)) == SP_FREE for t in it.pt_path[1:5])
    tdp_mmu_free_sp(kvm, root5)
    assert not quiescent_check(kvm).violations


def test_a_root_of_no_valid_level_is_not_walked(vm) -> None:
    """tdp_iter_start's WARN_ON_ONCE: a root level outside 1..5, no walk (with the
    oracles, as under panic_on_warn, the WARN stops the run)."""
    kvm, w, lay = vm.kvm, vm.words, vm.layout
    role = w.load(lay.sp(vm.root, SpMeta.ROLE))
    w.store(lay.sp(vm.root, SpMeta.ROLE), role & ~0xF | 7)
    with pytest.raises(InvariantViolation) as e:
        TdpIter(kvm, vm.root, GFN)
    assert e.value.invariant == "kernel WARNING" and "root level out of range" in str(e.value)
    oracles.attach(kvm, disabled=["kernel WARNING"])  # the kernel's own behaviour: go on
    kvm.stats.clear()
    for it in (TdpIter(kvm, vm.root, GFN), TdpIter(kvm, vm.root, GFN, descend_to=1)):
        assert not it.valid and not it.in_range(GFN + 1)
    assert kvm.stats["warn:tdp_iter_start: root level out of range"] == 2
    w.store(lay.sp(vm.root, SpMeta.ROLE), role)
    # a freed root reads so too (its role was cleared): the read is a use-after-free
    freed = tdp_mmu_alloc_sp(kvm)
    tdp_mmu_free_sp(kvm, freed)
    for descend in (0, 1):
        with pytest.raises(InvariantViolation) as e:
            TdpIter(kvm, freed, GFN, descend_to=descend)
        assert e.value.invariant == "use-after-free of page-table page"
