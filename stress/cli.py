"""The ``tdp-stress`` command line: a thin layer over config, supervisor and report.

Exit codes: 0 clean, 1 invariant violation, 2 usage or config error, 3 a worker
crashed or the harness failed, 4 hang, 130 interrupted.  ``--expect-violation``
swaps 0 and 1.  Every error is one line on stderr: ``tdp-stress: error: ...``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from stress import config as config_mod
from stress.arena import list_segments, sweep_stale
from stress.config import ROLES, ConfigError, parse_duration, parse_size
from stress.harness.supervisor import EXIT_USAGE
from stress.kernel.errors import KernelEngineError
from stress.model.variants import VARIANTS
from stress.mutate.command import mutate as mutate_command
from stress.report.report import (
    StatusLine,
    format_soak_summary,
    format_summary,
    junit_case,
    write_json_atomic,
    write_junit,
)
from stress.repro.bundle import write_bundle


class DurationType(click.ParamType):
    """30s, 5m, 2h, compound 1h30m; ``positive``: 0 is refused."""

    name = "DURATION"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            secs = parse_duration(value, f"--{param.name}" if param else "duration")
        except ConfigError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)
        if self.positive and secs <= 0:
            self.fail(f"must be more than 0, got {value!r}", param, ctx)
        return secs


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_size(value, "size")
        except ConfigError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class VcpusType(click.ParamType):
    """A number of vCPU workers, 1 to 256, or ``auto``: one per CPU."""

    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            n = value
        elif str(value).strip().lower() == "auto":
            return min(256, cpu_count())
        else:
            try:
                n = int(str(value).strip())
            except ValueError:
                self.fail(f"expected a number of vCPUs or 'auto', got {value!r}", param, ctx)
        if not 1 <= n <= 256:
            self.fail(f"must be between 1 and 256 (or auto), got {value!r}", param, ctx)
        return n


class OutFileType(click.ParamType):
    """A file to write: its directory must exist (no path is created silently);
    ``allow_stdout``: ``-`` is standard output."""

    name = "FILE"

    def __init__(self, allow_stdout: bool = False) -> None:
        self.allow_stdout = allow_stdout

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        text = str(value)
        if text == "-" and self.allow_stdout:
            return text
        p = Path(text).expanduser()
        if p.is_dir():
            self.fail(f"{p} is a directory", param, ctx)
        parent = p.parent
        if not parent.is_dir():
            self.fail(f"directory {parent} does not exist", param, ctx)
        if not os.access(parent, os.W_OK):
            self.fail(f"directory {parent} is not writable", param, ctx)
        return str(p)


def quiet_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``-q/--quiet`` and ``--plain``, the same on every long-running command."""
    f = click.option("--plain", is_flag=True,
                     help="Plain progress lines, no live display, even on a terminal.")(f)
    return click.option("--quiet", "-q", is_flag=True,
                        help="No progress output on stderr (results still printed).")(f)


def json_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--json", "json_out", type=OutFileType(allow_stdout=True),
                        metavar="FILE|-",
                        help=f"Also write {what} as JSON to FILE; '-': JSON on stdout "
                             "(the human summary then goes to stderr).")


def variant_file_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--variant-file", type=click.Path(dir_okay=False),
                        help="A Python file defining user VARIANTS (see examples/).")(f)


def _progress(quiet: bool) -> Callable[[str], None] | None:
    return None if quiet else (lambda m: click.echo(m, err=True))


def _say(text: str, json_out: str | None) -> None:
    """The human summary: stdout, or stderr when stdout carries the JSON."""
    click.echo(text, err=json_out == "-")


def _emit_json(json_out: str | None, data: Any) -> None:
    if json_out == "-":
        click.echo(json.dumps(data, indent=2, default=str))
    elif json_out:
        write_json_atomic(Path(json_out), data)


def _load_variant_file(variant_file: str | None) -> None:
    """Register a user variant file's VARIANTS (for commands that name them)."""
    if not variant_file:
        return
    from stress.model.variants import VariantLoadError, load_variant_file

    try:
        load_variant_file(variant_file)
    except VariantLoadError as e:
        raise ConfigError(f"--variant-file: {e}") from None


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
@click.argument("config_file", required=False)
@click.option("--vcpus", type=VcpusType(), help="Number of vcpu workers (auto: one per CPU).")
@click.option("--workers", "worker_counts", type=RoleCountType(), multiple=True,
              help="Workers of a role, e.g. --workers zapper=2 (repeatable).")
@click.option("--duration", type=DurationType(positive=True),
              help="Run time: 30s, 5m, 2h, 1h30m.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Master seed.")
@click.option("--variant", help="Protocol variant (see `tdp-stress variants`).")
@variant_file_option
@click.option("--guest-size", type=SizeType(), help="Guest memory: 64m, 1g, 1t.")
@click.option("--vm-type", type=click.Choice(["tdx", "default"]),
              help="tdx: direct and mirror roots with the TDX module; default: direct only.")
