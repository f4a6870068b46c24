"""Benchmarks that print figures (never asserted in tests).

``policy_comparison`` runs the fixed protocol on a TD once per SEAMCALL BUSY
policy (unwind, retry, serialize) and reports, side by side, throughput and
retry/BUSY rates: the numbers behind seed 000's claim that serialising all
S-EPT SEAMCALLs of a VM "is not an option, at least not in the long term".

Method (pyperf's): one warm-up run per policy that is thrown away, then
``runs`` measured runs, policies interleaved run by run so a noisy
neighbour hurts them alike; each figure is the median with its min..max.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stress import config as config_mod
from stress.config import BUSY_POLICIES, Config
from stress.harness.supervisor import Supervisor

POLICY_METRICS = (
    ("faults/s", lambda c, d: c["faults"] / d),
    ("zapper ops/s", lambda c, d: c["zapper_ops"] / d),
    ("SEAMCALLs/s", lambda c, d: c["seamcalls"] / d),
    ("BUSY/s", lambda c, d: c["seamcall_busy"] / d),
    ("BUSY %", lambda c, d: 100.0 * c["seamcall_busy"] / max(1, c["seamcalls"])),
    ("fault retries/s", lambda c, d: c["retries"] / d),
    ("retries/fault", lambda c, d: c["retries"] / max(1, c["faults"])),
    ("zap retries/s", lambda c, d: c["zap_retry"] / d),
)


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else 0.0

    def spread(self) -> tuple[float, float]:
        return (min(self.values), max(self.values)) if self.values else (0.0, 0.0)


def _one_run(cfg: Config) -> tuple[Counter[str], float, str]:
    o = Supervisor(cfg).run()
    c: Counter[str] = Counter()
    for rec in o.workers:
        c.update({k: v for k, v in rec.stats.items() if not k.startswith("max_")})
        if rec.role == "zapper":
            c["zapper_ops"] += rec.stats.get("ops", 0)
    return c, max(o.duration_s, 1e-9), o.exit_reason


Metric = tuple[str, Callable[[Counter[str], float], float]]

UNSYNC_METRICS: tuple[Metric, ...] = (
    ("faults/s", lambda c, d: c["faults"] / d),
    ("shadowed writes/s", lambda c, d: c["shadowed_writes"] / d),
    ("unsync marks/s", lambda c, d: c["unsync_marked"] / d),
    ("lock taken/s", lambda c, d: c["unsync_lock_taken"] / d),
    ("lock contended/s", lambda c, d: c["unsync_lock_contended"] / d),
    ("emulated writes/s", lambda c, d: c["emulated_writes"] / d),
    ("syncs/s", lambda c, d: c["syncs"] / d),
    ("zapper ops/s", lambda c, d: c["zapper_ops"] / d),
)


def compare(title: str, base: Config, arms: dict[str, dict[str, dict[str, Any]]],
            metrics: tuple[Metric, ...], duration: float, runs: int,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run each arm (config overrides) ``runs`` times after a warm-up, interleaved."""
    results: dict[str, dict[str, Series]] = {a: {m: Series() for m, _ in metrics} for a in arms}
    reasons: dict[str, list[str]] = {a: [] for a in arms}
    for rnd in range(runs + 1):
        for arm, overrides in arms.items():
            ov = {k: dict(v) for k, v in overrides.items()}
            ov.setdefault("run", {}).update({"duration": duration if rnd else min(duration, 2.0),
                                             "check_interval": 0.0})
            cfg = config_mod.load_from(base, ov)
            c, d, reason = _one_run(cfg)
            if progress:
                progress(f"{'warm-up' if rnd == 0 else f'run {rnd}/{runs}'} {arm}: "
                         f"{c['faults'] / d:.0f} faults/s, {reason}")
            if rnd == 0:
                continue
            reasons[arm].append(reason)
            for name, fn in metrics:
                results[arm][name].values.append(fn(c, d))
    return {
        "benchmark": title,
        "duration_s": duration,
        "runs": runs,
        "metrics": [m for m, _ in metrics],
        "arms": {a: {"exit_reasons": reasons[a],
                     **{m: {"median": round(s.median, 2), "min": round(s.spread()[0], 2),
                            "max": round(s.spread()[1], 2), "values": s.values}
                        for m, s in results[a].items()}}
                 for a in arms},
    }


def policy_comparison(base: Config, duration: float, runs: int,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    arms = {p: {"run": {"variant": "fixed"}, "vm": {"type": "tdx"},
                "tdx": {"busy_policy": p}} for p in BUSY_POLICIES}
    res = compare("busy-policy", base, arms, POLICY_METRICS, duration, runs, progress)
    res["policies"] = res["arms"]
    return res


def unsync_comparison(base: Config, duration: float, runs: int,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The commit's spinlock (fixed) against its Alternative #1 (never unsync)."""
    arms = {"spinlock (fixed)": {"run": {"variant": "fixed"}},
            "write-protect (alt #1)": {"run": {"variant": "unsync-write-protect"}}}
    return compare("unsync", base, arms, UNSYNC_METRICS, duration, runs, progress)


def format_table(res: dict[str, Any], heading: str) -> str:
    arms = list(res["arms"])
    head = f"{'metric':<18}" + "".join(f"{a:>28}" for a in arms)
    lines = [f"{heading}, {res['runs']} runs x {res['duration_s']:.0f} s each "
             "(median [min..max])", head]
    for name in res["metrics"]:
        row = f"{name:<18}"
        for a in arms:
            m = res["arms"][a][name]
            row += f"{_fmt(m['median'])} [{_fmt(m['min'])}..{_fmt(m['max'])}]".rjust(28)
        lines.append(row)
    bad = {a: r for a, r in ((a, res["arms"][a]["exit_reasons"]) for a in arms)
           if any(x != "clean" for x in r)}
    lines.append("all runs clean" if not bad else f"NOT CLEAN: {bad}")
    return "\n".join(lines)


def format_policy_table(res: dict[str, Any]) -> str:
    return format_table(res, "SEAMCALL BUSY policies: fixed protocol on a TD")


def _fmt(x: float) -> str:
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f}k"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}"
