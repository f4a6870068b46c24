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


def policy_comparison(base: Config, duration: float, runs: int,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    results: dict[str, dict[str, Series]] = {p: {m: Series() for m, _ in POLICY_METRICS}
                                             for p in BUSY_POLICIES}
    reasons: dict[str, list[str]] = {p: [] for p in BUSY_POLICIES}
    for rnd in range(runs + 1):
        for policy in BUSY_POLICIES:
            cfg = config_mod.load_from(base, {
                "run": {"duration": duration if rnd else min(duration, 2.0),
                        "check_interval": 0.0, "variant": "fixed"},
                "vm": {"type": "tdx"}, "tdx": {"busy_policy": policy}})
            c, d, reason = _one_run(cfg)
            if progress:
                progress(f"{'warm-up' if rnd == 0 else f'run {rnd}/{runs}'} {policy}: "
                         f"{c['faults'] / d:.0f} faults/s, {reason}")
            if rnd == 0:
                continue
            reasons[policy].append(reason)
            for name, fn in POLICY_METRICS:
                results[policy][name].values.append(fn(c, d))
    return {
        "benchmark": "busy-policy",
        "duration_s": duration,
        "runs": runs,
        "policies": {p: {"exit_reasons": reasons[p],
                         **{m: {"median": round(s.median, 2), "min": round(s.spread()[0], 2),
                                "max": round(s.spread()[1], 2), "values": s.values}
                            for m, s in results[p].items()}}
                     for p in BUSY_POLICIES},
    }


def format_policy_table(res: dict[str, Any]) -> str:
    pols = list(res["policies"])
    head = f"{'metric':<18}" + "".join(f"{p:>26}" for p in pols)
    lines = [f"SEAMCALL BUSY policies: fixed protocol on a TD, {res['runs']} runs x "
             f"{res['duration_s']:.0f} s each (median [min..max])", head]
    for name, _ in POLICY_METRICS:
        row = f"{name:<18}"
        for p in pols:
            m = res["policies"][p][name]
            row += f"{_fmt(m['median']):>10} [{_fmt(m['min'])}..{_fmt(m['max'])}]".rjust(26)
        lines.append(row)
    bad = {p: r for p, r in ((p, res["policies"][p]["exit_reasons"]) for p in pols)
           if any(x != "clean" for x in r)}
    lines.append("all runs clean" if not bad else f"NOT CLEAN: {bad}")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f}k"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}"
