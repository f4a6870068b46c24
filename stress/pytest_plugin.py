"""pytest integration: markers and a ``stress_run`` fixture for CI stress jobs.

Installed as a pytest plugin (entry point ``tdp_stress``), so a project that
depends on tdp-stress can write::

    import pytest

    @pytest.mark.stress
    def test_fixed_protocol_is_clean(stress_run):
        res = stress_run("configs/smoke.toml", duration="30s")
        assert res["exit_reason"] == "clean", res["violations"]

    @pytest.mark.stress
    def test_bug_is_caught(stress_run):
        res = stress_run(variant="mirror-no-freeze", duration="20s")
        assert res["exit_reason"] == "violation"

and run them with ``pytest -n auto -m stress`` (``-m soak`` for long ones).
Each call runs a real supervisor with real worker processes, in its own
output directory under the test's ``tmp_path``, and returns the results.json
dict; reproducer bundles of violations are under ``<out>/bundles``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stress import config as config_mod
from stress.bundle import write_bundle
from stress.harness.supervisor import Supervisor
from stress.report import build_results, now_iso, write_json_atomic


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stress: a tdp-stress run (seconds to minutes)")
    config.addinivalue_line("markers", "soak: a long tdp-stress run (minutes to hours)")


StressRun = Callable[..., dict[str, Any]]


@pytest.fixture
def stress_run(tmp_path: Path) -> StressRun:
    """Run tdp-stress in-process: ``stress_run(config=None, duration="10s", **overrides)``.

    ``overrides`` are ``run`` keys (``variant``, ``seed``, ``check_interval``,
    ...) or ``section={...}`` dicts (``workers={"vcpu": 4}``).
    """
    counter = [0]

    def run(config: str | Path | None = None, duration: str | float = "10s",
            **overrides: Any) -> dict[str, Any]:
        counter[0] += 1
        out = tmp_path / f"stress-run-{counter[0]}"
        ov: dict[str, dict[str, Any]] = {"run": {"duration": duration, "out": str(out)}}
        for key, val in overrides.items():
            if isinstance(val, dict):
                ov.setdefault(key, {}).update(val)
            else:
                ov["run"][key] = val
        cfg = config_mod.load(config, ov)
        started = now_iso()
        outcome = Supervisor(cfg).run()
        res = build_results(cfg, outcome, started)
        for v in res["violations"]:
            v["bundle"] = str(write_bundle(out / "bundles", cfg, v, outcome.trace)[0])
        write_json_atomic(out / "results.json", res)
        return res

    return run
