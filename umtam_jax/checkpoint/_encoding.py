"""How a pytree is stored in a checkpoint: a JSON structure record plus nested dicts of
arrays.

Orbax stores nested dictionaries of arrays; ``None`` fields, ``optax.MaskedNode`` and the
NamedTuple / list / tuple containers are not stored by it faithfully. Every item is
therefore stored as a nested dictionary of its arrays (lists and tuples keyed ``"0"``,
``"1"``, ...; NamedTuples keyed by field name; ``None`` and ``MaskedNode`` omitted) and its
exact structure is recorded as JSON, from which it is rebuilt on restore. Orbax joins
nested names with ``.``, so stored names escape ``%``, ``.`` and ``/``: a key ``"a.b"`` and a
nested ``a → b`` stay two arrays. A ``flax.nnx`` Variable is stored as the array it wraps
(the layout of ``nnx.to_pure_dict``). A typed PRNG key array is stored as its key data,
its record naming the implementation (:mod:`umtam_jax.checkpoint._keys`).
"""

from __future__ import annotations

import dataclasses
import importlib
import urllib.parse
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from umtam_jax import _pytrees
from umtam_jax.checkpoint import _keys
from umtam_jax.optimizer import _state

# NamedTuple classes rebuilt by name when restoring without a target.
_KNOWN_NAMEDTUPLES = {
    f"{cls.__module__}:{cls.__qualname__}": cls
    for cls in (
        _state.FactoredStatistics,
        _state.DenseStatistics,
        _state.FactoredLeafState,
        _state.DenseLeafState,
        _state.ScaleByUmtamState,
    )
}
# Modules whose NamedTuples may be imported by name when restoring without a target.
_IMPORTABLE_PACKAGES = ("umtam_jax", "optax")


@dataclasses.dataclass
class Encoded:
    """A pytree split into a JSON structure spec and a nested dict of its arrays."""

    spec: dict[str, Any]
    arrays: dict[str, Any]  # nested dicts of arrays; empty subtrees omitted
    paths: list[tuple[str, ...]]  # array paths inside ``arrays``, in jax flatten order
    leaves: list[Any]  # the arrays, same order (a typed key's: its key data)
    # the paths of typed PRNG keys → their implementation's name
    keys: dict[tuple[str, ...], str] = dataclasses.field(default_factory=dict)


_VALUE_KEY = jax.tree_util.GetAttrKey("value")


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_array_leaf(x: Any) -> bool:
    return isinstance(
        x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct | bool | int | float | complex
    )


def _key_to_str(key: Any) -> tuple[str, str]:
    """Dictionary key → (its string, kind to rebuild it)."""
    if isinstance(key, str):
        return key, "s"
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return str(int(key)), "i"
    raise TypeError(f"unsupported dictionary key {key!r} ({type(key).__name__}); use str or int")


# Orbax joins nested names with "." (and "/" makes folders): a key "a.b" and a nested
# a → b would be the same array. Stored names escape those characters (and the escape).
_ESCAPES = str.maketrans({"%": "%25", ".": "%2E", "/": "%2F"})


def _stored_name(name: str) -> str:
    return name.translate(_ESCAPES)


def display_path(path: tuple[str, ...]) -> str:
    """A stored path as messages show it: the user's own key names (escapes undone),
    joined with ``/``."""
    return "/".join(urllib.parse.unquote(name) for name in path)


