"""SPTE transitions: every change KVM makes to an entry is one the kernel allows.

Checked at the store that makes it (the ``spte_store`` hook, where the kernel
has trace_kvm_tdp_mmu_spte_changed), so a forbidden change is named with the
task, the entry and both values before anything else can go wrong:

* FROZEN_SPTE belongs to the task that froze it: only that task may replace
  it (with the new value, or the old one back); nobody freezes a frozen entry.
  The children handle_removed_pt freezes in a dead table stay frozen: nobody
  may change them at all.
* A present leaf never changes PFN in place, and a present non-leaf never
  points to another table in place (spte.h / handle_changed_spte: a change of
  PFN goes through a zap, so the old page is flushed and released).
* A huge leaf becomes a table only by a split that keeps its translation:
  every entry of the new table maps the next frames of the huge page with at
  least its permissions (tdp_mmu_split_huge_page's make_small_spte), checked
  while the table is still private to the splitting task, and the table linked
  in place of the leaf is the one split from it.
* A fault never takes permissions away from a present leaf of the same PFN
  and level, and never installs anything into a root already marked invalid.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from stress.arena import SpMeta
from stress.model.kvm import Kvm
from stress.model.mmu_page import ROLE_INVALID
from stress.model.spte import (
    FROZEN_SPTE,
    KVM_PAGES_PER_HPAGE,
    PT_WRITABLE_MASK,
    VMX_EPT_EXECUTABLE_MASK,
    VMX_EPT_READABLE_MASK,
    describe,
    is_last_spte,
    is_shadow_present_pte,
    pfn_to_sp,
    spte_to_pfn,
)
from stress.oracles.base import oracle

# the entries this task froze and has not yet written back
_frozen: WeakKeyDictionary[Kvm, set[int]] = WeakKeyDictionary()
# the tables this task split a huge leaf into and has not linked yet: table -> the leaf
_split: WeakKeyDictionary[Kvm, dict[int, int]] = WeakKeyDictionary()
_PERMS = VMX_EPT_READABLE_MASK | PT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK


def _bad(kvm: Kvm, what: str, rule: str, sptep: int, gfn: int, level: int, old: int,
         new: int) -> None:
    kvm.bug("forbidden SPTE transition", f"{what}: {describe(old)} -> {describe(new)}",
            rule=rule, gfn=gfn, level=level, table=(sptep - kvm.layout.pages) >> 9,
            old=f"{old:#x}", new=f"{new:#x}",
            last_writer_worker=kvm.w.load(
                kvm.layout.sp((sptep - kvm.layout.pages) >> 9, SpMeta.LAST_WRITER)) - 1)


@oracle("forbidden SPTE transition",
        invariant="FROZEN_SPTE is replaced only by the task that froze it, nothing freezes a "
                  "frozen entry, a present leaf never changes PFN in place, a present "
                  "non-leaf never points to another table in place, and a huge leaf is "
                  "replaced by a table only when the table was split from it",
        hook="spte_store", when="at every SPTE store or cmpxchg KVM makes",
        cost="a few compares per store; a set update per freeze")
def allowed_transition(kvm: Kvm, sptep: int, gfn: int, level: int, old: int, new: int) -> None:
    mine = _frozen.setdefault(kvm, set())
    if old == FROZEN_SPTE:
        if new == FROZEN_SPTE:
            _bad(kvm, "a frozen entry was frozen again", "freeze of FROZEN", sptep, gfn, level,
                 old, new)
        if sptep not in mine:
            _bad(kvm, "a frozen entry was replaced by a task that did not freeze it",
                 "FROZEN belongs to its owner", sptep, gfn, level, old, new)
        mine.discard(sptep)
        return
    if new == FROZEN_SPTE:
        mine.add(sptep)
        return
    if not (is_shadow_present_pte(old) and is_shadow_present_pte(new)):
        return
    old_leaf, new_leaf = is_last_spte(old, level), is_last_spte(new, level)
    if old_leaf and not new_leaf:  # a huge leaf replaced by a table: its split
        if _split.setdefault(kvm, {}).pop(pfn_to_sp(spte_to_pfn(new)), None) != old:
            _bad(kvm, "a huge leaf was replaced by a table that was not split from it",
                 "a huge leaf becomes a table only by its split", sptep, gfn, level, old, new)
    if old_leaf and new_leaf and spte_to_pfn(old) != spte_to_pfn(new):
        _bad(kvm, "a present leaf changed PFN in place", "no present -> present PFN change",
             sptep, gfn, level, old, new)
    if not old_leaf and not new_leaf and spte_to_pfn(old) != spte_to_pfn(new):
        _bad(kvm, "a present non-leaf now points to another table",
             "no present -> present PFN change", sptep, gfn, level, old, new)


@oracle("forbidden SPTE transition",
        invariant="a split keeps the huge leaf's translation: each entry of the table it "
                  "makes is a present leaf mapping the huge page's next frames with at least "
                  "the huge leaf's permissions",
        hook="huge_split", when="a huge leaf is split, before the table is linked (the "
                                "table is still private to the splitting task)",
        cost="512 loads per split")
def split_keeps_translation(kvm: Kvm, it: Any, sp: int) -> None:
    huge, child = it.old_spte, it.level - 1
    base, step, pfn = kvm.layout.spt(sp), KVM_PAGES_PER_HPAGE(child), spte_to_pfn(it.old_spte)
    for i in range(512):
        v = kvm.w.load(base + i)
        if not (is_shadow_present_pte(v) and is_last_spte(v, child)) \
                or spte_to_pfn(v) != pfn + i * step or huge & _PERMS & ~v:
            kvm.bug("forbidden SPTE transition",
                    f"a split of a level-{it.level} leaf made a table whose entry {i} does "
                    f"not map the huge page's frame {i}: {describe(huge)} -> {describe(v)}",
                    rule="a split keeps the translation", gfn=it.gfn + i * step, level=child,
                    table=sp, index=i, huge=f"{huge:#x}", entry=f"{v:#x}")
    _split.setdefault(kvm, {})[sp] = huge


@oracle("forbidden SPTE transition",
        invariant="a fault never takes permissions away from a present leaf of the same PFN "
                  "and level, and never installs into a root already marked invalid",
        hook="leaf_installed", when="after the fault's leaf cmpxchg, read lock held (roots "
                                    "become invalid only under the write lock)",
        cost="a few compares and one load per installed leaf")
def fault_only_adds(kvm: Kvm, it: Any, fault: Any, old_spte: int, new_spte: int) -> None:
    root = it.pt_path[it.root_level]
    if kvm.w.load(kvm.layout.sp(root, SpMeta.ROLE)) & ROLE_INVALID:
        _bad(kvm, "a fault installed a leaf in a root already marked invalid",
             "nothing becomes present in an invalid root", it.sptep, it.gfn, it.level,
             old_spte, new_spte)
    if (is_shadow_present_pte(old_spte) and is_last_spte(old_spte, it.level)
            and spte_to_pfn(old_spte) == spte_to_pfn(new_spte)
            and old_spte & _PERMS & ~new_spte):
        _bad(kvm, "a fault took permissions away from a present leaf",
             "a fault never removes permissions", it.sptep, it.gfn, it.level, old_spte, new_spte)


@oracle("kernel WARNING",
        invariant="no WARN_ON fires: each of the model's WARN_ON_ONCE (tdp_iter_start's "
                  "checks, an atomic write over a frozen SPTE, a non-present to non-present "
                  "change, a non-leaf PFN change, a spurious fault with another pfn) is a "
                  "kernel assertion of a state that must not happen; the kernel goes on, a "
                  "test kernel with panic_on_warn (as fuzzers run it) stops",
        hook="kernel_warning", when="the WARN, where it fires",
        cost="nothing until a WARN fires")
def no_kernel_warning(kvm: Kvm, what: str, details: dict[str, Any]) -> None:
    kvm.bug("kernel WARNING", f"WARNING: {what}", warning=what, **details)
