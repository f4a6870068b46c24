"""Quiescent invariants: walk everything while no worker runs.

The supervisor calls :func:`quiescent_check` with every worker parked at an op
boundary (outside mmu_lock and RCU), and :func:`teardown_check` after the VM's
page tables were torn down.  Each broken invariant is returned as an
:class:`InvariantViolation` named as the kernel would name the problem, with
the gfn and entries involved; the first one stops the run.

Online checks live in the model itself (poison and generation checks in
``tdp_iter``, the PFN-change BUG in ``handle_changed_spte``, the
removed-table check in the RCU callback, FROZEN under the write lock).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from stress.arena import WORDS_PER_PAGE, Globals, SpMeta
from stress.atomics import Words
from stress.model.errors import InvariantViolation
from stress.model.kvm import Kvm
from stress.model.mmu_page import (
    SP_FREE,
    SP_LINKED,
    SP_PRIVATE,
    SP_REMOVED,
    SP_STATE_NAMES,
    removed_entry_details,
    role_level,
)
from stress.model.spte import (
    FROZEN_SPTE,
    KVM_PAGES_PER_HPAGE,
    POISON_SPTE,
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMU_PRESENT_MASK,
    describe,
    gfn_to_host_pfn,
    is_last_spte,
    is_shadow_present_pte,
    spte_to_pfn,
)


@dataclass
class QuiescentReport:
    tables: int = 0
    leaves: int = 0
    states: Counter[str] = field(default_factory=Counter)
    violations: list[InvariantViolation] = field(default_factory=list)

    def fail(self, invariant: str, message: str, **details: object) -> None:
        details.setdefault("worker", "checker")
        self.violations.append(InvariantViolation(invariant, message, **details))


def _page_states(w: Words, kvm: Kvm) -> list[int]:
    lay = kvm.layout
    return [w.load(lay.sp(p, SpMeta.STATE)) for p in range(lay.n_pages)]


def quiescent_check(kvm: Kvm) -> QuiescentReport:
    """Walk every table reachable from the root and account every page."""
    w, lay = kvm.w, kvm.layout
    rep = QuiescentReport()
    states = _page_states(w, kvm)
    rep.states = Counter(SP_STATE_NAMES.get(s, str(s)) for s in states)
    root = w.load(lay.glob(Globals.ROOT))
    top = kvm.geometry.root_level
    reachable: dict[int, tuple[int, int]] = {}
    stack = [(root, top, 0, None)]
    while stack:
        page, level, base, parent = stack.pop()
        if page in reachable:
            rep.fail("page-table page linked twice",
                     "one table is reachable from two parent SPTEs",
                     table=page, level=level, gfn=base, first_gfn=reachable[page][1])
            continue
        reachable[page] = (level, base)
        state = states[page]
        m_level = role_level(w.load(lay.sp(page, SpMeta.ROLE)))
        m_gfn = w.load(lay.sp(page, SpMeta.GFN))
        if state != SP_LINKED or m_level != level or m_gfn != base:
            rep.fail("reachable table not live",
                     "a table reachable from the root is not a LINKED table of this "
                     "level and gfn",
                     table=page, state=SP_STATE_NAMES.get(state, state), level=m_level,
                     expected_level=level, base_gfn=m_gfn, expected_base_gfn=base,
                     parent=parent)
            continue
        rep.tables += 1
        for i, v in w.scan_ne(lay.spt(page), WORDS_PER_PAGE, SHADOW_NONPRESENT_VALUE):
            gfn = base + i * KVM_PAGES_PER_HPAGE(level)
            if v == FROZEN_SPTE:
                rep.fail("FROZEN SPTE reachable at quiescence",
                         "a live table holds a FROZEN entry although no task is mid-update",
                         table=page, level=level, index=i, gfn=gfn)
            elif v == POISON_SPTE:
                rep.fail("poison reachable", "a live table holds poison",
                         table=page, level=level, index=i, gfn=gfn)
            elif not is_shadow_present_pte(v):
                rep.fail("corrupt non-present SPTE",
                         "a non-present entry holds neither SHADOW_NONPRESENT_VALUE nor FROZEN",
                         table=page, level=level, index=i, gfn=gfn, spte=f"{v:#x}")
            elif is_last_spte(v, level):
                rep.leaves += 1
                if spte_to_pfn(v) != gfn_to_host_pfn(gfn):
                    rep.fail("leaf maps wrong pfn", "a leaf maps another gfn's host page",
                             table=page, level=level, gfn=gfn, entry=describe(v),
                             expected_pfn=gfn_to_host_pfn(gfn))
            else:
                child = spte_to_pfn(v)
                if child >= lay.n_pages:
                    rep.fail("corrupt non-leaf SPTE", "points outside the page pool",
                             table=page, level=level, gfn=gfn, spte=f"{v:#x}")
                else:
                    stack.append((child, level - 1, gfn, page))
        if rep.violations:
            return rep

    counted = w.load(lay.glob(Globals.TDP_MMU_PAGES))
    if counted != len(reachable) - 1:
        rep.fail("tdp_mmu_pages accounting",
                 "kvm->arch.tdp_mmu_pages differs from the number of reachable tables",
                 tdp_mmu_pages=counted, reachable_non_root=len(reachable) - 1)
    for page, state in enumerate(states):
        if state == SP_LINKED and page not in reachable:
            rep.fail("leaked page-table page",
                     "a LINKED table is not reachable from the root: no zap will ever free it",
                     table=page, level=role_level(w.load(lay.sp(page, SpMeta.ROLE))),
                     base_gfn=w.load(lay.sp(page, SpMeta.GFN)))
            break
        if state == SP_PRIVATE:
            rep.fail("leaked page-table page",
                     "a page allocated for a table was neither linked nor freed",
                     table=page)
            break
        if state == SP_REMOVED:
            _check_removed(kvm, page, rep)
    free_bits = w.popcount(lay.bitmap, lay.bitmap_words)
    if free_bits != rep.states.get("FREE", 0):
        rep.fail("page pool accounting",
                 "the free bitmap and the pages' FREE states disagree",
                 free_bits=free_bits, free_states=rep.states.get("FREE", 0))
    return rep


def _check_removed(kvm: Kvm, page: int, rep: QuiescentReport) -> None:
    """A removed table awaiting RCU holds nothing present (see the RCU callback)."""
    w, lay = kvm.w, kvm.layout
    i = w.find_mask(lay.spt(page), WORDS_PER_PAGE, SPTE_MMU_PRESENT_MASK)
    if i >= 0:
        rep.fail("SPTE installed in removed table",
                 "a present entry was written into a page table after handle_removed_pt "
                 "unlinked it: the mapping is leaked and invisible to zaps",
                 **removed_entry_details(kvm, page, i))


def teardown_check(kvm: Kvm) -> QuiescentReport:
    """After kvm_mmu_uninit_tdp_mmu: every page back in the pool, nothing accounted."""
    w, lay = kvm.w, kvm.layout
    rep = QuiescentReport()
    states = _page_states(w, kvm)
    rep.states = Counter(SP_STATE_NAMES.get(s, str(s)) for s in states)
    leaked = [p for p, s in enumerate(states) if s != SP_FREE]
    if leaked:
        rep.fail("leaked page-table page",
                 f"{len(leaked)} page(s) not back in the pool after teardown",
                 tables=leaked[:16],
                 states={SP_STATE_NAMES.get(states[p], states[p]) for p in leaked[:16]})
    counted = w.load(lay.glob(Globals.TDP_MMU_PAGES))
    if counted:
        rep.fail("tdp_mmu_pages accounting", "tdp_mmu_pages is not 0 after teardown",
                 tdp_mmu_pages=counted)
    if w.popcount(lay.bitmap, lay.bitmap_words) != lay.n_pages:
        rep.fail("page pool accounting", "free bitmap is not full after teardown",
                 free_bits=w.popcount(lay.bitmap, lay.bitmap_words), pages=lay.n_pages)
    return rep