@click.option("--engine", type=click.Choice(["python", "kernel"]),
              help="python: the model; kernel: a kernel tree's own tdp_mmu.c (default "
                   "config: kernel).")
@click.option("--ksrc", type=click.Path(exists=True),
              help="The kernel engine's tree: a source directory or a linux-source .tar.xz "
                   "(default: Debian's linux-source).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output root: each run writes OUT/<timestamp>/ (results.json, bundles/) "
                   "and points OUT/latest at it.")
@click.option("--check-interval", type=DurationType(),
              help="Quiescent check every DURATION (0: only at the end).")
@click.option("--expect-violation", is_flag=True, default=None,
              help="Exit 0 if a violation is found and 1 if not (CI jobs proving a bug is "
                   "caught).")
@click.option("--watchdog", type=DurationType(positive=True),
              help="A worker without progress for DURATION is hung (exit 4).")
@click.option("--junit", "junit_path", type=OutFileType(),
              help="Also write a JUnit XML report to this file (its directory must exist).")
@json_option("results.json")
@click.option("--keep-going", is_flag=True,
              help="Also write bundles for the violations that follow the first one "
                   "(its consequences).")
@click.option("--width", type=click.IntRange(60, 1000),
              help="Width of the bundle's timeline.txt (default 160; events wrap).")
@quiet_options
def run(config_file: str | None, vcpus: int | None, worker_counts: tuple[tuple[str, int], ...],
        duration: float | None, seed: int | None, variant: str | None,
        variant_file: str | None, guest_size: int | None, vm_type: str | None,
        engine: str | None, ksrc: str | None, out_dir: str | None,
        check_interval: float | None, expect_violation: bool | None, watchdog: float | None,
        junit_path: str | None, json_out: str | None, keep_going: bool, width: int | None,
        quiet: bool, plain: bool) -> int:
    """Run the stress job of CONFIG_FILE: a file, or a shipped config's name
    (`tdp-stress configs`; default: default, or kernel with --engine kernel)."""
    from stress.jobs.run import run_job

    if engine == "kernel" and config_file is None:
        config_file = "kernel"
    cfg = _load_run_config(config_file, vcpus, worker_counts, duration, seed, variant,
                           guest_size, vm_type, out_dir, check_interval,
                           expect_violation, watchdog, variant_file, engine, ksrc)
    out = _new_run_dir(cfg)
    results_path = out / "results.json"

    with RunStatus(quiet, plain) as status:
        outcome, res = run_job(cfg, out, status.update if status.enabled else None,
                               keep_going=keep_going, width=width or 0)
    res["config_file"] = _config_label(config_file)
    res["run_dir"] = str(out)
    write_json_atomic(results_path, res)
    if junit_path:
        write_junit(Path(junit_path), "tdp-stress", [junit_case(
            f"run {cfg.run.variant} seed {cfg.run.seed}", res["duration_s"],
            outcome.exit_reason, cfg.run.expect_violation, res["violations"],
            res["errors"])])
    _emit_json(json_out, res)
    _say(format_summary(res, results_path, _term_width()), json_out)
    if outcome.exit_reason == "interrupted":
        click.echo("tdp-stress: interrupted", err=True)
    return int(res["exit_code"])


def _term_width() -> int:
    import shutil

    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 160))


def _config_label(config_file: str | None) -> str:
    """The config a run used, as the summary names it."""
    if config_file is None:
        return str(config_mod.DEFAULT_CONFIG)
    try:
        return str(config_mod.find_config(config_file))
    except ConfigError:
        return config_file


class RunStatus:
    """The live one-line status of ``run``: on a terminal a rich live line that
    fits its width (the least important fields go first, nothing wraps or is
    left behind); elsewhere, or with ``--plain``, a plain line every 5 s."""

    def __init__(self, quiet: bool, plain: bool) -> None:
        from rich.console import Console

        self.enabled = not quiet
        self.console = Console(file=sys.stderr)
        self.live_mode = self.enabled and not plain and sys.stderr.isatty()
        self.live: Any = None
        self.line = StatusLine()
        self.last_plain = -1e9

    def __enter__(self) -> RunStatus:
        if self.live_mode:
            from rich.live import Live
            from rich.text import Text

            self.live = Live(Text(""), console=self.console, refresh_per_second=4,
                             transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, snap: Any) -> None:
        if self.live is not None:
            from rich.text import Text

            text = self.line.render(snap, self.console.width - 1)
            self.live.update(Text(text, no_wrap=True, overflow="ellipsis"))
        else:
            text = self.line.render(snap)
            if snap.elapsed_s - self.last_plain >= 5.0:
                self.last_plain = snap.elapsed_s
                click.echo(text, err=True)


