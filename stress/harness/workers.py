"""Worker processes: one role loop each, calling model functions.

A worker is a forked child of the supervisor.  It maps the arena it inherited,
builds its own :class:`~stress.model.kvm.Kvm` (its own RNG, derived from the
run seed and its index, so a seed fixes every random choice of every worker),
waits for GO, then runs its role's ``step`` until STOP.  Between steps, and
only there, it is outside mmu_lock and RCU: that is where it parks when the
supervisor asks for a quiescent check, and where it publishes its counters.

A worker reports over its pipe: ``("violation", dict)`` when the model raised
an invariant violation, ``("error", text)`` on any other exception, and
``("done", stats)`` at a clean exit.  It never unlinks the arena.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import os
import random
import signal
import sys
import time
import traceback
from bisect import bisect_right
from collections.abc import Callable
from multiprocessing.connection import Connection

from stress import oracles
from stress.arena import Arena, Control, Globals, Layout, Slot, quiet_phase
from stress.atomics import DelayInjectingWords, LockAborted, ScheduledWords, Words
from stress.config import Config
from stress.harness.sched import Turns, worker_turns
from stress.model import unsync
from stress.model.errors import InvariantViolation
from stress.model.guest import guest_release_private
from stress.model.host import init_lpage_info, kvm_mmu_gfn_disallow_lpage
from stress.model.kvm import Geometry, Kvm, TdxVm, build_memslots, kvm_mem_is_private
from stress.model.memslot import srcu_read_lock, srcu_read_unlock
from stress.model.mmu_page import tdp_mmu_free_sp_rcu_callback
from stress.model.notifier import (
    kvm_set_memory_region_move,
    mmu_notifier_invalidate_range,
    vmm_convert_memory,
)
from stress.model.roots import (
    for_each_tdp_mmu_root_yield_safe,
    kvm_mmu_unload,
)
from stress.model.sched import cond_resched, sched_start_op
from stress.model.spte import KVM_PAGES_PER_HPAGE, PG_LEVEL_2M, round_gfn_for_level
from stress.model.td import (
    EINTR,
    EXIT_FASTPATH_EXIT_HANDLED,
    GUEST_EPT_VIOLATION,
    GUEST_OK,
    check_td_runnable,
    kvm_arch_vcpu_pre_fault_memory,
    td_exit,
    td_guest_access_private,
    tdx_handle_ept_violation,
    tdx_map_gpa,
    tdx_td_finalize,
    tdx_vcpu_init_mem_region,
    tdx_vcpu_ioctl,
    tdx_vcpu_run,
)
from stress.model.tdp_mmu import (
    RET_PF_EMULATE,
    RET_PF_RETRY,
    kvm_mmu_zap_all_fast,
    kvm_tdp_mmu_clear_dirty_range,
    kvm_tdp_mmu_zap_leafs,
    kvm_tdp_mmu_zap_leafs_roots,
    kvm_tdp_page_fault,
    tdp_mmu_zap_leafs_atomic,
    zap_root_types,
    zap_subtrees_in_range,
)
from stress.model.tdx import VP_EPT_VIOLATION, TdxModule
from stress.model.tlb import guest_access_in_mode
from stress.model.variants import get_variant
from stress.model.x86 import guest_access
from stress.oracles.oops import kernel_oops

# counters published in the worker's slot (live status, crash forensics)
STAT_NAMES = (
    "ops", "faults", "retries", "retry_frozen", "retry_cmpxchg", "retry_link_lost",
    "retry_walk_lost", "retry_nomem", "spurious", "leaves_installed", "tables_linked",
    "tables_freed", "leaf_zaps", "leaf_zaps_shared", "tlb_flushes", "subtree_zaps_shared",
    "subtree_zaps_exclusive",
    "entries_zapped", "zap_retry", "alloc_fail", "delays", "max_fault_retries",
    "seamcalls", "seamcall_busy", "mirror_restores", "sept_removes", "sept_tables_removed",
    "roots_created", "roots_freed", "roots_invalidated", "root_zaps", "fast_zaps", "yields",
    "obsolete_roots_dropped", "retry_stale_root", "root_resets", "halts",
    "shadowed_writes", "unsync_marked", "unsync_lock_taken", "unsync_lock_contended", "syncs",
    "pages_synced", "emulated_writes", "invalidations", "conversions", "retry_invalidate",
    "memory_fault_exits", "huge_leaves_installed", "huge_splits", "tlb_hits", "tlb_fills",
    "ept_violations", "dirty_bits_set", "tlb_flushes_serviced", "dirty_harvests", "kicks",
)
assert len(STAT_NAMES) <= Slot.MAX_STATS

W_STARTING, W_RUNNING, W_PARKED, W_DONE = 0, 1, 2, 3
MASK63 = (1 << 63) - 1
EXIT_ORPHANED = 3  # the supervisor died before this worker was set up
PR_SET_PDEATHSIG = 1


class GuestRam:
    """The guest's memory as the workers see it: the memslots' gfns, and the
    same gfns numbered 0, 1, ... in slot order (ordinals: the hot set's sweep
    and the scans from the hot set on move through them, slot after slot)."""

    def __init__(self, memslots: tuple[tuple[int, int], ...]) -> None:
        self.slots = memslots  # (base_gfn, npages), sorted
        self.bases = [b for b, _ in memslots]
        self.ords = []  # the first ordinal of each slot
        n = 0
        for _b, npages in memslots:
            self.ords.append(n)
            n += npages
        self.total = n

    def slot_of(self, gfn: int) -> tuple[int, int]:
        """(base_gfn, end_gfn) of the slot holding ``gfn``."""
        b, n = self.slots[bisect_right(self.bases, gfn) - 1]
        return b, b + n

    def end_of(self, gfn: int) -> int:
        """The end of ``gfn``'s slot: ranges stay inside the slot they start in."""
        return self.slot_of(gfn)[1]

    def gfn_at(self, ordinal: int) -> int:
        k = bisect_right(self.ords, ordinal) - 1
        return self.slots[k][0] + ordinal - self.ords[k]

    def ordinal_of(self, gfn: int) -> int:
        k = bisect_right(self.bases, gfn) - 1
        return self.ords[k] + gfn - self.slots[k][0]

    def random_gfn(self, rng: random.Random) -> int:
        """A gfn anywhere in guest memory: a slot first (uniformly, so a small slot
        far up the address space is touched as often as RAM is), then a gfn in it."""
        b, n = self.slots[rng.randrange(len(self.slots))] if len(self.slots) > 1 \
            else self.slots[0]
        return b + rng.randrange(n)


