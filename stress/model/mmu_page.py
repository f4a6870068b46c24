"""Page-table pages: the shared pool and ``struct kvm_mmu_page`` metadata.

Every page of the pool has one line of metadata (``SpMeta``): its lifecycle
state, role (level, is_mirror, invalid), base gfn and a generation that moves
on every allocation and every free.  Allocation is a lock-free bitmap (one bit
per free page, claimed with fetch_and), so any process may allocate and free.

Lifecycle::

    FREE --alloc--> PRIVATE --link (cmpxchg wins)--> LINKED --unlink--> REMOVED
      ^                |  (cmpxchg lost: freed at once, never visible)     |
      +----------------+-------------------------- RCU callback <----------+

A freed page is filled with ``POISON_SPTE`` so a walker that reads it after
the free is caught, and its generation moves on so a walker that reaches it
after it was reused is caught too.
"""

from __future__ import annotations

from typing import Any

from stress.arena import WORDS_PER_PAGE, SpMeta
from stress.model.kvm import Kvm, kvm_gfn_direct_bits
from stress.model.spte import (
    KVM_PAGES_PER_HPAGE,
    POISON_SPTE,
    SHADOW_NONPRESENT_VALUE,
    describe,
)

SP_FREE, SP_PRIVATE, SP_LINKED, SP_REMOVED = 0, 1, 2, 3
# S-EPT pages: owned by the TDX module, or held by KVM for it (allocated and not
# yet added, or handed back by SEPT.REMOVE and awaiting their mirror table's free)
SP_SEPT, SP_EXT_HELD = 4, 5
SP_STATE_NAMES = {SP_FREE: "FREE", SP_PRIVATE: "PRIVATE", SP_LINKED: "LINKED",
                  SP_REMOVED: "REMOVED", SP_SEPT: "SEPT", SP_EXT_HELD: "EXT_HELD"}

ROLE_MIRROR = 1 << 4
ROLE_INVALID = 1 << 5


def role_level(role: int) -> int:
    return role & 0xF


def kvm_gfn_root_bits(kvm: Kvm, root: int) -> int:
    """kvm_gfn_root_bits (mmu_internal.h): the gfn bits a root maps at.  A mirror
    root maps private memory at its natural gfn (0); a direct root at gfn |
    kvm_gfn_direct_bits, a TD's shared bit, i.e. in its upper half."""
    if not kvm.geometry.gfn_direct_bits:
        return 0
    if kvm.w.load(kvm.layout.sp(root, SpMeta.ROLE)) & ROLE_MIRROR:
        return 0
    return kvm_gfn_direct_bits(kvm)


def _bitmap_alloc(kvm: Kvm) -> int:
    """Claim any free page; with ``pool.alias_tables`` the first
    ``kvm.alias_floor_words`` bitmap words are kept for placed tables."""
    lay = kvm.layout
    floor = kvm.alias_floor_words
    page = kvm.w.bitmap_alloc(lay.bitmap + floor, lay.bitmap_words - floor,
                              max(0, kvm.alloc_cursor - floor))
    if page >= 0:
        page += floor * 64
        kvm.alloc_cursor = page // 64
    return page


