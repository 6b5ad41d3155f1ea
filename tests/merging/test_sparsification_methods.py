"""Model Breadcrumbs, DELLA, SCE and RAM against float64 NumPy references, out of core, in
bfloat16, and (where mergekit and torch import) against mergekit's own tensor code.

The references never call ``umtam_jax.merging``; they follow mergekit 0.1.5's semantics as
the docstrings state them, entry by entry where that is clearer. DELLA's random draw is
recomputed from the documented derivation: ``u = uniform(fold_in(fold_in(key, expert),
crc32(keystr(leaf path))), shape, float32)``, kept where ``u < p``.

The mergekit comparison runs only where ``mergekit`` and ``torch`` import, e.g. from the
repository root with ``mk`` a virtual environment holding them and the test dependencies::

    PYTHONPATH=. mk/bin/python -m pytest tests/merging/test_sparsification_methods.py -k mergekit
"""

from __future__ import annotations

import functools
import importlib.util
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from tests import trees
from tests.merging import helpers as H
from umtam_jax import checkpoint, engine, merging

NEW = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl")


# Tests on float32 inputs run without x64 (they share compilations); the float64
# references need it.
_FLOAT32_TESTS = {
    "test_della_with_zero_epsilon_draws_dare_masks",
    "test_bfloat16_computes_in_float32",
    "test_out_of_core_equals_in_memory",
}


@pytest.fixture(autouse=True)
def _x64(request):
    with jax.enable_x64(request.function.__name__ not in _FLOAT32_TESTS):
        yield


def _deltas(base, experts):
    return [{p: H.f64(H.get(e, p)) - H.f64(H.get(base, p)) for p in H.PATHS} for e in experts]


def _l1(d, kept):
    before, after = np.abs(d).sum(), np.abs(kept).sum()
    return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept


def _desc_order(x):
    """Flat indices by descending |x|, equal magnitudes lower index first."""
    return np.argsort(-np.abs(np.ravel(x)), kind="stable")


# ------------------------------------------------------------------------ references


def ref_breadcrumbs(base, experts, *, density, gamma=0.01, scaling=1.0, weights=None,
                    l1_rescale=False, consensus=False, normalize=False):  # fmt: skip
    k = len(experts)
    dens = density if isinstance(density, list | tuple) else [density] * k
    sparse = []
    for d, delta in zip(dens, _deltas(base, experts), strict=True):
        out = {}
        for p in H.PATHS:
            x = delta[p]
            n = x.size
            if d >= 1:
                out[p] = x
                continue
            n_keep, n_top = int(d * n), int(gamma * n)
            n_bot = max(0, n - n_keep - n_top)
            ascending = _desc_order(x)[::-1]
            keep = np.zeros(n, bool)
            keep[ascending[n_bot : n_bot + n_keep]] = True
            kept = np.where(keep.reshape(x.shape), x, 0.0)
            out[p] = _l1(x, kept) if l1_rescale else kept
        sparse.append(out)
    return H._ref_gta(base, sparse, weights or [1.0] * k, consensus, normalize, scaling)


def della_probs(x, density, epsilon, layout="out_in"):
    """Keep probabilities: rank along the input axis (axis 1 of a PyTorch weight, axis -2
    of a Flax kernel; a vector's only axis), ascending |x|."""
    if x.ndim >= 2 and layout == "in_out":
        moved = np.moveaxis(x, -2, 1)
        return np.moveaxis(della_probs(moved, density, epsilon), 1, -2)
    rows = np.abs(x).reshape(1, -1) if x.ndim < 2 else np.abs(x)
    m = rows.shape[1]
    p = np.empty(rows.shape)
    for idx in np.ndindex(*rows.shape):
        i = idx[1]
        row = [idx[:1] + (j,) + idx[2:] for j in range(m)]
        rank = sum(rows[r] < rows[idx] or (rows[r] == rows[idx] and r[1] < i) for r in row)
        p[idx] = density if m == 1 else density - epsilon + 2 * epsilon * rank / (m - 1)
    return p.reshape(x.shape)


def della_uniforms(key, t, keystr, shape, piece=None):
    """The documented draw of expert ``t`` on the leaf ``keystr`` (``"['attn']['bias']"``),
    or on slice ``piece`` of it (``fold_in(leaf_key, piece)``)."""
    leaf_key = jax.random.fold_in(
        jax.random.fold_in(key, t), np.uint32(zlib.crc32(keystr.encode()))
    )
    if piece is not None:
        leaf_key = jax.random.fold_in(leaf_key, piece)
    return np.asarray(jax.random.uniform(leaf_key, shape, jnp.float32))


