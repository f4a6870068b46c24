"""The TD guest's own memory of what it accepted (TDG.MEM.PAGE.ACCEPT).

The guest remembers which guest_memfd page it accepted at each private gfn
(one word per gfn: the page's generation + 1).  The TDX module keeps the
page's S-EPT state; this is the guest's side, which KVM cannot see: removing
an accepted page and AUGing a new one makes the guest find a PENDING page it
already accepted (upstream: the TD is killed).  Below td.py (the vCPU) and
notifier.py (conversions and punch-holes, before which the guest gives the
range up).
"""

from __future__ import annotations

from stress.model.host import host_page_gen
from stress.model.kvm import Kvm, slot_index


def accepted_index(kvm: Kvm, gfn: int) -> int:
    return kvm.layout.accepted + slot_index(kvm, gfn)


def guest_accepted(kvm: Kvm, gfn: int) -> bool:
    """The guest accepted the host page that backs ``gfn`` now."""
    return kvm.w.load(accepted_index(kvm, gfn)) == host_page_gen(kvm, gfn, private=True) + 1


def guest_mark_accepted(kvm: Kvm, gfn: int, gen: int) -> None:
    kvm.w.store(accepted_index(kvm, gfn), gen + 1)


def guest_release_private(kvm: Kvm, start: int, end: int) -> None:
    """The guest stops using [start, end) as private memory before it asks the
    host to convert it (or agrees to a punch-hole): forget the acceptances."""
    for gfn in range(start, end):
        kvm.w.store(accepted_index(kvm, gfn), 0)
