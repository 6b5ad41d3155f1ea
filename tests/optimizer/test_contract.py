"""The contract every UMTAM configuration keeps, in the style of Optax's optimizer harness.

One suite, parametrized over the configurations users run: all-dense (Adam-like leaves),
factored with the fast subspace SVD, factored with the exact SVD, lean (no m×n momentum
buffer) and batched (a layer-stacked leaf factored per layer). Each test states one
property an Optax optimizer must have: convergence on standard problems, dtype
preservation, a stable state, no recompilation, ``inject_hyperparams``, ``MultiSteps``,
schedules, abstract initialisation and a stable sharding.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import umtam_jax

_FACTORED = dict(rank=3, min_dim_size_to_factor=4)
CONFIGS = {
    "dense": dict(rank=3, min_dim_size_to_factor=1_000_000),
    "factored": dict(_FACTORED),
    "exact": dict(_FACTORED, svd_method="exact"),
    "lean": dict(_FACTORED, error_decay=0.0, saliency="final"),
    "batched": dict(_FACTORED, row_axes=umtam_jax.scanned("stack")),
    # The layer axis second: eight 3 × 6 matrices, updated in (batch, rows, cols) order.
    "batched_axis1": dict(
        rank=3, min_dim_size_to_factor=3, row_axes=umtam_jax.scanned("stack", axis=1)
    ),
}
# Which leaf states hold a low-rank momentum in each configuration.
FACTORED_LEAVES = {
    "dense": set(),
    "factored": {"stack", "kernel"},
    "exact": {"stack", "kernel"},
    "lean": {"stack", "kernel"},
    "batched": {"stack", "kernel"},
    "batched_axis1": {"stack", "kernel"},
}

configs = pytest.mark.parametrize("name", list(CONFIGS))


def _opt(name, learning_rate=0.1, **extra):
    return umtam_jax.umtam(learning_rate, **{**CONFIGS[name], **extra})


@functools.cache
def _default(name):
    """The configuration at learning rate 0.1 with its jitted update, compiled once."""
    opt = _opt(name)
    return opt, jax.jit(opt.update)


def _params(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    return {"stack": leaf(3, 8, 6), "kernel": leaf(10, 6), "bias": leaf(6)}


def _grads(params, t):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(t), len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=True)]
    )


def _run(opt, params, steps, update=None):
    state = opt.init(params)
    update = jax.jit(opt.update) if update is None else update
    updates = []
    for t in range(steps):
        u, state = update(_grads(params, t), state, params)
        updates.append(u)
    return updates, state, update


def _minimise(loss, params, opt, steps):
    """``steps`` optimizer steps on ``loss``, as one compiled loop."""

    def step(carry, _):
        params, state = carry
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    run = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=steps)[0][0])
    return run(params)


# ----------------------------------------------------------------------------- convergence


@configs
def test_converges_on_an_ill_conditioned_quadratic(name):
    rng = np.random.default_rng(1)
    params = jax.tree.map(jnp.zeros_like, _params())
    targets = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    scales = jax.tree.map(  # curvatures spread over two decades within every leaf
        lambda p: jnp.asarray(np.logspace(-1, 1, p.size).reshape(p.shape), p.dtype), params
    )

    def loss(p):
        terms = jax.tree.map(lambda w, t, s: jnp.sum(s * (w - t) ** 2), p, targets, scales)
        return 0.5 * sum(jax.tree.leaves(terms))

    start = float(loss(params))
    final = float(loss(_minimise(loss, params, _opt(name, 0.05), 400)))
    assert final < 1e-3 * start, (start, final)


@configs
def test_converges_on_rosenbrock_valleys_in_every_leaf(name):
    # Each leaf is a set of independent 2-D Rosenbrock problems (its entries paired up by
    # the last axis), so factored leaves see the valley's curvature through their rows.
    def rosenbrock(w):
        x, y = jnp.split(w, 2, axis=-1)
        return jnp.sum((1 - x) ** 2 + 100 * (y - x**2) ** 2)

    params = {
        "stack": jnp.full((3, 8, 6), -0.5),
        "kernel": jnp.full((10, 6), -0.5),
        "bias": jnp.full((6,), -0.5),
    }
    loss = lambda p: sum(rosenbrock(w) for w in jax.tree.leaves(p))  # noqa: E731
    solution = _minimise(loss, params, _opt(name, 0.02, clip_threshold=None), 3000)
    for path, w in jax.tree_util.tree_leaves_with_path(solution):
        np.testing.assert_allclose(w, 1.0, atol=0.05, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- types and state


@configs
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_updates_keep_the_params_dtype_and_the_state_keeps_its_types(name, dtype):
    params = _params(dtype)
    opt, update = _default(name)
    initial = opt.init(params)
    updates, state, _ = _run(opt, params, 3, update)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates[-1], params)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, initial)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


@configs
def test_factored_leaves_are_the_expected_ones(name):
    opt, update = _default(name)
    _, state, _ = _run(opt, _params(), 1, update)
    stats = umtam_jax.statistics(state)
    factored = {k for k, s in stats.items() if isinstance(s, umtam_jax.FactoredStatistics)}
    assert factored == FACTORED_LEAVES[name]
    sigma = state[0].leaves["stack"].sigma if factored else None
    if name == "batched":
        assert sigma.shape == (3, 3, 3)  # one low-rank core per layer
    elif name == "batched_axis1":
        assert sigma.shape == (1, 8, 1, 3, 3)  # one per layer, in the parameter's axis order
    elif factored:
        assert sigma.shape == (3, 3)  # one matrix over the stacked rows


@configs
def test_no_recompilation_after_the_first_jitted_step(name):
    _, _, update = _run(_opt(name), _params(), steps=5)
    assert update._cache_size() == 1


@configs
def test_inputs_are_not_mutated(name):
    params = jax.tree.map(np.asarray, _params())
    grads = jax.tree.map(np.asarray, _grads(params, 0))
    before = jax.tree.map(np.copy, (params, grads))
    opt, update = _default(name)
    update(grads, opt.init(params), params)
    chex.assert_trees_all_equal((params, grads), before)


# ----------------------------------------------------------------------------- Optax wrappers


@configs
def test_inject_hyperparams_gives_the_same_updates(name):
    # In x64 mode injected hyper-parameters are float64 like Python floats: same arithmetic.
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        injected = optax.inject_hyperparams(
            umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS
        )
        got, state, _ = _run(injected(learning_rate=0.1, b1=0.8, **CONFIGS[name]), params, 4)
        want, plain, _ = _run(_opt(name, b1=0.8), params, 4)
        chex.assert_trees_all_close(got[-1], want[-1], rtol=1e-12)
        # Static arguments keep the state's layout: no m×n buffer in lean mode either.
        chex.assert_trees_all_equal_shapes_and_dtypes(state.inner_state, plain)
        assert float(state.hyperparams["learning_rate"]) == 0.1
        assert set(state.hyperparams).isdisjoint(umtam_jax.STATIC_HYPERPARAMS)


def test_inject_hyperparams_keeps_buffer_dtype_static():
    """A dtype is callable: without being static, inject_hyperparams took jnp.bfloat16 for
    a schedule and kept a 0-valued bf16 array of it among the hyper-parameters."""
    injected = optax.inject_hyperparams(umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS)
    opt = injected(learning_rate=0.1, buffer_dtype=jnp.bfloat16, **CONFIGS["factored"])
    state = opt.init(_params())
    assert "buffer_dtype" not in state.hyperparams
    _, state, _ = _run(opt, _params(), 2)
    assert state.inner_state[0].leaves["kernel"].dense_momentum.dtype == jnp.bfloat16


def test_inject_hyperparams_keeps_a_callable_weight_decay_mask():
    """A callable mask is static: otherwise inject_hyperparams called it with the step
    count, stored its False and weight decay was silently off."""
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    options = dict(CONFIGS["factored"], weight_decay=0.5, mask=mask)
    injected = optax.inject_hyperparams(umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS)
    with jax.enable_x64(True):  # injected floats are float64 like Python's: same arithmetic
        params64 = _params(jnp.float64)
        got, state, _ = _run(injected(learning_rate=0.1, **options), params64, 2)
        want, _, _ = _run(umtam_jax.umtam(0.1, **options), params64, 2)
        chex.assert_trees_all_close(got[-1], want[-1], rtol=1e-12)
    assert "mask" not in state.hyperparams
    params = _params()
    # Weight decay reaches the masked-in kernel: zero gradients leave only −lr·wd·w.
    zero = jax.tree.map(jnp.zeros_like, params)
    opt = injected(learning_rate=1.0, **options)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5 * params["kernel"], atol=1e-4)
    np.testing.assert_allclose(updates["bias"], 0.0, atol=1e-4)


def test_inject_hyperparams_of_scale_by_umtam_takes_the_static_names_but_mask():
    static = [n for n in umtam_jax.STATIC_HYPERPARAMS if n != "mask"]
    injected = optax.inject_hyperparams(umtam_jax.scale_by_umtam, static_args=static)
    with jax.enable_x64(True):  # injected floats are float64 like Python's: same arithmetic
        params = _params(jnp.float64)
        got, _, _ = _run(injected(b1=0.8, **CONFIGS["factored"]), params, 2)
        want, _, _ = _run(umtam_jax.scale_by_umtam(b1=0.8, **CONFIGS["factored"]), params, 2)
        chex.assert_trees_all_close(got[-1], want[-1], rtol=1e-12)


def test_inject_hyperparams_with_adaptive_rank_gives_the_same_updates():
    # The rank thresholds are injected (traced) floats; only concrete ones are validated.
    options = dict(CONFIGS["factored"], adaptive_rank=True, rank_update_every=2)
    thresholds = dict(rank_grow_threshold=1.2, rank_shrink_threshold=0.6)
    with jax.enable_x64(True):
        params = _params(jnp.float64)
        injected = optax.inject_hyperparams(
            umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS
        )
        got, state, _ = _run(injected(learning_rate=0.1, **options, **thresholds), params, 4)
        want, plain, _ = _run(umtam_jax.umtam(0.1, **options, **thresholds), params, 4)
        chex.assert_trees_all_close(got[-1], want[-1], rtol=1e-12)
        chex.assert_trees_all_close(state.inner_state[0].leaves, plain[0].leaves, rtol=1e-12)
        assert float(state.hyperparams["rank_grow_threshold"]) == 1.2


@configs
def test_multisteps_accumulates_then_applies_one_step_on_the_mean_gradient(name):
    params = _params()
    opt = optax.MultiSteps(_opt(name), every_k_schedule=2)
    state, update = opt.init(params), jax.jit(opt.update)
    g1, g2 = _grads(params, 0), _grads(params, 1)
    first, state = update(g1, state, params)
    chex.assert_trees_all_equal(first, jax.tree.map(jnp.zeros_like, params))
    second, state = update(g2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    opt, update = _default(name)
    single, _ = update(mean, opt.init(params), params)
    chex.assert_trees_all_close(second, single, rtol=1e-5, atol=2e-6)


@configs
def test_a_schedule_scales_each_step_by_its_value(name):
    params = _params()
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=4)
    scheduled, _, _ = _run(_opt(name, schedule), params, steps=5)
    opt, update = _default(name)  # learning rate 0.1, the schedule's start
    constant, _, _ = _run(opt, params, steps=5, update=update)
    for t in range(5):
        factor = float(schedule(t)) / 0.1
        want = jax.tree.map(lambda u, f=factor: f * u, constant[t])
        chex.assert_trees_all_close(scheduled[t], want, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- abstract init


@configs
def test_abstract_init_has_the_shapes_of_the_real_one(name):
    params = _params()
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    shapes = jax.eval_shape(_opt(name).init, abstract)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, _opt(name).init(params))
    final = _opt(name, saliency="final")  # keeps no W0, so init needs no values at all
    chex.assert_trees_all_equal_shapes_and_dtypes(final.init(abstract), final.init(params))


# ----------------------------------------------------------------------------- sharding


@configs
def test_state_sharding_is_stable_across_jitted_updates(name):
    mesh = jax.make_mesh((1,), ("x",))
    params = jax.device_put(_params(), NamedSharding(mesh, P()))
    opt, update = _default(name)
    state = jax.jit(opt.init)(params)
    _, new_state = update(_grads(params, 0), state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
        assert after.sharding.is_equivalent_to(before.sharding, before.ndim)


def test_state_shardings_of_masked_and_partitioned_umtam():
    mesh = jax.make_mesh((1, 1), ("x", "y"))
    specs = {"stack": P(None, "x", "y"), "kernel": P("x", "y"), "bias": P("y")}
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in _params().items()}
    inner = _opt("factored")
    alone = umtam_jax.state_shardings(inner, {"kernel": params["kernel"]})[0]
    mask = {"stack": False, "kernel": True, "bias": False}
    masked = optax.masked(inner, mask)
    got = umtam_jax.state_shardings(masked, params)
    assert got.inner_state[0].leaves["kernel"] == alone.leaves["kernel"]
    assert isinstance(got.inner_state[0].leaves["bias"], optax.MaskedNode)
    labels = {"stack": "a", "kernel": "u", "bias": "a"}
    partition = optax.partition({"u": inner, "a": optax.adam(0.1)}, labels)
    got = umtam_jax.state_shardings(partition, params)
    assert got.inner_states["u"].inner_state[0].leaves["kernel"] == alone.leaves["kernel"]
    adam_mu = got.inner_states["a"].inner_state[0].mu  # follows the parameters it holds
    assert adam_mu["bias"] == params["bias"].sharding
    assert isinstance(adam_mu["kernel"], optax.MaskedNode)
    for opt in (masked, partition):  # a valid out_shardings for init
        shardings = umtam_jax.state_shardings(opt, params)
        state = jax.jit(opt.init, out_shardings=shardings)(params)
        chex.assert_trees_all_equal_structs(state, opt.init(params))
