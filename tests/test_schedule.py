"""Controlled scheduling: determinism, replay, hunt, shrink (issue #7 items 4-5).

Every test here runs real worker processes taking turns at the atomics
chokepoint; a controlled run is a pure function of (config, seed, schedule),
so the tests compare whole runs.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from stress import config as config_mod
from stress.config import ConfigError
from stress.harness.supervisor import Supervisor
from stress.repro.bundle import to_toml
from stress.repro.hunt import events_key, replay_config, with_schedule
from stress.repro.shrink import Shrinker, size

from .conftest import run_cli

# no initial image: both vCPUs' first touches of the hot set's tables race (the
# link race mirror-no-freeze needs; a TD's mirror tables are linked only once)
SMALL = {"workers": {"vcpu": 2, "zapper": 1, "invalidator": 0, "notifier": 0, "converter": 0},
         "guest": {"size": "16m", "layout": "flat", "hot_set": "32k"},
         "tdx": {"init_mem_pages": 0}}


def controlled(variant: str, mode: str, seed: int, max_steps: int = 30000):
    cfg = config_mod.load(None, {**SMALL, "run": {"variant": variant, "duration": 120}})
    return with_schedule(cfg, mode=mode, seed=seed, max_steps=max_steps)


@pytest.mark.parametrize("mode", ["random", "pct"])
def test_same_schedule_same_run(mode: str) -> None:
    """A clean controlled run of the fixed protocol, twice: the same switches,
    the same ops, the same counters in every worker."""
    cfg = controlled("fixed", mode, seed=7, max_steps=20000)
    a, b = Supervisor(cfg).run(), Supervisor(cfg).run()
    assert a.exit_reason == b.exit_reason == "clean"
    assert a.schedule and b.schedule
    assert a.schedule["switches"] == b.schedule["switches"]
    assert a.schedule["ops"] == b.schedule["ops"] and sum(a.schedule["ops"]) > 10
    strip = [{k: v for k, v in (r.stats or {}).items() if k != "delays"} for r in a.workers]
    assert strip == [{k: v for k, v in (r.stats or {}).items() if k != "delays"}
                     for r in b.workers]
    # a different schedule seed is a different run
    c = Supervisor(controlled("fixed", mode, seed=8, max_steps=20000)).run()
    assert c.schedule and c.schedule["switches"] != a.schedule["switches"]


def test_recorded_schedule_replays_with_identical_events() -> None:
    """A violation found under a random schedule, replayed from the switch
    points the workers recorded: same invariant, same events, every time."""
    found = None
    for seed in range(1, 20):
        cfg = controlled("mirror-no-freeze", "random", seed)
        o = Supervisor(cfg).run()
        if o.violations:
            found = (cfg, o)
            break
    assert found, "mirror-no-freeze not found in 19 random schedules"
    cfg, o = found
    rcfg = replay_config(cfg, o)
    assert rcfg.schedule.mode == "replay" and len(rcfg.schedule.switches) == len(
        o.schedule["switches"])
    for _ in range(3):
        again = Supervisor(rcfg).run()
        assert again.violations[0]["invariant"] == o.violations[0]["invariant"]
        assert events_key(again.trace) == events_key(o.trace)
        assert again.schedule["steps"] == o.schedule["steps"]


def test_replay_config_round_trips_through_a_bundle() -> None:
    cfg = controlled("fixed", "random", 3, max_steps=5000)
    o = Supervisor(cfg).run()
    rcfg = replay_config(cfg, o)
    back = config_mod.load_from(config_mod.Config(), tomllib.loads(to_toml(rcfg)))
    assert back == rcfg


def test_schedule_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="schedule.switches"):
        config_mod.load(None, {"schedule": {"switches": [[0, 1, 2]]}})
    with pytest.raises(ConfigError, match="schedule.mode"):
        config_mod.load(None, {"schedule": {"mode": "fair"}})
    with pytest.raises(ConfigError, match="schedule.max_ops: 2 caps for 7 workers"):
        config_mod.load(None, {"schedule": {"max_ops": [1, 2]}})
    with pytest.raises(ConfigError, match="beyond the 7 configured"):
        config_mod.load(None, {"schedule": {"switches": [[0, 1, 2, 9]]}})


def test_absent_workers_take_no_part() -> None:
    """Capped at 0 ops, a worker never runs (shrinking's "fewer workers")."""
    cfg = controlled("fixed", "random", 5, max_steps=8000)
    cfg = config_mod.load_from(cfg, {"schedule": {"max_ops": [0, -1, 0]}})
    o = Supervisor(cfg).run()
    assert o.exit_reason == "clean"
    assert o.schedule["ops"][0] == 0 and o.schedule["ops"][2] == 0 and o.schedule["ops"][1] > 5
    assert all(s[0] == 1 and s[3] == 1 for s in o.schedule["switches"]) or not o.schedule[
        "switches"]


def test_shrink_never_returns_a_reproducer_that_does_not_fail() -> None:
    cfg = None
    for seed in range(1, 20):
        c = controlled("mirror-no-freeze", "random", seed)
        o = Supervisor(c).run()
        if o.violations:
            cfg = replay_config(c, o)
            break
    assert cfg is not None
    res = Shrinker(cfg, o.violations[0], max_runs=60, max_seconds=60).run()
    assert res.end["workers"] <= res.start["workers"]
    assert res.end["ops"] <= res.start["ops"]
    again = Supervisor(res.config).run()  # it fails, the same way
    assert again.violations and again.violations[0]["invariant"] == o.violations[0]["invariant"]
    assert size(res.config, again) == res.end


def test_hunt_replay_shrink_from_the_command_line(tmp_path: Path) -> None:
    """The user's path: hunt a variant, replay the bundle 10/10, shrink it to
    two workers, replay the shrunk bundle."""
    r = run_cli("hunt", "--variant", "mirror-no-freeze", "--tries", "10",
                "--out", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    bundle = next((tmp_path / "bundles").glob("*-sched"))
    sched = json.loads((bundle / "schedule.json").read_text())
    assert sched["replayed_identically"] and sched["mode"] in ("random", "pct")
    r = run_cli("replay", str(bundle), timeout=300)
    assert r.returncode == 0 and "10/10 with identical events" in r.stdout, r.stdout + r.stderr
    r = run_cli("shrink", str(bundle), "--max-time", "90s", timeout=300)
    assert r.returncode == 0, r.stderr
    shrunk = next((tmp_path / "bundles").glob("*-shrunk"))
    after = json.loads((shrunk / "schedule.json").read_text())["after"]
    assert after["workers"] <= 3, after
    header = r.stdout.splitlines()[0].split()
    assert 1 <= len(header) <= 3  # a two- or three-column timeline
    r = run_cli("replay", str(shrunk), "--runs", "3", timeout=300)
    assert r.returncode == 0 and "3/3 with identical events" in r.stdout
    assert_the_trace_reads_as_the_race(shrunk)


def assert_the_trace_reads_as_the_race(bundle: Path) -> None:
    """The shrunk reproducer's trace, top to bottom, is the race: a vCPU publishes a
    mirror table (the store, where it happened), another vCPU's AUG under it fails
    (the module has no parent yet), and the publisher's TDH.MEM.SEPT.ADD comes only
    after, if at all."""
    events = [json.loads(line) for line in (bundle / "trace.jsonl").read_text().splitlines()]
    fail = next(e for e in events if e["event"] == "seamcall" and e["status"] != "TDX_SUCCESS"
                and e["status"] != "TDX_OPERAND_BUSY")
    assert fail["call"] == "TDH.MEM.PAGE.AUG" and fail["status"] == "TDX_EPT_WALK_FAILED"
    publish = [e for e in events if e["event"] == "spte-write" and e["root"] == "mirror"
               and e["level"] >= 2 and e["new"].startswith("present")
               and e["worker"] != fail["worker"] and e["seq"] < fail["seq"]]
    assert publish, "no mirror table published by another vCPU before the failed AUG"
    pub = publish[-1]
    adds = [e for e in events if e["event"] == "seamcall" and e["call"] == "TDH.MEM.SEPT.ADD"
            and e["worker"] == pub["worker"] and e["seq"] > pub["seq"]]
    assert not adds or adds[0]["seq"] > fail["seq"]  # the SEPT.ADD came too late


def test_replay_refuses_a_free_run_bundle(tmp_path: Path) -> None:
    r = run_cli("run", "--variant", "zap-without-freeze", "--duration", "20s", "--out",
                str(tmp_path), "-q", "--expect-violation", timeout=120)
    assert r.returncode == 0, r.stderr
    bundle = next((tmp_path / "latest" / "bundles").iterdir())
    for cmd in ("replay", "shrink"):
        bad = run_cli(cmd, str(bundle))
        assert bad.returncode == 2
        assert bad.stderr.count("\n") == 1 and "not a controlled-schedule bundle" in bad.stderr
    # ... but hunt takes it, with its config, and makes a deterministic one
    r = run_cli("hunt", str(bundle), "--tries", "80", "--out", str(tmp_path / "h"),
                timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replayed identically" in r.stdout


def test_a_new_hunt_replaces_its_bundle(tmp_path: Path) -> None:
    """Free-run bundles of one signature are counted; hunt and shrink bundles are
    replaced by the newer reproducer (atomically, no stale files left)."""
    from stress.repro.bundle import write_bundle

    cfg = config_mod.load(None)
    v = {"invariant": "x", "variant": "fixed", "message": "m", "details": {}}
    p1, new1 = write_bundle(tmp_path, cfg, v, suffix="-sched", schedule={"try": 1})
    (p1 / "stale").write_text("old")
    p2, new2 = write_bundle(tmp_path, cfg, v, suffix="-sched", schedule={"try": 2},
                            replace=True)
    assert p1 == p2 and new1 and new2
    assert json.loads((p2 / "schedule.json").read_text()) == {"try": 2}
    assert not (p2 / "stale").exists() and sorted(tmp_path.iterdir()) == [p2]
    p3, new3 = write_bundle(tmp_path, cfg, v, suffix="-sched")
    assert not new3 and (p3 / "hits").read_text() == "2\n"
