"""The kernel engine in a process: its module, its arena, its VM.

:class:`KernelVm` is what the harness holds: it builds (or finds cached) the
module for the configured tree, maps the arena at its fixed address, sets the
MMU up as vmx.c and mmu.c do, creates the VM, its memslots and one vCPU per
vCPU worker.  The supervisor creates it before forking; every worker inherits
the mapping and the loaded module, sets its task index, and calls the
``ke_*`` operations.  Nothing here knows the CLI or the oracles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from stress.config import Config, guest_memslots
from stress.kernel.build import Built, build, load
from stress.kernel.errors import KernelEngineError
from stress.kernel.mutations import get_mutation
from stress.kernel.tree import Tree, open_tree

# the model's SPTE encoding is EPT's (bit 11 present, PFN 12-51, A/D 8/9): one describer
from stress.model.spte import describe

#: Where the arena is mapped in every process (MAP_FIXED_NOREPLACE): a user
#: address far from where Python, its heap and its libraries live.
ARENA_BASE = 0x5E0000000000

#: ksglue.c's KE_OP_* numbers, by name (results.json counts ops by these names).
OPS = ("none", "guest_access", "zap_gfn_range", "unmap", "zap_all_fast", "wrprot_slot",
       "clear_dirty_slot", "split", "zap_collapsible", "age", "test_age", "dirty_log",
       "nx_recover", "vcpu_unload", "slot_flags", "memslot_delete", "memslot_create")
#: RET_PF_* of mmu_internal.h, the page-fault results a vCPU counts.
RET_PF = ("continue", "retry", "emulate", "write_protected", "invalid", "fixed", "spurious")

VIOLATION_KINDS = {1: "WARN", 2: "BUG", 3: "lockdep", 4: "KASAN", 5: "printk", 6: "oracle",
                   7: "hang"}

KVM_MEM_LOG_DIRTY_PAGES = 1


_KINDS = {1: "WARN", 2: "BUG", 3: "lockdep", 4: "KASAN", 5: "printk", 6: "oracle",
                   7: "hang"}

KVM_MEM_LOG_DIRTY_PAGES = 1


# EPT SPTE bits, as spte.h and vmx.h define them (for the trace's descriptions)
_FROZEN = (1 << 63) | 0x5A0
_NONPRESENT = 1 << 63
_MMU_PRESENT = 1 << 11


def describe_spte(v: int, level: int) -> str:
    """An SPTE as a person reads it: not present, FROZEN, a table or a leaf."""
    if v == _FROZEN:
        return "FROZEN"
    if not v & _MMU_PRESENT:
        return "-" if v == _NONPRESENT else f"not present {v:#x}"
    pfn = (v >> 12) & ((1 << 40) - 1)
    rwx = "".join(c if v >> b & 1 else "-" for c, b in (("r", 0), ("w", 1), ("x", 2)))
    leaf = level == 1 or bool(v >> 7 & 1)
    if not leaf:
        return f"table {pfn:#x}"
    ad = ("A" if v >> 8 & 1 else "") + ("D" if v >> 9 & 1 else "")
    return f"{'2M ' if level == 2 else '1G ' if level == 3 else ''}pfn {pfn:#x} {rwx}" + \
        (f" {ad}" if ad else "")


_KINDS = {2: "store", 3: "xchg", 4: "cmpxchg", 5: "cmpxchg", 6: "atomic-and"}


def _decode(e: Any, task: int, role: str) -> dict[str, Any]:
    d: dict[str, Any] = {"seq": int(e.seq), "t_ns": int(e.t_ns), "worker": task, "role": role}
    op = OPS[e.op] if e.op < len(OPS) else str(e.op)
    if e.kind in (16, 17):
        d.update(event="op", op=op, phase="begin" if e.kind == 16 else "end")
        if e.kind == 17:
            r = int(e.val)
            d["ret"] = r - (1 << 64) if r >= 1 << 63 else r
        return d
    level = int(e.level)
    d.update(event="spte-write", gfn=int(e.gfn), level=level, table=int(e.table),
             root="direct", failed=e.kind == 5, restore=False, access=_KINDS.get(e.kind, "?"),
             op=op, old=describe(int(e.old)), new=describe(int(e.val)),
             old_spte=f"{int(e.old):#018x}", new_spte=f"{int(e.val):#018x}")
    return d


class EngineError(KernelEngineError):
    """The kernel engine cannot start: one line says why."""


@dataclass(frozen=True)
class KernelViolation:
    kind: str
    task: int
    file: str
    line: int
    op: str
    what: str
    count: int
    seq: int  # the trace's event counter when it was reported

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "task": self.task, "file": self.file, "line": self.line,
                "op": self.op, "what": self.what, "count": self.count, "seq": self.seq}


def built_for(cfg: Config) -> tuple[Tree, Built]:
    """The tree of ``cfg`` and its module, with ``run.variant``'s mutation applied."""
    tree = open_tree(cfg.kernel.ksrc or None)
    m = get_mutation(cfg.run.variant)
    if m is None:
        return tree, build(tree)
    return tree, build(tree, m.name, {m.file: m.apply(tree.read(m.file), tree.origin)})


