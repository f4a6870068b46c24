"""Memslots being moved, and kvm->srcu: the wait a memslot update makes.

Design note.  A memslot DELETE or MOVE first installs the slot with
``KVM_MEMSLOT_INVALID`` and waits for every SRCU reader that could still see
the old slot (``synchronize_srcu``); only then is the slot's range zapped
(``kvm_arch_flush_shadow_memslot``; on a TD ``kvm_mmu_zap_memslot``, every root
with mmu_lock held for write) and the new slot installed.  A vCPU holds
``kvm->srcu`` while it handles an exit (not while it runs the guest), and an
ioctl like KVM_PRE_FAULT_MEMORY holds it for its whole range.  A fault on a
gfn of an invalid slot cannot succeed until the move is done: it must give up
its SRCU read-side section, or the move never completes (the deadlocks fixed
by 2bc2694fe20b and 3ccbf6f47098).

``synchronize_srcu`` waits as long as it takes, each round a ``wait`` hook
point naming the reader it waits for: the liveness oracle bounds the rounds
and names the reader, where it is and what it keeps retrying.
"""

from __future__ import annotations

from stress.arena import Globals, Slot
from stress.model.kvm import Kvm


def srcu_read_lock(kvm: Kvm, gfn: int = -1) -> None:
    """srcu_read_lock(&kvm->srcu); ``gfn``: the fault being handled (reports)."""
    lay = kvm.layout
    kvm.w.store(lay.slot(kvm.me, Slot.SRCU_SITE), gfn + 1)
    kvm.w.store(lay.slot(kvm.me, Slot.SRCU_READER), kvm.w.load(lay.glob(Globals.SRCU_GP)) + 1)


def srcu_read_unlock(kvm: Kvm) -> None:
    kvm.w.store(kvm.layout.slot(kvm.me, Slot.SRCU_READER), 0)


def synchronize_srcu(kvm: Kvm) -> None:
    """Wait until every reader that entered before this call has left."""
    w, lay = kvm.w, kvm.layout
    gp = w.fetch_add(lay.glob(Globals.SRCU_GP), 1) + 1
    while True:
        waiting = [v for v in range(lay.n_slots) if v != kvm.me
                   and 0 < w.load(lay.slot(v, Slot.SRCU_READER)) <= gp]
        if not waiting:
            return
        w.check_abort("synchronize_srcu")
        v = waiting[0]
        kvm.hooks.wait(kvm, "synchronize_srcu", w.load(lay.slot(v, Slot.SRCU_SITE)) - 1, v)
        w.relax()
        w.pause(0.00005)


def memslot_invalid(kvm: Kvm, gfn: int) -> bool:
    """The gfn's memslot has KVM_MEMSLOT_INVALID (being deleted or moved)."""
    w, lay = kvm.w, kvm.layout
    end = w.load(lay.glob(Globals.MEMSLOT_INVALID_END))
    return bool(end) and w.load(lay.glob(Globals.MEMSLOT_INVALID_START)) <= gfn < end

