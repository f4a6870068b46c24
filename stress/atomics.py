"""The one chokepoint for shared words.

Every read and write of shared memory by the model and the harness goes through
a :class:`Words` object: protocol code never touches the raw buffer.  That is
where delay injection lives (:class:`DelayInjectingWords`), and where tracing
and controlled scheduling hook in later, without the model knowing.

Words are 64-bit and addressed by index into the segment (word ``i`` is bytes
``8*i .. 8*i+7``), so Python passes ``(base, i)`` across the FFI and never
builds a pointer object in the hot path.  Ordering is sequentially consistent
for read-modify-writes, acquire for loads and release for stores, exactly as
the native layer documents.
"""

from __future__ import annotations

import os
import random
import time
from typing import Protocol

from stress._atomics import ffi, lib

__all__ = ["Words", "DelayInjectingWords", "ScheduledWords", "LockAborted", "WalkParams",
           "ffi", "lib"]

RW_WRITER = 1 << 63
RW_WAITING = 1 << 62
RW_QUEUED = 1 << 32  # one task waiting for the lock (bits 32-47 count them)
RW_QUEUED_MASK = 0xFFFF << 32
RW_READERS = 0xFFFFFFFF
# a controlled run's task clock: each of a task's own shared accesses is this
# many ns of its run time (the model's speed: a Python access and the work
# around it; see Words.task_clock_ns)
ACCESS_NS = 1000

# Words.tdp_walk: statuses (TS_WALK_*) and the output list's fields (TS_WO_*)
WALK_DONE = 0  # stopped at stop_level, or at an entry that is not a present non-leaf
WALK_STEP_DOWN_FAILED = 1  # the re-read in try_step_down found no child table any more
WALK_POISON = 2  # the entry read was POISON: the table was freed
WALK_GEN_MOVED = 3  # the table's generation moved since the walker entered it
WALK_CHILD_OUTSIDE_POOL = 4  # a present non-leaf points outside the page pool
WALK_CHILD_MISMATCH = 5  # ... at a FREE page, or a table of the wrong level or gfn
WALK_BAD_ROOT = 6  # the root's role.level is not 1..MAX_ROOT_LEVEL: no walk (WO_LEVEL has it)
MAX_ROOT_LEVEL = 5  # PT64_ROOT_MAX_LEVEL
(WO_LEVEL, WO_SPTEP, WO_OLD_SPTE, WO_ROOT_ROLE, WO_LOADS, WO_CHILD, WO_CHILD_STATE,
 WO_CHILD_LEVEL, WO_CHILD_BASE, WO_STATUS) = range(10)
WO_PT, WO_GEN, WO_WORDS = 10, 16, 22  # table / generation of level l at WO_PT + l, WO_GEN + l
# the most loads one tdp_walk makes (5 levels): a stall due within fewer accesses
# than this cannot be placed inside a native walk (see DelayInjectingWords)
WALK_MAX_LOADS = 2 + 5 * 8 + 2


class WalkParams:
    """What :meth:`Words.tdp_walk` needs to know of the layout and the SPTE encoding,
    built once per process (the model's constants stay the single source)."""

    __slots__ = ("sp_meta", "sp_meta_words", "pages", "n_pages", "off_state", "off_role",
                 "off_gfn", "off_gen", "state_free", "poison", "present", "large", "pfn_mask",
                 "level_mask", "sp_pfn_base", "c")

    def __init__(self, sp_meta: int, sp_meta_words: int, pages: int, n_pages: int,
                 off_state: int, off_role: int, off_gfn: int, off_gen: int, state_free: int,
                 poison: int, present: int, large: int, pfn_mask: int, level_mask: int,
                 sp_pfn_base: int) -> None:
        vals = (sp_meta, sp_meta_words, pages, n_pages, off_state, off_role, off_gfn, off_gen,
                state_free, poison, present, large, pfn_mask, level_mask, sp_pfn_base)
        for name, v in zip(self.__slots__, vals, strict=False):
            setattr(self, name, v)
        self.c = ffi.new("uint64_t[]", list(vals))  # TS_WP_* order


class LockAborted(Exception):
    """A spin wait gave up because the run's abort word was set."""


