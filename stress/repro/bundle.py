"""Reproducer bundles: one directory per distinct violation.

A bundle holds what a developer needs to re-run a violation found in a soak:
the fully resolved config (``config.toml``, loadable by ``tdp-stress run``),
the violation report, the environment, and ``repro.sh``.  Bundles are
deduplicated by a signature (invariant + variant + the roles involved), so a
soak that hits the same bug a hundred times keeps one bundle and a count.
Written atomically: files go to a temporary directory that is renamed into
place, so a kill never leaves a half-written bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import cffi

from stress import __version__
from stress.config import Config
from stress.files import readable


def signature(violation: dict[str, Any]) -> str:
    """Stable id of a violation's kind: same bug, same signature."""
    det = violation.get("details", {})
    parts = [violation.get("invariant", "?"), violation.get("variant", "?"),
             str(violation.get("role", "checker")), str(det.get("seamcall", ""))]
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", violation.get("invariant", "violation").lower()).strip("-")
    return f"{slug[:40]}-{digest}"


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that ``config.load`` reads back identically."""
    lines = ["# fully resolved tdp-stress config (written by a reproducer bundle)"]
    for section, values in cfg.to_dict().items():
        lines.append(f"\n[{section}]")
        for key, v in values.items():
            lines.append(f"{key} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table ([[ROLE.worker]] tables as `worker = [...]`)
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def environment() -> dict[str, Any]:
    env = {"python": platform.python_version(), "cffi": cffi.__version__,
           "tdp_stress": __version__, "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        env["git_revision"] = rev.stdout.strip() if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        env["git_revision"] = None
    return env


REPRO_SH = """#!/bin/sh
# Re-run the run that found this violation: same config, variant and seed.
# Exit 0 when the violation came back (the same invariant first, as
# `tdp-stress repro` counts a hit); 1 when it did not.  More runs: ./repro.sh --runs 10
exec tdp-stress repro "$(dirname "$0")" --runs 1 --stop-after 1 "$@"
"""


def write_bundle(root: Path, cfg: Config, violation: dict[str, Any],
                 trace: list[dict[str, Any]] | None = None, suffix: str = "",
                 schedule: dict[str, Any] | None = None,
                 replace: bool = False, width: int = 0) -> tuple[Path, bool]:
    """Write (or count again) the bundle of ``violation`` under ``root``.

    Returns (bundle path, True if it is new).  The config written is the run's
    own, with expect_violation set, so ``repro.sh`` exits 0 when it reproduces.
    With ``trace`` (the merged last events of every worker) the bundle also
    holds ``trace.jsonl``, ``trace.chrome.json`` (Perfetto) and ``timeline.txt``.
    A bundle found under a controlled schedule (``hunt``, ``shrink``) also holds
    ``schedule.json`` (how the schedule was found); its config replays it.
    With ``replace`` an existing bundle of the signature is replaced, not counted.
    ``width``: of timeline.txt (default 160 characters; long events wrap).
    """
    sig = signature(violation) + suffix
    path = root / sig
    if path.exists() and not replace:
        hits = path / "hits"
        n = int(hits.read_text()) + 1 if hits.exists() else 2
        _atomic_text(hits, f"{n}\n")
        return path, False
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sig}.", dir=root))
    readable(tmp, directory=True)  # mkdtemp's 0700: CI artifacts are read by others
    try:
        import dataclasses

        run = dataclasses.replace(cfg.run, expect_violation=True, out="rerun")
        (tmp / "config.toml").write_text(to_toml(dataclasses.replace(cfg, run=run)))
        (tmp / "violation.json").write_text(json.dumps(violation, indent=2, default=str) + "\n")
        (tmp / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")
        (tmp / "repro.sh").write_text(REPRO_SH)
        readable(tmp / "repro.sh", executable=True)
        (tmp / "hits").write_text("1\n")
        if schedule is not None:
            (tmp / "schedule.json").write_text(json.dumps(schedule, indent=2) + "\n")
        if trace:
            from stress.harness.trace import focus
            from stress.report.explain import worker_names
            from stress.report.render import chrome_trace, details_text, hexify, timeline

            (tmp / "trace.jsonl").write_text("".join(json.dumps(e) + "\n" for e in trace))
            (tmp / "trace.chrome.json").write_text(chrome_trace(
                trace, f"tdp-stress {cfg.run.variant} seed {cfg.run.seed}", worker_names(cfg)))
            who = f"{violation['who']}\n" if violation.get("who") else ""
            (tmp / "timeline.txt").write_text(
                f"{violation.get('invariant')}: {hexify(str(violation.get('message')))}\n{who}"
                f"{details_text(violation.get('details', {}))}\n\n"
                + timeline(focus(trace, violation), width=width) + "\n")
        if path.exists():  # replace: move the old one aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{sig}.old.", dir=root))
            os.rename(path, old / "b")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path, True


def write_bundles(root: Path, cfg: Config, violations: list[dict[str, Any]],
                  trace: list[dict[str, Any]], keep_going: bool = False, width: int = 0
                  ) -> list[tuple[Path, bool]]:
    """Bundle the first cause (and, with ``keep_going``, the consequences too);
    each bundled violation gets its ``bundle`` path.  Returns (path, new)."""
    out = []
    for v in violations[: None if keep_going else 1]:
        path, new = write_bundle(root, cfg, v, trace, width=width)
        v["bundle"] = str(path)
        out.append((path, new))
    return out


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    readable(tmp)
    os.replace(tmp, path)
