"""Smoke tests of the product benchmarks (``benchmarks/``, run as ``python -m benchmarks.X``):
every one imports as a module of the ``benchmarks`` package and parses its options; the
results writer records provenance; training and spectrum run their ``--quick`` path at a
tiny size; step_time's timing harness and donation."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import _common, _records

ROOT = Path(__file__).resolve().parents[2]

#: Every benchmark whose results the README or docs/performance.md report.
PRODUCT_BENCHMARKS = (
    "checkpoint_integrity",
    "cold_start",
    "conflict_intensity",
    "conflict_rates",
    "efficiency",
    "gpu_plan",
    "merge_memory",
    "merge_time",
    "merge_vs_mergekit",
    "merging",
    "pruning",
    "spectrum",
    "step_time",
    "train_throughput",
    "training",
    "training_seeds",
    "update_ablation",
    "update_memory",
    "update_profile",
)


def _recorded(tmp_path, name: str, result: dict) -> Path:
    """A results folder holding one benchmark record ``<name>.json`` (as the claims read)."""
    bdir = tmp_path / "results"
    bdir.mkdir(exist_ok=True)
    env = {"cpu": {"affinity": 2}, "backend": "cpu"}
    record = {"date": "2026-01-02", "environment": env, "result": result}
    (bdir / f"{name}.json").write_text(json.dumps(record))
    return bdir


def test_benchmarks_folder_holds_exactly_the_product_benchmarks():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(PRODUCT_BENCHMARKS)
    for path in (ROOT / "benchmarks").glob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"


@pytest.mark.parametrize("name", PRODUCT_BENCHMARKS)
def test_benchmark_imports_as_a_module_and_parses_its_options(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out or name == "update_memory"
    assert f"python -m benchmarks.{name}" in module.__doc__


def test_benchmark_runs_as_a_module_from_the_repository_root():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.merge_vs_mergekit", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--mergekit-python" in proc.stdout


def test_write_results_records_provenance_and_regenerates_all_sections(tmp_path):
    rdir = tmp_path / "results"
    path = _records.write_results(
        "alpha",
        {"x": float("nan"), "y": [1, 2]},
        "| a |\n|---|\n| 1 |",
        results_dir=rdir,
        command_line="python -m benchmarks.alpha --quick",
    )
    _records.write_results("beta", {"z": 3}, "beta body", results_dir=rdir, title="Beta")
    assert path == rdir / "alpha.json"
    assert sorted(p.name for p in rdir.iterdir()) == ["alpha.json", "beta.json"]  # no temp files
    rec = json.loads(path.read_text())
    assert rec["result"] == {"x": None, "y": [1, 2]}
    assert rec["command"] == "python -m benchmarks.alpha --quick"
    assert rec["date"].endswith("+00:00")
    assert {"commit", "dirty"} <= set(rec["git"])
    env = rec["environment"]
    assert ("git_at_write" in rec) == (_common.git_commit() != _common.CODE_GIT)
    assert {"jax", "jaxlib", "optax", "numpy"} <= set(env["packages"])
    assert {"cpu", "backend", "device_kind", "loadavg_start", "loadavg_end"} <= set(env)
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.index("## alpha") < md.index("## Beta")
    assert "Command: `python -m benchmarks.alpha --quick`" in md and "beta body" in md
    # Written elsewhere than a ``results`` folder, a file touches nothing else.
    _records.write_results("gamma", {}, "", results_dir=tmp_path / "other")
    assert "gamma" not in (tmp_path / "RESULTS.md").read_text()


def test_a_record_names_the_commit_of_the_code_that_ran(tmp_path, monkeypatch):
    """A long run's checkout may change before it writes: the record keeps the commit
    the process loaded, and says the checkout changed."""
    later = {"commit": "f" * 40, "dirty": False}
    monkeypatch.setattr(_records, "git_commit", lambda: later)
    path = _records.write_results("alpha", {}, "body", results_dir=tmp_path / "results")
    rec = json.loads(path.read_text())
    assert rec["git"] == _common.CODE_GIT and rec["git_at_write"] == later
    assert "the checkout changed while it ran" in (tmp_path / "RESULTS.md").read_text()


def test_write_results_never_replaces_a_users_files(tmp_path):
    """A hand-written RESULTS.md beside a ``results`` folder, a JSON file of the user's at
    a record's name, and other JSON files in the folder stay as they are."""
    rdir = tmp_path / "results"
    rdir.mkdir()
    (tmp_path / "RESULTS.md").write_text("# My notes\n")
    (rdir / "mine.json").write_text('{"name": "mine"}')
    (rdir / "alpha.json").write_text('{"my": "data"}')
    # A record of the earlier writer (no "result") is still a record and a section.
    (rdir / "old.json").write_text('{"name": "old", "markdown": "old body"}')
    with pytest.raises(FileExistsError, match="alpha.json exists and is not a benchmark record"):
        _records.write_results("alpha", {}, "", results_dir=rdir)
    _records.write_results("beta", {}, "beta body", results_dir=rdir)
    assert (tmp_path / "RESULTS.md").read_text() == "# My notes\n"
    assert (rdir / "alpha.json").read_text() == '{"my": "data"}'
    with pytest.raises(FileExistsError, match="RESULTS.md was not generated here"):
        _records.regenerate_results_md(rdir)
    (tmp_path / "RESULTS.md").unlink()
    md = _records.regenerate_results_md(rdir).read_text()
    assert "beta body" in md and "mine" not in md and "alpha" not in md and "old body" in md
    _records.write_results("old", {}, "new body", results_dir=rdir)  # replaced: a record
    # A RESULTS.md generated by the earlier writer (benchmarks/_common.py) is rebuilt.
    earlier = md.replace("benchmarks/_records.py", "benchmarks/_common.py", 1)
    assert earlier != md
    (tmp_path / "RESULTS.md").write_text(earlier)
    assert "new body" in _records.regenerate_results_md(rdir).read_text()


