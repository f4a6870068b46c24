"""Memory safety of the page-table pool, KASAN-like.

Freed page-table pages are poisoned (every entry reads ``POISON_SPTE``, which
is not present) and their generation moves on, so a walker that reads a freed
or reused table is caught at the load, as KASAN would catch the kernel's.
"""

from __future__ import annotations

from typing import Any

from stress.arena import WORDS_PER_PAGE, SpMeta
from stress.model.host import host_pfn, pfn_gfn_gen
from stress.model.kvm import Kvm
from stress.model.spte import SPTE_MMU_PRESENT_MASK
from stress.oracles.base import oracle
from stress.oracles.provenance import removed_entry_facts

_UAF_TEXT = {
    ("poison", "kvm"): "a walker read a page-table page that was already freed (poisoned)",
    ("poison", "guest"): "the guest's hardware walker read a page-table page that was freed "
                         "while this vCPU could still walk it",
    ("reused", "kvm"): "the page-table page was freed (and maybe reused) while a walker was "
                       "inside it under rcu_read_lock()",
    ("bad-child", "kvm"): "a live non-leaf SPTE points at a page that is free or is another "
                          "table",
}


@oracle("use-after-free of page-table page",
        invariant="no walker (KVM's under RCU, or the guest's hardware walker) reads a "
                  "page-table page after it was freed, and no live non-leaf SPTE points at a "
                  "free page or at a table of another level or range",
        hook="kasan_report", when="at the load that reads the page (the walker's own checks)",
        cost="two loads per SPTE read (poison value, page generation)")
def use_after_free(kvm: Kvm, kind: str, **details: Any) -> None:
    table = details.get("table")
    if table is not None and 0 <= table < kvm.layout.n_pages:
        details.setdefault("removed_by_worker",
                           kvm.w.load(kvm.layout.sp(table, SpMeta.REMOVED_BY)) - 1)
    text = _UAF_TEXT.get((kind, details.get("walker", "kvm")), f"use-after-free ({kind})")
    kvm.bug("use-after-free of page-table page", text, **details)


@oracle("SPTE installed in removed table",
        invariant="once handle_removed_pt has unlinked a table, nothing writes a present entry "
                  "into it: such a mapping is invisible to every zap",
        hook="sp_free", when="the table's RCU callback, after the grace period",
        cost="one native scan of 512 entries per freed table")
def nothing_installed_in_removed_table(kvm: Kvm, page: int) -> None:
    lay = kvm.layout
    i = kvm.w.find_mask(lay.spt(page), WORDS_PER_PAGE, SPTE_MMU_PRESENT_MASK)
    if i >= 0:
        kvm.bug("SPTE installed in removed table",
                "a removed table still holds a present entry when its RCU callback runs "
                "(written after handle_removed_pt unlinked the table, or never cleared by "
                "it): the mapping is leaked and invisible to zaps",
                **removed_entry_facts(kvm, page, i))


@oracle("guest access to freed page",
        invariant="a guest access completes only through the host page that backs the gfn "
                  "now: a translation never outlives the page it points to",
        hook="guest_translate", when="each completed guest access (TLB hit or walk)",
        cost="one load per guest access")
def guest_translates_to_live_page(kvm: Kvm, gfn: int, pfn: int, how: str) -> None:
    now = host_pfn(kvm, gfn, pfn_gfn_gen(kvm, pfn)[2])  # of the backing it translated to
    if pfn != now:
        kvm.bug("guest access to freed page",
                f"the guest accessed a host page already released ({how}): its translation "
                "outlived the page", gfn=gfn, pfn=f"{pfn:#x}", current_pfn=f"{now:#x}",
                vcpu=kvm.me)


@oracle("iterator outside its tree",
        invariant="a TDP iterator walks only its root's tree: its level stays between the "
                  "walk's min_level and the root's level (tdp_iter_next steps down only above "
                  "min_level and up only below the root), so each table it reads is one its "
                  "root links through the path it holds (iter->pt_path)",
        hook="iter_level", when="each step down or up of a walk, before the entry is read",
        cost="two comparisons per change of level (not per entry)")
def iter_within_levels(kvm: Kvm, it: Any) -> None:
    if not it.min_level <= it.level <= it.root_level:
        kvm.bug("iterator outside its tree",
                "a TDP iterator stepped to a level outside [min_level, root level]: the "
                "entry it would read next is in no table of its walk (out of bounds of "
                "iter->pt_path)", level=it.level, min_level=it.min_level,
                root_level=it.root_level, gfn=it.gfn)
