"""Shared by the mergekit configuration tests: one ``umtam-merge`` run of a mergekit file
naming the checkpoints of the ``models`` fixture (conftest.py), and its restored output."""

from __future__ import annotations

import textwrap

import jax
import numpy as np

from umtam_jax import checkpoint
from umtam_jax.cli.merge import main

# float32 outputs against the float64 reference by path.
TOL = {"rtol": 1e-5, "atol": 1e-6}


def run(tmp_path, models, text, *flags):
    p = models["paths"]
    config = tmp_path / "mergekit.yaml"
    config.write_text(textwrap.dedent(text).format(**p))
    out = tmp_path / "out"
    status = main([str(config), "--output", str(out), "--no-progress", *flags])
    return status, out


def restored(out):
    """The merge's output as NumPy arrays."""
    return jax.tree.map(np.asarray, checkpoint.restore_params(out))
