"""Benchmarks that print figures (never asserted in tests).

``throughput`` measures the fault path alone (faults/s per process, the FFI
floor, native calls per fault, scaling against the machine's own) and then the
config's own job role by role (``role_throughput``: faults/s, zaps/s, ... and
SEAMCALLs/s per process).  ``policy_comparison`` runs the fixed protocol on a
TD once per SEAMCALL BUSY policy (unwind, retry, serialize) and reports, side
by side, throughput and retry/BUSY rates: the numbers behind Sean Christopherson's Jan 2023 claim
that serialising all S-EPT SEAMCALLs of a VM "is not an option, at least not
in the long term".  ``variant_comparison`` does the same for protocol
variants, user variants included (the "no mirror" idea of Jan 2023 is
examples/no_mirror.py).

Method (pyperf's): one warm-up run per policy that is thrown away, then
``runs`` measured runs, policies interleaved run by run so a noisy
neighbour hurts them alike; each figure is the median with its min..max.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stress import config as config_mod
from stress.config import BUSY_POLICIES, Config
from stress.harness.kernel import supervisor_for
from stress.harness.supervisor import Supervisor

POLICY_METRICS = (
    ("faults/s", lambda c, d: c["faults"] / d),
    ("zapper ops/s", lambda c, d: c["zapper_ops"] / d),
    ("SEAMCALLs/s", lambda c, d: c["seamcalls"] / d),
    ("BUSY/s", lambda c, d: c["seamcall_busy"] / d),
    ("BUSY %", lambda c, d: 100.0 * c["seamcall_busy"] / max(1, c["seamcalls"])),
    ("fault retries/s", lambda c, d: c["retries"] / d),
    ("retries/fault", lambda c, d: c["retries"] / max(1, c["faults"])),
    ("zap retries/s", lambda c, d: c["zap_retry"] / d),
)


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else 0.0

    def spread(self) -> tuple[float, float]:
        return (min(self.values), max(self.values)) if self.values else (0.0, 0.0)


def _one_run(cfg: Config) -> tuple[Counter[str], float, str]:
    o = Supervisor(cfg).run()
    c: Counter[str] = Counter()
    for rec in o.workers:
        c.update({k: v for k, v in rec.stats.items() if not k.startswith("max_")})
        if rec.role == "zapper":
            c["zapper_ops"] += rec.stats.get("ops", 0)
    return c, max(o.duration_s, 1e-9), o.exit_reason


Metric = tuple[str, Callable[[Counter[str], float], float]]

UNSYNC_METRICS: tuple[Metric, ...] = (
    ("faults/s", lambda c, d: c["faults"] / d),
    ("shadowed writes/s", lambda c, d: c["shadowed_writes"] / d),
    ("unsync marks/s", lambda c, d: c["unsync_marked"] / d),
    ("lock taken/s", lambda c, d: c["unsync_lock_taken"] / d),
    ("lock contended/s", lambda c, d: c["unsync_lock_contended"] / d),
    ("emulated writes/s", lambda c, d: c["emulated_writes"] / d),
    ("syncs/s", lambda c, d: c["syncs"] / d),
    ("zapper ops/s", lambda c, d: c["zapper_ops"] / d),
)


def compare(title: str, base: Config, arms: dict[str, dict[str, dict[str, Any]]],
            metrics: tuple[Metric, ...], duration: float, runs: int,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run each arm (config overrides) ``runs`` times after a warm-up, interleaved."""
    results: dict[str, dict[str, Series]] = {a: {m: Series() for m, _ in metrics} for a in arms}
    reasons: dict[str, list[str]] = {a: [] for a in arms}
    for rnd in range(runs + 1):
        for arm, overrides in arms.items():
            ov = {k: dict(v) for k, v in overrides.items()}
            ov.setdefault("run", {}).update({"duration": duration if rnd else min(duration, 2.0),
                                             "check_interval": 0.0})
            cfg = config_mod.load_from(base, ov)
            c, d, reason = _one_run(cfg)
            if progress:
                progress(f"{'warm-up' if rnd == 0 else f'run {rnd}/{runs}'} {arm}: "
                         f"{c['faults'] / d:.0f} faults/s, {reason}")
            if rnd == 0:
                continue
            reasons[arm].append(reason)
            for name, fn in metrics:
                results[arm][name].values.append(fn(c, d))
    return {
        "benchmark": title,
        "duration_s": duration,
        "runs": runs,
        "metrics": [m for m, _ in metrics],
        "arms": {a: {"exit_reasons": reasons[a],
                     **{m: {"median": round(s.median, 2), "min": round(s.spread()[0], 2),
                            "max": round(s.spread()[1], 2), "values": s.values}
                        for m, s in results[a].items()}}
                 for a in arms},
    }


