"""Model Breadcrumbs, DELLA, SCE and RAM against mergekit's own tensor code (DELLA with
its random draws replayed from ours), and mergekit's defaults against the ones mirrored.

They run only where ``mergekit`` and ``torch`` import, e.g. from the repository root with
``mk`` a virtual environment holding them and the test dependencies::

    PYTHONPATH=. mk/bin/python -m pytest tests/merging/test_sparsification_mergekit.py
"""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest

from tests import trees
from tests.merging.sparsification_helpers import _FLOAT32_TESTS, della_probs, della_uniforms
from umtam_jax import merging


@pytest.fixture(autouse=True)
def _x64(request):
    with jax.enable_x64(request.function.__name__ not in _FLOAT32_TESTS):
        yield


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
