"""The oracle layer for the kernel engine: its invariants, named and listed.

The kernel engine runs a tree's own tdp_mmu.c, so the kernel's assertions are
the tree's (WARN_ON, KVM_BUG_ON, BUG, lockdep, refcount_t) plus what a
debug kernel adds at run time: KASAN (an SPTE access to a page the
allocator has back, a double free) and RCU-lockdep.  They fire inside the
worker and are named here.  The tester's own invariants are checked by
``ksoracle.c``'s walk of the kernel's structures at quiescence and teardown
(they are C because the structures are); the names are the Python model's
where the invariant is the same, so a finding reads alike in both engines.
"""

from __future__ import annotations

from stress.oracles.base import HOOK_KERNEL, HOOK_QUIESCENT, HOOK_TEARDOWN, listed

_RUNTIME = "the kernel engine's runtime (native/kernel/runtime.c)"
_WALK = "one walk of every listed root's tables and of the allocator (native/kernel/ksoracle.c)"

#: A kernel-side report kind -> the invariant a violation names.
_KIND_INVARIANT = {
    "WARN": "kernel WARN_ON",
    "BUG": "kernel BUG",
    "lockdep": "lockdep",
    "printk": "kernel error message",
    "hang": "livelock",
}


def kernel_invariant(kind: str, what: str) -> str:
    """The oracle name of a report the kernel engine's runtime made."""
    if kind == "oracle":
        return what.split(":", 1)[0]
    if kind == "KASAN":
        return ("double free of page-table page" if what.startswith("double-free")
                else "use-after-free of page-table page")
    if kind == "lockdep" and "suspicious RCU usage" in what:
        return "suspicious RCU usage"
    if kind == "lockdep" and "sleeping function" in what:
        return "sleeping in atomic context"
    if kind == "BUG" and what.startswith("BUG: unable to handle page fault"):
        return "kernel oops"
    if kind == "WARN" and what.startswith("refcount_t"):
        return "refcount misuse"
    return _KIND_INVARIANT.get(kind, kind)


for _name, _inv, _when in (
        ("kernel WARN_ON", "no WARN_ON/WARN_ON_ONCE/KVM_BUG_ON of the tree fires",
         "at the assertion, in the task that hit it"),
        ("kernel BUG", "no BUG()/BUG_ON() of the tree fires", "at the assertion; the op unwinds"),
        ("kernel oops", "kernel code never faults (a wild or freed pointer: the oops)",
         "at the fault (SIGSEGV/SIGBUS in a worker), the address and its poison named"),
        ("lockdep", "lockdep_assert_held*() of the tree hold; locks are released by their owner",
         "at the assertion"),
        ("suspicious RCU usage", "rcu_dereference() runs inside rcu_read_lock()",
         "at every rcu_dereference of the tree"),
        ("sleeping in atomic context", "no cond_resched()/might_sleep() inside an RCU section "
         "or a non-blocking section (non_block_start: an mmu_notifier that may not block); "
         "the Python model's __might_resched checks the same", "at the call"),
        ("refcount misuse", "no refcount_t increments from 0 or drops below 0",
         "at refcount_inc/refcount_dec_and_test"),
        ("use-after-free of page-table page",
         "no SPTE access (READ_ONCE, WRITE_ONCE, xchg, cmpxchg, atomic64) touches a page the "
         "allocator has back (KASAN)", "at the access: the chokepoint checks the page's state"),
        ("double free of page-table page", "free_page/kmem_cache_free of a free object",
         "at the free"),
        ("stale-tlb-entry-after-free",
         "a page is freed (a table by its RCU callback, a host page by the primary MMU) only "
         "when every vCPU whose TLB still translates through it has a TLB flush pending",
         "before each tdp_mmu_free_sp_rcu_callback; after an mmu_notifier invalidation and "
         "a memslot deletion release their host pages"),
        ("SPTE installed in removed table",
         "a page-table page that its RCU callback frees holds no present entry (every child "
         "was frozen or cleared when its table was removed, every root zapped before its put)",
         "before each tdp_mmu_free_sp_rcu_callback runs")):
    listed(_name, invariant=_inv, hook=HOOK_KERNEL, when=_when, cost="one check per event",
           module=f"kernel ({_RUNTIME})")

for _name, _inv in (
        ("listed root without references", "a listed valid root has a reference"),
        ("two valid roots of one role", "the roots list holds at most one valid root per role"),
        ("reachable table not live", "a table reachable from a root was not freed"),
        ("page-table page linked twice", "a page-table page has one parent entry"),
        ("table back-pointer wrong",
         "a linked table's kvm_mmu_page names its parent entry, level and gfn"),
        ("corrupt non-leaf SPTE", "a non-leaf entry points at a page-table page"),
        ("corrupt non-present SPTE", "a non-present entry is SHADOW_NONPRESENT_VALUE"),
        ("poison reachable", "a live table holds no free poison"),
        ("FROZEN SPTE reachable at quiescence", "no entry stays FROZEN once its owner returned"),
        ("leaf outside every memslot", "a leaf maps gfns one memslot holds"),
        ("leaf maps wrong pfn", "a leaf maps the host page of its own gfn"),
        ("huge leaf where lpage_info disallows it",
         "a huge leaf's level is one lpage_info allows for its gfn"),
        ("tdp_mmu_pages accounting",
         "kvm->arch.tdp_mmu_pages counts exactly the non-root tables linked into roots"),
        ("leaked page-table page",
         "every allocated page and kvm_mmu_page is reachable, waits for its RCU callback, or "
         "sits in a vCPU's memory cache")):
    listed(_name, invariant=_inv, hook=HOOK_QUIESCENT, when="every kernel-engine worker parked "
           "between operations", cost=_WALK, module="kernel")

for _name, _inv in (
        ("leaked root", "no root is listed after kvm_mmu_uninit_tdp_mmu()"),
        ("leaked page-table page", "every page and kvm_mmu_page is back in the allocator")):
    listed(_name, invariant=_inv, hook=HOOK_TEARDOWN, when="after kvm_destroy_vm's MMU "
           "teardown", cost=_WALK, module="kernel")
