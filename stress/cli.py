"""The ``tdp-stress`` command line: a thin layer over config, supervisor and report.

Exit codes: 0 clean, 1 invariant violation, 2 usage or config error, 3 a worker
crashed or the harness failed, 4 hang, 130 interrupted.  ``--expect-violation``
swaps 0 and 1.  Every error is one line on stderr: ``tdp-stress: error: ...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from stress import config as config_mod
from stress.arena import list_segments, sweep_stale
from stress.bundle import write_bundle
from stress.config import ROLES, ConfigError, parse_duration, parse_size
from stress.harness.supervisor import EXIT_USAGE, Supervisor
from stress.model.variants import VARIANTS
from stress.report import (
    StatusLine,
    build_results,
    format_soak_summary,
    format_summary,
    junit_case,
    now_iso,
    write_json_atomic,
    write_junit,
)


class DurationType(click.ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            return parse_duration(value, f"--{param.name}" if param else "duration")
        except ConfigError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_size(value, "size")
        except ConfigError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)


class RoleCountType(click.ParamType):
    name = "ROLE=N"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, int]:
        role, sep, n = str(value).partition("=")
        if not sep or not n.strip().isdigit():
            self.fail(f"expected ROLE=N, got {value!r}", param, ctx)
        if role not in ROLES:
            self.fail(f"unknown role {role!r} (known: {', '.join(ROLES)})", param, ctx)
        return role, int(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tdp-stress")
def cli() -> None:
    """Stress KVM's TDP MMU locking protocol with real processes on shared memory."""


@cli.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--vcpus", type=click.IntRange(0, 256), help="Number of vcpu workers.")
@click.option("--workers", "worker_counts", type=RoleCountType(), multiple=True,
              help="Workers of a role, e.g. --workers zapper=2 (repeatable).")
@click.option("--duration", type=DurationType(), help="Run time: 30s, 5m, 2h.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Master seed.")
@click.option("--variant", help="Protocol variant (see `tdp-stress variants`).")
@click.option("--variant-file", type=click.Path(dir_okay=False),
              help="A Python file defining user VARIANTS (see examples/).")
@click.option("--guest-size", type=SizeType(), help="Guest memory: 64m, 1g, 1t.")
@click.option("--vm-type", type=click.Choice(["tdx", "default"]),
              help="tdx: direct and mirror roots with the TDX module; default: direct only.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output directory for results.json.")
@click.option("--check-interval", type=DurationType(),
              help="Quiescent check every DURATION (0: only at the end).")
@click.option("--expect-violation", is_flag=True, default=None,
              help="Exit 0 if a violation is found and 1 if not (CI jobs proving a bug is "
                   "caught).")
@click.option("--watchdog", type=DurationType(),
              help="A worker without progress for DURATION is hung (exit 4).")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False),
              help="Also write a JUnit XML report to this file.")
@click.option("--quiet", "-q", is_flag=True, help="No live status line.")
def run(config_file: str | None, vcpus: int | None, worker_counts: tuple[tuple[str, int], ...],
        duration: float | None, seed: int | None, variant: str | None,
        variant_file: str | None, guest_size: int | None, vm_type: str | None, out_dir: str | None,
        check_interval: float | None, expect_violation: bool | None, watchdog: float | None,
        junit_path: str | None, quiet: bool) -> int:
    """Run the stress job of CONFIG_FILE (default: configs/default.toml)."""
    cfg, out = _load_run_config(config_file, vcpus, worker_counts, duration, seed, variant,
                                guest_size, vm_type, out_dir, check_interval,
                                expect_violation, watchdog, variant_file)
    results_path = out / "results.json"

    status = StatusLine()
    tty = sys.stderr.isatty()
    last_plain = [-1e9]

    def on_status(snap: Any) -> None:
        line = status.render(snap)
        if tty:
            click.echo("\r\x1b[2K" + line, err=True, nl=False)
        elif snap.elapsed_s - last_plain[0] >= 5.0:
            last_plain[0] = snap.elapsed_s
            click.echo(line, err=True)

    started = now_iso()
    outcome = Supervisor(cfg, on_status=None if quiet else on_status).run()
    if tty and not quiet:
        click.echo("\r\x1b[2K", err=True, nl=False)
    res = build_results(cfg, outcome, started)
    for v in res["violations"]:
        v["bundle"] = str(write_bundle(out / "bundles", cfg, v, outcome.trace)[0])
    write_json_atomic(results_path, res)
    if junit_path:
        write_junit(Path(junit_path), "tdp-stress", [junit_case(
            f"run {cfg.run.variant} seed {cfg.run.seed}", res["duration_s"],
            outcome.exit_reason, cfg.run.expect_violation, res["violations"],
            res["errors"])])
    click.echo(format_summary(res, results_path))
    if outcome.exit_reason == "interrupted":
        click.echo("tdp-stress: interrupted", err=True)
    return int(res["exit_code"])


