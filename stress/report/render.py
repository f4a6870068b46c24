"""Rendering merged traces for people: the timeline and the Chrome trace.

* :func:`timeline` is Sean Christopherson's vCPU0/vCPU1 diagram (Jan 2023): one column per worker,
  one event per row in global order, a time gutter (microseconds since the
  first event shown).  Nothing is cut: every value is written in full, in hex
  (gfns, pfns, SPTEs with their decoded form and A/D bits, SEAMCALL status
  codes), and an event longer than its column wraps onto the next rows of
  that column.  ``width`` is the whole line (default 160).
* :func:`chrome_trace` is Chrome trace-event JSON for Perfetto or
  chrome://tracing: one process for the run, one named thread per worker
  (role and index), complete slices (``"ph": "X"``) for faults
  (FAULT_BEGIN .. FAULT_END), ``mmu_lock`` holds (acquire .. release, read or
  write) and zaps (the SPTEs a worker cleared within one lock hold), instant
  events for everything else (SEAMCALLs carry no duration in the trace).
  A slice cut by the trace window starts at the window's first event or ends
  at its last, and says so.

Events decoded by ``harness/trace.py`` are rendered here; a kind this module
does not know is shown by its name.
"""

from __future__ import annotations

import json
import re
import textwrap
from typing import Any

from stress.model.spte import (
    FROZEN_SPTE,
    SHADOW_NONPRESENT_VALUE,
    describe,
    is_shadow_present_pte,
    shadow_accessed_mask,
    shadow_dirty_mask,
)

DEFAULT_WIDTH = 160
GUTTER = 11  # "+12345.6us "
MIN_COLUMN = 14  # narrower columns than this wrap every word: the line grows past width

# detail keys whose integers are addresses or ids, shown in hex
_HEX_KEYS = re.compile(r"gfn|pfn|spte|table|root|page|start|end|shadow|sp\b|addr|status")
_HEX_IN_TEXT = re.compile(r"\b(gfn|pfn|table|root|page|start|end)=(\d+)\b")


def spte_text(v: int) -> str:
    """An SPTE in full: its 64-bit value and what it means, A/D bits included."""
    text = describe(v)
    if is_shadow_present_pte(v) and v not in (SHADOW_NONPRESENT_VALUE, FROZEN_SPTE):
        ad = ("A" if v & shadow_accessed_mask else "") + ("D" if v & shadow_dirty_mask else "")
        if ad and text.endswith(")"):
            text = f"{text[:-1]},{','.join(ad)})"
    return f"{v:#018x} {text}"


def _spte(e: dict[str, Any], side: str) -> str:
    raw = e.get(f"{side}_spte")
    if isinstance(raw, str):
        try:
            return spte_text(int(raw, 16))
        except ValueError:
            return raw
    return str(e.get(side))


def hexify(text: str) -> str:
    """``gfn=33282`` -> ``gfn=0x8202`` in a message."""
    return _HEX_IN_TEXT.sub(lambda m: f"{m.group(1)}={int(m.group(2)):#x}", text)


def details_text(det: dict[str, Any]) -> str:
    """A violation's details as ``key=value`` pairs, addresses in hex."""
    parts = []
    for k, v in det.items():
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and _HEX_KEYS.search(k):
            parts.append(f"{k}={v:#x}")
        elif isinstance(v, str):
            parts.append(f"{k}={hexify(v)}")
        else:
            parts.append(f"{k}={json.dumps(v, default=str)}")
    return " ".join(parts)


def _where(e: dict[str, Any]) -> str:
    """The root (mirror or direct) and table of an entry, when the event carries
    them (``root`` "mirror"/"direct" or a root id, ``mirror`` a flag, ``table``)."""
    parts = []
    root = e.get("root")
    if "mirror" in e:
        parts.append("mirror" if e["mirror"] else "direct")
    if isinstance(root, str):
        parts.append(root)
    elif isinstance(root, int) and not isinstance(root, bool):
        parts.append(f"root {root:#x}")
    if isinstance(e.get("table"), int):
        parts.append(f"table {e['table']:#x}")
    return f" ({' '.join(parts)})" if parts else ""


