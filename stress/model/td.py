"""A TD's vCPUs and VM ioctls: tdx.c's run path and EPT-violation handler, the
initial image, KVM_PRE_FAULT_MEMORY, MapGPA, and the guest's side of the
contract (accept a private page before using it).

Design note.  This follows kvm-x86's ``arch/x86/kvm/vmx/tdx.c`` at commit
09c6f74ecb86 and the pre-fault and private-pfn paths of ``mmu.c`` of the
same era (see the README's kernel map).  A vCPU of a TD enters the guest with
TDH.VP.ENTER, which takes the TDX module's locks: the TDR shared for as long
as the vCPU runs, the TD epoch shared, and, when the module suspects a
zero-step attack (more than ``zero_step_threshold`` entries re-faulting at
one guest RIP), the S-EPT tree exclusively.  While it runs, the guest's
TDCALLs take locks too: TDG.MEM.PAGE.ACCEPT takes the entry it accepts.  So
KVM's SEAMCALLs meet three kinds of callers, and the BUSY answers they get
are counted by the pair that collided.

The guest (an environment model, not KVM): a private page is usable only
once accepted; the guest remembers which host page it accepted (the page's
generation), so a page the host replaced (conversion, guest_memfd
punch-hole) is accepted anew, while a page KVM removed and re-added behind
the guest's back reads PENDING although the guest accepted it: KVM treats
that EPT violation as fatal (``kvm_vm_dead``), as upstream does.
"""

from __future__ import annotations

from stress.arena import Globals, Slot
from stress.model import events
from stress.model.guest import (
    accepted_index,
    guest_accepted,
    guest_mark_accepted,
    guest_release_private,
)
from stress.model.host import host_page_gen, host_pfn
from stress.model.kvm import Kvm, kvm_gfn_direct_bits, kvm_mem_is_private, signal_pending, vm_dead
from stress.model.memslot import memslot_invalid, srcu_read_lock, srcu_read_unlock
from stress.model.mirror import (
    KVM_BUG_ON,
    TDX_BUG_ON,
    count_busy,
    is_hkid_assigned,
    mirror_entry_now,
    seamcall,
    td_state,
)
from stress.model.notifier import vmm_convert_memory
from stress.model.sched import cond_resched
from stress.model.tdp_mmu import RET_PF_EXIT, RET_PF_RETRY, kvm_tdp_page_fault
from stress.model.tdx import (
    CALLER_NAMES,
    SEPT_MAPPED,
    SEPT_PENDING,
    TD_STATE_INITIALIZED,
    TD_STATE_RUNNABLE,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_SUCCESS,
    VP_ENTERED,
    VP_EPT_VIOLATION,
    describe_sept,
    tdx_operand_busy,
)
from stress.model.x86 import vcpu_enter_guest, vcpu_exit_guest

EINTR, EIO, EBUSY, EOPNOTSUPP = 4, 5, 16, 95
# tdx_vcpu_run's outcomes here
EXIT_FASTPATH_EXIT_HANDLED = -1  # no TD entry: wait_for_sept_zap, or VP.ENTER said BUSY
# the guest's retries of a TDCALL that answers BUSY before it gives up for now
ACCEPT_TRIES = 64
TDX_MAP_GPA_MAX_LEN = 512  # gfns (2 MiB): MapGPA exits to userspace in chunks this big


def _g(kvm: Kvm, off: int) -> int:
    return kvm.layout.glob(off)


# ---------------------------------------------------------------------------
# the vCPU run path
# ---------------------------------------------------------------------------