def _load_run_config(config_file: str | None, vcpus: int | None,
                     worker_counts: tuple[tuple[str, int], ...], duration: float | None,
                     seed: int | None, variant: str | None, guest_size: int | None,
                     vm_type: str | None, out_dir: str | None, check_interval: float | None,
                     expect_violation: bool | None, watchdog: float | None,
                     variant_file: str | None = None) -> tuple[Any, Path]:
    """The config file with the command line's overrides, and the output directory."""
    overrides: dict[str, dict[str, Any]] = {"run": {}, "guest": {}, "workers": {}, "vm": {}}
    if vm_type is not None:
        overrides["vm"]["type"] = vm_type
    for key, val in (("duration", duration), ("seed", seed), ("variant", variant),
                     ("out", out_dir), ("check_interval", check_interval),
                     ("expect_violation", expect_violation), ("watchdog", watchdog),
                     ("variant_file", variant_file)):
        if val is not None:
            overrides["run"][key] = val
    if guest_size is not None:
        overrides["guest"]["size"] = guest_size
    if vcpus is not None:
        overrides["workers"]["vcpu"] = vcpus
    for role, n in worker_counts:
        overrides["workers"][role] = n
    cfg = config_mod.load(config_file, {k: v for k, v in overrides.items() if v})
    out = Path(cfg.run.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.out: cannot create output directory {out}: "
                          f"{e.strerror}") from None
    return cfg, out


@cli.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--duration", type=DurationType(), default="8h", show_default=True,
              help="Total soak time: 30m, 8h.")
@click.option("--epoch", type=DurationType(), default="10m", show_default=True,
              help="Length of one epoch (a run on a fresh seed).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Master seed.")
@click.option("--variant", help="Protocol variant (see `tdp-stress variants`).")
@click.option("--vcpus", type=click.IntRange(0, 256), help="Number of vcpu workers.")
@click.option("--workers", "worker_counts", type=RoleCountType(), multiple=True,
              help="Workers of a role, e.g. --workers zapper=2 (repeatable).")
@click.option("--vm-type", type=click.Choice(["tdx", "default"]))
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output directory: checkpoint.json, results.json, bundles/.")
@click.option("--keep-going", is_flag=True,
              help="Collect distinct violations as bundles and continue.")
@click.option("--expect-violation", is_flag=True, default=None,
              help="Exit 0 if a violation is found and 1 if not.")
@click.option("--watchdog", type=DurationType(), help="No-progress timeout (exit 4).")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False),
              help="Also write a JUnit XML report (one test case per epoch).")
