"""Liveness: every operation completes within a bound of rounds at one position.

The model's retry loops are unbounded, as the kernel's are; each round is a
``retry`` (or, for a wait on another task, ``wait``) hook point naming the
kernel function that loops and the entry it loops on.  Counted per task and
per (site, entry) since the task's last completed operation, a count past the
bound is a livelock, reported where it happens ("livelock in X at gfn G"),
with the task it waits for when there is one, and what that task is doing.
Each task publishes the loop it is in (site and entry, in its worker slot),
so a waiter names the holder's loop rather than only its own symptom.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from stress.arena import Globals, Layout, Slot, quiet_phase
from stress.atomics import Words
from stress.model.errors import InvariantViolation
from stress.model.hooks import RETRY_SITES
from stress.model.kvm import LOCK_NONE, Kvm
from stress.oracles.base import HOOK_WATCHDOG, listed, oracle

MAX_RETRIES = 100_000  # rounds of a retry loop at one entry within one operation
MAX_WAIT_ROUNDS = 2_000  # rounds of a wait for another task (each sleeps ~50 us)
# ... for one that is in no retry loop: it may only be descheduled, so it gets this many
# times longer, and its completing any operation meanwhile starts the count again
STUCK_FACTOR = 10
_PUBLISH_EVERY = 256

_SITE_ID = {s: i for i, s in enumerate(RETRY_SITES)}
# KVM's own spinlocks and mutexes among the globals (the TDX module's locks are the
# module's, released by each SEAMCALL: not a task's to hold across an ioctl)
KVM_LOCKS = {"tdp_mmu_pages_lock": Globals.TDP_MMU_PAGES_LOCK,
             "slots_lock": Globals.SLOTS_LOCK,
             "mmu_unsync_pages_lock": Globals.MMU_UNSYNC_PAGES_LOCK,
             "tdx sept lock": Globals.TDX_SEPT_LOCK}
_counts: WeakKeyDictionary[Kvm, dict[tuple[str, int], int]] = WeakKeyDictionary()
# per (site, entry, quiet phase): rounds since the phase's grace ended
# (rounds, ns into the phase at the first of them)
_quiet: WeakKeyDictionary[Kvm, dict[tuple[str, int, int], tuple[int, int]]] = \
    WeakKeyDictionary()
# per wait (site, holder): the holder's published rounds and heartbeat when the wait began
_wait_base: WeakKeyDictionary[Kvm, dict[tuple[str, int], tuple[int, int]]] = WeakKeyDictionary()


def _bound(kvm: Kvm, key: str, default: int) -> int:
    return int(getattr(kvm.hooks, "params", {}).get(key, default))


def _where(key: int) -> str:
    return f"gfn {key:#x}" if key >= 0 else "no particular entry"


def loop_of(kvm: Kvm, worker: int) -> tuple[str, int] | None:
    """The retry loop ``worker`` published last (site, entry), if any."""
    w, lay = kvm.w, kvm.layout
    site = w.load(lay.slot(worker, Slot.RETRY_SITE))
    if not site:
        return None
    return RETRY_SITES[site - 1], w.load(lay.slot(worker, Slot.RETRY_KEY)) - 1


@oracle("livelock",
        invariant="every operation completes within a bound of retries at one position: a "
                  "retry loop that goes round for ever on one entry is a livelock (or a "
                  "deadlock the loop hides)",
        hook="retry", when="each round of a model retry loop (RETRY_SITES); in a quiet "
                           "phase (run.quiet_every/quiet_for) a much lower bound, "
                           "liveness.quiet_max_retries, once its grace is over",
        cost="a dict update per round (two with quiet phases); a slot store every 256 "
             "rounds")
def retries_bounded(kvm: Kvm, site: str, key: int) -> None:
    c = _counts.setdefault(kvm, {})
    n = c.get((site, key), 0) + 1
    c[(site, key)] = n
    if n == 1 or n % _PUBLISH_EVERY == 0:
        lay = kvm.layout
        kvm.w.store(lay.slot(kvm.me, Slot.RETRY_SITE), _SITE_ID[site] + 1)
        kvm.w.store(lay.slot(kvm.me, Slot.RETRY_KEY), key + 1)
        kvm.w.store(lay.slot(kvm.me, Slot.RETRY_ROUNDS), n)
    bound = _bound(kvm, "max_retries", MAX_RETRIES)
    if n > bound:
        kvm.bug("livelock", f"livelock in {site} at {_where(key)}: {n - 1} retries without "
                "the operation completing", site=site, gfn=key, rounds=n - 1)
    params = getattr(kvm.hooks, "params", {})
    if "quiet_every_ns" in params:
        _quiet_rounds(kvm, site, key, params)


def _quiet_rounds(kvm: Kvm, site: str, key: int, params: dict[str, int]) -> None:
    """The quiet-phase bound: only vCPUs run, so once the host operations in flight
    when the phase began are over (the grace), nothing but the vCPUs themselves can
    make a retry loop go round: past quiet_max_retries rounds that went on for at
    least quiet_min_stall (two vCPUs may contend for a while), it is a livelock."""
    phase, into = quiet_phase(kvm.w, kvm.layout, params["quiet_every_ns"],
                              params["quiet_for_ns"])
    if not phase or into < params["quiet_grace_ns"]:
        return
    q = _quiet.setdefault(kvm, {})
    n, since = q.get((site, key, phase), (0, into))
    n += 1
    q[(site, key, phase)] = (n, since)
    if n > params["quiet_max_retries"] and into - since >= params["quiet_min_stall_ns"]:
        stalled_ms = (into - since) // 1_000_000
        kvm.bug("livelock", f"livelock in {site} at {_where(key)}: {n - 1} retries over "
                f"{stalled_ms} ms of a quiet phase (only the vCPUs running: nothing else to "
                "wait for) without the operation completing", site=site, gfn=key,
                rounds=n - 1, quiet_phase=phase, stalled_ms=stalled_ms)


@oracle("livelock",
        invariant="a task waiting for another (a grace period, a reader, a kick) waits a "
                  "bounded number of rounds while that task retries one loop, or completes "
                  "no operation: the report names the task waited for and the loop it is in",
        hook="wait", when="each round of a wait for another task",
        cost="a dict update per round; two loads when the bound is hit")
def waits_bounded(kvm: Kvm, site: str, key: int, holder: int) -> None:
    c = _counts.setdefault(kvm, {})
    n = c.get((site, -2 - holder), 0) + 1
    c[(site, -2 - holder)] = n
    lay = kvm.layout
    rounds, beat = lay.slot(holder, Slot.RETRY_ROUNDS), lay.slot(holder, Slot.HEARTBEAT)
    base = _wait_base.setdefault(kvm, {})
    if n == 1:
        base[(site, holder)] = (kvm.w.load(rounds), kvm.w.load(beat))
    bound = _bound(kvm, "max_wait_rounds", MAX_WAIT_ROUNDS)
    if n <= bound:
        return
    rounds0, beat0 = base.get((site, holder), (0, 0))
    loop = loop_of(kvm, holder)
    if loop is not None and kvm.w.load(rounds) > rounds0:
        kvm.bug("livelock", f"livelock in {site}: {n - 1} rounds waiting for worker {holder}"
                f", which keeps retrying {loop[0]} at {_where(loop[1])}", site=site,
                held_by_worker=holder, gfn=key, holder_site=loop[0], holder_gfn=loop[1],
                rounds=n - 1)
    if kvm.w.load(beat) != beat0:
        # the holder completed an operation meanwhile: it is making progress, only
        # slowly (a loaded machine deschedules it); count this wait again
        c[(site, -2 - holder)] = 0
        return
    if n > bound * STUCK_FACTOR:
        kvm.bug("livelock", f"livelock in {site}: {n - 1} rounds waiting for worker {holder}"
                f", which completes no operation meanwhile ({_where(key)})", site=site,
                held_by_worker=holder, gfn=key, holder_site=None, holder_gfn=None,
                rounds=n - 1)


@oracle("livelock",
        invariant="(progress) a completed operation resets its task's counts",
        hook="op_end", when="the harness, after each worker operation",
        cost="a dict clear; two slot stores when a loop was published")
def progress(kvm: Kvm) -> None:
    b = _wait_base.get(kvm)
    if b:
        b.clear()
    q = _quiet.get(kvm)
    if q:
        q.clear()
    c = _counts.get(kvm)
    if c:
        c.clear()
        lay = kvm.layout
        kvm.w.store(lay.slot(kvm.me, Slot.RETRY_SITE), 0)
        kvm.w.store(lay.slot(kvm.me, Slot.RETRY_KEY), 0)
        kvm.w.store(lay.slot(kvm.me, Slot.RETRY_ROUNDS), 0)


@oracle("lock held when returning to user space",
        invariant="an ioctl or a notifier callback returns with no lock held and outside "
                  "every RCU read-side section (lockdep_sys_exit): a lock kept past the end "
                  "of its operation is never released, and every other task that takes it "
                  "deadlocks",
        hook="op_return", when="the harness, after each worker step",
        cost="two attribute reads, a load per KVM spinlock and per vCPU mutex")
def no_lock_held_at_return(kvm: Kvm) -> None:
    held = []
    if kvm.lock_mode != LOCK_NONE:
        held.append("mmu_lock")
    if kvm.rcu.nesting:
        held.append(f"rcu_read_lock (nesting {kvm.rcu.nesting})")
    w, lay = kvm.w, kvm.layout
    for name, g in KVM_LOCKS.items():
        if w.load(lay.glob(g)) == kvm.pid:
            held.append(name)
    for v in range(lay.n_slots):
        if w.load(lay.slot(v, Slot.VCPU_MUTEX)) == kvm.pid:
            held.append(f"vcpu{v}->mutex")
    if held:
        kvm.bug("lock held when returning to user space",
                f"lock held when returning to user space: {', '.join(held)}", held=held)


listed("RCU stall",
       invariant="no task stays inside one RCU read-side critical section for long: a walker "
                 "that never leaves its rcu_read_lock() blocks every grace period, so no "
                 "removed page-table page is ever freed (the kernel's RCU CPU stall warning, "
                 "'rcu_preempt detected stalls', after rcu_cpu_stall_timeout)",
       hook=HOOK_WATCHDOG,
       when="the supervisor finds a worker without progress for run.watchdog (or one that "
            "does not park or stop): it is a stall if the worker is inside a read-side "
            "section",
       cost="one load per stuck worker, only when one is stuck", module="liveness")


def rcu_stall(words: Words, layout: Layout, stuck: list[int], what: str
              ) -> InvariantViolation | None:
    """The RCU stall among ``stuck`` workers (no progress: ``what``), if one of them
    is inside an RCU read-side section (its reader word is set), else None: a hang
    outside RCU (a lock waited on for ever) stays a hang."""
    inside = [i for i in stuck if words.load(layout.slot(i, Slot.RCU_READER))]
    if not inside:
        return None
    return InvariantViolation(
        "RCU stall", f"RCU stall: worker {inside[0]} is inside an RCU read-side critical "
        f"section and makes no progress ({what})", stalled_workers=inside, worker=inside[0],
        rcu_reader_word=words.load(layout.slot(inside[0], Slot.RCU_READER)))
