"""results.json, the live status line and the end-of-run summary.

results.json schema, version 1 (``"schema": "tdp-stress-results"``); see the
README for every field.  History: 1 = first version.
Files are written atomically (temp file in the same directory, fsync, rename):
a killed run never leaves a half-written results.json.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from stress import __version__
from stress.config import Config
from stress.files import readable
from stress.harness.supervisor import EXIT_CLEAN, EXIT_VIOLATION, RunOutcome, StatusSnapshot

SCHEMA = "tdp-stress-results"
SCHEMA_VERSION = 1

# the op counter that measures each role's work
ROLE_OP = {"vcpu": "faults", "zapper": "ops", "invalidator": "fast_zaps"}
HEADLINE = ("faults", "retries", "zap_retry", "tables_linked", "tables_freed", "leaf_zaps",
            "leaf_zaps_shared",
            "subtree_zaps_shared", "subtree_zaps_exclusive", "entries_zapped", "seamcalls",
            "seamcall_busy", "mirror_restores", "sept_removes", "sept_tables_removed",
            "roots_created", "roots_freed", "fast_zaps", "yields", "unsync_marked",
            "unsync_lock_contended", "syncs", "emulated_writes")
# a TD's counters (results.json "tdx"): the module's other callers, removals, the
# initial image, pre-faults, and where BUSY came from
TDX_COUNTERS = ("vp_enters", "td_entry_waits", "zero_step_walks", "zero_step_exits",
                "tdcalls", "accepts", "map_gpa_calls", "local_retries", "local_retry_exits",
                "page_augs", "sept_adds", "page_adds", "init_mem_pages", "sept_removes",
                "tdx_tracks", "no_vcpus_retries", "sept_tables_reclaimed", "prefaulted",
                "vcpu_ioctls", "seamcalls", "seamcall_busy", "mirror_restores")


def tdx_summary(totals: Counter[str]) -> dict[str, Any]:
    """BUSY answers by the pair that collided (``"TDH.MEM.PAGE.AUG<VP.ENTER"``:
    an AUG refused because a TDH.VP.ENTER held the lock; holders are KVM, VP.ENTER,
    TDCALL, or ? when the holder let go before it could be read) and the TD's
    counters."""
    pairs = {k[len("busy:"):]: v for k, v in sorted(totals.items()) if k.startswith("busy:")}
    by_holder: Counter[str] = Counter()
    for k, v in pairs.items():
        by_holder[k.rsplit("<", 1)[-1]] += v
    return {"busy_by_pair": pairs, "busy_by_holder": dict(sorted(by_holder.items())),
            "counters": {k: totals.get(k, 0) for k in TDX_COUNTERS}}


def final_exit_code(outcome: RunOutcome, expect_violation: bool) -> int:
    """--expect-violation swaps the meaning of 0 and 1 (CI jobs that prove a bug is caught)."""
    code = outcome.exit_code
    if expect_violation and code in (EXIT_CLEAN, EXIT_VIOLATION):
        return EXIT_VIOLATION if code == EXIT_CLEAN else EXIT_CLEAN
    return code


def build_results(cfg: Config, outcome: RunOutcome, started_at: str) -> dict[str, Any]:
    dur = max(outcome.duration_s, 1e-9)
    roles: dict[str, dict[str, Any]] = {}
    totals: Counter[str] = Counter()
    for rec in outcome.workers:
        r = roles.setdefault(rec.role, {"workers": 0, "counters": Counter()})
        r["workers"] += 1
        r["counters"].update({k: v for k, v in rec.stats.items()
                              if not k.startswith("max_")})
        totals.update({k: v for k, v in rec.stats.items() if not k.startswith("max_")})
    for role, r in roles.items():
        ops = r["counters"].get(ROLE_OP.get(role, "ops"), 0)
        r["ops"] = ops
        r["ops_per_s"] = round(ops / dur, 1)
        r["retries"] = r["counters"].get("retries", 0) + r["counters"].get("zap_retry", 0)
        r["counters"] = dict(sorted(r["counters"].items()))
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "command": "run",
        "exit_reason": outcome.exit_reason,
        "exit_code": final_exit_code(outcome, cfg.run.expect_violation),
        "expect_violation": cfg.run.expect_violation,
        "variant": cfg.run.variant,
        "seed": cfg.run.seed,
        "started_at": started_at,
        "duration_s": outcome.duration_s,
        "config": cfg.to_dict(),
        "pool_pages": outcome.pool_pages,
        "engine": outcome.engine or {"engine": "python"},
        "roles": roles,
        "totals": {k: totals.get(k, 0) for k in HEADLINE},
        "tdx": tdx_summary(totals) if cfg.vm.type == "tdx" else None,
        "rates_per_s": {k: round(totals.get(k, 0) / dur, 1) for k in HEADLINE},
        "workers": [{"index": r.index, "role": r.role, "pid": r.pid, "exitcode": r.exitcode,
                     "max_rss_mb": round(r.max_rss / 2**20, 1),
                     "heap_start_mb": round(r.heap_start / 2**20, 1),
                     "heap_end_mb": round(r.heap_end / 2**20, 1),
                     "stats": dict(sorted(r.stats.items()))} for r in outcome.workers],
        "checks": outcome.checks,
        "violations": outcome.violations,
        "errors": outcome.errors,
        "hang": outcome.hang,
        # a crashed worker's last protocol events (the full merged trace of a
        # violation goes to its bundle)
        "crash_trace": {str(r.index): [e for e in outcome.trace if e["worker"] == r.index][-20:]
                        for r in outcome.workers if r.exitcode not in (0, 1, None)
                        and outcome.exit_reason == "crash"},
    }


def format_soak_summary(res: dict[str, Any], results_path: Path | None) -> str:
    lines = [f"tdp-stress soak: variant {res['variant']}, master seed {res['master_seed']}, "
             f"{res['epochs_done']} epochs in {res['duration_s']:.1f} s of "
             f"{res['planned_duration_s']:.0f} s, exit {res['exit_reason']} ({res['exit_code']})"]
    rates = res["rates_per_s"]
    lines.extend(_wrap("rates: ", [f"{k} {_si(rates[k])}/s" for k in HEADLINE if rates.get(k)],
                       100))
    for b in res["distinct_violations"]:
        lines.append(f"VIOLATION [{b['invariant']}] x{b['hits']} (first in epoch "
                     f"{b['first_epoch']}, seed {b['first_seed']}): {b['bundle']}")
    if not res["distinct_violations"]:
        lines.append("violations: none")
    for e in res["errors"][:5]:
        lines.append("ERROR: " + e.strip().splitlines()[-1])
    if results_path:
        lines.append(f"results: {results_path} (checkpoint: {results_path.parent}/"
                     "checkpoint.json)")
    return "\n".join(lines)


def write_junit(path: Path, suite: str, cases: list[dict[str, Any]]) -> Path:
    """JUnit XML for CI: one <testcase> per run or epoch.

    Each case: name, time_s, outcome ("pass", "failure", "error", "skipped"),
    message, details (text).  Written atomically.
    """
    from xml.etree import ElementTree as ET

    failures = sum(c["outcome"] == "failure" for c in cases)
    errors = sum(c["outcome"] == "error" for c in cases)
    skipped = sum(c["outcome"] == "skipped" for c in cases)
    ts = ET.Element("testsuite", name=suite, tests=str(len(cases)), failures=str(failures),
                    errors=str(errors), skipped=str(skipped),
                    time=f"{sum(c['time_s'] for c in cases):.3f}")
    for c in cases:
        tc = ET.SubElement(ts, "testcase", classname=suite, name=c["name"],
                           time=f"{c['time_s']:.3f}")
        if c["outcome"] != "pass":
            el = ET.SubElement(tc, c["outcome"], message=c.get("message", ""))
            el.text = c.get("details", "")
    tree = ET.ElementTree(ET.Element("testsuites"))
    tree.getroot().append(ts)
    ET.indent(tree)
    # the CLI refuses a --junit path in a missing directory before the run starts
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        tree.write(f, encoding="utf-8", xml_declaration=True)
    readable(tmp)
    os.replace(tmp, path)
    return path


def junit_case(name: str, time_s: float, exit_reason: str, expect_violation: bool,
               violations: list[dict[str, Any]], errors: list[str]) -> dict[str, Any]:
    """The JUnit verdict of one run: a violation is a failure (a pass when it was
    expected), a crash, hang or leak an error, an interrupt skipped."""
    first = violations[0] if violations else None
    if exit_reason == "violation":
        outcome = "pass" if expect_violation else "failure"
        msg = f"{first['invariant']}: {first['message']}" if first else "violation"
    elif exit_reason == "clean":
        outcome = "failure" if expect_violation else "pass"
        msg = "expected a violation, none found" if expect_violation else ""
    elif exit_reason == "interrupted":
        outcome, msg = "skipped", "interrupted"
    else:
        outcome, msg = "error", f"{exit_reason}: " + (errors[0].strip().splitlines()[-1]
                                                      if errors else exit_reason)
    details = json.dumps({"violations": violations, "errors": errors}, indent=1, default=str)
    return {"name": name, "time_s": time_s, "outcome": outcome, "message": msg,
            "details": details}


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _si(x: float) -> str:
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suf}"
    return f"{x:.0f}"


class StatusLine:
    """Renders a StatusSnapshot as one line of rates since the previous one.

    With ``width`` the line fits in it: fields are dropped least important
    first (tables, retries, the roles' worker counts and op names, then roles
    from the last), never the clock, the checks or the violations."""

    def __init__(self) -> None:
        self.prev: StatusSnapshot | None = None

    def render(self, s: StatusSnapshot, width: int | None = None) -> str:
        prev = self.prev
        self.prev = s
        dt = s.elapsed_s - prev.elapsed_s if prev else s.elapsed_s
        dt = max(dt, 1e-6)

        def rate(role: str, key: str) -> float:
            now = s.per_role.get(role, Counter())[key]
            before = prev.per_role.get(role, Counter())[key] if prev else 0
            return (now - before) / dt

        head = f"[{s.elapsed_s:6.1f}s/{s.duration_s:.0f}s]"
        roles, compact = [], []
        for role in s.per_role:
            op = ROLE_OP.get(role, "ops")
            roles.append(f"{role} x{s.workers[role]} {_si(rate(role, op))} {op}/s")
            compact.append(f"{role} {_si(rate(role, op))}/s")
        tot = {k: sum(rate(r, k) for r in s.per_role) for k in
               ("retries", "zap_retry", "tables_linked", "tables_freed")}
        extra = [f"retries {_si(tot['retries'] + tot['zap_retry'])}/s",
                 f"tables +{_si(tot['tables_linked'])}/-{_si(tot['tables_freed'])}/s"]
        tail = [f"checks {s.checks}", f"violations {s.violations}"]

        def line(r: list[str], x: list[str]) -> str:
            return " | ".join([head, *r, *x, *tail])

        text = line(roles, extra)
        if width is None:
            return text
        while len(text) > width and extra:
            extra.pop()
            text = line(roles, extra)
        if len(text) > width:  # "vcpu 7.9k/s": the role's op rate, no counts or names
            roles = compact
            text = line(roles, extra)
        while len(text) > width and roles:
            roles.pop()
            text = line(roles, extra)
        return text[:width]


# what the summary says about retries (a column of the role table)
RETRIES_NOTE = ("retries: faults that returned RET_PF_RETRY (a lost cmpxchg, a frozen SPTE, "
                "a TDX_OPERAND_BUSY unwound, an invalidation in progress) and zaps that lost "
                "a cmpxchg and went again: the protocol's normal answer to contention, not "
                "an error")


def _wrap(prefix: str, items: list[str], width: int) -> list[str]:
    """``prefix item, item, ...`` wrapped at ``width``, continuation lines indented."""
    import textwrap

    nbsp = "\u00a0"  # an item ("faults 304") is never split across lines
    lines = textwrap.wrap(", ".join(i.replace(" ", nbsp) for i in items), width,
                          initial_indent=prefix, subsequent_indent=" " * len(prefix),
                          break_on_hyphens=False)
    return [line.replace(nbsp, " ") for line in lines] or [prefix.rstrip()]


def format_summary(res: dict[str, Any], results_path: Path | None, width: int = 100) -> str:
    from stress.report.render import details_text, hexify

    cfg = res.get("config") or {}
    vm = (cfg.get("vm") or {}).get("type", "?")
    vm_name = {"tdx": "TD (tdx: direct and mirror roots)", "default": "default VM (direct root)"
               }.get(vm, vm)
    config_file = res.get("config_file")
    lines = [f"tdp-stress run: variant {res['variant']}, seed {res['seed']}, {vm_name}"
             + (f", config {config_file}" if config_file else ""),
             f"{res['duration_s']:.1f} s, exit {res['exit_reason']} ({res['exit_code']})"]
    roles = res["roles"]
    rw = max([len("role")] + [len(r) for r in roles])
    lines.append(f"{'role':<{rw}}  {'workers':>7}  {'ops':>10}  {'op':<10}  {'ops/s':>8}  "
                 f"{'retries':>9}")
    for role, r in roles.items():
        op = ROLE_OP.get(role, "ops")
        lines.append(f"{role:<{rw}}  {r['workers']:>7}  {r['ops']:>10}  {op:<10}  "
                     f"{_si(r['ops_per_s']):>8}  {r['retries']:>9}")
    lines.extend(_wrap("", [RETRIES_NOTE], width))
    lines.append("counters by role:")
    for role, r in roles.items():
        items = [f"{k} {v}" for k, v in r["counters"].items() if v]
        lines.extend(_wrap(f"  {role + ':':<{rw + 1}} ", items, width))
    checks = res["checks"]
    lines.append("checks: " + (", ".join(f"{k} {v}" for k, v in checks.items()) or "none"))
    if res["violations"]:
        for i, v in enumerate(res["violations"][:5]):
            det = v.get("details", {})
            where = details_text({k: det[k] for k in ("gfn", "level", "table", "root")
                                  if k in det})
            tag = "VIOLATION" if i == 0 else "  consequence"
            lines.append(f"{tag} [{v['invariant']}] at {v.get('time_s', 0):.3f}s: "
                         f"{hexify(str(v['message']))}" + (f" ({where})" if where else ""))
            if v.get("who"):
                lines.append(f"{'':{len(tag)}}   {v['who']}")
        more = len(res["violations"]) - 5
        if more > 0:
            lines.append(f"  ... and {more} more consequence(s) in results.json")
    else:
        lines.append("violations: none")
    for e in res["errors"][:5]:
        lines.append("ERROR: " + e.strip().splitlines()[-1] if "\n" in e.strip() else
                     "ERROR: " + e)
    for w, evs in (res.get("crash_trace") or {}).items():
        from stress.report.render import event_text

        lines.append(f"last events of worker {w}: " + "; ".join(event_text(e)
                                                              for e in evs[-5:]))
    hang = res.get("hang")
    if hang:
        stuck = ", ".join(f"worker {s['worker']} ({s['role']}, pid {s['pid']})"
                          for s in hang["stuck"])
        lines.append(f"HANG: {hang['what']}: {stuck}; mmu_lock {hang['mmu_lock']} held for "
                     f"write by worker {hang['mmu_lock_write_owner_worker']}; holders "
                     f"{json.dumps(hang['mmu_lock_holders'])}; stacks of "
                     f"{len(hang['stacks'])} workers in results.json")
    if results_path:
        lines.append(f"results: {results_path}")
    first = res["violations"][0] if res["violations"] else None
    if first and first.get("bundle"):
        from stress.report.explain import next_steps

        lines.append(next_steps(first["bundle"]))
    return "\n".join(lines)
