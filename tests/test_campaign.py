"""Campaigns: matrix validation, sharding, running shards and merging them.

One test runs the real engine (two 2 s cells); the rest replace the
supervisor with a fake that answers at once, to test the bookkeeping fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import stress.jobs.campaign as campaign
from stress.config import Config
from stress.harness.supervisor import RunOutcome
from stress.jobs.campaign import (
    CampaignError,
    Cell,
    format_merge,
    load_matrix,
    merge,
    parse_shard,
    run_campaign,
    shard_cells,
)
from tests.conftest import ROOT

SMOKE = (ROOT / "configs" / "smoke.toml").resolve()
BOOT = (ROOT / "configs" / "tdx-boot.toml").resolve()
DEFAULT = (ROOT / "configs" / "default.toml").resolve()


def write_matrix(tmp_path: Path, body: str, name: str = "matrix.toml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


def simple_matrix(tmp_path: Path, variants: str = '["fixed", "mirror-no-freeze"]',
                  seeds: str = "1", duration: str = '"2s"', extra: str = "",
                  config: Path | None = None) -> Path:
    return write_matrix(tmp_path, f"""
[campaign]
configs = ["{config or SMOKE}"]
variants = {variants}
seeds = {seeds}
duration = {duration}
{extra}
""")


class FakeSupervisor:
    """Stands in for Supervisor: bug variants are 'caught' at once, fixed runs clean."""

    seen: list[Config] = []
    reasons: dict[tuple[str, int], str] = {}

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        FakeSupervisor.seen.append(cfg)

    def run(self) -> RunOutcome:
        run = self.cfg.run
        default = "violation" if run.expect_violation else "clean"
        reason = self.reasons.get((run.variant, run.seed), default)
        viol = [{"invariant": "fake", "message": "fake", "time_s": 0.01 * run.seed}
                ] if reason == "violation" else []
        return RunOutcome(exit_reason=reason, duration_s=0.1, workers=[], violations=viol,
                          checks={}, errors=[], pool_pages=64)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeSupervisor]:
    FakeSupervisor.seen = []
    FakeSupervisor.reasons = {}
    monkeypatch.setattr(campaign, "Supervisor", FakeSupervisor)
    return FakeSupervisor


# -- shard specs -------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [("1/1", (1, 1)), ("2/4", (2, 4)), ("4/4", (4, 4)),
                                       (" 3 / 7 ", (3, 7))])
def test_parse_shard_good(text: str, want: tuple[int, int]) -> None:
    assert parse_shard(text) == want


@pytest.mark.parametrize("text", ["0/4", "5/4", "1/0", "0/0", "1", "a/b", "-1/2", "1/2/3", "",
                                  "1.0/2"])
def test_parse_shard_bad(text: str) -> None:
    with pytest.raises(CampaignError, match="^shard: "):
        parse_shard(text)


# -- matrix files --------------------------------------------------------------------

def test_matrix_defaults_and_seed_count(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "small.toml").write_text(SMOKE.read_text())
    p = write_matrix(tmp_path, """
