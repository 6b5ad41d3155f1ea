"""One planned leaf merged in an order that holds less at once (:meth:`._job.Job.merge`).

The steps of ``pipeline.importances``, ``pipeline.masks`` and ``pipeline.combine`` on a
leaf, with the same values bit for bit: each expert's scores are made into its keep mask
before the next expert's are computed, and are not kept at all where the method's kernel
does not read them, which is decided once per leaf signature from the kernel's jaxpr.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from umtam_jax.engine._global_topk import GlobalTopK
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _validation as V
from umtam_jax.merging._select import sliced_mask


def merge_leaf(
    call: pipeline.Call,
    topk: GlobalTopK | None,
    scope: Any,
    cache: dict[Any, list[jax.ShapeDtypeStruct] | None],
) -> np.ndarray:
    """:meth:`._job.Job.merge` on one planned leaf (see there): ``scope`` is the job's
    ``scope`` option, ``cache`` its answers of :func:`_unread_scores` by leaf signature."""
    m, p = call.method, call.prepared
    keep: list[list[Any]] | None
    if m.importance is None:
        keep = pipeline.masks(call, None)
        return _finish(call, pipeline.combine(call, keep, None))
    stand_ins = _unread_scores(call, scope, cache)  # None: the kernel reads the scores
    from_scores = m.sparsify == "topk" or topk is not None
    scores: list[list[Any]] | None = None
    if stand_ins is None:
        scores = []
    elif not from_scores:
        return _finish(
            call, pipeline.combine(call, pipeline.masks(call, None), [[s] for s in stand_ins])
        )
    keep = []
    for t in range(len(p.experts)):
        s = pipeline.expert_importance(call, 0, t)
        if from_scores:
            if topk is None:
                batch = pipeline.leaf_batch_axes(call.options, p.key_paths[0], s.shape)
                mask = sliced_mask(s, call.options["density"][t], batch)
            else:
                mask = topk.mask(t, s)
            keep.append([jax.block_until_ready(mask)])
            del mask
        if scores is not None:
            scores.append([s])
        del s
    if not from_scores:
        keep = pipeline.masks(call, scores)
    if scores is None:
        assert stand_ins is not None  # scores is None only where stand-ins replace them
        scores = [[s] for s in stand_ins]
    return _finish(call, pipeline.combine(call, keep, scores))


def _finish(call: pipeline.Call, leaves: list[Any]) -> np.ndarray:
    merged = V.rebuild(call.prepared, leaves)
    del leaves
    return np.asarray(jax.tree.leaves(merged)[0])


def _unread_scores(
    call: pipeline.Call, scope: Any, cache: dict[Any, list[jax.ShapeDtypeStruct] | None]
) -> list[jax.ShapeDtypeStruct] | None:
    """None if the method's kernel reads the importance scores it is given; else their
    shapes and dtypes, given to it instead of the arrays (TIES's kernel, for one, only
    needs the masks made from them).

    Decided from the kernel's jaxpr on abstract masks and scores, once per leaf
    signature: no scores among the inputs of its operations means that nothing but
    their shapes and dtypes can matter. Any doubt (a trace that fails) answers None.
    """
    m, p = call.method, call.prepared
    importance = m.importance
    assert importance is not None  # merge_leaf asks only for a method with an importance
    b, ws = p.base[0], [w[0] for w in p.experts]
    extras = None if call.extras is None else [x[0] for x in call.extras]
    signature = [(tuple(x.shape), str(x.dtype)) for x in [b, *ws]]
    signature += [
        (tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in jax.tree.leaves(extras)
    ]
    key = (str(jax.tree.structure(extras)), tuple(signature))
    if key not in cache:
        cache[key] = None
        try:
            scores = [
                jax.eval_shape(
                    lambda b, w, x: importance(call.options, b, w, x),
                    b,
                    w,
                    None if extras is None else extras[t],
                )
                for t, w in enumerate(ws)
            ]
            masks = None
            if m.sparsify == "topk" or scope == "global":
                masks = [jax.ShapeDtypeStruct(s.shape, jnp.bool_) for s in scores]
            elif m.sparsify == "bernoulli":
                masks = [jax.ShapeDtypeStruct(b.shape, jnp.bool_) for _ in ws]
            closed = jax.make_jaxpr(lambda keep, s: m.kernel(call.options, b, ws, keep, s, extras))(
                masks, scores
            )
            jaxpr = closed.jaxpr
            score_vars = set(jaxpr.invars[len(jax.tree.leaves(masks)) :])
            used = {v for e in jaxpr.eqns for v in e.invars if isinstance(v, jex.Var)}
            used |= {v for v in jaxpr.outvars if isinstance(v, jex.Var)}
            if len(score_vars) == len(scores) and not score_vars & used:
                cache[key] = scores
        except Exception:  # noqa: BLE001 - when in doubt, the kernel gets the scores
            pass
    return cache[key]
