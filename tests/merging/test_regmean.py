"""RegMean and its Gram pass: a float64 NumPy reference written here, the closed form's
special cases, the Gram helper on tiny flax models against Grams computed by hand, and
validation."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umtam_jax import engine, merging


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# ------------------------------------------------------------------ float64 reference

SHAPES = {
    "attn": {"kernel": (6, 5), "bias": (5,)},
    "stack": {"kernel": (3, 4, 2)},  # three stacked (scanned) layers
    "norm": {"scale": (4,)},
}
WITH_GRAMS = (("attn", "kernel"), ("stack", "kernel"))


def _params(rng, base=None, scale=1.0):
    return {
        m: {
            n: (0 if base is None else base[m][n]) + scale * rng.standard_normal(s)
            for n, s in leaves.items()
        }
        for m, leaves in SHAPES.items()
    }


def _gram(rng, shape, rows=9):
    x = rng.standard_normal((*shape[:-2], rows, shape[-2]))
    return np.swapaxes(x, -1, -2) @ x


def _grams(rng):
    return {
        "attn": {"kernel": _gram(rng, SHAPES["attn"]["kernel"]), "bias": None},
        "stack": {"kernel": _gram(rng, SHAPES["stack"]["kernel"])},
    }  # "norm" absent: no Gram


def _inputs(rng, k=3):
    base = _params(rng)
    experts = [_params(rng, base, 0.3) for _ in range(k)]
    return base, experts, [_grams(rng) for _ in range(k)]


def ref_regmean(experts, grams, alpha, weights=None):
    c = [1.0] * len(experts) if weights is None else weights
    out = {}
    for m, leaves in SHAPES.items():
        out[m] = {}
        for n in leaves:
            ws = [e[m][n] for e in experts]
            if (m, n) not in WITH_GRAMS:
                out[m][n] = sum(ci * w for ci, w in zip(c, ws, strict=True)) / sum(c)
                continue
            lhs, rhs = 0.0, 0.0
            for ci, g, w in zip(c, [g[m][n] for g in grams], ws, strict=True):
                eye = np.eye(g.shape[-1])
                tilde = alpha * g + (1 - alpha) * g * eye  # g * eye: diag(G) as a matrix
                lhs, rhs = lhs + ci * tilde, rhs + ci * tilde @ w
            out[m][n] = np.linalg.solve(lhs, rhs)
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
@pytest.mark.parametrize("with_base", [True, False])
def test_matches_float64_reference(x64, alpha, weights, with_base):
    base, experts, grams = _inputs(np.random.default_rng(0))
    got = merging.regmean(base if with_base else None, experts, grams, alpha=alpha, weights=weights)
    chex.assert_trees_all_close(
        got, ref_regmean(experts, grams, alpha, weights), rtol=1e-9, atol=1e-10
    )
    assert got["attn"]["kernel"].dtype == jnp.float64


def test_alpha_one_is_the_least_squares_solution(x64):
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((7, 4)) for _ in range(3)]
    ws = [rng.standard_normal((4, 3)) for _ in range(3)]
    got = merging.regmean(None, [{"w": w} for w in ws], [{"w": x.T @ x} for x in xs], alpha=1.0)
    # argmin_W Σ_i ‖X_i W − X_i W_i‖²: one stacked least-squares problem
    want = np.linalg.lstsq(
        np.concatenate(xs), np.concatenate([x @ w for x, w in zip(xs, ws, strict=True)])
    )[0]
    np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-10, atol=1e-12)


def test_alpha_zero_is_a_diagonal_weighted_average(x64):
    base, experts, grams = _inputs(np.random.default_rng(2))
    got = merging.regmean(None, experts, grams, alpha=0.0)
    for m, n in WITH_GRAMS:
        d = [np.diagonal(g[m][n], axis1=-2, axis2=-1)[..., None] for g in grams]
        want = sum(di * e[m][n] for di, e in zip(d, experts, strict=True)) / sum(d)
        np.testing.assert_allclose(np.asarray(got[m][n]), want, rtol=1e-10)


def test_identical_experts_give_that_expert():
    rng = np.random.default_rng(3)
    base, experts, grams = _inputs(rng)
    expert = jax.tree.map(lambda x: x.astype(np.float32), experts[0])
    grams = [jax.tree.map(lambda x: x.astype(np.float32), g) for g in grams]
    got = merging.regmean(base=None, experts=[expert] * 3, grams=grams)
    chex.assert_trees_all_close(got, expert, rtol=1e-4, atol=1e-5)


def test_scaled_identity_grams_give_the_average(x64):
    base, experts, _ = _inputs(np.random.default_rng(4))

    def identity(c):
        return {
            m: {n: c * np.broadcast_to(np.eye(s[-2]), (*s[:-1], s[-2]))}
            for m, leaves in SHAPES.items()
            for n, s in leaves.items()
            if (m, n) in WITH_GRAMS
        }

    got = merging.regmean(base, experts, [identity(2.5)] * 3, alpha=0.7)
    chex.assert_trees_all_close(
        got, jax.tree.map(lambda *w: sum(w) / 3, *experts), rtol=1e-10, atol=1e-12
    )
    # different multiples of the identity weight the experts by them
    got = merging.regmean(base, experts, [identity(c) for c in (1.0, 2.0, 5.0)])
    chex.assert_trees_all_close(
        got, ref_regmean(experts, [identity(c) for c in (1.0, 2.0, 5.0)], 0.9), rtol=1e-10
    )
    want = jax.tree.map(lambda a, b, c: (a + 2 * b + 5 * c) / 8, *experts)
    chex.assert_trees_all_close(got["attn"]["kernel"], want["attn"]["kernel"], rtol=1e-10)


def test_an_unseen_input_feature_gets_the_average(x64):
    rng = np.random.default_rng(5)
    ws = [rng.standard_normal((3, 2)) for _ in range(2)]
    xs = [rng.standard_normal((6, 3)) * [1.0, 0.0, 1.0] for _ in range(2)]  # feature 1 unseen
    got = np.asarray(
        merging.regmean(None, [{"w": w} for w in ws], [{"w": x.T @ x} for x in xs], alpha=1.0)["w"]
    )
    np.testing.assert_allclose(got[1], (ws[0][1] + ws[1][1]) / 2, rtol=1e-12)
    keep = [0, 2]
    sub = ref_regmean_2d([w[keep] for w in ws], [(x.T @ x)[np.ix_(keep, keep)] for x in xs])
    np.testing.assert_allclose(got[keep], sub, rtol=1e-10)


def ref_regmean_2d(ws, gs):
    return np.linalg.solve(sum(gs), sum(g @ w for g, w in zip(gs, ws, strict=True)))


def test_bfloat16_is_computed_in_float32_and_cast_back():
    base, experts, grams = _inputs(np.random.default_rng(6))
    to = lambda t, d: jax.tree.map(lambda x: jnp.asarray(x, d), t)  # noqa: E731
    grams = [to(g, jnp.float32) for g in grams]
    got = merging.regmean(to(base, jnp.bfloat16), [to(e, jnp.bfloat16) for e in experts], grams)
    up = lambda t: to(to(t, jnp.bfloat16), jnp.float32)  # noqa: E731
    want = merging.regmean(up(base), [up(e) for e in experts], grams)
    assert got["attn"]["kernel"].dtype == jnp.bfloat16
    chex.assert_trees_all_close(
        to(got, jnp.float32), to(to(want, jnp.bfloat16), jnp.float32), rtol=0, atol=0
    )


def test_jit_by_name_and_no_mutation():
    base, experts, grams = _inputs(np.random.default_rng(7))
    to32 = lambda t: jax.tree.map(lambda x: x.astype(np.float32), t)  # noqa: E731
    base, experts, grams = to32(base), [to32(e) for e in experts], [to32(g) for g in grams]
    copies = jax.tree.map(np.copy, (base, experts, grams))
    eager = merging.regmean(base, experts, grams, alpha=0.5)
    jitted = jax.jit(lambda b, e, g, a: merging.regmean(b, e, g, alpha=a))(
        base, experts, grams, 0.5
    )
    chex.assert_trees_all_close(jitted, jax.tree.map(np.asarray, eager), rtol=1e-5, atol=1e-6)
    by_name = merging.merge("regmean", base, experts, grams, alpha=0.5)
    chex.assert_trees_all_close(by_name, jax.tree.map(np.asarray, eager), rtol=0, atol=0)
    chex.assert_trees_all_equal((base, experts, grams), copies)


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


# ------------------------------------------------------------------ the Gram pass


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(3, 4, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(4, 2, rngs=rngs)])

    def __call__(self, x):
        return self.layers[0](jax.nn.relu(self.first(x)))


def _by_hand(k1, b1, xs, mask=None):
    x = np.concatenate([np.asarray(b).reshape(-1, 3) for b in xs]).astype(np.float64)
    h = np.maximum(x @ np.asarray(k1, np.float64) + np.asarray(b1, np.float64), 0)
    if mask is not None:
        m = np.concatenate([np.asarray(mi).reshape(-1) for mi in mask])[:, None]
        x, h = x * m, h * m
    return x.T @ x, h.T @ h


def test_nnx_grams_equal_the_inputs_gram_by_hand():
    model = _MLP(nnx.Rngs(0))
    rng = np.random.default_rng(8)
    batches = [jnp.asarray(rng.standard_normal((5, 3)), jnp.float32) for _ in range(3)]
    grams = merging.input_grams(model, None, batches)
    g1, g2 = _by_hand(model.first.kernel[...], model.first.bias[...], batches)
    assert grams["first"]["bias"] is None and grams["layers"][0]["bias"] is None
    np.testing.assert_allclose(np.asarray(grams["first"]["kernel"]), g1, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grams["layers"][0]["kernel"]), g2, rtol=1e-5)
    one = merging.input_grams(model, None, [jnp.concatenate(batches)])
    chex.assert_trees_all_close(one, jax.tree.map(np.asarray, grams), rtol=1e-5)
    mean = merging.input_grams(model, None, batches, normalize=True)
    np.testing.assert_allclose(np.asarray(mean["first"]["kernel"]), g1 / 15, rtol=1e-5)
    # another point's parameters, as an nnx.State or a pure dict
    state = jax.tree.map(lambda x: 2 * x, nnx.state(model, nnx.Param))
    at_state = merging.input_grams(model, state, batches)
    at_dict = merging.input_grams(model, nnx.to_pure_dict(state), batches)
    g1, g2 = _by_hand(2 * model.first.kernel[...], 2 * model.first.bias[...], batches)
    np.testing.assert_allclose(np.asarray(at_state["layers"][0]["kernel"]), g2, rtol=1e-5)
    chex.assert_trees_all_close(at_dict, jax.tree.map(np.asarray, at_state), rtol=1e-6)


def test_nnx_grams_with_a_padding_mask_and_token_axes():
    model = _MLP(nnx.Rngs(1))
    rng = np.random.default_rng(9)
    batches = [
        {
            "x": jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32),
            "m": (rng.random((2, 4)) > 0.4),
        }
        for _ in range(3)
    ]

    class Wrapped(nnx.Module):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, batch):
            return self.inner(batch["x"])

    grams = merging.input_grams(Wrapped(model), None, batches, mask=lambda b: b["m"])
    want = _by_hand(
        model.first.kernel[...],
        model.first.bias[...],
        [b["x"] for b in batches],
        [b["m"] for b in batches],
    )
    np.testing.assert_allclose(np.asarray(grams["inner"]["first"]["kernel"]), want[0], rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grams["inner"]["layers"][0]["kernel"]), want[1], rtol=1e-5
    )
    with pytest.raises(ValueError, match="mask has shape"):
        merging.input_grams(model, None, [jnp.ones((2, 3))], mask=lambda b: jnp.ones(3))
    with pytest.raises(ValueError, match="batches is empty"):
        merging.input_grams(model, None, [])


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="out")(jax.nn.relu(nn.Dense(4, name="hidden")(x)))


def test_linen_grams_equal_the_inputs_gram_by_hand():
    module = _LinenMLP()
    rng = np.random.default_rng(10)
    batches = [jnp.asarray(rng.standard_normal((5, 3)), jnp.float32) for _ in range(3)]
    params = module.init(jax.random.key(0), batches[0])["params"]
    g1, g2 = _by_hand(params["hidden"]["kernel"], params["hidden"]["bias"], batches)
    for model in (module, lambda p, b: module.apply({"params": p}, b)):
        grams = merging.input_grams(model, params, batches)
        assert grams["hidden"]["bias"] is None
        np.testing.assert_allclose(np.asarray(grams["hidden"]["kernel"]), g1, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grams["out"]["kernel"]), g2, rtol=1e-5)
    with pytest.raises(ValueError, match="the layer at hidden has no kernel in params"):
        renamed = {"h": params["hidden"], "out": params["out"]}
        merging.input_grams(lambda p, b: module.apply({"params": params}, b), renamed, batches)


def test_nnx_experts_merge_with_their_grams():
    rng = np.random.default_rng(11)
    batches = [jnp.asarray(rng.standard_normal((6, 3)), jnp.float32) for _ in range(2)]
    models = [_MLP(nnx.Rngs(i)) for i in range(2)]
    grams = [merging.input_grams(m, None, batches) for m in models]
    states = [nnx.state(m, nnx.Param) for m in models]
    merged = merging.regmean(None, states, grams, alpha=0.8)
    assert isinstance(merged, nnx.State)
    pure = merging.regmean(None, [nnx.to_pure_dict(s) for s in states], grams, alpha=0.8)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(merged), jax.tree.map(np.asarray, pure), rtol=0, atol=0
    )
    bias = (states[0]["first"]["bias"][...] + states[1]["first"]["bias"][...]) / 2
    np.testing.assert_allclose(np.asarray(pure["first"]["bias"]), bias, rtol=1e-6)


# ------------------------------------------------------------------ attention projections


def test_general_kernels_with_their_inputs_gram_match_the_reference(x64):
    """A ``DenseGeneral`` kernel ``(*in, *out)`` with the ``(F, F)`` Gram of its flattened
    inputs is merged as the ``(F, ·)`` matrix: a query kernel ``(6, 2, 3)`` (F = 6) and an
    output projection ``(2, 3, 6)`` (F = 6 from its first two axes)."""
    rng = np.random.default_rng(12)
    shapes = {"query": ((6, 2, 3), 1), "out": ((2, 3, 6), 2)}
    base = {n: {"kernel": rng.standard_normal(s)} for n, (s, _) in shapes.items()}
    experts = [jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape), base)]
    experts.append(jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape), base))
    grams = []
    for _ in experts:
        g = {}
        for n, (s, r) in shapes.items():
            x = rng.standard_normal((9, int(np.prod(s[:r]))))
            g[n] = {"kernel": x.T @ x}
        grams.append(g)
    got = merging.regmean(base, experts, grams, alpha=0.7)
    for n, (s, r) in shapes.items():
        f = int(np.prod(s[:r]))
        lhs = rhs = 0.0
        for e, g in zip(experts, grams, strict=True):
            tilde = 0.7 * g[n]["kernel"] + 0.3 * np.diag(np.diag(g[n]["kernel"]))
            lhs, rhs = lhs + tilde, rhs + tilde @ e[n]["kernel"].reshape(f, -1)
        want = np.linalg.solve(lhs, rhs).reshape(s)
        np.testing.assert_allclose(got[n]["kernel"], want, rtol=1e-9, atol=1e-10, err_msg=n)
    bad = [{"query": {"kernel": np.eye(5)}, "out": {"kernel": None}}] * 2
    with pytest.raises(ValueError, match=r"\(F, F\) for F in \[6, 12\]"):
        merging.regmean(base, experts, bad)


def _attention_by_hand(xs, q_kernel, heads_out):
    """The Grams of the query projection's inputs ``x`` and of the output projection's
    inputs (the attention's per-head outputs, flattened to heads·head_dim)."""
    x = np.concatenate([np.asarray(b, np.float64).reshape(-1, q_kernel.shape[0]) for b in xs])
    h = np.concatenate([np.asarray(o, np.float64).reshape(len(o), -1) for o in heads_out])
    return x.T @ x, h.T @ h


def test_nnx_attention_grams_and_merge():
    rng = np.random.default_rng(13)
    batches = [jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32) for _ in range(2)]

    def model(seed):
        return nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(seed)
        )

    attention = model(0)
    grams = merging.input_grams(attention, None, batches)
    assert grams["query"]["kernel"].shape == (8, 8) and grams["out"]["kernel"].shape == (8, 8)
    heads_out = []  # what the output projection receives: (tokens, heads, head_dim)
    for b in batches:
        q, k, v = (attention.query(b), attention.key(b), attention.value(b))
        heads_out.append(nnx.dot_product_attention(q, k, v).reshape(-1, 2, 4))
    gq, go = _attention_by_hand(batches, attention.query.kernel[...], heads_out)
    np.testing.assert_allclose(np.asarray(grams["query"]["kernel"]), gq, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grams["out"]["kernel"]), go, rtol=1e-4, atol=1e-4)
    models = [model(1), model(2)]
    states = [nnx.state(m, nnx.Param) for m in models]
    merged = merging.regmean(None, states, [merging.input_grams(m, None, batches) for m in models])
    assert merged["out"]["kernel"][...].shape == (2, 4, 8)


