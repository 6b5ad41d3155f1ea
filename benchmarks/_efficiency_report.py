"""The RESULTS.md section of :mod:`benchmarks.efficiency`, and the interval format that
the throughput report shares."""

from __future__ import annotations

from typing import Any

from benchmarks._common import format_interval

#: The reference every ratio is taken to.
REFERENCE = "adamw"


def interval_text(c: dict[str, Any], fmt: str = "{:.3f}") -> str:
    """:func:`benchmarks._common.format_interval`, saying so where there was one repeat."""
    one = c["low"] is None and c["estimate"] is not None
    return format_interval(c, fmt) + (" (one repeat)" if one else "")


def markdown(p: dict[str, Any], *, n_params: int, param_bytes: int) -> str:
    """The RESULTS.md section: per optimizer, per repeat and the paper's claim."""
    over = p["over_repeats"]
    by = over["by_optimizer"]
    load = p["load"]
    rows = []
    for n, run in p["runs"].items():
        b = by[n]
        rows.append(
            f"| {n} | {run['median_step_s'] * 1000:.0f} | {run['tokens_per_s']:.0f} | "
            f"{interval_text(b['time_over_reference'])} | {interval_text(b['throughput_ratio'])} | "
            f"{interval_text(b['cost_percent'], '{:.1f}')} | {run['state_bytes'] / 2**20:.1f} | "
            f"{run['state_over_params']:.2f} | {run['state_over_adamw']:.2f} |"
        )
    umtams = [n for n in p["runs"] if n.startswith("umtam")]
    rep_rows = []
    for i, rep in enumerate(load["by_repeat"]):
        ratios = " | ".join(f"{by[n]['throughput_ratio_by_repeat'][i]:.3f}" for n in umtams)
        rep_rows.append(
            f"| {over['repeats'][i]} | {rep['before'][0]:.2f} → {rep['after'][0]:.2f} | "
            f"{by[REFERENCE]['median_step_s_by_repeat'][i] * 1000:.0f} | {ratios} |"
        )
    out = [
        f"Full MiniLM-L6 fine-tune step (forward + backward + update, one jit) on "
        f"`{p['task']}`, batch {p['batch_size']} × {p['max_length']} tokens, "
        f"{n_params / 1e6:.1f}M parameters ({param_bytes / 2**20:.0f} MiB). "
        f"{p['repeats']} repeats, each from fresh optimizer states with {p['warmup']} "
        f"warm-up steps and {p['rounds']} interleaved rounds (the starting optimizer "
        "rotating); per repeat the median step time, the throughput ratio to AdamW (its "
        "median time ÷ the optimizer's) and the cost 100 × (1 − ratio) %; across repeats "
        f"their mean with a {over['interval']}. {p['cpu_count']} CPUs, 1-minute load "
        f"average {load['min_1min']:.2f}–{load['max_1min']:.2f} over the run (the machine "
        "was shared, so absolute times are inflated; the ratios are the comparable "
        "numbers). ms / step and tokens / s: median over all rounds of all repeats.",
        "",
        "| Optimizer | ms / step | tokens / s | time × AdamW [95 % CI] | throughput ÷ AdamW "
        "[95 % CI] | cost % [95 % CI] | state MiB | state / params | state × AdamW |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Per repeat (throughput ÷ AdamW):",
        "",
        "| repeat | load (1 min) before → after | AdamW ms | " + " | ".join(umtams) + " |",
        "|---|---|---|" + "---|" * len(umtams),
        *rep_rows,
    ]
    cc = p["claim_check"]
    if cc:
        out += [
            "",
            f"Paper claim (Table 8): {cc['claimed_cost_percent']:g} % throughput cost of "
            f"UMTAM versus AdamW (GPT-2 124M on a GPU). Here, {cc['optimizer']}: "
            f"{interval_text(cc['cost_percent'], '{:.1f}')} %, **{cc['verdict']}** ({cc['why']}).",
        ]
    return "\n".join(out) + "\n"
