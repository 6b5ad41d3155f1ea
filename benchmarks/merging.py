"""Multi-task merging under the evaluation protocol (paper Tables 2 and 3), with 95 %
intervals: every method, UMTAM's ablations and normalize modes, per-merge diagnostics, and
the alternative pipeline (AdamW-trained experts).

Runs (or resumes) :func:`umtam_jax.experiments.evaluate_merges` in a protocol work
directory (UMTAM-trained experts, every compared method) and, with ``--adamw-workdir``,
in a second one whose experts are trained with AdamW (the methods that need UMTAM
statistics left out). Then reports:

1. the table of normalized test scores with intervals and paired differences against
   UMTAM and task arithmetic (better / worse / tied), the budget and open grid edges;
2. the diagnostics of each merge (:mod:`umtam_jax.merging.diagnostics`): sign-conflict
   rate between the experts, mean mask overlap, how far the per-entry expert weights are
   from uniform, the merged task vector's norm and its cosine with each expert's;
3. with ``--conflict``, every pair of tasks merged by UMTAM, TIES and task arithmetic
   with the same experts: each pair's sign-conflict rate beside the methods' gains
   (:func:`umtam_jax.experiments.conflict.conflict_study`);
4. the AdamW-experts table, and the two pipelines compared on raw test scores
   (:func:`umtam_jax.experiments.comparison.compare_runs`): UMTAM experts merged by UMTAM
   and by the single-model merge with the best validation score, against AdamW experts
   merged by each method (the one with the best validation score marked);
5. with ``--memory-modes``, experts trained in UMTAM's memory modes (no m×n momentum
   buffer and saliency from the final state: ``umtam_lean``; bfloat16 buffers:
   ``umtam_bf16``; each in ``<workdir>-<mode>``) merged by UMTAM, TIES and task
   arithmetic, and their UMTAM merge against the default mode's on raw test scores.

    python -m benchmarks.merging --size medium --workdir protocol-medium \\
        --adamw-workdir protocol-medium-adamw --memory-modes umtam_lean
    python -m benchmarks.merging --quick --workdir /tmp/m --no-write   # tiny smoke run

Writes ``benchmarks/results/merging.json``, ``merging.png`` and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS_DIR, environment
from benchmarks._records import write_results
from umtam_jax.experiments import store
from umtam_jax.experiments.comparison import MergeTable, compare_runs
from umtam_jax.experiments.conflict import conflict_study
from umtam_jax.experiments.pipeline import enable_compilation_cache
from umtam_jax.experiments.protocol import EXPERT_RECIPES, SIZES, evaluate_merges
from umtam_jax.experiments.reporting import save_figure
from umtam_jax.experiments.spaces import PER_TASK
from umtam_jax.merging.diagnostics import KEPT_DENSITY


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _off_diagonal_mean(matrix: list[list[float | None]]) -> float | None:
    return _mean([v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j])


def diagnostics_summary(results: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """Per method, the seed means of the merge diagnostics' headline numbers."""
    out: dict[str, Any] = {}
    for m in methods:
        recs = [r.get("diagnostics") or {} for r in results["runs"].get(m, {}).values()]
        recs = [d for d in recs if "skipped" not in d]
        if not recs:
            continue
        dn = [d.get("delta_norms") or {} for d in recs]
        out[m] = {
            "sign_conflict": _mean([(d.get("sign_conflict") or {}).get("rate") for d in recs]),
            "mask_jaccard": _mean(
                [
                    _off_diagonal_mean(d["mask_overlap"]["jaccard"])
                    for d in recs
                    if d.get("mask_overlap")
                ]
            ),  # fmt: skip
            "weight_tv": _mean([(d.get("weight_spread") or {}).get("tv") for d in recs]),
            "norm_ratio": _mean([x.get("ratio") for x in dn]),
            "cosine": _mean([_mean(x.get("cosine") or []) for x in dn]),
        }
    return out


def _fmt(x: float | None, f: str = "{:.2f}") -> str:
    return "–" if x is None else f.format(x)


