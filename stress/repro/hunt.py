"""Hunting schedules for a violation, and replaying the one that was found.

``hunt`` runs the config under controlled schedules (harness/sched/),
each try a fresh schedule seed, alternating the random policy at a few switch
rates with PCT at a few depths, until one run reports a violation.  The
schedule that ran is recorded by the workers as switch points, so the run
becomes a ``replay`` config that reproduces it exactly: ``hunt`` replays it
once before it writes the bundle, and ``replay`` re-runs a bundle K times and
checks that every run reports the same invariant *and* the same trace events.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stress.config import Config
from stress.harness.kernel import supervisor_for
from stress.harness.supervisor import RunOutcome
from stress.report.report import now_iso, write_json_atomic

# (mode, switch_p, depth) tried in turn
STRATEGIES: tuple[tuple[str, float, int], ...] = (
    ("random", 0.02, 3), ("pct", 0.0, 2), ("random", 0.1, 3), ("pct", 0.0, 3),
    ("random", 0.005, 3), ("pct", 0.0, 5),
)


def with_schedule(cfg: Config, **changes: Any) -> Config:
    """``cfg`` with its [schedule] section changed (and no wall-clock cap that
    could end a controlled run before its step budget)."""
    sched = dataclasses.replace(cfg.schedule, **changes)
    run = dataclasses.replace(cfg.run, duration=max(cfg.run.duration, 600.0),
                              expect_violation=True)
    return dataclasses.replace(cfg, schedule=sched, run=run)


def replay_config(cfg: Config, outcome: RunOutcome) -> Config:
    """The exact replay of a controlled run: its recorded switch points."""
    assert outcome.schedule is not None
    return with_schedule(cfg, mode="replay",
                         switches=tuple(tuple(s) for s in outcome.schedule["switches"]))


def events_key(trace: list[dict[str, Any]]) -> list[tuple]:
    """A trace without wall-clock time: what must be equal between replays."""
    return [tuple(sorted((k, str(v)) for k, v in e.items() if k != "t_ns")) for e in trace]


@dataclass
class HuntResult:
    found: bool
    tries: int
    elapsed_s: float
    outcome: RunOutcome | None = None
    config: Config | None = None  # the replay config of the failing schedule
    strategy: dict[str, Any] | None = None
    replayed_identically: bool = False


def one_per_role(cfg: Config) -> Config:
    """``cfg`` with at most one worker of each role: fewer interleavings to search."""
    return dataclasses.replace(cfg, workers={r: min(n, 1) for r, n in cfg.workers.items()})


def hunt(cfg: Config, tries: int, first_seed: int = 1, max_steps: int | None = None,
         modes: tuple[str, ...] = ("random", "pct"),
         progress: Callable[[str], None] | None = None) -> HuntResult:
    """Controlled runs of ``cfg`` until one fails; see the module docstring.

    Each round of strategies runs on the config as given, the next round (if it
    has more than one worker of a role) on one worker per role with 2.5x the
    steps: a smaller search space, where some races are found much sooner."""
    strategies = [s for s in STRATEGIES if s[0] in modes]
    t0 = time.monotonic()
    steps = max_steps or cfg.schedule.max_steps
    small = one_per_role(cfg)
    configs = [(cfg, steps, "")] + ([(small, int(2.5 * steps), ", one worker per role")]
                                     if small.n_workers < cfg.n_workers else [])
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(
        cfg.schedule, max_ops=(), skip_ops=()))
    for k in range(tries):
        mode, p, depth = strategies[k % len(strategies)]
        base, steps_k, note = configs[(k // len(strategies)) % len(configs)]
        base = dataclasses.replace(base, schedule=dataclasses.replace(
            base.schedule, max_ops=(), skip_ops=()))
        seed = first_seed + k
        run_cfg = with_schedule(base, mode=mode, seed=seed, max_steps=steps_k,
                                switch_p=p or cfg.schedule.switch_p, depth=depth,
                                switches=())
        o = supervisor_for(run_cfg)(run_cfg).run()
        what = f"{mode} seed {seed}" + (f" p={p}" if mode == "random" else f" d={depth}") + note
        if progress:
            progress(f"try {k + 1}: {what}: {o.exit_reason}"
                     + (f" ({o.violations[0]['invariant']})" if o.violations else "")
                     + (f", {o.schedule['steps']} steps" if o.schedule else ""))
        if o.exit_reason == "interrupted":
            return HuntResult(False, k + 1, time.monotonic() - t0, o)
        if o.violations and o.schedule is not None and o.schedule["lost"]:
            if progress:
                progress(f"  ... but {o.schedule['lost']} switch points did not fit in the "
                         f"log: not replayable, hunting on")
            continue
        if o.violations and o.schedule is not None:
            rcfg = replay_config(run_cfg, o)
            again = supervisor_for(rcfg)(rcfg).run()
            same = (bool(again.violations)
                    and again.violations[0]["invariant"] == o.violations[0]["invariant"]
                    and events_key(again.trace) == events_key(o.trace))
            return HuntResult(True, k + 1, time.monotonic() - t0, o, rcfg,
                              {"mode": mode, "seed": seed, "switch_p": p, "depth": depth,
                               "max_steps": steps_k, "workers": run_cfg.workers,
                               "steps": o.schedule["steps"],
                               "switches": len(o.schedule["switches"]),
                               "lost": o.schedule["lost"]}, same)
    return HuntResult(False, tries, time.monotonic() - t0)


def load_trace(path: Path) -> list[dict[str, Any]]:
    f = path / "trace.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def replay(path: Path, runs: int,
           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Re-run a hunted bundle ``runs`` times: every run must fail the same way
    with the same events.  Written to ``<bundle>/replay.json``."""
    from stress.repro.repro import BundleError, load_bundle

    cfg, violation = load_bundle(path)
    if cfg.schedule.mode != "replay":
        raise BundleError(f"{path}: not a controlled-schedule bundle (schedule.mode is "
                          f"{cfg.schedule.mode!r}); make one with `tdp-stress hunt {path}`")
    want = events_key(load_trace(path))
    attempts = []
    for i in range(1, runs + 1):
        o = supervisor_for(cfg)(cfg).run()
        first = o.violations[0] if o.violations else None
        hit = bool(first and first["invariant"] == violation["invariant"])
        identical = hit and (not want or events_key(o.trace) == want)
        attempts.append({"run": i, "exit_reason": o.exit_reason, "hit": hit,
                         "identical_trace": identical,
                         "invariant": first["invariant"] if first else None,
                         "steps": o.schedule["steps"] if o.schedule else None})
        if progress:
            progress(f"run {i}: {'HIT' if hit else 'miss'}"
                     f"{' (identical events)' if identical else ''} ({o.exit_reason})")
        if o.exit_reason == "interrupted":
            break
    res = {"schema": "tdp-stress-replay", "schema_version": 1, "bundle": str(path),
           "at": now_iso(), "invariant": violation["invariant"], "variant": cfg.run.variant,
           "runs": len(attempts), "hits": sum(a["hit"] for a in attempts),
           "identical": sum(a["identical_trace"] for a in attempts), "attempts": attempts}
    write_json_atomic(path / "replay.json", res)
    return res
