"""The command line end to end: real runs in subprocesses, exit codes, files, leaks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stress.config import expected_invariants
from stress.model.variants import VARIANTS
from tests.conftest import ROOT, run_cli, segments_of

SMOKE = str(ROOT / "configs" / "smoke.toml")


def test_variants_lists_every_variant() -> None:
    r = run_cli("variants")
    assert r.returncode == 0
    for name in ("fixed", "zap-without-freeze", "free-without-grace-period"):
        assert name in r.stdout


@pytest.mark.parametrize("width", [None, 72])
def test_variants_wraps_and_shows_config_and_expectations(monkeypatch: pytest.MonkeyPatch,
                                                          width: int | None) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # not a terminal: 100 columns
    r = run_cli("variants", *(["--width", str(width)] if width else []))
    assert r.returncode == 0, r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= (width or 100)
    blocks = {b.split()[0]: " ".join(b.split()) for b in r.stdout.split("\n\n")}
    assert set(blocks) == set(VARIANTS)
    for v in VARIANTS.values():
        text = blocks[v.name]  # unwrapped
        assert f"config: {v.config} (vm.type = " in text
        assert f"needs a TD: {'yes' if v.requires_tdx else 'no'}" in text
        if not v.buggy:
            assert "expects on tdx: no violation" in text
            continue
        for vm_type, invariants in expected_invariants(v).items():
            assert f"expects on {vm_type}: {' | '.join(invariants)}" in text
    assert "expects on default: not characterised" in blocks["root-double-put"]


def test_fixed_protocol_runs_clean_in_parallel(tmp_path: Path) -> None:
    r = run_cli("run", SMOKE, "--vcpus", "2", "--duration", "6s", "--seed", "7",
                "--check-interval", "2s", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert res["schema"] == "tdp-stress-results" and res["schema_version"] == 1
    assert res["exit_reason"] == "clean" and res["violations"] == []
    assert res["seed"] == 7 and res["variant"] == "fixed"
    assert 5.5 < res["duration_s"] < 10
    vcpu, zapper = res["roles"]["vcpu"], res["roles"]["zapper"]
    assert vcpu["workers"] == 2 and zapper["workers"] == 2
    # the run did real, concurrent work: faults, zaps and table frees
    assert vcpu["ops"] > 1000 and zapper["ops"] > 100
    assert res["totals"]["tables_freed"] > 100
    assert res["checks"]["quiescent"] >= 3 and res["checks"]["teardown"] == 1
    pids = {w["pid"] for w in res["workers"]}
    assert len(pids) == 5 and all(w["exitcode"] == 0 for w in res["workers"])
    assert "violations: none" in r.stdout


# Every bug variant is run on every VM type it is characterised on, and must trip
# one of the invariants it declares (Variant.expects / expects_by_vm, so the
# variant's own expectation and this test cannot drift apart).
# hugepage-attr-change-exact-range is left to the zoo: on a TD its window (a
# shared-region fault between a conversion's zap and the THP split) is reached by
# some seeds only since vCPUs re-enter the TD between faults (see the note)
LEFT_TO_ZOO = {"hugepage-attr-change-exact-range"}
BUILTIN_BUGS = [v for v in VARIANTS.values() if v.buggy]
CAUGHT = [(v.name, vm_type, set(invariants)) for v in BUILTIN_BUGS if v.name not in LEFT_TO_ZOO
          for vm_type, invariants in expected_invariants(v).items()]


def test_every_bug_variant_declares_what_it_trips() -> None:
    for v in BUILTIN_BUGS:
        exp = expected_invariants(v)
        assert exp and all(exp.values()), f"{v.name}: no expected invariant"
        assert set(exp) <= set(v.vm_types()), v.name
    assert {name for name, _, _ in CAUGHT} | LEFT_TO_ZOO == {v.name for v in BUILTIN_BUGS}
    # both VM types where the two differ
    assert {vm for name, vm, _ in CAUGHT if name == "zap-without-freeze"} == {"default", "tdx"}


@pytest.mark.parametrize("variant, vm_type, invariants", CAUGHT)
def test_bug_variant_is_caught(tmp_path: Path, variant: str, vm_type: str,
                               invariants: set[str]) -> None:
    cfg = str(ROOT / "configs" / VARIANTS[variant].config)
    r = run_cli("run", cfg, "--variant", variant, "--vm-type", vm_type, "--expect-violation",
                "--duration", "120s", "--out", str(tmp_path), "-q", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr  # --expect-violation: caught = 0
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert res["exit_reason"] == "violation"
    v = res["violations"][0]
    assert v["invariant"] in invariants and v["variant"] == variant
    assert {"gfn", "table", "root", "shadow_page", "shadow_pages", "stat", "seamcall"} & set(
        v["details"])


def test_caught_variant_without_expect_exits_1(tmp_path: Path) -> None:
    r = run_cli("run", "--variant", "zap-without-freeze", "--duration", "30s", "--out",
                str(tmp_path), "-q")
    assert r.returncode == 1


def test_expect_violation_on_fixed_protocol_fails(tmp_path: Path) -> None:
    r = run_cli("run", SMOKE, "--duration", "2s", "--expect-violation", "--out", str(tmp_path),
                "-q")
    assert r.returncode == 1


@pytest.mark.parametrize("args, needle", [
    (["--duration", "ten"], "duration"),
    (["--guest-size", "1x"], "size"),
    (["--workers", "nobody=2"], "nobody"),
    (["--workers", "vcpu"], "ROLE=N"),
    (["--variant", "no-such-variant"], "no-such-variant"),
    (["--vcpus", "-1"], "vcpus"),
    (["/nonexistent/config.toml"], "config.toml"),
    (["--bogus-flag"], "bogus"),
    (["--variant", "mirror-no-freeze", "--vm-type", "default"], "tdx"),
    (["--vcpus", "0"], "vcpus"),
    (["--duration", "0"], "duration"),
    (["--workers", "vcpu=0", "--workers", "zapper=0", "--workers", "invalidator=0",
      "--workers", "notifier=0", "--workers", "converter=0"], "workers"),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    r = run_cli("run", *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdp-stress: error:"), r.stderr
    assert needle in lines[0]
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_bad_config_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[guest]\nsize = 'huge'\n")
    r = run_cli("run", str(bad))
    assert r.returncode == 2 and "guest.size" in r.stderr


def _wait_for_workers(proc: subprocess.Popen, n: int, timeout: float = 20) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [c for c in psutil.Process(proc.pid).children()
                if "resource_tracker" not in " ".join(c.cmdline())]
        if len(kids) >= n and segments_of(proc.pid):
            return kids
        time.sleep(0.05)
    raise AssertionError("workers did not start")


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stress.cli", "run", SMOKE, "--duration",
                             "60s", "--out", str(tmp_path), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_130_and_leaves_nothing(tmp_path: Path, sig: int) -> None:
    proc = _start(tmp_path)
    kids = _wait_for_workers(proc, 3)
    time.sleep(0.5)
    if sig == signal.SIGINT:  # Ctrl-C reaches the whole foreground process group
        for p in [proc.pid] + [k.pid for k in kids]:
            os.kill(p, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert segments_of(proc.pid) == []
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert res["exit_reason"] == "interrupted"


def test_killed_worker_exits_3_and_names_it(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    kids = _wait_for_workers(proc, 3)
    time.sleep(0.5)
    victim = kids[0]
    victim.kill()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, out + err
    assert segments_of(proc.pid) == []
    assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert res["exit_reason"] == "crash"
    assert any(f"pid {victim.pid}" in e and "SIGKILL" in e for e in res["errors"]), res["errors"]


def test_cleanup_command_runs() -> None:
    r = run_cli("cleanup")
    assert r.returncode == 0 and "segment(s) removed" in r.stdout


def test_bench_policy_prints_the_three_policies(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # 3 s: on a loaded CI machine a 1 s run once gave a zero median below (not reproduced
    # here, even with the cores oversubscribed three times; the stdout shows which figure)
    r = run_cli("bench", SMOKE, "--policy", "--duration", "3s", "--runs", "1", "--json",
                str(out), timeout=240)
    assert r.returncode == 0, r.stderr
    header = next(line for line in r.stdout.splitlines() if line.startswith("metric"))
    assert header.split()[1:] == ["unwind", "retry", "serialize"]
    assert "all runs clean" in r.stdout
    res = json.loads(out.read_text())
    pol = res["policies"]
    # serialising KVM's SEAMCALLs no longer means no BUSY: TDH.VP.ENTER and the guest's
    # TDCALLs take the module's locks too, and no KVM lock orders them
    assert all(pol[p]["faults/s"]["median"] > 0 and pol[p]["SEAMCALLs/s"]["median"] > 0
               for p in pol), r.stdout


def test_bench_unsync_compares_lock_and_write_protect(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--unsync", "--duration", "1s", "--runs", "1", "--json", str(out),
                timeout=180)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    lock, wp = res["arms"]["spinlock (fixed)"], res["arms"]["write-protect (alt #1)"]
    assert lock["unsync marks/s"]["median"] > 0 and lock["emulated writes/s"]["median"] == 0
    assert wp["unsync marks/s"]["median"] == 0 and wp["emulated writes/s"]["median"] > 0
    assert "all runs clean" in r.stdout


def test_zoo_reports_detection_and_the_fixed_protocol(tmp_path: Path) -> None:
    out = tmp_path / "zoo.json"
    r = run_cli("zoo", "--seeds", "2", "--cap", "30s", "--fixed", "2s", "--variant",
                "mirror-no-freeze", "--json", str(out), "--junit", str(tmp_path / "z.xml"),
                timeout=200)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    (row,) = res["variants"]
    assert {"name", "runs", "detected", "median_ttd_s", "p90_ttd_s"} <= set(row)
    assert row["name"] == "mirror-no-freeze" and row["runs"] == 2 and row["detected"] == 2
    assert 0 < row["median_ttd_s"] <= row["p90_ttd_s"] < 30
    assert res["fixed"]["violations"] == 0 and res["fixed"]["seconds"] >= 2


def test_bench_throughput_reports_floor_and_scaling(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--duration", "1s", "--runs", "1", "--json", str(out), timeout=180)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for key in ("faults_per_s_per_proc", "floor_ns_per_atomic", "cores", "scaling_efficiency",
                "machine_scaling_efficiency"):
        assert key in res
    assert res["faults_per_s_per_proc"] > 0 and 0 < res["floor_ns_per_atomic"] < 10_000
    assert res["atomics_per_fault"] > 5 and res["fault_cost_over_floor"] > 1
    assert 0 < res["machine_scaling_efficiency"] and 0 < res["scaling_efficiency"]
    roles = res["roles"]["roles"]  # per-role throughput of the default job
    assert set(roles) == {"vcpu", "zapper", "invalidator", "notifier", "converter"}
    assert roles["vcpu"]["procs"] == 2 and roles["vcpu"]["work"] == "faults"
    assert roles["vcpu"]["work_per_s_per_proc"]["median"] > 0
    assert roles["zapper"]["work_per_s_per_proc"]["median"] > 0
    assert roles["vcpu"]["seamcalls_per_s_per_proc"]["median"] > 0  # AUG, SEPT.ADD on a TD
    assert "per role" in r.stdout and "SEAMCALLs/s" in r.stdout


def test_bench_compare_measures_the_no_mirror_example(tmp_path: Path) -> None:
    """examples/no_mirror.py (Sean's other idea of Jan 2023) runs clean and side by
    side with the frozen-SPTE protocol; no KVM task meets another inside the TDX
    module (BUSY comes only from the vCPUs: TDH.VP.ENTER and TDCALLs)."""
    out = tmp_path / "bench.json"
    example = str(ROOT / "examples" / "no_mirror.py")
    r = run_cli("bench", SMOKE, "--compare", "fixed,sept-vm-lock", "--variant-file", example,
                "--duration", "2s", "--runs", "1", "--json", str(out), timeout=180)
    assert r.returncode == 0, r.stderr
    assert "all runs clean" in r.stdout
    arms = json.loads(out.read_text())["arms"]
    assert set(arms) == {"fixed", "sept-vm-lock"}
    assert all(arms[a]["faults/s"]["median"] > 0 and arms[a]["SEAMCALLs/s"]["median"] > 0
               for a in arms)
    r = run_cli("run", SMOKE, "--variant-file", example, "--variant", "sept-vm-lock",
                "--duration", "3s", "--out", str(tmp_path / "run"), "-q", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "run" / "latest" / "results.json").read_text())
    busy = {k: v for w in res["workers"] for k, v in w["stats"].items()
            if k.startswith("busy:") and k.endswith("<KVM") and not k.startswith(
                ("busy:TDH.VP.ENTER", "busy:TDG."))}
    assert not busy, busy  # KVM's own SEAMCALLs never meet each other
    r = run_cli("bench", "--compare", "fixed,no-such-variant")
    assert r.returncode == 2 and "unknown variant" in r.stderr


def test_user_variant_file(tmp_path: Path) -> None:
    example = str(ROOT / "examples" / "user_variant.py")
    r = run_cli("run", str(ROOT / "configs" / "tdx-boot.toml"), "--variant-file", example,
                "--variant", "mirror-link-no-freeze", "--expect-violation", "--duration", "60s",
                "--out", str(tmp_path), "-q", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert res["config"]["run"]["variant_file"] == example
    assert res["violations"][0]["variant"] == "mirror-link-no-freeze"
    bad = tmp_path / "bad.py"
    bad.write_text("VARIANTS = 3\n")
    r = run_cli("run", "--variant-file", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "defines no VARIANTS list" in r.stderr


def test_td_job_counts_busy_by_the_pair_that_collided(tmp_path: Path) -> None:
    """On a TD the TDX module's callers are KVM tasks, TDH.VP.ENTER and the guest's
    TDCALLs, all real processes; results.json says who made whom BUSY."""
    r = run_cli("run", str(ROOT / "configs" / "tdx-busy.toml"), "--duration", "10s",
                "--out", str(tmp_path), "-q", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    tdx = json.loads((tmp_path / "latest" / "results.json").read_text())["tdx"]
    c = tdx["counters"]
    for k in ("vp_enters", "tdcalls", "accepts", "zero_step_walks", "map_gpa_calls",
              "sept_removes", "page_adds", "prefaulted", "vcpu_ioctls"):
        assert c[k] > 0, k
    assert tdx["busy_by_holder"].get("VP.ENTER", 0) > 0
    assert tdx["busy_by_holder"].get("TDCALL", 0) > 0
    assert any(k.startswith("TDH.MEM.PAGE.AUG<") for k in tdx["busy_by_pair"])
