"""Merging statistics read from UMTAM optimizer states: through Optax wrappers and
``flax.nnx``, and parameter trees whose names coincide with the state's fields."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests.optimizer.behaviour_helpers import SMALL, _params, _run


def test_statistics_through_masked_and_partition():
    params = _params()
    masked = optax.masked(umtam_jax.umtam(0.1, **SMALL), {"dense": {"kernel": True}, "bias": False})
    _, state, _ = _run(masked, params, steps=2, jit=False)
    stats = umtam_jax.statistics(state)
    assert isinstance(stats["dense"]["kernel"], umtam_jax.FactoredStatistics)
    assert isinstance(stats["bias"], optax.MaskedNode)
    assert umtam_jax.curvature(state)["dense"]["kernel"].shape == (16, 12)

    labels = {"dense": {"kernel": "a"}, "bias": "b"}
    both = optax.partition(
        {"a": umtam_jax.umtam(0.1, **SMALL), "b": umtam_jax.umtam(0.2, **SMALL)}, labels
    )
    _, state, _ = _run(both, params, steps=2, jit=False)
    stats = umtam_jax.statistics(state)
    assert isinstance(stats["dense"]["kernel"], umtam_jax.FactoredStatistics)
    assert isinstance(stats["bias"], umtam_jax.DenseStatistics)


def test_statistics_of_a_chain_match_the_state():
    params = _params()
    opt = optax.chain(optax.clip_by_global_norm(1.0), umtam_jax.umtam(0.1, **SMALL))
    _, state, _ = _run(opt, params, steps=3)
    leaf = state[1][0].leaves["dense"]["kernel"]
    stats = umtam_jax.statistics(state)["dense"]["kernel"]
    np.testing.assert_array_equal(stats.row, leaf.row)
    np.testing.assert_array_equal(umtam_jax.saliency(state)["dense"]["kernel"], leaf.saliency)
    assert umtam_jax.statistics(stats) is stats


def test_statistics_in_mapping_form_as_a_safetensors_folder_holds_them(tmp_path):
    """Statistics read back from a ``umtam_statistics`` folder are nested dicts of their
    fields: the merges took them, but statistics/saliency/curvature raised NoUmtamState."""
    from umtam_jax import checkpoint

    opt = optax.masked(umtam_jax.umtam(0.1, **SMALL), {"dense": {"kernel": True, "bias": False}})
    params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.ones(8)}}
    _, state, _ = _run(opt, params, steps=3)
    stats = umtam_jax.statistics(state)
    checkpoint.save_safetensors(tmp_path / "s", {"dense": {"kernel": stats["dense"]["kernel"]}})
    reader = checkpoint.SafetensorsReader(tmp_path / "s")
    names = list(reader.names)
    read = checkpoint.tree_from_names(dict(zip(names, reader.read(names), strict=True)))
    assert set(read["dense"]["kernel"]) == {"u", "sigma", "v", "row", "col", "saliency"}
    read["dense"]["bias"] = optax.MaskedNode()  # a parameter the optimizer did not see
    for fn in (umtam_jax.saliency, umtam_jax.curvature, umtam_jax.momentum):
        got, want = fn(read)["dense"], fn(stats)["dense"]
        np.testing.assert_allclose(got["kernel"], want["kernel"], rtol=1e-4, atol=1e-9)
        assert isinstance(got["bias"], optax.MaskedNode)
    kernel = umtam_jax.statistics(read)["dense"]["kernel"]
    assert type(kernel) is type(stats["dense"]["kernel"])
    chex.assert_trees_all_equal(kernel, stats["dense"]["kernel"])


def test_statistics_of_a_foreign_state_is_an_error():
    with pytest.raises(ValueError, match="no UMTAM optimizer state"):
        umtam_jax.statistics(optax.adam(1e-3).init(_params()))


# ----------------------------------------------------------------------------- Flax


def test_trains_a_flax_nnx_model_with_nnx_optimizer():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(8, 32, rngs=rngs)
            self.out = nnx.Linear(32, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.gelu(self.hidden(x)))

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 8)), jnp.float32)
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2] ** 2
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, umtam_jax.umtam(3e-3, rank=4, min_dim_size_to_factor=8), wrt=nnx.Param
    )

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    first = float(train_step(model, optimizer))
    for _ in range(300):
        last = float(train_step(model, optimizer))
    assert last < 0.2 * first
    stats = umtam_jax.statistics(optimizer.opt_state)
    assert isinstance(stats["hidden"]["kernel"], umtam_jax.FactoredStatistics)


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_nnx_optimizer_with_a_frozen_submodule(wrapper):
    """``optax.masked`` / ``multi_transform`` hand UMTAM a State whose frozen Variables
    hold ``MaskedNode()``: they have no state (not a shape-(0,) one), the update runs, the
    trained leaves follow a plain-dict run and the frozen ones do not move."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            self.body = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
            self.head = nnx.Linear(16, 2, rngs=nnx.Rngs(1))

    def trained(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "head" not in jax.tree_util.keystr(p), tree
        )

    inner = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=8)
    if wrapper == "masked":
        tx = optax.masked(inner, trained)
    else:
        labels = lambda t: jax.tree.map(lambda m: "u" if m else "z", trained(t))  # noqa: E731
        tx = optax.multi_transform({"u": inner, "z": optax.set_to_zero()}, labels)
    model = Net()
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    for _ in range(2):
        optimizer.update(model, grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # The same two steps on plain dicts, UMTAM on the trained leaves only.
    pure, pure_grads = before["body"], jax.tree.map(jnp.ones_like, before["body"])
    state = inner.init(pure)
    for _ in range(2):
        updates, state = inner.update(pure_grads, state, pure)
        pure = optax.apply_updates(pure, updates)
    chex.assert_trees_all_close(after["body"], pure, rtol=1e-6)
    if wrapper == "masked":  # masked passes the frozen gradients through unchanged
        chex.assert_trees_all_close(after["head"]["bias"], before["head"]["bias"] + 2.0)
    else:
        chex.assert_trees_all_equal(after["head"], before["head"])


def test_nnx_optimizer_state_keeps_one_structure_and_restores_with_plain_orbax(tmp_path):
    """Flax's own checkpoint recipe: save ``nnx.state(optimizer)`` with Orbax, restore it
    into an abstract optimizer's state. Each leaf state must keep one layout from init on:
    a leaf state inside the parameter's Variable that the first update rewrote as a
    mapping would trace the step twice and fail the restore target (Orbax: 'Source:
    MISSING Target: MISSING')."""
    import orbax.checkpoint as ocp
    from flax import nnx

    def make():
        return nnx.Linear(32, 16, rngs=nnx.Rngs(0))

    tx = umtam_jax.umtam(1e-3, rank=2, min_dim_size_to_factor=8)
    model = make()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, x):
        traces.append(1)
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)

    before = jax.tree.structure(nnx.state(optimizer))
    for _ in range(3):
        step(model, optimizer, jnp.ones((4, 32)))
    assert len(traces) == 1 and jax.tree.structure(nnx.state(optimizer)) == before

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", nnx.state(optimizer))
    checkpointer.wait_until_finished()
    abstract = nnx.eval_shape(lambda: nnx.Optimizer(make(), tx, wrt=nnx.Param))
    restored = checkpointer.restore(tmp_path / "ckpt", nnx.state(abstract))
    resumed = nnx.Optimizer(make(), tx, wrt=nnx.Param)
    nnx.update(resumed, restored)
    want = umtam_jax.statistics(optimizer.opt_state)
    for form in (resumed.opt_state, nnx.state(resumed), nnx.to_pure_dict(nnx.state(resumed))):
        got = umtam_jax.statistics(form)
        assert jax.tree.structure(got, is_leaf=_is_stats) == jax.tree.structure(
            want, is_leaf=_is_stats
        )
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- field names

