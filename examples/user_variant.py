"""A user variant, worked example: ``tdp-stress run configs/tdx-boot.toml --variant-file
examples/user_variant.py --variant mirror-link-no-freeze --expect-violation``.

A variant file defines ``VARIANTS``, a list of ``Variant`` objects.  Start from
``FIXED`` and swap the one piece you want to change (the fields of ``Variant``
in stress/model/variants.py list them); reuse the model's functions for the
rest.  The same list can be shipped by an installed package under the
entry-point group ``tdp_stress.variants``:

    [project.entry-points."tdp_stress.variants"]
    mine = "my_package.variants:VARIANTS"

This one asks: is it enough to freeze mirror SPTEs for leaves (PAGE.AUG) and
publish non-leaf links (SEPT.ADD) straight away?  The tool answers within
seconds: no.  A walker steps into the published table before the
S-EPT has it, and its AUG finds no parent (TDX_EPT_WALK_FAILED).  Upstream links a
TD's mirror tables once, at their first touch (they are never removed while the
TD runs), so the race needs first touches that two vCPUs make together: the
boot-like sweep of configs/tdx-boot.toml.
"""

from dataclasses import replace

from stress.model import mirror
from stress.model.spte import is_last_spte, is_shadow_present_pte
from stress.model.variants import FIXED


def set_mirror_spte_link_published(kvm, it, new_spte):  # noqa: ANN001, ANN201
    """Freeze for leaves and zaps; publish a new non-leaf before its SEPT.ADD."""
    if is_shadow_present_pte(new_spte) and not is_last_spte(new_spte, it.level):
        return mirror.set_mirror_spte_then_seamcall(kvm, it, new_spte)
    return mirror.set_mirror_spte_frozen(kvm, it, new_spte)


VARIANTS = [
    replace(
        FIXED, name="mirror-link-no-freeze", buggy=True, requires_tdx=True,
        config="tdx-boot.toml",
        story="Mirror leaves are frozen around PAGE.AUG, but a new mirror table is published "
              "before its TDH.MEM.SEPT.ADD: a fault walks into it and AUGs under a parent the "
              "S-EPT does not have yet.",
        source="examples/user_variant.py (a user variant; Sean Christopherson's Jan 2023 "
               "argument for freezing non-leaf SPTEs too)",
        set_mirror_spte_atomic=set_mirror_spte_link_published,
    ),
]