def event_text(e: dict[str, Any]) -> str:
    """One event in full, values in hex."""
    k = e["event"]
    if k in ("spte", "spte-write"):
        where = f"L{e['level']}[gfn {e['gfn']:#x}]{_where(e)}"
        if e.get("failed"):  # a cmpxchg that lost: old is what it expected
            return (f"cmpxchg {where} expected {_spte(e, 'old')}, found "
                    f"{_spte(e, 'new')}: lost")
        # spte: handle_changed_spte's record of a change; spte-write: the store itself
        verb = "changed" if k == "spte" else "restore" if e.get("restore") else "store"
        return f"{verb} {where} {_spte(e, 'old')} -> {_spte(e, 'new')}"
    if k == "fault":
        kind = " write" if e.get("write") else " read"
        return f"fault gfn {e['gfn']:#x}{kind}{_where(e)}"
    if k == "fault-end":
        return f"fault gfn {e['gfn']:#x} -> RET_PF_{e['ret']}"
    if k == "lock":
        return f"mmu_lock {e['op']}"
    if k == "seamcall":
        code = e.get("status_code")
        status = e["status"] if code in (None, "0x0") else f"{e['status']} ({code})"
        lvl = f", L{e['level']}" if e.get("level") else ""
        return f"{e['call']}(gfn {e['gfn']:#x}{lvl}){_where(e)} = {status}"
    if k == "root-ref":
        return f"root {e['root']:#x} refcount -> {e['count']} ({'+1' if e['delta'] > 0 else '-1'})"
    if k == "invalidate":
        return f"invalidate [{e['start']:#x}, {e['end']:#x}) {e['phase']}"
    if k == "unsync":
        return f"shadow page {e['shadow_page']:#x} {e['phase']}"
    if k == "removed-pt":
        return f"handle_removed_pt t{e['table']} L{e['level']} gfn {e['gfn']:#x}"
    if k == "td":
        return f"{e['op']} gfn {e['gfn']:#x} -> {e['status']:#x}"
    return k


def _name(e: dict[str, Any]) -> str:
    return f"{e['role']}{e['worker']}"