def _della_drop(x, d, epsilon, layout, draw, rescale, l1_rescale):
    prob = della_probs(x, d, epsilon, layout)
    kept = np.where(draw(x.shape) < prob, x, 0.0)
    return _l1(x, kept) if l1_rescale else (kept / prob if rescale else kept)


def ref_della(base, experts, key, *, density, epsilon=0.15, scaling=1.0, weights=None,
              rescale=True, l1_rescale=False, consensus=True, normalize=False,
              layout="in_out", sliced=False):  # fmt: skip
    """``sliced``: each slice over ``H.SLICED``'s batch axes is a leaf of its own, slice i
    (row-major over those axes) drawn with ``fold_in(leaf_key, i)``."""
    k = len(experts)
    dens = density if isinstance(density, list | tuple) else [density] * k
    dropped = []
    for t, (d, delta) in enumerate(zip(dens, _deltas(base, experts), strict=True)):
        out = {}
        for p in H.PATHS:
            x = delta[p]
            if d >= 1:
                out[p] = x
                continue
            keystr = "".join(f"[{k!r}]" for k in p)
            batch = H.SLICED[p] if sliced else ()
            if not batch:
                draw = functools.partial(della_uniforms, key, t, keystr)
                out[p] = _della_drop(x, d, epsilon, layout, draw, rescale, l1_rescale)
                continue
            out[p] = np.zeros_like(x)
            for i, index in enumerate(np.ndindex(*[x.shape[a] for a in batch])):
                where = [slice(None)] * x.ndim
                for a, j in zip(batch, index, strict=True):
                    where[a] = j
                draw = functools.partial(della_uniforms, key, t, keystr, piece=i)
                part = _della_drop(x[tuple(where)], d, epsilon, layout, draw, rescale, l1_rescale)
                out[p][tuple(where)] = part
        dropped.append(out)
    return H._ref_gta(base, dropped, weights or [1.0] * k, consensus, normalize, scaling)


def ref_sce(base, experts, *, select_topk=1.0, scaling=1.0):
    k, out = len(experts), {}
    deltas = _deltas(base, experts)
    for p in H.PATHS:
        tv = np.stack([d[p] for d in deltas])
        if select_topk < 1:
            var = ((tv - tv.mean(0)) ** 2).mean(0)
            n_keep = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))
            keep = np.zeros(var.size, bool)
            keep[np.argsort(-var.ravel(), kind="stable")[:n_keep]] = True
            tv = tv * keep.reshape(var.shape)
        c = np.array([np.mean(x**2) for x in tv])
        c = np.full(k, 1.0 / k) if abs(c.sum()) < 1e-6 else c / c.sum()
        merged = np.zeros(tv.shape[1:])
        for idx in np.ndindex(*merged.shape):
            col = tv[(slice(None),) + idx]
            vote = 1.0 if col.sum() >= 0 else -1.0
            m = [np.sign(x) == vote for x in col]
            num = sum(c[t] * col[t] for t in range(k) if m[t])
            merged[idx] = num / max(sum(c[t] for t in range(k) if m[t]), 1e-6)
        out[p] = H.f64(H.get(base, p)) + scaling * merged
    return out


def ref_ram(base, experts, *, epsilon=1e-5, scaling=1.0, r=0.0, alpha=0.0):
    """RAM (r = 0) or RAM+ tensor-local."""
    k, out = len(experts), {}
    deltas = _deltas(base, experts)
    for p in H.PATHS:
        tv = np.stack([d[p] for d in deltas]).reshape(k, -1)
        counted = np.abs(tv) > epsilon
        count = counted.sum(0)
        unique = [(counted[t] & (count == 1)).sum() for t in range(k)]
        shared = [(counted[t] & (count > 1)).sum() for t in range(k)]
        lam = [
            1 + r * min(max(s / max(u, epsilon), 0), alpha)
            for s, u in zip(shared, unique, strict=True)
        ]
        merged = np.zeros(tv.shape[1])
        for i in range(tv.shape[1]):
            who = [t for t in range(k) if counted[t, i]]
            if len(who) == 1:
                merged[i] = tv[who[0], i] * lam[who[0]]
            elif who:
                merged[i] = np.mean([tv[t, i] for t in who])
        out[p] = H.f64(H.get(base, p)) + scaling * merged.reshape(np.shape(H.get(base, p)))
    return out


