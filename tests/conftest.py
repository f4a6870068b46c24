from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from stress.arena import Arena, Control, Globals, Layout, list_segments
from stress.atomics import Words
from stress.model.kvm import Geometry, Kvm
from stress.model.tdp_mmu import kvm_tdp_mmu_alloc_root
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
                 guest_gfns: int = 1 << 18) -> None:
        self.layout = lay = Layout.build(n_slots=slots, n_pages=n_pages)
        self.arena = Arena.create(lay, 0)
        self.words = w = Words(self.arena.shm.buf, lay.ctl(Control.ABORT))
        w.fill(lay.bitmap, lay.bitmap_words, (1 << 64) - 1)
        if n_pages % 64:
            w.store(lay.bitmap + lay.bitmap_words - 1, (1 << (n_pages % 64)) - 1)
        w.store(lay.glob(Globals.RCU_GP_CTR), 1)
        self.geometry = Geometry(root_level=4, n_gfns=guest_gfns)
        self.variant = get_variant(variant)
        self.kvm = self.task(0)
        self.root = kvm_tdp_mmu_alloc_root(self.kvm)

    def task(self, me: int) -> Kvm:
        """Another task (its own RCU reader slot and lock state) on the same VM."""
        return Kvm(self.words, self.layout, self.geometry, self.variant, me)

    def close(self) -> None:
        self.words.release()
        self.arena.close()


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
