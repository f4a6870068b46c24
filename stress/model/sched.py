"""The scheduler as the TDP MMU sees it: ``need_resched()``, ``rwlock_needbreak()``
and ``cond_resched_rwlock_{read,write}()``.

Read from kernel/sched/core.c at intel-lab-lkp/linux 0091ef492952 (a 2025
mainline base, lazy preemption merged) and include/linux/spinlock.h after
"sched/core: Drop spinlocks on contention iff kernel is preemptible" (Sean
Christopherson, 2024)::

    int __cond_resched_rwlock_read(rwlock_t *lock)
    {
            int resched = should_resched(PREEMPT_LOCK_OFFSET);
            ...
            if (rwlock_needbreak(lock) || resched) {
                    read_unlock(lock);
                    if (!_cond_resched())   /* should_resched(0): preempt_schedule_common() */
                            cpu_relax();
                    ret = 1;
                    read_lock(lock);
            }
            return ret;
    }

``rwlock_needbreak(lock)`` is ``rwlock_is_contended(lock)`` on a preemptible
kernel (the model's: full preemption), i.e. qrwlock's
``arch_spin_is_locked(&lock->wait_lock)``: some task, reader or writer, waits in
a slow path (native/atomics.c: RW_WAITING or RW_QUEUED, see Kvm.rwlock_needbreak).

``need_resched()`` is this task's TIF_NEED_RESCHED.  The scheduler tick sets it
once the task has run longer than its timeslice since it was last scheduled, and
``__schedule`` clears it when the task is switched out.  The model draws each
timeslice from an exponential distribution of mean ``[sched] timeslice``
(``Kvm.timeslice_ns``; 0: the tick never sets it, only contention breaks a
walk) with the task's own seeded RNG, and measures run time on the task clock
(``Words.task_clock_ns``: CLOCK_MONOTONIC in a free run; in a controlled run
the task's own scheduling points, ACCESS_NS each, so need_resched() comes at the
same accesses in every replay).  A task is scheduled when it sleeps
(``Words.pause``) or yields (``Words.sched_yield``); a controlled run also starts
every op on a fresh timeslice drawn from the op's seed (``sched_start_op``), so
deleting an op (shrinking) does not move the yields of the others.
"""

from __future__ import annotations

from stress.model.kvm import Kvm


def _sync(kvm: Kvm) -> None:
    """The task was scheduled out since its slice began (it slept or yielded):
    __schedule cleared TIF_NEED_RESCHED and a new slice starts."""
    at = kvm.w.scheduled_at
    if at != kvm.slice_start:
        kvm.slice_start = at
        kvm.tif_need_resched = False
        mean = kvm.timeslice_ns
        kvm.slice_ns = kvm.sched_rng.expovariate(1.0 / mean) if mean else 0.0


def need_resched(kvm: Kvm) -> bool:
    """need_resched(): TIF_NEED_RESCHED, set by the tick (scheduler_tick ->
    resched_curr) once this task has used up its timeslice."""
    _sync(kvm)
    if not kvm.tif_need_resched and kvm.timeslice_ns and (
            kvm.w.task_clock_ns() - kvm.slice_start >= kvm.slice_ns):
        kvm.tif_need_resched = True
    return kvm.tif_need_resched


def set_tsk_need_resched(kvm: Kvm) -> None:
    """resched_curr() on this task: the next need_resched() is true until it is
    scheduled out."""
    _sync(kvm)
    kvm.tif_need_resched = True


def sched_start_op(kvm: Kvm, seed: int) -> None:
    """A controlled run's op boundary: a fresh timeslice from the op's own seed."""
    kvm.sched_rng.seed(seed ^ 0x5C4ED)
    kvm.slice_start = -1
    kvm.w.scheduled_at = kvm.w.task_clock_ns()
    _sync(kvm)


def preempt_schedule_common(kvm: Kvm) -> None:
    """schedule(): the CPU goes to another task; TIF_NEED_RESCHED is cleared."""
    kvm.w.sched_yield()
    _sync(kvm)
    kvm.stats["schedules"] += 1


def _cond_resched(kvm: Kvm) -> bool:
    """__cond_resched: schedule if need_resched(); True if it did."""
    if need_resched(kvm):
        preempt_schedule_common(kvm)
        return True
    return False


def non_block_start(kvm: Kvm) -> None:
    """non_block_start(): current->non_block_count++; this task may not sleep
    until non_block_end() (an mmu_notifier callback that may not block)."""
    kvm.non_block_count += 1


def non_block_end(kvm: Kvm) -> None:
    """non_block_end(): current->non_block_count--."""
    kvm.non_block_count -= 1


def __might_resched(kvm: Kvm, where: str) -> None:  # noqa: N807 (kernel name)
    """__might_resched() (CONFIG_DEBUG_ATOMIC_SLEEP) at the top of cond_resched()
    and cond_resched_rwlock_{read,write}(): the task must be allowed to sleep
    here, whether or not it then does: not in a non-blocking section
    (current->non_block_count) nor in an RCU read-side critical section
    (rcu_preempt_depth(), PREEMPT_RCU; mmu_lock itself is the offset the
    rwlock variants allow).  Named as the kernel engine names the same splat."""
    if kvm.non_block_count or kvm.rcu.nesting:
        kvm.bug("sleeping in atomic context",
                f"BUG: sleeping function called from invalid context: {where}",
                non_block=kvm.non_block_count, rcu_nest_depth=kvm.rcu.nesting)


def cond_resched(kvm: Kvm) -> bool:
    """cond_resched() in a retry loop (and the need_resched() check before a
    guest entry): schedule() if need_resched(); otherwise the model's relax()
    (nothing in a free run; in a controlled one a spinning retry hands the turn
    on, or it would keep it until its slice ends).  True if it scheduled."""
    __might_resched(kvm, "cond_resched")
    if _cond_resched(kvm):
        return True
    kvm.w.relax()
    return False


def cpu_relax(kvm: Kvm) -> None:
    """cpu_relax() between dropping and retaking a contended lock: nothing in a
    free run (the waiter spins on another CPU), a hand-over in a controlled one."""
    kvm.w.relax()


def cond_resched_rwlock_read(kvm: Kvm) -> bool:
    """__cond_resched_rwlock_read(&kvm->mmu_lock): drop the read lock if someone
    waits for mmu_lock or this task should reschedule, then take it again.
    True if the lock was dropped."""
    __might_resched(kvm, "cond_resched_rwlock_read")
    resched = need_resched(kvm)  # should_resched(PREEMPT_LOCK_OFFSET)
    kvm.lockdep_assert_held_read()
    if kvm.rwlock_needbreak() or resched:
        kvm.read_unlock()
        if not _cond_resched(kvm):
            cpu_relax(kvm)
        kvm.read_lock()
        return True
    return False


def cond_resched_rwlock_write(kvm: Kvm) -> bool:
    """__cond_resched_rwlock_write(&kvm->mmu_lock): the same with the write lock."""
    __might_resched(kvm, "cond_resched_rwlock_write")
    resched = need_resched(kvm)
    kvm.lockdep_assert_held_write()
    if kvm.rwlock_needbreak() or resched:
        kvm.write_unlock()
        if not _cond_resched(kvm):
            cpu_relax(kvm)
        kvm.write_lock()
        return True
    return False
