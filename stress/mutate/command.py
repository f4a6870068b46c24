"""``tdp-stress mutate``: the click command (registered by stress/cli.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from stress.mutate.operators import OPERATORS, TARGET_FILES, generate

MAX_DURATION = 30.0
EXIT_SANDBOX = 3


def parse_seconds(text: str) -> float:
    """30s, 1m, 1m30s, 20 (seconds)."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


class Seconds(click.ParamType):
    name = "DURATION"

    def __init__(self, most: float | None = None) -> None:
        self.most = most

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, int | float):
            secs = float(value)
        else:
            try:
                secs = parse_seconds(str(value))
            except ValueError as e:
                self.fail(str(e), param, ctx)
        if secs <= 0:
            self.fail(f"must be more than 0, got {value!r}", param, ctx)
        if self.most is not None and secs > self.most:
            self.fail(f"at most {self.most:g}s, got {value!r}", param, ctx)
        return secs


def _file_name(f: str) -> str:
    name = Path(f).name
    return name if name.endswith(".py") else name + ".py"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.chmod(0o644)
    tmp.replace(path)


@click.command()
@click.option("--file", "files", multiple=True, metavar="FILE",
              help=f"Mutate this model file only (repeatable; {', '.join(TARGET_FILES)}).")
@click.option("--operator", "operators", multiple=True, type=click.Choice(list(OPERATORS)),
              help="Only this operator (repeatable).")
@click.option("--id", "ids", multiple=True, metavar="ID", help="Only this mutant (repeatable).")
@click.option("--max", "max_n", type=click.IntRange(1, 100000),
              help="Sample N mutants (seeded, stratified by file).")
@click.option("--sample-seed", type=int, default=1, show_default=True,
              help="Seed of the --max sample.")
@click.option("--reached-only", is_flag=True,
              help="Sample only among mutants a config reaches (the unreached are "
                   "still counted in the header).")
@click.option("--duration", type=Seconds(MAX_DURATION), default="20s", show_default=True,
              help="Run time of each mutant on one config (at most 30s in all: see "
                   "--configs).")
@click.option("--configs", "n_configs", type=click.IntRange(1, 8), default=1,
              show_default=True,
              help="A mutant that survives runs again on the next config that reached its "
                   "site, up to N configs (the same duration each; N x duration at most "
                   "30s).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=1, show_default=True,
              help="Master seed of every run.")
@click.option("--config", "forced_configs", multiple=True, metavar="NAME[@VARIANT]",
              help="Run every mutant on this shipped config, on the fixed protocol or a "
                   "valid (non-bug) variant (no reachability pass: nothing is "
                   "'unreached'); repeated: on each in turn while it survives.")
@click.option("--reach-duration", type=Seconds(600), default="10s", show_default=True,
              help="Run time of each config in the reachability pass (cached in OUT).")
@click.option("--refresh-reach", is_flag=True, help="Redo the reachability pass.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Mutants run at once (each is a whole stress run: mind the cores).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="tdp-stress-mutate",
              show_default=True, help="Writes OUT/results.json and OUT/reach.json.")
@click.option("--list", "list_only", is_flag=True, help="List the selected mutants, run nothing.")
@click.option("--json", "json_out", metavar="FILE|-",
              help="Also write the results as JSON to FILE; '-': on stdout (the report "
                   "then goes to stderr).")
