"""The paper's claims and how each one's row is read from the recorded benchmark results.

Each row puts the paper's number beside ours, with our 95 % interval where the data has
one, the setting that differs and a verdict from
:func:`~umtam_jax.experiments.verdicts.judge`. A missing result gives a row saying so,
with verdict ``"inconclusive"``. The merging rows, which read a protocol run, and the
table itself are in :mod:`umtam_jax.experiments.claims`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from umtam_jax.experiments import store
from umtam_jax.experiments.verdicts import Kind, judge


class _Claim(NamedTuple):
    claim: str
    paper: str
    kind: Kind
    claimed: float | None


_CLAIMS = {
    "linear": _Claim("UMTAM merging beats Linear averaging (normalized score)",
                     "+14.9 % (Table 2: average 0.675 vs 0.588)", "effect", 14.9),
    "ties": _Claim("UMTAM merging beats TIES (normalized score)",
                   "+1.6 % (Table 2: average 0.675 vs 0.664)", "effect", 1.6),
    "every": _Claim("Saliency pruning beats magnitude pruning at every density",
                    "ahead in 15 of 16 GLUE (task, density) cells, 1–20 % (Table 1)",
                    "effect", None),
    "best": _Claim("… by up to +135 % at 1 % density", "+134.7 % (MRPC, 1 % density, Table 1)",
                   "effect", 134.7),
    "rank": _Claim("Training is rank-invariant (spread of final loss across ranks)",
                   "≤ 0.05 % (2.044–2.045 at ranks 8–128, Tables 4 and 7)", "at_most", 0.05),
    "energy": _Claim("Rank 32 captures > 82 % of the momentum's energy",
                     "> 82 % (the paper's summary; its text gives no number)", "at_least", 82.0),
    "speed": _Claim("Throughput cost versus AdamW, end to end",
                    "8.3 % (3,191 vs 3,481 tokens/s, Table 8)", "cost", 8.3),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ClaimRow:
    """One claim of the paper beside our measurement.

    Attributes:
        claim: What the paper claims, in words.
        paper: The paper's number.
        measurement: Ours, with its interval or why there is none.
        setting: How our setting differs from the paper's (model, data, size, device).
        verdict: ``"reproduced"``, ``"not reproduced"`` or ``"inconclusive"``.
        why: The reason for the verdict.
        source: The recorded result it comes from.
        estimate: Our point value in the claim's unit (%), or None.
        low: Lower end of its 95 % interval, or None.
        high: Upper end of its 95 % interval, or None.
    """

    claim: str
    paper: str
    measurement: str
    setting: str
    verdict: str
    why: str
    source: str
    estimate: float | None = None
    low: float | None = None
    high: float | None = None


def claim_row(key: str, measurement: str, setting: str, source: str, est: float | None = None,
         lo: float | None = None, hi: float | None = None) -> ClaimRow:  # fmt: skip
    """The row of claim ``key``: our measurement, its setting and source, and the verdict."""
    c = _CLAIMS[key]
    verdict, why = judge(lo, hi, c.claimed, c.kind, estimate=est)
    return ClaimRow(c.claim, c.paper, measurement, setting, verdict, why, source, est, lo, hi)


def missing_row(key: str, source: str, why: str) -> ClaimRow:
    """The row of claim ``key`` when its result is missing (verdict ``"inconclusive"``)."""
    c = _CLAIMS[key]
    return ClaimRow(c.claim, c.paper, f"no data: {why}", "—", "inconclusive", "no data yet", source)


def read_benchmark(path: Path) -> dict[str, Any] | None:
    """The benchmark record at ``path``, None when there is none (no data yet).

    Raises:
        ValueError: the file is damaged, or is not a benchmark record (an object whose
            ``result``, ``environment`` and ``git``, where present, are objects): a claim
            is never judged as if its data were missing.
    """
    record = store.read_record(path)
    if record is None:
        return None
    parts = ("result", "environment", "git")
    if not isinstance(record, dict) or any(
        not isinstance(record.get(k) or {}, dict) for k in parts
    ):
        raise ValueError(
            f"{path} is not a benchmark record (an object whose 'result', 'environment' "
            "and 'git' are objects): restore it, or move it out of the results folder"
        )
    return record


def load_result(bdir: Path, name: str) -> tuple[dict[str, Any], str]:
    """The ``result`` of ``bdir/name.json`` ({} when missing) and its source label.

    Raises:
        ValueError: the file is damaged or not a benchmark record (:func:`read_benchmark`).
    """
    record = read_benchmark(bdir / f"{name}.json")
    if record is None or not record.get("result"):
        return {}, f"`{name}.json` ({'missing' if record is None else 'no result'})"
    env = record.get("environment") or {}
    backend = env.get("backend") or env.get("jax_backend")
    cpu = env.get("cpu")
    cores = cpu.get("affinity") if isinstance(cpu, dict) else env.get("cpu_count")
    device = env.get("device_kind") if backend not in (None, "cpu") else f"{cores}-core CPU"
    date = str(record.get("date") or "?")[:10]
    return {**record["result"], "device": device}, f"`{name}.json` ({date})"


def percent(x: float) -> str:
    """``x`` as a signed percentage with one decimal."""
    return f"{x:+.1f} %"


# ----------------------------------------------------------------------------- benchmark rows


def pruning_rows(bdir: Path) -> list[ClaimRow]:
    """Saliency vs magnitude pruning: at every density, and the best gain (``pruning.json``)."""
    r, source = load_result(bdir, "pruning")
    if not r.get("summary"):
        why = source if not r else f"no protocol summary in {source}"
        return [missing_row("every", source, why), missing_row("best", source, why)]
    summ, dens = r["summary"], [f"{d:g}" for d in sorted(r["densities"])]

    def pct(c: dict[str, Any], of: float) -> tuple[float, float, float]:
        return tuple(100 * c[k] / max(of, 1e-12) for k in ("estimate", "low", "high"))

    mean = {d: pct(summ["mean"][d]["difference"], summ["mean"][d]["magnitude"]["estimate"])
            for d in dens}  # fmt: skip
    # The weakest density decides "at every density": one interval below 0 refutes the
    # claim (the lowest upper end is shown), otherwise the lowest lower end decides.
    refuted = [d for d in dens if mean[d][2] < 0]
    worst = (
        min(refuted, key=lambda d: mean[d][2]) if refuted else min(dens, key=lambda d: mean[d][1])
    )
    n = summ["counts"]
    cells = sum(n.values())
    setting = (f"MiniLM-L6, protocol size {r.get('size')}, {len(r.get('seeds', []))} seeds, "
               f"tasks {', '.join(r.get('tasks', []))}, {r['device']}; paper: BERT-base on "
               "GLUE, one seed")  # fmt: skip
    every = (
        ", ".join(
            f"{100 * float(d):g} %: {mean[d][0]:+.1f} [{mean[d][1]:+.1f}, {mean[d][2]:+.1f}]"
            for d in dens
        )
        + f" (normalized task mean; weakest {100 * float(worst):g} %); per (task, density) "
        f"better in {n['better']}, tied in {n['tied']}, worse in {n['worse']} of {cells}"
    )
    low = dens[0]
    task = {t: summ["per_task"][t][low]["relative"] for t in r["tasks"]}
    top = max(task, key=lambda t: task[t]["estimate"])
    t_ci = task[top]
    best = (
        f"{t_ci['estimate']:+.1f} % [{t_ci['low']:+.1f}, {t_ci['high']:+.1f}] ({top} at "
        f"{100 * float(low):g} %, the best task); normalized task mean {mean[low][0]:+.1f} %"
    )
    return [
        claim_row("every", every, setting, source, *mean[worst]),
        claim_row("best", best, setting, source, t_ci["estimate"], t_ci["low"], t_ci["high"]),
    ]


def rank_row(bdir: Path) -> ClaimRow:
    """Rank invariance of training: spread of the final loss across ranks."""
    seeds, seeds_source = load_result(bdir, "training_seeds")
    spread = seeds.get("rank_spread_percent") or {}
    if spread.get("low") is not None:
        first = (seeds.get("rank_spread_by_seed") or [{}])[0]
        ranks = ", ".join(map(str, first.get("ranks", [])))
        text = (f"{spread['estimate']:.2f} % [{spread['low']:.2f}, {spread['high']:.2f}] at "
                f"ranks {ranks} (final test loss), mean over {spread['n']} seeds (Student-t "
                "interval)")  # fmt: skip
        setting = (f"small GPT (2.6M), Python docs, seeds {seeds.get('seeds')}, "
                   f"{seeds['device']}; paper: GPT-2 124M on FineWeb, 1000 steps, GPU")  # fmt: skip
        return claim_row("rank", text, setting, seeds_source, spread["estimate"], spread["low"],
                    spread["high"])  # fmt: skip
    r, source = load_result(bdir, "training")
    if not r.get("rank_sweep"):
        return missing_row("rank", source, f"no rank sweep in {source}")
    s, cfg, model = r["rank_sweep"]["spread"], r.get("config", {}), r.get("model", {})
    text = (f"{100 * s['relative']:.2f} % ({s['min']:.3f}–{s['max']:.3f} at ranks "
            f"{', '.join(map(str, s['ranks']))}, final test loss)")  # fmt: skip
    setting = (f"GPT d={model.get('d_model')}, {model.get('n_layers')} layers "
               f"({model.get('n_params', 0) / 1e6:.1f}M), Python docs, {cfg.get('steps')} "
               f"steps, {r['device']}; paper: GPT-2 124M on FineWeb, 1000 steps, GPU")  # fmt: skip
    return claim_row("rank", text, setting, source, 100 * s["relative"])


def _seeded_energy(r: dict[str, Any]) -> dict[str, Any] | None:
    """The spectrum benchmark's claim check over seeds (with ``seeds``), when it has an
    interval."""
    over = r.get("over_seeds") or {}
    check = over.get("claim_check") or {}
    if (check.get("median") or {}).get("low") is None:
        return None
    return {**check, "seeds": over.get("seeds")}


def energy_row(bdir: Path) -> ClaimRow:
    """The momentum energy captured at rank 32."""
    r, source = load_result(bdir, "spectrum")
    seeded = _seeded_energy(r)
    if not r.get("claim_check") and not seeded:
        return missing_row("energy", source, f"no claim check in {source}")
    model, cfg = r.get("model", {}), r.get("config", {})
    n, steps = len(r.get("matrices", [])), len(r.get("log_steps", []))
    bc_result = load_result(bdir, "spectrum_bc")[0]
    seeds = f"seeds {seeded['seeds']}, " if seeded else ""
    setting = (f"GPT d={model.get('d_model')}, {model.get('n_layers')} layers, Python docs, "
               f"{cfg.get('steps')} steps, {seeds}{r['device']}; paper: not stated")  # fmt: skip
    if seeded:
        # The verdict reads the median over matrices and steps (the momentum as a whole);
        # the minimum's interval is shown beside it.
        med, least = seeded["median"], seeded["min"]

        def ci(c: dict[str, Any]) -> str:
            return f"{100 * c['estimate']:.1f} % [{100 * c['low']:.1f}, {100 * c['high']:.1f}]"

        def by_seed(key: str) -> str:
            return " / ".join(f"{100 * row[key]:.1f}" for row in seeded["by_seed"]) + " %"

        text = (f"median over matrices and steps {ci(med)} (mean over {med['n']} seeds, "
                f"Student-t interval, of each seed's median over {n} matrices × {steps} logged "
                f"steps; by seed {by_seed('median')}); minimum {ci(least)} (by seed "
                f"{by_seed('min')}); the verdict reads the median")  # fmt: skip
        bc = _seeded_energy(bc_result)
        if bc:
            text += (f"; bias-corrected runs: median {ci(bc['median'])}, minimum "
                     f"{ci(bc['min'])}")  # fmt: skip
        est = 100 * med["estimate"]
        return claim_row("energy", text, setting, source, est, 100 * med["low"], 100 * med["high"])
    c = r["claim_check"]
    text = (f"median {100 * c['median_all']:.1f} % (min {100 * c['min_all']:.1f} %) over "
            f"{n} matrices × {steps} logged steps")  # fmt: skip
    bc = bc_result.get("claim_check")
    if bc:
        text += (
            f"; bias-corrected run {100 * bc['median_all']:.1f} % (min {100 * bc['min_all']:.1f} %)"
        )
    return claim_row("energy", text, setting, source, 100 * c["median_all"])


def _single_session_cost(r: dict[str, Any], name: str) -> float | None:
    """Throughput cost 1 − median(AdamW)/median(``name``) in % of a record without an
    interval over repeats: its one repeat, or the rounds of an older one-session record."""
    one = ((r.get("over_repeats") or {}).get("by_optimizer") or {}).get(name) or {}
    if (one.get("cost_percent") or {}).get("estimate") is not None:
        return one["cost_percent"]["estimate"]
    runs = r["runs"]
    if "times_s" not in runs[name]:
        return None
    ref, own = np.median(runs["adamw"]["times_s"]), np.median(runs[name]["times_s"])
    return float(100 * (1 - ref / own))


def _gpu_throughput(bdir: Path, name: str) -> tuple[Any, str, str] | None:
    """The GPU end-to-end runs (``train_throughput_gpu_repeats/``): ``name``'s cost (%)
    over repeats with its Student-t interval (each repeat: 100 × (1 − AdamW's median step
    time ÷ ``name``'s)), a note naming the device, model, batch and commits, and that
    setting; None with fewer than two repeats or repeats of different settings (their
    interval would not describe one)."""
    from umtam_jax.experiments.intervals import student_t

    costs: list[float] = []
    settings: set[str] = set()
    commits: set[str] = set()
    dates: list[str] = []
    for path in sorted((bdir / "train_throughput_gpu_repeats").glob("*.json")):
        record = read_benchmark(path) or {}
        result = record.get("result") or {}
        times = result.get("times_s") or {}
        if "adamw" not in times or name not in times:
            continue
        costs.append(100 * (1 - float(np.median(times["adamw"]) / np.median(times[name]))))
        sig = result.get("signature") or {}
        model = sig.get("model") or {}
        device = (record.get("environment") or {}).get("device_kind") or "?"
        settings.add(f"{device}, GPT {model.get('blocks')} × {model.get('d_model')}, batch "
                     f"{sig.get('batch_size')} × {model.get('context')}")  # fmt: skip
        git = record.get("git") or {}
        commits.add(
            (git.get("commit") or "?")[:7] + (" with local changes" if git.get("dirty") else "")
        )
        dates.append(str(record.get("date") or ""))
    if len(costs) < 2 or len(settings) != 1:
        return None
    cost = student_t(costs)
    one_day = len({d[:10] for d in dates}) == 1 and all(dates)
    caveat = "; the repeats ran on one day, so it leaves out day-to-day variation"
    setting = f"{settings.pop()}, commit {', '.join(sorted(commits))}"
    note = (f"GPU runs ({setting}, `train_throughput_gpu_repeats/`): {cost.estimate:.1f} "
            f"[{cost.low:.1f}, {cost.high:.1f}] % ({name}; mean over {len(costs)} repeats, "
            f"Student-t interval{caveat if one_day else ''})")  # fmt: skip
    return cost, note, setting


def throughput_row(bdir: Path) -> ClaimRow:
    """The end-to-end throughput cost versus AdamW."""
    r, source = load_result(bdir, "efficiency")
    runs = r.get("runs", {})
    umtam = next((k for k in runs if k.startswith("umtam (defaults")), None)
    if "adamw" not in runs or umtam is None:
        return missing_row("speed", source, f"no AdamW / UMTAM defaults in {source}")
    demo = next((k for k in runs if k.startswith("umtam (demo")), None)
    model = f"MiniLM-L6 fine-tune step ({r.get('n_params', 0) / 1e6:.1f}M parameters)"
    shape = f"batch {r.get('batch_size')} × {r.get('max_length')} tokens"
    paper = "paper: GPT-2 124M, FineWeb, batch 4 × 256, GPU"
    by = (r.get("over_repeats") or {}).get("by_optimizer") or {}
    cost = (by.get(umtam) or {}).get("cost_percent") or {}
    if cost.get("low") is None:
        # One session: its rounds share one process and one stretch of machine load, so
        # they are not independent replicates and give no interval.
        est = _single_session_cost(r, umtam)
        text = f"{est:.1f} % ({umtam}; one session)" if est is not None else f"{umtam}: —"
        d = _single_session_cost(r, demo) if demo else None
        if d is not None:
            text += f"; {demo}: {d:.1f} %"
        return claim_row("speed", text, f"{model}, {shape}, {r['device']}; {paper}", source, est)

    def ci(c: dict[str, Any], f: str = "{:.1f}") -> str:
        return f"{f.format(c['estimate'])} [{f.format(c['low'])}, {f.format(c['high'])}]"

    u = by[umtam]
    by_repeat = " / ".join(f"{x:.1f}" for x in u["cost_percent_by_repeat"])
    ratio = ci(u["throughput_ratio"], "{:.3f}")
    text = (f"{ci(cost)} % ({umtam}; throughput ÷ AdamW {ratio}; mean over {cost['n']} "
            f"repeats of {r.get('rounds')} interleaved rounds, each repeat's median step "
            f"times, Student-t interval; by repeat {by_repeat} %)")  # fmt: skip
    if demo and (by.get(demo) or {}).get("cost_percent", {}).get("low") is not None:
        text += f"; {demo}: {ci(by[demo]['cost_percent'])} %"
    load = r.get("load") or {}
    loads = (f", 1-min load {load['min_1min']:.1f}–{load['max_1min']:.1f}"
             if load.get("min_1min") is not None else "")  # fmt: skip
    setting = (f"{model}, {shape}, shared {r['device']}{loads}: a CPU instead of a GPU and "
               "a model 5.5× smaller than the paper's, and the optimizer's share of a step "
               f"depends on both; {paper}")  # fmt: skip
    gpu = _gpu_throughput(bdir, "umtam (defaults)")
    if gpu is None:
        return claim_row("speed", text, setting, source, cost["estimate"], cost["low"],
                         cost["high"])  # fmt: skip
    # GPU runs are the paper's device class (and the benchmark runs the paper's model size
    # and batch): the verdict reads them, and the CPU record's own verdict is stated beside.
    on_cpu, _ = judge(cost["low"], cost["high"], _CLAIMS["speed"].claimed, "cost",
                      estimate=cost["estimate"])  # fmt: skip
    gpu_cost, note, gpu_setting = gpu
    text = f"{note}; CPU ({on_cpu} on its own): {text}"
    setting = f"the GPU runs: {gpu_setting}; the CPU record: {setting}"
    return claim_row("speed", text, setting, f"{source}, `train_throughput_gpu_repeats/`",
                     gpu_cost.estimate, gpu_cost.low, gpu_cost.high)  # fmt: skip
