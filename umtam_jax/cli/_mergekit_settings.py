"""mergekit's parameter values that vary by tensor: layer gradients and filtered values.

A number of a mergekit file (``t``, ``lambda``, ``epsilon``, ... under ``parameters``, and a
model's ``weight`` and ``density``) may be, besides one value:

- a **gradient**, a list of numbers interpolated over the model's layers: layer ``i`` of
  ``N`` sits at ``x = i / (N − 1)`` (``x = 1`` when ``N = 1``) and takes the piecewise
  linear interpolation of the list at ``x`` (``[0, 0.5, 1]`` gives 0.25 at a quarter of
  the depth); a tensor outside the layers (embeddings, final norm, ``lm_head``) takes the
  value at ``x = 0``, as mergekit plans them;
- a list of **filtered values**, ``{filter: substring, value: v}`` mappings tried in order:
  the first whose ``filter`` is in the tensor's name (or that has none, or ``"*"``) gives
  the value, itself one value or a gradient; where none matches, a model's value falls
  back to the file's default, then to the method's default.

A tensor's layer is the number after ``layers``, ``layer``, ``h``, ``blocks`` or ``block``
and a ``.`` or ``_`` in its dotted name (``model.layers.3.mlp.up_proj.weight``,
``transformer.h.3.attn.c_attn.weight``, ``encoder.layer.3.output.dense.weight``, Flax's
``layers_3``), ``N`` the number of layers of its stack (the name up to the number: the
text and vision layers of a multimodal model are counted apart, as mergekit does; a
tensor mergekit's architecture file places in a layer under another name, such as a
vision projector's ``mlp.2``, is outside the layers here). Filters match the names
as the files store them; mergekit matches its architecture's names, which differ for
some files (GPT-2 stored without the ``transformer.`` prefix: write ``filter: wte``).

Example:
  >>> from umtam_jax.cli._mergekit_settings import layer_positions, setting
  >>> t = setting([{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}], "parameters.t")
  >>> names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
  ...          "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
  >>> [t.at(n, x) for n, x in zip(names, layer_positions(names))]
  [0.5, 0.0, 1.0, 0.5]

References:
  mergekit's ``evaluate_setting`` and ``MergePlanner.plan_slice``,
  https://github.com/arcee-ai/mergekit
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from umtam_jax.cli._yaml import ConfigError

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)[._](\d+)(?:\.|$)")


@dataclasses.dataclass(frozen=True)
class Condition:
    """One filtered value: ``filter`` (None: every tensor) and its value."""

    filter: str | None
    value: Any  # one value, or a tuple (a gradient)


@dataclasses.dataclass(frozen=True)
class TensorSetting:
    """A parameter value that varies by tensor (see the module's docstring).

    Attributes:
      value: a tuple of values (a gradient) or a tuple of :class:`Condition`.
      key: where the file gives it (``parameters.t``), for messages.
    """

    value: tuple[Any, ...]
    key: str

    def at(self, name: str, x: float) -> Any:
        """The value for tensor ``name`` at layer position ``x`` (None: no filter matches)."""
        if self.value and isinstance(self.value[0], Condition):
            for cond in self.value:
                if cond.filter in (None, "*") or cond.filter in name:
                    return _evaluate(cond.value, x)
            return None
        return _evaluate(self.value, x)

    def located(self) -> list[tuple[Any, str]]:
        """Every value it gives with its key in the file (``parameters.t[2]``,
        ``parameters.t[1].value[0]``), for checks that name it."""
        if isinstance(self.value[0], Condition):
            parts = [(c.value, f"{self.key}[{i}].value") for i, c in enumerate(self.value)]
        else:
            parts = [(self.value, self.key)]
        out = []
        for part, key in parts:
            if isinstance(part, tuple):
                out += [(v, f"{key}[{j}]") for j, v in enumerate(part)]
            else:
                out.append((part, key))
        return out

    def values(self) -> list[Any]:
        """Every value it may give, once each."""
        out: list[Any] = []
        for v, _ in self.located():
            if v not in out:
                out.append(v)
        return out

    def as_json(self) -> Any:
        """The setting as the file gives it (a list of values or of filter/value maps)."""
        if isinstance(self.value[0], Condition):
            return [
                {
                    "filter": c.filter,
                    "value": list(c.value) if isinstance(c.value, tuple) else c.value,
                }
                for c in self.value
            ]
        return list(self.value)


def _evaluate(value: Any, x: float) -> Any:
    if not isinstance(value, tuple):
        return value
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        scaled = x * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    return value[int(x * (len(value) - 1))]  # bools or strings: the nearest step below


def setting(
    raw: list[Any], where: str, read: Callable[[Any, str], Any] = lambda v, w: v
) -> TensorSetting:
    """A file's list value as a :class:`TensorSetting`.

    Args:
      raw: the list the file gives (a gradient, or ``{filter, value}`` mappings).
      where: its key in the file (``parameters.t``), for messages.
      read: reads one value at a key, as the method reads one value (a number, a bool).

    Returns:
      The setting.

    Raises:
      ConfigError: an empty list, a mapping that is not ``{filter, value}``, or a value
        that is neither one value nor a list of them, naming its key.
    """
    if not raw:
        raise ConfigError(f"{where}: an empty list gives no value")
    if not any(isinstance(v, dict) for v in raw):
        return TensorSetting(_gradient(raw, where, read), where)
    conds = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or "value" not in entry or set(entry) - {"filter", "value"}:
            raise ConfigError(f"{at} must be a mapping with 'value' and optionally 'filter'")
        filt = entry.get("filter")
        if filt is not None and not isinstance(filt, str):
            raise ConfigError(f"{at}.filter must be a string, got {filt!r}")
        value = entry["value"]
        if isinstance(value, list):
            value = _gradient(value, f"{at}.value", read) if value else None
            if value is None:
                raise ConfigError(f"{at}.value: an empty list gives no value")
        else:
            value = read(value, f"{at}.value")
        conds.append(Condition(filt, value))
    return TensorSetting(tuple(conds), where)


def _gradient(raw: list[Any], where: str, read: Callable[[Any, str], Any]) -> tuple[Any, ...]:
    if any(isinstance(v, list | dict) for v in raw):
        raise ConfigError(f"{where}: a gradient is a list of values, not of lists or mappings")
    return tuple(read(v, f"{where}[{i}]") for i, v in enumerate(raw))


def layer_positions(names: Sequence[str]) -> list[float]:
    """Each tensor's layer position ``x`` in [0, 1].

    Args:
      names: the merged tensors' dotted names.

    Returns:
      Per name, ``i / (N − 1)`` for layer ``i`` of a stack of ``N`` (1 when ``N = 1``), 0
      outside the layers. Each stack (the name up to the layer number:
      ``model.layers.``, ``visual.blocks.``) has its own ``N``, as mergekit counts the
      text and vision layers of a multimodal model apart.
    """
    layers = [_layer(n) for n in names]
    counts: dict[str, int] = {}
    for found in layers:
        if found is not None:
            counts[found[0]] = max(counts.get(found[0], 0), found[1] + 1)

    def position(found: tuple[str, int] | None) -> float:
        if found is None:
            return 0.0
        count = counts[found[0]]
        return found[1] / (count - 1) if count > 1 else 1.0

    return [position(found) for found in layers]


def _layer(name: str) -> tuple[str, int] | None:
    """(the layer stack, the layer's index) of a tensor's name, or None outside them."""
    found = _LAYER.search(name)
    return None if found is None else (name[: found.start(1)], int(found.group(1)))


def first_value(chain: Sequence[Any], name: str, x: float, fallback: Any, key: str) -> Any:
    """The first value a tensor gets from ``chain`` (settings and plain values, tried in
    order, as mergekit tries a model's own value, then the file's default), else
    ``fallback``.

    Raises:
      ValueError: nothing gives one and ``fallback`` is the registry's ``REQUIRED``.
    """
    from umtam_jax.merging import REQUIRED

    for entry in chain:
        value = entry.at(name, x) if isinstance(entry, TensorSetting) else entry
        if value is not None:
            return value
    if fallback is REQUIRED:  # named where the filters are (the file's or the model's)
        where = [e.key for e in chain if isinstance(e, TensorSetting)]
        raise ValueError(
            f"{' and '.join(dict.fromkeys(where)) or key}: no filter matches tensor {name!r}, "
            "and it has no default: add a {value: ...} entry without a filter"
        )
    return fallback


def model_chains(
    own: dict[str, Any],
    own_varying: dict[str, TensorSetting],
    defaults: dict[str, Any],
    default_varying: dict[str, TensorSetting],
) -> dict[str, tuple[Any, ...]]:
    """A mergekit model's ``weight`` and ``density`` where some value it may take varies by
    tensor: the values tried in order, its own, then the file's default.

    Args:
      own: the model's own values (one value for those in ``own_varying``).
      own_varying: its own values that vary by tensor.
      defaults: the file's defaults under ``parameters`` (one value for those in
        ``default_varying``).
      default_varying: the defaults that vary by tensor.

    Returns:
      By key (``weight``, ``density``), the chain of values; only keys where one varies.
    """
    out = {}
    for key in ("weight", "density"):
        chain = [own_varying.get(key, own.get(key)), default_varying.get(key, defaults.get(key))]
        if any(isinstance(c, TensorSetting) for c in chain):
            out[key] = tuple(c for c in chain if c is not None)
    return out


@dataclasses.dataclass(frozen=True)
class PerExpert:
    """A per-expert parameter (``weights``, ``density``) some of whose values vary by
    tensor: each expert's chain of values (see :func:`first_value`).

    Attributes:
      chains: per expert, its settings and plain values in the order tried.
      fallback: the value where none gives one (the method's default or ``REQUIRED``).
      keys: per expert, where the file gives its value, for messages.
    """

    chains: tuple[tuple[Any, ...], ...]
    fallback: Any
    keys: tuple[str, ...]

    @property
    def key(self) -> str:
        """Where the file gives the values that vary by tensor."""
        varying = [c.key for chain in self.chains for c in chain if isinstance(c, TensorSetting)]
        return ", ".join(dict.fromkeys(varying))

    def at(self, name: str, x: float) -> list[Any]:
        return [
            first_value(chain, name, x, self.fallback, key)
            for chain, key in zip(self.chains, self.keys, strict=True)
        ]

    def as_json(self) -> Any:
        return [[c.as_json() if isinstance(c, TensorSetting) else c for c in chain]
                for chain in self.chains]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class NormalizedScaling:
    """mergekit's ``normalize: true`` of task arithmetic where the weights or the scaling
    vary by tensor: ``scaling`` (one value or a setting; 1 where no filter matches) divided
    by each tensor's Σ weight."""

    scaling: Any
    weights: PerExpert | list[Any]
    normalize: Callable[[Any, list[Any]], Any]
    key: str

    def at(self, name: str, x: float) -> Any:
        scaling = first_value((self.scaling,), name, x, 1.0, self.key)  # 1: mergekit's λ
        weights = self.weights.at(name, x) if isinstance(self.weights, PerExpert) else self.weights
        return self.normalize(scaling, weights)

    def as_json(self) -> Any:
        s = self.scaling
        return {"normalized": s.as_json() if isinstance(s, TensorSetting) else s}


def resolver(
    settings: dict[str, Any], defaults: dict[str, Any]
) -> Callable[[Sequence[str]], list[dict[str, Any]]]:
    """The per-tensor keyword arguments of a merge: for the merged tensors' names, each
    one's value of every varying parameter (``defaults[name]`` where no filter matches).

    Args:
      settings: by parameter, a :class:`TensorSetting`, :class:`PerExpert` or
        :class:`NormalizedScaling`.
      defaults: the method's defaults by parameter (``REQUIRED`` where it has none).

    Returns:
      A function of the merged tensors' names giving each tensor's keyword arguments.

    Raises (when called):
      ValueError: no filter matches a tensor and the parameter has no default, naming
        both.
    """
    from umtam_jax.merging import REQUIRED

    def per_tensor(names: Sequence[str]) -> list[dict[str, Any]]:
        out = []
        for name, x in zip(names, layer_positions(names), strict=True):
            values = {}
            for param, s in settings.items():
                if isinstance(s, TensorSetting):
                    values[param] = first_value((s,), name, x, defaults.get(param, REQUIRED), s.key)
                else:
                    values[param] = s.at(name, x)
            out.append(values)
        return out

    return per_tensor
