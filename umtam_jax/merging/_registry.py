"""The registry of merging methods and the shared steps each method is a configuration of.

Every merge runs the same pipeline, one leaf at a time:

1. **validate** the options (each :class:`Param` knows its kind and allowed values) and
   the inputs (structures, shapes, dtypes, finite values; :mod:`._validation`);
2. **importance**: a score per entry of each task vector (``|w − w0|``, UMTAM's saliency,
   or scores given by the caller);
3. **sparsify**: a keep mask per expert, the top-``density`` entries by importance (exact
   per tensor, or over the whole expert with ``scope="global"``) or a Bernoulli draw;
4. **kernel**: one jitted function per leaf that does the rest (sign consensus, per-entry
   weights, aggregation, rescaling, ``w0 + scaling · Δ``).

A :class:`Method` declares its per-expert input besides the experts (statistics,
curvatures, Fisher, scores), its parameters and these steps. The in-memory functions of
:mod:`umtam_jax.merging` are thin wrappers around :func:`run`; the out-of-core engine
drives the same steps leaf by leaf (:func:`plan`, :func:`importances`, :func:`masks`,
:func:`combine`), replacing only the global top-k; the ``umtam-merge`` command reads the
parameters' kinds, defaults and per-expert keys from here. A parameter's default is the
one in the public function's signature, so it is written once.

Example:
  >>> from umtam_jax.merging import METHODS
  >>> METHODS["ties"].extra is None, [p.name for p in METHODS["ties"].params]
  (True, ['density', 'scaling', 'weights', 'scope'])
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _validation as V
from umtam_jax.merging._select import keep_masks
from umtam_jax.merging._statistics_validation import arrays_or_statistics, statistics_leaves
from umtam_jax.optimizer._statistics import curvature as _curvature

REQUIRED = inspect.Parameter.empty

# Parameter kinds whose check needs the number of experts.
_PER_EXPERT_KINDS = ("density", "weights", "numbers")


@dataclasses.dataclass(frozen=True)
class Param:
    """One keyword parameter of a merging method.

    Attributes:
      name: the keyword, as in the public function.
      kind: ``"number"`` (a finite scalar, possibly traced), ``"numbers"`` (a
        ``"number"`` for every expert, or one per expert), ``"density"`` (a float in
        (0, 1], or one per expert), ``"weights"`` (one finite number per expert),
        ``"bool"``, ``"choice"`` (one of ``choices``) or ``"key"`` (a JAX PRNG key).
      doc: one line on what it does.
      choices: the allowed strings of a ``"choice"``.
      per_expert: the key under which configuration files give it per expert
        (``weight``, ``density``), or None.
      low, high: the closed range a ``"number"`` must lie in (None: unbounded); checked
        when the value is known (not traced).
    """

    name: str
    kind: str
    doc: str
    choices: tuple[str, ...] = ()
    per_expert: str | None = None
    low: float | None = None
    high: float | None = None

    def check(self, value: Any, k: int) -> Any:
        """The validated value (densities and weights as one entry per expert)."""
        if self.kind == "number":
            return self._one_number(value)
        if self.kind == "numbers":
            if isinstance(value, str | bytes) or not (
                isinstance(value, Sequence) or getattr(value, "ndim", 0) == 1
            ):
                return [self._one_number(value)] * k
            values = list(value)
            if len(values) != k:
                raise ValueError(f"got {len(values)} {self.name} for {k} experts")
            return [self._one_number(v, f"{self.name}[{i}]") for i, v in enumerate(values)]
        if self.kind == "density":
            return V.check_densities(value, k)
        if self.kind == "weights":
            return V.check_weights(value, k, self.name)
        if self.kind == "choice":
            return V.check_option(self.name, value, self.choices)
        if self.kind == "bool":
            if not isinstance(value, bool | jnp.bool_):
                raise TypeError(f"{self.name} must be True or False, got {value!r}")
            return bool(value)
        if self.kind == "key":
            if value is None:
                raise TypeError("a PRNG key is required (e.g. key=jax.random.key(0))")
            return value
        raise AssertionError(self.kind)

    def _one_number(self, value: Any, name: str | None = None) -> Any:
        """A finite scalar within ``[low, high]`` (bounds checked when not traced)."""
        name = self.name if name is None else name
        V.check_finite_scalars(**{name: value})
        if not isinstance(value, jax.core.Tracer) and (
            (self.low is not None and float(value) < self.low)
            or (self.high is not None and float(value) > self.high)
        ):
            bounds = f"[{self.low if self.low is not None else '-inf'}, "
            bounds += f"{self.high if self.high is not None else 'inf'}]"
            raise ValueError(f"{name} must lie in {bounds}, got {value!r}")
        return value


# Signatures of the steps (``opts``: the validated options by name).
Importance = Callable[[Mapping[str, Any], jax.Array, jax.Array, Any], jax.Array]
Kernel = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Method:
    """A merging method: its inputs, parameters and steps.

    Attributes:
      name: the registry key (``umtam-merge``'s ``method``).
      fn: the public in-memory function.
      summary: one line on what it does.
      params: its keyword parameters, in signature order.
      kernel: ``kernel(opts, base, ws, masks, importances, extras)`` for one leaf (lists
        over experts; ``masks``/``importances``/``extras`` None when the method has none).
      extra: the per-expert input after the experts: ``"statistics"`` (UMTAM statistics
        or optimizer states), ``"curvatures"`` (arrays or statistics), ``"fishers"``
        (arrays), ``"grams"`` (Gram matrices at some leaves), ``"scores"`` (arrays,
        statistics or None); None for none.
      importance: ``importance(opts, base, w, extra)`` for one expert and leaf, the
        scores ``sparsify="topk"`` ranks.
      sparsify: ``"topk"`` (by importance, ``density`` and ``scope``), ``"bernoulli"``
        (``density`` and ``key``) or None.
      single_expert: takes one expert (positional ``expert``) instead of a sequence.
      base_optional: ``base=None`` is allowed (the experts are then averaged directly).
      check: a last check of the validated call (e.g. a domain the kernel needs), or None.
    """

    name: str
    fn: Callable[..., Any]
    summary: str
    params: tuple[Param, ...]
    kernel: Kernel
    extra: str | None = None
    importance: Importance | None = None
    sparsify: str | None = None
    single_expert: bool = False
    base_optional: bool = False
    check: Callable[[Call], None] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def defaults(self) -> dict[str, Any]:
        """Each parameter's default from the public function's signature (or REQUIRED)."""
        signature = inspect.signature(self.fn).parameters
        return {p.name: signature[p.name].default for p in self.params}

    @property
    def out_of_core(self) -> bool:
        """Whether the checkpoint engine and ``umtam-merge`` can run it: every per-expert
        input but Gram matrices is read from checkpoints."""
        return self.extra != "grams"

    @property
    def global_scope(self) -> bool:
        """Whether the method takes ``scope="global"``."""
        return self.param("scope") is not None


METHODS: dict[str, Method] = {}

# Parameters several methods share.
DENSITY = Param(
    "density", "density", "fraction in (0, 1] of each task vector kept", per_expert="density"
)
SCALING = Param("scaling", "number", "factor on the merged task vector")
WEIGHTS = Param(
    "weights", "weights", "one weight per expert (default 1.0 each)", per_expert="weight"
)
LAYOUT = Param(
    "layout",
    "choice",
    "the matrices' last two axes: Flax/JAX (d_in, d_out) or PyTorch/safetensors (d_out, d_in)",
    choices=("in_out", "out_in"),
)
SCOPE = Param(
    "scope",
    "choice",
    "where the keep count is exact: per tensor or over the whole expert",
    choices=("tensor", "global"),
)


def register(method: Method) -> Method:
    """Adds ``method`` to :data:`METHODS` (after checking its parameters match ``fn``)."""
    signature = inspect.signature(method.fn).parameters
    keywords = [n for n, p in signature.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if keywords != [p.name for p in method.params]:
        raise AssertionError(f"{method.name}: params {method.params} != signature {keywords}")
    METHODS[method.name] = method
    return method


def get(name: Any) -> Method:
    """The registered method ``name`` (ValueError listing the known ones otherwise)."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


# --------------------------------------------------------------------------- the steps


@dataclasses.dataclass
class Call:
    """A validated merge: the flattened inputs and the checked options.

    Attributes:
      method: the method.
      prepared: base and experts, flattened and checked.
      options: every parameter by name, validated (densities and weights per expert).
      extras: the per-expert input, one list of leaves (or statistics nodes) per expert,
        aligned with the base's leaves; None when the method takes none.
    """

    method: Method
    prepared: V.Prepared
    options: dict[str, Any]
    extras: list[list[Any]] | None


def options_of(method: Method, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with the defaults; unknown or missing parameters raise
    TypeError as a call of the public function would."""
    unknown = sorted(set(kwargs) - {p.name for p in method.params})
    if unknown:
        raise TypeError(
            f"method {method.name!r} got unexpected parameters {unknown}; it takes "
            + ", ".join(p.name for p in method.params)
        )
    options = {**method.defaults(), **kwargs}
    missing = [n for n, v in options.items() if v is REQUIRED]
    if missing:
        raise TypeError(f"method {method.name!r} requires the parameter {missing[0]!r}")
    return options


def check_options(method: Method, kwargs: Mapping[str, Any], k: int | None = None) -> dict:
    """``kwargs`` completed with the defaults and checked; the per-expert parameters
    (which need the number of experts) only when ``k`` is given."""
    options = options_of(method, kwargs)
    for p in method.params:
        if p.kind not in _PER_EXPERT_KINDS:
            options[p.name] = p.check(options[p.name], 0)
        elif k is not None:
            options[p.name] = p.check(options[p.name], k)
    return options


def plan(
    method: Method,
    base: Any,
    experts: Any,
    extra: Any,
    kwargs: Mapping[str, Any],
    *,
    checked: bool = False,
) -> Call:
    """Validates a call of ``method``: options first, then the inputs.

    ``experts`` is the single expert for a ``single_expert`` method. ``checked=True``
    takes ``kwargs`` as the result of :func:`check_options` with the number of experts
    (an engine checks them once per merge, then plans every leaf). Raises ValueError or
    TypeError naming the option, the tree or the leaf path.
    """
    # Scalar options are checked first: no input is touched for a typo.
    options = dict(kwargs) if checked else check_options(method, kwargs)
    if method.single_expert:
        prepared = V.prepare(base, [experts], what="expert")
    elif base is None and method.base_optional:
        experts = V.check_sequence(experts, "experts")
        prepared = V.prepare(jax.tree.map(jnp.zeros_like, experts[0]), experts)
    else:
        prepared = V.prepare(base, experts)
    k = len(prepared.experts)
    extras = _extras(method, extra, prepared, options)
    if not checked:
        for p in method.params:
            if p.kind in _PER_EXPERT_KINDS:
                options[p.name] = p.check(options[p.name], k)
    call = Call(method, prepared, options, extras)
    if method.check is not None:
        method.check(call)
    return call


_EXTRA_NAMES = {
    "statistics": "statistics pytrees",
    "curvatures": "curvature pytrees",
    "fishers": "Fisher pytrees",
    "grams": "Gram pytrees",
}


def _extras(method: Method, extra: Any, prepared: V.Prepared, options: dict) -> Any:
    kind = method.extra
    if kind is None:
        return None
    if kind == "scores":  # one expert's scores: arrays, statistics or None (magnitude)
        if extra is None:
            return None
        _, leaves = arrays_or_statistics(extra, prepared, "scores")
        return [leaves]
    k = len(prepared.experts)
    items = V.check_sequence(extra, kind)
    V.check_count(items, k, _EXTRA_NAMES[kind])
    if kind == "statistics":
        return [statistics_leaves(s, prepared, f"statistics[{i}]") for i, s in enumerate(items)]
    if kind == "fishers":
        return [V.leaves_like(f, prepared, f"fishers[{i}]") for i, f in enumerate(items)]
    if kind == "grams":  # Gram matrices at some leaves, None elsewhere
        from umtam_jax.merging._regmean import gram_leaves  # it imports this module

        return [gram_leaves(g, prepared, f"grams[{i}]") for i, g in enumerate(items)]
    out = []
    for i, c in enumerate(items):  # arrays, or statistics whose curvature Ŝ is used
        what, leaves = arrays_or_statistics(c, prepared, f"curvatures[{i}]")
        out.append(leaves if what == "arrays" else [_curvature(n) for n in leaves])
    return out


def leaf_importances(call: Call, j: int) -> list[jax.Array] | None:
    """Step 2 on leaf ``j``: each expert's importance (None for methods that rank nothing)."""
    m, p = call.method, call.prepared
    if m.importance is None:
        return None
    extras = call.extras
    return [
        m.importance(call.options, p.base[j], ws[j], None if extras is None else extras[t][j])
        for t, ws in enumerate(p.experts)
    ]


def leaf_masks(call: Call, j: int, scores: list[jax.Array] | None) -> list[jax.Array] | None:
    """Step 3 on leaf ``j`` alone (per-tensor keep counts): each expert's keep mask."""
    m, opts, p = call.method, call.options, call.prepared
    if m.sparsify == "topk":
        return [
            keep_masks([s], d, "tensor")[0] for s, d in zip(scores, opts["density"], strict=True)
        ]
    if m.sparsify == "bernoulli":
        return [
            _bernoulli_mask(opts["key"], t, p.paths[j], p.base[j].shape, d)
            for t, d in enumerate(opts["density"])
        ]
    return None


def _bernoulli_mask(key: jax.Array, t: int, path: str, shape: tuple, p_keep: float) -> jax.Array:
    """Expert ``t``'s keep mask on the leaf at ``path``, drawn from
    ``fold_in(fold_in(key, t), crc32(path))``: it depends on the leaf's path only, so merging
    a tree whole or leaf by leaf is the same."""
    if p_keep >= 1.0:  # mergekit returns the tensor unchanged at density >= 1
        return jnp.ones(shape, bool)
    leaf_key = jax.random.fold_in(jax.random.fold_in(key, t), V.leaf_seed(path))
    return jax.random.bernoulli(leaf_key, p_keep, shape)


def leaf_combine(call: Call, j: int, keep: list | None, scores: list | None) -> jax.Array:
    """Step 4: the kernel on leaf ``j``."""
    p, extras = call.prepared, call.extras
    return call.method.kernel(
        call.options,
        p.base[j],
        [ws[j] for ws in p.experts],
        keep,
        scores,
        None if extras is None else [x[j] for x in extras],
    )


def importances(call: Call) -> list[list[jax.Array]] | None:
    """Step 2 on every leaf: one list of importance leaves per expert (or None)."""
    rows = [leaf_importances(call, j) for j in range(len(call.prepared.base))]
    return None if call.method.importance is None else [list(r) for r in zip(*rows, strict=True)]


def masks(call: Call, scores: list[list[jax.Array]] | None) -> list[list[jax.Array]] | None:
    """Step 3 on every leaf: one list of keep masks per expert (or None); with
    ``scope="global"`` the keep count is exact over all the leaves together."""
    m, opts = call.method, call.options
    if m.sparsify == "topk" and opts.get("scope", "tensor") == "global":
        return [keep_masks(s, d, "global") for s, d in zip(scores, opts["density"], strict=True)]
    if m.sparsify is None:
        return None
    n = len(call.prepared.base)
    rows = [
        leaf_masks(call, j, None if scores is None else [s[j] for s in scores]) for j in range(n)
    ]
    return [list(r) for r in zip(*rows, strict=True)]


def combine(call: Call, keep: list[list[Any]] | None, scores: list[list[Any]] | None) -> list:
    """Step 4: the kernel on every leaf."""

    def column(rows: list[list[Any]] | None, j: int) -> list[Any] | None:
        return None if rows is None else [row[j] for row in rows]

    return [
        leaf_combine(call, j, column(keep, j), column(scores, j))
        for j in range(len(call.prepared.base))
    ]


def merge(method: str | Method, base: Any, experts: Any, extra: Any = None, **kwargs: Any) -> Any:
    """Merges with a registered method by name: validate, importance, sparsify, kernel.

    ``merge("ties", base, experts, density=0.2)`` is ``ties(base, experts, density=0.2)``;
    useful where the method is data (a configuration, a sweep).

    Args:
      method: a name in :data:`METHODS`, or a :class:`Method`.
      base: the base parameters (``None`` only for a method with ``base_optional``).
      experts: the experts' parameters (the one expert of a ``single_expert`` method).
      extra: the method's per-expert input (statistics, curvatures, Fishers, scores).
      **kwargs: the method's parameters.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: an unknown method or parameter, invalid values or inputs;
        messages name the option or the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> merging.merge("task_arithmetic", base, [{"w": jnp.ones(2)}], scaling=0.5)["w"].tolist()
      [0.5, 0.5]
    """
    if not isinstance(method, Method):
        method = get(method)
    call = plan(method, base, experts, extra, kwargs)
    if method.sparsify == "topk" and call.options.get("scope", "tensor") == "global":
        scores = importances(call)
        return V.rebuild(call.prepared, combine(call, masks(call, scores), scores))
    out = []  # one leaf at a time: no more than one leaf's scores and masks alive
    for j in range(len(call.prepared.base)):
        scores = leaf_importances(call, j)
        out.append(leaf_combine(call, j, leaf_masks(call, j, scores), scores))
    return V.rebuild(call.prepared, out)


def describe(method: Method) -> str:
    """A few lines on ``method``: summary, inputs and parameters with their defaults."""
    inputs = "base, one expert" if method.single_expert else "base, experts"
    if method.extra is not None:
        inputs += f", {method.extra}"
    if not method.out_of_core:
        inputs += " (in memory only: umtam_jax.merging, not checkpoints)"
    lines = [f"{method.name}: {method.summary}", f"  inputs: {inputs}"]
    for p, default in zip(method.params, method.defaults().values(), strict=True):
        shown = "required" if default is REQUIRED else f"default {default!r}"
        if p.kind == "choice":
            shown += f", one of {', '.join(p.choices)}"
        per = f"; per expert as '{p.per_expert}'" if p.per_expert else ""
        lines.append(f"  {p.name} ({p.kind}, {shown}{per}): {p.doc}")
    return "\n".join(lines)
