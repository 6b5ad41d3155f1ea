"""The RESULTS.md section and the plot of :mod:`benchmarks.spectrum`, from its payload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from umtam_jax.experiments.reporting import save_figure
from umtam_jax.experiments.verdicts import judge

#: The paper's claim: rank 32 captures more than this fraction of the momentum's energy.
CLAIM = 0.82


def _ci(c: dict[str, Any]) -> str:
    """A fraction's interval in %: ``mean [low, high]`` (the mean alone for one seed)."""
    if c["low"] is None:
        return f"{100 * c['estimate']:.1f} % (one seed)"
    return f"{100 * c['estimate']:.1f} % [{100 * c['low']:.1f}, {100 * c['high']:.1f}]"


def _over_seeds_markdown(p: dict[str, Any]) -> list[str]:
    """The over-seeds table and the claim's verdict on it."""
    o = p["over_seeds"]
    seeds = o["seeds"]

    def per_seed(rows: list[dict[str, Any]], key: str, f: str = "{:.1f}") -> str:
        return " / ".join(f.format(100 * row[key]) for row in rows) + " %"

    out = [
        f"Over seeds {', '.join(map(str, seeds))} (each seed: its own initialisation and "
        "training batches, the same lr). Per seed: median and minimum of the captured "
        "fraction over all (matrix, logged step) pairs; across seeds: their mean with a "
        f"{o['interval']}.",
        "",
        "| r | median by seed | min by seed | mean of the median [95 % CI] | "
        "mean of the min [95 % CI] | share of (matrix, step) > 82 % by seed |",
        "|---|---|---|---|---|---|",
    ]
    for r, b in o["by_rank"].items():
        rows = b["by_seed"]
        out.append(
            f"| {r} | {per_seed(rows, 'median')} | {per_seed(rows, 'min')} | "
            f"{_ci(b['median'])} | {_ci(b['min'])} | "
            f"{per_seed(rows, 'share_above_claim', '{:.0f}')} |"
        )
    cc = o["claim_check"]
    if cc:
        claimed = 100 * cc["claimed"]
        med, mn = cc["median"], cc["min"]

        def reading(c: dict[str, Any]) -> str:
            lo, hi = (None, None) if c["low"] is None else (100 * c["low"], 100 * c["high"])
            verdict, why = judge(lo, hi, claimed, "at_least", estimate=100 * c["estimate"])
            return f"{verdict} ({why})"

        out += [
            "",
            f'Paper claim "> 82 % at r = {cc["rank"]}", judged on the mean over seeds of the '
            "median over (matrix, logged step), as the claim is about the momentum as a whole: "
            f"{_ci(med)}, **{reading(med)}**. The same for the minimum (the worst matrix and "
            f"step): {_ci(mn)}, which alone would read {reading(mn)}.",
        ]
    return out


