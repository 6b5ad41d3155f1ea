"""Which :class:`~umtam_jax.engine.Source` reads a path: the kind of model it holds.

:func:`open_source` opens a Hugging Face safetensors model (:func:`is_huggingface`) as a
:class:`~umtam_jax.engine.SafetensorsSource`, a folder Orbax wrote itself as a
:class:`~umtam_jax.engine.PlainOrbaxSource` and anything else as a umtam_jax checkpoint
(:class:`~umtam_jax.engine.OrbaxSource`), reading metadata only.
"""

from __future__ import annotations

import os

from umtam_jax.engine._sources import OrbaxSource, SafetensorsSource, Source


def is_huggingface(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model folder or a ``.safetensors`` file.

    A folder counts when it holds ``model.safetensors``, a safetensors index, a
    ``config.json`` or PyTorch pickles (which are recognised so that they can be refused
    with a clear message, never loaded).

    Args:
      path: a file or folder.

    Returns:
      True for a Hugging Face model; False otherwise (a umtam_jax checkpoint, a missing
      path).

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> path = checkpoint.save_safetensors(tempfile.mkdtemp() + "/m", {"w": np.ones(2)})
      >>> engine.is_huggingface(path), engine.is_huggingface(tempfile.mkdtemp())
      (True, False)
    """
    from umtam_jax.checkpoint._safetensors import INDEX_FILE, MODEL_FILE, PICKLES

    p = os.fspath(path)
    if p.endswith(".safetensors") or any(
        os.path.isfile(os.path.join(p, f)) for f in (MODEL_FILE, INDEX_FILE)
    ):
        return True
    try:
        names = os.listdir(p)
    except OSError:
        return False
    return "config.json" in names or any(n.endswith(PICKLES) for n in names)


def open_source(path: str | os.PathLike, what: str) -> Source:
    """The :class:`Source` reading ``path``: safetensors for a Hugging Face model, else Orbax.

    Args:
      path: a Hugging Face model (see :func:`is_huggingface`), a umtam_jax checkpoint, or
        a checkpoint Orbax wrote itself (see
        :func:`umtam_jax.checkpoint.is_orbax_folder`).
      what: the input's role, named in error messages (``"the base"``, ``"expert 0's"``).

    Returns:
      A :class:`SafetensorsSource`, an :class:`OrbaxSource` or a
      :class:`~umtam_jax.engine.PlainOrbaxSource`; opening reads metadata only.

    Raises:
      FileNotFoundError: a missing input, or a folder that is neither kind of model (the
        message names ``what``).
      ValueError: PyTorch pickles only, or an invalid safetensors model.

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> path = checkpoint.save_safetensors(tempfile.mkdtemp() + "/m", {"w": np.ones(2)})
      >>> source = engine.open_source(path, "the base")
      >>> source.abstract()["w"].shape, source.read([0])[0].tolist()
      ((2,), [1.0, 1.0])
    """
    from umtam_jax.checkpoint import _format, _leftovers, is_orbax_folder
    from umtam_jax.engine._plain_orbax import PlainOrbaxSource

    # A save killed in the middle of its swap: its output is put back before the format
    # is told from what the folder holds.
    _leftovers.recover(_format._absolute(path))
    if is_huggingface(path):
        return SafetensorsSource(path, what)
    if is_orbax_folder(path):
        return PlainOrbaxSource(path, what)
    return OrbaxSource(path, what)
