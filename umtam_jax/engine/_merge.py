"""Out-of-core merging: any registered method, leaf by leaf, from sources to a sink."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.extend import core as jex

from umtam_jax.engine._global_topk import GlobalTopK
from umtam_jax.engine._sources import SafetensorsSource, Source, open_source
from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V

# Default size of the groups of leaves read together (bytes of the base's leaves).
DEFAULT_GROUP_BYTES = 16 * 2**20


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


@dataclasses.dataclass
class _Leaf:
    keypath: tuple[Any, ...]
    shape: tuple[int, ...]
    dtype: np.dtype  # of the merged output (canonical)
    nbytes: int


def _positions(tree: Any) -> dict[str, int]:
    """``{keystr(path): flattening position}`` of a tree's leaves."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(kp): i for i, (kp, _) in enumerate(flat)}


def _to_jax(arrays: list[np.ndarray]) -> list[jax.Array]:
    """Moves restored NumPy arrays into JAX buffers, dropping each NumPy copy at once (the
    merging functions would copy them anyway; converting as soon as they are read keeps
    one copy of the inputs alive instead of two)."""
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


class Job:
    """A validated out-of-core merge: the method, its sources and the leaf table.

    Args:
      method: a registered method.
      base: the base's source.
      experts: one source per expert.
      extras: where the per-expert input comes from: ``"statistics"`` (each expert's
        stored statistics), a list of sources (their parameters, e.g. Fishers), or None.
      kwargs: the method's keyword arguments.
      dtype: the dtype the parameters are read in (floating leaves; default: as stored).
      out_dtype: the output's dtype (default: ``dtype``, else the merge's).

    Raises:
      ValueError / TypeError: as the in-memory call would, with the same messages (the
        whole merge is validated with ``jax.eval_shape`` on the abstract trees).
    """

    def __init__(
        self,
        method: R.Method,
        base: Source,
        experts: list[Source],
        extras: str | list[Source] | None,
        kwargs: Mapping[str, Any],
        *,
        dtype: Any = None,
        out_dtype: Any = None,
        base_input: bool = True,
    ):
        self.method, self.base, self.experts, self.extras = method, base, experts, extras
        # base_input=False: ``base`` only gives the structure (and integer buffers, config
        # files); the method gets base=None (methods with base_optional).
        self.base_input = base_input
        self.kwargs = dict(kwargs)
        self.dtype = None if dtype is None else np.dtype(dtype)
        out_dtype = out_dtype if out_dtype is not None else dtype
        self.out_dtype = None if out_dtype is None else np.dtype(out_dtype)
        if extras == "statistics":
            for i, source in enumerate(experts):
                if not source.has_statistics():
                    raise ValueError(
                        f"method {method.name!r} needs UMTAM statistics, but expert {i} "
                        f"({source.location}) has none"
                    )
        # Non-floating leaves (integer buffers such as BERT's position_ids) are not merged:
        # they must be equal in every model and are copied from the base.
        base_abs = self._cast(base.abstract())
        flat, treedef = jax.tree_util.tree_flatten_with_path(base_abs)
        self.passthrough = {
            j for j, (_, x) in enumerate(flat) if not jnp.issubdtype(x.dtype, jnp.floating)
        }
        self._treedef = treedef
        experts_abs = [self._cast(s.abstract()) for s in experts]
        extra_abs = None
        if extras == "statistics":
            extra_abs = [s.abstract_statistics() for s in experts]
        elif extras is not None:
            extra_abs = [self.floating(s.abstract()) for s in extras]
        merged = jax.eval_shape(
            lambda b, e, x: self._run(b, e, x),
            self.floating(base_abs),
            [self.floating(e) for e in experts_abs],
            extra_abs,
        )
        out = iter(jax.tree.leaves(merged))
        leaves = [x if j in self.passthrough else next(out) for j, (_, x) in enumerate(flat)]
        if self.out_dtype is not None:
            leaves = [
                x if j in self.passthrough else jax.ShapeDtypeStruct(x.shape, self.out_dtype)
                for j, x in enumerate(leaves)
            ]
        self.output = jax.tree_util.tree_unflatten(treedef, leaves)
        self.leaves = []
        for (keypath, _), x in zip(flat, leaves, strict=True):
            dtype = np.dtype(x.dtype)
            n = int(np.prod(x.shape, dtype=np.int64))
            self.leaves.append(_Leaf(tuple(keypath), tuple(x.shape), dtype, n * dtype.itemsize))
        # Where each leaf sits in every source (found by path: a source may order or hold
        # its leaves differently, e.g. a curvature file without the integer buffers).
        self._where = {
            id(s): _positions(s.abstract()) for s in [base, *experts, *self._extra_sources()]
        }
        self.scope = self.kwargs.get("scope", "tensor")
        # Checked once here (the abstract merge above validated them with the inputs);
        # every leaf's plan reuses them.
        k = 1 if method.single_expert else len(experts)
        self.options = R.check_options(method, self.kwargs, k)
        self._stand_ins: dict[Any, list[jax.ShapeDtypeStruct] | None] = {}

    def floating(self, tree: Any) -> Any:
        """``tree`` without the non-floating leaves (None there), if it has the base's
        structure; any other tree as it is (validation names the difference)."""
        if not self.passthrough:
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self._treedef:
            return tree
        leaves = [None if j in self.passthrough else x for j, x in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def _extra_sources(self) -> list[Source]:
        return self.extras if isinstance(self.extras, list) else []

    def _read(self, source: Source, group: list[int]) -> dict[int, Any]:
        where = self._where[id(source)]
        keys = [jax.tree_util.keystr(self.leaves[j].keypath) for j in group]
        missing = [k for k in keys if k not in where]
        if missing:
            raise ValueError(f"{source.location} has no tensor {missing[0]}")
        arrays = source.read([where[k] for k in keys])
        out = {}
        for j in group:  # non-floating leaves stay NumPy arrays (JAX may narrow int64)
            array = arrays.pop(0)
            out[j] = array if j in self.passthrough else jnp.asarray(array)
        return out

    def _cast(self, tree: Any) -> Any:
        """``tree`` (arrays or abstract leaves) in the read dtype, floating leaves only."""
        if self.dtype is None:
            return tree

        def cast(x: Any) -> Any:
            if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == self.dtype:
                return x
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, self.dtype)
            return x.astype(self.dtype)

        return jax.tree.map(cast, tree)

    def _run(self, base: Any, experts: list[Any], extra: list[Any] | None) -> Any:
        base = base if self.base_input else None
        return R.merge(self.method, base, *self._arguments(experts, extra), **self.kwargs)

    def _arguments(self, experts: list[Any], extra: list[Any] | None) -> tuple[Any, Any]:
        if self.method.single_expert:
            return experts[0], None if extra is None else extra[0]
        return experts, extra

    # ---------------------------------------------------------------- reading

    def groups(self, group_bytes: int) -> list[list[int]]:
        """Consecutive leaves in groups of about ``group_bytes`` (at least one leaf each)."""
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

    def read(self, group: list[int]) -> dict[str, Any]:
        """The group's leaves of every input, as JAX arrays (statistics as nodes), each a
        dict by leaf index."""
        data: dict[str, Any] = {"base": self._cast(self._read(self.base, group))}
        data["experts"] = [self._cast(self._read(s, group)) for s in self.experts]
        merged = [j for j in group if j not in self.passthrough]
        if self.extras == "statistics":
            data["extra"] = []
            for s in self.experts:
                where = self._where[id(s)]
                keys = [where[jax.tree_util.keystr(self.leaves[j].keypath)] for j in merged]
                data["extra"].append(dict(zip(merged, s.read_statistics(keys), strict=True)))
        elif self.extras is not None:
            data["extra"] = [self._read(s, merged) for s in self.extras]
        return data

    # ---------------------------------------------------------------- merging

    def plan(self, j: int, data: dict[str, Any]) -> R.Call:
        """The method's validated call on leaf ``j`` alone, with the leaf's full key path."""
        kp = self.leaves[j].keypath
        experts = [_wrap(kp, leaves[j]) for leaves in data["experts"]]
        extra = None
        if "extra" in data:
            extra = [_wrap(kp, leaves[j]) for leaves in data["extra"]]
        base = _wrap(kp, data["base"][j]) if self.base_input else None
        args = self._arguments(experts, extra)
        return R.plan(self.method, base, *args, self.options, checked=True)

    def copy(self, j: int, data: dict[str, Any]) -> np.ndarray:
        """A non-floating leaf: the base's, after checking every expert holds the same."""
        base = np.asarray(data["base"][j])
        for i, leaves in enumerate(data["experts"]):
            if not np.array_equal(np.asarray(leaves[j]), base):
                raise ValueError(
                    f"the non-floating leaf {jax.tree_util.keystr(self.leaves[j].keypath)} of "
                    f"expert {i} differs from the base's; integer tensors are not merged"
                )
        return base

    def merge(self, call: R.Call, topk: GlobalTopK | None) -> np.ndarray:
        """The method's steps on one leaf; ``topk`` replaces the per-tensor masks.

        The steps of ``R.importances``, ``R.masks`` and ``R.combine`` on the leaf (the
        same values, bit for bit), ordered to hold less at once: each expert's scores are
        made into its keep mask before the next expert's are computed, and dropped there
        when the kernel does not read them (TIES: one expert's scores alive instead of K);
        each mask is waited for, as JAX's CPU runtime would otherwise run the K
        selections, each with its temporaries, side by side.
        """
        m, p = call.method, call.prepared
        if m.importance is None:
            keep = R.masks(call, None)
            return self._finish(call, R.combine(call, keep, None))
        stand_ins = self._unread_scores(call)  # None: the kernel reads the scores
        from_scores = m.sparsify == "topk" or topk is not None
        scores: list[list[Any]] | None = None
        if stand_ins is None:
            scores = []
        elif not from_scores:
            return self._finish(
                call, R.combine(call, R.masks(call, None), [[s] for s in stand_ins])
            )
        keep: list[list[Any]] = []
        for t in range(len(p.experts)):
            extra = None if call.extras is None else call.extras[t][0]
            s = m.importance(call.options, p.base[0], p.experts[t][0], extra)
            if from_scores:
                if topk is None:
                    mask = R.keep_masks([s], call.options["density"][t], "tensor")[0]
                else:
                    mask = topk.mask(t, s)
                keep.append([jax.block_until_ready(mask)])
                del mask
            if scores is not None:
                scores.append([s])
            del s
        if not from_scores:
            keep = R.masks(call, scores)
        if scores is None:
            scores = [[s] for s in stand_ins]
        return self._finish(call, R.combine(call, keep, scores))

    def _finish(self, call: R.Call, leaves: list[Any]) -> np.ndarray:
        merged = V.rebuild(call.prepared, leaves)
        del leaves
        out = np.asarray(jax.tree.leaves(merged)[0])
        del merged
        return out if self.out_dtype is None else out.astype(self.out_dtype)

    def _unread_scores(self, call: R.Call) -> list[jax.ShapeDtypeStruct] | None:
        """None if the method's kernel reads the importance scores it is given; else their
        shapes and dtypes, given to it instead of the arrays (TIES's kernel, for one, only
        needs the masks made from them).

        Decided from the kernel's jaxpr on abstract masks and scores, once per leaf
        signature: no scores among the inputs of its operations means that nothing but
        their shapes and dtypes can matter. Any doubt (a trace that fails) answers None.
        """
        m, p = call.method, call.prepared
        b, ws = p.base[0], [w[0] for w in p.experts]
        extras = None if call.extras is None else [x[0] for x in call.extras]
        signature = [(tuple(x.shape), str(x.dtype)) for x in [b, *ws]]
        signature += [
            (tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in jax.tree.leaves(extras)
        ]
        key = (str(jax.tree.structure(extras)), tuple(signature))
        cache = self._stand_ins
        if key not in cache:
            cache[key] = None
            try:
                scores = [
                    jax.eval_shape(
                        lambda b, w, x: m.importance(call.options, b, w, x),
                        b,
                        w,
                        None if extras is None else extras[t],
                    )
                    for t, w in enumerate(ws)
                ]
                masks = None
                if m.sparsify == "topk" or self.scope == "global":
                    masks = [jax.ShapeDtypeStruct(s.shape, jnp.bool_) for s in scores]
                elif m.sparsify == "bernoulli":
                    masks = [jax.ShapeDtypeStruct(b.shape, jnp.bool_) for _ in ws]
                closed = jax.make_jaxpr(
                    lambda keep, s: m.kernel(call.options, b, ws, keep, s, extras)
                )(masks, scores)
                jaxpr = closed.jaxpr
                score_vars = set(jaxpr.invars[len(jax.tree.leaves(masks)) :])
                used = {v for e in jaxpr.eqns for v in e.invars if isinstance(v, jex.Var)}
                used |= {v for v in jaxpr.outvars if isinstance(v, jex.Var)}
                if len(score_vars) == len(scores) and not score_vars & used:
                    cache[key] = scores
            except Exception:  # noqa: BLE001 - when in doubt, the kernel gets the scores
                pass
        return cache[key]


def _global_topk(job: Job, group_bytes: int, progress: bool) -> GlobalTopK:
    """Finds the global thresholds of a ``scope="global"`` merge (extra passes)."""
    from tqdm.auto import tqdm

    densities = V.check_densities(R.options_of(job.method, job.kwargs)["density"], len(job.experts))
    merged = [leaf for j, leaf in enumerate(job.leaves) if j not in job.passthrough]
    topk = GlobalTopK(
        [int(np.prod(leaf.shape, dtype=np.int64)) for leaf in merged],
        [leaf.dtype for leaf in merged],
        densities,
    )
    active = topk.active()

    def scan(p: int):
        bar = tqdm(
            total=len(job.leaves),
            desc=f"{job.method.name} global threshold, pass {p + 1}/{topk.passes}",
            unit="leaf",
            disable=not progress,
        )
        with bar:
            for group in job.groups(group_bytes):
                data = None
                _release_free_memory()
                data = job.read(group)
                for j in group:
                    if j not in job.passthrough:
                        scores = R.importances(job.plan(j, data))
                        yield [scores[t][0] for t in active]
                    bar.update(1)

    topk.find_thresholds(scan, lambda p: None)
    return topk


def merge(
    job: Job,
    write: Any,
    *,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    progress: bool = True,
) -> Any:
    """Runs ``job``: ``write(abstract_output, produce)`` writes the output, calling
    ``produce(j)`` for each leaf ``j`` in flattening order; returns what ``write`` returns."""
    from tqdm.auto import tqdm

    topk = None
    if job.scope == "global" and job.method.global_scope:
        topk = _global_topk(job, group_bytes, progress)
    groups = job.groups(group_bytes)
    state: dict[str, Any] = {"group": -1, "data": None}
    where = {j: g for g, group in enumerate(groups) for j in group}
    bar = tqdm(total=len(job.leaves), desc=job.method.name, unit="leaf", disable=not progress)

    def produce(j: int) -> np.ndarray:
        g = where[j]
        if state["group"] != g:  # the previous group's inputs were dropped after its last leaf
            state["data"] = None
            state["data"] = job.read(groups[g])
            state["group"] = g
        if j in job.passthrough:
            out = job.copy(j, state["data"])
        else:
            out = job.merge(job.plan(j, state["data"]), topk)
        if j == groups[g][-1]:
            # The group's inputs go now, not when the next group is read: the writer
            # then writes this leaf (and waits for the next) without them.
            state["data"], state["group"] = None, -1
        if job.leaves[j].nbytes >= 2**20 or state["data"] is None:
            _release_free_memory()
        bar.update(1)
        return out

    with bar:
        return write(job.output, produce)


def job_from_paths(
    method: str,
    base_dir: Any,
    expert_dirs: Any,
    *,
    statistics: bool | None,
    fisher_dirs: Sequence[Any] | None = None,
    curvature_dirs: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any],
    dtype: Any = None,
    out_dtype: Any = None,
) -> Job:
    """A :class:`Job` over model files, each a umtam_jax checkpoint or a Hugging Face
    safetensors model (see :func:`merge_checkpoints`)."""
    m = R.get(method)
    if isinstance(expert_dirs, str | bytes | os.PathLike) or not isinstance(expert_dirs, Sequence):
        raise TypeError("expert_dirs must be a sequence of checkpoint directories")
    expert_dirs = list(expert_dirs)
    if not expert_dirs:
        raise ValueError("expert_dirs is empty: at least one expert is required")
    if m.single_expert and len(expert_dirs) != 1:
        raise ValueError(f"method {method!r} takes exactly one expert, got {len(expert_dirs)}")
    if not m.out_of_core:
        raise ValueError(
            f"method {method!r} needs each expert's {m.extra}, which the checkpoint engine "
            f"does not read: merge in memory with umtam_jax.merging.{method}"
        )
    if "scores" in kwargs:
        raise TypeError(
            "pass statistics=True (saliency scores) or statistics=False (magnitude) "
            "instead of scores"
        )
    extra_dirs, extra_name = None, None
    for name, dirs, kind in (
        ("fisher_dirs", fisher_dirs, "fishers"),
        ("curvature_dirs", curvature_dirs, "curvatures"),
    ):
        if dirs is None:
            continue
        if m.extra != kind:
            raise ValueError(f"method {method!r} takes no {name}")
        extra_dirs, extra_name = list(dirs), name
        if len(extra_dirs) != len(expert_dirs):
            raise ValueError(f"got {len(extra_dirs)} {name} for {len(expert_dirs)} experts")
    if m.extra == "fishers" and extra_dirs is None:
        raise ValueError(f"method {method!r} needs fisher_dirs, one per expert")
    takes_statistics = m.extra in ("statistics", "curvatures", "scores")
    if statistics is None:
        statistics = takes_statistics and extra_dirs is None
    if statistics and not takes_statistics:
        raise ValueError(f"method {method!r} takes no statistics")
    if statistics and extra_dirs is not None:
        raise ValueError(f"give either statistics=True or {extra_name}, not both")
    if m.extra == "statistics" and not statistics:
        raise ValueError(f"method {method!r} needs the experts' UMTAM statistics")
    if m.extra == "curvatures" and not statistics and extra_dirs is None:
        raise ValueError(f"method {method!r} needs the experts' UMTAM statistics or curvature_dirs")
    if base_dir is None and not m.base_optional:
        raise ValueError(f"method {method!r} needs a base model")
    experts = [open_source(d, f"expert {i}'s") for i, d in enumerate(expert_dirs)]
    base = experts[0] if base_dir is None else open_source(base_dir, "the base")
    extras: str | list[Source] | None = "statistics" if statistics else None
    if extra_dirs is not None:
        what = "Fisher" if extra_name == "fisher_dirs" else "curvature"
        extras = [open_source(d, f"expert {i}'s {what}") for i, d in enumerate(extra_dirs)]
    return Job(
        m, base, experts, extras, kwargs, dtype=dtype, out_dtype=out_dtype,
        base_input=base_dir is not None,
    )  # fmt: skip


