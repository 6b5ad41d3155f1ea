"""The experiments' merging stage: RegMean on post-hoc Grams through the pipeline (tiny
BERT), and the package's public names and cache keys, unchanged by the split by stage."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tests.experiments.test_pipeline import CFG, TINY, UMTAM_KW
from tests.experiments.toy_task_helpers import registered_toy_tasks, tokenizer_or_skip
from umtam_jax import experiments as E
from umtam_jax.experiments.models import minilm

TASKS = ("stage_test_single", "stage_test_pair")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny UMTAM experts on toy tasks: ``(base, ttasks, experts)``."""
    tokenizer = tokenizer_or_skip()
    with registered_toy_tasks(TASKS):
        workdir = tmp_path_factory.mktemp("stage")
        base = minilm.init_encoder(jax.random.key(0), TINY)
        ttasks = {t: E.prepare_task(t, tokenizer, CFG) for t in TASKS}
        yield E.prepare_experts(
            TASKS,
            CFG,
            workdir,
            optimizer_kwargs=UMTAM_KW,
            base_encoder=base,
            ttasks=ttasks,
            progress=False,
            log=None,
        )


def test_regmean_runs_through_the_merging_stage(trained):
    base, ttasks, experts = trained
    grids = {"linear": [{}], "regmean": [{"alpha": 0.5}, {"alpha": 0.9}]}
    result = E.run_merging(
        experts,
        ttasks,
        base,
        CFG,
        methods=list(grids),
        grids=grids,
        gram_examples=16,
        progress=False,
    )
    r = result["methods"]["regmean"]
    assert r["method"] == E.MERGE_METHODS["regmean"].name == "RegMean (post-hoc Grams)"
    assert r["hparams"] in grids["regmean"]  # chosen on validation, from the grid
    assert [t["hparams"] for t in r["grid"]] == grids["regmean"]
    for split in ("validation", "test"):
        assert all(0.0 <= r[split][t] <= 1.0 for t in TASKS)
        assert np.isfinite(r[split]["avg"]) and np.isfinite(r[split]["norm"])
    assert all(np.isfinite(t["val_norm"]) for t in r["grid"])
    assert result["gram_seconds"] > 0 and r["extra_seconds"] == result["gram_seconds"]
    assert r["gram_examples_per_task"] == 16
    # Only the methods that need a post-hoc pass pay for one.
    assert result["fisher_seconds"] is None
    assert "extra_seconds" not in result["methods"]["linear"]
    assert "RegMean (post-hoc Grams)" in E.format_table(result)


