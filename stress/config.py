"""Run configuration: a TOML file, validated key by key, then CLI overrides.

Every key is known here with its type and bounds; an unknown or malformed key
is a :class:`ConfigError` whose message names it (``guest.size: ...``).  The
resolved config is a frozen dataclass tree, serialisable to the JSON that goes
into ``results.json`` and whose hash goes into the arena header.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from stress.model.variants import (
    UnknownVariant,
    Variant,
    VariantLoadError,
    get_variant,
    load_variant_file,
)

ROLES = ("vcpu", "zapper", "invalidator", "notifier", "converter")
BUSY_POLICIES = ("unwind", "retry", "serialize")
# the shipped configs are package data (stress/configs, a link to the repository's
# configs/ in a checkout), so they are found by name from anywhere
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.toml"


class ConfigError(ValueError):
    """A config file or option is wrong; the message names the key."""


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DUR_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(text: str | int, key: str = "size") -> int:
    """``4096``, ``2m``, ``1G``: bytes, with KVM selftests' k/m/g/t suffixes."""
    if isinstance(text, bool):
        raise ConfigError(f"{key}: expected a size like 1g, got {text!r}")
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtb]?)\s*", str(text).lower())
    if not m:
        raise ConfigError(f"{key}: expected a size like 4096, 2m or 1g, got {text!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


_DUR_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|s|m|h|d)")


def parse_duration(text: str | int | float, key: str = "duration") -> float:
    """``30``, ``30s``, ``5m``, ``2h``, ``250ms``, compound ``1h30m``: seconds."""
    if isinstance(text, bool):
        raise ConfigError(f"{key}: expected a duration like 30s, got {text!r}")
    if isinstance(text, int | float):
        secs = float(text)
    else:
        t = str(text).strip().lower()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|us|s|m|h|d)?", t)
        if m:
            secs = float(m.group(1)) * _DUR_UNITS[m.group(2) or ""]
        elif t and _DUR_PART.sub("", t) == "":  # 1h30m, 2m30s, 1d12h
            secs = sum(float(n) * _DUR_UNITS[u] for n, u in _DUR_PART.findall(t))
        else:
            raise ConfigError(f"{key}: expected a duration like 30s, 5m, 2h or 1h30m, "
                              f"got {text!r}")
    if secs < 0:
        raise ConfigError(f"{key}: must not be negative, got {text!r}")
    return secs


@dataclass(frozen=True)
class RunConfig:
    duration: float = 60.0
    seed: int = 1
    variant: str = "fixed"
    variant_file: str = ""  # a Python file of user variants (see README)
    out: str = "tdp-stress-results"
    check_interval: float = 5.0
    expect_violation: bool = False
    watchdog: float = 10.0  # a worker without progress for this long is hung (exit 4)
    max_rss_growth: int = 512 << 20  # a worker's heap growing more than this is a leak
    # quiet phases: every quiet_every seconds of the run, for quiet_for of them, every
    # role but the vCPUs stops starting operations (a host with nothing to invalidate,
    # convert or zap), so the faults run alone: a fault must then complete on its own,
    # not only because some other task's next operation happens to unblock it.
    # 0: no quiet phases.  Free runs only (a controlled run's schedule is its own)
    quiet_every: float = 0.0
    quiet_for: float = 0.0
    # "python": the model (stress/model/); "kernel": a kernel tree's own tdp_mmu.c
    # (stress/kernel/), built against the shim, in the same harness
    engine: str = "python"


GUEST_LAYOUTS = ("flat", "pc")


@dataclass(frozen=True)
class GuestConfig:
    size: int = 1 << 30  # guest RAM, laid out by `layout`
    root_level: int = 4
    # the guest physical layout (memslots): "flat" is one RAM slot [0, size);
    # "pc" splits size like a PC (half of it, at most 2g, below an MMIO hole that
    # ends at 4g, the rest from 4g up) and adds a 2m slot at the top of the
    # guest's physical address space (see guest_memslots)
    layout: str = "flat"
    # explicit memslots, replacing the layout: "START-END", "START+SIZE" or
    # "SIZE@top" (sizes as elsewhere, or 0x... hex), e.g. ["0-2g", "4g-5g", "64t+2m"]
    slots: tuple[str, ...] = ()
    hot_set: int = 64 << 10
    hot_fraction: float = 0.9
    # a boot-like sweep: every `sweep` hot-set picks (counted by all workers
    # together) the hot set moves on by 2 MiB, so tasks keep touching tables
    # nobody has touched yet, together (first touches of a TD's mirror tables);
    # 0: the hot set stays where the seed put it
    sweep: int = 0
    # share of 2 MiB regions the host backs with a transparent huge page; a
    # shared fault in one maps it with a 2M leaf in the direct root when the
    # region allows it (kvm_mmu_hugepage_adjust).  0: 4K mappings only
    huge_pages: float = 0.0


