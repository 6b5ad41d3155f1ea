"""Pytree helpers shared by the optimizer, checkpoint and merging modules: ``flax.nnx``
Variables, and the names in key paths.

``nnx.state(model, nnx.Param)`` holds ``nnx.Variable`` nodes, each wrapping one array
under the key ``.value``; an optimizer state built by ``nnx.Optimizer`` holds plain arrays
at the same paths without it. Checkpoints store a Variable as its array (the layout of
``nnx.to_pure_dict``), and merges match statistics to a Variable's path, so both kinds of
tree line up.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax
import optax


def is_variable(x: Any) -> bool:
    """True for a ``flax.nnx.Variable`` (never imports Flax: without ``flax.nnx`` loaded
    there can be no Variable)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def variable_value(x: Any) -> Any:
    """The array a ``flax.nnx.Variable`` wraps."""
    return x.get_value() if hasattr(x, "get_value") else x.value


def unwrap(x: Any) -> Any:
    """``x``'s array if it is a ``flax.nnx.Variable``, else ``x`` itself."""
    return variable_value(x) if is_variable(x) else x


def is_array_variable(x: Any) -> bool:
    """A ``flax.nnx`` Variable holding an array: not one that ``optax.masked`` or
    ``optax.multi_transform`` emptied (``Param(MaskedNode())``), which has no leaf."""
    return is_variable(x) and not isinstance(unwrap(x), optax.MaskedNode)


def flatten_with_variables(tree: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """``tree_flatten_with_path`` with ``flax.nnx`` Variables holding arrays as leaves
    (their paths end at the Variable, as those of the arrays ``nnx.Optimizer`` passes to
    an optimizer's ``update``)."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_array_variable)


def is_none_or_variable(x: Any) -> bool:
    """A leaf test for trees that hold ``None`` (a leaf without a value, e.g. a bias's
    Gram) and Variables: both count as leaves."""
    return x is None or is_variable(x)


def key_name(entry: Any) -> Any:
    """The name or index a key-path entry stands for (``DictKey.key``, ``GetAttrKey.name``,
    ``SequenceKey.idx``); anything else as it is."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def check_no_flax_objects(trees: Mapping[str, Any]) -> None:
    """Raises TypeError naming where a tree to save (or a restore's target) holds a Flax
    NNX Module or Optimizer, not its state (checkpoints hold pytrees of arrays). Never
    imports Flax: without ``flax.nnx`` loaded there is none.

    Args:
      trees: name -> tree, the names used in the message (``params``, ``target``).
    """
    nnx = sys.modules.get("flax.nnx")
    graph = getattr(nnx, "Pytree", None) or getattr(nnx, "Object", None)
    if graph is None:
        return
    for name, tree in trees.items():
        try:
            found, _ = jax.tree_util.tree_flatten_with_path(
                tree, is_leaf=lambda x: isinstance(x, graph)
            )
        except (TypeError, ValueError):  # unsortable keys...: left to the encoding's message
            continue
        for path, x in found:
            if not isinstance(x, graph):
                continue
            give = (  # as the README's checkpoint section says
                "optimizer.opt_state (save_checkpoint's opt_state, restore_opt_state's target)"
                if isinstance(x, getattr(nnx, "Optimizer", ()))
                else "nnx.state(model, nnx.Param) (save_checkpoint's params, restore_params' "
                "target; nnx.update(model, restored) puts them back)"
            )
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} is a Flax NNX {type(x).__name__} object, "
                f"not a pytree of arrays: pass {give}"
            )
