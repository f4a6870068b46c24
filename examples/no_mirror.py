"""A user variant, worked example 2: the mirror's alternative, measured.

    tdp-stress run --variant-file examples/no_mirror.py --variant sept-vm-lock --duration 20s
    tdp-stress bench --compare fixed,sept-vm-lock --variant-file examples/no_mirror.py

Sean Christopherson (review of the TDX MMU patches, Jan 2023), after proposing to
freeze mirror SPTEs while their SEAMCALLs run: "The other idea is to scrap the
mirror concept entirely, though I gotta imagine that would provide pretty awful
performance."  Without a mirror
that many tasks update with cmpxchg, the S-EPT can only be kept right by doing
every S-EPT update synchronously under one per-VM lock.  This file builds that
protocol from the model's pieces and registers it as ``sept-vm-lock``, so the
guess gets a number: the second command runs it and the fixed (frozen-SPTE)
protocol side by side on the default job (same config, seeds, duration;
interleaved runs) and prints faults/s, zapper ops/s, SEAMCALLs/s and BUSY rates.

What is modelled.  With mmu_lock held for read, a task that wants to change a
private-side entry (map a page, link a table, zap a leaf or a sub-tree) takes
the VM's lock (the spinlock word the ``serialize`` BUSY policy uses), checks its
snapshot against the entry, issues the SEAMCALL(s) -- the S-EPT is the truth --
and only then records the result in KVM's table, which here is no longer a
mirror raced on by many tasks but KVM's record of what the S-EPT holds, only
ever written under the lock.  Nothing is frozen and nothing is unwound: no two
S-EPT updates of the VM overlap, so the TDX module never answers BUSY to KVM.
With mmu_lock held for write nothing changes (the writer excludes everyone).

What is not.  A KVM without any copy of the S-EPT would also have to *read* it
through SEAMCALLs (TDH.MEM.SEPT.RD) to walk it; here walks read KVM's record for
free.  So the figure is a lower bound on the cost of "no mirror": it is the
price of the per-VM lock alone.  The variant is not a bug (``buggy=False``):
the quiescent checks (the record and the S-EPT agree entry for entry) hold,
which ``tests/test_cli.py`` checks on a short run.
"""

from dataclasses import replace

from stress.arena import Globals
from stress.model import mirror
from stress.model.spte import is_frozen_spte, is_last_spte, is_shadow_present_pte
from stress.model.tdp_mmu import EBUSY, handle_changed_spte
from stress.model.variants import FIXED


def set_sept_under_vm_lock(kvm, it, new_spte):  # noqa: ANN001, ANN201
    """Change a private-side entry with mmu_lock held for read: S-EPT first, then
    KVM's record, all under the VM's lock.

    Returns 0, or -EBUSY with ``it.old_spte`` refreshed when the entry changed
    since the caller's snapshot (the caller retries on fresh data), or, in
    principle, when the TDX module said BUSY (then nothing changed).  Holding
    the lock is what makes the check-then-write safe: every task that writes a
    private-side entry under the read lock holds it, and write-lock holders
    exclude read-lock holders.  Lock-free walkers may read the old value
    meanwhile; acting on it needs the lock, and the check then fails.
    """
    mirror._check_transition(kvm, it, new_spte)  # present -> present is a KVM bug
    lock_i = kvm.layout.glob(Globals.TDX_SEPT_LOCK)
    kvm.w.spin_lock(lock_i, kvm.pid)
    try:
        old = kvm.w.load(it.sptep)
        if old != it.old_spte or is_frozen_spte(old):
            it.old_spte = old
            return -EBUSY
        if is_shadow_present_pte(new_spte):  # PAGE.AUG or SEPT.ADD
            r = mirror.set_external_spte_present(kvm, it.gfn, it.level, new_spte)
        elif is_last_spte(old, it.level):  # BLOCK, TRACK, PAGE.REMOVE
            r = mirror.remove_external_spte(kvm, it.gfn, it.level, old, may_unwind=True)
        else:  # a table: handle_removed_pt below tears its sub-tree down
            r = 0
        if r:
            kvm.stats["mirror_restores"] += 1  # nothing to restore: nothing was written
            return r
        kvm.w.store(it.sptep, new_spte)  # KVM's record, after the S-EPT
        it.old_spte = new_spte
        # a private-side entry (no CPU walks it, no D bits to track); the S-EPT
        # was updated above, so no external hook here
        handle_changed_spte(kvm, it.gfn, old, new_spte, it.level, shared=True, mirror=True,
                            external=False)
        return 0
    finally:
        kvm.w.spin_unlock(lock_i)


VARIANTS = [
    replace(
        FIXED, name="sept-vm-lock", buggy=False, requires_tdx=True,
        story="Seed 000's other idea: no mirror raced on by many tasks; every S-EPT update "
              "(map, link, zap, sub-tree teardown) done synchronously under one per-VM lock, "
              "the S-EPT first, KVM's record after.  Valid; its cost is in "
              "'tdp-stress bench --compare fixed,sept-vm-lock'.",
        source="examples/no_mirror.py (a user variant; Sean Christopherson, Jan 2023: \"scrap "
               "the mirror concept "
               "entirely, though I gotta imagine that would provide pretty awful performance\")",
        set_mirror_spte_atomic=set_sept_under_vm_lock,
    ),
]