# ------------------------------------------------------------------------ against references


def test_registry_entries_match_their_functions():
    for name in NEW:
        m = merging.METHODS[name]
        assert m.fn is getattr(merging, name)
        assert name in merging.describe(m)
    assert merging.METHODS["della"].defaults()["epsilon"] == 0.15
    assert merging.METHODS["breadcrumbs"].defaults()["gamma"] == 0.01


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 0.5},
        {"density": [0.3, 0.9, 1.0], "gamma": 0.1, "scaling": 0.7, "weights": [1.0, -0.5, 2.0]},
        {"density": 0.6, "gamma": 0.5, "l1_rescale": True},  # n_bot = 0: outlier drop reduced
        {"density": 0.15, "gamma": 0.0},  # int(density · N) = 0 on small leaves: all dropped
    ],
)
def test_breadcrumbs_matches_reference(ties, kwargs):
    base, experts = H.random_experts(np.random.default_rng(1), 3)
    if ties:
        for normalize in (False, True):
            got = merging.breadcrumbs_ties(base, experts, normalize=normalize, **kwargs)
            want = ref_breadcrumbs(base, experts, consensus=True, normalize=normalize, **kwargs)
            H.assert_tree_close(got, want)
    else:
        H.assert_tree_close(
            merging.breadcrumbs(base, experts, **kwargs), ref_breadcrumbs(base, experts, **kwargs)
        )


def test_breadcrumbs_equal_magnitudes_lower_index_ranks_higher():
    base = {"w": jnp.zeros(6)}
    experts = [{"w": jnp.array([2.0, -2.0, 2.0, 1.0, -1.0, 1.0])}]
    # N = 6: drop int(0.2·6) = 1 largest (the first 2), keep int(0.5·6) = 3 next.
    got = merging.breadcrumbs(base, experts, density=0.5, gamma=0.2)["w"]
    np.testing.assert_array_equal(got, [0.0, -2.0, 2.0, 1.0, 0.0, 0.0])
    # quantized task vectors: many ties inside and across the window
    rng = np.random.default_rng(2)
    base, experts = H.random_experts(rng, 2)
    experts = [jax.tree.map(lambda b: b + 0.5 * rng.integers(-2, 3, np.shape(b)), base)] * 2
    kwargs = {"density": 0.4, "gamma": 0.2, "weights": [1.0, 0.5]}
    H.assert_tree_close(
        merging.breadcrumbs(base, experts, **kwargs), ref_breadcrumbs(base, experts, **kwargs)
    )


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 0.5},
        {"density": [0.3, 0.7, 1.0], "epsilon": 0.2, "weights": [1.0, 2.0, -0.5], "scaling": 0.8},
        {"density": 0.4, "epsilon": 0.0, "rescale": False},
        {"density": 0.6, "epsilon": 0.3, "l1_rescale": True},
    ],
)
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_della_matches_reference_given_the_documented_draws(linear, kwargs, layout):
    base, experts = H.random_experts(np.random.default_rng(3), 3)
    key = jax.random.key(7)
    kwargs = {**kwargs, "layout": layout}
    if linear:
        got = merging.della_linear(base, experts, key=key, **kwargs)
        H.assert_tree_close(got, ref_della(base, experts, key, consensus=False, **kwargs))
        return
    for normalize in (False, True):
        got = merging.della(base, experts, key=key, normalize=normalize, **kwargs)
        want = ref_della(base, experts, key, normalize=normalize, **kwargs)
        H.assert_tree_close(got, want)


@pytest.mark.parametrize("linear", [False, True])
def test_della_per_slice_matches_reference_given_the_documented_draws(linear):
    """A layout ``scope``: each slice ranked and drawn as a leaf of its own, slice i with
    ``fold_in(leaf_key, i)`` (a stacked ``(L, d)`` bias ranked per layer)."""
    base, experts = H.random_experts(np.random.default_rng(4), 3)
    key, kwargs = jax.random.key(8), {"density": 0.5, "epsilon": 0.2}
    fn = merging.della_linear if linear else merging.della
    got = fn(base, experts, key=key, scope=H.sliced_scope, **kwargs)
    want = ref_della(base, experts, key, consensus=not linear, normalize=not linear,
                     sliced=True, **kwargs)  # fmt: skip
    H.assert_tree_close(got, want)
    raw = jax.random.key_data(key)  # a raw uint32 key draws the same
    H.assert_tree_close(fn(base, experts, key=raw, scope=H.sliced_scope, **kwargs), want)


