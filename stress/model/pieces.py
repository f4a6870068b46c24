"""The pieces a protocol variant swaps: one named, documented signature each.

Every field of ``Variant`` (variants.py) that holds a function has one of the
types below.  Each is a ``typing.Protocol`` whose ``__call__`` takes the
arguments the kernel function it stands for takes, named as the kernel names
them, and whose docstring is the piece's contract: which lock the caller
holds, what the piece returns, what it must do and what it must not do.  A
replacement breaks the contract on purpose (that is what a bug variant is) or
keeps it in another way (a design proposal); ``FIXED`` in variants.py says
which function of the model is the upstream piece.

The parameters are positional-only (``/``): a replacement may name them as it
likes; the model always passes them by position.

Only variants.py imports it; it sits above kvm.py and tdp_iter.py, whose
types it names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from stress.model.kvm import Kvm
from stress.model.tdp_iter import TdpIter

SeamcallFn = Callable[..., int]


# ---------------------------------------------------------------------------
# Writing SPTEs (tdp_mmu.py)
# ---------------------------------------------------------------------------

class InstallLeaf(Protocol):
    def __call__(self, kvm: Kvm, iter: TdpIter, new_spte: int, /) -> int:
        """tdp_mmu_map_handle_target_level's install of the fault's leaf SPTE
        (fixed: ``tdp_mmu_install_leaf_atomic``, i.e. ``tdp_mmu_set_spte_atomic``).

        mmu_lock is held for read, inside the fault's RCU read-side section;
        ``iter`` sits at the target level with ``iter.old_spte`` the snapshot the
        fault decided on (not frozen, not the new value).  Must change the entry
        only if it still holds that snapshot, in one atomic step, so of two
        tasks racing on the entry exactly one wins; a mirror entry must reach
        the S-EPT before anyone can use it (``set_mirror_spte_atomic``).
        Returns 0 if ``new_spte`` is installed (handle_changed_spte has run);
        -EBUSY if the entry changed since the snapshot, with ``iter.old_spte``
        refreshed and nothing else changed (the fault returns RET_PF_RETRY).
        Must not write a frozen entry, yield or drop mmu_lock or RCU.
        """
        ...


class ZapSpteAtomic(Protocol):
    def __call__(self, kvm: Kvm, iter: TdpIter, /) -> int:
        """tdp_mmu_zap_spte_atomic: zap one present leaf with mmu_lock held for
        read and flush it (fixed: freeze, kvm_flush_remote_tlbs_gfn, clear).

        ``iter.old_spte`` is the snapshot of a present leaf of a direct root.
        Until every vCPU's TLB has dropped the old translation, no task may
        install a new one for the gfn (the entry stays FROZEN meanwhile), and
        the flush must be done before this returns (the caller owes none).
        Returns 0 once the entry is non-present and flushed; -EBUSY if the
        entry changed since the snapshot (``iter.old_spte`` refreshed, nothing
        changed; the caller retries the same entry).  Must not yield, or leave
        the entry frozen.
        """
        ...


class WriteSpte(Protocol):
    def __call__(self, kvm: Kvm, sptep: int, old_spte: int, new_spte: int, level: int,
                 /) -> int:
        """kvm_tdp_mmu_write_spte: the store behind tdp_mmu_set_spte, mmu_lock
        held for write.  The CPU may still set A/D bits in a present leaf
        without mmu_lock (spte_has_volatile_bits), so for such an entry the
        write must be an xchg.  Returns the value actually replaced (which may
        carry a D bit ``old_spte``, the caller's snapshot, lacks).  Must not
        run handle_changed_spte or trace: the caller does both."""
        ...


class SetMirrorSpteAtomic(Protocol):
    def __call__(self, kvm: Kvm, iter: TdpIter, new_spte: int, /) -> int:
        """tdp_mmu_set_spte_atomic on a mirror SPTE (TDX), mmu_lock held for
        read; ``new_spte`` is not FROZEN (freezing is done through the plain
        cmpxchg path).  The mirror and the S-EPT may disagree only while the
        entry is frozen by this task: set_external_spte runs in between, and on
        its failure the old value comes back.  Returns 0 (published, both
        sides agree) or -EBUSY (``iter.old_spte`` refreshed, the entry as it
        was: lost the freeze, or the TDX module said BUSY)."""
        ...


class ChangedSpteRemovesPt(Protocol):
    def __call__(self, kvm: Kvm, old_spte: int, new_spte: int, level: int, /) -> bool:
        """handle_changed_spte's test for a present non-leaf ``old_spte``: did
        this change remove its child table (so handle_removed_pt must tear it
        down)?  Fixed: yes when the entry became a leaf or non-present
        (!leaf => leaf, not a PFN change).  Pure: no side effects."""
        ...


# ---------------------------------------------------------------------------
# Removing page tables (handle_removed_pt)
# ---------------------------------------------------------------------------

class FreezeChildren(Protocol):
    def __call__(self, kvm: Kvm, pt: int, shared: bool, /) -> list[tuple[int, int]]:
        """handle_removed_pt's loop over the 512 entries of the unlinked table
        ``pt``: freeze each one and return (index, old value) of those that
        were present, for handle_changed_spte.  ``shared``: mmu_lock held for
        read, so a task that walked into the table before it was unlinked may
        still cmpxchg its entries: every entry, non-present ones included, must
        be frozen atomically (xchg), so that such a cmpxchg fails.  With the
        write lock nobody else writes them.  Must not free the table."""
        ...


class FreeRemovedSp(Protocol):
    def __call__(self, kvm: Kvm, sp: int, /) -> None:
        """How handle_removed_pt releases the removed table's page (fixed:
        call_rcu with tdp_mmu_free_sp_rcu_callback).  Walkers inside an RCU
        read-side section may still read the page: it must not be freed or
        reused before a grace period has ended."""
        ...


# ---------------------------------------------------------------------------
# The mirror and the S-EPT (TDX, mirror.py)
# ---------------------------------------------------------------------------

class IsMirrorSptep(Protocol):
    def __call__(self, iter: TdpIter, /) -> bool:
        """is_mirror_sptep: does the entry at ``iter`` have an external (S-EPT)
        copy that the external hooks must keep in step?  Fixed: the table's
        role (``role.is_mirror``), known to faults, zaps and teardown alike.
        Pure."""
        ...


class IsMirrorSp(Protocol):
    def __call__(self, kvm: Kvm, sp: int, /) -> bool:
        """is_mirror_sp: is the shadow page ``sp`` a mirror table, whose S-EPT
        page free_external_spt must release?  Pure."""
        ...


class SetExternalSpte(Protocol):
    def __call__(self, kvm: Kvm, gfn: int, old_spte: int, new_spte: int, level: int,
                 /) -> int:
        """kvm_x86_ops.set_external_spte: make the S-EPT entry of ``gfn`` at
        ``level`` follow the mirror's change ``old_spte`` -> ``new_spte``.  Map
        side (non-present -> present): mmu_lock held for read, the mirror entry
        frozen by the caller (SEPT.ADD, AUG, or ADD before the TD runs).
        Removal (present -> non-present): mmu_lock held for write (BLOCK,
        TRACK, REMOVE), which must not fail.  Returns 0 or -EBUSY (map side
        only: the caller restores the old value and the fault retries)."""
        ...


class FreeExternalSpt(Protocol):
    def __call__(self, kvm: Kvm, sp: int, /) -> None:
        """kvm_x86_ops.free_external_spt: give back the S-EPT page of the
        removed mirror table ``sp``.  Fixed: only after the HKID is released
        (TDH.PHYMEM.PAGE.RECLAIM); a page the module keeps is leaked on
        purpose, never reused."""
        ...


class TdhDoNoVcpus(Protocol):
    def __call__(self, kvm: Kvm, name: str, call: SeamcallFn, /, *args: int) -> int:
        """tdh_do_no_vcpus: issue the removal SEAMCALL ``call(*args)`` (named
        ``name`` in traces) with mmu_lock held for write.  On
        TDX_OPERAND_BUSY (a vCPU inside the TD holds the module's lock), keep
        vCPUs out (wait_for_sept_zap), kick them out (KVM_REQ_OUTSIDE_GUEST_MODE)
        and retry once.  Returns the SEAMCALL's final status; the caller cannot
        handle a failure (TDX_BUG_ON)."""
        ...


class TdxTrack(Protocol):
    def __call__(self, kvm: Kvm, /) -> None:
        """tdx_track: TDH.MEM.TRACK, then kick every vCPU out of the TD once, so
        none runs on the old TLB epoch before a page is removed.  mmu_lock
        held for write (two TRACKs must not overlap).  Must not fail."""
        ...


# ---------------------------------------------------------------------------
# TDX vCPU and VM ioctls (td.py)
# ---------------------------------------------------------------------------

class EptViolationLocalRetry(Protocol):
    def __call__(self, kvm: Kvm, gfn: int, tries: int, /) -> bool:
        """tdx_handle_ept_violation's loop condition after RET_PF_RETRY on
        ``gfn`` (``tries`` so far): True to fault again without re-entering
        the guest, False to leave the loop (an event to inject, a signal).
        Called with no lock held; must not take mmu_lock."""
        ...


class PrefaultGpaDirect(Protocol):
    def __call__(self, kvm: Kvm, gfn: int, /) -> bool:
        """KVM_PRE_FAULT_MEMORY: does the gpa of ``gfn`` carry the TD's direct
        (shared) bit, i.e. does kvm_tdp_map_page pick the direct root?  Fixed:
        exactly for shared gfns.  Pure."""
        ...


class FaultinInvalidSlot(Protocol):
    def __call__(self, kvm: Kvm, prefetch: bool, /) -> int:
        """kvm_mmu_faultin_pfn on a gfn whose memslot is KVM_MEMSLOT_INVALID (being
        moved or deleted): what the fault returns.  The caller holds kvm->srcu, and
        the move's synchronize_srcu waits for it, so a loop around the fault must be
        able to give up.  Fixed: RET_PF_RETRY for a fault (the vCPU re-enters and
        drops kvm->srcu), -EAGAIN for a prefetch (KVM_PRE_FAULT_MEMORY)."""
        ...


class MapInitialPage(Protocol):
    def __call__(self, kvm: Kvm, gfn: int, pfn: int, /) -> int:
        """KVM_TDX_INIT_MEM_REGION's mapping of one page of the initial image
        (``pfn`` at ``gfn``, private) before the TD runs: the caller holds the
        VM state locks (tdx_vm_state_guard), not mmu_lock, which the piece
        takes itself (fixed: for read, retrying while the map says
        RET_PF_RETRY).  Returns 0 once the mirror and the S-EPT map it
        (PAGE.ADD), or a negative errno."""
        ...


class TdxVmStateGuard(Protocol):
    def __call__(self, kvm: Kvm, /) -> list[int]:
        """The locks KVM_TDX_INIT_MEM_REGION and other VM-state ioctls hold
        (fixed: kvm->lock, every vcpu->mutex, slots_lock), taken in lock order.
        Must keep every other vCPU ioctl (whose SEAMCALLs take the TDR shared)
        out while PAGE.ADD and MR.EXTEND hold it exclusively.  Returns the lock
        words taken, innermost last; the caller releases them in reverse."""
        ...


# ---------------------------------------------------------------------------
# Roots (roots.py)
# ---------------------------------------------------------------------------

class RootFilter(Protocol):
    def __call__(self, kvm: Kvm, root: int, types: int, /) -> bool:
        """tdp_mmu_next_root's test of a listed root: is it visited by an
        iteration over ``types`` (KVM_DIRECT_ROOTS, KVM_MIRROR_ROOTS,
        KVM_INVALID_ROOTS, or'ed)?  Fixed: tdp_mmu_root_match (by its mirror
        role; an invalid one only if KVM_INVALID_ROOTS is asked for too).
        Called under RCU, before the reference is taken; a root this rejects is
        never visited, so an mmu_notifier, a conversion or teardown must still
        see every root that can map the range.  Pure."""
        ...


class PutRoot(Protocol):
    def __call__(self, kvm: Kvm, root: int, /) -> None:
        """kvm_tdp_mmu_put_root: drop one reference of ``root``; the last one
        unlinks it from the roots list and frees it after an RCU grace period.
        Any lock state (read lock, write lock, none).  Must never free a root
        another task still holds a reference on, nor resurrect one at 0."""
        ...


class ZapInvalidatedRoots(Protocol):
    def __call__(self, kvm: Kvm, shared: bool, /) -> None:
        """kvm_tdp_mmu_zap_invalidated_roots: zap every root the last
        invalidation scheduled (``scheduled_to_zap``), yielding, with mmu_lock
        held for read if ``shared`` else for write, then put the TDP MMU's
        reference of each exactly once."""
        ...


# ---------------------------------------------------------------------------
# Yielding (tdp_mmu.py)
# ---------------------------------------------------------------------------

class IterCondResched(Protocol):
    def __call__(self, kvm: Kvm, iter: TdpIter, shared: bool, flush: bool, /) -> bool:
        """tdp_mmu_iter_cond_resched: maybe yield mmu_lock (held for read if
        ``shared``, else for write) and RCU in the middle of a walk.  Only
        after forward progress since the last yield (no livelock).  Before
        dropping either, a pending TLB flush (``flush``) must be serviced: once
        RCU is dropped zapped tables may be freed, once mmu_lock is dropped
        another task may free a page this one unmapped.  Returns True if it
        yielded: the locks are held again, ``iter.yielded`` is set (the walk
        restarts from the root at ``next_last_level_gfn``) and the caller owes
        no flush any more; False if it did nothing."""
        ...


# ---------------------------------------------------------------------------
# Nested TDP: unsync (unsync.py)
# ---------------------------------------------------------------------------

class TryToUnsync(Protocol):
    def __call__(self, kvm: Kvm, sp: int, /) -> int:
        """mmu_try_to_unsync_pages' marking of the indirect shadow page ``sp``
        unsync, from a TDP MMU fault (mmu_lock held for read, so other faults
        run it concurrently).  The unsync flag, the parents' unsync_children
        bitmaps and counts and kvm->stat.mmu_unsync must change once per page,
        as a unit (fixed: mmu_unsync_pages_lock, double-checked).  Returns 0
        (marked, or already unsync: the SPTE may be writable) or -EPERM
        (write-protect it and emulate the write)."""
        ...


# ---------------------------------------------------------------------------
# Invalidations and attributes (notifier.py)
# ---------------------------------------------------------------------------

class Faultin(Protocol):
    def __call__(self, kvm: Kvm, gfn: int, /) -> tuple[int, int]:
        """kvm_mmu_faultin_pfn: snapshot mmu_invalidate_seq, then look up the
        pfn of ``gfn`` (in that order: smp_rmb).  No mmu_lock held.  Returns
        (mmu_seq, pfn), the seq for fault_retry_check."""
        ...


class FaultRetryCheck(Protocol):
    def __call__(self, kvm: Kvm, mmu_seq: int, gfn: int, /) -> bool:
        """is_page_fault_stale's mmu_invalidate_retry_gfn, mmu_lock held for
        read: True if an invalidation covering ``gfn`` is in progress or one
        ended since the fault's ``mmu_seq``, so the pfn may be stale and the
        fault must retry.  Pure."""
        ...


class InvalidateEnd(Protocol):
    def __call__(self, kvm: Kvm, post: Callable[[], None] | None = None, /) -> None:
        """kvm_mmu_invalidate_end at the end of an invalidation (the caller
        holds no lock): run ``post`` (a conversion's
        post_set_memory_attributes) and then end it, seq++ before
        in_progress--, both with mmu_lock held for write, so a fault under
        the read lock sees either the invalidation or the new seq."""
        ...


class PreSetMemoryAttributes(Protocol):
    def __call__(self, kvm: Kvm, start: int, end: int, private: bool, /) -> int:
        """kvm_arch_pre_set_memory_attributes on [start, end), mmu_lock held
        for write inside the invalidation: zap every mapping of the root type
        that no longer owns the range (to private: the direct roots; to
        shared: the mirror, through the S-EPT hooks).  Returns the entries
        zapped."""
        ...


class PreSetRangeAdd(Protocol):
    def __call__(self, kvm: Kvm, start: int, end: int, /) -> None:
        """What kvm_arch_pre_set_memory_attributes adds to the invalidation
        besides [start, end), mmu_lock held for write (fixed: the whole 2M
        region of a head or tail that is not mixed), so no fault maps a huge
        page over gfns whose attributes are changing."""
        ...


class ZapLeafsRoots(Protocol):
    def __call__(self, kvm: Kvm, roots: Iterable[int], start: int, end: int,
                 can_yield: bool, /) -> tuple[int, bool]:
        """kvm_tdp_mmu_zap_leafs over every root of ``roots`` (pinned by the
        iterator), mmu_lock held for write, yielding if ``can_yield`` (the
        range's may_block): the pending flush of the roots zapped so far must
        be handed to the next root's zap, whose yields service it before
        dropping mmu_lock.  Returns (leaves zapped, flush still pending for the
        caller)."""
        ...


class ZapReleaseRcu(Protocol):
    def __call__(self, kvm: Kvm, flush: bool, /) -> bool:
        """The end of a zap that may have removed tables: release RCU (the
        caller's rcu_read_lock) and return the TLB flush left to the caller.
        Fixed: a pending ``flush`` is serviced first, so no vCPU's
        paging-structure cache holds a removed table once its grace period
        can end."""
        ...


__all__ = [
    "ChangedSpteRemovesPt", "EptViolationLocalRetry", "FaultRetryCheck", "Faultin",
    "FreeExternalSpt", "FreeRemovedSp", "FreezeChildren", "InstallLeaf", "InvalidateEnd",
    "IsMirrorSp", "IsMirrorSptep", "IterCondResched", "MapInitialPage", "PrefaultGpaDirect",
    "PreSetMemoryAttributes", "PreSetRangeAdd", "PutRoot", "RootFilter", "SetExternalSpte",
    "SetMirrorSpteAtomic", "TdhDoNoVcpus", "TdxTrack", "TdxVmStateGuard", "TryToUnsync",
    "WriteSpte", "ZapInvalidatedRoots", "ZapLeafsRoots", "ZapReleaseRcu", "ZapSpteAtomic",
]
