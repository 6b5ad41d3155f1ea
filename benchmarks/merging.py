"""Multi-task merging of UMTAM-trained MiniLM experts (paper Tables 2, 3, 9).

Four experts (one per task, default the four built-in tasks) fine-tuned with UMTAM from
the same pretrained MiniLM-L6; their encoders are merged and each task keeps its own head
(the protocol of :mod:`umtam_jax.experiments.pipeline`). Every merge hyper-parameter is
chosen on the validation split (mean normalized score over tasks) and reported on test.

Sections:

1. Main table (Table 2): Linear (task arithmetic 1/K), TIES, DARE, DARE-TIES, Fisher
   (post-hoc diagonal Fisher; its extra time is reported), OTA (UMTAM second moments),
   UMTAM; expert upper bound; per-task metric, average, normalized average.
2. Density sweep 5–80 % for UMTAM and TIES (scaling chosen on validation per density;
   with ``--quick`` the scaling the main table chose for that method).
3. UMTAM ablations (Table 3): curvature_pruning, sign_election, curvature_aggregation off
   one at a time, and ``normalize="selected"`` vs ``"all"`` (each re-selected on the
   main UMTAM grid; with ``--quick`` on its scaling grid at the main table's density).
4. Memory modes (Table 9): experts trained with ``error_decay=0`` (no m×n momentum buffer;
   a different trajectory, so retrained), with ``buffer_dtype="bfloat16"`` (M̃ and S
   stored in bfloat16; retrained) and with ``saliency="final"`` (no tracked
   saliency). The saliency does not enter the update, so ``saliency="final"`` experts
   have bit-identical parameters; their statistics are the default ones with the
   tracked saliency removed (``saliency=None``), exactly what a ``saliency="final"``
   state holds, and merging recomputes ``S`` from ``(w − w0)² ⊙ sqrt(R Cᵀ)``.
   Each variant is merged with UMTAM (same grid as the ablations, selected on validation).
5. The strongest alternative pipeline: experts fine-tuned with ``optax.adamw`` (same
   config, learning rate and schedule) and merged with Linear, TIES, DARE, DARE-TIES and
   post-hoc Fisher (same grids, selected on validation). Compared on the absolute test
   metric, since the normalized average divides by different experts.

    python -m benchmarks.merging --quick --workdir umtam-demo-work   # the demo's experts
    python -m benchmarks.merging --workdir umtam-demo-work           # full size (hours)

Writes ``benchmarks/results/merging.json``, ``merging.png``, ``merging_density.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax

from benchmarks._common import RESULTS_DIR, write_results  # noqa: E402
from umtam_jax import experiments as E  # noqa: E402
from umtam_jax.experiments import data as data_lib  # noqa: E402
from umtam_jax.optimizer._state import DenseStatistics, FactoredStatistics  # noqa: E402

MAIN_METHODS = ("linear", "ties", "dare", "dare_ties", "fisher", "ota", "umtam")
ADAMW_METHODS = ("linear", "ties", "dare", "dare_ties", "fisher")
SWEEP = (0.05, 0.1, 0.2, 0.4, 0.8)
ABLATIONS = {
    "UMTAM (default)": {},
    "- curvature_pruning (|Δ| ranks)": {"curvature_pruning": False},
    "- sign_election": {"sign_election": False},
    "- curvature_aggregation (uniform)": {"curvature_aggregation": False},
    'normalize="selected"': {"normalize": "selected"},
}


def _drop_saliency(stats: Any) -> Any:
    def f(x):
        if isinstance(x, FactoredStatistics | DenseStatistics):
            return x._replace(saliency=None)
        return x

    return jax.tree.map(
        f, stats, is_leaf=lambda x: isinstance(x, FactoredStatistics | DenseStatistics)
    )


def _row(name, r, tasks):
    s = r["test"]
    hp = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["hparams"].items()
    )
    return (
        f"| {name} | "
        + " | ".join(f"{s[t]:.3f}" for t in tasks)
        + f" | {s['avg']:.3f} | {s['norm']:.3f} | {r['validation']['norm']:.3f} | {hp} |"
    )


def _header(tasks):
    h = ["Variant", *tasks, "Avg", "Norm. avg (test)", "Norm. avg (val)", "Chosen on val"]
    return ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="demo-size experts and small grids")
    ap.add_argument("--workdir", default="umtam-demo-work")
    ap.add_argument("--tasks", default=",".join(E.DEFAULT_TASKS))
    data_lib.add_task_import_option(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--skip-error-decay0", action="store_true", help="do not train the error_decay=0 experts"
    )
    ap.add_argument(
        "--skip-bf16",
        action="store_true",
        help='do not train the buffer_dtype="bfloat16" experts',
    )
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="reuse sections 1-3 of an existing merging.json; (re)do only the memory modes",
    )
    ap.add_argument(
        "--skip-adamw", action="store_true", help="do not train/merge the AdamW experts (5)"
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    data_lib.import_task_modules(args.imports)
    tasks = [t for t in args.tasks.split(",") if t]
    full = not args.quick
    config = dataclasses.replace(E.FULL if full else E.QUICK, seed=args.seed)
    workdir = Path(args.workdir)
    E.enable_compilation_cache(workdir / "jax_cache")
    prog = not args.no_progress
    grids = E.default_grids(full=full)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    print("experts (UMTAM defaults of the demo)")
    base, ttasks, experts = E.prepare_experts(
        tasks, config, workdir, optimizer_kwargs=E.DEMO_UMTAM_KWARGS, progress=prog
    )
    timings["experts"] = time.perf_counter() - t0
    stats = [e.statistics["encoder"] for e in experts]
    common = {"statistics": stats, "key": E.merge_key(config)}

    fisher_examples = 256 if full else 64

    def merge_table(exps, methods):
        """Every method of ``methods`` on ``exps``, each selected on validation."""
        return E.run_merging(
            exps,
            ttasks,
            base,
            config,
            methods=methods,
            grids=grids,
            fisher_examples=fisher_examples,
            progress=prog,
        )

    def select(method, grid, exps=experts, fixed=None, st=None):
        kw = dict(common)
        if st is not None:
            kw["statistics"] = st
        return E.select_on_validation(
            method, grid, base, exps, ttasks, config, fixed=fixed, progress=prog, **kw
        )

    reused_from = None
    main_from = None  # the umtam-demo command whose main table is reused, if any
    if args.memory_only:
        prev_doc = json.loads((Path(args.results_dir) / "merging.json").read_text())
        prev = prev_doc["result"]
        # Provenance of sections 1-3: the run that computed them (kept across reruns).
        reused_from = prev.get("sections_1_3_from") or {
            "command": prev_doc["command"],
            "date": prev_doc["date"],
        }
        main_res, sweep, abl = prev["main"], prev["density_sweep"], prev["ablations"]
        main_from = prev.get("main_table_from")
        # Only the reused sections' times: memory modes and AdamW are timed by this run.
        timings.update({k: prev["seconds"][k] for k in ("main", "sweep", "ablations")})
        chosen = main_res["methods"]["umtam"]["hparams"]
        vgrid = (
            grids["umtam"]
            if full
            else [g for g in grids["umtam"] if g["density"] == chosen["density"]]
        )
    else:
        # 1. main table
        t = time.perf_counter()
        demo = _demo_result(workdir, tasks, config, full)
        if demo is not None:
            print(f"main table: reusing {workdir / 'demo_results.json'} (same experts and grids)")
            main_res, main_from = demo
        else:
            main_res = merge_table(experts, MAIN_METHODS)
        timings["main"] = time.perf_counter() - t
        print(E.format_table(main_res))

        # 2. density sweep
        t = time.perf_counter()
        sweep: dict[str, dict[str, Any]] = {}
        for m in ("umtam", "ties"):
            scales = (
                sorted({g["scaling"] for g in grids[m]})
                if full
                else [main_res["methods"][m]["hparams"]["scaling"]]
            )
            sweep[m] = {}
            for d in SWEEP:
                r = select(m, [{"density": d, "scaling": s} for s in scales])
                sweep[m][str(d)] = r
                print(f"sweep {m} density {d}: test norm {r['test']['norm']:.3f}")
        timings["sweep"] = time.perf_counter() - t

        # Variant grid: the main UMTAM grid (full); with --quick, the scaling grid at the
        # density the main table chose (still selected on validation, half the merges).
        chosen = main_res["methods"]["umtam"]["hparams"]
        vgrid = (
            grids["umtam"]
            if full
            else [g for g in grids["umtam"] if g["density"] == chosen["density"]]
        )

        # 3. ablations (incl. normalize modes)
        t = time.perf_counter()
        abl = {}
        for name, flags in ABLATIONS.items():
            abl[name] = (
                dict(main_res["methods"]["umtam"])
                if not flags
                else select("umtam", vgrid, fixed=flags)
            )
            abl[name]["method"] = name
            print(f"ablation {name}: test norm {abl[name]['test']['norm']:.3f}")
        timings["ablations"] = time.perf_counter() - t

    # 4. memory modes
    t = time.perf_counter()
    memory: dict[str, Any] = {
        "default (error_decay=0.9, saliency tracked)": {
            "merge": main_res["methods"]["umtam"],
            "experts": {e.task: e.scores for e in experts},
        }
    }
    if args.memory_only and 'saliency="final"' in prev["memory_modes"]:
        memory['saliency="final"'] = prev["memory_modes"]['saliency="final"']
    else:
        final_stats = [_drop_saliency(s) for s in stats]
        memory['saliency="final"'] = {
            "merge": select("umtam", vgrid, st=final_stats),
            "experts": {e.task: e.scores for e in experts},
            "note": "same parameters (saliency does not enter the update); S recomputed at merge",
        }

    def retrained(tag: str, **changes: Any) -> list:
        """The experts trained with the demo's UMTAM settings changed by ``changes``."""
        kwargs = {**E.DEMO_UMTAM_KWARGS, **changes}
        return E.prepare_experts(
            tasks,
            config,
            workdir,
            optimizer_kwargs=kwargs,
            tag=tag,
            base_encoder=base,
            ttasks=ttasks,
            progress=prog,
        )[2]

    if not args.skip_error_decay0:
        exps0 = retrained("ed0", error_decay=0.0)
        st0 = [e.statistics["encoder"] for e in exps0]
        memory['error_decay=0 + saliency="final" (lean)'] = {
            "merge": select("umtam", vgrid, exps=exps0, st=[_drop_saliency(s) for s in st0]),
            "experts": {e.task: e.scores for e in exps0},
        }
        memory["error_decay=0"] = {
            "merge": select("umtam", vgrid, exps=exps0, st=st0),
            "experts": {e.task: e.scores for e in exps0},
        }
    if not args.skip_bf16:
        exps16 = retrained("bf16", buffer_dtype="bfloat16")
        memory['buffer_dtype="bfloat16" (M̃ and S)'] = {
            "merge": select(
                "umtam", vgrid, exps=exps16, st=[e.statistics["encoder"] for e in exps16]
            ),
            "experts": {e.task: e.scores for e in exps16},
        }
    timings["memory_modes"] = time.perf_counter() - t

    # 5. AdamW experts merged with the baselines (no UMTAM statistics: no OTA / UMTAM).
    adamw_res = None
    if not args.skip_adamw:
        t = time.perf_counter()
        print("AdamW experts (same config)")
        _, _, adam_experts = E.prepare_experts(
            tasks,
            config,
            workdir,
            optimizer="adamw",
            tag="adamw",
            base_encoder=base,
            ttasks=ttasks,
            progress=prog,
        )
        adamw_res = merge_table(adam_experts, ADAMW_METHODS)
        print(E.format_table(adamw_res))
        timings["adamw"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    # report
    main_res["methods"]["umtam"]["method"] = E.MERGE_METHODS["umtam"].name
    out = Path(args.results_dir)
    E.plot_merging(
        main_res, out / "merging.png", title=f"merging ({'full' if full else 'quick'}): test"
    )
    _plot_sweep(sweep, out / "merging_density.png")
    mode = "quick: the umtam-demo experts" if not full else "full-size experts"
    md = [
        f"MiniLM-L6 experts fine-tuned with UMTAM ({mode}; {config.steps} steps × "
        f"{config.batch_size} × {config.max_length} tokens, UMTAM {E.DEMO_UMTAM_KWARGS}); "
        f"encoders merged, each task keeps its head; hyper-parameters chosen on validation "
        f"(≤{config.max_eval} examples/task), reported on test (≤{config.max_eval}/task). "
        "Norm. avg = mean over tasks of merged / expert.",
        "",
        "### Main table (Table 2)",
        "",
        E.format_table(main_res),
        *(
            ["", f"Main table from the demo run `{main_from}` (same experts and grids)."]
            if main_from
            else []
        ),
        "",
        f"Fisher's post-hoc Fisher pass: {main_res['fisher_seconds']:.1f}s extra "
        f"({fisher_examples} training examples per task, per-example gradients); "
        "UMTAM and OTA use the statistics saved during training (no extra pass).",
        "",
        "![merging](results/merging.png)",
        "",
        "### Density sweep (UMTAM vs TIES)",
        "",
        "| density | " + " | ".join(f"{d:.0%}" for d in SWEEP) + " |",
        "|---|" + "---|" * len(SWEEP),
    ]
    for m in sweep:
        md.append(
            f"| {E.MERGE_METHODS[m].name} (test norm) | "
            + " | ".join(f"{sweep[m][str(d)]['test']['norm']:.3f}" for d in SWEEP)
            + " |"
        )
    md += [
        "",
        "![density](results/merging_density.png)",
        "",
        "### UMTAM ablations and normalize modes (Table 3)",
        "",
        *_header(tasks),
    ]
    md += [_row(n, r, tasks) for n, r in abl.items()]
    md += ["", "### Memory modes (Table 9)", "", *_header(tasks)]
    md += [_row(n, v["merge"], tasks) for n, v in memory.items()]
    md += [
        "",
        "Expert test scores per memory mode: "
        + "; ".join(
            f"{n}: " + ", ".join(f"{t} {v['experts'][t]['test']:.3f}" for t in tasks)
            for n, v in memory.items()
        ),
    ]
    if adamw_res is not None:
        md += ["", *_adamw_section(main_res, adamw_res)]
    md += [
        "",
        "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    if reused_from is not None:
        md += [
            "",
            f"Sections 1–3 (main table, density sweep, ablations) come from "
            f"`{reused_from['command']}` ({reused_from['date']}); this run (--memory-only) "
            "recomputed the memory modes"
            + (" and the AdamW pipeline." if adamw_res is not None else "."),
        ]
    md = "\n".join(md) + "\n"

    def slim(r):
        return {k: v for k, v in r.items()}

    payload = {
        "mode": "full" if full else "quick",
        "tasks": tasks,
        "config": {**dataclasses.asdict(config), "config": None},
        "umtam_kwargs": E.DEMO_UMTAM_KWARGS,
        "grids": grids,
        "main": main_res,
        "density_sweep": sweep,
        "ablations": {n: slim(r) for n, r in abl.items()},
        "memory_modes": memory,
        "adamw_experts": adamw_res,
        "sections_1_3_from": reused_from,
        "main_table_from": main_from,
        "seconds": timings,
    }
    write_results("merging", payload, md, results_dir=out, title="merging (Tables 2, 3, 9)")
    print(md)
    return 0


def _adamw_section(umtam_res, adamw_res) -> list[str]:
    """Markdown: AdamW experts + baselines vs UMTAM experts + every method (absolute)."""

    def best(res):
        name, r = max(res["methods"].items(), key=lambda kv: kv[1]["validation"]["avg"])
        return r["method"], r

    (um_name, um), (ad_name, ad) = best(umtam_res), best(adamw_res)
    return [
        "### AdamW experts merged with the baselines (the alternative pipeline)",
        "",
        E.format_table(adamw_res),
        "",
        "Absolute test average of the merged model, the method chosen on validation average "
        f"for each pipeline: UMTAM-trained experts → {um_name} {um['test']['avg']:.3f} "
        f"(experts {umtam_res['expert_avg']['test']:.3f}); AdamW-trained experts → {ad_name} "
        f"{ad['test']['avg']:.3f} (experts {adamw_res['expert_avg']['test']:.3f}). UMTAM merging "
        f"itself on UMTAM experts: {umtam_res['methods']['umtam']['test']['avg']:.3f}.",
    ]


def _demo_result(workdir, tasks, config, full) -> tuple[dict[str, Any], str] | None:
    """``(main table, command)`` of the demo run with the same experts and grids, if any."""
    path = workdir / "demo_results.json"
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    same = (
        d.get("mode") == ("full" if full else "quick")
        and d.get("tasks") == tasks
        and d.get("umtam_kwargs") == E.DEMO_UMTAM_KWARGS
        and d.get("config")
        == json.loads(json.dumps({**dataclasses.asdict(config), "config": None}))
        and list(d["result"]["methods"]) == list(MAIN_METHODS)
    )
    return (d["result"], d.get("command")) if same else None


def _plot_sweep(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, marker in (("umtam", "o-"), ("ties", "s--")):
        ax.plot(
            [100 * d for d in SWEEP],
            [sweep[m][str(d)]["test"]["norm"] for d in SWEEP],
            marker,
            label=E.MERGE_METHODS[m].name,
        )
    ax.set_xscale("log")
    ax.set_xticks([100 * d for d in SWEEP], [f"{100 * d:g}" for d in SWEEP])
    ax.set_xlabel("density (%)")
    ax.set_ylabel("normalized avg (test)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
