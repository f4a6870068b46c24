"""x86.c's vCPU entry: requests are serviced before the vCPU enters guest mode.

Above roots.py (a KVM_REQ_MMU_FREE_OBSOLETE_ROOTS drops the vCPU's root) and
tlb.py (a KVM_REQ_TLB_FLUSH empties its TLB); the requests, kicks and
``vcpu->mode`` words are tlb.py's.
"""

from __future__ import annotations

from stress.model.kvm import Kvm, kvm_mem_is_private
from stress.model.roots import is_root_invalid, kvm_mmu_unload
from stress.model.tlb import (
    H_MODE,
    H_REQUESTS,
    IN_GUEST_MODE,
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    KVM_REQ_TLB_FLUSH,
    OUTSIDE_GUEST_MODE,
    guest_access_in_mode,
    kvm_vcpu_flush_tlb_all,
)


def vcpu_enter_guest(kvm: Kvm) -> None:
    """Enter guest mode, servicing requests first (vcpu_enter_guest).

    The TLB is emptied *before* the request bit is cleared, so an oracle that
    reads the bit as clear and then finds an entry is looking at a live one.
    """
    w, lay = kvm.w, kvm.layout
    mode_i, req_i = lay.tlb_hdr(kvm.me, H_MODE), lay.tlb_hdr(kvm.me, H_REQUESTS)
    while True:
        w.xchg(mode_i, IN_GUEST_MODE)  # smp_store_mb(vcpu->mode, IN_GUEST_MODE)
        req = w.load(req_i)
        if not req:
            return
        w.store(mode_i, OUTSIDE_GUEST_MODE)
        if req & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS:
            root = kvm.vcpu.root
            if root is not None and is_root_invalid(kvm, root):
                kvm_mmu_unload(kvm, kvm.vcpu)  # empties the TLB too
                kvm.stats["obsolete_roots_dropped"] += 1
            w.fetch_and(req_i, ~KVM_REQ_MMU_FREE_OBSOLETE_ROOTS & ((1 << 64) - 1))
        if req & KVM_REQ_TLB_FLUSH:
            kvm_vcpu_flush_tlb_all(kvm)
            kvm.stats["tlb_flushes_serviced"] += 1
            w.fetch_and(req_i, ~KVM_REQ_TLB_FLUSH & ((1 << 64) - 1))


def vcpu_exit_guest(kvm: Kvm) -> None:
    kvm.w.store(kvm.layout.tlb_hdr(kvm.me, H_MODE), OUTSIDE_GUEST_MODE)


def guest_access(kvm: Kvm, gfn: int, write: bool) -> bool:
    """The guest touches ``gfn``: True if the access completed, False on an EPT
    violation (the vCPU must fault).  Enters guest mode (servicing requests),
    accesses through tlb.py's walker lock-free, and leaves."""
    if kvm.vcpu.root is None:
        return False  # no root loaded: the entry path loads one (kvm_mmu_reload)
    if kvm_mem_is_private(kvm, gfn):
        return True  # the S-EPT translates it (not modelled)
    vcpu_enter_guest(kvm)
    try:
        return guest_access_in_mode(kvm, gfn, write)
    finally:
        vcpu_exit_guest(kvm)
