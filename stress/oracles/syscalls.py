"""System calls: what userspace gets back from KVM's ioctls.

Checked where the harness, the VMM, gets an ioctl's return value (the
``sys_exit`` hook, the kernel's raw_syscalls:sys_exit tracepoint), or where
the ioctl returns, while the lock that serialises its callers is still held.
"""

from __future__ import annotations

from stress.model.kvm import Kvm, gfn_to_memslot, has_pending_signal, kvm_mem_is_private
from stress.model.td import EINTR
from stress.oracles.base import oracle


@oracle("EINTR without a signal",
        invariant="an ioctl fails with -EINTR only when a signal is pending: userspace "
                  "restarts it on EINTR, so one without a signal is a call that fails for "
                  "no reason, and one that keeps coming back never lets the call complete",
        hook="sys_exit", when="the harness, at each ioctl's return to userspace",
        cost="one comparison per ioctl (two loads on -EINTR)")
def eintr_means_signal(kvm: Kvm, call: str, ret: int) -> None:
    if ret == -EINTR and not has_pending_signal(kvm):
        kvm.bug("EINTR without a signal",
                f"{call} returned -EINTR with no signal pending", ioctl=call)


@oracle("memory attributes not set",
        invariant="KVM_SET_MEMORY_ATTRIBUTES returns success only when every gfn of its range "
                  "that a memslot holds has the requested attributes",
        hook="set_memory_attributes_return",
        when="the ioctl's return, slots_lock still held (no other conversion in between)",
        cost="one load per gfn of the range")
def attributes_set_on_success(kvm: Kvm, start: int, end: int, private: bool) -> None:
    if not kvm.geometry.tdx:  # only a TD has private memory (kvm_mem_is_private)
        return
    for gfn in range(start, end):
        if gfn_to_memslot(kvm, gfn) is not None and kvm_mem_is_private(kvm, gfn) != private:
            kvm.bug("memory attributes not set",
                    "KVM_SET_MEMORY_ATTRIBUTES returned success with a gfn of its range still "
                    f"{'shared' if private else 'private'}",
                    gfn=gfn, range=(start, end), private=private)
