"""Saliency vs magnitude pruning of UMTAM-trained experts (paper Table 1 / Fig. 3), every
seed of the evaluation protocol, with 95 % intervals.

Runs (or resumes) :func:`umtam_jax.experiments.pruning.run_pruning` on the experts of a
protocol work directory (trained there if missing: the same experts as the merging
table) and summarizes it with :func:`~umtam_jax.experiments.pruning.summarize_pruning`:
per density, each ranking's normalized test score and the paired difference
saliency − magnitude; per (task, density), the difference on the task's metric with its
verdict. Densities are fixed, so nothing is tuned and only the test split is predicted.

    python -m benchmarks.pruning --size medium --workdir protocol-medium
    python -m benchmarks.pruning --size tiny --workdir /tmp/p --no-write   # smoke run

Writes ``benchmarks/results/pruning.json``, ``pruning.png`` and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, environment
from benchmarks._records import write_results
from umtam_jax.experiments import pruning as study
from umtam_jax.experiments.pipeline import enable_compilation_cache
from umtam_jax.experiments.protocol import SIZES
from umtam_jax.experiments.reporting import save_figure


def _ci(c: dict[str, Any], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(c['estimate'])} [{f.format(c['low'])}, {f.format(c['high'])}]"


def _markdown(run: dict[str, Any], summary: dict[str, Any], size: str) -> str:
    dens = [f"{d:g}" for d in run["densities"]]
    head = ["", *[f"{100 * float(d):g} %" for d in dens]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ranking in study.RANKINGS:
        cells = [_ci(summary["mean"][d][ranking]) for d in dens]
        lines.append(f"| {ranking} (normalized) | " + " | ".join(cells) + " |")
    diff = [summary["mean"][d]["difference"] for d in dens]
    lines.append(
        "| saliency − magnitude | "
        + " | ".join(f"{_ci(c, True)} **{c['verdict']}**" for c in diff)
        + " |"
    )
    task_lines = ["| " + " | ".join(["Task (metric)", *head[1:]]) + " |", "|" + "---|" * len(head)]
    for t in run["tasks"]:
        cells = []
        for d in dens:
            c = summary["per_task"][t][d]
            rel = c["relative"]
            cells.append(
                f"{c['saliency']['estimate']:.3f} vs {c['magnitude']['estimate']:.3f}: "
                f"{rel['estimate']:+.1f} % [{rel['low']:+.1f}, {rel['high']:+.1f}] "
                f"{c['difference']['verdict']}"
            )
        task_lines.append(f"| {t} ({run['metrics'][t]['metric']}) | " + " | ".join(cells) + " |")
    n, k = summary["counts"], sum(summary["counts"].values())
    base = summary["reference"]["base"]
    return (
        f"Protocol size **{size}**: the experts of `python -m umtam_jax.experiments.protocol "
        f"--size {size}` ({len(run['seeds'])} seeds; each seed is the training and data-split "
        f"seed), tasks {', '.join(run['tasks'])}. Each expert's encoder task vector is pruned "
        "per tensor to the density by the saliency S saved during training or by |Δ|; the "
        "rest reverts to the pretrained encoder; the task keeps its head. Test split only "
        "(nothing is tuned). Normalized = score ÷ the seed's expert score, averaged over "
        "seeds and tasks; 95 % Student-t intervals over the seeds (paired differences per "
        "seed).\n\n"
        + "\n".join(lines)
        + f"\n\nPretrained encoder with the fine-tuned heads (0 %): {_ci(base)} normalized.\n\n"
        "Per task (raw metric, saliency vs magnitude, difference in % of magnitude's "
        "score, verdict of the paired interval):\n\n"
        + "\n".join(task_lines)
        + f"\n\nSaliency better in {n['better']}, tied in {n['tied']}, worse in {n['worse']} "
        f"of {k} (task, density) cells. Prediction time {run['seconds']:.0f} s (0 when "
        "every prediction came from the cache).\n\n![pruning](results/pruning.png)\n"
    )


def _plot(run: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = ["mean", *run["tasks"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.3), squeeze=False)
    x = [100 * d for d in run["densities"]]
    for ax, t in zip(axes[0], tasks, strict=True):
        cells = summary["mean"] if t == "mean" else summary["per_task"][t]
        for ranking, style in zip(study.RANKINGS, ("o-", "s--"), strict=True):
            c = [cells[f"{d:g}"][ranking] for d in run["densities"]]
            y = [v["estimate"] for v in c]
            err = [[v["estimate"] - v["low"] for v in c], [v["high"] - v["estimate"] for v in c]]
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=ranking)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_xlabel("density (%)")
        metric = "normalized" if t == "mean" else run["metrics"][t]["metric"]
        ax.set_title(f"{t} ({metric})", fontsize=9)
    axes[0][0].set_ylabel("test score, 95 % CI")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path, overwrite=True)  # this benchmark's own figure


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium", choices=sorted(SIZES))
    ap.add_argument("--quick", action="store_true", help="the tiny size (a smoke run, seconds)")
    ap.add_argument("--workdir", default="protocol-medium", help="the protocol work directory")
    ap.add_argument("--samples", type=int, default=None, help="bootstrap replicates")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.quick:
        args.size = "tiny"
    env = environment()
    workdir = Path(args.workdir)
    enable_compilation_cache(workdir / "jax-cache")
    run = study.run_pruning(workdir, size=args.size, log=lambda s: print(s, flush=True))
    samples = args.samples or SIZES[args.size].bootstrap_samples
    summary = study.summarize_pruning(workdir, run, samples=samples)
    md = _markdown(run, summary, args.size)
    print(md)
    if not args.no_write:
        out = Path(args.results_dir)
        _plot(run, summary, out / "pruning.png")
        payload = {**run, "summary": summary, "samples": samples}
        write_results("pruning", payload, md, results_dir=out, title="pruning (Table 1 / Fig. 3)",
                      env=env)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
