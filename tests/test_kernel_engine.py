"""The kernel engine: a kernel tree's own TDP MMU in the harness.

The extraction and tree-handling tests need no tree.  The rest build the
engine from Debian's linux-source (``apt-get install linux-source-6.12``) or
``$TDP_STRESS_KSRC``, and skip with the reason when there is none; with
``TDP_STRESS_REQUIRE_KERNEL=1`` (CI) a missing tree fails them instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from stress.config import load
from stress.harness.kernel import KernelSupervisor
from stress.kernel.build import BuildError, build
from stress.kernel.build import load as load_module
from stress.kernel.extract import MissingDefinition, extract_define, extract_function, extract_type
from stress.kernel.mutations import BY_NAME, MutationError
from stress.kernel.tree import USED, Tree, TreeError, default_ksrc, open_tree

from .conftest import run_cli

C_SOURCE = """\
union kvm_mmu_page_role {
\tu32 word;
\tstruct {
\t\tunsigned level:4; /* { not a brace */
\t};
};

#define PTE_PREFETCH_NUM\t\t8
#define LONG_ONE(x) \\
\t((x) + 1)

static int
two_line_head(struct kvm *kvm,
\t      int level)
{
\tif (level) {
\t\treturn "}"[0];
\t}
\treturn 0;
}

int a_prototype(int x);

