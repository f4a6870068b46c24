"""The tester's oracles: invariants beyond the kernel's own assertions.

The model (:mod:`stress.model`) keeps only what the kernel itself asserts
(``KVM_BUG_ON``, ``WARN_ON_ONCE``, lockdep, ``BUG``).  Every other check lives
here as a named :class:`~stress.oracles.base.Oracle`, attached to the model
through its hook points (:mod:`stress.model.hooks`) by :func:`attach`, or run
by the quiescent and teardown walks (:mod:`stress.oracles.quiescent`).
``tdp-stress oracles`` lists them.

One module per area: memory (KASAN-like), tlb (flushes and D bits), faults,
roots, notifier (invalidations), tdx, unsync, liveness, zaps, transitions, oops
(the model's exceptions as the kernel's oops), syscalls (what an ioctl returns),
quiescent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from stress.model.hooks import Hooks
from stress.model.kvm import Kvm
from stress.oracles import (
    faults,
    kernel,
    liveness,
    memory,
    notifier,
    oops,
    quiescent,
    roots,
    syscalls,
    tdx,
    tlb,
    transitions,
    unsync,
    zaps,
)
from stress.oracles.base import HOOK_QUIESCENT, HOOK_TEARDOWN, HOOK_WATCHDOG, ORACLES, Oracle

__all__ = ["HOOK_QUIESCENT", "HOOK_TEARDOWN", "HOOK_WATCHDOG", "ORACLES", "Oracle",
           "OracleHooks", "attach", "faults", "kernel", "liveness", "memory", "notifier",
           "oops", "quiescent", "roots", "syscalls", "tdx", "tlb", "transitions", "unsync", "zaps"]

HOOK_NAMES = tuple(n for n in vars(Hooks) if not n.startswith("_"))
# at one hook, the oracles of these modules run first (a table's RCU callback and a
# page's release: a vCPU still caching it is the first thing that went wrong)
FIRST = ("tlb",)


def _dispatch(name: str, checks: list[Callable[..., Any]],
              default: Callable[..., Any]) -> Callable[..., Any]:
    if name == "kasan_report":  # must not return: the walker cannot go on
        def must_raise(*args: Any, **kw: Any) -> None:
            for c in checks:
                c(*args, **kw)
            default(*args, **kw)
        return must_raise
    if not checks:
        return default
    if len(checks) == 1:
        return checks[0]

    def all_of(*args: Any, **kw: Any) -> None:
        for c in checks:
            c(*args, **kw)
    return all_of


class OracleHooks(Hooks):
    """The model's hooks with the enabled oracles attached: each hook point is
    an instance attribute calling that hook's checks (no dispatch cost for a
    hook without oracles)."""

    def __init__(self, disabled: Iterable[str] = (),
                 params: dict[str, int] | None = None) -> None:
        off = set(disabled)
        unknown = off - {o.name for o in ORACLES}
        if unknown:
            raise ValueError(f"unknown oracle(s): {', '.join(sorted(unknown))}")
        base = Hooks()
        self.params = dict(params or {})  # bounds the oracles read (see LivenessConfig)
        self.enabled = [o for o in ORACLES if o.name not in off]
        for name in HOOK_NAMES:
            here = sorted((o for o in self.enabled if o.hook == name and o.check),
                          key=lambda o: o.module not in FIRST)
            checks = [o.check for o in here if o.check]
            setattr(self, name, _dispatch(name, checks, getattr(base, name)))


def attach(kvm: Kvm, disabled: Iterable[str] = (),
           params: dict[str, int] | None = None) -> Kvm:
    """Attach the oracles to this task's ``struct kvm``."""
    kvm.hooks = OracleHooks(disabled, params)
    return kvm


def by_name() -> dict[str, list[Oracle]]:
    out: dict[str, list[Oracle]] = {}
    for o in ORACLES:
        out.setdefault(o.name, []).append(o)
    return out
