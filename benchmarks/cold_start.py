"""Does UMTAM's first decomposition need extra power iterations? Measured on the small GPT.

The first step's decomposition starts from a random right basis ``V0``: a rank-r range
finder without power iterations keeps less of the momentum's top-r energy than the
warm-started decompositions of later steps. Extra power iterations on that step sharpen
it, but under ``jit`` they need a conditional on the step count, which on a GPU or TPU is
a wait for the device on every step. The library runs them only without error feedback
(``error_decay=0``, lean); this benchmark measures both choices for both modes.

For each configuration (UMTAM as in ``benchmarks/training.py``: the default; with
``bias_correction``; lean with ``bias_correction``) and each seed, the GPT of
``benchmarks/training.py`` is trained twice on the same initialisation and batches: with
0 and with 4 extra power iterations on the first step (the library's choice is replaced
by ``_decomposition.cold_start_iterations`` while the run's step is traced). Reported per
configuration: the final validation and test losses of both, their paired differences
(without − with) with 95 % Student-t intervals over seeds (the library's choice is read
from the validation difference; test is reported beside it), and, with error feedback
(the state keeps M̃), the fraction ‖UΣVᵀ‖² / ‖M̃‖² of the momentum's energy the
optimizer's own factors hold at steps 1, 2, 3, 5 and 10, beside the optimal rank-r
fraction. Learning rates are each
configuration's best on validation loss in ``results/training.json``; the test windows
are held-out documents apart from the validation ones.

    python -m benchmarks.cold_start                 # 5 seeds at training.py's size
    python -m benchmarks.cold_start --quick --seeds 0 --steps 6 --no-write   # smoke run

Each finished run is kept in ``results/cold_start_runs/`` and read back by a rerun with
the same settings. Writes ``benchmarks/results/cold_start.json`` and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any
from unittest.mock import patch

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _lm_training as lm
from benchmarks._common import RESULTS_DIR, environment, format_interval, t_interval
from benchmarks._momentum_energy import spectra
from benchmarks._records import write_results
from umtam_jax.experiments import store
from umtam_jax.experiments.lm_data import lm_token_arrays
from umtam_jax.experiments.models.gpt import init_gpt, make_gpt_train_step
from umtam_jax.optimizer import _decomposition

#: name → (optimizer of ``benchmarks.training``, error_decay, learning rate).
CONFIGS = {
    "default": ("umtam", 0.9, 1e-4),
    "bias-corrected": ("umtam_bc", 0.9, 1e-3),
    "lean bias-corrected": ("umtam_bc", 0.0, 1e-3),
}
EXTRA = (0, 4)
LOG_STEPS = (1, 2, 3, 5, 10)
RANK = 32


def train_run(
    name: str,
    extra: int,
    seed: int,
    size: lm.Size,
    tokens: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """One training run of configuration ``name`` with ``extra`` first-step iterations on
    ``tokens`` (the train and held-out streams of ``lm_token_arrays``); its final loss on
    the validation and the test windows of :func:`benchmarks._lm_training.lm_run_data`."""
    variant, decay, lr = CONFIGS[name]
    data = lm.lm_run_data(*tokens, size, seed)
    cfg = lm.gpt_config(size)
    params = init_gpt(jax.random.key(seed), cfg)
    base = lm.base_transform(
        variant, rank=RANK, min_dim=size.min_dim_size_to_factor, error_decay=decay
    )
    tx = lm.make_tx(base, size.steps, size.warmup_frac)
    step = make_gpt_train_step(tx, config=cfg)
    state = lm.set_lr(tx.init(params), lr)
    captured: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    with patch.object(_decomposition, "cold_start_iterations", lambda _cfg: extra):
        for t in range(1, size.steps + 1):
            params, state, _ = step(params, state, data.batches[t - 1])
            if decay > 0 and t in LOG_STEPS:
                sp = spectra(state)
                own = [float(low / total) for _, low, total in sp]
                best = [float(jnp.sum(sv[:RANK] ** 2) / jnp.sum(sv**2)) for sv, _, _ in sp]
                captured[str(t)] = [float(np.mean(own)), float(np.mean(best))]
    evaluate = lm.make_eval_fn(cfg, size)
    return {"config": name, "extra": extra, "seed": seed, "lr": lr, "error_decay": decay,
            "final_val_loss": float(evaluate(params, data.val)),
            "final_test_loss": float(evaluate(params, data.test)), "captured": captured,
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration: both variants' losses, the paired difference, captured energy."""
    out: dict[str, Any] = {}
    for name in CONFIGS:
        by = {(r["extra"], r["seed"]): r for r in runs if r["config"] == name}
        seeds = sorted(s for e, s in by if e == EXTRA[0] and (EXTRA[1], s) in by)
        if not seeds:
            continue
        entry: dict[str, Any] = {"seeds": seeds}
        for split in ("val", "test"):
            loss = {e: [by[(e, s)][f"final_{split}_loss"] for s in seeds] for e in EXTRA}
            differences = [a - b for a, b in zip(*loss.values(), strict=True)]
            entry[f"final_{split}_loss"] = {str(e): t_interval(loss[e]) for e in EXTRA}
            entry[f"{split}_by_seed"] = {str(e): loss[e] for e in EXTRA}
            entry[f"{split}_without_minus_with"] = t_interval(differences)
        if by[(EXTRA[0], seeds[0])]["captured"]:
            entry["captured"] = {
                t: {
                    **{
                        str(e): float(np.mean([by[(e, s)]["captured"][t][0] for s in seeds]))
                        for e in EXTRA
                    },  # fmt: skip
                    "optimal": float(np.mean([by[(EXTRA[1], s)]["captured"][t][1] for s in seeds])),
                }
                for t in map(str, LOG_STEPS)
                if t in by[(EXTRA[0], seeds[0])]["captured"]
            }
        out[name] = entry
    return out


