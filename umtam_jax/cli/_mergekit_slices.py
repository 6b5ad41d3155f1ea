"""mergekit's ``slices`` where they describe the whole models: one output slice whose
sources each take every layer (``layer_range: [0, N]``), as mergekit's own SLERP
examples write a merge of two models. Such a file is the same merge as one listing the
sources under ``models``; layer subsets and several slices (stacking layers of different
models, "frankenmerges") change the architecture and are refused naming the key.

Example:
  >>> import json, os, tempfile
  >>> from umtam_jax.cli._mergekit_slices import whole_model_slices
  >>> root = tempfile.mkdtemp()
  >>> for name in ("a", "b"):
  ...     os.mkdir(f"{root}/{name}")
  ...     with open(f"{root}/{name}/config.json", "w") as f:
  ...         json.dump({"num_hidden_layers": 2}, f)
  >>> sources = [{"model": f"{root}/{n}", "layer_range": [0, 2]} for n in ("a", "b")]
  >>> [m["model"][-1] for m in whole_model_slices({"slices": [{"sources": sources}]})]
  ['a', 'b']

References:
  mergekit's ``OutputSliceDefinition`` and ``InputSliceDefinition``,
  https://github.com/arcee-ai/mergekit
"""

from __future__ import annotations

import os
from typing import Any

from umtam_jax.cli._yaml import ConfigError

# config.json keys giving the number of layers (Llama/Mistral/BERT, GPT-2, T5-like).
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def whole_model_slices(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``models`` entries of a file whose ``slices`` take whole models.

    Args:
      config: the mergekit file, with ``slices``.

    Returns:
      One ``{model, parameters}`` entry per source of its one slice.

    Raises:
      ConfigError: ``slices`` beside ``models``, more than one slice, a slice key other
        than ``sources``, a source that is not a whole model, or a ``base_model`` that is
        not a source, naming the key.
    """
    if "models" in config:
        raise ConfigError("'slices' and 'models' are given: give one of them")
    slices = config["slices"]
    if not isinstance(slices, list) or len(slices) != 1:
        raise ConfigError(
            "'slices': only one slice of whole models is supported (several slices stack "
            "layers into another architecture)"
        )
    piece = slices[0]
    if not isinstance(piece, dict) or set(piece) != {"sources"}:
        keys = sorted(piece, key=str) if isinstance(piece, dict) else piece
        raise ConfigError(f"'slices[0]' must be a mapping with 'sources' only, got {keys!r}")
    sources = piece["sources"]
    if not isinstance(sources, list) or not sources:
        raise ConfigError("'slices[0].sources' must be a non-empty list")
    models = []
    for i, source in enumerate(sources):
        where = f"slices[0].sources[{i}]"
        if not isinstance(source, dict) or "model" not in source or "layer_range" not in source:
            raise ConfigError(f"'{where}' must be a mapping with 'model' and 'layer_range'")
        unknown = set(source) - {"model", "layer_range", "parameters"}
        if unknown:
            raise ConfigError(f"'{where}': unsupported keys {sorted(unknown, key=str)}")
        layers = _layer_count(source["model"], where)
        span = source["layer_range"]
        if span != [0, layers]:
            raise ConfigError(
                f"'{where}.layer_range' is {span!r}, but only whole models are supported: "
                f"[0, {layers}] for {source['model']!r}"
            )
        models.append({k: v for k, v in source.items() if k != "layer_range"})
    from umtam_jax.cli._mergekit_models import same_model

    base = config.get("base_model")
    if isinstance(base, str) and not any(same_model(m["model"], base) for m in models):
        raise ConfigError(
            f"'base_model' {base!r} is not among 'slices[0].sources': mergekit merges a "
            "slice's sources only, so list the base model there too"
        )
    return models


def _layer_count(model: Any, where: str) -> int:
    """The number of layers a model folder's ``config.json`` gives."""
    if not isinstance(model, str):
        raise ConfigError(f"'{where}.model' must be a model path")
    from umtam_jax.checkpoint._model_files import read_config

    path = os.path.join(model, "config.json")
    try:  # a regular file of a bounded size (a FIFO would hang a plain open), valid JSON
        config = read_config(model)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"'{where}': cannot read the number of layers of {model!r} from {path} ({err})"
        ) from None
    for key in _LAYER_KEYS:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ConfigError(f"'{where}': {path} gives no number of layers ({', '.join(_LAYER_KEYS)})")
