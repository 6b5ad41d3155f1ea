"""The paper's headline claims beside our measurements, as one table.

:func:`paper_claims` reads the recorded results (the benchmarks' JSON files, among them
the merge protocol's table in ``merging.json``, or a protocol run's work directory when
given) and returns one :class:`ClaimRow` per claim: the paper's number, ours with its 95 %
interval where the data has one, the setting that differs and a verdict from
:func:`~umtam_jax.experiments.verdicts.judge`. Nothing is estimated that the results do not
hold: a missing file gives a row saying so, with verdict ``"inconclusive"``.

From a shell (the table is written atomically; ``--out`` replaces a table written
before, never another file unless ``--overwrite`` is given)::

    python -m umtam_jax.experiments.claims --out benchmarks/results/claims.md
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from umtam_jax.experiments import store
from umtam_jax.experiments._claim_rows import (
    ClaimRow,
    claim_row,
    energy_row,
    load_result,
    missing_row,
    percent,
    pruning_rows,
    rank_row,
    throughput_row,
)
from umtam_jax.experiments._outputs import check_replaceable, holds
from umtam_jax.experiments.comparison import MergeTable, read_results, summarize
from umtam_jax.experiments.verdicts import VERDICTS

__all__ = ["ClaimRow", "main", "paper_claims", "to_markdown"]


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
    r, source = load_result(bdir, "merging")
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
    results = read_results(workdir / "results.json")
    if results is None:
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
            why = setting if table is None else f"no UMTAM − {name}"
            rows.append(missing_row(ref, source, why))
            continue
        base = table.row(ref)["score"]
        est, lo, hi = (100 * x / base for x in d)
        text = (f"{percent(est)} [{lo:+.1f}, {hi:+.1f}] (Δ normalized score {d[0]:+.3f} "
                f"[{d[1]:+.3f}, {d[2]:+.3f}] ÷ {name}'s {base:.3f})")  # fmt: skip
        differs = f"{setting}; paper: BERT-base experts on GLUE RTE/MRPC/QNLI/CoLA, raw scores"
        rows.append(claim_row(ref, text, differs, source, est, lo, hi))
    return rows


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
        *pruning_rows(bdir),
        rank_row(bdir),
        energy_row(bdir),
        throughput_row(bdir),
    ]


# In every table written: what marks a file as one (an --out file without it is not).
_MARK = b"Generated by `python -m umtam_jax.experiments.claims` from the recorded results"
_HEADER = (
    "Generated by `python -m umtam_jax.experiments.claims` from the recorded results "
    "(`benchmarks/results/*.json`, or a merge protocol run's `results.json`); do not edit by "
    "hand. Relative numbers are in %. Verdicts: **reproduced** = the 95 % interval excludes "
    "0 in the paper's direction and covers or exceeds its number (a cost or a threshold: "
    "lies wholly at or below it, or on its side); **not reproduced** = the interval "
    "excludes the paper's effect or points the other way (also when it covers 0); "
    "**inconclusive** = the interval covers 0 and the paper's number (a cost or a "
    "threshold: covers it), or there is no interval (single run) or no data yet."
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
    p.add_argument(
        "--overwrite", action="store_true", help="replace an --out file this did not write"
    )
    args = p.parse_args(argv)
    if args.out:  # refused before the work, not after it
        check_replaceable(args.out, holds(_MARK), overwrite=args.overwrite,
                          what="the claims table", how="pass --overwrite")  # fmt: skip
    text = to_markdown(paper_claims(args.protocol, args.benchmarks, samples=args.samples)) + "\n"
    if args.out:
        store.write_atomic(args.out, lambda f: f.write(text.encode()))
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