def _generic_key(key: Any) -> tuple[str, str]:
    """A jax key-path entry of a custom pytree node → (stored name, kind)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return _key_to_str(getattr(key, attr))
    return str(key), "s"


def leaf_spec(x: Any) -> dict[str, Any]:
    return {"t": "array", "shape": [int(d) for d in np.shape(x)], "dtype": str(dtype_of(x))}


def dtype_of(x: Any) -> Any:
    """The NumPy dtype of an array leaf; a dtype NumPy cannot represent (a JAX extended
    dtype such as a PRNG key's ``key<fry>``) is returned as it is, for the caller to store
    or refuse with its own message."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return np.asarray(x).dtype
    try:
        return np.dtype(dtype)
    except TypeError:
        return dtype


def _unstorable(dtype: Any) -> str | None:
    """Why arrays of ``dtype`` cannot be stored as they are, or None: numbers and booleans
    in the machine's byte order and of a width JAX and tensorstore know are."""
    try:
        numeric = jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)
    except TypeError:
        numeric = False
    if not numeric:
        return "only numeric and boolean arrays are stored"
    if isinstance(dtype, np.dtype) and not dtype.isnative:
        return "its byte order is not the machine's: store x.astype(x.dtype.newbyteorder('='))"
    if isinstance(dtype, np.dtype) and dtype.itemsize > (16 if dtype.kind == "c" else 8):
        return "JAX and Orbax have no such dtype: cast it to float64 or complex128"
    return None


def _as_saveable(x: Any) -> Any:
    if isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
        return x
    return np.asarray(x)  # Python / NumPy scalars: a fresh 0-d array, the input is untouched


def encode(tree: Any, what: str) -> Encoded:
    """Splits ``tree`` into a JSON structure spec and a nested dict of arrays."""
    paths: list[tuple[str, ...]] = []
    leaves: list[Any] = []
    key_impls: dict[tuple[str, ...], str] = {}  # typed keys' paths → implementations

    def children(entries, prefix, jax_path):
        """entries: (stored name, key kind, child, jax key entry) in jax flatten order."""
        spec_children, stored, seen = [], {}, set()
        for name, kind, child, key in entries:
            if name in seen:
                raise ValueError(
                    f"{what}: two children of {jax.tree_util.keystr(jax_path)} are stored "
                    f"under the same name {name!r}"
                )
            seen.add(name)
            safe = _stored_name(name)
            child_spec, child_arrays = walk(child, prefix + (safe,), jax_path + (key,))
            # [stored name, key kind, child spec(, original name when escaped)]
            spec_children.append([safe, kind, child_spec] + ([name] if safe != name else []))
            if not (isinstance(child_arrays, dict) and not child_arrays):
                stored[safe] = child_arrays
        return spec_children, stored

    def walk(x, prefix, jax_path):
        if _pytrees.is_variable(x):  # stored as its array, as nnx.to_pure_dict does
            return walk(_pytrees.variable_value(x), prefix, jax_path + (_VALUE_KEY,))
        if x is None:
            return {"t": "none"}, {}
        if isinstance(x, optax.MaskedNode):
            return {"t": "masked"}, {}
        if _is_namedtuple(x):
            cls = type(x)
            entries = [(f, "s", getattr(x, f), jax.tree_util.GetAttrKey(f)) for f in cls._fields]
            spec_children, stored = children(entries, prefix, jax_path)
            spec = {"t": "namedtuple", "cls": f"{cls.__module__}:{cls.__qualname__}"}
            spec["children"] = spec_children
            return spec, stored
        if type(x) is dict:
            try:
                keys = sorted(x)
            except TypeError:
                types = ", ".join(sorted({type(k).__name__ for k in x}))
                at = jax.tree_util.keystr(jax_path) or "the top level"
                raise TypeError(
                    f"{what}: the dict at {at} has keys that cannot be sorted (of types "
                    f"{types}): use keys of one type (all str or all int)"
                ) from None
            entries = [(*_key_to_str(k), x[k], jax.tree_util.DictKey(k)) for k in keys]
            spec_children, stored = children(entries, prefix, jax_path)
            return {"t": "dict", "children": spec_children}, stored
        if type(x) in (list, tuple):
            entries = [(str(i), "i", c, jax.tree_util.SequenceKey(i)) for i, c in enumerate(x)]
            spec_children, stored = children(entries, prefix, jax_path)
            return {"t": type(x).__name__, "children": spec_children}, stored
        if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x)):
            if not _is_array_leaf(x):
                raise TypeError(
                    f"{what}: leaf at {jax.tree_util.keystr(jax_path)} is a "
                    f"{type(x).__name__}, not an array or scalar"
                )
            node: dict[str, Any] | None = None  # a typed key's record around its data's
            if _keys.is_key(x):
                where = f"{what}: the PRNG key at {jax.tree_util.keystr(jax_path)}"
                impl, x = _keys.split(x, where)  # stored as its uint32 key data
                node = {"t": "key", "impl": impl}
                key_impls[prefix] = impl
            dtype = dtype_of(x)
            refusal = _unstorable(dtype)
            if refusal is not None:
                raise TypeError(
                    f"{what}: the array at {jax.tree_util.keystr(jax_path)} has dtype "
                    f"{dtype}; {refusal}"
                )
            if 0 in np.shape(x):
                raise ValueError(
                    f"{what}: the array at {jax.tree_util.keystr(jax_path)} is empty (shape "
                    f"{tuple(np.shape(x))}); Orbax cannot store empty arrays: leave it out "
                    "of the tree"
                )
            paths.append(prefix)
            leaves.append(_as_saveable(x))
            if node is not None:
                return {**node, "leaf": leaf_spec(x)}, leaves[-1]
            return leaf_spec(x), leaves[-1]
        # Any other registered pytree node (FrozenDict, nnx.State, dataclasses, ...): one
        # level of jax's own flattening; restored without a target as a plain dict.
        flat, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda c: c is not x)
        entries = [(*_generic_key(p[-1]), c, p[-1]) for p, c in flat]
        spec_children, stored = children(entries, prefix, jax_path)
        return {"t": "node", "type": type(x).__qualname__, "children": spec_children}, stored

    spec, arrays = walk(tree, (), ())
    if not isinstance(arrays, dict):  # the whole tree is one array
        arrays = {"value": arrays}
        paths[:] = [("value",)]
        spec = {"t": "root_array", "leaf": spec}
        key_impls = {("value",): key_impls[()]} if key_impls else {}  # a key as the tree
    return Encoded(spec=spec, arrays=arrays, paths=paths, leaves=leaves, keys=key_impls)


