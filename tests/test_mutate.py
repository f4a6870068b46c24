"""tdp-stress mutate: operators, ids, equivalents, a real kill, and the runner's cleanup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stress.model.variants import VARIANTS
from stress.mutate.operators import MODEL_DIR, OPERATORS, TARGET_FILES, generate
from stress.mutate.reach import (
    choose_config,
    choose_configs,
    instrument,
    run_configs,
    targets,
    variant_targets,
)
from stress.mutate.runner import load_equivalents, select, stale_equivalents
from stress.mutate.sandbox import Sandbox, run_config, segments_of

ROOT = Path(__file__).resolve().parent.parent
# the cmpxchg of tdp_mmu_set_spte_atomic always "succeeds": killed in 0.1-4.2 s on smoke
# in 8 of 8 tries (once, under the suite's load with smoke's quiet phases, at 13.5 s by the
# teardown walk) (its sibling drop-guard:2, `if found != old: ... return -EBUSY` dropped,
# only about half the time within 10 s)
CMPXCHG_STORE = "tdp_mmu.py:tdp_mmu_set_spte_atomic:cmpxchg-store:0"
EQUIVALENT = "notifier.py:kvm_mmu_invalidate_begin:swap:0"


def mutate_cli(*args: str, timeout: float = 120) -> tuple[int, dict, str]:
    p = subprocess.run([sys.executable, "-m", "stress.cli", "mutate", *args, "--json", "-",
                        "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else {}, p.stderr


def test_operators_give_parseable_distinct_mutants_with_stable_ids() -> None:
    mutants = generate()
    assert {m.file for m in mutants} == set(TARGET_FILES)
    assert {m.operator for m in mutants} == set(OPERATORS)
    ids = [m.id for m in mutants]
    assert len(set(ids)) == len(ids)
    assert ids == [m.id for m in generate()]  # deterministic
    for m in mutants:
        file, fn, op, k = m.id.split(":")
        assert (file, fn, op) == (m.file, m.function, m.operator) and k.isdigit()
        assert m.description.startswith(f"{m.file}:{m.function}: ")
    sources = {f: (MODEL_DIR / f).read_text() for f in TARGET_FILES}
    texts = set()
    for m in mutants:
        text = m.apply(sources[m.file])
        assert text != sources[m.file], m.id
        compile(text, m.file, "exec")  # parseable
        texts.add(text)
        assert m.diff(sources[m.file]).startswith("--- a/stress/model/")
    assert len(texts) == len(mutants)  # distinct


def test_ids_survive_an_edit_of_another_function(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model, ignore=shutil.ignore_patterns("__pycache__"))
    before = {m.id: m.segment for m in generate(("tdp_mmu.py",), model)}
    text = (model / "tdp_mmu.py").read_text()
    head, sep, tail = text.partition("\ndef tdp_mmu_set_spte_atomic(")
    extra = ("\ndef added_above(kvm: Kvm) -> None:\n    kvm.read_lock()\n"
             "    if kvm.me:\n        return\n    kvm.read_unlock()\n\n")
    (model / "tdp_mmu.py").write_text(head + extra + sep + tail)
    after = {m.id: m.segment for m in generate(("tdp_mmu.py",), model)}
    assert before.items() <= after.items()  # same ids for the same code, lines moved
    assert len(after) > len(before)


def test_instrumented_copy_keeps_every_site() -> None:
    mutants = generate(("tdp_iter.py",))
    sites = {m.site for m in mutants}
    text = instrument((MODEL_DIR / "tdp_iter.py").read_text(), "tdp_iter.py", sites)
    compile(text, "tdp_iter.py", "exec")
    assert {f'_mutate_hit("tdp_iter.py:{s}")' in text or
            f"_mutate_hit('tdp_iter.py:{s}')" in text for s in sites} == {True}


def test_sampling_is_seeded_and_stratified() -> None:
    mutants = generate()
    a = select(mutants, max_n=10, sample_seed=3)
    assert [m.id for m in a] == [m.id for m in select(mutants, max_n=10, sample_seed=3)]
    assert {m.file for m in a} == set(TARGET_FILES)  # 2 of each
    assert select(mutants, operators=("drop-rcu",)) == [m for m in mutants
                                                        if m.operator == "drop-rcu"]


def test_equivalent_entries_are_current() -> None:
    eq = load_equivalents()
    assert EQUIVALENT in eq and all(v.get("reason") for v in eq.values())
    assert stale_equivalents(eq, generate()) == []


def test_equivalent_mutant_is_classified_without_running(tmp_path: Path) -> None:
    t0 = time.monotonic()
    rc, res, err = mutate_cli("--id", EQUIVALENT, "--config", "smoke", "--out", str(tmp_path))
    assert rc == 0, err
    assert time.monotonic() - t0 < 20  # no stress run
    [m] = res["mutants"]
    assert m["outcome"] == "equivalent" and m["exit_code"] is None and "write" in m["detail"]
    assert res["summary"]["total"]["equivalent"] == 1
    assert res["summary"]["total"]["score"] is None  # nothing left to score


@pytest.mark.parametrize(("args", "needle"), [
    (["--id", "tdp_mmu.py:nope:swap:0"], "no such mutant"),
    (["--file", "kvm.py"], "kvm.py"),
    (["--duration", "31s"], "at most 30s"),
    (["--config", "nope"], "unknown config"),
    (["--configs", "2", "--duration", "20s"], "more than 30s"),
])
def test_usage_errors_exit_2_and_leave_nothing(tmp_path: Path, args: list[str],
                                                needle: str) -> None:
    rc, _, err = mutate_cli(*args, "--out", str(tmp_path / "out"))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdp-stress: error:") and needle in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cmpxchg_that_always_succeeds_is_killed_by_a_named_oracle(tmp_path: Path) -> None:
    rc, res, err = mutate_cli("--id", CMPXCHG_STORE, "--config", "smoke", "--duration", "10s",
                              "--out", str(tmp_path))
    assert rc == 0, err
    [m] = res["mutants"]
    assert m["outcome"] == "killed", m
    # within the run: its 10 s, or the checks at its end (a quiescent or teardown walk)
    assert m["invariant"] and m["time_to_kill_s"] is not None
    assert m["config"] == "smoke"
    assert "+    found = _mutant_cmpxchg_store(kvm.w, it.sptep, old, new_spte)" in m["diff"]
    assert res["summary"]["files"]["tdp_mmu.py"]["score"] == 1.0
    assert segments_of(m["pid"]) == []
    assert (tmp_path / "results.json").is_file()


def test_a_survivor_runs_on_the_next_config_and_its_kill_counts_both_runs(
        tmp_path: Path) -> None:
    """A split that leaves the last 4K piece out: smoke has no huge pages (the mutant
    survives there), huge-alias splits 2M leaves and kills it at once."""
    rc, res, err = mutate_cli("--id", "tdp_mmu.py:tdp_mmu_split_huge_page:off-by-one:0",
                              "--config", "smoke", "--config", "huge-alias", "--duration",
                              "4s", "--out", str(tmp_path))
    assert rc == 0, err
    [m] = res["mutants"]
    assert m["outcome"] == "killed" and m["invariant"] == "forbidden SPTE transition", m
    assert m["tried"] == ["smoke", "huge-alias"] and m["config"] == "huge-alias"
    assert m["time_to_kill_s"] >= 4  # the survival on smoke counts
    assert res["configs_per_mutant"] == 2


@pytest.mark.slow
def test_a_fault_that_waits_for_nothing_is_a_named_livelock_in_a_quiet_phase(
        tmp_path: Path) -> None:
    """mmu_invalidate_retry_gfn_unsafe testing the last range with no invalidation in
    progress: a fault on a gfn of that range retries until the next invalidation
    begins; in the invalidate job's first quiet phase (at 3.5 s) none does."""
    rc, res, err = mutate_cli("--id", "tdp_mmu.py:mmu_invalidate_retry_gfn_unsafe:negate-cond:0",
                              "--config", "invalidate", "--duration", "10s",
                              "--out", str(tmp_path))
    assert rc == 0, err
    [m] = res["mutants"]
    assert m["outcome"] == "killed" and m["invariant"] == "livelock", m
    assert m["detail"].startswith("livelock in "), m["detail"]


