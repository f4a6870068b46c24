from __future__ import annotations

import multiprocessing as mp
import os
import stat
import struct

import pytest

from stress.arena import (
    MAGIC,
    SHM_DIR,
    Arena,
    ArenaError,
    Layout,
    list_segments,
    pid_alive,
    sweep_stale,
)


def test_layout_regions_do_not_overlap() -> None:
    lay = Layout.build(n_slots=4, n_pages=100)
    assert lay.control < lay.globals < lay.slots < lay.sp_meta < lay.bitmap < lay.pages
    assert lay.pages % 512 == 0  # page-table pages are 4 KiB aligned
    assert lay.spt(99) + 512 == lay.prov and lay.prov + 100 * 512 == lay.nwords


def test_create_attach_and_unlink() -> None:
    lay = Layout.build(n_slots=2, n_pages=8)
    a = Arena.create(lay, config_hash=1234)
    try:
        path = SHM_DIR / a.name
        assert a.name.startswith(f"tdpstress-{os.getpid()}-")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        b = Arena.attach(a.name, lay, config_hash=1234)
        b.close()
        assert path.exists()  # a non-owner never unlinks
        with pytest.raises(ArenaError, match="config hash"):
            Arena.attach(a.name, lay, config_hash=1)
        with pytest.raises(ArenaError, match="words"):
            Arena.attach(a.name, Layout.build(n_slots=2, n_pages=9))
    finally:
        a.close()
    assert a.name not in list_segments()


def test_attach_refuses_foreign_magic_and_version() -> None:
    lay = Layout.build(n_slots=2, n_pages=8)
    a = Arena.create(lay, config_hash=0)
    try:
        a.shm.buf[0:8] = struct.pack("<Q", 0xDEAD)
        with pytest.raises(ArenaError, match="magic"):
            Arena.attach(a.name, lay)
        a.shm.buf[0:16] = struct.pack("<QQ", MAGIC, 99)
        with pytest.raises(ArenaError, match="layout version"):
            Arena.attach(a.name, lay)
    finally:
        a.close()


def test_sweep_removes_only_dead_owners() -> None:
    p = mp.get_context("fork").Process(target=lambda: None)
    p.start()
    p.join()
    dead = p.pid
    assert not pid_alive(dead)
    name = f"tdpstress-{dead}-deadbeef"
    with open(SHM_DIR / name, "wb") as f:
        f.write(struct.pack("<5Q", MAGIC, 1, 0, dead, 1))
    lay = Layout.build(n_slots=2, n_pages=8)
    live = Arena.create(lay, 0)
    try:
        removed = dict(sweep_stale())
        # another run starting meanwhile (an xdist worker's CLI test) sweeps too and may
        # have taken the dead owner's segment first; either way it is gone, the live one not
        assert name not in list_segments() and "dead" in removed.get(name, "dead")
        assert live.name not in removed and live.name in list_segments()
    finally:
        live.close()


def test_owner_close_after_external_unlink_leaves_tracker_quiet() -> None:
    """The owner's segment removed behind its back (``rm /dev/shm/...``):
    closing still says nothing, raises nothing, and the resource tracker has
    nothing left to "leak" at exit."""
    import subprocess
    import sys

    code = (
        "import os\n"
        "from stress.arena import SHM_DIR, Arena, Layout\n"
        "a = Arena.create(Layout.build(n_slots=1, n_pages=4), config_hash=1)\n"
        "os.unlink(SHM_DIR / a.name)\n"
        "a.close()\n"
        "print(a.name)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "leaked" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (SHM_DIR / p.stdout.strip()).exists()