_CONTAINERS = ("dict", "list", "tuple", "namedtuple", "node")


def check_spec(spec: Any, at: str = "") -> None:
    """Raises ValueError, naming where, unless ``spec`` is a well-formed structure spec
    (what :func:`encode` writes): damaged metadata is refused before it is walked.

    Args:
      spec: a structure spec read back from JSON.
      at: where ``spec`` sits in the tree (for the message).
    """
    where = at or "the root"
    if not isinstance(spec, dict) or not isinstance(spec.get("t"), str):
        raise ValueError(f"the entry at {where} has no node type")
    t = spec["t"]
    if t == "root_array" and not at:
        check_spec(spec.get("leaf"), "value")
    elif t == "key":  # a typed PRNG key: its implementation's name and its data's record
        if not (isinstance(spec.get("impl"), str) and spec["impl"]):
            raise ValueError(f"the PRNG key at {where} names no PRNG implementation")
        check_spec(spec.get("leaf"), at)
        if spec["leaf"]["t"] != "array":
            raise ValueError(f"the data of the PRNG key at {where} is not an array")
    elif t == "array":
        shape, dtype = spec.get("shape"), spec.get("dtype")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"the array at {where} has no valid shape ({shape!r})")
        try:
            jax.numpy.dtype(dtype)
        except TypeError:
            raise ValueError(f"the array at {where} has no valid dtype ({dtype!r})") from None
    elif t in _CONTAINERS:
        children = spec.get("children")
        if not isinstance(children, list):
            raise ValueError(f"the {t} at {where} has no list of children")
        for entry in children:
            if not (
                isinstance(entry, list)
                and len(entry) in (3, 4)
                and all(isinstance(x, str) for x in (entry[0], entry[1], *entry[3:]))
            ):
                raise ValueError(f"a child of the {t} at {where} is malformed ({entry!r:.80})")
            check_spec(entry[2], f"{at}/{entry[0]}")
        if t == "namedtuple" and not isinstance(spec.get("cls"), str):
            raise ValueError(f"the namedtuple at {where} names no class")
    elif t not in ("none", "masked"):
        raise ValueError(f"the entry at {where} has an unknown node type {t!r}")