@click.option("--plain", is_flag=True, help="Plain progress lines even on a terminal.")
def soak(config_file: str | None, duration: float, epoch: float, seed: int | None,
         variant: str | None, vcpus: int | None, worker_counts: tuple[tuple[str, int], ...],
         vm_type: str | None, out_dir: str | None, keep_going: bool,
         expect_violation: bool | None, watchdog: float | None, junit_path: str | None,
         plain: bool) -> int:
    """Soak: epochs of fresh seeds for DURATION, a checkpoint after each epoch."""
    from stress.progress import SoakProgress
    from stress.soak import Soak

    cfg, out = _load_run_config(config_file, vcpus, worker_counts, None, seed, variant, None,
                                vm_type, out_dir, None, expect_violation, watchdog)
    progress = SoakProgress(live=sys.stderr.isatty() and not plain)
    with progress:
        res = Soak(cfg, duration, epoch, keep_going, out, on_status=progress.update,
                   on_epoch=progress.epoch_done).run()
    if junit_path:
        write_junit(Path(junit_path), "tdp-stress-soak", [junit_case(
            f"epoch {e['epoch']} seed {e['seed']}", e["duration_s"], e["exit_reason"],
            cfg.run.expect_violation, e["violations"], e["errors"]) for e in res["epochs"]])
    click.echo(format_soak_summary(res, out / "results.json"))
    return int(res["exit_code"])


@cli.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--policy", "policy_mode", is_flag=True,
              help="Compare the SEAMCALL BUSY policies (unwind, retry, serialize).")
@click.option("--unsync", "unsync_mode", is_flag=True,
              help="Compare mmu_unsync_pages_lock with Alternative #1 (never unsync); "
                   "default config configs/unsync.toml.")
@click.option("--compare", "compare_variants", metavar="A,B,...",
              help="Compare protocol variants side by side on the config (with "
                   "--variant-file for user variants), e.g. fixed,sept-vm-lock.")
@click.option("--variant-file", type=click.Path(dir_okay=False),
              help="A Python file of user variants (for --compare).")
@click.option("--duration", type=DurationType(), default="5s", show_default=True,
              help="Length of each measured run.")
@click.option("--runs", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Measured runs per policy (after one warm-up run).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Also write the figures to this JSON file.")
def bench(config_file: str | None, policy_mode: bool, unsync_mode: bool,
          compare_variants: str | None, variant_file: str | None, duration: float,
          runs: int, json_out: str | None) -> int:
    """Print benchmark figures: fault throughput, the FFI floor and scaling against
    the machine's own, and per-role throughput of the config's job (default);
    SEAMCALL BUSY policies (--policy); the unsync lock against write-protection
    (--unsync); protocol variants side by side (--compare)."""
    from stress.bench import (
        format_table,
        policy_comparison,
        unsync_comparison,
        variant_comparison,
    )

    if sum(map(bool, (policy_mode, unsync_mode, compare_variants))) > 1:
        raise click.UsageError("choose one of --policy, --unsync or --compare")
    if variant_file and not compare_variants:
        raise click.UsageError("--variant-file goes with --compare")
    progress = lambda m: click.echo(m, err=True)  # noqa: E731
    if compare_variants:
        names = [v.strip() for v in compare_variants.split(",") if v.strip()]
        if len(names) < 1:
            raise click.UsageError("--compare needs variant names")
        base = config_mod.load(config_file, {"run": {"variant_file": variant_file or ""}})
        from stress.model.variants import UnknownVariant, get_variant

        try:
            for n in names:
                get_variant(n)
        except UnknownVariant as e:
            raise ConfigError(str(e.args[0])) from None
        res = variant_comparison(base, names, duration, runs,
                                 base.run.variant_file, progress)
        click.echo(format_table(res, "Protocol variants side by side"))
    elif not policy_mode and not unsync_mode:
        from stress.bench import format_throughput, throughput

        res = throughput(config_mod.load(config_file), duration, runs, progress)
        click.echo(format_throughput(res))
    elif policy_mode:
        res = policy_comparison(config_mod.load(config_file), duration, runs, progress)
        click.echo(format_table(res, "SEAMCALL BUSY policies: fixed protocol on a TD"))
    else:
        path = config_file or str(config_mod.DEFAULT_CONFIG.parent / "unsync.toml")
        res = unsync_comparison(config_mod.load(path), duration, runs, progress)
        click.echo(format_table(res, "Marking shadow pages unsync from TDP MMU faults: "
                                     "mmu_unsync_pages_lock vs can_unsync=false"))
    if json_out:
        write_json_atomic(Path(json_out), res)
    return 0


@cli.command()
@click.argument("matrix_file", type=click.Path(dir_okay=False))
@click.option("--shard", default="1/1", show_default=True,
              help="Run slice i of N of the matrix (1-based), e.g. --shard 3/8.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="campaign-out",
              show_default=True, help="Output directory for shard-i-of-N.json and cells/.")
def campaign(matrix_file: str, shard: str, out_dir: str) -> int:
    """Run one shard of a campaign matrix (config x variant x seed).

    Exit 0 when every cell of the shard met its expectation (bug variants
    caught, fixed protocol clean), 1 otherwise.
    """
    from stress.campaign import CampaignError, load_matrix, parse_shard, run_campaign

    try:
        matrix = load_matrix(matrix_file)
        spec = parse_shard(shard)
    except CampaignError as e:
        raise ConfigError(str(e)) from None
    res = run_campaign(matrix, spec, Path(out_dir), progress=lambda m: click.echo(m, err=True))
    fails = [c for c in res["cells"] if c["verdict"] != "pass"]
    click.echo(f"campaign {res['campaign']} shard {spec[0]}/{spec[1]}: {len(res['cells'])} "
               f"cells, {len(fails)} failed; {out_dir}")
    if any(c["exit_reason"] == "interrupted" for c in res["cells"]):
        return 130
    return 1 if fails else 0


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="Write the merged report (JSON) here.")
def merge(paths: tuple[str, ...], out_file: str | None) -> int:
    """Merge campaign shard results (files or directories) into one report.

    Exit 0 when every shard is there and every cell met its expectation.
    """
    from stress.campaign import CampaignError, format_merge
    from stress.campaign import merge as merge_shards

    try:
        report = merge_shards([Path(p) for p in paths])
    except CampaignError as e:
        raise ConfigError(str(e)) from None
    if out_file:
        write_json_atomic(Path(out_file), report)
    click.echo(format_merge(report))
    return 0 if report["verdict"] == "pass" else 1


