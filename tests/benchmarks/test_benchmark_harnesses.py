"""The timing, memory and profiling harnesses of the benchmarks: step_time's selection of
optimizers, its donating step, kernel time and page faults per step and the op counts of
an executable; update_memory's planned memory; update_profile's trace summary;
efficiency's interleaved repeats; train_throughput's quick path and targets judged on the
interval."""

from __future__ import annotations

import pytest


def test_step_time_only_selects_whole_names_exactly_and_substrings_otherwise():
    from benchmarks import step_time

    names = ["umtam default", "umtam default per-leaf", "umtam lean", "optax.adamw"]
    picked = [n for n in names if step_time._selected(n, ["umtam default", "adamw"], names)]
    assert picked == ["umtam default", "optax.adamw"]
    # An entry that selects nothing (a renamed optimizer) is refused, naming it.
    with pytest.raises(SystemExit, match=r"--only \['umtam lean per-leaf'\] selects no"):
        step_time.run(4, reps=7, warmup=0, exact=False, extra=False,
                      only=["umtam default", "umtam lean per-leaf"])  # fmt: skip


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


def test_merge_overhead_times_each_row_on_both_models_and_restores_the_select(
    tmp_path, monkeypatch
):
    from benchmarks import merge_overhead
    from umtam_jax.merging import _select

    narrow_up_to = _select._NARROW_DIGITS_UP_TO
    seen = []

    def fake_merge(folders, out, row):  # which model, row and digit setting each time ran
        seen.append((folders[0].parent.name, row, _select._NARROW_DIGITS_UP_TO))
        return 1.0 if folders[0].parent.name == "many" else 0.5

    monkeypatch.setattr(merge_overhead, "time_merge", fake_merge)
    result = merge_overhead.run(4, 3, 2, str(tmp_path))
    rows = list(merge_overhead.ROWS)
    assert [r["row"] for r in result["rows"]] == rows
    assert len(seen) == len(rows) * 3 * 2  # a warm-up and 2 repeats, each on both models
    assert {model for model, _, _ in seen} == {"many", "few"}
    for _, row, narrow in seen:
        assert narrow == (0 if row == "ties, 16-bit digits only" else narrow_up_to), row
    for r in result["rows"]:
        assert r["many_s"] == [1.0, 1.0] and r["few_s"] == [0.5, 0.5]  # warm-ups dropped
        assert r["ms_per_tensor"] == 1e3 * 0.5 / 4
    assert narrow_up_to == _select._NARROW_DIGITS_UP_TO
    assert list(tmp_path.iterdir()) == []  # the models were temporary
