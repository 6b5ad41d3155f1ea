"""Reporting: the merging results as a Markdown table and a plot, and sizes of pytrees.

:func:`format_table` and :func:`plot_merging` read the result of
:func:`~umtam_jax.experiments.pipeline.run_merging` (the JSON the demo and the benchmarks
write is that result as is); :func:`save_figure` writes any Matplotlib figure as a PNG,
atomically; :func:`tree_bytes` measures parameters and optimizer states.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from umtam_jax.experiments import store
from umtam_jax.experiments._outputs import check_replaceable, holds

__all__ = ["format_table", "plot_merging", "tree_bytes"]


def _norm_cell(r: Mapping[str, Any], split: str) -> str:
    ci = r.get(f"{split}_interval")
    if ci is None:
        return f"{r[split]['norm']:.3f}"
    return f"{r[split]['norm']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def format_table(result: Mapping[str, Any], split: str = "test") -> str:
    """A Markdown table: per-task metric, average, normalized average (merged/expert)
    with its 95 % interval over the split's examples when the result has one.

    Args:
        result: a merging run's result (``run_merging``'s), with ``experts``,
            ``expert_avg`` and ``methods``.
        split: the split shown.

    Returns:
        The table, one row for the experts and one per method.
    """
    tasks = list(result["experts"])
    head = ["Method", *tasks, "Avg", "Norm. avg [95 % CI]", "Chosen (on validation)"]
    rows = [
        [
            "Expert (upper bound)",
            *[f"{result['experts'][t][split]:.3f}" for t in tasks],
            f"{result['expert_avg'][split]:.3f}",
            "1.000",
            "",
        ]
    ]
    for r in result["methods"].values():
        s = r[split]
        hp = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["hparams"].items()
        )
        rows.append(
            [
                r["method"],
                *[f"{s[t]:.3f}" for t in tasks],
                f"{s['avg']:.3f}",
                _norm_cell(r, split),
                hp,
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot_merging(
    result: Mapping[str, Any], path: str | Path, title: str = "", *, overwrite: bool = False
) -> Path:
    """Bar charts of the test metric per task and of the normalized average per method
    (with its 95 % interval over test examples as error bars, when recorded).

    Args:
        result: a merging run's result, as :func:`format_table` takes.
        path: the PNG file to write (atomically; see :func:`save_figure`).
        title: the figure's title.
        overwrite: Replace a file at ``path`` that :func:`save_figure` did not write.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` holds a file :func:`save_figure` did not write (and not
            ``overwrite``), or is a symbolic link.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["experts"])
    rows = [("Expert", {**{t: result["experts"][t]["test"] for t in tasks}, "norm": 1.0})]
    rows += [(r["method"], r["test"]) for r in result["methods"].values()]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[2, 1])
    width = 0.8 / len(rows)
    x = np.arange(len(tasks))
    for i, (name, s) in enumerate(rows):
        a1.bar(x + i * width, [s[t] for t in tasks], width, label=name)
    a1.set_xticks(x + 0.4 - width / 2, tasks)
    a1.set_ylabel("test metric")
    a1.legend(fontsize=7, ncol=2)
    a1.set_ylim(0, 1)
    names = [n for n, _ in rows]
    norms = [s["norm"] for _, s in rows]
    cis = [None] + [r.get("test_interval") for r in result["methods"].values()]
    pairs = list(zip(norms, cis, strict=True))
    err = [
        [0.0 if c is None else v - c["low"] for v, c in pairs],
        [0.0 if c is None else c["high"] - v for v, c in pairs],
    ]
    a2.barh(names, norms, color="tab:blue", xerr=err, capsize=3)
    a2.axvline(1.0, color="k", lw=0.8)
    a2.set_xlabel("normalized avg (merged / expert), 95 % CI")
    a2.invert_yaxis()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, overwrite=overwrite)


# Written into every figure's PNG metadata: marks a file as one (an existing file without
# it is not replaced unless asked).
_FIGURE_SOURCE = "umtam_jax.experiments.reporting.save_figure"


def save_figure(fig: Any, path: str | Path, *, overwrite: bool = False) -> Path:
    """Lays out a Matplotlib figure, writes it as a PNG atomically, and closes it.

    The file appears whole or not at all (a crash leaves any earlier file as it was), and
    the figure is closed even when writing fails. The PNG's metadata names this function
    (``Source``): a file there that does not is not replaced unless ``overwrite``.

    Args:
        fig: a ``matplotlib.figure.Figure``.
        path: the PNG file to write.
        overwrite: Replace a file at ``path`` that this function did not write.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` holds a file this function did not write (and not
            ``overwrite``), or is a symbolic link.

    Example:
      >>> import os, tempfile
      >>> import matplotlib
      >>> matplotlib.use("Agg")
      >>> import matplotlib.pyplot as plt
      >>> from umtam_jax.experiments.reporting import save_figure
      >>> fig, ax = plt.subplots()
      >>> _ = ax.plot([0, 1], [1, 0])
      >>> path = save_figure(fig, os.path.join(tempfile.mkdtemp(), "line.png"))
      >>> path.read_bytes()[:4], plt.fignum_exists(fig.number)
      (b'\x89PNG', False)
    """
    import matplotlib.pyplot as plt

    meta = {"Source": _FIGURE_SOURCE}
    try:
        ours = holds(b"tEXtSource\x00" + _FIGURE_SOURCE.encode())
        check_replaceable(path, ours, overwrite=overwrite, what="the figure",
                          how="pass overwrite=True")  # fmt: skip
        fig.tight_layout()
        return store.write_atomic(
            path, lambda f: fig.savefig(f, dpi=110, format="png", metadata=meta)
        )
    finally:
        plt.close(fig)


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of a pytree.

    Args:
        tree: A pytree of JAX or NumPy arrays (or array-likes).

    Returns:
        The sum of the leaves' ``nbytes``.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from umtam_jax.experiments.reporting import tree_bytes
      >>> tree_bytes({"a": jnp.zeros((2, 3)), "b": np.zeros(4, np.int8)})  # 24 + 4
      28
    """
    return int(
        sum(
            np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes
            for x in jax.tree.leaves(tree)
        )
    )