def test_della_keep_rates_follow_the_magnitude_ranks():
    # one 200×400 PyTorch-layout leaf, |Δ| distinct: rows of 400 ranked independently
    rng = np.random.default_rng(4)
    delta = rng.permuted(np.tile(np.arange(1.0, 401.0), (200, 1)), axis=1)
    base, expert = {"w": jnp.zeros((200, 400))}, {"w": jnp.asarray(delta)}
    d, eps = 0.4, 0.2
    kept = []
    for t, key in enumerate([jax.random.key(0), jax.random.key(1)]):
        out = merging.della_linear(
            base, [expert], density=d, epsilon=eps, key=key, rescale=False, layout="out_in"
        )
        kept.append(np.asarray(out["w"]) != 0)
        assert abs(kept[t].mean() - d) < 0.01  # mean keep probability: the density
        low, high = kept[t][delta <= 40].mean(), kept[t][delta > 360].mean()
        assert abs(low - (d - 0.9 * eps)) < 0.02 and abs(high - (d + 0.9 * eps)) < 0.02
    assert (kept[0] != kept[1]).mean() > 0.3  # another key, another draw
    # two leaves of the same shape get different draws (the key depends on the path)
    out = merging.della_linear({"a": base["w"], "b": base["w"]}, [{"a": delta, "b": delta}],
                               density=d, key=jax.random.key(0), rescale=False)  # fmt: skip
    assert (np.asarray(out["a"]) != np.asarray(out["b"])).mean() > 0.3


def test_della_degenerate_cases():
    base, experts = H.random_experts(np.random.default_rng(5), 3)
    key = jax.random.key(0)
    # density 1: nothing dropped (della = ties without trimming, della_linear = TA)
    H.assert_tree_close(merging.della(base, experts, density=1.0, key=key),
                        H.ref_ties(base, experts, density=1.0))  # fmt: skip
    H.assert_tree_close(merging.della_linear(base, experts, density=1.0, key=key, scaling=0.5),
                        H.ref_task_arithmetic(base, experts, scaling=0.5))  # fmt: skip
    with pytest.raises(ValueError, match="density ± epsilon"):
        merging.della(base, experts, density=0.1, key=key)  # 0.1 - 0.15 <= 0
    with pytest.raises(ValueError, match="density ± epsilon"):
        merging.della_linear(base, experts, density=[0.5, 0.9, 0.5], epsilon=0.1, key=key)
    with pytest.raises(ValueError, match=r"epsilon must lie in \[0.0, inf\]"):
        merging.della(base, experts, density=0.5, epsilon=-0.1, key=key)
    # Anything but one key (an int seed, a batch of keys) is named as the key's error.
    for bad in (None, 0, jax.random.split(key, 2)):
        with pytest.raises(TypeError, match="key must be one JAX PRNG key"):
            merging.della(base, experts, density=0.5, key=bad)
    legacy = jax.random.PRNGKey(0)  # raw uint32 keys are keys too
    merging.della(base, experts, density=0.5, epsilon=0.05, key=legacy)
    with jax.default_prng_impl("rbg"):  # uint32[4] (a TPU setting)
        merging.della(base, experts, density=0.5, epsilon=0.05, key=jax.random.PRNGKey(0))


def test_traced_options_must_be_scalars():
    """Under ``jit`` an option's value is unknown but its shape is not: an array where a
    number belongs is an error naming it, not a broadcast merged leaf of another shape."""
    base, experts = {"w": jnp.zeros(4)}, [{"w": jnp.ones(4)}, {"w": -jnp.ones(4)}]
    merge = jax.jit(lambda s: merging.task_arithmetic(base, experts, scaling=s))
    assert merge(jnp.float32(0.5))["w"].shape == (4,)
    with pytest.raises(TypeError, match=r"scaling must be a scalar, got a traced array of shape"):
        merge(jnp.ones((2, 1)))
    with pytest.raises(TypeError, match=r"t must be a scalar"):
        jax.jit(lambda t: merging.slerp(base, experts, t=t))(jnp.ones((3, 1)))


