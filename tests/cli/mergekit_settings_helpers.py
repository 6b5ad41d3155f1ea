"""The small safetensors models, of ``LAYERS`` decoder layers, that the tests of mergekit's
values by tensor (``test_mergekit_tensor_*.py``) merge."""

from __future__ import annotations

import json

import numpy as np

from umtam_jax import checkpoint

LAYERS = 4


def _model(root, name, seed):
    """A model saved as safetensors at ``root / name`` with its ``config.json``; its
    tensors by name."""
    rng = np.random.default_rng(seed)
    names = {"model.embed_tokens.weight": (6, 4), "model.norm.weight": (4,)}
    for i in range(LAYERS):
        names[f"model.layers.{i}.self_attn.q_proj.weight"] = (4, 4)
        names[f"model.layers.{i}.mlp.up_proj.weight"] = (5, 4)
    flat = {k: rng.normal(size=s).astype(np.float32) for k, s in names.items()}
    source = root / f"{name}-files"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"num_hidden_layers": LAYERS}))
    checkpoint.save_safetensors(
        root / name, checkpoint.tree_from_names(flat), copy_files_from=source
    )
    return flat
