"""Training the protocol's experts: early stopping, AdamW experts (and the methods they
leave out), and the mirror expert of a two-class task."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tests.experiments.protocol_helpers import TASKS, protocol_setup
from umtam_jax import experiments as E
from umtam_jax.experiments import data as data_lib
from umtam_jax.experiments import protocol, spaces, store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    yield from protocol_setup(tmp_path_factory)


def test_early_stopping_stops_with_patience_and_keeps_the_best(setup):
    tokenizer, base, _ = setup
    cfg = dataclasses.replace(protocol.SIZES["tiny"].config, steps=40)
    tt = E.prepare_task(TASKS[0], tokenizer, cfg)
    tx = E.optimizer_for("adamw", cfg, {})
    scripted = iter([0.5, 0.8, 0.7, 0.8, 0.9])  # best at the 2nd evaluation, then 2 misses
    seen = []

    def validate(params):
        seen.append(params)
        return next(scripted)

    es = E.EarlyStopping(eval_every=3, patience=2)
    params, _, info = E.finetune(
        tt, base, tx, cfg, progress=False, early_stopping=es, validate=validate
    )
    assert info["stopped_early"] and info["best_step"] == 6 and info["stopped_step"] == 12
    assert [s for s, _ in info["validation_history"]] == [3, 6, 9, 12]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(seen[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Without early stopping the fixed-step path and its cache key are unchanged.
    assert E.expert_fingerprint(tt, cfg) != E.expert_fingerprint(tt, cfg, early_stopping=es)
    assert E.expert_fingerprint(tt, cfg, "umtam", None, None) == E.expert_fingerprint(tt, cfg)


def test_adamw_experts_leave_out_the_methods_that_need_umtam_statistics(setup, tmp_path):
    tokenizer, base, _ = setup
    kw = {"size": "tiny", "base_encoder": base, "tokenizer": tokenizer, "log": None}
    with pytest.raises(ValueError, match=r"\['umtam', 'ota'\].*experts_by='umtam'"):
        protocol.run_protocol(TASKS, ["umtam", "ota", "ties"], [0], experts_by="adamw",
                              workdir=tmp_path / "a", **kw)  # fmt: skip
    assert not (tmp_path / "a" / "experts").exists()  # refused before training
    results = protocol.run_protocol(TASKS, ["ties"], [0], experts_by="adamw",
                                    workdir=tmp_path / "a", **kw)  # fmt: skip
    assert results["protocol"]["experts_by"] == "adamw"
    assert results["protocol"]["optimizer_kwargs"] == {}
    assert set(results["runs"]) == {"ties"}
    pool = spaces.candidates(len(TASKS))
    left_out = set(pool) - set(protocol.usable(pool, "adamw"))
    assert left_out and all(pool[m].needs == "statistics" for m in left_out)
    assert {"umtam", "ota"} <= left_out
    cfg, _, experts = protocol.seed_inputs(
        protocol.SIZES["tiny"], 0, TASKS, tmp_path / "a", base, tokenizer, experts="adamw"
    )
    assert all(e.info["optimizer"] == "adamw" and e.statistics is None for e in experts)
    assert all(e.info["restored"] for e in experts)  # the run's experts, not retrained
    with pytest.raises(ValueError, match="experts trained by 'adamw'"):
        protocol.run_protocol(TASKS, ["ties"], [0], workdir=tmp_path / "a", **kw)
    # A second process in the same work directory would overwrite the first's results.
    busy = pytest.raises(BlockingIOError, match="in use by another process")
    with store.exclusive(tmp_path / "a", "a test"), busy:
        protocol.run_protocol(TASKS, ["ties"], [0], experts_by="adamw",
                              workdir=tmp_path / "a", **kw)  # fmt: skip


@pytest.mark.parametrize("train_head", [True, False])
def test_a_two_class_mirror_expert_moves_opposite_to_its_task(setup, train_head):
    """The mirror of a two-class task starts from the same head and batches, and its
    swapped targets push the encoder the opposite way: the constructed pair of the
    conflict study (with ``train_head=False`` the shared head stays fixed)."""
    from umtam_jax.merging.diagnostics import sign_conflict

    tokenizer, base, _ = setup
    mirror = data_lib.register_mirror_task(TASKS[1], overwrite=True).name
    try:
        cfg = dataclasses.replace(protocol.SIZES["tiny"].config, steps=3, train_head=train_head)
        tx = E.optimizer_for("adamw", cfg, {})
        head = E.init_expert(base, 2, cfg, TASKS[1])["head"]
        encoders = []
        for name in (TASKS[1], mirror):
            tt = E.prepare_task(name, tokenizer, cfg)
            assert tt.task.seed_name == TASKS[1]
            params, _, _ = E.finetune(tt, base, tx, cfg, progress=False)
            encoders.append(params["encoder"])
            moved = jax.tree.leaves(jax.tree.map(np.array_equal, params["head"], head))
            assert not all(moved) if train_head else all(moved)
        flipped = dataclasses.replace(cfg, train_head=not train_head)
        assert E.expert_fingerprint(tt, cfg) != E.expert_fingerprint(tt, flipped)
        assert "train_head" not in E.PipelineConfig().training_key()  # older keys unchanged

        def flat(encoder):
            leaves = zip(jax.tree.leaves(encoder), jax.tree.leaves(base), strict=True)
            return np.concatenate([np.ravel(np.asarray(p) - np.asarray(b)) for p, b in leaves])

        a, b = flat(encoders[0]), flat(encoders[1])
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) < -0.5
        # Every weight matrix disagrees in sign on most entries both moved (the word embedding,
        # mostly rows neither batch used, is moved the same way by weight decay alone).
        rates = sign_conflict(base, encoders)["per_leaf"]
        kernels = [r for path, r in rates.items() if "kernel" in path]
        assert len(kernels) == 6 and min(kernels) > 0.75, rates
    finally:
        data_lib.unregister_task(mirror)
