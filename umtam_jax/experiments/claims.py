"""The paper's headline claims beside our measurements, as one table.

:func:`paper_claims` reads the recorded results (the benchmarks' JSON files, among them
the merge protocol's table in ``merging.json``, or a protocol run's work directory when
given) and returns one :class:`ClaimRow` per claim: the paper's number, ours with its 95 %
interval where the data has one, the setting that differs and a verdict from
:func:`~umtam_jax.experiments.verdicts.judge`. Nothing is estimated that the results do not
hold: a missing file gives a row saying so, with verdict ``"inconclusive"``.

From a shell (the table is written atomically)::

    python -m umtam_jax.experiments.claims --out benchmarks/results/claims.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from umtam_jax.experiments import store
from umtam_jax.experiments.comparison import MergeTable, summarize
from umtam_jax.experiments.verdicts import VERDICTS, Kind, judge

__all__ = ["ClaimRow", "main", "paper_claims", "to_markdown"]


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


def _row(key: str, measurement: str, setting: str, source: str, est: float | None = None,
         lo: float | None = None, hi: float | None = None) -> ClaimRow:  # fmt: skip
    c = _CLAIMS[key]
    verdict, why = judge(lo, hi, c.claimed, c.kind, estimate=est)
    return ClaimRow(c.claim, c.paper, measurement, setting, verdict, why, source, est, lo, hi)


def _missing(key: str, source: str, why: str) -> ClaimRow:
    c = _CLAIMS[key]
    return ClaimRow(c.claim, c.paper, f"no data: {why}", "—", "inconclusive", "no data yet", source)


def _load(bdir: Path, name: str) -> tuple[dict[str, Any], str]:
    """The ``result`` of ``bdir/name.json`` ({} when missing) and its source label."""
    record = store.read_json(bdir / f"{name}.json")
    if not isinstance(record, dict) or not isinstance(record.get("result"), dict):
        return {}, f"`{name}.json` (missing)"
    env = record.get("environment") or {}
    backend = env.get("backend") or env.get("jax_backend")
    cpu = env.get("cpu")
    cores = cpu.get("affinity") if isinstance(cpu, dict) else env.get("cpu_count")
    device = env.get("device_kind") if backend not in (None, "cpu") else f"{cores}-core CPU"
    return {**record["result"], "device": device}, f"`{name}.json` ({record.get('date', '?')[:10]})"


def _pct(x: float) -> str:
    return f"{x:+.1f} %"


# ----------------------------------------------------------------------------- merging


def _setting(proto: dict[str, Any], done: int) -> str:
    cap = (proto.get("config") or {}).get("max_test")
    size, n_seeds = proto.get("size"), len(proto.get("seeds", []))
    model = "random 1-layer BERT" if size == "tiny" else "MiniLM-L6"
    return (
        f"{model} experts, protocol size {size}, {done} of {n_seeds} seeds, tasks "
        f"{', '.join(proto.get('tasks', []))}, {'all' if cap is None else f'≤ {cap}'} test "
        "examples/task"
    )


def _recorded_table(bdir: Path) -> tuple[MergeTable | None, str, str]:
    """The merging benchmark's recorded protocol table (``merging.json``)."""
    r, source = _load(bdir, "merging")
    if not r.get("table"):
        return None, f"no protocol table in {source}", source
    table = MergeTable(**r["table"])
    return table, _setting(r.get("protocol", {}), len(table.seeds)), source


def _merge_table(protocol_results: Any, samples: int) -> tuple[MergeTable | None, str]:
    """The protocol's table of UMTAM, Linear and TIES and our setting, or None and why."""
    if isinstance(protocol_results, MergeTable):
        t = protocol_results
        return t, f"experts of {len(t.seeds)} seeds, tasks {', '.join(t.tasks)}"
    path = Path(protocol_results)
    workdir = path if path.is_dir() else path.parent
    results = store.read_json(workdir / "results.json")
    if not isinstance(results, dict) or "protocol" not in results:
        return None, f"no protocol results yet (`{path}` not found)"
    runs, proto = results.get("runs", {}), results["protocol"]
    methods = ["umtam", "linear", "ties"]
    done = [s for s in results.get("experts", {}) if all(s in runs.get(m, {}) for m in methods)]
    if not done:
        return None, "protocol run in progress: no seed has UMTAM, Linear and TIES yet"
    table = summarize(workdir, methods=methods, seeds=[int(s) for s in done],
                      references=("linear", "ties"), samples=samples)  # fmt: skip
    return table, _setting(proto, len(done))


