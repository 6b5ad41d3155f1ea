"""Smoke tests of the benchmark scripts' --quick code path (tiny sizes) and the report helper."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
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


def test_profile_step_device_summary_counts_launches_copies_and_busy_time():
    from types import SimpleNamespace as Node

    profile_step = _bench_module("profile_step")

    def event(name, start, stop):
        return Node(name=name, start_ns=start, end_ns=stop, duration_ns=stop - start)

    # Two steps on one GPU stream: overlapping kernels count once towards busy time; the
    # XLA op line (host-side annotations) and the host plane are not device work.
    stream = [
        event("gemm", 0, 100_000),
        event("fusion", 50_000, 200_000),
        event("MemcpyDtoH", 300_000, 310_000),
        event("gemm", 1_000_000, 1_100_000),
        event("fusion", 1_100_000, 1_250_000),
        event("MemcpyDtoH", 1_300_000, 1_310_000),
    ]
    data = Node(
        planes=[
            Node(
                name="/device:GPU:0",
                lines=[
                    Node(name="Stream #14(Compute,MemcpyD2H)", events=stream),
                    Node(name="XLA Ops", events=[event("fusion", 0, 10_000_000)]),
                ],
            ),
            Node(name="/host:CPU", lines=[Node(name="python3", events=stream)]),
        ]
    )
    summary = profile_step.device_summary(data, steps=2, wall_ms=1.0)
    first = summary.splitlines()[0]
    # Busy per step: (200 + 10 + 100 + 150 + 10) µs / 2 = 0.235 ms.
    assert first.startswith("device busy 0.23 ms of 1.00 ms wall per update")
    assert "3 kernels/copies per update, 1 device-to-host copies" in first
    assert "| `fusion` | 1.0 | 0.150 |" in summary  # (150 + 150) µs over 2 steps


def test_step_time_only_selects_whole_names_exactly_and_substrings_otherwise():
    step_time = _bench_module("step_time")
    names = ["umtam default", "umtam default per-leaf", "umtam lean", "optax.adamw"]
    picked = [n for n in names if step_time._selected(n, ["umtam default", "adamw"], names)]
    assert picked == ["umtam default", "optax.adamw"]


def test_step_time_apply_donates_a_copy_of_the_parameters():
    import jax.numpy as jnp
    import optax

    step_time = _bench_module("step_time")
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.full((4, 3), 0.5)}
    step, state_bytes = step_time._update_step(optax.sgd(0.1), params, grads, apply=True)
    assert state_bytes == 0
    for _ in range(3):
        step()
    # The step donates its own copy of the parameters (updated in place), not the caller's.
    assert float(params["w"][0, 0]) == 1.0
    text = step.lower().as_text()
    assert "tf.aliasing_output" in text or "jax.buffer_donor" in text


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