int noinline kvm_mmu_page_fault(struct kvm_vcpu *vcpu, u64 error_code)
{
\treturn 1;
}
"""


def test_extract_type_function_define() -> None:
    t = extract_type(C_SOURCE, "union kvm_mmu_page_role")
    assert t.startswith("union kvm_mmu_page_role {") and t.rstrip().endswith("};")
    f = extract_function(C_SOURCE, "two_line_head")
    assert f.startswith("static int\ntwo_line_head(") and f.rstrip().endswith("}")
    assert '"}"[0]' in f  # a brace in a string does not end the body
    assert extract_function(C_SOURCE, "kvm_mmu_page_fault").startswith("int noinline")
    assert extract_define(C_SOURCE, "PTE_PREFETCH_NUM").split() == ["#define",
                                                                     "PTE_PREFETCH_NUM", "8"]
    assert "((x) + 1)" in extract_define(C_SOURCE, "LONG_ONE")
    with pytest.raises(MissingDefinition, match="mmu.c has no function a_prototype"):
        extract_function(C_SOURCE, "a_prototype", "mmu.c")  # a prototype is no definition
    with pytest.raises(MissingDefinition, match="has no struct kvm_mmu"):
        extract_type(C_SOURCE, "struct kvm_mmu")


def test_tree_errors(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 99\nSUBLEVEL = 1\n"
                                       "EXTRAVERSION =\n")
    with pytest.raises(TreeError, match=r"no arch/x86/kvm/mmu/tdp_iter\.c \(and \d+ more"):
        open_tree(str(tmp_path))
    with pytest.raises(TreeError, match="no such file or directory"):
        open_tree(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(TreeError, match="neither a kernel source directory nor a .tar.xz"):
        open_tree(str(tmp_path / "x.txt"))


def _ksrc() -> str | None:
    return os.environ.get("TDP_STRESS_KSRC") or default_ksrc()


@pytest.fixture(scope="module")
def tree() -> Tree:
    ksrc = _ksrc()
    if ksrc is None:
        if os.environ.get("TDP_STRESS_REQUIRE_KERNEL") == "1":
            pytest.fail("TDP_STRESS_REQUIRE_KERNEL=1 but no kernel tree "
                        "(apt-get install linux-source-6.12, or set TDP_STRESS_KSRC)")
        pytest.skip("no kernel tree: apt-get install linux-source-6.12 (or TDP_STRESS_KSRC)")
    return open_tree(ksrc)


def _copy_tree(tree: Tree, dest: Path) -> Path:
    for rel in USED:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tree.path(rel), dest / rel)
    return dest


def _cfg(tmp_path: Path, ksrc: str, **kernel: object) -> object:
    ov = {"run": {"duration": 6.0, "seed": 3, "out": str(tmp_path), "check_interval": 2.0},
          "guest": {"size": 256 << 20},
          "kernel": {"ksrc": ksrc, "vcpu": 2, "pages": 8192, "arena": 256 << 20,
                     "interval": 0.0005, **kernel}}
    return load("kernel", ov)


def test_build_is_cached_and_reports_the_tree(tree: Tree) -> None:
    b1 = build(tree)
    b2 = build(tree)
    assert b1.path == b2.path and b1.path.exists()
    mod = load_module(b1)
    assert mod.ffi.string(mod.lib.ke_tree_version()).decode() == tree.version


def test_fixed_tree_runs_clean_with_every_op(tmp_path: Path, tree: Tree) -> None:
    """Every job of the kernel engine runs, the walks find nothing, every page
    comes back after teardown."""
    cfg = _cfg(tmp_path, tree.origin)
    out = KernelSupervisor(cfg).run()
    assert out.exit_reason == "clean", (out.violations, out.errors, out.hang)
    assert out.checks.get("teardown") == 1 and out.checks.get("quiescent", 0) >= 2
    ops: dict[str, int] = {}
    for w in out.workers:
        for k, v in w.stats.items():
            ops[k] = ops.get(k, 0) + v
    for op in ("guest_access", "pf_fixed", "zap_gfn_range", "unmap", "zap_all_fast",
               "wrprot_slot", "split", "dirty_log", "age", "test_age", "nx_recover",
               "memslot_delete"):
        assert ops.get(op, 0) > 0, (op, ops)
    assert out.engine is not None and out.engine["version"] == tree.version
    assert out.engine["tracepoints"].get("kvm_tdp_mmu_spte_changed", 0) > 0


def test_a_patched_tree_runs_its_change(tmp_path: Path, tree: Tree) -> None:
    """A user's one-line change to tdp_mmu.c is built (a new cache key) and runs."""
    top = _copy_tree(tree, tmp_path / "linux")
    f = top / "arch/x86/kvm/mmu/tdp_mmu.c"
    text = f.read_text()
    head = "int kvm_tdp_mmu_map(struct kvm_vcpu *vcpu, struct kvm_page_fault *fault)\n{\n"
    assert text.count(head) == 1
    f.write_text(text.replace(head, head + '\tks_tracepoint("my_patch");\n'))
    patched = open_tree(str(top))
    assert build(patched).key != build(tree).key
    r = run_cli("run", "--engine", "kernel", "--ksrc", str(top), "--duration", "3s",
                "--out", str(tmp_path / "out"), "-q", "--json", "-", timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["engine"]["tree"] == str(top)
    assert res["engine"]["tracepoints"].get("my_patch", 0) > 0


def test_a_tree_without_a_helper_is_one_line(tmp_path: Path, tree: Tree) -> None:
    top = _copy_tree(tree, tmp_path / "linux")
    mmu = top / "arch/x86/kvm/mmu/mmu.c"
    mmu.write_text(mmu.read_text().replace("static int fast_page_fault(",
                                           "static int renamed_fast_page_fault("))
    with pytest.raises(BuildError, match=r"mmu\.c has no function fast_page_fault\(\)"):
        build(open_tree(str(top)))
    r = run_cli("run", "--engine", "kernel", "--ksrc", str(top), "--duration", "1s",
                "--out", str(tmp_path / "out"), "-q")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fast_page_fault" in lines[0], r.stderr


def test_a_mutation_that_does_not_apply_is_one_line(tmp_path: Path, tree: Tree) -> None:
    top = _copy_tree(tree, tmp_path / "linux")
    f = top / "arch/x86/kvm/mmu/tdp_mmu.c"
    f.write_text(f.read_text().replace("tdp_mmu_free_sp_rcu_callback);\n}",
                                       "tdp_mmu_free_sp_rcu_callback); \n}"))
    m = BY_NAME["free-without-grace-period"]
    with pytest.raises(MutationError, match="has 0 copies of the code it changes"):
        m.apply(f.read_text(), str(top))
    r = run_cli("run", "--engine", "kernel", "--ksrc", str(top), "--variant", m.name,
                "--duration", "1s", "--out", str(tmp_path / "out"), "-q")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_free_without_grace_period_is_caught(tmp_path: Path, tree: Tree) -> None:
    m = BY_NAME["free-without-grace-period"]
    r = run_cli("run", "--engine", "kernel", "--variant", m.name, "--expect-violation",
                "--duration", "30s", "--out", str(tmp_path), "-q", "--json", "-",
                timeout=240)
    assert r.returncode == 0, r.stderr  # --expect-violation: caught = 0
    res = json.loads(r.stdout)
    assert res["violations"][0]["invariant"] in m.expects
    assert res["violations"][0]["details"]["engine"] == "kernel"


def test_huge_leaf_over_its_own_table(tmp_path: Path, tree: Tree) -> None:
    """kernel.alias_tables: the fixed tree frees a table that a 2M leaf at the
    table's own frame replaced; the pre-c8e5a0d0e9bc check (PFN changed) leaks it."""
    m = BY_NAME["child-removal-on-pfn-change"]
    # one process, VMs one after another (as zoo and soak run them): each gets the map
    for seed in range(1, 6):
        cfg = load(m.config.removesuffix(".toml"),
                   {"run": {"duration": 1.0, "seed": seed, "out": str(tmp_path / "fixed")}})
        out = KernelSupervisor(cfg).run()
        assert out.exit_reason == "clean", (seed, out.violations, out.errors)
        assert out.checks.get("quiescent", 0) >= 2 and out.checks.get("teardown") == 1
    r = run_cli("run", m.config.removesuffix(".toml"), "--variant", m.name,
                "--expect-violation", "--duration", "20s", "--out", str(tmp_path / "bug"),
                "-q", "--json", "-", timeout=240)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["violations"][0]["invariant"] in m.expects


def test_bad_engine_config_is_one_line(tmp_path: Path) -> None:
    r = run_cli("run", "default", "--engine", "kernel", "--duration", "1s",
                "--out", str(tmp_path), "-q")
    assert r.returncode == 2 and "default VMs" in r.stderr
    r = run_cli("run", "--engine", "kernel", "--variant", "no-such-bug", "--duration", "1s",
                "--out", str(tmp_path), "-q")
    assert r.returncode == 2 and "unknown kernel variant 'no-such-bug'" in r.stderr


def test_bench_prints_both_engines(tmp_path: Path, tree: Tree) -> None:
    r = run_cli("bench", "--engine", "kernel", "--duration", "1s", "--runs", "1", "-q",
                "--json", "-", timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    f = res["faults_per_s_per_proc"]
    assert f["kernel"]["median"] > 0 and f["python"]["median"] > 0
    assert res["kernel_version"] == tree.version
    assert "faults/s per process" in r.stderr


def test_hunt_and_replay_a_kernel_mutation(tmp_path: Path, tree: Tree) -> None:
    """Controlled scheduling at the kernel code's own scheduling points: a
    schedule that trips root-double-put is found and replays identically."""
    from stress.harness.kernel import supervisor_for
    from stress.repro.hunt import events_key, hunt

    cfg = load("kernel-roots", {"run": {"variant": "root-double-put"},
                                "kernel": {"ksrc": tree.origin}})
    res = hunt(cfg, 20, max_steps=400_000)
    assert res.found and res.config is not None and res.outcome is not None, res
    first = res.outcome.violations[0]["invariant"]
    assert first in BY_NAME["root-double-put"].expects
    want = events_key(res.outcome.trace)
    assert want  # the kernel's trace is in the outcome
    again = supervisor_for(res.config)(res.config).run()
    assert again.violations[0]["invariant"] == first
    assert events_key(again.trace) == want


def test_controlled_fixed_tree_is_clean(tree: Tree) -> None:
    cfg = load("kernel-tlb", {"schedule": {"mode": "random", "seed": 3, "switch_p": 0.05,
                                           "max_steps": 100_000},
                              "run": {"check_interval": 0.0},
                              "kernel": {"ksrc": tree.origin}})
    out = KernelSupervisor(cfg).run()
    assert out.exit_reason == "clean", (out.violations, out.errors, out.hang)
    assert out.schedule is not None and out.schedule["switches"]


def test_kernel_info_and_soak(tmp_path: Path, tree: Tree) -> None:
    r = run_cli("kernel", "info", "--json", "-")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["version"] == tree.version
    assert {f["file"] for f in info["files"]} == set(USED)
    assert all(v == "applies" for v in info["variants"].values()), info["variants"]
    r = run_cli("soak", "--engine", "kernel", "--duration", "10s", "--epoch", "2s",
                "--out", str(tmp_path), "-q", "--json", "-", timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res["epochs"]) >= 2 and all(e["exit_reason"] == "clean" for e in res["epochs"])
