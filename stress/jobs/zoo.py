"""The bug zoo: time-to-detect of every bug variant, and the fixed protocol clean.

Each bug variant runs on ``seeds`` seeds (1..N) with a per-run cap, on the
shipped config that stresses its code path (``Variant.config``); a run that
reports any violation before the cap counts as detected, with its time (from
the workers' start) and the invariant that fired.  The fixed protocol then
runs for ``fixed_seconds`` and must stay clean.  Medians and p90s are over the
detected runs only; k/N says how many there were.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

from stress import config as config_mod
from stress.harness.kernel import supervisor_for
from stress.kernel.mutations import BY_NAME
from stress.model.variants import VARIANTS, Variant

SCHEMA = "tdp-stress-zoo"
SCHEMA_VERSION = 1


class ZooInterrupted(Exception):
    """SIGINT or SIGTERM reached a run: the zoo stops (exit 130)."""


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def _config_path(v: Variant) -> str:
    return str(config_mod.DEFAULT_CONFIG.parent / v.config)


# the perturbation knobs (issue #9 item 4): delay injection at the atomics
# chokepoint, the targeted race windows of split atomic steps, and the hot set
# that focuses every worker on a few pages; "without" turns all three off
NO_PERTURBATION = {"inject": {"delay_every": 0, "race_window": 0.0},
                   "guest": {"hot_fraction": 0.0}}


KERNEL_CONFIG = config_mod.DEFAULT_CONFIG.parent / "kernel.toml"


def _variant_config(name: str, engine: str, ov: dict[str, dict[str, Any]]) -> config_mod.Config:
    """The config a variant runs on: its Python variant's config, or its kernel
    mutation's (a shipped kernel config)."""
    if engine == "kernel":
        return config_mod.load(str(config_mod.DEFAULT_CONFIG.parent / BY_NAME[name].config), ov)
    return config_mod.load(_config_path(VARIANTS[name]), ov)


def _detect(name: str, seeds: int, cap: float, perturb: bool,
            progress: Callable[[str], None] | None, variant_file: str = "",
            engine: str = "python") -> dict[str, Any]:
    ttds: list[float] = []
    invariants: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for seed in range(1, seeds + 1):
        ov: dict[str, dict[str, Any]] = {"run": {
            "variant": name, "seed": seed, "duration": cap, "expect_violation": True,
            **({"variant_file": variant_file} if variant_file else {})}}
        if not perturb:
            ov.update(NO_PERTURBATION if engine == "python"
                      else {"kernel": {"yield_ppm": 0}, "guest": {"hot_fraction": 0.0}})
        cfg = _variant_config(name, engine, ov)
        o = supervisor_for(cfg)(cfg).run()
        if o.exit_reason == "interrupted":
            raise ZooInterrupted
        reasons[o.exit_reason] += 1
        if o.violations:
            ttds.append(o.violations[0]["time_s"])
            invariants[o.violations[0]["invariant"]] += 1
        if progress:
            t = f"{o.violations[0]['time_s']:.3f}s" if o.violations else "-"
            progress(f"{name}{'' if perturb else ' (no perturbation)'} seed {seed}: "
                     f"{o.exit_reason} {t}")
    return {"runs": seeds, "detected": len(ttds),
            "median_ttd_s": round(statistics.median(ttds), 4) if ttds else None,
            "p90_ttd_s": round(_p90(ttds), 4) if ttds else None,
            "invariants": dict(invariants.most_common()), "exit_reasons": dict(reasons)}


def _hunt(name: str, tries: int, replays: int, max_steps: int,
          progress: Callable[[str], None] | None, variant_file: str = "",
          engine: str = "python") -> dict[str, Any]:
    """Controlled scheduling (harness/sched/): schedules tried until one
    fails, then that schedule replayed ``replays`` times."""
    from stress.repro.hunt import events_key, hunt

    cfg = _variant_config(name, engine, {"run": {
        "variant": name, **({"variant_file": variant_file} if variant_file else {})}})
    res = hunt(cfg, tries, max_steps=max_steps)
    if res.outcome is not None and res.outcome.exit_reason == "interrupted":
        raise ZooInterrupted
    row: dict[str, Any] = {"tries": res.tries, "found": res.found,
                           "hunt_s": round(res.elapsed_s, 2), "replays": 0, "identical": 0}
    if res.found and res.config is not None and res.outcome is not None:
        want = events_key(res.outcome.trace)
        inv = res.outcome.violations[0]["invariant"]
        for _ in range(replays):
            o = supervisor_for(res.config)(res.config).run()
            if o.exit_reason == "interrupted":
                raise ZooInterrupted
            row["replays"] += 1
            row["identical"] += bool(o.violations and o.violations[0]["invariant"] == inv
                                     and events_key(o.trace) == want)
        row["schedule"] = res.strategy
    if progress:
        progress(f"{name}: hunt {'found' if res.found else 'nothing'} in {res.tries} "
                 f"schedule(s), replay {row['identical']}/{row['replays']} identical")
    return row


