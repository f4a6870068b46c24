"""Kernel-like yielding (model/sched.py): need_resched() as a per-task timeslice,
rwlock_needbreak() true whenever another task waits for mmu_lock in either mode,
and tdp_mmu_iter_cond_resched's walks yielding for either, with no countdown."""

from __future__ import annotations

import threading
import time

import pytest

from stress.arena import Control, Globals
from stress.atomics import Words
from stress.model import x86
from stress.model.notifier import (
    kvm_mmu_invalidate_begin,
    kvm_mmu_invalidate_end,
    kvm_mmu_invalidate_range_add,
)
from stress.model.roots import KVM_ALL_ROOTS
from stress.model.sched import (
    cond_resched_rwlock_read,
    need_resched,
    preempt_schedule_common,
    set_tsk_need_resched,
)
from stress.model.spte import PG_LEVEL_4K
from stress.model.tdp_mmu import (
    RET_PF_FIXED,
    RET_PF_RETRY,
    kvm_tdp_mmu_zap_leafs_roots,
    kvm_tdp_page_fault,
    tdp_mmu_zap_range_at_level,
)
from tests.conftest import Vm, tick_clock

G = 0x4000


def _queued(vm: Vm) -> int:
    return vm.words.load(vm.layout.glob(Globals.MMU_LOCK)) >> 32 & 0xFFFF


def _spin_until(cond) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.0001)


def _other_task(vm: Vm, mode: str) -> tuple[threading.Thread, Words]:
    """Another task (a thread with its own words) that takes mmu_lock once in
    ``mode`` and releases it."""
    w = Words(vm.arena.shm.buf, vm.layout.ctl(Control.ABORT))
    vm.extra_words.append(w)
    lock_i, owner_i = vm.layout.glob(Globals.MMU_LOCK), vm.layout.glob(Globals.MMU_LOCK_OWNER)

    def run() -> None:
        if mode == "read":
            w.read_lock(lock_i)
            w.read_unlock(lock_i)
        else:
            w.write_lock(lock_i, owner_i, 99)
            w.write_unlock(lock_i, owner_i)

    t = threading.Thread(target=run)
    t.start()
    return t, w


def _mapped(vm: Vm, n: int = 8) -> None:
    for g in range(G, G + n):
        assert kvm_tdp_page_fault(vm.kvm, g, write=True) == RET_PF_FIXED
        assert x86.guest_access(vm.kvm, g, write=False)


def test_need_resched_is_a_timeslice_not_a_countdown(vm) -> None:
    """The tick sets TIF_NEED_RESCHED once the task ran its (exponential,
    seeded) timeslice; it stays set until the task is scheduled out."""
    k = vm.task(1)
    assert not need_resched(k)  # no timeslice: the tick never sets it
    tick_clock(k, 50)
    seen = [need_resched(k) for _ in range(2000)]
    first = seen.index(True)
    assert first > 0 and all(seen[first:])  # latched
    assert k.slice_ns > 0 and first >= int(k.slice_ns) - 1
    preempt_schedule_common(k)  # schedule(): cleared, a new slice starts
    assert not need_resched(k) and k.stats["schedules"] == 1
    set_tsk_need_resched(k)
    assert need_resched(k)
    k.w.pause(0.0001)  # a sleep schedules the task out too
    assert not need_resched(k)


def test_cond_resched_rwlock_read_keeps_an_uncontended_lock(vm) -> None:
    k = vm.task(1)
    k.read_lock()
    assert not k.rwlock_needbreak() and not cond_resched_rwlock_read(k)
    set_tsk_need_resched(k)
    assert cond_resched_rwlock_read(k)  # dropped, scheduled, retaken
    assert not k.tif_need_resched and k.stats["schedules"] == 1
    k.read_unlock()


def test_timeslice_yields_a_walk(vm) -> None:
    _mapped(vm, 64)
    zapper = vm.task(1)
    tick_clock(zapper, 8)
    zapper.write_lock()
    try:
        assert kvm_tdp_mmu_zap_leafs_roots(zapper, KVM_ALL_ROOTS, G, G + 64) == 64
    finally:
        zapper.write_unlock()
    assert zapper.stats["yields"] >= 2 and zapper.stats["schedules"] == zapper.stats["yields"]


