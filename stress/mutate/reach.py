"""Which shipped config (and valid protocol variant) runs each mutation site: one
profiling pass, cached.

The target files are instrumented (``ast``: a :func:`stress.mutate.probe.hit` call before
every statement that holds a mutation site), and every *target* runs the unmutated
protocol for a short while on that copy; every process records the sites it ran.  A
target is a shipped run config on the fixed protocol (named as the config), or a config
on one of the *valid* non-default variants (``config@variant``: the v6.16 protocol, the
mirror-zap-shared proposal, the root-put variant the tool settled as safe, ...; never a
bug variant), which run code the fixed protocol does not: :func:`variant_targets`.  The
pass doubles as a baseline: a target whose instrumented run is not clean is not used (a
mutant's violation on it would mean nothing).

A mutant runs on the fixed protocol when any usable config reached its site there: on
the config it, its function and file suggest (:func:`preferred_config`: a TLB flush
removed: tlb; TDX code: tdx-busy; dirty logging: dirty; huge pages: huge; memslots:
tdx-busy; then mirror.py: tdx-busy, notifier.py: convert-huge, roots.py: roots; the
rest: default) if that config reached it, else on the first config in :data:`FALLBACK`
that did; else on a variant target that did (the preferred config first); a site no
target reached is the outcome ``unreached``. A guard's or a condition's mutant
(``Mutant.body_site``) first looks, in the same order, for a target that ran the if's
body: a dropped guard differs from the protocol only when it would have fired, a dropped
conjunct mostly when its if is taken. A negated if with an else (``Mutant.else_site``)
looks first for a target that ran both branches, then for one that ran either (in the
same order), since the mutant runs each where the other would have run.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stress.model.variants import VARIANTS
from stress.mutate.operators import Mutant
from stress.mutate.sandbox import PACKAGE_DIR, Sandbox, kill_active, run_config

FALLBACK = ("default", "smoke", "tdx-busy", "roots", "invalidate", "huge", "dirty", "tlb",
            "unsync", "faultin", "tdx-boot", "huge-alias")
PROBE_IMPORT = "from stress.mutate.probe import hit as _mutate_hit"


def run_configs() -> dict[str, Path]:
    """The shipped run configs of the model (campaign matrices and the kernel engine's
    configs left out: its code is a tree's, not the mutated model's), by name."""
    return {p.stem: p for p in sorted((PACKAGE_DIR / "configs").glob("*.toml"))
            if "[campaign]" not in p.read_text() and 'engine = "kernel"' not in p.read_text()}


def variant_targets(configs: dict[str, Path] | None = None) -> dict[str, tuple[str, str]]:
    """``config@variant`` -> (config, variant) for every valid (non-bug) variant other
    than the fixed protocol: on its own config, and a TD variant also on the TDX jobs
    (tdx-busy: removals and pre-fault; tdx-boot: the initial image)."""
    configs = run_configs() if configs is None else configs
    out: dict[str, tuple[str, str]] = {}
    for v in VARIANTS.values():
        if v.buggy or v.name == "fixed":
            continue
        names = [Path(v.config).stem]
        if v.requires_tdx:
            names += ["tdx-busy", "tdx-boot"]
        for c in dict.fromkeys(names):
            if c in configs:
                out[f"{c}@{v.name}"] = (c, v.name)
    return out


def targets(configs: dict[str, Path] | None = None) -> dict[str, tuple[str, str]]:
    """Every reach target: name -> (config, variant); the fixed protocol's first."""
    configs = run_configs() if configs is None else configs
    return {**{c: (c, "fixed") for c in configs}, **variant_targets(configs)}


def split_target(name: str) -> tuple[str, str]:
    """``config`` or ``config@variant`` -> (config, variant)."""
    config, _, variant = name.partition("@")
    return config, variant or "fixed"


def preferred_config(m: Mutant) -> str:
    """The config a mutant suggests: a TLB flush it removes or skips first (tlb), then
    what its function is about (TDX, dirty logging, huge pages, memslots), then its
    file, then the rest of its name."""
    f, fn = m.file, m.function.lower()
    if m.operator == "drop-flush" or "flush" in m.segment:
        return "tlb"  # a missing TLB flush shows where the guest's TLB is used most
    if any(w in fn for w in ("mirror", "tdx", "sept", "tdh")):
        return "tdx-busy"
    if "dirty" in fn or "wrprot" in fn:
        return "dirty"
    if "huge" in fn or "split" in fn:
        return "huge"
    if "memslot" in fn or "memory_region" in fn:  # the one job that moves memslots
        return "tdx-busy"
    # notifier.py: conversions and invalidations of THP-backed memory, unaligned
    by_file = {"mirror.py": "tdx-busy", "notifier.py": "convert-huge", "roots.py": "roots"}
    if f in by_file:
        return by_file[f]
    if "invalidat" in fn or "notifier" in fn:
        return "invalidate"
    if "root" in fn:
        return "roots"
    return "default"


def choose_config(m: Mutant, reach: dict[str, Any]) -> str | None:
    """The target (``config`` or ``config@variant``) to run ``m`` on, or None: no
    usable target reached its site.  The fixed protocol first, then the variants."""
    found = choose_configs(m, reach, 1)
    return found[0] if found else None


