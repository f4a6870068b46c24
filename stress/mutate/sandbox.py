"""Run the tester on a copy of the ``stress`` package, in its own session, and clean up.

The workers are forked from the supervisor, so a mutant must be in the source the
supervisor imports: each mutant gets a copy of the package (the compiled
``_atomics.abi3.so`` included) with its one mutated file, and ``python -m stress.cli run``
runs with ``PYTHONPATH`` at the copy and its cwd in the copy.  PYTHONPATH's entries come
before site-packages on ``sys.path``, and the editable install's finder is appended to
``sys.meta_path`` after the path finder, so the copy wins; :meth:`Sandbox.make` checks
it anyway (``import_check``), and the mutate command refuses to run if it does not hold.

Each run is a new session (its own process group): on a timeout or an interrupt the whole
group is SIGKILLed, and any ``/dev/shm/tdpstress-<supervisor pid>-*`` segment left is
unlinked, so no orphan process or segment survives a mutant.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the stress package being run
# the arena's segment names (stress/arena.py): tdpstress-<creator pid>-<random>
PREFIX = "tdpstress-"
SHM_DIR = Path("/dev/shm")

_active: set[int] = set()  # process groups of the runs under way
_active_lock = threading.Lock()
_stopping = threading.Event()


class SandboxError(RuntimeError):
    """The copy is not what gets imported, or the package could not be copied."""


@dataclass
class RunResult:
    exit_code: int | None  # None: killed by our timeout (or interrupted)
    wall_s: float
    results: dict[str, Any] | None  # DIR/latest/results.json
    stderr: str
    pid: int
    timed_out: bool = False
    interrupted: bool = False


def segments_of(pid: int) -> list[str]:
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(f"{PREFIX}{pid}-"))
    except FileNotFoundError:
        return []


def cleanup_segments(pid: int) -> list[str]:
    """Unlink the segments of supervisor ``pid`` (all of its group is dead by now)."""
    removed = []
    for name in segments_of(pid):
        try:
            (SHM_DIR / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def kill_active() -> None:
    """SIGKILL every run under way (interrupt): their threads then clean up."""
    _stopping.set()
    with _active_lock:
        groups = list(_active)
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stopping() -> bool:
    return _stopping.is_set()


class Sandbox:
    """A temp directory holding a pristine copy of the package and one dir per run."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tdp-mutate-", dir=root))
        self.base = self.root / "base"
        try:
            shutil.copytree(PACKAGE_DIR, self.base / "stress", symlinks=False,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        except OSError as e:
            raise SandboxError(f"cannot copy {PACKAGE_DIR}: {e}") from None
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(self.base / "stress")],
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._n = 0
        self._lock = threading.Lock()

    def original(self, model_file: str) -> str:
        return (self.base / "stress" / "model" / model_file).read_text()

    def make(self, model_files: dict[str, str]) -> Path:
        """A fresh copy with ``model_files`` (name in stress/model/ -> text) written."""
        with self._lock:
            self._n += 1
            d = self.root / f"run{self._n}"
        shutil.copytree(self.base / "stress", d / "stress", symlinks=False)
        for name, text in model_files.items():
            (d / "stress" / "model" / name).write_text(text)
            for pyc in (d / "stress" / "model" / "__pycache__").glob(
                    name.removesuffix(".py") + ".*.pyc"):
                pyc.unlink()
        return d

    def drop(self, d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def import_check(d: Path, model_file: str) -> str | None:
    """None if ``stress`` and the model file import from copy ``d``; else the error
    (a stillborn mutant).  Raises SandboxError if the import comes from elsewhere."""
    mod = "stress.model." + model_file.removesuffix(".py")
    code = (f"import stress.cli, {mod} as m, stress; "
            "print(stress.__file__); print(m.__file__)")
    p = subprocess.run([sys.executable, "-c", code], cwd=d, env=_env(d), text=True,
                       capture_output=True, timeout=60)
    if p.returncode:
        lines = p.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {p.returncode}"
    got = p.stdout.split()
    want = [str(d / "stress" / "__init__.py"), str(d / "stress" / "model" / model_file)]
    if got != want:
        raise SandboxError(f"the copy in {d} is not what python imports: {got}")
    return None


def _env(d: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(d)
    env.pop("PYTHONSTARTUP", None)
    env.update(extra or {})
    return env


def run_config(d: Path, config: Path, duration: float, seed: int, grace: float = 30.0,
               extra_env: dict[str, str] | None = None, variant: str = "fixed") -> RunResult:
    """``python -m stress.cli run CONFIG [--variant V]`` on copy ``d``, killed after
    duration + grace."""
    out = d / "out"
    cmd = [sys.executable, "-m", "stress.cli", "run", str(config), "--duration",
           f"{duration:g}s", "--seed", str(seed), "--out", str(out), "--quiet"]
    if variant != "fixed":
        cmd += ["--variant", variant]
    t0 = time.monotonic()
    with _active_lock:
        if _stopping.is_set():
            return RunResult(None, 0.0, None, "", 0, interrupted=True)
        p = subprocess.Popen(cmd, cwd=d, env=_env(d, extra_env), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        _active.add(p.pid)
    timed_out = False
    try:
        _, err = p.communicate(timeout=duration + grace)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, err = p.communicate()
    finally:
        with _active_lock:
            _active.discard(p.pid)
    wall = time.monotonic() - t0
    try:  # whatever is left of the group (nothing, normally: workers die with it)
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    cleanup_segments(p.pid)
    results = None
    try:
        results = json.loads((out / "latest" / "results.json").read_text())
    except (OSError, ValueError):
        pass
    interrupted = _stopping.is_set() and (timed_out or p.returncode != 0)
    return RunResult(None if timed_out else p.returncode, wall, results, err or "", p.pid,
                     timed_out=timed_out, interrupted=interrupted)
