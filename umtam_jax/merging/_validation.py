"""Input validation and tree plumbing shared by every merging method (docs/algorithm.md §5.7).

The structural checks use static information only (tree structure, shapes, dtypes, Python
option values), so every merge stays traceable by ``jax.jit`` / ``jax.eval_shape`` when its
Python options are static. Called on concrete arrays, a merge also checks that every input
value is finite (one reduction per leaf, one device-to-host read for all of them): a NaN or
infinity would otherwise come out as a NaN merge or, through the top-k selections, be
silently kept or dropped. Under tracing the values are not known and are not checked.
Errors name the offending leaf with :func:`jax.tree_util.keystr`. The checks of the
methods' options are in :mod:`._option_checks` (re-exported here).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax import _pytrees
from umtam_jax._precision import at_least_float32

# The option checks, reached through this module by the methods and the engine.
from umtam_jax.merging._option_checks import (  # noqa: F401
    as_scalar,
    check_densities,
    check_finite_scalars,
    check_option,
    check_weights,
)


class Prepared(NamedTuple):
    """Flattened base and experts of one merge call.

    Attributes:
      treedef: the base's tree structure (used to rebuild the result), with any
        ``flax.nnx`` Variable as a leaf.
      paths: ``keystr`` of every leaf, in flattening order (a Variable's path, without
        ``.value``: the path of its statistics).
      base: the base leaves as JAX arrays.
      experts: one list of leaves per expert, aligned with ``base``.
      variables: the base's Variable at each leaf, or ``None`` for a plain array.
      key_paths: the key path of every leaf (``paths`` before ``keystr``), as a layout
        callable (``scope``) receives it.
    """

    treedef: Any
    paths: list[str]
    base: list[jax.Array]
    experts: list[list[jax.Array]]
    variables: list[Any]
    key_paths: list[tuple[Any, ...]]


#: Why a result computed from finite inputs is not finite, unless a method knows better.
OVERFLOW = (
    "overflowed although every input is finite: scale the inputs down or merge in a wider dtype"
)


def rebuild(
    prepared: Prepared, leaves: list[Any], explain: Callable[[int], str | None] | None = None
) -> Any:
    """The merged tree: ``leaves`` in the base's structure (and Variables).

    Outside ``jax.jit`` every merged leaf is checked to be finite: finite inputs whose
    merge overflows (values near the dtype's maximum) raise ``ValueError`` naming the
    leaf instead of returning an infinity or a NaN. ``explain(j)``, called only then, may
    give another cause for leaf ``j`` (RegMean: a singular Gram); None means an overflow.
    """
    check_finite(
        [(f"the merged leaf {path}", x) for path, x in zip(prepared.paths, leaves, strict=True)],
        problem=OVERFLOW if explain is None else lambda j: explain(j) or OVERFLOW,
    )
    wrapped = [
        x if v is None else v.replace(value=x)
        for v, x in zip(prepared.variables, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(prepared.treedef, wrapped)


def describe(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"array of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)
    )


def as_array(x: Any) -> jax.Array:
    # jnp.asarray never writes to a NumPy input; it copies (or aliases read-only) its data.
    # A NumPy input closed over by a traced function stays concrete (not a traced
    # constant), so its values are still checked.
    if isinstance(x, jax.Array):
        return x
    with jax.ensure_compile_time_eval():
        return jnp.asarray(x)


def _with_variables(tree: Any, is_leaf=None) -> tuple[list[tuple], list[Any], Any]:
    """Flattens ``tree`` with ``flax.nnx`` Variables as leaves: key paths, leaves, treedef."""

    def leaf(x: Any) -> bool:
        return _pytrees.is_variable(x) or (is_leaf is not None and is_leaf(x))

    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)
    return [tuple(p) for p, _ in with_path], [x for _, x in with_path], treedef


def flatten(tree: Any, is_leaf=None) -> tuple[list[str], list[Any], Any]:
    """Paths, leaves and treedef of ``tree``; a Variable counts as the array it wraps."""
    key_paths, leaves, treedef = _with_variables(tree, is_leaf)
    paths = [jax.tree_util.keystr(p) for p in key_paths]
    return paths, [_pytrees.unwrap(x) for x in leaves], treedef


def structure_error(what: str, ref_paths: list[str], paths: list[str], ref: str) -> ValueError:
    missing = [p for p in ref_paths if p not in set(paths)]
    extra = [p for p in paths if p not in set(ref_paths)]
    if missing:
        detail = f"it lacks {ref}'s leaf {missing[0]}"
    elif extra:
        detail = f"it has an extra leaf {extra[0]} that {ref} lacks"
    else:
        detail = "it has the same leaf paths in a different order"
    if missing and sorted(map(_as_names, paths)) == sorted(map(_as_names, ref_paths)):
        detail += (
            f" (it has {extra[0]}: the same names, one with integer keys, the other with "
            "strings, as an nnx.Sequential's layers and a safetensors folder's names are: "
            "give every input in one format, e.g. converted by "
            "umtam_jax.checkpoint.orbax_to_safetensors)"
        )
    return ValueError(f"{what} does not have the tree structure of {ref}: {detail}")


def _as_names(path: str) -> str:
    """A ``keystr`` path with its integer keys written as strings (``[0]`` → ``['0']``)."""
    return re.sub(r"\[(\d+)\]", r"['\1']", path)


def check_sequence(x: Any, what: str, *, allow_empty: bool = False) -> list[Any]:
    """Returns ``x`` as a list after checking it is a (non-empty) sequence of pytrees."""
    if isinstance(x, str | bytes | Mapping) or not isinstance(x, Sequence):
        raise TypeError(
            f"{what} must be a sequence (list or tuple) with one pytree per expert, "
            f"got {type(x).__name__}"
        )
    if not x and not allow_empty:
        raise ValueError(f"{what} is empty: at least one expert is required")
    return list(x)


def float_dtype(dtype: Any, path: str, what: str) -> jnp.dtype:
    """The dtype merges compute in: float32 for 8- and 16-bit floats, else the leaf's own.

    Raises:
      TypeError: a non-floating dtype, one in another byte order than the machine's, or a
        64-bit one JAX would silently compute in 32 bits (``jax_enable_x64`` off).
    """
    dtype = jnp.dtype(dtype)
    if not dtype.isnative:  # a NumPy array read from a big-endian file
        raise TypeError(
            f"{what}{path} has dtype {dtype}, whose byte order is not the machine's, which "
            "JAX cannot hold: convert it with x.astype(x.dtype.newbyteorder('='))"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{what}{path} has dtype {dtype}; merging needs floating-point leaves")
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise TypeError(
            f"{what}{path} is {dtype}, but jax_enable_x64 is off, so JAX would merge it in "
            f"{jax.dtypes.canonicalize_dtype(dtype)}: cast the inputs to float32, or enable "
            "x64 (jax.config.update('jax_enable_x64', True))"
        )
    return at_least_float32(dtype)


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    # x·0 is 0 for finite x and NaN for NaN/±inf: one summing pass, 2.7× faster on CPU
    # than all(isfinite(x)) (XLA keeps the multiply: it is not 0 for non-finite x).
    return jnp.isfinite(jnp.sum(x * 0))


def read_concrete(inputs: Sequence[Any], compute: Callable[[], list[Any]]) -> list[Any] | None:
    """``compute()`` read to the host, or None when one of ``inputs`` is traced (its values
    are unknown). Concrete inputs closed over by a function being traced are computed on at
    trace time, so the value checks built on this still apply to them."""
    if any(isinstance(x, jax.core.Tracer) for x in inputs):
        return None
    with jax.ensure_compile_time_eval():
        return jax.device_get(compute())  # every result dispatched first, read once


def check_finite(
    named_leaves: Sequence[tuple[str, Any]],
    *,
    problem: str | Callable[[int], str] = "merging needs finite inputs",
) -> None:
    """Raises ``ValueError`` naming the first array that holds a NaN or an infinity.

    ``named_leaves`` pairs each array with its name in messages (``experts[1]['w']``);
    ``problem`` ends the message (or ``problem(i)`` for the ``i``-th array). Skipped under
    tracing (``jax.jit``, ``jax.eval_shape``), where values are unknown.
    """
    arrays = [x for _, x in named_leaves]
    flags = read_concrete(arrays, lambda: [_all_finite(x) for x in arrays])
    for i, ((name, x), ok) in enumerate(zip(named_leaves, flags or [], strict=False)):
        if not ok:  # counted where the array lives (it may be sharded or on a device)

            def counts(x: Any = x) -> list[Any]:
                return [jnp.sum(jnp.isnan(x)), jnp.sum(jnp.isinf(x))]

            read = read_concrete([x], counts)
            assert read is not None  # x is concrete: its flags were read just above
            nans, infs = read
            raise ValueError(
                f"{name} is not finite ({int(nans)} NaN and {int(infs)} infinite of {x.size} "
                f"values): {problem(i) if callable(problem) else problem}"
            )


def check_non_negative(
    named_leaves: Sequence[tuple[str, Any]], need: str, *, strict: bool = False
) -> None:
    """Raises ``ValueError`` naming the first array with an entry below 0 (at or below 0
    with ``strict``); ``need`` ends the message. Skipped for traced arrays, as
    :func:`check_finite`."""
    arrays = [x for _, x in named_leaves]
    lows = read_concrete(arrays, lambda: [jnp.min(x, initial=jnp.inf) for x in arrays])
    for (name, _), low in zip(named_leaves, lows or [], strict=False):
        if low < 0 or (strict and low == 0):
            raise ValueError(f"{name} has an entry {float(low)}: {need}")


def check_convex_weights(weights: Sequence[Any]) -> None:
    """Concrete per-expert weights of a weighted average must be non-negative with a
    positive sum (the average divides by a sum of weighted positive terms)."""
    if any(isinstance(w, jax.core.Tracer) for w in weights):
        return
    values = [float(w) for w in weights]
    if min(values) < 0 or sum(values) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {values}")


def prepare(
    base: Any,
    experts: Any,
    *,
    what: str = "experts",
    ref: str = "base",
    method: str | None = None,
) -> Prepared:
    """Validates ``base`` and ``experts`` (structure, shapes, dtypes) and flattens them.

    ``ref`` is how messages name the tree the experts are compared with (``"experts[0]"``
    where a method without a base was given none: ``base`` then has its shapes);
    ``method``, the merging method that a missing base is reported for.

    Raises:
      TypeError: ``base`` is None, ``experts`` is not a sequence, or a leaf is not a
        floating-point array.
      ValueError: no experts, or an expert's structure, shapes or dtypes differ from the
        base's; the message names the leaf path.
    """
    if base is None and method is not None:
        raise TypeError(f"{method} needs the base model (base=None is not allowed)")
    if base is None:
        need = ": this merge needs the base model" if ref == "base" else ""
        raise TypeError(f"{ref} is None{need}")
    experts = check_sequence(experts, what)
    key_paths, wrapped, treedef = _with_variables(base)
    paths = [jax.tree_util.keystr(p) for p in key_paths]
    variables = [x if _pytrees.is_variable(x) else None for x in wrapped]
    base_leaves = [_pytrees.unwrap(x) for x in wrapped]
    if not base_leaves:
        raise ValueError(f"{ref} has no array leaves")
    for path, leaf in zip(paths, base_leaves, strict=True):
        if not is_array(leaf):
            raise TypeError(f"{ref}{path} is a {type(leaf).__name__}, not an array")
        float_dtype(leaf.dtype, path, ref)
    out = []
    for i, expert in enumerate(experts):
        e_paths, e_leaves, _ = flatten(expert)
        if e_paths != paths:  # by path: an nnx.State and its pure dict line up
            raise structure_error(f"{what}[{i}]", paths, e_paths, ref)
        for path, b, e in zip(paths, base_leaves, e_leaves, strict=True):
            if not is_array(e):
                raise TypeError(f"{what}[{i}]{path} is a {type(e).__name__}, not an array")
            if tuple(e.shape) != tuple(b.shape):
                raise ValueError(
                    f"shape mismatch at {path}: {ref} has {tuple(b.shape)}, "
                    f"{what}[{i}] has {tuple(e.shape)}"
                )
            if jnp.dtype(e.dtype) != jnp.dtype(b.dtype):
                raise ValueError(
                    f"dtype mismatch at {path}: {ref} has {jnp.dtype(b.dtype)}, "
                    f"{what}[{i}] has {jnp.dtype(e.dtype)} (cast the inputs to one dtype; "
                    "umtam-merge reads them all in the dtype its 'dtype' option names)"
                )
        out.append([as_array(x) for x in e_leaves])
    base_arrays = [as_array(x) for x in base_leaves]
    prepared = Prepared(treedef, paths, base_arrays, out, variables, key_paths)
    named = [(f"{ref}{path}", b) for path, b in zip(paths, prepared.base, strict=True)]
    for i, leaves in enumerate(out):
        named += [(f"{what}[{i}]{path}", x) for path, x in zip(paths, leaves, strict=True)]
    check_finite(named)
    return prepared


def aligned_leaves(tree: Any, prepared: Prepared, what: str, is_leaf=None) -> list[Any]:
    """The leaves of ``tree`` after checking that it has the base's leaf paths (by path: an
    ``nnx.State`` lines up with its pure dict); the error names the first difference."""
    if tree is None:
        raise ValueError(f"{what} is None: give a pytree with the base's leaf paths")
    paths, leaves, _ = flatten(tree, is_leaf)
    if paths != prepared.paths:
        raise structure_error(what, prepared.paths, paths, "base")
    return leaves


def check_shape(x: Any, base_leaf: Any, path: str, what: str) -> None:
    """A leaf of ``what`` at ``path`` must have its base leaf's shape."""
    if tuple(x.shape) != tuple(base_leaf.shape):
        raise ValueError(
            f"shape mismatch at {path}: base has {tuple(base_leaf.shape)}, {what} has "
            f"{tuple(x.shape)}"
        )


