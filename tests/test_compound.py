"""Compound helpers (one native call) against their step-by-step references.

``ts_tdp_walk`` replaces a dozen Python-level loads per fault; these tests pin
that it is the same walk: the same end state and the same loads on healthy
trees, the same status on every corruption the use-after-free oracle knows,
the same violation from a TdpIter, and delay injection that stalls after the
very same accesses whether the walk ran natively or not.  The lock helpers
with lockdep's record and the trace, and ``xchg_from``, leave the same words
behind as the single-word sequences they stand for.
"""

from __future__ import annotations

import random

import pytest

from stress.arena import Globals, Slot, SpMeta
from stress.atomics import (
    WALK_CHILD_MISMATCH,
    WALK_CHILD_OUTSIDE_POOL,
    WALK_DONE,
    WALK_GEN_MOVED,
    WALK_POISON,
    WALK_STEP_DOWN_FAILED,
    WO_LEVEL,
    WO_LOADS,
    WO_OLD_SPTE,
    WO_STATUS,
    DelayInjectingWords,
    Words,
)
from stress.model.errors import InvariantViolation
from stress.model.mmu_page import SP_FREE
from stress.model.spte import (
    FROZEN_SPTE,
    POISON_SPTE,
    PT_PAGE_SIZE_MASK,
    SHADOW_NONPRESENT_VALUE,
    make_nonleaf_spte,
)
from stress.model.tdp_iter import TdpIter, walk_params
from stress.model.tdp_mmu import RET_PF_FIXED, kvm_tdp_page_fault

GFN = 0x12345


def both(vm, gfn: int, stop: int, root: int | None = None) -> tuple[list[int], list[int]]:
    wp = walk_params(vm.layout)
    r = vm.root if root is None else root
    native = Words.tdp_walk(vm.words, wp, r, gfn, 4, stop)
    step = vm.words.tdp_walk_stepwise(wp, r, gfn, 4, stop)
    return native, step


def stepped_iter(kvm, root: int, gfn: int, stop: int) -> TdpIter:
    """The reference walk: TdpIter and next() while the entry is a present non-leaf."""
    it = TdpIter(kvm, root, gfn)
    while (it.valid and it.level > stop and it.old_spte & 1 << 11
           and not it.old_spte & PT_PAGE_SIZE_MASK):
        it.next()
    return it


def entry_of_level(vm, gfn: int, level: int) -> int:
    """Word index of the entry covering gfn in the table at ``level``."""
    it = stepped_iter(vm.kvm, vm.root, gfn, level)
    assert it.level == level
    return it.sptep


def test_native_walk_matches_stepwise_on_healthy_trees(vm) -> None:
    kvm = vm.kvm
    rng = random.Random(5)
    mapped = [GFN + rng.randrange(4096) for _ in range(40)]
    for g in mapped:
        assert kvm_tdp_page_fault(kvm, g, write=rng.random() < 0.5) == RET_PF_FIXED
    # freeze one leaf and one non-leaf entry: the walk stops there, like the loop
    vm.words.store(entry_of_level(vm, mapped[0], 1), FROZEN_SPTE)
    vm.words.store(entry_of_level(vm, mapped[1], 2), FROZEN_SPTE)
    probes = mapped + [GFN + 5000, 0, (1 << 18) - 1, mapped[0] ^ 1, mapped[1] + 1]
    for g in probes:
        for stop in (1, 2, 3, 4):
            native, step = both(vm, g, stop)
            assert native == step, (hex(g), stop)
            assert native[WO_STATUS] in (WALK_DONE,)
            it = stepped_iter(kvm, vm.root, g, stop)
            fast = TdpIter(kvm, vm.root, g, descend_to=stop)
            assert (fast.level, fast.sptep, fast.old_spte, fast.gfn, fast.mirror) == (
                it.level, it.sptep, it.old_spte, it.gfn, it.mirror)
            assert fast.pt_path[it.level:] == it.pt_path[it.level:]
            assert fast.gens[it.level:] == it.gens[it.level:]
    # a full 4-level descent: 2 root loads + 3 * 8 per step + 2 for the leaf read
    native, _ = both(vm, mapped[5], 1)
    assert native[WO_LEVEL] == 1 and native[WO_LOADS] == 2 + 3 * 8 + 2