@cli.command()
@click.option("--seeds", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Seeds (runs) per bug variant.")
@click.option("--cap", type=DurationType(), default="30s", show_default=True,
              help="Longest run per seed.")
@click.option("--fixed", "fixed_for", type=DurationType(), default="1m", show_default=True,
              help="How long the fixed protocol must run clean (0: skip).")
@click.option("--variant", "names", multiple=True,
              help="Only these variants (repeatable); default every bug variant.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Also write the table as JSON.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False),
              help="Also write JUnit XML: one test case per variant (caught = pass).")
@click.option("--compare-perturbation", is_flag=True,
              help="Also run every variant with delay injection and race windows off, and "
                   "print both times side by side.")
@click.option("--hunt", "hunt_tries", type=click.IntRange(0, 100000), default=0,
              help="Also hunt every variant under controlled schedules (up to N tries) and "
                   "replay the failing schedule SEEDS times (deterministic reproducers).")
@click.option("--hunt-max-steps", type=click.IntRange(100, 10**9), default=200_000,
              show_default=True, help="Shared accesses per controlled run of --hunt.")
def zoo(seeds: int, cap: float, fixed_for: float, names: tuple[str, ...],
        json_out: str | None, junit_path: str | None, compare_perturbation: bool,
        hunt_tries: int, hunt_max_steps: int) -> int:
    """Time-to-detect of every bug variant over N seeds, and the fixed protocol clean.

    Exit 0 when every variant was detected at least once and the fixed
    protocol ran clean, 1 otherwise.
    """
    from stress.zoo import format_zoo, run_zoo

    chosen = list(names) or [v.name for v in VARIANTS.values() if v.buggy]
    unknown = [n for n in chosen if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variant: unknown variant {unknown[0]!r}")
    from stress.zoo import ZooInterrupted

    try:
        res = run_zoo(chosen, seeds, cap, fixed_for,
                      progress=lambda m: click.echo(m, err=True),
                      compare_perturbation=compare_perturbation, hunt_tries=hunt_tries,
                      hunt_max_steps=hunt_max_steps)
    except ZooInterrupted:
        click.echo("tdp-stress: interrupted", err=True)
        return 130
    click.echo(format_zoo(res))
    if json_out:
        write_json_atomic(Path(json_out), res)
    if junit_path:
        cases = [{"name": r["name"], "time_s": float(r["median_ttd_s"] or 0.0),
                  "outcome": "pass" if r["detected"] else "failure",
                  "message": "" if r["detected"] else f"not caught in {r['runs']} runs",
                  "details": json.dumps(r, default=str)} for r in res["variants"]]
        f = res["fixed"]
        if f["seconds"]:
            cases.append({"name": "fixed protocol", "time_s": f["seconds"],
                          "outcome": "pass" if f["exit_reason"] == "clean" else "failure",
                          "message": f["exit_reason"] or "", "details": json.dumps(f)})
        write_junit(Path(junit_path), "tdp-stress-zoo", cases)
    ok = all(r["detected"] for r in res["variants"]) and not res["fixed"]["violations"] and (
        res["fixed"]["exit_reason"] in (None, "clean"))
    return 0 if ok else 1


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--runs", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Re-run the bundle at most this many times.")
@click.option("--stop-after", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Stop after this many hits.")
def repro(bundle: str, runs: int, stop_after: int) -> int:
    """Re-run a reproducer bundle: reliability (hits/runs) and time to each hit.

    Exit 0 when the violation came back at least once, 1 when it did not.
    """
    from stress.repro import BundleError, reproduce

    try:
        res = reproduce(Path(bundle), runs, stop_after,
                        progress=lambda m: click.echo(m, err=True))
    except BundleError as e:
        raise ConfigError(str(e)) from None
    times = ", ".join(f"{t:.3f}s" for t in res["times_to_hit_s"]) or "-"
    click.echo(f"repro {bundle}: {res['invariant']} ({res['variant']}, seed {res['seed']}): "
               f"{res['hits']}/{res['runs']} runs hit, reliability {res['reliability']:.0%}; "
               f"time to hit: {times}")
    if any(a["exit_reason"] == "interrupted" for a in res["attempts"]):
        return 130
    return 0 if res["hits"] else 1


def _hunt_config(target: str | None, variant: str | None, vcpus: int | None,
                 worker_counts: tuple[tuple[str, int], ...], guest_size: int | None) -> Any:
    """The config to hunt with: a bundle's, a config file's, or the variant's own."""
    from stress.repro import BundleError, load_bundle

    overrides: dict[str, dict[str, Any]] = {"run": {}, "workers": {}, "guest": {}}
    if target and Path(target).is_dir():
        try:
            cfg, _v = load_bundle(Path(target))
        except BundleError as e:
            raise ConfigError(str(e)) from None
    else:
        if target is None and variant:
            if variant not in VARIANTS:
                config_mod.load(None, {"run": {"variant": variant}})  # the one-line error
            target = str(config_mod.DEFAULT_CONFIG.parent / VARIANTS[variant].config)
        cfg = config_mod.load(target)
    if variant:
        overrides["run"]["variant"] = variant
    if vcpus is not None:
        overrides["workers"]["vcpu"] = vcpus
    for role, n in worker_counts:
        overrides["workers"][role] = n
    if guest_size is not None:
        overrides["guest"]["size"] = guest_size
    return config_mod.load_from(cfg, {k: v for k, v in overrides.items() if v})


@cli.command()
@click.argument("target", required=False, type=click.Path())
@click.option("--variant", help="Protocol variant to hunt (default: the config's).")
@click.option("--tries", type=click.IntRange(1, 100000), default=50, show_default=True,
              help="Schedules to try before giving up.")
@click.option("--mode", type=click.Choice(["mixed", "random", "pct"]), default="mixed",
              show_default=True, help="Schedule policies to try.")
@click.option("--max-steps", type=click.IntRange(100, 10**9),
              help="Shared accesses per controlled run (default: schedule.max_steps).")
@click.option("--seed", "first_seed", type=click.IntRange(0, 2**62), default=1,
              show_default=True, help="Schedule seed of the first try.")
@click.option("--vcpus", type=click.IntRange(0, 256), help="Number of vcpu workers.")
@click.option("--workers", "worker_counts", type=RoleCountType(), multiple=True,
              help="Workers of a role, e.g. --workers zapper=1 (repeatable).")
@click.option("--guest-size", type=SizeType(), help="Guest memory: 16m, 1g.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="tdp-stress-hunt",
              show_default=True, help="Where the bundle goes (OUT/bundles/...).")
def hunt(target: str | None, variant: str | None, tries: int, mode: str,
         max_steps: int | None, first_seed: int, vcpus: int | None,
         worker_counts: tuple[tuple[str, int], ...], guest_size: int | None,
         out_dir: str) -> int:
    """Search controlled schedules for a violation; write a bundle that replays it.

    TARGET is a config file or a bundle (e.g. one a free run or soak wrote: the
    same config is hunted under controlled schedules); default: the variant's
    own config.  Exit 0 when a failing schedule was found, 1 when not.
    """
    from stress.harness.trace import focus, timeline
    from stress.hunt import hunt as do_hunt

    cfg = _hunt_config(target, variant, vcpus, worker_counts, guest_size)
    modes = ("random", "pct") if mode == "mixed" else (mode,)
    res = do_hunt(cfg, tries, first_seed, max_steps, modes,
                  progress=lambda m: click.echo(m, err=True))
    if not res.found or res.outcome is None or res.config is None:
        click.echo(f"hunt: no violation of {cfg.run.variant} in {res.tries} schedules "
                   f"({res.elapsed_s:.1f} s)")
        return 130 if res.outcome and res.outcome.exit_reason == "interrupted" else 1
    v = res.outcome.violations[0]
    sched = dict(res.strategy or {}, tries=res.tries, replayed_identically=res.replayed_identically)
    # a new hunt replaces the old bundle of the same signature
    path, _new = write_bundle(Path(out_dir) / "bundles", res.config, v, res.outcome.trace,
                              suffix="-sched", schedule=sched, replace=True)
    click.echo(timeline(focus(res.outcome.trace, v), last=30))
    click.echo(f"hunt: {v['invariant']} ({cfg.run.variant}) after {res.tries} schedule(s), "
               f"{res.elapsed_s:.1f} s: {sched['mode']} seed {sched['seed']}, "
               f"{sched['steps']} steps, {sched['switches']} switches; replayed "
               f"{'identically' if res.replayed_identically else 'DIFFERENTLY'}\n"
               f"bundle: {path}  (tdp-stress replay {path})")
    return 0 if res.replayed_identically else 1


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--runs", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Replay this many times.")
def replay(bundle: str, runs: int) -> int:
    """Replay a controlled-schedule bundle (from hunt or shrink) RUNS times.

    Exit 0 when every run reports the bundle's invariant with the same trace
    events, 1 otherwise.
    """
    from stress.hunt import replay as do_replay
    from stress.repro import BundleError

    try:
        res = do_replay(Path(bundle), runs, progress=lambda m: click.echo(m, err=True))
    except BundleError as e:
        raise ConfigError(str(e)) from None
    click.echo(f"replay {bundle}: {res['invariant']} ({res['variant']}): {res['hits']}/"
               f"{res['runs']} runs hit, {res['identical']}/{res['runs']} with identical events")
    if any(a["exit_reason"] == "interrupted" for a in res["attempts"]):
        return 130
    return 0 if res["identical"] == res["runs"] else 1


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--max-runs", type=click.IntRange(1, 100000), default=400, show_default=True,
              help="Give up shrinking after this many runs.")