@dataclass(frozen=True)
class VcpuConfig:
    write_fraction: float = 0.5
    root_reset_every: int = 500  # mean faults between MMU context resets (0: never)
    halt_every: int = 300  # mean faults between halts (0: never)
    halt_time: float = 0.03  # mean length of a halt: the vCPU keeps its root meanwhile
    # share of faults that are instruction fetches: with the iTLB multihit
    # mitigation (nx_huge_pages) they map 4K, splitting a huge leaf on the way
    exec_fraction: float = 0.0
    guest_accesses: int = 1  # guest loads/stores (TLB, hardware walk) before each fault
    # KVM_PRE_FAULT_MEMORY: share of vCPU ops that pre-fault a range instead of
    # running the guest (kvm_tdp_map_page's retry loop, which never enters the guest)
    prefault_fraction: float = 0.0
    prefault_range: int = 16 << 12  # bytes pre-faulted by one ioctl
    # share of the vCPU ioctls that check for signals (KVM_TDX_INIT_MEM_REGION,
    # KVM_PRE_FAULT_MEMORY) during which the VMM signals the thread (QEMU's SIG_IPI
    # kick): the signal arrives at one of the ioctl's first checks, and an ioctl it
    # interrupts (-EINTR) is restarted where it stopped
    signals: float = 0.1
    # per-worker overrides of this section's keys, one table per worker of the
    # role in slot order ([[ROLE.worker]]; see Config.worker_config)
    worker: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class InvalidatorConfig:
    interval: float = 0.02  # mean pause between fast zaps
    # on a TD: share of ops that move a 2 MiB memslot (KVM_MEMSLOT_INVALID,
    # synchronize_srcu, kvm_mmu_zap_memslot) instead of a fast zap
    memslot_move_fraction: float = 0.0
    # per-worker overrides of this section's keys, one table per worker of the
    # role in slot order ([[ROLE.worker]]; see Config.worker_config)
    worker: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ZapperConfig:
    leaf_zap: int = 2
    leaf_zap_shared: int = 2
    subtree_zap_shared: int = 3
    subtree_zap_exclusive: int = 1
    clear_dirty: int = 0  # dirty-log harvest: clear D bits (read lock), flush
    max_range: int = 2 << 20
    tlb_flush_latency: float = 50e-6
    interval: float = 0.0  # mean pause between ops (0: back to back)
    # per-worker overrides of this section's keys, one table per worker of the
    # role in slot order ([[ROLE.worker]]; see Config.worker_config)
    worker: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class NotifierConfig:
    interval: float = 0.002  # mean pause between invalidations
    max_range: int = 16 << 12  # largest invalidated range
    # on a TD: ranges that start on a private gfn are guest_memfd punch-holes (the
    # guest agreed); false: only the mmu_notifier of shared memory
    punch_private: bool = True
    # the fraction of the shared memory's invalidations that may not block (the
    # OOM reaper's mmu_notifier_invalidate_range_start_nonblock): KVM's zap of
    # them does not yield
    nonblock: float = 0.1
    # per-worker overrides of this section's keys, one table per worker of the
    # role in slot order ([[ROLE.worker]]; see Config.worker_config)
    worker: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ConverterConfig:
    interval: float = 0.005  # mean pause between conversions
    range: int = 0  # gfns converted at once, in bytes (0: tdx.private_chunk)
    # convert a range, then convert it back on the next step (a guest sharing a
    # buffer for one I/O), so the attributes around it stay as they were
    revert: bool = False
    # the fraction of conversions whose range is not chunk aligned: each end at a
    # random gfn or at a 2M boundary, one below or one above it (a guest sharing
    # a few pages of a buffer), so ranges start and end at every alignment
    unaligned: float = 0.25
    # per-worker overrides of this section's keys, one table per worker of the
    # role in slot order ([[ROLE.worker]]; see Config.worker_config)
    worker: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class UnsyncConfig:
    enabled: bool = True  # nested TDP: 16 of L1's page-table gfns are shadowed
    sync_every: int = 200  # mean vCPU ops between kvm_mmu_sync_roots (write lock)
    emulate_latency: float = 20e-6  # cost of emulating a write-protected write


@dataclass(frozen=True)
class InjectConfig:
    delay_every: int = 400
    delay_max: float = 20e-6
    # make a worker hang, to test the watchdog: after hang_after seconds (0: never)
    # worker hang_worker takes mmu_lock for write, ignores SIGTERM and spins
    hang_after: float = 0.0
    hang_worker: int = 0
    # make every worker leak this many bytes per op, to test the leak detector
    leak_per_op: int = 0
    # a bug variant that splits an atomic step in two stalls this long between the
    # halves (targeted delay injection; the fixed protocol has no such gap)
    race_window: float = 20e-6


@dataclass(frozen=True)
class SchedConfig:
    """The modelled kernel scheduler (model/sched.py), not the workers' controlled
    scheduling ([schedule])."""

    # mean timeslice (exponential): need_resched() comes true once a task has run
    # this long since it last slept or yielded; 0: never, only mmu_lock contention
    # makes a walk yield (rwlock_needbreak)
    timeslice: float = 1e-3


@dataclass(frozen=True)
class VmConfig:
    type: str = "tdx"  # "tdx": direct + mirror roots and the TDX module; "default": direct only


@dataclass(frozen=True)
class TdxConfig:
    seamcall_latency: float = 20e-6
    # how long TDH.VP.ENTER holds the TD epoch lock (and, under zero-step
    # mitigation, the S-EPT tree) before the guest runs
    vp_enter_latency: float = 5e-6
    busy_policy: str = "unwind"  # unwind | retry | serialize
    busy_retries: int = 16
    private_chunk: int = 32 << 10
    # zero-step mitigation: the TDX module suspects a zero-step attack after this many
    # TD entries that re-fault at one guest RIP (6 per the TDX module, per KVM)
    zero_step_threshold: int = 6
    # a TD guest's instruction touches up to this many consecutive private pages
    # (rep movs across pages): each EPT violation on them exits at one RIP
    instruction_span: int = 8
    # chance, per pass of tdx_handle_ept_violation's local retry loop, that
    # kvm_vcpu_has_events() (an interrupt to inject) ends it: the vCPU re-enters
    pending_event_fraction: float = 0.05
    # pages of the initial image (KVM_TDX_INIT_MEM_REGION: PAGE.ADD + MR.EXTEND)
    # built by the first vCPU before the TD is finalized; 0: finalize at once
    init_mem_pages: int = 64


@dataclass(frozen=True)
class TraceConfig:
    enabled: bool = True  # every worker records protocol events into a ring
    entries: int = 4096  # ring size per worker (a power of two)
    keep: int = 2000  # events kept, merged, with a violation, crash or hang


