"""Data-free merges with mergekit's semantics besides the interpolations
(:mod:`._interpolation`) and the spherical means (:mod:`._spherical_means`): Model Stock,
NearSwap, Arcee Fusion and passthrough (one model, unchanged).

Each follows the method of the same name in mergekit 0.1.5 (``mergekit/merge_methods/``),
with its parameter names and defaults; differences are listed in each docstring. Every
merge works on one tensor (leaf) at a time, so the out-of-core engine and ``umtam-merge``
run them too. Inputs in 16-bit floats are computed in float32 and the result cast back
(mergekit computes these in the inputs' own dtype).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging._gta import compute_dtype, sum_terms
from umtam_jax.merging._interpolation import _traced, _transposed
from umtam_jax.merging._registry import Param

_STOCK_EPS = 1e-6  # mergekit's model_stock: floor of ‖Δ_i‖‖Δ_j‖ and of |1 + (K−1) cos θ|
_NEARSWAP_EPS = 1e-6  # mergekit's nearswap: floor of |w − w0|
_FUSION_EPS = 1e-8  # mergekit's arcee_fusion: added to both softmaxes


def model_stock(
    base: Any, experts: Sequence[Any], *, filter_wise: bool = False, layout: str = "in_out"
) -> Any:
    """Model Stock: the experts' average pulled towards the base by their angle.

    Per tensor (or with ``filter_wise=True`` per output filter: per row of a PyTorch
    ``(d_out, d_in)`` weight, ``layout="out_in"``, as mergekit; per column of a Flax
    ``(d_in, d_out)`` kernel, ``layout="in_out"``, which is merged as its transpose over its
    last two axes; 0- and 1-D tensors are one row), with task vectors ``Δ_τ = w_τ − w0``,
    ``cos θ`` the mean over pairs ``τ < σ`` of ``⟨Δ_τ, Δ_σ⟩ / max(‖Δ_τ‖‖Δ_σ‖, 1e-6)``
    (each clipped to [-1, 1]) and ``K ≥ 2`` experts::

        t = K cos θ / (1 + (K − 1) cos θ),   merged = t · (1/K) Σ_τ w_τ + (1 − t) · w0

    with ``t = 0`` (the base) where ``|1 + (K − 1) cos θ| < 1e-6``.

    Args:
      base: the base parameters ``w0`` (required).
      experts: two or more parameter pytrees with the base's structure, shapes and dtypes.
      filter_wise: one ``t`` per output filter instead of per tensor.
      layout: ``"in_out"`` (Flax/JAX kernels) or ``"out_in"`` (PyTorch / safetensors
        weights): which axis holds the output filters (``filter_wise`` only).

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: no base, fewer than two experts, or invalid inputs
        (messages name the leaf path).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., 0.])}, {"w": jnp.array([1., 1.])}]
      >>> [round(x, 5) for x in merging.model_stock(base, experts)["w"].tolist()]
      [0.82843, 0.41421]

    References:
      Jang et al., "Model Stock: All we need is just a few fine-tuned models",
      arXiv:2403.19522; mergekit ``model_stock``.
    """
    return pipeline.merge(MODEL_STOCK, base, experts, None, filter_wise=filter_wise, layout=layout)


@functools.partial(jax.jit, static_argnames=("filter_wise", "layout"))
def _model_stock_leaf(
    base: jax.Array, ws: list[jax.Array], filter_wise: bool, layout: str
) -> jax.Array:
    if base.size == 0:
        return base
    if filter_wise and layout == "in_out" and base.ndim >= 2:
        return _transposed(_model_stock_leaf, base, ws, filter_wise=True, layout="out_in")
    dt, k = compute_dtype(base), len(ws)
    rows = (-1, base.shape[-1]) if filter_wise and base.ndim >= 2 else (1, -1)
    w0 = base.astype(dt).reshape(rows)
    xs = [w.astype(dt).reshape(rows) for w in ws]
    deltas = [x - w0 for x in xs]
    norms = [jnp.linalg.norm(d, axis=-1) for d in deltas]
    cosines = [
        jnp.clip(
            jnp.sum(deltas[i] * deltas[j], -1) / jnp.maximum(norms[i] * norms[j], _STOCK_EPS),
            -1,
            1,
        )
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = (sum_terms(cosines) / len(cosines))[:, None]
    den = 1 + (k - 1) * cos
    singular = jnp.abs(den) < _STOCK_EPS
    t = jnp.where(singular, 0, k * cos / jnp.where(singular, 1, den))
    out = t * (sum_terms(xs) / k) + (1 - t) * w0
    return out.reshape(base.shape).astype(base.dtype)


def nearswap(base: Any, expert: Any, *, t: float) -> Any:
    """NearSwap: take the expert's value where it is near the base's, keep the base elsewhere.

    Elementwise, ``s = clip(t / max(|w − w0|, 1e-6), 0, 1)`` and
    ``merged = s · w + (1 − s) · w0``: entries within ``t`` of the base become the
    expert's, farther ones move ``t / |w − w0|`` of the way (``t ≤ 0`` returns the base).

    Args:
      base: the base parameters ``w0`` (required).
      expert: the other model's parameters, with the base's structure, shapes and dtypes.
      t: the distance scale (mergekit requires it; any finite number).

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: no base, or invalid inputs (messages name the leaf path).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base, expert = {"w": jnp.array([0., 0., 0.])}, {"w": jnp.array([0.5, 2., -4.])}
      >>> merging.nearswap(base, expert, t=1.0)["w"].tolist()
      [0.5, 1.0, -1.0]

    References:
      alchemonaut, "QuartetAnemoi-70B-t0.0001" (Hugging Face model card, NearSwap);
      mergekit ``nearswap``.
    """
    return pipeline.merge(NEARSWAP, base, expert, None, t=t)


@jax.jit
def _nearswap_leaf(base: jax.Array, expert: jax.Array, t: Any) -> jax.Array:
    dt = compute_dtype(base)
    a, b = base.astype(dt), expert.astype(dt)
    s = jnp.clip(jnp.asarray(t, dt) / jnp.maximum(jnp.abs(a - b), _NEARSWAP_EPS), 0, 1)
    return (s * b + (1 - s) * a).astype(base.dtype)


def arcee_fusion(base: Any, expert: Any) -> Any:
    """Arcee Fusion: keep the expert's changes whose importance is an upper outlier.

    Per tensor, with ``p = softmax(w) + 1e-8`` and ``q = softmax(w0) + 1e-8`` over the
    last axis, the importance of each entry is ``|w − w0| · KL`` with
    ``KL = Σ_last p log(p / q)`` (per row). With ``Q1, Q2, Q3`` the importances at sorted
    positions ``⌊(n−1)/4⌋, ⌊(n−1)/2⌋, ⌊3(n−1)/4⌋`` (mergekit's quantiles, no
    interpolation), entries with importance ``≥ Q2 + 1.5 (Q3 − Q1)`` take the expert's
    value, ``merged = w0 + (w − w0) · mask``, the rest keep the base's. mergekit estimates
    the quantiles of tensors above 10⁶ entries from 10⁶ entries drawn at random with
    replacement; here they are always exact (deterministic).

    Args:
      base: the base parameters ``w0`` (required).
      expert: the other model's parameters, with the base's structure, shapes and dtypes.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: no base, or invalid inputs (messages name the leaf path).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros((1, 8))}
      >>> expert = {"w": jnp.array([[.1, .2, .1, .2, .1, .2, .1, 3.]])}
      >>> merging.arcee_fusion(base, expert)["w"].tolist()
      [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]]

    References:
      Arcee AI, "Arcee Fusion" (arcee.ai); mergekit ``arcee_fusion``.
    """
    return pipeline.merge(ARCEE_FUSION, base, expert, None)


@jax.jit
def _arcee_fusion_leaf(base: jax.Array, expert: jax.Array) -> jax.Array:
    if base.size == 0:
        return base
    dt = compute_dtype(base)
    shape = base.shape or (1,)  # a scalar is a row of one
    a, b = base.astype(dt).reshape(shape), expert.astype(dt).reshape(shape)
    p = jax.nn.softmax(b, axis=-1) + _FUSION_EPS
    q = jax.nn.softmax(a, axis=-1) + _FUSION_EPS
    importance = jnp.abs(b - a) * jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
    ranked, n = jnp.sort(importance.reshape(-1)), importance.size - 1
    threshold = ranked[n // 2] + 1.5 * (ranked[3 * n // 4] - ranked[n // 4])
    out = a + (b - a) * (importance >= threshold).astype(dt)
    return out.reshape(base.shape).astype(base.dtype)


def passthrough(base: Any, experts: Sequence[Any], *, scale: float = 1.0) -> Any:
    """Passthrough: the one given model, unchanged (times ``scale`` if given).

    mergekit's ``passthrough`` copies its single input (usually layer slices of several
    models, which umtam_jax does not have); here it returns the only expert, each tensor
    multiplied by ``scale`` (the default 1.0, mergekit's ``scale: null``, returns the
    expert's arrays themselves). It has no base role: ``base`` is only checked and may
    be None; ``passthrough(None, [model])`` is the model.

    Args:
      base: parameters with the expert's structure, or None (not used otherwise).
      experts: a sequence with exactly one parameter pytree.
      scale: factor on every tensor (mergekit's ``scale``).

    Returns:
      The model's parameters (scaled), a pytree like it.

    Raises:
      ValueError / TypeError: not exactly one expert, or invalid inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> merging.passthrough(None, [{"w": jnp.array([1., 2.])}], scale=0.5)["w"].tolist()
      [0.5, 1.0]

    References:
      mergekit ``passthrough``.
    """
    return pipeline.merge(PASSTHROUGH, base, experts, None, scale=scale)


@jax.jit
def _scale_leaf(x: jax.Array, scale: Any) -> jax.Array:
    dt = compute_dtype(x)
    return (x.astype(dt) * jnp.asarray(scale, dt)).astype(x.dtype)


def _passthrough_kernel(opts, b, ws, masks, scores, extras) -> jax.Array:
    scale = opts["scale"]
    if not _traced(scale) and float(scale) == 1.0:
        return ws[0]
    return _scale_leaf(ws[0], scale)


# --------------------------------------------------------------------------- registry

MODEL_STOCK = R.register(
    R.Method(
        "model_stock",
        model_stock,
        "average of two or more experts, pulled to the base by their task vectors' angle",
        (
            Param("filter_wise", "bool", "one ratio per output filter"),
            # Read only per filter (a value that varies by tensor may be per filter).
            dataclasses.replace(R.LAYOUT, read_when=lambda o: o["filter_wise"] is not False),
        ),
        lambda opts, b, ws, masks, scores, extras: _model_stock_leaf(
            b, ws, filter_wise=opts["filter_wise"], layout=opts["layout"]
        ),
        experts=(2, None),
    )
)
NEARSWAP = R.register(
    R.Method(
        "nearswap",
        nearswap,
        "the expert's entries within t of the base's, the rest moved t/|w - w0| of the way",
        (Param("t", "number", "distance scale: entries within t take the expert's value"),),
        lambda opts, b, ws, masks, scores, extras: _nearswap_leaf(b, ws[0], opts["t"]),
        single_expert=True,
    )
)
ARCEE_FUSION = R.register(
    R.Method(
        "arcee_fusion",
        arcee_fusion,
        "keep the expert's entries whose |Δ|·KL importance is an upper outlier",
        (),
        lambda opts, b, ws, masks, scores, extras: _arcee_fusion_leaf(b, ws[0]),
        single_expert=True,
    )
)
PASSTHROUGH = R.register(
    R.Method(
        "passthrough",
        passthrough,
        "the one given model, unchanged (times scale)",
        (Param("scale", "number", "factor on every tensor"),),
        _passthrough_kernel,
        base_optional=True,
        experts=(1, 1),
    )
)