@click.option("--max-time", type=DurationType(), default="5m", show_default=True,
              help="... or after this long.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where the shrunk bundle goes (default: next to BUNDLE).")
def shrink(bundle: str, max_runs: int, max_time: float, out_dir: str | None) -> int:
    """Shrink a controlled-schedule bundle while it still fails.

    Fewer workers, fewer ops, fewer preemptions, a smaller guest; writes the
    smallest failing bundle (BUNDLE-shrunk) and prints its interleaving.  Exit 0
    when a failing bundle was written.
    """
    from stress.harness.trace import focus, timeline
    from stress.repro import BundleError, load_bundle
    from stress.shrink import Shrinker, ShrinkInterrupted

    src = Path(bundle)
    try:
        cfg, violation = load_bundle(src)
    except BundleError as e:
        raise ConfigError(str(e)) from None
    if cfg.schedule.mode != "replay":
        raise ConfigError(f"{src}: not a controlled-schedule bundle (schedule.mode is "
                          f"{cfg.schedule.mode!r}); make one with `tdp-stress hunt {src}`")
    try:
        res = Shrinker(cfg, violation, max_runs, max_time,
                       progress=lambda m: click.echo(m, err=True)).run()
    except ValueError as e:
        raise ConfigError(f"{src}: {e}") from None
    except ShrinkInterrupted:
        click.echo("tdp-stress: interrupted", err=True)
        return 130
    v = res.outcome.violations[0]
    root = Path(out_dir) if out_dir else src.parent
    sched = {"shrunk_from": str(src), "runs": res.runs, "elapsed_s": round(res.elapsed_s, 1),
             "before": res.start, "after": res.end, "kept": res.log}
    path, _new = write_bundle(root, res.config, v, res.outcome.trace, suffix="-shrunk",
                              schedule=sched, replace=True)
    click.echo(timeline(focus(res.outcome.trace, v), last=60))
    b, a = res.start, res.end
    click.echo(f"shrink: {v['invariant']}: {res.runs} runs, {res.elapsed_s:.1f} s; "
               f"workers {b['workers']} -> {a['workers']}, ops {b['ops']} -> {a['ops']}, "
               f"preemptions {b['preemptions']} -> {a['preemptions']}, steps {b['steps']} -> "
               f"{a['steps']}, guest {b['guest_size'] >> 20}m -> {a['guest_size'] >> 20}m\n"
               f"bundle: {path}  (tdp-stress replay {path})")
    return 0


