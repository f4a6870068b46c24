"""``struct tdp_iter``: the pre-order walk every TDP MMU operation uses.

Mirrors ``arch/x86/kvm/mmu/tdp_iter.c``: the iterator holds the table at each
level (``pt_path``), the current entry (``sptep``, a word index) and
``old_spte``, a *snapshot* of that entry taken when the iterator arrived.
Every write decision is made against ``old_spte``; atomic writers use it as
the cmpxchg's expected value and refresh it when the cmpxchg fails.

``try_step_down`` re-reads the entry and descends only into a present
non-leaf, so a walker never steps into a FROZEN entry.

Use-after-free oracle (model only, not in the kernel): when the iterator
enters a table it records the page's generation and checks the page's
identity (level, gfn); every later read checks the value is not poison and the
generation has not moved.  Under RCU neither can happen: the page cannot be
freed, let alone reused, while this walker is inside its read-side section.

GFN bits (kvm_gfn_root_bits; "KVM: x86/mmu: Support GFN direct bits", Isaku
Yamahata and Rick Edgecombe, [PATCH 08/18] of Paolo Bonzini's TDX MMU series of
2024-12-13, read as posted): a TD's direct root maps shared gfns at gfn | the
shared bit, i.e. in its upper half.  As upstream's ``tdp_iter_start(...,
gfn_bits)``, the iterator's ``gfn`` stays the gfn memslots know (callers'
ranges are [start, end) in those gfns: for_each_tdp_pte_min_level passes
kvm_gfn_root_bits(kvm, root), so every zap, fault and dirty-log walk of a
direct root ORs the bits into its range) and ``gfn_bits`` is OR-ed in where a
table is indexed (``tdp_iter_refresh_sptep``, ``try_step_side``).  A whole-root
zap walks with bits 0 over the root's whole range
(for_each_tdp_pte_min_level_all), its gfns then carry the bits.  One
difference: upstream's ``sp->gfn`` has no bits ("SPs will have the GFN set
without the shared bit"); the model's holds the table's base with them (the
frames its entries translate), because the native walk's identity check
compares it with the walked gfn; handle_removed_pt strips them.

Fast descent: a walk for one gfn (a fault's) may start with ``descend_to``:
tdp_iter_start and then try_step_down while the entry is a present non-leaf
above that level, all in one ``Words.tdp_walk`` call (native, or step by step
for Words that hook loads), with the same reads, checks and end state as
calling ``next()`` until then.
"""

from __future__ import annotations

from functools import lru_cache

from stress.arena import SP_META_WORDS, WORDS_PER_PAGE, Layout, SpMeta
from stress.atomics import (
    MAX_ROOT_LEVEL,
    WALK_BAD_ROOT,
    WALK_CHILD_MISMATCH,
    WALK_CHILD_OUTSIDE_POOL,
    WALK_DONE,
    WALK_GEN_MOVED,
    WALK_POISON,
    WALK_STEP_DOWN_FAILED,
    WO_CHILD,
    WO_CHILD_BASE,
    WO_CHILD_LEVEL,
    WO_CHILD_STATE,
    WO_GEN,
    WO_LEVEL,
    WO_OLD_SPTE,
    WO_PT,
    WO_ROOT_ROLE,
    WO_SPTEP,
    WO_STATUS,
    WalkParams,
)
from stress.model.kvm import Kvm
from stress.model.mmu_page import (
    ROLE_MIRROR,
    SP_FREE,
    SP_STATE_NAMES,
    kvm_gfn_root_bits,
    role_level,
)
from stress.model.spte import (
    KVM_PAGES_PER_HPAGE,
    POISON_SPTE,
    PT_PAGE_SIZE_MASK,
    SHADOW_NONPRESENT_VALUE,
    SPTE_BASE_ADDR_MASK,
    SPTE_INDEX,
    SPTE_LEVEL_BITS,
    SPTE_MMU_PRESENT_MASK,
    describe,
    round_gfn_for_level,
    sp_pfn,
    spte_to_child_pt,
)


