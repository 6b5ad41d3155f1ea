"""EMR-merging: one unified task vector plus, per task, a boolean mask and one scalar.

With ``θ_0`` the base and ``τ_t = θ_t − θ_0`` expert ``t``'s task vector,
:func:`emr_merge` elects ``τ_uni``, masks it per task and rescales each mask by one scalar;
:func:`emr_task_model` rebuilds task ``t``'s model ``θ_0 + λ_t M_t ∘ τ_uni``. The masks are
boolean pytrees like the ones of :mod:`~umtam_jax.merging._task_masks` (1 bit per entry
packed with :func:`~umtam_jax.merging.pack_mask`). Computed in float32 for 16-bit inputs,
every model cast back to the base's dtypes.

References:
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024,
    arXiv:2405.17461.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax.merging import _validation as V
from umtam_jax.merging._task_masks import _mask_leaves, _reconstruct, _task_vectors, _unflatten


@jax.jit
def _emr_leaf(base, ws):
    """One leaf of EMR: ``τ_uni``, the masks and, per task, ``Σ|τ_t|`` and ``Σ|M_t ∘ τ_uni|``."""
    _, taus = _task_vectors(base, ws)
    tv = jnp.stack(taus)
    gamma = jnp.sign(jnp.sum(tv, axis=0))
    eps = jnp.max(jnp.where(tv * gamma > 0, jnp.abs(tv), 0), axis=0)
    uni = gamma * eps
    masks = jnp.sign(tv) * jnp.sign(uni) > 0  # signs: tv · uni underflows for tiny entries
    axes = tuple(range(1, tv.ndim))
    before = jnp.sum(jnp.abs(tv), axis=axes)
    after = jnp.sum(jnp.where(masks, jnp.abs(uni), 0), axis=axes)
    return uni, list(masks), before, after


class EMRMerged(NamedTuple):
    """EMR-merging's output: one unified task vector and a light modulator per task.

    Attributes:
      unified: ``τ_uni``, a pytree with the base's structure (float32 for 16-bit bases).
      masks: one boolean pytree ``M_t`` per task (1 bit per entry packed:
        :func:`~umtam_jax.merging.pack_mask`).
      rescalers: the ``λ_t``, an array of shape ``(K,)``.
    """

    unified: Any
    masks: list[Any]
    rescalers: jax.Array


def emr_merge(base: Any, experts: Sequence[Any], *, rescale: str = "sum") -> EMRMerged:
    """EMR-merging: elect a unified task vector, then mask and rescale it per task.

    With ``τ_t = θ_t − θ_0`` (Huang et al., Eqs. 2–6):

    1. Elect: ``γ = sign(Σ_t τ_t)``, ``ε = max_t |τ_t|`` over the tasks whose sign is
       ``γ``, ``τ_uni = γ ∘ ε`` (0 where ``Σ_t τ_t = 0``; the reference code votes −1
       there).
    2. Mask: ``M_t = 1{τ_t ∘ τ_uni > 0}``.
    3. Rescale: ``λ_t = Σ|τ_t| / Σ|M_t ∘ τ_uni|``, one scalar per task over all the
       parameters, as the paper's equation (``rescale="sum"``); the reference code (and
       FusionBench) sums each tensor's mean instead, ``Σ_l mean|τ_t,l| / Σ_l mean|M_t ∘
       τ_uni,l|`` (``rescale="tensor_mean"``: small tensors such as biases weigh more).
       ``λ_t = 1`` where the denominator is 0 (``M_t`` keeps nothing).

    Task ``t``'s model is ``θ_0 + λ_t M_t ∘ τ_uni`` (:func:`emr_task_model`); evaluate
    each task with its own. Storage: ``τ_uni`` (one model) plus 1 bit per parameter and a
    scalar per task.

    Args:
      base: the shared initial parameters ``θ_0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      rescale: ``"sum"`` or ``"tensor_mean"``, how ``λ_t`` sums over the tensors.

    Returns:
      An :class:`EMRMerged` ``(unified, masks, rescalers)``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., -2., 1.])}, {"w": jnp.array([3., 1., 1.])}]
      >>> emr = merging.emr_merge(base, experts)
      >>> emr.unified["w"].tolist(), emr.masks[1]["w"].tolist()
      ([3.0, -2.0, 1.0], [True, False, True])
      >>> [round(x, 4) for x in emr.rescalers.tolist()]  # 4/6 and 5/4
      [0.6667, 1.25]
      >>> merging.emr_task_model(base, emr, 1)["w"].tolist()
      [3.75, 0.0, 1.25]

    References:
      Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS
      2024, arXiv:2405.17461; FusionBench ``emr_merging``.
    """
    V.check_option("rescale", rescale, ("sum", "tensor_mean"))
    prepared = V.prepare(base, experts)
    rows = [_emr_leaf(b, [ws[j] for ws in prepared.experts]) for j, b in enumerate(prepared.base)]
    acc = jnp.result_type(*[uni.dtype for uni, *_ in rows])
    num = den = jnp.zeros(len(prepared.experts), acc)
    for (_, _, before, after), b in zip(rows, prepared.base, strict=True):
        if b.size == 0:  # an empty tensor adds nothing (its mean would be 0/0)
            continue
        n = b.size if rescale == "tensor_mean" else 1
        num, den = num + before.astype(acc) / n, den + after.astype(acc) / n
    # Finite inputs can still overflow (τ_t = θ_t − θ_0, or the sums): an error, as every
    # merge's result, not an infinite τ_uni or a NaN (or 0) λ_t.
    unified = [uni for uni, *_ in rows]
    named = [
        (f"the unified task vector τ_uni{p}", u)
        for p, u in zip(prepared.paths, unified, strict=True)
    ]
    named += [("the rescalers' numerator Σ|τ_t|", num), ("their denominator Σ|M_t ∘ τ_uni|", den)]
    V.check_finite(named, problem=V.OVERFLOW)
    rescalers = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 1)
    unified = _unflatten(prepared, unified)
    masks = [_unflatten(prepared, [row[1][t] for row in rows]) for t in range(len(num))]
    return EMRMerged(unified, masks, rescalers)


def emr_task_model(base: Any, emr: EMRMerged, task: int | None) -> Any:
    """Task ``task``'s model from :func:`emr_merge`: ``θ_0 + λ_t M_t ∘ τ_uni``.

    ``task=None`` gives the unified model ``θ_0 + τ_uni`` (one model for every task).

    Args:
      base: the shared initial parameters ``θ_0``.
      emr: :func:`emr_merge`'s output for this base (or its three fields in order, e.g.
        as a restored checkpoint gives them back: a tuple, a list or a dict of them).
      task: the expert's index ``t`` in ``0 … K − 1``, or None.

    Returns:
      The task's parameters, a pytree like ``base`` (computed in float32 or wider).

    Raises:
      ValueError / TypeError: a task out of range or trees unlike the base.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> emr = merging.emr_merge(base, [{"w": jnp.array([1., -2.])}])
      >>> merging.emr_task_model(base, emr, 0)["w"].tolist()
      [1.0, -2.0]

    References:
      Huang et al., arXiv:2405.17461, Eq. 7.
    """
    emr = _as_emr(emr)
    prepared = V.prepare(base, [base], what="base")  # the base, flattened and checked
    unified = V.leaves_like(emr.unified, prepared, "emr.unified")
    k = len(emr.masks)
    masks: list[Any]  # all True (the unified vector) or one task's mask leaves
    scale: float | jax.Array
    if task is None:
        masks, scale = [True] * len(unified), 1.0
    else:
        if isinstance(task, bool | np.bool_) or not isinstance(task, int | np.integer):
            raise TypeError(f"task must be an int expert index or None, got {task!r}")
        if not 0 <= task < k:
            raise ValueError(f"task must be an expert index in [0, {k - 1}] or None, got {task!r}")
        task = int(task)
        masks = _mask_leaves(emr.masks[task], prepared, f"emr.masks[{task}]")
        scale = emr.rescalers[task]
        V.check_finite_scalars(**{f"emr.rescalers[{task}]": scale})
    leaves = zip(prepared.base, unified, masks, strict=True)
    out = [_reconstruct(b, u, m, scale) for b, u, m in leaves]
    return V.rebuild(prepared, out)


def _as_emr(emr: Any) -> EMRMerged:
    """``emr`` as an :class:`EMRMerged`: a restored one comes back as a plain tuple, list
    or dict of its fields."""
    if isinstance(emr, EMRMerged):
        return emr
    if isinstance(emr, dict) and set(emr) == set(EMRMerged._fields):
        return EMRMerged(**emr)
    if isinstance(emr, tuple | list) and len(emr) == len(EMRMerged._fields):
        return EMRMerged(*emr)
    raise TypeError(
        "emr must be emr_merge's output (unified, masks, rescalers), got "
        f"{type(emr).__name__}"
        + (f" with {len(emr)} fields" if isinstance(emr, tuple | list | dict) else "")
    )
