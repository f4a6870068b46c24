"""Reading the trace rings: merge, decode, and the events that tell a violation's story.

Every process appends events to its own ring in shared memory (one native call
per event; see ``Words.trace``), numbered from one shared counter, so the rings
merge into one global order without any locking.  After a violation, crash or
hang the supervisor reads the last events of every ring (the rings outlive a
dead worker: they are in the arena) and keeps them with the report.  Showing
them to people (the timeline, Chrome trace-event JSON) is ``report/render.py``'s.
"""

from __future__ import annotations

from typing import Any

from stress.arena import TRACE_EVENT_WORDS, Layout, Slot
from stress.atomics import Words
from stress.model import events as ev
from stress.model.spte import describe
from stress.model.tdx import error_name


def read_events(w: Words, lay: Layout, roles: list[str], keep: int,
                until_ns: int | None = None) -> list[dict[str, Any]]:
    """The last ``keep`` events of all processes, in global order (with
    ``until_ns``, the last ones at or before that time: a run's first violation,
    so that a worker still spinning after it does not flush the cause out)."""
    if not lay.trace_entries:
        return []
    out: list[tuple[int, int, int, int, int, int]] = []
    for s in range(lay.n_slots):
        head = w.load(lay.slot(s, Slot.TRACE_HEAD))
        n = min(head, lay.trace_entries)
        base = lay.trace_ring(s)
        for h in range(head - n, head):
            e = base + (h % lay.trace_entries) * TRACE_EVENT_WORDS
            out.append(tuple(w.load(e + k) for k in range(TRACE_EVENT_WORDS)))  # type: ignore[arg-type]
    out.sort()
    if until_ns is not None:
        out = [e for e in out if e[1] <= until_ns] or out
    return [decode(e, roles) for e in out[-keep:]]


def decode(e: tuple[int, ...], roles: list[str]) -> dict[str, Any]:
    seq, t_ns, kw, a, b, c = e
    kind, level, worker, flags, table = ev.split_kind(kw)
    d: dict[str, Any] = {"seq": seq, "t_ns": t_ns, "worker": worker,
                         "role": roles[worker] if worker < len(roles) else "supervisor",
                         "event": ev.NAMES.get(kind, str(kind))}
    if kind in (ev.SPTE, ev.SPTE_WRITE):
        d.update(gfn=a, level=level, old=describe(b), new=describe(c))
        if kind == ev.SPTE_WRITE:
            d.update(table=table, root="mirror" if flags & ev.F_MIRROR else "direct",
                     failed=bool(flags & ev.F_FAILED), restore=bool(flags & ev.F_RESTORE))
    elif kind == ev.REMOVED_PT:
        d.update(table=a, gfn=b, level=level, shared=bool(c))
    elif kind == ev.TD:
        d.update(op=ev.TD_NAMES.get(a, a), gfn=b, status=c)
    elif kind == ev.FAULT_BEGIN:
        d.update(gfn=a, write=bool(b & 1))
    elif kind == ev.FAULT_END:
        d.update(gfn=a, ret=ev.RET_NAMES.get(b, b))
    elif kind == ev.LOCK:
        d.update(op=ev.LOCK_NAMES.get(a, a))
    elif kind == ev.SEAMCALL:
        d.update(call=ev.SEAMCALL_NAMES.get(a, a), gfn=b, level=level,
                 status="TDX_SUCCESS" if c == 0 else error_name(c))
    elif kind == ev.ROOT_REF:
        d.update(root=a, count=b - (1 << 64) if b >= 1 << 63 else b,
                 delta=1 if c == 1 else -1)
    elif kind == ev.INVALIDATE:
        d.update(start=a, end=b, phase="begin" if c == 0 else "end")
    elif kind == ev.UNSYNC:
        d.update(shadow_page=a, phase="marked" if b == 0 else "synced")
    # the raw values too, for timelines that show them in full (report/render.py)
    if kind in (ev.SPTE, ev.SPTE_WRITE):
        d.update(old_spte=f"{b:#018x}", new_spte=f"{c:#018x}")
    elif kind == ev.SEAMCALL:
        d["status_code"] = f"{c:#x}"
    return d


PROTOCOL_EVENTS = {"spte", "spte-write", "fault", "fault-end", "seamcall", "invalidate", "unsync"}


def focus(events: list[dict[str, Any]], violation: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The events that tell the story of ``violation``: up to the reporting
    worker's last event, protocol events only (no lock or reference noise), and
    when the violation names a gfn, only events in its 2 MiB region."""
    det = (violation or {}).get("details", {})
    worker = (violation or {}).get("worker")
    if isinstance(worker, int):
        last = max((i for i, e in enumerate(events) if e["worker"] == worker), default=None)
        if last is not None:
            events = events[: last + 1]
    events = [e for e in events if e["event"] in PROTOCOL_EVENTS]
    gfn = det.get("gfn")
    if isinstance(gfn, int):
        events = [e for e in events if _concerns(e, gfn)]
    return events


def _concerns(e: dict[str, Any], gfn: int) -> bool:
    """Does ``e`` touch the 2 MiB region of ``gfn``: an entry whose range covers
    it (an L3 entry covers 1 GiB), or an invalidation that overlaps it?"""
    region = gfn >> 9
    if e["event"] == "invalidate":
        return e["start"] >> 9 <= region <= (e["end"] - 1) >> 9
    if "gfn" not in e:
        return True
    level = e.get("level") or 0
    if level == 0:  # no gfn of its own (TDH.MEM.TRACK)
        return False
    shift = 9 * max(level - 1, 1)
    return e["gfn"] >> shift == gfn >> shift


def e_role(evs: list[dict[str, Any]], w: int) -> str:
    role = next(e["role"] for e in evs if e["worker"] == w)
    return f"{role}{w}"