def leaves_like(tree: Any, prepared: Prepared, what: str) -> list:
    """Flattens a params-shaped tree (Fisher, scores, curvatures) after checking it."""
    paths = prepared.paths
    out = []
    for path, b, x in zip(paths, prepared.base, aligned_leaves(tree, prepared, what), strict=True):
        if not is_array(x):
            raise TypeError(f"{what}{path} is a {type(x).__name__}, not an array")
        check_shape(x, b, path, what)
        float_dtype(x.dtype, path, what)
        out.append(as_array(x))
    check_finite([(f"{what}{path}", x) for path, x in zip(paths, out, strict=True)])
    return out


# A per-expert input's count name → its argument name and what to do when one is None.
_MISSING = {
    "statistics pytrees": (
        "statistics",
        "that expert has no UMTAM statistics (e.g. it was trained with AdamW): use a merge "
        "method that needs no statistics (e.g. ties or dare_ties), or train it with umtam",
    ),
    "Fisher pytrees": (
        "fishers",
        "compute that expert's Fisher (merging.diagonal_fisher), or use a merge method "
        "that needs none (e.g. task_arithmetic)",
    ),
    "curvature pytrees": (
        "curvatures",
        "give that expert's curvature (Adam's v, or its UMTAM statistics), or use a merge "
        "method that needs none (e.g. task_arithmetic)",
    ),
    "Gram pytrees": ("grams", "every expert needs Grams (merging.input_grams) when one has"),
}


def check_count(items: list[Any], n: int, what: str) -> None:
    """One per-expert input (``what``: e.g. ``"statistics pytrees"``) per expert, none of
    them ``None`` (for Grams: unless all are); the error names the missing one."""
    if len(items) != n:
        raise ValueError(f"got {len(items)} {what} for {n} experts (one per expert is needed)")
    name, hint = _MISSING.get(what, (what, "give one for every expert"))
    missing = [i for i, x in enumerate(items) if x is None]
    if missing and not (name == "grams" and len(missing) == n):
        raise ValueError(f"{name}[{missing[0]}] is None: {hint}")


def leaf_seed(path: str) -> np.uint32:
    """A stable 32-bit seed from a leaf path, so random masks depend on the leaf's name only
    (merging one leaf at a time gives the same result as merging the whole tree)."""
    return np.uint32(zlib.crc32(path.encode()))