def _claim_page(kvm: Kvm, page: int) -> bool:
    """Claim one given page if it is free (the model's alias placement)."""
    if page >= kvm.layout.n_pages:
        return False
    bit = 1 << (page % 64)
    old = kvm.w.fetch_and(kvm.layout.bitmap + page // 64, ~bit & ((1 << 64) - 1))
    return bool(old & bit)


def tdp_mmu_alloc_sp(kvm: Kvm, prefer: int | None = None) -> int | None:
    """Take a page from the pool, filled with SHADOW_NONPRESENT_VALUE.

    The page is private to the caller until a cmpxchg publishes it, so its
    initialisation needs no ordering beyond the release of that cmpxchg.
    Returns None when the pool is exhausted (the fault retries later).
    ``prefer``: a page to take if it is free (``pool.alias_tables`` only).
    """
    lay = kvm.layout
    page = prefer if prefer is not None and _claim_page(kvm, prefer) else _bitmap_alloc(kvm)
    if page < 0:
        kvm.stats["alloc_fail"] += 1
        return None
    kvm.w.fetch_add(lay.sp(page, SpMeta.GEN), 1)
    kvm.w.store(lay.sp(page, SpMeta.STATE), SP_PRIVATE)
    kvm.w.fill(lay.spt(page), WORDS_PER_PAGE, SHADOW_NONPRESENT_VALUE)
    return page


def kvm_mmu_alloc_external_spt(kvm: Kvm) -> int | None:
    """A page for the TDX module's copy of a mirror table (sp->external_spt).
    KVM never writes its entries: TDH.MEM.SEPT.ADD initialises it."""
    lay = kvm.layout
    page = _bitmap_alloc(kvm)
    if page < 0:
        kvm.stats["alloc_fail"] += 1
        return None
    kvm.w.fetch_add(lay.sp(page, SpMeta.GEN), 1)
    kvm.w.store(lay.sp(page, SpMeta.STATE), SP_EXT_HELD)
    return page


def external_spt(kvm: Kvm, sp: int) -> int | None:
    v = kvm.w.load(kvm.layout.sp(sp, SpMeta.EXTERNAL_SPT))
    return v - 1 if v else None


def tdp_mmu_init_sp(kvm: Kvm, page: int, level: int, gfn: int, role_bits: int = 0) -> None:
    kvm.w.store(kvm.layout.sp(page, SpMeta.ROLE), level | role_bits)
    kvm.w.store(kvm.layout.sp(page, SpMeta.GFN), gfn)


def tdp_mmu_free_sp(kvm: Kvm, page: int) -> None:
    """Poison the page, move its generation on and give it back to the pool."""
    lay = kvm.layout
    if kvm.w.load(lay.sp(page, SpMeta.STATE)) == SP_FREE:
        kvm.bug("page freed twice", "a page-table page was freed while already free",
                table=page)
    kvm.w.fill(lay.spt(page), WORDS_PER_PAGE, POISON_SPTE)
    kvm.w.fetch_add(lay.sp(page, SpMeta.GEN), 1)
    kvm.w.store(lay.sp(page, SpMeta.STATE), SP_FREE)
    kvm.w.store(lay.sp(page, SpMeta.ROLE), 0)
    kvm.w.store(lay.sp(page, SpMeta.LAST_WRITER), 0)
    ext = kvm.w.load(lay.sp(page, SpMeta.EXTERNAL_SPT))
    if ext:
        kvm.w.store(lay.sp(page, SpMeta.EXTERNAL_SPT), 0)
        # a page the TDX module still owns (free_external_spt failed) is leaked
        # on purpose, as the kernel does; the checker reports it
        if kvm.w.load(lay.sp(ext - 1, SpMeta.STATE)) == SP_EXT_HELD:
            tdp_mmu_free_sp(kvm, ext - 1)
    kvm.w.fetch_or(lay.bitmap + page // 64, 1 << (page % 64))


def tdp_mmu_free_sp_rcu_callback(kvm: Kvm, page: int) -> None:
    """The RCU callback: the grace period has ended, nobody can reach the page
    (a hook point for the oracles: nothing may still reach or fill it)."""
    kvm.hooks.sp_free(kvm, page)
    tdp_mmu_free_sp(kvm, page)
    kvm.stats["tables_freed"] += 1


def call_rcu_free_sp(kvm: Kvm, pt: int) -> None:
    """call_rcu(&sp->rcu_head, tdp_mmu_free_sp_rcu_callback)."""
    e = kvm.rcu.call_rcu(pt)
    kvm.w.store(kvm.layout.sp(pt, SpMeta.RCU_EPOCH), e)


def removed_entry_details(kvm: Kvm, page: int, i: int) -> dict[str, Any]:
    """Who and what, for a present entry found in a removed table."""
    lay = kvm.layout
    spte = kvm.w.load(lay.spt(page) + i)
    level = role_level(kvm.w.load(lay.sp(page, SpMeta.ROLE)))
    return {
        "table": page, "level": level, "index": i,
        "gfn": (kvm.w.load(lay.sp(page, SpMeta.GFN)) & ~kvm_gfn_direct_bits(kvm))
        + i * KVM_PAGES_PER_HPAGE(level),
        "spte": f"{spte:#x}", "entry": describe(spte),
        "removed_by_worker": kvm.w.load(lay.sp(page, SpMeta.REMOVED_BY)) - 1,
        "last_written_by_worker": kvm.w.load(lay.sp(page, SpMeta.LAST_WRITER)) - 1,
    }


def sp_state(kvm: Kvm, page: int) -> int:
    return kvm.w.load(kvm.layout.sp(page, SpMeta.STATE))