# No clipping and a tiny eps: the statistics after one step are exact sums of squares.
EXACT = dict(rank=2, min_dim_size_to_factor=4, b2=0.9, eps=1e-30, clip_threshold=None)


def _curvature_reference(g, b2=0.9, eps=1e-30):
    """float64 curvature after one step from zero: Adafactor's R Cᵀ / sum(R) of a matrix,
    the second moment of anything smaller."""
    g = np.asarray(g, np.float64)
    if g.ndim < 2 or min(g.shape) < 4:
        return b2 * eps + (1 - b2) * g**2
    row = b2 * eps + (1 - b2) * np.sum(g**2, axis=1)
    col = b2 * eps + (1 - b2) * np.sum(g**2, axis=0)
    return np.outer(row, col) / row.sum()


def test_parameters_named_like_state_fields_keep_their_own_statistics():
    # A noisy layer {mu, sigma}, a Student-t "nu" next to a kernel, a Gaussian {mu, nu}.
    rng = np.random.default_rng(0)
    shapes = {
        "noisy": {"mu": (8, 6), "sigma": (8, 6)},
        "head": {"nu": (), "w": (8, 6)},
        "gauss": {"mu": (3,), "nu": (3,)},
    }
    params = jax.tree.map(lambda s: jnp.ones(s), shapes, is_leaf=lambda s: isinstance(s, tuple))
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    opt = umtam_jax.umtam(0.1, **EXACT)
    _, state = opt.update(grads, opt.init(params), params)
    stats = umtam_jax.statistics(state)
    assert jax.tree.structure(stats, is_leaf=_is_stats) == jax.tree.structure(params)
    assert isinstance(stats["noisy"]["sigma"], umtam_jax.FactoredStatistics)
    assert isinstance(stats["head"]["nu"], umtam_jax.DenseStatistics)
    curvature = umtam_jax.curvature(state)
    for got, g in zip(jax.tree.leaves(curvature), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, _curvature_reference(g), rtol=1e-5)


