"""Trace events: the protocol's vocabulary, recorded at the atomics chokepoint.

The model calls ``kvm.w.trace(KIND, a, b, c)`` at the points a kernel developer
would want in a timeline: every SPTE transition with old and new values, lock
acquire and release, SEAMCALL results, fault begin/end with its outcome, root
reference changes, invalidations.  ``harness/trace.py`` merges the rings of
all workers by the global sequence number and renders them.
"""

from __future__ import annotations

FAULT_BEGIN = 1  # a=gfn b=write|private<<1 c=root
FAULT_END = 2  # a=gfn b=RET_PF_* c=0
SPTE = 3  # a=gfn b=old c=new (level in the kind word)
SPTE_WRITE = 4  # a raw write of a frozen entry: a=gfn b=old c=new (level in kind)
LOCK = 5  # a=0 unlock-read 1 read 2 write 3 unlock-write
SEAMCALL = 6  # a=call id b=gfn c=status (level in kind)
ROOT_REF = 7  # a=root b=count after c=+1/-1 (as two's complement)
INVALIDATE = 8  # a=start b=end c=phase (0 begin, 1 end)
UNSYNC = 9  # a=shadow page b=phase (0 marked, 1 synced) c=0
OP = 10  # a=op id b=0 begin / 1 end

NAMES = {FAULT_BEGIN: "fault", FAULT_END: "fault-end", SPTE: "spte", SPTE_WRITE: "spte-write",
         LOCK: "lock", SEAMCALL: "seamcall", ROOT_REF: "root-ref", INVALIDATE: "invalidate",
         UNSYNC: "unsync", OP: "op"}

SEAMCALL_IDS = {"TDH.MEM.SEPT.ADD": 1, "TDH.MEM.PAGE.AUG": 2, "TDH.MEM.RANGE.BLOCK": 3,
                "TDH.MEM.TRACK": 4, "TDH.MEM.PAGE.REMOVE": 5, "TDH.MEM.SEPT.REMOVE": 6}
SEAMCALL_NAMES = {v: k for k, v in SEAMCALL_IDS.items()}
LOCK_NAMES = {0: "read_unlock", 1: "read_lock", 2: "write_lock", 3: "write_unlock"}
RET_NAMES = {0: "FIXED", 1: "SPURIOUS", 2: "RETRY", 3: "EMULATE", 4: "EXIT"}


def kind_word(kind: int, level: int = 0) -> int:
    return kind | level << 8
