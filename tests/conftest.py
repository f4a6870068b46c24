from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from stress import oracles
from stress.arena import Arena, Control, Globals, Layout, list_segments
from stress.atomics import Words
from stress.model.host import init_lpage_info, init_mem_attributes
from stress.model.kvm import Geometry, Kvm, TdxVm, build_memslots
from stress.model.roots import kvm_tdp_mmu_alloc_root
from stress.model.td import tdx_td_finalize
from stress.model.tdp_mmu import kvm_tdp_mmu_alloc_mirror_root
from stress.model.tdx import TdxModule
from stress.model.variants import get_variant

ROOT = Path(__file__).resolve().parent.parent


def segments_of(pid: int) -> list[str]:
    return [s for s in list_segments() if s.startswith(f"tdpstress-{pid}-")]


def run_cli(*args: str, timeout: float = 120, cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run ``tdp-stress ARGS`` in a subprocess; assert it left no segment behind."""
    p = subprocess.Popen([sys.executable, "-m", "stress.cli", *args], cwd=cwd or ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout)
    assert segments_of(p.pid) == [], f"leaked shared memory: {segments_of(p.pid)}"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


class Vm:
    """A VM in a private arena, for single-process model tests."""

    def __init__(self, variant: str = "fixed", n_pages: int = 256, slots: int = 3,
                 guest_gfns: int = 1 << 18, tdx: bool = False, policy: str = "unwind",
                 latency_ns: int = 0, huge_pages: float = 0.0, chunk_shift: int = 3,
                 alias_floor_words: int = 0, runnable: bool = True,
                 memslots: tuple[tuple[int, int], ...] | None = None,
                 root_level: int = 4) -> None:
        """``memslots``: (base_gfn, npages) of each slot; default one [0, guest_gfns)."""
        self.extra_words: list[Words] = []
        self.shadowed: dict[int, int] = {}  # nested TDP: gfn -> leaf shadow page
        slots_ = build_memslots(memslots or [(0, guest_gfns)])
        frames = sum(s.frames for s in slots_)
        self.layout = lay = Layout.build(n_slots=slots, n_pages=n_pages, n_gfns=frames)
        self.arena = Arena.create(lay, 0)
        self.words = w = Words(self.arena.shm.buf, lay.ctl(Control.ABORT))
        w.fill(lay.bitmap, lay.bitmap_words, (1 << 64) - 1)
        if n_pages % 64:
            w.store(lay.bitmap + lay.bitmap_words - 1, (1 << (n_pages % 64)) - 1)
        w.store(lay.glob(Globals.RCU_GP_CTR), 1)
        self.geometry = Geometry(root_level=root_level, tdx=tdx,
                                 private_chunk_shift=chunk_shift, memslots=slots_)
        self.huge_pages = huge_pages
        self.alias_floor_words = alias_floor_words
        self.variant = get_variant(variant)
        self.policy = policy
        self.latency_ns = latency_ns
        self.kvm = self.task(0)
        init_mem_attributes(self.kvm)
        init_lpage_info(self.kvm, huge_pages, 0)
        if tdx:
            self.mirror_root = kvm_tdp_mmu_alloc_mirror_root(self.kvm)
            if runnable:  # no initial image: KVM_TDX_FINALIZE_VM at once
                assert tdx_td_finalize(self.kvm) == 0
        self.kvm.read_lock()
        self.root = kvm_tdp_mmu_alloc_root(self.kvm)  # the VM's first direct root,
        self.kvm.read_unlock()  # its creator's reference is the task's vCPU's
        self.kvm.vcpu.root = self.root

    def task(self, me: int, words: Words | None = None) -> Kvm:
        """Another task (its own RCU reader slot and lock state) on the same VM."""
        kvm = oracles.attach(Kvm(words or self.words, self.layout, self.geometry, self.variant,
                                 me))
        kvm.shadowed = self.shadowed
        kvm.huge_pages = self.huge_pages > 0
        kvm.alias_floor_words = self.alias_floor_words
        if self.geometry.tdx:
            kvm.tdx = TdxVm(TdxModule(kvm, self.latency_ns), policy=self.policy)
        return kvm

    def close(self) -> None:
        for w in self.extra_words:
            w.release()
        self.words.release()
        self.arena.close()

    def trigger_words(self, target: int, action, on: str = "cmpxchg") -> TriggerWords:  # noqa: ANN001
        w = TriggerWords(self.arena.shm.buf, self.layout.ctl(Control.ABORT), target, action, on)
        self.extra_words.append(w)
        return w


def tick_clock(kvm: Kvm, mean_ticks: float) -> None:
    """Give ``kvm`` a timeslice of ``mean_ticks`` on a task clock that ticks once
    per read (need_resched() reads it once per check): a deterministic stand-in
    for wall time, so need_resched() comes after a seeded, exponential number of
    iterator steps.  The clock is the words' (shared by the tasks on them)."""
    ticks = itertools.count(1)
    kvm.w.task_clock_ns = lambda: next(ticks)  # type: ignore[method-assign]
    kvm.w.scheduled_at = 0
    kvm.timeslice_ns = mean_ticks


class TriggerWords(Words):
    """Words that run ``action`` once, right after a successful cmpxchg (or,
    with ``on="load"``, a load; ``"fetch_add"``, ``"fetch_or"``) of word
    ``target``: a hand-made interleaving at the atomics chokepoint."""

    def __init__(self, buf: memoryview, abort_i: int, target: int, action,  # noqa: ANN001
                 on: str = "cmpxchg") -> None:
        super().__init__(buf, abort_i)
        self.target = target
        self.action = action
        self.on = on
        self.fired = False

    def _fire(self) -> None:
        if not self.fired:
            self.fired = True
            self.action()

    def cmpxchg(self, i: int, old: int, new: int) -> int:
        found = super().cmpxchg(i, old, new)
        if self.on == "cmpxchg" and i == self.target and found == old:
            self._fire()
        return found

    def load(self, i: int) -> int:
        v = super().load(i)
        if self.on == "load" and i == self.target:
            self._fire()
        return v

    def fetch_add(self, i: int, v: int) -> int:
        old = super().fetch_add(i, v)
        if self.on == "fetch_add" and i == self.target:
            self._fire()
        return old

    def fetch_or(self, i: int, v: int) -> int:
        old = super().fetch_or(i, v)
        if self.on == "fetch_or" and i == self.target:
            self._fire()
        return old


@pytest.fixture
def vm() -> Iterator[Vm]:
    v = Vm()
    yield v
    v.close()


@pytest.fixture
def make_vm() -> Iterator:
    made: list[Vm] = []

    def make(**kw: object) -> Vm:
        v = Vm(**kw)  # type: ignore[arg-type]
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


@pytest.fixture(autouse=True)
def no_segment_leak() -> Iterator[None]:
    yield
    assert segments_of(os.getpid()) == [], "test leaked a tdpstress- segment"


__all__ = ["Vm", "run_cli", "segments_of", "shared_memory"]
