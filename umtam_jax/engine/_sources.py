"""Where the out-of-core engine reads models from: one small interface, one class per format.

A :class:`Source` is a model on disk, read a few leaves at a time. Its leaves are indexed
by their position in JAX's flattening order of :meth:`Source.abstract` (the same order for
every input of a merge, whose structures are checked equal first), so the engine never
sees a format's own names. :func:`~umtam_jax.engine.open_source` picks the class for a path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np


class Source(Protocol):
    """A model on disk whose parameters (and UMTAM statistics) are read leaf by leaf.

    Every input of an out-of-core merge is read through this interface: :meth:`abstract`
    and :meth:`abstract_statistics` from metadata alone, :meth:`read` and
    :meth:`read_statistics` a few leaves at a time. :class:`OrbaxSource`,
    :class:`~umtam_jax.engine.PlainOrbaxSource` and :class:`SafetensorsSource` implement
    it; :func:`~umtam_jax.engine.open_source` opens the one for a path.

    Attributes:
      location: the input's path as error messages show it.
      directory: the input itself, a folder or a lone ``.safetensors`` file (an
        ``epath.Path``): an output may not be it, lie inside it or contain it.
      folder: the model's folder (an ``epath.Path``), where its UMTAM statistics, and a
        Hugging Face model's ``config.json`` and tokenizer, are read from; None for a
        lone ``.safetensors`` file, which has no statistics.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> root = tempfile.mkdtemp()
      >>> hf = checkpoint.save_safetensors(f"{root}/hf", {"w": np.ones(2, "f4")})
      >>> ours = checkpoint.save_checkpoint(f"{root}/ours", {"w": np.ones(2, "f4")})
      >>> for path in (hf, ours, f"{hf}/model.safetensors"):
      ...     source = engine.open_source(path, "the base")
      ...     print(type(source).__name__, source.abstract()["w"].shape,
      ...           source.read([0])[0].tolist(), source.folder is None,
      ...           source.directory.name, source.has_statistics())
      SafetensorsSource (2,) [1.0, 1.0] False hf False
      OrbaxSource (2,) [1.0, 1.0] False ours False
      SafetensorsSource (2,) [1.0, 1.0] True model.safetensors False
    """

    location: str
    directory: Any
    folder: Any

    def abstract(self) -> Any:
        """The parameters' structure, read from metadata only.

        Returns:
          The parameters' pytree with ``jax.ShapeDtypeStruct`` leaves; its flattening
          order numbers the leaves :meth:`read` takes.
        """

    def read(self, leaves: Sequence[int]) -> list[np.ndarray]:
        """Reads the parameters at some flattening positions, and nothing else.

        Args:
          leaves: positions in the flattening order of :meth:`abstract`.

        Returns:
          One NumPy array per position, in its stored dtype.

        Raises:
          ValueError: an array that cannot be read or fails its checksum
            (``CheckpointCorruptError`` is a ValueError).
          CheckpointBusyError: a save replaced the input since it was opened.
        """

    def has_statistics(self) -> bool:
        """Whether UMTAM statistics are stored with the parameters.

        Returns:
          True when :meth:`abstract_statistics` and :meth:`read_statistics` can read them.
        """

    def abstract_statistics(self) -> Any:
        """The statistics' structure, read from metadata only.

        Returns:
          The statistics' pytree with ``jax.ShapeDtypeStruct`` leaves, its nodes (a
          ``FactoredStatistics`` or ``DenseStatistics``, or a dict by field name) at the
          parameters' places.

        Raises:
          ValueError / FileNotFoundError: the source holds no statistics.
        """

    def read_statistics(self, leaves: Sequence[int]) -> list[Any]:
        """Reads the statistics of some parameters, and nothing else.

        Args:
          leaves: the parameters' positions in the flattening order of :meth:`abstract`.

        Returns:
          Each parameter's statistics node, its arrays NumPy arrays.

        Raises:
          ValueError: no statistics for one of the parameters; as
            :meth:`abstract_statistics` without any, as :meth:`read` for an array that
            cannot be read.
        """


class OrbaxSource(Source):
    """A umtam_jax (Orbax) checkpoint: its ``params`` item, and ``statistics`` if saved.

    Args:
      directory: the checkpoint directory.
      what: how messages name it (``"the base"``, ``"expert 1"``).

    Attributes:
      reader: the :class:`~umtam_jax.checkpoint.CheckpointReader` it reads with.
      location: the checkpoint directory's absolute path (a string).
      directory: the checkpoint directory (an ``epath.Path``; see :class:`Source`).
      folder: the same directory, where its ``statistics`` item lies.

    Raises:
      FileNotFoundError: no checkpoint at ``directory``.
      ValueError: its parameters hold a typed PRNG key (``jax.random.key``, e.g. an
        ``nnx.Rngs`` stream of ``nnx.state(model)``), which has nothing to merge; the
        message names the leaf.

    Example:
      >>> import tempfile, numpy as np, umtam_jax
      >>> from umtam_jax import checkpoint, engine
      >>> stats = {"w": umtam_jax.DenseStatistics(mu=np.zeros(2, "f4"),
      ...                                         nu=np.ones(2, "f4"), saliency=None)}
      >>> path = checkpoint.save_checkpoint(tempfile.mkdtemp() + "/ckpt",
      ...                                   {"w": np.ones(2, "f4")}, statistics=stats)
      >>> source = engine.OrbaxSource(path, "expert 0's")
      >>> source.abstract()["w"].shape, source.read([0])[0].tolist(), source.has_statistics()
      ((2,), [1.0, 1.0], True)
      >>> source.read_statistics([0])[0].nu.tolist()
      [1.0, 1.0]
    """

    def __init__(self, directory: str | os.PathLike, what: str):
        from umtam_jax.checkpoint import CheckpointReader

        try:
            self.reader = CheckpointReader(directory)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"cannot read {what} checkpoint {directory}: {err} (inputs are local folders; "
                "a Hugging Face hub name is not downloaded)"
            ) from None
        self.location = os.fspath(self.reader.directory)
        self.directory = self.folder = self.reader.directory
        self._refuse_keys(what)
        self._paths = self.reader.leaf_paths("params")
        # A bare-array params tree is stored under "value"; its statistics node is the root.
        self._root_array = self.reader.structure("params")["t"] == "root_array"

    def _refuse_keys(self, what: str) -> None:
        """Raises ValueError naming the first typed PRNG key leaf of the parameters: the
        reader gives its abstract leaf a key dtype but reads its ``uint32`` key data, and
        a key is no number to merge."""
        from umtam_jax.checkpoint import _keys

        flat = jax.tree_util.tree_flatten_with_path(self.reader.abstract("params"))[0]
        keys = [jax.tree_util.keystr(kp) for kp, x in flat if _keys.is_key(x)]
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(
                f"cannot merge {what} checkpoint {self.location}: its leaf {keys[0]}{more} "
                "is a PRNG key (jax.random.key), which has nothing to merge; merge the "
                "parameters without it, e.g. save nnx.state(model, nnx.Param)"
            )

    def abstract(self) -> Any:
        return self.reader.abstract("params")

    def read(self, leaves: Sequence[int]) -> list[np.ndarray]:
        return self.reader.restore_arrays("params", [self._paths[j] for j in leaves])

    def has_statistics(self) -> bool:
        return self.reader.has_item("statistics")

    def abstract_statistics(self) -> Any:
        return self.reader.abstract("statistics")

    def read_statistics(self, leaves: Sequence[int]) -> list[Any]:
        paths = [()] if self._root_array else [self._paths[j] for j in leaves]
        return self.reader.restore_subtrees("statistics", paths)


STATISTICS_FOLDER = "umtam_statistics"
"""Where a Hugging Face model folder keeps its UMTAM statistics: a safetensors folder
inside it, each tensor named ``<parameter name>.<field>`` (``row``, ``col``, ``u``, ``sigma``,
``v``, ``saliency`` for factored leaves; ``mu``, ``nu``, ``saliency`` for dense ones), as
``save_safetensors(f"{model}/umtam_statistics", umtam_jax.statistics(opt_state))`` writes
them for parameters named like the model's tensors."""


