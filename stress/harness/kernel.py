"""The harness for the kernel engine: the same supervisor, the kernel's code.

:class:`KernelSupervisor` is :class:`~stress.harness.supervisor.Supervisor`
with the engine's parts swapped: the model's arena keeps only its control
words (GO, STOP, PAUSE_REQ, per-worker heartbeat and parking), the kernel's
arena (:class:`~stress.kernel.engine.KernelVm`) holds the VM, and the
workers run ``ke_*`` operations instead of model steps.  Everything else is
the supervisor's own: the stop sequence, the watchdog, quiescent checks every
``run.check_interval`` with every worker parked between operations, psutil
sampling, exit reasons and codes.

A violation comes from the kernel's own assertions (WARN_ON, KVM_BUG_ON,
BUG, lockdep, refcount_t, KASAN's use-after-free in the arena allocator) in
the worker that hit it, or from the oracle layer's walk of the kernel's
structures (stress/oracles/kernel.py) at quiescence and teardown.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from stress.arena import Arena, Control, Layout, Slot, deferred_signals, sweep_stale
from stress.atomics import LockAborted, Words
from stress.config import Config
from stress.harness import sched
from stress.harness.sched import Turns, worker_turns
from stress.harness.sched.turns import PAUSE, RELAX, WINDOW
from stress.harness.supervisor import (
    SCHED_LOG,
    RunOutcome,
    StatusSnapshot,
    Supervisor,
    WorkerRecord,
)
from stress.harness.workers import MASK63, _die_with_parent, stop_run_for_violation
from stress.kernel.engine import KernelViolation, KernelVm, built_for
from stress.model.errors import InvariantViolation
from stress.oracles.kernel import kernel_invariant
from stress.oracles.quiescent import QuiescentReport

HEARTBEAT_EVERY_S = 0.05


class KernelWorker:
    """One worker process of the kernel engine: a role's op loop."""

    def __init__(self, index: int, role: str, cfg: Config, arena: Arena, vm: KernelVm,
                 vcpu: int | None) -> None:
        self.index, self.role, self.cfg, self.vm = index, role, cfg, vm
        self.layout = arena.layout
        self.words = Words(arena.shm.buf, self.layout.ctl(Control.ABORT))
        self.rng = random.Random(f"kernel:{cfg.run.seed}:{index}")
        self.lib = vm.lib
        self.kvm = vm.kvm
        self.vcpu = vm.vcpus[vcpu] if vcpu is not None else None
        self.vcpu_index = vcpu or 0
        self.slots = vm.slots()
        self.ops = 0
        self.parked_gen = 0
        g = cfg.guest
        self.hot_pages = max(1, g.hot_set >> 12)
        self.step = getattr(self, f"step_{role}")
        self.cycle = 0
        self.turns: Turns | None = None
        if cfg.schedule.controlled:
            self.turns = worker_turns(self.words, self.layout, index, cfg.n_workers,
                                      cfg.schedule)

    # -- guest addresses ---------------------------------------------------------
    def gfn(self) -> int:
        """A gfn of the guest: the hot set (the first pages of the first slot)
        with guest.hot_fraction, else anywhere in a memslot."""
        base, npages, _ = self.slots[0]
        if self.rng.random() < self.cfg.guest.hot_fraction:
            return base + self.rng.randrange(min(self.hot_pages, npages))
        base, npages, _ = self.rng.choice(self.slots)
        return base + self.rng.randrange(npages)

    def gfn_range(self) -> tuple[int, int]:
        """A range to zap or invalidate: a 4K page, a 2M region or up to 64 of them."""
        gfn = self.gfn()
        r = self.rng.random()
        size = 1 if r < 0.4 else 512 if r < 0.85 else 512 * self.rng.randint(2, 64)
        start = gfn & ~(size - 1) if size <= 512 else gfn & ~511
        return start, start + size

    # -- roles -------------------------------------------------------------------
    def next_fresh_gfn(self) -> int:
        """The sequential pattern: the vCPUs stride through the memslots, each its
        own gfns, so every access faults a page nobody mapped yet."""
        n_vcpu = self.cfg.kernel.vcpu
        k = self.cycle * n_vcpu + self.vcpu_index
        self.cycle += 1
        for base, npages, _ in self.slots:
            if k < npages:
                return base + k
            k -= npages
        self.cycle = 0  # the whole guest is mapped: go round again
        return self.slots[0][0] + self.vcpu_index

    def step_vcpu(self) -> None:
        k = self.cfg.kernel
        if k.pattern == "sequential":
            self.lib.ke_guest_access(self.vcpu, self.next_fresh_gfn() << 12, 1, 0)
            return
        if k.halt_fraction and self.rng.random() < k.halt_fraction:
            # HLT: kvm_vcpu_block, the root stays loaded
            if self.turns is not None:
                self.turns.pause()
            else:
                time.sleep(k.halt_time)
            return
        write = self.rng.random() < k.write_fraction
        exe = not write and self.rng.random() < k.exec_fraction
        self.lib.ke_guest_access(self.vcpu, self.gfn() << 12, int(write), int(exe))

    def step_zapper(self) -> None:
        self.lib.ke_zap_gfn_range(self.kvm, *self.gfn_range())
        self.pause()

    def step_notifier(self) -> None:
        self.lib.ke_unmap(self.kvm, *self.gfn_range())
        self.pause()

    def step_invalidator(self) -> None:
        self.lib.ke_zap_all_fast(self.kvm)
        self.pause(20)

    def step_dirtylog(self) -> None:
        """Dirty logging as a migration runs it, one slot at a time: enable it
        (write-protect, eager split), harvest the log dirty_log_harvests times (write-
        protect what was dirtied, or clear the D bits as PML would), disable it
        (zap what can be collapsed)."""
        slot = self.cycle % len(self.slots)
        harvests = self.cfg.kernel.dirty_log_harvests
        phase = self.ops % (harvests + 3)
        lib = self.lib
        if phase == 0:
            lib.ke_slot_dirty_logging(self.kvm, slot, 1)
        elif phase <= harvests:
            lib.ke_dirty_log(self.kvm, slot)
        elif phase == harvests + 1:
            lib.ke_clear_dirty_slot(self.kvm, slot)
        else:
            lib.ke_slot_dirty_logging(self.kvm, slot, 0)
            self.cycle += 1
        self.pause(5)

    def step_aging(self) -> None:
        start, end = self.gfn_range()
        if self.rng.random() < 0.5:
            self.lib.ke_age(self.kvm, start, end)
        else:
            self.lib.ke_test_age(self.kvm, start, end)
        self.pause()

    def step_memslot(self) -> None:
        """Delete a memslot (not the hot one), run a while without it, create it
        again: faults on its gfns go to the noslot path meanwhile."""
        if len(self.slots) < 2:
            self.pause(50)
            return
        slot = 1 + self.cycle % (len(self.slots) - 1)
        if self.ops % 2 == 0:
            self.lib.ke_memslot_delete(self.kvm, slot)
            self.pause(25)
        else:
            self.lib.ke_memslot_recreate(self.kvm, slot)
            self.cycle += 1
            self.pause(100)

    def step_nx(self) -> None:
        self.lib.ke_nx_recover(self.kvm)
        self.pause(25)

    def pause(self, n: int = 1) -> None:
        if self.turns is not None:
            self.turns.pause()  # a controlled run: a sleep is one hand-over, no time
        elif self.cfg.kernel.interval:
            time.sleep(self.cfg.kernel.interval * n * (0.5 + self.rng.random()))

    # -- the loop ----------------------------------------------------------------
    def publish(self) -> None:
        self.words.store(self.layout.slot(self.index, Slot.HEARTBEAT), self.ops)

    def park(self, gen: int) -> None:
        w, lay = self.words, self.layout
        self.publish()
        self.parked_gen = gen
        w.store(lay.slot(self.index, Slot.PARKED_GEN), gen)
        w.fetch_add(lay.ctl(Control.PARKED), 1)
        stop_i, pause_i = lay.ctl(Control.STOP), lay.ctl(Control.PAUSE_REQ)
        while w.load(pause_i) == gen and not w.load(stop_i):
            time.sleep(0.0005)

    def run(self) -> KernelViolation | None:
        w, lay = self.words, self.layout
        w.store(lay.slot(self.index, Slot.PID), os.getpid())
        stop_i, pause_i = lay.ctl(Control.STOP), lay.ctl(Control.PAUSE_REQ)
        go_i = lay.ctl(Control.GO)
        while not w.load(go_i):
            if w.load(stop_i):
                return None
            time.sleep(0.0005)
        if self.turns is not None:
            return self.run_controlled(self.turns)
        next_beat = time.monotonic() + HEARTBEAT_EVERY_S
        vm, me = self.vm, self.index
        while not w.load(stop_i):
            gen = w.load(pause_i)
            if gen and gen != self.parked_gen:
                self.park(gen)
                continue
            self.step()
            self.ops += 1
            v = vm.violation()
            if v is not None and v.task == me:
                return v  # another task's is its own to report; it stops the run
            now = time.monotonic()
            if now >= next_beat:
                self.publish()
                next_beat = now + HEARTBEAT_EVERY_S
        self.publish()
        return None


    def op_seed(self, k: int) -> int:
        """Op ``k``'s own RNG seed (as the model's workers have it): deleting an
        earlier op (shrinking) leaves the later ops' choices unchanged."""
        return ((self.cfg.run.seed * 1_000_003 + self.index) * 1_000_000_007 + k) & MASK63

    def run_controlled(self, turns: Turns) -> KernelViolation | None:
        """The op loop of a controlled run: the kernel code's scheduling points
        (every shared access, every wait) call back into ``turns``, so only the
        turn holder runs; the ops are capped by the step budget."""
        w, lay, vm, me, sc = self.words, self.layout, self.vm, self.index, self.cfg.schedule
        cap = sc.max_ops[me] if sc.max_ops else -1
        if cap == 0:
            return None

        def hook(kind: int) -> int:
            try:
                if kind == RELAX:
                    turns.relax()
                elif kind == PAUSE:
                    turns.pause()
                elif kind == WINDOW:
                    turns.window()
                else:
                    turns.point()
                return 0
            except LockAborted:
                return 1

        cb = vm.ffi.callback("int(int)", hook)
        self._cb = cb  # kept alive while C holds it
        vm.lib.ks_set_sched_hook(cb)
        skip = [(first, last) for wk, first, last in sc.skip_ops if wk == me]
        heartbeat_i = lay.slot(me, Slot.HEARTBEAT)
        found: KernelViolation | None = None
        try:
            turns.start()
            k = 0
            while k != cap and not turns.expired and not w.load(lay.ctl(Control.STOP)):
                w.store(heartbeat_i, k + 1)
                if not any(first <= k <= last for first, last in skip):
                    turns.begin_op(k)
                    self.rng.seed(self.op_seed(k))
                    self.step()
                    self.ops += 1
                    v = vm.violation()
                    if v is not None and v.task == me:
                        found = v
                        break
                k += 1
        except LockAborted:
            pass
        if found is None:
            turns.end_phase()
        else:
            # the others wake to ABORT without another step: the trace ends here
            w.store(lay.ctl(Control.ABORT), 1)
            vm.abort()
        vm.lib.ks_set_sched_hook(vm.ffi.NULL)
        turns.exit()
        return found


