"""The oracle layer: named, listed, attached through the model's hooks, and
separable from the model (which keeps only the kernel's own assertions)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stress import oracles
from stress.model.errors import InvariantViolation
from stress.model.hooks import NO_HOOKS, Hooks
from stress.model.mmu_page import tdp_mmu_free_sp_rcu_callback
from stress.model.variants import VARIANTS
from stress.oracles.base import HOOK_EXCEPTION, HOOK_KERNEL
from tests.conftest import run_cli
from tests.test_model import _late_fault_race

MODEL = Path(__file__).resolve().parent.parent / "stress" / "model"


def test_every_online_oracle_sits_on_a_model_hook() -> None:
    hooks = {n for n in vars(Hooks) if not n.startswith("_")}
    for o in oracles.ORACLES:
        assert o.name and o.invariant and o.when and o.cost, o
        if o.hook not in (oracles.HOOK_QUIESCENT, oracles.HOOK_TEARDOWN,
                          oracles.HOOK_WATCHDOG, HOOK_KERNEL, HOOK_EXCEPTION):
            assert o.hook in hooks and o.check is not None, o


def test_every_expected_invariant_is_an_oracle_or_a_kernel_assertion() -> None:
    """What a variant is expected to trip is either named by an oracle here or
    raised by the model's own kernel assertions (kvm.bug / KVM_BUG_ON)."""
    names = {o.name for o in oracles.ORACLES}
    model_src = "\n".join(p.read_text() for p in MODEL.glob("*.py"))
    asserted = set(re.findall(r'(?:bug|KVM_BUG_ON)\([^"]*"([^"]+)"', model_src))
    asserted |= set(re.findall(r'InvariantViolation\(\s*"([^"]+)"', model_src))
    missing = {inv for v in VARIANTS.values() for invs in v.expectations("tdx").values()
               for inv in invs if inv not in names and inv not in asserted}
    assert not missing, missing


def test_the_model_alone_keeps_only_the_kernels_assertions(make_vm) -> None:
    """Without the oracle layer the same late install into a removed table goes
    unnoticed at the RCU callback; with it, it is a named violation; with that
    oracle disabled, it is not."""
    vm = make_vm(variant="zap-without-freeze")
    _r, _it, zapper = _late_fault_race(vm)
    zapper.hooks = NO_HOOKS
    zapper.rcu.reclaim(lambda p: tdp_mmu_free_sp_rcu_callback(zapper, p))  # no check: no raise

    vm = make_vm(variant="zap-without-freeze")
    _r, _it, zapper = _late_fault_race(vm)
    oracles.attach(zapper, disabled=["SPTE installed in removed table"])
    zapper.rcu.reclaim(lambda p: tdp_mmu_free_sp_rcu_callback(zapper, p))

    vm = make_vm(variant="zap-without-freeze")
    _r, _it, zapper = _late_fault_race(vm)
    with pytest.raises(InvariantViolation) as e:
        zapper.rcu.reclaim(lambda p: tdp_mmu_free_sp_rcu_callback(zapper, p))
    assert e.value.invariant == "SPTE installed in removed table"


def test_unknown_oracle_cannot_be_disabled() -> None:
    with pytest.raises(ValueError, match="unknown oracle"):
        oracles.OracleHooks(disabled=["no such oracle"])


def test_cli_lists_the_oracles() -> None:
    r = run_cli("oracles", "--json", "-")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["oracles"]
    assert len(rows) == len(oracles.ORACLES)
    assert {"use-after-free of page-table page", "stale-tlb-entry-after-unlock",
            "mirror/S-EPT divergence"} <= {row["name"] for row in rows}
    text = run_cli("oracles", "--width", "80").stdout
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "online, hook sp_free" in text and "watchdog)" in text.splitlines()[-1]


