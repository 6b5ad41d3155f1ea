"""mergekit's data-free interpolation methods out of core (merged from checkpoints in
small groups) against the in-memory merge, and a wrong expert count refused before any
input is read."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from tests import trees
from tests.merging.interpolation_helpers import CASES, _call
from umtam_jax import checkpoint, engine

from . import helpers as H

# ------------------------------------------------------------------ out of core


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    rng = np.random.default_rng(1)
    base, experts = H.random_experts(rng, 3, dtype=np.float32)
    paths = {"base": str(root / "base")}
    checkpoint.save_checkpoint(paths["base"], base)
    for i, e in enumerate(experts):
        paths[f"e{i}"] = str(root / f"e{i}")
        checkpoint.save_checkpoint(paths[f"e{i}"], e)
    restored = [checkpoint.restore_params(paths[f"e{i}"]) for i in range(3)]
    return paths, checkpoint.restore_params(paths["base"]), restored


@pytest.mark.parametrize("name,variant", [(n, len(c[3]) - 1) for n, c in CASES.items()])
def test_out_of_core_equals_in_memory(ckpts, tmp_path, name, variant):
    paths, base, experts = ckpts
    _, k, _, variants = CASES[name]
    out = tmp_path / "out"
    kwargs = variants[variant]
    dirs = [paths[f"e{i}"] for i in range(k)]
    engine.merge_checkpoints(
        name, paths["base"], dirs, out, progress=False, group_bytes=100, **kwargs
    )
    want = _call(name, base, experts, kwargs)
    got = checkpoint.restore_params(out)
    trees.assert_trees_equal(got, want)


@pytest.mark.parametrize(
    ("name", "k", "error"),
    [("nuslerp", 3, "exactly 2 experts, got 3"), ("model_stock", 1, "at least 2 experts, got 1")],
)
def test_out_of_core_refuses_a_wrong_expert_count_before_reading(
    ckpts, tmp_path, monkeypatch, name, k, error
):
    paths, _, _ = ckpts
    dirs = [paths[f"e{i}"] for i in range(k)]

    def opened(*args, **kwargs):
        raise AssertionError("an input was opened before the count was checked")

    monkeypatch.setattr(engine._checkpoints, "open_source", opened)
    with pytest.raises(ValueError, match=f"{name} merges {error}"):
        engine.merge_checkpoints(name, paths["base"], dirs, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_method_reading_the_layout_must_be_told_it_for_safetensors_folders(tmp_path):
    """The default layout, Flax's (d_in, d_out), silently merged the PyTorch (d_out, d_in)
    weights a Hugging Face folder usually holds along the wrong axis."""
    w = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    paths = [checkpoint.save_safetensors(tmp_path / n, {"w": w["w"] + i}) for n, i in
             (("a", 0), ("b", 1), ("c", 2))]  # fmt: skip
    job = functools.partial(engine.job_from_paths, statistics=None)
    with pytest.raises(ValueError, match="pass layout='out_in' for PyTorch"):
        job("nuslerp", None, paths[:2], kwargs={"nuslerp_flatten": False})
    for kwargs in ({}, {"nuslerp_flatten": False, "layout": "out_in"}):  # not read, or named
        job("nuslerp", None, paths[:2], kwargs=kwargs)
    della = {"density": 0.5, "key": jax.random.key(0)}
    with pytest.raises(ValueError, match=r"method 'della' reads the weights' layout and .*/a"):
        job("della", paths[0], paths[1:], kwargs=della)

    # What tensor_kwargs gives each tensor counts: a layout given there, an option there
    # that makes the method read it.
    def by_tensor(given):
        return lambda names: [given] * len(names)

    job("della", paths[0], paths[1:], kwargs=della, tensor_kwargs=by_tensor({"layout": "out_in"}))
    with pytest.raises(ValueError, match="pass layout='out_in'"):
        job("nuslerp", None, paths[:2], kwargs={},
            tensor_kwargs=by_tensor({"nuslerp_flatten": False}))  # fmt: skip
