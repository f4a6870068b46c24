"""Run mutants and classify each one; the score.

Outcomes (``Outcome.category`` in parentheses):

* ``killed`` (killed): the run reported a violation; ``invariant`` names the oracle (the
  first violation that is not a consequence of another);
* ``crash``, ``hang``, ``timeout`` (crash/hang): a worker crashed or raised an exception
  that is not a named violation (exit 3), the watchdog or the stop sequence found a hang
  (exit 4), or the run outlived duration + grace and was killed;
* ``survived`` (survived): the run was clean;
* ``equivalent``: listed in ``stress/mutate/equivalent.toml`` with the argument; not run;
* ``stillborn``: the mutated package does not compile or import, or the run refused to
  start (exit 2); not run, or not judged;
* ``unreached``: no shipped config that runs clean ran the mutated statement.

score = killed / (mutants - equivalent - stillborn): only a named oracle counts, and an
unreached mutant counts against the tester like a survivor (no config tests that code).
The score over reached mutants leaves the unreached out of the denominator too.
"""

from __future__ import annotations

import random
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stress.mutate.operators import TARGET_FILES, Mutant
from stress.mutate.reach import run_configs, split_target
from stress.mutate.sandbox import RunResult, Sandbox, import_check, run_config

EQUIVALENT_FILE = Path(__file__).resolve().parent / "equivalent.toml"
CATEGORY = {"killed": "killed", "crash": "crash/hang", "hang": "crash/hang",
            "timeout": "crash/hang", "survived": "survived", "equivalent": "equivalent",
            "stillborn": "stillborn", "unreached": "unreached", "interrupted": "interrupted"}
COLUMNS = ("killed", "crash/hang", "survived", "unreached", "equivalent", "stillborn")


@dataclass
class Outcome:
    id: str
    file: str
    function: str
    operator: str
    line: int
    description: str
    config: str | None
    outcome: str
    variant: str | None = None  # the protocol variant the run used ("fixed" or a valid one)
    invariant: str | None = None
    time_to_kill_s: float | None = None  # from the run's start to the violation or crash
    exit_code: int | None = None
    exit_reason: str | None = None
    wall_s: float = 0.0
    detail: str = ""
    diff: str = ""
    pid: int | None = None  # the run's supervisor (its segments are tdpstress-<pid>-*)
    tried: list[str] | None = None  # the targets run, in turn, the last one's outcome this

    @property
    def category(self) -> str:
        return CATEGORY[self.outcome]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["category"] = self.category
        return d


