"""What a run tells its user after it ends: who did what, which violation is the
cause, where its bundle is and what to run next, and where each run's files go.

* Attribution: a violation is reported by one worker (``worker``) about state
  that others may have made; its details name them (``installed_by_worker``,
  ``removed_by_worker``, ``converting_worker``, ...).  :func:`who` turns them
  into "installed by vcpu0, removed by zapper2, detected by vcpu1".
* Causes and consequences: the first violation of a run stops it; whatever is
  reported after it (a fault that then livelocks on the broken table, the
  checker's divergence) is marked ``consequence_of`` the first.  A bundle is
  written for the first cause; consequences get one only with ``keep_going``
  (``repro/bundle.py``'s ``write_bundles``).
* Run directories: every ``run`` and ``soak`` writes into a fresh timestamped
  child of ``--out`` and points ``<out>/latest`` at it, so runs never
  overwrite each other and ``<out>/latest/results.json`` is always the newest.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

from stress.config import Config
from stress.files import DIR_MODE, readable


def worker_names(cfg: Config) -> list[str]:
    """Worker index -> "vcpu0", "zapper2", ...: role and index, as in timelines."""
    roles = [role for role, n in cfg.workers.items() for _ in range(n)]
    return [f"{r}{i}" for i, r in enumerate(roles)]


def _name(names: list[str], w: Any) -> str | None:
    if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < len(names):
        return None
    return names[w]


def who(v: dict[str, Any], names: list[str]) -> str:
    """Every worker a violation's report names, and what each did."""
    det = v.get("details") or {}
    parts: list[str] = []
    for key, val in det.items():
        if key == "worker" or not key.endswith("_worker"):
            continue
        n = _name(names, val)
        if n is None:
            continue
        what = key[: -len("_worker")]
        what = what[: -len("_by")] if what.endswith("_by") else what
        parts.append(f"{what.replace('_', ' ')} by {n}")
    found = v.get("worker", det.get("worker"))
    n = _name(names, found)
    if n is not None:
        parts.append(f"detected by {n}")
    elif found == "checker":
        parts.append(f"detected by the {v.get('found_by', 'quiescent')} check")
    return ", ".join(parts)


def annotate(violations: list[dict[str, Any]], names: list[str]) -> None:
    """Name the workers of each violation (``who``) and mark every violation
    after the first as its consequence (``consequence_of``: 0, the index)."""
    for i, v in enumerate(violations):
        w = who(v, names)
        if w:
            v["who"] = w
        if i:
            v["consequence_of"] = 0


def next_steps(bundle: str | Path) -> str:
    """What to do with a bundle, as hunt and shrink say it."""
    return (f"bundle: {bundle}\n"
            f"next:   tdp-stress repro {bundle}    # how reliably it comes back\n"
            f"        tdp-stress hunt {bundle}     # a schedule that replays it every time")


def new_run_dir(root: Path, now: _dt.datetime | None = None) -> Path:
    """A fresh timestamped child of ``root`` (``20250102-030405``, then
    ``-2``, ``-3`` within the same second), with ``root/latest`` pointing at it.

    Raises OSError when it cannot be created."""
    root = root.absolute()  # printed paths work from any directory
    root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    for k in range(1, 10_000):
        d = root / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            d.mkdir(mode=DIR_MODE)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - ten thousand runs in one second
        raise FileExistsError(f"{root}: too many runs in one second")
    readable(d, directory=True)
    link = root / "latest"
    tmp = root / f".latest.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(d.name)
        os.replace(tmp, link)  # atomic: readers see the old run or the new one
    except OSError:
        tmp.unlink(missing_ok=True)
        if link.is_dir() and not link.is_symlink():
            pass  # a directory called "latest" of the user's: leave it alone
        else:
            raise
    return d
