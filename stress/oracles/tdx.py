"""TDX teardown order: what the TDX module may be left holding."""

from __future__ import annotations

from stress.model.kvm import Kvm
from stress.oracles.base import oracle


@oracle("private page left at HKID release",
        invariant="every private page is removed from the S-EPT while the HKID is still "
                  "assigned (guest_memfd release before tdx_mmu_release_hkid): after it, KVM "
                  "can no longer remove them",
        hook="hkid_release", when="just before tdx_mmu_release_hkid",
        cost="a scan of the S-EPT's leaves, once per VM")
def no_private_page_at_hkid_release(kvm: Kvm) -> None:
    assert kvm.tdx is not None
    left = kvm.tdx.module.mapped_leaves(limit=4)
    if left:
        gfn, e = left[0]
        kvm.bug("private page left at HKID release",
                "the S-EPT still maps private pages after every guest_memfd was released: "
                "tdx_mmu_release_hkid would leave them to the module",
                gfn=gfn, sept=e, count_at_least=len(left))