def kernel_violation_dict(v: KernelViolation, cfg: Config, role: str, start_ns: int
                          ) -> dict[str, Any]:
    inv = kernel_invariant(v.kind, v.what)
    return {"invariant": inv, "message": f"{v.what} ({v.file}:{v.line}, in {v.op})",
            "details": {**v.to_dict(), "engine": "kernel"}, "worker": v.task, "role": role,
            "time_s": round((time.monotonic_ns() - start_ns) / 1e9, 6) if start_ns else 0.0,
            "variant": cfg.run.variant}


def kernel_worker_main(index: int, role: str, cfg: Config, arena: Arena, vm: KernelVm,
                       vcpu: int | None, conn: Connection, stacks_path: str | None,
                       parent: int) -> None:
    """Entry point of a kernel-engine worker (after fork)."""
    import faulthandler

    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stacks = open(stacks_path, "w") if stacks_path else sys.stderr  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    code = 0
    try:
        vm.set_task(index)
        vm.lib.ks_install_oops_handler()  # a fault in kernel code is an oops, not a crash
        worker = KernelWorker(index, role, cfg, arena, vm, vcpu)
        v = worker.run()
        if v is not None:
            start = worker.words.load(worker.layout.ctl(Control.START_NS))
            conn.send(("violation", kernel_violation_dict(v, cfg, role, start)))
            stop_run_for_violation(worker.words, worker.layout, index)
            code = 1
        else:
            conn.send(("done", {"stats": vm.task_stats(index)}))
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        code = 3
    finally:
        conn.close()
    os._exit(code)


