"""The plan of one out-of-core merge: which leaves, read from where, merged how.

A :class:`Job` is built from a method, its sources and the method's options. Building it
validates the whole merge on the inputs' metadata (``jax.eval_shape`` of the in-memory
call on abstract trees: the same checks and messages) and fixes the leaf table: each
leaf's key path, output shape and dtype, and where it sits in every source. After that a
job reads groups of leaves (:meth:`Job.read`) and merges one leaf at a time
(:meth:`Job.plan`, :meth:`Job.merge`) or copies a non-floating one (:meth:`Job.copy`).
Which leaves to read when, and where the output goes, is decided by the caller
(:func:`umtam_jax.engine.merge`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax._cast import cast_checked
from umtam_jax.engine import _leaf_table as T
from umtam_jax.engine._global_topk import GlobalTopK
from umtam_jax.engine._input_checks import check_copied_dtypes, check_wide_floats
from umtam_jax.engine._leaf_merge import merge_leaf
from umtam_jax.engine._option_groups import TensorKwargs, checked_group, option_groups
from umtam_jax.engine._sources import Source
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R


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
      base_input: False: ``base`` only gives the structure (and integer buffers, config
        files); the method gets ``base=None`` (methods with ``base_optional``).
      tensor_kwargs: keyword arguments that differ by tensor: called once with the
        merged tensors' dotted names (``model.layers.0.mlp.up_proj.weight``, in leaf
        order), it returns each tensor's arguments that replace ``kwargs`` there (a
        mergekit file's layer gradients and filtered values); None: none.

    Attributes:
      method: the method, as given.
      base: the base's source.
      experts: the experts' sources.
      extras: ``extras``, as given (``"statistics"``, a list of sources or None).
      base_input: ``base_input``, as given.
      kwargs: the method's keyword arguments (a copy of ``kwargs``).
      dtype: the read dtype as a ``np.dtype``; None: as stored.
      out_dtype: the output's dtype as a ``np.dtype`` (``dtype`` when not given); None:
        the merge's.
      output: the merged parameters' abstract pytree: the base's structure with a
        ``jax.ShapeDtypeStruct`` per leaf, in its output dtype (a non-floating leaf as
        the base's).
      leaves: the leaf table, one ``Leaf`` per leaf in the base's flattening order: its
        ``keypath``, and the output's ``shape``, ``dtype`` and ``nbytes``. A leaf's
        index in it is the ``j`` the methods take.
      passthrough: the set of indices of the non-floating leaves (integer buffers such
        as BERT's ``position_ids``): not merged but copied from the base
        (:meth:`copy`), and equal in every expert.
      scope: ``kwargs``'s ``scope`` (``"tensor"`` when not given).
      options: the method's options, defaults filled in and checked for the number of
        experts, which :meth:`plan` gives each leaf that ``leaf_options`` does not name.
      option_groups: the merged leaves in groups that take the same keyword arguments:
        ``(the arguments tensor_kwargs gives them, their leaf indices)`` pairs;
        ``[({}, every merged leaf)]`` without ``tensor_kwargs``.
      leaf_options: each merged leaf's checked options where ``tensor_kwargs`` changes
        them, by leaf index (empty without ``tensor_kwargs``).

    Raises:
      ValueError / TypeError: as the in-memory call would, with the same messages (the
        whole merge is validated with ``jax.eval_shape`` on the abstract trees).

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> root = tempfile.mkdtemp()
      >>> tree = {"w": np.ones(2, "f4"), "ids": np.arange(2)}
      >>> paths = [checkpoint.save_safetensors(f"{root}/{n}", tree) for n in ("base", "a")]
      >>> job = engine.job_from_paths("ties", paths[0], paths[1:], statistics=None,
      ...                             kwargs={"density": 0.5})
      >>> job.tensor_names(), job.passthrough, job.option_groups, job.options["density"]
      (['ids', 'w'], {0}, [({}, [1])], [0.5])
      >>> job.leaves[1].shape, job.leaves[1].dtype, job.leaves[1].nbytes
      ((2,), dtype('float32'), 8)
    """

    def __init__(
        self,
        method: R.Method,
        base: Source,
        experts: list[Source],
        extras: Literal["statistics"] | list[Source] | None,
        kwargs: Mapping[str, Any],
        *,
        dtype: Any = None,
        out_dtype: Any = None,
        base_input: bool = True,
        tensor_kwargs: TensorKwargs | None = None,
    ):
        if isinstance(extras, str) and extras != "statistics":
            raise ValueError(
                f"extras must be 'statistics', a list of sources or None, not {extras!r}"
            )
        self.method, self.base, self.experts, self.extras = method, base, experts, extras
        self.base_input = base_input
        self.kwargs = dict(kwargs)
        self.dtype = None if dtype is None else np.dtype(dtype)
        out_dtype = out_dtype if out_dtype is not None else dtype
        self.out_dtype = None if out_dtype is None else np.dtype(out_dtype)
        if extras == "statistics":
            for i, source in enumerate(experts):
                if not source.has_statistics():
                    lone = " (a lone .safetensors file has none)" if source.folder is None else ""
                    raise ValueError(
                        f"method {method.name!r} needs UMTAM statistics, but expert {i} "
                        f"({source.location}) has none{lone}"
                    )
        # Non-floating leaves (integer buffers such as BERT's position_ids) are not merged:
        # they must be equal in every model and are copied from the base.
        base_abs = T.cast_abstract(base.abstract(), self.dtype)
        flat, treedef = jax.tree_util.tree_flatten_with_path(base_abs)
        self.passthrough = {
            j for j, (_, x) in enumerate(flat) if not jnp.issubdtype(x.dtype, jnp.floating)
        }
        self._treedef = treedef
        self._index = jax.tree_util.tree_unflatten(treedef, range(len(flat)))  # leaf numbers
        experts_abs = [T.cast_abstract(s.abstract(), self.dtype) for s in experts]
        check_wide_floats(
            self.dtype, self.out_dtype, [(base, base_abs), *zip(experts, experts_abs, strict=True)]
        )
        check_copied_dtypes(flat, experts, experts_abs)
        extra_abs = None
        if extras == "statistics":
            extra_abs = [self.floating(s.abstract_statistics(), per_leaf=True) for s in experts]
        elif extras is not None:
            extra_abs = [self.floating(s.abstract()) for s in extras]
        abstract = (self.floating(base_abs), [self.floating(e) for e in experts_abs], extra_abs)
        merged = jax.eval_shape(lambda b, e, x: self._run(b, e, x, self.kwargs), *abstract)
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
            self.leaves.append(T.Leaf(tuple(keypath), tuple(x.shape), dtype, n * dtype.itemsize))
        # Where each leaf sits in every source (found by path: a source may order or hold
        # its leaves differently, e.g. a curvature file without the integer buffers).
        self._where = {
            id(s): T.positions(s.abstract()) for s in [base, *experts, *self._extra_sources()]
        }
        self.scope = self.kwargs.get("scope", "tensor")
        # Checked once here (the abstract merge above validated them with the inputs);
        # every leaf's plan reuses them.
        k = 1 if method.single_expert else len(experts)
        self.options = pipeline.check_options(method, self.kwargs, k)
        self.option_groups = option_groups(self, tensor_kwargs)
        self.leaf_options = {}
        for given, members in self.option_groups:
            if given:
                options = checked_group(self, given, members, abstract, k)
                self.leaf_options.update(dict.fromkeys(members, options))
        self._stand_ins: dict[Any, list[jax.ShapeDtypeStruct] | None] = {}

    def tensor_error(
        self, j: int, err: Exception, given: Mapping[str, Any] | None = None
    ) -> Exception:
        """An error like ``err`` that names tensor ``j`` (returned, not raised).

        Args:
          j: the leaf's index.
          err: the ValueError or TypeError raised on it.
          given: the arguments ``tensor_kwargs`` gave the tensor, shown in the message.

        Returns:
          A new exception of ``err``'s type: ``tensor <dotted name> (k=v, ...): <err>``.
        """
        there = f" ({', '.join(f'{k}={v!r}' for k, v in given.items())})" if given else ""
        return type(err)(f"tensor {self.tensor_names()[j]}{there}: {err}")

    def subset(self, tree: Any, members: list[int]) -> Any:
        """``tree`` with None at every leaf but ``members``.

        Args:
          tree: a tree with the base's structure (any subtree at a leaf).
          members: the leaf indices kept.

        Returns:
          The tree with the base's structure: ``tree``'s entry at each member, else None.

        Raises:
          ValueError: ``tree`` does not have the base's structure.
        """
        keep = set(members)
        return jax.tree.map(lambda j, x: x if j in keep else None, self._index, tree)

    def tensor_names(self) -> list[str]:
        """Each leaf's dotted name, in leaf order.

        Returns:
          One name per leaf, its keys joined by ``.`` (``a.b.0``; a key holding ``.`` as is).
        """
        from umtam_jax.checkpoint._names import component

        return [".".join(component(k) for k in leaf.keypath) for leaf in self.leaves]

    def floating(self, tree: Any, per_leaf: bool = False) -> Any:
        """``tree`` without the non-floating leaves.

        Args:
          tree: a pytree with the base's structure (``per_leaf``: with a subtree at each
            base leaf, e.g. statistics, an ``optax.MaskedNode`` at an unoptimized buffer).
          per_leaf: see ``tree``.

        Returns:
          ``tree`` with None at the base's non-floating leaves; a tree of another
          structure as it is (validation names the difference).
        """
        return T.without_buffers(tree, self._treedef, self.passthrough, per_leaf)

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

    def cast_output(self, j: int, x: Any) -> np.ndarray:
        """Leaf ``j`` of the merge in its output dtype.

        Args:
          j: the leaf's index.
          x: the merged leaf (a NumPy or JAX array).

        Returns:
          ``x`` as a NumPy array of the leaf's output dtype.

        Raises:
          ValueError: a finite value beyond that dtype's range (naming the leaf).
        """
        path = jax.tree_util.keystr(self.leaves[j].keypath)
        dtype = self.leaves[j].dtype
        return cast_checked(np.asarray(x), dtype, f"the merged {path} (written as {dtype.name})")

    def _run(
        self, base: Any, experts: list[Any], extra: list[Any] | None, kwargs: Mapping[str, Any]
    ) -> Any:
        base = base if self.base_input else None
        return pipeline.merge(self.method, base, *self._arguments(experts, extra), **kwargs)

    def _arguments(self, experts: list[Any], extra: list[Any] | None) -> tuple[Any, Any]:
        if self.method.single_expert:
            return experts[0], None if extra is None else extra[0]
        return experts, extra

    # ---------------------------------------------------------------- reading

    def groups(self, group_bytes: int) -> list[list[int]]:
        """Every leaf, in order, cut into groups of consecutive leaves.

        Args:
          group_bytes: the most output bytes a group holds, unless one leaf alone is more.

        Returns:
          Lists of leaf indices, each non-empty.
        """
        return T.byte_groups(self.leaves, group_bytes)

    def read(self, group: list[int]) -> dict[str, Any]:
        """Reads a group's leaves from every input.

        Args:
          group: leaf indices (one list of :meth:`groups`).

        Returns:
          ``{"base": {j: array}, "experts": [{j: array}, ...]}``, floating leaves as JAX
          arrays in the read dtype and the others as NumPy arrays; with ``extras``, also
          ``"extra"``: per expert, ``{j: statistics node}`` or its extra source's
          ``{j: array}``, for the group's floating leaves.

        Raises:
          ValueError: an input lacks one of the leaves or holds a value beyond the read
            dtype's range; and whatever the sources' reads raise.
        """

        def read_cast(s: Source) -> dict[int, Any]:  # in the read dtype, floating leaves only
            return T.cast_arrays(self._read(s, group), self.dtype, s.location, self.leaves)

        data: dict[str, Any] = {"base": read_cast(self.base)}
        data["experts"] = [read_cast(s) for s in self.experts]
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

    def plan(self, j: int, data: dict[str, Any]) -> pipeline.Call:
        """The method's validated call on leaf ``j`` alone, with the leaf's full key path.

        Args:
          j: a floating leaf's index.
          data: what :meth:`read` returned for a group holding ``j``.

        Returns:
          The :class:`~umtam_jax.merging._pipeline.Call` :meth:`merge` runs.

        Raises:
          ValueError / TypeError: the inputs fail the method's checks on this leaf.
        """
        kp = self.leaves[j].keypath
        experts = [T.wrap(kp, leaves[j]) for leaves in data["experts"]]
        extra = None
        if "extra" in data:
            extra = [T.wrap(kp, leaves[j]) for leaves in data["extra"]]
        base = T.wrap(kp, data["base"][j]) if self.base_input else None
        args = self._arguments(experts, extra)
        options = self.leaf_options.get(j, self.options)
        return pipeline.plan(self.method, base, *args, options, checked=True)

    def copy(self, j: int, data: dict[str, Any]) -> np.ndarray:
        """A non-floating leaf: the base's, after checking every expert holds the same.

        Args:
          j: a non-floating leaf's index.
          data: what :meth:`read` returned for a group holding ``j``.

        Returns:
          The base's leaf as a NumPy array.

        Raises:
          ValueError: an expert's leaf differs from the base's.
        """
        base = np.asarray(data["base"][j])
        for i, leaves in enumerate(data["experts"]):
            if not np.array_equal(np.asarray(leaves[j]), base):
                raise ValueError(
                    f"the non-floating leaf {jax.tree_util.keystr(self.leaves[j].keypath)} of "
                    f"experts[{i}] differs from the base's; integer tensors are not merged"
                )
        return base

    def merge(self, call: pipeline.Call, topk: GlobalTopK | None) -> np.ndarray:
        """Runs the method's steps on one leaf.

        The steps of ``pipeline.importances``, ``pipeline.masks`` and ``pipeline.combine``
        (the same values, bit for bit), ordered to hold less at once: each expert's scores
        become its keep mask before the next expert's are computed, and are dropped there
        when the kernel does not read them (TIES: one expert's scores alive instead of
        K); each mask is waited for, as JAX's CPU runtime would otherwise run the K
        selections side by side (:func:`._leaf_merge.merge_leaf`).

        Args:
          call: the leaf's :meth:`plan`.
          topk: the global top-k of ``scope="global"``, whose masks replace the
            per-tensor ones; None: none.

        Returns:
          The merged leaf as a NumPy array in the merge's dtype (:meth:`cast_output`
          makes it the output's).

        Raises:
          ValueError: the merged leaf is not finite although its inputs are (an overflow).
        """
        return merge_leaf(call, topk, self.scope, self._stand_ins)
