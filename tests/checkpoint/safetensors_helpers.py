"""Shared by the safetensors tests (``test_safetensors_*.py``): a small tree of mixed
dtypes and a folder's tensors read back by name."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from umtam_jax.checkpoint import SafetensorsReader

BF16 = ml_dtypes.bfloat16


def small_tree() -> dict:
    rng = np.random.default_rng(0)
    return {
        "enc": {
            "layer": {
                "0": {
                    "w": rng.normal(size=(3, 4)).astype(BF16),
                    "b": np.arange(4, dtype=np.float32),
                },
                "1": {
                    "w": rng.normal(size=(3, 4)).astype(BF16),
                    "b": -np.arange(4, dtype=np.float32),
                },
            }
        },
        "head": {"k": rng.normal(size=(4, 2)).astype(np.float32), "step": np.array(7, np.int64)},
    }


def read_all(folder) -> dict[str, np.ndarray]:
    reader = SafetensorsReader(folder)
    return dict(zip(reader.names, reader.read(reader.names), strict=True))
