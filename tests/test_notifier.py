"""Invalidation vs faults (seed 002, reference 6), interleaved at the chokepoint."""

from __future__ import annotations

import pytest

from stress.arena import Control, Globals
from stress.atomics import Words
from stress.model import notifier as n
from stress.model.errors import InvariantViolation
from stress.model.host import host_page_gen
from stress.model.kvm import kvm_mem_is_private
from stress.model.tdp_mmu import RET_PF_EXIT, RET_PF_FIXED, RET_PF_RETRY, kvm_tdp_page_fault
from stress.model.tdx import SEPT_FREE, SEPT_PENDING, sept_state
from stress.oracles.notifier import range_maps_current_pages
from stress.oracles.quiescent import quiescent_check

GFN = 0x2468  # shared (chunk 0x2468 >> 3 is odd)
PRIV = 0x2460  # private


def test_invalidation_state_and_retry_check(vm) -> None:
    k = vm.kvm
    seq = n.mmu_invalidate_seq(k)
    k.write_lock()
    n.kvm_mmu_invalidate_begin(k)
    n.kvm_mmu_invalidate_range_add(k, 100, 110)
    n.kvm_mmu_invalidate_range_add(k, 90, 95)  # ranges merge
    k.write_unlock()
    assert n.mmu_invalidate_retry_gfn(k, seq, 92) and n.mmu_invalidate_retry_gfn(k, seq, 105)
    assert not n.mmu_invalidate_retry_gfn(k, seq, 120)  # outside the range, seq unchanged
    n.end_before_unlock(k)
    assert vm.words.load(vm.layout.glob(Globals.MMU_INVALIDATE_IN_PROGRESS)) == 0
    assert n.mmu_invalidate_retry_gfn(k, seq, 120)  # the seq moved on
    assert not n.mmu_invalidate_retry_gfn(k, seq + 1, 120)


def _invalidate_during_pfn_lookup(vm):
    """The vCPU's fault looks the pfn up; right then the notifier invalidates it."""
    notifier = vm.task(1)

    def invalidate() -> None:
        n.mmu_notifier_invalidate_range(notifier, GFN, GFN + 1)

    gens_word = vm.layout.host_gens + GFN // 8
    return vm.task(0, words=vm.trigger_words(gens_word, invalidate, on="load")), notifier


@pytest.mark.parametrize("race", ["during the pfn lookup", "after the unlocked check"])
def test_fault_retries_after_a_racing_invalidation(vm, race: str) -> None:
    vcpu, notifier = (_invalidate_during_pfn_lookup if race == "during the pfn lookup"
                      else _invalidate_after_the_unlocked_check)(vm)
    vcpu.vcpu = vm.kvm.vcpu
    gen = host_page_gen(vm.kvm, GFN)
    assert kvm_tdp_page_fault(vcpu, GFN, write=True) == RET_PF_RETRY  # seq moved on
    assert host_page_gen(vm.kvm, GFN) == gen + 1
    assert kvm_tdp_page_fault(vm.kvm, GFN, write=True) == RET_PF_FIXED  # the new page
    assert not quiescent_check(vm.kvm).violations
    notifier.write_lock()
    range_maps_current_pages(notifier, GFN, GFN + 1)
    notifier.write_unlock()


def _invalidate_after_the_unlocked_check(vm):
    """The vCPU's fault passes mmu_invalidate_retry_gfn_unsafe (its second load of
    mmu_invalidate_seq, the snapshot being the first); right then, before it
    takes mmu_lock, the notifier invalidates the page: only the locked check can
    see it now."""
    notifier = vm.task(1)
    seq_i = vm.layout.glob(Globals.MMU_INVALIDATE_SEQ)
    loads = []

    class SecondSeqLoad(Words):
        def load(self, i: int) -> int:
            v = super().load(i)
            if i == seq_i:
                loads.append(v)
                if len(loads) == 2:
                    n.mmu_notifier_invalidate_range(notifier, GFN, GFN + 1)
            return v

    w = SecondSeqLoad(vm.arena.shm.buf, vm.layout.ctl(Control.ABORT))
    vm.extra_words.append(w)
    return vm.task(0, words=w), notifier


@pytest.mark.parametrize("variant", ["seq-snapshot-after-pfn", "fault-skips-retry-check"])
def test_broken_fault_side_maps_a_freed_page(make_vm, variant: str) -> None:
    vm = make_vm(variant=variant)
    race = (_invalidate_during_pfn_lookup if variant == "seq-snapshot-after-pfn"
            else _invalidate_after_the_unlocked_check)
    vcpu, notifier = race(vm)
    vcpu.vcpu = vm.kvm.vcpu
    assert kvm_tdp_page_fault(vcpu, GFN, write=True) == RET_PF_FIXED  # no retry: stale
    v = quiescent_check(vm.kvm).violations[0]
    assert v.invariant == "stale mapping after invalidate_end" and v.details["gfn"] == GFN
    with pytest.raises(InvariantViolation) as e:  # the next invalidation sees it too
        n.mmu_notifier_invalidate_range(notifier, GFN, GFN + 1)
    assert e.value.invariant == "stale mapping after invalidate_end"


def _mirror_leaf(vm) -> int:
    i = vm.kvm.tdx.module._walk(PRIV, 1)
    return vm.words.load(i) if i is not None else 0


def test_conversion_to_shared_zaps_the_mirror(make_vm) -> None:
    vm = make_vm(tdx=True)
    k = vm.kvm
    assert kvm_mem_is_private(k, PRIV)
    assert kvm_tdp_page_fault(k, PRIV, write=True) == RET_PF_FIXED
    assert sept_state(_mirror_leaf(vm)) == SEPT_PENDING  # AUGed, not yet accepted
    n.kvm_vm_set_mem_attributes(k, PRIV & ~7, (PRIV & ~7) + 8, private=False)
    assert not kvm_mem_is_private(k, PRIV)
    assert sept_state(_mirror_leaf(vm)) == SEPT_FREE  # removed from the S-EPT too
    assert kvm_tdp_page_fault(k, PRIV, write=True) == RET_PF_FIXED  # now via the direct root
    assert not quiescent_check(k).violations


def test_conversion_zapping_direct_only_leaves_the_mirror_mapped(make_vm) -> None:
    vm = make_vm(tdx=True, variant="conversion-zaps-direct-only")
    k = vm.kvm
    assert kvm_tdp_page_fault(k, PRIV, write=True) == RET_PF_FIXED
    n.kvm_vm_set_mem_attributes(k, PRIV & ~7, (PRIV & ~7) + 8, private=False)
    names = {v.invariant for v in quiescent_check(k).violations}
    assert names & {"gfn mapped in the wrong root", "stale mapping after invalidate_end"}


def test_attribute_mismatch_exits_to_userspace(make_vm) -> None:
    vm = make_vm(tdx=True)
    k = vm.kvm
    other = vm.task(1)

    def flip() -> None:
        n.kvm_vm_set_mem_attributes(other, GFN & ~7, (GFN & ~7) + 8, private=True)

    attrs_word = vm.layout.attrs + GFN // 64
    vcpu = vm.task(0, words=vm.trigger_words(attrs_word, flip, on="load"))
    vcpu.vcpu = k.vcpu
    assert kvm_tdp_page_fault(vcpu, GFN, write=True) == RET_PF_EXIT
    assert vcpu.stats["memory_fault_exits"] == 1