def _paired(table: MergeTable, ref: str) -> tuple[float, float, float] | None:
    """UMTAM − ``ref`` (normalized score) with its interval, from either row."""
    try:
        row, other = table.row("umtam"), table.row(ref)
    except KeyError:
        return None
    if row.get(f"vs_{ref}") is not None:
        return row[f"vs_{ref}"], row[f"vs_{ref}_low"], row[f"vs_{ref}_high"]
    if other.get("vs_umtam") is not None:
        return -other["vs_umtam"], -other["vs_umtam_high"], -other["vs_umtam_low"]
    return None


def _merging_rows(protocol_results: Any, samples: int, bdir: Path) -> list[ClaimRow]:
    if protocol_results is None:
        table, setting, source = _recorded_table(bdir)
    else:
        table, setting = _merge_table(protocol_results, samples)
        source = "merge protocol (`results.json`)"
    rows = []
    for ref, name in (("linear", "Linear"), ("ties", "TIES")):
        d = _paired(table, ref) if table is not None else None
        if table is None or d is None:
            rows.append(_missing(ref, source, setting if table is None else f"no UMTAM − {name}"))
            continue
        base = table.row(ref)["score"]
        est, lo, hi = (100 * x / base for x in d)
        text = (f"{_pct(est)} [{lo:+.1f}, {hi:+.1f}] (Δ normalized score {d[0]:+.3f} "
                f"[{d[1]:+.3f}, {d[2]:+.3f}] ÷ {name}'s {base:.3f})")  # fmt: skip
        differs = f"{setting}; paper: BERT-base experts on GLUE RTE/MRPC/QNLI/CoLA, raw scores"
        rows.append(_row(ref, text, differs, source, est, lo, hi))
    return rows


# ----------------------------------------------------------------------------- benchmarks


def _pruning_rows(bdir: Path) -> list[ClaimRow]:
    r, source = _load(bdir, "pruning")
    if not r.get("summary"):
        why = source if not r else f"no protocol summary in {source}"
        return [_missing("every", source, why), _missing("best", source, why)]
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
        _row("every", every, setting, source, *mean[worst]),
        _row("best", best, setting, source, t_ci["estimate"], t_ci["low"], t_ci["high"]),
    ]


def _rank_row(bdir: Path) -> ClaimRow:
    seeds, seeds_source = _load(bdir, "training_seeds")
    spread = seeds.get("rank_spread_percent") or {}
    if spread.get("low") is not None:
        first = (seeds.get("rank_spread_by_seed") or [{}])[0]
        ranks = ", ".join(map(str, first.get("ranks", [])))
        text = (f"{spread['estimate']:.2f} % [{spread['low']:.2f}, {spread['high']:.2f}] at "
                f"ranks {ranks}, mean over {spread['n']} seeds (Student-t interval)")  # fmt: skip
        setting = (f"small GPT (2.6M), Python docs, seeds {seeds.get('seeds')}, "
                   f"{seeds['device']}; paper: GPT-2 124M on FineWeb, 1000 steps, GPU")  # fmt: skip
        return _row("rank", text, setting, seeds_source, spread["estimate"], spread["low"],
                    spread["high"])  # fmt: skip
    r, source = _load(bdir, "training")
    if not r.get("rank_sweep"):
        return _missing("rank", source, f"no rank sweep in {source}")
    s, cfg, model = r["rank_sweep"]["spread"], r.get("config", {}), r.get("model", {})
    text = (f"{100 * s['relative']:.2f} % ({s['min']:.3f}–{s['max']:.3f} at ranks "
            f"{', '.join(map(str, s['ranks']))})")  # fmt: skip
    setting = (f"GPT d={model.get('d_model')}, {model.get('n_layers')} layers "
               f"({model.get('n_params', 0) / 1e6:.1f}M), Python docs, {cfg.get('steps')} "
               f"steps, {r['device']}; paper: GPT-2 124M on FineWeb, 1000 steps, GPU")  # fmt: skip
    return _row("rank", text, setting, source, 100 * s["relative"])


def _seeded_energy(r: dict[str, Any]) -> dict[str, Any] | None:
    """The spectrum benchmark's claim check over seeds (with ``seeds``), when it has an
    interval."""
    over = r.get("over_seeds") or {}
    check = over.get("claim_check") or {}
    if (check.get("median") or {}).get("low") is None:
        return None
    return {**check, "seeds": over.get("seeds")}