def test_linen_attention_grams():
    module = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    rng = np.random.default_rng(14)
    batches = [jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32) for _ in range(2)]
    params = module.init(jax.random.key(0), batches[0])["params"]
    grams = merging.input_grams(module, params, batches)
    x = np.concatenate([np.asarray(b, np.float64).reshape(-1, 8) for b in batches])
    np.testing.assert_allclose(np.asarray(grams["key"]["kernel"]), x.T @ x, rtol=1e-5)
    heads_out = []  # what the output projection receives: (tokens, heads, head_dim)
    for b in batches:
        q, k, v = (
            jnp.einsum("btd,dhk->bthk", b, params[n]["kernel"]) + params[n]["bias"]
            for n in ("query", "key", "value")
        )
        heads_out.append(nn.dot_product_attention(q, k, v).reshape(-1, 8))
    h = np.concatenate([np.asarray(o, np.float64) for o in heads_out])
    np.testing.assert_allclose(np.asarray(grams["out"]["kernel"]), h.T @ h, rtol=1e-4, atol=1e-4)
    experts = [jax.tree.map(lambda p, i=i: p + 0.01 * i, params) for i in range(2)]
    merged = merging.regmean(None, experts, [grams, grams])
    assert merged["out"]["kernel"].shape == params["out"]["kernel"].shape


