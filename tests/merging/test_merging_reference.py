"""Every merging method against the float64 NumPy reference in ``helpers`` (x64 enabled)."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from umtam_jax import merging
from umtam_jax.optimizer import DenseStatistics

from . import helpers as H

#: Every keep-count scope: per tensor, per layer, over the expert, per slice of the batch
#: axes a layout callable gives each leaf.
SCOPES = ["tensor", "layer", "global", pytest.param(H.sliced_scope, id="sliced")]


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


FLAGS = list(itertools.product([True, False], repeat=3))


@pytest.mark.parametrize("normalize", ["all", "selected"])
@pytest.mark.parametrize("pruning,election,aggregation", FLAGS)
def test_umtam_matches_reference_all_flag_combinations(pruning, election, aggregation, normalize):
    rng = np.random.default_rng(hash((pruning, election, aggregation, normalize)) % 2**32)
    base, experts = H.random_experts(rng, 3)
    stats = H.random_statistics(rng, 3)
    kwargs = dict(
        density=0.4,
        lambda_momentum=0.7,
        lambda_curvature=1.3,
        curvature_pruning=pruning,
        sign_election=election,
        curvature_aggregation=aggregation,
        normalize=normalize,
        scaling=0.9,
    )
    got = merging.umtam(base, experts, stats, **kwargs)
    H.assert_tree_close(got, H.ref_umtam(base, experts, stats, **kwargs))
    assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, base)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0, (0.2, 0.6, 0.9)])
def test_umtam_scope_and_density(scope, density):
    rng = np.random.default_rng(7)
    base, experts = H.random_experts(rng, 3)
    stats = H.random_statistics(rng, 3)
    got = merging.umtam(base, experts, stats, density=density, scope=scope)
    H.assert_tree_close(got, H.ref_umtam(base, experts, stats, density=density, scope=scope))


@pytest.mark.parametrize("normalize", ["all", "selected"])
def test_umtam_final_saliency_and_dict_statistics(normalize):
    # Statistics without tracked saliency (optimizer run with saliency="final"), restored as
    # plain dicts: S is computed from the experts, the base and R, C (in float32 by the
    # optimizer's helper, hence the looser tolerance).
    rng = np.random.default_rng(3)
    base, experts = H.random_experts(rng, 2)
    stats = H.random_statistics(rng, 2, tracked=False)
    got = merging.umtam(
        base, experts, [H.as_dict_statistics(s) for s in stats], density=0.5, normalize=normalize
    )
    want = H.ref_umtam(base, experts, stats, density=0.5, normalize=normalize)
    H.assert_tree_close(got, want, rtol=1e-6, atol=1e-7)


def test_umtam_from_real_optimizer_state(monkeypatch):
    import umtam_jax

    rng = np.random.default_rng(11)
    base = {"w": jnp.asarray(rng.standard_normal((8, 6))), "b": jnp.zeros(6)}
    opt = umtam_jax.umtam(0.05, rank=2, min_dim_size_to_factor=4)

    @jax.jit
    def step(params, state, target):
        loss = lambda p: jnp.sum((p["w"] - target) ** 2) + jnp.sum(p["b"] ** 2)  # noqa: E731
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), state

    experts, states = [], []
    for seed in range(2):
        target = jnp.asarray(np.random.default_rng(seed).standard_normal((8, 6)))
        params, state = base, jax.jit(opt.init)(base)
        for _ in range(3):
            params, state = step(params, state, target)
        experts.append(params)
        states.append(state)
    stats = [umtam_jax.statistics(s) for s in states]
    got_state = merging.umtam(base, experts, states, density=0.5)
    got_stats = merging.umtam(base, experts, stats, density=0.5)
    chex.assert_trees_all_equal(got_state, got_stats)
    monkeypatch.setattr(H, "PATHS", [("b",), ("w",)])  # the reference over this tree
    want = H.ref_umtam(base, experts, stats, density=0.5)
    H.assert_tree_close(got_stats, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, -1.0]])
def test_task_arithmetic(weights):
    rng = np.random.default_rng(1)
    base, experts = H.random_experts(rng, 3)
    got = merging.task_arithmetic(base, experts, scaling=0.7, weights=weights)
    H.assert_tree_close(got, H.ref_task_arithmetic(base, experts, scaling=0.7, weights=weights))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0, [0.3, 0.8, 0.5]])
@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 1.0], [1.0, -1.0, 1.0]])
def test_ties(scope, density, weights):
    rng = np.random.default_rng(2)
    base, experts = H.random_experts(rng, 3)
    got = merging.ties(base, experts, density=density, scaling=1.1, weights=weights, scope=scope)
    want = H.ref_ties(base, experts, density=density, scaling=1.1, weights=weights, scope=scope)
    H.assert_tree_close(got, want)


def test_ties_vote_zero_is_positive_and_zero_divisor():
    # Hand-made entries: opposite equal deltas (sum 0 -> vote +1), all-zero deltas
    # (divisor 0 -> 1), weights summing to 0 among the kept experts.
    base = {"w": jnp.zeros(3)}
    experts = [{"w": jnp.array([1.0, 0.0, 2.0])}, {"w": jnp.array([-1.0, 0.0, 3.0])}]
    got = merging.ties(base, experts, density=1.0)
    np.testing.assert_allclose(np.asarray(got["w"]), [1.0, 0.0, 2.5])
    got = merging.ties(base, experts, density=1.0, weights=[1.0, -1.0])
    # weighted deltas [1, 0, 2] and [1, 0, -3]: votes +, +, -; divisors 0 -> 1, 1, -1.
    np.testing.assert_allclose(np.asarray(got["w"]), [2.0, 0.0, 3.0])


@pytest.mark.parametrize("rescale,l1", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("density", [0.5, [0.3, 1.0]])
def test_dare_and_dare_ties(rescale, l1, density):
    rng = np.random.default_rng(4)
    base, experts = H.random_experts(rng, 2)
    key = jax.random.key(5)
    dens = density if isinstance(density, list) else [density] * 2
    keeps = H.dare_keeps(key, dens, base)
    kw = dict(density=density, scaling=0.8, weights=[1.5, 0.5], rescale=rescale, l1_rescale=l1)
    got = merging.dare(base, experts, key=key, **kw)
    H.assert_tree_close(got, H.ref_dare(base, experts, keeps, **kw))
    for normalize in (False, True):
        got = merging.dare_ties(base, experts, key=key, normalize=normalize, **kw)
        want = H.ref_dare_ties(base, experts, keeps, normalize=normalize, **kw)
        H.assert_tree_close(got, want)


def test_dare_is_reproducible_and_keeps_density_fraction():
    base = {"w": jnp.zeros((200, 100))}
    experts = [{"w": jnp.ones((200, 100))}]
    a = merging.dare(base, experts, density=0.3, key=jax.random.key(0))
    b = merging.dare(base, experts, density=0.3, key=jax.random.key(0))
    c = merging.dare(base, experts, density=0.3, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(b["w"]))
    assert not np.array_equal(np.asarray(a["w"]), np.asarray(c["w"]))
    kept = np.asarray(a["w"]) != 0
    assert abs(kept.mean() - 0.3) < 0.02
    np.testing.assert_allclose(np.asarray(a["w"])[kept], 1 / 0.3)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("weights", [None, [2.0, 1.0, 0.5]])
def test_fisher(with_base, weights):
    rng = np.random.default_rng(6)
    base, experts = H.random_experts(rng, 3)
    fishers = [H.build(lambda p, s, _: rng.random(s)) for _ in range(3)]
    got = merging.fisher(base if with_base else None, experts, fishers, weights=weights)
    H.assert_tree_close(got, H.ref_fisher(base, experts, fishers, weights=weights), rtol=1e-9)


def test_fisher_zero_fishers_floor_gives_mean():
    experts = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 6.0])}]
    zeros = [{"w": jnp.zeros(2)}] * 2
    got = merging.fisher(None, experts, zeros)
    np.testing.assert_allclose(np.asarray(got["w"]), [2.0, 4.0])
    got = merging.fisher({"w": jnp.full(2, 9.0)}, experts, zeros, fisher_floor=0.0)
    np.testing.assert_allclose(np.asarray(got["w"]), [9.0, 9.0])


def test_diagonal_fisher_per_example_and_per_batch():
    rng = np.random.default_rng(8)
    w = rng.standard_normal(3)
    xs = [rng.standard_normal((4, 3)) for _ in range(2)]
    ys = [rng.standard_normal(4) for _ in range(2)]
    batches = [{"x": x, "y": y} for x, y in zip(xs, ys, strict=True)]

    def loss(p, b):
        return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)

    got = merging.diagonal_fisher(loss, {"w": jnp.asarray(w)}, batches)
    # grad of (x·w − y)² for one example: 2 (x·w − y) x.
    per_ex = [2 * (x @ w - y)[:, None] * x for x, y in zip(xs, ys, strict=True)]
    want = np.mean(np.concatenate(per_ex) ** 2, axis=0)
    np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-10)
    got = merging.diagonal_fisher(loss, {"w": jnp.asarray(w)}, batches, per_example=False)
    want = np.mean([np.mean(g, axis=0) ** 2 for g in per_ex], axis=0)
    np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-10)
    with pytest.raises(ValueError, match="empty"):
        merging.diagonal_fisher(loss, {"w": jnp.asarray(w)}, [])


@pytest.mark.parametrize("per_example", [True, False])
def test_diagonal_fisher_names_a_batch_whose_gradient_is_not_finite(per_example):
    """A NaN in one batch made the whole Fisher NaN, silently."""
    loss = lambda p, b: jnp.mean((b["x"] * p["w"]) ** 2)  # noqa: E731
    batches = [{"x": jnp.ones(2)}, {"x": jnp.array([1.0, jnp.nan])}]
    with pytest.raises(ValueError, match=r"at \['w'\] is not finite for batch 1"):
        merging.diagonal_fisher(loss, {"w": jnp.ones(())}, batches, per_example=per_example)
    with pytest.raises(TypeError, match="per_example must be True or False"):
        merging.diagonal_fisher(loss, {"w": jnp.ones(())}, batches[:1], per_example="no")


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_ota_with_arrays_and_statistics(power):
    rng = np.random.default_rng(9)
    base, experts = H.random_experts(rng, 3)
    curv = [H.build(lambda p, s, _: rng.random(s)) for _ in range(3)]
    curv[0]["norm"]["scale"] = np.zeros(())  # one zero curvature
    kw = dict(power=power, weights=[1.0, 2.0, 0.5], scaling=0.9)
    got = merging.ota(base, experts, curv, **kw)
    want = H.ref_ota(base, experts, [{p: H.get(c, p) for p in H.PATHS} for c in curv], **kw)
    H.assert_tree_close(got, want)
    stats = H.random_statistics(rng, 3)
    got = merging.ota(base, experts, stats, **kw)
    curv = [{p: H.ref_curvature(H.get(s, p)) for p in H.PATHS} for s in stats]
    H.assert_tree_close(got, H.ref_ota(base, experts, curv, **kw))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("density", [0.01, 0.25, 1.0])
def test_prune(scope, density):
    rng = np.random.default_rng(10)
    base, (expert,) = H.random_experts(rng, 1)
    scores = H.build(lambda p, s, _: rng.random(s))
    got = merging.prune(base, expert, scores, density=density, scope=scope)
    ref_scores = {p: H.get(scores, p) for p in H.PATHS}
    H.assert_tree_close(got, H.ref_prune(base, expert, ref_scores, density=density, scope=scope))
    # Magnitude pruning (scores=None) and saliency from statistics.
    got = merging.prune(base, expert, None, density=density, scope=scope)
    mag = {p: np.abs(H.get(expert, p) - H.get(base, p)) for p in H.PATHS}
    H.assert_tree_close(got, H.ref_prune(base, expert, mag, density=density, scope=scope))
    (stats,) = H.random_statistics(rng, 1)
    got = merging.prune(base, expert, stats, density=density, scope=scope)
    sal = {p: H.get(stats, p).saliency for p in H.PATHS}
    H.assert_tree_close(got, H.ref_prune(base, expert, sal, density=density, scope=scope))


def test_bfloat16_computed_in_float32_and_cast_back():
    rng = np.random.default_rng(12)
    base, experts = H.random_experts(rng, 3)
    stats = H.random_statistics(rng, 3, dtype=np.float32)
    bf = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)  # noqa: E731
    base16, experts16 = bf(base), [bf(e) for e in experts]
    as64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    cases = [
        (
            merging.task_arithmetic(base16, experts16, scaling=0.5),
            H.ref_task_arithmetic(as64(base16), [as64(e) for e in experts16], scaling=0.5),
        ),
        (
            merging.ties(base16, experts16, density=0.5),
            H.ref_ties(as64(base16), [as64(e) for e in experts16], density=0.5),
        ),
        (
            merging.umtam(base16, experts16, stats, density=0.5),
            H.ref_umtam(as64(base16), [as64(e) for e in experts16], stats, density=0.5),
        ),
    ]
    for got, want in cases:
        for p in H.PATHS:
            leaf = H.get(got, p)
            assert leaf.dtype == jnp.bfloat16
            # Within one bfloat16 rounding of the float64 result.
            np.testing.assert_allclose(
                np.asarray(leaf, np.float64), want[p], rtol=2.0**-8, atol=1e-6, err_msg=str(p)
            )


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(
    "method", ["ties", "umtam", "prune", "consensus_ties", "breadcrumbs", "breadcrumbs_ties", "sce"]
)
def test_scanned_scope_merges_a_scanned_model_as_its_unrolled_layers(method, axis):
    """``scope=umtam_jax.scanned("blocks", axis=a)``: a model whose blocks are stacked on
    axis a (0: ``nnx.scan``; 1: MaxText's ``[d_in, L, d_out]`` kernels and ``[d, L]``
    biases) merges as its unrolled twin, stacked biases included, while a 4-D convolution
    kernel outside the blocks keeps one count (``scope="layer"`` would slice it)."""
    rng = np.random.default_rng(4)
    L = 3
    shapes = {"kernel": (L, 6, 5), "bias": (L, 5)}
    if axis == 1:
        shapes = {"kernel": (6, L, 5), "bias": (5, L)}
    layers = np.array([10.0, 1.0, 1.0])  # layer 0 moves 10x more

    def tree(scale_layers):
        out = {}
        for name, shape in shapes.items():
            scale = np.moveaxis(layers.reshape(-1, *[1] * (len(shape) - 1)), 0, axis)
            out[name] = (scale if scale_layers else 1.0) * rng.normal(size=shape)
        return {"blocks": out, "conv": rng.normal(size=(2, 2, 3, 4))}

    base = tree(False)
    experts = [jax.tree.map(np.add, base, tree(True)) for _ in range(2)]
    stats = [jax.tree.map(lambda x: DenseStatistics(mu=x, nu=x * x + 0.1, saliency=x * x + 0.1),
                          tree(True)) for _ in range(2)]  # fmt: skip

    def run(b, es, st, scope):
        if method == "prune":
            return merging.prune(b, es[0], st[0], density=0.2, scope=scope)
        if method == "umtam":
            return merging.umtam(b, es, st, density=0.2, scope=scope)
        if method == "sce":  # per layer: its variance selection and expert weights
            return merging.sce(b, es, select_topk=0.5, scope=scope)
        if method.startswith("breadcrumbs"):  # per layer: its top and bottom cuts
            return getattr(merging, method)(b, es, density=0.3, gamma=0.1, scope=scope)
        return getattr(merging, method)(b, es, density=0.2, scope=scope)

    def layer(t, i):
        return {
            "blocks": jax.tree.map(lambda x: np.take(np.asarray(x), i, axis=axis), t["blocks"]),
            "conv": t["conv"],
        }

    stacked = run(base, experts, stats, umtam_jax.scanned("blocks", axis=axis))
    for i in range(L):
        alone = run(layer(base, i), [layer(e, i) for e in experts],
                    [layer(s, i) for s in stats], "tensor")  # fmt: skip
        chex.assert_trees_all_equal(layer(stacked, i), alone)
    per_tensor = run(base, experts, stats, "tensor")
    np.testing.assert_array_equal(stacked["conv"], per_tensor["conv"])
    by_shape = run(base, experts, stats, "layer")["conv"]
    assert not np.array_equal(by_shape, per_tensor["conv"])


def test_scope_errors_name_the_accepted_forms():
    base, experts = {"w": np.zeros((2, 3, 4))}, [{"w": np.ones((2, 3, 4))}] * 2
    for bad in ("layers", 3, {"scanned": ["blocks"]}):  # the mapping is the CLI's form
        with pytest.raises(ValueError, match=r"or a layout callable such as umtam_jax.scanned"):
            merging.ties(base, experts, density=0.5, scope=bad)
    with pytest.raises(TypeError, match=r"key names as separate strings .* got \['blocks'\]"):
        umtam_jax.scanned(["blocks"])  # would match no key: per tensor, silently

    class Inner:  # a callable that does not hash
        __hash__ = None

        def __call__(self, path, shape):
            return max(len(shape) - 1, 0)

    scope = umtam_jax.scanned("w", inner=Inner())
    jitted = jax.jit(merging.ties, static_argnames=("density", "scope"))
    got = jitted(base, experts, density=0.5, scope=scope)  # a static argument: hashable
    chex.assert_trees_all_equal(got, merging.ties(base, experts, density=0.5, scope=scope))


@pytest.mark.parametrize("method", ["ties", "umtam", "prune"])
def test_layer_scope_merges_a_scanned_leaf_as_its_unrolled_layers(method):
    """A scanned ``(L, m, n)`` leaf whose layer 0 moved 10× more: per tensor, layer 0 takes
    most of the one keep count (whole layers are dropped); ``scope="layer"`` gives the
    merge of the unrolled model, whose layers have a count each."""
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(3, 8, 2, 3))}  # a scanned DenseGeneral kernel
    scale = np.array([10.0, 1.0, 1.0])[:, None, None, None]
    experts = [{"w": base["w"] + scale * rng.normal(size=(3, 8, 2, 3))} for _ in range(2)]
    positive = lambda: rng.random((3, 8, 2, 3)) + 0.1  # noqa: E731
    stats = [{"w": DenseStatistics(mu=positive(), nu=positive(), saliency=scale**2 * positive())}
             for _ in range(2)]  # fmt: skip

    def run(b, es, st, scope):
        if method == "ties":
            return merging.ties(b, es, density=0.2, scope=scope)
        if method == "prune":
            return merging.prune(b, es[0], None, density=0.2, scope=scope)
        return merging.umtam(b, es, st, density=0.2, scope=scope)

    def unrolled(tree):
        return {str(i): jax.tree.map(lambda x, i=i: x[i], tree["w"]) for i in range(3)}

    stacked = run(base, experts, stats, "layer")["w"]
    layers = run(unrolled(base), [unrolled(e) for e in experts],
                 [unrolled(s) for s in stats], "tensor")  # fmt: skip
    np.testing.assert_array_equal(stacked, np.stack([layers[str(i)] for i in range(3)]))
    changed = run(base, experts, stats, "tensor")["w"] != base["w"]
    assert changed[1:].sum() < changed[0].sum() / 4  # one count: layer 0 takes most
