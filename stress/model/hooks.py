"""The model's hook points: where the tester's oracles attach.

The model keeps only the kernel's own assertions (``KVM_BUG_ON``,
``WARN_ON_ONCE``, lockdep, ``BUG``: :meth:`Kvm.bug` and :meth:`Kvm.warn`).
Everything else the tester checks lives above the model, in
:mod:`stress.oracles`, and reaches the model's state only through these
hooks, each called at one point in the protocol where the kernel has a
tracepoint, a KASAN-style instrumentation point, or a function boundary with a
documented postcondition.  Each hook names that point; the arguments are what
an oracle needs to check it without re-deriving the model's locals.

:class:`Hooks` is the no-op default: the model runs without oracles (bench,
unit tests).  One hook is not a no-op, because the model cannot go on past
it: :meth:`kasan_report` (the walker would dereference freed memory) raises
the kernel's BUG.

A hook runs in the caller's locking context (each says what is held); an
oracle reads shared words through ``kvm.w``, changes no protocol state
(only its own bookkeeping words) and reports by raising
:class:`InvariantViolation`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stress.model.errors import InvariantViolation

if TYPE_CHECKING:
    from stress.model.kvm import Kvm


# The model's retry loops, by the kernel function that goes round them.  A
# ``retry`` hook names one of these; liveness oracles count the rounds.
RETRY_SITES = (
    "kvm_tdp_page_fault",  # the vCPU re-enters after RET_PF_RETRY
    "vcpu_enter_guest",  # the guest re-executes an access whose exit was handled
    "tdx_handle_ept_violation",  # a TD's private fault retried locally
    "kvm_tdp_map_page",  # KVM_PRE_FAULT_MEMORY's loop
    "kvm_tdp_mmu_map_private_pfn",  # the initial image's map loop
    "tdp_mmu_zap_spte_atomic",  # a read-lock zap lost its cmpxchg: goto retry
    "tdp_mmu_set_spte_atomic",  # another read-lock write (clear D, wrprot) lost its cmpxchg
    "tdh_mem_busy",  # a removal SEAMCALL retried while TDX_OPERAND_BUSY
    "synchronize_srcu",  # a memslot update waits for kvm->srcu readers
)


class Hooks:
    """No-op hook points (see the module docstring); :mod:`stress.oracles`
    subclasses this."""

    # -- memory: KASAN-like instrumentation of the page-table pool -------------
    def kasan_report(self, kvm: Kvm, kind: str, **details: Any) -> None:
        """A walker (KVM's or the guest's) read a page-table page that is free,
        was freed and reused while it walked it, or is not the table its parent
        says (``kind``: "poison", "reused", "bad-child").  Without an oracle the
        model cannot continue past a freed page: BUG."""
        raise InvariantViolation("use-after-free of page-table page",
                                 f"BUG: KASAN: use-after-free ({kind})", **details)

    def kernel_warning(self, kvm: Kvm, what: str, details: dict[str, Any]) -> None:
        """A WARN_ON_ONCE of the model fired (``kvm.warn``): counted already;
        ``details`` say where (the gfn, the level, the entries)."""

    def iter_level(self, kvm: Kvm, it: Any) -> None:
        """The TDP iterator ``it`` has just changed level (``try_step_down`` /
        ``try_step_up``), before it reads anything at the new one."""

    def sp_free(self, kvm: Kvm, page: int) -> None:
        """tdp_mmu_free_sp_rcu_callback, before the page goes back to the pool:
        the grace period is over and the page is about to be freed."""

    def host_page_release(self, kvm: Kvm, gfn: int, pfn: int) -> None:
        """The primary MMU releases the host page ``pfn`` backing ``gfn``
        (put_page after an invalidation, a migration or a punch-hole)."""

    def guest_translate(self, kvm: Kvm, gfn: int, pfn: int, how: str) -> None:
        """The guest's access to ``gfn`` completed through ``pfn`` (a TLB hit or
        a hardware walk)."""

    # -- SPTE stores --------------------------------------------------------------
    def spte_store(self, kvm: Kvm, sptep: int, gfn: int, level: int, old: int,
                   new: int) -> None:
        """KVM changed the SPTE at ``sptep`` from ``old`` to ``new``, at the
        store or cmpxchg that did it (trace_kvm_tdp_mmu_spte_changed; freezes
        and the owner's publish of a frozen entry included, handle_removed_pt's
        freeze of a dead table's children excluded: those stay frozen)."""

    # -- locking -----------------------------------------------------------------
    def mmu_lock_yield(self, kvm: Kvm) -> None:
        """A walk is about to drop mmu_lock to yield (tdp_mmu_iter_cond_resched,
        after its pending TLB flush)."""

    def mmu_lock_release(self, kvm: Kvm) -> None:
        """This task is about to drop mmu_lock (read_unlock or write_unlock), at the
        end of what it did under the lock."""

    # -- page faults -------------------------------------------------------------
    def leaf_installed(self, kvm: Kvm, it: Any, fault: Any, old_spte: int,
                       new_spte: int) -> None:
        """tdp_mmu_map_handle_target_level installed ``new_spte`` (the cmpxchg
        succeeded; mmu_lock still held for read): ``it`` is positioned on it,
        ``old_spte`` is what it replaced (trace_kvm_mmu_set_spte)."""

    def huge_split(self, kvm: Kvm, it: Any, sp: int) -> None:
        """tdp_mmu_split_huge_page filled table ``sp`` with the pieces of the
        huge leaf at ``it`` and is about to link it (the table still private)."""

    def leaf_installing(self, kvm: Kvm, it: Any) -> None:
        """The fault is about to install a leaf at ``it`` (its cmpxchg follows)."""

    def leaf_install_failed(self, kvm: Kvm, it: Any) -> None:
        """... and the cmpxchg lost (the fault retries)."""

    # -- zaps and invalidations --------------------------------------------------
    def zap_start(self, kvm: Kvm, types: int) -> int:
        """A leaf zap begins, over one root the caller holds (``types`` 0) or
        every root of ``types``; returns a token the matching :meth:`zap_done`
        gets back (0 without oracles)."""
        return 0

    def zap_done(self, kvm: Kvm, roots: list[int] | None, types: int, start: int, end: int,
                 token: int, max_level: int = 0) -> None:
        """A leaf zap of [start, end) returns, mmu_lock still held (read or
        write) and no TLB flush pending: over ``roots`` (each pinned by the
        caller), or over every listed root of ``types`` when ``roots`` is None.
        ``max_level``: a sub-tree zap at that level, which removes every entry
        at or below it and leaves the huge leaves above it (0: a leaf zap)."""

    def root_zapped(self, kvm: Kvm, root: int) -> None:
        """tdp_mmu_zap_root finished: the invalid root was zapped top to bottom."""

    def set_memory_attributes_return(self, kvm: Kvm, start: int, end: int,
                                     private: bool) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES on [start, end) returns success to userspace,
        slots_lock still held (so no other conversion has run since)."""

    def memory_attributes_set(self, kvm: Kvm, start: int, end: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES's post step (mmu_lock held for write): the
        attributes of [start, end) are the new ones and the invalidation ends."""

    def invalidate_range_start(self, kvm: Kvm, start: int, end: int) -> None:
        """An invalidation of [start, end) (mmu_notifier, attributes, punch-hole)
        takes mmu_lock for write, before kvm_mmu_invalidate_begin: the range's
        mappings are what the earlier, completed invalidations left."""

    def root_loaded(self, kvm: Kvm, root: int) -> None:
        """kvm_mmu_reload handed ``root`` to this vCPU (mmu_lock held for read)."""

    def root_zap(self, kvm: Kvm, root: int) -> None:
        """tdp_mmu_zap_root starts on ``root``."""

    def hkid_release(self, kvm: Kvm) -> None:
        """tdx_mmu_release_hkid is about to run: every guest_memfd was released."""

    def unsync_sync_done(self, kvm: Kvm) -> None:
        """kvm_mmu_sync_roots finished its walk, mmu_lock still held for write."""


    def sys_exit(self, kvm: Kvm, call: str, ret: int) -> None:
        """The ioctl ``call`` returns ``ret`` to userspace (the raw_syscalls
        sys_exit tracepoint): the harness, which is the VMM, reports what it got."""

    # -- liveness ----------------------------------------------------------------
    def retry(self, kvm: Kvm, site: str, key: int) -> None:
        """The operation in progress goes round the retry loop ``site`` (one of
        RETRY_SITES) once more for entry ``key`` (a gfn): no progress yet."""

    def wait(self, kvm: Kvm, site: str, key: int, holder: int) -> None:
        """The operation in progress waits another round at ``site`` for worker
        ``holder`` (e.g. synchronize_srcu for a reader still inside)."""

    def op_return(self, kvm: Kvm) -> None:
        """The harness: the worker's step returned (its ioctl or callback is back in
        user space), whether or not its operation is complete."""

    def op_end(self, kvm: Kvm) -> None:
        """The harness: the worker's operation completed (progress).  A vCPU's
        operation is the guest instruction: a step that handled an exit the
        instruction will be re-executed after has not completed it."""


NO_HOOKS = Hooks()
