"""mergekit configurations, translated into ``umtam-merge``'s own.

A file with a ``merge_method`` key is a mergekit configuration::

    merge_method: ties
    base_model: models/base
    models:
      - model: models/math
        parameters: {weight: 1.0, density: 0.5}
      - model: models/code
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, int8_mask: true, lambda: 1.0}
    dtype: bfloat16
    tokenizer_source: base

It runs unchanged, with mergekit's semantics for the methods both support:

========================  =====================================================
mergekit                  umtam_jax
========================  =====================================================
``task_arithmetic``       ``task_arithmetic``; ``normalize: true`` divides by Σ weight
``ties``                  ``ties`` (``normalize: true``, the default, only)
``dare_linear``           ``dare`` with mergekit's L1 ``rescale`` (default true)
``dare_ties``             ``dare_ties`` with mergekit's L1 ``rescale`` (default true)
========================  =====================================================

``lambda`` is ``scaling``; a model's ``weight`` and ``density`` are the expert's (mergekit's
defaults: density 1); ``int8_mask`` only changes mergekit's mask dtype and is accepted. A
``models`` entry naming the base model is the base, not an expert. Any method of
:data:`umtam_jax.merging.METHODS` may be named too (``merge_method: umtam``), its
parameters under ``parameters``. ``dtype`` is the dtype the inputs are read in (the merge
computes in float32 or wider) and ``out_dtype`` the output's (default: ``dtype``, else the
inputs'). ``tokenizer_source: base`` is the default: a Hugging Face output gets the base's
config and tokenizer files. mergekit features umtam_jax does not have (``slices``,
per-layer gradients and filtered parameters, tokenizer merging, chat templates, LoRA
``model+lora`` references, other methods) are refused with one error naming the key.
"""

from __future__ import annotations

from typing import Any

from umtam_jax.cli._yaml import ConfigError
from umtam_jax.merging import METHODS

# mergekit method → (registry method, default normalize, default rescale).
_GTA = {
    "task_arithmetic": ("task_arithmetic", False, False),
    "ties": ("ties", True, False),
    "dare_linear": ("dare", False, True),
    "dare_ties": ("dare_ties", False, True),
}
_TOP_LEVEL = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
}
_UNSUPPORTED = {
    "slices": "layer slices",
    "tokenizer": "tokenizer merging",
    "chat_template": "chat templates",
    "modules": "per-module configurations",
}
DTYPES = ("float32", "bfloat16", "float16", "float64")


def is_mergekit(config: Any) -> bool:
    """Whether ``config`` is a mergekit configuration (it has ``merge_method``)."""
    return isinstance(config, dict) and "merge_method" in config


def _model(value: Any, where: str) -> str:
    if isinstance(value, dict) and set(value) == {"model"}:
        value = value["model"]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a model path")
    if "+" in value:
        raise ConfigError(f"{where}: LoRA references (model+lora) are not supported: {value!r}")
    return value


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, list):
        raise ConfigError(f"{where}: per-layer gradients (lists) are not supported")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: filtered parameters are not supported")
    return value


def _dtype(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is not None and value not in DTYPES:
        raise ConfigError(f"'{key}' must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


def translate(config: dict[str, Any]) -> dict[str, Any]:
    """The native configuration (``method``, ``base``, ``experts``, ...) of a mergekit one.

    Raises:
      ConfigError: an unsupported or unknown key or method, naming it.
    """
    for key, what in _UNSUPPORTED.items():
        if key in config:
            raise ConfigError(f"'{key}': {what} are not supported by umtam-merge")
    unknown = set(config) - _TOP_LEVEL - {"output", "seed"}
    if unknown:
        raise ConfigError(
            f"unknown mergekit keys {sorted(unknown, key=str)}; supported: {sorted(_TOP_LEVEL)}"
        )
    name = config["merge_method"]
    if not isinstance(name, str) or (name not in _GTA and name not in METHODS):
        known = sorted(set(_GTA) | set(METHODS))
        raise ConfigError(f"merge_method {name!r} is not supported; supported: {', '.join(known)}")
    if config.get("tokenizer_source", "base") != "base":
        raise ConfigError("'tokenizer_source': only 'base' is supported")
    base = _model(config.get("base_model"), "'base_model'")
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError("'models' must be a non-empty list of {model, parameters} entries")
    global_params = config.get("parameters") or {}
    if not isinstance(global_params, dict):
        raise ConfigError("'parameters' must be a mapping")
    global_params = {k: _scalar(v, f"parameters.{k}") for k, v in global_params.items()}

    experts = []
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{where} must be a mapping with a 'model'")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"{where} has unsupported keys {sorted(extra, key=str)}")
        path = _model(entry["model"], f"{where}.model")
        if path == base:  # mergekit lists the base among the models; it is no expert
            continue
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.parameters must be a mapping")
        unknown = set(params) - {"weight", "density"}
        if unknown:
            raise ConfigError(
                f"{where}.parameters: {sorted(unknown, key=str)} not supported per model "
                "(only weight and density)"
            )
        expert = {"path": path}
        for key in ("weight", "density"):
            if key in params:
                expert[key] = _scalar(params[key], f"{where}.parameters.{key}")
        experts.append(expert)
    if not experts:
        raise ConfigError("'models' lists no model besides the base model")

    out: dict[str, Any] = {"base": base, "experts": experts}
    for key in ("output", "seed"):
        if key in config:
            out[key] = config[key]
    out["dtype"], out["out_dtype"] = _dtype(config, "dtype"), _dtype(config, "out_dtype")
    if name not in _GTA:
        out["method"], out["parameters"] = name, global_params
        return out
    method, normalize, rescale = _GTA[name]
    normalize = global_params.pop("normalize", normalize)
    rescale = global_params.pop("rescale", rescale)
    global_params.pop("int8_mask", None)
    scaling = global_params.pop("lambda", 1.0)
    if global_params:
        raise ConfigError(
            f"parameters {sorted(global_params)} are not supported for merge_method {name!r} "
            "(supported: lambda, normalize, rescale, int8_mask)"
        )
    if not isinstance(normalize, bool) or not isinstance(rescale, bool):
        raise ConfigError("'normalize' and 'rescale' must be true or false")
    if method != "task_arithmetic":  # mergekit's default density
        for e in experts:
            e.setdefault("density", 1.0)
    parameters: dict[str, Any] = {"scaling": scaling}
    if method == "ties":
        if not normalize or rescale:
            raise ConfigError(
                "merge_method 'ties' is supported with normalize: true and rescale: false only"
            )
    elif method == "dare_ties":
        parameters.update(normalize=normalize, l1_rescale=rescale, rescale=False)
    else:
        if method == "dare":
            parameters.update(l1_rescale=rescale, rescale=False)
        if normalize:  # mergekit divides the weighted sum by Σ weight (unless |Σ| < 1e-8)
            weights = [e.get("weight", 1.0) for e in experts]
            if not all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights):
                raise ConfigError("with normalize: true every model's weight must be a number")
            total = sum(weights)
            if abs(total) >= 1e-8:
                parameters["scaling"] = scaling / total
    out["method"], out["parameters"] = method, parameters
    return out
