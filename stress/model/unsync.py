"""Nested TDP: indirect shadow pages marked unsync from TDP MMU faults (ce25681d59ff).

Design note.  With nested TDP, KVM shadows L1's EPT with indirect shadow
pages (the legacy MMU), which coexist with the TDP MMU.  When a TDP MMU fault,
running with mmu_lock held for *read*, makes writable a gfn that holds one of
L1's page tables, ``mmu_try_to_unsync_pages`` marks the shadow page unsync
instead of write-protecting it: ``kvm_unsync_page`` sets ``sp->unsync`` and
``mark_unsync`` propagates up the parents: ``__test_and_set_bit`` in the
parent's ``unsync_child_bitmap`` and ``unsync_children++``, *non-atomic*
read-modify-writes.  A sync (``kvm_mmu_sync_roots``, mmu_lock held for write)
walks down the set bits, syncs each unsync page and clears the bits on the way
back with ``clear_unsync_child_bit``.

Commit ce25681d59ff: two faults marking sibling pages race on the parent's
word and count; an increment or a bit is lost, and ``unsync_children``
underflows (the WARN) or, worse, reaches 0 while a child is still unsync: the
sync stops descending and L2 runs on stale translations.  The fix takes
``mmu_unsync_pages_lock`` with the double-checked pattern: test ``unsync``
without the lock (a "yes" is reliable, 1 -> 0 needs the write lock), take the
lock, test again, mark.

Topology (fixed): one level-3 root shadow page, 4 level-2 pages under it, 4
level-1 pages under each; the 16 leaves shadow 16 L1 page-table gfns.
Siblings sit in one bitmap word, so their markers really share a word.
Shadow page words: UNSYNC, UNSYNC_CHILDREN, then the 512-bit bitmap.

Alternative #1 of the commit (``can_unsync = false``): never unsync; a write
to a shadowed gfn is write-protected and emulated under the write lock.  Valid,
and its cost is what ``tdp-stress bench --unsync`` measures.
"""

from __future__ import annotations

from stress.arena import Globals
from stress.model import events
from stress.model.kvm import Kvm

UNSYNC, UNSYNC_CHILDREN, BITMAP = 0, 1, 2  # shadow page words (BITMAP: 8 words)
N_MID, N_LEAF_PER_MID = 4, 4
N_LEAVES = N_MID * N_LEAF_PER_MID
ROOT_SP = 0
EPERM = 1


def mid_sp(m: int) -> int:
    return 1 + m


def leaf_sp(k: int) -> int:
    return 1 + N_MID + k