@click.option("--plain", is_flag=True, help="Plain progress lines (the only kind here).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output on stderr.")
def mutate(files: tuple[str, ...], operators: tuple[str, ...], ids: tuple[str, ...],
           max_n: int | None, sample_seed: int, reached_only: bool, duration: float,
           n_configs: int, seed: int, forced_configs: tuple[str, ...], reach_duration: float,
           refresh_reach: bool, jobs: int,
           out_dir: str, list_only: bool, json_out: str | None, plain: bool,
           quiet: bool) -> int:
    """The tester's self-test: mutants of the protocol code, each run on the config that
    exercises it; the score is the share killed by a named oracle (see
    stress/mutate/__init__.py)."""
    from stress.mutate import reach as reach_mod
    from stress.mutate import runner
    from stress.mutate.sandbox import Sandbox, SandboxError, kill_active

    def say(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    if forced_configs:
        n_configs = len(forced_configs)
    if n_configs * duration > MAX_DURATION:
        raise click.UsageError(f"{n_configs} configs x --duration {duration:g}s is more than "
                               f"{MAX_DURATION:g}s for one mutant")
    file_names = tuple(_file_name(f) for f in files)
    unknown = [f for f in file_names if f not in TARGET_FILES]
    if unknown:
        raise click.UsageError(f"--file: {', '.join(unknown)} is not one of "
                               f"{', '.join(TARGET_FILES)}")
    configs = reach_mod.run_configs()
    for forced_config in forced_configs:
        config_name, variant_name = reach_mod.split_target(forced_config)
        if config_name not in configs:
            raise click.UsageError(f"--config: unknown config {config_name!r} (shipped: "
                                   f"{', '.join(configs)})")
        valid = {v for _, v in reach_mod.targets(configs).values()}
        if variant_name not in valid:
            raise click.UsageError(f"--config: {variant_name!r} is not a valid variant "
                                   f"(valid: {', '.join(sorted(valid))})")
    if json_out not in (None, "-") and not Path(json_out).parent.is_dir():
        raise click.UsageError(f"--json: directory {Path(json_out).parent} does not exist")
    everything = generate()
    equivalents = runner.load_equivalents()
    stale = runner.stale_equivalents(equivalents, everything)
    candidates = runner.select(everything, file_names, operators, ids)
    if ids and len(candidates) < len(set(ids)):
        missing = sorted(set(ids) - {m.id for m in candidates})
        raise click.UsageError(f"--id: no such mutant: {', '.join(missing)}")
    out = Path(out_dir)
    t0 = time.monotonic()
    started = datetime.now(UTC).isoformat(timespec="seconds")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    sandbox: Sandbox | None = None
    outcomes: list[runner.Outcome] = []
    res: dict[str, Any] = {}
    writer: list[Callable[[], None]] = []  # writes OUT/results.json, once there is a plan
    try:
        if list_only:
            chosen = runner.select(candidates, max_n=max_n, sample_seed=sample_seed)
            for m in chosen:
                tag = " (equivalent)" if m.id in equivalents else ""
                click.echo(f"{m.id}  {m.description}{tag}")
            click.echo(f"({len(chosen)} of {len(candidates)} candidates; "
                       f"{len(everything)} mutants in all)", err=True)
            return 0
        out.mkdir(parents=True, exist_ok=True)
        sandbox = Sandbox()
        reach: dict[str, Any] | None = None
        if not forced_configs:
            reach = reach_mod.load_or_profile(out / "reach.json", sandbox, everything,
                                              reach_duration, seed, jobs, say, refresh_reach)
            for name, c in reach["configs"].items():
                if c["exit_code"] != 0:
                    say(f"reach: config {name} does not run clean unmutated "
                        f"({c['exit_reason']}: {c.get('detail', '')}): not used")
        targets_of = {m.id: (list(forced_configs) if reach is None else
                             reach_mod.choose_configs(m, reach, n_configs))
                      for m in candidates}
        population_unreached = sum(not targets_of[m.id] for m in candidates)
        pool = [m for m in candidates if not reached_only or targets_of[m.id]]
        chosen = runner.select(pool, max_n=max_n, sample_seed=sample_seed)
        plan: list[tuple[Any, list[str]]] = []
        for m in chosen:
            tgts = targets_of[m.id]
            if m.id in equivalents:
                outcomes.append(runner.not_run(m, "equivalent", tgts[0] if tgts else None,
                                               equivalents[m.id].get("reason", "")))
            elif not tgts:
                outcomes.append(runner.not_run(m, "unreached", None,
                                               "no clean config ran this statement"))
            else:
                plan.append((m, tgts))
        say(f"mutate: {len(chosen)} of {len(candidates)} candidates, {len(plan)} to run "
            f"for {duration:g} s each" + (f" on up to {n_configs} configs" if n_configs > 1
                                          else "") + f", {jobs} at a time")
        for x in stale:
            say(f"mutate: stale equivalent.toml entry: {x}")

        def build() -> dict[str, Any]:
            done = sorted(outcomes, key=lambda o: [m.id for m in chosen].index(o.id))
            dicts = [o.to_dict() for o in done]
            # schema 2: every mutant's "variant" (1: none, every run on the fixed protocol)
            return {"schema": "tdp-stress-mutate", "schema_version": 2,
                    "command": "mutate", "started_at": started,
                    "wall_s": round(time.monotonic() - t0, 1), "duration_s": duration,
                    "configs_per_mutant": n_configs,
                    "seed": seed, "jobs": jobs, "sample_seed": sample_seed, "max": max_n,
                    "files": list(file_names or TARGET_FILES), "operators": list(operators),
                    "candidates": len(candidates),
                    "population_unreached": population_unreached if reach else None,
                    "selected": len(chosen), "forced_config": ",".join(forced_configs) or None,
                    "reach": None if reach is None else {
                        "duration_s": reach["duration_s"], "configs": {
                            n: {"exit_reason": c["exit_reason"], "sites": len(c["hits"])}
                            for n, c in reach["configs"].items()}},
                    "stale_equivalents": stale,
                    "summary": runner.summary(done), "mutants": dicts}

        k = [0]

        def on_result(o: runner.Outcome) -> None:
            outcomes.append(o)
            k[0] += 1
            what = o.outcome + (f" [{o.invariant}]" if o.invariant else "")
            t = f" at {o.time_to_kill_s:.1f}s" if o.time_to_kill_s is not None else ""
            where = o.config if o.variant in (None, "fixed") else f"{o.config}@{o.variant}"
            say(f"[{k[0]}/{len(plan)}] {what}{t} ({where}, {o.wall_s:.0f}s wall) "
                f"{o.description}")
            write_json_atomic(out / "results.json", build())

        writer.append(lambda: write_json_atomic(out / "results.json", build()))
        writer[0]()
        runner.run_all(sandbox, plan, duration, seed, jobs, on_result)
        res = build()
        write_json_atomic(out / "results.json", res)
    except SandboxError as e:
        click.echo(f"tdp-stress: error: {e}", err=True)
        return EXIT_SANDBOX
    except KeyboardInterrupt:
        kill_active()
        if writer:
            writer[0]()  # what was measured, with the interrupted runs left out
            click.echo(f"tdp-stress: interrupted: {len(outcomes)} outcome(s) in "
                       f"{out / 'results.json'}", err=True)
        else:
            click.echo("tdp-stress: interrupted", err=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if sandbox is not None:
            sandbox.close()
    if json_out == "-":
        click.echo(json.dumps(res, indent=2, default=str))
    elif json_out:
        write_json_atomic(Path(json_out), res)
    click.echo(runner.format_report(res), err=json_out == "-")
    click.echo(f"results: {out / 'results.json'}", err=json_out == "-")
    sys.stdout.flush()
    return 0
