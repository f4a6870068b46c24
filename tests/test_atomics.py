"""The native atomics and locks, in one process and across real processes."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from multiprocessing import shared_memory

import pytest

from stress.atomics import LockAborted, Words

ctx = mp.get_context("fork")
MASK = (1 << 64) - 1


@pytest.fixture
def shm():
    m = shared_memory.SharedMemory(create=True, size=4096, name=None)
    yield m
    m.close()
    m.unlink()


def test_single_word_semantics(shm) -> None:
    w = Words(shm.buf)
    try:
        w.store(1, 5)
        assert w.load(1) == 5
        assert w.cmpxchg(1, 5, 7) == 5 and w.load(1) == 7
        assert w.cmpxchg(1, 5, 9) == 7 and w.load(1) == 7  # failure returns the value found
        assert w.xchg(1, 11) == 7 and w.load(1) == 11
        assert w.fetch_add(1, 4) == 11 and w.load(1) == 15
        assert w.fetch_add(1, -1) == 15 and w.load(1) == 14
        assert w.fetch_and(1, 0b0110) == 14 and w.load(1) == 0b0110
        assert w.fetch_or(1, 1) == 0b0110 and w.load(1) == 0b0111
        w.store(2, MASK)
        assert w.load(2) == MASK
        w.fill(8, 4, 3)
        assert [w.load(i) for i in range(8, 12)] == [3, 3, 3, 3]
        assert w.count_equal(8, 4, 3) == 4
        assert w.scan_ne(8, 4, 3) == []
        w.store(10, 99)
        assert w.scan_ne(8, 4, 3) == [(2, 99)]
        assert w.find_mask(8, 4, 64) == 2
    finally:
        w.release()


def test_bitmap_alloc_hands_each_bit_out_once(shm) -> None:
    w = Words(shm.buf)
    try:
        w.store(0, 0b1011)
        got = {w.bitmap_alloc(0, 1, 0) for _ in range(3)}
        assert got == {0, 1, 3}
        assert w.bitmap_alloc(0, 1, 0) == -1
    finally:
        w.release()


def _hammer_add(name: str, n: int) -> None:
    m = shared_memory.SharedMemory(name=name)
    w = Words(m.buf)
    for _ in range(n):
        w.fetch_add(0, 1)
    for _ in range(n):  # a cmpxchg loop, as the model's writers do
        while True:
            old = w.load(1)
            if w.cmpxchg(1, old, old + 1) == old:
                break
    w.release()
    m.close()


def test_two_processes_lose_no_update(shm) -> None:
    n = 50_000
    procs = [ctx.Process(target=_hammer_add, args=(shm.name, n)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    w = Words(shm.buf)
    try:
        assert w.load(0) == 2 * n
        assert w.load(1) == 2 * n
    finally:
        w.release()


def _locked_pairs(name: str, n: int, mode: str) -> None:
    """Under the lock, words 10 and 11 must be equal; writers bump both non-atomically."""
    m = shared_memory.SharedMemory(name=name)
    w = Words(m.buf, abort_i=3)
    bad = 0
    for _ in range(n):
        if mode == "write":
            w.write_lock(0, 1, 4242)
            a = w.load(10)
            w.store(10, a + 1)
            w.store(11, a + 1)
            w.write_unlock(0, 1)
        elif mode == "read":
            w.read_lock(0)
            bad += w.load(10) != w.load(11)
            w.read_unlock(0)
        else:
            w.spin_lock(2, 77)
            a = w.load(12)
            w.store(12, a + 1)
            w.spin_unlock(2)
    w.fetch_add(13, bad)
    w.release()
    m.close()


def test_rwlock_and_spinlock_exclude_across_processes(shm) -> None:
    n = 20_000
    procs = [ctx.Process(target=_locked_pairs, args=(shm.name, n, mode))
             for mode in ("write", "write", "read", "read", "spin", "spin")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    w = Words(shm.buf)
    try:
        assert w.load(10) == w.load(11) == 2 * n  # no lost write-side update
        assert w.load(13) == 0  # no reader saw a torn pair
        assert w.load(12) == 2 * n
        assert w.load(0) == 0 and w.load(1) == 0 and w.load(2) == 0  # all released
    finally:
        w.release()


def test_lock_records_holder_and_aborts(shm) -> None:
    w = Words(shm.buf, abort_i=3)
    try:
        w.write_lock(0, 1, 4242)
        assert w.load(1) == 4242  # the holder is named
        assert not w.spin_trylock(2, 1) or w.spin_unlock(2) is None
        w.store(3, 1)  # abort: a waiter gives up instead of spinning for ever
        with pytest.raises(LockAborted):
            w.read_lock(0)
        with pytest.raises(LockAborted):
            w.write_lock(0, 1, 1)
        w.write_unlock(0, 1)
        assert w.load(0) == 0 and w.load(1) == 0
        w.store(3, 0)
        w.read_lock(0)
        w.read_lock(0)
        assert w.load(0) == 2
        w.read_unlock(0)
        w.read_unlock(0)
        assert w.spin_trylock(2, 9) and w.load(2) == 9
        assert not w.spin_trylock(2, 10)
        w.spin_unlock(2)
    finally:
        w.release()


def _queued(w: Words) -> int:
    return w.load(0) >> 32 & 0xFFFF


def _spin_until(cond) -> None:  # noqa: ANN001
    for _ in range(200_000):
        if cond():
            return
        time.sleep(0.0001)
    raise AssertionError("timed out")


def test_rwlock_contended_counts_waiting_readers_and_writers(shm) -> None:
    """qrwlock's queued_rwlock_is_contended: any task in a slow path, reader or
    writer.  A reader waiting for a writer makes the writer's needbreak true; a
    reader queued behind a waiting writer is counted too; every count leaves
    when its task gets the lock."""
    w = Words(shm.buf, abort_i=3)
    waiter = Words(shm.buf, abort_i=4)
    writer = Words(shm.buf, abort_i=5)
    try:
        w.write_lock(0, 1, 4242)
        assert not w.rwlock_contended(0)
        reader = threading.Thread(target=lambda: (waiter.read_lock(0), waiter.read_unlock(0)))
        reader.start()
        _spin_until(lambda: _queued(w) == 1)
        assert w.rwlock_contended(0)  # the write holder's rwlock_needbreak: a reader waits
        w.write_unlock(0, 1)
        reader.join(10)
        assert w.load(0) == 0 and not w.rwlock_contended(0)

        w.read_lock(0)  # a reader holds; a writer waits; a reader queues behind it
        wt = threading.Thread(target=lambda: (writer.write_lock(0, 1, 7),
                                              writer.write_unlock(0, 1)))
        wt.start()
        _spin_until(lambda: _queued(w) == 1)
        rt = threading.Thread(target=lambda: (waiter.read_lock(0), waiter.read_unlock(0)))
        rt.start()
        _spin_until(lambda: _queued(w) == 2)  # the reader counts as well as the writer
        assert w.rwlock_contended(0) and w.load(0) & 0xFFFFFFFF == 1
        w.read_unlock(0)
        wt.join(10)
        rt.join(10)
        assert w.load(0) == 0 and w.load(1) == 0
    finally:
        for x in (w, waiter, writer):
            x.release()


def test_an_aborted_waiter_leaves_no_count_behind(shm) -> None:
    w = Words(shm.buf, abort_i=3)
    try:
        w.write_lock(0, 1, 1)
        w.store(3, 1)
        with pytest.raises(LockAborted):
            w.read_lock(0)
        with pytest.raises(LockAborted):
            w.write_lock(0, 1, 2)
        assert _queued(w) == 0 and w.load(0) == 1 << 63
        w.store(3, 0)
        w.write_unlock(0, 1)
        assert w.load(0) == 0
    finally:
        w.release()
