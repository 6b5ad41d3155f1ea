"""umtam_jax's task-arithmetic family against mergekit itself, on identical float32 tensors.

Runs only where ``mergekit`` and ``torch`` import (not in the project venv, where they are
deliberately absent: this module then skips). For example, from the repository root with
mergekit in a separate venv ``mk`` that also has the project's test dependencies::

    PYTHONPATH=. mk/bin/python -m pytest tests/merging/test_mergekit_equality.py

mergekit is called through its public tensor-level API,
``mergekit.merge_methods.merge_tensors([base, *experts], method, parameters=..., base_index=0)``,
one leaf at a time. DARE's random draw is the only thing replaced: ``torch.bernoulli`` is
patched to return the keep masks umtam_jax draws
(``bernoulli(fold_in(fold_in(key, expert), crc32(keystr(leaf path))), density, shape)``),
so mergekit's own drop, rescale, consensus and normalization run on the same masks.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

pytest.importorskip("mergekit")
torch = pytest.importorskip("torch")

import jax  # noqa: E402
from mergekit.merge_methods import get as mergekit_method  # noqa: E402
from mergekit.merge_methods import merge_tensors  # noqa: E402

from tests import trees  # noqa: E402
from umtam_jax import merging  # noqa: E402

SHAPES = {
    "attn": {"bias": (16,), "kernel": (12, 16)},
    "mlp": {"kernel": (16, 10)},
    "norm": {"scale": (7,)},
}  # 375 entries
WEIGHTS = [1.0, 0.5]
SCALING = 0.8
# Our float32 outputs against mergekit's, name by name.
TOL = {"rtol": 0, "atol": 1e-5, "dtype": np.float32}


def _tree(fn):
    return {m: {n: fn(s) for n, s in leaves.items()} for m, leaves in SHAPES.items()}


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    base = _tree(lambda s: rng.standard_normal(s).astype(np.float32))
    experts = [
        jax.tree.map(lambda b: (b + 0.1 * rng.standard_normal(b.shape)).astype(np.float32), base)
        for _ in WEIGHTS
    ]
    return base, experts


def _mergekit(method, base, experts, parameters):
    """mergekit's merge of every leaf, as a dict keyed by the leaf path."""
    out = {}
    named = [trees.leaves_by_name(t).items() for t in (base, *experts)]
    for (path, b), *ws in zip(*named, strict=True):
        tensors = [torch.from_numpy(b.copy())] + [torch.from_numpy(w.copy()) for _, w in ws]
        out[path] = merge_tensors(tensors, method, parameters=parameters, base_index=0).numpy()
    return out


def _dare_keeps(key, densities, base):
    """umtam_jax's documented DARE keep masks, per expert, as a dict keyed by the leaf path."""
    keeps = []
    for t, density in enumerate(densities):
        expert_key = jax.random.fold_in(key, t)
        keeps.append(
            {
                path: np.asarray(
                    jax.random.bernoulli(
                        jax.random.fold_in(expert_key, np.uint32(zlib.crc32(path.encode()))),
                        density,
                        b.shape,
                    )
                )
                for path, b in trees.leaves_by_name(base).items()
            }
        )
    return keeps


@pytest.fixture
def replay_bernoulli(monkeypatch):
    """Replaces ``torch.bernoulli`` by a queue of given masks (checked against the call)."""
    queue = []

    def fake(probs, *args, **kwargs):
        assert not args and not kwargs
        mask, density = queue.pop(0)
        assert tuple(probs.shape) == mask.shape
        assert torch.all(probs == torch.tensor(density, dtype=probs.dtype))
        return torch.from_numpy(mask.astype(np.float32)).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake)
    return queue


def test_mergekit_defaults_are_the_ones_mirrored():
    """The defaults umtam_jax's equivalences below rely on (mergekit 0.1.5's registry)."""

    def defaults(name):
        return {p.name: p.default for p in mergekit_method(name).spec.parameters if not p.required}

    assert defaults("ties") == {
        "int8_mask": False,
        "normalize": True,
        "rescale": False,
        "lambda": 1.0,
        "density": 1.0,
    }
    assert defaults("task_arithmetic")["normalize"] is False
    for name in ("dare_ties", "dare_linear"):
        assert defaults(name)["normalize"] is False
        assert defaults(name)["rescale"] is True  # an L1 rescale (RescaleNorm.l1) in 0.1.x


def test_ties_boundary_has_no_ties(models):
    """Precondition of the TIES comparison: no equal magnitudes at the top-k boundary
    (mergekit's argsort is unstable there; umtam_jax keeps the lower flat index)."""
    base, experts = models
    for expert in experts:
        named = [trees.leaves_by_name(t).items() for t in (base, expert)]
        for (path, b), (_, w) in zip(*named, strict=True):
            mag = np.sort(np.abs(w - b).ravel())[::-1]
            k = max(1, int(0.5 * mag.size))
            assert k == mag.size or mag[k - 1] != mag[k], path


