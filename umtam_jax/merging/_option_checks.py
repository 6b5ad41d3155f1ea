"""The checks of a merging method's options, before any input is read.

A string among its allowed values, densities in (0, 1] (one per expert), per-expert
weights, and scalars that must be finite numbers (possibly traced). Each
:class:`._registry.Param` checks its value with these; :mod:`._validation`, which checks the
inputs, re-exports them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def check_option(name: str, value: Any, allowed: Sequence[str]) -> str:
    """Checks a string option against its allowed values."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"unknown {name}={value!r}; expected one of " + ", ".join(repr(a) for a in allowed)
        )
    return value


def check_densities(density: Any, n: int) -> list[float]:
    """One density per expert from a number or a sequence; each must lie in (0, 1].

    Messages name ``density``, or ``density[i]`` for an entry of a sequence (``umtam-merge``
    names the file's key from the index). Strings and bools are refused, not converted.
    """
    per_expert = (isinstance(density, Sequence) and not isinstance(density, str | bytes)) or (
        getattr(density, "ndim", 0) == 1  # an array of one density per expert
    )
    values = list(density) if per_expert else [density] * n
    if len(values) != n:
        raise ValueError(f"got {len(values)} densities for {n} experts")
    out = []
    for i, d in enumerate(values):
        which = f"density[{i}]" if per_expert else "density"
        if isinstance(d, str | bytes | bool) or jnp.issubdtype(getattr(d, "dtype", float), bool):
            raise TypeError(f"{which} must be a number in (0, 1], got {d!r}")
        try:
            f = float(d)
        except (TypeError, ValueError):
            raise TypeError(
                f"{which} must be a static Python float (mark it static under jit), got {d!r}"
            ) from None
        if not 0.0 < f <= 1.0:
            raise ValueError(f"{which} must lie in (0, 1], got {d!r}")
        out.append(f)
    return out


def check_weights(weights: Any, n: int, what: str = "weights") -> list[Any]:
    """Per-expert weights (default 1.0); scalars, possibly traced."""
    if weights is None:
        return [1.0] * n
    if isinstance(weights, str | bytes | Mapping) or not isinstance(weights, Sequence):
        if hasattr(weights, "shape") and getattr(weights, "ndim", 0) == 1:
            weights = list(weights)
        else:
            raise TypeError(f"{what} must be a sequence with one number per expert")
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} {what} for {n} experts")
    for w in weights:
        if getattr(w, "ndim", 0) != 0:
            raise ValueError(f"each of {what} must be a scalar, got shape {w.shape}")
    check_finite_scalars(**{f"{what}[{i}]": w for i, w in enumerate(weights)})
    return [as_scalar(w) for w in weights]


def check_finite_scalars(**values: Any) -> None:
    """Checks that scalar options (``scaling=...``, weights) are finite numbers; traced
    values are only checked to be scalars (their values are not known)."""
    for name, value in values.items():
        if isinstance(value, jax.core.Tracer):  # its shape is known: a scalar, or an error
            if value.ndim != 0:
                raise TypeError(
                    f"{name} must be a scalar, got a traced array of shape {value.shape}"
                )
            continue
        if isinstance(value, str | bytes):
            raise TypeError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, got {value!r}") from None
        except OverflowError:  # an integer beyond float64's range
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"{name} must be finite, got {value!r}")


def as_scalar(value: Any) -> Any:
    """A checked scalar option as JAX can take it: a Python int beyond int32's range (JAX
    would refuse it with an OverflowError) as a float; anything else unchanged."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**31) <= value < 2**31:
        return float(value)
    return value
