"""Small-GPT language modelling on the Python-docs corpus: UMTAM vs AdamW, Adafactor, GaLore.

Reproduces the shape of the paper's training tables (4–7, 11) at a size that runs on a
2-core CPU: validation-loss curves, a learning-rate grid per optimizer, UMTAM at ranks
8/16/32/128 and the spread of final test loss across ranks, steps to a threshold
validation loss, wall time per step, and UMTAM with ``svd_method="exact"`` vs the default
fast method at one rank. The held-out documents are split in two: learning rates (and each
rank's best run) are chosen on the validation windows only; the tables report the chosen
runs' loss on the test windows, evaluated once per run after its last step.

Every run sees the same model initialisation and the same sequence of training batches;
the learning rate follows the same warmup + cosine shape for every optimizer. The
learning rate is a traced scale in the optimizer state, so each optimizer configuration
is compiled once and reused across its learning rates.

    python -m benchmarks.training --quick      # tiny model, ~100 steps, minutes
    python -m benchmarks.training              # default size (DEFAULT in _lm_training.py)

Writes ``benchmarks/results/training.json``, ``training_curves.png`` and the
``training`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

# LAPACK (exact SVD, GaLore's projector refresh) through OpenBLAS threads fights XLA's
# thread pool on a small CPU (see docs/performance.md); set before numpy loads it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import optax  # noqa: E402

from benchmarks._common import RESULTS_DIR  # noqa: E402
from benchmarks._lm_training import (  # noqa: E402
    DEFAULT,
    DEFAULT_LRS,
    EMBEDDINGS,
    LOWRANK,
    OPTIMIZERS,
    QUICK,
    QUICK_LRS,
    UMTAM_VARIANTS,
    base_transform,
    gpt_config,
    lm_run_data,
    make_eval_fn,
    make_tx,
    run_key,
    top_key,
    train_one,
)
from benchmarks._records import append_journal, read_journal, write_results  # noqa: E402
from benchmarks._training_report import fmt, markdown, plot, summarize  # noqa: E402
from umtam_jax.experiments.lm_data import lm_token_arrays  # noqa: E402
from umtam_jax.experiments.models.gpt import (  # noqa: E402
    init_gpt,
    make_gpt_train_step,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, ~100 steps, 2 lrs")
    p.add_argument("--steps", type=int, help="override the number of steps")
    p.add_argument("--eval-every", type=int, help="override the eval interval")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated")
    p.add_argument("--lrs", help="comma-separated lr grid used for every optimizer")
    p.add_argument("--rank", type=int, default=32, help="UMTAM/GaLore rank of the lr grid")
    p.add_argument("--ranks", default="8,16,32,128", help="UMTAM rank sweep (comma-separated)")
    p.add_argument(
        "--rank-lrs",
        choices=("best", "all"),
        default="best",
        help="rank sweep at the best lr of --rank (best) or over the whole lr grid (all)",
    )
    p.add_argument(
        "--extend-grid",
        type=int,
        default=2,
        help="max extra lrs beyond a grid edge when the best lr is on it",
    )
    p.add_argument(
        "--factor-embeddings",
        action="store_true",
        help="let UMTAM/GaLore factor the embedding tables too (slow on CPU, see EMBEDDINGS)",
    )
    p.add_argument(
        "--run-budget-s",
        type=float,
        default=None,
        help="abandon a rank-sweep run whose projected time exceeds this (default: none)",
    )
    p.add_argument("--skip-exact", action="store_true", help="no exact-SVD comparison run")
    p.add_argument(
        "--exact-budget-s",
        type=float,
        default=300.0,
        help="abandon the exact-SVD run when its projected time exceeds this",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--fresh", action="store_true", help="ignore finished runs kept in <name>.runs.jsonl"
    )
    p.add_argument("--name", default=None, help="result name (default training / training_quick)")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    size = QUICK if args.quick else DEFAULT
    if args.steps:
        size = dataclasses.replace(size, steps=args.steps)
    if args.eval_every:
        size = dataclasses.replace(size, eval_every=args.eval_every)
    name = args.name or ("training_quick" if args.quick else "training")
    rdir = Path(args.results_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    optimizers = [o for o in args.optimizers.split(",") if o]
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {o!r}; choose from {OPTIMIZERS}")
    grids = QUICK_LRS if args.quick else DEFAULT_LRS
    if args.lrs:
        grids = {k: tuple(float(x) for x in args.lrs.split(",")) for k in OPTIMIZERS}
    ranks = [int(x) for x in args.ranks.split(",") if x]

    # Data: the same batches (order and content) for every run; fixed validation windows
    # (learning rates are chosen on them) and test windows (the loss reported).
    train, held_out = lm_token_arrays()
    data = lm_run_data(train, held_out, size, args.seed)

    cfg = gpt_config(size)
    params0 = init_gpt(jax.random.key(args.seed), cfg)
    n_params = int(sum(x.size for x in jax.tree.leaves(params0)))
    shapes = {
        jax.tree_util.keystr(k): list(v.shape)
        for k, v in jax.tree_util.tree_flatten_with_path(params0)[0]
        if v.ndim == 2
        and min(v.shape) >= size.min_dim_size_to_factor
        and (args.factor_embeddings or top_key(k) not in EMBEDDINGS)
    }

    eval_fn = make_eval_fn(cfg, size)

    print(
        f"[training] size: {'QUICK' if args.quick else 'DEFAULT'} {dataclasses.asdict(size)}; "
        f"GPT {n_params:,} params; {size.steps * size.batch * size.context:,} training tokens "
        f"per run; factored matrices: {shapes}",
        flush=True,
    )

    # Finished runs survive an interrupted invocation (same size/seed only).
    runs_path = rdir / f"{name}.runs.jsonl"
    signature = {"size": dataclasses.asdict(size), "seed": args.seed}
    if args.factor_embeddings:
        signature["factor_embeddings"] = True
    done: dict[str, dict[str, Any]] = {}
    if not args.fresh:
        for rec in read_journal(runs_path):
            if rec.get("signature") == signature:
                done[run_key(rec)] = rec
    runs: list[dict[str, Any]] = []
    compiled: dict[tuple, tuple] = {}
    t_start = time.perf_counter()

    def do_run(
        opt: str,
        lr: float,
        rank: int | None,
        svd_method: str = "subspace",
        max_seconds: float | None = None,
    ):
        spec = {"optimizer": opt, "lr": lr, "rank": rank, "svd_method": svd_method}
        if opt not in UMTAM_VARIANTS:
            spec["svd_method"] = "-"
        key = run_key(spec)
        for r in runs:
            if run_key(r) == key:
                return r
        if key in done:
            print(f"[training] reuse finished run {key}", flush=True)
            runs.append(done[key])
            return done[key]
        ckey = (opt, rank, spec["svd_method"])
        if ckey not in compiled:
            base = base_transform(
                opt,
                rank=rank or args.rank,
                min_dim=size.min_dim_size_to_factor,
                svd_method=svd_method,
                galore_gap=max(10, size.steps // 5),
                factor_embeddings=args.factor_embeddings,
            )
            tx = make_tx(base, size.steps, size.warmup_frac)
            compiled[ckey] = (tx, make_gpt_train_step(tx, config=cfg))
        tx, step_fn = compiled[ckey]
        t0 = time.perf_counter()
        res = train_one(step_fn, eval_fn, tx, params0, data, lr, size, key, max_seconds)
        res.update(spec, wall_s=time.perf_counter() - t0, signature=signature)
        print(
            f"[training] {key}: final val {fmt(res['final_val_loss'])}, test "
            f"{fmt(res['final_test_loss'])}  "
            f"median step {res['step_s_median'] * 1e3:.0f} ms  first step "
            f"{res['first_step_s']:.1f} s  ({res['wall_s']:.0f} s, "
            f"elapsed {time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
        append_journal(runs_path, res)
        runs.append(res)
        return res

    # 1. Learning-rate grid per optimizer (UMTAM and GaLore at --rank).
    order = [o for o in ("adamw", "umtam", "umtam_bc", "adafactor", "galore") if o in optimizers]

    def best_of(rs):
        ok = [r for r in rs if r["final_val_loss"] is not None and not r["diverged"]]
        ok = [r for r in ok if not r.get("aborted")]
        return min(ok, key=lambda r: r["final_val_loss"]) if ok else None

    grids = {k: list(v) for k, v in grids.items()}
    for opt in order:
        rank = args.rank if opt in LOWRANK else None
        rs = [do_run(opt, lr, rank) for lr in grids[opt]]
        # A best lr on the edge of the grid gets up to --extend-grid more lrs beyond it
        # (×/÷ 3), still chosen on validation loss only.
        for _ in range(args.extend_grid):
            b = best_of(rs)
            if b is None or len(grids[opt]) < 2:
                break
            lo, hi = min(grids[opt]), max(grids[opt])
            if b["lr"] == lo:
                new = lo / 3
            elif b["lr"] == hi:
                new = hi * 3
            else:
                break
            grids[opt].append(new)
            grids[opt].sort()
            rs.append(do_run(opt, new, rank))

    best = {}
    for opt in order:
        rs = [
            r
            for r in runs
            if r["optimizer"] == opt
            and r["rank"] in (None, args.rank)
            and r["svd_method"] in ("-", "subspace")
        ]
        best[opt] = best_of(rs)

    # 2. UMTAM rank sweep; 3. exact SVD vs the default method at --rank.
    rank_best: dict[int, dict[str, Any] | None] = {}
    rank_attempts: dict[int, list[dict[str, Any]]] = {}
    exact: dict[str, dict[str, Any]] = {}
    exact_notes: list[str] = []
    if "umtam" in optimizers and best.get("umtam") is not None:
        lr_star = best["umtam"]["lr"]
        for r in ranks:
            lrs = grids["umtam"] if args.rank_lrs == "all" else (lr_star,)
            rs = [do_run("umtam", lr, r, max_seconds=args.run_budget_s) for lr in lrs]
            rank_best[r] = best_of(rs)
            rank_attempts[r] = rs
    # Exact SVD vs the default method, at each UMTAM variant's best lr.
    for opt in UMTAM_VARIANTS:
        if args.skip_exact or opt not in optimizers or best.get(opt) is None:
            continue
        run = do_run(opt, best[opt]["lr"], args.rank, "exact", args.exact_budget_s)
        if run.get("aborted"):
            exact_notes.append(
                f"{opt} exact-SVD run abandoned: projected time exceeded "
                f"{args.exact_budget_s:.0f} s (median step {run['step_s_median'] * 1e3:.0f} ms"
                " over 3 steps)"
            )
        else:
            exact[opt] = run

    tables = summarize(order, grids, best, rank_best, rank_attempts, exact, shapes, args.rank)
    threshold = tables["threshold_val_loss"]
    plot_name = f"{name}_curves.png"
    if not args.no_plot:
        plot(runs, best, rank_best, exact, rdir / plot_name, threshold)

    payload = {
        "size": "quick" if args.quick else "default",
        "config": dataclasses.asdict(size),
        "model": dataclasses.asdict(cfg) | {"n_params": n_params},
        "factored_matrix_shapes": shapes,
        "data": {
            "corpus": "python3.11-doc reST sources, byte-level BPE 4096 (lm_token_arrays)",
            "train_tokens": int(train.size),
            "held_out_tokens": int(held_out.size),
            "held_out_split": "validation | test, cut at the document end nearest the middle",
            "val_windows": int(size.val_batches * size.batch),
            "test_windows": int(size.test_batches * size.batch),
            "seed": args.seed,
            "same_batches_for_every_run": True,
        },
        "schedule": "lr × warmup_cosine(0 → 1 over warmup_frac·steps, cosine to 0.1)",
        "weight_decay": 0.0,
        "embeddings_factored_by_umtam_and_galore": args.factor_embeddings,
        "lr_grids": {o: list(grids[o]) for o in order},
        "lr_selection": "lowest final validation loss; the test loss is reported",
        "threshold_val_loss": threshold,
        "threshold_rule": "worst best-lr final validation loss among the optimizers",
        "summary": tables["summary"],
        "rank_sweep": {
            "lr_policy": args.rank_lrs,
            "rows": tables["rank_rows"],
            "spread": tables["spread"],
        },
        "exact_vs_subspace": tables["exact_vs_subspace"],
        "exact_notes": exact_notes,
        "galore_available": hasattr(optax.contrib, "galore"),
        "galore_update_proj_gap": max(10, size.steps // 5),
        "total_wall_s": time.perf_counter() - t_start,
        "runs": [{k: v for k, v in r.items() if k != "signature"} for r in runs],
        "plot": None if args.no_plot else plot_name,
    }
    md = markdown(payload, args.rank)
    write_results(name, payload, md, results_dir=rdir, title=f"{name} (small GPT, Python docs)")
    runs_path.unlink(missing_ok=True)
    print(md, flush=True)
    return payload


if __name__ == "__main__":
    main()