def test_della_with_zero_epsilon_draws_dare_masks():
    # ε = 0: every keep probability is the density, and the draw is DARE's
    rng = np.random.default_rng(6)
    base = {"a": {"w": np.zeros((4, 50), np.float32)}}
    experts = [{"a": {"w": rng.standard_normal((4, 50)).astype(np.float32)}} for _ in range(2)]
    key = jax.random.key(11)
    for rescale in (False, True):  # the same masks; rescaled equal up to rounding
        got = merging.della_linear(
            base, experts, density=0.3, epsilon=0.0, key=key, rescale=rescale
        )
        want = merging.dare(base, experts, density=0.3, key=key, rescale=rescale)
        np.testing.assert_allclose(
            got["a"]["w"], want["a"]["w"], rtol=0, atol=1e-5 if rescale else 0
        )
        assert 0.4 < np.mean(np.asarray(got["a"]["w"]) != 0) < 0.62  # 1 − 0.7²


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_reference(select_topk):
    base, experts = H.random_experts(np.random.default_rng(7), 3)
    for scaling in (1.0, 0.6):
        got = merging.sce(base, experts, select_topk=select_topk, scaling=scaling)
        H.assert_tree_close(got, ref_sce(base, experts, select_topk=select_topk, scaling=scaling))


def test_sce_degenerate_cases():
    rng = np.random.default_rng(8)
    base, experts = H.random_experts(rng, 2)
    # tiny task vectors: Σ mean(Δ²) < 1e-6 gives uniform weights
    tiny = [jax.tree.map(lambda b, e: b + 1e-4 * (e - b), base, e) for e in experts]
    for s in (1.0, 0.5):
        H.assert_tree_close(merging.sce(base, tiny, select_topk=s),
                            ref_sce(base, tiny, select_topk=s))  # fmt: skip
    # one expert: zero variance everywhere, so a selection keeps nothing
    H.assert_tree_close(merging.sce(base, experts[:1]), ref_sce(base, experts[:1]))
    out = merging.sce(base, experts[:1], select_topk=0.5)
    chex.assert_trees_all_equal(out, base)
    with pytest.raises(ValueError, match="select_topk must lie in"):
        merging.sce(base, experts, select_topk=1.5)


@pytest.mark.parametrize("epsilon", [1e-5, 0.05, 10.0])
def test_ram_matches_reference(epsilon):
    rng = np.random.default_rng(9)
    base, experts = H.random_experts(rng, 3)
    # many entries unchanged by one or more experts: unique, shared and empty entries
    experts = [
        jax.tree.map(lambda b, e: np.where(rng.random(np.shape(b)) < 0.5, b, e), base, e)
        for e in experts
    ]
    got = merging.ram(base, experts, epsilon=epsilon, scaling=0.9)
    H.assert_tree_close(got, ref_ram(base, experts, epsilon=epsilon, scaling=0.9))
    for r, alpha in ((0.1, 0.2), (0.5, 3.0)):
        got = merging.ramplus_tl(base, experts, r=r, alpha=alpha, epsilon=epsilon)
        H.assert_tree_close(got, ref_ram(base, experts, epsilon=epsilon, r=r, alpha=alpha))


def test_ramplus_tl_with_zero_epsilon_and_an_expert_that_changed_nothing():
    """mergekit's s/max(u, 0) is 0/0 for an expert with no counted entries, and its whole
    merged tensor NaN; here that expert's λ is 1 (it scales no entry anyway)."""
    base = {"w": np.zeros(3)}
    experts = [{"w": np.array([1.0, 2.0, 0.0])}, {"w": np.array([0.0, 4.0, 0.0])}, base]
    got = merging.ramplus_tl(base, experts, r=0.1, alpha=0.2, epsilon=0.0)
    # entry 0: expert 0's alone, λ = 1 + 0.1·min(1/1, 0.2); entry 1 shared: the mean
    np.testing.assert_allclose(np.asarray(got["w"]), [1.02, 3.0, 0.0], rtol=1e-6)


