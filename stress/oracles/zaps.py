"""Zaps: what a zap must leave behind when it returns.

Provenance.  Every leaf a fault installs carries, in a word parallel to its
SPTE (``Layout.prov``), who installed it and when, on a clock that ticks once
per zap started: ``INSTALLING`` while the fault's cmpxchg is in flight, then
``(clock << 8) | (1 + worker)`` read *after* the cmpxchg succeeded.  So a
leaf whose clock is at most the zap's start tick was installed before the zap
began, and the zap, which visits every entry of its range after it began, must
have removed it.  Entries installed later (a fault racing behind the zap after
it passed, or after a yield) are not the zap's business.

When a leaf zap of [start, end) over a set of roots returns, with mmu_lock
still held: no present leaf of the range in those roots was installed before
the zap began.  When a root zap returns: the root's own table holds nothing
present (no entry may become present in an invalid root).
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from stress.arena import WORDS_PER_PAGE, Globals, SpMeta
from stress.model.kvm import Kvm
from stress.model.roots import KVM_ALL_ROOTS, listed_roots, tdp_mmu_root_match
from stress.model.spte import SPTE_MMU_PRESENT_MASK, describe, is_last_spte, is_shadow_present_pte
from stress.model.tdp_iter import TdpIter
from stress.oracles.base import oracle

INSTALLING = (1 << 63) - 1
# this task's install in flight: (provenance word, the value it replaced)
_saved: WeakKeyDictionary[Kvm, tuple[int, int]] = WeakKeyDictionary()


def _prov_i(kvm: Kvm, sptep: int) -> int:
    return kvm.layout.prov + (sptep - kvm.layout.pages)


@oracle("zap left a present leaf",
        invariant="when a zap of [start, end) over a set of roots returns, no leaf of the "
                  "range installed before the zap began is still present in those roots",
        hook="leaf_installing", when="(provenance) before a fault's leaf cmpxchg",
        cost="one store per install attempt")
def installing(kvm: Kvm, it: object) -> None:
    i = _prov_i(kvm, it.sptep)  # type: ignore[attr-defined]
    _saved[kvm] = (i, kvm.w.xchg(i, INSTALLING))


@oracle("zap left a present leaf",
        invariant="(provenance) a failed install puts the entry's provenance back",
        hook="leaf_install_failed", when="a fault's leaf cmpxchg lost",
        cost="one store per lost install")
def install_failed(kvm: Kvm, it: object) -> None:
    i, old = _saved.pop(kvm, (_prov_i(kvm, it.sptep), 0))  # type: ignore[attr-defined]
    # put back what the entry's provenance was, unless another install finished
    # meanwhile (it wrote its own)
    kvm.w.cmpxchg(i, INSTALLING, old)


@oracle("zap left a present leaf",
        invariant="(provenance) an installed leaf records who installed it and when",
        hook="leaf_installed", when="after a fault's leaf cmpxchg succeeded",
        cost="one load and one store per installed leaf")
def installed(kvm: Kvm, it: object, fault: object, old_spte: int, new_spte: int) -> None:
    _saved.pop(kvm, None)
    clock = kvm.w.load(kvm.layout.glob(Globals.ZAP_CLOCK))
    kvm.w.store(_prov_i(kvm, it.sptep), (clock << 8) | (kvm.me + 1))  # type: ignore[attr-defined]


@oracle("zap left a present leaf",
        invariant="(provenance) the pieces of a split huge leaf were installed when it was",
        hook="huge_split", when="a huge leaf is split, before the table is linked",
        cost="512 stores per split")
def split_inherits(kvm: Kvm, it: object, sp: int) -> None:
    prov = kvm.w.load(_prov_i(kvm, it.sptep))  # type: ignore[attr-defined]
    kvm.w.fill(kvm.layout.prov + sp * WORDS_PER_PAGE, WORDS_PER_PAGE, prov)


@oracle("zap left a present leaf",
        invariant="(provenance) each zap takes a tick of the zap clock when it begins",
        hook="zap_start", when="a leaf zap begins", cost="one atomic add per zap")
def zap_start(kvm: Kvm) -> int:
    return kvm.w.fetch_add(kvm.layout.glob(Globals.ZAP_CLOCK), 1)


@oracle("zap left a present leaf",
        invariant="when a zap of [start, end) over a set of roots returns, no leaf of the "
                  "range installed before the zap began is still present in those roots",
        hook="zap_done", when="the zap returns, mmu_lock still held, TLB flushed",
        cost="one walk of the range in each root per zap")
def nothing_left_in_range(kvm: Kvm, roots: list[int] | None, types: int, start: int,
                          end: int, token: int) -> None:
    kvm.rcu.rcu_read_lock()
    try:
        todo = roots if roots is not None else [
            r for r in listed_roots(kvm) if tdp_mmu_root_match(kvm, r, types or KVM_ALL_ROOTS)]
        for root in todo:
            level = kvm.w.load(kvm.layout.sp(root, SpMeta.ROLE)) & 0xF
            it = TdpIter(kvm, root, level, start)
            while it.in_range(end):
                v = it.old_spte
                if is_shadow_present_pte(v) and is_last_spte(v, it.level):
                    prov = kvm.w.load(_prov_i(kvm, it.sptep))
                    if prov != INSTALLING and prov >> 8 <= token:
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
