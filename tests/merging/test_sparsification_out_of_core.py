"""Model Breadcrumbs, DELLA, SCE and RAM in bfloat16 (computed in float32) and out of
core (merged from checkpoints in small groups), against the in-memory float32 merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from tests import trees
from tests.merging import helpers as H
from tests.merging.sparsification_helpers import _FLOAT32_TESTS
from umtam_jax import checkpoint, engine, merging


@pytest.fixture(autouse=True)
def _x64(request):
    with jax.enable_x64(request.function.__name__ not in _FLOAT32_TESTS):
        yield


# ------------------------------------------------------------------------ bf16, out of core

CASES = [
    ("breadcrumbs", {"density": [0.5, 0.8, 0.3], "gamma": 0.1, "weights": [1.0, 2.0, 0.5]}),
    ("breadcrumbs_ties", {"density": 0.6, "l1_rescale": True, "normalize": True}),
    ("della", {"density": 0.5, "key": jax.random.key(3), "epsilon": 0.1}),
    ("della", {"density": 0.5, "key": jax.random.key(3), "scope": "layer"}),
    ("della_linear", {"density": [0.4, 0.6, 1.0], "key": jax.random.key(4), "l1_rescale": True}),
    ("sce", {"select_topk": 0.4}),
    ("sce", {"select_topk": 0.4, "scope": "layer"}),  # per slice of conv's first axis
    (
        "breadcrumbs_ties",
        {"density": 0.6, "gamma": 0.2, "scope": umtam_jax.scanned("conv", axis=2)},
    ),
    ("ram", {"epsilon": 0.05}),
    ("ramplus_tl", {"r": 0.3, "alpha": 0.5, "epsilon": 0.05}),
]


@pytest.mark.parametrize("method,kwargs", CASES)
def test_bfloat16_computes_in_float32(method, kwargs):
    base, experts = H.random_experts(np.random.default_rng(12), 3, dtype=np.float32)
    bf = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)  # noqa: E731
    f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    b16, e16 = bf(base), [bf(e) for e in experts]
    got = merging.merge(method, b16, e16, **kwargs)
    want = merging.merge(method, f32(b16), [f32(e) for e in e16], **kwargs)
    trees.assert_trees_equal(got, jax.tree.map(lambda y: y.astype(jnp.bfloat16), want))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsify")
    base, experts = H.random_experts(np.random.default_rng(12), 3, dtype=np.float32)
    paths = [str(root / name) for name in ("base", "e0", "e1", "e2")]
    for path, params in zip(paths, [base, *experts], strict=True):
        checkpoint.save_checkpoint(path, params)
    restored = [checkpoint.restore_params(p) for p in paths]
    return paths, restored


@pytest.mark.parametrize("method,kwargs", CASES)
def test_out_of_core_equals_in_memory(ckpts, tmp_path, method, kwargs):
    (base_dir, *expert_dirs), (base, *experts) = ckpts
    out = tmp_path / "out"
    engine.merge_checkpoints(
        method, base_dir, expert_dirs, out, progress=False, group_bytes=100, **kwargs
    )
    got, want = checkpoint.restore_params(out), getattr(merging, method)(base, experts, **kwargs)
    trees.assert_trees_equal(got, want)
