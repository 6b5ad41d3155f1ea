"""The targets and the RESULTS.md section of :mod:`benchmarks.train_throughput`."""

from __future__ import annotations

from typing import Any

from benchmarks._efficiency_report import interval_text

REFERENCE = "adamw"
UMTAM_DEFAULT = "umtam (defaults)"
UMTAM_LEAN = 'umtam lean (error_decay=0, saliency="final")'
#: The optimizers the targets are judged for.
TARGETED = (UMTAM_DEFAULT, UMTAM_LEAN)
#: End-to-end step time at most this multiple of AdamW's (tokens/s ratio ≥ its inverse).
TIME_TARGET = 1.10
#: GPU peak memory at most this multiple of AdamW's.
MEMORY_TARGET = 1.35


def judge_target(
    low: float | None, high: float | None, target: float, *, at_most: bool
) -> tuple[str, str]:
    """Verdict of an interval ``[low, high]`` against a target.

    ``at_most``: the quantity should be ≤ ``target`` (its worse end is ``high``); else ≥
    ``target`` (worse end ``low``). Met if the worse end meets the target, not met if the
    better end misses it, otherwise inconclusive; without an interval (one repeat)
    inconclusive. A single measurement is judged as the interval ``[x, x]``.

    Returns:
        ``(verdict, why)`` with verdict ``"met"``, ``"not met"`` or ``"inconclusive"``.
    """
    if low is None or high is None:
        return "inconclusive", "no interval (fewer than 2 repeats)"
    rel = "≤" if at_most else "≥"
    worse, better = (high, low) if at_most else (low, high)

    def ok(x: float) -> bool:
        return x <= target if at_most else x >= target

    if ok(worse):
        return "met", f"worse end {worse:.3f} {rel} {target:.3f}"
    if not ok(better):
        return "not met", f"better end {better:.3f} misses {rel} {target:.3f}"
    return "inconclusive", f"{target:.3f} lies inside [{low:.3f}, {high:.3f}]"


def check_targets(
    by_optimizer: dict[str, Any],
    memory_ratio: dict[str, float] | None,
    *,
    optimizers: tuple[str, ...] = TARGETED,
) -> list[dict[str, Any]]:
    """The targets' verdicts per optimizer.

    Args:
        by_optimizer: :func:`~benchmarks.efficiency.combine_repeats`' ``by_optimizer``
            (``throughput_ratio`` is read).
        memory_ratio: Measured peak memory ÷ AdamW's per optimizer, or None where no peak
            was measured (a CPU): then only the time target is judged.
        optimizers: The optimizers judged (those absent from ``by_optimizer`` are skipped).

    Returns:
        One row per optimizer and target: ``optimizer``, ``target`` (text), ``quantity``,
        ``bound``, ``estimate``, ``low``, ``high``, ``verdict``, ``why``.
    """
    rows = []
    for name in optimizers:
        if name not in by_optimizer:
            continue
        r = by_optimizer[name]["throughput_ratio"]
        bound = 1 / TIME_TARGET
        verdict, why = judge_target(r["low"], r["high"], bound, at_most=False)
        rows.append({
            "optimizer": name,
            "target": f"step time ≤ {TIME_TARGET:.2f}× AdamW (tokens/s ratio ≥ {bound:.3f})",
            "quantity": "tokens/s ratio", "bound": bound, "estimate": r["estimate"],
            "low": r["low"], "high": r["high"], "verdict": verdict, "why": why,
        })  # fmt: skip
        if memory_ratio is not None and memory_ratio.get(name) is not None:
            x = memory_ratio[name]
            verdict, why = judge_target(x, x, MEMORY_TARGET, at_most=True)
            rows.append({
                "optimizer": name, "target": f"peak memory ≤ {MEMORY_TARGET:.2f}× AdamW",
                "quantity": "peak memory ratio", "bound": MEMORY_TARGET, "estimate": x,
                "low": x, "high": x, "verdict": verdict, "why": why,
            })  # fmt: skip
    return rows


