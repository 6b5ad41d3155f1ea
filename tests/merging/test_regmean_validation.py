"""What RegMean refuses: Grams of the wrong shape, count, dtype or place, non-finite or
singular ones (named as the cause), Grams of different forms for one leaf, and the
checkpoint engine and the CLI, which read no Grams."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from umtam_jax import engine, merging

# ------------------------------------------------------------------ validation


def test_validation_errors_name_the_expert_and_the_path():
    ws = [{"layer": {"kernel": np.ones((4, 2), np.float32), "bias": np.zeros(2, np.float32)}}] * 2
    good = {"layer": {"kernel": np.eye(4, dtype=np.float32)}}
    bad = {"layer": {"kernel": np.eye(5, dtype=np.float32)}}
    with pytest.raises(
        ValueError, match=r"grams\[1\]\['layer'\]\['kernel'\]: expected shape \(4, 4\).*\(5, 5\)"
    ):
        merging.regmean(None, ws, [good, bad])
    with pytest.raises(ValueError, match="got 1 Gram pytrees for 2 experts"):
        merging.regmean(None, ws, [good])
    with pytest.raises(TypeError, match="grams must be a sequence"):
        merging.regmean(None, ws, good)
    nan = {"layer": {"kernel": np.full((4, 4), np.nan, np.float32)}}
    with pytest.raises(ValueError, match=r"grams\[0\]\['layer'\]\['kernel'\] is not finite"):
        merging.regmean(None, ws, [nan, good])
    on_bias = {"layer": {"bias": np.ones((2, 2), np.float32)}}
    with pytest.raises(ValueError, match=r"grams\[0\]\['layer'\]\['bias'\]: a Gram needs"):
        merging.regmean(None, ws, [on_bias, on_bias])
    elsewhere = {"other": {"kernel": np.eye(4, dtype=np.float32)}}
    with pytest.raises(ValueError, match=r"grams\[1\]\['other'\]\['kernel'\]: the base has no"):
        merging.regmean(None, ws, [good, elsewhere])
    with pytest.raises(ValueError, match=r"grams\[1\]\['layer'\]\['kernel'\] is missing"):
        merging.regmean(None, ws, [good, {"layer": {"kernel": None}}])
    negative = {"layer": {"kernel": np.diag(np.array([1, -0.5, 1, 1], np.float32))}}
    with pytest.raises(
        ValueError, match=r"grams\[1\]\['layer'\]\['kernel'\]'s diagonal has an entry -0\.5"
    ):
        merging.regmean(None, ws, [good, negative])
    with pytest.raises(TypeError, match=r"grams\[0\]\['layer'\]\['kernel'\] has dtype int32"):
        merging.regmean(None, ws, [{"layer": {"kernel": np.eye(4, dtype=np.int32)}}, good])
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        merging.regmean(None, ws, [good, good], alpha=1.5)
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        merging.regmean(None, ws, [good, good], weights=[1.0, -1.0])


def test_a_singular_summed_gram_is_named_as_the_cause():
    """With alpha=1 Grams of too few examples sum to a singular matrix: the error said the
    merge overflowed; a finite but overflowing merge still says so."""
    base = {"a": np.zeros((6, 3), np.float32), "b": np.zeros(3, np.float32)}
    ws = [{"a": np.ones((6, 3), np.float32), "b": np.ones(3, np.float32)}] * 2
    grams = [{"a": np.ones((6, 6), np.float32)}] * 2  # rank 1
    with pytest.raises(
        ValueError,
        match=r"leaf \['a'\] is not finite .*: its summed Gram matrix "
        r".* is singular \(not invertible\).*use alpha < 1",
    ):
        merging.regmean(base, ws, grams, alpha=1.0)
    got = merging.regmean(base, ws, grams, alpha=0.9)  # G̃ = 0.9 G + 0.1 diag(G): invertible
    np.testing.assert_allclose(np.asarray(got["a"]), 1.0, rtol=1e-5)
    # Rank 20 of 64 features in float32: singular only to working precision, where the
    # solve returned a finite answer ~1e4 times the experts' entries.
    rng = np.random.default_rng(0)
    wide = [{"k": rng.normal(size=(64, 3)).astype(np.float32)} for _ in range(2)]
    xs = [rng.normal(size=(10, 64)).astype(np.float32) for _ in range(2)]
    with pytest.raises(ValueError, match=r"leaf \['k'\] is not finite .* is singular"):
        merging.regmean({"k": np.zeros((64, 3), np.float32)}, wide, [{"k": x.T @ x} for x in xs],
                        alpha=1.0)  # fmt: skip
    big = [{"a": w["a"], "b": np.full(3, 3e38, np.float32)} for w in ws]
    with pytest.raises(ValueError, match=r"leaf \['b'\] is not finite .*overflowed although"):
        merging.regmean(base, big, grams, alpha=0.9)


def test_the_engine_and_the_cli_refuse_regmean_before_reading_anything(capsys):
    from umtam_jax.cli.merge import main

    with pytest.raises(ValueError, match="grams, which the checkpoint engine does not read"):
        engine.validate_merge_checkpoints("regmean", "base", ["a", "b"])
    assert main(["--method", "regmean", "--expert", "a", "--expert", "b", "--dry-run"]) == 2
    assert "umtam-merge does not read from checkpoints" in capsys.readouterr().err
    assert "in memory only" in merging.describe(merging.METHODS["regmean"])


def test_experts_giving_a_leaf_grams_of_different_forms_are_refused():
    base = {"w": np.zeros((4, 2, 2), "f4")}
    experts = [{"w": np.ones((4, 2, 2), "f4")}, {"w": np.full((4, 2, 2), 2.0, "f4")}]
    stacked, general = np.stack([np.eye(2, dtype="f4")] * 4), np.eye(4, dtype="f4")
    with pytest.raises(ValueError, match=r"grams\[1\]\['w'\] has shape \(4, 4\)"):
        merging.regmean(base, experts, [{"w": stacked}, {"w": general}])


def test_regmean_a_kernel_without_input_features_comes_back_unchanged():
    """A (2, 0, 3) kernel has no input features: an empty system, not a min over none."""
    base = {"k": jnp.zeros((2, 0, 3)), "w": jnp.zeros((2, 2))}
    grams = {"k": jnp.zeros((2, 0, 0)), "w": jnp.eye(2)}
    experts = [{"k": jnp.zeros((2, 0, 3)), "w": jnp.full((2, 2), float(i))} for i in (1, 3)]
    got = merging.regmean(base, experts, [grams, grams])
    assert got["k"].shape == (2, 0, 3)
    np.testing.assert_allclose(got["w"], jnp.full((2, 2), 2.0), rtol=1e-6)