def test_a_journal_drops_a_cut_off_last_line_and_names_other_damage(tmp_path):
    path = tmp_path / "t.runs.jsonl"
    assert _records.read_journal(path) == []
    _records.append_journal(path, {"a": 1})
    _records.append_journal(path, {"b": float("nan")})
    with path.open("a") as f:
        f.write('{"c": 3, "hal')  # a killed append
    got = _records.read_journal(path)
    assert got[0] == {"a": 1} and np.isnan(got[1]["b"]) and len(got) == 2
    _records.append_journal(path, {"c": 3})  # starts on its own line
    assert [list(r) for r in _records.read_journal(path)] == [["a"], ["b"], ["c"]]
    path.write_text('{"a": 1}\n{damaged\n{"c": 3}\n')
    with pytest.raises(ValueError, match="t.runs.jsonl, line 2, is damaged"):
        _records.read_journal(path)


def test_training_and_spectrum_quick_path(tmp_path):
    training = importlib.import_module("benchmarks.training")
    spectrum = importlib.import_module("benchmarks.spectrum")
    rdir = tmp_path / "results"
    out = training.main(
        [
            "--quick",
            "--steps",
            "3",
            "--eval-every",
            "3",
            "--optimizers",
            "umtam",
            "--lrs",
            "1e-2",
            "--rank",
            "8",
            "--ranks",
            "8",
            "--skip-exact",
            "--no-plot",
            "--results-dir",
            str(rdir),
        ]
    )
    assert out["size"] == "quick"
    (row,) = out["summary"]
    assert row["optimizer"] == "umtam" and math.isfinite(row["final_val_loss"])
    # chosen on validation, reported on test: two different held-out losses
    assert math.isfinite(row["final_test_loss"]) and row["final_test_loss"] != row["final_val_loss"]
    assert out["data"]["test_windows"] == 16
    assert out["rank_sweep"]["rows"][0]["rank"] == 8
    assert (rdir / "training_quick.json").exists()
    assert not (rdir / "training_quick.runs.jsonl").exists()

    sp = spectrum.main(
        [
            "--quick",
            "--steps",
            "2",
            "--log-every",
            "1",
            "--rank",
            "8",
            "--ranks",
            "4,8",
            "--no-plot",
            "--results-dir",
            str(rdir),
        ]
    )
    for r in ("4", "8"):
        s = sp["summary"][r]["all_steps_and_matrices"]
        assert 0.0 < s["min"] <= s["median"] <= 1.0 + 1e-6
    # own factors at the run's rank never beat the optimal rank-8 truncation
    assert (
        sp["own_factors_captured"]["max"]
        <= sp["summary"]["8"]["all_steps_and_matrices"]["max"] + 1e-4
    )
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## training_quick" in md and "## spectrum_quick" in md


def test_step_time_only_selects_whole_names_exactly_and_substrings_otherwise():
    from benchmarks import step_time

    names = ["umtam default", "umtam default per-leaf", "umtam lean", "optax.adamw"]
    picked = [n for n in names if step_time._selected(n, ["umtam default", "adamw"], names)]
    assert picked == ["umtam default", "optax.adamw"]


def test_step_time_apply_donates_a_copy_of_the_parameters():
    import jax.numpy as jnp
    import optax

    from benchmarks import step_time

    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.full((4, 3), 0.5)}
    step, state_bytes = step_time.update_step(optax.sgd(0.1), params, grads, apply=True)
    assert state_bytes == 0
    for _ in range(3):
        step()
    # The step donates its own copy of the parameters (updated in place), not the caller's.
    assert float(params["w"][0, 0]) == 1.0
    text = step.lower().as_text()
    assert "tf.aliasing_output" in text or "jax.buffer_donor" in text


