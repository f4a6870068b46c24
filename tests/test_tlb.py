"""TLBs, the guest's hardware walker, flushes and A/D bits (model/tlb.py, reference
9.3, 9.5, 9.18): each bug's interleaving replayed in one process at the chokepoint,
and the fixed protocol through the same interleaving."""

from __future__ import annotations

import pytest

from stress.arena import TLB_ENTRIES, TLB_MAX_LEVELS, Control
from stress.atomics import Words
from stress.model import notifier as n
from stress.model import tlb, x86
from stress.model.errors import InvariantViolation
from stress.model.kvm import Kvm
from stress.model.roots import KVM_ALL_ROOTS, KVM_DIRECT_ROOTS, kvm_tdp_mmu_invalidate_roots
from stress.model.sched import set_tsk_need_resched
from stress.model.spte import PG_LEVEL_2M, round_gfn_for_level, shadow_dirty_mask
from stress.model.tdp_iter import TdpIter
from stress.model.tdp_mmu import (
    RET_PF_FIXED,
    kvm_tdp_mmu_clear_dirty_range,
    kvm_tdp_mmu_zap_leafs,
    kvm_tdp_mmu_zap_leafs_roots,
    kvm_tdp_page_fault,
    tdp_mmu_zap_range_at_level,
)

G = 0x2468


def _leaf_sptep(kvm, root: int, gfn: int) -> int:  # noqa: ANN001
    it = TdpIter(kvm, root, gfn)
    while it.level > 1:
        assert it.try_step_down()
    return it.sptep


def _cached(vm, vcpu: int, gfn: int) -> bool:  # noqa: ANN001
    e = vcpu * TLB_ENTRIES + (gfn & (TLB_ENTRIES - 1))
    return vm.words.load(vm.layout.tlb_tags + e) == gfn + 1


def _requests(vm, vcpu: int) -> int:  # noqa: ANN001
    return vm.words.load(vm.layout.tlb_hdr(vcpu, tlb.H_REQUESTS))


def test_walker_fills_the_tlb_and_sets_dirty(vm) -> None:
    k = vm.kvm
    assert not x86.guest_access(k, G, write=False)  # nothing mapped: EPT violation
    assert kvm_tdp_page_fault(k, G, write=True) == RET_PF_FIXED
    assert x86.guest_access(k, G, write=True) and _cached(vm, 0, G)
    e = G & (TLB_ENTRIES - 1)
    pts = [vm.words.load(vm.layout.tlb_pts + e * TLB_MAX_LEVELS + i) - 1 for i in range(4)]
    assert pts[0] == vm.root and len(set(pts)) == 4  # the root and the 3 tables below
    # the dirty-log harvest clears D (and flushes); the next write walks and sets it
    other = vm.task(1)
    other.read_lock()
    assert kvm_tdp_mmu_clear_dirty_range(other, G, G + 1) == 1
    other.read_unlock()
    sptep = _leaf_sptep(k, vm.root, G)
    assert not vm.words.load(sptep) & shadow_dirty_mask
    assert _requests(vm, 0) & tlb.KVM_REQ_TLB_FLUSH
    assert x86.guest_access(k, G, write=True)
    assert vm.words.load(sptep) & shadow_dirty_mask and k.stats["dirty_bits_set"] == 1
    assert not _requests(vm, 0)  # serviced on entry
    d = vm.words.load(vm.layout.dirty + G)
    assert d & 0xFFFFFFFF == 2 and d >> 32 == 1  # KVM's D and the walker's; one harvested


def test_flush_waits_for_a_vcpu_in_guest_mode(vm) -> None:
    vcpu = vm.kvm
    x86.vcpu_enter_guest(vcpu)  # the vCPU runs the guest
    mode_i = vm.layout.tlb_hdr(0, tlb.H_MODE)
    seen: list[int] = []

    def vcpu_exits() -> None:  # the IPI arrives: the vCPU leaves at an instruction boundary
        seen.append(vm.words.load(mode_i))
        seen.append(_requests(vm, 0))
        x86.vcpu_exit_guest(vcpu)

    flusher = vm.task(1, words=vm.trigger_words(mode_i, vcpu_exits, on="load"))
    tlb.kvm_flush_remote_tlbs(flusher)
    # requests first, then the kick: the vCPU was told to exit with the bit already set
    assert seen == [tlb.EXITING_GUEST_MODE, tlb.KVM_REQ_TLB_FLUSH]
    assert vm.words.load(mode_i) == tlb.OUTSIDE_GUEST_MODE


