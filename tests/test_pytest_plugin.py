"""The pytest plugin as a project's CI would use it."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT


@pytest.mark.stress
def test_stress_run_fixture_runs_clean(stress_run) -> None:
    res = stress_run(ROOT / "configs" / "smoke.toml", duration="2s", seed=3)
    assert res["exit_reason"] == "clean", res["violations"]
    assert res["seed"] == 3 and res["roles"]["vcpu"]["ops"] > 0


@pytest.mark.stress
def test_stress_run_fixture_reports_a_caught_bug(stress_run) -> None:
    res = stress_run(ROOT / "configs" / "tdx-boot.toml", duration="20s",
                     variant="mirror-no-freeze", workers={"vcpu": 2})
    assert res["exit_reason"] == "violation"
    assert (ROOT / res["violations"][0]["bundle"]).joinpath("repro.sh").exists()


def test_markers_are_registered(pytestconfig: pytest.Config) -> None:
    markers = pytestconfig.getini("markers")
    assert any(m.startswith("stress:") for m in markers)
    assert any(m.startswith("soak:") for m in markers)
