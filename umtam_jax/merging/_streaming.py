"""Out-of-core merging: merge Orbax checkpoints leaf by leaf (issue 6, part 3).

:func:`merge_checkpoints` never holds K + 1 models. It reads a small group of leaves at a
time from the base, the experts (and their statistics or Fisher checkpoints) with Orbax's
partial restore (:class:`umtam_jax.checkpoint.CheckpointReader`), merges each leaf by
calling the ordinary in-memory method on single-leaf trees, and hands the merged leaf to
an Orbax save that writes the output one array at a time
(:func:`umtam_jax.checkpoint.save_params_streaming`). Peak host memory is therefore a few
leaves of each input plus one output leaf, whatever the model size.

Semantics are those of the in-memory functions, exactly:

- Before anything is read, the whole merge is validated on the checkpoints' metadata
  with ``jax.eval_shape`` of the in-memory call on abstract trees: the same checks
  (structures, shapes, dtypes, statistics, options) and the same error messages, naming
  the leaf path.
- Single-leaf trees keep the leaf's full key path (a chain of one-child pytree nodes
  with the original key entries), so path-dependent behaviour (DARE's per-leaf PRNG keys)
  is unchanged.
- ``scope="global"`` (``ties``, ``umtam``, ``prune``) keeps exactly
  ``max(1, int(density · N))`` entries over the whole expert with the in-memory tie rule
  (equal scores go to the lower flat index of the concatenation, in flattening order).
  The k-th largest score is found exactly by a two-pass radix select over the scores'
  order-preserving integer keys (as in ``_select``): pass 1 accumulates a histogram of
  the top 16 key bits over all leaves, which fixes the threshold's top bits; pass 2 a
  histogram of the next 16 bits among keys with that prefix (float64 scores need four
  passes). The final pass keeps every key above the threshold and, in flattening order,
  the first ``k − count(key > threshold)`` keys equal to it, then calls the same jitted
  per-leaf kernels as the in-memory function. Each pass re-reads the inputs it needs.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from umtam_jax.merging import _baselines as B
from umtam_jax.merging import _fisher as F
from umtam_jax.merging import _umtam as U
from umtam_jax.merging import _validation as V
from umtam_jax.merging._select import DIGIT_BITS as _DIGIT_BITS
from umtam_jax.merging._select import _sortable_keys, keep_count

__all__ = ["merge_checkpoints", "validate_merge_checkpoints"]


class _LazyCheckpointModule:
    """A module of ``umtam_jax.checkpoint``, imported on first use (Orbax is slow to
    import and ``umtam_jax.merging`` does not need it otherwise)."""

    def __init__(self, name: str):
        self._name = f"umtam_jax.checkpoint.{name}"

    def __getattr__(self, name: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), name)


C = _LazyCheckpointModule("_checkpoint")
E = _LazyCheckpointModule("_encoding")

# Default size of the groups of leaves read together (bytes of the base's leaves).
DEFAULT_GROUP_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class _Method:
    fn: Callable[..., Any]
    inputs: str | None = None  # "statistics", "fishers", "scores" (prune) or None
    single_expert: bool = False
    global_scope: bool = False  # supports scope="global"


METHODS: dict[str, _Method] = {
    "umtam": _Method(U.umtam, "statistics", global_scope=True),
    "task_arithmetic": _Method(B.task_arithmetic),
    "ties": _Method(B.ties, global_scope=True),
    "dare": _Method(B.dare),
    "dare_ties": _Method(B.dare_ties),
    "fisher": _Method(F.fisher, "fishers"),
    "ota": _Method(B.ota, "statistics"),
    "prune": _Method(B.prune, "scores", single_expert=True, global_scope=True),
}


# --------------------------------------------------------------------------- single leaves


@jax.tree_util.register_pytree_with_keys_class
class _PathNode:
    """A pytree node with one child under a given key entry (DictKey, SequenceKey, ...).

    A chain of these rebuilds a leaf's exact key path around the leaf alone, so
    ``keystr`` paths (and hence error messages and DARE's per-leaf keys) are unchanged.
    """

    def __init__(self, key: Any, child: Any):
        self.key = key
        self.child = child

    def tree_flatten_with_keys(self):
        return ((self.key, self.child),), self.key

    @classmethod
    def tree_unflatten(cls, key, children):
        return cls(key, children[0])


def _wrap(keypath: tuple[Any, ...], leaf: Any) -> Any:
    for key in reversed(keypath):
        leaf = _PathNode(key, leaf)
    return leaf


def _call(method: _Method, base: Any, experts: list[Any], extra: list[Any] | None, kwargs):
    if method.single_expert:
        return method.fn(base, experts[0], None if extra is None else extra[0], **kwargs)
    if method.inputs is None:
        return method.fn(base, experts, **kwargs)
    return method.fn(base, experts, extra, **kwargs)


# --------------------------------------------------------------------------- inputs


def _subspec(spec: dict[str, Any], path: tuple[str, ...], what: str) -> dict[str, Any]:
    """The structure record at stored ``path`` inside ``spec``."""
    for name in path:
        children = {c[0]: c[2] for c in spec.get("children", [])}
        if name not in children:
            raise ValueError(f"{what} has no entry {'/'.join(path)}")
        spec = children[name]
    return spec


@dataclasses.dataclass
class _Leaf:
    keypath: tuple[Any, ...]
    stored: tuple[str, ...]  # stored path inside the params item
    shape: tuple[int, ...]
    dtype: np.dtype  # of the merged output (canonical)
    nbytes: int


def _open(path: Any, what: str) -> Any:
    from umtam_jax.checkpoint._streaming import CheckpointReader

    try:
        return CheckpointReader(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"cannot read {what} checkpoint {path}: {err}") from None


class _Job:
    """A validated merge: readers, abstract trees, leaf table."""

    def __init__(
        self,
        method: str,
        base_dir: Any,
        expert_dirs: Sequence[Any],
        *,
        statistics: bool | None,
        fisher_dirs: Sequence[Any] | None,
        kwargs: dict[str, Any],
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.name = method
        self.method = m = METHODS[method]
        if isinstance(expert_dirs, str | bytes | os.PathLike) or not isinstance(
            expert_dirs, Sequence
        ):
            raise TypeError("expert_dirs must be a sequence of checkpoint directories")
        expert_dirs = list(expert_dirs)
        if not expert_dirs:
            raise ValueError("expert_dirs is empty: at least one expert is required")
        if m.single_expert and len(expert_dirs) != 1:
            raise ValueError(f"method {method!r} takes exactly one expert, got {len(expert_dirs)}")
        if "scores" in kwargs:
            raise TypeError(
                "pass statistics=True (saliency scores) or statistics=False (magnitude) "
                "instead of scores"
            )
        if statistics is None:
            statistics = m.inputs in ("statistics", "scores")
        if statistics and m.inputs not in ("statistics", "scores"):
            raise ValueError(f"method {method!r} takes no statistics")
        if not statistics and m.inputs == "statistics":
            raise ValueError(f"method {method!r} needs the experts' UMTAM statistics")
        if m.inputs == "fishers":
            if fisher_dirs is None:
                raise ValueError("method 'fisher' needs fisher_dirs, one per expert")
            fisher_dirs = list(fisher_dirs)
            if len(fisher_dirs) != len(expert_dirs):
                raise ValueError(
                    f"got {len(fisher_dirs)} fisher_dirs for {len(expert_dirs)} experts"
                )
        elif fisher_dirs is not None:
            raise ValueError(f"method {method!r} takes no fisher_dirs")
        self.kwargs = dict(kwargs)
        self.statistics = bool(statistics)

        self.base = _open(base_dir, "the base")
        self.experts = [_open(d, f"expert {i}'s") for i, d in enumerate(expert_dirs)]
        self.fishers = (
            [_open(d, f"expert {i}'s Fisher") for i, d in enumerate(fisher_dirs)]
            if fisher_dirs is not None
            else None
        )
        if self.statistics:
            for i, r in enumerate(self.experts):
                if not r.has_item(C.STATISTICS):
                    raise ValueError(
                        f"method {method!r} needs UMTAM statistics, but the checkpoint of "
                        f"expert {i} ({r.directory}) has none"
                    )

        # Validation: the in-memory call on abstract trees (same checks, same messages).
        base_abs = self.base.abstract(C.PARAMS)
        experts_abs = [r.abstract(C.PARAMS) for r in self.experts]
        extra_abs = None
        if self.statistics:
            extra_abs = [r.abstract(C.STATISTICS) for r in self.experts]
        elif self.fishers is not None:
            extra_abs = [r.abstract(C.PARAMS) for r in self.fishers]
        self.output = jax.eval_shape(
            lambda b, e, x: _call(m, b, e, x, self.kwargs), base_abs, experts_abs, extra_abs
        )

        # Leaf table: jax flattening order of the (decoded) base, with stored paths.
        spec = self.base.structure(C.PARAMS)
        stored = [path for path, _ in E.spec_arrays(spec)]
        index_tree: dict[str, Any] = {}
        for i, path in enumerate(stored):
            E.nested_set(index_tree, path, i)
        skeleton = E.decode(spec, index_tree)
        out_leaves = jax.tree.leaves(self.output)
        self.leaves = []
        for (keypath, i), out in zip(
            jax.tree_util.tree_flatten_with_path(skeleton)[0], out_leaves, strict=True
        ):
            dtype = np.dtype(out.dtype)
            n = int(np.prod(out.shape, dtype=np.int64))
            self.leaves.append(
                _Leaf(tuple(keypath), stored[i], tuple(out.shape), dtype, n * dtype.itemsize)
            )
        self.stats_specs = (
            [r.structure(C.STATISTICS) for r in self.experts] if self.statistics else None
        )
        # A bare-array params tree is stored under "value"; its statistics node is the root.
        self.root_array = spec["t"] == "root_array"
        self.scope = self.kwargs.get("scope", "tensor")

    # ---------------------------------------------------------------- reading

    def groups(self, group_bytes: int) -> list[list[int]]:
        out, current, size = [], [], 0
        for j, leaf in enumerate(self.leaves):
            if current and size + leaf.nbytes > group_bytes:
                out.append(current)
                current, size = [], 0
            current.append(j)
            size += leaf.nbytes
        if current:
            out.append(current)
        return out

    def read(self, group: list[int], *, base=True, experts=None, extra=True) -> dict[str, Any]:
        """Restores the group's leaves: base, experts (indices), statistics / Fishers."""
        experts = range(len(self.experts)) if experts is None else experts
        paths = [self.leaves[j].stored for j in group]
        out: dict[str, Any] = {}
        if base:
            out["base"] = _to_jax(self.base.restore_arrays(C.PARAMS, paths))
        out["experts"] = {
            t: _to_jax(self.experts[t].restore_arrays(C.PARAMS, paths)) for t in experts
        }
        if extra and self.statistics:
            out["extra"] = {t: self._read_nodes(t, paths) for t in experts}
        elif extra and self.fishers is not None:
            out["extra"] = {
                t: _to_jax(self.fishers[t].restore_arrays(C.PARAMS, paths)) for t in experts
            }
        return out

    def _read_nodes(self, t: int, paths: list[tuple[str, ...]]) -> list[Any]:
        what = f"the statistics of expert {t} ({self.experts[t].directory})"
        if self.root_array:
            paths = [()]
        node_specs = [_subspec(self.stats_specs[t], p, what) for p in paths]
        full = [
            [p + sub for sub, _ in E.spec_arrays(ns)] if ns["t"] != "array" else [p]
            for p, ns in zip(paths, node_specs, strict=True)
        ]
        flat = _to_jax(self.experts[t].restore_arrays(C.STATISTICS, [q for f in full for q in f]))
        nodes, start = [], 0
        for p, ns, f in zip(paths, node_specs, full, strict=True):
            if ns["t"] == "array":
                nodes.append(flat[start])
            else:
                arrays: dict[str, Any] = {}
                for q, a in zip(f, flat[start : start + len(f)], strict=True):
                    E.nested_set(arrays, q[len(p) :], a)
                nodes.append(E.decode(ns, arrays))
            start += len(f)
        return nodes

    # ---------------------------------------------------------------- merging

    def merge_leaf(self, j: int, data: dict[str, Any], pos: int) -> np.ndarray:
        """The in-memory method on leaf ``j`` alone (``pos``: its index in the group)."""
        kp = self.leaves[j].keypath
        base = _wrap(kp, data["base"][pos])
        experts = [_wrap(kp, data["experts"][t][pos]) for t in range(len(self.experts))]
        extra = None
        if "extra" in data:
            extra = [_wrap(kp, data["extra"][t][pos]) for t in range(len(self.experts))]
        merged = _call(self.method, base, experts, extra, self.kwargs)
        return np.asarray(jax.tree.leaves(merged)[0])


def _to_jax(arrays: list[np.ndarray]) -> list[jax.Array]:
    """Moves restored NumPy arrays into JAX buffers, dropping each NumPy copy at once.

    The merging functions convert their inputs with ``jnp.asarray`` anyway (a copy: Orbax's
    host arrays are not aligned for zero-copy); converting here, as soon as a checkpoint's
    arrays are read, keeps one copy of the inputs alive instead of two.
    """
    out = []
    while arrays:
        out.append(jnp.asarray(arrays.pop(0)))
    return out


_LIBC: Any = None


def _release_free_memory() -> None:
    """Returns freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Leaves of a few MB are below glibc's dynamic mmap threshold, so their buffers come from
    the heap arenas of the threads that touch them (XLA, TensorStore, Orbax's writer), and
    freed chunks stay in the resident set: without trimming, RSS creeps up by a leaf or
    two per leaf merged.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


# --------------------------------------------------------------------------- global scope


def _option(fn: Callable[..., Any], kwargs: Mapping[str, Any], name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return inspect.signature(fn).parameters[name].default


@jax.jit
def _keys_jit(scores: jax.Array, like: jax.Array) -> jax.Array:
    # As in _select.global_masks: cast to the common dtype, then order-preserving keys.
    return _sortable_keys(scores.reshape(-1).astype(like.dtype))[0]


_CHUNK = 1 << 22  # entries per slice in the NumPy histogram and mask steps


def _histogram(keys: np.ndarray, shift: int, prefix: int | None) -> np.ndarray:
    """Counts of the 16-bit digit ``(key >> shift) & 0xFFFF`` over the keys whose higher
    bits equal ``prefix`` (all keys when ``prefix`` is None), in bounded-size slices."""
    size = 2**_DIGIT_BITS
    counts = np.zeros(size, np.int64)
    utype = keys.dtype.type
    for start in range(0, keys.size, _CHUNK):
        part = keys[start : start + _CHUNK]
        if prefix is not None:
            part = part[(part >> utype(shift + _DIGIT_BITS)) == utype(prefix)]
        digits = ((part >> utype(shift)) & utype(size - 1)).astype(np.int32)
        counts += np.bincount(digits, minlength=size)
    return counts


def _leaf_mask(keys: np.ndarray, threshold: int, take_at_most: int) -> tuple[np.ndarray, int]:
    """``key > threshold`` plus the first ``take_at_most`` keys equal to it (flat order).

    Returns the mask and how many equal keys it took.
    """
    t = keys.dtype.type(threshold)
    mask = keys > t
    equal = keys == t
    n_equal = int(np.count_nonzero(equal))
    take = min(take_at_most, n_equal)
    if take == n_equal:
        mask |= equal
    elif take > 0:
        seen = 0
        for start in range(0, keys.size, _CHUNK):
            part = equal[start : start + _CHUNK]
            c = int(np.count_nonzero(part))
            if seen + c >= take:
                stop = start + int(np.flatnonzero(part)[take - seen - 1]) + 1
                mask[:stop] |= equal[:stop]
                break
            seen += c
    return mask, take


class _GlobalSelect:
    """Exact global top-k masks, computed over several passes through the inputs."""

    def __init__(self, job: _Job):
        self.job = job
        m, kw = job.method, job.kwargs
        k = len(job.experts)
        densities = V.check_densities(_option(m.fn, kw, "density"), k)
        self.densities = densities
        total = sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in job.leaves)
        self.keep = [keep_count(total, d) for d in densities]
        self.everything = [kt >= total for kt in self.keep]
        # Common score dtype: the compute dtype of every leaf (float32, or float64).
        dtype = jnp.result_type(
            *[jnp.promote_types(leaf.dtype, jnp.float32) for leaf in job.leaves]
        )
        self.like = jnp.zeros((), dtype)
        self.nbits = 64 if dtype == jnp.float64 else 32
        self.threshold = [0] * k
        self.need = list(self.keep)
        self.remaining = list(self.keep)  # equal-to-threshold entries still to take

    def _prepare(self, j: int, data: dict[str, Any], pos: int, experts: list[int]):
        kp = self.job.leaves[j].keypath
        base = _wrap(kp, data["base"][pos])
        return V.prepare(base, [_wrap(kp, data["experts"][t][pos]) for t in experts])

    def score(self, j: int, data: dict[str, Any], pos: int, prepared, i: int, t: int):
        """Expert ``t``'s scores on leaf ``j``, exactly as the in-memory function computes
        them (``i``: the expert's position in ``prepared``)."""
        job, name = self.job, self.job.name
        b, w = prepared.base[0], prepared.experts[i][0]
        if name == "ties" or (name == "prune" and not job.statistics):
            return B._abs_delta(b, w)
        kp = job.leaves[j].keypath
        node = V.statistics_leaves(_wrap(kp, data["extra"][t][pos]), prepared, f"statistics[{t}]")[
            0
        ]
        if name == "prune":
            pruning = True
        else:
            pruning = _option(job.method.fn, job.kwargs, "curvature_pruning")
        return U._importance(b, w, node, pruning)

    def keys(self, scores: jax.Array) -> np.ndarray:
        return np.asarray(_keys_jit(scores, self.like))

    def active(self) -> list[int]:
        return [t for t, e in enumerate(self.everything) if not e]

    def run_passes(self, group_bytes: int, progress: bool) -> None:
        """Finds each expert's threshold key and the count of equal keys to keep."""
        from tqdm.auto import tqdm

        active = self.active()
        if not active:
            return
        passes = self.nbits // _DIGIT_BITS
        prefix = dict.fromkeys(active, 0)
        groups = self.job.groups(group_bytes)
        for p in range(passes):
            shift = self.nbits - _DIGIT_BITS * (p + 1)
            hist = {t: np.zeros(2**_DIGIT_BITS, np.int64) for t in active}
            bar = tqdm(
                total=len(self.job.leaves),
                desc=f"{self.job.name} global threshold, pass {p + 1}/{passes}",
                unit="leaf",
                disable=not progress,
            )
            with bar:
                for group in groups:
                    data = None
                    _release_free_memory()
                    data = self.job.read(group, experts=active, extra=self.job.statistics)
                    for pos, j in enumerate(group):
                        prepared = self._prepare(j, data, pos, active)
                        for i, t in enumerate(active):
                            keys = self.keys(self.score(j, data, pos, prepared, i, t))
                            hist[t] += _histogram(keys, shift, prefix[t] if p > 0 else None)
                            del keys
                        del prepared
                        bar.update(1)
            for t in active:
                # Largest digit d with count(digit >= d) >= need: the k-th largest's digit.
                above = np.cumsum(hist[t][::-1])  # above[i] = count(digit >= 65535 - i)
                i = int(np.searchsorted(above, self.need[t]))
                d = 2**_DIGIT_BITS - 1 - i
                self.need[t] -= int(above[i - 1]) if i > 0 else 0
                prefix[t] = (prefix[t] << _DIGIT_BITS) | d
        for t in active:
            self.threshold[t] = prefix[t]
            self.remaining[t] = self.need[t]

    def mask(self, j: int, t: int, scores: jax.Array) -> jax.Array:
        """Expert ``t``'s keep mask on leaf ``j`` (leaves visited in flattening order)."""
        shape = self.job.leaves[j].shape
        if self.everything[t]:
            return jnp.ones(shape, bool)
        mask, took = _leaf_mask(self.keys(scores), self.threshold[t], self.remaining[t])
        self.remaining[t] -= took
        return jnp.asarray(mask.reshape(shape))

    def merge_leaf(self, j: int, data: dict[str, Any], pos: int) -> np.ndarray:
        job, fn, kw = self.job, self.job.method.fn, self.job.kwargs
        k = len(job.experts)
        prepared = self._prepare(j, data, pos, list(range(k)))
        b = prepared.base[0]
        ws = [prepared.experts[t][0] for t in range(k)]
        if job.name == "prune":
            scores = self.score(j, data, pos, prepared, 0, 0)
            return np.asarray(B._select(self.mask(j, 0, scores), ws[0], b))
        if job.name == "ties":
            masks = [self.mask(j, t, self.score(j, data, pos, prepared, t, t)) for t in range(k)]
            weights = V.check_weights(_option(fn, kw, "weights"), k)
            out = B._gta(
                b,
                ws,
                masks,
                weights,
                _option(fn, kw, "scaling"),
                self.densities,
                rescale=B._NO_RESCALE,
                consensus=True,
                normalize=True,
            )
            return np.asarray(out)
        # umtam: the importances are needed again by the sign election.
        kp = job.leaves[j].keypath
        imps = [self.score(j, data, pos, prepared, t, t) for t in range(k)]
        masks = [self.mask(j, t, imps[t]) for t in range(k)]
        nodes = [
            V.statistics_leaves(_wrap(kp, data["extra"][t][pos]), prepared, f"statistics[{t}]")[0]
            for t in range(k)
        ]
        out = U._combine(
            b,
            ws,
            imps,
            masks,
            nodes,
            _option(fn, kw, "scaling"),
            _option(fn, kw, "lambda_momentum"),
            _option(fn, kw, "lambda_curvature"),
            bool(_option(fn, kw, "sign_election")),
            bool(_option(fn, kw, "curvature_aggregation")),
            _option(fn, kw, "normalize") == "all",
        )
        return np.asarray(out)


# --------------------------------------------------------------------------- entry points


def validate_merge_checkpoints(
    method: str,
    base_dir: str | os.PathLike,
    expert_dirs: Sequence[str | os.PathLike],
    *,
    statistics: bool | None = None,
    fisher_dirs: Sequence[str | os.PathLike] | None = None,
    **method_kwargs: Any,
) -> Any:
    """Checks a :func:`merge_checkpoints` call from the checkpoints' metadata alone.

    Reads no arrays: the merge is validated with ``jax.eval_shape`` of the in-memory
    method on the checkpoints' abstract trees.

    Returns:
      The merged parameters' abstract pytree (``jax.ShapeDtypeStruct`` leaves).

    Raises:
      FileNotFoundError, ValueError, TypeError: as :func:`merge_checkpoints`.
    """
    job = _Job(
        method,
        base_dir,
        expert_dirs,
        statistics=statistics,
        fisher_dirs=fisher_dirs,
        kwargs=method_kwargs,
    )
    return job.output


def merge_checkpoints(
    method: str,
    base_dir: str | os.PathLike,
    expert_dirs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    statistics: bool | None = None,
    fisher_dirs: Sequence[str | os.PathLike] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    **method_kwargs: Any,
) -> epath.Path:
    """Merges checkpoints leaf by leaf, out of core, into a new checkpoint.

    Equivalent to restoring the base and experts with
    :func:`umtam_jax.checkpoint.restore_params` (and the statistics with
    ``restore_statistics``), calling the merging function ``method`` and saving the result
    with :func:`~umtam_jax.checkpoint.save_checkpoint` — the same merged values, bit for
    bit — but with peak host memory of about one group of leaves per input plus one output
    leaf, instead of K + 1 models. ``scope="global"`` costs extra passes over the inputs
    (three reads for float32 scores).

    Args:
      method: ``"umtam"``, ``"task_arithmetic"``, ``"ties"``, ``"dare"``, ``"dare_ties"``,
        ``"fisher"``, ``"ota"`` or ``"prune"``.
      base_dir: the base checkpoint (its ``params``).
      expert_dirs: the experts' checkpoints (exactly one for ``prune``).
      output_dir: the checkpoint to create (params only; restorable with
        ``restore_params``). Written atomically.
      statistics: use the experts' UMTAM statistics. Default: yes for ``umtam`` and
        ``ota`` (required) and ``prune`` (saliency scores; ``False`` prunes by magnitude
        ``|w − w0|``); other methods take none.
      fisher_dirs: for ``fisher``, one checkpoint per expert whose params hold its
        diagonal Fisher.
      overwrite: replace an existing umtam_jax checkpoint at ``output_dir`` (nothing
        else is ever replaced).
      progress: show progress bars over the leaves (one per pass).
      metadata: JSON-serialisable metadata stored with the output (``metadata["user"]``);
        default: a record of the merge (method, inputs, JSON-serialisable options).
      group_bytes: leaves are read in consecutive groups of about this many bytes (of the
        base; at least one leaf per group). Larger groups mean fewer Orbax calls.
      **method_kwargs: keyword arguments of the merging function (``density``,
        ``scaling``, ``weights``, ``scope``, ``key``, ...).

    Returns:
      The output directory.

    Raises:
      FileNotFoundError: a missing input checkpoint (the message names which).
      FileExistsError: ``output_dir`` exists and ``overwrite`` is False.
      CheckpointBusyError: another save to ``output_dir`` is in progress.
      ValueError / TypeError: invalid options, mismatched checkpoints, missing statistics,
        an input that fails its checksum; an ``output_dir`` that is, contains or lies
        inside an input, or is a file or a folder that is not a umtam_jax checkpoint;
        messages name the leaf path or file. Nothing is written in these cases.

    Example:
      >>> from umtam_jax import merging
      >>> merging.merge_checkpoints(  # doctest: +SKIP
      ...     "ties", "ckpt/base", ["ckpt/a", "ckpt/b"], "ckpt/merged", density=0.2,
      ...     scope="global")
    """
    from tqdm.auto import tqdm

    from umtam_jax.checkpoint import _safety
    from umtam_jax.checkpoint._streaming import save_params_streaming

    output = C._absolute(output_dir)
    if not isinstance(group_bytes, int) or group_bytes < 1:
        raise ValueError(f"group_bytes must be a positive integer, got {group_bytes!r}")
    job = _Job(
        method,
        base_dir,
        expert_dirs,
        statistics=statistics,
        fisher_dirs=fisher_dirs,
        kwargs=method_kwargs,
    )
    inputs = [("the base", job.base.directory)]
    inputs += [(f"expert {i}", d.directory) for i, d in enumerate(job.experts)]
    inputs += [(f"the Fisher of expert {i}", d.directory) for i, d in enumerate(job.fishers or [])]
    _safety.check_output_not_input(output, inputs)
    _safety.check_target(output, overwrite=overwrite)
    if metadata is None:
        metadata = {
            "merge": {
                "method": method,
                "base": os.fspath(base_dir),
                "experts": [os.fspath(e) for e in expert_dirs],
                "parameters": _jsonable(method_kwargs),
                "statistics": job.statistics,
                "streaming": True,
            }
        }

    selector = None
    if job.scope == "global" and job.method.global_scope:
        selector = _GlobalSelect(job)
        selector.run_passes(group_bytes, progress)
    merge_leaf = selector.merge_leaf if selector is not None else job.merge_leaf

    groups = job.groups(group_bytes)
    state: dict[str, Any] = {"group": -1, "data": None}
    where = {j: (g, pos) for g, group in enumerate(groups) for pos, j in enumerate(group)}
    bar = tqdm(total=len(job.leaves), desc=method, unit="leaf", disable=not progress)

    def produce(j: int) -> np.ndarray:
        g, pos = where[j]
        if state["group"] != g:
            state["data"] = None  # drop the previous group before reading the next
            _release_free_memory()
            state["data"] = job.read(groups[g])
            state["group"] = g
        out = merge_leaf(j, state["data"], pos)
        if job.leaves[j].nbytes >= 2**20:
            _release_free_memory()
        bar.update(1)
        return out

    with bar:
        return save_params_streaming(
            output, job.output, produce, overwrite=overwrite, metadata=metadata
        )


def _jsonable(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, list | tuple):
            value = [float(v) if isinstance(v, np.generic) else v for v in value]
        if isinstance(value, bool | int | float | str | list | type(None)):
            out[name] = value
        else:
            out[name] = repr(value) if name != "key" else "<PRNG key>"
    return out