def load_equivalents(path: Path = EQUIVALENT_FILE) -> dict[str, dict[str, str]]:
    """Mutant id -> {reason, segment} of the mutants argued equivalent."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {k: dict(v) for k, v in data.items()}


def stale_equivalents(equivalents: dict[str, dict[str, str]], mutants: list[Mutant]
                      ) -> list[str]:
    """Entries whose id no mutant has, or whose mutant now mutates other code."""
    by_id = {m.id: m for m in mutants}
    out = []
    for k, v in equivalents.items():
        m = by_id.get(k)
        if m is None:
            out.append(f"{k}: no such mutant")
        elif v.get("segment") and v["segment"] != m.segment:
            out.append(f"{k}: now mutates `{m.segment}`, the entry argued `{v['segment']}`")
    return out


def select(mutants: list[Mutant], files: tuple[str, ...] = (), operators: tuple[str, ...] = (),
           ids: tuple[str, ...] = (), max_n: int | None = None, sample_seed: int = 1
           ) -> list[Mutant]:
    """Filter, then sample ``max_n`` with a seed, stratified by file (round robin over
    each file's shuffled mutants), returned in source order."""
    out = [m for m in mutants if (not files or m.file in files)
           and (not operators or m.operator in operators) and (not ids or m.id in ids)]
    if max_n is None or max_n >= len(out):
        return out
    rng = random.Random(sample_seed)
    per_file: dict[str, list[Mutant]] = {}
    for m in out:
        per_file.setdefault(m.file, []).append(m)
    for lst in per_file.values():
        rng.shuffle(lst)
    picked: list[Mutant] = []
    while len(picked) < max_n:
        for f in sorted(per_file):
            if per_file[f] and len(picked) < max_n:
                picked.append(per_file[f].pop())
    keep = {m.id for m in picked}
    return [m for m in out if m.id in keep]


def classify(m: Mutant, target: str, r: RunResult) -> Outcome:
    config, variant = split_target(target)
    o = Outcome(m.id, m.file, m.function, m.operator, m.line, m.description, config,
                "survived", variant=variant, exit_code=r.exit_code, wall_s=round(r.wall_s, 2),
                pid=r.pid)
    res = r.results or {}
    o.exit_reason = res.get("exit_reason")
    tail = r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else []
    if r.interrupted:
        o.outcome = "interrupted"
    elif r.timed_out:
        o.outcome, o.exit_reason = "timeout", "timeout"
        o.time_to_kill_s = round(r.wall_s, 2)
    elif r.exit_code == 0:
        o.outcome = "survived"
    elif r.exit_code == 1 and res.get("violations"):
        vs = res["violations"]
        first = next((v for v in vs if not v.get("consequence_of")), vs[0])
        o.outcome, o.invariant = "killed", first.get("invariant")
        o.time_to_kill_s = first.get("time_s")
        o.detail = str(first.get("message", ""))[:300]
    elif r.exit_code == 2:
        o.outcome, o.detail = "stillborn", (tail[0] if tail else "exit 2")
    elif r.exit_code == 4:
        o.outcome = "hang"
        o.time_to_kill_s = res.get("duration_s")
        hang = res.get("hang") or {}
        o.detail = str(hang.get("reason") or hang.get("message") or "")[:300]
    else:  # 3, a traceback out of the supervisor (1 without results), a signal
        o.outcome = "crash"
        o.time_to_kill_s = res.get("duration_s")
        errors = res.get("errors") or []
        text = errors[0] if errors else "\n".join(tail)
        lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
        o.detail = (lines[-1] if lines else f"exit {r.exit_code}")[:300]
    return o


def run_targets(sandbox: Sandbox, m: Mutant, targets: list[str], duration: float,
                seed: int) -> Outcome:
    """Run ``m`` on each of ``targets`` in turn until one kills it (or it crashes,
    hangs or is stillborn): the outcome is that run's, or the last survival.  A kill
    on a later target counts the runs before it in ``time_to_kill_s`` (the mutant's
    whole time under test) and names every target tried in ``tried``."""
    spent = 0.0
    o: Outcome | None = None
    for k, target in enumerate(targets):
        o = run_one(sandbox, m, target, duration, seed)
        o.tried = targets[:k + 1]
        if o.outcome != "survived":
            if o.time_to_kill_s is not None:
                o.time_to_kill_s = round(spent + o.time_to_kill_s, 2)
            return o
        spent += duration
    assert o is not None
    return o


def run_one(sandbox: Sandbox, m: Mutant, target: str, duration: float, seed: int) -> Outcome:
    """Run ``m`` on ``target`` (``config`` or ``config@variant``)."""
    original = sandbox.original(m.file)
    text = m.apply(original)
    config, variant = split_target(target)
    base = Outcome(m.id, m.file, m.function, m.operator, m.line, m.description, config,
                   "stillborn", variant=variant, diff=m.diff(original))
    try:
        compile(text, m.file, "exec")
    except SyntaxError as e:
        base.detail = f"SyntaxError: {e}"
        return base
    d = sandbox.make({m.file: text})
    try:
        err = import_check(d, m.file)
        if err is not None:
            base.detail = err
            return base
        o = classify(m, target, run_config(d, run_configs()[config], duration, seed,
                                           variant=variant))
        o.diff = base.diff
        return o
    finally:
        sandbox.drop(d)


def not_run(m: Mutant, outcome: str, target: str | None, detail: str) -> Outcome:
    config, variant = split_target(target) if target else (None, None)
    return Outcome(m.id, m.file, m.function, m.operator, m.line, m.description, config,
                   outcome, variant=variant, detail=detail)


# ---------------------------------------------------------------------------
# the score
# ---------------------------------------------------------------------------

def tally(outcomes: list[Outcome]) -> dict[str, Any]:
    c = Counter(o.category for o in outcomes)
    n = len(outcomes) - c["interrupted"]
    judged = n - c["equivalent"] - c["stillborn"]
    reached = judged - c["unreached"]
    kills = sorted(o.time_to_kill_s for o in outcomes
                   if o.category == "killed" and o.time_to_kill_s is not None)
    return {"mutants": n, **{k: c[k] for k in COLUMNS},
            "score": round(c["killed"] / judged, 4) if judged else None,
            "score_reached": round(c["killed"] / reached, 4) if reached else None,
            "median_kill_s": kills[len(kills) // 2] if kills else None,
            "max_kill_s": kills[-1] if kills else None}


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    files = sorted({o.file for o in outcomes}, key=lambda f: (
        TARGET_FILES.index(f) if f in TARGET_FILES else 99, f))
    ops = sorted({o.operator for o in outcomes})
    return {"files": {f: tally([o for o in outcomes if o.file == f]) for f in files},
            "operators": {op: tally([o for o in outcomes if o.operator == op]) for op in ops},
            "total": tally(outcomes),
            "oracles": dict(Counter(o.invariant for o in outcomes
                                    if o.outcome == "killed").most_common())}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(rows: dict[str, dict[str, Any]], total: dict[str, Any], head: str) -> list[str]:
    w = max([len(head), 5, *(len(k) for k in rows)])
    cols = ("mutants", *COLUMNS)
    lines = [f"{head:<{w}}  " + "  ".join(f"{c:>10}" for c in cols)
             + f"  {'score':>7}  {'reached':>7}  {'kill med/max s':>14}"]
    for name, t in [*rows.items(), ("total", total)]:
        kill = ("-" if t["median_kill_s"] is None
                else f"{t['median_kill_s']:.1f}/{t['max_kill_s']:.1f}")
        lines.append(f"{name:<{w}}  " + "  ".join(f"{t[c]:>10}" for c in cols)
                     + f"  {_pct(t['score']):>7}  {_pct(t['score_reached']):>7}  {kill:>14}")
    return lines


def format_report(res: dict[str, Any]) -> str:
    s = res["summary"]
    out = [f"tdp-stress mutate: {s['total']['mutants']} mutants of {res['candidates']} "
           f"candidates ({res['population_unreached']} of those unreached by any config), "
           f"{res['duration_s']:g} s per run"
           + (f" on up to {res['configs_per_mutant']} configs"
              if res.get("configs_per_mutant", 1) > 1 else "")
           + f", seed {res['seed']}, {res['jobs']} job(s), "
           f"{res['wall_s']:.0f} s wall"]
    out += [""] + _table(s["files"], s["total"], "file")
    out += [""] + _table(s["operators"], s["total"], "operator")
    if s["oracles"]:
        out += ["", "killed by: " + ", ".join(f"{k} x{v}" for k, v in s["oracles"].items())]
    surv = [o for o in res["mutants"] if o["category"] in ("survived", "crash/hang",
                                                           "stillborn")]
    if surv:
        out += ["", "not killed by a named oracle (reached):"]
        for o in surv:
            extra = f" -- {o['detail']}" if o["detail"] else ""
            where = o["config"] or "-"
            if o.get("variant") not in (None, "fixed"):
                where += f"@{o['variant']}"
            if len(o.get("tried") or ()) > 1:
                where = "+".join(o["tried"])
            out.append(f"  {o['outcome']:<9} {where:<10} {o['description']}{extra}"[:220])
    unreached = [o for o in res["mutants"] if o["outcome"] == "unreached"]
    if unreached:
        out += ["", f"unreached ({len(unreached)}): "
                + ", ".join(o["id"] for o in unreached)]
    if res.get("stale_equivalents"):
        out += ["", "stale entries in equivalent.toml:"]
        out += [f"  {x}" for x in res["stale_equivalents"]]
    out += ["", "score = killed by a named oracle / (mutants - equivalent - stillborn); "
            "'reached' also leaves the unreached out"]
    return "\n".join(out)


def run_all(sandbox: Sandbox, plan: list[tuple[Mutant, list[str]]], duration: float,
            seed: int, jobs: int, on_result: Callable[[Outcome], None]) -> None:
    """Run every (mutant, targets) of ``plan`` (:func:`run_targets`), ``jobs`` at a
    time."""
    from concurrent.futures import ThreadPoolExecutor

    from stress.mutate.sandbox import kill_active, stopping

    def one(item: tuple[Mutant, list[str]]) -> Outcome:
        m, targets = item
        if stopping():
            return not_run(m, "interrupted", targets[0], "")
        return run_targets(sandbox, m, targets, duration, seed)

    ex = ThreadPoolExecutor(max_workers=jobs)
    try:
        for o in ex.map(one, plan):
            on_result(o)
    except BaseException:  # an interrupt: kill the runs under way, let them clean up
        kill_active()
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown()
