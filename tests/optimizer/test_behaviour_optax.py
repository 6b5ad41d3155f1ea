"""UMTAM as an Optax citizen beyond the shared contract (see test_contract.py): no
recompilation with step counters, eager updates compiled once per configuration
(``inject_hyperparams`` and rebuilt optimizers included) in bounded caches, the learning
rate and weight decay of ``umtam`` against ``scale_by_umtam``, and ``inject_hyperparams``
without static args explaining the fix."""

from __future__ import annotations

import gc
import warnings
import weakref

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests.compilations import compilations
from tests.optimizer.behaviour_helpers import SMALL, _grads, _params, _run
from umtam_jax.optimizer import _eager


def test_no_recompilation_with_periodic_svd_or_adaptive_rank():
    # Every configuration of the contract suite is checked there; these add step counters.
    for kwargs in ({"svd_every": 3}, {"adaptive_rank": True, "rank_update_every": 2}):
        _, _, update = _run(umtam_jax.umtam(1e-2, **SMALL, **kwargs), _params(), steps=7)
        assert update._cache_size() == 1, kwargs


def test_eager_updates_compile_once(caplog):
    """``opt.update`` outside jit (optax's own examples loop that way): steps after the
    first compile nothing (no lax.cond is compiled again at each call)."""
    params = _params()
    opt = umtam_jax.umtam(1e-2, svd_every=2, **SMALL)
    state = opt.init(params)
    updates, state = opt.update(_grads(params, 0), state, params)
    with compilations(caplog) as compiled:
        for t in (1, 2):
            updates, state = opt.update(_grads(params, t), state, params)
    assert compiled == [], compiled[:3]
    jitted, _ = jax.jit(opt.update)(_grads(params, 2), _run_state(opt, params), params)
    eager, _ = opt.update(_grads(params, 2), _run_state(opt, params), params)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)


def test_a_transform_with_an_unhashable_layout_compiles_its_eager_update_once(caplog):
    class RowAxes:  # a mutable dataclass-like callable: __eq__ without __hash__
        __hash__ = None

        def __eq__(self, other):
            return isinstance(other, RowAxes)

        def __call__(self, path, shape):
            return 1 if len(shape) >= 2 else 0

    params, row_axes = _params(), RowAxes()
    inject = optax.inject_hyperparams(umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS)
    for opt in (
        umtam_jax.umtam(1e-2, row_axes=row_axes, **SMALL),
        inject(learning_rate=1e-2, row_axes=row_axes, **SMALL),  # a new transform each step
    ):
        state = opt.init(params)
        _, state = opt.update(_grads(params, 0), state, params)
        with compilations(caplog) as compiled:
            for t in (1, 2):
                _, state = opt.update(_grads(params, t), state, params)
        assert compiled == [], compiled[:3]