def markdown(p: dict[str, Any]) -> str:
    """The RESULTS.md section of a spectrum payload."""
    o, c, m = p["optimizer"], p["config"], p["model"]
    seeds = p["over_seeds"]["seeds"]
    out = [
        f"Size **{p['size']}** (GPT d_model={m['d_model']}, "
        f"{m['n_layers']} layers, context {m['context']}, batch {c['batch']}, {c['steps']} "
        f"steps); UMTAM rank {o['rank']} "
        f"({o['svd_method']} SVD), error_decay {o['error_decay']}, bias_correction "
        f"{o.get('bias_correction', False)}, lr {o['lr']:g} "
        f"({o['lr_source']}); seeds {', '.join(map(str, seeds))}. {len(p['matrices'])} "
        f"factored matrices, logged at "
        f"{len(p['log_steps'])} steps ({p['log_steps'][0]}…{p['log_steps'][-1]}). "
        "Captured fraction = energy of the best rank-r truncation of M̃ = UΣVᵀ + E.",
        "",
        *_over_seeds_markdown(p),
        "",
        f"Seed {p['seed']} in detail:",
        "",
        "| r | effective r | median / min (all steps, matrices with r < min(m, n)) | "
        "median (final step) | min (final step) | median (all steps) | "
        "min (all steps) | share of (matrix, step) > 82 % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, s in p["summary"].items():
        f, a = s["final_step_over_matrices"], s["all_steps_and_matrices"]
        nt = s["all_steps_matrices_with_r_below_min_dim"]
        nt_txt = f"{100 * nt['median']:.1f} % / {100 * nt['min']:.1f} %" if nt else "—"
        out.append(
            f"| {r} | {s['effective_ranks']} | {nt_txt} | {100 * f['median']:.1f} % | "
            f"{100 * f['min']:.1f} % | "
            f"{100 * a['median']:.1f} % | {100 * a['min']:.1f} % | "
            f"{100 * s['fraction_of_matrix_steps_above_claim']:.0f} % |"
        )
    ow = p["own_factors_captured"]
    out += [
        "",
        f"The optimizer's own rank-{ow['rank']} factors hold ‖UΣVᵀ‖²/‖M̃‖² = median "
        f"{100 * ow['median']:.1f} %, min {100 * ow['min']:.1f} % (all matrices and steps).",
    ]
    cc = p["claim_check"]
    if cc:
        verdict = (
            "holds for every matrix and step"
            if cc["holds_for_every_matrix_and_step"]
            else "holds for the median matrix but not for all"
            if cc["holds_for_median_matrix"]
            else "does NOT hold"
        )
        out += [
            "",
            f'Seed {p["seed"]} alone, ">82 % at r = 32": {verdict} (median '
            f"{100 * cc['median_all']:.1f} %, min {100 * cc['min_all']:.1f} % over matrices and "
            "logged steps).",
        ]
    out += [
        "",
        "Per matrix at the final step:",
        "",
        "| matrix | shape | " + " | ".join(f"r={r}" for r in p["ranks"]) + " | stable rank |",
        "|---|---|" + "---|" * (len(p["ranks"]) + 1),
    ]
    for name, shape in p["matrices"].items():
        pm = p["per_matrix"][name]
        out.append(
            f"| `{name}` | {tuple(shape)} | "
            + " | ".join(f"{100 * pm['fraction'][str(r)][-1]:.1f} %" for r in p["ranks"])
            + f" | {pm['stable_rank'][-1]:.1f} |"
        )
    if p["plot"]:
        out += ["", f"![captured energy](results/{p['plot']})"]
    return "\n".join(out)


def plot(p: dict[str, Any], path: Path) -> None:
    """Captured energy over steps per rank, and per matrix at the last step, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = p["log_steps"]
    ax = axes[0]
    for r in p["ranks"]:
        per = np.array([p["per_matrix"][m]["fraction"][str(r)] for m in p["matrices"]])
        (line,) = ax.plot(steps, np.median(per, 0), marker=".", label=f"r={r} median")
        ax.fill_between(steps, per.min(0), per.max(0), color=line.get_color(), alpha=0.15)
    ax.axhline(CLAIM, color="k", ls=":", lw=1, label="82 % (paper)")
    ax.set(
        title=f"seed {p['seed']}: energy of M̃ captured at rank r (band: min–max over matrices)",
        xlabel="step",
        ylabel="captured fraction",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8)
    ax = axes[1]
    xs = np.arange(len(p["ranks"]))
    width = 0.8 / max(1, len(p["matrices"]))
    for i, m in enumerate(p["matrices"]):
        vals = [p["per_matrix"][m]["fraction"][str(r)][-1] for r in p["ranks"]]
        ax.bar(xs + i * width, vals, width, label=m.replace("['", "").replace("']", "/")[:-1])
    ax.axhline(CLAIM, color="k", ls=":", lw=1)
    ax.set_xticks(xs + 0.4 - width / 2, [f"r={r}" for r in p["ranks"]])
    ax.set(title="per matrix, final step", ylabel="captured fraction", ylim=(0, 1.02))
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path, overwrite=True)  # this benchmark's own figure
