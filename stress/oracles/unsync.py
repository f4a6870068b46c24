"""Nested TDP's unsync bookkeeping (mmu_unsync_pages_lock, unsync_children)."""

from __future__ import annotations

from stress.arena import Globals
from stress.model.kvm import Kvm
from stress.model.unsync import (
    BITMAP,
    N_LEAVES,
    N_MID,
    ROOT_SP,
    UNSYNC,
    UNSYNC_CHILDREN,
    leaf_sp,
    mid_sp,
    parent_of,
    sp_word,
)
from stress.oracles.base import HOOK_QUIESCENT, listed, oracle


@oracle("missed sync",
        invariant="a sync pass under the write lock leaves no shadow page unsync (no task can "
                  "mark one meanwhile): one left behind was hidden by a lost bit or a count "
                  "that reached 0 early, i.e. guest memory corruption",
        hook="unsync_sync_done", when="kvm_mmu_sync_roots, write lock still held",
        cost="one load per shadowed leaf per sync")
def sync_leaves_nothing_unsync(kvm: Kvm) -> None:
    left = [leaf_sp(k) for k in range(N_LEAVES) if kvm.w.load(sp_word(kvm, leaf_sp(k), UNSYNC))]
    if left:
        kvm.bug("missed sync", "a sync pass left unsync shadow pages behind: an ancestor's "
                "unsync_children reached 0 (or lost its bit) while a child was still unsync",
                shadow_pages=left,
                chain={str(p): kvm.w.load(sp_word(kvm, p, UNSYNC_CHILDREN))
                       for p in (ROOT_SP, *(mid_sp(m) for m in range(N_MID)))})


for _name, _inv in (
        ("unsync_children != popcount(bitmap)",
         "each shadow page's unsync_children equals the bits set in its unsync_child_bitmap"),
        ("unsync page unreachable",
         "every unsync shadow page is reachable from the root through set bits"),
        ("kvm->stat.mmu_unsync accounting",
         "kvm->stat.mmu_unsync equals the pages marked unsync")):
    listed(_name, invariant=_inv, hook=HOOK_QUIESCENT, when="every worker parked",
           cost="one pass over the shadow pages", module="unsync")


def check_unsync_state(kvm: Kvm) -> list[tuple[str, str, dict]]:
    """Quiescent invariants: count == popcount(bitmap) >= 0 for every page, every
    unsync leaf is reachable through set bits, kvm->stat.mmu_unsync is right."""
    out = []
    for sp in range(1 + N_MID + N_LEAVES):
        n = kvm.w.load(sp_word(kvm, sp, UNSYNC_CHILDREN))
        bits = kvm.w.popcount(sp_word(kvm, sp, BITMAP), 8)
        if n != bits:
            out.append(("unsync_children != popcount(bitmap)",
                        "a shadow page's unsync_children disagrees with its bitmap",
                        {"shadow_page": sp, "unsync_children": n, "popcount": bits}))
    unsync = 0
    for k in range(N_LEAVES):
        sp = leaf_sp(k)
        if not kvm.w.load(sp_word(kvm, sp, UNSYNC)):
            continue
        unsync += 1
        node = sp
        while (parent := parent_of(node)) is not None:
            p, idx = parent
            if not kvm.w.load(sp_word(kvm, p, BITMAP + idx // 64)) & (1 << (idx % 64)):
                out.append(("unsync page unreachable",
                            "an unsync shadow page has an ancestor whose bit is clear: no "
                            "sync will find it", {"shadow_page": sp, "ancestor": p,
                                                   "index": idx}))
                break
            node = p
    stat = kvm.w.load(kvm.layout.glob(Globals.STAT_MMU_UNSYNC))
    if stat != unsync:
        out.append(("kvm->stat.mmu_unsync accounting",
                    "the unsync page counter differs from the pages marked unsync",
                    {"stat": stat, "unsync_pages": unsync}))
    return out