def _is_stats(x):
    return isinstance(x, umtam_jax.FactoredStatistics | umtam_jax.DenseStatistics)


def test_nnx_submodules_named_mu_and_sigma_keep_their_statistics(tmp_path):
    from flax import nnx

    from umtam_jax import checkpoint

    class Encoder(nnx.Module):  # a VAE encoder's two heads
        def __init__(self, rngs):
            self.body = nnx.Linear(4, 8, rngs=rngs)
            self.mu = nnx.Linear(8, 6, rngs=rngs)
            self.sigma = nnx.Linear(8, 6, rngs=rngs)

        def __call__(self, x):
            h = jax.nn.relu(self.body(x))
            return self.mu(h), jax.nn.softplus(self.sigma(h))

    model = Encoder(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, umtam_jax.umtam(1e-3, **EXACT), wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4)), jnp.float32)
    grads = nnx.grad(lambda m: sum(jnp.sum(jnp.sin(y)) for y in m(x)))(model)
    optimizer.update(model, grads)
    stats = umtam_jax.statistics(optimizer.opt_state)
    for head in ("body", "mu", "sigma"):
        assert isinstance(stats[head]["kernel"], umtam_jax.FactoredStatistics), head
        assert isinstance(stats[head]["bias"], umtam_jax.DenseStatistics), head
    curvature = umtam_jax.curvature(optimizer.opt_state)
    pure_grads = nnx.to_pure_dict(grads)
    for head in ("body", "mu", "sigma"):
        for name in ("kernel", "bias"):
            want = _curvature_reference(pure_grads[head][name])
            np.testing.assert_allclose(curvature[head][name], want, rtol=1e-5)

    path = checkpoint.save_checkpoint(
        str(tmp_path / "c"), nnx.state(model, nnx.Param), opt_state=optimizer.opt_state
    )
    restored = checkpoint.restore_statistics(path)
    assert jax.tree.structure(restored, is_leaf=_is_stats) == jax.tree.structure(
        stats, is_leaf=_is_stats
    )
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(got, want)