def tdx_vcpu_run(kvm: Kvm, rip: int | None, fault_gfn: int | None) -> int:
    """vcpu_enter_guest -> tdx_vcpu_run -> TDH.VP.ENTER.

    ``rip``/``fault_gfn``: the guest instruction the vCPU re-executes and the
    private gfn of the EPT violation it last exited with, or None when the
    guest made progress since (zero-step mitigation counts entries at one RIP).
    Returns VP_ENTERED (the vCPU is in the TD: run the guest, then
    :func:`td_exit`), VP_EPT_VIOLATION (the module synthesized the EPT
    violation again without entering) or EXIT_FASTPATH_EXIT_HANDLED.
    """
    assert kvm.tdx is not None
    vcpu_enter_guest(kvm)  # IN_GUEST_MODE (smp_store_mb), then the requests
    # wait until a SEPT-zap SEAMCALL's retry completes before entering (the flag
    # is read after IN_GUEST_MODE is published: a kick either sees this vCPU in
    # guest mode and waits, or the vCPU sees the flag)
    if kvm.variant.td_honours_wait_for_sept_zap and kvm.w.load(
            _g(kvm, Globals.WAIT_FOR_SEPT_ZAP)):
        vcpu_exit_guest(kvm)
        kvm.stats["td_entry_waits"] += 1
        return EXIT_FASTPATH_EXIT_HANDLED
    m = kvm.tdx.module
    r = m.tdh_vp_enter(kvm.me, rip, fault_gfn)
    kvm.stats["vp_enters"] += 1
    kvm.w.trace(events.TD, events.TD_VP_ENTER, fault_gfn or 0, r)
    if tdx_operand_busy(r):
        count_busy(kvm, "TDH.VP.ENTER")
        vcpu_exit_guest(kvm)
        return EXIT_FASTPATH_EXIT_HANDLED  # tdx_exit_handlers_fastpath: leave, re-enter
    if r == VP_EPT_VIOLATION:
        kvm.stats["zero_step_exits"] += 1
        vcpu_exit_guest(kvm)
        return VP_EPT_VIOLATION
    return VP_ENTERED


def td_exit(kvm: Kvm) -> None:
    """A TD exit: the module drops the vCPU's hold on the TDR and its epoch."""
    assert kvm.tdx is not None
    kvm.tdx.module.td_exit(kvm.me)
    vcpu_exit_guest(kvm)


# ---------------------------------------------------------------------------
# the guest: TDG.MEM.PAGE.ACCEPT before use
# ---------------------------------------------------------------------------

GUEST_OK, GUEST_EPT_VIOLATION, GUEST_PENDING_VIOLATION = 0, 1, 2


def tdg_mem_page_accept(kvm: Kvm, gfn: int) -> int:
    """The guest's TDCALL, retried while BUSY (the module's entry lock is held by
    a SEAMCALL of KVM's, or by another vCPU's TDCALL)."""
    assert kvm.tdx is not None
    m = kvm.tdx.module
    for _ in range(ACCEPT_TRIES):
        r = m.tdg_mem_page_accept(gfn)
        kvm.stats["tdcalls"] += 1
        if not tdx_operand_busy(r):
            kvm.w.trace(events.TD, events.TD_ACCEPT, gfn, r)
            return r
        count_busy(kvm, "TDG.MEM.PAGE.ACCEPT")
        kvm.w.relax()
    return r


def td_guest_access_private(kvm: Kvm, gfn: int) -> int:
    """The guest touches private ``gfn`` (in guest mode, in the TD): accept the
    page first unless it already accepted this very page, then access it
    through the S-EPT.  GUEST_OK, GUEST_EPT_VIOLATION (KVM must map it) or
    GUEST_PENDING_VIOLATION (a page the guest accepted reads PENDING)."""
    assert kvm.tdx is not None
    m = kvm.tdx.module
    gen = host_page_gen(kvm, gfn, private=True)
    if kvm.w.load(accepted_index(kvm, gfn)) != gen + 1:
        r = tdg_mem_page_accept(kvm, gfn)
        if r in (TDX_SUCCESS, TDX_PAGE_ALREADY_ACCEPTED):
            guest_mark_accepted(kvm, gfn, gen)
            kvm.stats["accepts"] += 1
        else:
            # not AUGed (or blocked): the module exits to KVM with an EPT violation
            kvm.stats["ept_violations"] += 1
            return GUEST_EPT_VIOLATION
    st = m.guest_translate(gfn)
    if st == SEPT_MAPPED:
        kvm.stats["private_accesses"] += 1
        return GUEST_OK
    kvm.stats["ept_violations"] += 1
    if st == SEPT_PENDING and guest_accepted(kvm, gfn):
        return GUEST_PENDING_VIOLATION
    return GUEST_EPT_VIOLATION


# ---------------------------------------------------------------------------
# the EPT-violation exit
# ---------------------------------------------------------------------------