def test_update_memory_plans_the_donating_step():
    import jax.numpy as jnp
    import optax

    from benchmarks import update_memory

    params = {"w": jnp.ones((64, 32))}
    memory = update_memory.planned_memory(optax.adam(1e-3), params, {"w": jnp.ones((64, 32))})
    # gradients + parameters + Adam's two moments (and its step count)
    assert memory["arguments"] >= 4 * 64 * 32 * 4
    assert memory["temporaries"] >= 0


def test_update_memory_plans_the_whole_training_step_per_setting(monkeypatch):
    import jax

    from benchmarks import train_throughput as tt
    from benchmarks import update_memory

    # UMTAM's factored compilations cost 10-25 s each here: one dense-only case stands in.
    dense = {"min_dim_size_to_factor": 10**6, "saliency": "final"}
    monkeypatch.setattr(update_memory, "CASES", {"umtam dense": dense})
    argv = ["--quick", "--blocks", "1"]
    out = update_memory.training_step_memory(argv)
    plans = out["planned"]
    assert list(plans) == ["adamw", "umtam dense"]
    assert out["model"] == {"blocks": 1, "d_model": 64, "context": 32, "batch_size": 4}
    import optax

    import umtam_jax

    cfg = tt.model_config(tt.parse_args(argv))
    params = jax.eval_shape(lambda: tt.init_gpt(jax.random.key(0), cfg))

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    tokens = 4 * 33 * 4  # batch 4 × (context 32 + 1) int32
    for name, tx in (
        ("adamw", optax.adamw(tt.LR)),
        ("umtam dense", umtam_jax.umtam(tt.LR, **dense)),
    ):
        state = nbytes(jax.eval_shape(tx.init, params))
        # The arguments are the parameters, the state and the tokens; both of the first
        # two are donated, so the outputs alias them.
        assert plans[name]["argument"] == nbytes(params) + state + tokens
        assert plans[name]["alias"] == nbytes(params) + state


def test_step_time_records_kernel_time_and_page_faults_per_step():
    import numpy as np

    from benchmarks._timing import time_interleaved

    kept = []

    def touch_fresh_memory():
        # 64 MiB is above glibc's largest mmap threshold: always new pages, always faults.
        kept.append(np.ones(8 << 20))

    steps = {"fresh": touch_fresh_memory, "idle": lambda: None}
    timings = time_interleaved(steps, reps=3, warmup=1)
    times, first, cpu, kernel = timings.times, timings.first, timings.cpu, timings.sys
    faults = timings.faults
    assert set(first) == set(steps) and all(len(times[n]) == 3 for n in steps)
    for name in steps:
        assert all(0 <= k <= c + 1e-6 for k, c in zip(kernel[name], cpu[name], strict=True))
    assert min(faults["fresh"]) > 0
    assert max(faults["idle"]) < min(faults["fresh"])


def test_cold_start_compares_both_choices_on_the_same_runs():
    """A three-step run per variant: the extra iterations reach the step (the first
    decomposition keeps more energy with them, at most the optimal fraction; lean mode's
    loss differs) and the paired difference is the mean of the per-seed differences."""
    from benchmarks import cold_start

    result = cold_start.main(["--quick", "--seeds", "0", "--steps", "3", "--no-write",
                              "--configs", "default,lean bias-corrected"])  # fmt: skip
    first = result["default"]["captured"]["1"]
    assert first["0"] < first["4"] <= first["optimal"] + 1e-6
    lean = result["lean bias-corrected"]
    for split in ("val", "test"):  # the choice is read on validation, test reported
        by_seed = lean[f"{split}_by_seed"]
        assert by_seed["0"] != by_seed["4"]
        assert lean[f"{split}_without_minus_with"]["estimate"] == pytest.approx(
            by_seed["0"][0] - by_seed["4"][0]
        )
    assert lean["val_by_seed"] != lean["test_by_seed"]  # other windows
    assert "captured" not in lean  # no M̃ in the state without error feedback