SCHEDULE_MODES = ("free", "random", "pct", "replay")


@dataclass(frozen=True)
class ScheduleConfig:
    """Controlled scheduling (see harness/sched/): "free" lets the OS
    interleave the workers; the other modes make them take turns at the atomics
    chokepoint so that a run is a pure function of (config, seed, schedule)."""

    mode: str = "free"  # free | random | pct | replay
    seed: int = 0  # the schedule's own seed (random, pct)
    switch_p: float = 0.02  # random: chance of a switch at each shared access
    depth: int = 3  # pct: bug depth d (d - 1 priority change points)
    max_steps: int = 200_000  # shared accesses before the workers are asked to stop
    # per-worker op caps ([] = none), op ranges to skip ([worker, first, last]),
    # and the switch points of a replayed schedule ([worker, op, access, to])
    max_ops: tuple[int, ...] = ()
    skip_ops: tuple[tuple[int, int, int], ...] = ()
    switches: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def controlled(self) -> bool:
        return self.mode != "free"


@dataclass(frozen=True)
class LivenessConfig:
    """The liveness oracle's bounds (stress/oracles/liveness.py): rounds of one
    retry loop at one entry within one operation, and rounds of a wait for
    another task, before it is a livelock.  A controlled run caps both so a
    livelock is found before the schedule's step budget runs out."""

    max_retries: int = 100_000
    max_wait_rounds: int = 2_000
    # in a quiet phase (run.quiet_every/quiet_for), once quiet_grace has passed (the host
    # operations in flight when it began are over): rounds of one retry loop at one entry
    # before it is a livelock.  Only vCPUs run then, so a fault that goes round this often
    # is waiting for nothing
    quiet_max_retries: int = 1_000
    quiet_grace: float = 0.25
    quiet_min_stall: float = 0.5  # ... and that went on for at least this long

    def params(self, schedule: ScheduleConfig, run: RunConfig | None = None
               ) -> dict[str, int]:
        if not schedule.controlled:
            out = {"max_retries": self.max_retries, "max_wait_rounds": self.max_wait_rounds}
            if run is not None and run.quiet_for:
                out.update(quiet_every_ns=int(run.quiet_every * 1e9),
                           quiet_for_ns=int(run.quiet_for * 1e9),
                           quiet_grace_ns=int(self.quiet_grace * 1e9),
                           quiet_min_stall_ns=int(self.quiet_min_stall * 1e9),
                           quiet_max_retries=self.quiet_max_retries)
            return out
        # a retry round is tens of shared accesses: stay well inside the step cap
        cap = max(100, schedule.max_steps // 200)
        return {"max_retries": min(self.max_retries, cap),
                "max_wait_rounds": min(self.max_wait_rounds, cap)}


@dataclass(frozen=True)
class PoolConfig:
    pages: int = 0  # 0: sized from the guest
    # model-only memory map (c8e5a0d0e9bc): the page-table page that maps a 2M
    # region at level 1 is placed, when free, at the frame of that region's
    # first huge page, i.e. guest memory "over top of a kernel-allocated SP",
    # so a huge leaf can replace a table with the same PFN
    alias_tables: bool = False


#: The kernel engine's roles: each a worker kind with its ops (stress/kernel/worker.py).
KERNEL_ROLES = ("vcpu", "zapper", "notifier", "invalidator", "dirtylog", "aging", "nx",
                "memslot")


@dataclass(frozen=True)
class KernelConfig:
    """The kernel engine (``run.engine = "kernel"``): the tree, the arena, the
    workers of each role and the weights of their ops."""

    ksrc: str = ""  # a tree or a linux-source tarball; "": Debian's linux-source
    arena: int = 1 << 30  # the shared arena (sparse: only what is touched costs)
    pages: int = 32768  # page-table pages in the arena's pool
    yield_ppm: int = 3000  # delay injection: a yield after this share of shared accesses
    # walk windows: a load that reads a link to a lower table yields walk_window times as
    # often (the walker holds a pointer to a table that can be removed under it)
    walk_window: int = 20
    # preemption at the outermost rcu_read_unlock (a preemptible kernel's preempt_enable):
    # the grace periods the task held up can end there, before what it does next
    rcu_unlock_yield_ppm: int = 20000
    timeslice: float = 0.001  # need_resched() after this long on the CPU
    ad_bits: bool = True  # EPT A/D bits (kvm_mmu_set_ept_masks(has_ad_bits))
    nx_huge_pages: bool = True  # the iTLB multihit workaround: exec faults split huge pages
    nx_recovery_ratio: int = 60  # kvm.nx_huge_pages_recovery_ratio: 1/N of the splits per run
    write_fraction: float = 0.5
    exec_fraction: float = 0.1
    # a vCPU op is HLT with this share: the vCPU sleeps halt_time in kvm_vcpu_block with
    # its root loaded, servicing no request (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS waits)
    halt_fraction: float = 0.01
    halt_time: float = 0.002
    # "random": the hot set and the rest of the guest; "sequential": every access a gfn
    # this vCPU has not touched yet (each fault a fresh one: the benchmark's fault path)
    pattern: str = "random"
    vcpu: int = 4
    zapper: int = 1  # kvm_zap_gfn_range (write lock)
    notifier: int = 1  # mmu_notifier invalidate_range_start/end (kvm_unmap_gfn_range)
    invalidator: int = 1  # kvm_mmu_zap_all_fast: invalidate roots, zap them under the read lock
    dirtylog: int = 1  # write-protect/eager split/clear-dirty/KVM_GET_DIRTY_LOG/collapse
    # KVM_GET_DIRTY_LOG harvests between enabling dirty logging and disabling it
    dirty_log_harvests: int = 3
    aging: int = 1  # mmu_notifier clear_young/test_young
    nx: int = 1  # the NX huge page recovery worker
    memslot: int = 1  # KVM_SET_USER_MEMORY_REGION: delete a slot, create it again
    slot_zap_all: bool = True  # KVM_X86_QUIRK_SLOT_ZAP_ALL: deleting a slot zaps everything
    # a deliberately impossible memory map ("guest memory overtop a kernel-allocated SP",
    # c8e5a0d0e9bc): the guest's first 2M regions are backed by page-table frames, and each
    # region's level-1 table sits, when free, at the frame of the region's first page
    alias_tables: bool = False
    interval: float = 0.002  # the non-vCPU roles' pause between ops

    def workers(self) -> dict[str, int]:
        return {role: getattr(self, role) for role in KERNEL_ROLES}


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    vm: VmConfig = field(default_factory=VmConfig)
    guest: GuestConfig = field(default_factory=GuestConfig)
    workers: dict[str, int] = field(
        default_factory=lambda: {"vcpu": 2, "zapper": 1, "invalidator": 0, "notifier": 0,
                                 "converter": 0})
    vcpu: VcpuConfig = field(default_factory=VcpuConfig)
    invalidator: InvalidatorConfig = field(default_factory=InvalidatorConfig)
    zapper: ZapperConfig = field(default_factory=ZapperConfig)
    inject: InjectConfig = field(default_factory=InjectConfig)
    unsync: UnsyncConfig = field(default_factory=UnsyncConfig)
    notifier: NotifierConfig = field(default_factory=NotifierConfig)
    converter: ConverterConfig = field(default_factory=ConverterConfig)
    tdx: TdxConfig = field(default_factory=TdxConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash64(self) -> int:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little")

    @cached_property
    def memslots(self) -> tuple[tuple[int, int], ...]:
        """The guest's memslots as (base_gfn, npages), sorted (guest_memslots)."""
        return guest_memslots(self.guest, self.vm.type)

    @property
    def n_gfns(self) -> int:
        """Frames the memslots' per-gfn arrays take in the arena (each slot's
        npages rounded up to 2 MiB): what the guest's memory costs, wherever
        its slots sit (stress.model.kvm.KvmMemorySlot)."""
        return sum(-(-n // 512) * 512 for _, n in self.memslots)

    @property
    def n_workers(self) -> int:
        return sum(self.engine_workers().values())

    def engine_workers(self) -> dict[str, int]:
        """The workers of each role of the engine that runs (run.engine)."""
        return self.kernel.workers() if self.run.engine == "kernel" else self.workers

    def worker_roles(self) -> list[str]:
        """The role of every worker slot, in slot order."""
        return [role for role, n in self.engine_workers().items() for _ in range(n)]

    def role_section(self, role: str, k: int) -> Any:
        """The ``role`` section as its ``k``-th worker sees it: the section with
        the worker's ``[[ROLE.worker]]`` table applied (the k-th table; workers
        past the tables use the section as it is)."""
        sec = getattr(self, role)
        if k < len(sec.worker):
            return dataclasses.replace(sec, **sec.worker[k], worker=())
        return sec

    def worker_config(self, index: int) -> Config:
        """The config as worker ``index`` sees it: its role's section replaced by
        its own (role_section)."""
        roles = self.worker_roles()
        role = roles[index]
        sec = self.role_section(role, roles[:index].count(role))
        return dataclasses.replace(self, **{role: sec})


# key -> (parser, check) per section; parser converts TOML values
def _int(key: str, lo: int, hi: int):
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}: expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(f"{key}: must be between {lo} and {hi}, got {v}")
        return v
    return conv


def _float(key: str, lo: float, hi: float):
    def conv(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{key}: expected a number, got {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(f"{key}: must be between {lo} and {hi}, got {v}")
        return float(v)
    return conv


def _str(key: str):
    def conv(v: Any) -> str:
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{key}: expected a non-empty string, got {v!r}")
        return v
    return conv


def _choice(key: str, choices: tuple[str, ...]):
    def conv(v: Any) -> str:
        if v not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {v!r}")
        return v
    return conv


def _path_or_empty(key: str):
    def conv(v: Any) -> str:
        if not isinstance(v, str):
            raise ConfigError(f"{key}: expected a path, got {v!r}")
        return v
    return conv


def _bool(key: str):
    def conv(v: Any) -> bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{key}: expected true or false, got {v!r}")
        return v
    return conv


def _int_rows(key: str, width: int | None):
    """A list of integers (width None) or of integer rows of ``width``."""
    def conv(v: Any) -> tuple:
        if not isinstance(v, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {v!r}")
        out = []
        for row in v:
            items = row if width is not None else [row]
            if (width is not None and (not isinstance(row, list | tuple) or len(row) != width)) \
                    or any(isinstance(x, bool) or not isinstance(x, int) or x < -1 for x in items):
                shape = f"rows of {width} integers" if width else "non-negative integers"
                raise ConfigError(f"{key}: expected {shape}, got {row!r}")
            out.append(tuple(row) if width is not None else row)
        return tuple(out)
    return conv


def _size(key: str, lo: int, hi: int):
    def conv(v: Any) -> int:
        n = parse_size(v, key)
        if not lo <= n <= hi:
            raise ConfigError(f"{key}: must be between {lo} and {hi} bytes, got {v!r}")
        if n % 4096:
            raise ConfigError(f"{key}: must be a multiple of 4k, got {v!r}")
        return n
    return conv


def _memsize(key: str):
    def conv(v: Any) -> int:
        return parse_size(v, key)
    return conv


def _dur(key: str, lo: float, hi: float):
    def conv(v: Any) -> float:
        s = parse_duration(v, key)
        if not lo <= s <= hi:
            raise ConfigError(f"{key}: must be between {lo}s and {hi}s, got {v!r}")
        return s
    return conv


_SLOT_ADDR = r"(0x[0-9a-f]+|\d+\s*[kmgt]?)"
_SLOT_RANGE = re.compile(rf"\s*{_SLOT_ADDR}\s*([-+])\s*{_SLOT_ADDR}\s*")
_SLOT_TOP = re.compile(rf"\s*{_SLOT_ADDR}\s*@\s*top\s*")
_2M = 2 << 20


def _slot_addr(text: str) -> int:
    t = text.replace(" ", "")
    return int(t, 16) if t.startswith("0x") else parse_size(t)


def guest_top(vm_type: str, root_level: int) -> int:
    """The top of the guest physical address space, in bytes: 2**MAXPHYADDR
    (48 bits with 4-level TDP, 52 with 5-level); on a TD the top GPA bit is the
    shared bit (TDX_SHARED_BIT_PWL_4/5: 47, 51), so private and shared memory
    both live below it."""
    maxphyaddr = 52 if root_level == 5 else 48
    return 1 << (maxphyaddr - 1 if vm_type == "tdx" else maxphyaddr)


def parse_slot(spec: Any, top: int, key: str = "guest.slots") -> tuple[int, int]:
    """One memslot spec as (base, size) in bytes: "START-END", "START+SIZE", or
    "SIZE@top" (the last SIZE bytes below ``top``)."""
    if not isinstance(spec, str):
        raise ConfigError(f"{key}: expected strings like \"4g-5g\", \"64t+2m\" or "
                          f"\"2m@top\", got {spec!r}")
    t = spec.lower()
    if m := _SLOT_TOP.fullmatch(t):
        size = _slot_addr(m.group(1))
        base = top - size
    elif m := _SLOT_RANGE.fullmatch(t):
        base, other = _slot_addr(m.group(1)), _slot_addr(m.group(3))
        size = other - base if m.group(2) == "-" else other
    else:
        raise ConfigError(f"{key}: {spec!r} is not \"START-END\", \"START+SIZE\" or "
                          "\"SIZE@top\" (e.g. \"4g-5g\", \"64t+2m\", \"2m@top\")")
    if size <= 0 or size % 4096:
        raise ConfigError(f"{key}: {spec!r}: the size must be a positive multiple of 4k")
    if base < 0 or base % _2M:
        raise ConfigError(f"{key}: {spec!r}: a slot must start on a 2m boundary")
    if base + size > top:
        raise ConfigError(f"{key}: {spec!r} ends above the top of the guest physical "
                          f"address space ({top:#x})")
    return base, size


def _pc_layout(size: int, top: int) -> list[tuple[int, int]]:
    """layout = "pc": low RAM (half of ``size``, at most 2g) below the MMIO hole,
    which ends at 4g; high RAM (the rest) from 4g; a 2m slot at the top."""
    low = min(size // 2 // _2M * _2M, 2 << 30)
    if low == 0 or size - low <= 0:
        raise ConfigError("guest.layout: \"pc\" needs guest.size of at least 4m")
    return [(0, low), (4 << 30, size - low), (top - _2M, _2M)]


def guest_memslots(g: GuestConfig, vm_type: str) -> tuple[tuple[int, int], ...]:
    """The memslots of a guest config as (base_gfn, npages), sorted; a bad slot
    list is a ConfigError naming guest.slots."""
    top = guest_top(vm_type, g.root_level)
    if g.slots:
        ranges = [parse_slot(spec, top) for spec in g.slots]
    elif g.layout == "pc":
        ranges = _pc_layout(g.size, top)
    else:
        ranges = [(0, g.size)]
        if g.size > top:
            raise ConfigError(f"guest.size: too large for a {g.root_level}-level root")
    ranges.sort()
    for (b0, s0), (b1, _s1) in zip(ranges, ranges[1:], strict=False):
        if b1 < b0 + s0:
            raise ConfigError(f"guest.slots: [{b0:#x}, {b0 + s0:#x}) and the slot at "
                              f"{b1:#x} overlap")
    return tuple((b >> 12, n >> 12) for b, n in ranges)


def _slot_list(key: str):
    def conv(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list | tuple):  # [] (a resolved config's): the layout's
            raise ConfigError(f"{key}: expected a list of memslots like "
                              f"[\"0-2g\", \"4g-5g\", \"2m@top\"], got {v!r}")
        for spec in v:
            parse_slot(spec, 1 << 62, key)  # the syntax; the top is checked in validate
        return tuple(v)
    return conv


SCHEMA: dict[str, dict[str, Any]] = {
    "run": {
        "duration": _dur("run.duration", 0.0, 366 * 86400.0),
        "seed": _int("run.seed", 0, 2**63 - 1),
        "variant": _str("run.variant"),
        "variant_file": _path_or_empty("run.variant_file"),
        "out": _str("run.out"),
        "check_interval": _dur("run.check_interval", 0.0, 86400.0),
        "expect_violation": _bool("run.expect_violation"),
        "watchdog": _dur("run.watchdog", 0.5, 86400.0),
        "max_rss_growth": _memsize("run.max_rss_growth"),
        "quiet_every": _dur("run.quiet_every", 0.0, 86400.0),
        "quiet_for": _dur("run.quiet_for", 0.0, 86400.0),
        "engine": _choice("run.engine", ("python", "kernel")),
    },
    "kernel": {
        "ksrc": _path_or_empty("kernel.ksrc"),
        "arena": _memsize("kernel.arena"),
        "pages": _int("kernel.pages", 64, 1 << 17),
        "yield_ppm": _int("kernel.yield_ppm", 0, 1_000_000),
        "walk_window": _int("kernel.walk_window", 1, 1000),
        "rcu_unlock_yield_ppm": _int("kernel.rcu_unlock_yield_ppm", 0, 1_000_000),
        "timeslice": _dur("kernel.timeslice", 0.0, 60.0),
        "ad_bits": _bool("kernel.ad_bits"),
        "nx_huge_pages": _bool("kernel.nx_huge_pages"),
        "nx_recovery_ratio": _int("kernel.nx_recovery_ratio", 0, 1000),
        "write_fraction": _float("kernel.write_fraction", 0.0, 1.0),
        "exec_fraction": _float("kernel.exec_fraction", 0.0, 1.0),
        "halt_fraction": _float("kernel.halt_fraction", 0.0, 1.0),
        "halt_time": _dur("kernel.halt_time", 0.0, 10.0),
        "pattern": _choice("kernel.pattern", ("random", "sequential")),
        "dirty_log_harvests": _int("kernel.dirty_log_harvests", 0, 1000),
        **{role: _int(f"kernel.{role}", 0, 30) for role in KERNEL_ROLES},
        "interval": _dur("kernel.interval", 0.0, 60.0),
        "slot_zap_all": _bool("kernel.slot_zap_all"),
        "alias_tables": _bool("kernel.alias_tables"),
    },
    "vm": {"type": _choice("vm.type", ("tdx", "default"))},
    "guest": {
        "size": _size("guest.size", 4096, 1 << 40),
        "root_level": _int("guest.root_level", 4, 5),
        "layout": _choice("guest.layout", GUEST_LAYOUTS),
        "slots": _slot_list("guest.slots"),
        "hot_set": _size("guest.hot_set", 4096, 1 << 40),
        "hot_fraction": _float("guest.hot_fraction", 0.0, 1.0),
        "sweep": _int("guest.sweep", 0, 10**9),
        "huge_pages": _float("guest.huge_pages", 0.0, 1.0),
    },
    "workers": {role: _int(f"workers.{role}", 0, 256) for role in ROLES},
    "vcpu": {
        "write_fraction": _float("vcpu.write_fraction", 0.0, 1.0),
        "root_reset_every": _int("vcpu.root_reset_every", 0, 10**9),
        "halt_every": _int("vcpu.halt_every", 0, 10**9),
        "halt_time": _dur("vcpu.halt_time", 0.0, 60.0),
        "exec_fraction": _float("vcpu.exec_fraction", 0.0, 1.0),
        "guest_accesses": _int("vcpu.guest_accesses", 0, 10**6),
        "prefault_fraction": _float("vcpu.prefault_fraction", 0.0, 1.0),
        "prefault_range": _size("vcpu.prefault_range", 4096, 1 << 30),
        "signals": _float("vcpu.signals", 0.0, 1.0),
    },
    "invalidator": {
        "interval": _dur("invalidator.interval", 0.0, 3600.0),
        "memslot_move_fraction": _float("invalidator.memslot_move_fraction", 0.0, 1.0),
    },
    "zapper": {
        "leaf_zap": _int("zapper.leaf_zap", 0, 1000),
        "leaf_zap_shared": _int("zapper.leaf_zap_shared", 0, 1000),
        "subtree_zap_shared": _int("zapper.subtree_zap_shared", 0, 1000),
        "subtree_zap_exclusive": _int("zapper.subtree_zap_exclusive", 0, 1000),
        "clear_dirty": _int("zapper.clear_dirty", 0, 1000),
        "max_range": _size("zapper.max_range", 4096, 1 << 40),
        "tlb_flush_latency": _dur("zapper.tlb_flush_latency", 0.0, 0.1),
        "interval": _dur("zapper.interval", 0.0, 3600.0),
    },
    "inject": {
        "delay_every": _int("inject.delay_every", 0, 10**9),
        "delay_max": _dur("inject.delay_max", 0.0, 1.0),
        "hang_after": _dur("inject.hang_after", 0.0, 86400.0),
        "hang_worker": _int("inject.hang_worker", 0, 1023),
        "leak_per_op": _memsize("inject.leak_per_op"),
        "race_window": _dur("inject.race_window", 0.0, 0.1),
    },
    "notifier": {
        "interval": _dur("notifier.interval", 0.0, 3600.0),
        "max_range": _size("notifier.max_range", 4096, 1 << 40),
        "punch_private": _bool("notifier.punch_private"),
        "nonblock": _float("notifier.nonblock", 0.0, 1.0),
    },
    "converter": {
        "interval": _dur("converter.interval", 0.0, 3600.0),
        "range": _memsize("converter.range"),
        "revert": _bool("converter.revert"),
        "unaligned": _float("converter.unaligned", 0.0, 1.0),
    },
    "unsync": {
        "enabled": _bool("unsync.enabled"),
        "sync_every": _int("unsync.sync_every", 1, 10**9),
        "emulate_latency": _dur("unsync.emulate_latency", 0.0, 0.1),
    },
    "tdx": {
        "seamcall_latency": _dur("tdx.seamcall_latency", 0.0, 0.1),
        "vp_enter_latency": _dur("tdx.vp_enter_latency", 0.0, 0.1),
        "busy_policy": _choice("tdx.busy_policy", BUSY_POLICIES),
        "busy_retries": _int("tdx.busy_retries", 1, 10**6),
        "private_chunk": _size("tdx.private_chunk", 4096, 1 << 40),
        "zero_step_threshold": _int("tdx.zero_step_threshold", 1, 10**6),
        "instruction_span": _int("tdx.instruction_span", 1, 512),
        "pending_event_fraction": _float("tdx.pending_event_fraction", 0.0, 1.0),
        "init_mem_pages": _int("tdx.init_mem_pages", 0, 1 << 20),
    },
    "trace": {
        "enabled": _bool("trace.enabled"),
        "entries": _int("trace.entries", 16, 1 << 20),
        "keep": _int("trace.keep", 1, 1 << 22),
    },
    "pool": {"pages": _int("pool.pages", 0, 1 << 24),
             "alias_tables": _bool("pool.alias_tables")},
    "liveness": {"max_retries": _int("liveness.max_retries", 10, 10**9),
                 "max_wait_rounds": _int("liveness.max_wait_rounds", 10, 10**9),
                 "quiet_max_retries": _int("liveness.quiet_max_retries", 10, 10**9),
                 "quiet_grace": _dur("liveness.quiet_grace", 0.0, 60.0),
                 "quiet_min_stall": _dur("liveness.quiet_min_stall", 0.0, 60.0)},
    "sched": {"timeslice": _dur("sched.timeslice", 0.0, 60.0)},
    "schedule": {
        "mode": _choice("schedule.mode", SCHEDULE_MODES),
        "seed": _int("schedule.seed", 0, 2**63 - 1),
        "switch_p": _float("schedule.switch_p", 0.0, 1.0),
        "depth": _int("schedule.depth", 1, 64),
        "max_steps": _int("schedule.max_steps", 1, 10**10),
        "max_ops": _int_rows("schedule.max_ops", None),
        "skip_ops": _int_rows("schedule.skip_ops", 3),
        "switches": _int_rows("schedule.switches", 4),
    },
}


# keys that existed once: a config naming one gets told what replaced it
REMOVED_KEYS = {
    "invalidator.yield_every": "need_resched() is a timeslice now: [sched] timeslice",
}


def _worker_tables(section: str, v: Any, origin: str) -> tuple[dict[str, Any], ...]:
    """``[[ROLE.worker]]``: one table of the section's keys per worker."""
    if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
        got = "a table" if isinstance(v, dict) else repr(v)
        raise ConfigError(f"{origin}: {section}.worker: expected an array of tables "
                          f"([[{section}.worker]]), got {got}")
    out = []
    for i, table in enumerate(v):
        parsed = {}
        for key, x in table.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"{origin}: unknown key {section}.worker[{i}].{key} "
                                  f"(known: {', '.join(SCHEMA[section])})")
            try:
                parsed[key] = SCHEMA[section][key](x)
            except ConfigError as e:
                raise ConfigError(str(e).replace(f"{section}.{key}",
                                                 f"{section}.worker[{i}].{key}", 1)) from None
        out.append(parsed)
    return tuple(out)


def _apply(cfg: Config, raw: dict[str, Any], origin: str) -> Config:
    changes: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in SCHEMA:
            raise ConfigError(f"{origin}: unknown section [{section}] "
                              f"(known: {', '.join(SCHEMA)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: {section} must be a table")
        parsed: dict[str, Any] = {}
        for key, v in values.items():
            if key == "worker" and section in ROLES:
                parsed[key] = _worker_tables(section, v, origin)
                continue
            if key not in SCHEMA[section]:
                if f"{section}.{key}" in REMOVED_KEYS:
                    raise ConfigError(f"{origin}: {section}.{key} was removed "
                                      f"({REMOVED_KEYS[section + '.' + key]})")
                known = [*SCHEMA[section], *(["worker"] if section in ROLES else [])]
                raise ConfigError(f"{origin}: unknown key {section}.{key} "
                                  f"(known: {', '.join(known)})")
            parsed[key] = SCHEMA[section][key](v)
        if section == "workers":
            merged = dict(cfg.workers)
            merged.update(parsed)
            changes["workers"] = merged
        else:
            changes[section] = dataclasses.replace(getattr(cfg, section), **parsed)
    return dataclasses.replace(cfg, **changes)


def validate(cfg: Config) -> Config:
    """Cross-key checks that no single key can make."""
    if cfg.run.engine == "kernel":
        from stress.kernel.mutations import MutationError, get_mutation

        try:
            get_mutation(cfg.run.variant)
        except MutationError as e:
            raise ConfigError(f"run.variant: {e}") from None
        return _validate_rest(cfg)
    try:
        if cfg.run.variant_file:
            load_variant_file(cfg.run.variant_file)
            # absolute, so a bundle's config.toml works from any directory
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(
                cfg.run, variant_file=str(Path(cfg.run.variant_file).resolve())))
        variant = get_variant(cfg.run.variant)
    except VariantLoadError as e:
        raise ConfigError(f"run.variant_file: {e}") from None
    except UnknownVariant as e:
        raise ConfigError(f"run.variant: {e.args[0]}") from None
    if variant.requires_tdx and cfg.vm.type != "tdx":
        raise ConfigError(f"run.variant: {variant.name} needs vm.type = \"tdx\" "
                          f"(got {cfg.vm.type!r})")
    return _validate_rest(cfg)


def _validate_rest(cfg: Config) -> Config:
    """validate()'s checks that do not depend on the engine's variants."""
    if cfg.run.quiet_for and cfg.run.quiet_for >= cfg.run.quiet_every:
        raise ConfigError(f"run.quiet_for: {cfg.run.quiet_for:g}s must be shorter than "
                          f"run.quiet_every ({cfg.run.quiet_every:g}s)")
    lv = cfg.liveness
    if cfg.run.quiet_for and lv.quiet_grace + lv.quiet_min_stall >= cfg.run.quiet_for:
        raise ConfigError(f"liveness.quiet_grace + quiet_min_stall: "
                          f"{lv.quiet_grace + lv.quiet_min_stall:g}s must be shorter than "
                          f"run.quiet_for ({cfg.run.quiet_for:g}s)")
    if cfg.run.quiet_for >= cfg.run.watchdog:
        raise ConfigError(f"run.quiet_for: {cfg.run.quiet_for:g}s must be shorter than "
                          f"run.watchdog ({cfg.run.watchdog:g}s): a quiet worker starts no "
                          "operation")
    if cfg.inject.hang_after and cfg.inject.hang_worker >= cfg.n_workers:
        raise ConfigError(f"inject.hang_worker: {cfg.inject.hang_worker} but only "
                          f"{cfg.n_workers} workers")
    if cfg.trace.entries & (cfg.trace.entries - 1):
        raise ConfigError(f"trace.entries: must be a power of two, got {cfg.trace.entries}")
    if cfg.tdx.private_chunk & (cfg.tdx.private_chunk - 1):
        raise ConfigError(f"tdx.private_chunk: must be a power of two, got "
                          f"{cfg.tdx.private_chunk}")
    if cfg.run.engine == "kernel":
        if cfg.vm.type == "tdx":
            raise ConfigError("run.engine: the kernel engine runs default VMs (vm.type = "
                              "\"default\"): the 6.12 tree's tdp_mmu.c has no mirror root")
        if not cfg.kernel.vcpu:
            raise ConfigError("kernel.vcpu: the kernel engine needs at least one vCPU")
    if cfg.n_workers == 0:
        raise ConfigError("workers: at least one worker is needed")
    sc = cfg.schedule
    if sc.controlled and cfg.n_workers > 63:
        raise ConfigError(f"schedule.mode: a controlled schedule takes at most 63 workers, "
                          f"got {cfg.n_workers}")
    if sc.max_ops and len(sc.max_ops) != cfg.n_workers:
        raise ConfigError(f"schedule.max_ops: {len(sc.max_ops)} caps for "
                          f"{cfg.n_workers} workers")
    for row in sc.switches:
        if max(row[0], row[3]) >= cfg.n_workers:
            raise ConfigError(f"schedule.switches: {list(row)} names a worker beyond the "
                              f"{cfg.n_workers} configured")
    g = cfg.guest
    if g.slots and g.size != GuestConfig.size:
        raise ConfigError("guest.size: not used with guest.slots (the slots are the guest's "
                          "memory): drop one of them")
    slots = guest_memslots(g, cfg.vm.type)
    if sum(n for _, n in slots) > 1 << 28:
        raise ConfigError("guest.slots: more than 1t of memory in all the slots")
    if g.hot_set > max(n for _, n in slots) << 12:
        what = "guest.size" if len(slots) == 1 and not g.slots else "the largest memslot"
        raise ConfigError(f"guest.hot_set: {g.hot_set} bytes is larger than {what} "
                          f"({max(n for _, n in slots) << 12} bytes)")
    for k in range(cfg.workers.get("converter", 0)):
        c = cfg.role_section("converter", k)
        if c.range % 4096:
            where = f"converter.worker[{k}]" if k < len(cfg.converter.worker) else "converter"
            raise ConfigError(f"{where}.range: must be a multiple of 4k, got {c.range}")
    if cfg.converter.range % 4096:
        raise ConfigError(f"converter.range: must be a multiple of 4k, got {cfg.converter.range}")
    for k in range(cfg.workers.get("zapper", 0)):
        z = cfg.role_section("zapper", k)
        if not (z.leaf_zap + z.leaf_zap_shared + z.subtree_zap_shared + z.subtree_zap_exclusive
                + z.clear_dirty):
            where = f"zapper.worker[{k}]" if k < len(cfg.zapper.worker) else "zapper"
            raise ConfigError(f"{where}: all op weights are 0 (zapper worker {k})")
    return cfg


def load_from(cfg: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    """``cfg`` with overrides applied (as on the command line), validated."""
    return validate(_apply(cfg, overrides, "overrides"))


def read_toml(p: Path, what: str = "config") -> dict[str, Any]:
    """Parse a TOML file; any failure is one ConfigError line naming the file."""
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such {what} file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a {what} file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: {getattr(e, 'strerror', None) or e}") from None


def shipped_configs() -> dict[str, Path]:
    """The configs installed with the package, by name (``smoke``: smoke.toml)."""
    try:
        return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.toml"))}
    except OSError:
        return {}


def find_config(path: str | Path) -> Path:
    """``path`` if it names a file; else the shipped config of that name
    (``smoke``, ``smoke.toml``), so a config is addressable from anywhere.
    An unknown name is a ConfigError listing the shipped ones."""
    p = Path(path)
    if p.exists() or len(p.parts) != 1:
        return p
    shipped = shipped_configs()
    name = p.stem if p.suffix == ".toml" else p.name
    if name in shipped:
        return shipped[name]
    raise ConfigError(f"{p}: no such config file, and not a shipped config "
                      f"(shipped: {', '.join(shipped)}; see `tdp-stress configs`)")


def describe_config(p: Path, limit: int = 100) -> str:
    """A config's one-line description (what `tdp-stress configs` shows): the
    first sentence of its leading comment, at most ``limit`` characters."""
    words: list[str] = []
    try:
        for line in p.read_text().splitlines():
            if not line.startswith("#"):
                break
            words.extend(line.lstrip("#").split())
    except OSError:
        return ""
    text = " ".join(words)
    if ". " in text:
        text = text[: text.index(". ") + 1]
    if len(text) > limit:
        text = text[: limit - 3].rsplit(" ", 1)[0] + "..."
    return text


def load(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Load ``path`` (a file, or a shipped config's name; default the shipped
    default.toml), apply overrides, validate."""
    cfg = Config()
    p = find_config(path) if path is not None else DEFAULT_CONFIG
    if path is not None or p.exists():
        cfg = _apply(cfg, read_toml(p), str(p))
    if overrides:
        cfg = _apply(cfg, overrides, "command line")
    return validate(cfg)


def expected_invariants(variant: Variant) -> dict[str, tuple[str, ...]]:
    """VM type -> the invariants a run of ``variant`` is expected to trip there
    (``Variant.expectations`` with the ``vm.type`` of its shipped config)."""
    vm_type = load(find_config(variant.config)).vm.type
    return variant.expectations(vm_type)