@cli.command()
@click.option("--variant-file", type=click.Path(dir_okay=False),
              help="Also list the user variants of this file.")
def variants(variant_file: str | None) -> int:
    """List protocol variants with their stories."""
    from stress.model.variants import VariantLoadError, load_entry_point_variants
    from stress.model.variants import load_variant_file as _load

    try:
        load_entry_point_variants()
        if variant_file:
            _load(variant_file)
    except VariantLoadError as e:
        raise ConfigError(str(e)) from None
    width = max(len(n) for n in VARIANTS)
    for v in VARIANTS.values():
        tag = "bug  " if v.buggy else "ok   "
        click.echo(f"{v.name:<{width}}  {tag}  {v.story}")
        click.echo(f"{'':<{width}}         source: {v.source}")
    return 0


@cli.command()
def cleanup() -> int:
    """Remove tdpstress- shared memory segments whose owner process is dead."""
    removed = sweep_stale()
    for name, why in removed:
        click.echo(f"removed /dev/shm/{name} ({why})")
    left = list_segments()
    click.echo(f"{len(removed)} segment(s) removed, {len(left)} in use by live runs")
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="tdp-stress", standalone_mode=False)
    except ConfigError as e:
        click.echo(f"tdp-stress: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except click.UsageError as e:
        click.echo(f"tdp-stress: error: {e.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as e:
        click.echo(f"tdp-stress: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("tdp-stress: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
