"""The guest physical layout: memslots, their packed per-gfn arrays, and a TD's
shared bit (the direct root maps shared gfns in its upper half)."""

from __future__ import annotations

import random

import pytest

from stress import config
from stress.arena import WORDS_PER_PAGE, Layout, SpMeta
from stress.config import ConfigError
from stress.harness.supervisor import pool_pages
from stress.harness.workers import GuestRam, hot_region
from stress.model.host import host_pfn, pfn_gfn_gen
from stress.model.kvm import (
    TDX_SHARED_BIT_PWL_4,
    gfn_to_memslot,
    index_to_gfn,
    kvm_gfn_direct_bits,
    kvm_mem_is_private,
    slot_index,
)
from stress.model.notifier import mmu_notifier_invalidate_range
from stress.model.spte import (
    HOST_PFN_BASE,
    SHADOW_NONPRESENT_VALUE,
    SPTE_INDEX,
    is_shadow_present_pte,
    make_spte,
    spte_to_child_pt,
)
from stress.model.tdp_mmu import (
    RET_PF_EMULATE,
    RET_PF_FIXED,
    kvm_mmu_uninit_tdp_mmu,
    kvm_mmu_zap_all_fast,
    kvm_tdp_page_fault,
)
from stress.oracles.quiescent import quiescent_check, teardown_check
from tests.conftest import run_cli

G = 1 << 18  # gfns per GiB


def _present(vm, root: int) -> list[int]:
    base = vm.layout.spt(root)
    return [i for i in range(WORDS_PER_PAGE) if is_shadow_present_pte(vm.words.load(base + i))]


def _fault_every_slot(vm) -> None:
    """One private and one shared gfn of every slot faulted in, as the exit
    reports them (a shared gpa carries the shared bit on a TD)."""
    kvm = vm.kvm
    for slot in vm.geometry.memslots:
        seen = set()
        for gfn in range(slot.base_gfn, slot.end_gfn):
            private = kvm_mem_is_private(kvm, gfn)
            if private in seen:
                continue
            seen.add(private)
            gpa_gfn = gfn if private else gfn | kvm_gfn_direct_bits(kvm)
            assert kvm_tdp_page_fault(kvm, gpa_gfn, True) == RET_PF_FIXED, hex(gfn)
            if len(seen) == 2 or not vm.geometry.tdx:
                break


@pytest.mark.parametrize("vm_type", ["tdx", "default"])
def test_default_layout_gives_every_root_several_root_entries(make_vm, vm_type) -> None:
    """The default job's layout (pc): after a fault in every slot, the root of
    each root type has two present entries or more; a TD's direct root holds
    them in its upper half (gfn | the shared bit), its mirror root in the lower."""
    cfg = config.load("default", {"vm": {"type": vm_type}})
    assert cfg.guest.layout == "pc"
    vm = make_vm(tdx=vm_type == "tdx", memslots=cfg.memslots, n_pages=512)
    _fault_every_slot(vm)
    direct = _present(vm, vm.root)
    assert len(direct) >= 2, direct
    if vm_type == "tdx":
        assert all(i >= 256 for i in direct), direct  # bit 47 of the gpa: root index 256+
        mirror = _present(vm, vm.mirror_root)
        assert len(mirror) >= 2 and all(i < 256 for i in mirror), mirror
    assert not quiescent_check(vm.kvm).violations


def test_far_slot_costs_no_per_gfn_memory() -> None:
    """The arena's per-gfn arrays are per slot, packed: a slot at 2**46 or at the
    top of the address space costs what one at 4g does."""
    sizes = set()
    for far in ("4g+2m", "64t+2m", "2m@top"):
        cfg = config.load(None, {"guest": {"slots": ["0-1g", far], "hot_set": "64k"}})
        lay = Layout.build(n_slots=4, n_pages=64, n_gfns=cfg.n_gfns)
        sizes.add((lay.nwords, lay.tlb - lay.host_gens, cfg.n_gfns))
        assert pool_pages(cfg) < 4000  # the tables, not the gfns, of the far slot
    assert len(sizes) == 1, sizes
    assert sizes.pop()[2] == G + 512