def test_an_operation_that_returns_holding_a_lock_is_named(vm) -> None:
    """lockdep_sys_exit: a fault (the fixed protocol) returns holding nothing; an
    operation that keeps mmu_lock, an RCU read-side section or a KVM spinlock past
    its end is reported when its step returns (op_return), naming what it holds."""
    from stress.arena import Globals
    from stress.model.tdp_mmu import RET_PF_FIXED, kvm_tdp_page_fault

    kvm = vm.kvm
    assert kvm_tdp_page_fault(kvm, 0x1234, write=True) == RET_PF_FIXED
    kvm.hooks.op_return(kvm)
    for take, drop, what in (
            (kvm.read_lock, kvm.read_unlock, "mmu_lock"),
            (kvm.rcu.rcu_read_lock, kvm.rcu.rcu_read_unlock, "rcu_read_lock"),
            (lambda: kvm.w.spin_lock(kvm.layout.glob(Globals.SLOTS_LOCK), kvm.pid),
             lambda: kvm.w.spin_unlock(kvm.layout.glob(Globals.SLOTS_LOCK)), "slots_lock")):
        take()
        with pytest.raises(InvariantViolation) as e:
            kvm.hooks.op_return(kvm)
        assert e.value.invariant == "lock held when returning to user space"
        assert what in str(e.value)
        drop()
        kvm.hooks.op_return(kvm)
    other = vm.task(1)  # another task's lock is not this one's
    other.w.spin_lock(other.layout.glob(Globals.SLOTS_LOCK), other.pid + 1)
    kvm.hooks.op_return(kvm)


def test_an_iterator_that_leaves_its_tree_is_named(vm) -> None:
    """A walk over a populated range steps down to 4K and back up to the root,
    clean; an iterator whose step up lacks tdp_iter's root-level check (a broken
    walker) is reported when it steps above the root, before it reads there."""
    from stress.model.spte import SPTE_INDEX, round_gfn_for_level
    from stress.model.tdp_iter import TdpIter
    from stress.model.tdp_mmu import RET_PF_FIXED, kvm_tdp_page_fault

    class StepsPastTheRoot(TdpIter):
        def try_step_up(self) -> bool:  # tdp_iter.c's try_step_up without its guard
            self.level += 1
            self.kvm.hooks.iter_level(self.kvm, self)
            self.gfn = round_gfn_for_level(self.gfn, self.level)
            self.sptep = self.kvm.layout.spt(self.pt_path[self.level]) + SPTE_INDEX(
                self.gfn | self.gfn_bits, self.level)
            return True

    kvm = vm.kvm
    for gfn in (0x1234, 0x40000 - 1):
        assert kvm_tdp_page_fault(kvm, gfn, write=True) == RET_PF_FIXED
    kvm.read_lock()
    kvm.rcu.rcu_read_lock()
    try:
        it, leaves = TdpIter(kvm, vm.root, 0), 0
        while it.in_range(0x40000):
            leaves += it.level == 1 and it.old_spte & 1
            it.next()
        assert leaves == 2
        it = StepsPastTheRoot(kvm, vm.root, 0)
        with pytest.raises(InvariantViolation) as e:
            while it.in_range(1 << 40):
                it.next()
        assert e.value.invariant == "iterator outside its tree"
        assert e.value.details["level"] == e.value.details["root_level"] + 1
    finally:
        kvm.rcu.rcu_read_unlock()
        kvm.read_unlock()


def test_a_stuck_worker_inside_rcu_is_an_rcu_stall_and_outside_a_hang(vm) -> None:
    """The watchdog's stuck workers: one inside an RCU read-side section is named
    (it blocks every grace period); one stuck outside (waiting for a lock) is not."""
    from stress.oracles.liveness import rcu_stall

    walker, waiter = vm.kvm, vm.task(1)
    walker.rcu.rcu_read_lock()
    v = rcu_stall(vm.words, vm.layout, [waiter.me, walker.me], "no progress for 10 s")
    assert v is not None and v.invariant == "RCU stall"
    assert v.details["stalled_workers"] == [walker.me] and "no progress for 10 s" in str(v)
    walker.rcu.rcu_read_unlock()
    assert rcu_stall(vm.words, vm.layout, [waiter.me, walker.me], "no progress") is None