def test_option_errors():
    base, experts = H.random_experts(np.random.default_rng(10), 2)
    with pytest.raises(ValueError, match=r"gamma must lie in \[0.0, 1.0\]"):
        merging.breadcrumbs(base, experts, density=0.5, gamma=1.5)
    with pytest.raises(ValueError, match="density must lie in"):
        merging.breadcrumbs_ties(base, experts, density=0.0)
    with pytest.raises(TypeError, match="gamma must be a static"):
        jax.jit(lambda g: merging.breadcrumbs(base, experts, density=0.5, gamma=g))(0.1)
    with pytest.raises(ValueError, match="epsilon must lie in"):
        merging.ram(base, experts, epsilon=-1.0)
    with pytest.raises(TypeError, match="unexpected parameters"):
        merging.merge("sce", base, experts, weights=[1.0, 1.0])


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


# ------------------------------------------------------------------------ mergekit itself

_HAS_MERGEKIT = all(importlib.util.find_spec(m) for m in ("mergekit", "torch"))
mergekit_only = pytest.mark.skipif(not _HAS_MERGEKIT, reason="needs mergekit and torch")

MK_SHAPES = {"attn": {"bias": (16,), "kernel": (12, 16)}, "conv": {"kernel": (3, 5, 4)}}
MK_WEIGHTS, MK_SCALING = [1.0, 0.5], 0.8
# Our float32 outputs against mergekit's, name by name.
MK_TOL = {"rtol": 0, "atol": 1e-5, "dtype": np.float32}


@pytest.fixture(scope="module")
def mk_models():
    rng = np.random.default_rng(13)
    tree = lambda f: {m: {n: f(s) for n, s in v.items()} for m, v in MK_SHAPES.items()}  # noqa: E731
    base = tree(lambda s: rng.standard_normal(s).astype(np.float32))
    experts = [
        jax.tree.map(lambda b: (b + 0.1 * rng.standard_normal(b.shape)).astype(np.float32), base)
        for _ in MK_WEIGHTS
    ]
    return base, experts


def _mergekit(method, base, experts, parameters):
    torch = pytest.importorskip("torch")
    from mergekit.merge_methods import merge_tensors

    out = {}
    named = [trees.leaves_by_name(t).items() for t in (base, *experts)]
    for (path, b), *ws in zip(*named, strict=True):
        tensors = [torch.from_numpy(b.copy())] + [torch.from_numpy(w.copy()) for _, w in ws]
        out[path] = merge_tensors(tensors, method, parameters=parameters, base_index=0).numpy()
    return out


@mergekit_only
def test_mergekit_sparsification_defaults_are_the_ones_mirrored():
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import get

    def defaults(name):
        return {p.name: p.default for p in get(name).spec.parameters if not p.required}

    assert defaults("breadcrumbs")["gamma"] == defaults("breadcrumbs_ties")["gamma"] == 0.01
    assert defaults("della")["epsilon"] == defaults("della_linear")["epsilon"] == 0.15
    assert (defaults("breadcrumbs")["normalize"], defaults("breadcrumbs_ties")["normalize"]) == (
        False,
        False,
    )
    assert (defaults("della")["normalize"], defaults("della_linear")["normalize"]) == (True, False)
    assert defaults("della")["rescale"] and not defaults("breadcrumbs")["rescale"]
    assert defaults("sce") == {"int8_mask": False, "select_topk": 1.0}
    assert defaults("ram") == {"epsilon": 1e-5}
    assert defaults("ramplus_tl") == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}


@mergekit_only
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_mergekit_breadcrumbs(mk_models, name, rescale):
    base, experts = mk_models
    for density, gamma in ((0.5, 0.05), (0.7, 0.4), (1.0, 0.1)):
        params = {"density": density, "gamma": gamma, "weight": MK_WEIGHTS, "lambda": MK_SCALING}
        kwargs = {"density": density, "gamma": gamma, "weights": MK_WEIGHTS}
        for normalize in (False, True) if name == "breadcrumbs_ties" else (False,):
            if name == "breadcrumbs_ties":
                params["normalize"] = kwargs["normalize"] = normalize
            ours = merging.merge(name, base, experts, scaling=MK_SCALING, l1_rescale=rescale,
                                 **kwargs)  # fmt: skip
            theirs = _mergekit(name, base, experts, {**params, "rescale": rescale})
            trees.assert_close_by_name(ours, theirs, **MK_TOL)


