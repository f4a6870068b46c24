"""Known bugs as tree mutations: the kernel engine's protocol variants.

Each is a bug that once was in (or was proposed for) tdp_mmu.c, written as a
small textual change to a copy of the tree's file, applied at build time:
``find`` must occur exactly once in the file, and is replaced by ``replace``.
A tree whose code no longer has the ``find`` text cannot take the mutation,
and the build says so in one line.  ``fixed`` is the tree as it is.

The stories and sources are the Python model's (stress/model/variants.py),
where the same bug is a named variant of the model; ``expects`` lists the
invariants (stress/oracles/kernel.py) a run of the mutated tree may report.
"""

from __future__ import annotations

from dataclasses import dataclass

from stress.kernel.errors import KernelEngineError


class MutationError(KernelEngineError):
    """A mutation cannot be applied to this tree: one line says why."""


@dataclass(frozen=True)
class KernelMutation:
    name: str
    story: str
    source: str
    file: str
    find: str
    replace: str
    expects: tuple[str, ...]
    # the shipped config whose workload makes the bug's window common (the zoo runs it)
    config: str = "kernel.toml"
    # more (find, replace) pairs of the same change elsewhere in the file
    also: tuple[tuple[str, str], ...] = ()

    def apply(self, text: str, origin: str) -> str:
        for find, replace in ((self.find, self.replace), *self.also):
            n = text.count(find)
            if n != 1:
                raise MutationError(
                    f"variant {self.name}: {origin}'s {self.file} has {n} copies of the code "
                    "it changes (it needs exactly 1): this tree's code differs from the one "
                    "the mutation was written for")
            text = text.replace(find, replace)
        return text


MUTATIONS: tuple[KernelMutation, ...] = (
    KernelMutation(
        name="free-without-grace-period",
        story="handle_removed_pt() frees the removed table at once instead of via call_rcu(), "
              "so a walker holding only the read lock and RCU (a fault, a lockless fast page "
              "fault, the CPU's walk) reads a freed or reused page.",
        source="KVM: x86/mmu: Protect TDP MMU page table memory with RCU (Ben Gardon, 2021, "
               "the parallel page fault series ending in a2855afc7ee8)",
        file="arch/x86/kvm/mmu/tdp_mmu.c",
        find="\tcall_rcu(&sp->rcu_head, tdp_mmu_free_sp_rcu_callback);\n}",
        replace="\ttdp_mmu_free_sp(sp);\n}",
        # the NX recovery worker's WARN_ON(sp->nx_huge_page_disallowed) after
        # kvm_tdp_mmu_zap_sp() reads the kvm_mmu_page just freed (poisoned)
        expects=("use-after-free of page-table page", "reachable table not live",
                 "kernel WARN_ON", "kernel oops"),
    ),
    KernelMutation(
        name="zap-without-freeze",
        story="handle_removed_pt() in shared mode does not freeze the non-present children of "
              "the table it removes, so a fault that walked into the table before it was "
              "unlinked links a table or maps a page into the dead table.",
        source="handle_removed_pt's freeze of every child (REMOVED_SPTE, now FROZEN_SPTE), "
               "from the 2021 parallel page fault series ending in a2855afc7ee8 (KVM: x86/mmu: "
               "Allow parallel page faults for the TDP MMU)",
        file="arch/x86/kvm/mmu/tdp_mmu.c",
        find="\t\tif (shared) {\n\t\t\t/*\n\t\t\t * Set the SPTE to a nonpresent value",
        replace="\t\tif (shared) {\n"
                "\t\t\tif (!is_shadow_present_pte(kvm_tdp_mmu_read_spte(sptep)))\n"
                "\t\t\t\tcontinue;\n"
                "\t\t\t/*\n\t\t\t * Set the SPTE to a nonpresent value",
        expects=("SPTE installed in removed table", "leaked page-table page",
                 "reachable table not live", "livelock", "kernel oops",
                 "use-after-free of page-table page"),
        # tables removed under the read lock (zap_collapsible, a huge page mapped over a
        # table) while exec faults walk into them
        config="kernel-dirty.toml",
    ),
    KernelMutation(
        name="root-double-put",
        story="The invalidated-roots zap puts the TDP MMU's reference of every invalid root it "
              "visits, not only the ones scheduled for it, so a root zapped by an earlier fast "
              "zap loses that reference twice and is freed while in use.",
        source="defunct-root refcounting in the 2022 TDP MMU overhaul "
               "(efd995dae5eb, 22b94c4b63eb, edbdb43fc96b)",
        file="arch/x86/kvm/mmu/tdp_mmu.c",
        find="\t\tif (!root->tdp_mmu_scheduled_root_to_zap)\n\t\t\tcontinue;\n",
        replace="\t\tif (!root->role.invalid)\n\t\t\tcontinue;\n",
        expects=("refcount misuse", "use-after-free of page-table page", "kernel WARN_ON",
                 "kernel oops",
                 "reachable table not live", "listed root without references"),
        # invalidated-roots zaps back to back while halted vCPUs keep the roots loaded
        config="kernel-roots.toml",
    ),
)