def test_liveness_names_the_loop_and_the_entry(vm) -> None:
    """A retry loop that goes round past the bound at one entry is a livelock,
    named where it happens; a completed operation resets the count; a task
    waiting for it names the loop it is in, but only while that task keeps
    going round it (a holder that is only slow is no livelock)."""
    kvm = vm.kvm
    oracles.attach(kvm, params={"max_retries": 50, "max_wait_rounds": 20})
    for _ in range(50):
        kvm.hooks.retry(kvm, "kvm_tdp_page_fault", 0x1234)
    kvm.hooks.op_end(kvm)  # progress: counting starts again
    for _ in range(50):
        kvm.hooks.retry(kvm, "kvm_tdp_page_fault", 0x1234)
        kvm.hooks.retry(kvm, "kvm_tdp_page_fault", 0x99)  # another entry: its own count
    with pytest.raises(InvariantViolation) as e:
        kvm.hooks.retry(kvm, "kvm_tdp_page_fault", 0x1234)
    assert e.value.invariant == "livelock"
    assert "livelock in kvm_tdp_page_fault at gfn 0x1234: 50 retries" in str(e.value)

    kvm.hooks.op_return(kvm)
    oracles.attach(kvm, params={"max_retries": 100_000, "max_wait_rounds": 20})
    waiter = oracles.attach(vm.task(1), params={"max_retries": 50, "max_wait_rounds": 20})
    kvm.hooks.retry(kvm, "kvm_tdp_page_fault", 0x1234)  # in a loop, but not going round
    for _ in range(100):
        waiter.hooks.wait(waiter, "synchronize_srcu", 0x1234, kvm.me)
    with pytest.raises(InvariantViolation) as e:
        for _ in range(42):  # within two bounds: the first may end in the slow phase
            for _ in range(20):
                kvm.hooks.retry(kvm, "kvm_tdp_page_fault", 0x1234)
            waiter.hooks.wait(waiter, "synchronize_srcu", 0x1234, kvm.me)
    assert e.value.details["holder_site"] == "kvm_tdp_page_fault"
    assert "waiting for worker 0, which keeps retrying kvm_tdp_page_fault" in str(e.value)


def test_liveness_in_a_quiet_phase_has_the_lower_bound_after_the_grace(vm) -> None:
    """In a quiet phase (only the vCPUs run) a loop may go round quiet_max_retries
    times once the grace is over; outside one, or within the grace, the usual bound."""
    import time

    from stress.arena import Control

    kvm = vm.kvm
    quiet = {"quiet_every_ns": 10**10, "quiet_for_ns": 5 * 10**9,
             "quiet_grace_ns": 10**9, "quiet_max_retries": 30, "quiet_min_stall_ns": 0}
    oracles.attach(kvm, params={"max_retries": 100_000, "max_wait_rounds": 20, **quiet})
    start = kvm.layout.ctl(Control.START_NS)
    for into_cycle_s, quiet_now in ((1, False), (5.5, False), (7, True)):  # grace: 5..6 s
        kvm.w.store(start, time.monotonic_ns() - int(into_cycle_s * 1e9))
        kvm.hooks.op_end(kvm)
        for _ in range(30):
            kvm.hooks.retry(kvm, "vcpu_enter_guest", 0x42)
        if not quiet_now:
            kvm.hooks.retry(kvm, "vcpu_enter_guest", 0x42)  # the usual bound only
            continue
        with pytest.raises(InvariantViolation) as e:
            kvm.hooks.retry(kvm, "vcpu_enter_guest", 0x42)
        assert e.value.invariant == "livelock" and e.value.details["quiet_phase"] == 1
        assert "livelock in vcpu_enter_guest at gfn 0x42: 30 retries over " in str(e.value)
        assert "ms of a quiet phase" in str(e.value)
    # contention between vCPUs may last a little: a streak shorter than quiet_min_stall
    oracles.attach(kvm, params={"max_retries": 100_000, "max_wait_rounds": 20, **quiet,
                                "quiet_min_stall_ns": 10**9})
    kvm.hooks.op_end(kvm)
    for _ in range(100):
        kvm.hooks.retry(kvm, "vcpu_enter_guest", 0x42)


def test_kernel_oops_names_faults_of_protocol_code_only() -> None:
    """An exception out of stress/model/ (the memory layer's frames under it allowed) is
    the kernel's oops, titled; one out of the harness, or of another kind, is not."""
    from stress.model import tdp_mmu
    from stress.oracles.oops import kernel_oops

    def raised(src: str, filename: str) -> BaseException:
        ns: dict[str, object] = {}
        exec(compile(src, filename, "exec"), ns)
        try:
            ns["f"]()  # type: ignore[operator]
        except BaseException as e:  # noqa: BLE001
            return e
        raise AssertionError("no exception")

    e = raised("def f():\n    root = None\n    return root.spt\n", tdp_mmu.__file__)
    v = kernel_oops(e, e.__traceback__)
    assert v is not None and v.invariant == "kernel oops"
    assert v.message.startswith("BUG: kernel NULL pointer dereference in f (tdp_mmu.py:3)")
    e = raised("def f():\n    return 1 << (0 - 1)\n", tdp_mmu.__file__)
    v = kernel_oops(e, e.__traceback__)
    assert v is not None and "UBSAN: shift-out-of-bounds in f" in v.message
    e = raised("def f():\n    raise AssertionError('unreachable')\n", tdp_mmu.__file__)
    v = kernel_oops(e, e.__traceback__)
    assert v is not None and v.message.startswith("kernel BUG in f (tdp_mmu.py:2)")
    e = raised("def f():\n    raise KeyError(1)\n", tdp_mmu.__file__)
    assert kernel_oops(e, e.__traceback__) is None  # not an oops the kernel has
    e = raised("def f():\n    return None.x\n", __file__)
    assert kernel_oops(e, e.__traceback__) is None  # not protocol code


