"""Re-running reproducer bundles: how reliably does a violation come back?

``reproduce`` re-runs a bundle's config (same variant, same seed: every random
choice of every worker is the same, the OS schedule is not) up to ``runs``
times, stopping after ``stop_after`` hits, as syzkaller's repro does.  A hit
is a run that reports the bundle's invariant; the report gives the
reliability (hits/runs) and the time to each hit, and is written to
``<bundle>/repro.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stress import config as config_mod
from stress.harness.kernel import supervisor_for
from stress.report.report import now_iso, write_json_atomic
from stress.repro.bundle import signature


class BundleError(ValueError):
    pass


def load_bundle(path: Path, variant_file: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The bundle's config (with ``variant_file`` in place of the recorded one)
    and its violation."""
    cfg_file, vio_file = path / "config.toml", path / "violation.json"
    if not cfg_file.is_file() or not vio_file.is_file():
        raise BundleError(f"{path}: not a reproducer bundle (needs config.toml and "
                          "violation.json)")
    try:
        violation = json.loads(vio_file.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{vio_file}: invalid JSON: {e}") from None
    ov = {"run": {"variant_file": variant_file}} if variant_file else None
    return config_mod.load(cfg_file, ov), violation


def reproduce(path: Path, runs: int, stop_after: int,
              progress: Callable[[str], None] | None = None,
              variant_file: str | None = None) -> dict[str, Any]:
    cfg, violation = load_bundle(path, variant_file)
    want, want_sig = violation["invariant"], signature(violation)
    attempts = []
    for i in range(1, runs + 1):
        o = supervisor_for(cfg)(cfg).run()
        first = o.violations[0] if o.violations else None
        hit = bool(first and first["invariant"] == want)
        attempts.append({"run": i, "exit_reason": o.exit_reason, "hit": hit,
                         "same_signature": bool(first and signature(first) == want_sig),
                         "time_s": first["time_s"] if first else None,
                         "invariant": first["invariant"] if first else None,
                         "duration_s": o.duration_s})
        if progress:
            when = f", {first['time_s']:.3f}s" if first else ""
            progress(f"run {i}: {'HIT' if hit else 'miss'} ({o.exit_reason}{when})")
        if o.exit_reason == "interrupted":
            break
        if sum(a["hit"] for a in attempts) >= stop_after:
            break
    hits = [a for a in attempts if a["hit"]]
    res = {"schema": "tdp-stress-repro", "schema_version": 1, "bundle": str(path),
           "at": now_iso(), "invariant": want, "variant": cfg.run.variant,
           "seed": cfg.run.seed, "runs": len(attempts), "hits": len(hits),
           "reliability": round(len(hits) / max(1, len(attempts)), 3),
           "times_to_hit_s": [a["time_s"] for a in hits], "attempts": attempts}
    write_json_atomic(path / "repro.json", res)
    return res