def test_post_hoc_grams_cover_every_dense_kernel_and_leave_out_padding(trained):
    _, ttasks, experts = trained
    grams, seconds = E.post_hoc_grams(
        experts, ttasks, CFG, num_examples=16, batch_size=8, progress=False
    )
    assert len(grams) == len(experts) and seconds > 0
    h, f = TINY.hidden_size, TINY.intermediate_size
    for g in grams:
        layer = g["layer_0"]
        attn = layer["attention"]
        for name in ("query", "key", "value", "output"):
            assert attn[name]["kernel"].shape == (h, h) and attn[name]["bias"] is None
        assert layer["intermediate"]["kernel"].shape == (h, h)
        assert layer["output"]["kernel"].shape == (f, f)
        assert all(x is None for x in jax.tree.leaves(g["embeddings"], is_leaf=lambda x: x is None))
        q = np.asarray(attn["query"]["kernel"])
        np.testing.assert_array_equal(q, np.asarray(attn["key"]["kernel"]))  # same inputs
        np.testing.assert_allclose(q, q.T, rtol=1e-5, atol=1e-5)
        assert np.all(np.diagonal(q) > 0)

    # Extra padding tokens (attention mask 0) change nothing: padding is masked out.
    def padded(tt):
        tr = {
            k: np.pad(v, ((0, 0), (0, 5))) if v.ndim == 2 else v
            for k, v in tt.arrays["train"].items()
        }
        return dataclasses.replace(tt, arrays={**tt.arrays, "train": tr})

    grams_padded, _ = E.post_hoc_grams(
        experts,
        {t: padded(tt) for t, tt in ttasks.items()},
        CFG,
        num_examples=16,
        batch_size=8,
        progress=False,
    )
    for a, b in zip(jax.tree.leaves(grams), jax.tree.leaves(grams_padded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-3)


def test_regmean_needs_the_grams(trained):
    base, _, experts = trained
    assert E.MERGE_METHODS["regmean"].needs == "grams"
    assert E.MERGE_METHODS["fisher"].needs == "fisher"
    assert E.MERGE_METHODS["ota"].needs == "statistics"
    assert E.MERGE_METHODS["ties"].needs == ""
    with pytest.raises(ValueError, match="Grams"):
        E.merge_encoders("regmean", base, [e.params["encoder"] for e in experts])


@pytest.mark.parametrize("full", [False, True])
def test_every_method_has_a_default_grid(full):
    grids = E.default_grids(full=full)
    assert set(grids) == set(E.MERGE_METHODS)
    alphas = [g["alpha"] for g in grids["regmean"]]
    assert len(alphas) >= 2 and all(0 < a <= 1 for a in alphas)


#: Every public name of ``umtam_jax.experiments.pipeline`` before it was split by stage.
OLD_PIPELINE_NAMES = (
    "DEFAULT_TASKS",
    "DEMO_UMTAM_KWARGS",
    "FULL",
    "MERGE_METHODS",
    "QUICK",
    "ExpertResult",
    "MergeMethod",
    "PipelineConfig",
    "TokenizedTask",
    "default_grids",
    "enable_compilation_cache",
    "evaluate_params",
    "finetune",
    "format_table",
    "init_expert",
    "init_opt_state",
    "load_base",
    "make_optimizer",
    "merge_encoders",
    "plot_merging",
    "post_hoc_fishers",
    "predict",
    "prepare_experts",
    "prepare_task",
    "run_merging",
    "schedule",
    "select_on_validation",
    "train_expert",
    "tree_bytes",
)


def test_the_old_pipeline_names_are_exported_by_the_package():
    from umtam_jax.experiments import pipeline

    assert set(OLD_PIPELINE_NAMES) | {"post_hoc_grams"} <= set(E.__all__)
    for name in E.__all__:
        assert getattr(E, name) is getattr(pipeline, name), name
    with pytest.raises(AttributeError):
        E.no_such_name  # noqa: B018


def test_cache_keys_are_stable():
    """Checkpoints of trained experts are found by these keys: no refactoring may change
    them. They cover the task's tokens and labels (and the base encoder, when given).
    """
    from umtam_jax.experiments._keys import seed_for

    arrays = {
        s: {"labels": np.zeros(n, np.int32)}
        for s, n in (("train", 32), ("validation", 16), ("test", 16))
    }
    tt = E.TokenizedTask("golden_task", None, arrays)
    assert E.expert_fingerprint(tt, CFG, "umtam", UMTAM_KW) == "99617b799ab5b9b7"
    assert E.expert_fingerprint(tt, E.QUICK, "umtam", E.DEMO_UMTAM_KWARGS) == "526c7cfb7a6e7562"
    assert E.expert_fingerprint(tt, E.FULL, "adamw") == "a85123bb121b7e89"
    # Any change of the data or of the start changes the key.
    relabelled = {**arrays, "test": {"labels": np.ones(16, np.int32)}}
    other = E.TokenizedTask("golden_task", None, relabelled)
    assert E.expert_fingerprint(other, E.FULL, "adamw") != "a85123bb121b7e89"
    base = {"w": np.zeros(3, np.float32)}
    moved = {"w": np.array([0, 0, 1e-7], np.float32)}
    with_base = E.expert_fingerprint(tt, E.FULL, "adamw", base_encoder=base)
    assert with_base != "a85123bb121b7e89"
    assert with_base != E.expert_fingerprint(tt, E.FULL, "adamw", base_encoder=moved)
    assert seed_for(0, "merge") == 1802082137
    assert seed_for(3, "head", "kjv_section") == 1764428371


def test_plot_merging_writes_a_png_atomically(tmp_path):
    result = {
        "experts": {"a": {"test": 0.9}, "b": {"test": 0.8}},
        "methods": {
            "ties": {"method": "ties", "test": {"a": 0.7, "b": 0.6, "norm": 0.76}},
            "umtam": {
                "method": "umtam",
                "test": {"a": 0.8, "b": 0.7, "norm": 0.88},
                "test_interval": {"low": 0.8, "high": 0.95},
            },
        },
    }
    path = E.plot_merging(result, tmp_path / "plots" / "merging.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["merging.png"]