def policy_comparison(base: Config, duration: float, runs: int,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    arms = {p: {"run": {"variant": "fixed"}, "vm": {"type": "tdx"},
                "tdx": {"busy_policy": p}} for p in BUSY_POLICIES}
    res = compare("busy-policy", base, arms, POLICY_METRICS, duration, runs, progress)
    res["policies"] = res["arms"]
    return res


def unsync_comparison(base: Config, duration: float, runs: int,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The commit's spinlock (fixed) against its Alternative #1 (never unsync)."""
    arms = {"spinlock (fixed)": {"run": {"variant": "fixed"}},
            "write-protect (alt #1)": {"run": {"variant": "unsync-write-protect"}}}
    return compare("unsync", base, arms, UNSYNC_METRICS, duration, runs, progress)


def format_table(res: dict[str, Any], heading: str) -> str:
    arms = list(res["arms"])
    head = f"{'metric':<18}" + "".join(f"{a:>28}" for a in arms)
    lines = [f"{heading}, {res['runs']} runs x {res['duration_s']:.0f} s each "
             "(median [min..max])", head]
    for name in res["metrics"]:
        row = f"{name:<18}"
        for a in arms:
            m = res["arms"][a][name]
            row += f"{_fmt(m['median'])} [{_fmt(m['min'])}..{_fmt(m['max'])}]".rjust(28)
        lines.append(row)
    bad = {a: r for a, r in ((a, res["arms"][a]["exit_reasons"]) for a in arms)
           if any(x != "clean" for x in r)}
    lines.append("all runs clean" if not bad else f"NOT CLEAN: {bad}")
    return "\n".join(lines)


def variant_comparison(base: Config, variants: list[str], duration: float, runs: int,
                       variant_file: str = "",
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Protocol variants side by side on one config (user variants from
    ``variant_file`` too), e.g. the frozen-SPTE protocol against Sean's (Jan 2023) other
    idea, no mirror and every S-EPT update under one VM lock
    (examples/no_mirror.py)."""
    arms = {v: {"run": {"variant": v, "variant_file": variant_file}} for v in variants}
    return compare("variants", base, arms, POLICY_METRICS, duration, runs, progress)


def format_policy_table(res: dict[str, Any]) -> str:
    return format_table(res, "SEAMCALL BUSY policies: fixed protocol on a TD")


def _fmt(x: float) -> str:
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f}k"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}"


# ---------------------------------------------------------------------------
# throughput, the FFI floor, scaling
# ---------------------------------------------------------------------------

def floor_ns_per_atomic(calls: int = 200_000, repeats: int = 5) -> Series:
    """The cost of one bare native atomic (ts_load) called from Python."""
    import time as _time

    from stress.atomics import ffi, lib

    buf = ffi.new("uint64_t[]", 8)
    load = lib.ts_load
    out = Series()
    for _ in range(repeats):
        t = _time.perf_counter_ns()
        for _ in range(calls):
            load(buf, 1)
        out.values.append((_time.perf_counter_ns() - t) / calls)
    return out


def atomics_per_fault(faults: int = 3000) -> float:
    """Native atomic calls per fault, counted in-process on a private VM: every
    call through the Words chokepoint that crosses the FFI (a compound helper such
    as the walk counts once: it is one call)."""
    import random as _random

    from stress.arena import Arena, Control, Globals, Layout
    from stress.atomics import Words
    from stress.model.host import init_mem_attributes
    from stress.model.kvm import Geometry, Kvm
    from stress.model.roots import kvm_tdp_mmu_alloc_root
    from stress.model.tdp_mmu import kvm_tdp_page_fault
    from stress.model.variants import get_variant

    class Counting(Words):
        n = 0

        def __getattribute__(self, name: str):  # noqa: ANN204
            if name in _COUNTED:
                Counting.n += 1
            return super().__getattribute__(name)

    n_gfns = 1 << 16
    lay = Layout.build(n_slots=2, n_pages=1024, n_gfns=n_gfns)
    arena = Arena.create(lay, 0)
    w = Counting(arena.shm.buf, lay.ctl(Control.ABORT))
    try:
        w.fill(lay.bitmap, lay.bitmap_words, (1 << 64) - 1)
        w.store(lay.glob(Globals.RCU_GP_CTR), 1)
        kvm = Kvm(w, lay, Geometry(root_level=4, n_gfns=n_gfns), get_variant("fixed"), 0)
        init_mem_attributes(kvm)
        kvm.read_lock()
        kvm.vcpu.root = kvm_tdp_mmu_alloc_root(kvm)
        kvm.read_unlock()
        rng = _random.Random(1)
        Counting.n = 0
        for _ in range(faults):
            kvm_tdp_page_fault(kvm, rng.randrange(4096), rng.random() < 0.5)
        return Counting.n / faults
    finally:
        w.release()
        arena.close()


_COUNTED = frozenset({"load", "store", "cmpxchg", "xchg", "fetch_add", "fetch_and", "fetch_or",
                      "read_lock", "read_unlock", "write_lock", "write_unlock", "spin_lock",
                      "spin_unlock", "spin_trylock", "fill", "bitmap_alloc", "freeze_children",
                      "scan_ne", "find_mask", "count_equal", "popcount", "trace", "spin_ns",
                      "tdp_walk", "read_lock_rec", "read_unlock_rec", "xchg_from"})


def _trivial_loop(seconds: float, out) -> None:  # noqa: ANN001
    import time as _time

    end = _time.monotonic() + seconds
    n = 0
    while _time.monotonic() < end:
        for _ in range(1000):
            n += 1
    out.put(n)


def machine_rate(procs: int, seconds: float) -> float:
    """Iterations/s of a trivial CPU-bound loop in ``procs`` processes at once."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_trivial_loop, args=(seconds, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    total = sum(q.get() for _ in ps)
    for p in ps:
        p.join()
    return total / seconds


def vcpu_rate(base: Config, procs: int, seconds: float) -> float:
    """Aggregate faults/s of ``procs`` vCPU processes and no other role: the fault
    path's own cost (no modelled SEAMCALL latency, no injected delays, no
    halts, resets or nested syncs, no guest "hardware" accesses between faults)."""
    cfg = config_mod.load_from(base, {
        "run": {"duration": seconds, "check_interval": 0.0, "variant": "fixed"},
        "vm": {"type": "default"},
        "workers": {"vcpu": procs, "zapper": 0, "invalidator": 0, "notifier": 0,
                    "converter": 0},
        "vcpu": {"halt_every": 0, "root_reset_every": 0, "guest_accesses": 0},
        "unsync": {"enabled": False}, "inject": {"delay_every": 0}})
    c, d, _reason = _one_run(cfg)
    return c["faults"] / d


# per role: (what one op is called, the counter that counts the role's own work)
ROLE_WORK = {"vcpu": ("faults", "faults"), "zapper": ("zaps", "ops"),
             "invalidator": ("fast zaps", "fast_zaps"),
             "notifier": ("invalidations", "invalidations"),
             "converter": ("conversions", "conversions")}


def role_rates(base: Config, seconds: float) -> dict[str, dict[str, float]]:
    """One run of the config's job with every role it has: per role, the number of
    processes and, per process, its work/s (faults, zaps, ...), ops/s and
    SEAMCALLs/s."""
    cfg = config_mod.load_from(base, {"run": {"duration": seconds, "check_interval": 0.0}})
    o = Supervisor(cfg).run()
    d = max(o.duration_s, 1e-9)
    per: dict[str, Counter[str]] = {}
    procs: Counter[str] = Counter()
    for rec in o.workers:
        per.setdefault(rec.role, Counter()).update(
            {k: v for k, v in rec.stats.items() if not k.startswith("max_")})
        procs[rec.role] += 1
    out: dict[str, dict[str, float]] = {}
    for role, c in per.items():
        n = procs[role]
        counter = ROLE_WORK.get(role, ("ops", "ops"))[1]
        out[role] = {"procs": n, "work_per_s_per_proc": c[counter] / d / n,
                     "ops_per_s_per_proc": c["ops"] / d / n,
                     "seamcalls_per_s_per_proc": c["seamcalls"] / d / n,
                     "clean": float(o.exit_reason == "clean")}
    return out


def role_throughput(base: Config, seconds: float, runs: int,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per-role throughput of the config's own job (the default job: every role,
    modelled latencies and delay injection as configured): a warm-up run, then
    ``runs`` runs; per role the median and min..max of each figure."""
    say = progress or (lambda m: None)
    role_rates(base, min(seconds, 2.0))  # warm-up
    series: dict[str, dict[str, Series]] = {}
    procs: dict[str, int] = {}
    clean = True
    for rnd in range(runs):
        rates = role_rates(base, seconds)
        for role, r in rates.items():
            procs[role] = int(r["procs"])
            clean = clean and bool(r["clean"])
            s = series.setdefault(role, {k: Series() for k in r if k not in ("procs", "clean")})
            for k, ser in s.items():
                ser.values.append(r[k])
        say(f"run {rnd + 1}/{runs} roles: " + ", ".join(
            f"{role} {r['work_per_s_per_proc']:.0f} {ROLE_WORK.get(role, ('ops',))[0]}/s"
            for role, r in rates.items()))
    return {
        "runs": runs, "duration_s": seconds, "all_clean": clean,
        "roles": {role: {"procs": procs[role], "work": ROLE_WORK.get(role, ("ops", "ops"))[0],
                         **{k: {"median": round(s.median, 1), "min": round(s.spread()[0], 1),
                                "max": round(s.spread()[1], 1)} for k, s in ser.items()}}
                  for role, ser in series.items()},
    }


def throughput(base: Config, seconds: float, runs: int,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Faults/s per process, the FFI floor, and scaling from 1 to all cores
    against the machine's own scaling measured in the same run."""
    import os as _os

    cores = _os.cpu_count() or 1
    say = progress or (lambda m: None)
    floor = floor_ns_per_atomic()
    say(f"floor: {floor.median:.0f} ns per bare native atomic call")
    per_fault = atomics_per_fault()
    say(f"{per_fault:.1f} native atomic calls per fault")
    vcpu_rate(base, 1, min(seconds, 2.0))  # warm-up
    rates: dict[int, Series] = {n: Series() for n in range(1, cores + 1)}
    machine: dict[int, Series] = {n: Series() for n in range(1, cores + 1)}
    for rnd in range(runs):
        for n in range(1, cores + 1):
            rates[n].values.append(vcpu_rate(base, n, seconds))
            machine[n].values.append(machine_rate(n, seconds))
            say(f"run {rnd + 1}/{runs} N={n}: {rates[n].values[-1]:.0f} faults/s, machine "
                f"{machine[n].values[-1]:.3g} it/s")
    single = rates[1].median
    fault_ns = 1e9 / single if single else 0.0
    eff = rates[cores].median / (cores * single) if single else 0.0
    meff = machine[cores].median / (cores * machine[1].median) if machine[1].median else 0.0
    roles = role_throughput(base, seconds, runs, progress)
    return {
        "benchmark": "throughput", "duration_s": seconds, "runs": runs, "cores": cores,
        "faults_per_s_per_proc": round(single, 1),
        "faults_per_s": {str(n): {"median": round(s.median, 1), "min": round(min(s.values), 1),
                                  "max": round(max(s.values), 1)} for n, s in rates.items()},
        "floor_ns_per_atomic": round(floor.median, 1),
        "floor_spread_ns": [round(min(floor.values), 1), round(max(floor.values), 1)],
        "atomics_per_fault": round(per_fault, 1),
        "fault_ns": round(fault_ns, 1),
        "fault_cost_over_floor": round(fault_ns / (floor.median * per_fault), 2)
        if floor.median and per_fault else None,
        "scaling_efficiency": round(eff, 3),
        "machine_scaling_efficiency": round(meff, 3),
        "relative_scaling": round(eff / meff, 3) if meff else None,
        "faults_per_s_per_proc_spread": [round(min(rates[1].values), 1),
                                         round(max(rates[1].values), 1)],
        "roles": roles,
    }


def format_throughput(res: dict[str, Any]) -> str:
    lines = [f"throughput: fixed protocol, vCPU processes only, {res['runs']} runs x "
             f"{res['duration_s']:.0f} s (median [min..max])"]
    for n, s in res["faults_per_s"].items():
        lines.append(f"  N={n}: {_fmt(s['median'])} faults/s [{_fmt(s['min'])}.."
                     f"{_fmt(s['max'])}]")
    lines.append(f"faults/s per process: {_fmt(res['faults_per_s_per_proc'])} "
                 f"({res['fault_ns'] / 1000:.1f} us per fault)")
    lines.append(f"floor: {res['floor_ns_per_atomic']:.0f} ns per bare native atomic "
                 f"({res['atomics_per_fault']:.1f} native atomic calls per fault): a fault "
                 f"costs {res['fault_cost_over_floor']}x its atomics' floor")
    lines.append(f"scaling at N={res['cores']}: {res['scaling_efficiency']:.2f} of N x single; "
                 f"the machine's own trivial loop: {res['machine_scaling_efficiency']:.2f}; "
                 f"relative: {res['relative_scaling']}")
    ro = res.get("roles")
    if ro:
        lines.append(f"per role, the config's own job ({ro['runs']} runs x "
                     f"{ro['duration_s']:.0f} s, per process, median [min..max])"
                     + ("" if ro["all_clean"] else ": NOT CLEAN"))
        for role, r in ro["roles"].items():
            def f(k: str, r: dict[str, Any] = r) -> str:
                return f"{_fmt(r[k]['median'])} [{_fmt(r[k]['min'])}..{_fmt(r[k]['max'])}]"
            lines.append(f"  {role:<12} x{r['procs']}: {f('work_per_s_per_proc')} {r['work']}/s, "
                         f"{f('seamcalls_per_s_per_proc')} SEAMCALLs/s")
    return "\n".join(lines)


def kernel_vcpu_rate(procs: int, seconds: float, ksrc: str = "") -> tuple[float, str]:
    """Aggregate faults/s of ``procs`` kernel-engine vCPU processes and no other
    role, each access a fresh gfn (kernel.pattern = "sequential", 4K pages, no
    delay injection, no halts): the tree's own fault path, kvm_mmu_page_fault
    to the leaf's cmpxchg, through the shim.  Also the tree's version."""
    cfg = config_mod.load(str(config_mod.DEFAULT_CONFIG.parent / "kernel.toml"), {
        "run": {"duration": seconds, "check_interval": 0.0, "variant": "fixed"},
        "guest": {"size": 4 << 30, "layout": "flat", "huge_pages": 0.0},
        "kernel": {"ksrc": ksrc, "vcpu": procs, "zapper": 0, "notifier": 0,
                   "invalidator": 0, "dirtylog": 0, "aging": 0, "nx": 0, "memslot": 0,
                   "yield_ppm": 0, "halt_fraction": 0.0, "pattern": "sequential",
                   "pages": 1 << 14, "arena": 1 << 30}})
    o = supervisor_for(cfg)(cfg).run()
    if o.exit_reason != "clean":
        raise RuntimeError(f"kernel bench run ended {o.exit_reason}: "
                           f"{(o.violations or o.errors or [''])[0]}")
    d = max(o.duration_s, 1e-9)
    faults = sum(r.stats.get("pf_fixed", 0) + r.stats.get("pf_fast", 0) for r in o.workers)
    return faults / d, (o.engine or {}).get("version", "?")


def engine_comparison(base: Config, seconds: float, runs: int, ksrc: str = "",
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Faults/s per process of the kernel engine next to the Python model's, one
    vCPU process each: a warm-up run of each, then ``runs`` runs; median, min..max."""
    say = progress or (lambda m: None)
    kernel_vcpu_rate(1, min(seconds, 1.0), ksrc)  # warm-up (and the build, if not cached)
    vcpu_rate(base, 1, min(seconds, 1.0))
    k, p = Series(), Series()
    version = "?"
    for rnd in range(runs):
        rate, version = kernel_vcpu_rate(1, seconds, ksrc)
        k.values.append(rate)
        p.values.append(vcpu_rate(base, 1, seconds))
        say(f"run {rnd + 1}/{runs}: kernel {k.values[-1]:.0f} faults/s, python model "
            f"{p.values[-1]:.0f} faults/s")
    return {"benchmark": "engines", "duration_s": seconds, "runs": runs,
            "kernel_version": version,
            "faults_per_s_per_proc": {
                "kernel": {"median": round(k.median, 1), "min": round(min(k.values), 1),
                           "max": round(max(k.values), 1)},
                "python": {"median": round(p.median, 1), "min": round(min(p.values), 1),
                           "max": round(max(p.values), 1)}},
            "ratio": round(k.median / p.median, 1) if p.median else None}


def format_engines(res: dict[str, Any]) -> str:
    f = res["faults_per_s_per_proc"]
    lines = [f"faults/s per process, one vCPU process, {res['runs']} runs x "
             f"{res['duration_s']:.0f} s (median [min..max]):"]
    for eng, label in (("kernel", f"kernel engine ({res['kernel_version']} tdp_mmu.c)"),
                       ("python", "Python model")):
        lines.append(f"  {label:<34} {_fmt(f[eng]['median']):>9} "
                     f"[{_fmt(f[eng]['min'])}..{_fmt(f[eng]['max'])}]")
    if res["ratio"]:
        lines.append(f"  the kernel engine faults {res['ratio']}x as fast")
    return "\n".join(lines)