def validate_merge_checkpoints(
    method: str,
    base_dir: str | os.PathLike,
    expert_dirs: Sequence[str | os.PathLike],
    *,
    statistics: bool | None = None,
    fisher_dirs: Sequence[str | os.PathLike] | None = None,
    curvature_dirs: Sequence[str | os.PathLike] | None = None,
    dtype: Any = None,
    out_dtype: Any = None,
    **method_kwargs: Any,
) -> Any:
    """Checks a :func:`merge_checkpoints` call from the inputs' metadata alone.

    Reads no arrays: the merge is validated with ``jax.eval_shape`` of the in-memory
    method on the inputs' abstract trees.

    Returns:
      The merged parameters' abstract pytree (``jax.ShapeDtypeStruct`` leaves).

    Raises:
      FileNotFoundError, ValueError, TypeError: as :func:`merge_checkpoints`.

    Example:
      >>> from umtam_jax import engine
      >>> engine.validate_merge_checkpoints(  # doctest: +SKIP
      ...     "ties", "ckpt/base", ["ckpt/a", "ckpt/b"], density=0.2)
    """
    job = job_from_paths(
        method,
        base_dir,
        expert_dirs,
        statistics=statistics,
        fisher_dirs=fisher_dirs,
        curvature_dirs=curvature_dirs,
        kwargs=method_kwargs,
        dtype=dtype,
        out_dtype=out_dtype,
    )
    return job.output


