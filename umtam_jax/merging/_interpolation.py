"""Data-free interpolations with mergekit's semantics: linear, SLERP and NuSLERP (the
spherical means of K experts: :mod:`._spherical_means`; the other data-free methods:
:mod:`._data_free`).

Each follows the method of the same name in mergekit 0.1.5 (``mergekit/merge_methods/``),
with its parameter names and defaults; differences are listed in each docstring. Every
merge works on one tensor (leaf) at a time, so the out-of-core engine and ``umtam-merge``
run them too. Inputs in 16-bit floats are computed in float32 and the result cast back
(mergekit computes ``linear`` and ``slerp`` in float32 too, ``nuslerp`` in the inputs' own
dtype). Methods without a base role in mergekit take ``base=None``; a given base is then
only checked (structure, shapes, dtypes) and otherwise ignored, or, for ``nuslerp``, the
interpolation runs on the task vectors ``w − w0`` and adds ``w0`` back (``base=None`` is
the same computation with ``w0 = 0``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging._gta import compute_dtype, scaled_norm, sum_terms
from umtam_jax.merging._registry import WEIGHTS, Param

_SLERP_DOT_THRESHOLD = 0.9995  # mergekit's slerp: |cos θ| above it interpolates linearly
_SLERP_EPS = 1e-8  # mergekit's slerp: a norm at most this is replaced by 1
_NUSLERP_EPS = 1e-8  # mergekit's nuslerp: colinear when sin θ ≤ eps (1 − cos²θ ≤ eps²)
_NUSLERP_NORM_EPS = 1e-7  # mergekit's nuslerp: norms clamped below at this
_NUSLERP_ZERO_TOTAL = 1e-6  # mergekit's nuslerp: |Σ weight| below it gives t = 0.5


def _traced(*values: Any) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


#: Weights whose sum is within this fraction of Σ|weight| sum to 0 as far as the merge's
#: float32 arithmetic can tell (0.3 − 0.1 − 0.2 is 1.5e-8 there, not 0).
_ZERO_SUM = 1e-6


def _check_weight_sum(call: pipeline.Call, flag: str) -> None:
    """Normalizing by Σ weight needs Σ weight ≠ 0 (mergekit would return NaN, inf or a
    huge result): a sum within :data:`_ZERO_SUM` of the weights' magnitude is refused."""
    weights = call.options["weights"]
    if call.options[flag] is not True or _traced(*weights):
        return
    values = [float(w) for w in weights]
    if abs(math.fsum(values)) <= _ZERO_SUM * math.fsum(map(abs, values)):
        raise ValueError(
            f"{call.method.name} with {flag}=True divides by the sum of the weights, which is "
            f"0 for weights {values} (or too close to 0 to divide by); change a weight or "
            f"set {flag}=False"
        )


# --------------------------------------------------------------------------- linear


def linear(
    base: Any,
    experts: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
) -> Any:
    """Weighted average of the experts (a "model soup"): ``Σ_τ c_τ w_τ / Σ_τ c_τ``.

    With ``normalize=False`` the weighted sum ``Σ_τ c_τ w_τ`` itself. mergekit's ``linear``
    has no base role: ``base`` is only checked against the experts and may be None (in a
    mergekit configuration a listed or given ``base_model`` is one more weighted input; list
    it among ``experts`` for that). mergekit requires every model's ``weight``; here they
    default to 1.0 each (a plain average).

    Args:
      base: parameters with the experts' structure, or None (not used otherwise).
      experts: a sequence of parameter pytrees with a common structure, shapes and dtypes.
      weights: one weight ``c_τ`` per expert (mergekit's per-model ``weight``).
      normalize: divide by ``Σ_τ c_τ`` (mergekit's default).

    Returns:
      The merged parameters, a pytree like the experts.

    Raises:
      ValueError / TypeError: invalid inputs (messages name the leaf path), or
        ``normalize=True`` with weights summing to 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> experts = [{"w": jnp.array([1., 2.])}, {"w": jnp.array([4., 8.])}]
      >>> merging.linear(None, experts, weights=[2., 1.])["w"].tolist()
      [2.0, 4.0]

    References:
      Wortsman et al., "Model soups", arXiv:2203.05482; mergekit ``linear``.
    """
    return pipeline.merge(LINEAR, base, experts, None, weights=weights, normalize=normalize)


@jax.jit
def _linear_leaf(ws: list[jax.Array], weights: list[Any], normalize: Any) -> jax.Array:
    dt = compute_dtype(ws[0])
    c = [jnp.asarray(w, dt) for w in weights]
    total = sum_terms([ci * w.astype(dt) for ci, w in zip(c, ws, strict=True)])
    return (total / jnp.where(normalize, sum_terms(c), 1)).astype(ws[0].dtype)


# --------------------------------------------------------------------------- slerp


