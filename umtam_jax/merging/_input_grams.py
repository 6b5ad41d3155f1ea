"""The Gram pass of RegMean: the input Gram matrix of every linear layer of a Flax model.

:func:`input_grams` traces the model's forward pass with each ``flax.nnx.Linear`` or
``LinearGeneral`` (``flax.linen.Dense`` or ``DenseGeneral``) call recording ``XᵀX`` of
its inputs, and returns the Grams in the parameters' layout, one expert's ``grams`` for
:func:`umtam_jax.merging.regmean`.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax import _pytrees
from umtam_jax._precision import at_least_float32

_HIGHEST = jax.lax.Precision.HIGHEST


class _Recorder:
    """What the forward pass being traced records: each layer's path (by ``id``), the
    mask's value, and the Grams and row counts by path."""

    def __init__(self, mask: jax.Array | None):
        self.mask = mask
        self.paths: dict[int, tuple] = {}
        self.grams: dict[str, tuple[jax.Array, jax.Array]] = {}
        self.names: dict[str, tuple] = {}

    def add(self, path: tuple, x: jax.Array, axes: tuple[int, ...] = (-1,)) -> None:
        """Adds ``XᵀX`` of the inputs ``x`` of the layer at ``path``, whose features are
        the ``axes`` it contracts (in the order of its kernel's input axes)."""
        x = jnp.asarray(x)
        x = x.astype(at_least_float32(x.dtype))
        k = len(axes)
        # Flax orders a layer's contracted axes as they lie in its inputs (its kernel's rows).
        axes = tuple(sorted(a % x.ndim for a in axes))
        x = jnp.moveaxis(x, axes, list(range(x.ndim - k, x.ndim)))
        x = x.reshape((*x.shape[:-k], math.prod(x.shape[-k:])))
        if self.mask is not None:
            if tuple(self.mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"mask has shape {tuple(self.mask.shape)} but the inputs of the layer at "
                    f"{_name(path)} have leading shape {tuple(x.shape[:-1])}"
                )
            x = x * self.mask[..., None].astype(x.dtype)
            count = jnp.sum(self.mask.astype(x.dtype))
        else:
            count = jnp.asarray(np.prod(x.shape[:-1]), x.dtype)
        x = x.reshape(-1, x.shape[-1])
        gram = jnp.matmul(x.T, x, precision=_HIGHEST)
        name = _name(path)
        if name in self.grams:
            gram, count = self.grams[name][0] + gram, self.grams[name][1] + count
        self.grams[name], self.names[name] = (gram, count), path


# The recorder of the forward pass being traced, and the recording nnx.Linear subclasses.
_RECORDER: contextvars.ContextVar[_Recorder] = contextvars.ContextVar("regmean_recorder")
_RECORDING: dict[type, type] = {}


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def _contracted_axes(layer: Any) -> tuple[int, ...] | None:
    """The input axes a linear layer contracts: the last for ``nnx.Linear`` and
    ``linen.Dense``, ``axis`` for ``nnx.LinearGeneral`` and ``linen.DenseGeneral``; None
    for one with batch axes (a kernel per batch index), which gets no Gram (RegMean then
    averages it)."""
    if getattr(layer, "batch_axis", None) or getattr(layer, "batch_dims", None):
        return None
    axis = getattr(layer, "axis", -1)
    return tuple(axis) if isinstance(axis, tuple | list) else (axis,)


