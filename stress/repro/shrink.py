"""Shrinking a controlled-schedule reproducer while it still fails.

A hunted bundle replays exactly (hunt.py), so "does this smaller reproducer
still fail?" is one run, and the shrinker is a plain greedy reducer in the
manner of Hypothesis and delta debugging.  Each pass proposes smaller configs,
runs each once, and keeps one only if it reports the same invariant; a kept
candidate is then *normalised* to the switch points its run recorded, so the
next pass starts from exactly what happened.  The passes, repeated while any
of them makes progress:

* **cap ops**: each worker stops after the op it was in when the run ended;
* **workers**: a worker capped at 0 ops takes no part at all;
* **ops**: delete ranges of a worker's ops (halves, quarters, ... single ops).
  Each op draws from its own seed (workers.Worker.op_seed) and switch points
  are keyed by (worker, op, access), so deleting op k leaves the later ops'
  choices and switch points where they were;
* **preemptions**: drop switch points where a worker was preempted;
* **guest**: halve the gfn range and the hot set.

The result is never a reproducer that does not fail: the best config is the
last one whose run failed, and it is run once more before it is returned.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stress.config import Config, ConfigError, load_from
from stress.harness.kernel import supervisor_for
from stress.harness.supervisor import RunOutcome
from stress.repro.bundle import signature
from stress.repro.hunt import replay_config


class ShrinkInterrupted(Exception):
    """SIGINT or SIGTERM reached a run: stop shrinking, write nothing."""


@dataclass
class ShrinkResult:
    config: Config
    outcome: RunOutcome
    runs: int
    elapsed_s: float
    start: dict[str, int]
    end: dict[str, int]
    log: list[str] = field(default_factory=list)


def size(cfg: Config, o: RunOutcome) -> dict[str, int]:
    """What the shrinker minimises, for the report."""
    sc = cfg.schedule
    ops = o.schedule["ops"] if o.schedule else []
    skipped = {(w, k) for w, a, b in sc.skip_ops for k in range(a, b + 1)}
    active = [w for w in range(cfg.n_workers) if not (sc.max_ops and sc.max_ops[w] == 0)]
    return {"workers": len(active),
            "ops": sum(1 for w in active for k in range(ops[w] if w < len(ops) else 0)
                       if (w, k) not in skipped),
            "switches": len(sc.switches),
            "preemptions": o.schedule["preemptions"] if o.schedule else 0,
            "steps": o.schedule["steps"] if o.schedule else 0,
            "guest_size": cfg.guest.size}


def _key(s: dict[str, int]) -> tuple[int, ...]:
    """Smaller is better: fewer workers, then ops, preemptions, steps, guest."""
    return (s["workers"], s["ops"], s["preemptions"], s["steps"], s["guest_size"])


def _without_worker(switches: tuple[tuple[int, int, int, int], ...], w: int
                    ) -> tuple[tuple[int, int, int, int], ...]:
    """The switch points with worker ``w`` gone: a hand-over to ``w`` goes
    instead to whoever ``w`` handed over to next (the log is in global order)."""
    out = []
    for k, (giver, op, acc, to) in enumerate(switches):
        if giver == w:
            continue
        seen = {to}
        j = k
        while to == w:
            j = next((i for i in range(j + 1, len(switches)) if switches[i][0] == w), -1)
            if j < 0:
                break
            to = switches[j][3]
            if to in seen:
                break
            seen.add(to)
        if to != w and to != giver:
            out.append((giver, op, acc, to))
    return tuple(out)


def _ranges(ks: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for k in sorted(ks):
        if out and out[-1][1] == k - 1:
            out[-1] = (out[-1][0], k)
        else:
            out.append((k, k))
    return out


class Shrinker:
    def __init__(self, cfg: Config, violation: dict[str, Any], max_runs: int,
                 max_seconds: float, progress: Callable[[str], None] | None = None) -> None:
        self.want = signature(violation)  # same invariant, variant, role, SEAMCALL
        self.max_runs = max_runs
        self.deadline = time.monotonic() + max_seconds
        self.progress = progress
        self.runs = 0
        self.best = cfg
        self.best_outcome: RunOutcome | None = None
        self.log: list[str] = []

    def _out_of_budget(self) -> bool:
        return self.runs >= self.max_runs or time.monotonic() >= self.deadline

    def attempt(self, cfg: Config, what: str, strict: bool = True) -> bool:
        """Run ``cfg`` once; keep it (normalised) if it fails the same way and
        is smaller (or, not ``strict``, no larger)."""
        if self._out_of_budget():
            return False
        self.runs += 1
        o = supervisor_for(cfg)(cfg).run()
        if o.exit_reason == "interrupted":
            raise ShrinkInterrupted
        ok = bool(o.violations) and signature(o.violations[0]) == self.want \
            and o.schedule is not None and not o.schedule["lost"]
        if ok and self.best_outcome is not None:
            new, old = _key(size(cfg, o)), _key(size(self.best, self.best_outcome))
            ok = new < old or (not strict and new == old)
        if ok:
            self.best = replay_config(cfg, o)
            self.best_outcome = o
            self.log.append(what)
            if self.progress:
                s = size(self.best, o)
                self.progress(f"shrink run {self.runs}: {what}: kept ({s['workers']} workers, "
                              f"{s['ops']} ops, {s['preemptions']} preemptions, "
                              f"{s['steps']} steps)")
        return ok

    def _with(self, **sched: Any) -> Config:
        return dataclasses.replace(self.best,
                                   schedule=dataclasses.replace(self.best.schedule, **sched))

    # -- passes ------------------------------------------------------------------
    def cap_ops(self) -> bool:
        assert self.best_outcome is not None and self.best_outcome.schedule is not None
        ops = self.best_outcome.schedule["ops"]
        caps = tuple(min(c, o) if c >= 0 else o for c, o in zip(
            self.best.schedule.max_ops or [-1] * len(ops), ops, strict=True))
        if caps == self.best.schedule.max_ops:
            return False
        return self.attempt(self._with(max_ops=caps), "cap each worker's ops", strict=False)

    def drop_workers(self, violator: int, tries: int) -> bool:
        """Each worker but the one that reported: first keep the schedule (its
        hand-overs to the worker go to whoever it handed over to), then search
        schedules afresh without it (pct and random, as ``hunt`` does)."""
        from stress.repro.hunt import STRATEGIES, with_schedule

        progress = False
        for w in self._drop_order(violator):
            caps = list(self.best.schedule.max_ops)
            if not caps or caps[w] == 0 or self._out_of_budget():
                continue
            caps[w] = 0
            cand = self._with(max_ops=tuple(caps),
                              switches=_without_worker(self.best.schedule.switches, w))
            if self.attempt(cand, f"drop worker {w}"):
                progress = True
                continue
            steps = 2 * size(self.best, self._outcome())["steps"] + 1000
            for k in range(tries):
                mode, p, depth = STRATEGIES[k % len(STRATEGIES)]
                hunt_cfg = with_schedule(cand, mode=mode, seed=1 + k, switch_p=p or 0.02,
                                         depth=depth, max_steps=steps, switches=())
                if self.attempt(hunt_cfg, f"drop worker {w} ({mode} schedule seed {1 + k})"):
                    progress = True
                    break
        return progress

    def _outcome(self) -> RunOutcome:
        assert self.best_outcome is not None
        return self.best_outcome

    def _drop_order(self, violator: int) -> list[int]:
        """Workers absent from the last events first: they are the likeliest spares."""
        trace = self._outcome().trace[-200:]
        seen = {e["worker"] for e in trace}
        ws = [w for w in range(self.best.n_workers) if w != violator]
        return sorted(ws, key=lambda w: (w in seen, -w))

    def delete_ops(self) -> bool:
        progress = False
        for w in range(self.best.n_workers):
            caps = self.best.schedule.max_ops
            if not caps or caps[w] <= 0:
                continue
            chunk = max(1, caps[w] // 2)
            while chunk >= 1 and not self._out_of_budget():
                k = 0
                while not self._out_of_budget():
                    caps = self.best.schedule.max_ops
                    skipped = {(a, b) for ww, a, b in self.best.schedule.skip_ops if ww == w}
                    live = [i for i in range(caps[w])
                            if not any(a <= i <= b for a, b in skipped)]
                    if k >= len(live):
                        break
                    victim = live[k:k + chunk]
                    others = [s for s in self.best.schedule.skip_ops if s[0] != w]
                    mine = [i for a, b in skipped for i in range(a, b + 1)] + victim
                    skip = tuple(others + [(w, a, b) for a, b in _ranges(mine)])
                    if self.attempt(self._with(skip_ops=skip),
                                    f"worker {w}: delete ops {victim[0]}..{victim[-1]}"):
                        progress = True  # the next chunk now sits at index k
                    else:
                        k += chunk
                chunk //= 2
        return progress

    def drop_preemptions(self) -> bool:
        progress = False
        chunk = max(1, len(self.best.schedule.switches) // 2)
        while chunk >= 1 and not self._out_of_budget():
            k = 0
            while k < len(self.best.schedule.switches) and not self._out_of_budget():
                sw = self.best.schedule.switches
                cand = sw[:k] + sw[k + chunk:]
                if self.attempt(self._with(switches=cand),
                                f"drop switch points {k}..{k + chunk - 1}"):
                    progress = True
                else:
                    k += chunk
            chunk //= 2
        return progress

    def smaller_guest(self) -> bool:
        progress = False
        for key in ("hot_set", "size"):
            g = self.best.guest
            n = getattr(g, key) // 2
            if n < 4096 * (512 if key == "size" else 1):
                continue
            try:
                cand = load_from(self.best, {"guest": {key: n}})
            except ConfigError:
                continue
            progress |= self.attempt(cand, f"guest.{key} = {n >> 10}k")
        return progress

    def run(self) -> ShrinkResult:
        t0 = time.monotonic()
        if not self.attempt(self.best, "the bundle as found"):
            raise ValueError("the bundle does not fail when replayed: nothing to shrink")
        assert self.best_outcome is not None
        start = size(self.best, self.best_outcome)
        violator = int(self.best_outcome.violations[0].get("worker", -1))
        self.cap_ops()
        while not self._out_of_budget():
            progress = self.drop_workers(violator, tries=12)
            progress |= self.delete_ops()
            self.cap_ops()
            progress |= self.drop_preemptions()
            progress |= self.smaller_guest()
            if not progress:
                break
        # the result must fail: run it once more (it is deterministic, so it does)
        final = supervisor_for(self.best)(self.best).run()
        self.runs += 1
        if not (final.violations and signature(final.violations[0]) == self.want):
            raise RuntimeError("the shrunk reproducer did not fail on its final run")
        return ShrinkResult(self.best, final, self.runs, time.monotonic() - t0, start,
                            size(self.best, final), self.log)