def test_config_choice_for_several_runs_takes_another_job_each_time() -> None:
    [m] = [m for m in generate(("mirror.py",)) if m.id == "mirror.py:tdx_track:negate-cond:0"]
    hit = {"exit_code": 0, "hits": [m.site_key]}
    reach = {"configs": {"tdx-busy": hit, "tdx-busy@mirror-zap-shared": hit, "default": hit,
                         "smoke": {"exit_code": 1, "hits": [m.site_key]}}}
    assert choose_configs(m, reach, 1) == ["tdx-busy"]
    # the variant of the same job is not another job; a config that is not clean is none
    assert choose_configs(m, reach, 3) == ["tdx-busy", "default"]


def test_a_null_dereference_in_protocol_code_is_the_kernel_oops(tmp_path: Path) -> None:
    """kvm_mmu_reload without its `vcpu.root is not None`: the model faults on a None
    root as the kernel would on a NULL one, named, at the function that faulted."""
    rc, res, err = mutate_cli("--id", "roots.py:kvm_mmu_reload:drop-conjunct:0", "--config",
                              "smoke", "--duration", "10s", "--out", str(tmp_path))
    assert rc == 0, err
    [m] = res["mutants"]
    assert m["outcome"] == "killed" and m["invariant"] == "kernel oops", m
    assert "BUG: kernel NULL pointer dereference in " in m["detail"], m["detail"]
    assert segments_of(m["pid"]) == []