def test_a_waiting_reader_makes_a_write_lock_zap_yield(vm) -> None:
    """No timeslice: a vCPU waiting to fault (read lock) breaks the leaf zap."""
    _mapped(vm)
    zapper = vm.task(1)
    zapper.write_lock()
    reader, _ = _other_task(vm, "read")
    _spin_until(lambda: _queued(vm) == 1)
    assert zapper.rwlock_needbreak()
    try:
        assert kvm_tdp_mmu_zap_leafs_roots(zapper, KVM_ALL_ROOTS, G, G + 8) == 8
    finally:
        zapper.write_unlock()
    reader.join(10)
    assert zapper.stats["yields"] >= 1 and not zapper.stats["schedules"]  # cpu_relax only
    assert vm.words.load(vm.layout.glob(Globals.MMU_LOCK)) == 0


def test_a_waiting_writer_and_the_reader_behind_it_make_a_read_lock_zap_yield(vm) -> None:
    _mapped(vm)
    zapper = vm.task(1)
    zapper.read_lock()
    writer, _ = _other_task(vm, "write")
    _spin_until(lambda: _queued(vm) == 1)
    reader, _ = _other_task(vm, "read")
    _spin_until(lambda: _queued(vm) == 2)  # queued behind the waiting writer, counted
    assert zapper.rwlock_needbreak()
    try:
        assert tdp_mmu_zap_range_at_level(zapper, vm.root, G, G + 8, PG_LEVEL_4K, shared=True,
                                          may_yield=True) == 8
    finally:
        zapper.read_unlock()
    writer.join(10)
    reader.join(10)
    assert zapper.stats["yields"] >= 1
    assert vm.words.load(vm.layout.glob(Globals.MMU_LOCK)) == 0


def test_a_fault_sure_to_retry_does_not_queue_for_mmu_lock(vm) -> None:
    """kvm_mmu_faultin_pfn's mmu_invalidate_retry_gfn_unsafe: while an invalidation
    covers the gfn, the fault retries without taking mmu_lock (here held for
    write by the invalidating task: the fault would otherwise wait for it)."""
    inv = vm.task(1)
    inv.write_lock()
    kvm_mmu_invalidate_begin(inv)
    kvm_mmu_invalidate_range_add(inv, G, G + 4)
    try:
        assert kvm_tdp_page_fault(vm.kvm, G + 1, write=True) == RET_PF_RETRY
        assert vm.kvm.stats["retry_invalidate_unlocked"] == 1 and _queued(vm) == 0
    finally:
        kvm_mmu_invalidate_end(inv)
        inv.write_unlock()
    assert kvm_tdp_page_fault(vm.kvm, G + 1, write=True) == RET_PF_FIXED  # a new snapshot


def test_a_non_blocking_invalidation_never_yields_and_sleeping_there_is_a_bug(vm) -> None:
    """The OOM reaper's invalidation (mmu_notifier_invalidate_range_start_nonblock)
    zaps without yielding even when this task should reschedule, where a blocking
    one yields; and a cond_resched inside a non-blocking section or an RCU
    read-side section is the kernel's "sleeping function called from invalid
    context"."""
    from stress.model.errors import InvariantViolation
    from stress.model.notifier import mmu_notifier_invalidate_range
    from stress.model.sched import cond_resched, non_block_end, non_block_start

    kvm = vm.kvm
    for blockable, yields in ((False, 0), (True, 1)):
        for g in range(G, G + 64):
            assert kvm_tdp_page_fault(kvm, g, write=True) == RET_PF_FIXED
        before = kvm.stats["yields"]
        set_tsk_need_resched(kvm)
        mmu_notifier_invalidate_range(kvm, G, G + 64, None, blockable=blockable)
        assert min(kvm.stats["yields"] - before, 1) == yields, blockable
        assert kvm.non_block_count == 0
    for enter, leave in ((lambda: non_block_start(kvm), lambda: non_block_end(kvm)),
                         (kvm.rcu.rcu_read_lock, kvm.rcu.rcu_read_unlock)):
        enter()
        with pytest.raises(InvariantViolation) as e:
            cond_resched(kvm)
        assert e.value.invariant == "sleeping in atomic context"
        kvm.read_lock()
        with pytest.raises(InvariantViolation):
            cond_resched_rwlock_read(kvm)
        kvm.read_unlock()
        leave()
    cond_resched(kvm)
