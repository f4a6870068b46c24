"""Who installed a leaf, and when: the provenance word of each SPTE.

Every leaf a fault installs records, in a word parallel to its SPTE
(``Layout.prov``), ``(zap clock << 8) | (1 + worker)``, the clock read after
the fault's cmpxchg succeeded (the zap clock ticks once per zap started: see
zaps.py, which keeps these words).  Reports use it to say what they can
prove about an entry ("installed by vcpu0 at zap clock 41") instead of a
history they assume.
"""

from __future__ import annotations

from typing import Any

from stress.model.kvm import Kvm
from stress.model.mmu_page import removed_entry_details
from stress.model.spte import is_last_spte, is_shadow_present_pte


def prov_index(kvm: Kvm, sptep: int) -> int:
    return kvm.layout.prov + (sptep - kvm.layout.pages)


def provenance(kvm: Kvm, sptep: int, level: int) -> dict[str, Any]:
    """What is known of the present leaf at ``sptep``: who installed it and at
    which zap clock ({} for a non-leaf, or a leaf no fault installed)."""
    v = kvm.w.load(sptep)
    if not (is_shadow_present_pte(v) and is_last_spte(v, level)):
        return {}
    prov = kvm.w.load(prov_index(kvm, sptep))
    if not prov & 0xFF or prov >> 63:  # none, or an install still in flight (zaps.TAG)
        return {}
    return {"installed_by_worker": (prov & 0xFF) - 1, "installed_at_zap_clock": prov >> 8}


def removed_entry_facts(kvm: Kvm, page: int, i: int) -> dict[str, Any]:
    """What is known of the present entry ``i`` of removed table ``page``: the
    table, who removed it and last wrote it, and the entry's provenance."""
    details = removed_entry_details(kvm, page, i)
    return details | provenance(kvm, kvm.layout.spt(page) + i, details["level"])