def markdown(p: dict[str, Any]) -> str:
    """The RESULTS.md section: per optimizer, the targets' verdicts, per repeat."""
    over = p["over_repeats"]
    by = over["by_optimizer"]
    load = p["load"]
    m = p["model"]
    c = m["config"]
    gpu = p["runs"][REFERENCE].get("measured_peak") is not None
    mem_head = "peak memory" if gpu else "planned memory"
    rows = []
    for n, run in p["runs"].items():
        b = by[n]
        mem = run["memory_bytes"]
        rows.append(
            f"| {n} | {run['tokens_per_s']:.0f} | {interval_text(b['throughput_ratio'])} | "
            f"{interval_text(b['time_over_reference'])} | "
            + (f"{mem / 2**20:.0f} | {run['memory_over_adamw']:.3f}" if mem else "– | –")
            + f" | {run['state_over_params']:.3f} |"
        )
    target_rows = [
        f"| {t['optimizer']} | {t['target']} | "
        + (interval_text(t) if t["quantity"] == "tokens/s ratio" else f"{t['estimate']:.3f}")
        + f" | **{t['verdict']}** ({t['why']}) |"
        for t in p["targets"]
    ]
    others = [n for n in p["runs"] if n != REFERENCE]
    rep_rows = []
    for i, rep in enumerate(load["by_repeat"]):
        ratios = " | ".join(f"{by[n]['throughput_ratio_by_repeat'][i]:.3f}" for n in others)
        rep_rows.append(
            f"| {over['repeats'][i]} | {rep['before'][0]:.2f} → {rep['after'][0]:.2f} | {ratios} |"
        )
    where = (
        f"{p['device_kind']} ({p['backend']})"
        if p["backend"] != "cpu"
        else f"CPU, {p['cpu_count']} cores, 1-minute load {load['min_1min']:.2f}–"
        f"{load['max_1min']:.2f} over the run (shared machine: absolute times are inflated, "
        "the ratios are the comparable numbers)"
    )
    out = [
        f"GPT ({c['n_layers']} blocks, width {c['d_model']}, {c['n_heads']} heads, context "
        f"{c['context']}, vocabulary {c['vocab_size']}, tied embeddings): "
        f"{m['n_params'] / 1e6:.1f}M parameters, {m['n_params_body'] / 1e6:.1f}M in the body "
        f"(blocks + final norm); {m['vocab_note']}. One fixed batch of {p['batch_size']} × "
        f"{p['context']} tokens from `lm_token_arrays` (seed {p['seed']}); the full step "
        "(forward + backward + update: `make_gpt_train_step` in a jit donating parameters "
        f"and state) on {where}. {p['repeats']} repeats, each from fresh optimizer states "
        f"with {p['warmup']} warm-up steps and {p['rounds']} interleaved rounds (the starting "
        "optimizer rotating); per repeat the tokens/s ratio to AdamW (its median step time ÷ "
        f"the optimizer's); across repeats the mean with a {over['interval']}. tokens/s: "
        f"median step over all rounds. Memory: {p['memory_method']}.",
        "",
        f"| optimizer | tokens/s | tokens/s ÷ AdamW [95 % CI] | step time × AdamW [95 % CI] | "
        f"{mem_head} MiB | {mem_head} ÷ AdamW | state bytes ÷ parameter bytes |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Targets (met: the interval's worse end meets it; not met: its better end misses it; "
        "else inconclusive)"
        + ("" if gpu else f"; peak memory ≤ {MEMORY_TARGET:.2f}× AdamW is judged on a GPU "
           "only, the planned CPU ratio above is not judged") + ":",
        "",
        "| optimizer | target | measured | verdict |",
        "|---|---|---|---|",
        *target_rows,
        "",
        "Per repeat (tokens/s ÷ AdamW):",
        "",
        "| repeat | load (1 min) before → after | " + " | ".join(others) + " |",
        "|---|---|" + "---|" * len(others),
        *rep_rows,
    ]  # fmt: skip
    return "\n".join(out) + "\n"
