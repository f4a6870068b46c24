"""The supervisor: creates the arena, forks the workers, watches them, checks
invariants at quiescence, and tears everything down on every exit path.

It is the only process that creates or unlinks the run's segment.  Exit
paths and what they leave behind:

* time is up: STOP, workers drain and exit, final quiescent check, RCU
  barrier, VM teardown, teardown check (no page may leak);
* a worker reports a violation: STOP, collect, no teardown checks;
* a worker dies or raises: ``crash``;
* workers do not park for a quiescent check in time: ``hang``;
* SIGINT / SIGTERM: ``interrupted``.

Whatever the path, workers are stopped (STOP, then ABORT so spinners give
up, then SIGTERM, then SIGKILL), joined, and the segment is unlinked before
``run`` returns.  Workers also die with the supervisor (PR_SET_PDEATHSIG).

The supervisor knows nothing of the CLI: it reports progress through a
callback and returns a :class:`RunOutcome`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import psutil

from stress.arena import (
    Arena,
    Control,
    Globals,
    Layout,
    Sched,
    Slot,
    SpMeta,
    deferred_signals,
    sweep_stale,
)
from stress.atomics import Words
from stress.config import Config
from stress.harness import sched
from stress.harness.trace import read_events
from stress.harness.workers import (
    STAT_NAMES,
    build_kvm,
    enable_nested,
    init_huge_pages,
    worker_main,
)
from stress.model.errors import InvariantViolation
from stress.model.host import init_mem_attributes
from stress.model.kvm import LOCK_NONE, Kvm
from stress.model.mmu_page import SP_REMOVED, tdp_mmu_free_sp_rcu_callback
from stress.model.td import tdx_td_finalize
from stress.model.tdp_mmu import kvm_mmu_uninit_tdp_mmu, kvm_tdp_mmu_alloc_mirror_root
from stress.oracles.liveness import rcu_stall
from stress.oracles.oops import kernel_oops
from stress.oracles.quiescent import QuiescentReport, quiescent_check, teardown_check

EXIT_CLEAN = 0
EXIT_VIOLATION = 1
EXIT_USAGE = 2
EXIT_CRASH = 3
EXIT_HANG = 4
EXIT_INTERRUPTED = 130

EXIT_CODES = {"clean": EXIT_CLEAN, "violation": EXIT_VIOLATION, "crash": EXIT_CRASH,
              "error": EXIT_CRASH, "leak": EXIT_CRASH, "hang": EXIT_HANG,
              "interrupted": EXIT_INTERRUPTED}

# A run ends within duration + OVERRUN_S whatever the workers do: the stop
# sequence (STOP, ABORT, SIGTERM, SIGKILL) and the final checks fit in it.
OVERRUN_S = 5.0
SCHED_LOG = 1 << 18  # switch points a controlled run can record (4 MiB)
STOP_GRACE_S = 1.5  # STOP -> ABORT
ABORT_GRACE_S = 0.5  # ABORT -> SIGTERM
TERM_GRACE_S = 0.5  # SIGTERM -> SIGKILL
RSS_BASELINE_AFTER_S = 2.0
POOL_AUTO_MAX = 65536


class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def pool_pages(cfg: Config) -> int:
    """Enough pages to map the whole guest twice over (tables pending RCU, and a
    root being torn down while its successor fills, need room too), on a TD four
    times over (the direct root, the mirror root and the S-EPT's copy of each mirror
    table can all map every gfn: a quiet phase lets the vCPUs map everything),
    capped; a fault that finds the pool empty retries."""
    if cfg.pool.pages:
        return cfg.pool.pages
    need = 1
    for level in range(1, cfg.guest.root_level):  # the tables of each level the slots need
        shift = 9 * level
        last = -1
        for base, npages in cfg.memslots:  # sorted: count each table once
            first, end = base >> shift, (base + npages - 1) >> shift
            need += end - max(first, last + 1) + 1 if end > last else 0
            last = max(last, end)
    copies = 4 if cfg.vm.type == "tdx" else 2
    return max(64, min(copies * need + 256, POOL_AUTO_MAX))


@dataclass
class WorkerRecord:
    index: int
    role: str
    pid: int = 0
    exitcode: int | None = None
    stats: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    done: bool = False
    max_rss: int = 0  # bytes, sampled with psutil while the run goes
    heap_start: int = 0  # anonymous memory (rss - shared) at the baseline sample
    heap_end: int = 0  # ... at the last sample


@dataclass
class RunOutcome:
    exit_reason: str
    duration_s: float
    workers: list[WorkerRecord]
    violations: list[dict[str, Any]]
    checks: dict[str, int]
    errors: list[str]
    pool_pages: int
    arena_name: str = ""
    hang: dict[str, Any] | None = None
    # the last protocol events of every worker, merged (violation, crash, hang)
    trace: list[dict[str, Any]] = field(default_factory=list)
    # controlled runs: the schedule that ran, in replay form (harness/sched/)
    schedule: dict[str, Any] | None = None
    # the engine that ran (the kernel engine: its tree, version, build, tracepoints)
    engine: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.exit_reason]


@dataclass
class StatusSnapshot:
    elapsed_s: float
    duration_s: float
    per_role: dict[str, Counter[str]]
    workers: dict[str, int]
    violations: int
    checks: int
    rss_bytes: int = 0  # all workers, last sample


class Supervisor:
    def __init__(self, cfg: Config,
                 on_status: Callable[[StatusSnapshot], None] | None = None,
                 status_interval: float = 0.5, hard_deadline: float | None = None) -> None:
        """``hard_deadline`` (time.monotonic): the run ends by then whatever
        happens; default duration + OVERRUN_S after the workers start."""
        self.cfg = cfg
        self.hard_deadline = hard_deadline
        self.on_status = on_status
        self.status_interval = status_interval
        self.roles = [role for role, n in cfg.workers.items() for _ in range(n)]
        self.n = len(self.roles)
        self.layout = Layout.build(n_slots=self.n + 1, n_pages=pool_pages(cfg),
                                   n_gfns=cfg.n_gfns,
                                   trace_entries=cfg.trace.entries if cfg.trace.enabled else 0,
                                   sched_log=SCHED_LOG if cfg.schedule.controlled else 0)
        self.controlled = cfg.schedule.controlled
        self.schedule: dict[str, Any] | None = None
        self.trace: list[dict[str, Any]] = []
        self.records = [WorkerRecord(i, r) for i, r in enumerate(self.roles)]
        self.violations: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.checks = Counter[str]()
        self.hang: dict[str, Any] | None = None
        self._seen_progress: dict[int, int] = {}  # _still_working's last look
        self.stacks_dir: str | None = None
        self.deadline = float("inf")
        self.rss_total = 0
        self.rss_baselined = False
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.ps: dict[int, psutil.Process] = {}
        self.conns: list[Connection | None] = []
        self.arena: Arena | None = None
        self.words: Words | None = None
        self.kvm: Kvm | None = None
        self.t_start = 0.0

    # -- setup -----------------------------------------------------------------
    def _stacks_file(self, i: int) -> str | None:
        return os.path.join(self.stacks_dir, f"worker-{i}.txt") if self.stacks_dir else None

    def _setup(self) -> None:
        sweep_stale()
        self.stacks_dir = tempfile.mkdtemp(prefix="tdpstress-stacks-")
        lay = self.layout
        with deferred_signals():  # no Ctrl-C between the segment's creation and its owner
            self.arena = Arena.create(lay, self.cfg.hash64())
        self.words = w = Words(self.arena.shm.buf, lay.ctl(Control.ABORT))
        w.fill(lay.bitmap, lay.bitmap_words, (1 << 64) - 1)
        tail = lay.n_pages % 64
        if tail:
            w.store(lay.bitmap + lay.bitmap_words - 1, (1 << tail) - 1)
        w.store(lay.glob(Globals.RCU_GP_CTR), 1)
        self.kvm = build_kvm(self.cfg, w, lay, me=self.n)
        init_mem_attributes(self.kvm)
        enable_nested(self.cfg, self.kvm)
        init_huge_pages(self.cfg, self.kvm)
        if self.kvm.geometry.tdx:
            kvm_tdp_mmu_alloc_mirror_root(self.kvm)  # KVM_TDX_INIT_VM: the TD is INITIALIZED
            if not self.cfg.tdx.init_mem_pages or not self.cfg.workers.get("vcpu"):
                tdx_td_finalize(self.kvm)  # no initial image to build: runnable at once
        if self.controlled:
            sched.init_region(w, lay, self.cfg.schedule, self.n)

    def _worker_entry(self, i: int, role: str, conn: Connection
                      ) -> tuple[Callable[..., None], tuple[Any, ...]]:
        """Worker ``i``'s entry point and its arguments (the engine's)."""
        return worker_main, (i, role, self.cfg, self.arena, conn, self._stacks_file(i),
                             os.getpid())

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("fork")
        sys.stdout.flush()
        sys.stderr.flush()
        for i, role in enumerate(self.roles):
            r, wconn = ctx.Pipe(duplex=False)
            target, args = self._worker_entry(i, role, wconn)
            p = ctx.Process(target=target, args=args, name=f"tdp-stress-{role}{i}")
            p.start()
            wconn.close()
            self.procs.append(p)
            self.conns.append(r)
            self.records[i].pid = p.pid or 0
            try:
                self.ps[i] = psutil.Process(p.pid)
            except psutil.Error:
                pass
        w, lay = self.words, self.layout
        assert w is not None
        w.store(lay.ctl(Control.START_NS), time.monotonic_ns())
        w.store(lay.ctl(Control.GO), 1)

    # -- messages ----------------------------------------------------------------
    def _drain(self) -> None:
        for i, c in enumerate(self.conns):
            while c is not None:
                try:
                    if not c.poll():
                        break
                    kind, payload = c.recv()
                except (EOFError, OSError):
                    c.close()
                    self.conns[i] = c = None
                    break
                rec = self.records[i]
                if kind == "violation":
                    payload.setdefault("pid", rec.pid)
                    self.violations.append(payload)
                elif kind == "error":
                    rec.error = payload
                    self.errors.append(f"worker {i} ({rec.role}, pid {rec.pid}) raised:\n"
                                       f"{payload}")
                elif kind == "done":
                    rec.done = True
                    rec.stats = payload["stats"]

    def _check_workers(self) -> str | None:
        """Reason to end the run from what the workers said or did, or None.

        Exit codes are read once, before the pipes are drained, so a worker that
        reported a violation and then exited is never mistaken for a crash.
        """
        exited = [i for i, p in enumerate(self.procs) if p.exitcode is not None]
        self._drain()
        if self.controlled:
            if self.words is not None and self.words.load(self.layout.sched + Sched.EXHAUSTED):
                self.hang = self._exhausted_report()
                return "hang"
            # a controlled run ends when its workers have spent the step budget
            exited = [i for i in exited
                      if not (self.records[i].done and self.procs[i].exitcode == 0)]
        if not self.violations and self.words is not None and self.words.load(
                self.layout.ctl(Control.VIOLATION)):
            # a worker has stopped the run for a violation: its report is on the way
            end = time.monotonic() + 1.0
            while not self.violations and time.monotonic() < end:
                time.sleep(0.01)
                self._drain()
        if self.violations:
            return "violation"
        if self.errors:
            return "crash"
        if exited:
            self.errors.extend(self._crash_message(i) for i in exited)
            return "crash"
        return None

    def _exhausted_report(self) -> dict[str, Any]:
        w, lay = self.words, self.layout
        assert w is not None
        who = w.load(lay.sched + Sched.EXHAUSTED) - 1
        return self._hang_report([who], "the controlled schedule livelocked: the worker "
                                 "was still running past 4 x schedule.max_steps + 100000 "
                                 "steps")

    def _crash_message(self, i: int) -> str:
        rec, p = self.records[i], self.procs[i]
        code = p.exitcode
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        elif code == 0:
            how = "exited before the run ended"
        else:
            how = f"exited with status {code}"
        return f"worker {i} ({rec.role}, pid {rec.pid}) {how}"

    # -- quiescence --------------------------------------------------------------
    def _pause_and_check(self, gen: int) -> str | None:
        """Park every worker, walk everything, resume.  Returns an exit reason or None."""
        w, lay = self.words, self.layout
        assert w is not None
        w.store(lay.ctl(Control.PARKED), 0)
        w.store(lay.ctl(Control.PAUSE_REQ), gen)
        deadline = min(time.monotonic() + self.cfg.run.watchdog, self.deadline - OVERRUN_S / 2)
        self._still_working([i for i, p in enumerate(self.procs) if p.exitcode is None])
        try:
            while True:
                waiting = [i for i, p in enumerate(self.procs) if p.exitcode is None
                           and w.load(lay.slot(i, Slot.PARKED_GEN)) != gen]
                if not waiting:
                    break
                reason = self._check_workers()
                if reason:
                    return reason
                if time.monotonic() > deadline:
                    if time.monotonic() > self.deadline - OVERRUN_S:
                        return "clean"  # the run's time is up: no check, no verdict
                    if self._still_working(waiting):  # slow, not stuck: wait on
                        deadline = min(time.monotonic() + self.cfg.run.watchdog,
                                       self.deadline - OVERRUN_S / 2)
                        continue
                    return self._stuck(waiting, "did not park for a quiescent check")
                time.sleep(0.001)
            rep = self._quiescent_report()
            self.checks["quiescent"] += 1
            return self._record_report(rep, "quiescent check")
        finally:
            w.store(lay.ctl(Control.PAUSE_REQ), 0)

    def _quiescent_report(self) -> QuiescentReport:
        """The quiescent walk, with every worker parked (the engine's)."""
        assert self.kvm is not None
        return quiescent_check(self.kvm)

    def _sample_rss(self, elapsed: float) -> str | None:
        """Sample every worker's memory; "leak" if a heap grew past the bound.

        The heap is rss - shared (anonymous memory): the arena's pages are
        shared memory and are excluded, so touching more page tables is not
        mistaken for a leak.
        """
        total = 0
        baseline = not self.rss_baselined and elapsed >= RSS_BASELINE_AFTER_S
        for i, proc in list(self.ps.items()):
            try:
                mi = proc.memory_info()
            except psutil.Error:
                del self.ps[i]
                continue
            rec = self.records[i]
            rec.max_rss = max(rec.max_rss, mi.rss)
            heap = mi.rss - mi.shared
            total += mi.rss
            if baseline or not rec.heap_start:
                rec.heap_start = heap
            rec.heap_end = heap
            bound = self.cfg.run.max_rss_growth
            if self.rss_baselined and bound and heap - rec.heap_start > bound:
                self.errors.append(
                    f"worker {i} ({rec.role}, pid {rec.pid}) leaks: heap grew from "
                    f"{rec.heap_start >> 20} MiB to {heap >> 20} MiB (bound "
                    f"{bound >> 20} MiB, run.max_rss_growth)")
                return "leak"
        self.rss_baselined = self.rss_baselined or baseline
        self.rss_total = total
        return None

    def _proc_info(self, i: int) -> dict[str, Any]:
        proc = self.ps.get(i)
        if proc is None:
            return {}
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                return {"status": proc.status(), "cpu_user_s": t.user, "cpu_system_s": t.system,
                        "rss": proc.memory_info().rss}
        except psutil.Error as e:
            return {"status": f"gone ({type(e).__name__})"}

    def _hang_report(self, stuck: list[int], what: str) -> dict[str, Any]:
        """Who is stuck, who holds mmu_lock, and every worker's Python stack."""
        w, lay = self.words, self.layout
        assert w is not None
        holders = {}
        for i in range(self.n):
            mode = w.load(lay.slot(i, Slot.LOCK_MODE))
            if mode != LOCK_NONE:
                holders[str(i)] = {"mode": "write" if mode == 2 else "read",
                                   "pid": self.records[i].pid, "role": self.records[i].role}
        for i, p in enumerate(self.procs):
            if p.exitcode is None:
                try:
                    os.kill(self.records[i].pid, signal.SIGUSR1)  # faulthandler dump
                except ProcessLookupError:
                    pass
        time.sleep(0.3)
        stacks = {}
        for i in range(self.n):
            path = self._stacks_file(i)
            try:
                with open(path or "") as f:
                    stacks[str(i)] = f.read()
            except OSError:
                pass
        owner = w.load(lay.glob(Globals.MMU_LOCK_OWNER))
        return {
            "what": what,
            "stuck": [{"worker": i, "role": self.records[i].role, "pid": self.records[i].pid,
                       "heartbeat": w.load(lay.slot(i, Slot.HEARTBEAT)),
                       **self._proc_info(i)} for i in stuck],
            "mmu_lock": f"{w.load(lay.glob(Globals.MMU_LOCK)):#x}",
            "mmu_lock_write_owner_pid": owner,
            "mmu_lock_write_owner_worker": next(
                (r.index for r in self.records if owner and r.pid == owner), None),
            "mmu_lock_holders": holders,
            "watchdog_s": self.cfg.run.watchdog,
            "stacks": stacks,
        }

    def _stuck(self, stuck: list[int], what: str) -> str:
        """Workers ``stuck`` (``what``): the hang report (stacks, mmu_lock holders),
        and the exit reason: a violation if the RCU stall oracle names one of them
        (inside an RCU read-side section), else a hang."""
        assert self.words is not None
        self.hang = self._hang_report(stuck, what)
        v = rcu_stall(self.words, self.layout, stuck, what)
        if v is None:
            return "hang"
        self._add_violation(v, "watchdog")
        return "violation"

    def _add_violation(self, v: InvariantViolation, found_by: str,
                       worker: str | None = None) -> None:
        """A violation the supervisor itself found (not a worker's report)."""
        d = v.to_dict()
        d["time_s"] = round(time.monotonic() - self.t_start, 6)
        d["variant"] = self.cfg.run.variant
        if worker is not None:
            d["worker"] = worker
        d["found_by"] = found_by
        self.violations.append(d)

    def _record_report(self, rep: QuiescentReport, where: str) -> str | None:
        if not rep.violations:
            return None
        for v in rep.violations:
            self._add_violation(v, where, "checker")
        return "violation"

    def _first_violation_ns(self) -> int | None:
        """A free run's trace ends at its first violation (what followed is its
        consequence); a controlled run's trace ends there by itself."""
        if self.controlled or not self.violations or self.words is None:
            return None
        start = self.words.load(self.layout.ctl(Control.START_NS))
        t = self.violations[0].get("time_s")
        if not start or not isinstance(t, int | float):
            return None
        return start + int(t * 1e9) + 1000  # time_s is rounded to 1 us

    # -- teardown --------------------------------------------------------------
    def _stop_workers(self) -> None:
        w, lay = self.words, self.layout
        if w is None:
            return
        w.store(lay.ctl(Control.STOP), 1)
        w.store(lay.ctl(Control.PAUSE_REQ), 0)
        if self.hang:
            w.store(lay.ctl(Control.ABORT), 1)  # nobody is going to finish an op
        self._wait_stopped()
        if any(p.exitcode is None for p in self.procs):
            w.store(lay.ctl(Control.ABORT), 1)  # spinners give up
            self._wait_exit(ABORT_GRACE_S)
        alive = [i for i, p in enumerate(self.procs) if p.exitcode is None]
        if alive:
            if not self.hang:
                self._stuck(alive, "did not stop when asked (STOP, ABORT)")
            for i in alive:
                self.procs[i].terminate()
            self._wait_exit(TERM_GRACE_S)
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
                p.join()
        self._drain()
        for i, p in enumerate(self.procs):
            self.records[i].exitcode = p.exitcode

    def _progress(self, workers: list[int]) -> list[int] | None:
        """Counters that move on while these workers do work inside an op, or
        None when the engine keeps none (then every wait has its fixed bound)."""
        return None

    def _still_working(self, workers: list[int]) -> bool:
        """Whether these workers did work inside their ops since the last call
        (a wait for them then goes on: on a loaded machine one op can take
        seconds, a memslot deletion zapping a whole slot with a yield at every
        need_resched()).  False the first time and without progress counters."""
        now = self._progress(workers)
        if now is None:
            return False
        seen = self._seen_progress
        moved = any(i in seen and seen[i] != n for i, n in zip(workers, now, strict=True))
        seen.update(zip(workers, now, strict=True))
        return moved

    def _wait_stopped(self) -> None:
        """STOP is seen between ops: wait STOP_GRACE_S for the workers to finish
        the one they are in, and on, a STOP_GRACE_S at a time, while those still
        in an op make progress (at most six watchdog periods in all: an op that
        goes on for ever after STOP is stuck too)."""
        give_up = time.monotonic() + 6 * self.cfg.run.watchdog
        alive = [i for i, p in enumerate(self.procs) if p.exitcode is None]
        self._still_working(alive)
        while True:
            self._wait_exit(STOP_GRACE_S)
            alive = [i for i, p in enumerate(self.procs) if p.exitcode is None]
            if not alive or self.hang or time.monotonic() >= give_up \
                    or not self._still_working(alive):
                return  # done, or stuck: the caller names it

    def _wait_exit(self, grace: float) -> None:
        end = time.monotonic() + grace
        while any(p.exitcode is None for p in self.procs) and time.monotonic() < end:
            sentinels = [p.sentinel for p in self.procs if p.exitcode is None]
            live = [c for c in self.conns if c is not None]
            wait(sentinels + live, timeout=min(0.05, max(0.0, end - time.monotonic())))
            self._drain()

    def _kill_descendants(self) -> None:
        """No orphan outlives the run: anything a worker left running is killed."""
        mine = {r.pid for r in self.records}
        for ch in psutil.Process().children(recursive=True):
            try:
                if ch.pid in mine or ch.ppid() in mine:
                    ch.kill()
            except psutil.Error:
                pass

    def _final_checks(self) -> str | None:
        """With every worker gone: walk, rcu_barrier, tear the VM down, account."""
        kvm = self.kvm
        assert kvm is not None
        try:
            reason = self._record_report(quiescent_check(kvm), "final quiescent check")
            self.checks["quiescent"] += 1
            if reason:
                return reason
            # rcu_barrier(): callbacks still queued by workers that have exited
            lay = self.layout
            for page in range(lay.n_pages):
                if kvm.w.load(lay.sp(page, SpMeta.STATE)) == SP_REMOVED:
                    tdp_mmu_free_sp_rcu_callback(kvm, page)
            kvm_mmu_uninit_tdp_mmu(kvm)
            self.checks["teardown"] += 1
            return self._record_report(teardown_check(kvm), "teardown check")
        except InvariantViolation as v:
            return self._record_report(QuiescentReport(violations=[v]), "teardown")

    def _collect_stats(self) -> None:
        w, lay = self.words, self.layout
        if w is None:
            return
        for i, rec in enumerate(self.records):
            if not rec.done:
                base = lay.slot(i, Slot.STATS)
                rec.stats = {name: w.load(base + k) for k, name in enumerate(STAT_NAMES)}

    def _live_snapshot(self) -> StatusSnapshot:
        w, lay = self.words, self.layout
        assert w is not None
        per_role: dict[str, Counter[str]] = {}
        for i, role in enumerate(self.roles):
            base = lay.slot(i, Slot.STATS)
            c = per_role.setdefault(role, Counter())
            for k, name in enumerate(STAT_NAMES):
                c[name] += w.load(base + k)
        return StatusSnapshot(time.monotonic() - self.t_start, self.cfg.run.duration, per_role,
                              dict(Counter(self.roles)), len(self.violations),
                              self.checks["quiescent"], self.rss_total)

    # -- the run -----------------------------------------------------------------
    def _watchdog(self, now: float, beats: list[int], last_beat: list[float]) -> str | None:
        """A worker whose heartbeat (ops done) has not moved for run.watchdog is hung."""
        w, lay = self.words, self.layout
        assert w is not None
        stuck = []
        if self.controlled:  # one worker runs at a time: progress is the sum
            b = sum(w.load(lay.slot(i, Slot.HEARTBEAT)) for i in range(self.n))
            if b != beats[0]:
                beats[0], last_beat[0] = b, now
            elif now - last_beat[0] > self.cfg.run.watchdog:
                stuck = [i for i, p in enumerate(self.procs) if p.exitcode is None]
        for i in range(0 if self.controlled else self.n):
            b = w.load(lay.slot(i, Slot.HEARTBEAT))
            if b != beats[i]:
                beats[i], last_beat[i] = b, now
            elif now - last_beat[i] > self.cfg.run.watchdog:
                stuck.append(i)
        if stuck:
            return self._stuck(stuck, f"no progress for {self.cfg.run.watchdog:g} s")
        return None

    def _monitor(self) -> str:
        cfg = self.cfg
        end = self.t_start + cfg.run.duration
        self.deadline = min(end + OVERRUN_S, self.hard_deadline or float("inf"))
        end = min(end, self.deadline - OVERRUN_S / 2)
        interval = 0.0 if self.controlled else cfg.run.check_interval
        next_check = self.t_start + interval if interval else float("inf")
        next_status = self.t_start
        gen = 0
        beats = [0] * self.n
        last_beat = [self.t_start] * self.n
        while True:
            live = [c for c in self.conns if c is not None]
            sentinels = [p.sentinel for p in self.procs if p.exitcode is None]
            wait(live + sentinels, timeout=0.05)
            reason = self._check_workers()
            if reason:
                return reason
            if self.controlled and all(p.exitcode is not None for p in self.procs):
                return "clean"
            now = time.monotonic()
            if now >= end:
                return "clean"
            if now >= next_check:
                gen += 1
                reason = self._pause_and_check(gen)
                if reason:
                    return reason
                next_check = time.monotonic() + interval
                last_beat = [time.monotonic()] * self.n  # parked time is not stuck time
            if now >= next_status:
                reason = self._sample_rss(now - self.t_start) or self._watchdog(
                    now, beats, last_beat)
                if reason:
                    return reason
                if self.on_status:
                    self.on_status(self._live_snapshot())
                next_status = now + self.status_interval

    def run(self) -> RunOutcome:
        def on_signal(signum: int, _frame: object) -> None:
            raise Interrupted(signum)

        old_int = signal.signal(signal.SIGINT, on_signal)
        old_term = signal.signal(signal.SIGTERM, on_signal)
        reason = "error"
        self.t_start = time.monotonic()
        try:
            try:
                self._setup()
                self.t_start = time.monotonic()
                self._spawn()
                reason = self._monitor()
            except Interrupted:
                reason = "interrupted"
            except Exception as e:  # harness failure: report, still clean up
                # the VM's setup is model code too: its own assertion, or a fault the
                # kernel would oops on, is a finding as in a worker
                oops = e if isinstance(e, InvariantViolation) else kernel_oops(e, e.__traceback__)
                if oops is not None:
                    self._add_violation(oops, "setup", "supervisor")
                    reason = "violation"
                else:
                    self.errors.append(f"harness error: {type(e).__name__}: {e}")
                    reason = "error"
            duration = time.monotonic() - self.t_start
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                self._stop_workers()
                if self.hang and reason in ("clean", "error"):
                    reason = "violation" if self.violations else "hang"  # an RCU stall
                if reason == "clean":
                    dead = [i for i, p in enumerate(self.procs) if p.exitcode != 0]
                    self._drain()
                    if self.violations:
                        reason = "violation"
                    elif dead:
                        self.errors.extend(self._crash_message(i) for i in dead)
                        reason = "crash"
                    else:
                        reason = self._final_checks() or "clean"
                self._collect_stats()
                if self.controlled and self.words is not None:
                    switches, kinds, lost = sched.read_log(self.words, self.layout)
                    self.schedule = {
                        "mode": self.cfg.schedule.mode,
                        "steps": (self.violations[0].get("sched_step") if self.violations
                                  else None) or self.words.load(self.layout.sched + Sched.STEP),
                        "switches": [list(x) for x in switches],
                        "preemptions": kinds.count(sched.POINT), "lost": lost,
                        # per worker: ops it had started (its next op index) at the end
                        "ops": [self.words.load(self.layout.slot(i, Slot.HEARTBEAT))
                                for i in range(self.n)]}
                if reason not in ("clean", "interrupted") and self.words is not None:
                    self.trace = read_events(self.words, self.layout,
                                             self.roles + ["supervisor"], self.cfg.trace.keep,
                                             self._first_violation_ns())
            except Exception as e:
                self.errors.append(f"harness error during teardown: {type(e).__name__}: {e}")
                reason = "error" if reason == "clean" else reason
        finally:
            for p in self.procs:
                if p.exitcode is None:
                    p.kill()
                    p.join()
            self._kill_descendants()
            for c in self.conns:
                if c is not None:
                    c.close()
            if self.words is not None:
                self.words.release()
            if self.arena is not None:
                self.arena.close()
            if self.stacks_dir:
                shutil.rmtree(self.stacks_dir, ignore_errors=True)
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        return RunOutcome(
            exit_reason=reason, duration_s=round(duration, 3), workers=self.records,
            violations=self.violations, checks=dict(self.checks), errors=self.errors,
            pool_pages=self.layout.n_pages,
            arena_name=self.arena.name if self.arena else "", hang=self.hang,
            trace=self.trace, schedule=self.schedule,
        )