# compound helpers and the single-word primitives their step-by-step versions use:
# a subclass that hooks one of those primitives gets the step-by-step version
# (``<name>_stepwise``) unless it overrides the helper itself
_COMPOUND_PRIMITIVES: dict[str, tuple[str, ...]] = {
    "tdp_walk": ("load",),
    "read_lock_rec": ("read_lock", "store", "trace"),
    "read_unlock_rec": ("trace", "store", "read_unlock"),
    "xchg_from": ("load", "xchg"),
}
MASK64 = (1 << 64) - 1


class Words:
    """Atomic access to the 64-bit words of one shared buffer.

    Compound helpers (one native call for a sequence of accesses the protocol
    defines) each have a pure-Python ``<name>_stepwise`` twin built from the
    single-word methods, with the same contract and the same accesses in the
    same order.  A subclass that overrides a primitive a helper is built from
    (to inject delays, to schedule, to trigger an interleaving) automatically
    runs the step-by-step twin, so its hook sees every access; it may override
    the helper itself to decide (see :class:`DelayInjectingWords`).
    """

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        for name, prims in _COMPOUND_PRIMITIVES.items():
            if getattr(cls, name) is getattr(Words, name) and any(
                    getattr(cls, p) is not getattr(Words, p) for p in prims):
                setattr(cls, name, getattr(Words, name + "_stepwise"))

    def __init__(self, buf: memoryview, abort_i: int = 0) -> None:
        self._cbuf = ffi.from_buffer("uint64_t[]", buf)
        self.base = self._cbuf
        self.nwords = len(buf) // 8
        self.abort_i = abort_i
        # process-private scratch for the compound helpers
        self._idx = ffi.new("uint32_t[]", 4096)
        self._val = ffi.new("uint64_t[]", 4096)
        self._walk_out = ffi.new("uint64_t[]", WO_WORDS)
        self._trace_args: tuple[int, int, int, int, int] | None = None
        # the same for the native helpers: enabled, ring, mask, head, seq, worker << 16
        self._tc = ffi.new("uint64_t[]", 6)
        # task_clock_ns() when this task last slept or yielded its CPU (the
        # scheduler's view of it: model/sched.py)
        self.scheduled_at = self.task_clock_ns()

    def check_abort(self, what: str) -> None:
        """Leave an unbounded wait or retry loop when the run is being torn down:
        raise LockAborted(what) if the abort word is set.  The harness's exit,
        not the kernel's (its lock waits check the same word natively)."""
        if self.load(self.abort_i):
            raise LockAborted(what)

    # -- tracing -----------------------------------------------------------------
    def enable_trace(self, ring_i: int, entries: int, head_i: int, seq_i: int,
                     worker: int) -> None:
        """Record events into this process's ring (``entries`` a power of two)."""
        self._trace_args = (ring_i, entries - 1, head_i, seq_i, worker << 16)
        for k, v in enumerate((1, *self._trace_args)):
            self._tc[k] = v

    def disable_trace(self) -> None:
        """No more events from this process (the native helpers' copy too)."""
        self._trace_args = None
        self._tc[0] = 0

    def trace(self, kind: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        """Append one event (see model/events.py); a no-op unless enabled."""
        if self._trace_args is not None:
            lib.ts_trace_cfg(self.base, self._tc, kind, a & MASK64, b & MASK64, c & MASK64)

    def release(self) -> None:
        """Drop the buffer export so the segment can be closed."""
        if self._cbuf is not None:
            ffi.release(self._cbuf)
            self._cbuf = None
            self.base = None

    # -- single-word atomics -------------------------------------------------
    def load(self, i: int) -> int:
        return lib.ts_load(self.base, i)

    def store(self, i: int, v: int) -> None:
        lib.ts_store(self.base, i, v)

    def cmpxchg(self, i: int, old: int, new: int) -> int:
        """Return the value found: ``== old`` means the exchange happened."""
        return lib.ts_cmpxchg(self.base, i, old, new)

    def xchg(self, i: int, v: int) -> int:
        return lib.ts_xchg(self.base, i, v)

    def fetch_add(self, i: int, v: int) -> int:
        return lib.ts_fetch_add(self.base, i, v & 0xFFFFFFFFFFFFFFFF)

    def fetch_and(self, i: int, v: int) -> int:
        return lib.ts_fetch_and(self.base, i, v)

    def fetch_or(self, i: int, v: int) -> int:
        return lib.ts_fetch_or(self.base, i, v)

    def spin_ns(self, ns: int) -> None:
        """Busy-wait: models a latency (an IPI, a SEAMCALL) without giving up the CPU."""
        if ns > 0:
            lib.ts_spin_ns(ns)

    def relax(self) -> None:
        """cpu_relax() in a wait for another task (a retried fault, a BUSY
        SEAMCALL): nothing in a free run, a hand-over in a controlled one."""

    def pause(self, seconds: float) -> None:
        """A modelled sleep (a halt, a role's interval): the task is scheduled out."""
        if seconds > 0:
            time.sleep(seconds)
            self.scheduled_at = self.task_clock_ns()

    def sched_yield(self) -> None:
        """schedule() from a running task (cond_resched's preempt_schedule_common):
        the CPU goes to another task, if one is runnable."""
        os.sched_yield()
        self.scheduled_at = self.task_clock_ns()

    def task_clock_ns(self) -> int:
        """This task's clock for the scheduler (its timeslice): CLOCK_MONOTONIC
        in a free run (process-local: no shared access)."""
        return lib.ts_now_ns()

    # -- locks -----------------------------------------------------------------
    def read_lock(self, lock_i: int) -> None:
        if lib.ts_read_lock(self.base, lock_i, self.abort_i):
            raise LockAborted("read_lock")

    def read_unlock(self, lock_i: int) -> None:
        lib.ts_read_unlock(self.base, lock_i)

    def write_lock(self, lock_i: int, owner_i: int, pid: int) -> None:
        if lib.ts_write_lock(self.base, lock_i, owner_i, pid, self.abort_i):
            raise LockAborted("write_lock")

    def write_trylock(self, lock_i: int, owner_i: int, pid: int) -> bool:
        return lib.ts_write_trylock(self.base, lock_i, owner_i, pid) == 0

    def read_trylock(self, lock_i: int) -> bool:
        return lib.ts_read_trylock(self.base, lock_i) == 0

    def write_unlock(self, lock_i: int, owner_i: int) -> None:
        lib.ts_write_unlock(self.base, lock_i, owner_i)

    def rwlock_contended(self, lock_i: int) -> bool:
        return bool(lib.ts_rwlock_contended(self.base, lock_i))

    def spin_lock(self, i: int, pid: int) -> None:
        if lib.ts_spin_lock(self.base, i, pid, self.abort_i):
            raise LockAborted("spin_lock")

    def spin_trylock(self, i: int, pid: int) -> bool:
        return lib.ts_spin_trylock(self.base, i, pid) == 0

    def spin_unlock(self, i: int) -> None:
        lib.ts_spin_unlock(self.base, i)

    # -- compound helpers (one FFI crossing for a loop the protocol defines) ---
    def read_lock_rec(self, lock_i: int, mode_i: int, mode: int, kind: int, a: int) -> None:
        """``read_lock(lock_i)``, then ``store(mode_i, mode)`` and ``trace(kind, a)``:
        a read lock with the holder's record of it (lockdep, the trace), in one call."""
        if lib.ts_read_lock_rec(self.base, lock_i, self.abort_i, mode_i, mode, self._tc,
                                kind, a):
            raise LockAborted("read_lock")

    def read_lock_rec_stepwise(self, lock_i: int, mode_i: int, mode: int, kind: int,
                               a: int) -> None:
        self.read_lock(lock_i)
        self.store(mode_i, mode)
        self.trace(kind, a)

    def read_unlock_rec(self, lock_i: int, mode_i: int, mode: int, kind: int, a: int) -> None:
        """``trace(kind, a)``, ``store(mode_i, mode)``, then ``read_unlock(lock_i)``."""
        lib.ts_read_unlock_rec(self.base, lock_i, mode_i, mode, self._tc, kind, a)

    def read_unlock_rec_stepwise(self, lock_i: int, mode_i: int, mode: int, kind: int,
                                 a: int) -> None:
        self.trace(kind, a)
        self.store(mode_i, mode)
        self.read_unlock(lock_i)

    def xchg_from(self, dst_i: int, src_i: int) -> int:
        """``xchg(dst_i, load(src_i))``: publish a copy of one word in another with a
        full barrier after it; returns dst's old value."""
        return lib.ts_xchg_from(self.base, dst_i, src_i)

    def xchg_from_stepwise(self, dst_i: int, src_i: int) -> int:
        return self.xchg(dst_i, self.load(src_i))

    def fill(self, start: int, n: int, v: int) -> None:
        lib.ts_fill(self.base, start, n, v)

    def bitmap_alloc(self, bm_i: int, nwords: int, start_word: int) -> int:
        return lib.ts_bitmap_alloc(self.base, bm_i, nwords, start_word)

    def popcount(self, start: int, n: int) -> int:
        return lib.ts_popcount_range(self.base, start, n)

    def count_equal(self, start: int, n: int, v: int) -> int:
        return lib.ts_count_equal(self.base, start, n, v)

    def find_mask(self, start: int, n: int, mask: int) -> int:
        return lib.ts_find_mask(self.base, start, n, mask)

    def freeze_children(
        self, start: int, n: int, frozen: int, present_mask: int, freeze_nonpresent: bool
    ) -> list[tuple[int, int]]:
        """xchg every entry to ``frozen`` (see native ts_freeze_children).

        Returns ``(index, old)`` for each entry that held a present value.
        """
        k = lib.ts_freeze_children(
            self.base, start, n, frozen, present_mask, int(freeze_nonpresent),
            self.abort_i, self._idx, self._val,
        )
        if k < 0:
            raise LockAborted("freeze_children")
        return [(self._idx[j], self._val[j]) for j in range(k)]

    SCAN_CHUNK = 4096  # the out arrays' size: a scan of more words goes in chunks

    def scan_ne(self, start: int, n: int, v: int) -> list[tuple[int, int]]:
        """``(index, value)`` of every word in the range that is not ``v``."""
        if n > self.SCAN_CHUNK:
            out: list[tuple[int, int]] = []
            for off in range(0, n, self.SCAN_CHUNK):
                out.extend((off + i, x) for i, x in
                           self.scan_ne(start + off, min(self.SCAN_CHUNK, n - off), v))
            return out
        k = lib.ts_scan_ne(self.base, start, n, v, self._idx, self._val)
        return [(self._idx[j], self._val[j]) for j in range(k)]


    def tdp_walk(self, wp: WalkParams, root: int, gfn: int, level: int,
                 stop_level: int) -> list[int]:
        """The TDP iterator's walk for one gfn, in one native call (ts_tdp_walk).

        tdp_iter_start on ``root`` at ``level`` (0: the root's own role.level, as
        the kernel's; read the root's role and generation, then the entry
        covering ``gfn``), then try_step_down while
        the entry is a present non-leaf above ``stop_level``.  A root level
        outside 1..MAX_ROOT_LEVEL is WALK_BAD_ROOT, with no further load.  Every
        entry read
        is checked as TdpIter.read_spte does (not POISON, the table's
        generation unchanged since the walk entered it), and every child as
        try_step_down does (inside the pool, not FREE, one level down, the
        right base gfn).  The walk stops at the first failed check.

        Returns a list of WO_WORDS ints: the status (``WALK_*``) at WO_STATUS,
        where the walk stopped (WO_LEVEL, WO_SPTEP, and WO_OLD_SPTE, the last
        value read there), the root's role, the loads made (WO_LOADS), the
        child that failed its check, and per level ``l`` the table and its
        generation recorded on entry at WO_PT + l and WO_GEN + l (0 below the
        stop).  Caller: in an RCU read-side section.
        """
        lib.ts_tdp_walk(self.base, wp.c, root, gfn, level, stop_level, self._walk_out)
        return ffi.unpack(self._walk_out, WO_WORDS)

    def tdp_walk_stepwise(self, wp: WalkParams, root: int, gfn: int, level: int,
                          stop_level: int) -> list[int]:
        """:meth:`tdp_walk` one ``load`` at a time (the reference version)."""
        out = [0] * WO_WORDS
        load = self.load
        meta, mw = wp.sp_meta, wp.sp_meta_words
        out[WO_ROOT_ROLE] = role = load(meta + root * mw + wp.off_role)
        if level <= 0:
            level = role & wp.level_mask  # tdp_iter_start: root->role.level
        if not 1 <= level <= MAX_ROOT_LEVEL:
            out[WO_LEVEL], out[WO_LOADS], out[WO_STATUS] = level, 1, WALK_BAD_ROOT
            return out
        out[WO_PT + level] = root
        out[WO_GEN + level] = load(meta + root * mw + wp.off_gen)
        loads, status = 2, WALK_DONE

        def read_spte_checked(sptep: int, gen_i: int, gen: int) -> tuple[int, int, int]:
            """(value, status, loads made): the entry, its poison and generation checks."""
            v = load(sptep)
            if v == wp.poison:
                return v, WALK_POISON, 1
            return v, WALK_GEN_MOVED if load(gen_i) != gen else WALK_DONE, 2

        while True:
            table = out[WO_PT + level]
            sptep = wp.pages + table * 512 + ((gfn >> (9 * (level - 1))) & 511)
            gen_i = meta + table * mw + wp.off_gen
            v, status, n = read_spte_checked(sptep, gen_i, out[WO_GEN + level])
            loads += n
            if status != WALK_DONE:
                break
            if level <= stop_level or not v & wp.present or level == 1 or v & wp.large:
                break
            # try_step_down re-reads the entry
            v, status, n = read_spte_checked(sptep, gen_i, out[WO_GEN + level])
            loads += n
            if status != WALK_DONE:
                break
            if not v & wp.present or v & wp.large:
                status = WALK_STEP_DOWN_FAILED
                break
            pfn = (v & wp.pfn_mask) >> 12  # spte_to_child_pt: sp_pfn's inverse
            off = pfn - wp.sp_pfn_base
            child = 1 << 62 if off < 0 or off & 511 else off >> 9
            out[WO_CHILD] = child
            if child >= wp.n_pages:
                status = WALK_CHILD_OUTSIDE_POOL
                break
            m = meta + child * mw
            g = load(m + wp.off_gen)
            st = load(m + wp.off_state)
            lv = load(m + wp.off_role) & wp.level_mask
            base = load(m + wp.off_gfn)
            loads += 4
            if (st == wp.state_free or lv != level - 1
                    or base != gfn & -(1 << (9 * (level - 1)))):
                out[WO_CHILD_STATE], out[WO_CHILD_LEVEL], out[WO_CHILD_BASE] = st, lv, base
                status = WALK_CHILD_MISMATCH
                break
            level -= 1
            out[WO_PT + level] = child
            out[WO_GEN + level] = g
        out[WO_LEVEL], out[WO_SPTEP], out[WO_OLD_SPTE] = level, sptep, v
        out[WO_LOADS], out[WO_STATUS] = loads, status
        return out


class DelayInjectingWords(Words):
    """:class:`Words` that now and then stalls after a shared access.

    The model's race windows are a few microseconds of Python; a stall after a
    random access (a busy spin of up to ``max_ns``, or giving the CPU away)
    stretches one of them, so rare interleavings become common.  A countdown
    drawn from the worker's seeded RNG keeps the cost to one decrement per
    access when no stall is due.
    """

    def __init__(
        self, buf: memoryview, abort_i: int, rng: random.Random, every: int, max_ns: int
    ) -> None:
        super().__init__(buf, abort_i)
        self._rng = rng
        self._every = max(1, every)
        self._max_ns = max_ns
        self._countdown = rng.randint(1, 2 * self._every)
        self.delays = 0

    def _tick(self) -> None:
        self._countdown -= 1
        if self._countdown <= 0:
            self._countdown = self._rng.randint(1, 2 * self._every)
            self.delays += 1
            if self._rng.random() < 0.25:
                os.sched_yield()
            else:
                lib.ts_spin_ns(self._rng.randint(0, self._max_ns))

    def load(self, i: int) -> int:
        v = lib.ts_load(self.base, i)
        self._tick()
        return v

    def cmpxchg(self, i: int, old: int, new: int) -> int:
        v = lib.ts_cmpxchg(self.base, i, old, new)
        self._tick()
        return v

    def xchg(self, i: int, v: int) -> int:
        r = lib.ts_xchg(self.base, i, v)
        self._tick()
        return r

    def store(self, i: int, v: int) -> None:
        lib.ts_store(self.base, i, v)
        self._tick()

    def tdp_walk(self, wp: WalkParams, root: int, gfn: int, level: int,
                 stop_level: int) -> list[int]:
        """Native when no stall falls due inside the walk (the countdown outlasts
        its loads), so stalls land after exactly the same accesses as with the
        step-by-step walk, which runs otherwise."""
        if self._countdown > WALK_MAX_LOADS:
            out = Words.tdp_walk(self, wp, root, gfn, level, stop_level)
            self._countdown -= out[WO_LOADS]
            return out
        return self.tdp_walk_stepwise(wp, root, gfn, level, stop_level)

    # the other compound helpers likewise: native unless a stall falls due inside
    def read_lock_rec(self, lock_i: int, mode_i: int, mode: int, kind: int, a: int) -> None:
        if self._countdown > 1:  # one store
            Words.read_lock_rec(self, lock_i, mode_i, mode, kind, a)
            self._countdown -= 1
        else:
            self.read_lock_rec_stepwise(lock_i, mode_i, mode, kind, a)

    def read_unlock_rec(self, lock_i: int, mode_i: int, mode: int, kind: int, a: int) -> None:
        if self._countdown > 1:
            Words.read_unlock_rec(self, lock_i, mode_i, mode, kind, a)
            self._countdown -= 1
        else:
            self.read_unlock_rec_stepwise(lock_i, mode_i, mode, kind, a)

    def xchg_from(self, dst_i: int, src_i: int) -> int:
        if self._countdown > 2:  # a load and an xchg
            self._countdown -= 2
            return Words.xchg_from(self, dst_i, src_i)
        return self.xchg_from_stepwise(dst_i, src_i)


class Scheduler(Protocol):
    abort_hook: object
    ran: int  # the worker's own scheduling points so far (its task clock)

    def point(self) -> None: ...
    def window(self) -> None: ...
    def relax(self) -> None: ...
    def pause(self) -> None: ...


def _no_point() -> None:
    pass


def _raise_aborted() -> None:
    raise LockAborted("the controlled run was aborted")


class ScheduledWords(Words):
    """:class:`Words` whose every access is a scheduling point (controlled runs).

    Before each access the worker asks its scheduler (harness/sched/turns.py)
    whether to keep the turn; only the turn holder runs, so each access, and
    each sequence of native calls without a point between them, is atomic with
    respect to the other workers.  A lock another worker holds can only be
    released if the waiter lets it run: every lock is a try-loop that relaxes
    on failure, and the compound helpers that wait (the freeze of a removed
    table's children) become per-entry loops with a point per entry.  Modelled
    latencies are not slept: time is not part of a controlled run.
    """

    def __init__(self, buf: memoryview, abort_i: int, sched: Scheduler) -> None:
        self._sched = sched  # first: the base class reads the task clock
        super().__init__(buf, abort_i)
        self._point = _no_point  # set up (build_kvm) runs before the turns start
        self._window = _no_point
        sched.abort_hook = self._aborted

    def _aborted(self) -> None:
        """The run was aborted while this worker waited for its turn: it unwinds
        (finally blocks unlock, put roots) without the turn, so it must neither
        trace nor touch shared words any more."""
        self.disable_trace()
        self._point = self._window = _raise_aborted

    def activate(self) -> None:
        """From now on every access waits for this worker's turn."""
        self._point = self._sched.point
        self._window = self._sched.window

    def load(self, i: int) -> int:
        self._point()
        return lib.ts_load(self.base, i)

    def store(self, i: int, v: int) -> None:
        self._point()
        lib.ts_store(self.base, i, v)

    def cmpxchg(self, i: int, old: int, new: int) -> int:
        self._point()
        return lib.ts_cmpxchg(self.base, i, old, new)

    def xchg(self, i: int, v: int) -> int:
        self._point()
        return lib.ts_xchg(self.base, i, v)

    def fetch_add(self, i: int, v: int) -> int:
        self._point()
        return lib.ts_fetch_add(self.base, i, v & 0xFFFFFFFFFFFFFFFF)

    def fetch_and(self, i: int, v: int) -> int:
        self._point()
        return lib.ts_fetch_and(self.base, i, v)

    def fetch_or(self, i: int, v: int) -> int:
        self._point()
        return lib.ts_fetch_or(self.base, i, v)

    def spin_ns(self, ns: int) -> None:
        """Not slept: a latency is where another task gets in, so it is a
        scheduling point the policies preempt at more often."""
        if ns > 0:
            self._window()

    def relax(self) -> None:
        self._sched.relax()

    def pause(self, seconds: float) -> None:
        self._sched.pause()
        self.scheduled_at = self.task_clock_ns()

    def sched_yield(self) -> None:
        """schedule(): one forced hand-over of the turn (as a modelled sleep)."""
        self._sched.pause()
        self.scheduled_at = self.task_clock_ns()

    def task_clock_ns(self) -> int:
        """Not wall time: the worker's own shared accesses, ACCESS_NS each, so
        need_resched() comes at the same accesses in every replay."""
        return self._sched.ran * ACCESS_NS

    # -- locks: try-loops that hand the turn over while the lock is taken ------
    def read_lock(self, lock_i: int) -> None:
        """ts_read_lock's loop, one attempt per turn: a reader that has to wait
        is counted in RW_QUEUED, so the holder's rwlock_needbreak sees it."""
        b, queued = self.base, 0
        while True:
            self._point()
            v = lib.ts_load(b, lock_i)
            if not v & (RW_WRITER | RW_WAITING):
                if lib.ts_cmpxchg(b, lock_i, v, v + 1 - queued) == v:
                    return
                continue
            if not queued:
                lib.ts_fetch_add(b, lock_i, RW_QUEUED)
                queued = RW_QUEUED
            self._sched.relax()

    def write_lock(self, lock_i: int, owner_i: int, pid: int) -> None:
        """ts_write_lock's loop, one attempt per turn: a waiting writer sets
        RW_WAITING and is counted in RW_QUEUED, so holders' rwlock_needbreak
        sees it."""
        b, queued = self.base, 0
        while True:
            self._point()
            v = lib.ts_load(b, lock_i)
            if not v & RW_WRITER:
                if not v & RW_READERS:
                    nv = RW_WRITER | ((v & RW_QUEUED_MASK) - queued)
                    if lib.ts_cmpxchg(b, lock_i, v, nv) == v:
                        lib.ts_store(b, owner_i, pid)
                        return
                    continue
                if not v & RW_WAITING:
                    lib.ts_fetch_or(b, lock_i, RW_WAITING)
            if not queued:
                lib.ts_fetch_add(b, lock_i, RW_QUEUED)
                queued = RW_QUEUED
            self._sched.relax()

    def spin_lock(self, i: int, pid: int) -> None:
        while True:
            self._point()
            if lib.ts_spin_trylock(self.base, i, pid) == 0:
                return
            self._sched.relax()

    def read_unlock(self, lock_i: int) -> None:
        self._point()
        lib.ts_read_unlock(self.base, lock_i)

    def write_unlock(self, lock_i: int, owner_i: int) -> None:
        self._point()
        lib.ts_write_unlock(self.base, lock_i, owner_i)

    def write_trylock(self, lock_i: int, owner_i: int, pid: int) -> bool:
        self._point()
        return lib.ts_write_trylock(self.base, lock_i, owner_i, pid) == 0

    def read_trylock(self, lock_i: int) -> bool:
        self._point()
        return lib.ts_read_trylock(self.base, lock_i) == 0

    def rwlock_contended(self, lock_i: int) -> bool:
        self._point()
        return bool(lib.ts_rwlock_contended(self.base, lock_i))

    def spin_trylock(self, i: int, pid: int) -> bool:
        self._point()
        return lib.ts_spin_trylock(self.base, i, pid) == 0

    def spin_unlock(self, i: int) -> None:
        self._point()
        lib.ts_spin_unlock(self.base, i)

    # -- compound helpers: one point each, except the one that waits ----------
    def fill(self, start: int, n: int, v: int) -> None:
        self._point()
        lib.ts_fill(self.base, start, n, v)

    def bitmap_alloc(self, bm_i: int, nwords: int, start_word: int) -> int:
        self._point()
        return lib.ts_bitmap_alloc(self.base, bm_i, nwords, start_word)

    def popcount(self, start: int, n: int) -> int:
        self._point()
        return lib.ts_popcount_range(self.base, start, n)

    def count_equal(self, start: int, n: int, v: int) -> int:
        self._point()
        return lib.ts_count_equal(self.base, start, n, v)

    def find_mask(self, start: int, n: int, mask: int) -> int:
        self._point()
        return lib.ts_find_mask(self.base, start, n, mask)

    def scan_ne(self, start: int, n: int, v: int) -> list[tuple[int, int]]:
        self._point()
        return super().scan_ne(start, n, v)

    def freeze_children(
        self, start: int, n: int, frozen: int, present_mask: int, freeze_nonpresent: bool
    ) -> list[tuple[int, int]]:
        """ts_freeze_children entry by entry, a point before each atomic."""
        b, out = self.base, []
        for i in range(n):
            if freeze_nonpresent:
                while True:
                    self._point()
                    old = lib.ts_xchg(b, start + i, frozen)
                    if old != frozen:
                        break
                    self._sched.relax()  # another task's transient freeze
            else:
                self._point()
                old = lib.ts_load(b, start + i)
                if not old & present_mask:
                    continue
                self._point()
                old = lib.ts_xchg(b, start + i, frozen)
            if old & present_mask:
                out.append((i, old))
        return out
