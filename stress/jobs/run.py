"""The run job: one supervised run of a config, its results and its bundles.

``tdp-stress run`` is this job plus what the command line adds (the run
directory, results.json, JUnit, the summary); every epoch of a soak is one, and
so is each call of the pytest plugin's ``stress_run``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from stress.config import Config
from stress.harness.kernel import supervisor_for
from stress.harness.supervisor import RunOutcome, StatusSnapshot
from stress.report.explain import annotate, worker_names
from stress.report.report import build_results, now_iso
from stress.repro.bundle import write_bundles


def run_job(cfg: Config, out: Path, on_status: Callable[[StatusSnapshot], None] | None = None,
            hard_deadline: float | None = None, keep_going: bool = False, width: int = 0
            ) -> tuple[RunOutcome, dict[str, Any]]:
    """Run ``cfg`` once: the outcome and its results (results.json's dict, not
    written here), every violation's workers named, the first cause bundled
    under ``out/bundles`` (the consequences too with ``keep_going``)."""
    started = now_iso()
    sup = supervisor_for(cfg)
    outcome = sup(cfg, on_status=on_status, hard_deadline=hard_deadline).run()
    res = build_results(cfg, outcome, started)
    annotate(res["violations"], worker_names(cfg))
    write_bundles(out / "bundles", cfg, res["violations"], outcome.trace, keep_going, width)
    return outcome, res