def tdx_is_sept_violation_unexpected_pending(kvm: Kvm, gfn: int, how: int) -> None:
    """A guest access to a private page it had accepted found it PENDING: the
    page was removed and AUGed again while the guest used it.  The kernel's
    reaction: pr_warn("Guest access before accepting ...") and kvm_vm_dead."""
    if how != GUEST_PENDING_VIOLATION:
        return
    assert kvm.tdx is not None
    kvm.w.store(_g(kvm, Globals.VM_DEAD), 1)
    kvm.w.trace(events.TD, events.TD_VM_DEAD, gfn, 0)
    e = kvm.tdx.module.entry(gfn)
    kvm.bug("TD killed: guest access before accept",
            "tdx_handle_ept_violation: kvm_vm_dead (\"Guest access before accepting\"): a "
            "private page the guest had accepted reads PENDING although its host page did "
            "not change: KVM removed and re-added it without a conversion or punch-hole",
            gfn=gfn, vcpu=kvm.me, sept=describe_sept(e) if e is not None else "unreachable",
            mirror=mirror_entry_now(kvm, gfn, 1),
            host_page_gen=host_page_gen(kvm, gfn, private=True))


def tdx_handle_ept_violation(kvm: Kvm, gfn: int, write: bool, how: int) -> int:
    """The EPT-violation exit of a TD: a private fault is retried locally,
    without entering the guest, while it returns RET_PF_RETRY, until success,
    a pending event or signal, KVM_REQ_VM_DEAD (-EIO) or an invalid memslot
    (none is ever deleted here); a shared fault is handled once.  The exit
    reports the gpa the guest used: a shared one carries the shared bit."""
    tdx_is_sept_violation_unexpected_pending(kvm, gfn, how)
    private = kvm_mem_is_private(kvm, gfn)
    gpa_gfn = gfn if private else gfn | kvm_gfn_direct_bits(kvm)
    tries = 0
    while True:
        ret = kvm_tdp_page_fault(kvm, gpa_gfn, write or private, private=private)
        if ret != RET_PF_RETRY or not private:
            break
        tries += 1
        kvm.stats["local_retries"] += 1
        kvm.hooks.retry(kvm, "tdx_handle_ept_violation", gfn)
        if not kvm.variant.ept_violation_local_retry(kvm, gfn, tries):
            break
        if vm_dead(kvm):
            ret = -EIO
            break
        cond_resched(kvm)
    return ret


def local_retry_exits(kvm: Kvm, gfn: int, tries: int) -> bool:
    """tdx_handle_ept_violation's loop condition (fixed): keep retrying unless
    kvm_vcpu_has_events() (an interrupt to inject: a random event here) or a
    signal is pending, or the gfn's memslot is being moved (2bc2694fe20b "KVM:
    TDX: Do not retry locally when the retry is caused by invalid memslot": the
    move waits for this task to leave kvm->srcu).  False: leave the loop."""
    if memslot_invalid(kvm, gfn):
        kvm.stats["local_retry_exits"] += 1
        return False
    return local_retry_ignoring_memslots(kvm, gfn, tries)


def local_retry_ignoring_memslots(kvm: Kvm, gfn: int, tries: int) -> bool:
    """Buggy (before 2bc2694fe20b): the loop goes on while the memslot is
    invalid, holding kvm->srcu, and the memslot move waits for it for ever."""
    if kvm.rng.random() < kvm.tdx_pending_event_fraction or signal_pending(kvm):
        kvm.stats["local_retry_exits"] += 1
        return False
    return True


# ---------------------------------------------------------------------------
# VM and vCPU ioctls: the initial image, finalize, pre-fault
# ---------------------------------------------------------------------------

def vcpu_mutex_i(kvm: Kvm, vcpu: int) -> int:
    return kvm.layout.slot(vcpu, Slot.VCPU_MUTEX)


def tdx_vm_state_guard_all(kvm: Kvm) -> list[int]:
    """tdx_acquire_vm_state_locks (fixed, 15945e9ec195): kvm->lock, every vCPU's
    mutex, then slots_lock (vcpu->mutex is taken outside slots_lock).  Returns
    the lock words taken, innermost last."""
    w = kvm.w
    taken = []
    for v in kvm.vcpu_slots:
        w.spin_lock(vcpu_mutex_i(kvm, v), kvm.pid)
        taken.append(vcpu_mutex_i(kvm, v))
    w.spin_lock(_g(kvm, Globals.SLOTS_LOCK), kvm.pid)
    taken.append(_g(kvm, Globals.SLOTS_LOCK))
    return taken


def tdx_vm_state_guard_slots_only(kvm: Kvm) -> list[int]:
    """Buggy (before 15945e9ec195 "KVM: TDX: Guard VM state transitions with
    "all" the locks"): KVM_TDX_INIT_MEM_REGION takes only slots_lock, so vCPU
    ioctls on other vCPUs run meanwhile, and their SEAMCALLs (which take the
    TDR shared) meet PAGE.ADD or MR.EXTEND holding it exclusively."""
    kvm.w.spin_lock(_g(kvm, Globals.SLOTS_LOCK), kvm.pid)
    return [_g(kvm, Globals.SLOTS_LOCK)]