def test_update_profile_attributes_a_traced_step_to_its_host_and_its_ops(tmp_path):
    """A real trace of a small jitted step: the host's busy time per step is within the
    wall time, and the step's own call appears among the largest entries; the interval
    union counts overlaps once (hand-computed)."""
    import jax
    import jax.numpy as jnp

    from benchmarks import update_profile

    step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    step_fn(x).block_until_ready()
    wall_ms, trace = update_profile.traced(
        lambda: step_fn(x).block_until_ready(), steps=2, trace_dir=tmp_path
    )
    summary = update_profile.summarize_trace(trace, steps=2, top=50)
    host = summary["/host:CPU"]
    # Busy time is within the traced steps' wall time, give or take the profiler's own
    # events around them.
    assert 0 < host["busy_ms"] <= 2 * wall_ms + 1.0
    names = [entry for entry, _, _ in host["top"]]
    assert any("PjitFunction(<lambda>)" in n for n in names), names
    assert all(not n.split(": ", 1)[1].startswith("$") for n in names)
    assert update_profile._union_ms([(0, 1000), (500, 2000), (3000, 3500)]) == 2.5


def test_step_time_counts_the_kernels_loops_and_conditionals_of_an_executable():
    import jax
    import jax.numpy as jnp

    from benchmarks import _hlo

    hlo = """HloModule m
%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %c = f32[4]{0} conditional(%x, %y, %z), branch_computations={%a, %b}
}
ENTRY %main (x: f32[4]) -> (f32[4], f32[4]) {
  %x = f32[4]{0} parameter(0)
  %k = f32[] constant(1)
  %f = f32[4]{0} fusion(%x, %k), kind=kLoop, calls=%g, metadata={op_name="jit(f)/add(x)"}
  %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body
  %e = f32[4]{0} get-tuple-element(%w), index=1
  %m = f32[4,4]{1,0} custom-call(%f, %e), custom_call_target="__cublas$gemm"
  ROOT %r = (f32[4]{0}, f32[4,4]{1,0}) tuple(%e, %m)
}
"""
    assert _hlo.executable_ops(hlo) == {"kernels": 3, "loops": 1, "conditionals": 1}

    def loop(x, n):
        return jax.lax.fori_loop(0, n, lambda i, y: jnp.sin(y) * 2.0, x)

    x = jnp.ones(8)
    compiled = jax.jit(loop).lower(x, 3).compile()
    ops = _hlo.executable_ops(compiled.as_text())
    assert ops["kernels"] >= 1 and ops["loops"] == 1 and ops["conditionals"] == 0