def parent_of(sp: int) -> tuple[int, int] | None:
    """(parent shadow page, index of our SPTE in it), None for the root."""
    if sp == ROOT_SP:
        return None
    if sp <= N_MID:
        return ROOT_SP, sp - 1
    k = sp - 1 - N_MID
    return mid_sp(k // N_LEAF_PER_MID), k % N_LEAF_PER_MID


def children_of(sp: int) -> dict[int, int]:
    """index -> child shadow page."""
    if sp == ROOT_SP:
        return {m: mid_sp(m) for m in range(N_MID)}
    if sp <= N_MID:
        m = sp - 1
        return {j: leaf_sp(m * N_LEAF_PER_MID + j) for j in range(N_LEAF_PER_MID)}
    return {}


def shadowed_gfns(base: int, stride: int) -> list[int]:
    """The L1 page-table gfns the leaves shadow (leaf k shadows the k-th)."""
    return [base + k * stride for k in range(N_LEAVES)]


def sp_word(kvm: Kvm, sp: int, off: int) -> int:
    return kvm.layout.shadow_sp(sp, off)


# ---------------------------------------------------------------------------
# marking (mmu_lock held for read, from the TDP MMU fault path)
# ---------------------------------------------------------------------------

def mark_unsync(kvm: Kvm, sp: int, index: int, gap_ns: int = 0) -> None:
    """Flag child ``index`` of ``sp`` as leading to unsync pages.  Non-atomic on
    purpose, as in the kernel: the caller must serialise.  ``gap_ns`` stalls
    inside each read-modify-write (targeted delay injection for the unlocked
    variant; under the lock it would change nothing but speed)."""
    word = sp_word(kvm, sp, BITMAP + index // 64)
    bit = 1 << (index % 64)
    old = kvm.w.load(word)  # __test_and_set_bit
    if old & bit:
        return
    kvm.w.spin_ns(gap_ns)
    kvm.w.store(word, old | bit)
    n = kvm.w.load(sp_word(kvm, sp, UNSYNC_CHILDREN))  # sp->unsync_children++
    kvm.w.spin_ns(gap_ns)
    kvm.w.store(sp_word(kvm, sp, UNSYNC_CHILDREN), n + 1)
    if n:
        return
    kvm_mmu_mark_parents_unsync(kvm, sp, gap_ns)


def kvm_mmu_mark_parents_unsync(kvm: Kvm, sp: int, gap_ns: int = 0) -> None:
    parent = parent_of(sp)
    if parent is not None:
        mark_unsync(kvm, *parent, gap_ns)


def kvm_unsync_page(kvm: Kvm, sp: int, gap_ns: int = 0) -> None:
    kvm.w.fetch_add(kvm.layout.glob(Globals.STAT_MMU_UNSYNC), 1)  # ++kvm->stat.mmu_unsync
    kvm.w.store(sp_word(kvm, sp, UNSYNC), 1)
    kvm.w.trace(events.UNSYNC, sp, 0)
    kvm_mmu_mark_parents_unsync(kvm, sp, gap_ns)
    kvm.stats["unsync_marked"] += 1


def _lock_unsync(kvm: Kvm) -> None:
    i = kvm.layout.glob(Globals.MMU_UNSYNC_PAGES_LOCK)
    if not kvm.w.spin_trylock(i, kvm.pid):
        kvm.stats["unsync_lock_contended"] += 1
        kvm.w.spin_lock(i, kvm.pid)
    kvm.stats["unsync_lock_taken"] += 1


def _unlock_unsync(kvm: Kvm) -> None:
    kvm.spin_unlock(kvm.layout.glob(Globals.MMU_UNSYNC_PAGES_LOCK), "mmu_unsync_pages_lock")


def unsync_double_checked(kvm: Kvm, sp: int) -> int:
    """Fixed (ce25681d59ff): test without the lock, lock, test again, mark."""
    if kvm.w.load(sp_word(kvm, sp, UNSYNC)):
        return 0
    _lock_unsync(kvm)
    try:
        if kvm.w.load(sp_word(kvm, sp, UNSYNC)):  # another task did it meanwhile
            return 0
        kvm_unsync_page(kvm, sp)
    finally:
        _unlock_unsync(kvm)
    return 0


def unsync_without_lock(kvm: Kvm, sp: int) -> int:
    """Buggy (before ce25681d59ff): two faults mark siblings concurrently and race
    on the parent's bitmap word and unsync_children."""
    if kvm.w.load(sp_word(kvm, sp, UNSYNC)):
        return 0
    kvm_unsync_page(kvm, sp, kvm.race_window_ns)
    return 0


def unsync_lock_no_recheck(kvm: Kvm, sp: int) -> int:
    """Buggy: takes the lock but does not test again, so a page two faults saw
    as "not unsync" is unsynced twice (kvm->stat.mmu_unsync counts it twice)."""
    if kvm.w.load(sp_word(kvm, sp, UNSYNC)):
        return 0
    _lock_unsync(kvm)
    try:
        kvm_unsync_page(kvm, sp)
    finally:
        _unlock_unsync(kvm)
    return 0


def unsync_never(kvm: Kvm, sp: int) -> int:
    """Alternative #1 (can_unsync = false): refuse; the write is write-protected."""
    if kvm.w.load(sp_word(kvm, sp, UNSYNC)):
        return 0
    return -EPERM


def mmu_try_to_unsync_pages(kvm: Kvm, leaf: int) -> int:
    """From make_spte on a write to a shadowed gfn, mmu_lock held for read.
    0: the SPTE may be writable; -EPERM: write-protect (emulate the write)."""
    kvm.lockdep_assert_held_read()
    return kvm.variant.try_to_unsync(kvm, leaf)


# ---------------------------------------------------------------------------
# syncing and emulation (mmu_lock held for write)
# ---------------------------------------------------------------------------

def clear_unsync_child_bit(kvm: Kvm, sp: int, index: int) -> None:
    n = kvm.w.load(sp_word(kvm, sp, UNSYNC_CHILDREN))
    if n == 0 or n >= 1 << 62:
        kvm.bug("unsync_children underflow",
                "clear_unsync_child_bit: WARN_ON_ONCE((int)sp->unsync_children < 0)",
                shadow_page=sp, index=index, unsync_children=n)
    kvm.w.store(sp_word(kvm, sp, UNSYNC_CHILDREN), n - 1)
    word = sp_word(kvm, sp, BITMAP + index // 64)
    kvm.w.store(word, kvm.w.load(word) & ~(1 << (index % 64)))


def _sync_children(kvm: Kvm, sp: int, synced: list[int]) -> None:
    """mmu_sync_children: descend only where the bitmap says, sync, clear bits."""
    if not kvm.w.load(sp_word(kvm, sp, UNSYNC_CHILDREN)):
        return  # mmu_unsync_walk: nothing below (trusting the count)
    for index, child in children_of(sp).items():
        word = kvm.w.load(sp_word(kvm, sp, BITMAP + index // 64))
        if not word & (1 << (index % 64)):
            continue
        if children_of(child):
            _sync_children(kvm, child, synced)
            if kvm.w.load(sp_word(kvm, child, UNSYNC_CHILDREN)):
                continue
        elif kvm.w.load(sp_word(kvm, child, UNSYNC)):
            kvm.w.store(sp_word(kvm, child, UNSYNC), 0)  # kvm_sync_page + write-protect
            kvm.w.fetch_add(kvm.layout.glob(Globals.STAT_MMU_UNSYNC), -1)
            kvm.w.trace(events.UNSYNC, child, 1)
            synced.append(child)
        clear_unsync_child_bit(kvm, sp, index)


def kvm_mmu_sync_roots(kvm: Kvm) -> list[int]:
    """Sync every unsync shadow page (mmu_lock held for write).  Returns the
    leaves synced; their gfns must be write-protected again by the caller.

    A hook point when the walk is done (mmu_lock still held for write: no task
    marks pages, so nothing may be left unsync).
    """
    kvm.lockdep_assert_held_write()
    synced: list[int] = []
    _sync_children(kvm, ROOT_SP, synced)
    kvm.hooks.unsync_sync_done(kvm)
    kvm.stats["syncs"] += 1
    kvm.stats["pages_synced"] += len(synced)
    return synced
