"""Protocol variants: the fixed protocol and the historical bugs, by name.

A variant is a small frozen object holding the pieces of the protocol it
swaps (functions with the kernel's signature), its story and where it comes
from.  The model calls ``kvm.variant.<piece>(...)`` at the one place each piece
is used; nothing else in the model knows which variant runs.

To add a variant: write the replacement piece next to the fixed one (same
signature, a docstring saying what it gets wrong), then register a
``dataclasses.replace(FIXED, name=..., story=..., source=..., piece=...)`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from stress.model.kvm import Kvm
from stress.model.mmu_page import tdp_mmu_free_sp_rcu_callback
from stress.model.spte import FROZEN_SPTE, SPTE_MMU_PRESENT_MASK
from stress.model.tdp_mmu import call_rcu_free_sp, freeze_removed_children


def freeze_present_children_only(kvm: Kvm, pt: int, shared: bool) -> list[tuple[int, int]]:
    """Buggy handle_removed_pt loop: skips non-present children even in shared mode.

    A vCPU that walked into the table before it was unlinked still holds a
    pointer to it; its cmpxchg of a non-present entry succeeds in the dead
    table, linking a child or mapping a page nobody can reach or zap.
    """
    return kvm.w.freeze_children(kvm.layout.spt(pt), 512, FROZEN_SPTE,
                                 SPTE_MMU_PRESENT_MASK, freeze_nonpresent=False)


def free_sp_without_grace_period(kvm: Kvm, pt: int) -> None:
    """Buggy: runs the RCU callback at once instead of after a grace period, so a
    walker still inside the table reads a freed (poisoned or reused) page."""
    tdp_mmu_free_sp_rcu_callback(kvm, pt)


@dataclass(frozen=True)
class Variant:
    name: str
    story: str
    source: str
    buggy: bool
    # handle_removed_pt: how the children of a removed table are frozen
    freeze_children: Callable[[Kvm, int, bool], list[tuple[int, int]]]
    # handle_removed_pt: how the removed table's page is released
    free_removed_sp: Callable[[Kvm, int], None]


FIXED = Variant(
    name="fixed",
    story="The upstream protocol: shared-mode removal freezes every child, pages are "
          "freed after an RCU grace period.",
    source="arch/x86/kvm/mmu/tdp_mmu.c",
    buggy=False,
    freeze_children=freeze_removed_children,
    free_removed_sp=call_rcu_free_sp,
)

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    FIXED,
    replace(
        FIXED, name="zap-without-freeze", buggy=True,
        story="handle_removed_pt in shared mode does not freeze non-present children, so a "
              "fault that walked into the table before it was unlinked links a table or "
              "maps a page into the dead table.",
        source="handle_removed_pt's freeze of every child (REMOVED_SPTE, now FROZEN_SPTE), "
               "from the 2021 parallel page fault series ending in a2855afc7ee8 (KVM: x86/mmu: "
               "Allow parallel page faults for the TDP MMU)",
        freeze_children=freeze_present_children_only,
    ),
    replace(
        FIXED, name="free-without-grace-period", buggy=True,
        story="Removed page-table pages are freed at once instead of via call_rcu, so a "
              "walker holding only the read lock and RCU reads a freed or reused page.",
        source="KVM: x86/mmu: Protect TDP MMU page table memory with RCU (Ben Gardon, 2021, "
               "same series)",
        free_removed_sp=free_sp_without_grace_period,
    ),
]}


class UnknownVariant(KeyError):
    pass


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownVariant(
            f"unknown variant {name!r}; known: {', '.join(sorted(VARIANTS))}") from None
