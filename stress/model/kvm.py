"""``struct kvm`` as one process sees it: the shared words, mmu_lock, RCU, the
variant in force, and this process's identity and counters.

Model functions take a :class:`Kvm` first, as the kernel's take ``struct kvm
*``.  Lock helpers record the mode held in the process's slot (a small
lockdep): ``lockdep_assert_held_read/write`` at the top of a function states
the lock it needs, and the supervisor can name the holders of a stuck lock.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stress.arena import Control, Globals, Layout, Slot
from stress.atomics import Words
from stress.model import events
from stress.model.errors import InvariantViolation
from stress.model.hooks import NO_HOOKS, Hooks
from stress.model.rcu import Rcu

if TYPE_CHECKING:
    from stress.model.variants import Variant

LOCK_NONE, LOCK_READ, LOCK_WRITE = 0, 1, 2


@dataclass(frozen=True)
class Geometry:
    """Guest and page-table shape, fixed for a run."""

    root_level: int  # 4 or 5
    n_gfns: int  # guest size in 4 KiB frames
    tdx: bool = False  # a TD: private gfns map through the mirror root and the S-EPT
    private_chunk_shift: int = 3  # gfns alternate private/shared in 2**shift chunks


@dataclass
class TdxVm:
    """struct kvm_tdx as one process sees it: its door into the TDX module and the
    BUSY policy (see mirror.seamcall)."""

    module: Any
    policy: str = "unwind"
    busy_retries: int = 16


def kvm_mem_is_private(kvm: Kvm, gfn: int) -> bool:
    """KVM_MEMORY_ATTRIBUTE_PRIVATE: one bit per gfn in shared memory (the
    kernel's xarray of memory attributes, see host.py); only a TD has private
    memory."""
    if not kvm.geometry.tdx:
        return False
    return bool(kvm.w.load(kvm.layout.attrs + gfn // 64) >> (gfn % 64) & 1)


class Vcpu:
    """struct kvm_vcpu, the part the MMU uses: the direct root it holds a reference on."""

    def __init__(self) -> None:
        self.root: int | None = None


class Kvm:
    def __init__(self, words: Words, layout: Layout, geometry: Geometry, variant: Variant,
                 me: int, rng: random.Random | None = None) -> None:
        self.w = words
        self.layout = layout
        self.geometry = geometry
        self.variant = variant
        self.me = me
        self.pid = os.getpid()
        self.rng = rng or random.Random(me)
        self.rcu = Rcu(words, layout, me)
        self.stats: Counter[str] = Counter()
        self.lock_mode = LOCK_NONE
        self._mmu_lock_i = layout.glob(Globals.MMU_LOCK)
        self._mmu_lock_owner_i = layout.glob(Globals.MMU_LOCK_OWNER)
        self._lock_mode_i = layout.slot(me, Slot.LOCK_MODE)
        self.tlb_flush_ns = 0  # remote TLB flush latency (set from the config)
        # (root, pfn) of leaves this task zapped since its last remote TLB flush
        self.tlb_unflushed: list[tuple[int, int]] = []
        self.tdx: TdxVm | None = None
        # the oracle layer's hook points (stress.oracles attaches; no-ops by default)
        self.hooks: Hooks = NO_HOOKS
        self.vcpu = Vcpu()  # this task's struct kvm_vcpu (its direct root)
        # nested TDP: gfn -> indirect shadow page that shadows it (unsync.py)
        self.shadowed: dict[int, int] = {}
        # bug variants: targeted delay between the halves of a split atomic step
        self.race_window_ns = 0
        # need_resched() (sched.py): this task's TIF_NEED_RESCHED, its mean
        # timeslice ([sched] timeslice; 0: the tick never sets the flag), the
        # current slice (its start on the task clock, its length) and the RNG
        # the slices are drawn from
        self.tif_need_resched = False
        self.timeslice_ns = 0
        self.slice_start = -1
        self.slice_ns = 0.0
        self.sched_rng = random.Random(f"sched:{me}")
        self.alloc_cursor = (me * 7919) % max(1, layout.bitmap_words)
        # pool.alias_tables: pages [0, 64 * alias_floor_words) are frames over
        # top of guest memory, taken only by the level-1 table of the 2M region
        # whose first huge page sits there (see spte.sp_pfn)
        self.alias_floor_words = 0
        # huge pages on: faults may map shared gfns with 2M leaves
        self.huge_pages = False
        # TDX: the chance that kvm_vcpu_has_events() ends a local retry loop (and a
        # MapGPA between chunks); consecutive retries before a fault is stuck; the
        # worker slots that are vCPUs (whose mutexes the VM-state ioctls take)
        self.tdx_pending_event_fraction = 0.0
        self.max_fault_retries = 100_000
        self.vcpu_slots: tuple[int, ...] = ()
        self.walk_params: Any = None  # for Words.tdp_walk, built by tdp_iter at first use

    # -- mmu_lock ----------------------------------------------------------------
    def read_lock(self) -> None:
        """read_lock(&kvm->mmu_lock), recorded in this task's slot and trace."""
        self.w.read_lock_rec(self._mmu_lock_i, self._lock_mode_i, LOCK_READ, events.LOCK, 1)
        self.lock_mode = LOCK_READ

    def read_unlock(self) -> None:
        self.lock_mode = LOCK_NONE
        self.w.read_unlock_rec(self._mmu_lock_i, self._lock_mode_i, LOCK_NONE, events.LOCK, 0)

    def write_lock(self) -> None:
        self.w.write_lock(self._mmu_lock_i, self._mmu_lock_owner_i, self.pid)
        self.lock_mode = LOCK_WRITE
        self.w.store(self._lock_mode_i, LOCK_WRITE)
        self.w.trace(events.LOCK, 2)

    def write_unlock(self) -> None:
        self.w.trace(events.LOCK, 3)
        self.lock_mode = LOCK_NONE
        self.w.store(self._lock_mode_i, LOCK_NONE)
        self.w.write_unlock(self._mmu_lock_i, self._mmu_lock_owner_i)

    def rwlock_needbreak(self) -> bool:
        """rwlock_needbreak(&kvm->mmu_lock): another task waits for mmu_lock, in
        either mode (a waiting writer, or any task queued for it: qrwlock's
        queued_rwlock_is_contended, see native/atomics.c)."""
        return self.w.rwlock_contended(self._mmu_lock_i)

    def lockdep_assert_held_read(self) -> None:
        if self.lock_mode != LOCK_READ:
            self.bug("lockdep", "mmu_lock must be held for read", held=self.lock_mode)

    def lockdep_assert_held_write(self) -> None:
        if self.lock_mode != LOCK_WRITE:
            self.bug("lockdep", "mmu_lock must be held for write", held=self.lock_mode)

    def lockdep_assert_held(self) -> None:
        if self.lock_mode == LOCK_NONE:
            self.bug("lockdep", "mmu_lock must be held")

    # -- severities ----------------------------------------------------------------
    def warn(self, what: str) -> None:
        """WARN_ON_ONCE: counted, reported in the summary, the run goes on."""
        self.stats["warn:" + what] += 1

    def bug(self, invariant: str, message: str, **details: Any) -> None:
        """KVM_BUG_ON / BUG(): stop the run with this invariant."""
        details.setdefault("worker", self.me)
        details.setdefault("pid", self.pid)
        raise InvariantViolation(invariant, message, **details)


def vm_dead(kvm: Kvm) -> bool:
    """kvm_vm_dead was called (KVM_BUG_ON, or the TD was killed)."""
    return bool(kvm.w.load(kvm.layout.glob(Globals.VM_DEAD)))


def signal_pending(kvm: Kvm) -> bool:
    """The task was asked to stop (the harness's STOP or ABORT): what a signal
    is to an ioctl's retry loop."""
    w = kvm.w
    return bool(w.load(w.abort_i) or w.load(kvm.layout.ctl(Control.STOP)))