def test_final_saliency_takes_nnx_state_parameters():
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 6, rngs=nnx.Rngs(1)))
    w0 = nnx.clone(nnx.state(model, nnx.Param))
    opt = umtam_jax.umtam(1e-2, saliency="final", **EXACT)
    optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model)
    optimizer.update(model, grads)
    got = umtam_jax.saliency(optimizer.opt_state, nnx.state(model, nnx.Param), w0)
    pure = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(t))  # noqa: E731
    w, w0, g = pure(nnx.state(model, nnx.Param)), pure(w0), pure(grads)
    for layer in w["layers"]:
        for name in ("kernel", "bias"):
            g2 = g["layers"][layer][name] ** 2
            if name == "kernel":  # sqrt(R_i C_j) of the factored second moments
                root = np.sqrt(np.outer(0.1 * g2.sum(axis=1), 0.1 * g2.sum(axis=0)))
            else:  # sqrt(v)
                root = np.sqrt(0.1 * g2)
            delta = w["layers"][layer][name] - w0["layers"][layer][name]
            want = delta**2 * root
            np.testing.assert_allclose(got["layers"][layer][name], want, rtol=2e-5)


def _assert_placed_as_planned(shardings, optimizer):
    """``shardings`` has the structure of ``nnx.as_pure(optimizer.opt_state)`` and places
    each of its arrays as it is."""
    from flax import nnx

    pure = nnx.as_pure(optimizer.opt_state)
    assert jax.tree.structure(shardings) == jax.tree.structure(pure)
    placed = jax.tree.map(lambda s, x: x.sharding.is_equivalent_to(s, x.ndim), shardings, pure)
    assert all(jax.tree.leaves(placed))


def test_state_shardings_line_up_with_an_nnx_optimizer_state():
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("model",))
    model = nnx.Linear(32, 16, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    nnx.update(model, params)
    tx = umtam_jax.umtam(1e-3, rank=2, min_dim_size_to_factor=8)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    shardings = umtam_jax.state_shardings(tx, nnx.state(model, nnx.Param))
    _assert_placed_as_planned(shardings, optimizer)


@pytest.mark.parametrize("chained", [False, True])
def test_state_shardings_of_an_nnx_model_with_partitioned_params(chained):
    """``nnx.with_partitioning`` gives each Param sharding metadata (``mesh=None`` unless
    one is named): ``state_shardings`` reads the arrays' shardings, not the Variables'
    metadata, and matches ``nnx.as_pure(optimizer.opt_state)`` (also with Adam's
    parameter-shaped moments in the chain)."""
    from flax import nnx

    mesh = jax.make_mesh((1,), ("model",))
    with jax.set_mesh(mesh):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
        model = nnx.Linear(32, 16, kernel_init=init, rngs=nnx.Rngs(0))
        tx = umtam_jax.umtam(1e-3, rank=2, min_dim_size_to_factor=8)
        if chained:
            tx = optax.chain(optax.scale_by_adam(), tx)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        shardings = umtam_jax.state_shardings(tx, nnx.state(model, nnx.Param))
    _assert_placed_as_planned(shardings, optimizer)
    umtam_leaves = (shardings[1] if chained else shardings)[0].leaves
    kernel = umtam_leaves["kernel"]
    assert tuple(kernel.v.spec)[:1] == ("model",)  # v (cols × r): the kernel's columns
    assert tuple(kernel.u.spec) in ((), (None,), (None, None))  # u (rows × r): replicated


def test_factored_curvature_of_an_all_zero_row_factor_is_zero():
    """``R Cᵀ / sum(R)`` with ``R = 0`` (hand-made statistics; the optimizer's R is never 0)
    is the curvature of a zero second moment, 0, not 0 / 0: a merge that weighs by it
    stays finite."""
    rng = np.random.default_rng(3)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    row, col = f32([0.0, 0.0, 0.0]), f32(rng.random(4) + 0.1)
    zero = umtam_jax.FactoredStatistics(
        u=f32(rng.standard_normal((3, 1))), sigma=f32([[1.0]]),
        v=f32(rng.standard_normal((4, 1))), row=row, col=col, saliency=None,
    )  # fmt: skip
    nonzero = zero._replace(row=f32([1.0, 2.0, 5.0]))
    np.testing.assert_array_equal(umtam_jax.curvature({"w": zero})["w"], np.zeros((3, 4)))
    want = np.outer(nonzero.row, col) / nonzero.row.sum()
    np.testing.assert_allclose(umtam_jax.curvature({"w": nonzero})["w"], want, rtol=1e-6)