def hot_region(cfg: Config) -> tuple[int, int]:
    """(first gfn, gfn count) of the hot set, placed by the run seed, 2M aligned,
    inside one memslot (one big enough for it, chosen in proportion to size)."""
    n_hot = max(1, cfg.guest.hot_set >> 12)
    fits = [(b, n) for b, n in cfg.memslots if n >= n_hot]
    span = sum(n - n_hot + 1 for _b, n in fits) - 1
    pos = random.Random(f"hot:{cfg.run.seed}").randrange(0, span + 1) if span > 0 else 0
    for b, n in fits:
        if pos <= n - n_hot:
            return b + min(round_gfn_for_level(pos, PG_LEVEL_2M), n - n_hot), n_hot
        pos -= n - n_hot + 1
    raise AssertionError("no memslot holds the hot set (config.validate checks it)")


def worker_seed(cfg: Config, index: int) -> str:
    return f"{cfg.run.seed}:{index}"


def build_kvm(cfg: Config, words: Words, layout: Layout, me: int,
              rng: random.Random | None = None) -> Kvm:
    """This process's struct kvm for the run's config (and its door into the TDX
    module for a TD), recording trace events into its own ring."""
    if layout.trace_entries:
        words.enable_trace(layout.trace_ring(me), layout.trace_entries,
                           layout.slot(me, Slot.TRACE_HEAD), layout.glob(Globals.TRACE_SEQ), me)
    tdx = cfg.vm.type == "tdx"
    geometry = Geometry(root_level=cfg.guest.root_level, tdx=tdx,
                        private_chunk_shift=(cfg.tdx.private_chunk >> 12).bit_length() - 1,
                        memslots=build_memslots(cfg.memslots))
    variant = get_variant(cfg.run.variant)
    kvm = oracles.attach(Kvm(words, layout, geometry, variant, me, rng),
                         params=cfg.liveness.params(cfg.schedule, cfg.run))
    kvm.tlb_flush_ns = int(cfg.zapper.tlb_flush_latency * 1e9)
    kvm.timeslice_ns = int(cfg.sched.timeslice * 1e9)
    kvm.race_window_ns = int(cfg.inject.race_window * 1e9)
    kvm.huge_pages = cfg.guest.huge_pages > 0
    if cfg.pool.alias_tables:
        kvm.alias_floor_words = min(layout.bitmap_words - 1, (cfg.n_gfns // 512 + 63) // 64)
    roles = worker_roles(cfg)
    kvm.vcpu_slots = tuple(i for i, r in enumerate(roles) if r == "vcpu")
    if tdx:
        kvm.tdx = TdxVm(TdxModule(kvm, int(cfg.tdx.seamcall_latency * 1e9),
                                  cfg.tdx.zero_step_threshold,
                                  int(cfg.tdx.vp_enter_latency * 1e9)),
                        policy=variant.busy_policy or cfg.tdx.busy_policy,
                        busy_retries=cfg.tdx.busy_retries)
        kvm.tdx_pending_event_fraction = cfg.tdx.pending_event_fraction
    return kvm


def worker_roles(cfg: Config) -> list[str]:
    """The role of every worker slot, in slot order (the supervisor's order)."""
    return cfg.worker_roles()


INIT_REGION_PAGES = 32  # pages of the initial image per KVM_TDX_INIT_MEM_REGION


def initial_image_gfns(cfg: Config, kvm: Kvm) -> list[int]:
    """The private gfns of the TD's initial image (KVM_TDX_INIT_MEM_REGION), from
    the start of the hot set on, so the guest uses them at once."""
    ram = GuestRam(cfg.memslots)
    out: list[int] = []
    o = ram.ordinal_of(hot_region(cfg)[0])
    while len(out) < cfg.tdx.init_mem_pages and o < ram.total:
        g = ram.gfn_at(o)
        if kvm_mem_is_private(kvm, g):
            out.append(g)
        o += 1
    return out


def enable_nested(cfg: Config, kvm: Kvm) -> None:
    """Shadow L1's page-table gfns (after the memory attributes are set up)."""
    if cfg.unsync.enabled:
        kvm.shadowed = {g: unsync.leaf_sp(k) for k, g in enumerate(shadowed_gfns(cfg, kvm))}


def init_huge_pages(cfg: Config, kvm: Kvm) -> None:
    """At VM creation, once: lpage_info from the THP placement and the
    attributes; every shadowed gfn's region disallows huge pages
    (account_shadowed -> kvm_mmu_gfn_disallow_lpage)."""
    init_lpage_info(kvm, cfg.guest.huge_pages, cfg.run.seed)
    for g in kvm.shadowed:
        kvm_mmu_gfn_disallow_lpage(kvm, g)


def shadowed_gfns(cfg: Config, kvm: Kvm) -> list[int]:
    """The L1 page-table gfns shadowed for nested TDP: the first shared gfns from
    the start of the hot set on (so both vCPUs write them, and often)."""
    ram = GuestRam(cfg.memslots)
    out: list[int] = []
    o = ram.ordinal_of(hot_region(cfg)[0])
    while len(out) < unsync.N_LEAVES and o < ram.total:
        g = ram.gfn_at(o)
        if not kvm_mem_is_private(kvm, g):
            out.append(g)
        o += 1
    return out


class Role:
    name = "role"

    def __init__(self, kvm: Kvm, cfg: Config) -> None:
        self.kvm = kvm
        self.cfg = cfg
        self.rng = kvm.rng
        self.hot_base, self.hot_n = hot_region(cfg)
        self.ram = GuestRam(cfg.memslots)
        self.hot_ord = self.ram.ordinal_of(self.hot_base)

    def pick_gfn(self) -> int:
        """A gfn some memslot holds: the hot set's, or any (GuestRam.random_gfn)."""
        if self.rng.random() < self.cfg.guest.hot_fraction:
            sweep = self.cfg.guest.sweep
            if not sweep:
                return self.hot_base + self.rng.randrange(self.hot_n)
            # harness bookkeeping (not a guest access): the shared pick counter
            k = self.kvm.w.fetch_add(self.kvm.layout.glob(Globals.SWEEP), 1) // sweep
            ram = self.ram
            base = (self.hot_ord + k * 512) % max(1, ram.total - self.hot_n + 1)
            return ram.gfn_at(base + self.rng.randrange(self.hot_n))
        return self.ram.random_gfn(self.rng)

    def end_of(self, gfn: int) -> int:
        """The end of ``gfn``'s memslot (ranges stay inside one slot)."""
        return self.ram.end_of(gfn)

    def step(self) -> bool | None:
        """One operation, or one step of it: False if the operation is not complete
        yet (a vCPU whose instruction will be re-executed), else it is."""
        raise NotImplementedError


class VcpuRole(Role):
    """A vCPU: the guest runs ``vcpu.guest_accesses`` loads and stores through its
    TLB and the hardware walker (model/tlb.py), stopping at the first EPT
    violation; then KVM faults on that gfn (or on the last one touched: a
    spurious fault) and re-faults while the fault says RET_PF_RETRY, and the
    guest re-executes the access after the fault is fixed: the operation ends
    when the access completes (or is emulated), so a fault that returns without
    making the access possible is a retry of the same operation, as it is a
    guest stuck on one instruction in the kernel."""

    name = "vcpu"

    def __init__(self, kvm: Kvm, cfg: Config) -> None:
        super().__init__(kvm, cfg)
        # a TD: the first vCPU builds the initial image and finalizes the TD; the
        # guest instruction in progress (its RIP, the pages it touches, write) and
        # the private gfn of its last EPT violation (zero-step mitigation)
        self.builder = bool(kvm.vcpu_slots) and kvm.me == kvm.vcpu_slots[0]
        self.rip = 0
        self.insn: tuple[int, list[int], bool] | None = None
        self.last_fault: int | None = None
        self.exit_gfn: int | None = None  # the gfn the instruction last exited on

    def step(self) -> bool | None:
        if self.kvm.geometry.tdx:
            return self.step_td()
        kvm = self.kvm
        vc = self.cfg.vcpu
        gfn = self.pick_gfn()
        write = self.rng.random() < vc.write_fraction
        for _ in range(vc.guest_accesses):
            if not guest_access(kvm, gfn, write):
                break
            gfn = self.pick_gfn()
            write = self.rng.random() < vc.write_fraction
        exec_ = not write and self.rng.random() < vc.exec_fraction
        retries = 0
        while True:
            while (r := kvm_tdp_page_fault(kvm, gfn, write, exec_)) == RET_PF_RETRY:
                # the guest re-executes the access: on the way in, vcpu_enter_guest
                # schedules if need_resched(); others run meanwhile
                cond_resched(kvm)
                retries += 1
                kvm.hooks.retry(kvm, "kvm_tdp_page_fault", gfn)
            if r == RET_PF_EMULATE:
                self.emulate_write(gfn)
                break
            # fixed (or spurious): the guest re-executes the access, which completes
            # unless the entry is gone again or still does not allow it (a fetch
            # is taken as done: the walker models no execute permission)
            if exec_ or guest_access(kvm, gfn, write):
                break
            retries += 1
            kvm.hooks.retry(kvm, "vcpu_enter_guest", gfn)
        self.after_fault(retries)

    def after_fault(self, retries: int) -> None:
        kvm = self.kvm
        vc = self.cfg.vcpu
        if kvm.shadowed and self.rng.randrange(self.cfg.unsync.sync_every) == 0:
            self.sync_roots()
        kvm.stats["faults"] += 1
        kvm.stats["retries"] += retries
        if retries > kvm.stats["max_fault_retries"]:
            kvm.stats["max_fault_retries"] = retries
        if vc.halt_every and self.rng.randrange(vc.halt_every) == 0:
            # HLT: the vCPU sleeps outside the guest, still holding its root; an
            # invalidation meanwhile leaves it an obsolete root to drop on entry
            kvm.w.pause(vc.halt_time * 2 * self.rng.random())
            kvm.stats["halts"] += 1
        every = vc.root_reset_every
        if every and self.rng.randrange(every) == 0:
            # kvm_mmu_reset_context (CR0/CR4/EFER writes): unload the root, the
            # next entry loads one again
            kvm_mmu_unload(kvm, kvm.vcpu)
            kvm.stats["root_resets"] += 1

    # -- a TD's vCPU ------------------------------------------------------------------
    def step_td(self) -> bool:
        """Before the TD runs: the first vCPU builds the initial image and
        finalizes the TD, the others do vCPU ioctls (userspace setting them up).
        Then: KVM_PRE_FAULT_MEMORY now and then, else enter the TD, run the
        guest's instruction (private pages accepted before use, shared ones
        through the hardware walker) and handle the EPT violation it exits with.
        False while the instruction is still to be re-executed: the operation is
        the instruction, and each re-entry for it is a round of vcpu_enter_guest
        at the gfn it last exited on."""
        kvm = self.kvm
        vc = self.cfg.vcpu
        if not check_td_runnable(kvm):
            if self.builder:
                self.build_initial_image()
            else:
                tdx_vcpu_ioctl(kvm)
                kvm.w.pause(0.0002)
            return True
        if vc.prefault_fraction and self.rng.random() < vc.prefault_fraction:
            n = max(1, vc.prefault_range >> 12)
            start = self.pick_gfn()
            self.maybe_signal()
            r = kvm_arch_vcpu_pre_fault_memory(kvm, start, min(self.end_of(start), start + n))
            kvm.hooks.sys_exit(kvm, "KVM_PRE_FAULT_MEMORY", r)
            self.signal_delivered()  # pre-faulting is a hint: not restarted
            kvm.stats["prefaults"] += 1
            return self.insn is None
        if self.insn is None:
            self.rip += 1
            gfn = self.pick_gfn()
            span = 1
            if kvm_mem_is_private(kvm, gfn) and self.cfg.tdx.instruction_span > 1:
                span = self.rng.randint(1, self.cfg.tdx.instruction_span)
            self.insn = (self.rip, list(range(gfn, min(self.end_of(gfn), gfn + span))),
                         self.rng.random() < vc.write_fraction)
            self.last_fault = None
            self.exit_gfn = None
        elif self.exit_gfn is not None:
            kvm.hooks.retry(kvm, "vcpu_enter_guest", self.exit_gfn)
        rip, gfns, write = self.insn
        r = tdx_vcpu_run(kvm, rip if self.last_fault is not None else None, self.last_fault)
        if r == EXIT_FASTPATH_EXIT_HANDLED:
            kvm.w.relax()
            return False
        if r == VP_EPT_VIOLATION:  # zero-step: the module re-raised the EPT violation
            assert self.last_fault is not None
            self.handle_td_exit(self.last_fault, write, GUEST_EPT_VIOLATION)
            return False
        fault = None
        for gfn in gfns:  # in the TD: no kvm->srcu held (vcpu_enter_guest drops it)
            if kvm_mem_is_private(kvm, gfn):
                how = td_guest_access_private(kvm, gfn)
            else:
                how = GUEST_OK if guest_access_in_mode(kvm, gfn, write) else GUEST_EPT_VIOLATION
            if how != GUEST_OK:
                fault = (gfn, how)
                break
        td_exit(kvm)
        if fault is None:
            self.insn = None
            self.last_fault = None
            kvm.stats["instructions"] += 1
            return True
        self.handle_td_exit(fault[0], write, fault[1])
        return False

    def handle_td_exit(self, gfn: int, write: bool, how: int) -> None:
        """The exit's handling, inside kvm->srcu's read side (vcpu_run holds it
        outside the guest)."""
        kvm = self.kvm
        private = kvm_mem_is_private(kvm, gfn)
        self.exit_gfn = gfn
        before = kvm.stats["local_retries"]
        srcu_read_lock(kvm, gfn)
        try:
            r = tdx_handle_ept_violation(kvm, gfn, write, how)
        finally:
            srcu_read_unlock(kvm)
        # an unresolved private fault re-enters at the same RIP: zero-step counts it
        self.last_fault = gfn if private else None
        if r == RET_PF_EMULATE:
            self.emulate_write(gfn)
        # retries: the local ones (a private fault), or one re-entry (a shared one)
        self.after_fault(kvm.stats["local_retries"] - before + (r == RET_PF_RETRY))

    def maybe_signal(self) -> None:
        """``vcpu.signals`` of the time, the VMM signals this thread during the
        ioctl it is about to make: the signal arrives at one of its first
        signal_pending() checks."""
        if self.rng.random() < self.cfg.vcpu.signals:
            self.kvm.signal_in = self.rng.randint(1, 4)

    def signal_delivered(self) -> bool:
        """The ioctl returned: the VMM's signal, if one arrived, is handled now.
        True if one had arrived."""
        arrived = self.kvm.signal_in == 0
        self.kvm.signal_in = -1
        return arrived

    def build_initial_image(self) -> None:
        """KVM_TDX_INIT_MEM_REGION over the initial image, one call per
        INIT_REGION_PAGES (as a VMM adds firmware sections), each restarted where
        it stopped when a signal interrupted it; then KVM_TDX_FINALIZE_VM (the
        first vCPU only, once)."""
        kvm = self.kvm
        gfns = initial_image_gfns(self.cfg, kvm)
        for k in range(0, len(gfns), INIT_REGION_PAGES):
            region = gfns[k:k + INIT_REGION_PAGES]
            while True:
                self.maybe_signal()
                r = tdx_vcpu_init_mem_region(kvm, region)
                kvm.hooks.sys_exit(kvm, "KVM_TDX_INIT_MEM_REGION", r)
                if not (self.signal_delivered() and r == -EINTR):
                    break
                kvm.stats["init_mem_restarts"] += 1  # go on where it stopped
            if r == -EINTR:  # the run is stopping (a violation elsewhere, or its end)
                return
            if r:
                kvm.bug("KVM_TDX_INIT_MEM_REGION failed",
                        f"the initial image was refused ({r})")
        r = tdx_td_finalize(kvm)
        kvm.hooks.sys_exit(kvm, "KVM_TDX_FINALIZE_VM", r)
        if r:
            kvm.bug("KVM_TDX_FINALIZE_VM failed", f"the TD could not be finalized ({r})")

    def emulate_write(self, gfn: int) -> None:
        """A write to a write-protected shadowed gfn: emulated, and the shadowed
        gPTE updated, with mmu_lock held for write (kvm_mmu_pte_write)."""
        kvm = self.kvm
        kvm.write_lock()
        try:
            kvm.w.spin_ns(int(self.cfg.unsync.emulate_latency * 1e9))
        finally:
            kvm.write_unlock()
        kvm.stats["emulated_writes"] += 1

    def sync_roots(self) -> None:
        """The guest flushed its TLB (INVEPT): kvm_mmu_sync_roots under the write
        lock, then the synced gfns are write-protected again (their TDP leaves
        zapped), so the next write unsyncs them anew."""
        kvm = self.kvm
        gfn_of = {sp: g for g, sp in kvm.shadowed.items()}
        kvm.write_lock()
        try:
            synced = unsync.kvm_mmu_sync_roots(kvm)
            for sp in synced:
                g = gfn_of[sp]
                for root in for_each_tdp_mmu_root_yield_safe(kvm, zap_root_types(kvm, False)):
                    kvm_tdp_mmu_zap_leafs(kvm, root, g, g + 1)
        finally:
            kvm.write_unlock()


class NotifierRole(Role):
    """The primary MMU (and guest_memfd) changing what backs gfn ranges:
    invalidate_range_start, page replacement, invalidate_range_end."""

    name = "notifier"

    def step(self) -> None:
        kvm = self.kvm
        n = self.rng.randint(1, max(1, self.cfg.notifier.max_range >> 12))
        start = self.pick_gfn()
        end = min(self.end_of(start), start + n)
        attr_filter = None
        if kvm.geometry.tdx:
            # a guest_memfd punch-hole of private memory or the mmu_notifier of the
            # shared mapping; guest_memfd's lock keeps punch-holes away from the
            # initial image until the TD runs
            attr_filter = "private" if kvm_mem_is_private(kvm, start) else "shared"
            if attr_filter == "private" and (not check_td_runnable(kvm)
                                             or not self.cfg.notifier.punch_private):
                attr_filter = "shared"
        # the OOM reaper reaps the VMM's memory (the shared mapping), never guest_memfd's
        blockable = attr_filter == "private" or self.rng.random() >= self.cfg.notifier.nonblock
        if attr_filter == "private":  # the guest agreed: it stops using the pages first
            guest_release_private(kvm, start, end)
        mmu_notifier_invalidate_range(kvm, start, end, attr_filter, blockable)
        if self.cfg.notifier.interval:
            self.kvm.w.pause(self.cfg.notifier.interval * (0.5 + self.rng.random()))


class ConverterRole(Role):
    """KVM_SET_MEMORY_ATTRIBUTES: flips chunks of gfns between private and shared."""

    name = "converter"

    def __init__(self, kvm: Kvm, cfg: Config) -> None:
        super().__init__(kvm, cfg)
        # converter.revert: the runs of gfns the last conversion changed, each to be
        # converted back to the attribute it had, one per step
        self.pending: list[tuple[int, int, bool]] = []

    def step(self) -> None:
        kvm = self.kvm
        if kvm.geometry.tdx and not check_td_runnable(kvm):
            kvm.w.pause(0.0005)  # conversions are the guest's: it must be running
            return
        runs: list[tuple[int, int, bool]] | None = None  # None: a revert
        if self.pending:
            start, end, private = self.pending[-1]
        else:
            start, end = self.pick_range()
            # the attribute the whole range takes: the other one of either end's
            private = not kvm_mem_is_private(kvm, start if self.rng.random() < 0.5 else end - 1)
            runs = self.changed_runs(start, end, private) if self.cfg.converter.revert else []
        if kvm.geometry.tdx:
            if not self.map_gpa(start, end, private):
                return  # the exit was handled in the TD's fast path: no conversion yet
        else:
            vmm_convert_memory(kvm, start, end, private)
        if runs is None:
            self.pending.pop()
        else:
            self.pending = runs
        if self.cfg.converter.interval:
            self.kvm.w.pause(self.cfg.converter.interval * (0.5 + self.rng.random()))

    def changed_runs(self, start: int, end: int, private: bool) -> list[tuple[int, int, bool]]:
        """The runs of [start, end) whose attribute is not ``private`` yet, each
        with the attribute it has: what converting them back restores."""
        runs: list[tuple[int, int, bool]] = []
        for gfn in range(start, end):
            if kvm_mem_is_private(self.kvm, gfn) == private:
                continue
            if runs and runs[-1][1] == gfn:
                runs[-1] = (runs[-1][0], gfn + 1, not private)
            else:
                runs.append((gfn, gfn + 1, not private))
        return runs

    def pick_range(self) -> tuple[int, int]:
        """The next range to convert, inside one memslot: a chunk-aligned chunk,
        or (``converter.unaligned`` of the time) a range of at most a chunk and
        a page whose ends are the boundary values of an alignment: the start at
        a random gfn or one below, on or one above the 2M boundary nearest it,
        the end at a random length or next to the first 2M boundary above the
        start, when that is within reach."""
        chunk = (self.cfg.converter.range >> 12) or 1 << self.kvm.geometry.private_chunk_shift
        gfn = self.pick_gfn()
        base, slot_end = self.ram.slot_of(gfn)
        if self.rng.random() >= self.cfg.converter.unaligned:
            start = max(base, gfn // chunk * chunk)
            return start, min(slot_end, start + chunk)
        n = KVM_PAGES_PER_HPAGE(PG_LEVEL_2M)
        edge = (gfn + n // 2) & -n
        start = self.rng.choice((gfn, edge - 1, edge, edge + 1))
        start = min(max(base, start), slot_end - 1)
        edge = (start & -n) + n
        ends = [start + self.rng.randint(1, chunk)]
        ends += [e for e in (edge - 1, edge, edge + 1) if start < e <= start + chunk + 1]
        return start, min(slot_end, self.rng.choice(ends))

    def map_gpa(self, start: int, end: int, private: bool) -> bool:
        """On a TD the guest converts: a vCPU in the TD issues
        TDG.VP.VMCALL<MapGPA>, the TD exits, userspace converts chunk by chunk.
        False if the entry ended in the fast path, before the guest's call."""
        kvm = self.kvm
        if tdx_vcpu_run(kvm, None, None) == EXIT_FASTPATH_EXIT_HANDLED:
            kvm.w.relax()
            return False
        td_exit(kvm)  # the TDVMCALL exits to KVM, then to userspace
        tdx_map_gpa(kvm, start, end, private)
        return True


class InvalidatorRole(Role):
    """Memslot updates: kvm_mmu_zap_all_fast many times a second, invalidating
    every direct root and zapping the invalidated roots with yields."""

    name = "invalidator"

    def step(self) -> None:
        kvm = self.kvm
        frac = self.cfg.invalidator.memslot_move_fraction
        if kvm.geometry.tdx and frac and self.rng.random() < frac:
            if check_td_runnable(kvm):  # a memslot of the hot set, 2 MiB
                start = round_gfn_for_level(self.pick_gfn(), PG_LEVEL_2M)
                end = min(self.end_of(start), start + 512)
                guest_release_private(kvm, start, end)  # the guest's consent to the move
                kvm.stats["entries_zapped"] += kvm_set_memory_region_move(kvm, start, end)
        else:
            kvm_mmu_zap_all_fast(kvm)
        if self.cfg.invalidator.interval:
            self.kvm.w.pause(self.cfg.invalidator.interval * (0.5 + self.rng.random()))


class ZapperRole(Role):
    """Zaps leaves (write lock) and whole sub-trees (read or write lock)."""

    name = "zapper"

    def __init__(self, kvm: Kvm, cfg: Config) -> None:
        super().__init__(kvm, cfg)
        z = cfg.zapper
        self.ops: list[Callable[[], None]] = []
        self.weights: list[int] = []
        for op, wgt in ((self.leaf_zap, z.leaf_zap),
                        (self.leaf_zap_shared, z.leaf_zap_shared),
                        (self.subtree_zap_shared, z.subtree_zap_shared),
                        (self.subtree_zap_exclusive, z.subtree_zap_exclusive),
                        (self.clear_dirty, z.clear_dirty)):
            if wgt:
                self.ops.append(op)
                self.weights.append(wgt)
        self.max_range = max(1, z.max_range >> 12)
        top = cfg.guest.root_level
        # zap levels: mostly tables of leaves (level-2 entries), sometimes bigger
        self.levels = [lvl for lvl in (2, 3) if lvl < top] or [2]

    def step(self) -> None:
        self.rng.choices(self.ops, self.weights)[0]()
        if self.cfg.zapper.interval:
            self.kvm.w.pause(self.cfg.zapper.interval * (0.5 + self.rng.random()))

    def _range(self) -> tuple[int, int]:
        start = self.pick_gfn()
        return start, min(self.end_of(start), start + self.rng.randint(1, self.max_range))

    def leaf_zap(self) -> None:
        kvm = self.kvm
        start, end = self._range()
        kvm.write_lock()
        try:
            kvm.stats["entries_zapped"] += kvm_tdp_mmu_zap_leafs_roots(
                kvm, zap_root_types(kvm, False), start, end)
        finally:
            kvm.write_unlock()
        kvm.stats["leaf_zaps"] += 1

    def clear_dirty(self) -> None:
        """KVM_CLEAR_DIRTY_LOG on a range: harvest and clear D bits, flush."""
        kvm = self.kvm
        start, end = self._range()
        kvm.read_lock()
        try:
            kvm_tdp_mmu_clear_dirty_range(kvm, start, end)
        finally:
            kvm.read_unlock()
        kvm.stats["dirty_harvests"] += 1

    def leaf_zap_shared(self) -> None:
        kvm = self.kvm
        start, end = self._range()
        kvm.read_lock()
        try:
            for root in for_each_tdp_mmu_root_yield_safe(kvm, zap_root_types(kvm, True)):
                kvm.stats["entries_zapped"] += tdp_mmu_zap_leafs_atomic(kvm, root, start, end)
        finally:
            kvm.read_unlock()
        kvm.stats["leaf_zaps_shared"] += 1

    def _subtree(self, shared: bool) -> int:
        kvm = self.kvm
        level = self.rng.choice(self.levels) if self.rng.random() < 0.3 else 2
        start = round_gfn_for_level(self.pick_gfn(), level)
        end = start + KVM_PAGES_PER_HPAGE(level)
        return sum(zap_subtrees_in_range(kvm, root, start, end, level, shared)
                   for root in for_each_tdp_mmu_root_yield_safe(kvm,
                                                                zap_root_types(kvm, shared)))

    def subtree_zap_shared(self) -> None:
        kvm = self.kvm
        kvm.read_lock()
        try:
            kvm.stats["entries_zapped"] += self._subtree(shared=True)
        finally:
            kvm.read_unlock()
        kvm.stats["subtree_zaps_shared"] += 1

    def subtree_zap_exclusive(self) -> None:
        kvm = self.kvm
        kvm.write_lock()
        try:
            kvm.stats["entries_zapped"] += self._subtree(shared=False)
        finally:
            kvm.write_unlock()
        kvm.stats["subtree_zaps_exclusive"] += 1


ROLE_CLASSES: dict[str, type[Role]] = {"vcpu": VcpuRole, "zapper": ZapperRole,
                                        "invalidator": InvalidatorRole,
                                        "notifier": NotifierRole, "converter": ConverterRole}


def _die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG, and then the check that makes it race-free: a parent
    that died between fork and prctl sent no signal, and we are already
    reparented (prctl(2))."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(EXIT_ORPHANED)


class Worker:
    """The loop around a role: GO, steps, parking, counters, STOP."""

    def __init__(self, index: int, role: str, cfg: Config, arena: Arena,
                 conn: Connection) -> None:
        self.index = index
        self.cfg = cfg = cfg.worker_config(index)  # its role's section: its own op mix
        self.layout: Layout = arena.layout
        self.conn = conn
        lay = self.layout
        rng = random.Random(worker_seed(cfg, index))
        abort_i = lay.ctl(Control.ABORT)
        self.turns: Turns | None = None
        model_words: Words
        if cfg.schedule.controlled:
            # the harness's words bypass the scheduler; the model's wait for turns
            self.words = Words(arena.shm.buf, abort_i)
            self.turns = worker_turns(self.words, lay, index, cfg.n_workers, cfg.schedule)
            model_words = ScheduledWords(arena.shm.buf, abort_i, self.turns)
        elif cfg.inject.delay_every:
            self.words = model_words = DelayInjectingWords(
                arena.shm.buf, abort_i, random.Random(f"delay:{worker_seed(cfg, index)}"),
                cfg.inject.delay_every, int(cfg.inject.delay_max * 1e9))
        else:
            self.words = model_words = Words(arena.shm.buf, abort_i)
        self.kvm = build_kvm(cfg, model_words, lay, index, rng)
        enable_nested(cfg, self.kvm)
        self.role = ROLE_CLASSES[role](self.kvm, cfg)
        self.stop_i = lay.ctl(Control.STOP)
        self.pause_i = lay.ctl(Control.PAUSE_REQ)
        self.parked_gen = 0

    def publish(self) -> None:
        w, lay, stats = self.words, self.layout, self.kvm.stats
        if isinstance(w, DelayInjectingWords):
            stats["delays"] = w.delays
        base = lay.slot(self.index, Slot.STATS)
        for k, name in enumerate(STAT_NAMES):
            w.store(base + k, stats[name])

    def reclaim(self) -> None:
        kvm = self.kvm
        kvm.rcu.reclaim(lambda p: tdp_mmu_free_sp_rcu_callback(kvm, p))

    def park(self, gen: int) -> None:
        w, lay = self.words, self.layout
        self.publish()
        self.parked_gen = gen
        w.store(lay.slot(self.index, Slot.STATE), W_PARKED)
        w.store(lay.slot(self.index, Slot.PARKED_GEN), gen)
        w.fetch_add(lay.ctl(Control.PARKED), 1)
        while w.load(self.pause_i) == gen and not w.load(self.stop_i):
            time.sleep(0.0005)
        w.store(lay.slot(self.index, Slot.STATE), W_RUNNING)

    def drain(self, timeout: float, max_rounds: int | None = None) -> None:
        """Run pending RCU callbacks before exit, as long as peers let us (a
        controlled run bounds the rounds, not the time, to stay deterministic)."""
        deadline = time.monotonic() + timeout
        rounds = 0
        while self.kvm.rcu.pending and (time.monotonic() < deadline if max_rounds is None
                                        else rounds < max_rounds):
            rounds += 1
            self.reclaim()
            if self.kvm.rcu.pending:
                if self.words.load(self.layout.ctl(Control.ABORT)):
                    return
                self.kvm.w.pause(0.001)

    def run(self) -> None:
        w, lay = self.words, self.layout
        w.store(lay.slot(self.index, Slot.PID), os.getpid())
        w.store(lay.slot(self.index, Slot.STATE), W_STARTING)
        go_i = lay.ctl(Control.GO)
        while not w.load(go_i):
            if w.load(self.stop_i):
                return
            time.sleep(0.0005)
        w.store(lay.slot(self.index, Slot.STATE), W_RUNNING)
        if self.turns is not None:
            self.run_controlled(self.turns)
            return
        stats = self.kvm.stats
        step = self.role.step
        heartbeat_i = lay.slot(self.index, Slot.HEARTBEAT)
        next_publish = time.monotonic() + 0.05
        inj = self.cfg.inject
        hang_at = (time.monotonic() + inj.hang_after
                   if inj.hang_after and inj.hang_worker == self.index else float("inf"))
        leaked: list[bytearray] = []
        rcu = self.kvm.rcu
        quiet = self.quiet_phases()
        while not w.load(self.stop_i):
            gen = w.load(self.pause_i)
            if gen and gen != self.parked_gen:
                self.park(gen)
                continue
            if quiet is not None and quiet():
                time.sleep(0.001)  # between operations: holds nothing
                continue
            self.step_returned(step())
            if inj.leak_per_op:
                leaked.append(bytearray(b"\x01" * inj.leak_per_op))  # injected leak
            if rcu.pending:
                self.reclaim()
            now = time.monotonic()
            if now >= next_publish or now >= hang_at:
                if now >= next_publish:  # counters and heartbeat, every 50 ms
                    w.store(heartbeat_i, stats["ops"])
                    self.publish()
                    next_publish = now + 0.05
                if now >= hang_at:
                    self.hang()
        kvm_mmu_unload(self.kvm, self.kvm.vcpu)  # vCPU destroyed: its root reference goes
        self.drain(timeout=1.0)
        self.publish()

    def step_returned(self, done: bool | None) -> None:
        """After a role's step: counted, back in user space (op_return) and, unless
        the step said its operation is not complete (False), progress (op_end)."""
        kvm = self.kvm
        kvm.stats["ops"] += 1
        kvm.hooks.op_return(kvm)
        if done is not False:
            kvm.hooks.op_end(kvm)

    def quiet_phases(self) -> Callable[[], bool] | None:
        """run.quiet_every/quiet_for: a test of "the run is in a quiet phase now" for a
        role other than the vCPUs (None: this worker never goes quiet).  The phases
        count from the workers' release (Control.START_NS), for every task alike."""
        run = self.cfg.run
        if not run.quiet_for or self.role.name == "vcpu":
            return None
        every, span = int(run.quiet_every * 1e9), int(run.quiet_for * 1e9)
        return lambda: quiet_phase(self.words, self.layout, every, span)[0] > 0

    def op_seed(self, k: int) -> int:
        """Op ``k``'s own RNG seed: deleting an earlier op (shrinking) leaves the
        random choices of the later ones unchanged."""
        return ((self.cfg.run.seed * 1_000_003 + self.index) * 1_000_000_007 + k) & MASK63

    def run_controlled(self, turns: Turns) -> None:
        """The op loop of a controlled run: the same ops, but only while this
        worker holds the turn, until the schedule's step budget is spent (no
        periodic parking: the checks run at the end)."""
        w, lay, kvm, sc = self.words, self.layout, self.kvm, self.cfg.schedule
        assert isinstance(kvm.w, ScheduledWords)
        cap = sc.max_ops[self.index] if sc.max_ops else -1
        if cap == 0:
            return  # absent: marked done before GO, it never gets a turn
        # the cyclic GC runs finalizers (an abandoned root iterator puts its root):
        # start every run from empty generations so it runs at the same points
        gc.collect()
        kvm.w.activate()
        turns.start()
        skip = [(first, last) for wk, first, last in sc.skip_ops if wk == self.index]
        heartbeat_i = lay.slot(self.index, Slot.HEARTBEAT)
        step, rng, k = self.role.step, kvm.rng, 0
        while k != cap and not turns.expired and not w.load(self.stop_i):
            w.store(heartbeat_i, k + 1)
            if not any(first <= k <= last for first, last in skip):
                turns.begin_op(k)
                rng.seed(self.op_seed(k))
                sched_start_op(kvm, self.op_seed(k))
                self.step_returned(step())
                self.reclaim()
            k += 1
        turns.end_phase()
        kvm_mmu_unload(kvm, kvm.vcpu)
        self.drain(timeout=1.0, max_rounds=1000)
        self.publish()
        turns.exit()

    def hang(self) -> None:
        """Injected fault (inject.hang_after): hold mmu_lock for write, ignore
        SIGTERM and spin for ever, so only the watchdog and SIGKILL end the run."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.kvm.write_lock()
        while True:
            pass


def violation_message(words: Words, layout: Layout, index: int, v: InvariantViolation,
                      variant: str) -> dict:
    start = words.load(layout.ctl(Control.START_NS))
    now = time.monotonic_ns()
    d = v.to_dict()
    d["time_s"] = round((now - start) / 1e9, 6) if start else 0.0
    d["variant"] = variant
    d.setdefault("worker", index)
    return d


def stop_run_for_violation(words: Words, layout: Layout, index: int) -> None:
    """After the report is in the pipe: peers stop, and exit only after it."""
    words.cmpxchg(layout.ctl(Control.VIOLATION), 0, index + 1)
    words.store(layout.ctl(Control.STOP), 1)


def worker_main(index: int, role: str, cfg: Config, arena: Arena, conn: Connection,
                stacks_path: str | None = None, parent: int | None = None) -> None:
    """Entry point of a worker process (after fork)."""
    _die_with_parent(os.getppid() if parent is None else parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # SIGUSR1 dumps every thread's Python stack, from a C signal handler, so it
    # works even while the worker spins inside a native lock
    stacks = open(stacks_path, "w") if stacks_path else sys.stderr  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    code = 0
    worker = None
    default_hook = sys.unraisablehook

    def unraisable(u: sys.UnraisableHookArgs) -> None:
        # a generator's finally (a root iterator's put) run by the garbage
        # collector after the run was aborted: not worth a traceback
        if not isinstance(u.exc_value, LockAborted):
            default_hook(u)

    sys.unraisablehook = unraisable
    try:
        worker = Worker(index, role, cfg, arena, conn)
        worker.run()
        stats = dict(worker.kvm.stats)
        conn.send(("done", {"stats": stats, "pending_rcu": len(worker.kvm.rcu.pending)}))
    except LockAborted:
        code = 0  # the supervisor is tearing the run down
    except BaseException as e:
        # an invariant broken, or the model's code faulting as kernel code would (an oops)
        v = e if isinstance(e, InvariantViolation) else kernel_oops(e, e.__traceback__)
        if v is not None and worker is not None:
            worker.publish()
            d = violation_message(worker.words, worker.layout, index, v, cfg.run.variant)
            d["role"] = role
            if v is not e:
                d["traceback"] = traceback.format_exc()[-4000:]
            if worker.turns is not None:
                d["sched_step"] = worker.turns.step  # where in the schedule it fired
            conn.send(("violation", d))
            stop_run_for_violation(worker.words, worker.layout, index)
            if worker.turns is not None:
                # a controlled run ends here: the others wake to ABORT without running
                # another step, so the trace ends with the violation, the same every replay
                worker.words.store(worker.layout.ctl(Control.ABORT), 1)
                worker.turns.exit()
            code = 1
        else:
            code = _report_error(worker, conn)
    finally:
        conn.close()
    os._exit(code)


def _report_error(worker: Worker | None, conn: Connection) -> int:
    """A worker's own failure (not the kernel's): the traceback to the supervisor."""
    try:
        conn.send(("error", traceback.format_exc()))
    except OSError:
        pass
    if worker is not None and worker.turns is not None:
        worker.turns.exit()
    return 3