def _two_roots(vm) -> tuple[int, int]:  # noqa: ANN001
    """An obsolete root with tables over G..G+1 and no leaf, and the vCPU's new root
    mapping G+1, cached in the vCPU's TLB (a fast zap half done)."""
    k = vm.kvm
    old = vm.root
    assert kvm_tdp_page_fault(k, G + 1, write=True) == RET_PF_FIXED
    k.write_lock()
    kvm_tdp_mmu_zap_leafs(k, old, G, G + 2)
    kvm_tdp_mmu_invalidate_roots(k, KVM_DIRECT_ROOTS)
    k.write_unlock()
    assert kvm_tdp_page_fault(k, G + 1, write=True) == RET_PF_FIXED  # reloads: a new root
    new = k.vcpu.root
    assert new != old and x86.guest_access(k, G + 1, write=False) and _cached(vm, 0, G + 1)
    return old, new


@pytest.mark.parametrize("variant", ["fixed", "tlb-no-flush-before-yield"])
def test_yield_in_a_later_root_with_a_pending_flush(make_vm, variant: str) -> None:
    """a835429cda91: the leaf zap walks the new root (zaps G+1, flush pending), then
    the obsolete one, where it yields mmu_lock before zapping anything there."""
    vm = make_vm(variant=variant)
    _two_roots(vm)
    zapper = vm.task(1)
    zapper.tlb_unflushed = _ReschedAfterZap(zapper)  # yields at its next step: root 2
    zapper.write_lock()
    if variant == "fixed":
        assert kvm_tdp_mmu_zap_leafs_roots(zapper, KVM_ALL_ROOTS, G, G + 2) == 1
        zapper.write_unlock()
        assert zapper.stats["yields"] == 1
        assert _requests(vm, 0) & tlb.KVM_REQ_TLB_FLUSH  # flushed before the yield
        n.mmu_notifier_invalidate_range(vm.task(2), G + 1, G + 2)  # page freed: fine
        assert not x86.guest_access(vm.kvm, G + 1, write=False)  # TLB flushed: walks, faults
        return
    with pytest.raises(InvariantViolation) as e:
        kvm_tdp_mmu_zap_leafs_roots(zapper, KVM_ALL_ROOTS, G, G + 2)
    assert e.value.invariant == "stale-tlb-entry-after-unlock"
    assert e.value.details["gfn"] == G + 1 and e.value.details["vcpu"] == 0


class UnlockHookWords(Words):
    """Words that run ``action`` once, right after the first write_unlock: the
    other task runs while this one has yielded mmu_lock."""

    def __init__(self, buf, abort_i: int, action) -> None:  # noqa: ANN001
        super().__init__(buf, abort_i)
        self.action = action
        self.fired = False

    def write_unlock(self, lock_i: int, owner_i: int) -> None:
        super().write_unlock(lock_i, owner_i)
        if not self.fired:
            self.fired = True
            self.action()


class _ReschedAfterZap(list):
    """A zapper's list of unflushed zaps whose first entry also makes the zapper
    due to reschedule (the tick came): it yields at its next step with progress."""

    def __init__(self, kvm: Kvm) -> None:
        super().__init__()
        self.kvm = kvm

    def append(self, item: object) -> None:
        if not self:
            set_tsk_need_resched(self.kvm)
        super().append(item)


class _Forgetful(_ReschedAfterZap):
    def append(self, item: object) -> None:  # keeps nothing: the 9.3 check at the yield is off
        set_tsk_need_resched(self.kvm)