def test_slot_index_and_host_pfns_round_trip(make_vm) -> None:
    """A gfn's arrays are its slot's (slot offset + gfn - base_gfn) and its host
    PFN encodes that index, not the gfn: gfns far above 2**28 decode back."""
    far = 1 << 34  # 64 TiB
    vm = make_vm(tdx=True, memslots=((0, 1024), (4 * G, 100), (far, 512)))
    kvm = vm.kvm
    assert [slot_index(kvm, g) for g in (0, 1023, 4 * G, far + 5)] == [0, 1023, 1024, 1541]
    assert gfn_to_memslot(kvm, 2048) is None and gfn_to_memslot(kvm, far + 512) is None
    for gfn in (7, 4 * G + 99, far + 511):
        pfn = host_pfn(kvm, gfn)
        assert pfn < HOST_PFN_BASE + (1 << 36)
        assert pfn_gfn_gen(kvm, pfn) == (gfn, 0, False)
        assert pfn_gfn_gen(kvm, host_pfn(kvm, gfn, private=True)) == (gfn, 0, True)
        assert index_to_gfn(kvm, slot_index(kvm, gfn)) == gfn
    assert kvm_gfn_direct_bits(kvm) == TDX_SHARED_BIT_PWL_4 == 1 << 35
    assert index_to_gfn(kvm, 1024 + 200) == -1  # the slot's padding up to 2 MiB


def test_shared_fault_maps_the_upper_half_and_zaps_reach_it(make_vm) -> None:
    """A shared fault maps gfn | the shared bit in the direct root; an
    invalidation of [start, end) in plain gfns takes it out again; a fast zap
    and the teardown free every table of both halves."""
    vm = make_vm(tdx=True, memslots=((0, 4096), (1 << 34, 512)))
    kvm = vm.kvm
    gfn = next(g for g in range(4096) if not kvm_mem_is_private(kvm, g))
    assert kvm_tdp_page_fault(kvm, gfn, True) == RET_PF_FIXED  # the guest's view: shared
    assert _present(vm, vm.root) == [SPTE_INDEX(gfn | (1 << 35), 4)] == [256]
    mmu_notifier_invalidate_range(kvm, gfn, gfn + 1, "shared")
    rep = quiescent_check(kvm)
    assert not rep.violations and rep.leaves == 0
    _fault_every_slot(vm)
    kvm_mmu_zap_all_fast(kvm)  # the direct root goes, its upper half with it
    assert not quiescent_check(kvm).violations
    kvm_mmu_uninit_tdp_mmu(kvm)
    assert not teardown_check(kvm).violations


def test_leaf_in_the_wrong_half_is_caught(make_vm) -> None:
    """A shared gfn mapped in the direct root without the shared bit (its lower
    half, where a walk that forgot the bit would put it) is caught by the
    quiescent walk."""
    vm = make_vm(tdx=True)
    kvm, w, lay = vm.kvm, vm.words, vm.layout
    gfn = next(g for g in range(4096) if not kvm_mem_is_private(kvm, g))
    assert kvm_tdp_page_fault(kvm, gfn, True) == RET_PF_FIXED
    root = lay.spt(vm.root)
    w.store(root + 0, w.load(root + 256))  # the path moved to the plain gfn ...
    w.store(root + 256, SHADOW_NONPRESENT_VALUE)
    v, level = w.load(root + 0), 4
    while level > 1:  # ... its tables' sp->gfn too, so only the leaf's place is wrong
        child = spte_to_child_pt(v, level)
        w.store(lay.sp(child, SpMeta.GFN), w.load(lay.sp(child, SpMeta.GFN)) & ~(1 << 35))
        level -= 1
        v = w.load(lay.spt(child) + SPTE_INDEX(gfn, level))
    rep = quiescent_check(kvm)
    assert [v.invariant for v in rep.violations] == ["gfn mapped in the wrong root"]
    assert rep.violations[0].details["walked_gfn"] == gfn


