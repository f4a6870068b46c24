"""pytest integration: markers and a ``stress_run`` fixture for CI stress jobs.

Installed as a pytest plugin (entry point ``tdp_stress``), so a project that
depends on tdp-stress can write::

    import pytest

    @pytest.mark.stress
    def test_fixed_protocol_is_clean(stress_run):
        res = stress_run("smoke", duration="30s")   # a shipped config, by name
        assert res["exit_reason"] == "clean", res["violations"]

    @pytest.mark.stress
    def test_bug_is_caught(stress_run):
        res = stress_run(variant="mirror-no-freeze", duration="20s")
        assert res["exit_reason"] == "violation"

and run them with ``pytest -n auto -m stress`` (``-m soak`` for long ones).
``config`` is a file or the name of a shipped config (``tdp-stress configs``
lists them), so the example works from any directory.  Each call runs a real
supervisor with real worker processes, in its own output directory under the
test's ``tmp_path``, and returns the results.json dict; the reproducer bundle
of the first violation (the cause; later ones are marked ``consequence_of``)
is under ``<out>/bundles``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stress import config as config_mod
from stress.jobs.run import run_job
from stress.report.report import write_json_atomic


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stress: a tdp-stress run (seconds to minutes)")
    config.addinivalue_line("markers", "soak: a long tdp-stress run (minutes to hours)")


StressRun = Callable[..., dict[str, Any]]


@pytest.fixture
def stress_run(tmp_path: Path) -> StressRun:
    """Run tdp-stress in-process: ``stress_run(config=None, duration="10s", **overrides)``.

    ``config``: a config file or a shipped config's name (``"smoke"``); None is
    the shipped default.  ``overrides`` are ``run`` keys (``variant``, ``seed``, ``check_interval``,
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
        _, res = run_job(cfg, out)
        write_json_atomic(out / "results.json", res)
        return res

    return run