def slerp(base: Any, expert: Any, *, t: float) -> Any:
    """Spherical linear interpolation from the base to one expert, per tensor.

    Each tensor is flattened to vectors ``a`` (base) and ``b`` (expert); with
    ``cos θ = ⟨a/‖a‖, b/‖b‖⟩`` clipped to [-1, 1] (a norm ≤ 1e-8 counts as 1)::

        slerp = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b

    and ``(1−t)·a + t·b`` where ``|cos θ| > 0.9995`` (nearly parallel or antiparallel
    vectors). The raw vectors are combined, so norms are interpolated too, as in mergekit.
    As in mergekit, ``t`` is not bounded: outside [0, 1] it extrapolates.

    Args:
      base: the base parameters (``t = 0``).
      expert: the other model's parameters (``t = 1``), with the base's structure, shapes
        and dtypes.
      t: interpolation factor (0: the base, 1: the expert).

    Returns:
      The interpolated parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: a non-finite ``t``, no base, or invalid inputs (messages
        name the leaf path).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> out = merging.slerp({"w": jnp.array([1., 0.])}, {"w": jnp.array([0., 1.])}, t=0.5)
      >>> [round(x, 6) for x in out["w"].tolist()]
      [0.707107, 0.707107]

    References:
      Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985; mergekit
      ``slerp``.
    """
    return pipeline.merge(SLERP, base, expert, None, t=t)


@jax.jit
def _slerp_leaf(base: jax.Array, expert: jax.Array, t: Any) -> jax.Array:
    if base.size == 0:
        return base
    dt = compute_dtype(base)
    a, b = base.astype(dt).reshape(-1), expert.astype(dt).reshape(-1)
    t = jnp.asarray(t, dt)
    na, nb = scaled_norm(a), scaled_norm(b)
    na = jnp.where(na > _SLERP_EPS, na, 1)
    nb = jnp.where(nb > _SLERP_EPS, nb, 1)
    dot = jnp.clip(jnp.sum((a / na) * (b / nb)), -1, 1)
    lin = jnp.abs(dot) > _SLERP_DOT_THRESHOLD
    theta = jnp.arccos(jnp.where(lin, 0, dot))
    sin = jnp.where(lin, 1, jnp.sin(theta))
    ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / sin)
    cb = jnp.where(lin, t, jnp.sin(t * theta) / sin)
    return (ca * a + cb * b).reshape(base.shape).astype(base.dtype)


# --------------------------------------------------------------------------- nuslerp


def nuslerp(
    base: Any,
    experts: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    layout: str = "in_out",
) -> Any:
    """SLERP between two experts with ``t`` from their weights, optionally about a base.

    ``t = c₂ / (c₁ + c₂)`` (``t = 0.5`` when ``|c₁ + c₂| < 1e-6``). With a base the two
    task vectors ``v_i = w_i − w0`` are interpolated and the base added back,
    ``w0 + nuslerp(v₁, v₂)``; without one (``base=None``) the experts themselves. With
    ``u = v/max(‖v‖, 1e-7)`` and ``cos θ = ⟨u₁, u₂⟩`` clipped to [-1, 1]::

        nuslerp(v₁, v₂) = (sin((1−t)θ)·v₁ + sin(tθ)·v₂) / sin θ

    and ``(1−t)·v₁ + t·v₂`` where the vectors are colinear (the angle to ``u₂`` or ``−u₂``
    under ``max(1e-8, 8ε)``, ``ε`` the compute dtype's epsilon). The vectors are whole
    tensors (``nuslerp_flatten=True``, the default), else, as mergekit on a PyTorch
    ``(d_out, d_in)`` weight, each output's row along the last axis, or each input's column
    along the first axis with ``nuslerp_row_wise=True``; a Flax ``(d_in, d_out)`` kernel
    (``layout="in_out"``) is merged as its transpose over its last two axes. mergekit
    requires both models' ``weight``; here they default to 1.0 each (``t = 0.5``).

    Args:
      base: the base parameters ``w0``, or None.
      experts: exactly two parameter pytrees with the base's structure, shapes and dtypes.
      weights: the two weights ``c₁, c₂`` (mergekit's per-model ``weight``).
      nuslerp_flatten: interpolate whole tensors as single vectors.
      nuslerp_row_wise: without flattening, interpolate each input's weights instead of
        each output's (the first axis of a PyTorch weight instead of the last).
      layout: ``"in_out"`` (Flax/JAX kernels) or ``"out_in"`` (PyTorch / safetensors
        weights); used without flattening only.

    Returns:
      The merged parameters, a pytree like the experts.

    Raises:
      ValueError / TypeError: not exactly two experts, or invalid inputs (messages name
        the leaf path).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> experts = [{"w": jnp.array([2., 0.])}, {"w": jnp.array([0., 2.])}]
      >>> out = merging.nuslerp(None, experts, weights=[1., 1.])
      >>> [round(x, 5) for x in out["w"].tolist()]
      [1.41421, 1.41421]

    References:
      mergekit ``nuslerp`` (arcee-ai/mergekit); Shoemake, SIGGRAPH 1985 (SLERP).
    """
    return pipeline.merge(
        NUSLERP,
        base,
        experts,
        None,
        weights=weights,
        nuslerp_flatten=nuslerp_flatten,
        nuslerp_row_wise=nuslerp_row_wise,
        layout=layout,
    )


