"""The models of a mergekit configuration: what the whole file gives every model, and each
``models`` entry read into an expert of the native configuration."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from umtam_jax.cli._mergekit_settings import TensorSetting, model_chains
from umtam_jax.cli._mergekit_values import number, read_params, scalar
from umtam_jax.cli._yaml import ConfigError
from umtam_jax.merging import Method

#: The key under which a translated expert entry keeps its place in the mergekit file
#: (``models[2]``), for messages.
KEY = "_mergekit_key"
#: An expert entry's weight and density chains where they vary by tensor (model_chains).
VARYING = "_mergekit_varying"
# Tensor parameters mergekit takes per model that are one number per merge here: every
# model must get the same value (see settle_shared).
SHARED_PER_MODEL = ("gamma", "epsilon")
# Methods for which mergekit has no base role: a base_model given is one more input.
BASE_IS_AN_INPUT = ("linear", "karcher", "passthrough")


def model_path(value: Any, where: str) -> str:
    """The model path an entry gives (a path, or ``{model: path}``), checked."""
    if isinstance(value, dict) and set(value) == {"model"}:
        value = value["model"]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a model path")
    if "+" in value:
        raise ConfigError(f"{where}: LoRA references (model+lora) are not supported: {value!r}")
    return value


def _same_value(a: Any, b: Any) -> bool:
    """Whether two parameter values are one (two NaNs too: the value's own check then
    names it, not a difference between the models)."""
    nans = [isinstance(v, float) and math.isnan(v) for v in (a, b)]
    return all(nans) or (not any(nans) and a == b)


def same_model(a: Any, b: Any) -> bool:
    """Whether two model paths name one model (``a`` and ``./a``)."""
    return isinstance(a, str) and isinstance(b, str) and os.path.realpath(a) == os.path.realpath(b)


@dataclasses.dataclass
class FileParameters:
    """What a mergekit file gives beside its models, as the models' entries read it.

    Attributes:
      name: mergekit's ``merge_method``.
      registered: the registry method it runs.
      base: the base model's path (None for methods that need none).
      read_per_model: the parameters mergekit reads per model (None: any).
      typed: the parameters read as mergekit reads them (numbers, bools).
      ignored: the keys mergekit would not read, for the one warning naming them.
      global_params: the ``parameters`` read, by mergekit's names.
      keys: where the file gives each parameter (``parameters.lambda``), for messages.
      varying: the method's parameters that vary by tensor.
      model_defaults: every model's default weight and density.
      default_varying: those defaults where they vary by tensor.
      own_shared: the models' own ``gamma``/``epsilon``, by key and model (``models[1]``).
    """

    name: str
    registered: Method
    base: str | None
    read_per_model: tuple[str, ...] | None
    typed: tuple[str, ...]
    ignored: list[str]
    global_params: dict[str, Any]
    keys: dict[str, str]
    varying: dict[str, TensorSetting]
    model_defaults: dict[str, Any]
    default_varying: dict[str, TensorSetting]
    own_shared: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def base_is_input(self) -> bool:
        """Whether the base model is merged as one more input (no base role)."""
        return self.name in BASE_IS_AN_INPUT and self.base is not None


def entries(file: FileParameters, models: list[Any]) -> list[tuple[str, Any]]:
    """The ``models`` entries, each with where it is in the file, and the base model
    appended where it is one more input that they do not list (as mergekit does)."""
    listed = [(f"models[{i}]", entry) for i, entry in enumerate(models)]
    if not file.base_is_input:
        return listed
    # It stays the base too, which these methods only check: the output's config,
    # tokenizer and integer buffers are its.
    names = [m.get("model") if isinstance(m, dict) else m for m in models]
    if any(isinstance(n, str) and same_model(n, file.base) for n in names):
        return listed
    name, registered = file.name, file.registered
    if registered.param("weights") is not None and "weight" not in file.model_defaults:
        raise ConfigError(
            f"'base_model': merge_method {name!r} merges the base model as one more "
            "input, as mergekit does, which needs its weight: list it under 'models' "
            "with one, or give a default weight under 'parameters'"
        )
    if registered.experts[1] == 1:
        raise ConfigError(
            f"'base_model': merge_method {name!r} takes one model, and mergekit "
            "merges a base model that 'models' does not list as one more: drop "
            "'base_model' or list only it"
        )
    return [*listed, ("'base_model'", {"model": file.base})]


def expert(file: FileParameters, where: str, entry: Any) -> dict[str, Any] | None:
    """The native expert entry of one ``models`` entry (None: the base model's entry).

    A per-model ``gamma``/``epsilon`` goes into ``file.own_shared`` (see
    :func:`settle_shared`), passthrough's ``scale`` into ``file.global_params``.
    """
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"{where} must be a mapping with a 'model'")
    # mergekit's model entry keeps only these: any other key is dropped, as there.
    file.ignored += [f"{where}.{k}" for k in entry if k not in ("model", "parameters")]
    path = model_path(entry["model"], f"{where}.model")
    if file.base is not None and not file.base_is_input and same_model(path, file.base):
        return None
    own_varying: dict[str, TensorSetting] = {}
    params = read_params(entry.get("parameters") or {}, f"{where}.parameters",
                         file.read_per_model, file.ignored, file.typed, own_varying)  # fmt: skip
    for key, value in own_varying.items():
        if key not in ("weight", "density"):
            raise ConfigError(
                f"{value.key}: per-layer gradients and filtered values of a model are "
                "supported for its weight and density"
            )
    if file.name == "passthrough" and "scale" in params:  # its one model's scale
        file.global_params["scale"] = scalar(params.pop("scale"), f"{where}.parameters.scale")
        file.keys["scale"] = f"{where}.parameters.scale"
    for key in SHARED_PER_MODEL:
        if key in params:
            value = scalar(params.pop(key), f"{where}.parameters.{key}")
            file.own_shared.setdefault(key, {})[where] = value
    unknown = set(params) - {"weight", "density"}
    if unknown:
        raise ConfigError(
            f"{where}.parameters: {sorted(unknown, key=str)} not supported per model "
            f"(only weight, density, {', '.join(SHARED_PER_MODEL)})"
        )
    out: dict[str, Any] = {"path": path, KEY: where}
    for key in ("weight", "density"):
        if key in params:
            out[key] = number(params[key], f"{where}.parameters.{key}")
    if "weight" not in out and "weight" in file.model_defaults:
        out["weight"] = file.model_defaults["weight"]
    chains = model_chains(params, own_varying, file.model_defaults, file.default_varying)
    if chains:
        out[VARYING] = chains
    return out


def settle_shared(file: FileParameters, experts: list[dict[str, Any]]) -> None:
    """Every model's ``gamma``/``epsilon`` as mergekit reads it (its own, else the file's
    ``parameters`` value or gradient, else the method's default), which umtam-merge
    takes once for all models: the one value goes into ``file.global_params``.

    Raises:
      ConfigError: the models would get different values, naming them.
    """
    for key, own in file.own_shared.items():
        first = next(iter(own))
        if file.registered.param(key) is None:  # refused by name with the method's others
            file.global_params[key] = own[first]
            file.keys.setdefault(key, f"{first}.parameters.{key}")
            continue
        others = [e[KEY] for e in experts if e[KEY] not in own]
        if key in file.varying:
            fallback: Any = file.varying[key]
            given = f"{file.varying[key].key}, which varies by tensor"
        elif key in file.global_params:
            fallback, given = file.global_params[key], f"parameters.{key}"
        else:
            fallback = file.registered.defaults()[key]
            given = f"the method's default for {key}"
        values = [*own.values(), *([fallback] if others else [])]
        if any(isinstance(v, TensorSetting) or not _same_value(v, values[0]) for v in values):
            gets = [f"{where} {value!r}" for where, value in own.items()]
            if others:
                gets.append(f"{', '.join(others)} {given}" + (
                    "" if isinstance(fallback, TensorSetting) else f" ({fallback!r})"))  # fmt: skip
            raise ConfigError(
                f"{first}.parameters.{key}: umtam-merge merges with one {key} for every "
                f"model, and the models would get different ones ({'; '.join(gets)}): give "
                f"every model the same {key} in the file, or give it once under 'parameters'"
            )
        file.global_params[key] = values[0]
        file.varying.pop(key, None)  # every model gives its own
        if not others:
            file.keys[key] = f"{first}.parameters.{key}"
