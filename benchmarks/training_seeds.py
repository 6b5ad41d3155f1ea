"""Small-GPT training over several seeds: each optimizer's test loss at its chosen
learning rate, the differences to AdamW and UMTAM's spread across ranks, with 95 %
intervals over seeds.

Runs :mod:`benchmarks.training` once per seed (the seed draws the model initialisation,
the training batches, the validation and the test windows; each run chooses its learning
rates on validation loss and reports the test loss, as that benchmark does) and combines
the runs: per quantity the mean over seeds with a Student-t interval (n − 1 degrees of
freedom), per optimizer the paired difference to AdamW (the same seed's data and
initialisation). Every seed's record goes to ``results/training_seeds/`` (resumable: a
finished seed, and each finished run of an interrupted seed, is read back).

    python -m benchmarks.training_seeds --seeds 0 1 2
    python -m benchmarks.training_seeds --quick --seeds 0 1 --no-write   # smoke run

Writes ``benchmarks/results/training_seeds.json`` and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks import training
from benchmarks._common import RESULTS_DIR, environment, format_interval, t_interval
from benchmarks._records import read_record, write_results


def _seed_record(seed: int, args: argparse.Namespace, rdir: Path) -> dict[str, Any]:
    """One seed's training result: read back when recorded at this size with a test
    split, else run."""
    size = "quick" if args.quick else "default"
    sub = rdir / "training_seeds"
    name = f"training_{size}_seed{seed}"
    path = sub / f"{name}.json"
    if path.exists():
        try:
            rec = read_record(path)["result"]
        except ValueError as err:  # not JSON, or fails its checksum: never taken as measured
            raise ValueError(
                f"{path} is damaged ({err}): restore it, or delete it to run the seed again"
            ) from None
        data = rec["data"]
        if rec.get("size") == size and data["seed"] == seed and "test_windows" in data:
            return rec
    argv = ["--seed", str(seed), "--name", name, "--results-dir", str(sub), "--skip-exact",
            "--no-plot", *(["--quick"] if args.quick else [])]  # fmt: skip
    return training.main(argv)


def combine(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per optimizer the test loss of its chosen run and the difference to AdamW, and
    UMTAM's spread across ranks, each over the seeds of ``records``."""
    best: dict[str, list[float]] = {}
    for rec in records:
        for row in rec["summary"]:
            best.setdefault(row["optimizer"], []).append(row.get("final_test_loss"))
    out: dict[str, Any] = {"seeds": [r["data"]["seed"] for r in records], "optimizers": {}}
    for opt, xs in best.items():
        entry = {"final_test_loss": t_interval(xs), "by_seed": xs}
        if opt != "adamw" and "adamw" in best:
            diffs = [a - b for a, b in zip(xs, best["adamw"], strict=True)
                     if a is not None and b is not None]  # fmt: skip
            entry["minus_adamw"] = t_interval(diffs)
        out["optimizers"][opt] = entry
    spreads = [r["rank_sweep"]["spread"] for r in records if r["rank_sweep"].get("spread")]
    out["rank_spread_percent"] = t_interval([100 * s["relative"] for s in spreads])
    out["rank_spread_by_seed"] = spreads
    return out


def markdown(result: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = ["| optimizer | test loss [95 % CI] | − AdamW [95 % CI] | by seed |",
             "|---|---|---|---|"]  # fmt: skip
    for opt, e in result["optimizers"].items():
        d = e.get("minus_adamw")
        lines.append(
            f"| {opt} | {format_interval(e['final_test_loss'])} | "
            f"{format_interval(d, '{:+.3f}') if d else '—'} | "
            + ", ".join("–" if x is None else f"{x:.3f}" for x in e["by_seed"])
            + " |"
        )
    cfg, model = records[0]["config"], records[0]["model"]
    spread = result["rank_spread_percent"]
    first_spread = records[0]["rank_sweep"]["spread"]
    ranks = first_spread["ranks"] if first_spread else []
    return (
        f"GPT d={model['d_model']}, {model['n_layers']} layers ({model['n_params'] / 1e6:.1f}M), "
        f"Python docs, {cfg['steps']} steps × batch {cfg['batch']} × {cfg['context']} tokens; "
        f"seeds {', '.join(map(str, result['seeds']))} (each: initialisation, batches, "
        "validation and test windows); learning rates chosen per seed on validation loss, "
        "the final loss reported on test windows of other held-out documents; 95 % Student-t "
        "intervals over seeds, differences paired by seed.\n\n"
        + "\n".join(lines)
        + f"\n\nUMTAM's spread of final test loss across ranks {ranks} at the learning "
        f"rate chosen on validation, (max − min) / min: {format_interval(spread, '{:.2f}')} %.\n"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="the tiny model (a smoke run)")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    env = environment()
    rdir = Path(args.results_dir)
    records = [_seed_record(s, args, rdir) for s in args.seeds]
    result = combine(records)
    md = markdown(result, records)
    print(md)
    if not args.no_write:
        name = "training_seeds_quick" if args.quick else "training_seeds"
        write_results(name, result, md, results_dir=rdir, env=env,
                      title=f"{name} (small GPT over seeds)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
