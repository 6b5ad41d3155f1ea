"""Tree assertions the tests share, built on chex for what chex's own lack.

Use chex directly where it fits: ``chex.assert_trees_all_close(got, want, rtol=, atol=)``
compares leaf by leaf like ``np.testing.assert_allclose(got, want)`` (tolerance relative to
``want``, NaN equal to NaN), ``chex.assert_trees_all_equal`` like
``np.testing.assert_array_equal`` (NaN equal, -0.0 equal to 0.0). Both require equal tree
structures and name the differing leaf, but ignore dtypes (bfloat16 is compared as
float32). The helpers below add, in the same style: a float64 comparison against a reference
keyed by leaf path (and nnx states against pure dicts), comparisons against mergekit's flat
name → tensor dicts, closeness or equality that also requires equal dtypes, bit-exact
equality, and a tolerance relative to each leaf's largest magnitude.
"""

from __future__ import annotations

from collections.abc import Mapping

import chex
import jax
import numpy as np


def _key(k):
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def leaves_by_path(tree) -> dict[tuple, object]:
    """Every leaf keyed by its path as a tuple of plain keys, e.g. ``("attn", "kernel")``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key(k) for k in path): leaf for path, leaf in flat}


def leaves_by_name(tree) -> dict[str, np.ndarray]:
    """Every leaf as a NumPy array keyed by ``jax.tree_util.keystr`` of its path, e.g.
    ``"['attn']['kernel']"``, in jax's flattening order: the flat name → tensor form."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _pure(tree):
    """An ``nnx.State`` as its pure dict; any other tree unchanged."""
    from flax import nnx

    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _is_by_path(tree) -> bool:
    return isinstance(tree, Mapping) and bool(tree) and all(isinstance(k, tuple) for k in tree)


def assert_tree_close(got, want, *, rtol: float, atol: float) -> None:
    """``got`` ≈ ``want`` leaf by leaf, both converted to float64, within
    ``atol + rtol * |want|``; NaN equals NaN. ``want`` is a tree of ``got``'s structure or a
    flat dict keyed by leaf path as :func:`leaves_by_path` names them (e.g. a float64 NumPy
    reference), with exactly ``got``'s leaves. ``nnx.State`` trees compare as pure dicts."""
    got, want = _pure(got), _pure(want)
    if _is_by_path(want):
        got = leaves_by_path(got)
    f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    chex.assert_trees_all_close(f64(got), f64(want), rtol=rtol, atol=atol)


def assert_close_by_name(got, want: Mapping[str, np.ndarray], *, rtol, atol, dtype) -> None:
    """The tree ``got`` against a flat name → tensor dict such as mergekit's output: the same
    names in the same order (:func:`leaves_by_name`), every leaf of ``got`` of ``dtype``, and
    values within ``atol + rtol * |want|``."""
    named = leaves_by_name(got)
    assert list(named) == list(want), f"leaf names {list(named)} != {list(want)}"
    wrong = {name: x.dtype for name, x in named.items() if x.dtype != dtype}
    assert not wrong, f"leaves not of dtype {np.dtype(dtype)}: {wrong}"
    chex.assert_trees_all_close(named, dict(want), rtol=rtol, atol=atol)


def assert_trees_equal(got, want) -> None:
    """Same structure, shapes and dtypes, and equal values as ``np.testing.assert_array_equal``
    sees them (NaN equals NaN, -0.0 equals 0.0)."""
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    chex.assert_trees_all_equal(got, want)


def assert_trees_close_typed(got, want, *, rtol: float, atol: float) -> None:
    """Same structure, shapes and dtypes, and values within ``atol + rtol * |want|`` (compared
    in their own dtypes, as ``chex.assert_trees_all_close`` does)."""
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


def _bits(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8).tobytes()


def _bits_differ(x: np.ndarray, y: np.ndarray) -> str:
    per_entry = lambda a: np.frombuffer(_bits(a), np.uint8).reshape(a.size, -1)  # noqa: E731
    bx, by = per_entry(x), per_entry(y)
    wrong = np.flatnonzero((bx != by).any(axis=1))
    i = wrong[0]
    at = tuple(int(j) for j in np.unravel_index(i, x.shape))
    return (
        f"{wrong.size} of {x.size} entries differ in bits, first at {at}: "
        f"{x[at]} (bytes {bx[i].tobytes().hex()}) != {y[at]} (bytes {by[i].tobytes().hex()})"
    )


def assert_trees_bitwise_equal(got, want) -> None:
    """Same structure (container types, ``None``, empty nodes included), shapes, dtypes and
    bit patterns (NaN payloads and the sign of zero count): what a lossless round trip keeps.
    A single array is a tree of one leaf."""
    to_np = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    got, want = to_np(got), to_np(want)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    chex.assert_trees_all_equal_comparator(
        lambda x, y: _bits(x) == _bits(y),
        _bits_differ,
        got,
        want,
    )


def assert_trees_close_to_scale(got, want, *, rtol: float) -> None:
    """Per leaf, ``max|got - want| <= rtol * max|want|`` (``max|want|`` taken as 1 when it is
    0): an error relative to the leaf's largest magnitude rather than entry by entry."""

    def error(x, y) -> float:
        scale = float(jax.numpy.max(jax.numpy.abs(y))) or 1.0
        return float(jax.numpy.max(jax.numpy.abs(x - y))) / scale

    chex.assert_trees_all_equal_comparator(
        lambda x, y: error(x, y) <= rtol,
        lambda x, y: f"relative error {error(x, y):.2e} > {rtol:.0e}",
        got,
        want,
    )
