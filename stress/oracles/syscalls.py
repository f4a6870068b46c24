"""System calls: what userspace gets back from KVM's ioctls.

Checked where the harness, the VMM, gets an ioctl's return value (the
``sys_exit`` hook, the kernel's raw_syscalls:sys_exit tracepoint).
"""

from __future__ import annotations

from stress.model.kvm import Kvm, has_pending_signal
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
