"""Sign-conflict rates between the protocol's experts, over all entries and among the
entries each expert keeps.

The merging study found that independently fine-tuned experts disagree in sign on about
half of all their entries, for every task pair. A sign election (TIES, UMTAM) only acts on
the entries the experts keep after trimming, so this benchmark measures the conflict rate
there too: for every pair of tasks and every seed, the experts' encoders are compared with
:func:`umtam_jax.merging.diagnostics.sign_conflict` over all entries and at each
``--densities`` (each task vector trimmed to its top fraction by magnitude per leaf, as
TIES-Merging trims). The experts are the protocol's, trained or read back from the work
directory's cache exactly as the merging study uses them; no merge is run.

    python -m benchmarks.conflict_rates --workdir protocol-medium --seeds 0 1 2
    python -m benchmarks.conflict_rates --quick --workdir /tmp/cr   # tiny size, one pair

Writes ``benchmarks/results/<name>.json`` (default ``conflict_rates``, ``conflict_rates_quick``
with ``--quick``) and its RESULTS.md
section; each (pair, seed) is also kept in ``<workdir>/conflict_rates.json`` as it is
measured, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS_DIR, environment
from benchmarks._records import write_results
from umtam_jax.experiments import store
from umtam_jax.experiments.models import minilm_pretrained
from umtam_jax.experiments.protocol import SIZES, seed_inputs, start_encoder
from umtam_jax.merging.diagnostics import sign_conflict

DENSITIES = (0.2, 0.1, 0.05)
#: The distant-domain task (Python source code) added to the size's tasks by default.
CODE_TASK = "py_package"
QUICK_TASKS = ("fortune_topic", CODE_TASK)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny size, two tasks, seed 0")
    p.add_argument("--size", default="medium", choices=sorted(SIZES))
    p.add_argument("--workdir", required=True, help="the protocol's work directory")
    p.add_argument("--tasks", nargs="+", help="default: the size's tasks and the code task")
    p.add_argument("--seeds", nargs="+", type=int, help="default: the size's seeds")
    p.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--name")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.seeds = "tiny", args.seeds or [0]
        args.tasks = args.tasks or list(QUICK_TASKS)
    args.name = args.name or ("conflict_rates_quick" if args.quick else "conflict_rates")
    return args


def pair_rates(base: Any, a: Any, b: Any, densities: list[float]) -> dict[str, Any]:
    """Conflict rate and magnitude share of two experts over all entries and at each
    density (``None`` where no entry is non-zero in both)."""
    out = {"all": sign_conflict(base, [a, b])}
    for d in densities:
        out[f"{d:g}"] = sign_conflict(base, [a, b], density=d)
    return {
        k: {"rate": v["rate"], "mass": v["mass"], "entries": v["entries"]} for k, v in out.items()
    }


def summarize(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Per key (``"all"`` or a density): the range of the seed-mean rates over pairs."""
    by_pair: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_pair.setdefault(" + ".join(r["tasks"]), []).append(r)
    out = {}
    for k in keys:
        means = {
            p: float(np.mean([r["rates"][k]["rate"] for r in rs])) for p, rs in by_pair.items()
        }
        out[k] = {"by_pair": means, "min": min(means.values()), "max": max(means.values())}
    return out


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace) -> str:
    keys = list(summary)
    head = [
        "Task pair",
        "seeds",
        *[f"rate, {'all entries' if k == 'all' else 'top ' + k}" for k in keys],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pair in summary[keys[0]]["by_pair"]:
        seeds = sorted(r["seed"] for r in rows if " + ".join(r["tasks"]) == pair)
        cells = [f"{summary[k]['by_pair'][pair]:.3f}" for k in keys]
        lines.append(f"| {pair} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    spread = "; ".join(f"{k}: {summary[k]['min']:.3f}–{summary[k]['max']:.3f}" for k in keys)
    return (
        f"Protocol size **{args.size}**, the experts' encoders of every pair of "
        f"tasks; rate = fraction of the entries non-zero in both task vectors whose signs "
        f"differ, seed mean; 'top d' trims each task vector to its top d fraction of "
        f"entries by magnitude per leaf first (TIES's trim). Range over pairs: {spread}.\n\n"
        + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    size = SIZES[args.size]
    tasks = list(args.tasks or (*size.tasks, CODE_TASK))
    seeds = list(size.seeds if args.seeds is None else args.seeds)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cache_path = workdir / "conflict_rates.json"
    cache = store.read_json(cache_path) or {}
    base = start_encoder(size)
    tokenizer = minilm_pretrained.load_minilm_tokenizer()
    rows = []
    for seed in seeds:
        experts = None
        for a, b in itertools.combinations(tasks, 2):
            key = f"{a}+{b}/{seed}/{','.join(f'{d:g}' for d in args.densities)}"
            if key not in cache:
                if experts is None:
                    _, _, trained = seed_inputs(size, seed, tasks, workdir, base, tokenizer)
                    experts = {t: e.params["encoder"] for t, e in zip(tasks, trained, strict=True)}
                cache[key] = pair_rates(base, experts[a], experts[b], args.densities)
                store.write_json(cache_path, cache)
                print(f"[conflict_rates] {key}: {cache[key]['all']['rate']:.3f} all", flush=True)
            rows.append({"tasks": [a, b], "seed": seed, "rates": cache[key]})
    keys = ["all", *(f"{d:g}" for d in args.densities)]
    summary = summarize(rows, keys)
    result = {"size": args.size, "tasks": tasks, "seeds": seeds, "densities": args.densities,
              "rows": rows, "summary": summary}  # fmt: skip
    write_results(
        args.name,
        result,
        markdown(rows, summary, args),
        title=f"{args.name} (sign conflict between experts, all entries and kept entries)",
        results_dir=args.results_dir,
        env=environment(),
    )
    return result


if __name__ == "__main__":
    main()
