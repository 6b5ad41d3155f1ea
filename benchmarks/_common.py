"""Shared helpers of the benchmarks: synthetic pytrees, environment record, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def gpt2_params(blocks: int, d: int = 768, *, seed: int = 0, dtype=np.float32) -> dict[str, Any]:
    """GPT-2-shaped transformer blocks (no embeddings) as a nested dict of NumPy arrays.

    Per block: ``ln_1``/``ln_2`` (scale, bias), ``attn.c_attn`` (d, 3d) + bias, ``attn.c_proj``
    (d, d) + bias, ``mlp.c_fc`` (d, 4d) + bias, ``mlp.c_proj`` (4d, d) + bias; plus a final
    ``ln_f``. At d = 768 a block has 7,087,872 parameters: 4 blocks ≈ 28.4M (the reference
    pytree of the update-time targets in ``PERFORMANCE.md``), 12 blocks ≈ 85.1M (GPT-2 small
    without its embeddings).
    Kernels are (fan-in, fan-out), as Flax ``Dense`` stores them.
    """
    rng = np.random.default_rng(seed)

    def dense(fan_in, fan_out):
        return {
            "kernel": (rng.standard_normal((fan_in, fan_out), np.float32) * 0.02).astype(dtype),
            "bias": np.zeros(fan_out, dtype),
        }

    def norm():
        return {"scale": np.ones(d, dtype), "bias": np.zeros(d, dtype)}

    params: dict[str, Any] = {}
    for i in range(blocks):
        params[f"h{i}"] = {
            "ln_1": norm(),
            "attn": {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)},
            "ln_2": norm(),
            "mlp": {"c_fc": dense(d, 4 * d), "c_proj": dense(4 * d, d)},
        }
    params["ln_f"] = norm()
    return params


def like(params: Any, *, seed: int, scale: float = 1e-3) -> Any:
    """A pytree of Gaussian arrays shaped like ``params`` (synthetic gradients, deltas)."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: (rng.standard_normal(p.shape, np.float32) * scale).astype(p.dtype), params
    )


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of a pytree (``None`` and Python scalars count 0)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        nbytes = getattr(leaf, "nbytes", None)
        if nbytes is not None:
            total += int(nbytes)
    return total


def tree_size(tree: Any) -> int:
    import jax

    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
    }


def environment() -> dict[str, Any]:
    """What a result depends on: command, versions, CPU/device, date, load."""
    import jax
    import jaxlib
    import optax

    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu": cpu_info(),
        "loadavg_start": list(os.getloadavg()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` atomically; a file in ``benchmarks/results`` also refreshes
    ``benchmarks/RESULTS.md`` (a file written elsewhere touches nothing else)."""
    from _report import regenerate_results_md

    payload.setdefault("environment", {})["loadavg_end"] = list(os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    if path.resolve().parent == RESULTS:
        regenerate_results_md(RESULTS)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
