"""Shared helpers of the benchmarks: synthetic pytrees, the environment record and the
Student-t interval over seeds (:func:`t_interval`). The records they write go through
:mod:`benchmarks._records`.

Run the benchmarks as modules from the repository root, e.g.
``python -m benchmarks.step_time --quick``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: The repository root (the folder holding ``benchmarks/``).
ROOT = Path(__file__).resolve().parent.parent
#: Default output folder of :func:`write_results` (``benchmarks/results``).
RESULTS_DIR = ROOT / "benchmarks" / "results"

#: Lean UMTAM (``umtam_jax.umtam`` options): no m×n momentum buffer, saliency computed
#: from the final state; the low-memory setting every benchmark compares.
LEAN_UMTAM: dict[str, Any] = {"error_decay": 0.0, "saliency": "final"}

_PACKAGES = ("umtam-jax", "jax", "jaxlib", "optax", "flax", "orbax-checkpoint", "numpy")


def gpt2_params(blocks: int, d: int = 768, *, seed: int = 0, dtype=np.float32) -> dict[str, Any]:
    """GPT-2-shaped transformer blocks (no embeddings) as a nested dict of NumPy arrays.

    Per block: ``ln_1``/``ln_2`` (scale, bias), ``attn.c_attn`` (d, 3d) + bias, ``attn.c_proj``
    (d, d) + bias, ``mlp.c_fc`` (d, 4d) + bias, ``mlp.c_proj`` (4d, d) + bias; plus a final
    ``ln_f``. At d = 768 a block has 7,087,872 parameters: 4 blocks ≈ 28.4M (the reference
    pytree of the update-time targets in ``docs/performance.md``), 12 blocks ≈ 85.1M (GPT-2
    small without its embeddings).
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


def t_interval(xs: list[float | None]) -> dict[str, float | int | None]:
    """Mean of ``xs`` with its 95 % Student-t interval (n − 1 degrees of freedom).

    ``None`` and non-finite values are dropped. With one value the interval's ends are
    None; with none the estimate is None too.

    Returns:
        ``{"estimate", "low", "high", "n"}``.
    """
    from umtam_jax.experiments import intervals  # here: see _atomic_write

    x = [v for v in xs if v is not None and math.isfinite(v)]
    if len(x) < 2:
        mean = float(x[0]) if x else None
        return {"estimate": mean, "low": None, "high": None, "n": len(x)}
    c = intervals.student_t(x)
    return {"estimate": c.estimate, "low": c.low, "high": c.high, "n": len(x)}


def format_interval(c: dict[str, Any], f: str = "{:.3f}") -> str:
    """A :func:`t_interval` as ``mean [low, high]`` with format ``f`` (the mean alone for
    one value, ``–`` for none).

    Example:
        >>> format_interval({"estimate": 1.0, "low": 0.5, "high": 1.5, "n": 3}, "{:+.1f}")
        '+1.0 [+0.5, +1.5]'
    """
    if c["estimate"] is None:
        return "–"
    if c["low"] is None:
        return f.format(c["estimate"])
    return f"{f.format(c['estimate'])} [{f.format(c['low'])}, {f.format(c['high'])}]"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- provenance


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


def command() -> str:
    """This process's command line as it is run from the repository root:
    ``python -m benchmarks.<name> ARGS`` for a benchmark run as a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    args = sys.argv[1:]
    if spec is not None and spec.name:
        head = ["python", "-m", spec.name.removesuffix(".__main__")]
    else:
        script = sys.argv[0] if sys.argv else ""
        if script and Path(script).is_absolute():
            with contextlib.suppress(ValueError):
                script = str(Path(script).relative_to(ROOT))
        head = ["python", script] if script else ["python"]
    return " ".join(head + [shlex.quote(a) for a in args])


def git_commit() -> dict[str, Any]:
    """The checkout's commit, and whether tracked files differ from it (``None`` outside a
    git checkout). The benchmarks' own outputs (``benchmarks/results``, ``RESULTS.md``)
    do not count: a run that has written its figure is still running committed code."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(ROOT), *args],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    outputs = [
        f":(exclude){p.relative_to(ROOT)}" for p in (RESULTS_DIR, RESULTS_DIR.parent / "RESULTS.md")
    ]
    status = (
        git("status", "--porcelain", "--untracked-files=no", "--", ".", *outputs) if head else None
    )
    return {"commit": head, "dirty": None if status is None else bool(status)}


#: The checkout's commit when the benchmarks were imported: the code this process runs,
#: whatever the checkout holds by the time a long run writes its record.
CODE_GIT = git_commit()


def _versions() -> dict[str, str | None]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """What a result depends on: machine and device, package versions, load at the start.

    A benchmark may call it at its start (to use or extend the record) and hand it to
    :func:`write_results`; otherwise the writer calls it.
    """
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": _versions(),
        "cpu": cpu_info(),
        "loadavg_start": list(os.getloadavg()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import jax

        env["backend"] = jax.default_backend()
        env["devices"] = [str(d) for d in jax.devices()]
        env["device_kind"] = jax.devices()[0].device_kind
    except Exception as e:  # pragma: no cover - provenance only
        env["backend"] = f"unavailable ({type(e).__name__})"
    return env