def _diagnostics_md(summary: dict[str, Any], table: MergeTable) -> str:
    head = ["Method", "Norm. score", "Mask Jaccard", "Weights' TV from uniform",
            "‖merged‖ / mean ‖expert‖", "Cosine with experts"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(table.rows, key=lambda r: -r["score"]):
        d = summary.get(r["method"])
        if d is None:
            continue
        cells = [r["name"], f"{r['score']:.3f}", _fmt(d["mask_jaccard"]), _fmt(d["weight_tv"]),
                 _fmt(d["norm_ratio"]), _fmt(d["cosine"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    rate = _mean([d["sign_conflict"] for d in summary.values()])
    return (
        "Sign-conflict rate between the experts (among entries where at least two task "
        "vectors are non-zero, the share whose non-zero entries do not all share one sign; "
        f"seed mean): {_fmt(rate, '{:.3f}')}. The per-task methods (EMR, TALL "
        "masks) have no single merged model and are left out.\n\n" + "\n".join(lines)
    )


def _experts_md(results: dict[str, Any]) -> str:
    tasks = results["protocol"]["tasks"]
    cells = []
    for t in tasks:
        xs = [results["experts"][s][t]["test"] for s in results["experts"]]
        steps = [results["experts"][s][t]["best_step"] for s in results["experts"]]
        cells.append(f"{t} {np.mean(xs):.3f} (seeds {min(xs):.3f}–{max(xs):.3f}, best step "
                     f"{min(steps)}–{max(steps)})")  # fmt: skip
    return "Experts' test scores (the normalizers): " + "; ".join(cells) + "."


def _pipelines(umtam_dir: Path, adamw_dir: Path, umtam: dict, adamw: dict, samples: int) -> list:
    """UMTAM experts (merged by UMTAM, and by the method chosen on validation) minus
    AdamW experts merged by every method, on raw test scores."""

    def finished(results: dict[str, Any]) -> dict[str, float]:
        """Mean validation score of every method finished for every seed."""
        return {m: float(np.mean([r["validation_norm"] for r in runs.values()]))
                for m, runs in results["runs"].items()
                if set(runs) >= set(results["experts"])}  # fmt: skip

    def best(done: dict[str, float]) -> str:  # a single merged model, not one per task
        single = {m: v for m, v in done.items() if m not in PER_TASK}
        return max(single, key=single.get)

    done_u, done_a = finished(umtam), finished(adamw)
    best_u, best_a = best(done_u), best(done_a)
    rows = []
    for left in dict.fromkeys(("umtam", best_u)):
        for right in done_a:
            d = compare_runs((umtam_dir, left), (adamw_dir, right), samples=samples)
            rows.append({"umtam_experts": left, "adamw_experts": right, **d.as_dict(),
                         "chosen": (left == best_u, right == best_a)})  # fmt: skip
    return rows


def _pipelines_md(rows: list, umtam: dict, adamw: dict) -> str:
    def name(results: dict[str, Any], m: str) -> str:
        return next(iter(results["runs"][m].values()))["name"]

    lines = ["| UMTAM experts merged by | AdamW experts merged by | Δ raw test score [95 % CI] |",
             "|---|---|---|"]  # fmt: skip
    for r in rows:
        mark = [" (chosen on validation)" if c else "" for c in r["chosen"]]
        lines.append(
            f"| {name(umtam, r['umtam_experts'])}{mark[0]} | {name(adamw, r['adamw_experts'])}"
            f"{mark[1]} | {r['estimate']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] "
            f"{r['verdict']} |"
        )
    return "\n".join(lines)


#: The experts' memory modes ``--memory-modes`` accepts, and the methods merging them.
MEMORY_MODES = tuple(k for k in EXPERT_RECIPES if k.startswith("umtam_"))
MEMORY_METHODS = ("umtam", "ties", "task_arithmetic")


def _memory_md(mode: str, table: MergeTable, results: dict, vs_default: Any) -> str:
    settings = EXPERT_RECIPES[mode][1]
    return "\n".join([
        f"#### Experts trained in the memory mode `{mode}` ({settings})",
        "",
        _experts_md(results),
        "",
        table.to_markdown(),
        "",
        f"UMTAM merge of these experts − UMTAM merge of the default-mode experts (raw test "
        f"score, paired): {vs_default.estimate:+.3f} [{vs_default.low:+.3f}, "
        f"{vs_default.high:+.3f}] {vs_default.verdict()}.",
    ])  # fmt: skip


def conflict_table_md(pairs: list[dict[str, Any]], methods: list[str]) -> str:
    """The Markdown table of conflict-study rows: each pair (its ``label`` if it has one)
    with its rates and each method's gain over task arithmetic, interval and verdict."""
    methods = [m for m in methods if m != "task_arithmetic"]
    head = ["Task pair", "Sign-conflict rate", "Magnitude at conflicts",
            "Rate among kept entries", *[f"{m} − task arithmetic" for m in methods]]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in pairs:
        gains = [r[f"gain_{m}"] for m in methods]
        lines.append(
            f"| {r.get('label') or ' + '.join(r['tasks'])} | {r['conflict']:.3f} | "
            f"{_fmt(r.get('conflict_mass'), '{:.3f}')} | "
            f"{_fmt(r.get('conflict_kept'), '{:.3f}')} | "
            + " | ".join(
                f"{g['estimate']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] {g['verdict']}"
                for g in gains
            )  # fmt: skip
            + " |"
        )
    return "\n".join(lines)


def _conflict_md(study: dict[str, Any]) -> str:
    rho = ", ".join(f"{m} {_fmt(v, '{:+.2f}')}" for m, v in study["spearman"].items())
    kept = study.get("spearman_kept") or {}
    rho_kept = ", ".join(f"{m} {_fmt(v, '{:+.2f}')}" for m, v in kept.items())
    return (
        "Every pair of tasks merged under the protocol with the same experts (seeds "
        f"{', '.join(map(str, study['seeds']))}); gains are paired differences of normalized "
        "test scores with 95 % intervals. The rate among kept entries counts only the top "
        f"{KEPT_DENSITY:.0%} of each task vector's entries by magnitude per leaf (TIES's "
        "trim). Spearman correlation between a pair's conflict rate and each gain over the "
        f"{len(study['pairs'])} pairs: {rho}; with the rate among kept entries: "
        f"{rho_kept or 'not recorded'}.\n\n" + conflict_table_md(study["pairs"], study["methods"])
    )


def _plot(tables: dict[str, MergeTable], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(2.5, 0.26 * len(t.rows)) for t in tables.values()]
    fig, axes = plt.subplots(len(tables), 1, figsize=(7.5, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)  # fmt: skip
    for ax, (title, t) in zip(axes[:, 0], tables.items(), strict=True):
        rows = sorted(t.rows, key=lambda r: r["score"])
        y = np.arange(len(rows))
        x = [r["score"] for r in rows]
        err = [[r["score"] - r["low"] for r in rows], [r["high"] - r["score"] for r in rows]]
        colors = ["C3" if r["method"].startswith("umtam") else "C0" for r in rows]
        ax.barh(y, x, color=colors, alpha=0.35)
        ax.errorbar(x, y, xerr=err, fmt="none", ecolor="k", capsize=2, lw=0.8)
        ax.set_yticks(y, [r["name"] for r in rows], fontsize=7)
        ax.set_xlim(max(0.0, min(r["low"] for r in rows) - 0.05), 1.02)
        ax.axvline(1.0, color="gray", lw=0.6, ls=":")
        ax.set_title(f"{title}: {len(t.seeds)} seeds, 95 % CI", fontsize=9)
    axes[-1, 0].set_xlabel("normalized test score (merged / expert)")
    save_figure(fig, path, overwrite=True)  # this benchmark's own figure


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium", choices=sorted(SIZES))
    ap.add_argument("--quick", action="store_true", help="the tiny size (a smoke run)")
    ap.add_argument("--workdir", default="protocol-medium", help="UMTAM experts' protocol run")
    ap.add_argument("--adamw-workdir", default=None, help="AdamW experts' protocol run")
    ap.add_argument("--adamw-methods", nargs="+", default=None,
                    help="methods on the AdamW experts (default: every usable one)")  # fmt: skip
    ap.add_argument("--conflict", action="store_true",
                    help="also merge every pair of tasks: conflict rate vs gains")  # fmt: skip
    ap.add_argument("--conflict-tasks", nargs="+", default=None,
                    help="tasks whose pairs --conflict merges (default: the size's)")  # fmt: skip
    ap.add_argument("--memory-modes", nargs="+", default=[], choices=MEMORY_MODES,
                    help="also merge experts trained in these memory modes")  # fmt: skip
    ap.add_argument("--samples", type=int, default=None, help="bootstrap replicates")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    size = SIZES["tiny" if args.quick else args.size]
    samples = args.samples or size.bootstrap_samples
    env = environment()
    workdir = Path(args.workdir)
    enable_compilation_cache(workdir / "jax-cache")
    log = lambda s: print(s, flush=True)  # noqa: E731
    table = evaluate_merges(size=size, workdir=workdir, samples=samples, log=log)
    if args.adamw_workdir:  # both pipelines evaluated before any report is assembled
        atable = evaluate_merges(
            methods=args.adamw_methods, size=size, workdir=Path(args.adamw_workdir),
            samples=samples, experts_by="adamw", references=("task_arithmetic", "ties"),
            log=log,
        )  # fmt: skip
    mode_dirs = {mode: Path(f"{args.workdir}-{mode}") for mode in args.memory_modes}
    mtables = {
        mode: evaluate_merges(
            methods=MEMORY_METHODS,
            size=size,
            workdir=mdir,
            samples=samples,
            experts_by=mode,
            references=("umtam", "task_arithmetic"),
            log=log,
        )
        for mode, mdir in mode_dirs.items()
    }
    results = store.read_record(workdir / "results.json")
    diag = diagnostics_summary(results, [r["method"] for r in table.rows])
    proto = results["protocol"]
    cap = proto["config"].get("max_test")
    md = [
        f"Protocol size **{size.name}** (`python -m umtam_jax.experiments.protocol --size "
        f"{size.name}`): seeds {', '.join(map(str, table.seeds))} (each the training and "
        f"data-split seed), tasks {', '.join(table.tasks)}, experts fine-tuned with UMTAM "
        f"{proto['optimizer_kwargs']} from pretrained MiniLM-L6 until validation stops "
        f"improving ({proto['early_stopping']}), {'all' if cap is None else f'≤ {cap}'} test "
        f"examples per task. Every method's hyper-parameters chosen on validation only "
        f"(budget {proto['budget']} evaluations each, grids extended at open edges). "
        f"Normalized = merged ÷ expert test score, mean over seeds and tasks; 95 % Student-t "
        f"intervals over the seeds (of each seed's mean, paired differences per seed).",
        "",
        _experts_md(results),
        "",
        table.to_markdown(),
        "",
        "![merging](results/merging.png)",
        "",
        "### Why merges win or lose (diagnostics, seed means)",
        "",
        _diagnostics_md(diag, table),
    ]
    payload: dict[str, Any] = {
        "protocol": proto,
        "table": dataclasses.asdict(table),
        "experts": results["experts"],
        "diagnostics": diag,
        "samples": samples,
    }
    if args.conflict:
        study = conflict_study(
            workdir, size=size, tasks=args.conflict_tasks, samples=samples, log=log
        )
        md += ["", "### Conflict intensity: task pairs", "", _conflict_md(study)]
        payload["conflict"] = study
    tables = {"UMTAM-trained experts": table}
    if mtables:
        md += ["", "### Experts trained in UMTAM's memory modes", ""]
    for mode, mtable in mtables.items():
        mdir = mode_dirs[mode]
        mresults = store.read_record(mdir / "results.json")
        vs_default = compare_runs((mdir, "umtam"), (workdir, "umtam"), samples=samples)
        md += [_memory_md(mode, mtable, mresults, vs_default), ""]
        payload.setdefault("memory_modes", {})[mode] = {
            "table": dataclasses.asdict(mtable), "experts": mresults["experts"],
            "umtam_vs_default": vs_default.as_dict(),
        }  # fmt: skip
    if args.adamw_workdir:
        adir = Path(args.adamw_workdir)
        aresults = store.read_record(adir / "results.json")
        rows = _pipelines(workdir, adir, results, aresults, samples)
        tables["AdamW-trained experts"] = atable
        md += [
            "",
            "### The alternative pipeline: AdamW-trained experts",
            "",
            f"Same seeds, tasks, data, schedule and search (`--experts adamw`); the methods "
            f"that merge UMTAM statistics are left out. {_experts_md(aresults)}",
            "",
            atable.to_markdown(),
            "",
            "Pipelines on the raw test metric (mean over seeds and tasks; paired, the test "
            "examples are the same):",
            "",
            _pipelines_md(rows, results, aresults),
        ]
        payload.update({"adamw_table": dataclasses.asdict(atable), "pipelines": rows,
                        "adamw_experts": aresults["experts"]})  # fmt: skip
    text = "\n".join(md) + "\n"
    print(text)
    if not args.no_write:
        out = Path(args.results_dir)
        _plot(tables, out / "merging.png")
        write_results("merging", payload, text, results_dir=out,
                      title="merging under the protocol (Tables 2, 3)", env=env)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