def test_a_fault_in_the_mmio_hole_emulates(make_vm) -> None:
    vm = make_vm(memslots=((0, 512), (4 * G, 512)))
    assert kvm_tdp_page_fault(vm.kvm, 3 * G, True) == RET_PF_EMULATE
    assert vm.kvm.stats["mmio_exits"] == 1
    assert _present(vm, vm.root) == []


def test_workers_pick_gfns_from_slots_only() -> None:
    cfg = config.load("default")
    ram = GuestRam(cfg.memslots)
    rng = random.Random(1)
    slots = set()
    for _ in range(3000):
        g = ram.random_gfn(rng)
        b, e = ram.slot_of(g)
        assert b <= g < e
        slots.add(b)
    assert len(slots) == 3
    base, n = hot_region(cfg)
    b, e = ram.slot_of(base)
    assert b <= base and base + n <= e and not base % 512
    assert [ram.gfn_at(ram.ordinal_of(g)) for g in (0, 4 * G, e - 1)] == [0, 4 * G, e - 1]


def test_pc_layout_and_slot_syntax() -> None:
    pc = config.load(None, {"guest": {"layout": "pc", "size": "1g"}})
    top = 1 << (47 - 12)  # a TD: below the shared bit
    assert pc.memslots == ((0, G // 2), (4 * G, G // 2), (top - 512, 512))
    big = config.load(None, {"guest": {"layout": "pc", "size": "8g"}, "vm": {"type": "default"}})
    assert big.memslots == ((0, 2 * G), (4 * G, 6 * G), ((1 << 36) - 512, 512))
    five = config.load(None, {"guest": {"slots": ["0-1g", "0x1000000000000+2m", "4m@top"],
                                        "root_level": 5}})
    assert five.memslots == ((0, G), (1 << 36, 512), ((1 << 39) - 1024, 1024))


@pytest.mark.parametrize("guest, msg", [
    ({"slots": ["0-2g", "1g-3g"]}, "overlap"),
    ({"slots": ["1m+2m"]}, "2m boundary"),
    ({"slots": ["4g..5g"]}, "START-END"),
    ({"slots": "0-1g"}, "expected a list"),
    ({"slots": ["128t+2m"]}, "top of the guest physical address space"),  # a TD: 2**47
    ({"slots": ["0-1g"], "size": "2g"}, "guest.size"),
    ({"layout": "pc", "size": "2m"}, "guest.layout"),
    ({"layout": "numa"}, "guest.layout"),
    ({"slots": ["0-1m", "4g+1m"], "hot_set": "2m"}, "guest.hot_set"),
])
def test_bad_layouts_name_their_key(guest, msg) -> None:
    with pytest.raises(ConfigError, match=msg) as e:
        config.load(None, {"guest": guest})
    assert str(e.value).startswith("guest.") or "guest." in str(e.value)


def test_make_spte_of_a_far_gfn_fits_the_pfn_field(make_vm) -> None:
    vm = make_vm(memslots=((0, 512), ((1 << 36) - 512, 512)))
    spte = make_spte(host_pfn(vm.kvm, (1 << 36) - 1), 1, True)
    assert pfn_gfn_gen(vm.kvm, (spte >> 12) & ((1 << 40) - 1)) == ((1 << 36) - 1, 0, False)


def test_a_bad_slot_list_is_a_usage_error(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[guest]\nslots = ["0-1g", "1g+1m", "3g-2g"]\n')
    r = run_cli("run", str(bad), "--duration", "1s", "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "guest.slots: '3g-2g'" in r.stderr
