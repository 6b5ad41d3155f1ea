"""The tables, Markdown report and plot of :mod:`benchmarks.training`, from its runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from umtam_jax.experiments.reporting import save_figure


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def steps_to_threshold(run: dict[str, Any], threshold: float) -> int | None:
    """The first evaluation step whose validation loss is at most ``threshold``, or None."""
    for s, v in zip(run["eval_steps"], run["val_loss"], strict=True):
        if _finite(v) and v <= threshold:
            return s
    return None


def summarize(
    order: list[str],
    grids: dict[str, list[float]],
    best: dict[str, dict[str, Any] | None],
    rank_best: dict[int, dict[str, Any] | None],
    rank_attempts: dict[int, list[dict[str, Any]]],
    exact: dict[str, dict[str, Any]],
    shapes: dict[str, list[int]],
    rank: int,
) -> dict[str, Any]:
    """The tables of the results: best lr per optimizer, the rank sweep, exact vs default.

    Args:
      order: The optimizers, in table order.
      grids: Each optimizer's learning rates (extended grids included).
      best: Each optimizer's best run on validation loss (None: all diverged).
      rank_best: UMTAM's best run per rank of the sweep.
      rank_attempts: Every run of the rank sweep, per rank.
      exact: Each UMTAM variant's exact-SVD run at its best lr.
      shapes: The factored matrices' shapes, by path.
      rank: The rank of the learning-rate grid (``--rank``).

    Returns:
      ``threshold_val_loss`` (the worst best-lr final validation loss), ``summary`` (one
      row per optimizer), ``rank_rows``, ``spread`` (of the final test loss across ranks,
      or None) and ``exact_vs_subspace`` (on test loss).
    """
    finals = {o: (b["final_val_loss"] if b else None) for o, b in best.items()}
    finite = [v for v in finals.values() if _finite(v)]
    threshold = max(finite) if finite else None
    summary_rows = []
    for opt in order:
        b = best[opt]
        if b is None:
            summary_rows.append({"optimizer": opt, "best_lr": None})
            continue
        edge = b["lr"] in (min(grids[opt]), max(grids[opt])) and len(grids[opt]) > 1
        summary_rows.append(
            {
                "optimizer": opt,
                "rank": b["rank"],
                "best_lr": b["lr"],
                "best_lr_at_grid_edge": edge,
                "final_val_loss": b["final_val_loss"],
                "final_test_loss": b.get("final_test_loss"),
                "steps_to_threshold": steps_to_threshold(b, threshold) if threshold else None,
                "step_ms_median": b["step_s_median"] * 1e3,
            }
        )
    rank_rows = []
    for r, b in rank_best.items():
        eff = [min(r, *s) for s in shapes.values()]
        tried = rank_attempts.get(r, [])
        abandoned = [x for x in tried if x.get("aborted")]
        timing = b or (abandoned[0] if abandoned else None)
        rank_rows.append(
            {
                "rank": r,
                "effective_ranks": sorted(set(eff)),
                "lr": b["lr"] if b else None,
                "final_val_loss": b["final_val_loss"] if b else None,
                "final_test_loss": b.get("final_test_loss") if b else None,
                "step_ms_median": timing["step_s_median"] * 1e3 if timing else None,
                "abandoned_over_time_budget": bool(abandoned) and b is None,
            }
        )
    rank_finals = [x["final_test_loss"] for x in rank_rows if _finite(x["final_test_loss"])]
    spread = (
        {
            "min": min(rank_finals),
            "max": max(rank_finals),
            "max_minus_min": max(rank_finals) - min(rank_finals),
            "relative": (max(rank_finals) - min(rank_finals)) / min(rank_finals),
            "ranks": [x["rank"] for x in rank_rows if _finite(x["final_test_loss"])],
        }
        if rank_finals
        else None
    )
    exact_cmp = []
    for opt, run in exact.items():
        a, e = best[opt].get("final_test_loss"), run.get("final_test_loss")
        rel = abs(e - a) / a if _finite(a) and _finite(e) else float("inf")
        exact_cmp.append(
            {
                "optimizer": opt,
                "rank": rank,
                "lr": run["lr"],
                "subspace_final_test_loss": a,
                "exact_final_test_loss": e,
                "relative_difference": rel,
                "within_1_percent": bool(rel <= 0.01),
                "subspace_step_ms": best[opt]["step_s_median"] * 1e3,
                "exact_step_ms": run["step_s_median"] * 1e3,
            }
        )
    return {
        "threshold_val_loss": threshold,
        "summary": summary_rows,
        "rank_rows": rank_rows,
        "spread": spread,
        "exact_vs_subspace": exact_cmp,
    }


def fmt(x, spec=".4f"):
    """``x`` formatted, "—" for None, "diverged" for inf/NaN."""
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged"
    return format(x, spec)


def markdown(p: dict[str, Any], grid_rank: int) -> str:
    """The Markdown report of a results payload; ``grid_rank`` is the lr grid's UMTAM rank."""
    c, m = p["config"], p["model"]
    out = [
        f"Size **{p['size']}**: GPT d_model={m['d_model']}, {m['n_layers']} layers, "
        f"{m['n_heads']} heads, context {m['context']}, vocab {m['vocab_size']}, "
        f"{m['n_params']:,} params; batch {c['batch']}, {c['steps']} steps "
        f"({c['steps'] * c['batch'] * c['context']:,} tokens), eval every {c['eval_every']} "
        f"steps on {p['data']['val_windows']} fixed validation windows; the test loss once, after "
        f"the last step, on {p['data']['test_windows']} test windows of other held-out "
        "documents. Warmup+cosine schedule, "
        f"no weight decay, same init and batch order for every run. Matrices factored by "
        f"UMTAM / projected by GaLore (min_dim_size_to_factor={c['min_dim_size_to_factor']}"
        + (
            ""
            if p["embeddings_factored_by_umtam_and_galore"]
            else "; the wte/wpe embeddings are kept dense — Adam-like rule — because the QR of "
            "the 4096×r sketch costs ~0.65 s per step on this CPU"
        )
        + "): "
        + ", ".join(f"{k} {tuple(v)}" for k, v in p["factored_matrix_shapes"].items())
        + ". `umtam_bc` is UMTAM with `bias_correction=True` (docs/algorithm.md §2.2 option; "
        "the paper and the library default have none, so with b2 = 0.999 UMTAM's early steps "
        "are up to 1/sqrt(1 − b2^t) larger than Adam's — still 2.2× at step 240)"
        + ". Learning rates (and each rank's run) chosen on validation loss only; the test "
        "loss is reported. Step times are wall-clock on a shared, "
        "loaded CPU (load average in the header) — compare them only within this table.",
        "",
        "| optimizer | rank | lr grid | best lr | final val loss | final test loss | "
        f"steps to val {fmt(p['threshold_val_loss'])} | median step (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in p["summary"]:
        if r.get("best_lr") is None:
            out.append(f"| {r['optimizer']} | | | all diverged | | | | |")
            continue
        edge = " (grid edge)" if r["best_lr_at_grid_edge"] else ""
        out.append(
            f"| {r['optimizer']} | {r['rank'] or '—'} | "
            f"{', '.join(f'{x:g}' for x in p['lr_grids'][r['optimizer']])} | "
            f"{r['best_lr']:g}{edge} | {fmt(r['final_val_loss'])} | "
            f"{fmt(r.get('final_test_loss'))} | "
            f"{r['steps_to_threshold'] if r['steps_to_threshold'] is not None else 'not reached'}"
            f" | {fmt(r['step_ms_median'], '.0f')} |"
        )
    out += ["", "Whole grid:", ""]
    out += ["| run | final val loss | final test loss | median step (ms) |", "|---|---|---|---|"]
    for r in p["runs"]:
        rank = f" r={r['rank']}" if r["rank"] else ""
        svd = f" {r['svd_method']}" if r["svd_method"] not in ("-", "subspace") else ""
        out.append(
            f"| {r['optimizer']}{rank}{svd} lr={r['lr']:g} | {fmt(r['final_val_loss'])} | "
            f"{fmt(r.get('final_test_loss'))} | "
            f"{fmt(r['step_s_median'] * 1e3 if r['step_s_median'] else None, '.0f')} |"
        )
    rs = p["rank_sweep"]
    if rs["rows"]:
        out += [
            "",
            f"UMTAM rank sweep (lr: {rs['lr_policy']} lr of rank {grid_rank}; rank is clipped "
            "to min(m, n) per matrix):",
            "",
            "| rank | effective ranks | lr | final val loss | final test loss | median step (ms) |",
            "|---|---|---|---|---|---|",
        ]
        for r in rs["rows"]:
            final = (
                "abandoned (projected time over --run-budget-s) | —"
                if r.get("abandoned_over_time_budget")
                else f"{fmt(r['final_val_loss'])} | {fmt(r.get('final_test_loss'))}"
            )
            out.append(
                f"| {r['rank']} | {r['effective_ranks']} | {fmt(r['lr'], 'g')} | "
                f"{final} | {fmt(r['step_ms_median'], '.0f')} |"
            )
        if rs["spread"]:
            s = rs["spread"]
            out += [
                "",
                f"Spread of final test loss across ranks {s['ranks']}: {s['min']:.4f} – "
                f"{s['max']:.4f} "
                f"(max − min {s['max_minus_min']:.4f}, {100 * s['relative']:.2f} % of min).",
            ]
    for e in p["exact_vs_subspace"]:
        verdict = "holds" if e["within_1_percent"] else "does NOT hold"
        out += [
            "",
            f"{e['optimizer']}: exact SVD vs default (subspace) at rank {e['rank']}, lr "
            f"{e['lr']:g}: final test "
            f"loss {e['exact_final_test_loss']:.4f} vs {e['subspace_final_test_loss']:.4f} "
            f"(relative difference {100 * e['relative_difference']:.2f} %; the ≤ 1 % criterion "
            f"{verdict}); median step {e['exact_step_ms']:.0f} ms vs "
            f"{e['subspace_step_ms']:.0f} ms.",
        ]
    for note in p["exact_notes"]:
        out += ["", note + "."]
    if not p["galore_available"]:
        out += ["", "optax.contrib.galore is not available in this optax version."]
    if p["plot"]:
        out += ["", f"![validation curves](results/{p['plot']})"]
    return "\n".join(out)


def plot(runs, best, rank_best, exact, path: Path, threshold) -> None:
    """Validation curves (best lr per optimizer; UMTAM's ranks) and the lr grid, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for opt, b in best.items():
        if b:
            lab = f"{opt}{' r=' + str(b['rank']) if b['rank'] else ''} lr={b['lr']:g}"
            ax.plot(b["eval_steps"], b["val_loss"], marker=".", label=lab)
    if threshold:
        ax.axhline(threshold, color="grey", ls=":", lw=1, label=f"threshold {threshold:.3f}")
    ax.set(title="best lr per optimizer", xlabel="step", ylabel="validation loss (nats)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for r, b in rank_best.items():
        if b:
            ax.plot(b["eval_steps"], b["val_loss"], marker=".", label=f"rank {r} lr={b['lr']:g}")
    for (opt, run), style in zip(exact.items(), ("k--", "k:"), strict=False):
        ax.plot(
            run["eval_steps"], run["val_loss"], style, label=f"{opt} exact SVD lr={run['lr']:g}"
        )
    ax.set(title="UMTAM ranks", xlabel="step", ylabel="validation loss (nats)")
    ax.legend(fontsize=8)
    ax = axes[2]
    opts = sorted({r["optimizer"] for r in runs})
    for opt in opts:
        rs = sorted(
            (
                r
                for r in runs
                if r["optimizer"] == opt
                and r["svd_method"] in ("-", "subspace")
                and (best.get(opt) is None or r["rank"] == best[opt]["rank"])
            ),
            key=lambda r: r["lr"],
        )
        ys = [r["final_val_loss"] if _finite(r["final_val_loss"]) else np.nan for r in rs]
        ax.plot([r["lr"] for r in rs], ys, marker="o", label=opt)
    ax.set(xscale="log", title="lr grid", xlabel="peak learning rate", ylabel="final val loss")
    ax.legend(fontsize=8)
    save_figure(fig, path, overwrite=True)  # this benchmark's own figure
