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
SPTE = 3  # (older traces) handle_changed_spte's bookkeeping: a=gfn b=old c=new
SPTE_WRITE = 4  # an SPTE store, xchg or cmpxchg, where it happens: a=gfn b=old c=new
#                (a failed cmpxchg: b=expected c=found); level, flags, table in kind
LOCK = 5  # a=0 unlock-read 1 read 2 write 3 unlock-write
SEAMCALL = 6  # a=call id b=gfn c=status (level in kind)
ROOT_REF = 7  # a=root b=count after c=+1/-1 (as two's complement)
INVALIDATE = 8  # a=start b=end c=phase (0 begin, 1 end)
UNSYNC = 9  # a=shadow page b=phase (0 marked, 1 synced) c=0
OP = 10  # a=op id b=0 begin / 1 end
REMOVED_PT = 11  # handle_removed_pt: a=table b=base gfn c=shared (level in kind)
TD = 12  # TDX vCPU events: a=TD_* b=gfn c=status

# flags of an SPTE_WRITE event (kind word bits 40-43); the table is bits 44-63
F_MIRROR = 1  # the entry is in a mirror table
F_FAILED = 2  # a cmpxchg that lost: nothing was written
F_RESTORE = 4  # the owner of a frozen entry put the old value back (BUSY)
_FLAGS_SHIFT = 40
_TABLE_SHIFT = 44

TD_VP_ENTER, TD_EXIT, TD_ACCEPT, TD_VM_DEAD, TD_MAP_GPA = range(1, 6)
TD_NAMES = {TD_VP_ENTER: "TDH.VP.ENTER", TD_EXIT: "TD exit", TD_ACCEPT: "TDG.MEM.PAGE.ACCEPT",
            TD_VM_DEAD: "kvm_vm_dead", TD_MAP_GPA: "TDG.VP.VMCALL<MapGPA>"}

NAMES = {FAULT_BEGIN: "fault", FAULT_END: "fault-end", SPTE: "spte", SPTE_WRITE: "spte-write",
         LOCK: "lock", SEAMCALL: "seamcall", ROOT_REF: "root-ref", INVALIDATE: "invalidate",
         UNSYNC: "unsync", OP: "op", REMOVED_PT: "removed-pt", TD: "td"}

SEAMCALL_IDS = {"TDH.MEM.SEPT.ADD": 1, "TDH.MEM.PAGE.AUG": 2, "TDH.MEM.RANGE.BLOCK": 3,
                "TDH.MEM.TRACK": 4, "TDH.MEM.PAGE.REMOVE": 5, "TDH.MEM.SEPT.REMOVE": 6,
                "TDH.MEM.PAGE.ADD": 7, "TDH.PHYMEM.PAGE.RECLAIM": 8, "TDH.MR.EXTEND": 9,
                "TDH.MR.FINALIZE": 10}
SEAMCALL_NAMES = {v: k for k, v in SEAMCALL_IDS.items()}
LOCK_NAMES = {0: "read_unlock", 1: "read_lock", 2: "write_lock", 3: "write_unlock"}
RET_NAMES = {0: "FIXED", 1: "SPURIOUS", 2: "RETRY", 3: "EMULATE", 4: "EXIT"}


def kind_word(kind: int, level: int = 0) -> int:
    return kind | level << 8


def spte_kind(level: int, table: int, flags: int = 0) -> int:
    """The kind word of an SPTE_WRITE event: level, flags and the entry's table
    (the native trace adds the worker in bits 16-39)."""
    return (SPTE_WRITE | level << 8 | (flags & 0xF) << _FLAGS_SHIFT
            | (table & 0xFFFFF) << _TABLE_SHIFT)


def split_kind(kw: int) -> tuple[int, int, int, int, int]:
    """(kind, level, worker, flags, table) of a kind word."""
    return (kw & 0xFF, (kw >> 8) & 0xFF, (kw >> 16) & 0xFFFFFF, (kw >> _FLAGS_SHIFT) & 0xF,
            kw >> _TABLE_SHIFT)
