"""Kernel oops: the model's protocol code faulting as kernel code would.

The kernel engine's workers run C: a wild or NULL pointer there is a SIGSEGV,
reported as the kernel's oops (stress/oracles/kernel.py).  The model is
Python, where the same mistakes surface as exceptions: a ``None`` where a
table or a root was expected, a shift by a negative level, an index past a
table's end.  Raised from the model's protocol code (``stress/model/``), each
is what the kernel would print for the same bug, titled as syzkaller titles
kernel crashes ("BUG: kernel NULL pointer dereference in X"), so a run that
hits one reports a named cause at the function that faulted.  An exception
whose innermost frame is not protocol code (the harness's own) stays a crash
of the tester: it is not the kernel's.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from types import TracebackType

from stress.model.errors import InvariantViolation
from stress.oracles.base import HOOK_EXCEPTION, listed

_MODEL = Path(__file__).resolve().parent.parent / "model"

listed("kernel oops",
       invariant="protocol code never faults: no NULL pointer dereference, no shift out of "
                 "bounds, no index past a table, no division by zero, no runaway recursion, "
                 "no allocation the page pool cannot serve, no assertion or unreachable "
                 "path reached (the kernel's oops, KASAN's and UBSAN's reports, "
                 "warn_alloc's page allocation failure, BUG())",
       hook=HOOK_EXCEPTION,
       when="a worker's operation raises one of those out of stress/model/ (the function "
            "that faulted and its line are named)",
       cost="nothing until it fires", module="oops")


def _title(e: BaseException) -> str | None:
    text = str(e)
    if isinstance(e, (AttributeError, TypeError)) and "NoneType" in text:
        return "BUG: kernel NULL pointer dereference"
    if isinstance(e, ValueError) and "negative shift count" in text:
        return "UBSAN: shift-out-of-bounds"
    if isinstance(e, IndexError):
        return "KASAN: out-of-bounds access"
    if isinstance(e, ZeroDivisionError):
        return "divide error"
    if isinstance(e, RecursionError):
        return "kernel stack overflow"
    if isinstance(e, MemoryError):  # the page pool ran out under the protocol's allocation
        return "page allocation failure"
    if isinstance(e, AssertionError):  # an assert or an "unreachable" of protocol code
        return "kernel BUG"
    return None


_STRESS = _MODEL.parent
# below the protocol code: the shared-memory layer it accesses memory through (a NULL
# page index faults there, as a NULL pointer faults at the load)
_MEMORY = (_STRESS / "arena.py", _STRESS / "atomics.py")


def _resolve(filename: str) -> Path | None:
    try:
        return Path(filename).resolve()
    except (OSError, ValueError):
        return None


def kernel_oops(e: BaseException, tb: TracebackType | None) -> InvariantViolation | None:
    """The oops an exception out of the model's protocol code stands for, or None
    (not one the kernel would report as an oops, or not raised in the model: the
    innermost frames may be the memory layer's, under a model frame)."""
    title = _title(e)
    if title is None:
        return None
    frames = traceback.extract_tb(tb)
    paths = [_resolve(f.filename) for f in frames]
    k = len(frames)
    while k and paths[k - 1] in _MEMORY:
        k -= 1
    if not k or paths[k - 1] is None or not paths[k - 1].is_relative_to(_MODEL):
        return None
    f = frames[k - 1]
    where = f"{Path(f.filename).name}:{f.lineno}"
    return InvariantViolation(
        "kernel oops", f"{title} in {f.name} ({where}): {type(e).__name__}: {e}",
        function=f.name, where=where, title=title, exception=type(e).__name__)
