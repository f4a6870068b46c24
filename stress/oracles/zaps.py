"""Zaps: what a zap must leave behind when it returns.

Provenance.  Every leaf a fault installs carries, in a word parallel to its
SPTE (``Layout.prov``), who installed it and when, on a clock that ticks once
per zap started: ``(clock << 8) | (1 + worker)``, the clock read *after* the
cmpxchg succeeded.  While a fault's install is in flight (from before its
cmpxchg until its provenance is written) the word holds the install's own
TAG; an install ending replaces its own tag, or the provenance of an install
that tagged after it and ended first when that one's clock is not later, and
leaves another's tag alone (that install reads the clock later): a leaf never
shows a provenance older than its own.  So a
leaf whose clock is at most the zap's start tick was installed before the zap
began, and the zap, which visits every entry of its range after it began, must
have removed it.  Entries installed later (a fault racing behind the zap after
it passed, or after a yield) are not the zap's business.

When a leaf zap of [start, end) over a set of roots returns, with mmu_lock
still held: no present leaf of the range in those roots was installed before
the zap began; when a sub-tree zap at a level returns, no such leaf at or
below that level.  When a root zap returns: the root's own table holds nothing
present (no entry may become present in an invalid root).
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from stress.arena import WORDS_PER_PAGE, Globals
from stress.model.kvm import Kvm
from stress.model.roots import listed_roots, tdp_mmu_root_match
from stress.model.spte import SPTE_MMU_PRESENT_MASK, describe, is_last_spte, is_shadow_present_pte
from stress.model.tdp_iter import TdpIter
from stress.oracles.base import oracle
from stress.oracles.provenance import prov_index

# a provenance word with TAG set: an install in flight (1 + worker << 40 | attempt)
TAG = 1 << 63
_TAG_COUNT = (1 << 40) - 1
_attempts: WeakKeyDictionary[Kvm, int] = WeakKeyDictionary()
# this task's install in flight: (its tag, the provenance word's value before it)
_saved: WeakKeyDictionary[Kvm, tuple[int, int]] = WeakKeyDictionary()
# this task's multi-root zap in progress: (token, the roots of its types when it began)
_scope: WeakKeyDictionary[Kvm, tuple[int, set[int]]] = WeakKeyDictionary()


@oracle("zap left a present leaf",
        invariant="(provenance) a fault tags the entry's provenance before its cmpxchg",
        hook="leaf_installing", when="before a fault's leaf cmpxchg",
        cost="one xchg per install attempt")
def installing(kvm: Kvm, it: Any) -> None:
    n = _attempts[kvm] = (_attempts.get(kvm, 0) + 1) & _TAG_COUNT
    tag = TAG | (kvm.me << 40) | n
    _saved[kvm] = (tag, kvm.w.xchg(prov_index(kvm, it.sptep), tag))


@oracle("zap left a present leaf",
        invariant="(provenance) ... puts the old provenance back when its cmpxchg lost",
        hook="leaf_install_failed", when="a fault's leaf cmpxchg lost",
        cost="one cmpxchg per lost install")
def install_failed(kvm: Kvm, it: Any) -> None:
    tag, old = _saved.pop(kvm)
    kvm.w.cmpxchg(prov_index(kvm, it.sptep), tag, old)  # unless a later install tagged it


@oracle("zap left a present leaf",
        invariant="(provenance) an installed leaf records who installed it and when",
        hook="leaf_installed", when="after a fault's leaf cmpxchg succeeded",
        cost="one load and one cmpxchg per installed leaf")
def installed(kvm: Kvm, it: Any, fault: Any, old_spte: int, new_spte: int) -> None:
    tag, _old = _saved.pop(kvm)
    clock = kvm.w.load(kvm.layout.glob(Globals.ZAP_CLOCK))
    mine = (clock << 8) | (kvm.me + 1)
    i = prov_index(kvm, it.sptep)
    cur = kvm.w.load(i)
    while True:
        if cur == tag:
            new = mine
        elif cur & TAG:
            # another install at the entry is in flight: it reads the clock when it
            # ends, later than this install's cmpxchg, and writes then
            return
        else:
            # another install that tagged after this one has finished meanwhile: of two
            # installs the entry holds the later one, so keep the later clock (never an
            # earlier one: a leaf must not look older than it is)
            new = mine if cur >> 8 <= clock else cur
        found = kvm.w.cmpxchg(i, cur, new)
        if found == cur:
            return
        cur = found


@oracle("zap left a present leaf",
        invariant="(provenance) the pieces of a split huge leaf were installed when it was",
        hook="huge_split", when="a huge leaf is split, before the table is linked",
        cost="512 stores per split")
def split_inherits(kvm: Kvm, it: Any, sp: int) -> None:
    prov = kvm.w.load(prov_index(kvm, it.sptep))
    if prov & TAG:  # its installer has not written it yet: it is new
        prov = (kvm.w.load(kvm.layout.glob(Globals.ZAP_CLOCK)) << 8) | (kvm.me + 1)
    kvm.w.fill(kvm.layout.prov + sp * WORDS_PER_PAGE, WORDS_PER_PAGE, prov)


@oracle("zap left a present leaf",
        invariant="(provenance) each zap takes a tick of the zap clock when it begins",
        hook="zap_start", when="a leaf zap begins", cost="one atomic add per zap")
def zap_start(kvm: Kvm, types: int) -> int:
    token = kvm.w.fetch_add(kvm.layout.glob(Globals.ZAP_CLOCK), 1)
    if types:  # the roots the zap is obliged to cover: those of its types now
        _scope[kvm] = (token, {r for r in listed_roots(kvm) if tdp_mmu_root_match(kvm, r, types)})
    return token


@oracle("zap left a present leaf",
        invariant="when a zap of [start, end) over a set of roots returns, no leaf of the "
                  "range installed before the zap began is still present in those roots (a "
                  "sub-tree zap: at or below its level)",
        hook="zap_done", when="the zap returns, mmu_lock still held, TLB flushed",
        cost="one walk of the range in each root per zap")
def nothing_left_in_range(kvm: Kvm, roots: list[int] | None, types: int, start: int,
                          end: int, token: int, max_level: int = 0) -> None:
    kvm.rcu.rcu_read_lock()
    try:
        if roots is not None:
            todo = roots
        else:  # of its types both when it began and now (one invalidated meanwhile and
            # no longer of its types was not the zap's to visit)
            tok, began = _scope.pop(kvm, (token, set()))
            todo = [r for r in listed_roots(kvm)
                    if r in began and tok == token and tdp_mmu_root_match(kvm, r, types)]
        for root in todo:
            it = TdpIter(kvm, root, start)
            while it.in_range(end):
                v = it.old_spte
                if (is_shadow_present_pte(v) and is_last_spte(v, it.level)
                        and (not max_level or it.level <= max_level)):
                    prov = kvm.w.load(prov_index(kvm, it.sptep))
                    if not prov & TAG and prov >> 8 <= token:  # (a tag: install in flight)
                        who = (prov & 0xFF) - 1
                        kvm.bug("zap left a present leaf",
                                f"a zap of [{start:#x}, {end:#x}) returned with a leaf it "
                                "should have removed still present: installed before the "
                                "zap began" + (f" (by worker {who}, zap clock {prov >> 8} <= "
                                                f"{token})" if who >= 0 else ""),
                                gfn=it.gfn, level=it.level, root=root, entry=describe(v),
                                installed_by_worker=who if who >= 0 else None,
                                installed_at=prov >> 8 if who >= 0 else None, zap_began=token,
                                zap_range=f"[{start:#x}, {end:#x})")
                it.next()
    finally:
        kvm.rcu.rcu_read_unlock()


@oracle("entry present in a zapped root",
        invariant="no entry becomes present in a root after it was marked invalid: when "
                  "tdp_mmu_zap_root returns, the root's table holds nothing present",
        hook="root_zapped", when="tdp_mmu_zap_root returns",
        cost="one native scan of the root's 512 entries per root zap")
def zapped_root_is_empty(kvm: Kvm, root: int) -> None:
    lay = kvm.layout
    i = kvm.w.find_mask(lay.spt(root), WORDS_PER_PAGE, SPTE_MMU_PRESENT_MASK)
    if i >= 0:
        v = kvm.w.load(lay.spt(root) + i)
        kvm.bug("entry present in a zapped root",
                "tdp_mmu_zap_root returned with a present entry in the root's own table",
                root=root, index=i, entry=describe(v))
