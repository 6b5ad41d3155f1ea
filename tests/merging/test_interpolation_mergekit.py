"""mergekit's data-free interpolation methods against mergekit's own tensor-level
functions, their parameter names and defaults, and degenerate inputs. They run only where
mergekit and torch import, e.g. from the repository root with ``mk`` a virtual environment
holding mergekit, torch and the test dependencies::

    PYTHONPATH=. mk/bin/python -m pytest tests/merging/test_interpolation_mergekit.py
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.merging.interpolation_helpers import CASES, VARIANTS, _call
from umtam_jax import merging

# ------------------------------------------------------------------ mergekit itself


def _mergekit_parameters(name, kwargs, k):
    """mergekit's parameters for umtam_jax's ``kwargs`` (``weights`` → per-model ``weight``;
    no ``layout``: mergekit's tensors are PyTorch weights, ``layout="out_in"`` here)."""
    params = {key: v for key, v in kwargs.items() if key != "layout"}
    if "weights" in params or name in ("linear", "nuslerp", "multislerp"):
        params["weight"] = params.pop("weights", None) or [1.0] * k
    return params


def test_mergekit_equality():
    pytest.importorskip("mergekit")
    torch = pytest.importorskip("torch")
    from mergekit.merge_methods import get as mergekit_method
    from mergekit.merge_methods import merge_tensors

    # Parameter names and defaults are mergekit's (weight → weights; required stays so,
    # except the weights, which default to 1.0 each here).
    for name in CASES:
        ours = merging.METHODS[name].defaults()
        for p in mergekit_method(name).spec.parameters:
            key = "weights" if p.name == "weight" else p.name
            assert key in ours, (name, p.name)
            if p.required and key != "weights":
                assert ours[key] is merging.REQUIRED, (name, key)
            elif not p.required and key != "scale":
                assert ours[key] == p.default, (name, key)
    assert merging.METHODS["passthrough"].defaults()["scale"] == 1.0  # mergekit: None

    rng = np.random.default_rng(3)
    shapes = {"a": (12, 16), "b": (16,), "c": (2, 3, 4), "d": ()}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    experts = [
        {n: (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32) for n, x in base.items()}
        for _ in range(3)
    ]
    for name, variant in VARIANTS:
        _, k, single, variants = CASES[name]
        kwargs = variants[variant]
        with_base = name not in ("linear", "karcher", "passthrough")
        if merging.METHODS[name].param("layout") is not None:
            kwargs = {**kwargs, "layout": "out_in"}  # the tensors below are PyTorch weights
        for use_base in {with_base, False} if name in ("nuslerp", "multislerp") else {with_base}:
            b = base if use_base else None
            got = _call(name, b, experts, kwargs)
            params = _mergekit_parameters(name, kwargs, k)
            for leaf in shapes:
                tensors = [torch.from_numpy(np.array(e[leaf])) for e in experts[:k]]
                if use_base:
                    tensors.insert(0, torch.from_numpy(np.array(base[leaf])))
                want = merge_tensors(
                    tensors, name, parameters=params, base_index=0 if use_base else None
                ).numpy()
                assert want.dtype == np.float32
                np.testing.assert_allclose(
                    np.asarray(got[leaf]),
                    want,
                    rtol=0,
                    atol=1e-5,
                    err_msg=f"{name} {kwargs} {leaf}",
                )


# (method, [base or None, *experts], mergekit's parameters)
DEGENERATE = [
    ("slerp", [[1, 2, -1], [2, 4, -2]], {"t": 0.25}),  # parallel
    ("slerp", [[0, 0, 0], [3, 0, 4]], {"t": 0.5}),  # a zero norm
    ("nuslerp", [None, [1, 2], [3, 6]], {"weight": [1.0, -1.0]}),  # colinear, Σ weight 0
    ("multislerp", [None, [1, 2], [-2, -4]], {"weight": [1.0, 1.0]}),  # antipodal
    ("multislerp", [[5, 5], [1, 2]], {"weight": [1.0]}),  # one expert
    ("karcher", [None, [3, 4], [0, 0]], {}),  # a zero expert
    ("karcher", [None, [0, 0], [1e-7, 0]], {}),  # all norms ≤ tol
    ("karcher", [None, [1, 0], [0, 1]], {"max_iter": 0}),
    ("karcher", [None, [1, 0], [-1, 1e-3], [0, 1]], {}),  # nearly antipodal
    ("model_stock", [[1, 1], [2, 3], [0, -1]], {}),  # 1 + (K−1) cos θ = 0
    ("model_stock", [[1, 1], [1, 1], [1, 1]], {}),  # zero task vectors
    ("nearswap", [[0, 1, 2], [0, 1.5, -2]], {"t": 0.7}),  # an equal entry
    ("arcee_fusion", [[1] * 16, [2] + [1] * 15], {}),  # threshold 0: all kept
    ("passthrough", [None, [1, 2, 3]], {"scale": 2.0}),
]


def test_mergekit_equality_degenerate():
    pytest.importorskip("mergekit")
    torch = pytest.importorskip("torch")
    from mergekit.merge_methods import merge_tensors

    for name, inputs, params in DEGENERATE:
        base, *experts = [None if x is None else np.asarray(x, np.float32) for x in inputs]
        tensors = [torch.from_numpy(x) for x in ([] if base is None else [base]) + experts]
        want = merge_tensors(
            tensors, name, parameters=params, base_index=None if base is None else 0
        )
        kwargs = {("weights" if k == "weight" else k): v for k, v in params.items()}
        tree = lambda x: {"w": jnp.asarray(x)}  # noqa: E731
        single = merging.METHODS[name].single_expert
        args = tree(experts[0]) if single else [tree(x) for x in experts]
        got = getattr(merging, name)(None if base is None else tree(base), args, **kwargs)
        np.testing.assert_allclose(got["w"], want.numpy(), rtol=0, atol=1e-6, err_msg=name)
