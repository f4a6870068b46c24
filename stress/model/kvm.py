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
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
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


# TDX_SHARED_BIT_PWL_4 / _5 (tdx.c, read at kvm-x86/linux 09c6f74ecb86, where
# tdx_td_init sets kvm->arch.gfn_direct_bits to one of them by the TD's GPAW,
# TDX_CONFIG_FLAGS_MAX_GPAW): the GPA bit that makes an address shared, 47 under
# 4-level EPT, 51 under 5-level (as gfn bits: 35 and 39)
TDX_SHARED_BIT_PWL_4 = 1 << (47 - 12)
TDX_SHARED_BIT_PWL_5 = 1 << (51 - 12)
KVM_PAGES_PER_2M = 512  # a slot's arrays start on a 2 MiB boundary of the index space


@dataclass(frozen=True)
class KvmMemorySlot:
    """``struct kvm_memory_slot``: [base_gfn, base_gfn + npages) and its per-gfn
    arrays (host page generations, attributes, lpage_info, dirty counts, the TD
    guest's acceptances).  The kernel allocates them per slot; here every slot's
    arrays are packed one after another in the arena, the slot's own starting at
    frame ``arrays`` of them (a multiple of 512, so 2 MiB regions stay aligned),
    and :func:`slot_index` is the one place a gfn becomes an index into them.
    So a slot far up the guest physical address space costs only its own pages."""

    id: int
    base_gfn: int
    npages: int
    arrays: int

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def frames(self) -> int:
        """Frames the slot takes in the arrays (npages rounded up to 2 MiB)."""
        return -(-self.npages // KVM_PAGES_PER_2M) * KVM_PAGES_PER_2M


def build_memslots(ranges: Iterable[tuple[int, int]]) -> tuple[KvmMemorySlot, ...]:
    """The memslots for ``(base_gfn, npages)`` ranges (2 MiB aligned bases, no
    overlap; the config checks both), sorted by gfn, arrays packed in that order."""
    out: list[KvmMemorySlot] = []
    arrays = 0
    for k, (base, npages) in enumerate(sorted(ranges)):
        if base % KVM_PAGES_PER_2M or npages <= 0 or (out and base < out[-1].end_gfn):
            raise ValueError(f"bad memslot [{base:#x}, {base + npages:#x})")
        out.append(KvmMemorySlot(k, base, npages, arrays))
        arrays += out[-1].frames
    return tuple(out)


@dataclass(frozen=True)
class Geometry:
    """Guest and page-table shape, fixed for a run.

    ``memslots``: the guest physical layout; without them one slot [0, n_gfns).
    ``n_gfns`` is then the frames the slots' arrays take in the arena (their
    npages, each rounded up to 2 MiB), not the width of the guest's address
    space.  On a TD ``gfn_direct_bits`` is the shared bit
    (``kvm->arch.gfn_direct_bits``, set by tdx_td_init from the GPAW)."""

    root_level: int  # 4 or 5
    n_gfns: int = 0
    tdx: bool = False  # a TD: private gfns map through the mirror root and the S-EPT
    private_chunk_shift: int = 3  # gfns alternate private/shared in 2**shift chunks
    memslots: tuple[KvmMemorySlot, ...] = ()
    gfn_direct_bits: int = field(init=False, default=0)
    slot_bases: tuple[int, ...] = field(init=False, default=(), compare=False, repr=False)
    slot_arrays: tuple[int, ...] = field(init=False, default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        slots = self.memslots or build_memslots([(0, self.n_gfns)] if self.n_gfns else [])
        set_ = object.__setattr__
        set_(self, "memslots", slots)
        set_(self, "n_gfns", sum(s.frames for s in slots))
        set_(self, "slot_bases", tuple(s.base_gfn for s in slots))
        set_(self, "slot_arrays", tuple(s.arrays for s in slots))
        if self.tdx:
            set_(self, "gfn_direct_bits", TDX_SHARED_BIT_PWL_5 if self.root_level == 5
                 else TDX_SHARED_BIT_PWL_4)


def kvm_gfn_direct_bits(kvm: Kvm) -> int:
    """kvm_gfn_direct_bits: the gfn bits a direct root maps at (a TD's shared
    bit; 0 for a VM without TDX)."""
    return kvm.geometry.gfn_direct_bits


def gfn_to_memslot(kvm: Kvm, gfn: int) -> KvmMemorySlot | None:
    """The memslot holding ``gfn`` (a gfn as memslots know it: no direct bits),
    or None (the MMIO hole, or beyond every slot)."""
    g = kvm.geometry
    slots = g.memslots
    if len(slots) == 1:
        s = slots[0]
    else:
        i = bisect_right(g.slot_bases, gfn) - 1
        if i < 0:
            return None
        s = slots[i]
    return s if s.base_gfn <= gfn < s.base_gfn + s.npages else None


def slot_index(kvm: Kvm, gfn: int) -> int:
    """``gfn``'s index into the per-slot arrays: the slot's offset in the arena's
    arrays + gfn - base_gfn.  The only place a gfn becomes an array index; a gfn
    no memslot holds has none (KVM never indexes one: the caller is broken)."""
    g = kvm.geometry
    slots = g.memslots
    s = slots[0] if len(slots) == 1 else slots[max(0, bisect_right(g.slot_bases, gfn) - 1)]
    if not s.base_gfn <= gfn < s.base_gfn + s.npages:
        kvm.bug("gfn outside every memslot", "a per-gfn array was indexed with a gfn no "
                "memslot holds", gfn=f"{gfn:#x}")
    return s.arrays + gfn - s.base_gfn


def index_to_gfn(kvm: Kvm, index: int) -> int:
    """The gfn whose per-slot arrays sit at ``index`` (slot_index's inverse), or
    -1 when no slot's frame is there (a slot's padding, or beyond)."""
    g = kvm.geometry
    i = bisect_right(g.slot_arrays, index) - 1
    if i < 0:
        return -1
    s = g.memslots[i]
    off = index - s.arrays
    return s.base_gfn + off if 0 <= off < s.npages else -1


@dataclass
class TdxVm:
    """struct kvm_tdx as one process sees it: its door into the TDX module and the
    BUSY policy (see mirror.seamcall)."""

    module: Any
    policy: str = "unwind"
    busy_retries: int = 16


def kvm_mem_is_private(kvm: Kvm, gfn: int) -> bool:
    """KVM_MEMORY_ATTRIBUTE_PRIVATE: one bit per gfn in shared memory (the
    kernel's xarray of memory attributes, see host.py; kept per memslot here);
    only a TD has private memory."""
    if not kvm.geometry.tdx:
        return False
    i = slot_index(kvm, gfn)
    return bool(kvm.w.load(kvm.layout.attrs + i // 64) >> (i % 64) & 1)


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
        # current->non_block_count (sched.py non_block_start): no sleeping
        self.non_block_count = 0
        # a signal sent to this task arrives just before its n-th signal_pending()
        # check from now (0: pending; -1: none sent)
        self.signal_in = -1
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
        # MapGPA between chunks); the worker slots that are vCPUs (whose mutexes the
        # VM-state ioctls take)
        self.tdx_pending_event_fraction = 0.0
        self.vcpu_slots: tuple[int, ...] = ()
        self.walk_params: Any = None  # for Words.tdp_walk, built by tdp_iter at first use

    # -- mmu_lock ----------------------------------------------------------------
    def _lockdep_acquire(self) -> None:
        """lockdep: a task that holds mmu_lock (either mode) and takes it again
        deadlocks on itself (a writer waits for its own read or write hold)."""
        if self.lock_mode != LOCK_NONE:
            self.bug("lockdep", "possible recursive locking detected: mmu_lock is already "
                     "held by this task", held=self.lock_mode)

    def _lockdep_release(self, mode: int) -> None:
        # (ABORT, the harness's end of a run: a waiter that gave up its acquire with
        # LockAborted unwinds through its callers' unlocks; no kernel path does that)
        if self.lock_mode != mode and not self.w.load(self.w.abort_i):
            self.bug("lockdep", "bad unlock balance detected: mmu_lock released in a mode "
                     "this task does not hold it in", held=self.lock_mode, released=mode)

    def read_lock(self) -> None:
        """read_lock(&kvm->mmu_lock), recorded in this task's slot and trace."""
        self._lockdep_acquire()
        self.w.read_lock_rec(self._mmu_lock_i, self._lock_mode_i, LOCK_READ, events.LOCK, 1)
        self.lock_mode = LOCK_READ

    def read_unlock(self) -> None:
        self.hooks.mmu_lock_release(self)
        self._lockdep_release(LOCK_READ)
        self.lock_mode = LOCK_NONE
        self.w.read_unlock_rec(self._mmu_lock_i, self._lock_mode_i, LOCK_NONE, events.LOCK, 0)

    def write_lock(self) -> None:
        self._lockdep_acquire()
        self.w.write_lock(self._mmu_lock_i, self._mmu_lock_owner_i, self.pid)
        self.lock_mode = LOCK_WRITE
        self.w.store(self._lock_mode_i, LOCK_WRITE)
        self.w.trace(events.LOCK, 2)

    def write_unlock(self) -> None:
        self.hooks.mmu_lock_release(self)
        self._lockdep_release(LOCK_WRITE)
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

    def spin_unlock(self, i: int, name: str) -> None:
        """spin_unlock() / mutex_unlock() of a KVM lock word (the model's spin locks
        and mutexes hold their owner's pid) with the kernel's lock debugging:
        only the holder releases a lock (DEBUG_SPINLOCK's "spinlock wrong owner",
        DEBUG_MUTEXES' owner check, lockdep's "bad unlock balance")."""
        owner = self.w.load(i)
        if owner != self.pid:
            self.bug("lockdep", f"bad unlock balance: {name} released by a task that does "
                     "not hold it", lock=name, owner=owner)
        self.w.spin_unlock(i)

    def lockdep_assert_held(self) -> None:
        if self.lock_mode == LOCK_NONE:
            self.bug("lockdep", "mmu_lock must be held")

    # -- severities ----------------------------------------------------------------
    def warn(self, what: str, **details: Any) -> None:
        """WARN_ON_ONCE: counted, reported in the summary; the kernel goes on, and so
        does the model (the oracles make it fatal, as panic_on_warn does).
        ``details`` say where: what the kernel's splat would let one find out."""
        self.stats["warn:" + what] += 1
        self.hooks.kernel_warning(self, what, details)

    def bug(self, invariant: str, message: str, **details: Any) -> None:
        """KVM_BUG_ON / BUG(): stop the run with this invariant."""
        details.setdefault("worker", self.me)
        details.setdefault("pid", self.pid)
        raise InvariantViolation(invariant, message, **details)


def vm_dead(kvm: Kvm) -> bool:
    """kvm_vm_dead was called (KVM_BUG_ON, or the TD was killed)."""
    return bool(kvm.w.load(kvm.layout.glob(Globals.VM_DEAD)))


def signal_pending(kvm: Kvm) -> bool:
    """signal_pending(current) at an ioctl's check: a signal the VMM sent this
    task (``Kvm.signal_in``: it arrives just before the n-th check, as the
    VMM's SIG_IPI kicks a vCPU thread in the middle of an ioctl), or the
    harness's STOP or ABORT, the signal that ends a run."""
    if kvm.signal_in > 0:
        kvm.signal_in -= 1
    return has_pending_signal(kvm)


def has_pending_signal(kvm: Kvm) -> bool:
    """Whether a signal is pending now, counting no check (what the VMM and the
    oracles read)."""
    w = kvm.w
    return kvm.signal_in == 0 or bool(w.load(w.abort_i) or w.load(kvm.layout.ctl(Control.STOP)))