def markdown(result: dict[str, Any], size: lm.Size) -> str:
    lines = [
        "| configuration | lr | split | loss, 0 extra | loss, 4 extra | 0 − 4 [95 % CI] | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in result.items():
        for split in ("val", "test"):
            loss = e[f"final_{split}_loss"]
            diff = format_interval(e[f"{split}_without_minus_with"], "{:+.4f}")
            lines.append(
                f"| {name} | {CONFIGS[name][2]:g} | {split} | {format_interval(loss['0'])} | "
                f"{format_interval(loss['4'])} | {diff} | {len(e['seeds'])} |"
            )
    energy = ["| configuration | step | captured, 0 extra | captured, 4 extra | optimal |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, e in result.items():
        for t, c in e.get("captured", {}).items():
            energy.append(f"| {name} | {t} | {c['0']:.3f} | {c['4']:.3f} | {c['optimal']:.3f} |")
    return (
        f"GPT d={size.d_model}, {size.n_layers} layers, {size.steps} steps × batch "
        f"{size.batch} × {size.context} tokens, rank {RANK}; per seed the same initialisation, "
        "batches and evaluation windows for both variants. Final loss on the validation "
        "windows (what the library's choice is read from) and on the test windows (held-out "
        "documents apart from them, reported only): mean [95 % Student-t interval] over "
        "seeds, the difference paired by seed:\n\n"
        + "\n".join(lines)
        + "\n\nMean fraction of the momentum's energy held by the optimizer's rank-r factors "
        "(with error feedback; the optimal fraction is that of the exact rank-r SVD):\n\n"
        + "\n".join(energy)
        + "\n"
    )


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--quick", action="store_true", help="the tiny model of training.py")
    ap.add_argument("--steps", type=int, help="override the number of steps")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--no-write", action="store_true", help="print only, keep no run")
    args = ap.parse_args(argv)
    size = lm.QUICK if args.quick else lm.DEFAULT
    if args.steps:
        size = dataclasses.replace(size, steps=args.steps, eval_every=args.steps)
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown configuration {n!r}; choose from {list(CONFIGS)}")
    env = environment()
    rdir = Path(args.results_dir)
    cache = rdir / "cold_start_runs"
    # The tag names what a run holds: both splits ("valtest"); a change of it reruns all.
    tag = f"{'quick' if args.quick else 'default'}-{size.steps}-valtest"
    runs = []
    tokens = None  # loaded at the first run that is not read back
    for seed in args.seeds:
        for name in names:
            for extra in EXTRA:
                path = cache / f"{tag}-{name.replace(' ', '_')}-extra{extra}-seed{seed}.json"
                cached = store.read_json(path)  # None: not run yet, or damaged (run again)
                if cached is not None:
                    runs.append(cached)
                    continue
                tokens = tokens or lm_token_arrays()
                run = train_run(name, extra, seed, size, tokens)
                val, loss, wall = run["final_val_loss"], run["final_test_loss"], run["wall_s"]
                print(f"[cold_start] {name}, {extra} extra, seed {seed}: validation {val:.4f}, "
                      f"test {loss:.4f} ({wall:.0f} s)", flush=True)  # fmt: skip
                runs.append(run)
                if not args.no_write:
                    store.write_json(path, run)
    result = combine(runs)
    md = markdown(result, size)
    print(md)
    if not args.no_write:
        write_results("cold_start", {"size": dataclasses.asdict(size), "configs": result}, md,
                      results_dir=rdir, env=env,
                      title="cold_start (extra power iterations on the first step)")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