def _transposed(leaf: Any, base: jax.Array, ws: list[jax.Array], **options: Any) -> jax.Array:
    """``leaf(base, ws, **options)`` on the tensors transposed over their last two axes,
    transposed back: a rule stated for PyTorch ``(d_out, d_in)`` weights, applied to Flax
    ``(d_in, d_out)`` kernels."""

    def swap(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x, -1, -2)

    return swap(leaf(swap(base), [swap(w) for w in ws], **options))


@functools.partial(jax.jit, static_argnames=("flatten", "row_wise", "layout"))
def _nuslerp_leaf(base, ws, weights, flatten: bool, row_wise: bool, layout: str) -> jax.Array:
    if layout == "in_out" and not flatten and base.ndim >= 2:
        return _transposed(
            _nuslerp_leaf, base, ws, weights=weights, flatten=False, row_wise=row_wise,
            layout="out_in",
        )  # fmt: skip
    w1, w2 = ws
    dt = compute_dtype(base)
    b = base.astype(dt)
    v1, v2 = w1.astype(dt) - b, w2.astype(dt) - b
    c1, c2 = (jnp.asarray(c, dt) for c in weights)
    small = jnp.abs(c1 + c2) < _NUSLERP_ZERO_TOTAL
    t = jnp.where(small, 0.5, c2 / jnp.where(small, 1, c1 + c2))
    flat = flatten or b.ndim == 0
    swap = row_wise and not flat
    if flat:
        v1, v2 = v1.reshape(-1), v2.reshape(-1)
    elif swap:
        v1, v2 = jnp.swapaxes(v1, 0, -1), jnp.swapaxes(v2, 0, -1)

    def unit(v: jax.Array) -> jax.Array:
        return v / jnp.maximum(scaled_norm(v, axis=-1, keepdims=True), _NUSLERP_NORM_EPS)

    u1, u2 = unit(v1), unit(v2)
    cos = jnp.clip(jnp.sum(u1 * u2, axis=-1, keepdims=True), -1, 1)
    # Colinear (parallel or opposite) where the angle to u2 or to −u2 is below mergekit's
    # 1e-8, or below what the dtype resolves: in float32 cos of opposite vectors comes out
    # as −1 + 2⁻²⁴, never within 1e-8 of −1, but ‖u1 + u2‖ is exactly 0 for them.
    tol = max(_NUSLERP_EPS, 8 * float(jnp.finfo(dt).eps))
    gap = jnp.minimum(
        jnp.linalg.norm(u1 - u2, axis=-1, keepdims=True),
        jnp.linalg.norm(u1 + u2, axis=-1, keepdims=True),
    )
    colinear = gap <= tol
    theta = jnp.arccos(jnp.where(colinear, 0, cos))
    sin = jnp.where(colinear, 1, jnp.sin(theta))
    out = (jnp.sin((1 - t) * theta) * v1 + jnp.sin(t * theta) * v2) / sin
    out = jnp.where(colinear, (1 - t) * v1 + t * v2, out)
    if swap:
        out = jnp.swapaxes(out, 0, -1)
    return (b + out.reshape(b.shape)).astype(base.dtype)


# --------------------------------------------------------------------------- registry

LINEAR = R.register(
    R.Method(
        "linear",
        linear,
        "weighted average Σ c·w / Σ c of the experts (base not used)",
        (WEIGHTS, Param("normalize", "bool", "divide by the sum of the weights")),
        lambda opts, b, ws, masks, scores, extras: _linear_leaf(
            ws, opts["weights"], opts["normalize"]
        ),
        base_optional=True,
        check=lambda call: _check_weight_sum(call, "normalize"),
    )
)
SLERP = R.register(
    R.Method(
        "slerp",
        slerp,
        "spherical interpolation from the base (t = 0) to one expert (t = 1), per tensor",
        (Param("t", "number", "interpolation factor: 0 the base, 1 the expert"),),
        lambda opts, b, ws, masks, scores, extras: _slerp_leaf(b, ws[0], opts["t"]),
        single_expert=True,
    )
)
NUSLERP = R.register(
    R.Method(
        "nuslerp",
        nuslerp,
        "SLERP of two experts (or their task vectors) with t = c2 / (c1 + c2)",
        (
            WEIGHTS,
            Param("nuslerp_flatten", "bool", "interpolate whole tensors as one vector"),
            Param("nuslerp_row_wise", "bool", "unflattened: per input feature, not per output"),
            # Read only without flattening (a value that varies by tensor may not flatten).
            dataclasses.replace(R.LAYOUT, read_when=lambda o: o["nuslerp_flatten"] is not True),
        ),
        lambda opts, b, ws, masks, scores, extras: _nuslerp_leaf(
            b,
            ws,
            opts["weights"],
            flatten=opts["nuslerp_flatten"],
            row_wise=opts["nuslerp_row_wise"],
            layout=opts["layout"],
        ),
        base_optional=True,
        experts=(2, 2),
    )
)