def run_zoo(variants: list[str], seeds: int, cap: float, fixed_seconds: float,
            progress: Callable[[str], None] | None = None,
            compare_perturbation: bool = False, hunt_tries: int = 0,
            hunt_max_steps: int = 200_000, variant_file: str = "",
            engine: str = "python") -> dict[str, Any]:
    """Perturbation (delay injection at the atomics chokepoint and the targeted
    race windows) is on as configured; ``compare_perturbation`` also runs every
    variant with both off and reports the two side by side.  ``variant_file``:
    a user variant file every run loads (its variants can then be named)."""
    rows = []
    for name in variants:
        if engine == "kernel":
            m = BY_NAME[name]
            source, where = m.source, m.config
        else:
            source, where = VARIANTS[name].source, VARIANTS[name].config
        row = {"name": name, "source": source, "config": where, "engine": engine,
               **_detect(name, seeds, cap, True, progress, variant_file, engine)}
        if compare_perturbation:
            row["without_perturbation"] = _detect(name, seeds, cap, False, progress,
                                                  variant_file, engine)
        if hunt_tries:
            row["hunt"] = _hunt(name, hunt_tries, seeds, hunt_max_steps, progress,
                                variant_file, engine)
        rows.append(row)
    fixed: dict[str, Any] = {"seconds": 0.0, "violations": 0, "exit_reason": None}
    if fixed_seconds > 0:
        cfg = config_mod.load(str(KERNEL_CONFIG) if engine == "kernel" else None,
                              {"run": {"duration": fixed_seconds}})
        if progress:
            progress(f"fixed protocol for {fixed_seconds:.0f} s")
        o = supervisor_for(cfg)(cfg).run()
        if o.exit_reason == "interrupted":
            raise ZooInterrupted
        fixed = {"seconds": o.duration_s, "violations": len(o.violations),
                 "exit_reason": o.exit_reason, "checks": o.checks,
                 # what a fixed run that is not clean found: the report to start from
                 "first_violation": None if not o.violations else {
                     "invariant": o.violations[0].invariant,
                     "message": o.violations[0].message,
                     "details": {k: str(v) for k, v in o.violations[0].details.items()}}}
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "seeds": seeds, "cap_s": cap,
            "engine": engine, "variants": rows, "fixed": fixed}


def not_detected(res: dict[str, Any]) -> str:
    """The zoo's verdict when it fails: a line naming every variant not
    detected (and a fixed protocol that did not run clean); "" when it passed."""
    missed = [r["name"] for r in res["variants"] if not r["detected"]]
    f = res["fixed"]
    parts = []
    if missed:
        parts.append(f"not detected ({len(missed)} of {len(res['variants'])}): "
                     + ", ".join(missed))
    if f["violations"] or f["exit_reason"] not in (None, "clean"):
        parts.append(f"fixed protocol not clean ({f['exit_reason']}, "
                     f"{f['violations']} violations)")
    return "zoo FAILED: " + "; ".join(parts) if parts else ""


def format_zoo(res: dict[str, Any]) -> str:
    # the name column fits the longest name (user variants can be long)
    nw = max([len("controlled schedules")] + [len(r["name"]) for r in res["variants"]]) + 2
    engine = " (kernel engine)" if res.get("engine") == "kernel" else ""
    lines = [f"bug zoo{engine}: {res['seeds']} seeds per variant, cap {res['cap_s']:.0f} s "
             "per run",
             f"{'variant':<{nw}}{'detected':>9}{'median':>9}{'p90':>9}  invariant (first fired)"]
    for r in res["variants"]:
        med = f"{r['median_ttd_s']:.3f}s" if r["median_ttd_s"] is not None else "-"
        p90 = f"{r['p90_ttd_s']:.3f}s" if r["p90_ttd_s"] is not None else "-"
        inv = ", ".join(f"{k} x{n}" for k, n in r["invariants"].items()) or "-"
        lines.append(f"{r['name']:<{nw}}{r['detected']:>4}/{r['runs']:<4}{med:>9}{p90:>9}  {inv}")
        lines.append(f"{'':<{nw}}source: {r['source']}")
    if any("without_perturbation" in r for r in res["variants"]):
        lines.append("")
        lines.append(f"{'perturbation':<{nw}}{'with':>14}{'without':>14}{'speed-up':>10}")
        for r in res["variants"]:
            w = r.get("without_perturbation")
            if not w:
                continue
            a, b = r["median_ttd_s"], w["median_ttd_s"]
            left = f"{r['detected']}/{r['runs']} {a:.3f}s" if a is not None else "-"
            right = f"{w['detected']}/{w['runs']} {b:.3f}s" if b is not None else \
                f"{w['detected']}/{w['runs']}     -"
            if a and b:
                ratio = f"{b / a:.1f}x"
            elif a and not w["detected"]:  # not caught within the cap without it
                ratio = f">{res['cap_s'] / a:.0f}x"
            else:
                ratio = "-"
            lines.append(f"{r['name']:<{nw}}{left:>14}{right:>14}{ratio:>10}")
    if any("hunt" in r for r in res["variants"]):
        lines.append("")
        lines.append(f"{'controlled schedules':<{nw}}{'hunt':>18}{'replay':>12}  schedule")
        for r in res["variants"]:
            h = r.get("hunt")
            if not h:
                continue
            found = f"{h['tries']} tries {h['hunt_s']:.1f}s" if h["found"] else \
                f"none in {h['tries']}"
            rep = f"{h['identical']}/{h['replays']}" if h["found"] else "-"
            sc = h.get("schedule") or {}
            how = f"{sc.get('mode')} seed {sc.get('seed')}, {sc.get('steps')} steps" if sc else ""
            lines.append(f"{r['name']:<{nw}}{found:>18}{rep:>12}  {how}")
    f = res["fixed"]
    if f["seconds"]:
        lines.append(f"fixed protocol: {f['seconds']:.0f} s, {f['violations']} violations "
                     f"({f['exit_reason']})")
        if f.get("first_violation"):
            fv = f["first_violation"]
            lines.append(f"  first: [{fv['invariant']}] {fv['message']}")
    return "\n".join(lines)
