"""Small-GPT language modelling on the Python-docs corpus: UMTAM vs AdamW, Adafactor, GaLore.

Reproduces the shape of the paper's training tables (4–7, 11) at a size that runs on a
2-core CPU: validation-loss curves, a learning-rate grid per optimizer (chosen on the
validation split only; there is no test split here), UMTAM at ranks 8/16/32/128 and the
spread of final validation loss across ranks, steps to a threshold loss, wall time per
step, and UMTAM with ``svd_method="exact"`` vs the default fast method at one rank.

Every run sees the same model initialisation and the same sequence of training batches;
the learning rate follows the same warmup + cosine shape for every optimizer. The
learning rate is a traced scale in the optimizer state, so each optimizer configuration
is compiled once and reused across its learning rates.

    python -m benchmarks.training --quick      # tiny model, ~100 steps, minutes
    python -m benchmarks.training              # default size (see DEFAULT below)

Writes ``benchmarks/results/training.json``, ``training_curves.png`` and the
``training`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

# LAPACK (exact SVD, GaLore's projector refresh) through OpenBLAS threads fights XLA's
# thread pool on a small CPU (see docs/performance.md); set before numpy loads it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import umtam_jax  # noqa: E402
from benchmarks._common import RESULTS_DIR, write_results  # noqa: E402
from benchmarks._training_report import fmt, markdown, plot, summarize  # noqa: E402
from umtam_jax.experiments.lm_data import lm_token_arrays  # noqa: E402
from umtam_jax.experiments.models.gpt import (  # noqa: E402
    GPTConfig,
    gpt_loss,
    init_gpt,
    make_gpt_train_step,
)


@dataclasses.dataclass(frozen=True)
class Size:
    """Model and run size."""

    d_model: int
    n_layers: int
    n_heads: int
    context: int
    batch: int
    steps: int
    eval_every: int
    val_batches: int
    min_dim_size_to_factor: int
    warmup_frac: float = 0.1


# Sized from measured step times on the shared 2-core CPU (see RESULTS.md for the
# times actually seen): d=256 makes rank 128 half-rank on the 256×1024 MLP matrices.
DEFAULT = Size(
    d_model=256,
    n_layers=2,
    n_heads=4,
    context=64,
    batch=8,
    steps=240,
    eval_every=20,
    val_batches=8,
    min_dim_size_to_factor=64,
)
QUICK = Size(
    d_model=64,
    n_layers=1,
    n_heads=2,
    context=32,
    batch=4,
    steps=100,
    eval_every=20,
    val_batches=4,
    min_dim_size_to_factor=32,
)

#: ``umtam_bc`` is ``umtam(..., bias_correction=True)``: the paper (and the library default,
#: docs/algorithm.md §2.2) has no bias correction, so with b2 = 0.999 the early second
#: moments are underestimated (R, C ≈ (1 − b2^t) × their mean) and the early steps are up to
#: 1/sqrt(1 − b2^t) ≈ 31× larger than Adam's; in a 240-step run that factor is still 2.2× at
#: the end.
OPTIMIZERS = ("adamw", "adafactor", "galore", "umtam", "umtam_bc")
UMTAM_VARIANTS = ("umtam", "umtam_bc")
LOWRANK = (*UMTAM_VARIANTS, "galore")
DEFAULT_LRS = {k: (3e-4, 1e-3, 3e-3, 1e-2) for k in OPTIMIZERS}
QUICK_LRS = {k: (3e-3, 1e-2) for k in OPTIMIZERS}


#: Embedding tables kept dense (Adam-like rule) in UMTAM and GaLore unless
#: ``--factor-embeddings``: GaLore projects only the transformer-block matrices, and on this
#: CPU the QR of UMTAM's 4096×r sketch of the 4096×256 token embedding alone costs ~0.65 s
#: per step (measured; the block matrices together ~0.09 s), which would make every UMTAM
#: run ~10× longer.
EMBEDDINGS = ("wte", "wpe")


def _top_key(path) -> str:
    k = path[0]
    return str(getattr(k, "key", getattr(k, "name", k)))


def umtam_row_axes(path, shape) -> int:
    """UMTAM 2-D view: embeddings dense (0), everything else fan-in × fan-out."""
    return 0 if _top_key(path) in EMBEDDINGS else umtam_jax.default_row_axes(path, shape)


def base_transform(
    name: str,
    *,
    rank: int,
    min_dim: int,
    svd_method: str = "subspace",
    galore_gap: int = 50,
    factor_embeddings: bool = False,
    error_decay: float = 0.9,
) -> optax.GradientTransformation:
    """The optimizer with learning rate 1 (the lr and schedule are applied outside).

    No weight decay for any optimizer (short runs; keeps Adafactor, whose decay is not
    multiplied by the learning rate, comparable).
    """
    if name == "adamw":
        return optax.adamw(1.0, weight_decay=0.0)
    if name == "adafactor":
        # Absolute step size (no parameter-scale multiplier) so its lr grid matches Adam's.
        return optax.adafactor(
            1.0, min_dim_size_to_factor=min_dim, multiply_by_parameter_scale=False
        )
    if name == "galore":
        galore = optax.contrib.galore(1.0, rank=rank, update_proj_gap=galore_gap)
        if factor_embeddings:
            return galore
        return optax.multi_transform(
            {"lowrank": galore, "dense": optax.adam(1.0)},
            lambda params: {
                k: jax.tree.map(lambda _, k=k: "dense" if k in EMBEDDINGS else "lowrank", v)
                for k, v in params.items()
            },
        )
    if name in UMTAM_VARIANTS:
        return umtam_jax.umtam(
            1.0,
            rank=rank,
            min_dim_size_to_factor=min_dim,
            svd_method=svd_method,
            error_decay=error_decay,
            bias_correction=name == "umtam_bc",
            row_axes=None if factor_embeddings else umtam_row_axes,
        )
    raise ValueError(f"unknown optimizer {name!r}")


def make_tx(base: optax.GradientTransformation, steps: int, warmup_frac: float):
    """``base`` (lr 1) × warmup-cosine shape × a traced per-run learning rate."""
    shape = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, max(1, int(warmup_frac * steps)), steps, end_value=0.1
    )
    return optax.chain(
        base,
        optax.scale_by_schedule(shape),
        optax.inject_hyperparams(optax.scale)(step_size=1.0),
    )


def set_lr(opt_state, lr: float):
    """Sets the traced learning rate held by ``inject_hyperparams(optax.scale)``."""
    inj = opt_state[-1]
    hp = dict(inj.hyperparams)
    hp["step_size"] = jnp.asarray(lr, jnp.float32)
    return (*opt_state[:-1], inj._replace(hyperparams=hp))


def run_key(r: dict[str, Any]) -> str:
    return f"{r['optimizer']}|r{r.get('rank')}|{r.get('svd_method', '-')}|lr{r['lr']:.3g}"


def train_one(
    step_fn,
    eval_fn,
    tx,
    params0,
    batches: np.ndarray,
    val: np.ndarray,
    lr: float,
    size: Size,
    label: str,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """One training run; returns curves and timings.

    With ``max_seconds``, the run is abandoned after 4 steps when the projected time of
    the remaining steps exceeds it (``aborted`` is then set).
    """
    from tqdm.auto import tqdm

    params = params0
    opt_state = set_lr(tx.init(params0), lr)
    eval_steps, val_losses, train_losses, times = [0], [float(eval_fn(params, val))], [], []
    diverged = aborted = False
    bar = tqdm(range(1, size.steps + 1), desc=label, leave=False, mininterval=5)
    for t in bar:
        t0 = time.perf_counter()
        params, opt_state, loss = step_fn(params, opt_state, batches[t - 1])
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        train_losses.append(loss)
        if not math.isfinite(loss):
            diverged = True
            break
        if max_seconds is not None and t == 4:
            projected = float(np.median(times[1:])) * (size.steps - t)
            if projected > max_seconds:
                print(
                    f"[training] {label}: projected {projected:.0f} s > {max_seconds:.0f} s,"
                    " abandoned",
                    flush=True,
                )
                aborted = True
                break
        if t % size.eval_every == 0 or t == size.steps:
            vl = float(eval_fn(params, val))
            eval_steps.append(t)
            val_losses.append(vl)
            bar.set_postfix(val=f"{vl:.3f}")
            if not math.isfinite(vl):
                diverged = True
                break
    bar.close()
    steady = times[1:] if len(times) > 1 else times
    return {
        "eval_steps": eval_steps,
        "val_loss": val_losses,
        "train_loss": train_losses,
        "final_val_loss": (None if aborted else val_losses[-1] if not diverged else float("inf")),
        "diverged": diverged,
        "aborted": aborted,
        "first_step_s": times[0] if times else None,
        "step_s_median": float(np.median(steady)) if steady else None,
        "step_s_p10": float(np.percentile(steady, 10)) if steady else None,
    }


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


def gpt_config(size: Any) -> GPTConfig:
    """The GPT of a benchmark size (vocabulary of the LM data's tokenizer, 4096)."""
    return GPTConfig(
        vocab_size=4096,
        context=size.context,
        d_model=size.d_model,
        n_layers=size.n_layers,
        n_heads=size.n_heads,
    )


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

    # Data: the same batches (order and content) for every run; a fixed validation set.
    train, val_tokens = lm_token_arrays()
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, train.size - size.context - 1, size=(size.steps, size.batch))
    batches = train[starts[..., None] + np.arange(size.context + 1)].astype(np.int32)
    vrng = np.random.default_rng(args.seed + 1_000_003)
    vstarts = vrng.integers(
        0, val_tokens.size - size.context - 1, size=size.val_batches * size.batch
    )
    val = jnp.asarray(val_tokens[vstarts[:, None] + np.arange(size.context + 1)], jnp.int32)

    cfg = gpt_config(size)
    params0 = init_gpt(jax.random.key(args.seed), cfg)
    n_params = int(sum(x.size for x in jax.tree.leaves(params0)))
    shapes = {
        jax.tree_util.keystr(k): list(v.shape)
        for k, v in jax.tree_util.tree_flatten_with_path(params0)[0]
        if v.ndim == 2
        and min(v.shape) >= size.min_dim_size_to_factor
        and (args.factor_embeddings or _top_key(k) not in EMBEDDINGS)
    }

    @jax.jit
    def eval_fn(params, val):
        vb = val.reshape(size.val_batches, size.batch, size.context + 1)
        return jax.lax.map(lambda b: gpt_loss(params, b, config=cfg), vb).mean()

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
    if runs_path.exists() and not args.fresh:
        for line in runs_path.read_text().splitlines():
            rec = json.loads(line)
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
        res = train_one(step_fn, eval_fn, tx, params0, batches, val, lr, size, key, max_seconds)
        res.update(spec, wall_s=time.perf_counter() - t0, signature=signature)
        print(
            f"[training] {key}: final val {fmt(res['final_val_loss'])}  "
            f"median step {res['step_s_median'] * 1e3:.0f} ms  first step "
            f"{res['first_step_s']:.1f} s  ({res['wall_s']:.0f} s, "
            f"elapsed {time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
        with runs_path.open("a") as f:
            f.write(json.dumps(res, allow_nan=True) + "\n")
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
            "val_tokens": int(val_tokens.size),
            "val_windows": int(size.val_batches * size.batch),
            "seed": args.seed,
            "same_batches_for_every_run": True,
        },
        "schedule": "lr × warmup_cosine(0 → 1 over warmup_frac·steps, cosine to 0.1)",
        "weight_decay": 0.0,
        "embeddings_factored_by_umtam_and_galore": args.factor_embeddings,
        "lr_grids": {o: list(grids[o]) for o in order},
        "lr_selection": "lowest final validation loss (no test split is used)",
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