@pytest.fixture
def replay_della(monkeypatch):
    """Replaces ``torch.bernoulli`` in mergekit's DELLA by our documented draw ``u < p``
    (after checking mergekit's probabilities are ours)."""
    torch = pytest.importorskip("torch")
    queue = []

    def fake(probs, *args, **kwargs):
        assert not args and not kwargs
        u, want = queue.pop(0)
        np.testing.assert_allclose(probs.numpy().reshape(want.shape), want, rtol=0, atol=1e-6)
        return torch.from_numpy(u.reshape(probs.shape) < probs.numpy()).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake)
    return queue


@mergekit_only
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_mergekit_della(mk_models, replay_della, name, rescale):
    base, experts = mk_models
    key = jax.random.key(5)
    for density, eps in ((0.5, 0.15), (0.3, 0.25), (1.0, 0.15)):
        draws = []  # in mergekit's order: leaf by leaf, expert by expert
        if density < 1:
            for path, b in trees.leaves_by_name(base).items():
                for t, e in enumerate(experts):
                    u = della_uniforms(key, t, path, b.shape)
                    delta = trees.leaves_by_name(e)[path] - b
                    draws.append((u, della_probs(delta, density, eps, "out_in")))
        params = {"density": density, "epsilon": eps, "weight": MK_WEIGHTS, "lambda": MK_SCALING}
        kwargs = {"density": density, "epsilon": eps, "weights": MK_WEIGHTS, "key": key}
        kwargs["layout"] = "out_in"  # mergekit's tensors are PyTorch (d_out, d_in) weights
        for normalize in (False, True) if name == "della" else (False,):
            if name == "della":
                params["normalize"] = kwargs["normalize"] = normalize
            ours = merging.merge(name, base, experts, scaling=MK_SCALING, rescale=False,
                                 l1_rescale=rescale, **kwargs)  # fmt: skip
            replay_della.extend(draws)
            theirs = _mergekit(name, base, experts, {**params, "rescale": rescale})
            assert not replay_della  # every draw was consumed
            trees.assert_close_by_name(ours, theirs, **MK_TOL)


@mergekit_only
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.2, 0.0])
def test_mergekit_sce(mk_models, select_topk):
    base, experts = mk_models
    ours = merging.sce(base, experts, select_topk=select_topk)
    theirs = _mergekit("sce", base, experts, {"select_topk": select_topk})
    trees.assert_close_by_name(ours, theirs, **MK_TOL)
    experts3 = [*experts, jax.tree.map(lambda b: b + np.float32(0.05), base)]
    ours = merging.sce(base, experts3, select_topk=select_topk)
    theirs = _mergekit("sce", base, experts3, {"select_topk": select_topk})
    trees.assert_close_by_name(ours, theirs, **MK_TOL)


@mergekit_only
@pytest.mark.parametrize("epsilon", [1e-5, 0.08])
def test_mergekit_ram(mk_models, epsilon):
    base, experts = mk_models
    rng = np.random.default_rng(14)
    experts = [  # entries unchanged by some experts: unique and shared contributions
        jax.tree.map(lambda b, e: np.where(rng.random(b.shape) < 0.4, b, e), base, e)
        for e in experts
    ]
    ours = merging.ram(base, experts, epsilon=epsilon)
    trees.assert_close_by_name(
        ours, _mergekit("ram", base, experts, {"epsilon": epsilon}), **MK_TOL
    )
    for r, alpha in ((0.1, 0.2), (0.7, 5.0)):
        ours = merging.ramplus_tl(base, experts, r=r, alpha=alpha, epsilon=epsilon)
        theirs = _mergekit(
            "ramplus_tl", base, experts, {"r": r, "alpha": alpha, "epsilon": epsilon}
        )
        trees.assert_close_by_name(ours, theirs, **MK_TOL)


def test_dare_with_a_density_below_float32_keeps_nothing_instead_of_nan():
    """``density=1e-50`` is valid but 0 in float32: nothing is kept (the base comes back),
    eagerly and under ``jit``, instead of 0 / 0 in the dropped entries' rescale."""
    w = jnp.ones(64, jnp.float32)
    base, experts = {"w": 0 * w}, [{"w": w}, {"w": -2 * w}]
    key = jax.random.key(0)
    for fn in (merging.dare, jax.jit(merging.dare, static_argnames="density")):
        np.testing.assert_array_equal(fn(base, experts, density=1e-50, key=key)["w"], base["w"])