def _namedtuple_fields(cls: type, name: str, names: list[str], where: str) -> None:
    """Raises ValueError unless ``names`` (the stored children of a namedtuple node) can
    rebuild ``cls``: each at most once, none unknown, every field without a default
    present. A mismatch is a class changed since the save (a library upgrade) or edited
    metadata; it is reported when that item is rebuilt, so other items still read."""
    fields = getattr(cls, "_fields", None)
    if not (isinstance(fields, tuple) and all(isinstance(f, str) for f in fields)):
        raise ValueError(f"the namedtuple at {where} names {name}, which is not a NamedTuple")
    required = set(fields) - set(getattr(cls, "_field_defaults", {}))
    if len(set(names)) != len(names) or not set(fields) >= set(names) >= required:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(
            f"cannot rebuild the namedtuple at {where} as {name}: the checkpoint records the "
            f"fields ({shown:.200}), the class has ({', '.join(fields)}) (the class changed "
            "since the save, or the metadata was edited)"
        )


def _spec_leaves(spec: dict[str, Any], prefix: tuple[str, ...] = ()):
    """Yields (path, node) of every array and PRNG key node, in flatten order."""
    t = spec["t"]
    if t == "root_array":
        yield from _spec_leaves(spec["leaf"], ("value",))
    elif t in ("array", "key"):
        yield prefix, spec
    elif t in _CONTAINERS:
        for name, _, child, *_ in spec["children"]:
            yield from _spec_leaves(child, prefix + (name,))


def spec_arrays(spec: dict[str, Any], prefix: tuple[str, ...] = ()):
    """Yields (path, leaf spec) of every stored array of a structure spec, in flatten
    order; a typed PRNG key's is that of its stored key data."""
    for path, node in _spec_leaves(spec, prefix):
        yield path, node["leaf"] if node["t"] == "key" else node


def spec_keys(spec: dict[str, Any]) -> dict[tuple[str, ...], str]:
    """The stored paths of a structure spec's typed PRNG keys → their implementations."""
    return {path: node["impl"] for path, node in _spec_leaves(spec) if node["t"] == "key"}


def _namedtuple_class(name: str) -> type | None:
    if name in _KNOWN_NAMEDTUPLES:
        return _KNOWN_NAMEDTUPLES[name]
    if name == f"{optax.MaskedNode.__module__}:{optax.MaskedNode.__qualname__}":
        return optax.MaskedNode
    module, _, qualname = name.partition(":")
    if module.split(".")[0] not in _IMPORTABLE_PACKAGES:
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, tuple) else None


def decode(spec: dict[str, Any], arrays: Any) -> Any:
    """Rebuilds a pytree from its structure spec and the restored nested dict of arrays."""

    def key(name, kind):
        return int(name) if kind == "i" else name

    def walk(s, a, at=""):
        t = s["t"]
        if t == "none":
            return None
        if t == "masked":
            return optax.MaskedNode()
        if t == "array":
            return a
        if t == "key":
            return _keys.wrap(a, s["impl"])
        a = a if isinstance(a, Mapping) else {}
        values = [  # entry: stored name, kind, child spec(, original name)
            (e[3] if len(e) > 3 else e[0], e[1], walk(e[2], a.get(e[0], {}), f"{at}/{e[0]}"))
            for e in s["children"]
        ]
        if t == "list":
            return [v for _, _, v in values]
        if t == "tuple":
            return tuple(v for _, _, v in values)
        if t == "namedtuple":
            cls = _namedtuple_class(s["cls"])
            if cls is not None:
                names = [name for name, _, _ in values]
                _namedtuple_fields(cls, s["cls"], names, at or "the root")
                return cls(**{name: v for name, _, v in values})
        return {key(name, kind): v for name, kind, v in values}  # dict, node, unknown tuple

    if spec["t"] == "root_array":
        return walk(spec["leaf"], arrays["value"])
    return walk(spec, arrays)


def nested_set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def nested_get(tree: Any, path: tuple[Any, ...]) -> Any:
    """The node of ``tree`` at ``path`` (keys of mappings, positions of lists)."""
    for name in path:
        tree = tree[name]
    return tree