@pytest.mark.slow
def test_a_run_killed_on_timeout_leaves_no_process_or_segment() -> None:
    sandbox = Sandbox()
    try:
        d = sandbox.make({})
        # grace < 0: our timeout fires 3 s into a 10 s run, mid-run
        r = run_config(d, run_configs()["smoke"], 10.0, 1, grace=-7.0)
        assert r.timed_out and r.exit_code is None and 2.5 < r.wall_s < 8
        assert segments_of(r.pid) == []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the whole session is gone (once reaped)
            try:
                os.killpg(r.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"processes of session {r.pid} outlived the kill")
    finally:
        sandbox.close()
    assert not sandbox.root.exists()


def test_probe_records_each_process_sites(tmp_path: Path) -> None:
    src = ("import os\n\ndef f(x):\n    if x:\n        return 1\n    y = x + 1\n    return y\n\n"
           "f(0)\nif os.fork() == 0:\n    f(1)\n    os._exit(0)\nos.wait()\n")
    text = instrument(src, "demo.py", {4, 6})
    (tmp_path / "demo.py").write_text(text)
    hits = tmp_path / "hits"
    hits.mkdir()
    env = dict(os.environ, TDP_MUTATE_PROBE_DIR=str(hits), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(tmp_path / "demo.py")], env=env, check=True,
                   timeout=30)
    per_pid = sorted(sorted(f.read_text().split()) for f in hits.iterdir())
    # the parent ran both sites; the forked child (its own file) only the if
    assert per_pid == [["demo.py:4"], ["demo.py:4", "demo.py:6"]]


def test_config_choice_prefers_the_functions_config_if_it_reached_the_site() -> None:
    [m] = [m for m in generate(("mirror.py",)) if m.id == "mirror.py:tdx_track:negate-cond:0"]
    reach = {"configs": {"tdx-busy": {"exit_code": 0, "hits": [m.site_key]},
                         "default": {"exit_code": 0, "hits": [m.site_key]},
                         "smoke": {"exit_code": 1, "hits": [m.site_key]}}}
    assert choose_config(m, reach) == "tdx-busy"
    reach["configs"]["tdx-busy"]["hits"] = []
    assert choose_config(m, reach) == "default"  # the first fallback that reached it
    reach["configs"]["default"]["hits"] = []
    assert choose_config(m, reach) is None  # smoke is not clean: unreached


def test_reach_targets_are_the_configs_and_the_valid_variants_only() -> None:
    configs = run_configs()
    t = targets(configs)
    assert {n for n in t if "@" not in n} == set(configs)  # every config, fixed protocol
    vt = variant_targets(configs)
    assert vt and all(t[n] == vt[n] for n in vt)
    used = {v for _, v in vt.values()}
    assert "mirror-zap-shared" in used and "fixed-v6.16" in used
    assert not any(VARIANTS[v].buggy for v in used)  # never a bug variant
    assert all(c in configs for c, _ in vt.values())


def test_config_choice_falls_back_to_a_valid_variant_then_prefers_the_guards_body() -> None:
    [m] = [m for m in generate(("mirror.py",)) if m.operator == "drop-guard"
           and m.function == "proposal_free_external_spt"][:1]
    assert m.body_key is not None and m.body_key != m.site_key
    reach = {"configs": {"default": {"exit_code": 0, "hits": []},
                         "tdx-busy@mirror-zap-shared": {"exit_code": 0,
                                                        "hits": [m.site_key]}}}
    assert choose_config(m, reach) == "tdx-busy@mirror-zap-shared"  # only a variant ran it
    reach["configs"]["default"]["hits"] = [m.site_key]
    assert choose_config(m, reach) == "default"  # the fixed protocol first
    reach["configs"]["tdx-busy@mirror-zap-shared"]["hits"].append(m.body_key)
    assert choose_config(m, reach) == "tdx-busy@mirror-zap-shared"  # the guard fired there


def test_a_negated_if_else_prefers_a_run_that_took_both_branches() -> None:
    [m] = [m for m in generate(("notifier.py",)) if m.operator == "negate-cond"
           and m.function == "mmu_notifier_invalidate_range"
           and m.segment.startswith('attr_filter == "private"') and m.else_key is not None]
    assert m.body_key is not None
    reach = {"configs": {"dirty": {"exit_code": 0, "hits": [m.site_key, m.body_key]},
                         "tdx-busy": {"exit_code": 0,
                                      "hits": [m.site_key, m.body_key, m.else_key]}}}
    assert choose_config(m, reach) == "tdx-busy"  # both branches: the swap shows
    reach["configs"]["tdx-busy"]["hits"].remove(m.body_key)
    assert choose_config(m, reach) == "tdx-busy"  # either branch: the preferred order
    reach["configs"]["convert-huge"] = {"exit_code": 0, "hits": [m.site_key, m.else_key]}
    assert choose_config(m, reach) == "convert-huge"  # notifier.py's preferred config
    assert not [g for g in generate(("notifier.py",)) if g.operator != "negate-cond"
                and g.else_site]