def _energy_row(bdir: Path) -> ClaimRow:
    r, source = _load(bdir, "spectrum")
    seeded = _seeded_energy(r)
    if not r.get("claim_check") and not seeded:
        return _missing("energy", source, f"no claim check in {source}")
    model, cfg = r.get("model", {}), r.get("config", {})
    n, steps = len(r.get("matrices", [])), len(r.get("log_steps", []))
    bc_result = _load(bdir, "spectrum_bc")[0]
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
        return _row("energy", text, setting, source, est, 100 * med["low"], 100 * med["high"])
    c = r["claim_check"]
    text = (f"median {100 * c['median_all']:.1f} % (min {100 * c['min_all']:.1f} %) over "
            f"{n} matrices × {steps} logged steps")  # fmt: skip
    bc = bc_result.get("claim_check")
    if bc:
        text += (
            f"; bias-corrected run {100 * bc['median_all']:.1f} % (min {100 * bc['min_all']:.1f} %)"
        )
    return _row("energy", text, setting, source, 100 * c["median_all"])


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


def _throughput_row(bdir: Path) -> ClaimRow:
    r, source = _load(bdir, "efficiency")
    runs = r.get("runs", {})
    umtam = next((k for k in runs if k.startswith("umtam (defaults")), None)
    if "adamw" not in runs or umtam is None:
        return _missing("speed", source, f"no AdamW / UMTAM defaults in {source}")
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
        return _row("speed", text, f"{model}, {shape}, {r['device']}; {paper}", source, est)

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
    return _row("speed", text, setting, source, cost["estimate"], cost["low"], cost["high"])


def paper_claims(
    protocol_results: MergeTable | str | os.PathLike | None = None,
    benchmark_dir: str | os.PathLike = "benchmarks/results",
    *,
    samples: int = 2000,
) -> list[ClaimRow]:
    """The paper's headline claims beside our recorded measurements.

    Args:
        protocol_results: A merge protocol run: its ``results.json`` (or work directory),
            whose stored predictions :func:`~umtam_jax.experiments.comparison.summarize`
            turns into paired intervals; or a ready
            :class:`~umtam_jax.experiments.comparison.MergeTable` with rows ``umtam``,
            ``linear`` and ``ties``; None: the table recorded by the merging benchmark
            (``merging.json`` in ``benchmark_dir``), if any.
            The relative gain is the paired difference of normalized scores (and its
            interval's ends) divided by the reference's normalized score, as the paper
            divides averages; the reference score's own noise is not propagated.
        benchmark_dir: The folder of the benchmarks' JSON files.
        samples: Bootstrap replicates of the intervals computed here.

    Returns:
        One :class:`ClaimRow` per claim: merging vs Linear and vs TIES, pruning at every
        density and at 1 %, rank invariance, energy at rank 32, throughput cost.
    """
    bdir = Path(benchmark_dir)
    return [
        *_merging_rows(protocol_results, samples, bdir),
        *_pruning_rows(bdir),
        _rank_row(bdir),
        _energy_row(bdir),
        _throughput_row(bdir),
    ]


_HEADER = (
    "Generated by `python -m umtam_jax.experiments.claims` from the recorded results "
    "(`benchmarks/results/*.json`, or a merge protocol run's `results.json`); do not edit by "
    "hand. Relative numbers are in %. Verdicts: **reproduced** = the 95 % interval excludes "
    "0 in the paper's direction and covers or exceeds its number (a cost: covers it or lies "
    "below; a threshold: lies wholly on its side); **not reproduced** = the interval "
    "excludes the paper's effect or points the other way; **inconclusive** = the interval "
    "covers 0, or there is no interval (single run) or no data yet."
)


def to_markdown(rows: Sequence[ClaimRow]) -> str:
    """The claims as a Markdown table, with how verdicts are read."""
    head = ["#", "Claim", "Paper", "Ours (95 % CI)", "Setting that differs", "Verdict", "Source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        verdict = f"**{r.verdict}** ({r.why})"
        cells = (str(i), r.claim, r.paper, r.measurement, r.setting, verdict, r.source)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    counts = ", ".join(f"{sum(r.verdict == v for r in rows)} {v}" for v in VERDICTS)
    return "\n".join(["# Paper claims beside our measurements", "", _HEADER, "", *lines, "",
                      f"Summary: {counts}."])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: print the table, or write it atomically with ``--out``."""
    p = argparse.ArgumentParser(
        prog="python -m umtam_jax.experiments.claims", description=__doc__.split("\n")[0]
    )
    p.add_argument("--protocol", default=None, help="a protocol run's results.json")
    p.add_argument("--benchmarks", default="benchmarks/results", help="benchmark JSON folder")
    p.add_argument("--out", default=None, help="Markdown file to write (default: print)")
    p.add_argument("--samples", type=int, default=2000, help="bootstrap replicates")
    args = p.parse_args(argv)
    text = to_markdown(paper_claims(args.protocol, args.benchmarks, samples=args.samples)) + "\n"
    if args.out:
        store._atomic(Path(args.out), lambda f: f.write(text.encode()))  # temp + os.replace
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
