"""Root lifecycle: refcounts, the roots list, invalidation and yielding root zaps.

Design note (the March 2022 TDP MMU overhaul thread).  Direct roots come and go:
a vCPU loads a root (reusing a valid one with a matching role, or allocating
one) and holds a reference on it; a fast zap (``kvm_mmu_zap_all_fast``) marks
every direct root invalid under the write lock, then zaps the invalidated
roots under the read lock, *yielding* in the middle of a root so other tasks
run meanwhile; a vCPU that finds its root obsolete drops it and reloads.

References: ``tdp_mmu_root_count`` is taken with increment-not-zero (a root
whose count reached 0 is dying and is never resurrected) and dropped with
``kvm_tdp_mmu_put_root``.  In the final upstream design a new root is born
with two references, the vCPU's and one "gifted" to the TDP MMU, which holds
it until the root is invalidated and zapped (the ``scheduled_to_zap`` flag
makes sure that reference is put exactly once); so a valid root never loses
its last reference, and the last put of an invalid root unlinks it from the
list and frees it after an RCU grace period.  The put is the piece the
variants swap: the March 2022 thread ("[PATCH v3 20/28] KVM: x86/mmu: Allow
yielding when zapping GFNs for defunct TDP MMU root") tried several ways to put the
last reference of a root that was still valid, before the gifted reference
existed.

The list is an array of slots in shared memory; adds and removes take
``tdp_mmu_pages_lock``, readers walk it under RCU and pin what they want with
a reference before leaving the read-side section.  The mirror root (TDX) is
not on it: mirror roots cannot be fast-zapped, and the model has one for the
VM's life.
"""

from __future__ import annotations

from collections.abc import Iterator

from stress.arena import MAX_ROOTS, Globals, SpMeta
from stress.model import events
from stress.model.kvm import Kvm, Vcpu
from stress.model.mmu_page import (
    ROLE_INVALID,
    ROLE_MIRROR,
    SP_LINKED,
    SP_REMOVED,
    call_rcu_free_sp,
    tdp_mmu_alloc_sp,
    tdp_mmu_init_sp,
)
from stress.model.tlb import kvm_vcpu_flush_tlb_all

KVM_INVALID_ROOTS = 1
KVM_DIRECT_ROOTS = 2
KVM_MIRROR_ROOTS = 4
KVM_VALID_ROOTS = KVM_DIRECT_ROOTS | KVM_MIRROR_ROOTS
KVM_ALL_ROOTS = KVM_VALID_ROOTS | KVM_INVALID_ROOTS


# ---------------------------------------------------------------------------
# refcount_t on a shared word, with its oracles
# ---------------------------------------------------------------------------

def _count_i(kvm: Kvm, root: int) -> int:
    return kvm.layout.sp(root, SpMeta.ROOT_COUNT)


def refcount_inc_not_zero(kvm: Kvm, root: int) -> bool:
    i = _count_i(kvm, root)
    while True:
        v = kvm.w.load(i)
        if v == 0:
            return False
        if v >= 1 << 62:
            _underflow(kvm, root, v)
        if kvm.w.cmpxchg(i, v, v + 1) == v:
            kvm.w.trace(events.ROOT_REF, root, v + 1, 1)
            return True


def refcount_dec_and_test(kvm: Kvm, root: int) -> bool:
    old = kvm.w.fetch_add(_count_i(kvm, root), -1)
    kvm.w.trace(events.ROOT_REF, root, old - 1, -1)
    if old == 0 or old >= 1 << 62:
        _underflow(kvm, root, old)
    return old == 1


def refcount_dec_not_one(kvm: Kvm, root: int) -> bool:
    """Decrement unless the count is 1; True if it decremented."""
    i = _count_i(kvm, root)
    while True:
        v = kvm.w.load(i)
        if v == 1:
            return False
        if v == 0 or v >= 1 << 62:
            _underflow(kvm, root, v)
        if kvm.w.cmpxchg(i, v, v - 1) == v:
            return True


def refcount_set(kvm: Kvm, root: int, value: int) -> None:
    old = kvm.w.xchg(_count_i(kvm, root), value)
    if old == 0 and value:  # refcount_set has no WARN (refcount_inc on 0 would)
        kvm.stats["refcount_set_resurrects"] += 1


