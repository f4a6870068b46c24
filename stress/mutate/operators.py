"""Mutation operators for the protocol code, found with ``ast`` and applied as text splices.

Every operator is generic: it knows the *kinds* of primitive the protocol is built of
(mmu_lock, spin locks, RCU sections, TLB flushes, cmpxchg on a shared word, early-exit
guards, shared-memory accesses, ranges and level/gfn bounds), never a particular bug.
A mutant is a list of byte-offset edits of the original file, so the mutated file keeps
every other byte, comment and line number (its tracebacks and reports point at the
original lines, and ``Mutant.diff`` is a readable one-hunk diff).

What is never mutated: the tester's own oracles (calls of ``kvm.bug``/``kvm.warn``, of the
KASAN report hook ``kasan_report``, ``*BUG_ON*``, ``check_*``/``_check_*``,
``lockdep_assert_*``, ``assert`` statements, functions whose docstring starts with
"Oracle", an ``if`` whose body only reports, and an ``if`` whose body warns first: the
kernel's ``if (WARN_ON_ONCE(cond))`` with its recovery), observation (trace events and the
tracepoint helpers ``trace_*``, the D-bit ledger's ``dirty_set`` and a loop of it, an ``if``
whose body only bumps a ``kvm.stats`` counter), and
the historical bug variants' functions (docstring "Buggy ...": they are not the protocol
under test, and the fixed protocol never runs them), and the VMM's side of an ioctl
(docstring "Userspace ...": whatever userspace does with the API is allowed, so no oracle
could or should kill a change to it).

Ids are ``file:function:operator:k``, ``k`` counting that operator's sites in that
function in source order: stable while the function is not edited.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent.parent / "model"
TARGET_FILES = ("tdp_mmu.py", "tdp_iter.py", "roots.py", "mirror.py", "notifier.py")

OPERATORS: dict[str, str] = {
    "drop-lock": "drop an mmu_lock or spin lock/unlock call",
    "drop-rcu": "drop an RCU read-side section boundary (rcu_read_lock/unlock)",
    "drop-flush": "drop a TLB flush call",
    "drop-guard": "drop an early-exit guard (an if whose body returns, continues, "
                  "breaks or raises); a call in its condition is kept",
    "negate-cond": "negate an if/while condition",
    "drop-conjunct": "drop one operand of an and/or condition",
    "swap": "swap two adjacent statements that both access shared memory",
    "cmpxchg-store": "replace a cmpxchg by a store that always succeeds",
    "cmpxchg-split": "replace a cmpxchg by a load, a compare and a store (not atomic)",
    "off-by-one": "off-by-one in a range() bound, a < / <= on a level/gfn/start/end, "
                  "or a +/- constant on one",
}

# Words (stress/atomics.py) methods that touch the shared arena; trace/spin_ns/relax
# and pause do not change what another process sees of the protocol
WORDS_ACCESS = frozenset({
    "load", "store", "cmpxchg", "xchg", "fetch_add", "fetch_and", "fetch_or", "fill",
    "freeze_children", "xchg_from", "bitmap_alloc", "tdp_walk", "scan_ne", "count_equal",
    "find_mask", "popcount", "read_lock", "read_unlock", "write_lock", "write_unlock",
    "write_trylock", "read_trylock", "spin_lock", "spin_trylock", "spin_unlock",
    "read_lock_rec", "read_unlock_rec", "rwlock_contended",
})
MMU_LOCK_CALLS = frozenset({"read_lock", "read_unlock", "write_lock", "write_unlock"})
RCU_CALLS = frozenset({"rcu_read_lock", "rcu_read_unlock"})
BOUND_WORDS = ("level", "gfn", "end", "start")
# (dirty_set: the D-bit ledger's count of a D bit set, instrumentation for the
# lost-dirty-bit oracle with no kernel counterpart, unlike kvm_set_pfn_dirty)
ORACLE_NAME = re.compile(
    r"BUG_ON|^_?check_|^lockdep_assert|^bug$|^warn$|^_?warn_|^kasan_report$|^dirty_set$")
# model functions that report a violation whatever happens (their body is one call of
# kvm.bug or of the KASAN report hook: _poisoned, _reused, _bad_child, _underflow, ...),
# filled in by generate()
ORACLE_REPORTERS: set[str] = set()
HELPERS = '''

# --- tdp-stress mutate: helpers of the cmpxchg operators ---
def _mutant_cmpxchg_store(w, i, old, new):  # noqa: ANN001, ANN202
    w.store(i, new)
    return old


def _mutant_cmpxchg_split(w, i, old, new):  # noqa: ANN001, ANN202
    cur = w.load(i)
    if cur == old:
        # the gap a split atomic step opens, as wide as the bug variants' (inject.race_window)
        w.spin_ns(20_000)
        w.store(i, new)
    return cur
'''


@dataclass(frozen=True)
class Edit:
    start: int  # byte offsets into the original file
    end: int
    text: str


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # a file of stress/model/, e.g. "tdp_mmu.py"
    function: str  # qualified name in the file
    operator: str
    line: int  # first line of the mutated code
    site: int  # first line of the enclosing statement: the reachability probe's key
    description: str
    segment: str  # the original code mutated (first line), to spot a stale equivalent entry
    edits: tuple[Edit, ...]
    helpers: bool = False
    # a guard's or a condition's: the first line of the if's body, where the mutant
    # changes what runs (a guard dropped differs only when it would have fired); the
    # config choice prefers a run that got there (0: none)
    body_site: int = 0
    # a negated if's with an else (or elif): the first line of that branch, which
    # the mutant runs where the body would have run and the other way round; the
    # config choice prefers a run that took both branches (0: none)
    else_site: int = 0

    @property
    def site_key(self) -> str:
        return f"{self.file}:{self.site}"

    @property
    def body_key(self) -> str | None:
        return f"{self.file}:{self.body_site}" if self.body_site else None

    @property
    def else_key(self) -> str | None:
        return f"{self.file}:{self.else_site}" if self.else_site else None

    def apply(self, source: str) -> str:
        data = source.encode()
        for e in sorted(self.edits, key=lambda e: e.start, reverse=True):
            data = data[:e.start] + e.text.encode() + data[e.end:]
        out = data.decode()
        return out + HELPERS if self.helpers else out

    def diff(self, source: str) -> str:
        new = self.apply(source)
        if self.helpers:
            new = new[:-len(HELPERS)]
        return "".join(difflib.unified_diff(
            source.splitlines(True), new.splitlines(True), f"a/stress/model/{self.file}",
            f"b/stress/model/{self.file}", n=1))


# ---------------------------------------------------------------------------
# source positions
# ---------------------------------------------------------------------------

class Source:
    """A file's text with byte offsets of ast positions (col_offset counts UTF-8 bytes)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.data = text.encode()
        self.line_starts = [0]
        for i, b in enumerate(self.data):
            if b == 10:
                self.line_starts.append(i + 1)

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (self.line_starts[node.lineno - 1] + node.col_offset,  # type: ignore[attr-defined]
                self.line_starts[node.end_lineno - 1] + node.end_col_offset)  # type: ignore[attr-defined]

    def seg(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.data[a:b].decode()


def short(text: str, n: int = 60) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[:n - 3] + "..."


def call_name(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Attribute):
        return f.attr
    if isinstance(f, ast.Name):
        return f.id
    return ""


def receiver(call: ast.Call) -> ast.expr | None:
    return call.func.value if isinstance(call.func, ast.Attribute) else None


def dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def is_words_receiver(node: ast.expr | None) -> bool:
    """``w``, ``kvm.w``, ``self.w``, ``self.kvm.w``: the shared arena's Words."""
    d = dotted(node) if node is not None else None
    return d is not None and (d == "w" or d.endswith(".w"))


def iter_calls(node: ast.AST) -> Iterator[ast.Call]:
    """Calls in ``node``, not inside nested function definitions."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Call):
            yield n
        for c in ast.iter_child_nodes(n):
            if not isinstance(c, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                stack.append(c)


def is_oracle_call(call: ast.Call) -> bool:
    name = call_name(call)
    return bool(ORACLE_NAME.search(name)) or name in ORACLE_REPORTERS


def has_oracle(node: ast.AST) -> bool:
    return any(is_oracle_call(c) for c in iter_calls(node))


def is_trace_call(call: ast.Call) -> bool:
    return "trace" in call_name(call)


def docstring_kind(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    doc = ast.get_docstring(fn) or ""
    return doc.split(None, 1)[0].rstrip(":(") if doc else ""


# ---------------------------------------------------------------------------
# which functions touch shared memory (a name-based fixpoint over stress/model/)
# ---------------------------------------------------------------------------

def _direct_shared(call: ast.Call) -> bool:
    name = call_name(call)
    if is_trace_call(call) or is_oracle_call(call):
        return False
    if name in WORDS_ACCESS and is_words_receiver(receiver(call)):
        return True
    rd = dotted(receiver(call)) if receiver(call) is not None else None
    if rd is not None and (rd.endswith("variant") or rd.endswith("rcu")):
        return True  # the variant's pieces and RCU: shared state by construction
    return name in MMU_LOCK_CALLS and rd is not None and rd.endswith("kvm")


def shared_functions(model_dir: Path = MODEL_DIR) -> frozenset[str]:
    """Names of model functions and methods that (transitively) access shared memory."""
    calls: dict[str, set[str]] = {}
    direct: set[str] = set()
    for path in sorted(model_dir.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            names = calls.setdefault(fn.name, set())
            body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
            if (len(body) == 1 and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Call)
                    and call_name(body[0].value) in ("bug", "kasan_report")):
                ORACLE_REPORTERS.add(fn.name)  # a function that only reports a violation
            for c in iter_calls(fn):
                if _direct_shared(c):
                    direct.add(fn.name)
                elif not is_trace_call(c) and not is_oracle_call(c):
                    names.add(call_name(c))
    shared = set(direct)
    changed = True
    while changed:
        changed = False
        for fn_name, callees in calls.items():
            if fn_name not in shared and callees & shared:
                shared.add(fn_name)
                changed = True
    shared.add("TdpIter")  # the iterator's constructor walks the tables
    return frozenset(n for n in shared if "trace" not in n)


def makes_shared_access(stmt: ast.stmt, shared: frozenset[str]) -> bool:
    for c in iter_calls(stmt):
        if is_trace_call(c) or is_oracle_call(c):
            continue
        if _direct_shared(c) or call_name(c) in shared:
            return True
    return False


# ---------------------------------------------------------------------------
# def-use of a simple statement (for swaps that keep the data flow)
# ---------------------------------------------------------------------------

def _defs_uses(stmt: ast.stmt) -> tuple[set[str], set[str]]:
    defs: set[str] = set()
    uses: set[str] = set()
    for n in ast.walk(stmt):
        if isinstance(n, ast.Name | ast.Attribute):
            d = dotted(n)
            if d is None:
                continue
            if isinstance(n.ctx, ast.Store | ast.Del):
                defs.add(d)
            else:
                uses.add(d)
        elif isinstance(n, ast.AugAssign):
            d = dotted(n.target)
            if d is not None:
                uses.add(d)
        elif isinstance(n, ast.Call):
            r = receiver(n)
            rd = dotted(r) if r is not None else None
            # a method call on a local object may change it (it.next(), self._point());
            # on the shared world (kvm, kvm.w, kvm.rcu, ...) the order is what we test
            if rd is not None and rd.split(".")[0] not in ("kvm", "w", "self") \
                    and not rd.startswith("self.kvm"):
                defs.add(rd)
    return defs, uses


def _conflict(a: set[str], b: set[str]) -> bool:
    for x in a:
        for y in b:
            if x == y or y.startswith(x + ".") or x.startswith(y + "."):
                return True
    return False


def swappable(s: ast.stmt, t: ast.stmt) -> bool:
    ds, us = _defs_uses(s)
    dt, ut = _defs_uses(t)
    return not (_conflict(ds, ut) or _conflict(dt, us) or _conflict(ds, dt))


# ---------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------

SIMPLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign)
EXITS = (ast.Return, ast.Continue, ast.Break, ast.Raise)


@dataclass
class _FnState:
    qualname: str
    counts: dict[str, int] = field(default_factory=dict)


class _Generator:
    def __init__(self, file: str, text: str, shared: frozenset[str]) -> None:
        self.file = file
        self.src = Source(text)
        self.shared = shared
        self.out: list[Mutant] = []

    # -- plumbing --------------------------------------------------------------
    def add(self, fn: _FnState, op: str, node: ast.AST, site: ast.stmt, what: str,
            edits: list[Edit], helpers: bool = False, body_site: int = 0,
            else_site: int = 0) -> None:
        k = fn.counts.get(op, 0)
        fn.counts[op] = k + 1
        line = node.lineno  # type: ignore[attr-defined]
        self.out.append(Mutant(
            id=f"{self.file}:{fn.qualname}:{op}:{k}", file=self.file, function=fn.qualname,
            operator=op, line=line, site=site.lineno,
            description=f"{self.file}:{fn.qualname}: {what} at line {line}",
            segment=self.src.seg(node).splitlines()[0].strip(), edits=tuple(edits),
            helpers=helpers, body_site=body_site if body_site != site.lineno else 0,
            else_site=else_site))

    def replace(self, node: ast.AST, text: str) -> list[Edit]:
        a, b = self.src.span(node)
        return [Edit(a, b, text)]

    # -- walk ------------------------------------------------------------------
    def run(self, tree: ast.Module) -> list[Mutant]:
        self._visit_defs(tree.body, "")
        return self.out

    def _visit_defs(self, body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                self._visit_defs(node.body, prefix + node.name + ".")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self._function(node, prefix + node.name)

    def _function(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, qualname: str) -> None:
        if docstring_kind(fn) in ("Buggy", "Oracle", "Userspace") or ORACLE_NAME.search(fn.name) \
                or fn.name in ORACLE_REPORTERS or fn.name.startswith("trace_"):
            return
        state = _FnState(qualname)
        self._block(state, fn.body)
        # nested functions after the body, each its own function
        stack: list[ast.AST] = list(fn.body)
        while stack:
            node = stack.pop(0)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self._function(node, f"{qualname}.{node.name}")
            elif not isinstance(node, ast.ClassDef):
                stack.extend(ast.iter_child_nodes(node))

    def _block(self, fn: _FnState, stmts: list[ast.stmt]) -> None:
        for i, s in enumerate(stmts):
            self._statement(fn, s)
            if i + 1 < len(stmts):
                self._swap(fn, s, stmts[i + 1])
            for name in ("body", "orelse", "finalbody"):
                sub = getattr(s, name, None)
                if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt) \
                        and not isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef
                                           | ast.ClassDef):
                    self._block(fn, sub)
            for h in getattr(s, "handlers", []):
                self._block(fn, h.body)

    def _statement(self, fn: _FnState, s: ast.stmt) -> None:
        if isinstance(s, ast.Assert | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return
        # statement-level operators
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) \
                and not is_oracle_call(s.value):
            call = s.value
            name = call_name(call)
            rd = dotted(receiver(call)) if receiver(call) is not None else None
            text = short(self.src.seg(call))
            if name in RCU_CALLS:
                self.add(fn, "drop-rcu", s, s, f"drop {text}", self.replace(s, "pass"))
            elif ("lock" in name and not name.startswith("lockdep")
                  and (name in MMU_LOCK_CALLS and rd is not None
                       or "spin" in name or name.startswith("tdp_mmu_pages_"))):
                self.add(fn, "drop-lock", s, s, f"drop {text}", self.replace(s, "pass"))
            elif "flush" in name:
                self.add(fn, "drop-flush", s, s, f"drop {text}", self.replace(s, "pass"))
        # an if whose body reports (a report that stops the run, or only WARNs) is an
        # oracle: its condition is the assertion's
        def reporting(b: ast.stmt) -> bool:  # an oracle call, a counter, a loop or if of them
            if isinstance(b, ast.For):
                return all(reporting(x) for x in b.body)
            if isinstance(b, ast.If) and not b.orelse and not has_oracle(b.test):
                return all(reporting(x) for x in b.body)
            if isinstance(b, ast.AugAssign) and isinstance(b.target, ast.Subscript):
                d = dotted(b.target.value)  # kvm.stats[...] += 1: observation only
                return (d is not None and (d == "stats" or d.endswith(".stats"))
                        and not any(True for _ in iter_calls(b.value)))
            return (isinstance(b, ast.Expr) and isinstance(b.value, ast.Call)
                    and is_oracle_call(b.value))

        reports = [reporting(b) for b in getattr(s, "body", [])]
        body = getattr(s, "body", [])
        if isinstance(s, ast.For) and reporting(s):
            return  # a loop of observation (the D-bit ledger over a range): not protocol
        # if (WARN_ON_ONCE(cond)) { recover }: a body that warns first is the kernel's
        # assertion with its recovery, not a guard of the protocol
        warns_first = (bool(body) and isinstance(body[0], ast.Expr)
                       and isinstance(body[0].value, ast.Call)
                       and re.search(r"^warn$|^_?warn_", call_name(body[0].value)) is not None)
        oracle_if = isinstance(s, ast.If | ast.While) and (
            has_oracle(s.test) or all(reports) or warns_first
            or any(r and isinstance(b, ast.Expr) and isinstance(b.value, ast.Call)
                   and call_name(b.value) not in ("warn", "dirty_set")
                   for r, b in zip(reports, s.body, strict=True)))
        if isinstance(s, ast.If | ast.While) and not oracle_if:
            self._conditions(fn, s)  # (an if whose body reports a violation is an oracle)
        # expression-level operators, in the statement's own expressions only (not in an
        # oracle's condition)
        for expr in ([] if oracle_if else self._own_exprs(s)):
            self._expressions(fn, s, expr)

    def _own_exprs(self, s: ast.stmt) -> list[ast.AST]:
        """The expressions of ``s`` itself (not of the statements nested in it)."""
        out: list[ast.AST] = []
        for fname, value in ast.iter_fields(s):
            if fname in ("body", "orelse", "finalbody", "handlers"):
                continue
            if isinstance(value, ast.AST):
                out.append(value)
            elif isinstance(value, list):
                out.extend(v for v in value if isinstance(v, ast.AST))
        return out

    def _conditions(self, fn: _FnState, s: ast.If | ast.While) -> None:
        test = self.src.seg(s.test)
        body = s.body[0].lineno if isinstance(s, ast.If) and s.body else 0
        elif_ = self.src.seg(s).startswith("elif")
        if (isinstance(s, ast.If) and not s.orelse and s.body and not elif_
                and isinstance(s.body[-1], EXITS)):
            calls = any(True for _ in iter_calls(s.test))
            exit_text = short(self.src.seg(s.body[-1]), 30)
            a, _ = self.src.span(s)
            _, b = self.src.span(s.body[-1])
            self.add(fn, "drop-guard", s, s, f"drop the guard `if {short(test, 50)}: "
                     f"... {exit_text}`", [Edit(a, b, f"({test})" if calls else "pass")],
                     body_site=body)
        if isinstance(s.test, ast.Constant):
            return  # while True
        kw = "if" if isinstance(s, ast.If) else "while"
        orelse = s.orelse[0].lineno if isinstance(s, ast.If) and s.orelse else 0
        self.add(fn, "negate-cond", s.test, s, f"negate `{kw} {short(test, 50)}`",
                 self.replace(s.test, f"not ({test})"), body_site=body, else_site=orelse)
        if isinstance(s.test, ast.BoolOp):
            op = " and " if isinstance(s.test.op, ast.And) else " or "
            for j, v in enumerate(s.test.values):
                rest = [self.src.seg(x) for k, x in enumerate(s.test.values) if k != j]
                self.add(fn, "drop-conjunct", v, s,
                         f"drop `{short(self.src.seg(v), 40)}` from `{kw} {short(test, 40)}`",
                         self.replace(s.test, "(" + op.join(rest) + ")"), body_site=body)

    def _expressions(self, fn: _FnState, s: ast.stmt, root: ast.AST) -> None:
        nodes = sorted((n for n in ast.walk(root) if hasattr(n, "lineno")),
                       key=lambda n: (n.lineno, n.col_offset))  # type: ignore[attr-defined]
        for n in nodes:
            if isinstance(n, ast.Call):
                self._call(fn, s, n)
            elif isinstance(n, ast.Compare) and len(n.ops) == 1 and _mentions_bound(n):
                swap = {ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">"}
                new = swap.get(type(n.ops[0]))
                if new is not None:
                    left, right = self.src.seg(n.left), self.src.seg(n.comparators[0])
                    self.add(fn, "off-by-one", n, s,
                             f"`{short(self.src.seg(n), 50)}` -> `{new}`",
                             self.replace(n, f"({left}) {new} ({right})"))
            elif (isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add | ast.Sub)
                  and isinstance(n.right, ast.Constant) and type(n.right.value) is int
                  and _mentions_bound(n.left)):
                k = n.right.value
                self.add(fn, "off-by-one", n, s,
                         f"`{short(self.src.seg(n), 50)}`: constant {k} -> {k + 1}",
                         self.replace(n.right, str(k + 1)))

    def _call(self, fn: _FnState, s: ast.stmt, c: ast.Call) -> None:
        name = call_name(c)
        if name == "cmpxchg" and is_words_receiver(receiver(c)) and len(c.args) == 3 \
                and not c.keywords:
            r = receiver(c)
            assert r is not None
            args = ", ".join([self.src.seg(r)] + [self.src.seg(a) for a in c.args])
            text = short(self.src.seg(c), 50)
            self.add(fn, "cmpxchg-store", c, s, f"replace {text} by a blind store",
                     self.replace(c, f"_mutant_cmpxchg_store({args})"), helpers=True)
            self.add(fn, "cmpxchg-split", c, s, f"split {text} into load, compare, store",
                     self.replace(c, f"_mutant_cmpxchg_split({args})"), helpers=True)
        elif (isinstance(c.func, ast.Name) and c.func.id == "range" and 1 <= len(c.args) <= 2
              and not c.keywords):
            end = c.args[-1]
            self.add(fn, "off-by-one", c, s,
                     f"`{short(self.src.seg(c), 50)}`: end bound - 1",
                     self.replace(end, f"({self.src.seg(end)}) - 1"))

    def _swap(self, fn: _FnState, s: ast.stmt, t: ast.stmt) -> None:
        if not (isinstance(s, SIMPLE) and isinstance(t, SIMPLE)):
            return
        if has_oracle(s) or has_oracle(t) or s.end_lineno == t.lineno:
            return
        if not (makes_shared_access(s, self.shared) and makes_shared_access(t, self.shared)):
            return
        if not swappable(s, t):
            return
        a0, a1 = self.src.span(s)
        b0, b1 = self.src.span(t)
        sa, sb = self.src.seg(s), self.src.seg(t)
        if sa == sb:
            return
        self.add(fn, "swap", s, s, f"swap `{short(sa, 40)}` with the next statement "
                 f"`{short(sb, 40)}`", [Edit(a0, a1, sb), Edit(b0, b1, sa)])


def _mentions_bound(node: ast.AST) -> bool:
    for n in ast.walk(node):
        name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) \
            else None
        if name is not None and any(w in name.lower() for w in BOUND_WORDS):
            return True
    return False


def generate(files: tuple[str, ...] = TARGET_FILES, model_dir: Path = MODEL_DIR
             ) -> list[Mutant]:
    """Every mutant of ``files`` (names in ``model_dir``), in file and source order."""
    shared = shared_functions(model_dir)
    out: list[Mutant] = []
    for f in files:
        text = (model_dir / f).read_text()
        out.extend(_Generator(f, text, shared).run(ast.parse(text, f)))
    return out