def _recording_class(cls: type) -> type:
    """A subclass of an ``nnx.Linear`` (or ``nnx.LinearGeneral``) class whose calls record
    their inputs' Gram."""
    if cls not in _RECORDING:

        def __call__(self, inputs, *args, **kwargs):  # noqa: N807
            recorder = _RECORDER.get()
            if id(self) not in recorder.paths:  # a copy made by an nnx transform
                raise ValueError("input_grams cannot see linear layers inside nnx transforms")
            axes = _contracted_axes(self)
            if axes is not None:
                recorder.add(recorder.paths[id(self)], inputs, axes)
            return cls.__call__(self, inputs, *args, **kwargs)

        _RECORDING[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _RECORDING[cls]


def input_grams(
    model: Any,
    params: Any,
    batches: Iterable[Any],
    *,
    mask: Callable[[Any], jax.Array] | None = None,
    normalize: bool = False,
) -> Any:
    """The Gram matrix ``G = Σ_n x_n x_nᵀ`` of every linear layer's inputs, for :func:`regmean`.

    One streaming pass over ``batches`` (each jitted; no activation outlives its batch):
    every call of a ``flax.nnx.Linear``, ``nnx.LinearGeneral``, ``flax.linen.Dense`` or
    ``linen.DenseGeneral`` layer (the attention projections of ``nnx.MultiHeadAttention``
    and ``linen.MultiHeadDotProductAttention`` included) adds ``XᵀX`` of its inputs ``X``
    to the layer's Gram: the axes the layer contracts are the features (several, as the
    ``(heads, head_dim)`` inputs of an attention output projection, flattened in the
    kernel's order), all other axes (batch, tokens) the rows; in float32 at least. A
    layer called several times sums over its calls. By default the Grams are the paper's
    sums; ``normalize=True`` divides each by its number of rows (a per-token mean). Only
    the ratio between experts' Grams matters to RegMean: sums weight each expert by its
    amount of data, means weight experts equally.

    Args:
      model: an ``nnx.Module`` (called as ``model(batch)``, or ``model(*batch)`` for a
        tuple batch; put it in the mode you want, e.g. ``model.eval()``), a
        ``linen.Module`` (``model.apply({"params": params}, batch)``), or a function
        ``model(params, batch)`` running linen modules (e.g. a model's ``apply``). Layers
        inside ``nnx``/``linen`` transforms (``scan``, ``vmap``, ``remat``) are not
        supported (a ``ValueError`` says so).
      params: the parameters to evaluate at: for an ``nnx`` model its ``nnx.Param``
        state (or ``nnx.to_pure_dict`` of it), or ``None`` for the model's own; for
        linen the ``params`` collection, whose paths must be the modules' paths.
      batches: an iterable of batches.
      mask: ``mask(batch)``, a 0/1 weight per input row with the layers' inputs' leading
        shape (e.g. ``lambda b: b["attention_mask"]`` to leave out padding tokens).
      normalize: divide each Gram by its number of rows (or the mask's sum).

    Returns:
      A nested dict shaped like the parameters (``nnx.to_pure_dict`` layout for ``nnx``),
      with the ``(d_in, d_in)`` Gram at the kernel of every layer that was called
      (``d_in`` the product of the contracted axes' sizes) and ``None`` elsewhere: one
      expert's ``grams`` for :func:`regmean`.

    Raises:
      ValueError: ``batches`` is empty, no linear layer was called, a layer's kernel
        is not in ``params``, or a layer is inside an ``nnx``/``linen`` transform.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from umtam_jax import merging
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> grams = merging.input_grams(model, None, [jnp.array([[1.0, 2.0]])] * 3)
      >>> grams["kernel"].tolist(), grams["bias"]
      ([[3.0, 6.0], [6.0, 12.0]], None)

    References:
      Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of
      Language Models", ICLR 2023, arXiv:2212.09849.
    """
    from flax import nnx

    def args(batch: Any) -> tuple:
        return batch if isinstance(batch, tuple) else (batch,)

    if isinstance(model, nnx.Module):
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
        if params is not None and not isinstance(params, nnx.State):
            nnx.replace_by_pure_dict(state, params)
        elif params is not None:
            state = params
        layout = nnx.to_pure_dict(state)

        def forward(p: Any, batch: Any) -> None:
            m = nnx.merge(graphdef, p, rest)
            recorder = _RECORDER.get()
            for path, node in nnx.iter_graph(m):
                if isinstance(node, nnx.Linear | nnx.LinearGeneral):
                    recorder.paths[id(node)] = tuple(path)
                    node.__class__ = _recording_class(type(node))
            m(*args(batch))

    else:
        import flax.linen as nn

        if params is None:
            raise TypeError("params are required for a linen model or an apply function")
        layout, state = params, params
        apply = model.apply if isinstance(model, nn.Module) else None

        def intercept(next_fun, a, kwargs, context):
            linear = isinstance(context.module, nn.Dense | nn.DenseGeneral)
            if linear and context.method_name == "__call__":
                layer, axes = context.module, _contracted_axes(context.module)
                scope = layer.scope
                while scope.parent is not None:
                    scope = scope.parent
                if scope.path:  # a lifted transform's scopes start at its own path
                    raise ValueError(
                        f"input_grams cannot see the linen layer at {_name(layer.path)}: "
                        "layers inside nnx/linen transforms (scan, vmap, remat) are not supported"
                    )
                if axes is not None:
                    _RECORDER.get().add(tuple(layer.path), a[0], axes)
            return next_fun(*a, **kwargs)

        def forward(p: Any, batch: Any) -> None:
            with nn.intercept_methods(intercept):
                if apply is not None:
                    apply({"params": p}, *args(batch))
                else:
                    model(p, batch)

    names: dict[str, tuple] = {}  # filled while tracing

    @jax.jit
    def step(p: Any, batch: Any) -> dict:
        recorder = _Recorder(None if mask is None else jnp.asarray(mask(batch)))
        token = _RECORDER.set(recorder)
        try:
            forward(p, batch)
        finally:
            _RECORDER.reset(token)
        names.update(recorder.names)
        return recorder.grams

    total = None
    for batch in batches:
        grams = step(state, batch)
        total = grams if total is None else jax.tree.map(jnp.add, total, grams)
    if total is None:
        raise ValueError("batches is empty: the Grams need at least one batch")
    if not total:
        raise ValueError("no linear layer (nnx.Linear, linen.Dense, ...) was called on the batches")
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        layout, is_leaf=_pytrees.is_none_or_variable
    )
    paths = [tuple(_pytrees.key_name(k) for k in kp) for kp, _ in flat]
    found = {(*names[k], "kernel"): g / n if normalize else g for k, (g, n) in total.items()}
    missing = [p for p in found if p not in paths]
    if missing:
        raise ValueError(
            f"the layer at {_name(missing[0][:-1])} has no kernel in params "
            "(params' paths must be the modules' paths)"
        )
    return jax.tree_util.tree_unflatten(treedef, [found.get(p) for p in paths])