class KernelSupervisor(Supervisor):
    """The supervisor, running the kernel engine's workers."""

    def __init__(self, cfg: Config, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self.roles = [role for role, n in cfg.kernel.workers().items() for _ in range(n)]
        self.n = len(self.roles)
        self.records = [WorkerRecord(i, r) for i, r in enumerate(self.roles)]
        # the model's arena carries the control words only
        self.layout = Layout.build(n_slots=self.n + 1, n_pages=64, n_gfns=512,
                                   trace_entries=0,
                                   sched_log=SCHED_LOG if cfg.schedule.controlled else 0)
        self.vm: KernelVm | None = None
        self.engine_info: dict[str, Any] = {}
        # built before the run starts: a tree or mutation that cannot be built is
        # the caller's error (one line), not a harness failure
        self.tree, self.built = built_for(cfg)

    def _setup(self) -> None:
        sweep_stale()
        self.stacks_dir = tempfile.mkdtemp(prefix="tdpstress-stacks-")
        with deferred_signals():  # no Ctrl-C between the segment's creation and its owner
            self.arena = Arena.create(self.layout, self.cfg.hash64())
        self.words = Words(self.arena.shm.buf, self.layout.ctl(Control.ABORT))
        self.vm = vm = KernelVm(self.cfg, self.n + 1, self.tree, self.built)
        vm.create(self.roles.count("vcpu"))
        if self.controlled:
            sched.init_region(self.words, self.layout, self.cfg.schedule, self.n)
        self.engine_info = {"engine": "kernel", "tree": vm.tree.origin,
                            "version": vm.tree.version, "build": vm.built.key,
                            "module": str(vm.built.path)}

    def _worker_entry(self, i: int, role: str, conn: Connection
                      ) -> tuple[Callable[..., None], tuple[Any, ...]]:
        vcpu = self.roles[:i].count("vcpu") if role == "vcpu" else None
        return kernel_worker_main, (i, role, self.cfg, self.arena, self.vm, vcpu, conn,
                                    self._stacks_file(i), os.getpid())

    def _report(self, found: tuple[str, str] | None, where: str) -> QuiescentReport:
        if found is None:
            return QuiescentReport(violations=[])
        name, msg = found
        return QuiescentReport(violations=[InvariantViolation(name, msg, engine="kernel")])

    def _kernel_violation(self) -> str | None:
        """A kernel assertion hit in the supervisor's own calls (teardown)."""
        assert self.vm is not None
        v = self.vm.violation()
        if v is None:
            return None
        start = self.words.load(self.layout.ctl(Control.START_NS)) if self.words else 0
        self.violations.append(kernel_violation_dict(v, self.cfg, "supervisor", start))
        return "violation"

    def _quiescent_report(self) -> QuiescentReport:
        assert self.vm is not None
        return self._report(self.vm.check(), "quiescent check")

    def _hang_report(self, stuck: list[int], what: str) -> dict[str, Any]:
        rep = super()._hang_report(stuck, what)
        if self.vm is not None and self.vm.mapped:
            rep["kernel_locks"] = self.vm.lock_waits(self.n)
        return rep

    def _final_checks(self) -> str | None:
        assert self.vm is not None
        vm = self.vm
        reason = self._record_report(self._report(vm.check(), "final"), "final quiescent check")
        self.checks["quiescent"] += 1
        if reason:
            return reason
        vm.destroy()
        reason = self._kernel_violation()
        if reason:
            return reason
        self.checks["teardown"] += 1
        found = vm.check(teardown=True)
        if found is None and (vm.stat("pages_used") or vm.stat("objs_used")):
            found = ("leaked page-table page",
                     f"{vm.stat('pages_used')} pages and {vm.stat('objs_used')} kvm_mmu_page "
                     "objects are still allocated after kvm_mmu_uninit_tdp_mmu()")
        return self._record_report(self._report(found, "teardown"), "teardown check")

    def _collect_stats(self) -> None:
        if self.vm is None or not self.vm.mapped:
            return
        for i, rec in enumerate(self.records):
            rec.stats = self._stats(i, self._vcpu_index(i))
            if self.words is not None:
                rec.stats["ops"] = self.words.load(self.layout.slot(i, Slot.HEARTBEAT))
        self.engine_info["tracepoints"] = self.vm.tracepoints()
        self.engine_info["tlb_flushes"] = None

    def _stats(self, i: int, vcpu: int | None) -> dict[str, int]:
        """Worker ``i``'s counters: its ops, and a vCPU's kvm_vcpu_stat and TLB;
        ``fast_zaps`` as the status line names the invalidator's work."""
        assert self.vm is not None
        st = self.vm.task_stats(i)
        if vcpu is not None:
            st.update(self.vm.vcpu_stats(vcpu))
        if "zap_all_fast" in st:
            st["fast_zaps"] = st["zap_all_fast"]
        return st

    def _vcpu_index(self, i: int) -> int | None:
        return self.roles[:i].count("vcpu") if self.roles[i] == "vcpu" else None

    def _live_snapshot(self) -> StatusSnapshot:
        assert self.vm is not None
        per_role: dict[str, Counter[str]] = {}
        for i, role in enumerate(self.roles):
            c = per_role.setdefault(role, Counter())
            for k, v in self._stats(i, self._vcpu_index(i)).items():
                c[k] += v
            if self.words is not None:
                c["ops"] += self.words.load(self.layout.slot(i, Slot.HEARTBEAT))
        return StatusSnapshot(time.monotonic() - self.t_start, self.cfg.run.duration, per_role,
                              dict(Counter(self.roles)), len(self.violations),
                              self.checks["quiescent"], self.rss_total)

    def _progress(self, workers: list[int]) -> list[int] | None:
        """Each worker's SPTE accesses: they move on while it works inside an op
        (not while it spins on a lock or waits for a grace period)."""
        if self.vm is None or not self.vm.mapped:
            return None
        return [int(self.vm.lib.ks_task_stat(i, b"spte_accesses")) for i in workers]

    def _stop_workers(self) -> None:
        # A worker that hit BUG() unwound out of its op with its locks held:
        # the others' spins give up (as ABORT makes the model's give up).  A
        # clean stop lets every op finish, so teardown finds the locks free.
        w = self.words
        stopped_for_violation = w is not None and w.load(self.layout.ctl(Control.VIOLATION))
        if self.vm is not None and (self.hang or self.violations or stopped_for_violation):
            self.vm.abort()
        super()._stop_workers()
        if self.vm is not None and any(p.exitcode not in (0, 1) for p in self.procs):
            self.vm.abort()

    def run(self) -> RunOutcome:
        try:
            out = super().run()
            if out.exit_reason not in ("clean", "interrupted") and self.vm is not None \
                    and self.vm.mapped:
                until = None
                if out.violations:
                    until = out.violations[0].get("details", {}).get("seq")
                out.trace = self.vm.trace(self.roles + ["supervisor"], self.cfg.trace.keep,
                                          until)
        finally:
            if self.vm is not None:
                self.vm.close()
        out.engine = self.engine_info
        return out


def supervisor_for(cfg: Config) -> type[Supervisor]:
    """The supervisor of ``cfg``'s engine (run.engine)."""
    return KernelSupervisor if cfg.run.engine == "kernel" else Supervisor