def _underflow(kvm: Kvm, root: int, seen: int) -> None:
    kvm.bug("refcount underflow",
            "tdp_mmu_root_count was decremented below zero (a reference put twice, or a "
            "count forced to zero while another task held a reference)",
            root=root, count=seen - (1 << 64) if seen >= 1 << 63 else seen)


# ---------------------------------------------------------------------------
# the roots list (RCU readers, tdp_mmu_pages_lock writers)
# ---------------------------------------------------------------------------

def is_root_invalid(kvm: Kvm, root: int) -> bool:
    return bool(kvm.w.load(kvm.layout.sp(root, SpMeta.ROLE)) & ROLE_INVALID)


def tdp_mmu_root_match(kvm: Kvm, root: int, types: int) -> bool:
    """Does ``root`` belong to ``types``?  By its mirror role, direct or mirror;
    an invalid root only if KVM_INVALID_ROOTS is asked for as well, so
    ``KVM_DIRECT_ROOTS | KVM_INVALID_ROOTS`` visits the direct roots, invalid or
    not, and no mirror root (as upstream since "KVM: x86/tdp_mmu: Support mirror
    root for TDP MMU", v6.14).  Also the fixed ``root_filter`` piece of
    tdp_mmu_next_root.  Callers hold mmu_lock (either mode) or RCU: role.invalid
    is written under the write lock only."""
    if types & KVM_VALID_ROOTS == 0:
        kvm.warn("tdp_mmu_root_match with no valid root type", types=types, root=root)
        return False
    role = kvm.w.load(kvm.layout.sp(root, SpMeta.ROLE))
    if role & ROLE_INVALID and not types & KVM_INVALID_ROOTS:
        return False
    return bool(types & (KVM_MIRROR_ROOTS if role & ROLE_MIRROR else KVM_DIRECT_ROOTS))


def _list_add(kvm: Kvm, root: int) -> None:
    lay = kvm.layout
    for s in range(MAX_ROOTS):
        if kvm.w.load(lay.root_slot(s)) == 0:
            kvm.w.store(lay.sp(root, SpMeta.ROOT_SLOT), s + 1)
            kvm.w.store(lay.root_slot(s), root + 1)  # list_add_rcu: publish last
            return
    kvm.bug("roots list full", f"more than {MAX_ROOTS} roots alive at once", root=root)


def _list_del(kvm: Kvm, root: int) -> None:
    lay = kvm.layout
    s = kvm.w.load(lay.sp(root, SpMeta.ROOT_SLOT)) - 1
    if s < 0 or kvm.w.load(lay.root_slot(s)) != root + 1:
        kvm.bug("root freed twice", "list_del_rcu of a root that is not on the list",
                root=root, slot=s)
    kvm.w.store(lay.root_slot(s), 0)


def tdp_mmu_pages_lock(kvm: Kvm) -> None:
    kvm.w.spin_lock(kvm.layout.glob(Globals.TDP_MMU_PAGES_LOCK), kvm.pid)


def tdp_mmu_pages_unlock(kvm: Kvm) -> None:
    kvm.spin_unlock(kvm.layout.glob(Globals.TDP_MMU_PAGES_LOCK), "tdp_mmu_pages_lock")


def listed_roots(kvm: Kvm) -> list[int]:
    """Every root on the list right now (no references: for checkers and teardown)."""
    lay = kvm.layout
    return [v - 1 for v in (kvm.w.load(lay.root_slot(s)) for s in range(MAX_ROOTS)) if v]


def tdp_mmu_next_root(kvm: Kvm, after: int, types: int) -> tuple[int | None, int]:
    """The next root in list order after the one whose creation number is
    ``after`` (-1: from the head) that the variant's ``root_filter`` (fixed:
    tdp_mmu_root_match) lets through for ``types`` and whose reference we
    could take (a root at count 0 is dying: skipped).  list_add_rcu adds a new
    root at the head, so the list is walked newest first: a valid root before
    the invalid ones it replaced.  Returns (root, its creation number) or
    (None, 0)."""
    lay = kvm.layout
    kvm.rcu.rcu_read_lock()
    try:
        found = []
        for s in range(MAX_ROOTS):
            v = kvm.w.load(lay.root_slot(s))
            if v:
                seq = kvm.w.load(lay.sp(v - 1, SpMeta.ROOT_SEQ))
                if after < 0 or seq < after:
                    found.append((seq, v - 1))
        for seq, root in sorted(found, reverse=True):
            if kvm.variant.root_filter(kvm, root, types) and kvm_tdp_mmu_get_root(kvm, root):
                return root, seq
        return None, 0
    finally:
        kvm.rcu.rcu_read_unlock()


