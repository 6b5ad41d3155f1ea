"""The values of a mergekit configuration's ``parameters``: read as mergekit reads them,
checked by the registry, every error naming the key where the file gives the value.

mergekit's configuration validates every parameter value with pydantic as a number (or a
gradient, or filtered values: :mod:`umtam_jax.cli._mergekit_settings`), in lax mode: a
string that spells a number is that number, any other string an error. Its method then
reads the value as a bool, an int or a float. pydantic's bool takes 0 and 1 (and 0.0,
1.0); it would take the strings ``'yes'``, ``'true'``, ``'on'``, ... too, but none reaches
it, since the configuration has refused them before, so they are refused here too. An int
takes a whole number (``10``, ``10.0``, ``"10"``); a float any number. A YAML boolean
(``true``, unquoted ``yes``) is a bool; for a number it is refused, not read as 1 as
pydantic would.
"""

from __future__ import annotations

import re
from typing import Any

from umtam_jax.cli._mergekit_settings import TensorSetting, setting
from umtam_jax.cli._yaml import ConfigError, is_number
from umtam_jax.merging._registry import Method

# The parameters mergekit's methods read as a bool or an int; every other one it reads
# is a float.
BOOLS = (
    "int8_mask",
    "normalize",
    "rescale",
    "nuslerp_row_wise",
    "nuslerp_flatten",
    "normalize_weights",
    "filter_wise",
)
INTS = ("max_iter",)
# Spellings of a bool that YAML reads as one unless quoted.
_QUOTED_BOOLS = ("true", "false", "yes", "no", "on", "off")


def scalar(value: Any, where: str) -> Any:
    """``value``, refusing a list (mergekit's per-layer gradients and filtered values,
    read only where :func:`read_params` collects them) and a lone mapping (no parameter
    value in mergekit either)."""
    if isinstance(value, list):
        what = "filtered values" if any(isinstance(v, dict) for v in value) else "gradients"
        raise ConfigError(
            f"{where}: per-layer {what} are not read here: one value is (they are for "
            "numbers under 'parameters' and a model's weight and density)"
        )
    if isinstance(value, dict):
        raise ConfigError(f"{where}: a mapping is not a parameter value")
    return value


def quoted_number(value: Any) -> Any:
    """A string that spells a number, as that number (mergekit's configuration reads
    ``weight: "0.5"`` as 0.5); any other value unchanged."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value.strip())
            except ValueError:
                pass
    return value


def number(value: Any, where: str) -> float:
    """``value`` if it is a number (an int or float; not a bool), else an error."""
    value = scalar(value, where)
    if not is_number(value):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    return value


def mergekit_value(value: Any, key: str, where: str) -> Any:
    """The value of parameter ``key`` at ``where`` as mergekit reads it: a bool, an int or
    a float (see the module's docstring).

    Raises:
      ConfigError: naming ``where``, for a value mergekit refuses.
    """
    value = quoted_number(scalar(value, where))
    if key in BOOLS:
        if is_number(value) and value in (0, 1):
            return bool(value)
        if not isinstance(value, bool):
            quoted = isinstance(value, str) and value.strip().lower() in _QUOTED_BOOLS
            hint = " (quoted: mergekit reads no string as a bool)" if quoted else ""
            raise ConfigError(f"{where} must be true or false, got {value!r}{hint}")
        return value
    if key in INTS:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not is_number(value) or isinstance(value, float):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        return value
    return number(value, where)


def read_params(
    params: Any,
    where: str,
    read: tuple[str, ...] | None,
    ignored: list[str],
    typed: tuple[str, ...] = (),
    varying: dict[str, TensorSetting] | None = None,
) -> dict[str, Any]:
    """A ``parameters`` mapping at ``where``, without the keys that mergekit does not
    ``read`` (listed in ``ignored``; None: keep all): those mergekit's method reads
    (``typed``) as :func:`mergekit_value` reads them, any other quoted number as the
    number. Where ``varying`` is given, a list (a gradient or filtered values) is put
    there as a :class:`TensorSetting` and its first value kept in the result."""
    if not isinstance(params, dict):
        raise ConfigError(f"{where} must be a mapping")
    out = {}
    for key, value in params.items():
        at = f"{where}.{key}"

        def one(v: Any, w: str, key: str = key) -> Any:
            return mergekit_value(v, key, w) if key in typed else quoted_number(scalar(v, w))

        if read is not None and key not in read:
            ignored.append(at)
        elif key == "scope" and isinstance(value, dict):  # {scanned: [names], ...}
            out[key] = value
        elif isinstance(value, list) and varying is not None:
            varying[key] = setting(value, at, one)
            out[key] = varying[key].values()[0]
        else:
            out[key] = one(value, at)
    return out


def check_parameters(
    method: Method, parameters: dict[str, Any], keys: dict[str, str], k: int
) -> None:
    """Checks each parameter a configuration gives with the registry's own check of it.

    Args:
      method: the registry method the configuration runs.
      parameters: its parameters, by the method's names.
      keys: for each parameter to check, the key that gave it (``parameters.density``,
        a mergekit file's ``parameters.lambda`` for ``scaling`` or
        ``models[0].parameters.gamma``, ``--param gamma``).
      k: the number of experts.

    Raises:
      ConfigError: the registry's message, naming the key instead of the parameter.
    """
    for name, key in keys.items():
        param = method.param(name)
        if param is None or param.kind in ("weights", "key") or name not in parameters:
            continue  # unknown names are build_plan's; weights are the experts'
        if isinstance(parameters[name], dict):  # a scope mapping: checked where it is read
            continue
        try:
            param.check(parameters[name], k)
        except (ValueError, TypeError) as err:
            raise ConfigError(renamed(str(err), name, key)) from None


def renamed(message: str, name: str, key: str) -> str:
    """A library message about parameter ``name`` naming the configuration's ``key``
    instead (``gamma must lie in ...`` → ``models[0].parameters.gamma must lie in ...``,
    ``density[1] ...`` → ``parameters.density[1] ...``); ``key: message`` if it names none."""
    out, count = re.subn(rf"(?<![\w.\[]){re.escape(name)}(?!\w)", key, message, count=1)
    return out if count else f"{key}: {message}"