def test_protocol_script_runs_every_stage_in_order(tmp_path):
    """scripts/protocol.sh with a stand-in interpreter that records its arguments."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(stub), "ADAMW_METHODS": "ties fisher"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "protocol.sh"), "full", "W"],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        "-m benchmarks.merging --size full --workdir W --adamw-workdir W-adamw "
        "--adamw-methods ties fisher --conflict --conflict-tasks wn_defmatch kjv_section "
        "fortune_topic wn_supersense py_package --memory-modes umtam_lean umtam_bf16",
        "-m benchmarks.pruning --size full --workdir W",
        "-m umtam_jax.experiments.claims --out benchmarks/results/claims.md",
    ]
    # Each stage's options parse: stop each benchmark where its work would begin.
    from benchmarks import merging, pruning

    class Parsed(Exception):
        pass

    def stop(*args, **kwargs):
        raise Parsed

    calls = log.read_text().splitlines()
    for module, line, heavy in ((merging, calls[0], "evaluate_merges"),
                                (pruning, calls[1], "enable_compilation_cache")):  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, "enable_compilation_cache", stop)
            mp.setattr(module, heavy, stop)
            with pytest.raises(Parsed):
                module.main(line.split()[2:])


def test_run_data_splits_the_held_out_documents_between_validation_and_test():
    """Validation and test windows come from different documents, each window from one
    side of the cut (document ids encoded in the tokens), drawn per seed."""
    from benchmarks import _lm_training as lm

    lengths = (5, 40, 7, 30, 50, 9, 33, 21)
    docs = [np.array([d] * n + [0]) for d, n in enumerate(lengths, start=1)]
    held = np.concatenate(docs)
    val, test = lm.split_held_out(held)
    cut = val.size
    assert held[cut - 1] == 0 and abs(cut - held.size / 2) <= 26  # an end near the middle
    assert not (set(val.tolist()) - {0}) & set(test.tolist())
    train = np.arange(1000) % 7 + 1
    size = dataclasses.replace(lm.QUICK, context=3, steps=5)
    data = lm.lm_run_data(train, held, size, seed=0)
    assert data.batches.shape == (5, size.batch, 4)
    assert data.val.shape == (size.val_batches * size.batch, 4)
    assert data.test.shape == (size.test_batches * size.batch, 4)
    side = {int(d): int(d) in set(val.tolist()) for d in range(1, 9)}
    assert all(side[int(x)] for x in np.asarray(data.val).ravel() if x)
    assert not any(side[int(x)] for x in np.asarray(data.test).ravel() if x)
    other = lm.lm_run_data(train, held, size, seed=1)
    assert not np.array_equal(np.asarray(other.test), np.asarray(data.test))
    with pytest.raises(ValueError, match="two documents"):
        lm.split_held_out(np.array([3, 3, 0]))


def test_training_seeds_intervals_against_a_hand_computation():
    from benchmarks import training_seeds as ts

    xs = [6.1, 6.3, 5.9]
    ci = ts.t_interval(xs)
    half = 4.302652729911275 * np.std(xs, ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert ci["estimate"] == pytest.approx(6.1)
    assert (ci["low"], ci["high"]) == pytest.approx((6.1 - half, 6.1 + half))
    assert ts.t_interval([1.0])["low"] is None and ts.t_interval([])["estimate"] is None

    def record(seed, adamw, umtam, spread):
        return {"data": {"seed": seed},
                "summary": [{"optimizer": "adamw", "final_test_loss": adamw},
                            {"optimizer": "umtam", "final_test_loss": umtam}],
                "rank_sweep": {"spread": {"relative": spread, "ranks": [8, 32]}}}  # fmt: skip

    out = ts.combine([record(0, 6.0, 6.2, 0.03), record(1, 6.1, 6.2, 0.01)])
    assert out["seeds"] == [0, 1]
    assert out["optimizers"]["umtam"]["minus_adamw"]["estimate"] == pytest.approx(0.15)
    assert "minus_adamw" not in out["optimizers"]["adamw"]
    assert out["rank_spread_percent"]["estimate"] == pytest.approx(2.0)
    half = 12.706204736174707 * np.std([3.0, 1.0], ddof=1) / np.sqrt(2)
    assert out["rank_spread_percent"]["high"] == pytest.approx(2.0 + half)


def test_spectrum_seeds_combine_against_a_hand_computation_and_give_claim_6_a_verdict(
    tmp_path,
):
    from benchmarks import spectrum
    from umtam_jax.experiments import claims

    def run(seed, median, least, share):
        at32 = {"all_steps_and_matrices": {"median": median, "min": least},
                "fraction_of_matrix_steps_above_claim": share}  # fmt: skip
        at8 = {"all_steps_and_matrices": {"median": 0.5, "min": 0.4},
               "fraction_of_matrix_steps_above_claim": 0.0}  # fmt: skip
        return {"seed": seed, "summary": {"8": at8, "32": at32}}

    runs = [run(0, 0.95, 0.78, 0.8), run(1, 0.97, 0.80, 0.9), run(2, 0.96, 0.85, 1.0)]
    out = spectrum.combine_seeds(runs)
    assert out["seeds"] == [0, 1, 2] and "Student-t" in out["interval"]
    half = 4.302652729911275 * 0.01 / np.sqrt(3)  # t(0.975, 2) × sd 0.01 / √3
    check = out["claim_check"]
    assert check["rank"] == 32 and check["claimed"] == 0.82
    assert check["median"]["estimate"] == pytest.approx(0.96)
    assert (check["median"]["low"], check["median"]["high"]) == pytest.approx(
        (0.96 - half, 0.96 + half)
    )
    mins = [0.78, 0.80, 0.85]
    half_min = 4.302652729911275 * np.std(mins, ddof=1) / np.sqrt(3)
    assert check["min"]["estimate"] == pytest.approx(np.mean(mins))
    assert check["min"]["high"] == pytest.approx(np.mean(mins) + half_min)
    assert [row["median"] for row in check["by_seed"]] == [0.95, 0.97, 0.96]
    assert out["by_rank"]["32"]["share_above_claim"]["estimate"] == pytest.approx(0.9)
    assert out["by_rank"]["8"]["median"]["low"] == pytest.approx(0.5)  # no spread

    # Claim 6 reads the median's interval: 96.0 % [93.5, 98.5] lies above 82 %.
    result = {"over_seeds": out, "claim_check": {"median_all": 0.95, "min_all": 0.78},
              "matrices": {"a": [4, 4]}, "log_steps": [1, 2]}  # fmt: skip
    bdir = _recorded(tmp_path, "spectrum", result)
    energy = claims.paper_claims(None, bdir)[5]
    assert energy.claim.startswith("Rank 32 captures")
    assert (energy.estimate, energy.low, energy.high) == pytest.approx(
        (96.0, 100 * (0.96 - half), 100 * (0.96 + half))
    )
    assert energy.verdict == "reproduced" and "above 82" in energy.why
    assert "minimum 81.0 %" in energy.measurement and "seeds [0, 1, 2]" in energy.setting
    # One seed has no interval: the row falls back to the single run, inconclusive.
    result["over_seeds"] = spectrum.combine_seeds(runs[:1])
    _recorded(tmp_path, "spectrum", result)
    energy = claims.paper_claims(None, bdir)[5]
    assert energy.verdict == "inconclusive" and energy.estimate == pytest.approx(95.0)


def test_efficiency_repeats_interleave_with_a_rotating_start():
    from benchmarks import efficiency

    class Tx:
        def init(self, params):
            return 0

    def step(p, s, batch, rng):
        return p, s + 1, 0.0

    names = ["a", "adamw", "c"]
    rec = efficiency.run_repeat(1, dict.fromkeys(names, step), dict.fromkeys(names, Tx()),
                                0.0, {}, rounds=4, warmup=2)  # fmt: skip
    assert [len(rec["times_s"][n]) for n in names] == [4, 4, 4]
    # Round r of repeat i starts at optimizer (i × rounds + r) mod 3: 4 → 1, 5 → 2, 6 → 0.
    assert [order[0] for order in rec["order"]] == ["adamw", "c", "a", "adamw"]
    assert all(sorted(order) == sorted(names) for order in rec["order"])
    assert len(rec["loadavg_before"]) == len(rec["loadavg_after"]) == 3


def test_efficiency_combine_repeats_against_a_hand_computation_and_give_claim_7_a_verdict(
    tmp_path,
):
    from benchmarks import efficiency
    from umtam_jax.experiments import claims

    umtam = efficiency.CLAIM_OPTIMIZER
    # Per repeat the medians are AdamW 1.0 / 2.0 / 1.0 s and UMTAM 1.1 / 2.2 / 1.25 s.
    reps = [
        {"repeat": 0, "times_s": {"adamw": [1.0, 0.9, 1.3], umtam: [1.1, 1.0, 5.0]}},
        {"repeat": 1, "times_s": {"adamw": [2.0, 2.0, 2.0], umtam: [2.2, 2.1, 2.3]}},
        {"repeat": 2, "times_s": {"adamw": [1.0, 1.0, 1.0], umtam: [1.25, 1.25, 1.25]}},
    ]
    out = efficiency.combine_repeats(reps)
    assert out["repeats"] == [0, 1, 2] and "Student-t" in out["interval"]
    u = out["by_optimizer"][umtam]
    ratios = [1 / 1.1, 2 / 2.2, 0.8]
    assert u["median_step_s_by_repeat"] == pytest.approx([1.1, 2.2, 1.25])
    assert u["throughput_ratio_by_repeat"] == pytest.approx(ratios)
    costs = [100 * (1 - x) for x in ratios]  # 9.09, 9.09, 20.0
    half = 4.302652729911275 * np.std(costs, ddof=1) / np.sqrt(3)  # t(0.975, 2)
    c = u["cost_percent"]
    assert (c["estimate"], c["low"], c["high"], c["n"]) == pytest.approx(
        (np.mean(costs), np.mean(costs) - half, np.mean(costs) + half, 3)
    )
    r = u["throughput_ratio"]
    assert (r["low"], r["high"]) == pytest.approx((1 - c["high"] / 100, 1 - c["low"] / 100))
    assert u["time_over_reference"]["estimate"] == pytest.approx(np.mean([1.1, 1.1, 1.25]))
    a = out["by_optimizer"]["adamw"]["throughput_ratio"]
    assert a["estimate"] == a["low"] == a["high"] == 1.0
    # 12.7 % [−2.9, +28.4] covers the paper's 8.3 %: a cost judged reproduced.
    check = out["claim_check"]
    assert check["optimizer"] == umtam and check["claimed_cost_percent"] == 8.3
    assert check["verdict"] == "reproduced" and "not above the paper's 8.3" in check["why"]
    from benchmarks._efficiency_report import markdown

    md = markdown(
        {"over_repeats": out, "claim_check": check, "task": "t", "batch_size": 2,
         "max_length": 3, "repeats": 3, "rounds": 3, "warmup": 1, "cpu_count": 2,
         "load": {"by_repeat": [{"before": [1.0] * 3, "after": [2.0] * 3}] * 3,
                  "min_1min": 1.0, "max_1min": 2.0},
         "runs": {n: {"median_step_s": 1.0, "tokens_per_s": 6.0, "state_bytes": 0,
                      "state_over_params": 0.0, "state_over_adamw": 0.0}
                  for n in ("adamw", umtam)}},
        n_params=10, param_bytes=40,
    )  # fmt: skip
    assert "**reproduced**" in md and "| 2 | 1.00 → 2.00 | 1000 | 0.800 |" in md

    # Claim 7 reads the same interval from the recorded result.
    result = {"runs": {"adamw": {"median_step_s": 1.0}, umtam: {"median_step_s": 1.1}},
              "over_repeats": out, "n_params": 22.6e6, "rounds": 3, "batch_size": 32,
              "max_length": 48, "load": {"min_1min": 1.5, "max_1min": 3.9}}  # fmt: skip
    bdir = _recorded(tmp_path, "efficiency", result)
    speed = claims.paper_claims(None, bdir)[6]
    assert speed.claim.startswith("Throughput cost")
    assert (speed.estimate, speed.low, speed.high) == pytest.approx(
        (c["estimate"], c["low"], c["high"])
    )
    assert speed.verdict == "reproduced" and "mean over 3 repeats" in speed.measurement
    assert "2-core CPU" in speed.setting and "CPU instead of a GPU" in speed.setting
    # One repeat has no interval: a single run, inconclusive.
    result["over_repeats"] = efficiency.combine_repeats(reps[2:])
    _recorded(tmp_path, "efficiency", result)
    speed = claims.paper_claims(None, bdir)[6]
    assert speed.verdict == "inconclusive" and speed.estimate == pytest.approx(20.0)
    assert speed.low is None and "reads not reproduced" in speed.why


def test_train_throughput_quick_path_records_ratios_memory_and_targets(tmp_path):
    from benchmarks import train_throughput as tt
    from benchmarks._throughput_step import _size_argv

    rdir = tmp_path / "results"
    argv = ["--quick", "--results-dir", str(rdir), "--workdir", str(tmp_path / "work")]
    out = tt.main(argv)
    names = list(tt.optimizers())
    assert list(out["runs"]) == names and out["repeats"] == 2 and out["rounds"] == 2
    # --grouped adds both UMTAM settings with group_leaves (timed by the same loop; not here:
    # each costs a UMTAM compilation) and passes the option on to the memory probes.
    grouped = tt.optimizers(grouped=True)
    assert list(grouped)[:4] == names and len(grouped) == 6
    assert all(tx is not None for tx in grouped.values())
    assert "--grouped" in _size_argv(tt.parse_args([*argv, "--grouped"]))
    assert out["backend"] == "cpu" and out["memory_method"].startswith("planned")
    by = out["over_repeats"]["by_optimizer"]
    for n in names:
        run = out["runs"][n]
        assert run["tokens_per_s"] > 0 and by[n]["throughput_ratio"]["n"] == 2
        plan = run["planned_memory"]
        # Parameters and state are donated: the outputs alias them.
        assert plan["alias"] >= out["model"]["param_bytes"]
        planned = plan["argument"] + plan["output"] + plan["temp"] - plan["alias"]
        assert run["memory_bytes"] == planned
    assert out["runs"]["adamw"]["state_over_params"] == pytest.approx(2.0, abs=1e-3)
    assert out["model"]["n_params_body"] < out["model"]["n_params"]
    from benchmarks._throughput_report import TARGETED

    assert [t["optimizer"] for t in out["targets"]] == list(TARGETED)  # no memory on CPU
    assert all(r.endswith(".json") for r in out["repeat_records"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## end-to-end GPT training throughput" in md and "planned memory" in md
    # A rerun reads the repeats back: the same ratios.
    again = tt.main(argv)
    assert again["over_repeats"]["by_optimizer"] == by
    assert again["runs"]["adamw"]["planned_memory"] == out["runs"]["adamw"]["planned_memory"]
    # The GPU path's memory probe runs in a subprocess; on a CPU it reports no peak.
    probe = tt.measure_peaks(tt.parse_args(argv), ["adamw"])["adamw"]
    assert probe["peak_bytes_in_use"] is None and probe["backend"] == "cpu"
    assert probe["planned"] == out["runs"]["adamw"]["planned_memory"]


def test_train_throughput_judges_targets_on_the_interval():
    from benchmarks import _throughput_report as tt

    # At least 0.9: met if the low end meets it, not met if the high end misses it.
    assert tt.judge_target(0.92, 1.0, 0.9, at_most=False)[0] == "met"
    assert tt.judge_target(0.8, 0.89, 0.9, at_most=False)[0] == "not met"
    assert tt.judge_target(0.85, 0.95, 0.9, at_most=False)[0] == "inconclusive"
    # At most 1.35: the high end is the worse one.
    assert tt.judge_target(1.2, 1.35, 1.35, at_most=True)[0] == "met"
    assert tt.judge_target(1.4, 1.5, 1.35, at_most=True)[0] == "not met"
    assert tt.judge_target(1.3, 1.4, 1.35, at_most=True)[0] == "inconclusive"
    assert tt.judge_target(None, None, 1.35, at_most=True)[0] == "inconclusive"

    def ci(estimate, low, high):
        return {"throughput_ratio": {"estimate": estimate, "low": low, "high": high, "n": 3}}

    by = {"adamw": ci(1.0, 1.0, 1.0), tt.UMTAM_DEFAULT: ci(0.93, 0.91, 0.95),
          tt.UMTAM_LEAN: ci(0.9, 0.85, 0.95)}  # fmt: skip
    rows = tt.check_targets(by, None)
    assert [(r["optimizer"], r["verdict"]) for r in rows] == [
        (tt.UMTAM_DEFAULT, "met"),  # 0.91 ≥ 1/1.1 = 0.909
        (tt.UMTAM_LEAN, "inconclusive"),
    ]
    rows = tt.check_targets(by, {"adamw": 1.0, tt.UMTAM_DEFAULT: 1.5, tt.UMTAM_LEAN: 1.1})
    assert [(r["quantity"], r["verdict"]) for r in rows] == [
        ("tokens/s ratio", "met"),
        ("peak memory ratio", "not met"),
        ("tokens/s ratio", "inconclusive"),
        ("peak memory ratio", "met"),
    ]


def test_merging_runs_the_adamw_pipeline_with_the_chosen_methods(tmp_path, monkeypatch):
    """``--adamw-methods`` reaches the AdamW evaluation as its methods (not its tasks);
    ``--memory-modes`` evaluates each mode's experts in its own work directory."""
    from benchmarks import merging

    class Stop(Exception):
        pass

    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        if len(calls) == 3:
            raise Stop

    monkeypatch.setattr(merging, "enable_compilation_cache", lambda path: None)
    monkeypatch.setattr(merging, "evaluate_merges", record)
    with pytest.raises(Stop):
        merging.main(["--quick", "--workdir", str(tmp_path / "u"),
                      "--adamw-workdir", str(tmp_path / "a"), "--adamw-methods", "ties",
                      "fisher", "--memory-modes", "umtam_lean"])  # fmt: skip
    umtam, adamw, lean = calls
    assert "methods" not in umtam and umtam["workdir"] == tmp_path / "u"
    assert adamw["methods"] == ["ties", "fisher"] and "tasks" not in adamw
    assert adamw["experts_by"] == "adamw" and adamw["workdir"] == tmp_path / "a"
    assert lean["experts_by"] == "umtam_lean" and lean["workdir"] == tmp_path / "u-umtam_lean"
    assert lean["methods"] == merging.MEMORY_METHODS