class KernelVm:
    """The arena and the VM, created by the supervisor before fork."""

    def __init__(self, cfg: Config, n_tasks: int, tree: Tree | None = None,
                 built: Built | None = None) -> None:
        self.cfg = cfg
        if tree is None or built is None:
            tree, built = built_for(cfg)
        self.tree, self.built = tree, built
        self.mod: ModuleType = load(self.built)
        self.ffi, self.lib = self.mod.ffi, self.mod.lib
        self.n_tasks = n_tasks
        self.name = f"/tdpstress-{os.getpid()}-kernel"
        self.mapped = False
        self.kvm: Any = None
        self.vcpus: list[Any] = []

    # -- setup and teardown (the supervisor) --------------------------------------
    def create(self, n_vcpus: int) -> None:
        k = self.cfg.kernel
        lib = self.lib
        r = lib.ks_arena_map(self.name.encode(), ARENA_BASE, k.arena, 1)
        if r < 0:
            raise EngineError(f"kernel engine: cannot map the arena at {ARENA_BASE:#x} "
                              f"({os.strerror(-r)})")
        self.mapped = True
        obj_size = lib.ke_module_init(int(k.ad_bits), 3, int(k.nx_huge_pages),
                                      int(k.slot_zap_all), k.nx_recovery_ratio)
        r = lib.ks_arena_init(k.arena, k.pages, k.pages, obj_size, self.n_tasks,
                              self.cfg.run.seed)
        lib.ke_attach_oracles()
        if r < 0:
            raise EngineError(f"kernel engine: kernel.arena {k.arena} bytes cannot hold "
                              f"kernel.pages = {k.pages} pages ({os.strerror(-r)})")
        if k.alias_tables:
            # every 2M region of the guest that the pool can back, one reserved frame each
            n = min(self.cfg.guest.size >> 21, (k.pages - 1024) // 512)
            if n < 1 or lib.ke_alias_tables(n) < 0:
                raise EngineError(f"kernel engine: kernel.alias_tables needs kernel.pages above "
                                  f"1024 (has {k.pages})")
        lib.ks_set_knobs(k.yield_ppm, int(k.timeslice * 1e9), int(self.cfg.trace.enabled),
                         k.walk_window,
                         k.rcu_unlock_yield_ppm)
        self.set_task(self.n_tasks - 1)  # the supervisor is the last task
        self.kvm = lib.ke_vm_create()
        host_level = 2 if self.cfg.guest.huge_pages > 0 else 1
        for i, (base, npages) in enumerate(guest_memslots(self.cfg.guest, "default")):
            r = lib.ke_memslot_add(self.kvm, i, base, npages, 0, host_level)
            if r < 0:
                raise EngineError(f"kernel engine: memslot {i} ({base:#x}+{npages:#x}): "
                                  f"{os.strerror(-r)}")
        self.vcpus = [lib.ke_vcpu_create(self.kvm, i) for i in range(n_vcpus)]

    def close(self) -> None:
        """Unmap and unlink the arena (the supervisor, on every exit path)."""
        if self.mapped:
            self.lib.ks_arena_unmap()
            self.mapped = False
        try:
            os.unlink("/dev/shm" + self.name)
        except FileNotFoundError:
            pass

    def set_task(self, index: int) -> None:
        self.lib.ks_set_task(index, os.getpid())

    def abort(self) -> None:
        if self.mapped:
            self.lib.ks_set_abort()

    # -- what the harness reads --------------------------------------------------
    def violation(self) -> KernelViolation | None:
        ffi = self.ffi
        kind, task, line = ffi.new("int *"), ffi.new("int *"), ffi.new("int *")
        op, file, what = ffi.new("uint32_t *"), ffi.new("char[96]"), ffi.new("char[400]")
        seq = ffi.new("uint64_t *")
        n = self.lib.ks_violation(kind, task, line, op, file, what, seq)
        if not n:
            return None
        return KernelViolation(VIOLATION_KINDS.get(kind[0], str(kind[0])), task[0],
                               ffi.string(file).decode(errors="replace"), line[0],
                               OPS[op[0]] if op[0] < len(OPS) else str(op[0]),
                               ffi.string(what).decode(errors="replace"), n, int(seq[0]))

    def check(self, teardown: bool = False) -> tuple[str, str] | None:
        ffi = self.ffi
        name, msg = ffi.new("char[64]"), ffi.new("char[400]")
        if self.lib.ke_check(self.kvm, int(teardown), name, msg):
            return ffi.string(name).decode(), ffi.string(msg).decode()
        return None

    def destroy(self) -> int:
        return int(self.lib.ke_vm_destroy(self.kvm))

    def stat(self, name: str) -> int:
        return int(self.lib.ks_stat(name.encode()))

    def task_stats(self, t: int) -> dict[str, int]:
        lib = self.lib
        out = {}
        for i, op in enumerate(OPS[1:], start=1):
            n = lib.ks_task_stat(t, f"ops.{i}".encode())
            if n:
                out[op] = int(n)
        for i, r in enumerate(RET_PF):
            n = lib.ks_task_stat(t, f"pf.{i}".encode())
            if n:
                out[f"pf_{r}"] = int(n)
        for key in ("spte_accesses", "yields", "resched", "lock_spins", "srcu_waits"):
            out[key] = int(lib.ks_task_stat(t, key.encode()))
        return out

    def vcpu_stats(self, i: int) -> dict[str, int]:
        v = self.vcpus[i]
        st = {k: int(self.lib.ke_vcpu_stat(v, k.encode()))
              for k in ("pf_taken", "pf_fast", "pf_fixed", "pf_spurious", "pf_emulate",
                        "tlb_hits", "tlb_misses", "tlb_flushes")}
        # kvm_mmu_page_fault counts what it fixed, emulated or found spurious; the
        # rest of the faults it took returned RET_PF_RETRY
        st["pf_retry"] = st["pf_taken"] - st["pf_fixed"] - st["pf_spurious"] - st["pf_emulate"]
        st["faults"] = st["pf_fixed"] + st["pf_spurious"] + st["pf_emulate"] + st["pf_fast"]
        return st

    def tracepoints(self) -> dict[str, int]:
        ffi = self.ffi
        names, counts = ffi.new("const char *[64]"), ffi.new("uint64_t[64]")
        n = self.lib.ks_tracepoints(names, counts, 64)
        return {ffi.string(names[i]).decode(): int(counts[i]) for i in range(n)}

    def lock_waits(self, n: int) -> dict[str, Any]:
        """Which kernel lock each task spins on, and who holds it (hang reports)."""
        ffi, lib = self.ffi, self.lib
        out: dict[str, Any] = {}
        for t in range(n):
            op = int(lib.ks_task_stat(t, b"op"))
            st: dict[str, Any] = {"op": OPS[op] if 0 <= op < len(OPS) else op,
                                  "rcu_nesting": int(lib.ks_task_stat(t, b"rcu_nesting")),
                                  "srcu_nesting": int(lib.ks_task_stat(t, b"srcu_nesting"))}
            name, owner, readers = ffi.new("char[64]"), ffi.new("int *"), ffi.new("uint64_t *")
            if lib.ks_task_waiting(t, name, 64, owner, readers):
                st.update({"waits_for": ffi.string(name).decode(), "write_owner": owner[0],
                           "readers": [i for i in range(64) if readers[0] >> i & 1]})
            out[str(t)] = st
        return out

    def trace(self, roles: list[str], keep: int, until_seq: int | None = None
              ) -> list[dict[str, Any]]:
        """The last ``keep`` events of every task, merged in order, up to
        ``until_seq`` (a violation's): SPTE changes as the model's trace has them
        ("spte-write", with gfn, level, old and new), and each op's begin and end."""
        ffi, lib = self.ffi, self.lib
        buf = ffi.new("struct ks_event[4096]")
        events: list[tuple[int, dict[str, Any]]] = []
        for t in range(self.n_tasks):
            n = lib.ks_trace_copy(t, buf, 4096)
            role = roles[t] if t < len(roles) else "supervisor"
            for i in range(n):
                e = buf[i]
                if until_seq is not None and e.seq > until_seq:
                    continue
                events.append((e.seq, _decode(e, t, role)))
        events.sort(key=lambda x: x[0])
        return [d for _, d in events[-keep:]]

    def slots(self) -> list[tuple[int, int, int]]:
        ffi, lib = self.ffi, self.lib
        out = []
        for i in range(lib.ke_nr_slots(self.kvm)):
            b, n, f = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint32_t *")
            lib.ke_slot_info(self.kvm, i, b, n, f)
            out.append((int(b[0]), int(n[0]), int(f[0])))
        return out
