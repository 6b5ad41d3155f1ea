"""The parameters of an ``umtam-merge`` configuration: their types, the per-expert values
(``weight``, ``density``) gathered into the method's parameters, and a layer ``scope``."""

from __future__ import annotations

import dataclasses
from typing import Any

from umtam_jax import merging
from umtam_jax.cli._mergekit_settings import PerExpert, TensorSetting
from umtam_jax.cli._mergekit_values import check_parameters
from umtam_jax.cli._yaml import ConfigError, is_number
from umtam_jax.merging import METHODS

# Per-expert values: the key configuration files use for each per-expert parameter.
PER_EXPERT = {
    p.per_expert: p.name for m in METHODS.values() for p in m.params if p.per_expert is not None
}


@dataclasses.dataclass
class Expert:
    """One expert entry: its checkpoint, per-expert values (``weight``, ``density``, ...,
    by configuration key) and per-expert input files."""

    path: str
    values: dict[str, float] = dataclasses.field(default_factory=dict)
    fisher: str | None = None
    curvature: str | None = None
    key: str = "experts[0]"  # where the file gives it: experts[i], or mergekit's models[k]
    #: A mergekit model's values that vary by tensor, by key (``weight``): the values
    #: tried in order (:func:`umtam_jax.cli._mergekit_settings.model_chains`).
    varying: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)

    def value_key(self, name: str) -> str:
        """The configuration key of this expert's per-expert value ``name`` (``weight``)."""
        if self.key.startswith("models["):  # mergekit: under the model's 'parameters'
            return f"{self.key}.parameters.{name}"
        return f"{self.key}.{name}"


def _methods_with(name: str) -> list[str]:
    return [m for m, method in METHODS.items() if method.param(name) is not None]


def check_type(method: str, param: merging.Param, value: Any) -> None:
    name = param.name
    if param.kind in ("density", "numbers"):
        ok = is_number(value) or (
            isinstance(value, list) and value and all(is_number(v) for v in value)
        )
        expected = "a number or a list of numbers"
    elif param.kind == "bool":
        ok, expected = isinstance(value, bool), "true or false"
    elif param.kind == "number":
        ok, expected = is_number(value), "a number"
    elif param.kind == "choice":
        ok, expected = value in param.choices, "one of " + ", ".join(param.choices)
    elif param.kind == "scope":
        if isinstance(value, dict):
            layer_scope(value)  # names what is wrong in it
            return
        ok = isinstance(value, str) and value in param.choices
        expected = "one of " + ", ".join(param.choices) + " or a mapping with 'scanned'"
    else:
        ok, expected = True, ""
    if not ok:
        raise ConfigError(
            f"parameter {name!r} of method {method!r} must be {expected}, got {value!r}"
        )


_SCANNED_KEYS = ("scanned", "axis", "batch")


def layer_scope(value: dict[str, Any]) -> Any:
    """The layout callable of a ``scope: {scanned: [names], axis: A, batch: B}`` mapping:
    ``umtam_jax.scanned(*names, axis=A, batch=B)`` (counts per layer of the leaves under
    those keys; ``scanned: []`` every leaf with three or more axes)."""
    from umtam_jax.optimizer import scanned

    where = "parameters.scope"
    unknown = sorted(set(value) - set(_SCANNED_KEYS), key=str)
    if unknown or "scanned" not in value:
        raise ConfigError(
            f"{where} as a mapping takes 'scanned' (a list of key names) and optionally "
            f"'axis' and 'batch', got keys {sorted(value, key=str)}"
        )
    names = value["scanned"]
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}.scanned must be a list of key names, got {names!r}")
    options = {k: value[k] for k in ("axis", "batch") if k in value}
    try:
        return scanned(*names, **options)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def replaced_by_every_expert(param: merging.Param | None, experts: list[Expert]) -> bool:
    key = getattr(param, "per_expert", None)
    return key is not None and all(key in e.values for e in experts)


def per_expert_values(
    spec: merging.Method, params: dict[str, Any], experts: list[Expert], key: str, name: str
) -> None:
    """Puts the experts' ``key`` values into ``params[name]``, one per expert; an expert
    without one takes the parameter's value from 'parameters' or its default (1.0 for
    weights)."""
    given = [i for i, e in enumerate(experts) if key in e.values]
    if not given:
        return
    param = spec.param(name)
    if param is None or param.per_expert != key:
        raise ConfigError(
            f"{experts[given[0]].value_key(key)}: method {spec.name!r} takes no per-expert {name} "
            f"(methods that do: {', '.join(_methods_with(name))})"
        )
    if param.kind == "weights":
        fallback = 1.0
    else:
        fallback = params.get(name, spec.defaults()[name])
        if fallback is merging.REQUIRED and len(given) < len(experts):
            raise ConfigError(f"give a {key} to every expert or a default {name!r} in 'parameters'")
        if isinstance(fallback, list):
            raise ConfigError(f"per-expert {key} values need a scalar default {name!r}")
    values = [e.values.get(key, fallback) for e in experts]
    params[name] = values[0] if spec.single_expert else values


def varying_per_expert(
    spec: merging.Method,
    params: dict[str, Any],
    experts: list[Expert],
    key: str,
    name: str,
    default: Any,
) -> PerExpert:
    """The per-expert parameter ``name`` where some expert's ``key`` varies by tensor,
    each value it may take checked by the registry, naming its key; ``default`` is the
    file's value of ``name`` before :func:`per_expert_values` (where no filter matches)."""
    values = params[name] if isinstance(params.get(name), list) else None
    if values is None:  # no model gives its own: every one takes the file's default chain
        values = [params.get(name, spec.defaults()[name])] * len(experts)
    chains = tuple(
        e.varying[key] if key in e.varying else (values[i],) for i, e in enumerate(experts)
    )
    for i, chain in enumerate(chains):
        for entry in chain:
            located = (
                entry.located()
                if isinstance(entry, TensorSetting)
                else [(entry, experts[i].value_key(key))]
            )
            for value, at in located:  # one value, as every expert's: the message names it
                check_parameters(spec, {name: value}, {name: at}, len(experts))
    # Where no filter matches: the file's plain value (a mergekit file's density is 1,
    # mergekit's default), else the method's default; a weight is always given.
    param = spec.param(name)
    if param is None or param.kind == "weights":
        fallback = merging.REQUIRED
    elif default is not None and not isinstance(default, list | TensorSetting):
        fallback = default
    else:
        fallback = spec.defaults()[name]
    return PerExpert(chains, fallback, tuple(e.value_key(key) for e in experts))
