from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from stress import config
from stress.config import ConfigError, parse_duration, parse_size
from stress.harness.supervisor import Supervisor
from stress.repro.bundle import to_toml


def test_sizes_and_durations() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("2m") == 2 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("1t") == 1 << 40
    assert parse_duration("30s") == 30
    assert parse_duration("5m") == 300
    assert parse_duration("2h") == 7200
    assert parse_duration("250ms") == 0.25
    assert parse_duration(12) == 12
    for bad in ("", "1x", "-5s", "m", "1.5.2s"):
        with pytest.raises(ConfigError):
            parse_duration(bad)
    for bad in ("1.5g", "g", "12q"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parent.parent / "configs"
    d = config.load(root / "default.toml")
    assert d.workers == {"vcpu": 2, "zapper": 2, "invalidator": 1, "notifier": 1,
                         "converter": 1}
    assert d.run.variant == "fixed" and d.vm.type == "tdx"
    s = config.load(root / "smoke.toml")
    assert s.guest.size == 64 << 20
    assert config.load(None) == d  # no file: configs/default.toml


@pytest.mark.parametrize("text, key", [
    ("[guest]\nsize = '1x'\n", "guest.size"),
    ("[guest]\nsizee = '1g'\n", "guest.sizee"),
    ("[gest]\nsize = '1g'\n", "[gest]"),
    ("[workers]\nvcpu = -1\n", "workers.vcpu"),
    ("[workers]\nvcpu = 'two'\n", "workers.vcpu"),
    ("[run]\nvariant = 'nope'\n", "run.variant"),
    ("[run]\nduration = 'forever'\n", "run.duration"),
    ("[guest]\nhot_fraction = 1.5\n", "guest.hot_fraction"),
    ("[guest]\nsize = '64m'\nhot_set = '128m'\n", "guest.hot_set"),
    ("[workers]\nvcpu = 0\nzapper = 0\n", "workers"),
    ("[guest\n", "invalid TOML"),
    ("[invalidator]\nyield_every = 64\n", "invalidator.yield_every was removed"),
    ("[sched]\ntimeslice = 'soon'\n", "sched.timeslice"),
    ("[zapper]\nworker = 3\n", "zapper.worker: expected an array of tables"),
    ("[zapper.worker]\nleaf_zap = 1\n", "zapper.worker: expected an array of tables"),
    ("[[zapper.worker]]\nleaf_zap = 1\n[[zapper.worker]]\nleef_zap = 1\n",
     "zapper.worker[1].leef_zap"),
    ("[[zapper.worker]]\nmax_range = '3x'\n", "zapper.worker[0].max_range"),
    ("[[vcpu.worker]]\nwrite_fraction = 2.0\n", "vcpu.worker[0].write_fraction"),
    ("[[zapper.worker]]\nleaf_zap = 0\nleaf_zap_shared = 0\nsubtree_zap_shared = 0\n"
     "subtree_zap_exclusive = 0\n", "zapper.worker[0]: all op weights are 0"),
    ("[[converter.worker]]\nrange = 5000\n[workers]\nconverter = 1\n",
     "converter.worker[0].range"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert key in str(e.value)
    assert "\n" not in str(e.value)


def test_per_worker_mixes_are_parsed_and_applied(tmp_path: Path) -> None:
    """[[ROLE.worker]]: the k-th table overrides the role's section for its k-th
    worker; workers past the tables use the section; unused tables are harmless."""
    p = tmp_path / "mix.toml"
    p.write_text("[workers]\nvcpu = 3\nzapper = 2\n"
                 "[zapper]\nleaf_zap = 5\nmax_range = '64k'\n"
                 "[[zapper.worker]]\nleaf_zap = 0\nsubtree_zap_exclusive = 0\n"
                 "[[zapper.worker]]\nmax_range = '4k'\ninterval = '1ms'\n"
                 "[[zapper.worker]]\nclear_dirty = 9\n"
                 "[[vcpu.worker]]\nwrite_fraction = 1.0\n")
    c = config.load(p)
    assert c.worker_roles() == ["vcpu"] * 3 + ["zapper"] * 2
    z0, z1 = c.role_section("zapper", 0), c.role_section("zapper", 1)
    assert (z0.leaf_zap, z0.subtree_zap_exclusive, z0.max_range) == (0, 0, 64 << 10)
    assert (z1.leaf_zap, z1.max_range, z1.interval) == (5, 4 << 10, 1e-3)
    assert c.role_section("vcpu", 0).write_fraction == 1.0
    assert c.role_section("vcpu", 2).write_fraction == c.vcpu.write_fraction == 0.5
    w = c.worker_config(4)  # zapper 1, the 5th slot
    assert w.zapper == z1 and w.zapper.worker == () and w.vcpu == c.vcpu
    assert c.worker_config(0).vcpu.write_fraction == 1.0
    # the resolved config round-trips through a bundle's config.toml
    back = config.load_from(config.Config(), tomllib.loads(to_toml(c)))
    assert back == c


def test_workers_run_their_own_mix() -> None:
    """Two zappers, one only leaf-zapping under the write lock, the other only
    zapping sub-trees under the read lock: each does its own ops."""
    cfg = config.load("smoke", {
        "run": {"duration": 1.5, "check_interval": 0.0}, "workers": {"zapper": 2},
        "zapper": {"worker": [{"leaf_zap": 1, "leaf_zap_shared": 0, "subtree_zap_shared": 0,
                               "subtree_zap_exclusive": 0},
                              {"leaf_zap": 0, "leaf_zap_shared": 0, "subtree_zap_shared": 1,
                               "subtree_zap_exclusive": 0}]}})
    o = Supervisor(cfg).run()
    assert o.exit_reason == "clean", o.violations
    z = [r.stats for r in o.workers if r.role == "zapper"]
    assert z[0]["leaf_zaps"] and not z[0].get("subtree_zaps_shared")
    assert z[1]["subtree_zaps_shared"] and not z[1].get("leaf_zaps")


def test_overrides_apply_after_file() -> None:
    c = config.load(None, {"workers": {"vcpu": 3}, "run": {"seed": 9}})
    assert c.workers["vcpu"] == 3 and c.workers["zapper"] == 2 and c.run.seed == 9
    assert c.hash64() != config.load(None).hash64()