@lru_cache(maxsize=8)
def walk_params(layout: Layout) -> WalkParams:
    """The layout and SPTE encoding for Words.tdp_walk (built once per layout)."""
    return WalkParams(
        sp_meta=layout.sp_meta, sp_meta_words=SP_META_WORDS, pages=layout.pages,
        n_pages=layout.n_pages, off_state=SpMeta.STATE, off_role=SpMeta.ROLE,
        off_gfn=SpMeta.GFN, off_gen=SpMeta.GEN, state_free=SP_FREE, poison=POISON_SPTE,
        present=SPTE_MMU_PRESENT_MASK, large=PT_PAGE_SIZE_MASK, pfn_mask=SPTE_BASE_ADDR_MASK,
        level_mask=0xF, sp_pfn_base=sp_pfn(0))


class TdpIter:
    __slots__ = ("kvm", "root_level", "min_level", "level", "gfn", "next_last_level_gfn",
                 "pt_path", "gens", "sptep", "old_spte", "valid", "yielded", "mirror",
                 "fault_private", "yielded_gfn", "gfn_bits")

    def __init__(self, kvm: Kvm, root: int, start: int, *, min_level: int = 1,
                 fault_private: bool | None = None, descend_to: int = 0,
                 gfn_bits: int | None = None) -> None:
        """tdp_iter_start: position on the root entry covering ``start``.

        The walk's top level is the root's own ``role.level`` (its SpMeta ROLE
        word), as tdp_iter_start takes ``root->role.level``, not the run's
        geometry.  ``mirror`` is the root's role (every child inherits it);
        ``fault_private`` is set only on a fault's walk (fault->is_private).  With
        ``descend_to``, go on down as ``next()`` would while the entry is a
        present non-leaf above that level (see the module's note: one
        Words.tdp_walk).  ``gfn_bits``: default the root's (kvm_gfn_root_bits, as
        for_each_tdp_pte_min_level passes them); 0 for a walk of the root's whole
        range as its tables see it (for_each_tdp_pte_min_level_all).
        """
        self.kvm = kvm
        self.fault_private = fault_private
        self.min_level = min_level
        self.next_last_level_gfn = start
        self.valid = True
        bits = self.gfn_bits = kvm_gfn_root_bits(kvm, root) if gfn_bits is None else gfn_bits
        if bits and start >= bits:  # tdp_iter_start's WARN_ON_ONCE: an aliased gfn
            kvm.warn("tdp_iter_start with an aliased gfn", gfn=start, root=root)
            self.valid = False
            self.level = self.root_level = role_level(kvm.w.load(kvm.layout.sp(root, SpMeta.ROLE)))
            self.gfn, self.sptep = start, 0
            self.old_spte, self.yielded, self.yielded_gfn = SHADOW_NONPRESENT_VALUE, False, start
            self.mirror = False
            return
        if descend_to:
            self._walk(root, descend_to if descend_to > min_level else min_level)
            return
        role = kvm.w.load(kvm.layout.sp(root, SpMeta.ROLE))
        self.mirror = bool(role & ROLE_MIRROR)
        self.root_level = rl = role_level(role)
        if not 1 <= rl <= MAX_ROOT_LEVEL:
            self._warn_bad_root(root, rl)
            return
        self.pt_path = [0] * (rl + 1)
        self.gens = [0] * (rl + 1)
        self.pt_path[rl] = root
        self.gens[rl] = kvm.w.load(kvm.layout.sp(root, SpMeta.GEN))
        self.restart()

    def _warn_bad_root(self, root: int, level: int) -> None:
        """tdp_iter_start's WARN_ON_ONCE(root->role.level out of range): no walk.
        A freed root reads so (its role was cleared): KASAN's report of the read."""
        kvm = self.kvm
        if kvm.w.load(kvm.layout.sp(root, SpMeta.STATE)) == SP_FREE:
            kvm.hooks.kasan_report(kvm, "poison", table=root, level=level,
                                   gfn=self.next_last_level_gfn, walker="kvm")
        kvm.warn("tdp_iter_start: root level out of range", root=root, level=level,
                 gfn=self.next_last_level_gfn)
        self.valid = False
        self.level = self.root_level = level
        self.gfn = self.yielded_gfn = self.next_last_level_gfn
        self.yielded = False
        self.sptep = self.old_spte = 0
        self.pt_path, self.gens = [root], [0]

    def _walk(self, root: int, stop_level: int) -> None:
        """tdp_iter_start + try_step_down until ``stop_level`` or an entry that is not
        a present non-leaf, in one Words.tdp_walk (from the root's role.level); a
        failed check raises the same violation as read_spte / try_step_down."""
        start = self.next_last_level_gfn
        if not self.kvm.rcu.nesting and self.kvm.lock_mode:  # rcu_dereference of the root
            self.kvm.bug("lockdep", "suspicious RCU usage: a walk outside rcu_read_lock()",
                         gfn=start)
        wp = self.kvm.walk_params
        if wp is None:
            wp = self.kvm.walk_params = walk_params(self.kvm.layout)
        o = self.kvm.w.tdp_walk(wp, root, start | self.gfn_bits, 0, stop_level)
        self.mirror = bool(o[WO_ROOT_ROLE] & ROLE_MIRROR)
        self.root_level = rl = role_level(o[WO_ROOT_ROLE])
        if o[WO_STATUS] == WALK_BAD_ROOT:
            self._warn_bad_root(root, rl)
            return
        self.pt_path = o[WO_PT:WO_PT + rl + 1]
        self.gens = o[WO_GEN:WO_GEN + rl + 1]
        self.level = level = o[WO_LEVEL]
        self.gfn = start & -(1 << SPTE_LEVEL_BITS * (level - 1))  # round_gfn_for_level
        self.sptep = o[WO_SPTEP]
        self.old_spte = o[WO_OLD_SPTE]
        self.yielded = False
        self.yielded_gfn = start
        status = o[WO_STATUS]
        if status == WALK_DONE:
            return
        page = self.pt_path[level]
        if status == WALK_STEP_DOWN_FAILED:  # the rest of next()
            self._step_side_or_up()
        elif status == WALK_POISON:
            self._poisoned(page)
        elif status == WALK_GEN_MOVED:
            self._reused(page)
        elif status == WALK_CHILD_OUTSIDE_POOL:
            self._outside_pool()
        elif status == WALK_CHILD_MISMATCH:
            self._bad_child(o[WO_CHILD], o[WO_CHILD_STATE], o[WO_CHILD_LEVEL],
                            o[WO_CHILD_BASE])

    def restart(self) -> None:
        """tdp_iter_restart: walk again from the root at next_last_level_gfn (the
        tree may have changed completely while mmu_lock was dropped)."""
        self.yielded = False
        self.yielded_gfn = self.next_last_level_gfn
        self.level = self.root_level
        self.gfn = round_gfn_for_level(self.next_last_level_gfn, self.level)
        self._point()

    def _point(self) -> None:
        lay = self.kvm.layout
        self.sptep = lay.spt(self.pt_path[self.level]) + SPTE_INDEX(self.gfn | self.gfn_bits,
                                                                     self.level)
        self.old_spte = self.read_spte()

    def read_spte(self) -> int:
        """kvm_tdp_mmu_read_spte (an rcu_dereference of the table: lockdep's
        "suspicious RCU usage" outside a read-side section) plus the KASAN
        report of a freed or reused table."""
        kvm = self.kvm
        if not kvm.rcu.nesting and kvm.lock_mode:  # (only tests walk without mmu_lock)
            kvm.bug("lockdep", "suspicious RCU usage: an SPTE read outside rcu_read_lock()",
                    gfn=self.gfn, level=self.level)
        v = kvm.w.load(self.sptep)
        page = self.pt_path[self.level]
        if v == POISON_SPTE:
            self._poisoned(page)
        if kvm.w.load(kvm.layout.sp(page, SpMeta.GEN)) != self.gens[self.level]:
            self._reused(page)
        return v

    def check_page(self) -> None:
        """After a successful write: the table we wrote is still the one we walked."""
        page = self.pt_path[self.level]
        if self.kvm.w.load(self.kvm.layout.sp(page, SpMeta.GEN)) != self.gens[self.level]:
            self._reused(page)

    def _poisoned(self, page: int) -> None:
        self.kvm.hooks.kasan_report(self.kvm, "poison", table=page, level=self.level,
                                    gfn=self.gfn, walker="kvm")

    def _outside_pool(self) -> None:
        self.kvm.bug("corrupt non-leaf SPTE", "non-leaf SPTE points outside the page pool",
                     gfn=self.gfn, level=self.level, spte=f"{self.old_spte:#x}")

    def _bad_child(self, child: int, state: int, level: int, base: int) -> None:
        self.kvm.hooks.kasan_report(
            self.kvm, "bad-child", table=child, state=SP_STATE_NAMES.get(state, state),
            level=level, expected_level=self.level - 1, base_gfn=base,
            expected_base_gfn=round_gfn_for_level(self.gfn | self.gfn_bits, self.level),
            parent_spte=describe(self.old_spte), walker="kvm")

    def _reused(self, page: int) -> None:
        self.kvm.hooks.kasan_report(self.kvm, "reused", table=page, level=self.level,
                                    gfn=self.gfn, walker="kvm")

    def try_step_down(self) -> bool:
        if self.level == self.min_level:
            return False
        kvm = self.kvm
        # re-read: the entry may have changed since the snapshot
        self.old_spte = self.read_spte()
        child = spte_to_child_pt(self.old_spte, self.level)
        if child is None:
            return False
        lay = kvm.layout
        if child >= lay.n_pages:
            self._outside_pool()
        gen = kvm.w.load(lay.sp(child, SpMeta.GEN))
        state = kvm.w.load(lay.sp(child, SpMeta.STATE))
        level = role_level(kvm.w.load(lay.sp(child, SpMeta.ROLE)))
        base = kvm.w.load(lay.sp(child, SpMeta.GFN))
        want_base = round_gfn_for_level(self.gfn | self.gfn_bits, self.level)
        if state == SP_FREE or level != self.level - 1 or base != want_base:
            self._bad_child(child, state, level, base)
        self.level -= 1
        kvm.hooks.iter_level(kvm, self)
        self.pt_path[self.level] = child
        self.gens[self.level] = gen
        self.gfn = round_gfn_for_level(self.next_last_level_gfn, self.level)
        self._point()
        return True

    def try_step_side(self) -> bool:
        if SPTE_INDEX(self.gfn | self.gfn_bits, self.level) == WORDS_PER_PAGE - 1:
            return False
        self.gfn += KVM_PAGES_PER_HPAGE(self.level)
        self.next_last_level_gfn = self.gfn
        self.sptep += 1
        self.old_spte = self.read_spte()
        return True

    def try_step_up(self) -> bool:
        if self.level == self.root_level:
            return False
        self.level += 1
        self.kvm.hooks.iter_level(self.kvm, self)
        self.gfn = round_gfn_for_level(self.gfn, self.level)
        self.sptep = self.kvm.layout.spt(self.pt_path[self.level]) + SPTE_INDEX(
            self.gfn | self.gfn_bits, self.level)
        return True

    def next(self) -> None:
        """tdp_iter_next: step down, else sideways, else up and sideways."""
        if self.yielded:
            self.restart()
            return
        if self.try_step_down():
            return
        self._step_side_or_up()

    def _step_side_or_up(self) -> None:
        while True:
            if self.try_step_side():
                return
            if not self.try_step_up():
                break
        self.valid = False

    def in_range(self, end: int) -> bool:
        return self.valid and self.gfn < end
