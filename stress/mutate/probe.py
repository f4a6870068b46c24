"""The reachability probe: instrumented model files call :func:`hit` before each mutation site.

Each process (the supervisor and every forked worker) appends a site's key to its own
file ``$TDP_MUTATE_PROBE_DIR/hits-<pid>`` the first time it runs the site, with one
``write`` at once: nothing depends on how the process exits (workers may be killed).
Without the environment variable the probe records nothing.
"""

from __future__ import annotations

import os

_dir = os.environ.get("TDP_MUTATE_PROBE_DIR")
_seen: set[str] = set()
_fd = -1


def _after_fork() -> None:
    global _fd, _seen
    _fd = -1
    _seen = set()


os.register_at_fork(after_in_child=_after_fork)


def hit(key: str) -> None:
    global _fd
    if key in _seen:
        return
    _seen.add(key)
    if _dir is None:
        return
    if _fd < 0:
        _fd = os.open(os.path.join(_dir, f"hits-{os.getpid()}"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, (key + "\n").encode())
