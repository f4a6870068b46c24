"""The swappable pieces of the main write sites (stress/model/pieces.py): each can
be replaced by a user's variant, built with ``dataclasses.replace(FIXED, ...)``
and registered, and a plausibly wrong replacement is caught by the existing
oracles in a single-process interleaving."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from stress.model import notifier, pieces, tlb, x86
from stress.model.errors import InvariantViolation
from stress.model.kvm import Kvm
from stress.model.roots import (
    KVM_ALL_ROOTS,
    KVM_DIRECT_ROOTS,
    KVM_INVALID_ROOTS,
    KVM_MIRROR_ROOTS,
    KVM_VALID_ROOTS,
    is_root_invalid,
    kvm_tdp_mmu_invalidate_roots,
    tdp_mmu_root_match,
)
from stress.model.sched import set_tsk_need_resched
from stress.model.spte import SHADOW_NONPRESENT_VALUE, is_shadow_present_pte
from stress.model.tdp_iter import TdpIter
from stress.model.tdp_mmu import (
    RET_PF_FIXED,
    RET_PF_RETRY,
    kvm_tdp_mmu_zap_leafs_roots,
    kvm_tdp_page_fault,
    tdp_mmu_install_leaf_atomic,
    tdp_mmu_iter_cond_resched,
    tdp_mmu_set_spte_atomic,
    tdp_mmu_zap_leafs_atomic,
    tdp_mmu_zap_spte_atomic,
)
from stress.model.variants import FIXED, VARIANTS, Variant, register
from tests.conftest import Vm

G = 0x3579
MakeVm = Callable[..., Vm]
VariantOf = Callable[..., str]
_names = itertools.count()


@pytest.fixture
def variant_of() -> Iterator[VariantOf]:
    """Register ``replace(FIXED, **swapped)`` under a fresh name and return the
    name (``make_vm`` takes a variant name); unregistered afterwards."""
    made: list[str] = []

    def make(**swapped: Any) -> str:
        name = f"test-pieces-{next(_names)}"
        register(replace(FIXED, name=name, **swapped))
        made.append(name)
        return name

    yield make
    for name in made:
        del VARIANTS[name]


def _leaf(kvm: Kvm, root: int, gfn: int) -> int:
    it = TdpIter(kvm, root, gfn)
    while it.level > 1 and it.try_step_down():
        pass
    return it.old_spte if it.level == 1 else SHADOW_NONPRESENT_VALUE


def _flush_requested(vm: Vm, vcpu: int = 0) -> bool:
    return bool(vm.words.load(vm.layout.tlb_hdr(vcpu, tlb.H_REQUESTS)) & tlb.KVM_REQ_TLB_FLUSH)


def test_fixed_points_at_the_model_code() -> None:
    """FIXED's new pieces are today's functions, so the fixed protocol is unchanged."""
    assert FIXED.install_leaf is tdp_mmu_install_leaf_atomic
    assert FIXED.zap_spte_atomic is tdp_mmu_zap_spte_atomic
    assert FIXED.iter_cond_resched is tdp_mmu_iter_cond_resched
    assert FIXED.root_filter is tdp_mmu_root_match
    assert Variant.__annotations__["install_leaf"] == "InstallLeaf"
    assert pieces.InstallLeaf.__call__.__doc__ and "RET_PF_RETRY" in (
        pieces.InstallLeaf.__call__.__doc__)


# -- install_leaf: the fault's leaf install ------------------------------------

def test_install_leaf_is_swappable(make_vm: MakeVm, variant_of: VariantOf) -> None:
    calls: list[tuple[int, int]] = []

    def counting_install(kvm: Kvm, it: TdpIter, new_spte: int) -> int:
        calls.append((it.gfn, it.level))
        return tdp_mmu_install_leaf_atomic(kvm, it, new_spte)

    vm = make_vm(variant=variant_of(install_leaf=counting_install))
    assert kvm_tdp_page_fault(vm.kvm, G, write=True) == RET_PF_FIXED
    assert calls == [(G, 1)] and is_shadow_present_pte(_leaf(vm.kvm, vm.root, G))


def test_install_leaf_that_always_loses_makes_the_fault_retry(make_vm: MakeVm,
                                                              variant_of: VariantOf) -> None:
    def never_installs(kvm: Kvm, it: TdpIter, new_spte: int) -> int:
        return -16  # -EBUSY: as if another task won the cmpxchg

    vm = make_vm(variant=variant_of(install_leaf=never_installs))
    assert kvm_tdp_page_fault(vm.kvm, G, write=True) == RET_PF_RETRY
    assert vm.kvm.stats["retry_cmpxchg"] == 1 and vm.kvm.stats["leaves_installed"] == 0


# -- zap_spte_atomic: the read-lock single-leaf zap and its flush -----------------

def _zap_cached_leaf(vm: Vm) -> Kvm:
    """vCPU 0 maps G and caches it in its TLB; a zapper zaps G with mmu_lock held
    for read (tdp_mmu_zap_leafs_atomic, the variant's zap_spte_atomic)."""
    k = vm.kvm
    assert kvm_tdp_page_fault(k, G, write=True) == RET_PF_FIXED
    assert x86.guest_access(k, G, write=False)
    zapper = vm.task(1)
    zapper.read_lock()
    try:
        assert tdp_mmu_zap_leafs_atomic(zapper, vm.root, G, G + 1) == 1
    finally:
        zapper.read_unlock()
    assert not is_shadow_present_pte(_leaf(k, vm.root, G))
    return zapper


def test_zap_spte_atomic_is_swappable(make_vm: MakeVm, variant_of: VariantOf) -> None:
    calls: list[int] = []

    def counting_zap(kvm: Kvm, it: TdpIter) -> int:
        calls.append(it.gfn)
        return tdp_mmu_zap_spte_atomic(kvm, it)

    vm = make_vm(variant=variant_of(zap_spte_atomic=counting_zap))
    _zap_cached_leaf(vm)
    assert calls == [G] and _flush_requested(vm)
    notifier.mmu_notifier_invalidate_range(vm.task(2), G, G + 1)  # frees the page: fine


def zap_spte_atomic_without_flush(kvm: Kvm, it: TdpIter) -> int:
    """Plausibly wrong: clear the leaf with one cmpxchg, no freeze, no flush (the
    entry is non-present, so why flush?).  The vCPU's TLB keeps the translation;
    an mmu_notifier then finds nothing to zap, does not flush either, and the
    page is freed while the vCPU can still reach it."""
    return tdp_mmu_set_spte_atomic(kvm, it, SHADOW_NONPRESENT_VALUE)


def test_zap_without_flush_is_caught(make_vm: MakeVm, variant_of: VariantOf) -> None:
    vm = make_vm(variant=variant_of(zap_spte_atomic=zap_spte_atomic_without_flush))
    _zap_cached_leaf(vm)
    assert not _flush_requested(vm)
    with pytest.raises(InvariantViolation) as e:
        notifier.mmu_notifier_invalidate_range(vm.task(2), G, G + 1)
    assert e.value.invariant == "stale-tlb-entry-after-free"
    assert e.value.details["gfn"] == G and e.value.details["vcpu"] == 0


# -- iter_cond_resched: the yield -----------------------------------------------------

def _eight_cached_leaves(vm: Vm) -> Kvm:
    """vCPU 0 maps and caches G..G+7; returns a zapper due to reschedule
    (TIF_NEED_RESCHED set): it yields at its first step past the start, G+1,
    with G zapped and its flush pending."""
    for g in range(G, G + 8):
        assert kvm_tdp_page_fault(vm.kvm, g, write=True) == RET_PF_FIXED
        assert x86.guest_access(vm.kvm, g, write=False)
    zapper = vm.task(1)
    set_tsk_need_resched(zapper)
    return zapper


def test_iter_cond_resched_is_swappable(make_vm: MakeVm, variant_of: VariantOf) -> None:
    calls: list[tuple[bool, bool]] = []

    def counting_yield(kvm: Kvm, it: TdpIter, shared: bool, flush: bool) -> bool:
        calls.append((shared, flush))
        return tdp_mmu_iter_cond_resched(kvm, it, shared, flush)

    vm = make_vm(variant=variant_of(iter_cond_resched=counting_yield))
    zapper = _eight_cached_leaves(vm)
    zapper.write_lock()
    try:
        assert kvm_tdp_mmu_zap_leafs_roots(zapper, KVM_ALL_ROOTS, G, G + 8) == 8
    finally:
        zapper.write_unlock()
    assert calls and all(not shared for shared, _ in calls)
    assert any(flush for _, flush in calls)  # a pending flush handed to the yield
    assert zapper.stats["yields"] >= 1


def test_yield_that_drops_the_pending_flush_is_caught(make_vm: MakeVm,
                                                      variant_of: VariantOf) -> None:
    """Plausibly wrong: the yield forgets the caller's pending flush: the check at
    the unlock (stale-tlb-entry-after-unlock) sees a zapped leaf some vCPU may
    still cache."""
    def yield_without_flush(kvm: Kvm, it: TdpIter, shared: bool, flush: bool) -> bool:
        return tdp_mmu_iter_cond_resched(kvm, it, shared, False)

    vm = make_vm(variant=variant_of(iter_cond_resched=yield_without_flush))
    zapper = _eight_cached_leaves(vm)
    zapper.write_lock()
    try:
        with pytest.raises(InvariantViolation) as e:
            kvm_tdp_mmu_zap_leafs_roots(zapper, KVM_ALL_ROOTS, G, G + 8)
    finally:
        zapper.write_unlock()
    assert e.value.invariant == "stale-tlb-entry-after-unlock" and e.value.details["vcpu"] == 0


# -- root_filter: which listed roots an iteration visits -----------------------------

def _obsolete_root_mapping_g(vm: Vm) -> int:
    """The vCPU's root maps G, then a fast zap's first half invalidates it (not
    zapped yet); the vCPU reloads a new root.  Returns the invalid root."""
    k = vm.kvm
    old = vm.root
    assert kvm_tdp_page_fault(k, G, write=True) == RET_PF_FIXED
    k.write_lock()
    kvm_tdp_mmu_invalidate_roots(k, KVM_DIRECT_ROOTS)
    k.write_unlock()
    assert kvm_tdp_page_fault(k, G + 1, write=True) == RET_PF_FIXED  # reloads
    assert k.vcpu.root != old and is_root_invalid(k, old)
    return old


def test_root_match_takes_invalid_roots_of_the_types_asked_only(make_vm: MakeVm) -> None:
    """tdp_mmu_root_match as upstream (v6.14 on): KVM_INVALID_ROOTS widens the
    types asked for to their invalid roots, it does not add the other type's; a
    call with no valid type is its WARN_ON_ONCE."""
    vm = make_vm(tdx=True)
    k = vm.kvm
    direct, mirror = vm.root, vm.mirror_root
    direct_invalid = KVM_DIRECT_ROOTS | KVM_INVALID_ROOTS
    mirror_invalid = KVM_MIRROR_ROOTS | KVM_INVALID_ROOTS

    def match(types: int) -> set[int]:
        return {r for r in (direct, mirror) if tdp_mmu_root_match(k, r, types)}

    assert match(KVM_DIRECT_ROOTS) == match(direct_invalid) == {direct}
    assert match(KVM_MIRROR_ROOTS) == match(mirror_invalid) == {mirror}
    k.write_lock()
    kvm_tdp_mmu_invalidate_roots(k, KVM_DIRECT_ROOTS)
    k.write_unlock()
    assert is_root_invalid(k, direct) and not is_root_invalid(k, mirror)
    assert match(KVM_DIRECT_ROOTS) == set() and match(direct_invalid) == {direct}
    assert match(mirror_invalid) == {mirror}  # the invalid direct root is not the mirror's
    assert match(KVM_ALL_ROOTS) == {direct, mirror} and match(KVM_VALID_ROOTS) == {mirror}
    k.write_lock()
    kvm_tdp_mmu_invalidate_roots(k, KVM_VALID_ROOTS)
    k.write_unlock()
    assert match(mirror_invalid) == {mirror} and match(direct_invalid) == {direct}
    with pytest.raises(InvariantViolation) as e:  # panic_on_warn, as the oracles run it
        match(KVM_INVALID_ROOTS)
    assert e.value.details["warning"] == "tdp_mmu_root_match with no valid root type"


def test_root_filter_is_swappable(make_vm: MakeVm, variant_of: VariantOf) -> None:
    seen: list[tuple[int, int]] = []

    def counting_filter(kvm: Kvm, root: int, types: int) -> bool:
        seen.append((root, types))
        return tdp_mmu_root_match(kvm, root, types)

    vm = make_vm(variant=variant_of(root_filter=counting_filter))
    old = _obsolete_root_mapping_g(vm)
    seen.clear()
    zapper = vm.task(1)
    zapper.write_lock()
    try:
        assert kvm_tdp_mmu_zap_leafs_roots(zapper, KVM_ALL_ROOTS, G, G + 2) == 2
    finally:
        zapper.write_unlock()
    assert {r for r, _ in seen} == {old, vm.kvm.vcpu.root}
    assert not is_shadow_present_pte(_leaf(zapper, old, G))


def test_root_filter_that_skips_invalid_roots_leaves_a_mapping(make_vm: MakeVm,
                                                               variant_of: VariantOf) -> None:
    """Plausibly wrong: 'invalid roots are going away anyway'.  A zap over every
    root then misses the invalid root that still maps G: an mmu_notifier would
    free a page that root (and a vCPU still on it) maps."""
    def valid_roots_only(kvm: Kvm, root: int, types: int) -> bool:
        return not is_root_invalid(kvm, root) and tdp_mmu_root_match(kvm, root, types)

    vm = make_vm(variant=variant_of(root_filter=valid_roots_only))
    old = _obsolete_root_mapping_g(vm)
    zapper = vm.task(1)
    zapper.write_lock()
    try:
        # the zap's postcondition names it at once: the zap missed a root it was asked for
        with pytest.raises(InvariantViolation) as e:
            kvm_tdp_mmu_zap_leafs_roots(zapper, KVM_ALL_ROOTS, G, G + 2)
    finally:
        zapper.write_unlock()
    assert e.value.invariant == "zap left a present leaf" and e.value.details["root"] == old
    assert e.value.details["installed_by_worker"] == 0 and e.value.details["gfn"] == G
    assert is_shadow_present_pte(_leaf(zapper, old, G))  # still mapped after the "zap"
