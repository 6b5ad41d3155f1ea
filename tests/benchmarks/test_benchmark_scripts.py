"""Smoke tests of the benchmark scripts' --quick code path (tiny sizes) and the report helper."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        yield {m: importlib.import_module(m) for m in ("_report", "training", "spectrum")}
    finally:
        sys.path.remove(str(BENCH))


def test_write_result_regenerates_all_sections(tmp_path, bench_modules):
    report = bench_modules["_report"]
    rdir = tmp_path / "results"
    report.write_result(
        "alpha",
        {"x": float("nan"), "y": [1, 2]},
        "| a |\n|---|\n| 1 |",
        results_dir=rdir,
        command="python alpha.py --quick",
    )
    report.write_result("beta", {"z": 3}, "beta body", results_dir=rdir)
    rec = json.loads((rdir / "alpha.json").read_text())
    assert rec["result"] == {"x": None, "y": [1, 2]}
    assert rec["command"] == "python alpha.py --quick"
    assert {"jax", "optax", "cpu", "loadavg_1_5_15min"} <= set(rec["environment"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.index("## alpha") < md.index("## beta")
    assert "Command: `python alpha.py --quick`" in md and "beta body" in md


def test_training_and_spectrum_quick_path(tmp_path, bench_modules):
    training, spectrum = bench_modules["training"], bench_modules["spectrum"]
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


def _bench_module(name: str):
    """A module of ``benchmarks/`` (which import each other by plain name)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_profile_step_classifies_products_passes_and_reductions():
    import jax
    import jax.numpy as jnp

    profile_step = _bench_module("profile_step")

    def step(g, u, v, w, s):
        sketch = g @ v  # m×r
        projection = u.T @ g  # r×n
        expansion = u @ v.T  # m×n
        pass3 = 0.9 * s + (w - g) ** 2  # reads three m×n arrays
        return sketch, projection, expansion * 2.0, pass3, jnp.sum(g * g, axis=1)

    m, n, r = 96, 80, 4
    args = [
        jnp.ones((m, n)),
        jnp.ones((m, r)),
        jnp.ones((n, r)),
        jnp.ones((m, n)),
        jnp.ones((m, n)),
    ]
    hlo = jax.jit(step).lower(*args).compile().as_text()
    labels = set(profile_step.classify(hlo, rank=8).values())
    assert {
        "product → m×r (sketch, thin)",
        "product → r×n (projection)",
        "product → m×n (expansion)",
        "elementwise m×n pass reading 3 m×n array(s)",
        "reduction",
    } <= labels


def test_step_time_records_kernel_time_and_page_faults_per_step():
    import numpy as np

    step_time = _bench_module("step_time")
    kept = []

    def touch_fresh_memory():
        # 64 MiB is above glibc's largest mmap threshold: always new pages, always faults.
        kept.append(np.ones(8 << 20))

    steps = {"fresh": touch_fresh_memory, "idle": lambda: None}
    times, first = step_time.time_interleaved(steps, reps=3, warmup=1)
    cpu, kernel = step_time.time_interleaved.cpu, step_time.time_interleaved.sys
    faults = step_time.time_interleaved.faults
    assert set(first) == set(steps) and all(len(times[n]) == 3 for n in steps)
    for name in steps:
        assert all(0 <= k <= c + 1e-6 for k, c in zip(kernel[name], cpu[name], strict=True))
    assert min(faults["fresh"]) > 0
    assert max(faults["idle"]) < min(faults["fresh"])


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="needs a C++ compiler")
def test_fused_kernel_design_study_matches_the_float64_reference(tmp_path):
    """benchmarks/design_fused_kernels: every custom call equals its NumPy formula (to
    float32 rounding) on shapes with ragged row, column and rank tails."""
    path = BENCH / "design_fused_kernels" / "run.py"
    spec = importlib.util.spec_from_file_location("design_fused_kernels_run", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    if not study.cpu_supported():
        pytest.skip("the design study's kernels need AVX-512 (F, DQ) and FMA")
    study.register(study.build(tmp_path / "kernels.so"))
    kernels = study.kernels()
    assert len(kernels) == len(study.NAMES)
    for name, (fused, _, reference, make_inputs, _) in kernels.items():
        assert study.check(name, fused, reference, make_inputs) <= 1e-5