CORRUPTIONS = {
    # what is done to the table/entry on the path -> status, invariant
    "poisoned table": (WALK_POISON, "use-after-free of page-table page"),
    "child freed": (WALK_CHILD_MISMATCH, "use-after-free of page-table page"),
    "child of another level": (WALK_CHILD_MISMATCH, "use-after-free of page-table page"),
    "child of another gfn": (WALK_CHILD_MISMATCH, "use-after-free of page-table page"),
    "child outside the pool": (WALK_CHILD_OUTSIDE_POOL, "corrupt non-leaf SPTE"),
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_native_walk_reports_what_the_stepwise_walk_reports(vm, what: str) -> None:
    kvm, w, lay = vm.kvm, vm.words, vm.layout
    assert kvm_tdp_page_fault(kvm, GFN, write=True) == RET_PF_FIXED
    table2 = stepped_iter(kvm, vm.root, GFN, 2).pt_path[2]
    parent = entry_of_level(vm, GFN, 3)  # points at table2
    if what == "poisoned table":
        w.fill(lay.spt(table2), 512, POISON_SPTE)
    elif what == "child freed":
        w.store(lay.sp(table2, SpMeta.STATE), SP_FREE)
    elif what == "child of another level":
        w.store(lay.sp(table2, SpMeta.ROLE), 1)
    elif what == "child of another gfn":
        w.store(lay.sp(table2, SpMeta.GFN), 1 << 18)
    else:
        w.store(parent, make_nonleaf_spte(lay.n_pages + 3))
    status, invariant = CORRUPTIONS[what]
    native, step = both(vm, GFN, 1)
    assert native == step
    assert native[WO_STATUS] == status
    errors = []
    for make in (lambda: stepped_iter(kvm, vm.root, GFN, 1),
                 lambda: TdpIter(kvm, vm.root, GFN, descend_to=1)):
        with pytest.raises(InvariantViolation) as e:
            make()
        errors.append(e.value.to_dict())
    assert errors[0]["invariant"] == invariant
    assert errors[0] == errors[1]


def test_a_words_hooking_loads_walks_step_by_step_and_sees_every_load(vm) -> None:
    kvm = vm.kvm
    assert kvm_tdp_page_fault(kvm, GFN, write=True) == RET_PF_FIXED
    table1 = stepped_iter(kvm, vm.root, GFN, 1).pt_path[1]
    gen_word = vm.layout.sp(table1, SpMeta.GEN)

    def free_it() -> None:  # the table is freed (and reused) under the walker
        vm.words.fetch_add(gen_word, 2)

    tw = vm.trigger_words(vm.layout.spt(table1) + (GFN & 511), free_it, on="load")
    assert type(tw).tdp_walk is Words.tdp_walk_stepwise
    assert DelayInjectingWords.tdp_walk is not Words.tdp_walk_stepwise  # decides itself
    task = vm.task(1, words=tw)
    with pytest.raises(InvariantViolation) as e:
        TdpIter(task, vm.root, GFN, descend_to=1)
    assert tw.fired and e.value.invariant == "use-after-free of page-table page"
    assert e.value.details["table"] == table1
    wp = walk_params(vm.layout)
    assert tw.tdp_walk(wp, vm.root, GFN, 4, 1)[WO_STATUS] == WALK_DONE  # gen settled again
    vm.words.fetch_add(gen_word, 2)
    tw.fired = False
    assert tw.tdp_walk(wp, vm.root, GFN, 4, 1)[WO_STATUS] == WALK_GEN_MOVED


def test_step_down_failed_goes_on_like_next(vm) -> None:
    """The re-read in try_step_down finds the child gone: the walk moves on
    sideways as tdp_iter_next does (a fault's walk leaves its range)."""
    kvm = vm.kvm
    assert kvm_tdp_page_fault(kvm, GFN, write=True) == RET_PF_FIXED
    parent = entry_of_level(vm, GFN, 2)
    child = vm.words.load(parent)
    ends = []
    for fast in (True, False):
        vm.words.store(parent, child)
        tw = vm.trigger_words(parent, lambda: vm.words.store(parent, SHADOW_NONPRESENT_VALUE),
                              on="load")  # zapped right after the walker's first read
        if fast:
            out = tw.tdp_walk(walk_params(vm.layout), vm.root, GFN, 4, 1)
            assert out[WO_STATUS] == WALK_STEP_DOWN_FAILED and out[WO_LEVEL] == 2
            assert out[WO_OLD_SPTE] == SHADOW_NONPRESENT_VALUE
            vm.words.store(parent, child)
            tw.fired = False
            it = TdpIter(vm.task(1, words=tw), vm.root, GFN, descend_to=1)
        else:
            it = stepped_iter(vm.task(1, words=tw), vm.root, GFN, 1)
        assert tw.fired
        ends.append((it.level, it.gfn, it.sptep, it.old_spte, it.valid))
    assert ends[0] == ends[1]
    assert ends[0][:2] == (2, (GFN & ~511) + 512)  # next 2M entry: out of the fault's range


def test_delay_injection_stalls_after_the_same_accesses_native_or_not(vm) -> None:
    class Stepwise(DelayInjectingWords):
        tdp_walk = Words.tdp_walk_stepwise
        read_lock_rec = Words.read_lock_rec_stepwise
        read_unlock_rec = Words.read_unlock_rec_stepwise
        xchg_from = Words.xchg_from_stepwise

    kvm = vm.kvm
    for g in range(GFN, GFN + 2048, 37):
        assert kvm_tdp_page_fault(kvm, g, write=True) == RET_PF_FIXED
    trail = []
    for cls in (DelayInjectingWords, Stepwise):
        w = cls(vm.arena.shm.buf, vm.layout.ctl(0), random.Random(3), every=20, max_ns=0)
        vm.extra_words.append(w)
        task = vm.task(1, words=w)
        seen = []
        for g in range(GFN, GFN + 2048, 37):
            kvm_tdp_page_fault(task, g, write=True)
            seen.append((w.delays, w._countdown))
        trail.append(seen)
    assert trail[0] == trail[1]
    assert trail[0][-1][0] > 100  # stalls happened, many of them inside walks


def _lock_state(lay, w: Words, me: int) -> tuple[int, ...]:  # noqa: ANN001
    head = w.load(lay.slot(me, Slot.TRACE_HEAD))
    ring = lay.trace_ring(me) + ((head - 1) % lay.trace_entries) * 6
    return (w.load(lay.glob(Globals.MMU_LOCK)), w.load(lay.slot(me, Slot.LOCK_MODE)), head,
            w.load(ring + 2), w.load(ring + 3))  # kind word and a of the last event


def test_lock_helpers_and_xchg_from_match_their_steps() -> None:
    from stress.arena import Arena, Control, Layout

    lay = Layout.build(n_slots=2, n_pages=64, n_gfns=1024, trace_entries=16)
    arena = Arena.create(lay, 0)
    ws = []
    try:
        states = []
        for me, stepwise in ((0, False), (1, True)):
            w = Words(arena.shm.buf, lay.ctl(Control.ABORT))
            ws.append(w)
            w.enable_trace(lay.trace_ring(me), lay.trace_entries,
                           lay.slot(me, Slot.TRACE_HEAD), lay.glob(Globals.TRACE_SEQ), me)
            lock_i, mode_i = lay.glob(Globals.MMU_LOCK), lay.slot(me, Slot.LOCK_MODE)
            lock = w.read_lock_rec_stepwise if stepwise else w.read_lock_rec
            unlock = w.read_unlock_rec_stepwise if stepwise else w.read_unlock_rec
            lock(lock_i, mode_i, 1, 5, 1)
            held = _lock_state(lay, w, me)
            unlock(lock_i, mode_i, 0, 5, 0)
            states.append((held, _lock_state(lay, w, me)))
            w.store(100, 0)
            w.store(101, 77)
            xf = w.xchg_from_stepwise if stepwise else w.xchg_from
            assert xf(100, 101) == 0 and w.load(100) == 77
        assert states[0][0][:2] == (1, 1) and states[0][1][:2] == (0, 0)
        assert states[0][0][3] & 0xFFFF == 5 and states[0][0][3] >> 16 == 0
        assert states[1][0][3] >> 16 == 1  # the worker bits
        strip = [tuple(x if k != 3 else x & 0xFFFF for k, x in enumerate(s))
                 for st in states for s in st]
        assert strip[:2] == strip[2:]
    finally:
        for w in ws:
            w.release()
        arena.close()
