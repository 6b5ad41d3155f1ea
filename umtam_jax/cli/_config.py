"""The ``umtam-merge`` configuration checked into a :class:`Plan`.

A configuration (read by :mod:`umtam_jax.cli._load`) is the project's own YAML schema
(see :mod:`umtam_jax.cli.merge`) or a mergekit configuration, translated by
:mod:`umtam_jax.cli._mergekit`. :func:`build_plan`
checks the method, its parameter names and types and the experts' entries against the
method's entry in ``umtam_jax.merging.METHODS`` before anything is loaded; every problem
raises one :class:`~umtam_jax.cli._yaml.ConfigError` naming the key or flag.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from umtam_jax import merging
from umtam_jax.cli import _mergekit, _mergekit_models
from umtam_jax.cli._mergekit_settings import NormalizedScaling, PerExpert, TensorSetting
from umtam_jax.cli._mergekit_values import check_parameters
from umtam_jax.cli._yaml import ConfigError, is_number
from umtam_jax.merging import METHODS
from umtam_jax.optimizer._config import SEED_RANGE

# Parameter kinds the CLI fills itself, from the experts' entries or the seed.
_MANAGED_KINDS = ("weights", "key")
_TOP_LEVEL = {"method", "base", "experts", "parameters", "output", "seed", "dtype", "out_dtype"}
# Per-expert values: the key configuration files use for each per-expert parameter.
PER_EXPERT = {
    p.per_expert: p.name for m in METHODS.values() for p in m.params if p.per_expert is not None
}
EXPERT_KEYS = {"path", "fisher", "curvature", *PER_EXPERT}
_PRUNE_SCORES = ("saliency", "magnitude")


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


@dataclasses.dataclass
class Plan:
    """A validated merge request."""

    method: str
    base: str | None
    experts: list[Expert]
    parameters: dict[str, Any]
    output: str | None
    seed: int
    dtype: str | None = None
    out_dtype: str | None = None
    #: Parameters whose value varies by tensor (a mergekit file's gradients and filtered
    #: values), by name; ``parameters`` holds one of their values.
    tensor_parameters: dict[str, TensorSetting] = dataclasses.field(default_factory=dict)


def _methods_with(name: str) -> list[str]:
    return [m for m, method in METHODS.items() if method.param(name) is not None]


def _check_type(method: str, param: merging.Param, value: Any) -> None:
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


def _parse_expert(entry: Any, index: int) -> Expert:
    if isinstance(entry, str):
        entry = {"path": entry}
    where = f"experts[{index}]"
    varying: dict[str, tuple[Any, ...]] = {}
    if isinstance(entry, dict) and _mergekit_models.KEY in entry:  # translated from mergekit
        entry = dict(entry)
        where = entry.pop(_mergekit_models.KEY)
        varying = entry.pop(_mergekit_models.VARYING, {})
    if not isinstance(entry, dict):
        raise ConfigError(f"experts[{index}] must be a path or a mapping with a 'path'")
    unknown = set(entry) - EXPERT_KEYS
    if unknown:
        raise ConfigError(
            f"experts[{index}] has unknown keys {sorted(unknown, key=str)}; "
            f"allowed: {sorted(EXPERT_KEYS)}"
        )
    if not isinstance(entry.get("path"), str) or not entry["path"].strip():
        raise ConfigError(f"experts[{index}] needs a 'path' (a non-empty string)")
    for key in PER_EXPERT:
        if key in entry and not is_number(entry[key]):
            raise ConfigError(f"experts[{index}].{key} must be a number, got {entry[key]!r}")
    for key in ("fisher", "curvature"):
        if key in entry and (not isinstance(entry[key], str) or not entry[key].strip()):
            raise ConfigError(f"experts[{index}].{key} must be a non-empty path")
    return Expert(
        path=entry["path"],
        values={key: entry[key] for key in PER_EXPERT if key in entry},
        fisher=entry.get("fisher"),
        curvature=entry.get("curvature"),
        key=where,
        varying=varying,
    )


def _replaced_by_every_expert(param: merging.Param | None, experts: list[Expert]) -> bool:
    key = getattr(param, "per_expert", None)
    return key is not None and all(key in e.values for e in experts)


def _per_expert_values(
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


def _varying_per_expert(
    spec: merging.Method, params: dict[str, Any], experts: list[Expert], key: str, name: str
) -> PerExpert:
    """The per-expert parameter ``name`` where some expert's ``key`` varies by tensor,
    each value it may take checked by the registry, naming its key."""
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
    param = spec.param(name)
    fallback = (
        merging.REQUIRED if param is None or param.kind == "weights" else spec.defaults()[name]
    )
    return PerExpert(chains, fallback, tuple(e.value_key(key) for e in experts))


def build_plan(config: dict[str, Any]) -> Plan:
    """Validates a configuration mapping (file merged with flags) into a :class:`Plan`.

    Raises:
      ConfigError: unknown keys, method or parameters; wrong types; missing inputs.
    """
    if not isinstance(config, dict):
        raise ConfigError("the configuration must be a YAML mapping")
    unknown = set(config) - _TOP_LEVEL - _mergekit.INTERNAL_KEYS
    if unknown:
        raise ConfigError(
            f"unknown configuration keys {sorted(unknown, key=str)}; allowed: {sorted(_TOP_LEVEL)}"
        )
    method = config.get("method")
    if method is None:
        raise ConfigError(f"'method' is required; choose one of {', '.join(METHODS)}")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    spec = METHODS[method]
    if not spec.out_of_core:
        raise ConfigError(
            f"method {method!r} needs each expert's {spec.extra}, which umtam-merge does not "
            f"read from checkpoints: merge in memory with umtam_jax.merging.{method}"
        )
    defaults = spec.defaults()
    base = config.get("base")
    if base is None and not spec.base_optional:
        raise ConfigError("'base' (the base checkpoint path) is required")
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise ConfigError(
            f"'base' (the base checkpoint path) must be a non-empty path, got {base!r}"
        )
    raw_experts = config.get("experts")
    if not isinstance(raw_experts, list) or not raw_experts:
        raise ConfigError("'experts' must be a non-empty list of checkpoint paths or mappings")
    experts = [_parse_expert(e, i) for i, e in enumerate(raw_experts)]
    _refuse_repeated_models(spec, base, experts)
    try:
        spec.check_expert_count(len(experts))
    except ValueError as e:
        key = "models" if _mergekit.PARAMETER_KEYS in config else "experts"  # as the file
        raise ConfigError(f"'{key}': {e}") from None

    if not isinstance(config.get("parameters") or {}, dict):
        raise ConfigError("'parameters' must be a mapping")
    params = dict(config.get("parameters") or {})
    seed = config.get("seed", params.pop("seed", 0))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"'seed' must be an integer, got {seed!r}")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"'seed' must be in [-2**63, 2**63 - 1], got {seed}")
    if "seed" in config and not any(p.kind == "key" for p in spec.params):
        raise ConfigError(f"method {method!r} draws nothing at random: it takes no 'seed'")

    allowed = {p.name for p in spec.params if p.kind not in _MANAGED_KINDS}
    if spec.extra == "scores":
        allowed.add("scores")
    unknown = set(params) - allowed
    if unknown:
        raise ConfigError(
            f"unknown parameters {sorted(unknown, key=str)} for method {method!r}; allowed: "
            f"{sorted(allowed)}{_mergekit.native_names(unknown, allowed)}"
        )
    for name, value in params.items():
        if name == "scores":
            if value not in _PRUNE_SCORES:
                raise ConfigError(f"'scores' must be one of {_PRUNE_SCORES}, got {value!r}")
            continue
        param = spec.param(name)
        assert param is not None  # unknown parameters were refused above
        _check_type(method, param, value)
    # Ranges, by the registry's own checks, naming the key that gave the value (the
    # mergekit file's, a --param flag); experts' own values are named where they are read,
    # and a default that every expert replaces is not read.
    given = config.get(_mergekit.PARAMETER_KEYS) or {}
    named = {
        name: given.get(name, f"parameters.{name}")
        for name in params
        if name != "scores" and not _replaced_by_every_expert(spec.param(name), experts)
    }
    check_parameters(spec, params, named, len(experts))
    varying: dict[str, Any] = dict(config.get(_mergekit.TENSOR_SETTINGS) or {})
    for name, setting in varying.items():
        param = spec.param(name)
        assert param is not None  # the translation reads only the method's parameters
        for value, at in setting.located():
            _check_type(method, param, value)
            check_parameters(spec, {name: value}, {name: at}, len(experts))

    for key, name in PER_EXPERT.items():
        _per_expert_values(spec, params, experts, key, name)
        if any(key in e.varying for e in experts):
            varying[name] = _varying_per_expert(spec, params, experts, key, name)
    if config.get(_mergekit.NORMALIZE) and ("weights" in varying or "scaling" in varying):
        varying["scaling"] = NormalizedScaling(  # Σ weight and the scaling by tensor
            varying.get("scaling", params.get("scaling", 1.0)),
            varying.get("weights") or params.get("weights") or [1.0] * len(experts),
            _mergekit.normalized_scaling,
            given.get("scaling", "parameters.scaling"),
        )
    elif config.get(_mergekit.NORMALIZE):  # a mergekit file's normalize: true
        weights = params.get("weights") or [1.0] * len(experts)
        params["scaling"] = _mergekit.normalized_scaling(params.get("scaling", 1.0), weights)
        if not math.isfinite(params["scaling"]):
            raise ConfigError(
                f"{given.get('scaling', 'parameters.scaling')} divided by the weights' sum "
                f"(normalize: true) must be finite, got {params['scaling']!r}"
            )
    if any(e.fisher is not None for e in experts) and spec.extra != "fishers":
        raise ConfigError(f"method {method!r} takes no 'fisher' checkpoints")
    if spec.extra == "fishers" and any(e.fisher is None for e in experts):
        raise ConfigError(f"method {method!r} needs a 'fisher' checkpoint for every expert")
    curvatures = [e.curvature is not None for e in experts]
    if any(curvatures) and spec.extra != "curvatures":
        raise ConfigError(f"method {method!r} takes no 'curvature' files")
    if any(curvatures) and not all(curvatures):
        raise ConfigError("give a 'curvature' to every expert or to none")
    for p in spec.params:
        name = p.name
        if p.kind in _MANAGED_KINDS or defaults[name] is not merging.REQUIRED:
            continue
        if name not in params:
            raise ConfigError(f"method {method!r} requires the parameter {name!r}")

    output = config.get("output")
    if output is not None and (not isinstance(output, str) or not output.strip()):
        raise ConfigError(f"'output' must be a non-empty path, got {output!r}")
    dtypes = [config.get(key) for key in ("dtype", "out_dtype")]
    for key, value in zip(("dtype", "out_dtype"), dtypes, strict=True):
        if value is not None and value not in _mergekit.DTYPES:
            raise ConfigError(
                f"'{key}' must be one of {', '.join(_mergekit.DTYPES)}, got {value!r}"
            )
    return Plan(method, base, experts, params, output, seed, dtypes[0], dtypes[1], varying)


def _refuse_repeated_models(spec: merging.Method, base: str | None, experts: list[Expert]) -> None:
    """Refuses an expert listed twice (it would count twice) and, for a method that always
    merges task vectors, the base as an expert (its task vector is zero); ``a`` and ``./a``
    are one model. (Averaging the base with an expert, as ``linear`` does, is allowed.)"""
    base_path = None if base is None else os.path.realpath(base)
    seen: dict[str, str] = {}
    for expert in experts:
        same = os.path.realpath(expert.path)
        if same == base_path and not spec.base_optional:
            raise ConfigError(
                f"{expert.key} ({expert.path!r}) is the base: method {spec.name!r} reads the "
                "base as the base, not as an expert too (as a task vector, it is zero); list "
                "only the fine-tuned models"
            )
        if same in seen:
            raise ConfigError(
                f"{expert.key} ({expert.path!r}) repeats {seen[same]}: a model merged twice "
                "counts twice (give it a weight instead)"
            )
        seen[same] = expert.key