def _load_run_config(config_file: str | None, vcpus: int | None,
                     worker_counts: tuple[tuple[str, int], ...], duration: float | None,
                     seed: int | None, variant: str | None, guest_size: int | None,
                     vm_type: str | None, out_dir: str | None, check_interval: float | None,
                     expect_violation: bool | None, watchdog: float | None,
                     variant_file: str | None = None, engine: str | None = None,
                     ksrc: str | None = None) -> Any:
    """The config file with the command line's overrides (nothing created yet)."""
    overrides: dict[str, dict[str, Any]] = {"run": {}, "guest": {}, "workers": {}, "vm": {},
                                            "kernel": {}}
    if engine is not None:
        overrides["run"]["engine"] = engine
    if ksrc is not None:
        overrides["kernel"]["ksrc"] = str(Path(ksrc).resolve())
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
        overrides["kernel"]["vcpu"] = min(vcpus, 30)
    for role, n in worker_counts:
        overrides["workers"][role] = n
    return config_mod.load(config_file, {k: v for k, v in overrides.items() if v})


def _new_run_dir(cfg: Any) -> Path:
    """This run's own directory under run.out (see explain.new_run_dir)."""
    from stress.report.explain import new_run_dir

    root = Path(cfg.run.out)
    try:
        return new_run_dir(root)
    except OSError as e:
        raise ConfigError(f"run.out: cannot create a run directory in {root}: "
                          f"{e.strerror or e}") from None


@cli.command()
@click.argument("config_file", required=False)
@click.option("--duration", type=DurationType(positive=True), default="8h", show_default=True,
              help="Total soak time: 30m, 8h, 1h30m.")
@click.option("--epoch", type=DurationType(positive=True), default="10m", show_default=True,
              help="Length of one epoch (a run on a fresh seed).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Master seed.")
@click.option("--variant", help="Protocol variant (see `tdp-stress variants`).")
@variant_file_option
@click.option("--vcpus", type=VcpusType(), help="Number of vcpu workers (auto: one per CPU).")
@click.option("--workers", "worker_counts", type=RoleCountType(), multiple=True,
              help="Workers of a role, e.g. --workers zapper=2 (repeatable).")
@click.option("--vm-type", type=click.Choice(["tdx", "default"]))
@click.option("--engine", type=click.Choice(["python", "kernel"]),
              help="kernel: a kernel tree's own tdp_mmu.c (default config: kernel).")
@click.option("--ksrc", type=click.Path(exists=True),
              help="The kernel engine's tree (default: Debian's linux-source).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output root: the soak writes OUT/<timestamp>/ (checkpoint.json, "
                   "results.json, bundles/) and points OUT/latest at it.")
@click.option("--keep-going", is_flag=True,
              help="Collect distinct violations as bundles and continue.")
@click.option("--expect-violation", is_flag=True, default=None,
              help="Exit 0 if a violation is found and 1 if not.")
@click.option("--watchdog", type=DurationType(positive=True),
              help="No-progress timeout (exit 4).")
@click.option("--junit", "junit_path", type=OutFileType(),
              help="Also write a JUnit XML report (one test case per epoch; its directory "
                   "must exist).")
@json_option("the soak's results.json")
@click.option("--width", type=click.IntRange(60, 1000),
              help="Width of the bundles' timeline.txt (default 160; events wrap).")
@quiet_options
def soak(config_file: str | None, duration: float, epoch: float, seed: int | None,
         variant: str | None, variant_file: str | None, vcpus: int | None,
         worker_counts: tuple[tuple[str, int], ...], vm_type: str | None,
         engine: str | None, ksrc: str | None, out_dir: str | None,
         keep_going: bool, expect_violation: bool | None, watchdog: float | None,
         junit_path: str | None, json_out: str | None, width: int | None, quiet: bool,
         plain: bool) -> int:
    """Soak: epochs of fresh seeds for DURATION, a checkpoint after each epoch."""
    from stress.jobs.soak import Soak
    from stress.report.progress import SoakProgress

    if engine == "kernel" and config_file is None:
        config_file = "kernel"
    cfg = _load_run_config(config_file, vcpus, worker_counts, None, seed, variant, None,
                           vm_type, out_dir, None, expect_violation, watchdog, variant_file,
                           engine, ksrc)
    out = _new_run_dir(cfg)
    progress = SoakProgress(live=sys.stderr.isatty() and not plain and not quiet,
                            quiet=quiet)
    with progress:
        res = Soak(cfg, duration, epoch, keep_going, out, on_status=progress.update,
                   on_epoch=progress.epoch_done, width=width or 0).run()
    if junit_path:
        write_junit(Path(junit_path), "tdp-stress-soak", [junit_case(
            f"epoch {e['epoch']} seed {e['seed']}", e["duration_s"], e["exit_reason"],
            cfg.run.expect_violation, e["violations"], e["errors"]) for e in res["epochs"]])
    _emit_json(json_out, res)
    _say(format_soak_summary(res, out / "results.json"), json_out)
    return int(res["exit_code"])


@cli.command()
@click.argument("config_file", required=False)
@click.option("--policy", "policy_mode", is_flag=True,
              help="Compare the SEAMCALL BUSY policies (unwind, retry, serialize).")
@click.option("--unsync", "unsync_mode", is_flag=True,
              help="Compare mmu_unsync_pages_lock with Alternative #1 (never unsync); "
                   "default config configs/unsync.toml.")
