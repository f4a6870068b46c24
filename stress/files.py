"""Artifact permissions: results, bundles and reports readable by the group.

``tempfile`` creates files 0600 and directories 0700 (right for a temporary,
wrong for something renamed into place for a CI job's other users to read).
:func:`readable` gives them the mode an ordinary ``open`` or ``mkdir`` would:
0666 / 0777 minus the umask (0644 / 0755 with the usual 022, 0664 / 0775
with 002), and never less than owner read-write.
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


UMASK = _umask()
FILE_MODE = (0o666 & ~UMASK) | 0o600
DIR_MODE = (0o777 & ~UMASK) | 0o700


def readable(path: str | Path, directory: bool = False, executable: bool = False) -> None:
    """chmod ``path`` to the ordinary mode for a file (or directory)."""
    mode = DIR_MODE if directory else FILE_MODE
    if executable and not directory:
        mode |= (mode & 0o444) >> 2  # x wherever r
    os.chmod(path, mode)