def _release(kvm: Kvm, taken: list[int]) -> None:
    slots_i = _g(kvm, Globals.SLOTS_LOCK)
    for i in reversed(taken):
        kvm.spin_unlock(i, "slots_lock" if i == slots_i else "vcpu->mutex")


def tdx_gmem_post_populate(kvm: Kvm, gfn: int) -> int:
    """One page of the initial image: map it through the mirror (PAGE.ADD from
    the S-EPT hook, the TD not being runnable yet), then TDH.MR.EXTEND."""
    assert kvm.tdx is not None
    gen = host_page_gen(kvm, gfn, private=True)
    r = kvm.variant.map_initial_page(kvm, gfn, host_pfn(kvm, gfn, private=True))
    if r:
        return r
    guest_mark_accepted(kvm, gfn, gen)  # PAGE.ADD pages are the guest's from the start
    err = seamcall(kvm, "TDH.MR.EXTEND", kvm.tdx.module.tdh_mr_extend, gfn)
    TDX_BUG_ON(kvm, err, "TDH.MR.EXTEND", gfn)
    return 0


def tdx_vcpu_init_mem_region(kvm: Kvm, region: list[int]) -> int:
    """KVM_TDX_INIT_MEM_REGION on this vCPU: populate the gfns of ``region`` one
    page at a time under the VM-state locks.  Each page populated leaves the
    region (the kernel advances region.gpa and nr_pages and copies the region
    back to userspace, even on an error), so the VMM restarts an interrupted
    call where it stopped."""
    if td_state(kvm) == TD_STATE_RUNNABLE:
        return -22  # -EINVAL: the initial memory is fixed once the TD is finalized
    taken = kvm.variant.tdx_vm_state_guard(kvm)
    try:
        while region:
            if signal_pending(kvm):
                return -EINTR
            r = tdx_gmem_post_populate(kvm, region[0])
            if r:
                return r
            del region[0]
            kvm.stats["init_mem_pages"] += 1
    finally:
        _release(kvm, taken)
    return 0


def tdx_td_finalize(kvm: Kvm) -> int:
    """KVM_TDX_FINALIZE_VM: TDH.MR.FINALIZE, TD_STATE_RUNNABLE, then (smp_wmb)
    pre_fault_allowed."""
    assert kvm.tdx is not None
    taken = tdx_vm_state_guard_all(kvm)
    try:
        if not is_hkid_assigned(kvm) or td_state(kvm) != TD_STATE_INITIALIZED:
            return -22
        err = seamcall(kvm, "TDH.MR.FINALIZE", kvm.tdx.module.tdh_mr_finalize)
        if tdx_operand_busy(err):
            return -EBUSY
        if TDX_BUG_ON(kvm, err, "TDH.MR.FINALIZE"):
            return -EIO
        kvm.w.store(_g(kvm, Globals.PRE_FAULT_ALLOWED), 1)
        kvm.stats["finalized"] += 1
    finally:
        _release(kvm, taken)
    return 0


def tdx_vcpu_ioctl(kvm: Kvm) -> None:
    """A vCPU ioctl userspace issues while it sets the TD up (KVM_GET_REGS,
    KVM_GET_MSRS ...): under this vCPU's mutex, a TDH.VP.RD, which takes the
    TDR shared; a failure is tdh_vp_rd_failed's KVM_BUG_ON."""
    assert kvm.tdx is not None
    w = kvm.w
    w.spin_lock(vcpu_mutex_i(kvm, kvm.me), kvm.pid)
    try:
        err = seamcall(kvm, "TDH.VP.RD", kvm.tdx.module.tdh_vp_rd)
        if err:
            holder = CALLER_NAMES.get(kvm.tdx.module.last_busy_holder, "?")
            kvm.bug("TDX module error", "tdh_vp_rd_failed: KVM_BUG_ON (TDH.VP.RD failed "
                    f"with {err:#x}, lock held by {holder})", seamcall="TDH.VP.RD",
                    vcpu=kvm.me)
        kvm.stats["vcpu_ioctls"] += 1
    finally:
        kvm.spin_unlock(vcpu_mutex_i(kvm, kvm.me), "vcpu->mutex")


