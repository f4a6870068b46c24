"""What a run tells its user (issue 14): run directories, the cause and its
consequences, who did what, the timeline and the Chrome trace, configs by
name, consistent flags, permissions, a killed resource tracker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stress.config import ConfigError, find_config, parse_duration
from stress.harness.supervisor import StatusSnapshot
from stress.report.explain import annotate, new_run_dir, who
from stress.report.render import chrome_trace, event_text, spte_text, timeline
from stress.report.report import StatusLine
from tests.conftest import ROOT, run_cli, segments_of

SMOKE = str(ROOT / "configs" / "smoke.toml")
NAMES = ["vcpu0", "vcpu1", "zapper2"]


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _cli_elsewhere(cwd: Path, *args: str, timeout: float = 120
                   ) -> subprocess.CompletedProcess[str]:
    """``tdp-stress ARGS`` from another directory (this checkout's package)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "stress.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p


# -- a real run's bundle, shared by the tests that read it ---------------------------

@pytest.fixture(scope="module")
def caught(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("caught")
    r = run_cli("run", SMOKE, "--variant", "zap-without-freeze", "--duration", "20s",
                "--out", str(out), "-q", "--width", "120")
    assert r.returncode == 1, r.stdout + r.stderr
    return out, r


def test_run_prints_the_bundle_and_the_next_commands(caught) -> None:
    out, r = caught
    res = json.loads((out / "latest" / "results.json").read_text())
    first = res["violations"][0]
    bundle = first["bundle"]
    assert f"bundle: {bundle}" in r.stdout
    assert f"tdp-stress repro {bundle}" in r.stdout and f"tdp-stress hunt {bundle}" in r.stdout
    # one cause: one bundle; the rest are its consequences (bundled with --keep-going)
    assert [p.name for p in (out / "latest" / "bundles").iterdir()] == [Path(bundle).name]
    assert all(v.get("consequence_of") == 0 and "bundle" not in v
               for v in res["violations"][1:])
    assert "detected by " in first["who"] and first["who"] in r.stdout
    # repro.sh asks `tdp-stress repro` (the same hit test as the command)
    assert "tdp-stress repro" in (Path(bundle) / "repro.sh").read_text()


def test_summary_header_and_role_table(caught) -> None:
    _out, r = caught
    head = r.stdout.splitlines()[0]
    assert "variant zap-without-freeze" in head and "TD (tdx" in head
    assert "smoke.toml" in head
    table = r.stdout[r.stdout.index("role "):].splitlines()
    rows = [table[0]] + [ln for ln in table[1:4] if ln.split()[0] in ("vcpu", "zapper",
                                                                     "invalidator")]
    assert len(rows) == 4
    # aligned: the numbers of every row end in the same columns as the header's titles
    ends = [[m.end() for m in re.finditer(r"\S+", row)] for row in rows]
    assert all(e[1:3] == ends[0][1:3] for e in ends), rows
    assert "retries: faults that returned RET_PF_RETRY" in r.stdout
    assert "counters by role:" in r.stdout and "totals:" not in r.stdout


def test_run_directories_and_latest(tmp_path: Path) -> None:
    a = new_run_dir(tmp_path)
    b = new_run_dir(tmp_path)
    assert a != b and a.parent == b.parent == tmp_path
    assert (tmp_path / "latest").resolve() == b.resolve()
    assert os.readlink(tmp_path / "latest") == b.name  # relative: the tree can move


def test_artifacts_are_readable_by_the_group(caught) -> None:
    out, _r = caught
    want_file = (0o666 & ~_umask()) | 0o600
    want_dir = (0o777 & ~_umask()) | 0o700
    latest = (out / "latest").resolve()
    assert latest.stat().st_mode & 0o777 == want_dir
    assert (latest / "results.json").stat().st_mode & 0o777 == want_file
    bundle = next((latest / "bundles").iterdir())
    assert bundle.stat().st_mode & 0o777 == want_dir
    assert (bundle / "hits").stat().st_mode & 0o777 == want_file


def test_timeline_file_shows_full_values(caught) -> None:
    out, _r = caught
    bundle = next((out / "latest" / "bundles").iterdir())
    text = (bundle / "timeline.txt").read_text()
    assert "detected by " in text.splitlines()[1]
    assert re.search(r"0x[0-9a-f]{16}\s+(present|SHADOW_NONPRESENT_VALUE|FROZEN_SPTE)", text)
    assert "gfn=0x" in text and not re.search(r"\bgfn=(?!0x)\d", text)
    assert max(len(line) for line in text.splitlines()[3:]) <= 120  # --width 120


def test_chrome_trace_has_slices_and_names(caught) -> None:
    out, _r = caught
    bundle = next((out / "latest" / "bundles").iterdir())
    trace = json.loads((bundle / "trace.chrome.json").read_text())["traceEvents"]
    meta = [e for e in trace if e["ph"] == "M"]
    procs = [e for e in meta if e["name"] == "process_name"]
    assert len(procs) == 1 and "zap-without-freeze" in procs[0]["args"]["name"]
    threads = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert {"vcpu0", "vcpu1", "zapper2", "zapper3", "invalidator4"} <= set(threads.values())
    assert {e["pid"] for e in trace} == {procs[0]["pid"]}  # one process: the run
    slices = [e for e in trace if e["ph"] in ("X", "B", "E")]
    faults = {threads[e["tid"]] for e in slices if e["cat"] == "fault"}
    locks = {threads[e["tid"]] for e in slices if e["cat"] == "mmu_lock"}
    # every worker that faulted or took mmu_lock in the kept window has its slices
    events = [json.loads(line) for line in (bundle / "trace.jsonl").read_text().splitlines()]
    faulted = {f"{e['role']}{e['worker']}" for e in events if e["event"] == "fault-end"}
    locked = {f"{e['role']}{e['worker']}" for e in events
              if e["event"] == "lock" and e["op"].endswith("unlock")}
    assert faulted and faulted <= faults
    assert len(locked) >= 2 and locked <= locks
    assert all(e["dur"] > 0 for e in slices if e["ph"] == "X")
    # slices nest on every thread (Perfetto needs it): none straddles another's end
    for tid in threads:
        xs = sorted(((e["ts"], e["ts"] + e["dur"]) for e in slices
                     if e["tid"] == tid and e["ph"] == "X"), key=lambda x: (x[0], -x[1]))
        stack: list[tuple[float, float]] = []
        for b, end in xs:
            while stack and stack[-1][1] <= b:
                stack.pop()
            assert not stack or end <= stack[-1][1] + 1e-6, (threads[tid], b, end, stack[-1])
            stack.append((b, end))


# -- attribution and the renderers ----------------------------------------------------

def test_who_names_every_worker_of_a_violation() -> None:
    v = {"invariant": "SPTE installed in removed table", "worker": 2,
         "details": {"installed_by_worker": 0, "removed_by_worker": 2, "worker": 2}}
    assert who(v, NAMES) == "installed by vcpu0, removed by zapper2, detected by zapper2"
    checker = {"invariant": "x", "worker": "checker", "found_by": "quiescent",
               "details": {"converting_worker": 1, "unknown_worker": -1}}
    assert who(checker, NAMES) == "converting by vcpu1, detected by the quiescent check"
    vs = [dict(v), dict(checker)]
    annotate(vs, NAMES)
    assert "consequence_of" not in vs[0] and vs[1]["consequence_of"] == 0


def _ev(seq: int, worker: int, event: str, **kw: object) -> dict:
    return {"seq": seq, "t_ns": 1000 * seq, "worker": worker,
            "role": ["vcpu", "vcpu", "zapper"][worker], "event": event, **kw}


EVENTS = [
    _ev(1, 0, "fault", gfn=0x8202, write=True),
    _ev(2, 0, "lock", op="read_lock"),
    _ev(3, 0, "spte", gfn=0x8202, level=1, old="SHADOW_NONPRESENT_VALUE",
        new="present(pfn=0x100008202,W)", old_spte=f"{1 << 63:#018x}",
        new_spte=f"{0x0600100008202b07:#018x}"),
    _ev(4, 2, "lock", op="write_lock"),
    _ev(5, 0, "seamcall", call="TDH.MEM.PAGE.AUG", gfn=0x8202, level=1,
        status="TDX_EPT_ENTRY_STATE_INCORRECT", status_code="0xc0000b0d00000001"),
    _ev(6, 0, "lock", op="read_unlock"),
    _ev(7, 0, "fault-end", gfn=0x8202, ret="RETRY"),
    _ev(8, 2, "lock", op="write_unlock"),
]


def test_timeline_wraps_instead_of_cutting() -> None:
    text = timeline(EVENTS, width=90)
    lines = text.splitlines()
    assert lines[0].split() == ["vcpu0", "zapper2"]
    assert max(len(line) for line in lines) <= 90
    flat = " ".join(line.strip() for line in lines)
    # every value in full, even in a narrow column
    assert "0x0600100008202b07" in flat and "present(pfn=0x100008202,W,A,D)" in flat
    assert "TDX_EPT_ENTRY_STATE_INCORRECT (0xc0000b0d00000001)" in flat.replace("\n", "")
    assert spte_text(1 << 63) == "0x8000000000000000 SHADOW_NONPRESENT_VALUE"
    # the root and table of an entry, where the event carries them
    lost = dict(EVENTS[2], event="spte-write", root="mirror", table=5, failed=True)
    assert event_text(lost).startswith("cmpxchg L1[gfn 0x8202] (mirror table 0x5) expected ")


def test_chrome_trace_slices_cut_by_the_window() -> None:
    trace = json.loads(chrome_trace(EVENTS[3:], "t", NAMES))["traceEvents"]
    xs = {(e["cat"], e["tid"]): e for e in trace if e["ph"] == "X"}
    # vcpu0's fault and lock began before the window: they start at its first event
    assert xs[("fault", 1)]["ts"] == 0 and "before" in xs[("fault", 1)]["args"]["note"]
    assert xs[("mmu_lock", 1)]["args"]["mode"] == "read"
    assert xs[("mmu_lock", 3)]["args"]["mode"] == "write" and xs[("mmu_lock", 3)]["dur"] == 4


def test_status_line_fits_the_terminal() -> None:
    snap = StatusSnapshot(12.3, 60.0, {r: __import__("collections").Counter(faults=10**6,
                                                                            ops=10**5)
                                       for r in ("vcpu", "zapper", "invalidator",
                                                 "notifier", "converter")},
                          {r: 2 for r in ("vcpu", "zapper", "invalidator", "notifier",
                                          "converter")}, 0, 3)
    full = StatusLine().render(snap)
    assert len(full) > 80
    short = StatusLine().render(snap, 80)
    assert len(short) <= 80 and short.startswith("[") and short.endswith("violations 0")


# -- configs by name ---------------------------------------------------------------------

def test_shipped_configs_by_name_from_anywhere(tmp_path: Path) -> None:
    assert find_config("smoke") == find_config("smoke.toml")
    assert find_config("smoke").read_text() == Path(SMOKE).read_text()
    with pytest.raises(ConfigError, match="not a shipped config"):
        find_config("no-such-config")
    r = _cli_elsewhere(tmp_path, "configs")
    assert r.returncode == 0
    assert re.search(r"^smoke +A short CI smoke job", r.stdout, re.M), r.stdout
    r = _cli_elsewhere(tmp_path, "run", "smoke", "--duration", "1s", "--vcpus", "auto",
                       "--out", "o", "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # stdout is the JSON; the summary went to stderr
    assert res["roles"]["vcpu"]["workers"] == len(os.sched_getaffinity(0))
    assert "tdp-stress run:" in r.stderr
    assert Path(res["run_dir"]).parent == tmp_path / "o"


@pytest.mark.stress
def test_stress_run_fixture_takes_a_config_name(stress_run) -> None:
    res = stress_run("smoke", duration="1s")
    assert res["exit_reason"] == "clean"


# -- flags ----------------------------------------------------------------------------

def test_compound_durations() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("2m30s") == 150
    with pytest.raises(ConfigError):
        parse_duration("1h30")


@pytest.mark.parametrize("args, needle", [
    (["run", "--junit", "/nonexistent-dir/j.xml"], "does not exist"),
    (["run", "--json", "/nonexistent-dir/r.json"], "does not exist"),
    (["soak", "--epoch", "0"], "epoch"),
    (["zoo", "--cap", "0"], "cap"),
    (["run", "--vcpus", "many"], "vcpus"),
])
def test_bad_flags_exit_2_and_leave_nothing(tmp_path: Path, args: list[str],
                                            needle: str) -> None:
    r = run_cli(*args, "--out", str(tmp_path / "out")) if args[0] != "zoo" else \
        run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdp-stress: error:") and needle in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd", ["run", "soak", "hunt", "zoo", "bench", "repro", "replay",
                                 "shrink", "campaign"])
def test_every_long_running_command_has_the_same_flags(cmd: str) -> None:
    r = run_cli(cmd, "--help")
    assert r.returncode == 0
    assert "-q, --quiet" in r.stdout and "--plain" in r.stdout
    if cmd in ("run", "soak", "hunt", "zoo", "bench", "repro"):
        assert "--variant-file" in r.stdout
    if cmd in ("run", "soak", "hunt", "zoo", "bench", "repro", "replay"):
        assert "FILE|-" in r.stdout  # --json FILE or - for stdout


def test_zoo_names_what_it_did_not_detect(tmp_path: Path) -> None:
    # root-put-resurrect is safe in this model: the zoo cannot catch it
    r = run_cli("zoo", "--variant", "root-put-resurrect", "--seeds", "1", "--cap", "1s",
                "--fixed", "0", "-q")
    assert r.returncode == 1
    assert r.stdout.strip().splitlines()[-1] == \
        "zoo FAILED: not detected (1 of 1): root-put-resurrect"


def test_zoo_takes_a_variant_file() -> None:
    example = str(ROOT / "examples" / "user_variant.py")
    r = run_cli("zoo", "--variant-file", example, "--variant", "mirror-link-no-freeze",
                "--seeds", "1", "--cap", "20s", "--fixed", "0", "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["variants"][0]["detected"] == 1


# -- a killed resource tracker ------------------------------------------------------------

def test_killed_resource_tracker_prints_no_traceback(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "stress.cli", "run", SMOKE, "--duration",
                          "3s", "--out", str(tmp_path), "-q"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    tracker = None
    while tracker is None and time.monotonic() < deadline:
        tracker = next((c for c in psutil.Process(p.pid).children()
                        if "resource_tracker" in " ".join(c.cmdline())), None)
        time.sleep(0.05)
    assert tracker is not None
    tracker.kill()
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "Traceback" not in err and "resource_tracker" not in err, err
    assert segments_of(p.pid) == []