def test_equal_options_of_other_types_do_not_share_an_eager_compilation():
    """``np.float64(0.5) == 0.5`` (same hash): under x64 both keep a float32 leaf's state
    float32 (the NumPy option is read as the Python float), and each configuration's
    eager update equals its own jitted one, dtypes included, whichever ran first."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float32), _params())
        for b2 in (0.5, np.float64(0.5)):
            opt = umtam_jax.umtam(1e-2, b2=b2, **SMALL)
            state = opt.init(params)
            eager = opt.update(_grads(params, 0), state, params)
            jitted = jax.jit(opt.update)(_grads(params, 0), state, params)
            chex.assert_trees_all_equal(eager, jitted)
            chex.assert_trees_all_equal_dtypes(eager, jitted)
            chex.assert_trees_all_equal_dtypes(eager[1], state)


def _spy_compilations(monkeypatch) -> list:
    """Weak references to the eager updates compiled from now on."""
    _eager.clear()
    made, compile_update = [], _eager.compile_update

    def spy(*key):
        compiled = compile_update(*key)
        made.append(weakref.ref(compiled))
        return compiled

    monkeypatch.setattr(_eager, "compile_update", spy)
    return made


def test_eager_compilations_are_bounded_and_dropped_ones_freed(monkeypatch):
    """A long eager process (a notebook stepping many models) keeps a bounded number of
    compiled updates: each holds an executable, and XLA:CPU's hold about a hundred memory
    maps each (Linux allows a process 65,530; past that, compiling crashes)."""
    made = _spy_compilations(monkeypatch)
    params = {"b": jnp.ones((3,))}
    for n in range(_eager.CACHE_SIZE + 1):  # one more configuration than it keeps
        opt = umtam_jax.umtam(1e-2, b1=0.5 + n / 100)
        opt.update(params, opt.init(params), params)
    gc.collect()
    assert len(made) == _eager.CACHE_SIZE + 1
    assert made[0]() is None  # the least recently used configuration is gone
    assert made[-1]() is not None
    assert _eager.kept_executables() == _eager.CACHE_SIZE


def test_eager_executables_are_bounded_in_total(monkeypatch):
    """Signatures of one configuration (optax.multi_transform's groups, each its own tree)
    stay compiled while the kept executables are few; past the bound the least recently
    used configuration goes."""
    monkeypatch.setattr(_eager, "MAX_EXECUTABLES", 3)
    made = _spy_compilations(monkeypatch)
    opt = umtam_jax.umtam(1e-2)
    trees = [{"b": jnp.ones((n,))} for n in (1, 2, 3)]
    for _ in range(2):  # three signatures in turn: compiled once
        for params in trees:
            opt.update(params, opt.init(params), params)
    assert len(made) == 1 and _eager.kept_executables() == 3
    other = umtam_jax.umtam(1e-2, b1=0.5)  # one more executable than the bound
    other.update(trees[0], other.init(trees[0]), trees[0])
    gc.collect()
    assert made[0]() is None and _eager.kept_executables() == 1
    opt.update(trees[0], opt.init(trees[0]), trees[0])  # compiled afresh
    assert len(made) == 3


def test_one_configuration_past_the_executable_bound_warns(monkeypatch):
    """One configuration cycling more signatures than the bound compiles at every call:
    that was silent."""
    monkeypatch.setattr(_eager, "MAX_EXECUTABLES", 2)
    opt = umtam_jax.umtam(1e-2, b1=0.61)
    trees = [{"b": jnp.ones((n,))} for n in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for params in trees:  # at the bound: no warning
            opt.update(params, opt.init(params), params)
    third = {"b": jnp.ones((3,))}
    with pytest.warns(RuntimeWarning, match="more than 2 input signatures"):
        opt.update(third, opt.init(third), third)


def test_an_array_option_of_numpy_computes_eagerly_as_under_jit():
    """A NumPy option is a constant of ``jax.jit(opt.update)`` (folded in float64 on the
    host): eagerly too, not a float32 argument (7e-7 apart)."""
    params = _params()
    opt = umtam_jax.umtam(1e-2, b1=np.array(0.9), **SMALL)
    state = opt.init(params)
    eager, _ = opt.update(_grads(params, 0), state, params)
    jitted, _ = jax.jit(opt.update)(_grads(params, 0), state, params)
    chex.assert_trees_all_equal(eager, jitted)


@pytest.mark.parametrize("wrap", ["inject_hyperparams", "rebuilt"])
def test_eager_updates_compile_once_per_configuration(caplog, wrap):
    """``optax.inject_hyperparams`` builds a new transform at every step (its numeric
    hyper-parameters as arrays), as does code that rebuilds the optimizer: eager steps
    after the first still compile nothing, and equal the jitted step."""
    params = _params()
    schedule = optax.linear_schedule(1e-2, 1e-3, 10)
    if wrap == "inject_hyperparams":
        inject = optax.inject_hyperparams(umtam_jax.umtam, static_args=umtam_jax.STATIC_HYPERPARAMS)
        make = lambda: inject(learning_rate=schedule, b1=0.9, **SMALL)  # noqa: E731
    else:
        make = lambda: umtam_jax.umtam(1e-2, **SMALL)  # noqa: E731
    state = make().init(params)
    updates, state = make().update(_grads(params, 0), state, params)
    with compilations(caplog) as compiled:
        for t in (1, 2):
            updates, state = make().update(_grads(params, t), state, params)
    assert compiled == [], compiled[:3]
    jitted, _ = jax.jit(make().update)(_grads(params, 3), state, params)
    eager, _ = make().update(_grads(params, 3), state, params)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)


def _run_state(opt, params):
    """The state after two updates from ``params``."""
    state = opt.init(params)
    for t in (0, 1):
        _, state = jax.jit(opt.update)(_grads(params, t), state, params)
    return state


def test_learning_rate_one_and_no_weight_decay_gives_minus_the_direction():
    params = _params()
    scale = umtam_jax.scale_by_umtam(**SMALL)
    full = umtam_jax.umtam(1.0, **SMALL)
    directions, _, _ = _run(scale, params)
    updates, _, _ = _run(full, params)
    for d, u in zip(directions, updates, strict=True):
        chex.assert_trees_all_close(u, jax.tree.map(lambda a: -a, d), rtol=1e-6)


def test_weight_decay_is_added_before_the_learning_rate():
    params = _params()
    decayed, _, _ = _run(umtam_jax.umtam(0.1, weight_decay=0.5, **SMALL), params, steps=2)
    plain, _, _ = _run(umtam_jax.umtam(0.1, **SMALL), params, steps=2)
    expected = jax.tree.map(lambda u, p: u - 0.1 * 0.5 * p, plain[-1], params)
    chex.assert_trees_all_close(decayed[-1], expected, rtol=1e-5)


def test_inject_hyperparams_without_static_args_explains_the_fix():
    with pytest.raises(TypeError, match="STATIC_HYPERPARAMS"):
        optax.inject_hyperparams(umtam_jax.umtam)(learning_rate=0.1, rank=4).init(_params())
