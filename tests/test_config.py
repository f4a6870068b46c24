from __future__ import annotations

from pathlib import Path

import pytest

from stress import config
from stress.config import ConfigError, parse_duration, parse_size


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
    assert d.workers == {"vcpu": 2, "zapper": 1, "invalidator": 1, "notifier": 1,
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
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert key in str(e.value)
    assert "\n" not in str(e.value)


def test_overrides_apply_after_file() -> None:
    c = config.load(None, {"workers": {"vcpu": 3}, "run": {"seed": 9}})
    assert c.workers["vcpu"] == 3 and c.workers["zapper"] == 1 and c.run.seed == 9
    assert c.hash64() != config.load(None).hash64()
