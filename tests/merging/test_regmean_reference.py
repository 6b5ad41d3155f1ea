"""RegMean against a float64 NumPy reference written here: the closed form's special cases
(alpha 1 and 0, identical experts, scaled identity Grams, unseen input features),
bfloat16, jit, and ``DenseGeneral`` kernels merged with the Gram of their flattened
inputs."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umtam_jax import merging


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