class SafetensorsSource(Source):
    """A Hugging Face safetensors model (a folder with ``model.safetensors`` or an index
    and shards, or one ``.safetensors`` file), and its UMTAM statistics if it has them
    (:data:`STATISTICS_FOLDER`; a folder only: a lone file has no statistics, config or
    tokenizer, whatever lies beside it, as several files may share that folder).

    Args:
      path: the folder or file.
      what: how messages name it.

    Attributes:
      reader: the :class:`~umtam_jax.checkpoint.SafetensorsReader` of the model's tensors.
      location: ``path`` as given (a string).
      directory: the input itself: the model's folder, or the lone file.
      folder: the model's folder, which its statistics, config and tokenizer are read
        from; None for a lone file.

    Raises:
      FileNotFoundError: no safetensors model at ``path``.
      ValueError: as :class:`~umtam_jax.checkpoint.SafetensorsReader` (pickled weights
        only, an invalid index or header, ...).

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> path = checkpoint.save_safetensors(tempfile.mkdtemp() + "/m",
      ...                                    {"a": {"w": np.ones(2, "f4")}})
      >>> source = engine.SafetensorsSource(path, "the base")
      >>> source.abstract()["a"]["w"].shape, source.read([0])[0].tolist()
      ((2,), [1.0, 1.0])
      >>> _ = checkpoint.save_safetensors(f"{path}/{engine.STATISTICS_FOLDER}",
      ...                                 {"a": {"w": {"nu": np.ones(2, "f4")}}})
      >>> source.has_statistics(), source.read_statistics([0])[0]["nu"].tolist()
      (True, [1.0, 1.0])
    """

    def __init__(self, path: str | os.PathLike, what: str):
        from umtam_jax.checkpoint import SafetensorsReader, names_from_tree

        try:
            self.reader = SafetensorsReader(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"cannot read {what} model {path}: {err}") from None
        self.directory = self.reader.folder if self.reader.is_folder else self.reader.files[0]
        self.folder = self.reader.folder if self.reader.is_folder else None
        self.location = os.fspath(path)
        self._abstract = self.reader.abstract()
        self._names = list(names_from_tree(self._abstract))  # flattening order
        self._tied: dict[str, str] = {}  # output embedding → the input one read for it
        self._statistics: Any = None
        self._fields: dict[str, list[str]] = {}

    def abstract(self) -> Any:
        return self._abstract

    def read(self, leaves: Sequence[int]) -> list[np.ndarray]:
        return self.reader.read([self._tied.get(self._names[j], self._names[j]) for j in leaves])

    def ties(self, output: str, input_: str) -> bool:
        """Whether this model ties the output embedding ``output`` to ``input_``.

        Args:
          output: the output embedding's tensor name (``lm_head.weight``).
          input_: the input embedding's (``model.embed_tokens.weight``).

        Returns:
          True when the model stores ``input_`` but not ``output`` and its ``config.json``
          (if any, and its ``text_config``) does not say ``tie_word_embeddings: false``;
          False for a ``config.json`` that cannot be read.
        """
        if output in self._names or input_ not in self._names or self._tie_settings is None:
            return False
        return all(part.get("tie_word_embeddings") is not False for part in self._tie_settings)

    def declares_tied(self, output: str) -> bool:
        """Whether transformers would load this model with ``output`` replaced by the
        input embedding.

        Args:
          output: the output embedding's tensor name (``lm_head.weight``).

        Returns:
          True when it does not store ``output`` (tied by :meth:`tie`), or its
          ``config.json`` says ``tie_word_embeddings: true`` and nowhere false (an
          explicit true: many architectures default to false), so a stored copy is not
          read.
        """
        if output in self._tied:
            return True
        values = [part.get("tie_word_embeddings") for part in self._tie_settings or ()]
        return True in values and False not in values

    @functools.cached_property
    def _tie_settings(self) -> list[dict[str, Any]] | None:
        """The mappings of ``config.json`` that may set ``tie_word_embeddings`` (none
        without a config; None for one that cannot be read)."""
        from umtam_jax.checkpoint._model_files import read_config, tie_settings

        folder = self.folder
        try:
            if folder is None or not (folder / "config.json").exists():
                return tie_settings({})
            return tie_settings(read_config(folder))
        except (OSError, ValueError):
            return None

    def tie_like(self, other: Source) -> None:
        """Ties what ``other`` ties, where this source lacks the same output embedding.

        Args:
          other: the expert this source holds Fishers or curvatures of (only a
            :class:`SafetensorsSource` ties anything).
        """
        for output, input_ in getattr(other, "_tied", {}).items():
            if self.ties(output, input_):
                self.tie(output, input_)

    def tie(self, output: str, input_: str) -> None:
        """Serves ``output`` by reading ``input_``, as transformers ties them on loading.

        :meth:`abstract` then holds ``output`` (with ``input_``'s shape and dtype), which
        may change the leaves' flattening positions.

        Args:
          output: the output embedding's tensor name (``lm_head.weight``).
          input_: the stored input embedding's (``model.embed_tokens.weight``).
        """
        from umtam_jax.checkpoint import names_from_tree

        self._tied[output] = input_
        self._abstract = self._with_tied(self.reader.abstract())
        self._names = list(names_from_tree(self._abstract))

    def _with_tied(self, abstract: Any) -> Any:
        """``abstract`` (named by tensor, or by tensor and statistics field) with each tied
        output embedding's entries those of its input embedding (one parameter)."""
        from umtam_jax.checkpoint import names_from_tree, tree_from_names

        if not self._tied:
            return abstract
        entries = names_from_tree(abstract)
        for output, input_ in self._tied.items():
            for name in list(entries):
                if name == input_ or name.startswith(input_ + "."):
                    entries[output + name[len(input_) :]] = entries[name]
        return tree_from_names(entries)

    def _stats_reader(self) -> Any:
        from umtam_jax.checkpoint import SafetensorsReader

        if self.folder is None:
            raise ValueError(
                f"{self.location} is a single .safetensors file, which has no UMTAM "
                f"statistics: put the model in a folder with its {STATISTICS_FOLDER} folder"
            )
        if self._statistics is None:
            self._statistics = SafetensorsReader(self.folder / STATISTICS_FOLDER)
            for n in self._statistics.names:  # "<tensor name>.<field>"
                self._fields.setdefault(n.rpartition(".")[0], []).append(n)
        return self._statistics

    def has_statistics(self) -> bool:
        return self.folder is not None and (self.folder / STATISTICS_FOLDER).is_dir()

    def abstract_statistics(self) -> Any:
        return self._with_tied(self._stats_reader().abstract())

    def read_statistics(self, leaves: Sequence[int]) -> list[Any]:
        reader = self._stats_reader()
        out = []
        for j in leaves:
            name = self._tied.get(self._names[j], self._names[j])  # a tied one: the same
            fields = self._fields.get(name)
            if not fields:
                raise ValueError(
                    f"the statistics of {self.location} have no entry for tensor {name!r}"
                )
            arrays = reader.read(fields)
            out.append({f.rpartition(".")[2]: a for f, a in zip(fields, arrays, strict=True)})
        return out