MUTATIONS += (
    KernelMutation(
        name="tlb-no-flush-before-yield",
        story="A leaf zap that yields mmu_lock drops its pending TLB flush instead of doing "
              "it first: with the lock gone an mmu_notifier finds the gfns non-present, "
              "skips the flush, and the host frees pages a vCPU's TLB still maps.",
        source="commit a835429cda91 (KVM: x86/mmu: Ensure TLBs are flushed when yielding "
               "during GFN range zap, 2021)",
        file="arch/x86/kvm/mmu/tdp_mmu.c",
        find="\t\t    tdp_mmu_iter_cond_resched(kvm, &iter, flush, false)) {\n"
             "\t\t\tflush = false;",
        replace="\t\t    tdp_mmu_iter_cond_resched(kvm, &iter, false, false)) {\n"
                "\t\t\tflush = false;",
        expects=("stale-tlb-entry-after-free",),
        config="kernel-tlb.toml",
    ),
    KernelMutation(
        name="tlb-flush-after-rcu-unlock",
        story="The NX huge page recovery worker releases RCU before its TLB flush (at its "
              "yields and at the end): the grace period of the tables it zapped can end, and "
              "their RCU callback free them, while a vCPU's paging-structure cache still "
              "points at them.",
        source="commit fcb93eb6d09d (kvm: x86/mmu: Flush TLB before zap_gfn_range releases "
               "RCU, 2022), the same ordering in kvm_recover_nx_huge_pages()",
        file="arch/x86/kvm/mmu/mmu.c",
        find="\tkvm_mmu_remote_flush_or_zap(kvm, &invalid_list, flush);\n\n\trcu_read_unlock();",
        replace="\trcu_read_unlock();\n\n\tkvm_mmu_remote_flush_or_zap(kvm, &invalid_list, flush);",
        # and where it yields mmu_lock in the middle (the site that runs under contention)
        also=(("\t\t\tkvm_mmu_remote_flush_or_zap(kvm, &invalid_list, flush);\n"
               "\t\t\trcu_read_unlock();\n",
               "\t\t\trcu_read_unlock();\n"
               "\t\t\tkvm_mmu_remote_flush_or_zap(kvm, &invalid_list, flush);\n"),),
        expects=("stale-tlb-entry-after-free", "use-after-free of page-table page"),
        config="kernel-nx.toml",
    ),
)

MUTATIONS += (
    KernelMutation(
        name="child-removal-on-pfn-change",
        story="handle_changed_spte() tears a table down only if the PFN changed: a 2M leaf "
              "that replaces a table at the table's own frame (guest memory over top of the "
              "SP, the impossible memory map of kernel.alias_tables) leaks the table and "
              "its leaves.",
        source="commit c8e5a0d0e9bc (KVM: x86/mmu: Check for !leaf=>leaf, not PFN change, "
               "in TDP MMU SP removal, 2022)",
        file="arch/x86/kvm/mmu/tdp_mmu.c",
        find="\t    (is_leaf || !is_present || WARN_ON_ONCE(pfn_changed)))\n"
             "\t\thandle_removed_pt(",
        replace="\t    (pfn_changed || !is_present))\n"
                "\t\thandle_removed_pt(",
        expects=("tdp_mmu_pages accounting", "leaked page-table page"),
        # faults that map 2M leaves over tables, on the map where tables alias guest frames
        config="kernel-alias.toml",
    ),
)

BY_NAME = {m.name: m for m in MUTATIONS}


def get_mutation(name: str) -> KernelMutation | None:
    """The mutation called ``name``; None for ``fixed`` (the tree as it is)."""
    if name == "fixed":
        return None
    try:
        return BY_NAME[name]
    except KeyError:
        raise MutationError(f"unknown kernel variant {name!r} (known: fixed, "
                            f"{', '.join(BY_NAME)})") from None
