"""Momentum energy captured at rank r during a real UMTAM training run of the small GPT.

The paper claims the rank-32 momentum keeps more than 82 % of the momentum's energy. Here
the GPT of ``benchmarks/training.py`` is trained with ``umtam`` (error feedback on,
``error_decay > 0``), and every ``--log-every`` steps, for every factored matrix, the
matrix that step decomposed is rebuilt from the optimizer state,
``M̃ = U Σ Vᵀ + E`` (E is exactly the residual of the truncation), and its singular values
σ give the energy fraction an optimal rank-r truncation captures,
``Σ_{i≤r} σ_i² / Σ_i σ_i²``, for r in {8, 16, 32, 64}. The fraction the optimizer's own
factors hold, ``‖U Σ Vᵀ‖_F² / ‖M̃‖_F²`` at the run's rank, is logged beside it (it equals the
optimal one with ``--svd-method exact``; with the fast default it can only be lower).

The run is repeated for every seed of ``--seeds`` (default 0, 1, 2; the seed draws the
model initialisation and the training batches, the learning rate is the same for every
seed). Per seed and r the median and the minimum over (matrix, logged step) are kept; over
seeds each gets its mean with a 95 % Student-t interval (n − 1 degrees of freedom). Each
seed's run is written to ``results/spectrum_seeds/<name>_seed<seed>.json`` as it finishes
and read back when the command is rerun with the same settings, so an interrupted
invocation resumes at the next seed.

    python -m benchmarks.spectrum --quick
    python -m benchmarks.spectrum                      # seeds 0, 1, 2 at training.py's size
    python -m benchmarks.spectrum --bias-correction --name spectrum_bc

Writes ``benchmarks/results/<name>.json`` (default ``spectrum``), ``<name>.png`` (the first
seed) and the ``<name>`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, environment, t_interval
from benchmarks._lm_training import (
    DEFAULT,
    QUICK,
    base_transform,
    gpt_config,
    make_tx,
)
from benchmarks._momentum_energy import run_seed
from benchmarks._records import commits_of, read_record, recorded_run, write_results
from benchmarks._spectrum_report import CLAIM, markdown, plot
from umtam_jax.experiments.lm_data import lm_token_arrays
from umtam_jax.experiments.models.gpt import make_gpt_train_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--rank", type=int, default=32, help="rank of the UMTAM run")
    p.add_argument("--ranks", default="8,16,32,64", help="ranks at which energy is reported")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak lr (default: best UMTAM lr in results/training.json if its size "
        "matches, else 3e-3)",
    )
    p.add_argument("--error-decay", type=float, default=0.9)
    p.add_argument(
        "--bias-correction",
        action="store_true",
        help="UMTAM with bias_correction=True (training.py's umtam_bc; default lr: its best)",
    )
    p.add_argument("--svd-method", choices=("subspace", "exact"), default="subspace")
    p.add_argument(
        "--factor-embeddings",
        action="store_true",
        help="factor the embedding tables too (as training.py; slow on CPU)",
    )
    p.add_argument(
        "--seeds",
        default="0,1,2",
        help="comma-separated seeds, one training run each (initialisation and batches); "
        "the per-matrix table and the plot show the first",
    )
    p.add_argument(
        "--fresh", action="store_true", help="rerun every seed, ignoring recorded seed runs"
    )
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--name", default=None)
    return p.parse_args(argv)


def _default_lr(
    rdir: Path, size, rank: int, factor_embeddings: bool, optimizer: str = "umtam"
) -> tuple[float, str]:
    path = rdir / "training.json"
    try:
        rec = read_record(path)["result"]
        same_embeddings = rec.get("embeddings_factored_by_umtam_and_galore") == factor_embeddings
        if rec["config"] == dataclasses.asdict(size) and same_embeddings:
            for row in rec["summary"]:
                if row["optimizer"] == optimizer and row.get("rank") == rank and row.get("best_lr"):
                    return float(row["best_lr"]), f"best {optimizer} lr of results/training.json"
    except ValueError as err:  # damaged: never a silent fall back to another rate
        raise ValueError(f"{path} is damaged ({err}): restore it, or move it away") from None
    except (OSError, KeyError, TypeError):
        pass
    return 3e-3, "fixed default 3e-3 (no matching results/training.json)"


def combine_seeds(runs: list[dict[str, Any]], claim_rank: str = "32") -> dict[str, Any]:
    """Per r, each seed's median and minimum over (matrix, logged step) and their means
    over seeds with 95 % Student-t intervals (:func:`benchmarks._common.t_interval`).

    Args:
        runs: One :func:`run_seed` record per seed (only ``seed`` and ``summary`` are read).
        claim_rank: The r of the paper's claim.

    Returns:
        ``{"seeds", "interval", "by_rank", "claim_check"}``; ``by_rank[r]`` holds
        ``by_seed`` (per seed ``median``, ``min`` and ``share_above_claim``, fractions) and
        the intervals ``median``, ``min`` and ``share_above_claim``; ``claim_check`` (None
        when ``claim_rank`` was not measured) holds the claimed fraction and the
        ``median`` and ``min`` intervals at ``claim_rank``.
    """
    by_rank: dict[str, Any] = {}
    for r in runs[0]["summary"]:
        rows = [
            {
                "seed": run["seed"],
                "median": run["summary"][r]["all_steps_and_matrices"]["median"],
                "min": run["summary"][r]["all_steps_and_matrices"]["min"],
                "share_above_claim": run["summary"][r]["fraction_of_matrix_steps_above_claim"],
            }
            for run in runs
        ]
        by_rank[r] = {
            "by_seed": rows,
            **{k: t_interval([row[k] for row in rows]) for k in ("median", "min")},
            "share_above_claim": t_interval([row["share_above_claim"] for row in rows]),
        }
    claim = None
    if claim_rank in by_rank:
        b = by_rank[claim_rank]
        claim = {
            "rank": int(claim_rank),
            "claimed": CLAIM,
            "compared": "each seed's median over (matrix, logged step), mean over seeds",
            "median": b["median"],
            "min": b["min"],
            "by_seed": b["by_seed"],
        }
    return {
        "seeds": [run["seed"] for run in runs],
        "interval": "95 % Student-t interval over seeds (n − 1 degrees of freedom)",
        "by_rank": by_rank,
        "claim_check": claim,
    }


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.error_decay > 0:
        raise SystemExit("--error-decay must be > 0 (E is the residual used to rebuild M̃)")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds needs distinct seeds, got {args.seeds!r}")
    size = QUICK if args.quick else DEFAULT
    if args.steps:
        size = dataclasses.replace(size, steps=args.steps)
    log_every = args.log_every or max(1, size.steps // 12)
    name = args.name or ("spectrum_quick" if args.quick else "spectrum")
    rdir = Path(args.results_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    ranks = [int(x) for x in args.ranks.split(",") if x]
    optimizer = "umtam_bc" if args.bias_correction else "umtam"
    lr, lr_source = (
        (args.lr, "--lr")
        if args.lr
        else _default_lr(rdir, size, args.rank, args.factor_embeddings, optimizer)
    )
    env = environment()

    train, _ = lm_token_arrays()
    cfg = gpt_config(size)
    base = base_transform(
        optimizer,
        rank=args.rank,
        min_dim=size.min_dim_size_to_factor,
        svd_method=args.svd_method,
        error_decay=args.error_decay,
        factor_embeddings=args.factor_embeddings,
    )
    tx = make_tx(base, size.steps, size.warmup_frac)
    step_fn = make_gpt_train_step(tx, config=cfg)  # compiled once, shared by the seeds
    opt_conf = {
        "name": "umtam",
        "rank": args.rank,
        "svd_method": args.svd_method,
        "error_decay": args.error_decay,
        "bias_correction": args.bias_correction,
        "lr": lr,
        "lr_source": lr_source,
        "min_dim_size_to_factor": size.min_dim_size_to_factor,
        "embeddings_factored": args.factor_embeddings,
        "schedule": "lr × warmup_cosine (as training.py)",
    }
    signature = {
        "config": dataclasses.asdict(size),
        "model": dataclasses.asdict(cfg),
        "optimizer": opt_conf,
        "ranks": ranks,
        "log_every": log_every,
    }
    print(
        f"[spectrum] size {'QUICK' if args.quick else 'DEFAULT'} {dataclasses.asdict(size)}; "
        f"UMTAM rank {args.rank} ({args.svd_method}), lr {lr:g} ({lr_source}), "
        f"error_decay {args.error_decay}, bias_correction {args.bias_correction}; "
        f"seeds {seeds}",
        flush=True,
    )

    def run(seed: int) -> dict[str, Any]:
        rec = run_seed(seed, size=size, cfg=cfg, tx=tx, step_fn=step_fn, lr=lr, rank=args.rank,
                       ranks=ranks, log_every=log_every, train=train)  # fmt: skip
        print(f"[spectrum] seed {seed}: {rec['wall_s']:.0f} s, {rec['matrices']}", flush=True)
        return rec

    sub = rdir / "spectrum_seeds"
    runs = [
        recorded_run(
            f"[spectrum] seed {s}", {**signature, "seed": s}, sub / f"{name}_seed{s}.json",
            args.fresh, lambda s=s: run(s), env=env,
            title=f"{name}_seed{s} (momentum energy at rank r, one seed)",
        )
        for s in seeds
    ]  # fmt: skip
    first = {k: v for k, v in runs[0].items() if k not in ("signature", "git")}
    payload = {
        "size": "quick" if args.quick else "default",
        "config": signature["config"],
        "model": signature["model"],
        "optimizer": opt_conf,
        "definition": "fraction(r) = sum_{i<=r} σ_i² / sum_i σ_i², σ = singular values of "
        "M̃ = UΣVᵀ + E read from the optimizer state after each logged step",
        "ranks": ranks,
        **first,
        "over_seeds": combine_seeds(runs),
        "seed_records": [str((sub / f"{name}_seed{s}.json").relative_to(rdir)) for s in seeds],
        "part_commits": commits_of(runs),
        "wall_s_by_seed": [run["wall_s"] for run in runs],
        "plot": None if args.no_plot else f"{name}.png",
    }
    md = markdown(payload)
    write_results(
        name, payload, md, results_dir=rdir, env=env, title=f"{name} (momentum energy at rank r)"
    )
    # Drawn after the record, whose provenance (tracked files changed or not) it would alter.
    if not args.no_plot:
        plot(payload, rdir / f"{name}.png")
    print(md, flush=True)
    return payload


if __name__ == "__main__":
    main()
