"""Run control end to end: hangs, leaks, a killed supervisor, soaks, JUnit.

Every test drives real processes with real signals and checks that nothing is
left behind: no segment in /dev/shm, no worker process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import psutil

from tests.conftest import ROOT, run_cli, segments_of

SMOKE = str(ROOT / "configs" / "smoke.toml")
BOOT = str(ROOT / "configs" / "tdx-boot.toml")  # first touches: mirror-no-freeze fast


def _cfg(tmp_path: Path, text: str) -> str:
    p = tmp_path / "job.toml"
    p.write_text(f'[guest]\nsize = "64m"\nhot_set = "64k"\n{text}')
    return str(p)


def _timed(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    t = time.monotonic()
    r = run_cli(*args, timeout=timeout)
    return r, time.monotonic() - t


def test_watchdog_ends_a_hung_run_with_exit_4_and_stacks(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, '[inject]\nhang_after = "1s"\nhang_worker = 2\n'
                         '[run]\nwatchdog = "2s"\nduration = "60s"\n')
    r, wall = _timed("run", cfg, "--out", str(tmp_path), "-q")
    assert r.returncode == 4, r.stdout + r.stderr
    assert wall < 15  # far before the 60 s duration
    hang = json.loads((tmp_path / "latest" / "results.json").read_text())["hang"]
    assert hang["what"].startswith("no progress")
    assert hang["mmu_lock_write_owner_worker"] == 2  # the lock holder is named
    assert "in hang" in hang["stacks"]["2"]  # the hung worker's Python stack
    # a vCPU waiting for mmu_lock: for read (a fault) or for write (a nested TDP sync or an
    # emulated write, which a vCPU does under the write lock)
    assert "read_lock" in hang["stacks"]["0"] or "write_lock" in hang["stacks"]["0"]
    assert "HANG" in r.stdout


def test_duration_holds_when_a_worker_ignores_stop_and_sigterm(tmp_path: Path) -> None:
    # the worker hangs holding mmu_lock for write and ignores SIGTERM; the
    # watchdog is longer than the run, so only the stop sequence can end it
    cfg = _cfg(tmp_path, '[inject]\nhang_after = "1s"\nhang_worker = 0\n'
                         '[run]\nwatchdog = "60s"\nduration = "3s"\n')
    r, wall = _timed("run", cfg, "--out", str(tmp_path), "-q")
    assert r.returncode == 4, r.stdout + r.stderr
    assert wall < 3 + 5 + 2  # duration + 5 s, plus interpreter start-up
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert res["hang"]["what"].startswith("did not stop when asked")
    assert res["workers"][0]["exitcode"] == -signal.SIGKILL


def test_leak_detector_exits_3(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, '[inject]\nleak_per_op = "64k"\n'
                         '[run]\nmax_rss_growth = "32m"\nduration = "60s"\n')
    r, wall = _timed("run", cfg, "--out", str(tmp_path), "-q")
    assert r.returncode == 3, r.stdout + r.stderr
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert res["exit_reason"] == "leak" and "leaks: heap grew" in res["errors"][0]
    assert wall < 30


def test_killed_supervisor_leaves_no_orphans_and_cleanup_removes_its_segment(
        tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "stress.cli", "run", SMOKE, "--duration",
                             "60s", "--out", str(tmp_path), "-q"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    kids: list[psutil.Process] = []
    while time.monotonic() < deadline:
        kids = [c for c in psutil.Process(proc.pid).children()
                if "resource_tracker" not in " ".join(c.cmdline())]
        if len(kids) >= 3 and segments_of(proc.pid):
            break
        time.sleep(0.05)
    assert len(kids) >= 3
    proc.kill()  # SIGKILL: no handler runs, nothing is cleaned up by the supervisor
    proc.wait()
    gone, alive = psutil.wait_procs(kids, timeout=10)  # PR_SET_PDEATHSIG kills workers
    assert not alive
    r = run_cli("cleanup")
    assert r.returncode == 0
    assert segments_of(proc.pid) == []
    # only dead owners' segments are removed: ours (a live test process) are untouched
    assert f"tdpstress-{os.getpid()}-" not in r.stdout


def test_soak_epochs_checkpoint_and_junit(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    r, wall = _timed("soak", SMOKE, "--duration", "7s", "--epoch", "3s", "--seed", "5",
                     "--out", str(out), "--junit", str(tmp_path / "j.xml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert wall < 7 + 5 + 2
    res = json.loads((out / "latest" / "results.json").read_text())
    ck = json.loads((out / "latest" / "checkpoint.json").read_text())
    assert res == ck and res["complete"] and res["exit_reason"] == "clean"
    assert res["schema"] == "tdp-stress-soak" and res["master_seed"] == 5
    assert res["epochs_done"] >= 2 and len(set(res["seeds"])) == res["epochs_done"]
    assert all(e["exit_reason"] == "clean" and e["checks"].get("teardown") == 1
               for e in res["epochs"])
    assert res["totals"]["faults"] > 0
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == str(res["epochs_done"])
    assert suite.get("failures") == "0" and suite.get("errors") == "0"


def test_soak_keep_going_collects_distinct_violations(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    r = run_cli("soak", BOOT, "--variant", "mirror-no-freeze", "--duration", "5s",
                "--epoch", "1s", "--keep-going", "--out", str(out), "--junit",
                str(tmp_path / "j.xml"))
    assert r.returncode == 1, r.stdout + r.stderr
    res = json.loads((out / "latest" / "results.json").read_text())
    assert res["epochs_done"] >= 2  # it went on after the first violation
    bundles = res["distinct_violations"]
    assert bundles and sum(b["hits"] for b in bundles) >= res["epochs_done"]
    for b in bundles:
        d = Path(b["bundle"])
        assert (d / "repro.sh").exists() and (d / "config.toml").exists()
        assert json.loads((d / "violation.json").read_text())["invariant"] == b["invariant"]
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite is not None and int(suite.get("failures", "0")) >= 1


def test_soak_interrupted_keeps_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    proc = subprocess.Popen([sys.executable, "-m", "stress.cli", "soak", SMOKE, "--duration",
                             "60s", "--epoch", "1s", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if json.loads((out / "latest" / "checkpoint.json").read_text())["epochs_done"] >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert segments_of(proc.pid) == []
    ck = json.loads((out / "latest" / "checkpoint.json").read_text())
    assert ck["exit_reason"] == "interrupted" and not ck["complete"]
    assert ck["epochs_done"] >= 2 and len(ck["seeds"]) == ck["epochs_done"]


def test_run_junit_marks_expected_violation_as_pass(tmp_path: Path) -> None:
    j = tmp_path / "run.xml"
    r = run_cli("run", BOOT, "--variant", "mirror-no-freeze", "--expect-violation",
                "--duration", "20s", "--out", str(tmp_path), "--junit", str(j), "-q")
    assert r.returncode == 0
    suite = ET.parse(j).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and suite.get("tests") == "1"
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert Path(res["violations"][0]["bundle"], "repro.sh").exists()


def test_repro_reruns_a_bundle_and_measures_reliability(tmp_path: Path) -> None:
    r = run_cli("run", BOOT, "--variant", "mirror-no-freeze", "--duration", "20s", "--out",
                str(tmp_path), "-q")
    assert r.returncode == 1
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    bundle = Path(res["violations"][0]["bundle"])
    r = run_cli("repro", str(bundle), "--runs", "3", "--stop-after", "2", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((bundle / "repro.json").read_text())
    assert rep["hits"] == 2 and rep["runs"] == 2 and rep["reliability"] == 1.0
    assert len(rep["times_to_hit_s"]) == 2 and "2/2 runs hit" in r.stdout
    bad = run_cli("repro", str(tmp_path))
    assert bad.returncode == 2 and "not a reproducer bundle" in bad.stderr


def test_violation_bundle_holds_the_merged_trace(tmp_path: Path) -> None:
    r = run_cli("run", BOOT, "--variant", "mirror-no-freeze", "--duration", "20s", "--out",
                str(tmp_path), "-q")
    assert r.returncode == 1
    v = json.loads((tmp_path / "latest" / "results.json").read_text())["violations"][0]
    bundle = Path(v["bundle"])
    events = [json.loads(line) for line in (bundle / "trace.jsonl").read_text().splitlines()]
    assert len(events) > 20  # caught within milliseconds: a short, merged trace
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # one global order
    assert len({e["worker"] for e in events}) >= 2  # every worker's ring is merged
    # the violating worker's SEAMCALL is in the trace, with the module's answer
    assert any(e["event"] == "seamcall" and e["worker"] == v["worker"]
               and e["status"] != "TDX_SUCCESS" for e in events)
    chrome = json.loads((bundle / "trace.chrome.json").read_text())
    assert any(e["ph"] == "i" for e in chrome["traceEvents"])
    timeline = (bundle / "timeline.txt").read_text()
    assert v["invariant"] in timeline and "TDH.MEM." in timeline


def test_zoo_stops_on_sigterm(tmp_path: Path) -> None:
    """A zoo is many runs: SIGTERM ends the whole zoo (exit 130), not one run."""
    proc = subprocess.Popen([sys.executable, "-m", "stress.cli", "zoo", "--variant",
                             "root-put-resurrect", "--seeds", "20", "--cap", "30s",
                             "--fixed", "0", "--json", str(tmp_path / "zoo.json")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # the first run is under way (root-put-resurrect is never "caught")
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 20
    assert "interrupted" in err and not (tmp_path / "zoo.json").exists()
    assert segments_of(proc.pid) == []


def test_quiet_phases_leave_the_vcpus_alone(tmp_path: Path) -> None:
    """run.quiet_every/quiet_for: the host's roles start no operation in a quiet phase,
    the vCPUs go on; a phase as long as the cycle is refused."""
    ops: dict[str, dict[str, int]] = {}
    for name, quiet in (("busy", ""), ("quiet", 'quiet_every = "1s"\nquiet_for = "0.8s"\n')):
        out = tmp_path / name
        cfg = _cfg(tmp_path, f'[run]\nduration = "3s"\ncheck_interval = "0"\n{quiet}'
                             '[workers]\nvcpu = 2\nzapper = 1\nnotifier = 1\n')
        r = run_cli("run", cfg, "--out", str(out), "-q", timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        roles = json.loads((out / "latest" / "results.json").read_text())["roles"]
        ops[name] = {role: roles[role]["ops"] for role in ("vcpu", "zapper", "notifier")}
    for role in ("zapper", "notifier"):  # quiet 80% of the time: far fewer operations
        assert ops["quiet"][role] < ops["busy"][role] * 0.5, ops
    assert ops["quiet"]["vcpu"] > ops["busy"]["vcpu"] * 0.5, ops  # (as busy, or busier)
    bad = _cfg(tmp_path, '[run]\nquiet_every = "1s"\nquiet_for = "1s"\n')
    r = run_cli("run", bad, "--out", str(tmp_path / "bad"), "-q", timeout=30)
    assert r.returncode == 2 and "run.quiet_for" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()