@click.option("--compare", "compare_variants", metavar="A,B,...",
              help="Compare protocol variants side by side on the config (with "
                   "--variant-file for user variants), e.g. fixed,sept-vm-lock.")
@variant_file_option
@click.option("--engine", type=click.Choice(["python", "kernel"]),
              help="kernel: faults/s per process of the kernel engine next to the model's.")
@click.option("--ksrc", type=click.Path(exists=True),
              help="The kernel engine's tree (default: Debian's linux-source).")
@click.option("--duration", type=DurationType(positive=True), default="5s", show_default=True,
              help="Length of each measured run.")
@click.option("--runs", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Measured runs per policy (after one warm-up run).")
@json_option("the figures")
@quiet_options
def bench(config_file: str | None, policy_mode: bool, unsync_mode: bool,
          compare_variants: str | None, variant_file: str | None, engine: str | None,
          ksrc: str | None, duration: float, runs: int, json_out: str | None, quiet: bool,
          plain: bool) -> int:
    """Print benchmark figures: fault throughput, the FFI floor and scaling against
    the machine's own, and per-role throughput of the config's job (default);
    SEAMCALL BUSY policies (--policy); the unsync lock against write-protection
    (--unsync); protocol variants side by side (--compare)."""
    from stress.jobs.bench import (
        format_table,
        policy_comparison,
        unsync_comparison,
        variant_comparison,
    )

    if sum(map(bool, (policy_mode, unsync_mode, compare_variants, engine == "kernel"))) > 1:
        raise click.UsageError("choose one of --policy, --unsync, --compare or --engine kernel")
    progress = _progress(quiet)
    vf = {"run": {"variant_file": variant_file}} if variant_file else None
    if engine == "kernel":
        from stress.jobs.bench import engine_comparison, format_engines

        res = engine_comparison(config_mod.load(config_file, vf), duration, runs,
                                str(Path(ksrc).resolve()) if ksrc else "", progress)
        text = format_engines(res)
    elif compare_variants:
        names = [v.strip() for v in compare_variants.split(",") if v.strip()]
        if len(names) < 1:
            raise click.UsageError("--compare needs variant names")
        base = config_mod.load(config_file, vf)
        from stress.model.variants import UnknownVariant, get_variant

        try:
            for n in names:
                get_variant(n)
        except UnknownVariant as e:
            raise ConfigError(str(e.args[0])) from None
        res = variant_comparison(base, names, duration, runs,
                                 base.run.variant_file, progress)
        text = format_table(res, "Protocol variants side by side")
    elif not policy_mode and not unsync_mode:
        from stress.jobs.bench import format_throughput, throughput

        res = throughput(config_mod.load(config_file, vf), duration, runs, progress)
        text = format_throughput(res)
    elif policy_mode:
        res = policy_comparison(config_mod.load(config_file, vf), duration, runs, progress)
        text = format_table(res, "SEAMCALL BUSY policies: fixed protocol on a TD")
    else:
        path = config_file or str(config_mod.DEFAULT_CONFIG.parent / "unsync.toml")
        res = unsync_comparison(config_mod.load(path, vf), duration, runs, progress)
        text = format_table(res, "Marking shadow pages unsync from TDP MMU faults: "
                                 "mmu_unsync_pages_lock vs can_unsync=false")
    _emit_json(json_out, res)
    _say(text, json_out)
    return 0


@cli.command()
@click.argument("matrix_file")
@click.option("--shard", default="1/1", show_default=True,
              help="Run slice i of N of the matrix (1-based), e.g. --shard 3/8.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="campaign-out",
              show_default=True, help="Output directory for shard-i-of-N.json and cells/.")
@quiet_options
def campaign(matrix_file: str, shard: str, out_dir: str, quiet: bool, plain: bool) -> int:
    """Run one shard of a campaign matrix (config x variant x seed).

    Exit 0 when every cell of the shard met its expectation (bug variants
    caught, fixed protocol clean), 1 otherwise.
    """
    from stress.jobs.campaign import CampaignError, load_matrix, parse_shard, run_campaign

    try:
        matrix = load_matrix(matrix_file)
        spec = parse_shard(shard)
    except CampaignError as e:
        raise ConfigError(str(e)) from None
    res = run_campaign(matrix, spec, Path(out_dir), progress=_progress(quiet))
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
    from stress.jobs.campaign import CampaignError, format_merge
    from stress.jobs.campaign import merge as merge_shards

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
@click.option("--cap", type=DurationType(positive=True), default="30s", show_default=True,
              help="Longest run per seed.")
@click.option("--fixed", "fixed_for", type=DurationType(), default="1m", show_default=True,
              help="How long the fixed protocol must run clean (0: skip).")
@click.option("--variant", "names", multiple=True,
              help="Only these variants (repeatable); default every bug variant.")
@variant_file_option
@json_option("the table")
@click.option("--junit", "junit_path", type=OutFileType(),
              help="Also write JUnit XML: one test case per variant (caught = pass; its "
                   "directory must exist).")
@click.option("--compare-perturbation", is_flag=True,
              help="Also run every variant with delay injection and race windows off, and "
                   "print both times side by side.")
@click.option("--hunt", "hunt_tries", type=click.IntRange(0, 100000), default=0,
              help="Also hunt every variant under controlled schedules (up to N tries) and "
                   "replay the failing schedule SEEDS times (deterministic reproducers).")
@click.option("--engine", type=click.Choice(["python", "kernel"]), default="python",
              show_default=True,
              help="kernel: the tree mutations of stress/kernel/mutations.py on the kernel "
                   "engine (configs/kernel.toml).")
@click.option("--hunt-max-steps", type=click.IntRange(100, 10**9), default=200_000,
              show_default=True, help="Shared accesses per controlled run of --hunt.")
@quiet_options
def zoo(seeds: int, cap: float, fixed_for: float, names: tuple[str, ...],
        variant_file: str | None, json_out: str | None, junit_path: str | None,
        compare_perturbation: bool, hunt_tries: int, engine: str, hunt_max_steps: int,
        quiet: bool, plain: bool) -> int:
    """Time-to-detect of every bug variant over N seeds, and the fixed protocol clean.

    Exit 0 when every variant was detected at least once and the fixed
    protocol ran clean, 1 otherwise.
    """
    from stress.jobs.zoo import format_zoo, not_detected, run_zoo

    _load_variant_file(variant_file)
    if engine == "kernel":
        from stress.kernel.mutations import BY_NAME

        chosen = list(names) or list(BY_NAME)
        unknown = [n for n in chosen if n not in BY_NAME]
    else:
        chosen = list(names) or [v.name for v in VARIANTS.values() if v.buggy]
        unknown = [n for n in chosen if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variant: unknown variant {unknown[0]!r}")
    from stress.jobs.zoo import ZooInterrupted

    try:
        res = run_zoo(chosen, seeds, cap, fixed_for, progress=_progress(quiet),
                      compare_perturbation=compare_perturbation, hunt_tries=hunt_tries,
                      hunt_max_steps=hunt_max_steps,
                      variant_file=str(Path(variant_file).resolve()) if variant_file else "",
                      engine=engine)
    except ZooInterrupted:
        click.echo("tdp-stress: interrupted", err=True)
        return 130
    _emit_json(json_out, res)
    _say(format_zoo(res), json_out)
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
    missed = not_detected(res)
    if missed:
        _say(missed, json_out)
    return 1 if missed else 0


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--runs", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Re-run the bundle at most this many times.")
@click.option("--stop-after", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Stop after this many hits.")
@click.option("--variant-file", type=click.Path(dir_okay=False),
              help="The user variant file of the bundle's variant, if it moved since.")
@json_option("repro.json")
@quiet_options
def repro(bundle: str, runs: int, stop_after: int, variant_file: str | None,
          json_out: str | None, quiet: bool, plain: bool) -> int:
    """Re-run a reproducer bundle: reliability (hits/runs) and time to each hit.

    Exit 0 when the violation came back at least once, 1 when it did not.
    """
    from stress.repro.repro import BundleError, reproduce

    try:
        res = reproduce(Path(bundle), runs, stop_after, progress=_progress(quiet),
                        variant_file=variant_file)
    except BundleError as e:
        raise ConfigError(str(e)) from None
    times = ", ".join(f"{t:.3f}s" for t in res["times_to_hit_s"]) or "-"
    _emit_json(json_out, res)
    _say(f"repro {bundle}: {res['invariant']} ({res['variant']}, seed {res['seed']}): "
         f"{res['hits']}/{res['runs']} runs hit, reliability {res['reliability']:.0%}; "
         f"time to hit: {times}", json_out)
    if any(a["exit_reason"] == "interrupted" for a in res["attempts"]):
        return 130
    return 0 if res["hits"] else 1


def _hunt_config(target: str | None, variant: str | None, vcpus: int | None,
                 worker_counts: tuple[tuple[str, int], ...], guest_size: int | None,
                 variant_file: str | None = None) -> Any:
    """The config to hunt with: a bundle's, a config file's, or the variant's own."""
    from stress.repro.repro import BundleError, load_bundle

    overrides: dict[str, dict[str, Any]] = {"run": {}, "workers": {}, "guest": {}}
    _load_variant_file(variant_file)
    if variant_file:
        overrides["run"]["variant_file"] = variant_file
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
        overrides["kernel"]["vcpu"] = min(vcpus, 30)
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
@click.option("--vcpus", type=VcpusType(), help="Number of vcpu workers (auto: one per CPU).")
@click.option("--workers", "worker_counts", type=RoleCountType(), multiple=True,
              help="Workers of a role, e.g. --workers zapper=1 (repeatable).")
@click.option("--guest-size", type=SizeType(), help="Guest memory: 16m, 1g.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="tdp-stress-hunt",
              show_default=True, help="Where the bundle goes (OUT/bundles/...).")
@variant_file_option
@click.option("--width", type=click.IntRange(60, 1000),
              help="Width of the printed timeline and the bundle's timeline.txt "
                   "(default: the terminal's, 160 in the file).")
@json_option("the hunt's result")
@quiet_options
def hunt(target: str | None, variant: str | None, tries: int, mode: str,
         max_steps: int | None, first_seed: int, vcpus: int | None,
         worker_counts: tuple[tuple[str, int], ...], guest_size: int | None,
         out_dir: str, variant_file: str | None, width: int | None, json_out: str | None,
         quiet: bool, plain: bool) -> int:
    """Search controlled schedules for a violation; write a bundle that replays it.

    TARGET is a config file or a bundle (e.g. one a free run or soak wrote: the
    same config is hunted under controlled schedules); default: the variant's
    own config.  Exit 0 when a failing schedule was found, 1 when not.
    """
    from stress.harness.trace import focus
    from stress.report.explain import annotate, worker_names
    from stress.report.render import timeline
    from stress.repro.hunt import hunt as do_hunt

    cfg = _hunt_config(target, variant, vcpus, worker_counts, guest_size, variant_file)
    modes = ("random", "pct") if mode == "mixed" else (mode,)
    res = do_hunt(cfg, tries, first_seed, max_steps, modes, progress=_progress(quiet))
    if not res.found or res.outcome is None or res.config is None:
        _emit_json(json_out, {"found": False, "variant": cfg.run.variant, "tries": res.tries,
                              "elapsed_s": round(res.elapsed_s, 3)})
        _say(f"hunt: no violation of {cfg.run.variant} in {res.tries} schedules "
             f"({res.elapsed_s:.1f} s)", json_out)
        return 130 if res.outcome and res.outcome.exit_reason == "interrupted" else 1
    v = res.outcome.violations[0]
    sched = dict(res.strategy or {}, tries=res.tries, replayed_identically=res.replayed_identically)
    # a new hunt replaces the old bundle of the same signature
    annotate([v], worker_names(res.config))
    path, _new = write_bundle(Path(out_dir) / "bundles", res.config, v, res.outcome.trace,
                              suffix="-sched", schedule=sched, replace=True, width=width or 0)
    _emit_json(json_out, {"found": True, "variant": cfg.run.variant, "bundle": str(path),
                          "violation": v, "schedule": sched,
                          "elapsed_s": round(res.elapsed_s, 3)})
    _say(timeline(focus(res.outcome.trace, v), last=30, width=width or _term_width()), json_out)
    _say(f"hunt: {v['invariant']} ({cfg.run.variant}) after {res.tries} schedule(s), "
         f"{res.elapsed_s:.1f} s: {sched['mode']} seed {sched['seed']}, "
         f"{sched['steps']} steps, {sched['switches']} switches; replayed "
         f"{'identically' if res.replayed_identically else 'DIFFERENTLY'}\n"
         f"bundle: {path}  (tdp-stress replay {path})", json_out)
    return 0 if res.replayed_identically else 1


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--runs", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Replay this many times.")
@json_option("the replay's result")
@quiet_options
def replay(bundle: str, runs: int, json_out: str | None, quiet: bool, plain: bool) -> int:
    """Replay a controlled-schedule bundle (from hunt or shrink) RUNS times.

    Exit 0 when every run reports the bundle's invariant with the same trace
    events, 1 otherwise.
    """
    from stress.repro.hunt import replay as do_replay
    from stress.repro.repro import BundleError

    try:
        res = do_replay(Path(bundle), runs, progress=_progress(quiet))
    except BundleError as e:
        raise ConfigError(str(e)) from None
    _emit_json(json_out, res)
    _say(f"replay {bundle}: {res['invariant']} ({res['variant']}): {res['hits']}/"
         f"{res['runs']} runs hit, {res['identical']}/{res['runs']} with identical events",
         json_out)
    if any(a["exit_reason"] == "interrupted" for a in res["attempts"]):
        return 130
    return 0 if res["identical"] == res["runs"] else 1


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--max-runs", type=click.IntRange(1, 100000), default=400, show_default=True,
              help="Give up shrinking after this many runs.")
