"""Campaigns: a matrix of (config x variant x seed) cells, split into shards, merged back.

A campaign is too big for one machine, so it is cut, not scheduled: every
machine gets the same matrix file and a shard spec ``i/N`` and runs the cells
whose index ``k`` in the matrix's deterministic order satisfies
``k % N == i - 1``.  No machine talks to another; a batch scheduler's array
job, a CI matrix or N ssh sessions all work, and each shard writes its own
``shard-i-of-N.json`` next to one ``results.json`` per cell.  :func:`merge`
then joins any set of shard files (or directories holding them) into one
report, says whether every shard is there, and gives the campaign a verdict.

Determinism is what makes the split sound: the cell list is sorted by
(config as written in the matrix, variant, seed), never by a resolved path,
so two checkouts at different places agree on which cell is which.  Each
shard file records a digest of the full cell list, so shards of two
different versions of a matrix are never merged by accident.

Layout of a shard's output directory::

    OUT/shard-1-of-4.json            the shard's cells and their verdicts
    OUT/cells/<cell_id>/results.json the run's results.json (schema tdp-stress-results)

A cell *passes* when its variant's expectation holds: a buggy variant must be
caught (``exit_reason == "violation"``), the fixed protocol must run clean.
A crash, a hang or a missed bug is a failure.  If a cell is interrupted
(SIGINT/SIGTERM), the shard stops there: the cells not run are recorded as
``not-run`` failures, so the shard file never claims more than was done.

This module is the engine only: the command line lives in :mod:`stress.cli`.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stress import config as _config
from stress.config import Config, ConfigError, parse_duration
from stress.harness.supervisor import Supervisor
from stress.model.variants import VARIANTS
from stress.report.report import build_results, now_iso, write_json_atomic

SHARD_SCHEMA = "tdp-stress-campaign-shard"
REPORT_SCHEMA = "tdp-stress-campaign"
SCHEMA_VERSION = 1

MATRIX_KEYS = ("name", "configs", "variants", "seeds", "duration")
VARIANT_CONFIG = "@variant"  # in campaign.configs: each variant's own shipped config
MAX_SEED = 2**63 - 1  # as run.seed in stress.config
NOT_RUN = "not-run"   # exit_reason of cells skipped after an interrupted cell

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


class CampaignError(ValueError):
    """A matrix file, shard spec or shard file is wrong; one line, naming the key or file."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``1 <= i <= N`` (shards count from 1, as array jobs do)."""
    m = _SHARD.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise CampaignError(f"shard: expected i/N like 1/4, got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise CampaignError(f"shard: need 1 <= i <= N, got {text!r}")
    return i, n


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    i, n = shard
    if isinstance(i, bool) or isinstance(n, bool) or not (
            isinstance(i, int) and isinstance(n, int) and n >= 1 and 1 <= i <= n):
        raise CampaignError(f"shard: need 1 <= i <= N, got {shard!r}")
    return i, n


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "_"


@dataclass(frozen=True, order=True)
class Cell:
    """One run of a campaign.

    ``config`` is the config path exactly as written in the matrix (relative to
    the matrix file's directory, or absolute), so cells, their order and their
    ids are the same on every machine; :meth:`Matrix.config_path` resolves it.
    Field order is the sort order: config, variant, seed.
    """

    config: str
    variant: str
    seed: int

    @property
    def cell_id(self) -> str:
        """``<config stem>-<variant>-s<seed>``, filesystem-safe and stable.

        :func:`load_matrix` rejects two configs whose stems give the same id.
        """
        return f"{_safe(Path(self.config).stem)}-{_safe(self.variant)}-s{self.seed}"


@dataclass(frozen=True)
class Matrix:
    """A validated campaign matrix (see :func:`load_matrix`)."""

    name: str
    path: Path                 # the matrix file
    configs: tuple[str, ...]   # as written in the file
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    duration: float            # seconds, per cell

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def config_path(self, config: str) -> Path:
        """A config path of the matrix, resolved against the matrix file's directory."""
        p = Path(config).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def resolve(self, config: str, variant: str) -> str:
        """A config of the matrix for one variant: ``@variant`` is the variant's own
        shipped config (the job that stresses its code path, as ``zoo`` uses)."""
        if config == VARIANT_CONFIG:
            return str(_config.CONFIG_DIR / VARIANTS[variant].config)
        return config

    def cells(self) -> list[Cell]:
        """Every cell, sorted by (config, variant, seed): the order shards are cut in."""
        return sorted({Cell(self.resolve(c, v), v, s) for c in self.configs
                       for v in self.variants for s in self.seeds})

    def digest(self) -> str:
        """Identifies the cell list and per-cell duration; equal on every machine."""
        blob = json.dumps({"cells": [[c.config, c.variant, c.seed] for c in self.cells()],
                           "duration": self.duration}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _str_list(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise CampaignError(f"{key}: expected a non-empty list of strings, got {v!r}")
    for x in v:
        if not isinstance(x, str) or not x:
            raise CampaignError(f"{key}: expected non-empty strings, got {x!r}")
    dup = sorted({x for x in v if v.count(x) > 1})
    if dup:
        raise CampaignError(f"{key}: listed twice: {', '.join(dup)}")
    return tuple(v)


def _seeds(key: str, v: Any) -> tuple[int, ...]:
    if isinstance(v, bool):
        raise CampaignError(f"{key}: expected a list of integers or a count N, got {v!r}")
    if isinstance(v, int):
        if not 1 <= v <= 1_000_000:
            raise CampaignError(f"{key}: a count must be between 1 and 1000000, got {v}")
        return tuple(range(1, v + 1))
    if not isinstance(v, list) or not v:
        raise CampaignError(f"{key}: expected a non-empty list of integers or a count N, "
                            f"got {v!r}")
    for s in v:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise CampaignError(f"{key}: expected integers between 0 and {MAX_SEED}, "
                                f"got {s!r}")
    dup = sorted({s for s in v if v.count(s) > 1})
    if dup:
        raise CampaignError(f"{key}: listed twice: {', '.join(map(str, dup))}")
    return tuple(v)


def cell_config(matrix: Matrix, cell: Cell, cell_dir: Path) -> Config:
    """The run config of one cell: its config file with the cell's run keys on top.

    A variant that needs a TD gets ``vm.type = "tdx"`` when its config says otherwise,
    so one matrix can cross plain-VM configs with mirror variants.
    """
    path = matrix.config_path(cell.config)
    variant = VARIANTS[cell.variant]
    overrides: dict[str, dict[str, Any]] = {"run": {
        "variant": cell.variant, "seed": cell.seed, "duration": matrix.duration,
        "expect_violation": variant.buggy, "out": str(cell_dir)}}
    if variant.requires_tdx and _config.load(path).vm.type != "tdx":
        overrides["vm"] = {"type": "tdx"}
    return _config.load(path, overrides)


def load_matrix(path: str | Path) -> Matrix:
    """Read and validate a matrix file (TOML, one ``[campaign]`` table).

    Every config is loaded with every variant before anything runs, so a bad
    matrix fails at once with one line naming the key, never half-way through.
    """
    try:
        p = _config.find_config(path)  # a file, or a shipped matrix by name
        raw = _config.read_toml(p, "matrix")
    except ConfigError as e:
        raise CampaignError(str(e)) from None
    extra = sorted(k for k in raw if k != "campaign")
    if extra:
        raise CampaignError(f"{p}: unknown section [{extra[0]}] (known: campaign)")
    camp = raw.get("campaign")
    if not isinstance(camp, dict):
        raise CampaignError(f"{p}: missing [campaign] table")
    unknown = sorted(k for k in camp if k not in MATRIX_KEYS)
    if unknown:
        raise CampaignError(f"{p}: unknown key campaign.{unknown[0]} "
                            f"(known: {', '.join(MATRIX_KEYS)})")
    for key in ("configs", "variants", "seeds", "duration"):
        if key not in camp:
            raise CampaignError(f"{p}: missing key campaign.{key}")

    name = camp.get("name", p.stem)
    if not isinstance(name, str) or not name.strip():
        raise CampaignError(f"campaign.name: expected a non-empty string, got {name!r}")
    configs = _str_list("campaign.configs", camp["configs"])
    variants = _str_list("campaign.variants", camp["variants"])
    for v in variants:
        if v not in VARIANTS:
            raise CampaignError(f"campaign.variants: unknown variant {v!r}; known: "
                                f"{', '.join(sorted(VARIANTS))}")
    seeds = _seeds("campaign.seeds", camp["seeds"])
    try:
        duration = parse_duration(camp["duration"], "campaign.duration")
    except ConfigError as e:
        raise CampaignError(str(e)) from None
    if not 0 < duration <= 366 * 86400:
        raise CampaignError(f"campaign.duration: must be more than 0 and at most 366d, "
                            f"got {camp['duration']!r}")

    matrix = Matrix(name=name, path=p, configs=configs, variants=variants, seeds=seeds,
                    duration=duration)
    ids: dict[str, str] = {}
    for c in configs:
        if c == VARIANT_CONFIG:
            for v in variants:
                try:
                    cell_config(matrix, Cell(matrix.resolve(c, v), v, seeds[0]), Path("."))
                except ConfigError as e:
                    raise CampaignError(f"campaign.configs: {c} with variant {v}: {e}") \
                        from None
            continue
        cp = matrix.config_path(c)
        if not cp.is_file():
            raise CampaignError(f"campaign.configs: {c}: no such config file ({cp})")
        stem = _safe(cp.stem)
        if stem in ids:
            raise CampaignError(f"campaign.configs: {ids[stem]} and {c} give the same cell "
                                f"id prefix {stem!r}; rename one")
        ids[stem] = c
        for v in variants:
            try:
                cell_config(matrix, Cell(c, v, seeds[0]), Path("."))
            except ConfigError as e:
                raise CampaignError(f"campaign.configs: {c} with variant {v}: {e}") from None
    return matrix


def shard_cells(cells: Sequence[Cell], i: int, n: int) -> list[Cell]:
    """The cells of shard ``i`` of ``n``: index ``k % n == i - 1`` (round robin).

    Round robin rather than contiguous blocks, so each shard gets a mix of
    configs and variants and the shards take about the same time.
    """
    i, n = _check_shard((i, n))
    return [c for k, c in enumerate(cells) if k % n == i - 1]


def _verdict(variant: str, exit_reason: str) -> str:
    want = "violation" if VARIANTS[variant].buggy else "clean"
    return "pass" if exit_reason == want else "fail"


def _record(cell: Cell, exit_reason: str, ttd: float | None, results: str | None
            ) -> dict[str, Any]:
    return {"cell_id": cell.cell_id, "config": cell.config, "variant": cell.variant,
            "seed": cell.seed, "expect": "violation" if VARIANTS[cell.variant].buggy else "clean",
            "exit_reason": exit_reason, "verdict": _verdict(cell.variant, exit_reason),
            "time_to_detect_s": ttd, "results": results}


def shard_file_name(i: int, n: int) -> str:
    return f"shard-{i}-of-{n}.json"


def run_campaign(matrix: Matrix, shard: tuple[int, int], out_dir: Path,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the cells of ``shard`` one after the other; write and return the shard record.

    Each cell gets ``out_dir/cells/<cell_id>/results.json``; the shard record goes
    to ``out_dir/shard-i-of-N.json`` (atomically) once the shard is done.  Cells run
    in sequence: one run already uses a process per worker, so cells side by
    side would race each other for CPUs and distort time-to-detect.
    """
    i, n = _check_shard(shard)
    out_dir = Path(out_dir)
    say = progress or (lambda _msg: None)
    all_cells = matrix.cells()
    mine = shard_cells(all_cells, i, n)
    records: list[dict[str, Any]] = []
    interrupted = False
    for k, cell in enumerate(mine, 1):
        tag = f"[{k}/{len(mine)}] {cell.cell_id}"
        if interrupted:
            records.append(_record(cell, NOT_RUN, None, None))
            continue
        cell_dir = out_dir / "cells" / cell.cell_id
        cfg = cell_config(matrix, cell, cell_dir)
        say(f"{tag}: running ({matrix.duration:g}s)")
        outcome = Supervisor(cfg).run()
        res = build_results(cfg, outcome, now_iso())
        results_path = write_json_atomic(cell_dir / "results.json", res)
        viol = res["violations"]
        ttd = viol[0].get("time_s") if viol else None
        rec = _record(cell, outcome.exit_reason, ttd,
                      results_path.relative_to(out_dir).as_posix())
        records.append(rec)
        detail = f", detected at {ttd:.3f}s" if ttd is not None else ""
        say(f"{tag}: {rec['verdict']} ({outcome.exit_reason}{detail})")
        if outcome.exit_reason == "interrupted":
            interrupted = True
    shard_rec: dict[str, Any] = {
        "schema": SHARD_SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "campaign": matrix.name,
        "shard": [i, n],
        "matrix_digest": matrix.digest(),
        "total_cells": len(all_cells),
        "duration_s": matrix.duration,
        "cells": records,
    }
    write_json_atomic(out_dir / shard_file_name(i, n), shard_rec)
    return shard_rec


# -- merge -----------------------------------------------------------------------

_CELL_KEYS = ("cell_id", "config", "variant", "seed", "expect", "exit_reason", "verdict",
              "time_to_detect_s", "results")


def _shard_files(paths: Iterable[Path]) -> list[Path]:
    found: dict[Path, Path] = {}
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("shard-*.json")):
                if f.is_file():
                    found.setdefault(f.resolve(), f)
        elif p.is_file():
            found.setdefault(p.resolve(), p)
        else:
            raise CampaignError(f"{p}: no such shard file or directory")
    return list(found.values())


def _read_shard(f: Path) -> dict[str, Any]:
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CampaignError(f"{f}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise CampaignError(f"{f}: invalid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SHARD_SCHEMA:
        raise CampaignError(f"{f}: schema: not a {SHARD_SCHEMA} file")
    ver = data.get("schema_version")
    if ver != SCHEMA_VERSION:
        raise CampaignError(f"{f}: schema_version: expected {SCHEMA_VERSION}, got {ver!r}")
    if not isinstance(data.get("campaign"), str):
        raise CampaignError(f"{f}: campaign: expected a string")
    sh = data.get("shard")
    if not (isinstance(sh, list) and len(sh) == 2):
        raise CampaignError(f"{f}: shard: expected [i, N], got {sh!r}")
    try:
        _check_shard((sh[0], sh[1]))
    except CampaignError:
        raise CampaignError(f"{f}: shard: need 1 <= i <= N, got {sh!r}") from None
    cells = data.get("cells")
    if not isinstance(cells, list):
        raise CampaignError(f"{f}: cells: expected a list")
    for c in cells:
        if not isinstance(c, dict) or any(k not in c for k in _CELL_KEYS):
            raise CampaignError(f"{f}: cells: each cell needs {', '.join(_CELL_KEYS)}")
    return data


def _p90(times: list[float]) -> float:
    """Nearest-rank p90 over sorted times, as scripts/detect-times.py prints it."""
    return times[min(len(times) - 1, int(0.9 * len(times)))]


def merge(paths: list[Path]) -> dict[str, Any]:
    """Join shard files (or directories searched recursively for ``shard-*.json``).

    A cell found twice must be identical (the same shard copied twice is fine;
    a re-run that came out differently is a :class:`CampaignError`, as are
    shards of different campaigns, of different matrices, or of different
    splits).  ``results`` paths in the report point into the directory of the
    shard file they came from.  The campaign passes when every shard 1..N is
    present, every cell of the matrix is there and no cell failed.
    """
    files = _shard_files(paths)
    if not files:
        raise CampaignError(f"no shard-*.json found in {', '.join(map(str, paths)) or '(none)'}")
    shards = [(f, _read_shard(f)) for f in files]
    f0, d0 = shards[0]
    for f, d in shards[1:]:
        if d["campaign"] != d0["campaign"]:
            raise CampaignError(f"campaign: {f} is of campaign {d['campaign']!r}, "
                                f"{f0} of {d0['campaign']!r}")
        if d.get("matrix_digest") != d0.get("matrix_digest"):
            raise CampaignError(f"matrix_digest: {f} and {f0} come from different matrices "
                                f"of campaign {d0['campaign']!r}")
        if d["shard"][1] != d0["shard"][1]:
            raise CampaignError(f"shard: {f} is of a split in {d['shard'][1]}, "
                                f"{f0} of a split in {d0['shard'][1]}")
    n = d0["shard"][1]
    found = sorted({tuple(d["shard"]) for _, d in shards})

    raw: dict[str, dict[str, Any]] = {}
    where: dict[str, Path] = {}
    merged: dict[str, dict[str, Any]] = {}
    for f, d in shards:
        for c in d["cells"]:
            cid = c["cell_id"]
            if cid in raw:
                if raw[cid] != c:
                    raise CampaignError(f"cells: {cid} is in {where[cid]} and in {f} with "
                                        f"different content")
                continue
            raw[cid], where[cid] = c, f
            m = dict(c)
            if c["results"] is not None:
                m["results"] = (f.parent / c["results"]).as_posix()
            merged[cid] = m
    cells = sorted(merged.values(), key=lambda c: (c["config"], c["variant"], c["seed"]))

    total = d0.get("total_cells")
    complete = [list(s) for s in found] == [[i, n] for i in range(1, n + 1)] and (
        total is None or len(cells) == total)

    variants = []
    for name in sorted({c["variant"] for c in cells}):
        runs = [c for c in cells if c["variant"] == name]
        times = sorted(c["time_to_detect_s"] for c in runs
                       if c["exit_reason"] == "violation" and c["time_to_detect_s"] is not None)
        detected = sum(1 for c in runs if c["exit_reason"] == "violation")
        variants.append({
            "name": name, "runs": len(runs), "detected": detected,
            "median_ttd_s": round(statistics.median(times), 6) if times else None,
            "p90_ttd_s": round(_p90(times), 6) if times else None,
            "expect": runs[0]["expect"],
        })
    failures = [c for c in cells if c["verdict"] != "pass"]
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "campaign": d0["campaign"],
        "shards_found": [list(s) for s in found],
        "shards_expected": n,
        "total_cells": total,
        "complete": complete,
        "cells": cells,
        "variants": variants,
        "failures": failures,
        "verdict": "pass" if complete and not failures else "fail",
    }


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


def format_merge(report: dict[str, Any]) -> str:
    """The merged report for a terminal: per-variant table, failures, verdict."""
    n = report.get("shards_expected") or (report["shards_found"][0][1]
                                          if report["shards_found"] else 0)
    have = {i for i, _ in report["shards_found"]}
    missing = [f"{i}/{n}" for i in range(1, n + 1) if i not in have]
    total = report.get("total_cells")
    cells_txt = f"{len(report['cells'])}" + (f"/{total}" if total is not None else "")
    lines = [f"campaign {report['campaign']}: {cells_txt} cells, "
             f"{len(have)}/{n} shards" + ("" if report["complete"] else " (INCOMPLETE)")]
    w = max([len("variant")] + [len(v["name"]) for v in report["variants"]])
    lines.append(f"{'variant':<{w}}  {'expect':<9}  {'runs':>4}  {'detected':>8}  "
                 f"{'median ttd':>10}  {'p90 ttd':>9}")
    for v in report["variants"]:
        det = f"{v['detected']}/{v['runs']}"
        lines.append(f"{v['name']:<{w}}  {v['expect']:<9}  {v['runs']:>4}  {det:>8}  "
                     f"{_secs(v['median_ttd_s']):>10}  {_secs(v['p90_ttd_s']):>9}")
    if missing:
        lines.append(f"missing shards: {', '.join(missing)}")
    if report["failures"]:
        lines.append(f"failures ({len(report['failures'])}):")
        for c in report["failures"]:
            res = f" [{c['results']}]" if c.get("results") else ""
            lines.append(f"  FAIL {c['cell_id']}: expected {c['expect']}, "
                         f"got {c['exit_reason']}{res}")
    else:
        lines.append("failures: none")
    lines.append(f"verdict: {report['verdict'].upper()}")
    return "\n".join(lines)
