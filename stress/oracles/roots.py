"""Root lifecycle: which roots a vCPU may be given, and how often a root dies."""

from __future__ import annotations

from stress.arena import SpMeta
from stress.model.kvm import Kvm
from stress.model.roots import is_root_invalid, listed_roots
from stress.oracles.base import oracle


@oracle("invalid root handed to a vCPU",
        invariant="a vCPU loads only a valid root: an invalid one is being zapped and will "
                  "not be kept in sync with the memslots",
        hook="root_loaded", when="kvm_mmu_reload after the root was found or allocated, "
                                 "read lock held (roots become invalid only under the write "
                                 "lock)",
        cost="one load per root load")
def loaded_root_is_valid(kvm: Kvm, root: int) -> None:
    if is_root_invalid(kvm, root):
        kvm.bug("invalid root handed to a vCPU",
                "kvm_tdp_mmu_alloc_root returned an invalid root", root=root)


@oracle("invalid root re-zapped",
        invariant="an invalidated root is zapped once: a path that re-zaps invalid roots can "
                  "loop forever while others keep invalidating",
        hook="root_zap", when="tdp_mmu_zap_root starts",
        cost="one atomic add per root zap")
def root_zapped_once(kvm: Kvm, root: int) -> None:
    zaps = kvm.w.fetch_add(kvm.layout.sp(root, SpMeta.ROOT_ZAPS), 1) + 1
    if zaps > 1:
        kvm.bug("invalid root re-zapped", f"tdp_mmu_zap_root ran {zaps} times on one root",
                root=root)


@oracle("two valid roots of one role",
        invariant="at most one valid root per role: kvm_tdp_mmu_alloc_root looks for one again "
                  "under tdp_mmu_pages_lock before it allocates, so every vCPU of an MMU loads "
                  "the same root",
        hook="root_loaded", when="kvm_mmu_reload after the root was found or allocated, read "
                                 "lock held (no root becomes invalid meanwhile)",
        cost="one scan of the roots list per root load")
def loaded_root_is_the_only_one(kvm: Kvm, root: int) -> None:
    role = kvm.w.load(kvm.layout.sp(root, SpMeta.ROLE))
    for other in listed_roots(kvm):
        if other != root and kvm.w.load(kvm.layout.sp(other, SpMeta.ROLE)) == role:
            kvm.bug("two valid roots of one role",
                    "a vCPU loads a root while another valid root of the same role is on the "
                    "list: vCPUs of one MMU use different page tables",
                    root=root, other_root=other, role=role)