def test_recorded_run_reads_a_matching_record_back_and_reruns_otherwise(tmp_path):
    calls = []

    def run():
        calls.append(1)
        return {"value": len(calls)}

    path = tmp_path / "parts" / "x_seed0.json"
    first = _records.recorded_run("[x] seed 0", {"seed": 0}, path, False, run, title="x", env={})
    assert {k: v for k, v in first.items() if k != "git"} == {"signature": {"seed": 0}, "value": 1}
    assert first["git"] == _common.CODE_GIT and path.exists()
    again = _records.recorded_run("[x] seed 0", {"seed": 0}, path, False, run, title="x", env={})
    assert again == first and len(calls) == 1  # read back, not run
    # A part read back names the commit that measured it, and a summary every commit.
    record = json.loads(path.read_text())
    record["git"] = {"commit": "0" * 40, "dirty": False}
    path.write_text(json.dumps(record))
    older = _records.recorded_run("[x] seed 0", {"seed": 0}, path, False, run, title="x", env={})
    assert older["git"]["commit"] == "0" * 40
    if first["git"]["commit"]:  # a git checkout
        assert _records.commits_of([older, first]) == sorted(["0" * 40, first["git"]["commit"]])
    section = _records._section({"result": {"part_commits": ["a" * 40, "b" * 40]}}, "x")
    assert "its parts measured at commits aaaaaaaaaa, bbbbbbbbbb" in section
    other = _records.recorded_run("[x] seed 0", {"seed": 1}, path, False, run, title="x", env={})
    assert other["value"] == 2  # another signature: run again
    fresh = _records.recorded_run("[x] seed 0", {"seed": 1}, path, True, run, title="x", env={})
    assert fresh["value"] == 3
    path.write_text("{not json")
    assert (
        _records.recorded_run("[x]", {"seed": 1}, path, False, run, title="x", env={})["value"] == 4
    )


def test_gpu_checks_script_names_its_parts(tmp_path):
    """scripts/gpu_checks.sh (the prepared GPU run) refuses an unknown part by name; its
    parts were dry-run on this CPU with ``--quick`` (they call the benchmarks above)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_checks.sh", "bogus"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "unknown part 'bogus'" in proc.stderr
    script = (ROOT / "scripts" / "gpu_checks.sh").read_text()
    assert "benchmarks.train_throughput --repeats" in script
    assert "benchmarks.update_ablation" in script
    assert "benchmarks.update_profile" in script and "xla_gpu_enable_command_buffer=" in script
    assert "    diagnose)" in script
    assert "benchmarks.step_time --apply --scanned --blocks 12" in script
