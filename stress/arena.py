"""The shared-memory arena: one segment per run, laid out once from the config.

Design note.  Every process must agree on where each shared word lives, and a
checker must be able to walk all of it, so the layout is declared here once,
as word indices computed from the config (:class:`Layout`), and nothing else
computes offsets.  The segment starts with a header (magic, layout version,
config hash, owner pid) so a process attaching to a segment by name refuses
one that is not ours or not of this layout.

Ownership: the supervisor is the only process that creates and unlinks a
segment; workers inherit the mapping across ``fork`` and never unlink it.
Segments are named ``tdpstress-<pid>-<random>`` and created mode 0600 (the
``multiprocessing.shared_memory`` default).  A segment whose owner pid is dead
is stale and :func:`sweep_stale` removes it.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import os
import re
import secrets
import signal
import struct
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Any

MAGIC = int.from_bytes(b"TDPSTRS\x01", "little")
LAYOUT_VERSION = 9
MAX_ROOTS = 64  # slots of kvm->arch.tdp_mmu_roots
MAX_SHADOW_PAGES = 64  # indirect shadow pages (nested TDP) modelled for the unsync path
SHADOW_SP_WORDS = 16
TLB_ENTRIES = 16  # per-vCPU TLB: direct-mapped by gfn (model/tlb.py)
TLB_MAX_LEVELS = 5  # table pages a cached walk remembers (paging-structure caches)
TLB_HDR_WORDS = 2  # per vCPU: vcpu->requests, vcpu->mode
TRACE_EVENT_WORDS = 6  # seq, time ns, kind | level << 8 | worker << 16, a, b, c
PREFIX = "tdpstress-"
SHM_DIR = Path("/dev/shm")

WORDS_PER_PAGE = 512  # SPTE_ENT_PER_PAGE
SP_META_WORDS = 16  # two cache lines of struct kvm_mmu_page per page
WORKER_SLOT_WORDS = 128  # per-worker slot: state words then stat counters

# header words
H_MAGIC, H_VERSION, H_CONFIG_HASH, H_OWNER_PID, H_NWORDS = range(5)
HEADER_WORDS = 8


# segments this process created: its resource tracker registration is the
# owner's, so attaching to one of them must not unregister it
_CREATED: set[str] = set()


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM held back while the block runs (a segment is created
    and its owner takes it): a signal that comes meanwhile is delivered right
    after, when whoever must unlink the segment already holds it."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _tracker_alive() -> bool:
    """Is this process's multiprocessing resource tracker still there?

    A tracker that was killed (by a user, an OOM killer, a test) would be
    relaunched by the next register/unregister, which warns, and the new one
    prints a KeyError traceback when it is told to forget a segment it never
    saw.  So once it is gone we stop talking to it: the supervisor unlinks its
    own segment and ``tdp-stress cleanup`` sweeps the ones a killed run left.
    """
    rt = resource_tracker._resource_tracker  # type: ignore[attr-defined]
    if getattr(rt, "_pid", None) is None:
        return True  # not started yet: the next call starts a fresh one
    try:
        return bool(rt._check_alive())
    except Exception:
        return False


def _untrack(shm: shared_memory.SharedMemory) -> None:
    """Undo the resource tracker registration an attach made (3.11 has no
    track=False): otherwise the tracker unlinks the segment when we exit."""
    if shm.name not in _CREATED and _tracker_alive():
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


def _unlink(shm: shared_memory.SharedMemory) -> None:
    """``shm.unlink()``, without the tracker's unregister when it is dead.

    The unregister happens even when the name is already gone (someone ran
    ``rm /dev/shm/...``): ``SharedMemory.unlink`` skips it then, and the
    tracker would warn of a leaked segment at exit and fail to unlink it.
    """
    try:
        _posixshmem.shm_unlink(shm._name)  # type: ignore[attr-defined]
    finally:
        if _tracker_alive():
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


class ArenaError(Exception):
    """A segment cannot be created or attached."""


class Control:
    """Run-control words (offsets inside the control region)."""

    STOP = 0  # workers finish their op and exit
    ABORT = 1  # spin waits give up (the run is being torn down)
    PAUSE_REQ = 2  # non-zero generation: park at the next op boundary
    PARKED = 3  # number of workers parked for the current pause
    VIOLATION = 4  # 0, or 1 + index of the first worker that reported one
    START_NS = 5  # CLOCK_MONOTONIC ns when the workers were released
    GO = 6  # workers wait for this before their first op
    WORDS = 8


def quiet_phase(words: Any, layout: Layout, every_ns: int, for_ns: int) -> tuple[int, int]:
    """run.quiet_every/quiet_for as every task sees it, counted from the workers'
    release (Control.START_NS): (k + 1, ns since it began) inside the quiet part of
    cycle k, else (0, 0)."""
    t = time.monotonic_ns() - words.load(layout.ctl(Control.START_NS))
    k, into = divmod(t, every_ns)
    into -= every_ns - for_ns
    return (k + 1, into) if into >= 0 else (0, 0)


class Globals:
    """struct kvm / kvm->arch words (offsets inside the globals region)."""

    MMU_LOCK = 0
    MMU_LOCK_OWNER = 1
    TDP_MMU_PAGES = 2  # kvm->arch.tdp_mmu_pages: linked non-root tables
    TDP_MMU_PAGES_LOCK = 3
    RCU_GP_CTR = 4
    ROOT = 5  # page index of the direct root (shared gfns)
    MIRROR_ROOT = 6  # page index of the mirror root (private gfns, TDX only)
    TDX_SEPT_LOCK = 7  # KVM's spinlock serialising SEAMCALLs (the "serialize" policy)
    # TDX module state (only the module's code touches these)
    SEPT_ROOT = 8  # page index of the S-EPT root
    TD_EPOCH = 9  # TLB epoch, incremented by TDH.MEM.TRACK
    TD_EPOCH_LOCK = 10
    SECURE_EPT_LOCK = 11  # the module's per-TD lock, shared or exclusive, never waited on
    SECURE_EPT_LOCK_OWNER = 12
    SLOTS_LOCK = 13  # kvm->slots_lock: serialises kvm_mmu_zap_all_fast callers
    MMU_UNSYNC_PAGES_LOCK = 14  # kvm->arch.mmu_unsync_pages_lock
    STAT_MMU_UNSYNC = 15  # kvm->stat.mmu_unsync: shadow pages marked unsync
    MMU_INVALIDATE_SEQ = 16  # kvm->mmu_invalidate_seq
    MMU_INVALIDATE_IN_PROGRESS = 17  # kvm->mmu_invalidate_in_progress
    MMU_INVALIDATE_RANGE_START = 18
    MMU_INVALIDATE_RANGE_END = 19
    ROOT_SEQ = 21  # roots created so far: a root's place in the list (newest first)
    # global order of trace events: every event of every process increments it, so it
    # has a cache line of its own (sharing one with the words above made each event
    # invalidate the line every fault reads mmu_invalidate_seq from)
    TRACE_SEQ = 24
    # TDX (struct kvm_tdx, and the module's per-TD state)
    TD_STATE = 32  # kvm_tdx->state: TD_STATE_INITIALIZED, then RUNNABLE after finalize
    PRE_FAULT_ALLOWED = 33  # kvm->arch.pre_fault_allowed (set after TD_STATE_RUNNABLE)
    HKID = 34  # kvm_tdx->hkid > 0: assigned (the module's pages cannot be reclaimed)
    WAIT_FOR_SEPT_ZAP = 35  # kvm_tdx->wait_for_sept_zap: no vCPU may enter the TD
    TD_EPOCH_LOCK_OWNER = 36
    SEPT_LOCK_HOLDERS = 37  # module: kinds of the S-EPT tree lock's holders (BUSY stats)
    EPOCH_LOCK_HOLDERS = 38  # module: kinds of the TD epoch lock's holders
    INIT_MEM_PENDING = 39  # vCPUs still building the initial image (the last finalizes)
    VM_DEAD = 40  # kvm->vm_dead / KVM_REQ_VM_DEAD: the VM was killed (kvm_vm_dead)
    TDR_LOCK = 41  # module: the TDR's lock (shared by most calls, exclusive by a few)
    TDR_LOCK_OWNER = 42
    TDR_LOCK_HOLDERS = 43
    NR_PREMAPPED = 44  # kvm_tdx->nr_premapped (v6.16's initial-image protocol)
    SWEEP = 45  # harness: hot-set picks so far, all workers (guest.sweep)
    MEMSLOT_INVALID_START = 46  # a memslot being moved: [start, end) is KVM_MEMSLOT_INVALID
    MEMSLOT_INVALID_END = 47  # (end 0: no slot is invalid)
    SRCU_GP = 48  # kvm->srcu: grace periods started so far
    ZAP_CLOCK = 49  # oracle (zaps): one tick per zap started (stress/oracles/zaps.py)
    WORDS = 64


class Slot:
    """Per-worker slot (offsets inside one slot)."""

    PID = 0
    STATE = 1  # WorkerState
    HEARTBEAT = 2  # ops completed, for progress checks
    RCU_READER = 3  # 0 outside a read-side section, else the gp_ctr seen
    LOCK_MODE = 4  # mmu_lock mode held: 0 none, 1 read, 2 write
    PARKED_GEN = 5
    TRACE_HEAD = 6  # events written to this process's trace ring
    # oracle (not kernel state): the [start, end) whose memory attributes this
    # worker is changing, written under mmu_lock held for write at the
    # conversion's pre step and cleared at its post step (0, 0: none)
    ATTR_CHANGE_START = 7
    ATTR_CHANGE_END = 8
    # TDX module, per vCPU: 1 + the TD epoch this vCPU runs with while in the TD
    # (0 outside), and zero-step mitigation's count of entries re-faulting at one gfn
    TD_VCPU_EPOCH = 9
    ZERO_STEP_COUNT = 10
    ZERO_STEP_GFN = 11  # 1 + the gfn of that RIP's last EPT violation
    ZERO_STEP_RIP = 12  # 1 + the guest RIP the count is for
    VCPU_MUTEX = 13  # vcpu->mutex (a vCPU ioctl holds it; the TD's state changes take all)
    SRCU_READER = 14  # 0 outside kvm->srcu's read side, else 1 + the grace period seen
    SRCU_SITE = 15  # where the reader is: 1 + gfn of the fault it handles (reports)
    # oracle (liveness): the retry loop this worker is going round now, so a task
    # waiting for it can name it: 1 + index in hooks.RETRY_SITES, and 1 + the key
    RETRY_SITE = 16
    RETRY_KEY = 17
    RETRY_ROUNDS = 18  # its rounds so far, published every few rounds
    STATS = 19  # counters start here
    MAX_STATS = WORKER_SLOT_WORDS - STATS


class SpMeta:
    """struct kvm_mmu_page metadata (offsets inside one page's metadata)."""

    STATE = 0  # SpState
    ROLE = 1  # level | is_mirror << 4 | invalid << 5
    GFN = 2
    GEN = 3  # bumped on every alloc and free: detects walking a reused page
    RCU_EPOCH = 4
    ROOT_COUNT = 5  # tdp_mmu_root_count (roots only)
    REMOVED_BY = 6  # 1 + worker that unlinked the table (forensics)
    LAST_WRITER = 7  # 1 + worker whose atomic update last succeeded in it (forensics)
    EXTERNAL_SPT = 8  # mirror tables: 1 + page index of their S-EPT page (sp->external_spt)
    SEPT_LOCK = 9  # S-EPT pages: the TDX module's internal lock on this table
    SCHEDULED_TO_ZAP = 10  # roots: tdp_mmu_scheduled_root_to_zap
    ROOT_SLOT = 11  # roots: 1 + index of the root's slot in the roots list
    ROOT_ZAPS = 12  # roots: how many times tdp_mmu_zap_root ran on it (oracle)
    ROOT_SEQ = 13  # roots: creation number; the list is walked newest first


class Sched:
    """Controlled-scheduling words (offsets inside the sched region; see
    harness/sched/turns.py).  Only the worker holding the turn writes them."""

    STEP = 0  # shared accesses (scheduling points) so far, published at each hand-over
    DONE = 1  # bit per worker that has exited
    LOG_N = 2  # switch points recorded
    LOG_LOST = 3  # switch points that did not fit in the log
    LOW = 4  # pct: the next demoted priority, counting down
    EXHAUSTED = 5  # 1 + worker that hit the step cap (a livelock under this schedule)
    TURNS = 8  # one turn word per worker (futex)
    PRIO = TURNS + 64  # pct: priority per worker; random: parked until step (biased by 1 << 32)
    LOG = PRIO + 64  # switch points: (worker | op << 8, access | to << 32) pairs
    LOG_ENTRY_WORDS = 2


@dataclass(frozen=True)
class Layout:
    """Word indices of every region, computed from the sizes."""

    n_slots: int
    n_pages: int
    control: int
    globals: int
    roots: int
    shadow: int
    # the memslots' per-gfn arrays, every slot's packed after the previous one's and
    # indexed by stress.model.kvm.slot_index (n_gfns: their frames, not the guest's width)
    host_gens: int  # one byte per gfn: generation of the VMM's (shared) page backing it
    gmem_gens: int  # one byte per gfn: generation of its guest_memfd (private) page
    attrs: int  # one bit per gfn: KVM_MEMORY_ATTRIBUTE_PRIVATE
    lpage_info: int  # one word per 2 MiB region: lpage_info[PG_LEVEL_2M] (see host.py)
    dirty: int  # one word per gfn: D bits set (low 32) and propagated (high 32)
    accepted: int  # one word per gfn: 1 + the host page generation the TD guest accepted
    tlb: int  # per-vCPU requests, mode and TLB, field-major (see tlb_* below)
    traces: int  # per process: a ring of trace_entries events of TRACE_EVENT_WORDS
    trace_entries: int
    slots: int
    sched: int
    sched_log: int  # capacity of the switch-point log
    sp_meta: int
    bitmap: int
    bitmap_words: int
    pages: int
    prov: int  # oracle: one word per SPTE, parallel to pages: who installed it, when
    nwords: int

    @classmethod
    def build(cls, n_slots: int, n_pages: int, n_gfns: int = 0,
              trace_entries: int = 0, sched_log: int = 0) -> Layout:
        control = HEADER_WORDS
        glob = control + Control.WORDS
        roots = glob + Globals.WORDS
        shadow = roots + MAX_ROOTS
        host_gens = shadow + MAX_SHADOW_PAGES * SHADOW_SP_WORDS
        gmem_gens = host_gens + (n_gfns + 7) // 8
        attrs = gmem_gens + (n_gfns + 7) // 8
        lpage_info = attrs + (n_gfns + 63) // 64
        dirty = lpage_info + (n_gfns + 511) // 512
        accepted = dirty + n_gfns
        tlb = accepted + n_gfns
        traces = tlb + n_slots * (TLB_HDR_WORDS + TLB_ENTRIES * (3 + TLB_MAX_LEVELS))
        slots = traces + n_slots * trace_entries * TRACE_EVENT_WORDS
        sched = slots + n_slots * WORKER_SLOT_WORDS
        sp_meta = sched + Sched.LOG + sched_log * Sched.LOG_ENTRY_WORDS
        bitmap = sp_meta + n_pages * SP_META_WORDS
        bitmap_words = (n_pages + 63) // 64
        pages = bitmap + bitmap_words
        pages = (pages + WORDS_PER_PAGE - 1) // WORDS_PER_PAGE * WORDS_PER_PAGE  # 4 KiB aligned
        prov = pages + n_pages * WORDS_PER_PAGE
        nwords = prov + n_pages * WORDS_PER_PAGE
        return cls(n_slots, n_pages, control, glob, roots, shadow, host_gens, gmem_gens, attrs,
                   lpage_info, dirty, accepted, tlb, traces, trace_entries, slots, sched,
                   sched_log, sp_meta, bitmap, bitmap_words, pages, prov, nwords)

    def ctl(self, off: int) -> int:
        return self.control + off

    def glob(self, off: int) -> int:
        return self.globals + off

    def root_slot(self, i: int) -> int:
        """Word of slot ``i`` of the roots list: 0 empty, else 1 + root page."""
        return self.roots + i

    def trace_ring(self, worker: int) -> int:
        return self.traces + worker * self.trace_entries * TRACE_EVENT_WORDS

    # per-vCPU TLBs, field-major so one native scan covers every vCPU: headers,
    # then the tags (gfn + 1, 0 empty), pfns, flags and walked tables (page + 1)
    def tlb_hdr(self, vcpu: int, off: int) -> int:
        return self.tlb + vcpu * TLB_HDR_WORDS + off

    @property
    def tlb_tags(self) -> int:
        return self.tlb + self.n_slots * TLB_HDR_WORDS

    @property
    def tlb_pfns(self) -> int:
        return self.tlb_tags + self.n_slots * TLB_ENTRIES

    @property
    def tlb_flags(self) -> int:
        return self.tlb_pfns + self.n_slots * TLB_ENTRIES

    @property
    def tlb_pts(self) -> int:
        return self.tlb_flags + self.n_slots * TLB_ENTRIES

    def shadow_sp(self, sp: int, off: int) -> int:
        """Word ``off`` of indirect shadow page ``sp`` (see model/unsync.py)."""
        return self.shadow + sp * SHADOW_SP_WORDS + off

    def slot(self, worker: int, off: int) -> int:
        return self.slots + worker * WORKER_SLOT_WORDS + off

    def sp(self, page: int, off: int) -> int:
        return self.sp_meta + page * SP_META_WORDS + off

    def spt(self, page: int) -> int:
        """Word index of entry 0 of page-table page ``page``."""
        return self.pages + page * WORDS_PER_PAGE


class Arena:
    """One run's segment: created and unlinked by the supervisor only."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: Layout, owner: bool) -> None:
        self.shm = shm
        self.layout = layout
        self.owner = owner
        self.name = shm.name

    @classmethod
    def create(cls, layout: Layout, config_hash: int) -> Arena:
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            with warnings.catch_warnings():  # "resource_tracker: process died unexpectedly"
                warnings.simplefilter("ignore", UserWarning)
                shm = shared_memory.SharedMemory(name=name, create=True, size=layout.nwords * 8)
        except OSError as e:
            raise ArenaError(f"cannot create shared memory segment {name}: {e}") from e
        _CREATED.add(shm.name)
        hdr = struct.pack("<5Q", MAGIC, LAYOUT_VERSION, config_hash, os.getpid(), layout.nwords)
        shm.buf[: len(hdr)] = hdr
        return cls(shm, layout, owner=True)

    @staticmethod
    def read_header(name: str) -> tuple[int, int, int, int, int]:
        """Attach by name just long enough to read the header (never unlinks)."""
        shm = shared_memory.SharedMemory(name=name, create=False)
        try:
            if shm.size < HEADER_WORDS * 8:
                raise ArenaError(f"segment {name} is too small to hold a tdp-stress header")
            return struct.unpack_from("<5Q", shm.buf, 0)
        finally:
            shm.close()
            _untrack(shm)

    @classmethod
    def attach(cls, name: str, layout: Layout, config_hash: int | None = None) -> Arena:
        """Attach to an existing segment, refusing a foreign or stale layout."""
        magic, version, chash, _owner, nwords = cls.read_header(name)
        if magic != MAGIC:
            raise ArenaError(f"segment {name}: bad magic {magic:#x} (not a tdp-stress arena)")
        if version != LAYOUT_VERSION:
            raise ArenaError(f"segment {name}: layout version {version}, expected {LAYOUT_VERSION}")
        if config_hash is not None and chash != config_hash:
            raise ArenaError(f"segment {name}: config hash {chash:#x} != {config_hash:#x}")
        if nwords != layout.nwords:
            raise ArenaError(f"segment {name}: {nwords} words, layout expects {layout.nwords}")
        shm = shared_memory.SharedMemory(name=name, create=False)
        _untrack(shm)
        return cls(shm, layout, owner=False)

    def close(self) -> None:
        """Unmap; the owner also unlinks.  Idempotent."""
        if self.shm is None:
            return
        shm, self.shm = self.shm, None
        try:
            shm.close()
        finally:
            if self.owner:
                _CREATED.discard(shm.name)
                try:
                    _unlink(shm)
                except FileNotFoundError:
                    pass


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def list_segments() -> list[str]:
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX))
    except FileNotFoundError:
        return []


def sweep_stale() -> list[tuple[str, str]]:
    """Remove ``tdpstress-`` segments whose owner is dead; return (name, why) removed.

    A segment with a live owner is left alone, whoever that owner is.
    """
    removed = []
    for name in list_segments():
        path = SHM_DIR / name
        m = re.match(rf"{PREFIX}(\d+)-", name)
        if m and pid_alive(int(m.group(1))):
            continue  # its creator still runs (it may not have written the header yet)
        try:
            with open(path, "rb") as f:
                raw = f.read(HEADER_WORDS * 8)
        except OSError:
            continue
        why = None
        if len(raw) < 5 * 8:
            why = "truncated header"
        else:
            magic, _v, _h, owner, _n = struct.unpack_from("<5Q", raw, 0)
            if magic != MAGIC:
                why = "bad magic"
            elif not pid_alive(owner):
                why = f"owner pid {owner} is dead"
        if why is None:
            continue
        try:
            path.unlink()
            removed.append((name, why))
        except FileNotFoundError:
            pass
    return removed
