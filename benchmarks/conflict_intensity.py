"""Conflict intensity with a constructed high-conflict pair: does the winning merge depend
on how much the experts disagree?

The merging study's natural task pairs all have sign-conflict rates of about 0.5, distant
domains included, so they cannot answer the UMTAM paper's open question on conflict
intensity. This benchmark adds pairs whose experts are opposed by construction: a two-class
task and its mirror (:func:`umtam_jax.experiments.data.register_mirror_task`: the same
examples with the labels swapped, the expert seeded like the task's), whose experts start
from the same head and batches and are first pushed in opposite directions. Each pair is
trained two ways: with the heads trained as usual (``learned heads``, in ``--workdir``),
where a head can absorb the swap, and with every head kept at its seeded initialization
(``fixed heads``, ``PipelineConfig.train_head=False``, in ``<workdir>-fixed-heads``), where
the two experts share one fixed head and only their encoders can answer oppositely. Each
is merged under the protocol by UMTAM, TIES and task arithmetic with the same seeds as the
natural pairs (:func:`umtam_jax.experiments.conflict.conflict_study`, cached in the work
directories, so a rerun resumes), and set beside the natural pairs of the merging
study's record (``benchmarks/results/merging.json``, when it holds a conflict study of
the same protocol size and seeds): gains over task arithmetic with 95 % intervals, and
the rank correlation between conflict rate and each gain over all pairs.

    python -m benchmarks.conflict_intensity --workdir protocol-medium
    python -m benchmarks.conflict_intensity --quick --workdir /tmp/ci   # tiny size

Writes ``benchmarks/results/<name>.json`` (default ``conflict_intensity``,
``conflict_intensity_quick`` with ``--quick``) and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS_DIR, ROOT, environment
from benchmarks._records import write_results
from benchmarks.merging import conflict_table_md
from umtam_jax.experiments import store
from umtam_jax.experiments.conflict import conflict_study, rank_correlations
from umtam_jax.experiments.pipeline import enable_compilation_cache
from umtam_jax.experiments.protocol import SIZES

#: The constructed pairs merged by default: a two-class task and its mirror.
PAIRS = ("wn_defmatch+wn_defmatch_mirror",)
METHODS = ("umtam", "ties", "task_arithmetic")
#: How the experts' heads are trained: ``--heads`` choices.
HEADS = ("learned", "fixed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny size (a random 1-layer BERT)")
    p.add_argument("--size", default="medium", choices=sorted(SIZES))
    p.add_argument("--workdir", required=True, help="the protocol's work directory")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), help="pairs as TASK+TASK")
    p.add_argument("--seeds", nargs="+", type=int, help="default: the size's seeds")
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    p.add_argument(
        "--natural",
        default=str(RESULTS_DIR / "merging.json"),
        help="the merging study's record whose conflict study is set beside ('' for none)",
    )
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--name")
    args = p.parse_args(argv)
    if args.quick:
        args.size = "tiny"
    args.name = args.name or ("conflict_intensity_quick" if args.quick else "conflict_intensity")
    for pair in args.pairs:
        if len(pair.split("+")) != 2:
            p.error(f"--pairs: {pair!r} is not TASK+TASK")
    return args


def natural_pairs(path: str, size: str, seeds: list[int], samples: int) -> list[dict[str, Any]]:
    """The natural pairs measured by the merging study, if comparable.

    Args:
        path: A ``benchmarks/results/merging.json`` record ('' for none).
        size: The protocol size of this run.
        seeds: Its seeds.
        samples: Its bootstrap replicates.

    Returns:
        The rows of the record's conflict study when it was run at the same size, seeds
        and number of bootstrap replicates, else [] (also without the file).

    Raises:
        ValueError: the record is damaged (not JSON, or its content does not match its
            checksum): its pairs are never taken as missing.
    """
    record = store.read_record(Path(path)) if path else None  # damaged: an error naming it
    result = (record or {}).get("result") or {}
    study, protocol = result.get("conflict"), result.get("protocol") or {}
    same = (protocol.get("size"), (study or {}).get("seeds"), result.get("samples"))
    if not study or same != (size, seeds, samples):
        return []
    return study["pairs"]


def where_they_disagree(row: dict[str, Any], top: int = 3) -> str:
    """The leaves of a pair with the highest seed-mean conflict rates, and the median
    over its leaves."""
    rates = {k: v for k, v in (row.get("conflict_per_leaf") or {}).items() if v is not None}
    if not rates:
        return "per-leaf rates not recorded"
    highest = sorted(rates.items(), key=lambda kv: -kv[1])[:top]
    return (
        ", ".join(f"`{k}` {v:.2f}" for k, v in highest)
        + f"; median over {len(rates)} leaves {float(np.median(list(rates.values()))):.2f}"
    )


def _rho(correlations: dict[str, Any]) -> str:
    return ", ".join(
        f"{m} {'–' if v is None else f'{v:+.2f}'}" for m, v in correlations["spearman"].items()
    )


def markdown(
    constructed: list[dict[str, Any]],
    natural: list[dict[str, Any]],
    correlations: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    seeds: list[int],
) -> str:
    """The RESULTS.md section: how the pairs were made, the constructed pairs' scores, the
    rank correlations and one table of every pair sorted by conflict rate."""
    rows = sorted(constructed + natural, key=lambda r: r["conflict"])
    scores = "; ".join(
        f"{r['label']}: "
        + ", ".join(
            f"{m} {r[m]['score']:.3f} [{r[m]['low']:.3f}, {r[m]['high']:.3f}]" for m in METHODS
        )
        for r in constructed
    )
    leaves = "; ".join(f"{r['label']}: {where_they_disagree(r)}" for r in constructed)
    record = Path(args.natural).resolve()
    if record.is_relative_to(ROOT):
        record = record.relative_to(ROOT)
    source = (
        f"beside the {len(natural)} natural pairs of the merging study's record "
        f"(`{record}`, same size, seeds and bootstrap replicates)"
        if natural
        else "(no merging record of the same size and seeds to set beside)"
    )
    return (
        f"Protocol size **{args.size}**, seeds {', '.join(map(str, seeds))}. Constructed "
        f"pairs ({', '.join(args.pairs)}: a task and its mirror, the same examples with the "
        f"labels swapped, the experts seeded alike; with learned heads, and with each head "
        f"fixed at its seeded initialization so that the two experts share it) merged "
        f"under the protocol, {source}; gains are paired "
        f"differences of normalized test scores with 95 % intervals. Normalized scores of "
        f"the constructed pairs: {scores}. Their highest per-leaf conflict rates (seed "
        f"means): {leaves}. Spearman correlation between a pair's conflict "
        f"rate and each gain over the {len(rows)} pairs: {_rho(correlations['all'])}; over "
        f"the {correlations['learned']['pairs']} pairs with learned heads: "
        f"{_rho(correlations['learned'])}.\n\n" + conflict_table_md(rows, list(METHODS))
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    size = SIZES[args.size]
    seeds = list(size.seeds if args.seeds is None else args.seeds)
    workdir = Path(args.workdir)
    samples = size.bootstrap_samples
    env = environment()
    enable_compilation_cache(workdir / "jax-cache")
    pairs = [tuple(p.split("+")) for p in args.pairs]
    constructed = []
    for heads in args.heads:
        config = dataclasses.replace(size.config, train_head=heads == "learned")
        study = conflict_study(
            workdir if heads == "learned" else Path(f"{workdir}-fixed-heads"),
            size=dataclasses.replace(size, config=config),
            pairs=pairs,
            methods=METHODS,
            seeds=seeds,
            samples=samples,
            log=lambda s: print(s, flush=True),
        )
        for row in study["pairs"]:
            label = f"{' + '.join(row['tasks'])} ({heads} heads)"
            constructed.append({**row, "heads": heads, "label": label})
    natural = natural_pairs(args.natural, args.size, seeds, samples)
    learned = [r for r in constructed if r["heads"] == "learned"] + natural
    correlations = {
        "all": rank_correlations(constructed + natural, METHODS),
        "learned": {**rank_correlations(learned, METHODS), "pairs": len(learned)},
    }
    result = {"size": args.size, "seeds": seeds, "samples": samples, "constructed": constructed,
              "natural": natural, "correlations": correlations}  # fmt: skip
    write_results(
        args.name,
        result,
        markdown(constructed, natural, correlations, args, seeds),
        title=f"{args.name} (a constructed high-conflict pair beside the natural pairs)",
        results_dir=args.results_dir,
        env=env,
    )
    return result


if __name__ == "__main__":
    main()