def test_provenance_of_overlapping_installs_is_never_older_than_the_leaf(vm) -> None:
    """Two faults at one entry: the second tags the provenance word while the first
    is in flight and finishes first; a zap removes that leaf; the first's cmpxchg then
    installs the entry's leaf.  Its provenance must be its own clock, not the other
    install's older one (else the zap would seem to have missed it)."""
    from types import SimpleNamespace

    from stress.arena import Globals
    from stress.oracles import zaps
    from stress.oracles.provenance import prov_index

    t0, t1 = vm.kvm, vm.task(1)
    it = SimpleNamespace(sptep=vm.layout.spt(vm.root) + 7)
    zaps.installing(t0, it)
    zaps.installing(t1, it)
    zaps.installed(t1, it, None, 0, 0)  # t1's leaf, installed and recorded
    token = zaps.zap_start(t0, 0)  # a zap begins (and removes t1's leaf)
    zaps.installed(t0, it, None, 0, 0)  # t0's cmpxchg came after the zap: its leaf
    prov = t0.w.load(prov_index(t0, it.sptep))
    assert prov >> 8 > token and prov & 0xFF == t0.me + 1
    assert t0.w.load(t0.layout.glob(Globals.ZAP_CLOCK)) == token + 1


def test_eintr_without_a_signal_is_named(vm) -> None:
    """An ioctl may fail with -EINTR only when a signal is pending (the harness's
    STOP or ABORT is the model's signal)."""
    from stress.arena import Control

    kvm = vm.kvm
    kvm.hooks.sys_exit(kvm, "KVM_PRE_FAULT_MEMORY", 0)
    kvm.hooks.sys_exit(kvm, "KVM_PRE_FAULT_MEMORY", -5)
    with pytest.raises(InvariantViolation) as e:
        kvm.hooks.sys_exit(kvm, "KVM_PRE_FAULT_MEMORY", -4)
    assert e.value.invariant == "EINTR without a signal"
    assert "KVM_PRE_FAULT_MEMORY" in str(e.value)
    kvm.w.store(kvm.layout.ctl(Control.STOP), 1)
    kvm.hooks.sys_exit(kvm, "KVM_PRE_FAULT_MEMORY", -4)
    kvm.w.store(kvm.layout.ctl(Control.STOP), 0)


def test_only_the_holder_releases_a_kvm_lock(vm) -> None:
    """DEBUG_SPINLOCK / DEBUG_MUTEXES / lockdep's "bad unlock balance": a task
    releases a lock only if it holds it (neither a free lock nor another task's)."""
    from stress.arena import Globals

    kvm = vm.kvm
    i = kvm.layout.glob(Globals.SLOTS_LOCK)
    kvm.w.spin_lock(i, kvm.pid)
    kvm.spin_unlock(i, "slots_lock")
    for owner in (0, kvm.pid + 1):
        if owner:
            kvm.w.spin_lock(i, owner)
        with pytest.raises(InvariantViolation) as e:
            kvm.spin_unlock(i, "slots_lock")
        assert e.value.invariant == "lockdep" and "bad unlock balance" in str(e.value)
        assert kvm.w.load(i) == owner  # not released
        kvm.w.spin_unlock(i)


def test_set_memory_attributes_returns_only_with_the_attributes_set(make_vm) -> None:
    """KVM_SET_MEMORY_ATTRIBUTES's postcondition, checked at its return under
    slots_lock: a real conversion passes it; a return claiming a range that still
    has the other attribute is named."""
    from stress.model.kvm import kvm_mem_is_private
    from stress.model.notifier import kvm_vm_set_mem_attributes

    vm = make_vm(tdx=True)
    kvm = vm.kvm
    gfn = next(g for g in range(64) if kvm_mem_is_private(kvm, g))
    kvm_vm_set_mem_attributes(kvm, gfn, gfn + 2, private=False)
    assert not kvm_mem_is_private(kvm, gfn) and not kvm_mem_is_private(kvm, gfn + 1)
    with pytest.raises(InvariantViolation) as e:
        kvm.hooks.set_memory_attributes_return(kvm, gfn, gfn + 2, True)
    assert e.value.invariant == "memory attributes not set" and e.value.details["gfn"] == gfn