@pytest.mark.parametrize("density", [0.5, 1.0])
def test_ties(models, density):
    base, experts = models
    ours = merging.ties(base, experts, density=density, weights=WEIGHTS, scaling=SCALING)
    theirs = _mergekit(
        "ties", base, experts, {"density": density, "weight": WEIGHTS, "lambda": SCALING}
    )
    trees.assert_close_by_name(ours, theirs, **TOL)


def test_ties_via_registry_default_weights(models):
    base, experts = models
    ours = merging.merge("ties", base, experts, density=0.2)
    theirs = _mergekit("ties", base, experts, {"density": 0.2, "weight": 1.0})
    trees.assert_close_by_name(ours, theirs, **TOL)


def test_ties_zero_votes_and_zero_deltas():
    """Cancelling deltas (sum 0 votes +1), zero deltas and an all-zero column."""
    base = {"w": np.zeros(6, np.float32)}
    experts = [
        {"w": np.array([1.0, -2.0, 0.0, 0.0, 3.0, -1.0], np.float32)},
        {"w": np.array([-1.0, 2.0, 0.0, 5.0, -1.0, -1.0], np.float32)},
    ]
    for weights in ([1.0, 1.0], [1.0, 0.5]):
        ours = merging.ties(base, experts, density=1.0, weights=weights)
        theirs = _mergekit("ties", base, experts, {"density": 1.0, "weight": weights})
        trees.assert_close_by_name(ours, theirs, **TOL)


def test_task_arithmetic(models):
    base, experts = models
    ours = merging.task_arithmetic(base, experts, weights=WEIGHTS, scaling=SCALING)
    theirs = _mergekit("task_arithmetic", base, experts, {"weight": WEIGHTS, "lambda": SCALING})
    trees.assert_close_by_name(ours, theirs, **TOL)


# mergekit 0.1.x's `rescale: true` matches the unmasked L1 norm: umtam_jax's `l1_rescale=True`.
# umtam_jax's own default (`rescale=True`: divide by the density) has no mergekit 0.1.x
# counterpart, so it is not compared here.
RESCALES = {"l1": ({"l1_rescale": True}, True), "none": ({"rescale": False}, False)}


@pytest.mark.parametrize("density", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("rescale", sorted(RESCALES))
def test_dare_linear(models, replay_bernoulli, density, rescale):
    base, experts = models
    key = jax.random.key(3)
    ours_opts, mk_rescale = RESCALES[rescale]
    ours = merging.dare(
        base, experts, density=density, key=key, weights=WEIGHTS, scaling=SCALING, **ours_opts
    )
    keeps = _dare_keeps(key, [density] * len(experts), base)
    if density < 1:
        assert 0 < sum(k.sum() for k in keeps[0].values()) < 375
        for path in trees.leaves_by_name(base):
            replay_bernoulli.extend((k[path], density) for k in keeps)
    params = {"density": density, "weight": WEIGHTS, "lambda": SCALING, "rescale": mk_rescale}
    theirs = _mergekit("dare_linear", base, experts, params)
    assert not replay_bernoulli  # every mask was consumed
    trees.assert_close_by_name(ours, theirs, **TOL)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("density", [0.5, 1.0])
@pytest.mark.parametrize("rescale", sorted(RESCALES))
def test_dare_ties(models, replay_bernoulli, density, rescale, normalize):
    base, experts = models
    key = jax.random.key(4)
    ours_opts, mk_rescale = RESCALES[rescale]
    ours = merging.dare_ties(
        base,
        experts,
        density=density,
        key=key,
        weights=WEIGHTS,
        scaling=SCALING,
        normalize=normalize,
        **ours_opts,
    )
    if density < 1:
        keeps = _dare_keeps(key, [density] * len(experts), base)
        for path in trees.leaves_by_name(base):
            replay_bernoulli.extend((k[path], density) for k in keeps)
    params = {"density": density, "weight": WEIGHTS, "lambda": SCALING, "rescale": mk_rescale}
    params["normalize"] = normalize
    theirs = _mergekit("dare_ties", base, experts, params)
    assert not replay_bernoulli
    trees.assert_close_by_name(ours, theirs, **TOL)


def test_dare_ties_mergekit_defaults(models, replay_bernoulli):
    """mergekit's dare_ties with only weight/density given (rescale L1, normalize false)."""
    base, experts = models
    key = jax.random.key(5)
    ours = merging.dare_ties(base, experts, density=0.5, key=key, weights=WEIGHTS, l1_rescale=True)
    keeps = _dare_keeps(key, [0.5, 0.5], base)
    for path in trees.leaves_by_name(base):
        replay_bernoulli.extend((k[path], 0.5) for k in keeps)
    theirs = _mergekit("dare_ties", base, experts, {"density": 0.5, "weight": WEIGHTS})
    trees.assert_close_by_name(ours, theirs, **TOL)
