"""Soak runs: many epochs of fresh seeds, a checkpoint after each, a clock that holds.

Design note.  A soak is a sequence of epochs; each epoch is one ordinary run
(a fresh arena, fresh workers, its own quiescent checks and teardown check) on
a seed derived from the master seed, so every epoch is reproducible on its
own with ``tdp-stress run --seed``.  After every epoch the checkpoint file is
rewritten atomically: a soak killed at 3 a.m. still says which epochs and
seeds it covered and what it found.  Without ``keep_going`` the first
violation ends the soak; with it, each distinct violation gets a bundle (see
``repro/bundle.py``) and the soak goes on.  Crashes, hangs, leaks and interrupts
always end it.

Time: epochs are cut so the last one ends on time, and every run gets the
soak's hard deadline (duration + 5 s) as its own, so the soak ends within
duration + 5 s whatever the workers do.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stress import __version__
from stress import config as config_mod
from stress.config import Config
from stress.harness.supervisor import (
    EXIT_CODES,
    OVERRUN_S,
    Interrupted,
    StatusSnapshot,
)
from stress.jobs.run import run_job
from stress.report.progress import SoakStatus
from stress.report.report import now_iso, write_json_atomic

SCHEMA = "tdp-stress-soak"
SCHEMA_VERSION = 1
MIN_EPOCH_S = 1.0


def epoch_seed(master: int, index: int) -> int:
    """The seed of epoch ``index``: a pure function of the master seed."""
    h = hashlib.sha256(f"tdp-stress-soak:{master}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


class Soak:
    def __init__(self, cfg: Config, duration: float, epoch: float, keep_going: bool,
                 out_dir: Path, on_status: Callable[[SoakStatus], None] | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 width: int = 0) -> None:
        self.cfg = cfg
        self.width = width  # of the bundles' timeline.txt
        self.duration = duration
        self.epoch = epoch
        self.keep_going = keep_going
        self.out = out_dir
        self.on_status = on_status
        self.on_epoch = on_epoch
        self.epochs: list[dict[str, Any]] = []
        self.bundles: dict[str, dict[str, Any]] = {}
        self.totals: Counter[str] = Counter()
        self.started_at = now_iso()
        self.t0 = 0.0
        self.exit_reason = "clean"
        self.errors: list[str] = []

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.json"

    def report(self, complete: bool) -> dict[str, Any]:
        elapsed = time.monotonic() - self.t0 if self.t0 else 0.0
        dur = max(elapsed, 1e-9)
        code = EXIT_CODES[self.exit_reason]
        if self.cfg.run.expect_violation and code in (0, 1):
            code = 1 - code
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tool_version": __version__,
            "command": "soak", "complete": complete,
            "exit_reason": self.exit_reason, "exit_code": code,
            "variant": self.cfg.run.variant, "master_seed": self.cfg.run.seed,
            "planned_duration_s": self.duration, "epoch_s": self.epoch,
            "keep_going": self.keep_going, "started_at": self.started_at,
            "duration_s": round(elapsed, 3),
            "epochs_done": len(self.epochs),
            "seeds": [e["seed"] for e in self.epochs],
            "config": self.cfg.to_dict(),
            "totals": dict(sorted(self.totals.items())),
            "rates_per_s": {k: round(v / dur, 1) for k, v in sorted(self.totals.items())},
            "distinct_violations": list(self.bundles.values()),
            "epochs": self.epochs,
            "errors": self.errors,
        }

    def _checkpoint(self) -> None:
        write_json_atomic(self.checkpoint_path, self.report(complete=False))

    def run(self) -> dict[str, Any]:
        def on_signal(signum: int, _frame: object) -> None:
            raise Interrupted(signum)

        old_int = signal.signal(signal.SIGINT, on_signal)
        old_term = signal.signal(signal.SIGTERM, on_signal)
        self.t0 = time.monotonic()
        deadline = self.t0 + self.duration
        hard_deadline = deadline + OVERRUN_S
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._checkpoint()
            index = 0
            while True:
                left = deadline - time.monotonic()
                if left < MIN_EPOCH_S or (index and left < MIN_EPOCH_S):
                    break
                d = min(self.epoch, left - 0.5 if left > MIN_EPOCH_S + 0.5 else left)
                reason = self._one_epoch(index, d, hard_deadline)
                index += 1
                self._checkpoint()
                if reason == "violation" and self.keep_going:
                    continue
                if reason != "clean":
                    self.exit_reason = reason
                    break
            if self.exit_reason == "clean" and self.bundles:
                self.exit_reason = "violation"
        except Interrupted:
            self.exit_reason = "interrupted"
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                final = self.report(complete=self.exit_reason != "interrupted")
                write_json_atomic(self.checkpoint_path, final)
                write_json_atomic(self.out / "results.json", final)
            finally:
                signal.signal(signal.SIGINT, old_int)
                signal.signal(signal.SIGTERM, old_term)
        return final

    def _one_epoch(self, index: int, duration: float, hard_deadline: float) -> str:
        seed = epoch_seed(self.cfg.run.seed, index)
        cfg = config_mod.load_from(self.cfg, {"run": {"seed": seed, "duration": duration,
                                                      "out": str(self.out)}})

        def status(snap: StatusSnapshot) -> None:
            if self.on_status:
                self.on_status(SoakStatus(time.monotonic() - self.t0, self.duration, index,
                                          seed, len(self.epochs), snap, len(self.bundles),
                                          self.totals))

        # the first violation of an epoch is its cause; the others are marked as
        # its consequences and bundled only with keep_going
        outcome, res = run_job(cfg, self.out, status, hard_deadline, self.keep_going,
                               self.width)
        started = res["started_at"]
        for v in res["violations"]:
            if "bundle" not in v:
                continue
            path = v["bundle"]
            b = self.bundles.setdefault(path, {"bundle": path,
                                                    "invariant": v["invariant"],
                                                    "variant": v["variant"], "hits": 0,
                                                    "first_epoch": index, "first_seed": seed})
            b["hits"] += 1
        for r in res["roles"].values():
            self.totals.update(r["counters"])
        rec = {
            "epoch": index, "seed": seed, "started_at": started,
            "duration_s": res["duration_s"], "exit_reason": outcome.exit_reason,
            "roles": {k: {"ops": v["ops"], "ops_per_s": v["ops_per_s"], "retries": v["retries"]}
                      for k, v in res["roles"].items()},
            "checks": res["checks"], "violations": res["violations"], "errors": res["errors"],
            "hang": res["hang"],
            "heap_mb": {str(w["index"]): [w["heap_start_mb"], w["heap_end_mb"]]
                        for w in res["workers"]},
            "max_rss_mb": max((w["max_rss_mb"] for w in res["workers"]), default=0.0),
        }
        self.epochs.append(rec)
        self.errors.extend(res["errors"])
        if self.on_epoch:
            self.on_epoch(rec)
        return outcome.exit_reason