def kvm_tdp_map_page(kvm: Kvm, gfn: int, addr_direct: bool, private: bool) -> int:
    """kvm_tdp_page_prefault's retry loop (KVM_PRE_FAULT_MEMORY): fault the gfn
    in, never entering the guest, until it is mapped, a signal, or the VM is
    dead."""
    while True:
        if signal_pending(kvm):
            return -EINTR
        if vm_dead(kvm):
            return -EIO
        r = kvm_tdp_page_fault(kvm, gfn, True, addr_direct=addr_direct, private=private,
                               prefetch=True)
        if r < 0:
            return r  # -EAGAIN: the memslot is being moved
        if r != RET_PF_RETRY:
            return 0 if r != RET_PF_EXIT else -14  # -EFAULT: KVM_EXIT_MEMORY_FAULT
        kvm.stats["prefault_retries"] += 1
        kvm.hooks.retry(kvm, "kvm_tdp_map_page", gfn)
        cond_resched(kvm)


def kvm_arch_vcpu_pre_fault_memory(kvm: Kvm, start: int, end: int) -> int:
    """KVM_PRE_FAULT_MEMORY on [start, end): refused until the TD is finalized;
    the gpa carries the shared bit for shared gfns (kvm_gfn_direct_bits)."""
    if kvm.geometry.tdx and not kvm.w.load(_g(kvm, Globals.PRE_FAULT_ALLOWED)):
        return -EOPNOTSUPP
    for gfn in range(start, end):
        private = kvm_mem_is_private(kvm, gfn)  # PFERR_PRIVATE_ACCESS, fixed for the loop
        direct = kvm.variant.prefault_gpa_direct(kvm, gfn)
        gpa_gfn = gfn | kvm_gfn_direct_bits(kvm) if direct else gfn  # range->gpa | direct_bits
        srcu_read_lock(kvm, gfn)  # kvm_vcpu_pre_fault_memory holds kvm->srcu
        try:
            r = kvm_tdp_map_page(kvm, gpa_gfn, direct, private)
        finally:
            srcu_read_unlock(kvm)
        if r:
            return r
        kvm.stats["prefaulted"] += 1
    return 0


def prefault_gpa_with_direct_bits(kvm: Kvm, gfn: int) -> bool:
    """Fixed (aa2024c01a9a "KVM: x86/mmu: Embed direct bits into gpa for
    KVM_PRE_FAULT_MEMORY"): a shared gfn's gpa gets the direct (shared) bit, so
    the fault picks the direct root and maps the gfn in its upper half."""
    return not kvm_mem_is_private(kvm, gfn)


def prefault_gpa_without_direct_bits(kvm: Kvm, gfn: int) -> bool:
    """Buggy (before aa2024c01a9a): the gpa is passed as userspace gave it, with
    no shared bit, so tdp_mmu_get_root_for_fault picks the mirror root for a
    shared gfn too, and maps it there at the plain gfn: the wrong place."""
    return False


# ---------------------------------------------------------------------------
# MapGPA: the guest converts memory (TDVMCALL -> userspace -> attributes)
# ---------------------------------------------------------------------------

def tdx_map_gpa(kvm: Kvm, start: int, end: int, private: bool) -> int:
    """TDG.VP.VMCALL<MapGPA> from a vCPU in the TD: KVM exits to userspace with
    KVM_HC_MAP_GPA_RANGE in chunks of TDX_MAP_GPA_MAX_LEN, userspace converts
    each chunk (KVM_SET_MEMORY_ATTRIBUTES, then it discards the backing the
    chunk left: :func:`vmm_convert_memory`), and between chunks a pending
    event makes the guest retry the rest (TDVMCALL_STATUS_RETRY).  Returns the gfns converted."""
    kvm.w.trace(events.TD, events.TD_MAP_GPA, start, end - start)
    kvm.stats["map_gpa_calls"] += 1
    if not private:
        guest_release_private(kvm, start, end)
    gfn = start
    while gfn < end:
        nxt = min(end, gfn + TDX_MAP_GPA_MAX_LEN)
        vmm_convert_memory(kvm, gfn, nxt, private)
        gfn = nxt
        if gfn < end and kvm.rng.random() < kvm.tdx_pending_event_fraction:
            kvm.stats["map_gpa_retries"] += 1
            break  # TDVMCALL_STATUS_RETRY: the guest issues MapGPA again later
    return gfn - start


def check_td_runnable(kvm: Kvm) -> bool:
    return td_state(kvm) == TD_STATE_RUNNABLE


__all__ = ["KVM_BUG_ON", "VP_ENTERED", "VP_EPT_VIOLATION"]
