"""Quiescent invariants: walk everything while no worker runs.

The supervisor calls :func:`quiescent_check` with every worker parked at an op
boundary (outside mmu_lock and RCU), and :func:`teardown_check` after the VM's
page tables were torn down.  Each broken invariant is returned as an
:class:`InvariantViolation` named as the kernel would name the problem, with
the gfn and entries involved; the first one stops the run.

The online oracles attach to the model's hooks (the other modules of this
package); the kernel's own assertions (the PFN-change BUG in
``handle_changed_spte``, FROZEN under the write lock, lockdep) stay in the
model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from stress.arena import WORDS_PER_PAGE, Globals, SpMeta
from stress.atomics import Words
from stress.model.errors import InvariantViolation
from stress.model.guest import guest_accepted
from stress.model.host import (
    KVM_LPAGE_MIXED_FLAG,
    KVM_PAGES_PER_2M,
    host_folio_intact,
    host_page_gen,
    host_pfn,
    hugepage_has_uniform_attrs,
    lpage_info_i,
    pfn_gfn_gen,
)
from stress.model.kvm import (
    LOCK_NONE,
    Kvm,
    gfn_to_memslot,
    index_to_gfn,
    kvm_gfn_direct_bits,
    kvm_mem_is_private,
)
from stress.model.mmu_page import (
    ROLE_INVALID,
    ROLE_MIRROR,
    SP_EXT_HELD,
    SP_FREE,
    SP_LINKED,
    SP_PRIVATE,
    SP_REMOVED,
    SP_SEPT,
    SP_STATE_NAMES,
    external_spt,
    kvm_gfn_root_bits,
    role_level,
)
from stress.model.roots import listed_roots
from stress.model.spte import (
    FROZEN_SPTE,
    KVM_PAGES_PER_HPAGE,
    POISON_SPTE,
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMU_PRESENT_MASK,
    describe,
    is_last_spte,
    is_shadow_present_pte,
    pfn_to_sp,
    spte_to_pfn,
)
from stress.model.tdx import (
    SEPT_BLOCKED,
    SEPT_FREE,
    SEPT_MAPPED,
    SEPT_PENDING,
    SEPT_PENDING_BLOCKED,
    SEPT_TABLE,
    SEPT_TABLE_BLOCKED,
    describe_sept,
    sept_entry,
    sept_pfn,
    sept_state,
    sept_value,
)
from stress.oracles.base import HOOK_QUIESCENT, HOOK_TEARDOWN, listed
from stress.oracles.provenance import removed_entry_facts
from stress.oracles.unsync import check_unsync_state


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
    """Walk every table reachable from the roots and account every page."""
    w, lay = kvm.w, kvm.layout
    rep = QuiescentReport()
    states = _page_states(w, kvm)
    rep.states = Counter(SP_STATE_NAMES.get(s, str(s)) for s in states)
    roots = listed_roots(kvm)
    reachable: dict[int, tuple[int, int]] = {}
    valid_by_role: dict[int, int] = {}
    for root in roots:
        _check_root(kvm, root, rep)
        role = w.load(lay.sp(root, SpMeta.ROLE))
        if not role & ROLE_INVALID and not rep.violations:
            if role in valid_by_role:
                # kvm_tdp_mmu_alloc_root looks for a valid root of the role again under
                # tdp_mmu_pages_lock before it allocates: a vCPU takes the one there is
                rep.fail("two valid roots of one role",
                         "two valid roots on the list have the same role: vCPUs of one "
                         "MMU use different page tables",
                         root=root, other_root=valid_by_role[role], role=role,
                         mirror=bool(role & ROLE_MIRROR))
            valid_by_role[role] = root
        _walk_root(kvm, root, states, reachable, rep)
        if rep.violations:
            return rep
    mirror_root = w.load(lay.glob(Globals.MIRROR_ROOT)) if kvm.geometry.tdx else None
    if mirror_root is not None and mirror_root not in roots:
        rep.fail("mirror root not listed", "the mirror root is not on the roots list",
                 root=mirror_root)
        return rep
    counted = w.load(lay.glob(Globals.TDP_MMU_PAGES))
    if counted != len(reachable) - len(roots):
        rep.fail("tdp_mmu_pages accounting",
                 "kvm->arch.tdp_mmu_pages differs from the number of reachable tables",
                 tdp_mmu_pages=counted, reachable_non_root=len(reachable) - len(roots))
    if kvm.geometry.tdx:
        _check_lpage_info(kvm, rep)
    sept_reachable: set[int] = set()
    if mirror_root is not None:
        _check_mirror(kvm, mirror_root, sept_reachable, rep)
        if not rep.violations:
            _check_accepted(kvm, rep)
    removed_ext = set()
    for page, state in enumerate(states):
        if state == SP_LINKED and page not in reachable:
            rep.fail("leaked page-table page",
                     "a LINKED table is not reachable from a root: no zap will ever free it",
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
            ext = external_spt(kvm, page)
            if ext is not None:
                removed_ext.add(ext)
        if state == SP_SEPT and page not in sept_reachable:
            rep.fail("S-EPT table without live mirror table",
                     "the TDX module owns an S-EPT table that no live mirror table matches",
                     sept_table=page, level=role_level(w.load(lay.sp(page, SpMeta.ROLE))),
                     base_gfn=w.load(lay.sp(page, SpMeta.GFN)))
            break
    for page, state in enumerate(states):
        if state == SP_EXT_HELD and page not in removed_ext:
            rep.fail("leaked S-EPT page",
                     "a page KVM holds for the TDX module belongs to no removed mirror table",
                     page=page)
            break
    if kvm.shadowed:
        for invariant, message, details in check_unsync_state(kvm):
            rep.fail(invariant, message, **details)
    free_bits = w.popcount(lay.bitmap, lay.bitmap_words)
    if free_bits != rep.states.get("FREE", 0):
        rep.fail("page pool accounting",
                 "the free bitmap and the pages' FREE states disagree",
                 free_bits=free_bits, free_states=rep.states.get("FREE", 0))
    return rep


def _check_root(kvm: Kvm, root: int, rep: QuiescentReport) -> None:
    """A listed root is live and referenced; at quiescence (no walker, no vCPU in
    an op) an invalid root is one whose zap has not released it yet or that a
    vCPU still holds."""
    w, lay = kvm.w, kvm.layout
    count = w.load(lay.sp(root, SpMeta.ROOT_COUNT))
    if count == 0 or count >= 1 << 62:
        rep.fail("listed root without references",
                 "a root on the list has tdp_mmu_root_count 0 (or negative)", root=root,
                 count=count)


def _walk_root(kvm: Kvm, root: int, states: list[int], reachable: dict[int, tuple[int, int]],
               rep: QuiescentReport) -> None:
    w, lay = kvm.w, kvm.layout
    root_role = w.load(lay.sp(root, SpMeta.ROLE))
    root_bits = kvm_gfn_root_bits(kvm, root)
    # gfns as the tables see them: a TD's direct root has the shared bit in them
    stack = [(root, role_level(root_role), 0, None)]  # the root's own role.level
    while stack:
        page, level, base, parent = stack.pop()
        if page in reachable:
            rep.fail("page-table page linked twice",
                     "one table is reachable from two parent SPTEs",
                     table=page, level=level, gfn=base, first_gfn=reachable[page][1])
            return
        reachable[page] = (level, base)
        state = states[page]
        role = w.load(lay.sp(page, SpMeta.ROLE))
        m_gfn = w.load(lay.sp(page, SpMeta.GFN))
        if state != SP_LINKED or role != (root_role & ~0xF) | level or m_gfn != base:
            rep.fail("reachable table not live",
                     "a table reachable from the root is not a LINKED table of this "
                     "level, gfn and root type",
                     table=page, state=SP_STATE_NAMES.get(state, state), level=role_level(role),
                     expected_level=level, mirror=bool(role & ROLE_MIRROR),
                     base_gfn=m_gfn, expected_base_gfn=base, parent=parent)
            return
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
                _check_leaf(kvm, rep, page, level, i, gfn, v, root_role, root_bits)
            else:
                child = pfn_to_sp(spte_to_pfn(v))
                if child >= lay.n_pages:
                    rep.fail("corrupt non-leaf SPTE", "points outside the page pool",
                             table=page, level=level, gfn=gfn, spte=f"{v:#x}")
                else:
                    stack.append((child, level - 1, gfn, page))
        if rep.violations:
            return


def _check_leaf(kvm: Kvm, rep: QuiescentReport, page: int, level: int, i: int, walked: int,
                v: int, root_role: int, root_bits: int) -> None:
    """A leaf at ``walked`` (the gfn the tables index, the root's bits included)
    maps the host page of the memslot gfn it stands for."""
    mirror = bool(root_role & ROLE_MIRROR)
    direct_bits = kvm_gfn_direct_bits(kvm)
    gfn = walked & ~direct_bits
    if walked & direct_bits != root_bits:
        rep.fail("gfn mapped in the wrong root",
                 "a leaf sits in the half of its root that the root does not map: a TD's "
                 "direct root maps shared gfns at gfn | the shared bit, the mirror root "
                 "private ones at the plain gfn", gfn=gfn, walked_gfn=walked, mirror=mirror,
                 table=page, level=level, entry=describe(v))
        return
    if gfn_to_memslot(kvm, gfn) is None:
        rep.fail("leaf outside every memslot", "a leaf maps a gfn that no memslot holds "
                 "(KVM maps only memslot gfns: the hole is MMIO)", gfn=gfn, table=page,
                 level=level, entry=describe(v))
        return
    if level > 1:
        _check_huge_leaf(kvm, rep, page, level, i, gfn, v, mirror)
        return
    mapped_gfn, gen, gmem = pfn_gfn_gen(kvm, spte_to_pfn(v))
    if mapped_gfn != gfn or (kvm.geometry.tdx and gmem != mirror):
        rep.fail("leaf maps wrong pfn", "a leaf maps another gfn's host page, or a page of "
                 "the backing its root does not map (the mirror maps guest_memfd's pages, the "
                 "direct root the VMM's)", table=page, level=level, gfn=gfn, entry=describe(v),
                 expected_pfn=host_pfn(kvm, gfn, mirror))
    elif gen != host_page_gen(kvm, gfn, gmem):
        rep.fail("stale mapping after invalidate_end",
                 "a leaf maps a host page that a completed invalidation freed",
                 table=page, level=level, gfn=gfn, entry=describe(v),
                 mapped_gen=gen, current_gen=host_page_gen(kvm, gfn, gmem))
    elif kvm.geometry.tdx and kvm_mem_is_private(kvm, gfn) != mirror:
        rep.fail("gfn mapped in the wrong root",
                 "a private gfn is mapped in the direct root or a shared gfn in "
                 "the mirror root", gfn=gfn, mirror=mirror, entry=describe(v))


def _check_huge_leaf(kvm: Kvm, rep: QuiescentReport, page: int, level: int, i: int, gfn: int,
                     v: int, mirror: bool) -> None:
    """A 2M leaf maps one intact host folio, current for every gfn it covers,
    over gfns whose attributes are uniform and match the root (direct: all
    shared); mirror (TDX) leaves are 4K only."""
    where = {"table": page, "level": level, "index": i, "gfn": gfn, "entry": describe(v)}
    mapped_gfn, gen, gmem = pfn_gfn_gen(kvm, spte_to_pfn(v))
    if mirror:
        rep.fail("mirror huge page", "a mirror root holds a huge leaf (TDX maps private "
                 "memory with 4K pages only)", **where)
    elif mapped_gfn != gfn or gmem:
        rep.fail("leaf maps wrong pfn", "a 2M leaf maps another region's host pages (or "
                 "guest_memfd's)",
                 expected_pfn=host_pfn(kvm, gfn), **where)
    elif gen != host_page_gen(kvm, gfn) or not host_folio_intact(kvm, gfn):
        rep.fail("stale mapping after invalidate_end",
                 "a 2M leaf maps a host folio that was replaced or split under it",
                 mapped_gen=gen, current_gen=host_page_gen(kvm, gfn), **where)
    elif kvm.geometry.tdx and not hugepage_has_uniform_attrs(kvm, gfn):
        rep.fail("huge page over mixed attributes",
                 "a 2M leaf covers gfns whose memory attributes differ (some are private)",
                 **where)
    elif kvm.geometry.tdx and kvm_mem_is_private(kvm, gfn):
        rep.fail("gfn mapped in the wrong root",
                 "a 2M leaf of the direct root maps private gfns", mirror=False, **where)


def _check_lpage_info(kvm: Kvm, rep: QuiescentReport) -> None:
    """With no conversion running, every region's mixed flag says whether its
    attributes are mixed (kvm_arch_post_set_memory_attributes kept it)."""
    for slot in kvm.geometry.memslots:
        for base in range(slot.base_gfn, slot.end_gfn - KVM_PAGES_PER_2M + 1, KVM_PAGES_PER_2M):
            mixed = bool(kvm.w.load(lpage_info_i(kvm, base)) & KVM_LPAGE_MIXED_FLAG)
            if mixed == hugepage_has_uniform_attrs(kvm, base):
                rep.fail("lpage_info mixed flag wrong",
                         "a 2M region's KVM_LPAGE_MIXED_FLAG disagrees with its attributes",
                         gfn=base, mixed_flag=mixed)
                return


def _check_mirror(kvm: Kvm, mirror_root: int, sept_reachable: set[int],
                  rep: QuiescentReport) -> None:
    """Mirror and S-EPT agree entry for entry: present, PFN, level, table; nothing
    blocked is left; every S-EPT table is the external_spt of a live mirror table."""
    w, lay = kvm.w, kvm.layout
    sept_root = w.load(lay.glob(Globals.SEPT_ROOT))
    if external_spt(kvm, mirror_root) != sept_root:
        rep.fail("mirror/S-EPT divergence", "the mirror root's external_spt is not the "
                 "S-EPT root", mirror_root=mirror_root, sept_root=sept_root)
        return
    stack = [(mirror_root, sept_root, role_level(w.load(lay.sp(mirror_root, SpMeta.ROLE))), 0)]
    while stack:
        mpage, spage, level, base = stack.pop()
        sept_reachable.add(spage)
        mirror = dict(w.scan_ne(lay.spt(mpage), WORDS_PER_PAGE, SHADOW_NONPRESENT_VALUE))
        sept = {i: sept_value(e)
                for i, e in w.scan_ne(lay.spt(spage), WORDS_PER_PAGE, sept_entry(SEPT_FREE))}
        for i in sorted(mirror.keys() | sept.keys()):
            m = mirror.get(i, SHADOW_NONPRESENT_VALUE)
            e = sept.get(i, sept_entry(SEPT_FREE))
            st = sept_state(e)
            gfn = base + i * KVM_PAGES_PER_HPAGE(level)
            both = {"gfn": gfn, "level": level, "mirror": describe(m), "sept": describe_sept(e),
                    "mirror_table": mpage, "sept_table": spage}
            if st in (SEPT_BLOCKED, SEPT_TABLE_BLOCKED, SEPT_PENDING_BLOCKED):
                rep.fail("blocked S-EPT entry at quiescence",
                         "an S-EPT entry is still blocked although no removal is running",
                         **both)
            elif not is_shadow_present_pte(m):
                if st != SEPT_FREE:
                    rep.fail("mirror/S-EPT divergence",
                             "the S-EPT maps what the mirror does not", **both)
            elif is_last_spte(m, level):
                if st not in (SEPT_MAPPED, SEPT_PENDING) or sept_pfn(e) != spte_to_pfn(m):
                    rep.fail("mirror/S-EPT divergence",
                             "the mirror maps a page the S-EPT does not map (or another pfn)",
                             **both)
            else:
                child = pfn_to_sp(spte_to_pfn(m))
                ext = external_spt(kvm, child)
                if st != SEPT_TABLE or sept_pfn(e) != ext:
                    rep.fail("mirror/S-EPT divergence",
                             "a mirror table has no matching S-EPT table", external_spt=ext,
                             **both)
                else:
                    stack.append((child, ext, level - 1, gfn))
            if rep.violations:
                return


def _check_accepted(kvm: Kvm, rep: QuiescentReport) -> None:
    """Every private page the guest accepted, and whose host page did not change
    since (no conversion, no punch-hole), is still mapped and accepted in the
    S-EPT: nothing else may take it away from a running TD."""
    assert kvm.tdx is not None
    w, lay = kvm.w, kvm.layout
    for i, _v in w.scan_ne(lay.accepted, kvm.geometry.n_gfns, 0):
        gfn = index_to_gfn(kvm, i)
        if gfn < 0 or not kvm_mem_is_private(kvm, gfn) or not guest_accepted(kvm, gfn):
            continue
        e = kvm.tdx.module.entry(gfn)
        if e is None or sept_state(e) != SEPT_MAPPED:
            rep.fail("accepted private page lost",
                     "a private page the guest accepted is no longer mapped and accepted in "
                     "the S-EPT, although its host page did not change: KVM removed it "
                     "without a conversion or punch-hole", gfn=gfn,
                     sept=describe_sept(e) if e is not None else "unreachable")
            return


def _check_removed(kvm: Kvm, page: int, rep: QuiescentReport) -> None:
    """A removed table awaiting RCU holds nothing present (see the RCU callback)."""
    w, lay = kvm.w, kvm.layout
    i = w.find_mask(lay.spt(page), WORDS_PER_PAGE, SPTE_MMU_PRESENT_MASK)
    if i >= 0:
        rep.fail("SPTE installed in removed table",
                 "a removed table awaiting RCU holds a present entry (written after "
                 "handle_removed_pt unlinked the table, or never cleared by it): the mapping "
                 "is leaked and invisible to zaps",
                 **removed_entry_facts(kvm, page, i))


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
    left = listed_roots(kvm)
    if left:
        rep.fail("leaked root", "roots are still on the list after teardown (a reference "
                 "was never put)", roots=left,
                 counts=[w.load(lay.sp(r, SpMeta.ROOT_COUNT)) for r in left])
    if w.popcount(lay.bitmap, lay.bitmap_words) != lay.n_pages:
        rep.fail("page pool accounting", "free bitmap is not full after teardown",
                 free_bits=w.popcount(lay.bitmap, lay.bitmap_words), pages=lay.n_pages)
    held = [n for n, taken in (("mmu_lock", kvm.lock_mode != LOCK_NONE
                                 or w.load(lay.glob(Globals.MMU_LOCK)) != 0),
                                ("rcu_read_lock", kvm.rcu.nesting != 0))
            if taken]
    if held:
        rep.fail("lock held when returning to user space",
                 f"the VM's destruction returns holding {', '.join(held)}", held=held)
    return rep


# the invariants the two walks check, for `tdp-stress oracles`
_WALK = "one walk of every root, the pool and (on a TD) the S-EPT"
for _name, _inv in (
        ("mirror root not listed", "a TD's mirror root stays on the roots list while the VM lives"),
        ("tdp_mmu_pages accounting",
         "tdp_mmu_pages counts exactly the page-table pages linked into roots"),
        ("leaked page-table page",
         "every live page-table page is reachable from a listed root"),
        ("S-EPT table without live mirror table",
         "every S-EPT table belongs to a live mirror table"),
        ("leaked S-EPT page", "every page KVM holds for the TDX module belongs to a table"),
        ("page pool accounting", "the free bitmap and the pages' FREE states agree"),
        ("listed root without references", "a listed valid root has a reference"),
        ("two valid roots of one role", "the roots list holds at most one valid root per role "
         "(kvm_tdp_mmu_alloc_root re-checks under tdp_mmu_pages_lock)"),
        ("page-table page linked twice", "a page-table page has one parent entry"),
        ("reachable table not live", "a table reachable from a root is live, not removed"),
        ("FROZEN SPTE reachable at quiescence", "no entry stays FROZEN once its owner returned"),
        ("poison reachable", "a live table holds no poison"),
        ("corrupt non-present SPTE", "a non-present entry is SHADOW_NONPRESENT_VALUE"),
        ("leaf maps wrong pfn", "a leaf maps the host page of its own gfn"),
        ("leaf outside every memslot", "a leaf maps a gfn some memslot holds"),
        ("stale mapping after invalidate_end",
         "every leaf maps the host page that backs its gfn now"),
        ("gfn mapped in the wrong root",
         "private gfns are mapped only in the mirror root, shared ones only in direct roots"),
        ("corrupt non-leaf SPTE", "a non-leaf entry points into the page-table pool"),
        ("mirror huge page", "a mirror root holds no huge leaf"),
        ("huge page over mixed attributes",
         "no huge leaf covers gfns of mixed memory attributes"),
        ("lpage_info mixed flag wrong",
         "lpage_info's KVM_LPAGE_MIXED_FLAG is set exactly where attributes are mixed"),
        ("mirror/S-EPT divergence",
         "the mirror root and the S-EPT map the same gfns to the same pages"),
        ("blocked S-EPT entry at quiescence", "no S-EPT entry stays BLOCKED between operations"),
        ("accepted private page lost",
         "a private page the guest accepted is still mapped, or was removed with its consent")):
    listed(_name, invariant=_inv, hook=HOOK_QUIESCENT, when="every worker parked outside "
           "mmu_lock and RCU", cost=_WALK, module="quiescent")
for _name, _inv in (
        ("SPTE installed in removed table", "no removed table holds a present entry"),
        ("leaked page-table page", "every page-table page is back in the pool"),
        ("tdp_mmu_pages accounting", "tdp_mmu_pages is 0"),
        ("leaked root", "no root is left on the list (every reference was put)"),
        ("page pool accounting", "the free bitmap is full"),
        ("lock held when returning to user space",
         "the VM's destruction (kvm_mmu_uninit_tdp_mmu) returns with mmu_lock free and "
         "outside every RCU read-side section")):
    listed(_name, invariant=_inv, hook=HOOK_TEARDOWN, when="after the VM's page tables were "
           "torn down", cost="one pass over the pool", module="quiescent")
