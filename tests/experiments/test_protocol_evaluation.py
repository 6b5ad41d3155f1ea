"""The evaluation protocol at its tiny size, end to end: intervals and verdicts, equal
budgets, resume after an interruption, damaged records, and the pruning, conflict and
pipeline studies that reuse its experts (all on one module-scoped run)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.experiments.protocol_helpers import TASKS, protocol_setup
from umtam_jax import experiments as E
from umtam_jax.experiments import data as data_lib
from umtam_jax.experiments import experts as experts_lib
from umtam_jax.experiments import protocol, seed_run, spaces, store

METHODS = ("umtam", "task_arithmetic", "regmean", "emr", "tall_masks")


class _Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    yield from protocol_setup(tmp_path_factory)


def _evaluate(setup, **kwargs):
    tokenizer, base, workdir = setup
    with pytest.MonkeyPatch.context() as mp:
        train = _Counter(experts_lib.finetune)
        pred = _Counter(seed_run.predict)
        mp.setattr(experts_lib, "finetune", train)
        mp.setattr(seed_run, "predict", pred)
        table = E.evaluate_merges(
            TASKS,
            METHODS,
            (0, 1),
            size="tiny",
            workdir=workdir,
            base_encoder=base,
            tokenizer=tokenizer,
            log=None,
            **kwargs,
        )
    return table, train.calls, pred.calls


@pytest.fixture(scope="module")
def first(setup):
    return _evaluate(setup)


def test_rows_have_intervals_and_verdicts(first):
    table, trained, predicted = first
    assert trained == 2 * len(TASKS) and predicted > 0
    assert [r["method"] for r in table.rows] == list(METHODS)
    assert table.references == ("umtam", "task_arithmetic") and table.seeds == (0, 1)
    for r in table.rows:
        assert r["low"] <= r["score"] <= r["high"], r
        for ref in table.references:
            if ref == r["method"]:
                assert r[f"vs_{ref}"] is None
            else:
                assert r[f"vs_{ref}_low"] <= r[f"vs_{ref}"] <= r[f"vs_{ref}_high"]
                assert r[f"vs_{ref}_verdict"] in ("better", "worse", "tied")
    text = table.to_markdown()
    assert "Δ vs UMTAM" in text and "TALL masks" in text and "EMR" in text


def test_budgets_are_equal_and_everything_is_recorded(first, setup):
    table, _, _ = first
    budget = protocol.SIZES["tiny"].budget
    rows = {r["method"]: r for r in table.rows}
    for m in ("umtam", "task_arithmetic", "regmean", "tall_masks"):
        assert rows[m]["budget"] == budget and rows[m]["evaluations"] == budget, m
    assert rows["emr"]["budget"] == rows["emr"]["evaluations"] == 1
    results = store.read_json(setup[2] / "results.json")
    assert set(results["protocol"]["excluded"]) == set(spaces.EXCLUDED)
    for seed in ("0", "1"):
        assert set(results["experts"][seed]) == set(TASKS)
        for t in TASKS:
            e = results["experts"][seed][t]
            assert e["best_step"] <= e["stopped_step"] <= protocol.SIZES["tiny"].config.steps
        umtam = results["runs"]["umtam"][seed]
        assert len(umtam["trials"]) == budget
        assert all(np.isfinite(t["val_norm"]) for t in umtam["trials"])
        assert set(umtam["hparams"]) >= {"density", "scaling", "normalize"}
        assert isinstance(umtam["open_edges"], list) and umtam["merge_seconds"] > 0
        assert "sign_conflict" in umtam["diagnostics"] or "skipped" in umtam["diagnostics"]
        tall = results["runs"]["tall_masks"][seed]
        assert set(tall["hparams"]["lambdas"]) == set(TASKS)
        assert len(tall["trials"]) == budget * len(TASKS)  # budget per task's lambda
        assert results["runs"]["regmean"][seed]["hparams"]["alpha"] <= 1.0
        preds = store.read_npz(setup[2] / results["runs"]["emr"][seed]["predictions"])
        labels = store.read_npz(setup[2] / results["labels"][seed])
        assert all(preds[t].shape == labels[t].shape for t in TASKS)
    assert results["posthoc"]["0"]["gram_seconds"] > 0


def test_a_second_run_trains_and_evaluates_nothing(first, setup):
    table, _, _ = first
    again, trained, predicted = _evaluate(setup)
    assert trained == 0 and predicted == 0
    assert again.rows == table.rows


def test_a_work_directory_holds_one_size_and_task_list(first, setup):
    tokenizer, base, workdir = setup
    with pytest.raises(ValueError, match="another work directory"):
        protocol.run_protocol(
            TASKS[:1], ["linear"], [0], size="tiny", workdir=workdir,
            base_encoder=base, tokenizer=tokenizer, log=None,
        )  # fmt: skip


def test_resume_after_an_interrupted_write(first, setup):
    """A temp file left by a crash is ignored; a lost record is rebuilt from the trial
    cache: only its test split is predicted again."""
    table, _, _ = first
    workdir = setup[2]
    run = next((workdir / "runs" / "seed1").glob("task_arithmetic-*.json"))
    (run.parent / f".{run.name}.12345.tmp").write_text('{"broken": ')  # interrupted write
    run.unlink()
    again, trained, predicted = _evaluate(setup)
    assert trained == 0 and predicted == len(TASKS)  # test predictions of one method
    assert again.rows == table.rows


def test_damaged_predictions_are_computed_again_and_a_damaged_record_is_an_error(first, setup):
    table, _, _ = first
    workdir = setup[2]
    run = next((workdir / "runs" / "seed1").glob("emr-*.json"))
    preds = run.with_suffix(".npz")
    preds.write_bytes(preds.read_bytes()[:50])  # a damaged predictions file
    again, trained, predicted = _evaluate(setup)
    assert trained == 0 and predicted == len(TASKS)  # that method's test predictions only
    assert again.rows == table.rows and store.read_npz(preds) is not None
    results = workdir / "results.json"
    whole = results.read_bytes()
    results.write_bytes(whole[: len(whole) // 2])  # the record of both seeds, cut short
    try:
        with pytest.raises(ValueError, match=r"results\.json is damaged .* never rebuilt"):
            _evaluate(setup)
        with pytest.raises(ValueError, match=r"results\.json is damaged"):
            E.summarize(workdir)
    finally:
        results.write_bytes(whole)


def test_pruning_study_reuses_the_protocol_experts_and_caches_predictions(first, setup):
    from umtam_jax.experiments import pruning

    tokenizer, base, workdir = setup
    kw = {"size": "tiny", "tasks": TASKS, "seeds": (0, 1), "densities": (0.1, 1.0),
          "base_encoder": base, "tokenizer": tokenizer, "log": None}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        train, pred = _Counter(experts_lib.finetune), _Counter(pruning.predict)
        mp.setattr(experts_lib, "finetune", train)
        mp.setattr(pruning, "predict", pred)
        run = pruning.run_pruning(workdir, **kw)
        assert train.calls == 0  # the protocol's experts
        assert pred.calls == 2 * len(TASKS) * (1 + 2 * 2)  # base + 2 rankings x 2 densities
        again = pruning.run_pruning(workdir, **kw)
        assert pred.calls == 2 * len(TASKS) * 5  # nothing predicted again
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in run.items() if k != "seconds"
    }
    summary = pruning.summarize_pruning(workdir, run, samples=200)
    # Density 1 keeps the whole task vector: both rankings are the expert itself.
    full = summary["mean"]["1"]
    assert full["saliency"]["estimate"] == pytest.approx(1.0)
    assert full["difference"] == {"estimate": 0.0, "low": 0.0, "high": 0.0, "level": 0.95,
                                  "per_seed": [0.0, 0.0], "verdict": "tied"}  # fmt: skip
    # The normalized mean against a hand computation from the stored predictions.
    metrics = {t: (run["metrics"][t]["metric"], run["metrics"][t]["num_labels"]) for t in TASKS}
    ref = []
    for s in ("0", "1"):
        arrays = store.read_npz(workdir / run["files"][s])
        for t in TASKS:
            name, k = metrics[t]
            y, p = arrays[f"{t}/labels"], arrays[f"{t}/saliency/0.1"]
            ref.append(data_lib.compute_metric(name, y, p, num_labels=k) / run["experts"][s][t])
    cell = summary["mean"]["0.1"]["saliency"]
    assert cell["estimate"] == pytest.approx(np.mean(ref))
    assert cell["low"] <= cell["estimate"] <= cell["high"]
    assert sum(summary["counts"].values()) == len(TASKS) * 2
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        pruning.run_pruning(workdir, **{**kw, "densities": (0.0,)})
    # A protocol run in the same work directory writes its experts there meanwhile.
    busy = pytest.raises(BlockingIOError, match="in use by another process")
    with store.exclusive(workdir, "a protocol run"), busy:
        pruning.run_pruning(workdir, **kw)


def test_conflict_study_reuses_the_experts_and_measures_their_sign_conflicts(first, setup):
    from umtam_jax.experiments import conflict

    tokenizer, base, workdir = setup
    with pytest.MonkeyPatch.context() as mp:
        train = _Counter(experts_lib.finetune)
        mp.setattr(experts_lib, "finetune", train)
        study = conflict.conflict_study(
            workdir, size="tiny", tasks=TASKS, methods=("ties",), seeds=(0, 1),
            samples=100, base_encoder=base, tokenizer=tokenizer, log=None,
        )  # fmt: skip
    assert train.calls == 0  # the main run's experts, through the linked cache
    (row,) = study["pairs"]
    assert row["tasks"] == list(TASKS) and study["spearman"] == {"ties": None}
    assert study["spearman_kept"] == {"ties": None}  # fewer than 3 pairs
    g = row["gain_ties"]
    assert g["low"] <= g["estimate"] <= g["high"] and g["verdict"] in ("better", "worse", "tied")

    # The conflict rate against a NumPy count over the two experts' encoders.
    def top(leaf):  # the top 20 % magnitudes of one leaf (TIES's default trim)
        kept = np.zeros_like(leaf)
        order = np.argsort(-np.abs(leaf), kind="stable")[: max(1, int(0.2 * leaf.size))]
        kept[order] = leaf[order]
        return kept

    def rate(t0, t1):
        s0, s1 = np.sign(t0), np.sign(t1)
        both = (s0 != 0) & (s1 != 0)
        return np.sum(both & (s0 != s1)) / np.sum(both), both & (s0 != s1)

    rates, masses, kept_rates, leaf_rates = [], [], [], []
    for seed in (0, 1):
        _, _, experts = protocol.seed_inputs(
            protocol.SIZES["tiny"], seed, TASKS, workdir, base, tokenizer
        )
        leaves = [
            [np.ravel(np.asarray(w, np.float64) - np.asarray(b, np.float64))
             for w, b in zip(jax.tree.leaves(e.params["encoder"]), jax.tree.leaves(base),
                             strict=True)]
            for e in experts
        ]  # fmt: skip
        taus = [np.concatenate(t) for t in leaves]
        r, conflicting = rate(*taus)
        rates.append(r)
        magnitude = np.abs(taus[0]) + np.abs(taus[1])
        masses.append(magnitude[conflicting].sum() / magnitude.sum())
        kept_rates.append(rate(*[np.concatenate([top(x) for x in t]) for t in leaves])[0])
        with np.errstate(invalid="ignore"):  # a leaf neither expert moved: 0 / 0
            leaf_rates.append([rate(a, b)[0] for a, b in zip(*leaves, strict=True)])
    assert row["conflict_kept"] == pytest.approx(np.mean(kept_rates))
    per_leaf = [np.nan if v is None else v for v in row["conflict_per_leaf"].values()]
    np.testing.assert_allclose(per_leaf, np.mean(leaf_rates, axis=0), rtol=1e-6)
    assert row["conflict_by_seed"] == pytest.approx(rates)
    assert row["conflict_mass"] == pytest.approx(np.mean(masses))
    assert row["conflict"] == pytest.approx(np.mean(rates))
    assert (workdir / "pairs" / "+".join(TASKS) / "experts").is_symlink()
    # The same pair named explicitly (``tasks`` alone would give no pair): read back from
    # the pair's cache without training or merging again.
    with pytest.MonkeyPatch.context() as mp:
        pred = _Counter(seed_run.predict)
        mp.setattr(experts_lib, "finetune", train)
        mp.setattr(seed_run, "predict", pred)
        again = conflict.conflict_study(
            workdir, size="tiny", tasks=TASKS[:1], pairs=[TASKS], methods=("ties",),
            seeds=(0, 1), samples=100, base_encoder=base, tokenizer=tokenizer, log=None,
        )  # fmt: skip
    assert again["pairs"] == study["pairs"] and train.calls == pred.calls == 0
    assert conflict.conflict_study(workdir, size="tiny", pairs=[], log=None)["pairs"] == []


def test_pipelines_compare_raw_scores_of_two_runs(first, setup, tmp_path):
    """UMTAM-trained vs AdamW-trained experts: paired raw differences over the same test
    examples, against a hand computation from the stored predictions."""
    from benchmarks import merging as bench
    from umtam_jax.experiments import comparison

    tokenizer, base, workdir = setup
    adir = tmp_path / "adamw"
    protocol.run_protocol(TASKS, ["task_arithmetic", "tall_masks"], [0, 1], size="tiny",
                          workdir=adir, base_encoder=base, tokenizer=tokenizer,
                          experts_by="adamw", log=None)  # fmt: skip
    umtam, adamw = (store.read_json(d / "results.json") for d in (workdir, adir))
    rows = bench._pipelines(workdir, adir, umtam, adamw, samples=100)
    lefts = {r["umtam_experts"] for r in rows}
    assert "umtam" in lefts and not lefts & {"emr", "tall_masks"}
    assert {r["adamw_experts"] for r in rows} == {"task_arithmetic", "tall_masks"}
    assert sum(r["chosen"][1] for r in rows) == len(lefts)  # one marked AdamW choice each
    r = next(r for r in rows if r["umtam_experts"] == "umtam"
             and r["adamw_experts"] == "task_arithmetic")  # fmt: skip
    metric = comparison.task_metrics(umtam["protocol"]["metrics"])

    def raw(results, d, method):
        vals = []
        for s in ("0", "1"):
            labels = store.read_npz(d / results["labels"][s])
            preds = store.read_npz(d / results["runs"][method][s]["predictions"])
            vals += [metric[t](labels[t], preds[t]) for t in TASKS]
        return np.mean(vals)

    want = raw(umtam, workdir, "umtam") - raw(adamw, adir, "task_arithmetic")
    assert r["estimate"] == pytest.approx(want)
    assert r["low"] <= r["estimate"] <= r["high"]
    with pytest.raises(ValueError, match="no finished run"):
        comparison.compare_runs((workdir, "umtam"), (adir, "ties"), seeds=[0, 1])
