"""Saliency vs magnitude pruning of UMTAM-trained experts (paper Table 1 / Fig. 3).

Per task, the UMTAM-trained MiniLM expert's *encoder* task vector ``w − w0`` is pruned to
1, 5, 10, 20 and 40 % density per tensor with :func:`umtam_jax.merging.prune`, ranking
entries either by the optimizer's saliency ``S`` (its statistics) or by ``|w − w0|``
(magnitude); the rest revert to the pretrained ``w0``. The task's fine-tuned head is kept.
The metric is the task's own, on the test split (densities are fixed, nothing is tuned).
The experts are the ``umtam-demo`` ones (same presets), trained or restored from
``--workdir``.

    python -m benchmarks.pruning --quick --workdir umtam-demo-work   # demo experts
    python -m benchmarks.pruning --workdir umtam-demo-work           # full-size experts

Writes ``benchmarks/results/pruning.json``, ``pruning.png`` and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS_DIR, write_results  # noqa: E402
from umtam_jax import experiments as E  # noqa: E402
from umtam_jax import merging  # noqa: E402
from umtam_jax.experiments import data as data_lib  # noqa: E402

DENSITIES = (0.01, 0.05, 0.10, 0.20, 0.40)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="demo-size experts (umtam-demo preset)")
    ap.add_argument("--workdir", default="umtam-demo-work")
    ap.add_argument("--tasks", default=",".join(E.DEFAULT_TASKS))
    data_lib.add_task_import_option(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    data_lib.import_task_modules(args.imports)
    tasks = [t for t in args.tasks.split(",") if t]
    config = dataclasses.replace(E.QUICK if args.quick else E.FULL, seed=args.seed)
    workdir = Path(args.workdir)
    E.enable_compilation_cache(workdir / "jax_cache")
    t0 = time.perf_counter()
    base, ttasks, experts = E.prepare_experts(
        tasks,
        config,
        workdir,
        optimizer_kwargs=E.DEMO_UMTAM_KWARGS,
        progress=not args.no_progress,
    )
    rows = {}
    for e in experts:
        tt = ttasks[e.task]
        head = e.params["head"]
        enc = e.params["encoder"]
        r = {
            "expert": e.scores["test"],
            "base_encoder": E.evaluate_params({"encoder": base, "head": head}, tt, "test", config),
            "saliency": {},
            "magnitude": {},
        }
        for d in DENSITIES:
            for how, scores in (("saliency", e.statistics["encoder"]), ("magnitude", None)):
                pruned = merging.prune(base, enc, scores, density=d)
                r[how][str(d)] = E.evaluate_params(
                    {"encoder": pruned, "head": head}, tt, "test", config
                )
        rows[e.task] = r
        print(e.task, {k: v for k, v in r.items()})
    seconds = time.perf_counter() - t0

    mean = {
        how: {str(d): float(np.mean([rows[t][how][str(d)] for t in tasks])) for d in DENSITIES}
        for how in ("saliency", "magnitude")
    }
    head = ["Task (metric)", "Scores", *[f"{d:.0%}" for d in DENSITIES], "100 % (expert)", "0 %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in [*tasks, "mean"]:
        for how in ("saliency", "magnitude"):
            if t == "mean":
                vals = [mean[how][str(d)] for d in DENSITIES]
                ex = np.mean([rows[x]["expert"] for x in tasks])
                b0 = np.mean([rows[x]["base_encoder"] for x in tasks])
                name = "mean"
            else:
                vals = [rows[t][how][str(d)] for d in DENSITIES]
                ex, b0 = rows[t]["expert"], rows[t]["base_encoder"]
                name = f"{t} ({ttasks[t].task.metric})"
            lines.append(
                f"| {name} | {how} | "
                + " | ".join(f"{v:.3f}" for v in vals)
                + f" | {ex:.3f} | {b0:.3f} |"
            )
    wins = sum(
        rows[t]["saliency"][str(d)] > rows[t]["magnitude"][str(d)] for t in tasks for d in DENSITIES
    )
    ties_ = sum(
        rows[t]["saliency"][str(d)] == rows[t]["magnitude"][str(d)]
        for t in tasks
        for d in DENSITIES
    )
    n = len(tasks) * len(DENSITIES)
    mode = "quick (umtam-demo experts)" if args.quick else "full-size experts"
    md = (
        f"Encoder task vector of each UMTAM-trained expert pruned per tensor to the given "
        f"density (rest reverted to the pretrained MiniLM), by saliency S vs by |Δ|; "
        f"fine-tuned head kept; test split ({mode}: {config.steps} steps, "
        f"≤{config.max_eval} test examples/task). 0 % = pretrained encoder with the "
        f"fine-tuned head.\n\n"
        + "\n".join(lines)
        + f"\n\nSaliency beats magnitude in {wins}/{n} (task, density) cells, ties in {ties_}."
        f" Wall time {seconds:.0f}s.\n\n![pruning](results/pruning.png)\n"
    )
    out = Path(args.results_dir)
    _plot(rows, tasks, ttasks, out / "pruning.png")
    payload = {
        "mode": "quick" if args.quick else "full",
        "densities": list(DENSITIES),
        "config": {**dataclasses.asdict(config), "config": None},
        "umtam_kwargs": E.DEMO_UMTAM_KWARGS,
        "per_task": rows,
        "mean": mean,
        "saliency_wins": wins,
        "ties": ties_,
        "cells": n,
        "seconds": seconds,
        "experts": {e.task: str(e.path.name) for e in experts},
    }
    write_results("pruning", payload, md, results_dir=out, title="pruning (Table 1 / Fig. 3)")
    print(md)
    return 0


def _plot(rows, tasks, ttasks, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    x = [100 * d for d in DENSITIES]
    for ax, t in zip(axes[0], tasks, strict=True):
        r = rows[t]
        ax.plot(x, [r["saliency"][str(d)] for d in DENSITIES], "o-", label="saliency")
        ax.plot(x, [r["magnitude"][str(d)] for d in DENSITIES], "s--", label="magnitude")
        ax.axhline(r["expert"], color="k", lw=0.8, label="expert")
        ax.axhline(r["base_encoder"], color="gray", lw=0.8, ls=":", label="0 %")
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_xlabel("density (%)")
        ax.set_title(f"{t} ({ttasks[t].task.metric})", fontsize=9)
    axes[0][0].set_ylabel("test metric")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
