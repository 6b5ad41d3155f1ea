"""Safetensors tensor names and the pytrees they address: ``"a.b.c"`` is ``tree["a"]["b"]["c"]``.

:func:`names_from_tree` flattens a pytree into its tensor names (as Hugging Face models
name their weights), :func:`tree_from_names` nests a ``{name: leaf}`` mapping back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from umtam_jax import _pytrees


def split_name(name: str) -> tuple[str, ...]:
    keys = tuple(name.split(".")) if isinstance(name, str) else ("",)
    if "" in keys:
        raise ValueError(f"tensor name {name!r} is not a string of non-empty, dot-separated keys")
    return keys


def tree_from_names(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Nests ``{tensor name: leaf}`` into dicts split on ``"."``.

    Args:
      mapping: tensor names to leaves (arrays, ``jax.ShapeDtypeStruct``, ...).

    Returns:
      Nested dicts with string keys; :func:`names_from_tree` inverts it.

    Raises:
      ValueError: an empty component, or a name that is also the prefix of another.

    Example:
      >>> from umtam_jax.checkpoint import tree_from_names
      >>> tree_from_names({"a.b": 1, "a.c": 2})
      {'a': {'b': 1, 'c': 2}}
    """
    tree: dict[str, Any] = {}
    for name, value in mapping.items():
        keys, node = split_name(name), tree
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                prefix = ".".join(keys[: i + 1])
                raise ValueError(f"tensor {prefix!r} is also the prefix of tensor {name!r}")
        if isinstance(node.get(keys[-1]), dict):
            other = next(iter(names_from_tree(node[keys[-1]])))
            raise ValueError(f"tensor {name!r} is also the prefix of tensor '{name}.{other}'")
        node[keys[-1]] = value
    return tree


def component(key: Any) -> str:
    """A jax key path entry as a name component (dict key, sequence index, attribute)."""
    return str(next((getattr(key, a) for a in ("key", "idx", "name") if hasattr(key, a)), key))


def names_from_tree(tree: Any) -> dict[str, Any]:
    """Flattens a pytree into ``{tensor name: leaf}``, in ``jax.tree.leaves`` order.

    Args:
      tree: a pytree; dict keys become ``str(key)``, sequence indices ``str(index)`` and
        attributes their names; a ``flax.nnx`` Variable is named and given as the array it
        wraps (the layout of ``nnx.to_pure_dict``).

    Returns:
      The dot-joined key path of each leaf, mapped to the leaf.

    Raises:
      ValueError: a key that is empty or contains ``"."`` (naming its path), or a name that
        is also the prefix of another.

    Example:
      >>> from umtam_jax.checkpoint import names_from_tree
      >>> names_from_tree({"a": {"b": 1}, "c": [2]})
      {'a.b': 1, 'c.0': 2}
    """
    names: dict[str, Any] = {}
    for path, leaf in _pytrees.flatten_with_variables(tree)[0]:
        leaf = _pytrees.unwrap(leaf)  # an nnx Variable is named as its array (to_pure_dict)
        keys = [component(k) for k in path]
        if not keys or any(k == "" or "." in k for k in keys):
            where = jax.tree_util.keystr(path) or "the root"
            raise ValueError(f"the leaf at {where} has no tensor name (empty key or '.' in it)")
        if (name := ".".join(keys)) in names:
            raise ValueError(f"two leaves are named {name!r}")
        names[name] = leaf
    tree_from_names(names)  # refuses a name that is also a prefix
    return names
