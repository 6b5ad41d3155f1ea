"""TSV-Merge, Iso-C and Iso-CTS as methods: jit with a traced scaling, validation naming the
parameter or leaf, the registry, the out-of-core engine equal to the in-memory merge, and
one compilation for the fractions that give the same ranks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from tests.compilations import compilations
from tests.merging.subspace_helpers import FLOAT32, REFS, _assert_close, _random
from umtam_jax import checkpoint, engine, merging


def test_jit_with_traced_scaling():
    base, experts = _random(np.random.default_rng(9), 2, np.float32)
    base = {n: base[n] for n in ("bias", "stack")}
    experts = [{n: e[n] for n in base} for e in experts]
    for name in REFS:
        fn = getattr(merging, name)
        jitted = jax.jit(lambda b, e, s, fn=fn: fn(b, e, scaling=s))  # noqa: B023
        _assert_close(
            jitted(base, experts, 0.5),
            {n: np.asarray(x) for n, x in fn(base, experts, scaling=0.5).items()},
            1e-5,
            1e-6,
        )
    with pytest.raises(TypeError, match="rank_fraction must be a Python number, not traced"):
        jax.jit(lambda f: merging.tsv_merge(base, experts, rank_fraction=f))(0.5)


def test_validation_names_the_parameter_or_leaf():
    base, experts = _random(np.random.default_rng(10), 2, np.float32)
    with pytest.raises(ValueError, match=r"rank_fraction must lie in \(0, 1\], got 0"):
        merging.tsv_merge(base, experts, rank_fraction=0)
    with pytest.raises(ValueError, match=r"rank_fraction must lie in \(0, 1\], got 1.5"):
        merging.tsv_merge(base, experts, rank_fraction=1.5)
    with pytest.raises(ValueError, match=r"common_space_fraction must lie in \[0, 1\]"):
        merging.iso_cts(base, experts, common_space_fraction=-0.1)
    with pytest.raises(ValueError, match="unknown layout='torch'; expected one of 'in_out'"):
        merging.iso_cts(base, experts, layout="torch")
    with pytest.raises(ValueError, match="scaling must be finite"):
        merging.iso_c(base, experts, scaling=float("inf"))
    bad = dict(experts[1], stack=np.zeros((2, 5, 6), np.float32))
    with pytest.raises(ValueError, match=r"shape mismatch at \['stack'\]"):
        merging.tsv_merge(base, [experts[0], bad])
    bad = dict(experts[1], kernel=np.full((6, 5), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\['kernel'\]"):
        merging.iso_c(base, [experts[0], bad])


def test_registered():
    tensor = {"scope": "tensor"}
    assert merging.METHODS["tsv_merge"].defaults() == {
        "scaling": 1.0,
        "rank_fraction": 1.0,
        **tensor,
    }
    assert merging.METHODS["iso_c"].defaults() == {"scaling": 1.0, **tensor}
    assert merging.METHODS["iso_cts"].defaults() == {
        "scaling": 1.0,
        "common_space_fraction": 0.8,
        "layout": "in_out",
        **tensor,
    }
    for name in REFS:
        assert merging.METHODS[name].fn is getattr(merging, name)
        assert name in merging.__all__
        assert merging.describe(merging.METHODS[name]).startswith(f"{name}: ")


# ------------------------------------------------------------------ out of core


def test_out_of_core_equals_in_memory(tmp_path):
    base, experts = _random(np.random.default_rng(11), 2, np.float32)
    base = {n: base[n] for n in ("bias", "stack", "scale")}
    experts = [{n: e[n] for n in base} for e in experts]
    checkpoint.save_checkpoint(str(tmp_path / "base"), base)
    dirs = []
    for i, e in enumerate(experts):
        dirs.append(str(tmp_path / f"e{i}"))
        checkpoint.save_checkpoint(dirs[-1], e)
    restored = checkpoint.restore_params(str(tmp_path / "base"))
    restored_experts = [checkpoint.restore_params(d) for d in dirs]
    scoped = ("iso_c", {"scope": umtam_jax.scanned("stack", axis=1)})  # per slice of axis 1
    for i, (name, kwargs) in enumerate([*FLOAT32, scoped]):
        out = tmp_path / f"out{i}"
        engine.merge_checkpoints(
            name, str(tmp_path / "base"), dirs, out, progress=False, group_bytes=100, **kwargs
        )
        got = checkpoint.restore_params(out)
        want = getattr(merging, name)(restored, restored_experts, **kwargs)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.asarray(x).dtype == np.asarray(y).dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "merge, option, values",
    [
        (merging.tsv_merge, "rank_fraction", (0.7, 0.72, 0.74)),  # 1 direction per task
        (merging.iso_cts, "common_space_fraction", (0.8, 0.82, 0.84)),  # one split
    ],
)
def test_fractions_of_one_rank_share_a_compilation(caplog, merge, option, values):
    """The compiled kernel takes the ranks a fraction gives, not the fraction: a sweep
    over fractions giving the same ranks compiles once."""
    base = {"w": jnp.zeros((4, 3))}
    experts = [{"w": jnp.sin(jnp.arange(12.0) + i).reshape(4, 3)} for i in range(2)]
    first = merge(base, experts, **{option: values[0]})
    with compilations(caplog) as compiled:
        for value in values[1:]:
            again = merge(base, experts, **{option: value})
            chex.assert_trees_all_equal(again, first)
    assert compiled == [], compiled[:3]