@click.option("--max-time", type=DurationType(positive=True), default="5m", show_default=True,
              help="... or after this long.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where the shrunk bundle goes (default: next to BUNDLE).")
@click.option("--width", type=click.IntRange(60, 1000),
              help="Width of the printed timeline and the bundle's timeline.txt "
                   "(default: the terminal's, 160 in the file).")
@quiet_options
def shrink(bundle: str, max_runs: int, max_time: float, out_dir: str | None,
           width: int | None, quiet: bool, plain: bool) -> int:
    """Shrink a controlled-schedule bundle while it still fails.

    Fewer workers, fewer ops, fewer preemptions, a smaller guest; writes the
    smallest failing bundle (BUNDLE-shrunk) and prints its interleaving.  Exit 0
    when a failing bundle was written.
    """
    from stress.harness.trace import focus
    from stress.report.explain import annotate, worker_names
    from stress.report.render import timeline
    from stress.repro.repro import BundleError, load_bundle
    from stress.repro.shrink import Shrinker, ShrinkInterrupted

    src = Path(bundle)
    try:
        cfg, violation = load_bundle(src)
    except BundleError as e:
        raise ConfigError(str(e)) from None
    if cfg.schedule.mode != "replay":
        raise ConfigError(f"{src}: not a controlled-schedule bundle (schedule.mode is "
                          f"{cfg.schedule.mode!r}); make one with `tdp-stress hunt {src}`")
    try:
        res = Shrinker(cfg, violation, max_runs, max_time, progress=_progress(quiet)).run()
    except ValueError as e:
        raise ConfigError(f"{src}: {e}") from None
    except ShrinkInterrupted:
        click.echo("tdp-stress: interrupted", err=True)
        return 130
    v = res.outcome.violations[0]
    root = Path(out_dir) if out_dir else src.parent
    sched = {"shrunk_from": str(src), "runs": res.runs, "elapsed_s": round(res.elapsed_s, 1),
             "before": res.start, "after": res.end, "kept": res.log}
    annotate([v], worker_names(res.config))
    path, _new = write_bundle(root, res.config, v, res.outcome.trace, suffix="-shrunk",
                              schedule=sched, replace=True, width=width or 0)
    click.echo(timeline(focus(res.outcome.trace, v), last=60, width=width or _term_width()))
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
@click.option("--width", type=click.IntRange(40, 400), default=None,
              help="Wrap at this many columns (default: the terminal's, 100 if not a "
                   "terminal).")
