"""TALL masks, consensus merging and EMR-merging as methods: unmodified inputs and jit,
bfloat16 computed in float32, validation naming the parameter or leaf, the registry,
per-expert lambdas from a configuration, and the out-of-core engine equal to the
in-memory merge."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.merging import helpers as H
from tests.merging.task_masks_helpers import _FLOAT32_TESTS
from umtam_jax import checkpoint, engine, merging


@pytest.fixture(autouse=True)
def _x64(request):
    with jax.enable_x64(request.function.__name__ not in _FLOAT32_TESTS):
        yield


# ------------------------------------------------------------------------ contract


def test_inputs_are_not_modified_and_jit_gives_the_same_results():
    base, experts = H.random_experts(np.random.default_rng(9), 3)
    before = copy.deepcopy((base, experts))
    eager = {
        "tall": merging.tall_masks(base, experts, lambdas=[0.3, 0.4, 0.5]),
        "consensus": merging.consensus(base, experts, lambdas=0.3, scaling=0.5),
        "ties": merging.consensus_ties(base, experts, density=0.5),
        "emr": merging.emr_merge(base, experts),
    }
    eager["task"] = merging.emr_task_model(base, eager["emr"], 1)
    eager["applied"] = merging.apply_task_mask(base, eager["consensus"], eager["tall"][0])

    def run(b, e, lam):
        out = {
            "tall": merging.tall_masks(b, e, lambdas=lam),
            "consensus": merging.consensus(b, e, lambdas=lam[0], scaling=0.5),
            "ties": merging.consensus_ties(b, e, density=0.5),
            "emr": merging.emr_merge(b, e),
        }
        out["task"] = merging.emr_task_model(b, out["emr"], 1)
        out["applied"] = merging.apply_task_mask(b, out["consensus"], out["tall"][0])
        return out

    jitted = jax.jit(run)(base, experts, jnp.array([0.3, 0.4, 0.5]))
    jax.tree.map(np.testing.assert_array_equal, jitted, eager)
    jax.tree.map(np.testing.assert_array_equal, (base, experts), before)


@pytest.mark.parametrize("fn", ["consensus", "emr"])
def test_bfloat16_computes_in_float32(fn):
    base, experts = H.random_experts(np.random.default_rng(10), 3, dtype=np.float32)
    bf = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)  # noqa: E731
    f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    b16, e16 = bf(base), [bf(e) for e in experts]
    if fn == "consensus":
        got = merging.consensus(b16, e16, k=1, scaling=0.5)
        want = merging.consensus(f32(b16), [f32(e) for e in e16], k=1, scaling=0.5)
    else:
        emr16 = merging.emr_merge(b16, e16)
        emr32 = merging.emr_merge(f32(b16), [f32(e) for e in e16])
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(emr16.unified))
        jax.tree.map(np.testing.assert_array_equal, emr16, emr32)
        got, want = (
            merging.emr_task_model(b16, emr16, 2),
            merging.emr_task_model(f32(b16), emr32, 2),
        )
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(jnp.bfloat16)))


def test_validation_errors_name_the_parameter_or_leaf():
    base, experts = H.random_experts(np.random.default_rng(11), 2)
    with pytest.raises(ValueError, match=r"got 3 lambdas for 2 experts"):
        merging.tall_masks(base, experts, lambdas=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"got 1 lambdas for 2 experts"):
        merging.consensus(base, experts, lambdas=[0.1])
    with pytest.raises(ValueError, match=r"lambdas\[1\] must lie in \[0.0, inf\]"):
        merging.consensus(base, experts, lambdas=[0.1, -0.2])
    with pytest.raises(ValueError, match=r"lambdas must lie in \[0.0, inf\]"):
        merging.tall_masks(base, experts, lambdas=-1.0)
    with pytest.raises(ValueError, match=r"k must lie in \[0.0, inf\]"):
        merging.consensus(base, experts, k=-1)
    with pytest.raises(ValueError, match="density must lie in"):
        merging.consensus_ties(base, experts, density=0.0)
    with pytest.raises(ValueError, match="unknown rescale='max'"):
        merging.emr_merge(base, experts, rescale="max")
    with pytest.raises(ValueError, match=r"shape mismatch at \['attn'\]\['bias'\]"):
        bad = copy.deepcopy(experts[1])
        bad["attn"]["bias"] = np.zeros(4)
        merging.emr_merge(base, [experts[0], bad])
    with pytest.raises(ValueError, match=r"merged does not have the tree structure"):
        merging.tall_masks(base, experts, merged={"attn": base["attn"]})
    mask = merging.tall_masks(base, experts)[0]
    with pytest.raises(TypeError, match=r"mask\['conv'\]\['kernel'\] must be a boolean array"):
        merging.apply_task_mask(base, experts[0], {**mask, "conv": {"kernel": np.ones((2, 3, 4))}})
    with pytest.raises(ValueError, match=r"shape mismatch at \['norm'\]\['scale'\]"):
        merging.apply_task_mask(base, experts[0], {**mask, "norm": {"scale": np.ones(2, bool)}})
    emr = merging.emr_merge(base, experts)
    with pytest.raises(ValueError, match=r"task must be an expert index in \[0, 1\]"):
        merging.emr_task_model(base, emr, 2)
    with pytest.raises(TypeError, match=r"task must be an int expert index or None, got 1.0"):
        merging.emr_task_model(base, emr, 1.0)
    nan = emr._replace(rescalers=emr.rescalers.at[1].set(jnp.nan))
    with pytest.raises(ValueError, match=r"emr.rescalers\[1\] must be finite"):
        merging.emr_task_model(base, nan, 1)
    with pytest.raises(ValueError, match="not finite"):
        nan = jax.tree.map(lambda x: np.full_like(x, np.nan), experts[0])
        merging.consensus(base, [nan, experts[1]])


def test_registry_lists_the_consensus_methods():
    for name in ("consensus", "consensus_ties"):
        m = merging.METHODS[name]
        assert m.fn is getattr(merging, name)
        assert m.defaults()["k"] == 2 and m.defaults()["lambdas"] == 0.4
        assert "lambdas (numbers, default 0.4; per expert as 'tall_lambda')" in merging.describe(m)


def test_per_expert_lambdas_from_a_configuration():
    from umtam_jax.cli.merge import ConfigError, build_plan

    config = {
        "method": "consensus",
        "base": "b",
        "experts": [{"path": "x", "tall_lambda": 0.2}, "y", {"path": "z", "tall_lambda": 0.6}],
        "parameters": {"lambdas": 0.3},
    }
    assert build_plan(config).parameters["lambdas"] == [0.2, 0.3, 0.6]
    with pytest.raises(ConfigError, match=r"experts\[0\].tall_lambda: method 'ties' takes no"):
        build_plan({**config, "method": "ties", "parameters": {"density": 0.5}})
    with pytest.raises(ValueError, match=r"lambdas\[1\] must lie in \[0.0, inf\]"):
        base, experts = H.random_experts(np.random.default_rng(0), 3)
        merging.consensus(base, experts, lambdas=[0.2, -1.0, 0.1])


# ------------------------------------------------------------------------ out of core

CASES = [
    ("consensus", {"k": 2, "lambdas": 0.3, "scaling": 0.5}),
    ("consensus", {"k": 1, "lambdas": [0.2, 0.4, 0.6]}),
    ("consensus_ties", {"density": 0.4, "normalize": True}),
    ("consensus_ties", {"density": 0.3, "scope": "global", "k": 1}),
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_masks")
    base, experts = H.random_experts(np.random.default_rng(12), 3, dtype=np.float32)
    paths = [str(root / name) for name in ("base", "e0", "e1", "e2")]
    for path, params in zip(paths, [base, *experts], strict=True):
        checkpoint.save_checkpoint(path, params)
    return paths, [checkpoint.restore_params(p) for p in paths]


@pytest.mark.parametrize("method,kwargs", CASES)
def test_out_of_core_equals_in_memory(ckpts, tmp_path, method, kwargs):
    (base_dir, *expert_dirs), (base, *experts) = ckpts
    out = tmp_path / "out"
    engine.merge_checkpoints(
        method, base_dir, expert_dirs, out, progress=False, group_bytes=100, **kwargs
    )
    got, want = checkpoint.restore_params(out), getattr(merging, method)(base, experts, **kwargs)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
