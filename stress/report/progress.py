"""Soak progress: a rich live panel on a terminal, plain lines elsewhere.

Updated from the supervisor's status callback (a few times a second), never
from the workers' loops.  Off a terminal (CI logs, files) it prints one plain
line every ``plain_every`` seconds and one per finished epoch.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from stress.harness.supervisor import StatusSnapshot
from stress.report.report import ROLE_OP, StatusLine, _si


def _hms(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class SoakStatus:
    """What the progress display shows (a soak sends one with each status update)."""

    elapsed_s: float
    duration_s: float
    epoch: int
    epoch_seed: int
    epochs_done: int
    run: StatusSnapshot | None
    distinct_violations: int
    total_ops: Counter[str] = field(default_factory=Counter)


class SoakProgress:
    def __init__(self, live: bool, plain_every: float = 10.0, quiet: bool = False) -> None:
        self.quiet = quiet  # no progress at all (-q)
        self.live_mode = live and not quiet
        self.plain_every = plain_every
        self.console = Console(file=sys.stderr)
        self.live: Live | None = None
        self.last_plain = -1e9
        self.line = StatusLine()
        self.last: SoakStatus | None = None
        self.epoch_lines: list[str] = []

    def __enter__(self) -> SoakProgress:
        if self.live_mode:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4,
                             transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.live is not None:
            self.live.__exit__(et, ev, tb)

    def update(self, st: SoakStatus) -> None:
        if self.last is None or st.epoch != self.last.epoch:
            self.line = StatusLine()  # rates restart with each epoch's run
        self.last = st
        width = self.console.width - 16 if self.live is not None else None  # the panel's label
        run_line = self.line.render(st.run, width) if st.run else ""
        if self.live is not None:
            self.live.update(self._render(run_line))
        elif self.quiet:
            return
        elif st.elapsed_s - self.last_plain >= self.plain_every:
            self.last_plain = st.elapsed_s
            rss = f" rss {st.run.rss_bytes >> 20} MiB" if st.run else ""
            print(f"[soak {_hms(st.elapsed_s)}/{_hms(st.duration_s)}] epoch {st.epoch} "
                  f"(seed {st.epoch_seed}) distinct violations {st.distinct_violations}{rss} "
                  f"{run_line}", file=sys.stderr, flush=True)

    def epoch_done(self, rec: dict[str, Any]) -> None:
        ops = ", ".join(f"{r} {_si(v['ops_per_s'])} {ROLE_OP.get(r, 'ops')}/s"
                        for r, v in rec["roles"].items())
        line = (f"epoch {rec['epoch']} seed {rec['seed']}: {rec['exit_reason']} in "
                f"{rec['duration_s']:.1f} s ({ops}; max rss {rec['max_rss_mb']:.0f} MiB)")
        self.epoch_lines.append(line)
        if self.live is None and not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def _render(self, run_line: str = "") -> Table:
        st = self.last
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        if st is None:
            t.add_row("soak", "starting")
            return t
        t.add_row("elapsed", f"{_hms(st.elapsed_s)} of {_hms(st.duration_s)} "
                             f"({_hms(st.duration_s - st.elapsed_s)} left)")
        t.add_row("epoch", f"{st.epoch} (seed {st.epoch_seed}), {st.epochs_done} done")
        if st.run:
            per: Counter[str] = Counter()
            for role, c in st.run.per_role.items():
                per[role] = c[ROLE_OP.get(role, "ops")]
            t.add_row("this epoch", run_line)
            t.add_row("rss", f"{st.run.rss_bytes >> 20} MiB (all workers)")
        t.add_row("violations", f"{st.distinct_violations} distinct")
        for line in self.epoch_lines[-5:]:
            t.add_row("", line)
        return t