@click.option("--engine", type=click.Choice(["python", "kernel"]), default="python",
              show_default=True, help="kernel: the kernel engine's tree mutations.")
def variants(variant_file: str | None, width: int | None, engine: str) -> int:
    """List protocol variants: story, source, config, whether it needs a TD, and
    the invariants each bug variant is expected to trip on each VM type (with
    --engine kernel: the kernel engine's tree mutations)."""
    from stress.model.variants import VariantLoadError, load_entry_point_variants
    from stress.model.variants import load_variant_file as _load

    try:
        load_entry_point_variants()
        if variant_file:
            _load(variant_file)
    except VariantLoadError as e:
        raise ConfigError(str(e)) from None
    width = width or _term_width()
    if engine == "kernel":
        import textwrap

        from stress.kernel.mutations import MUTATIONS

        blocks = []
        for m in MUTATIONS:
            lines = textwrap.wrap(f"{m.name}: {m.story}", width)
            for label, text in (("source", m.source), ("file", m.file),
                                ("config", m.config), ("expects", ", ".join(m.expects))):
                lines += textwrap.wrap(f"{label}: {text}", width, initial_indent="    ",
                                       subsequent_indent="      ")
            blocks.append("\n".join(lines))
        click.echo("\n\n".join(blocks))
        return 0
    click.echo("\n\n".join("\n".join(variant_lines(v, width)) for v in VARIANTS.values()))
    return 0