def test_dense_general_contracting_axes_in_any_order():
    """``DenseGeneral(axis=(-1, -2))`` contracts its inputs' last two axes in their own
    order (Flax sorts them): the Gram's features follow the kernel's rows."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(3, axis=(-1, -2), name="proj")(x)

    module = Model()
    rng = np.random.default_rng(15)
    batches = [jnp.asarray(rng.standard_normal((4, 2, 5)), jnp.float32) for _ in range(2)]
    params = module.init(jax.random.key(0), batches[0])["params"]
    assert params["proj"]["kernel"].shape == (2, 5, 3)
    grams = merging.input_grams(module, params, batches)
    x = np.concatenate([np.asarray(b, np.float64).reshape(len(b), -1) for b in batches])
    np.testing.assert_allclose(np.asarray(grams["proj"]["kernel"]), x.T @ x, rtol=1e-5)


def test_experts_giving_a_leaf_grams_of_different_forms_are_refused():
    base = {"w": np.zeros((4, 2, 2), "f4")}
    experts = [{"w": np.ones((4, 2, 2), "f4")}, {"w": np.full((4, 2, 2), 2.0, "f4")}]
    stacked, general = np.stack([np.eye(2, dtype="f4")] * 4), np.eye(4, dtype="f4")
    with pytest.raises(ValueError, match=r"grams\[1\]\['w'\] has shape \(4, 4\)"):
        merging.regmean(base, experts, [{"w": stacked}, {"w": general}])


def test_a_layer_with_batch_axes_gets_no_gram_and_the_others_do():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.per_head = nnx.LinearGeneral(3, 2, batch_axis={0: 4}, rngs=rngs)
            self.head = nnx.Linear(2, 1, rngs=rngs)

        def __call__(self, x):  # x: (4, batch, 3)
            return self.head(self.per_head(x))

    batches = [jnp.ones((4, 5, 3))]
    grams = merging.input_grams(Model(nnx.Rngs(0)), None, batches)
    assert grams["per_head"]["kernel"] is None
    assert grams["head"]["kernel"].shape == (2, 2)