[campaign]
configs = ["cfg/small.toml"]
variants = ["mirror-no-freeze", "fixed"]
seeds = 3
duration = "1m"
""", name="nightly.toml")
    m = load_matrix(p)
    assert m.name == "nightly"
    assert m.seeds == (1, 2, 3)
    assert m.duration == 60.0
    assert m.config_path("cfg/small.toml") == tmp_path / "cfg" / "small.toml"
    cells = m.cells()
    assert len(cells) == 6
    assert cells == sorted(cells)
    assert [c.variant for c in cells[:3]] == ["fixed"] * 3
    assert cells[0] == Cell("cfg/small.toml", "fixed", 1)
    assert cells[0].cell_id == "small-fixed-s1"
    assert len({c.cell_id for c in cells}) == 6


@pytest.mark.parametrize("body,needle", [
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=["fixed"]\nseeds=1\nduration="1s"\nbogus=1',
     "campaign.bogus"),
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=["fixed"]\nseeds=1\nduration="1s"\n[run]\nx=1',
     "[run]"),
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=["nope"]\nseeds=1\nduration="1s"',
     "campaign.variants"),
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=[]\nseeds=1\nduration="1s"',
     "campaign.variants"),
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=["fixed"]\nseeds=0\nduration="1s"',
     "campaign.seeds"),
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=["fixed"]\nseeds=["1"]\nduration="1s"',
     "campaign.seeds"),
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=["fixed"]\nseeds=[1, 1]\nduration="1s"',
     "campaign.seeds"),
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=["fixed"]\nseeds=true\nduration="1s"',
     "campaign.seeds"),
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=["fixed"]\nseeds=1\nduration="soon"',
     "campaign.duration"),
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=["fixed"]\nseeds=1\nduration="0s"',
     "campaign.duration"),
    ('[campaign]\nconfigs=["missing.toml"]\nvariants=["fixed"]\nseeds=1\nduration="1s"',
     "campaign.configs"),
    ('[campaign]\nconfigs="{smoke}"\nvariants=["fixed"]\nseeds=1\nduration="1s"',
     "campaign.configs"),
    ('[campaign]\nconfigs=["{smoke}", "{smoke}"]\nvariants=["fixed"]\nseeds=1\n'
     'duration="1s"', "campaign.configs"),
    ('[campaign]\nconfigs=["{smoke}"]\nvariants=["fixed"]\nseeds=1', "campaign.duration"),
    ('[campaign]\nname=""\nconfigs=["{smoke}"]\nvariants=["fixed"]\nseeds=1\nduration="1s"',
     "campaign.name"),
    ("[other]\nx = 1", "[other]"),
    ("[campaign\n", "invalid TOML"),
])
def test_matrix_errors_name_the_key(tmp_path: Path, body: str, needle: str) -> None:
    p = write_matrix(tmp_path, body.replace("{smoke}", str(SMOKE)))
    with pytest.raises(CampaignError) as e:
        load_matrix(p)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_matrix_rejects_configs_with_the_same_id(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "smoke.toml").write_text(SMOKE.read_text())
    p = write_matrix(tmp_path, f'[campaign]\nconfigs=["{SMOKE}", "a/smoke.toml"]\n'
                               'variants=["fixed"]\nseeds=1\nduration="1s"')
    with pytest.raises(CampaignError, match="campaign.configs"):
        load_matrix(p)


def test_matrix_rejects_a_bad_config_before_running(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[guest]\nsize = 'huge'\n")
    p = write_matrix(tmp_path, '[campaign]\nconfigs=["bad.toml"]\nvariants=["fixed"]\n'
                               'seeds=1\nduration="1s"')
    with pytest.raises(CampaignError, match=r"campaign.configs: bad.toml .*guest.size"):
        load_matrix(p)


def test_missing_matrix_file(tmp_path: Path) -> None:
    with pytest.raises(CampaignError, match="no such matrix file"):
        load_matrix(tmp_path / "nope.toml")


# -- sharding ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_shards_partition_the_cells(tmp_path: Path, n: int) -> None:
    p = write_matrix(tmp_path, f'[campaign]\nconfigs=["{SMOKE}", "{DEFAULT}"]\n'
                               'variants=["fixed", "zap-without-freeze", "mirror-no-freeze"]\n'
                               'seeds=[5, 1, 3]\nduration="1s"')
    cells = load_matrix(p).cells()
    assert len(cells) == 18
    shards = [shard_cells(cells, i, n) for i in range(1, n + 1)]
    flat = [c for s in shards for c in s]
    assert sorted(flat) == cells
    assert len(set(flat)) == len(cells)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for i, s in enumerate(shards, 1):
        assert s == [c for k, c in enumerate(cells) if k % n == i - 1]


def test_shard_cells_rejects_bad_shard() -> None:
    with pytest.raises(CampaignError):
        shard_cells([], 3, 2)


def test_more_shards_than_cells(tmp_path: Path, fake: type[FakeSupervisor]) -> None:
    m = load_matrix(simple_matrix(tmp_path, variants='["fixed"]'))
    rec = run_campaign(m, (3, 5), tmp_path / "out")
    assert rec["cells"] == []
    assert (tmp_path / "out" / "shard-3-of-5.json").is_file()


# -- end to end (the real engine) -------------------------------------------------------------

def test_two_shard_campaign_end_to_end(tmp_path: Path) -> None:
    # tdx-boot: a TD's first touches, where mirror-no-freeze shows within a second
    m = load_matrix(simple_matrix(tmp_path, config=BOOT))
    out = tmp_path / "out"
    lines: list[str] = []
    recs = [run_campaign(m, (i, 2), out, lines.append) for i in (1, 2)]
    assert [len(r["cells"]) for r in recs] == [1, 1]
    for i, r in enumerate(recs, 1):
        on_disk = json.loads((out / f"shard-{i}-of-2.json").read_text())
        assert on_disk == r
        assert r["schema"] == "tdp-stress-campaign-shard" and r["shard"] == [i, 2]
        for c in r["cells"]:
            res = json.loads((out / c["results"]).read_text())
            assert res["schema"] == "tdp-stress-results"
            assert res["variant"] == c["variant"] and res["seed"] == c["seed"]
            assert res["exit_reason"] == c["exit_reason"]
    assert any("tdx-boot-mirror-no-freeze-s1" in line for line in lines)

    rep = merge([out])
    assert rep["schema"] == "tdp-stress-campaign"
    assert rep["complete"] is True
    assert rep["shards_found"] == [[1, 2], [2, 2]]
    assert rep["failures"] == []
    assert rep["verdict"] == "pass", format_merge(rep)
    by = {v["name"]: v for v in rep["variants"]}
    mnf = by["mirror-no-freeze"]
    assert (mnf["runs"], mnf["detected"], mnf["expect"]) == (1, 1, "violation")
    assert mnf["median_ttd_s"] is not None and mnf["median_ttd_s"] > 0
    fixed = by["fixed"]
    assert (fixed["runs"], fixed["detected"], fixed["expect"]) == (1, 0, "clean")
    assert fixed["median_ttd_s"] is None
    cells = {c["cell_id"]: c for c in rep["cells"]}
    assert cells["tdx-boot-fixed-s1"]["exit_reason"] == "clean"
    assert Path(cells["tdx-boot-fixed-s1"]["results"]).is_file()
    text = format_merge(rep)
    assert "mirror-no-freeze" in text and "1/1" in text and "verdict: PASS" in text


# -- bookkeeping with a fake supervisor --------------------------------------------------------

def test_cell_config_overrides(tmp_path: Path, fake: type[FakeSupervisor]) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text(SMOKE.read_text() + '\n[vm]\ntype = "default"\n')
    p = write_matrix(tmp_path, '[campaign]\nconfigs=["plain.toml"]\n'
                               'variants=["fixed", "mirror-no-freeze"]\nseeds=[7]\n'
                               'duration="3s"')
    rec = run_campaign(load_matrix(p), (1, 1), tmp_path / "out")
    by = {c.run.variant: c for c in fake.seen}
    assert by["fixed"].vm.type == "default"          # left alone
    assert by["mirror-no-freeze"].vm.type == "tdx"   # needs a TD
    assert by["mirror-no-freeze"].run.expect_violation is True
    assert by["fixed"].run.expect_violation is False
    for cfg in fake.seen:
        assert cfg.run.seed == 7 and cfg.run.duration == 3.0
        assert cfg.guest.size == 64 << 20               # the config file's own keys
        assert Path(cfg.run.out) == tmp_path / "out" / "cells" / f"plain-{cfg.run.variant}-s7"
    assert [c["verdict"] for c in rec["cells"]] == ["pass", "pass"]
    assert rec["cells"][1]["time_to_detect_s"] == 0.07
    assert rec["cells"][0]["time_to_detect_s"] is None
    assert rec["cells"][0]["results"] == "cells/plain-fixed-s7/results.json"


def test_verdicts(tmp_path: Path, fake: type[FakeSupervisor]) -> None:
    fake.reasons = {("fixed", 1): "violation", ("mirror-no-freeze", 1): "clean",
                    ("fixed", 2): "hang", ("mirror-no-freeze", 2): "crash"}
    m = load_matrix(simple_matrix(tmp_path, seeds="3"))
    rec = run_campaign(m, (1, 1), tmp_path / "out")
    got = {c["cell_id"]: (c["exit_reason"], c["verdict"]) for c in rec["cells"]}
    assert got == {
        "smoke-fixed-s1": ("violation", "fail"), "smoke-fixed-s2": ("hang", "fail"),
        "smoke-fixed-s3": ("clean", "pass"),
        "smoke-mirror-no-freeze-s1": ("clean", "fail"),
        "smoke-mirror-no-freeze-s2": ("crash", "fail"),
        "smoke-mirror-no-freeze-s3": ("violation", "pass"),
    }
    rep = merge([tmp_path / "out"])
    assert rep["complete"] is True and rep["verdict"] == "fail"
    assert len(rep["failures"]) == 4
    by = {v["name"]: v for v in rep["variants"]}
    assert (by["mirror-no-freeze"]["detected"], by["mirror-no-freeze"]["runs"]) == (1, 3)
    assert by["fixed"]["detected"] == 1
    text = format_merge(rep)
    assert "FAIL smoke-mirror-no-freeze-s1: expected violation, got clean" in text
    assert "verdict: FAIL" in text


def test_interrupted_cell_stops_the_shard(tmp_path: Path, fake: type[FakeSupervisor]) -> None:
    fake.reasons = {("fixed", 2): "interrupted"}
    m = load_matrix(simple_matrix(tmp_path, seeds="3"))
    rec = run_campaign(m, (1, 1), tmp_path / "out")
    reasons = [c["exit_reason"] for c in rec["cells"]]
    assert reasons == ["clean", "interrupted", "not-run", "not-run", "not-run", "not-run"]
    assert len(fake.seen) == 2
    assert all(c["results"] is None for c in rec["cells"][2:])
    assert merge([tmp_path / "out"])["verdict"] == "fail"


def test_ttd_median_and_p90(tmp_path: Path, fake: type[FakeSupervisor]) -> None:
    m = load_matrix(simple_matrix(tmp_path, variants='["mirror-no-freeze"]', seeds="10"))
    run_campaign(m, (1, 1), tmp_path / "out")
    v = merge([tmp_path / "out"])["variants"][0]
    assert (v["runs"], v["detected"]) == (10, 10)
    assert v["median_ttd_s"] == pytest.approx(0.055)
    assert v["p90_ttd_s"] == pytest.approx(0.10)


def test_merge_single_shard_of_two_is_incomplete(tmp_path: Path,
                                                 fake: type[FakeSupervisor]) -> None:
    m = load_matrix(simple_matrix(tmp_path))
    run_campaign(m, (2, 2), tmp_path / "out")
    rep = merge([tmp_path / "out" / "shard-2-of-2.json"])
    assert rep["shards_found"] == [[2, 2]]
    assert rep["complete"] is False
    assert rep["failures"] == []
    assert rep["verdict"] == "fail"
    text = format_merge(rep)
    assert "missing shards: 1/2" in text and "INCOMPLETE" in text


def test_merge_across_machines_and_duplicates(tmp_path: Path,
                                              fake: type[FakeSupervisor]) -> None:
    m = load_matrix(simple_matrix(tmp_path, seeds="2"))
    for i in (1, 2, 3):
        run_campaign(m, (i, 3), tmp_path / "runs" / f"host{i}")
    rep = merge([tmp_path / "runs"])
    assert rep["complete"] is True and rep["verdict"] == "pass"
    assert len(rep["cells"]) == 4
    for c in rep["cells"]:
        assert Path(c["results"]).is_file()
    # the same shard given twice, or copied elsewhere, is merged once
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "shard-1-of-3.json").write_text(
        (tmp_path / "runs" / "host1" / "shard-1-of-3.json").read_text())
    again = merge([tmp_path / "runs", tmp_path / "runs" / "host1" / "shard-1-of-3.json", copy])
    assert len(again["cells"]) == 4 and again["verdict"] == "pass"


def test_merge_duplicate_with_different_content_fails(tmp_path: Path,
                                                      fake: type[FakeSupervisor]) -> None:
    m = load_matrix(simple_matrix(tmp_path))
    run_campaign(m, (1, 2), tmp_path / "a")
    run_campaign(m, (2, 2), tmp_path / "a")
    fake.reasons = {("fixed", 1): "hang"}
    run_campaign(m, (1, 2), tmp_path / "b")  # a re-run of shard 1 that came out differently
    with pytest.raises(CampaignError, match="smoke-fixed-s1.*different content"):
        merge([tmp_path / "a", tmp_path / "b"])


def _shard(tmp_path: Path, sub: str, **change: Any) -> Path:
    base = {"schema": "tdp-stress-campaign-shard", "schema_version": 1, "campaign": "c",
            "shard": [1, 1], "matrix_digest": "x", "total_cells": 0, "cells": []}
    base.update(change)
    d = tmp_path / sub
    d.mkdir(parents=True, exist_ok=True)
    i, n = base["shard"]
    p = d / f"shard-{i}-of-{n}.json"
    p.write_text(json.dumps(base))
    return p


def test_merge_rejects_mixed_campaigns_and_bad_files(tmp_path: Path) -> None:
    a = _shard(tmp_path, "a", shard=[1, 2])
    b = _shard(tmp_path, "b", shard=[2, 2], campaign="other")
    with pytest.raises(CampaignError, match="^campaign: "):
        merge([a, b])
    c = _shard(tmp_path, "c", shard=[2, 2], matrix_digest="y")
    with pytest.raises(CampaignError, match="different matrices"):
        merge([a, c])
    d = _shard(tmp_path, "d", shard=[2, 3])
    with pytest.raises(CampaignError, match="split"):
        merge([a, d])
    e = _shard(tmp_path, "e", schema="something-else")
    with pytest.raises(CampaignError, match="schema"):
        merge([e])
    f = _shard(tmp_path, "f", cells=[{"cell_id": "x"}])
    with pytest.raises(CampaignError, match="cells"):
        merge([f])
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "shard-1-of-1.json").write_text("{not json")
    with pytest.raises(CampaignError, match="invalid JSON"):
        merge([tmp_path / "g"])


def test_merge_with_nothing_to_merge(tmp_path: Path) -> None:
    with pytest.raises(CampaignError, match="no shard"):
        merge([tmp_path])
    with pytest.raises(CampaignError, match="no such shard file"):
        merge([tmp_path / "missing"])


def test_variant_config_cells_use_each_variants_own_job(tmp_path: Path) -> None:
    p = write_matrix(tmp_path, '[campaign]\nconfigs=["@variant", "' + str(SMOKE) + '"]\n'
                               'variants=["fixed", "mirror-no-freeze"]\nseeds=[1]\n'
                               'duration="1s"')
    cells = {(Path(c.config).name, c.variant) for c in load_matrix(p).cells()}
    assert cells == {("default.toml", "fixed"), ("tdx-boot.toml", "mirror-no-freeze"),
                     ("smoke.toml", "fixed"), ("smoke.toml", "mirror-no-freeze")}