def for_each_tdp_mmu_root_yield_safe(kvm: Kvm, types: int = KVM_ALL_ROOTS) -> Iterator[int]:
    """Each matching root, pinned by a reference while the body runs (so the body
    may yield mmu_lock).  ``prev`` is put only after ``next`` is pinned; breaking
    out of the loop puts the current root."""
    kvm.lockdep_assert_held()
    cursor = -1
    root: int | None = None
    try:
        while True:
            nxt, cursor = tdp_mmu_next_root(kvm, cursor, types)
            if root is not None:
                kvm_tdp_mmu_put_root(kvm, root)
            root = nxt
            if root is None:
                return
            yield root
    finally:
        if root is not None:
            kvm_tdp_mmu_put_root(kvm, root)


# ---------------------------------------------------------------------------
# get / put / alloc
# ---------------------------------------------------------------------------

def kvm_tdp_mmu_get_root(kvm: Kvm, root: int) -> bool:
    return refcount_inc_not_zero(kvm, root)


def kvm_tdp_mmu_put_root(kvm: Kvm, root: int) -> None:
    kvm.variant.put_root(kvm, root)


def tdp_mmu_free_root(kvm: Kvm, root: int) -> None:
    """Unlink a root whose last reference is gone and free it after a grace period."""
    tdp_mmu_pages_lock(kvm)
    try:
        _list_del(kvm, root)
    finally:
        tdp_mmu_pages_unlock(kvm)
    kvm.stats["roots_freed"] += 1
    kvm.w.store(kvm.layout.sp(root, SpMeta.STATE), SP_REMOVED)  # awaiting RCU
    call_rcu_free_sp(kvm, root)


def put_root_final(kvm: Kvm, root: int) -> None:
    """The final upstream put: the last reference of a root goes only after it
    was invalidated (the TDP MMU's gifted reference keeps valid roots alive)."""
    if not refcount_dec_and_test(kvm, root):
        return
    if not is_root_invalid(kvm, root):
        kvm.bug("valid root lost its last reference",
                "kvm_tdp_mmu_put_root: KVM_BUG_ON(!root->role.invalid)", root=root)
    tdp_mmu_free_root(kvm, root)


def root_xchg_invalid(kvm: Kvm, root: int) -> bool:
    """xchg(&root->role.invalid, true): True if it was invalid already."""
    return bool(kvm.w.fetch_or(kvm.layout.sp(root, SpMeta.ROLE), ROLE_INVALID) & ROLE_INVALID)


def put_root_force_zero(kvm: Kvm, root: int) -> None:
    """Buggy: the final design's put, with the last reference detected by
    refcount_dec_not_one and then forced to 0 ("turning a refcount_dec_not_one
    into a refcount_dec_and_test", March 2022): safe only if no get can run
    concurrently, which stopped being true when gets moved under the read lock."""
    if refcount_dec_not_one(kvm, root):
        return
    if not is_root_invalid(kvm, root):
        kvm.bug("valid root lost its last reference",
                "kvm_tdp_mmu_put_root: KVM_BUG_ON(!root->role.invalid)", root=root)
    kvm.w.spin_ns(kvm.race_window_ns)  # the gap a get can fall into
    refcount_set(kvm, root, 0)
    tdp_mmu_free_root(kvm, root)