def choose_configs(m: Mutant, reach: dict[str, Any], n: int) -> list[str]:
    """Up to ``n`` targets to run ``m`` on, in turn while it survives: the first is
    :func:`choose_config`'s, each next one the best remaining target (in the same
    order of tiers and configs) of a config not chosen yet, so a survivor meets
    another job's workload, not the same job again."""
    usable = {name: set(c["hits"]) for name, c in reach["configs"].items()
              if c["exit_code"] == 0}
    pref = preferred_config(m)
    fixed = [n for n in usable if "@" not in n]
    variants = [n for n in usable if "@" in n]
    order = [pref, *FALLBACK, *sorted(fixed),
             *[n for n in variants if split_target(n)[0] == pref], *variants]
    # a run that took both branches of a negated if/else first (then either: the
    # mutant swaps them), else one that took the guard's (or the if's) branch, then
    # one that reached the statement; each tier in the order above
    if m.else_key and m.body_key:
        tiers = [((m.body_key, m.else_key), all), ((m.body_key, m.else_key), any)]
    else:
        tiers = [((m.body_key,), all)] if m.body_key else []
    tiers.append(((m.site_key,), all))
    out: list[str] = []
    for keys, how in tiers:
        for name in order:
            if len(out) < n and how(k in usable.get(name, ()) for k in keys) \
                    and split_target(name)[0] not in {split_target(t)[0] for t in out}:
                out.append(name)
    return out


# ---------------------------------------------------------------------------
# instrumentation
# ---------------------------------------------------------------------------

def instrument(text: str, file: str, sites: Iterable[int]) -> str:
    """``text`` with ``_mutate_hit("file:line")`` before the outermost statement that
    starts on each line of ``sites``, and the probe's import."""
    tree = ast.parse(text, file)
    todo = set(sites)

    def block(stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for s in stmts:
            if s.lineno in todo:
                todo.discard(s.lineno)
                probe = ast.parse(f"_mutate_hit({f'{file}:{s.lineno}'!r})").body[0]
                out.append(ast.copy_location(probe, s))
            for name in ("body", "orelse", "finalbody"):
                sub = getattr(s, name, None)
                if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                    setattr(s, name, block(sub))
            for h in getattr(s, "handlers", []):
                h.body = block(h.body)
            out.append(s)
        return out

    tree.body = block(tree.body)
    i = 0
    while i < len(tree.body) and (
            (isinstance(tree.body[i], ast.Expr) and isinstance(tree.body[i].value, ast.Constant))
            or (isinstance(tree.body[i], ast.ImportFrom)
                and tree.body[i].module == "__future__")):  # type: ignore[attr-defined]
        i += 1
    tree.body.insert(i, ast.parse(PROBE_IMPORT).body[0])
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


# ---------------------------------------------------------------------------
# the profiling pass
# ---------------------------------------------------------------------------

def fingerprint(pkg: Path, duration: float, seed: int) -> str:
    """What the pass depends on: the code of package copy ``pkg`` (of stress/mutate/, the
    sites and the probes only), its configs, the pass's parameters."""
    h = hashlib.sha256(f"{duration:g}/{seed}".encode())
    skip = {"__init__.py", "command.py", "runner.py", "sandbox.py"}
    files = [p for p in sorted(pkg.rglob("*")) if p.suffix in (".py", ".toml")
             and "__pycache__" not in p.parts
             and not (p.parent.name == "mutate" and (p.name in skip or p.suffix == ".toml"))]
    for p in files:
        h.update(str(p.relative_to(pkg)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def profile(sandbox: Sandbox, mutants: list[Mutant], duration: float, seed: int,
            jobs: int, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    configs = run_configs()
    todo = targets(configs)
    sites: dict[str, set[int]] = {}
    for m in mutants:
        sites.setdefault(m.file, set()).add(m.site)
        for extra in (m.body_site, m.else_site):
            if extra:
                sites[m.file].add(extra)
    files = {f: instrument(sandbox.original(f), f, s) for f, s in sites.items()}

    def one(name: str) -> tuple[str, dict[str, Any]]:
        config, variant = todo[name]
        d = sandbox.make(files)
        hits_dir = d / "hits"
        hits_dir.mkdir()
        r = run_config(d, configs[config], duration, seed, variant=variant,
                       extra_env={"TDP_MUTATE_PROBE_DIR": str(hits_dir)})
        hits: set[str] = set()
        for f in hits_dir.iterdir():
            hits.update(line for line in f.read_text().splitlines() if line)
        res = r.results or {}
        reason = res.get("exit_reason", "timeout" if r.timed_out else "no results")
        out = {"config": config, "variant": variant, "exit_code": r.exit_code,
               "exit_reason": reason,
               "hits": sorted(hits)}
        if r.exit_code != 0:
            first = (res.get("violations") or [{}])[0]
            out["detail"] = first.get("invariant") or r.stderr.strip()[-300:]
        sandbox.drop(d)
        if progress:
            progress(f"reach: {name}: {len(hits)} sites, exit {out['exit_reason']}")
        return name, out

    ex = ThreadPoolExecutor(max_workers=jobs)
    try:
        done = dict(ex.map(one, list(todo)))
    except BaseException:  # an interrupt: kill the runs under way, let them clean up
        kill_active()
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown()
    return {"fingerprint": fingerprint(sandbox.base / "stress", duration, seed),
            "duration_s": duration,
            "seed": seed, "configs": {n: done[n] for n in todo}}


def load_or_profile(cache: Path, sandbox: Sandbox, mutants: list[Mutant], duration: float,
                    seed: int, jobs: int, progress: Callable[[str], None] | None = None,
                    refresh: bool = False) -> dict[str, Any]:
    """The cached pass if it is for this code, configs and parameters, else a new one."""
    fp = fingerprint(sandbox.base / "stress", duration, seed)
    if not refresh:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("fingerprint") == fp:
                if progress:
                    progress(f"reach: cached ({cache})")
                return cached
        except (OSError, ValueError):
            pass
    reach = profile(sandbox, mutants, duration, seed, jobs, progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(reach, indent=1))
    tmp.replace(cache)
    return reach
