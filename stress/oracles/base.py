"""What an oracle is: a named invariant, where and when it is checked, its cost.

An oracle states something the kernel must never do, in general terms (never
tuned to one known bug).  It is checked at one of the model's hook points
(:mod:`stress.model.hooks`), or at quiescence / teardown by
:mod:`stress.oracles.quiescent`, and reports a broken invariant by raising
:class:`~stress.model.errors.InvariantViolation` with its ``name``, so the
report, the zoo's ``expects`` and the bundle all name the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HOOK_QUIESCENT = "quiescent"  # every worker parked outside mmu_lock and RCU
HOOK_TEARDOWN = "teardown"  # after the VM's page tables were torn down
# the kernel engine: checked in its runtime or by the kernel code itself (native/kernel/)
HOOK_KERNEL = "kernel"
HOOK_WATCHDOG = "watchdog"  # the supervisor: a worker that makes no progress
HOOK_EXCEPTION = "exception"  # the worker: an exception out of the model's protocol code


@dataclass(frozen=True)
class Oracle:
    """One invariant.  ``name`` is what a violation reports; ``hook`` the model
    hook it runs at (or quiescent / teardown); ``when`` says what holds there
    in the kernel's terms; ``cost`` what one check costs."""

    name: str
    invariant: str
    hook: str
    when: str
    cost: str
    module: str
    check: Callable[..., Any] | None = None


ORACLES: list[Oracle] = []


def oracle(name: str, *, invariant: str, hook: str, when: str,
           cost: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the check of oracle ``name`` at
    ``hook`` (called with the hook's arguments)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        ORACLES.append(Oracle(name, invariant, hook, when, cost,
                              fn.__module__.rsplit(".", 1)[-1], fn))
        return fn

    return register


def listed(name: str, *, invariant: str, hook: str, when: str, cost: str,
           module: str) -> None:
    """Register an oracle whose check is part of a larger walk (the quiescent
    and teardown walks check many invariants in one pass)."""
    ORACLES.append(Oracle(name, invariant, hook, when, cost, module))