OUTPUT_FORMATS = ("auto", "orbax", "safetensors")


def resolve_output_format(base: Source, output_format: str) -> str:
    """``"orbax"`` or ``"safetensors"``: ``"auto"`` writes the base's format."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(
            f"unknown output_format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}"
        )
    if output_format != "auto":
        return output_format
    return "safetensors" if isinstance(base, SafetensorsSource) else "orbax"


def check_output(output: epath.Path, job: Job, fmt: str, *, overwrite: bool) -> None:
    """Refuses an output that is, contains or lies inside an input, or that may not be
    written (an existing file or folder not written by umtam_jax in format ``fmt``)."""
    from umtam_jax.checkpoint import _safetensors, _safety

    inputs = [("the base", job.base.directory)]
    inputs += [(f"expert {i}", s.directory) for i, s in enumerate(job.experts)]
    if isinstance(job.extras, list):
        inputs += [(f"the Fisher or curvature of expert {i}", s.directory)
                   for i, s in enumerate(job.extras)]  # fmt: skip
    _safety.check_output_not_input(output, inputs)
    if fmt == "safetensors":
        _safety.check_target(output, overwrite=overwrite, is_own=_safetensors._is_own)
    else:
        _safety.check_target(output, overwrite=overwrite)


def writer(
    job: Job,
    output: epath.Path,
    fmt: str,
    *,
    overwrite: bool,
    metadata: Mapping[str, Any] | None,
    max_shard_size: int | str = 5 * 10**9,
) -> Callable[[Any, Callable[[int], np.ndarray]], epath.Path]:
    """``write(abstract, produce)`` saving the output of ``job`` at ``output`` in ``fmt``
    (safetensors output gets the base's config and tokenizer files when it has them)."""

    def write(abstract: Any, produce: Callable[[int], np.ndarray]) -> epath.Path:
        if fmt == "orbax":
            from umtam_jax.checkpoint import save_params_streaming

            return save_params_streaming(
                output, abstract, produce, overwrite=overwrite, metadata=metadata
            )
        from umtam_jax.checkpoint import save_safetensors

        copy_from = job.base.directory if isinstance(job.base, SafetensorsSource) else None
        return save_safetensors(
            output,
            abstract,
            produce,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            copy_files_from=copy_from,
            metadata=metadata,
        )

    return write


def merge_checkpoints(
    method: str,
    base_dir: str | os.PathLike,
    expert_dirs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    statistics: bool | None = None,
    fisher_dirs: Sequence[str | os.PathLike] | None = None,
    curvature_dirs: Sequence[str | os.PathLike] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    dtype: Any = None,
    out_dtype: Any = None,
    output_format: str = "auto",
    max_shard_size: int | str = 5 * 10**9,
    **method_kwargs: Any,
) -> epath.Path:
    """Merges models leaf by leaf, out of core, into a new model folder.

    Inputs are umtam_jax (Orbax) checkpoints or Hugging Face safetensors models (a folder
    with ``model.safetensors`` or an index and shards), in any mix with the same parameter
    names and shapes. The result equals restoring everything, calling the in-memory
    merging function ``method`` and saving the merge — the same values, bit for bit — with
    peak host memory of about one group of leaves per input plus one output leaf instead
    of K + 1 models. ``scope="global"`` costs extra passes over the inputs (three reads
    for float32 scores).

    Args:
      method: a name in :data:`umtam_jax.merging.METHODS` (``"umtam"``, ``"ties"``, ...).
      base_dir: the base model; None for methods that take none (``linear``, ``karcher``,
        ...), the first expert then giving the structure and config files.
      expert_dirs: the experts' models (exactly one for ``prune``).
      output_dir: the folder to create, written atomically: a umtam_jax checkpoint
        (params only) or a safetensors folder with the base's config and tokenizer files.
      statistics: use the experts' UMTAM statistics (a checkpoint's ``statistics`` item; a
        Hugging Face model's ``umtam_statistics`` folder). Default: yes for ``umtam``,
        ``ota`` (unless ``curvature_dirs``) and ``prune`` (``False`` prunes by magnitude).
      fisher_dirs: for ``fisher``, one model per expert holding its diagonal Fisher.
      curvature_dirs: for ``ota``, one model per expert holding its curvature (e.g. Adam's
        second moments ``exp_avg_sq`` saved under the parameters' names).
      overwrite: replace an existing output written by umtam_jax (nothing else is ever
        replaced).
      progress: show progress bars over the leaves (one per pass).
      metadata: JSON-serialisable metadata stored with the output; default: a record of
        the merge (method, inputs, JSON-serialisable options).
      group_bytes: leaves are read in consecutive groups of about this many bytes (of the
        base; at least one leaf per group). Larger groups mean fewer reads.
      dtype: read the parameters in this dtype (floating leaves; default: as stored).
      out_dtype: write the output in this dtype (default: ``dtype``, else the merge's).
      output_format: ``"auto"`` (the base's format), ``"orbax"`` or ``"safetensors"``.
      max_shard_size: for safetensors output, bytes per shard (an int or ``"5GB"``).
      **method_kwargs: keyword arguments of the merging function (``density``,
        ``scaling``, ``weights``, ``scope``, ``key``, ...).

    Returns:
      The output directory.

    Raises:
      FileNotFoundError: a missing input (the message names which).
      FileExistsError: ``output_dir`` exists and ``overwrite`` is False.
      CheckpointBusyError: another save to ``output_dir`` is in progress.
      ValueError / TypeError: invalid options, mismatched inputs, missing statistics, an
        input that fails its checksum or is truncated, PyTorch pickles (never loaded); an
        ``output_dir`` that is, contains or lies inside an input, or is a file or a folder
        not written by umtam_jax; messages name the leaf path or file. Nothing is written.

    Example:
      >>> from umtam_jax import engine
      >>> engine.merge_checkpoints(  # doctest: +SKIP
      ...     "ties", "models/base", ["models/a", "models/b"], "models/merged", density=0.2)
    """
    from umtam_jax.checkpoint import _checkpoint as C

    output = C._absolute(output_dir)
    if not isinstance(group_bytes, int) or group_bytes < 1:
        raise ValueError(f"group_bytes must be a positive integer, got {group_bytes!r}")
    job = job_from_paths(
        method,
        base_dir,
        expert_dirs,
        statistics=statistics,
        fisher_dirs=fisher_dirs,
        curvature_dirs=curvature_dirs,
        kwargs=method_kwargs,
        dtype=dtype,
        out_dtype=out_dtype,
    )
    fmt = resolve_output_format(job.base, output_format)
    check_output(output, job, fmt, overwrite=overwrite)
    if metadata is None:
        metadata = {
            "merge": {
                "method": method,
                "base": None if base_dir is None else os.fspath(base_dir),
                "experts": [os.fspath(e) for e in expert_dirs],
                "parameters": _jsonable(method_kwargs),
                "statistics": job.extras == "statistics",
                "streaming": True,
            }
        }

    write = writer(
        job, output, fmt, overwrite=overwrite, metadata=metadata, max_shard_size=max_shard_size
    )
    return merge(job, write, group_bytes=group_bytes, progress=progress)


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