@pytest.mark.parametrize("variant", ["fixed", "tlb-no-flush-before-yield"])
def test_notifier_during_the_yield_frees_a_cached_page(make_vm, variant: str) -> None:
    """The same yield, end to end: an mmu_notifier runs while the zapper has
    dropped mmu_lock, finds G+1 already non-present, does not flush, and frees the
    page the vCPU's TLB still maps."""
    vm = make_vm(variant=variant)
    _two_roots(vm)
    notifier = vm.task(2)
    freed: list[InvariantViolation | None] = []

    def notifier_runs() -> None:
        try:
            n.mmu_notifier_invalidate_range(notifier, G + 1, G + 2)
            freed.append(None)
        except InvariantViolation as v:
            freed.append(v)

    words = UnlockHookWords(vm.arena.shm.buf, vm.layout.ctl(Control.ABORT), notifier_runs)
    vm.extra_words.append(words)
    zapper = vm.task(1, words=words)
    zapper.tlb_unflushed = _Forgetful(zapper)
    zapper.write_lock()
    kvm_tdp_mmu_zap_leafs_roots(zapper, KVM_ALL_ROOTS, G, G + 2)
    zapper.write_unlock()
    assert words.fired and len(freed) == 1
    if variant == "fixed":
        assert freed == [None]  # flushed before the yield: the vCPU must flush first
    else:
        assert freed[0] is not None and freed[0].invariant == "stale-tlb-entry-after-free"
        assert freed[0].details["gfn"] == G + 1 and freed[0].details["vcpu"] == 0


@pytest.mark.parametrize("variant", ["fixed", "tlb-flush-after-rcu-unlock"])
def test_table_freed_while_cached(make_vm, variant: str) -> None:
    """fcb93eb6d09d: a shared sub-tree zap removes the vCPU's level-1 table; its RCU
    callback runs as soon as the zapper leaves its read-side section."""
    vm = make_vm(variant=variant)
    k = vm.kvm
    assert kvm_tdp_page_fault(k, G, write=True) == RET_PF_FIXED
    assert x86.guest_access(k, G, write=False)
    table = vm.words.load(vm.layout.tlb_pts + (G & (TLB_ENTRIES - 1)) * TLB_MAX_LEVELS + 3) - 1
    zapper = vm.task(1)
    start = round_gfn_for_level(G, PG_LEVEL_2M)
    zapper.read_lock()
    try:
        if variant == "fixed":
            assert tdp_mmu_zap_range_at_level(zapper, vm.root, start, start + 512, 2,
                                              shared=True) == 1
            assert zapper.stats["tables_freed"] == 1 and not zapper.rcu.pending
            assert _requests(vm, 0) & tlb.KVM_REQ_TLB_FLUSH
        else:
            with pytest.raises(InvariantViolation) as e:
                tdp_mmu_zap_range_at_level(zapper, vm.root, start, start + 512, 2, shared=True)
            assert e.value.invariant == "stale-tlb-entry-after-free"
            assert e.value.details["table"] == table and e.value.details["gfn"] == G
    finally:
        zapper.read_unlock()


@pytest.mark.parametrize("variant", ["fixed", "lost-dirty-bit"])
def test_dirty_bit_set_between_snapshot_and_store(make_vm, variant: str) -> None:
    """ba3a6120a4e7: the exclusive zap snapshots G's leaf (D clear after a harvest);
    the guest writes G, its walker sets D; then the zap writes the leaf."""
    vm = make_vm(variant=variant)
    vcpu = vm.kvm
    assert kvm_tdp_page_fault(vcpu, G, write=True) == RET_PF_FIXED
    harvester = vm.task(2)
    harvester.read_lock()
    kvm_tdp_mmu_clear_dirty_range(harvester, G, G + 1)
    harvester.read_unlock()
    sptep = _leaf_sptep(vcpu, vm.root, G)
    wrote: list[bool] = []
    zapper = vm.task(1, words=vm.trigger_words(
        sptep, lambda: wrote.append(x86.guest_access(vcpu, G, write=True)), on="load"))
    zapper.write_lock()
    assert kvm_tdp_mmu_zap_leafs(zapper, vm.root, G, G + 1) == 1
    zapper.write_unlock()
    assert wrote == [True] and vcpu.stats["dirty_bits_set"] == 1
    notifier = vm.task(2)
    if variant == "fixed":
        n.mmu_notifier_invalidate_range(notifier, G, G + 1)  # xchg saw D: propagated
        return
    with pytest.raises(InvariantViolation) as e:
        n.mmu_notifier_invalidate_range(notifier, G, G + 1)
    assert e.value.invariant == "lost-dirty-bit" and e.value.details["gfn"] == G
    assert e.value.details["d_bits_set"] == e.value.details["d_bits_seen"] + 1