def timeline(events: list[dict[str, Any]], last: int = 40, width: int = 0) -> str:
    """The last ``last`` events, one column per worker, ``width`` characters
    wide in all (default 160; more only when the workers do not fit in
    MIN_COLUMN each); long events wrap within their column."""
    evs = events[-last:] if last else list(events)
    if not evs:
        return "(no events)"
    workers = sorted({e["worker"] for e in evs})
    names = {e["worker"]: _name(e) for e in evs}
    total = width or DEFAULT_WIDTH
    col = max(MIN_COLUMN, (total - GUTTER) // len(workers))
    t0 = evs[0]["t_ns"]
    lines = [(" " * GUTTER + "".join(f"{names[w]:<{col}}" for w in workers)).rstrip(),
             (f"{'t (us)':<{GUTTER}}" + "".join(f"{'=' * (col - 2):<{col}}"
                                                for _ in workers)).rstrip()]
    for e in evs:
        indent = " " * (col * workers.index(e["worker"]))
        wrapped = textwrap.wrap(event_text(e), col - 2, subsequent_indent="  ",
                                break_on_hyphens=False) or [""]
        stamp = f"+{(e['t_ns'] - t0) / 1000:.1f}"
        for j, piece in enumerate(wrapped):
            gutter = f"{stamp:<{GUTTER}}" if j == 0 else " " * GUTTER
            lines.append((gutter + indent + piece).rstrip())
    return "\n".join(lines)


LOCK_ACQUIRE = {"read_lock": "read", "write_lock": "write"}
LOCK_RELEASE = {"read_unlock": "read", "write_unlock": "write"}


def _cleared(e: dict[str, Any]) -> bool:
    """An SPTE change that zaps: a present entry made non-present or frozen."""
    if e["event"] not in ("spte", "spte-write") or e.get("failed"):
        return False
    try:
        old, new = int(e["old_spte"], 16), int(e["new_spte"], 16)
    except (KeyError, TypeError, ValueError):
        return str(e.get("new")) in ("SHADOW_NONPRESENT_VALUE", "FROZEN_SPTE") and \
            str(e.get("old", "")).startswith("present")
    return is_shadow_present_pte(old) and not is_shadow_present_pte(new)


def _slices(evs: list[dict[str, Any]], t0: int, t_end: int) -> list[dict[str, Any]]:
    """Complete slices of one worker's events: faults, lock holds, zaps."""
    out: list[dict[str, Any]] = []

    def slice_(name: str, cat: str, b: int, e: int, args: dict[str, Any]) -> None:
        out.append({"name": name, "cat": cat, "ph": "X", "ts": (b - t0) / 1000.0,
                    "dur": max(e - b, 1) / 1000.0, "args": args})

    fault: dict[str, Any] | None = None
    lock: tuple[str, int] | None = None
    zap: list[dict[str, Any]] = []

    def close_zap() -> None:
        if zap:
            slice_(f"zap ({len(zap)} SPTE{'s' if len(zap) > 1 else ''})", "zap",
                   zap[0]["t_ns"], zap[-1]["t_ns"],
                   {"gfns": [f"{z['gfn']:#x}" for z in zap][:64],
                    "levels": sorted({z["level"] for z in zap})})
            zap.clear()

    for e in evs:
        k = e["event"]
        if k == "fault":
            if fault is not None:  # no FAULT_END seen (the window or a crash cut it)
                slice_(f"fault gfn {fault['gfn']:#x}", "fault", fault["t_ns"], e["t_ns"],
                       {"gfn": f"{fault['gfn']:#x}", "ret": "(no end seen)"})
            fault = e
        elif k == "fault-end":
            begin = fault["t_ns"] if fault is not None and fault["gfn"] == e["gfn"] else t0
            slice_(f"fault gfn {e['gfn']:#x} -> {e['ret']}", "fault", begin, e["t_ns"],
                   {"gfn": f"{e['gfn']:#x}", "ret": e["ret"],
                    **({} if fault is not None else {"note": "began before the trace window"})})
            fault = None
        elif k == "lock" and e["op"] in LOCK_ACQUIRE:
            close_zap()
            lock = (LOCK_ACQUIRE[e["op"]], e["t_ns"])
        elif k == "lock" and e["op"] in LOCK_RELEASE:
            close_zap()
            mode = LOCK_RELEASE[e["op"]]
            begin = lock[1] if lock is not None and lock[0] == mode else t0
            args = {"mode": mode}
            if lock is None:
                args["note"] = "acquired before the trace window"
            slice_(f"mmu_lock ({mode})", "mmu_lock", begin, e["t_ns"], args)
            lock = None
        elif _cleared(e):
            zap.append(e)
        elif k in ("spte", "spte-write"):
            close_zap()
    close_zap()
    if lock is not None:
        slice_(f"mmu_lock ({lock[0]})", "mmu_lock", lock[1], t_end,
               {"mode": lock[0], "note": "still held at the end of the trace"})
    if fault is not None:
        slice_(f"fault gfn {fault['gfn']:#x}", "fault", fault["t_ns"], t_end,
               {"gfn": f"{fault['gfn']:#x}", "note": "no end in the trace"})
    return out


def chrome_trace(events: list[dict[str, Any]], title: str = "tdp-stress",
                 names: list[str] | None = None) -> str:
    """Chrome trace-event JSON (Perfetto, chrome://tracing): see the module doc.
    ``names``: worker index -> thread name (default: role and index)."""
    pid = 1
    # tid = worker index + 1 (tid 0 reads as "the idle task" in some viewers)
    t0 = events[0]["t_ns"] if events else 0
    t_end = events[-1]["t_ns"] if events else 0
    threads = {e["worker"]: _name(e) for e in events}
    for i, n in enumerate(names or []):
        threads[i] = n
    meta: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": title}}]
    for w, n in sorted(threads.items()):
        meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": w + 1,
                     "args": {"name": n}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": w + 1,
                     "args": {"sort_index": w}})
    out: list[dict[str, Any]] = []
    for w in sorted({e["worker"] for e in events}):
        for s in _slices([e for e in events if e["worker"] == w], t0, t_end):
            out.append({**s, "pid": pid, "tid": w + 1})
    for e in events:
        if e["event"] in ("fault", "fault-end", "lock"):
            continue  # shown as slices
        out.append({"name": event_text(e), "cat": e["event"], "ph": "i", "s": "t",
                    "ts": (e["t_ns"] - t0) / 1000.0, "pid": pid, "tid": e["worker"] + 1,
                    "args": {k: v for k, v in e.items() if k != "t_ns"}})
    out.sort(key=lambda x: x["ts"])
    return json.dumps({"traceEvents": meta + out, "displayTimeUnit": "ns"})
