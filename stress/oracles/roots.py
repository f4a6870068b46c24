"""Root lifecycle: which roots a vCPU may be given, and how often a root dies."""

from __future__ import annotations

from stress.arena import SpMeta
from stress.model.kvm import Kvm
from stress.model.roots import is_root_invalid
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