def variant_lines(v: Any, width: int) -> list[str]:
    """One variant for ``tdp-stress variants``, every line at most ``width``
    columns: its name and kind, then, indented, the story, the source, the
    config and TD requirement, and per VM type it can run on what a run is
    expected to trip (any one of the invariants listed)."""
    import textwrap

    ind = "    "

    def para(label: str, text: str) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=ind + label,
                             subsequent_indent=ind + " " * len(label),
                             break_on_hyphens=False) or [ind + label.rstrip()]

    kind = "bug" if v.buggy else "valid"
    out = textwrap.wrap(f"{v.name}  ({kind})", width) or [v.name]
    out += para("", v.story)
    out += para("source: ", v.source)
    try:
        cfg_vm: str | None = config_mod.load(config_mod.find_config(v.config)).vm.type
    except (ConfigError, OSError):  # a user variant naming a config that is not shipped
        cfg_vm = None
    on = f" (vm.type = {cfg_vm})" if cfg_vm else ""
    out += para("config: ", f"{v.config}{on}; needs a TD: {'yes' if v.requires_tdx else 'no'}")
    expected = v.expectations(cfg_vm) if cfg_vm else dict(v.expects_by_vm)
    for vm_type in v.vm_types():
        if not v.buggy:
            what = "no violation"
        elif vm_type in expected:
            what = " | ".join(expected[vm_type])
        else:
            what = "not characterised"
        out += para(f"expects on {vm_type}: ", what)
    return out


@cli.command()
def configs() -> int:
    """List the shipped configs (`tdp-stress run NAME` from anywhere)."""
    shipped = config_mod.shipped_configs()
    width = max((len(n) for n in shipped), default=0)
    for name, path in shipped.items():
        kind = "  (campaign matrix)" if "[campaign]" in path.read_text() else ""
        click.echo(f"{name:<{width}}  {config_mod.describe_config(path)}{kind}")
    click.echo(f"({len(shipped)} configs in {config_mod.CONFIG_DIR})")
    return 0


