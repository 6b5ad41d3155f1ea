"""The claims table: verdicts on hand-made intervals, merging rows from a protocol-format
work directory or a ready table, missing files, Markdown and the command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from umtam_jax.experiments import claims, store, verdicts
from umtam_jax.experiments.comparison import MergeTable, summarize

TASKS = ("t_a", "t_b")


@pytest.mark.parametrize(
    ("low", "high", "claimed", "kind", "verdict"),
    [
        (2.0, 20.0, 14.9, "effect", "reproduced"),  # excludes 0, covers the claim
        (16.0, 30.0, 14.9, "effect", "reproduced"),  # exceeds the claim
        (0.5, 3.0, None, "effect", "reproduced"),  # direction only
        (1.0, 5.0, 14.9, "effect", "not reproduced"),  # right direction, too small
        (-3.0, 1.0, 1.6, "effect", "not reproduced"),  # covers 0 but excludes the claim
        (-5.0, -1.0, 1.6, "effect", "not reproduced"),  # other direction
        (-1.0, 3.0, 1.6, "effect", "inconclusive"),  # covers 0 and the claim
        (-1.0, 3.0, None, "effect", "inconclusive"),
        (6.0, 10.0, 8.3, "cost", "inconclusive"),  # covers the paper's cost
        (-1.2, 11.0, 8.3, "cost", "inconclusive"),  # a wide interval proves nothing
        (1.0, 5.0, 8.3, "cost", "reproduced"),  # cheaper
        (10.0, 13.2, 8.3, "cost", "not reproduced"),  # dearer
        (90.0, 97.0, 82.0, "at_least", "reproduced"),
        (79.0, 90.0, 82.0, "at_least", "inconclusive"),
        (60.0, 80.0, 82.0, "at_least", "not reproduced"),
        (0.01, 0.04, 0.05, "at_most", "reproduced"),
        (0.01, 0.2, 0.05, "at_most", "inconclusive"),
        (2.0, 4.0, 0.05, "at_most", "not reproduced"),
    ],
)
def test_judge_on_hand_made_intervals(low, high, claimed, kind, verdict):
    got, why = verdicts.judge(low, high, claimed, kind)
    assert got == verdict, why
    assert why


def test_judge_without_an_interval_is_inconclusive_and_says_why():
    verdict, why = verdicts.judge(None, None, 82.0, "at_least", estimate=96.8)
    assert verdict == "inconclusive"
    assert why.startswith("single run, no interval") and "reads reproduced" in why
    assert verdicts.judge(None, None, 1.6) == ("inconclusive", "single run, no interval")
    with pytest.raises(ValueError, match="unknown kind"):
        verdicts.judge(0.0, 1.0, 1.0, "roughly")
    for kind in ("cost", "at_least", "at_most"):  # a TypeError comparing with None before
        with pytest.raises(ValueError, match=f"'{kind}' claim needs its claimed value"):
            verdicts.judge(1.0, 2.0, None, kind)
    assert verdicts.judge(1.0, 2.0, None)[0] == "reproduced"  # an effect needs no size


# ----------------------------------------------------------------------------- merging


def _protocol_workdir(root: Path, *, seeds=(0, 1), accuracy=None, skip=()) -> Path:
    """A protocol-format work directory: results.json, test labels and predictions."""
    accuracy = accuracy or {"umtam": 0.85, "linear": 0.55, "ties": 0.83}
    rng = np.random.default_rng(0)
    results = {
        "protocol": {
            "size": "tiny",
            "tasks": list(TASKS),
            "seeds": list(seeds),
            "methods": list(accuracy),
            "config": {"max_test": 400},
            "metrics": {t: {"metric": "accuracy", "num_labels": 2} for t in TASKS},
        },
        "experts": {},
        "runs": {m: {} for m in accuracy},
        "labels": {},
    }
    for s in seeds:
        labels = {t: rng.integers(0, 2, 400) for t in TASKS}
        store.write_npz(root / "labels" / f"seed{s}.npz", labels)
        results["labels"][str(s)] = f"labels/seed{s}.npz"
        results["experts"][str(s)] = {t: {"test": 0.9} for t in TASKS}
        for m, acc in accuracy.items():
            if (m, s) in skip:
                continue
            wrong = {t: rng.random(400) > acc for t in TASKS}
            preds = {t: np.where(wrong[t], 1 - labels[t], labels[t]) for t in TASKS}
            store.write_npz(root / "runs" / f"{m}-{s}.npz", preds)
            results["runs"][m][str(s)] = {
                "name": m.upper(), "predictions": f"runs/{m}-{s}.npz", "validation_norm": 0.9,
                "budget": 1, "evaluations": 1, "open_edges": [], "merge_seconds": 0.1,
                "hparams": {},
            }  # fmt: skip
    store.write_json(root / "results.json", results)
    return root / "results.json"


def test_merging_rows_from_a_protocol_work_directory(tmp_path):
    path = _protocol_workdir(tmp_path)
    rows = claims.paper_claims(path, tmp_path / "no-benchmarks", samples=200)
    table = summarize(tmp_path, methods=["umtam", "linear", "ties"],
                      references=("linear", "ties"), samples=200)  # fmt: skip
    umtam = table.row("umtam")
    for row, ref in zip(rows[:2], ("linear", "ties"), strict=True):
        base = table.row(ref)["score"]
        assert row.estimate == pytest.approx(100 * umtam[f"vs_{ref}"] / base)
        assert row.low == pytest.approx(100 * umtam[f"vs_{ref}_low"] / base)
        assert row.high == pytest.approx(100 * umtam[f"vs_{ref}_high"] / base)
        assert row.low <= row.estimate <= row.high
        assert "2 of 2 seeds" in row.setting and "≤ 400 test" in row.setting
        assert row.verdict in verdicts.VERDICTS
    # UMTAM ~0.94 vs Linear ~0.61 normalized: +50 % or so; two seeds give a wide Student-t
    # interval (t = 12.7), above 0 and reaching +14.9 %.
    assert 0 < rows[0].low < 14.9 < rows[0].high and rows[0].verdict == "reproduced"


def test_merging_rows_from_a_ready_table_with_either_orientation(tmp_path):
    table = MergeTable(
        [
            {"method": "umtam", "score": 0.80, "vs_linear": 0.10, "vs_linear_low": 0.06,
             "vs_linear_high": 0.14, "vs_ties": None},
            {"method": "linear", "score": 0.70},
            {"method": "ties", "score": 0.79, "vs_umtam": -0.01, "vs_umtam_low": -0.03,
             "vs_umtam_high": 0.02},
        ],
        references=("linear",), seeds=(0, 1, 2), tasks=TASKS,
    )  # fmt: skip
    linear, ties = claims.paper_claims(table, "missing-dir")[:2]
    assert (linear.estimate, linear.low, linear.high) == pytest.approx(
        (100 * 0.10 / 0.70, 100 * 0.06 / 0.70, 100 * 0.14 / 0.70)
    )
    assert linear.verdict == "reproduced" and "[+8.6, +20.0]" in linear.measurement
    # UMTAM − TIES from the TIES row's "vs umtam", sign and ends flipped.
    assert (ties.estimate, ties.low, ties.high) == pytest.approx(
        (100 * 0.01 / 0.79, -100 * 0.02 / 0.79, 100 * 0.03 / 0.79)
    )
    assert ties.verdict == "inconclusive" and ties.why == "the interval covers 0"
    assert "3 seeds" in ties.setting
    # The same table as the merging benchmark records it is read when no run is given.
    proto = {"size": "medium", "seeds": [0, 1, 2], "tasks": list(TASKS),
             "config": {"max_test": 1000}}  # fmt: skip
    bdir = tmp_path / "b"
    bdir.mkdir()
    (bdir / "merging.json").write_text(
        _record({"table": dataclasses.asdict(table), "protocol": proto})
    )
    recorded = claims.paper_claims(None, bdir)[:2]
    assert [(r.estimate, r.low, r.high) for r in recorded] == [
        (r.estimate, r.low, r.high) for r in (linear, ties)
    ]
    assert recorded[0].source == "`merging.json` (2026-01-02)"
    assert "3 of 3 seeds" in recorded[0].setting and "≤ 1000 test" in recorded[0].setting


def test_unfinished_or_missing_protocol_results_give_no_numbers(tmp_path):
    path = _protocol_workdir(tmp_path, skip={("umtam", 0), ("ties", 1)})
    for source, text in [
        (path, "protocol run in progress"),
        (tmp_path / "nowhere" / "results.json", "no protocol results yet"),
        (None, "no protocol table in `merging.json` (missing)"),
    ]:
        for row in claims.paper_claims(source, tmp_path)[:2]:
            assert row.verdict == "inconclusive" and row.why == "no data yet"
            assert text in row.measurement and row.estimate is None
    # A seed where all three finished is summarized on its own.
    path = _protocol_workdir(tmp_path / "one", skip={("umtam", 1)})
    row = claims.paper_claims(path, tmp_path, samples=100)[0]
    assert "1 of 2 seeds" in row.setting and row.low is not None


# ----------------------------------------------------------------------------- benchmarks


def _record(result: dict) -> str:
    env = {"cpu": {"affinity": 2}, "backend": "cpu"}
    return json.dumps({"date": "2026-01-02T00:00:00", "environment": env, "result": result})


def _benchmarks(root: Path) -> Path:
    root.mkdir()

    def ci(est, low, high):
        return {"estimate": est, "low": low, "high": high, "level": 0.95}

    mean = {
        "0.01": {"magnitude": ci(0.5, 0.4, 0.6), "difference": ci(0.2, 0.1, 0.3)},
        "0.1": {"magnitude": ci(0.8, 0.7, 0.9), "difference": ci(0.01, -0.02, 0.04)},
    }
    per_task = {"a": {"0.01": {"relative": ci(100.0, 50.0, 150.0)}},
                "b": {"0.01": {"relative": ci(14.0, -3.0, 30.0)}}}  # fmt: skip
    summary = {"mean": mean, "per_task": per_task,
               "counts": {"better": 1, "tied": 2, "worse": 1}}  # fmt: skip
    (root / "pruning.json").write_text(_record({
        "size": "medium", "seeds": [0, 1, 2], "tasks": ["a", "b"], "densities": [0.1, 0.01],
        "summary": summary,
    }))  # fmt: skip
    spread = {"min": 6.0, "max": 6.003, "relative": 0.0005, "ranks": [8, 32]}
    (root / "training.json").write_text(_record({"rank_sweep": {"spread": spread}}))
    check = {"median_all": 0.968, "min_all": 0.789}
    (root / "spectrum.json").write_text(_record({"claim_check": check, "matrices": [1, 2]}))
    umtam = "umtam (defaults, svd_every=1)"
    runs = {"adamw": {"median_step_s": 1.0}, umtam: {"median_step_s": 1.25}}
    cost = {"estimate": 20.0, "low": 15.0, "high": 25.0, "n": 3}
    ratio = {"estimate": 0.8, "low": 0.75, "high": 0.85, "n": 3}
    by = {umtam: {"cost_percent": cost, "cost_percent_by_repeat": [15.0, 20.0, 25.0],
                  "throughput_ratio": ratio}}  # fmt: skip
    load = {"min_1min": 1.2, "max_1min": 2.6}
    (root / "efficiency.json").write_text(_record({
        "runs": runs, "n_params": 22.6e6, "rounds": 5, "batch_size": 32, "max_length": 48,
        "over_repeats": {"by_optimizer": by}, "load": load,
    }))  # fmt: skip
    return root


def test_benchmark_rows_read_the_recorded_results(tmp_path):
    rows = {r.claim: r for r in claims.paper_claims(None, _benchmarks(tmp_path / "b"))}
    every, best, rank, energy, speed = list(rows.values())[2:]
    # The weakest density (lowest lower end) is 10 %: +1.25 % [-2.5, +5.0], covering 0.
    assert (every.estimate, every.low, every.high) == pytest.approx((1.25, -2.5, 5.0))
    assert every.verdict == "inconclusive" and "weakest 10 %" in every.measurement
    assert "worse in 1 of 4" in every.measurement and "3 seeds" in every.setting
    # The best task at 1 %: +100 % [+50, +150] reaches the paper's +134.7 %.
    assert (best.estimate, best.low, best.high) == (100.0, 50.0, 150.0)
    assert best.verdict == "reproduced" and "a at 1 %" in best.measurement
    assert rank.estimate == pytest.approx(0.05) and "0.05 %" in rank.measurement
    assert energy.estimate == pytest.approx(96.8) and "min 78.9 %" in energy.measurement
    for row in (rank, energy):  # single runs: no interval, no verdict
        assert row.verdict == "inconclusive" and row.why.startswith("single run, no interval")
        assert row.low is None and "2-core CPU" in row.setting
    # The cost's interval over repeats, 20 % [15, 25], lies above the paper's 8.3 %.
    assert (speed.estimate, speed.low, speed.high) == (20.0, 15.0, 25.0)
    assert speed.verdict == "not reproduced" and speed.source == "`efficiency.json` (2026-01-02)"
    assert "3 repeats of 5 interleaved rounds" in speed.measurement
    assert "by repeat 15.0 / 20.0 / 25.0 %" in speed.measurement
    assert "0.800 [0.750, 0.850]" in speed.measurement
    assert "CPU instead of a GPU" in speed.setting and "load 1.2–2.6" in speed.setting


def test_throughput_row_of_one_session_has_no_interval(tmp_path):
    """A record without repeats (rounds of one process) reads as a single run."""
    bdir = _benchmarks(tmp_path / "b")
    adamw = [1.0, 1.1, 0.9, 1.0, 1.05] * 3
    runs = {"adamw": {"times_s": adamw},
            "umtam (defaults, svd_every=1)": {"times_s": [1.25 * t for t in adamw]},
            "umtam (demo, svd_every=10)": {"times_s": [1.1 * t for t in adamw]}}  # fmt: skip
    (bdir / "efficiency.json").write_text(_record({"runs": runs, "n_params": 22.6e6}))
    speed = claims.paper_claims(None, bdir)[6]
    # Every round of UMTAM takes 1.25× AdamW's: a cost of 20 %, but from one session.
    assert speed.estimate == pytest.approx(20.0) and speed.low is None
    assert speed.verdict == "inconclusive" and speed.why.startswith("single run, no interval")
    assert "reads not reproduced" in speed.why
    assert "one session" in speed.measurement and "svd_every=10): 9.1 %" in speed.measurement


def test_throughput_row_reads_the_gpu_runs_it_finds(tmp_path):
    """GPU end-to-end repeats beside the CPU record (the paper's setting): their cost over
    repeats with a Student-t interval, each repeat 100 × (1 − AdamW's median step time ÷
    UMTAM's), the devices, models, batches and commits they record; the verdict reads
    them, the CPU record's own verdict is stated beside."""
    bdir = _benchmarks(tmp_path / "b")
    record = json.loads((bdir / "efficiency.json").read_text())
    by = record["result"]["over_repeats"]["by_optimizer"]["umtam (defaults, svd_every=1)"]
    by["cost_percent"] = {"estimate": 5.0, "low": -1.0, "high": 11.0, "n": 3}  # covers 8.3
    (bdir / "efficiency.json").write_text(json.dumps(record))
    assert claims.paper_claims(None, bdir)[6].verdict == "inconclusive"
    gpu = bdir / "train_throughput_gpu_repeats"
    gpu.mkdir()
    model = {"context": 256, "d_model": 768, "blocks": 12}
    for i, (device, slower) in enumerate([("H200", 2.0), ("H200", 4.0), ("H200", 4.0)]):
        times = {"adamw": [1.0, 1.2, 0.8], "umtam (defaults)": [slower, slower, slower]}
        result = {"times_s": times, "signature": {"model": model, "batch_size": 4}}
        git = {"commit": f"{i}abcdef99", "dirty": i == 2}  # the last ran with local changes
        record = {"environment": {"device_kind": device}, "git": git, "result": result}
        (gpu / f"repeat{i}.json").write_text(json.dumps(record))
        speed = claims.paper_claims(None, bdir)[6]
        if i == 0:  # one repeat gives no interval: the CPU record alone
            assert "GPU runs" not in speed.measurement and speed.verdict == "inconclusive"
    # Costs 50, 75, 75 %: mean 66.7, half-width t(0.975, 2) · s / √3.
    costs = np.array([50.0, 75.0, 75.0])
    half = scipy.stats.t.ppf(0.975, 2) * costs.std(ddof=1) / np.sqrt(3)
    assert (speed.estimate, speed.low, speed.high) == pytest.approx(
        (costs.mean(), costs.mean() - half, costs.mean() + half)
    )
    assert "66.7 [30.8, 102.5] %" in speed.measurement
    assert "batch 4 × 256, commit 0abcdef, 1abcdef, 2abcdef with local changes" in (
        speed.measurement
    )
    assert speed.setting.startswith("the GPU runs: H200, GPT 12 × 768, batch 4 × 256")
    assert "CPU (inconclusive on its own): 5.0 [-1.0, 11.0] %" in speed.measurement
    assert speed.verdict == "not reproduced"  # from the GPU runs
    assert "train_throughput_gpu_repeats" in speed.source
    # Repeats of different settings (another device) describe no one setting: not pooled.
    record = json.loads((gpu / "repeat2.json").read_text())
    record["environment"]["device_kind"] = "H100"
    (gpu / "repeat2.json").write_text(json.dumps(record))
    speed = claims.paper_claims(None, bdir)[6]
    assert "GPU runs" not in speed.measurement and speed.verdict == "inconclusive"


def test_missing_benchmark_files_give_no_data_rows(tmp_path):
    rows = claims.paper_claims(None, tmp_path)
    assert len(rows) == 7
    for row in rows:
        assert row.verdict == "inconclusive" and row.why == "no data yet"
        assert row.measurement.startswith("no data") and row.estimate is None
    assert "`pruning.json` (missing)" in rows[2].measurement


def test_markdown_and_the_command_line(tmp_path):
    bench = _benchmarks(tmp_path / "b")
    text = claims.to_markdown(claims.paper_claims(None, bench))
    lines = text.splitlines()
    assert lines[0] == "# Paper claims beside our measurements"
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 7 and table[1] == "|" + "---|" * 7
    assert all(line.count(" | ") == 6 for line in table[:1] + table[2:])
    assert "**not reproduced**" in text and "Summary: 1 reproduced, 1 not reproduced" in text
    out = tmp_path / "out" / "claims.md"
    assert claims.main(["--benchmarks", str(bench), "--out", str(out)]) == 0
    assert out.read_text() == text + "\n"
    assert [p.name for p in out.parent.iterdir()] == ["claims.md"]  # no temporary file left


def test_rank_row_prefers_the_seeded_training_runs(tmp_path):
    bdir = _benchmarks(tmp_path / "b")
    spread = {"estimate": 2.0, "low": 0.5, "high": 3.5, "n": 3}
    (bdir / "training_seeds.json").write_text(_record({
        "seeds": [0, 1, 2], "rank_spread_percent": spread,
        "rank_spread_by_seed": [{"ranks": [8, 32]}],
    }))  # fmt: skip
    rank = claims.paper_claims(None, bdir)[4]
    assert (rank.estimate, rank.low, rank.high) == (2.0, 0.5, 3.5)
    assert rank.verdict == "not reproduced" and "3 seeds" in rank.measurement
    assert rank.source == "`training_seeds.json` (2026-01-02)"