def kvm_tdp_mmu_alloc_root(kvm: Kvm, mirror: bool = False) -> int:
    """Find a valid root with the wanted role and take a reference, or allocate one.

    Runs with mmu_lock held for read (since v6.9), so two vCPUs may race: the
    search is repeated under tdp_mmu_pages_lock before allocating.  A new root
    has two references when the variant keeps the gifted one: the caller's and
    the TDP MMU's.
    """
    types = KVM_MIRROR_ROOTS if mirror else KVM_DIRECT_ROOTS
    for attempt in (0, 1):
        if attempt:
            tdp_mmu_pages_lock(kvm)
        try:
            for root in listed_roots(kvm):
                if tdp_mmu_root_match(kvm, root, types) and kvm_tdp_mmu_get_root(kvm, root):
                    return root
            if attempt:
                return _new_root(kvm, mirror)
        finally:
            if attempt:
                tdp_mmu_pages_unlock(kvm)
    raise AssertionError("unreachable")


def _new_root(kvm: Kvm, mirror: bool) -> int:
    root = tdp_mmu_alloc_sp(kvm)
    if root is None:
        raise MemoryError("page pool cannot hold a root")
    tdp_mmu_init_sp(kvm, root, kvm.geometry.root_level, 0, ROLE_MIRROR if mirror else 0)
    lay = kvm.layout
    kvm.w.store(lay.sp(root, SpMeta.SCHEDULED_TO_ZAP), 0)
    kvm.w.store(lay.sp(root, SpMeta.ROOT_ZAPS), 0)
    kvm.w.store(lay.sp(root, SpMeta.ROOT_SEQ), kvm.w.fetch_add(lay.glob(Globals.ROOT_SEQ), 1) + 1)
    kvm.w.store(lay.sp(root, SpMeta.ROOT_COUNT), 2 if kvm.variant.root_gifted_ref else 1)
    kvm.w.store(lay.sp(root, SpMeta.STATE), SP_LINKED)
    _list_add(kvm, root)
    kvm.stats["roots_created"] += 1
    return root


# ---------------------------------------------------------------------------
# vCPU side: load, obsolete check, unload
# ---------------------------------------------------------------------------

def kvm_mmu_reload(kvm: Kvm, vcpu: Vcpu) -> None:
    """On entry: drop an obsolete root (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS), load one."""
    if vcpu.root is not None and is_root_invalid(kvm, vcpu.root):
        kvm_mmu_unload(kvm, vcpu)
        kvm.stats["obsolete_roots_dropped"] += 1
    if vcpu.root is None:
        kvm.read_lock()
        try:
            vcpu.root = kvm_tdp_mmu_alloc_root(kvm)
            kvm.hooks.root_loaded(kvm, vcpu.root)
        finally:
            kvm.read_unlock()


def kvm_mmu_unload(kvm: Kvm, vcpu: Vcpu) -> None:
    """kvm_mmu_free_roots: put the vCPU's reference (mmu_lock held for read).

    The vCPU's TLB entries of the root die with it: KVM flushes the TLB when it
    next loads a root (kvm_mmu_load), and the guest cannot run in between, so
    the model empties the TLB here, where the oracles can see it."""
    if vcpu.root is None:
        return
    kvm_vcpu_flush_tlb_all(kvm)
    root, vcpu.root = vcpu.root, None
    kvm.read_lock()
    try:
        kvm_tdp_mmu_put_root(kvm, root)
    finally:
        kvm.read_unlock()


# ---------------------------------------------------------------------------
# fast zap: invalidate, then zap the invalidated roots (yielding)
# ---------------------------------------------------------------------------

def kvm_tdp_mmu_invalidate_roots(kvm: Kvm, types: int) -> int:
    """Mark every matching valid root invalid and scheduled to be zapped.
    mmu_lock held for write: readers under the read lock see a stable role."""
    kvm.lockdep_assert_held_write()
    n = 0
    lay = kvm.layout
    for root in listed_roots(kvm):
        if is_root_invalid(kvm, root) or not tdp_mmu_root_match(kvm, root, types):
            continue
        # without the gifted reference (2022), invalidation takes one, so the root
        # cannot be freed before it is zapped
        if not kvm.variant.root_gifted_ref and not kvm_tdp_mmu_get_root(kvm, root):
            continue  # dying already
        kvm.w.store(lay.sp(root, SpMeta.SCHEDULED_TO_ZAP), 1)
        kvm.w.fetch_or(lay.sp(root, SpMeta.ROLE), ROLE_INVALID)
        n += 1
    return n
