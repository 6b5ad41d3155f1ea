"""The registry of merging methods: each method's inputs, parameters and steps.

A :class:`Method` declares its per-expert input besides the experts (statistics,
curvatures, Fisher, scores), its parameters (:class:`Param`: kind, allowed values, the key
configuration files use per expert) and the steps of the shared pipeline it configures
(:mod:`._pipeline`: importance, sparsification, kernel). The in-memory functions of
:mod:`umtam_jax.merging`, the out-of-core engine and the ``umtam-merge`` command all read
them from here. A parameter's default is the one in the public function's signature, so
it is written once.

Example:
  >>> from umtam_jax.merging import METHODS
  >>> METHODS["ties"].extra is None, [p.name for p in METHODS["ties"].params]
  (True, ['density', 'scaling', 'weights', 'scope'])
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _validation as V

if TYPE_CHECKING:
    from umtam_jax.merging._pipeline import Call


class _Required:
    """The type of :data:`REQUIRED` (one instance; prints as its name)."""

    _instance: _Required | None = None

    def __new__(cls) -> _Required:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:
        return "REQUIRED"


#: What :meth:`Method.defaults` gives for a parameter without a default (the caller must
#: give a value).
REQUIRED = _Required()

#: Parameter kinds whose check needs the number of experts.
PER_EXPERT_KINDS = ("density", "weights", "numbers")


@dataclasses.dataclass(frozen=True)
class Param:
    """One keyword parameter of a merging method.

    Attributes:
      name: the keyword, as in the public function.
      kind: ``"number"`` (a finite scalar, possibly traced), ``"numbers"`` (a
        ``"number"`` for every expert, or one per expert), ``"density"`` (a float in
        (0, 1], or one per expert), ``"weights"`` (one finite number per expert),
        ``"bool"``, ``"choice"`` (one of ``choices``), ``"scope"`` (one of ``choices`` or
        a layout callable ``(key_path, shape) -> int | MatrixAxes``) or ``"key"`` (a JAX
        PRNG key).
      doc: one line on what it does.
      choices: the allowed strings of a ``"choice"`` or ``"scope"``.
      per_expert: the key under which configuration files give it per expert
        (``weight``, ``density``), or None.
      low, high: the range a ``"number"`` must lie in (None: unbounded), closed unless
        ``low_open``; checked when the value is known (not traced).
      low_open: whether ``low`` itself is excluded (a fraction in (0, 1]).
      read_when: for a parameter only some settings of the others read (a weight layout
        read without flattening), whether the options given (defaults filled in) read
        it; None: always read.
    """

    name: str
    kind: str
    doc: str
    choices: tuple[str, ...] = ()
    per_expert: str | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    read_when: Callable[[Mapping[str, Any]], bool] | None = None

    def is_read(self, options: Mapping[str, Any]) -> bool:
        """Whether a merge with ``options`` reads this parameter.

        Args:
          options: every parameter's value by name, defaults filled in.

        Returns:
          True without ``read_when``; else ``read_when(options)`` as a bool.
        """
        return self.read_when is None or bool(self.read_when(options))

    def check(self, value: Any, k: int) -> Any:
        """Validates a value given for this parameter.

        Args:
          value: the value given (``"number"``, ``"numbers"`` and ``"weights"`` entries may
            be traced).
          k: the number of experts; read only by :data:`PER_EXPERT_KINDS`.

        Returns:
          The value to use: for ``"density"``, ``"weights"`` and ``"numbers"`` a list of
          ``k`` entries (a single density or number repeated; ``weights=None`` as 1.0
          each); a ``"bool"`` as a Python bool; a ``"number"`` as JAX takes it (an int
          beyond int32 as a float); any other kind as given.

        Raises:
          ValueError: a number out of range or not finite, a weight that is not a scalar, a
            per-expert sequence without ``k`` entries, or an unknown choice or scope.
          TypeError: a value of the wrong type (a string for a number, a non-bool for a
            ``"bool"``, anything but one PRNG key for a ``"key"``).
        """
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
        if self.kind == "scope":
            if callable(value) or isinstance(value, str) and value in self.choices:
                return value
            raise ValueError(
                f"unknown {self.name}={value!r}; expected one of "
                + ", ".join(repr(a) for a in self.choices)
                + " or a layout callable such as umtam_jax.scanned('blocks')"
            )
        if self.kind == "bool":
            if not isinstance(value, bool | jnp.bool_):
                raise TypeError(f"{self.name} must be True or False, got {value!r}")
            return bool(value)
        if self.kind == "key":
            dtype = getattr(value, "dtype", None)
            if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
                ok = value.shape == ()
            else:  # a raw key: the key data of the configured implementation (uint32[2]
                # for threefry, uint32[4] for rbg)
                raw = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
                ok = dtype == jnp.uint32 and tuple(getattr(value, "shape", ())) == raw
            if not ok:
                raise TypeError(
                    f"{self.name} must be one JAX PRNG key (e.g. key=jax.random.key(0)), "
                    f"got {value!r}"
                )
            return value
        raise AssertionError(self.kind)

    def _one_number(self, value: Any, name: str | None = None) -> Any:
        """A finite scalar within ``[low, high]`` (bounds checked when not traced)."""
        name = self.name if name is None else name
        V.check_finite_scalars(**{name: value})
        traced = isinstance(value, jax.core.Tracer)
        below = (
            not traced
            and self.low is not None
            and (float(value) < self.low or self.low_open and float(value) == self.low)
        )
        if below or not traced and self.high is not None and float(value) > self.high:
            bounds = "(" if self.low_open else "["
            bounds += f"{self.low if self.low is not None else '-inf'}, "
            bounds += f"{self.high if self.high is not None else 'inf'}]"
            raise ValueError(f"{name} must lie in {bounds}, got {value!r}")
        return V.as_scalar(value)


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
      experts: the least and the most experts it merges (None: no most); ``(1, 1)``
        for a ``single_expert`` method.
      base_optional: ``base=None`` is allowed (the experts are then averaged directly).
      matrices: the kernel decomposes matrices (the last two axes of what it is given):
        a Flax attention projection's 3-axis kernel is given to it as its projection's
        matrix (:func:`umtam_jax.optimizer._attention.attention_rows`), its 2-axis
        query/key/value bias as a vector.
      check: a last check of the validated call (e.g. a domain the kernel needs), or None.
      explain: ``explain(call, j)``, why leaf ``j`` merged to a value that is not finite
        from finite inputs (None: an overflow, the default message), or None.
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
    experts: tuple[int, int | None] = (1, None)
    base_optional: bool = False
    matrices: bool = False
    check: Callable[[Call], None] | None = None
    explain: Callable[[Call, int], str | None] | None = None

    def __post_init__(self) -> None:
        if self.sparsify not in (None, "topk", "bernoulli"):
            raise ValueError(
                f"method {self.name!r}: sparsify must be 'topk', 'bernoulli' or None, got "
                f"{self.sparsify!r}"
            )
        if self.sparsify == "topk" and self.importance is None:
            raise TypeError(f"method {self.name!r} has sparsify='topk' but no importance to rank")
        if self.single_expert:
            object.__setattr__(self, "experts", (1, 1))

    def check_expert_count(self, k: int) -> None:
        """Checks that the method merges ``k`` experts.

        Args:
          k: the number of experts given.

        Raises:
          ValueError: ``k`` is outside :attr:`experts` (the message says how many it takes).
        """
        low, high = self.experts
        if k < low or (high is not None and k > high):
            want = f"exactly {low}" if low == high else f"at least {low}"
            want = "exactly one expert" if want == "exactly 1" else f"{want} experts"
            raise ValueError(f"{self.name} merges {want}, got {k}")

    def param(self, name: str) -> Param | None:
        """The parameter named ``name``.

        Args:
          name: a keyword parameter's name.

        Returns:
          Its :class:`Param`, or None when the method has no such parameter.
        """
        return next((p for p in self.params if p.name == name), None)

    def defaults(self) -> dict[str, Any]:
        """Each parameter's default, from the public function's signature.

        Returns:
          ``{name: default}`` in :attr:`params` order; :data:`REQUIRED` for a parameter
          without a default.
        """
        signature = inspect.signature(self.fn).parameters
        return {
            p.name: REQUIRED if d is inspect.Parameter.empty else d
            for p in self.params
            for d in [signature[p.name].default]
        }

    @property
    def out_of_core(self) -> bool:
        """Whether the checkpoint engine and ``umtam-merge`` can run it: every per-expert
        input but Gram matrices is read from checkpoints."""
        return self.extra != "grams"

    @property
    def global_scope(self) -> bool:
        """Whether the method takes ``scope="global"``."""
        scope = self.param("scope")
        return scope is not None and "global" in scope.choices

    @property
    def sliced_kernel(self) -> bool:
        """Whether a layout ``scope`` runs the kernel on each slice of a leaf (a method
        whose kernel ranks or averages over the whole leaf); a top-k method only makes
        its masks per slice."""
        return self.param("scope") is not None and self.sparsify != "topk"


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
    "scope",
    "where the keep count is exact: per tensor, per layer of a stacked tensor (each slice "
    "of the first axis of a tensor with three or more), over the whole expert, or per "
    "layer of the leaves a layout names (umtam_jax.scanned(...) in Python, "
    "{scanned: [key names], axis: A} in a configuration)",
    choices=("tensor", "layer", "global"),
)

SLICES = Param(
    "scope",
    "scope",
    "per tensor, or each layer of a stacked tensor merged as a tensor of its own (each "
    "slice of the first axis of a tensor with three or more, or of the leaves a layout "
    "names: umtam_jax.scanned(...) in Python, {scanned: [key names], axis: A} in a "
    "configuration)",
    choices=("tensor", "layer"),
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


def describe(method: Method) -> str:
    """A few lines on ``method``: summary, inputs and parameters with their defaults.

    ``umtam-merge --list-methods`` prints this for every method.

    Args:
      method: a registered method (an entry of :data:`METHODS`).

    Returns:
      The description: a summary line, the inputs, then one line per parameter (kind,
      default or ``required``, choices, the per-expert configuration key, meaning).

    Example:
      >>> from umtam_jax import merging
      >>> print(merging.describe(merging.METHODS["task_arithmetic"]).splitlines()[1])
        inputs: base, experts
    """
    base = "optional base" if method.base_optional else "base"
    inputs = f"{base}, one expert" if method.single_expert else f"{base}, experts"
    if method.extra is not None:
        inputs += f", {method.extra}"
    if not method.out_of_core:
        inputs += " (in memory only: umtam_jax.merging, not checkpoints)"
    lines = [f"{method.name}: {method.summary}", f"  inputs: {inputs}"]
    for p, default in zip(method.params, method.defaults().values(), strict=True):
        shown = "required" if default is REQUIRED else f"default {default!r}"
        if p.kind in ("choice", "scope"):
            shown += f", one of {', '.join(p.choices)}"
        if p.kind == "scope":
            shown += " or a layout"
        per = f"; per expert as '{p.per_expert}'" if p.per_expert else ""
        lines.append(f"  {p.name} ({p.kind}, {shown}{per}): {p.doc}")
    if method.extra == "scores":  # chosen by umtam-merge, which reads them from checkpoints
        lines.append(
            "  scores (choice, default 'saliency', one of saliency, magnitude): umtam-merge "
            "ranks by the saliency saved with the expert, or by |Δ|"
        )
    return "\n".join(lines)
