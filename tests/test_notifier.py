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
    """Named when the conversion completes (its post step, under the write lock),
    before the VMM's punch-hole would clean the mirror up."""
    assert kvm_tdp_page_fault(k, PRIV, write=True) == RET_PF_FIXED
    with pytest.raises(InvariantViolation) as e:
        n.kvm_vm_set_mem_attributes(k, PRIV & ~7, (PRIV & ~7) + 8, private=False)
    assert e.value.invariant == "gfn mapped in the wrong root"
    assert e.value.details["gfn"] == PRIV and e.value.details["mirror"]


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


def test_conversions_cover_every_alignment_and_revert_to_the_old_layout(make_vm) -> None:
    """The converter's unaligned ranges start and end at any gfn, and at, one
    below and one above 2M boundaries, some across one; a conversion's revert
    runs put back exactly the attributes it changed, and a range that has its
    attribute already is no conversion at all (kvm_range_has_memory_attributes)."""
    from stress.config import load, load_from, shipped_configs
    from stress.harness.workers import ConverterRole

    cfg = load_from(load(shipped_configs()["huge"]), {"converter": {"unaligned": 1.0}})
    vm = make_vm(tdx=True, chunk_shift=9, memslots=cfg.memslots, n_pages=512)
    kvm = vm.kvm
    conv = ConverterRole(kvm, cfg)
    ranges = [conv.pick_range() for _ in range(600)]
    assert all(0 <= s < e <= 16384 and e - s <= 8 + 1 for s, e in ranges)
    assert {0, 1, 511} <= {s % 512 for s, _ in ranges}
    assert {0, 1, 511} <= {e % 512 for _, e in ranges}
    assert any(s // 512 != (e - 1) // 512 for s, e in ranges)  # across a 2M boundary
    edge = 5 * 512  # a private region below, a shared one above (2M chunks)
    before = [kvm_mem_is_private(kvm, g) for g in range(edge - 512, edge + 512)]
    assert before[511] and not before[512]
    for start, end, private in ((edge - 3, edge + 5, True), (edge - 3, edge + 5, False)):
        runs = conv.changed_runs(start, end, private)
        assert runs == ([(edge, edge + 5, False)] if private else [(edge - 3, edge, True)])
        count = kvm.stats["conversions"]
        n_attrs = [kvm_mem_is_private(kvm, g) for g in range(start, end)]
        n.kvm_vm_set_mem_attributes(kvm, start, end, private)
        assert all(kvm_mem_is_private(kvm, g) == private for g in range(start, end))
        for s, e, p in runs:
            n.kvm_vm_set_mem_attributes(kvm, s, e, p)
        assert [kvm_mem_is_private(kvm, g) for g in range(start, end)] == n_attrs
        assert kvm.stats["conversions"] == count + 2
    assert [kvm_mem_is_private(kvm, g) for g in range(edge - 512, edge + 512)] == before
    count = kvm.stats["conversions"]
    n.kvm_vm_set_mem_attributes(kvm, edge - 8, edge, True)  # private already
    assert kvm.stats["conversions"] == count