@cli.command("oracles")
@click.option("--width", type=click.IntRange(60, 1000),
              help="Wrap at this many columns (default: the terminal's).")
@json_option("the oracle list")
def oracles_cmd(width: int | None, json_out: str | None) -> int:
    """List the tester's oracles: each invariant, the model hook (or walk) where
    it is checked and when that is, and what a check costs.  The kernel's own
    assertions (KVM_BUG_ON, WARN_ON_ONCE, lockdep, BUG) are the model's, not
    listed here."""
    import textwrap

    from stress import oracles
    from stress.oracles.base import HOOK_EXCEPTION

    OFFLINE = (oracles.HOOK_QUIESCENT, oracles.HOOK_TEARDOWN,  # noqa: N806
               oracles.HOOK_WATCHDOG, HOOK_EXCEPTION)
    rows = [{"name": o.name, "module": o.module, "hook": o.hook, "when": o.when,
             "invariant": o.invariant, "cost": o.cost} for o in oracles.ORACLES]
    width = width or _term_width()
    lines: list[str] = []
    for r in rows:
        where = r["hook"] if r["hook"] in (*OFFLINE, "kernel") else f"online, hook {r['hook']}"
        lines += textwrap.wrap(f"{r['name']}  [{r['module']}; {where}]", width)
        for label in ("invariant", "when", "cost"):
            lines += textwrap.wrap(r[label], width, initial_indent=f"    {label}: ",
                                   subsequent_indent=" " * (6 + len(label)))
    walks = sum(1 for r in rows if r["hook"] in OFFLINE)
    in_kernel = sum(1 for r in rows if r["hook"] == "kernel")
    online = len(rows) - walks - in_kernel
    lines += textwrap.wrap(f"({len(rows)} oracles: {online} online at model hooks, {in_kernel} "
                           f"in the kernel engine's runtime, {walks} in the quiescent and "
                           "teardown walks and the supervisor's watchdog)", width)
    _say("\n".join(lines), json_out)
    _emit_json(json_out, {"oracles": rows})
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


cli.add_command(mutate_command)  # stress/mutate/: the tester's self-test


@cli.group()
def kernel() -> None:
    """The kernel engine: a kernel tree's own TDP MMU built against the shim."""


def _ksrc_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--ksrc", type=click.Path(exists=True),
                        help="A kernel source directory or a linux-source .tar.xz "
                             "(default: Debian's linux-source).")(f)


@kernel.command("info")
@_ksrc_option
@json_option("the tree's description")
def kernel_info(ksrc: str | None, json_out: str | None) -> int:
    """The tree's version, the files the engine uses, the build it maps to, and
    which of the kernel variants (tree mutations) apply to it."""
    import hashlib

    from stress.kernel.build import build_key, cached_module
    from stress.kernel.mutations import MUTATIONS, MutationError
    from stress.kernel.tree import USED, open_tree

    tree = open_tree(ksrc)
    files = []
    for rel in USED:
        data = tree.path(rel).read_bytes()
        files.append({"file": rel, "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()[:16]})
    variants = {}
    for m in MUTATIONS:
        try:
            m.apply(tree.read(m.file), tree.origin)
            variants[m.name] = "applies"
        except MutationError as e:
            variants[m.name] = str(e).split(": ", 1)[-1]
    key = build_key(tree)
    so = cached_module(key)
    info = {"tree": tree.origin, "top": str(tree.top), "version": tree.version,
            "files": files, "build_key": key, "built": str(so) if so else None,
            "variants": variants}
    _emit_json(json_out, info)
    lines = [f"tree:     {tree.origin}", f"version:  {tree.version}", f"files:    {tree.top}/"]
    lines += [f"  {f['file']:<40} {f['bytes']:>9} bytes  {f['sha256']}" for f in files]
    lines.append(f"build:    {key} ({'built: ' + str(so) if so else 'not built yet'})")
    lines.append("variants: " + ", ".join(f"{k} ({v})" for k, v in variants.items()))
    _say("\n".join(lines), json_out)
    return 0


@kernel.command("build")
@_ksrc_option
@click.option("--variant", default="fixed", show_default=True,
              help="A kernel variant: the tree mutation to build (`tdp-stress kernel info`).")
def kernel_build(ksrc: str | None, variant: str) -> int:
    """Build (or find cached) the engine's module for a tree."""
    import time as _time

    from stress.kernel.build import build
    from stress.kernel.mutations import get_mutation
    from stress.kernel.tree import open_tree

    tree = open_tree(ksrc)
    m = get_mutation(variant)
    t0 = _time.monotonic()
    b = build(tree) if m is None else build(tree, m.name,
                                            {m.file: m.apply(tree.read(m.file), tree.origin)})
    click.echo(f"{tree.origin} ({tree.version}), variant {variant}: {b.path} "
               f"[{b.key}] in {_time.monotonic() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="tdp-stress", standalone_mode=False)
    except ConfigError as e:
        click.echo(f"tdp-stress: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except KernelEngineError as e:  # the kernel engine's tree, build or mutation
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
