"""How the model reports a broken invariant.

The kernel has three severities: ``WARN_ON_ONCE`` (counted, the run goes on),
``KVM_BUG_ON`` (the VM is dead) and ``BUG()`` (the host is corrupt).  The model
counts warnings in its stats and turns the other two into
:class:`InvariantViolation`, which stops the run with the invariant's name and
the entries involved.
"""

from __future__ import annotations

from typing import Any


class InvariantViolation(Exception):
    """An invariant of the protocol does not hold."""

    def __init__(self, invariant: str, message: str, **details: Any) -> None:
        super().__init__(f"{invariant}: {message}")
        self.invariant = invariant
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "message": self.message, "details": self.details}
