"""Checks of a merge's inputs that need every source's metadata at once: dtypes the
merge could not honour, and non-floating tensors the models disagree on."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax.engine._sources import Source


def check_wide_floats(
    dtype: np.dtype | None, out_dtype: np.dtype | None, sources: list[tuple[Source, Any]]
) -> None:
    """A float64 merge needs JAX's x64 mode: without it JAX computes (and would write)
    float32 values, silently. One error naming the tensor or option instead."""
    if jax.config.jax_enable_x64:  # type: ignore[attr-defined]
        return
    fix = "merge in float32 (dtype float32), or run with JAX_ENABLE_X64=1"
    for name, option in (("dtype", dtype), ("out_dtype", out_dtype)):
        if option is not None and option.itemsize == 8:
            raise ValueError(f"{name} {option.name} needs JAX's x64 mode: {fix}")
    for source, tree in sources:
        for keypath, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if jnp.issubdtype(x.dtype, jnp.floating) and np.dtype(x.dtype).itemsize == 8:
                raise ValueError(
                    f"{source.location}'s tensor {jax.tree_util.keystr(keypath)} is "
                    f"{np.dtype(x.dtype).name}, which JAX computes in float32 without x64 "
                    f"mode: {fix}"
                )


def check_copied_dtypes(
    flat: list[tuple[Any, Any]], experts: list[Source], trees: list[Any]
) -> None:
    """Non-floating leaves are copied from the base, not merged: where the base or an
    expert holds one, every model must hold it with the same kind of dtype (a float32
    ``position_ids`` beside the base's int64 ones is a different model, even where the
    values compare equal). Integers of another width are accepted: the job checks that
    their values are equal when it copies them."""
    for source, tree in zip(experts, trees, strict=True):
        dtypes = {
            jax.tree_util.keystr(kp): np.dtype(x.dtype)
            for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        }
        for keypath, x in flat:
            path = jax.tree_util.keystr(keypath)
            want, got = np.dtype(x.dtype), dtypes.get(path)
            if got is None or got == want or _same_kind(want, got):
                continue
            raise ValueError(
                f"dtype mismatch at {path}: the base's is {want.name}, {source.location}'s "
                f"is {got.name} (non-floating tensors are copied from the base and must be "
                "the same in every model)"
            )


def _same_kind(a: np.dtype, b: np.dtype) -> bool:
    return any(jnp.issubdtype(a, k) and jnp.issubdtype(b, k) for k in (jnp.floating, jnp.integer))
