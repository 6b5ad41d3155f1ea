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
from umtam_jax.cli._config_parameters import (
    PER_EXPERT,
    Expert,
    check_type,
    per_expert_values,
    replaced_by_every_expert,
    varying_per_expert,
)
from umtam_jax.cli._mergekit_settings import NormalizedScaling, TensorSetting
from umtam_jax.cli._mergekit_values import check_parameters
from umtam_jax.cli._yaml import ConfigError, is_number
from umtam_jax.engine._checkpoints import require_layout
from umtam_jax.merging import METHODS
from umtam_jax.optimizer._config import SEED_RANGE

# Parameter kinds the CLI fills itself, from the experts' entries or the seed.
_MANAGED_KINDS = ("weights", "key")
_TOP_LEVEL = {"method", "base", "experts", "parameters", "output", "seed", "dtype", "out_dtype"}
EXPERT_KEYS = {"path", "fisher", "curvature", *PER_EXPERT}
_PRUNE_SCORES = ("saliency", "magnitude")


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


def build_plan(config: dict[str, Any]) -> Plan:
    """Validates a configuration mapping (file merged with flags) into a :class:`Plan`.

    Args:
      config: the configuration: the native schema's keys, or a translated mergekit
        file's (with the internal keys of ``_mergekit.INTERNAL_KEYS``).

    Returns:
      The plan the merge runs.

    Raises:
      ConfigError: unknown keys, method or parameters; wrong types; missing inputs.
    """
    spec = _method(config)
    base, experts = _inputs(config, spec)
    if not isinstance(config.get("parameters") or {}, dict):
        raise ConfigError("'parameters' must be a mapping")
    params = dict(config.get("parameters") or {})
    seed = _seed(config, params, spec)
    _check_parameters(config, spec, params, experts)
    varying = _per_tensor_and_per_expert(config, spec, params, experts)
    _require_layout(spec, {**params, **varying}, base, experts)
    for p in spec.params:
        required = p.kind not in _MANAGED_KINDS and spec.defaults()[p.name] is merging.REQUIRED
        if required and p.name not in params:
            raise ConfigError(f"method {spec.name!r} requires the parameter {p.name!r}")
    output = config.get("output")
    if output is not None and (not isinstance(output, str) or not output.strip()):
        raise ConfigError(f"'output' must be a non-empty path, got {output!r}")
    dtypes = [config.get(key) for key in ("dtype", "out_dtype")]
    for key, value in zip(("dtype", "out_dtype"), dtypes, strict=True):
        if value is not None and value not in _mergekit.DTYPES:
            raise ConfigError(
                f"'{key}' must be one of {', '.join(_mergekit.DTYPES)}, got {value!r}"
            )
    return Plan(spec.name, base, experts, params, output, seed, dtypes[0], dtypes[1], varying)


def _require_layout(
    spec: merging.Method, given: dict[str, Any], base: str | None, experts: list[Expert]
) -> None:
    """The engine's check that the layout is named (``require_layout``) on the file's
    parameters, before anything is read; a mergekit file names the layout itself."""
    try:
        require_layout(spec, [given], [base, *(e.path for e in experts)], "set layout: ")
    except ValueError as err:
        raise ConfigError(f"parameters.layout: {err}") from None


def _method(config: Any) -> merging.Method:
    """The registry method a configuration names, checked to run out of core."""
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
    return spec


def _inputs(config: dict[str, Any], spec: merging.Method) -> tuple[str | None, list[Expert]]:
    """The base path and the experts' entries, checked against the method."""
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
    method = spec.name
    if any(e.fisher is not None for e in experts) and spec.extra != "fishers":
        raise ConfigError(f"method {method!r} takes no 'fisher' checkpoints")
    if spec.extra == "fishers" and any(e.fisher is None for e in experts):
        raise ConfigError(f"method {method!r} needs a 'fisher' checkpoint for every expert")
    curvatures = [e.curvature is not None for e in experts]
    if any(curvatures) and spec.extra != "curvatures":
        raise ConfigError(f"method {method!r} takes no 'curvature' files")
    if any(curvatures) and not all(curvatures):
        raise ConfigError("give a 'curvature' to every expert or to none")
    return base, experts


def _seed(config: dict[str, Any], params: dict[str, Any], spec: merging.Method) -> int:
    """The seed (top-level, or under 'parameters', which loses it), checked."""
    seed = config.get("seed", params.pop("seed", 0))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"'seed' must be an integer, got {seed!r}")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"'seed' must be in [-2**63, 2**63 - 1], got {seed}")
    if "seed" in config and not any(p.kind == "key" for p in spec.params):
        raise ConfigError(f"method {spec.name!r} draws nothing at random: it takes no 'seed'")
    return seed


def _check_parameters(
    config: dict[str, Any], spec: merging.Method, params: dict[str, Any], experts: list[Expert]
) -> None:
    """The parameters' names, types and ranges, each error naming the key that gave the
    value (the mergekit file's, a --param flag); experts' own values are named where they
    are read, and a default that every expert replaces is not read."""
    method = spec.name
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
        check_type(method, param, value)
    given = config.get(_mergekit.PARAMETER_KEYS) or {}
    named = {
        name: given.get(name, f"parameters.{name}")
        for name in params
        if name != "scores" and not replaced_by_every_expert(spec.param(name), experts)
    }
    check_parameters(spec, params, named, len(experts))


def _per_tensor_and_per_expert(
    config: dict[str, Any], spec: merging.Method, params: dict[str, Any], experts: list[Expert]
) -> dict[str, Any]:
    """Puts the experts' values into ``params`` and returns the parameters that vary by
    tensor (a mergekit file's gradients and filtered values, the experts' own included),
    each value they may take checked; applies a mergekit file's ``normalize: true``."""
    given = config.get(_mergekit.PARAMETER_KEYS) or {}
    varying: dict[str, Any] = dict(config.get(_mergekit.TENSOR_SETTINGS) or {})
    for name, setting in varying.items():
        param = spec.param(name)
        assert param is not None  # the translation reads only the method's parameters
        for value, at in setting.located():
            check_type(spec.name, param, value)
            check_parameters(spec, {name: value}, {name: at}, len(experts))
    for key, name in PER_EXPERT.items():
        default = params.get(name)  # the file's, before the experts' own values
        per_expert_values(spec, params, experts, key, name)
        if any(key in e.varying for e in experts):
            varying[name] = varying_per_expert(spec, params, experts, key, name, default)
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
    return varying


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
