"""Time per MiniLM fine-tune step and optimizer-state memory (paper Table 8).

One process, one MiniLM-L6 classifier (22.7M parameters, 4 labels), one fixed real batch
(``fortune_topic`` by default, batch × max_length tokens), and one jitted full training
step (forward, backward, optimizer update: ``make_classifier_train_step``) per optimizer:
``optax.sgd``, ``optax.adamw``, UMTAM with library defaults (fresh subspace decomposition
every step), UMTAM as the demo runs it (``svd_every=10``) and lean UMTAM
(``error_decay=0, saliency="final"``). After warm-up the steps are timed interleaved
(round-robin over the optimizers, so machine load hits all alike), and the median is
reported with the optimizer-state bytes, both also as ratios to AdamW.

    python -m benchmarks.efficiency --quick     # 7 timed rounds
    python -m benchmarks.efficiency             # 15 timed rounds

Writes ``benchmarks/results/efficiency.json`` and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import jax
import numpy as np
import optax

import umtam_jax  # noqa: E402
from benchmarks._common import RESULTS_DIR, write_results  # noqa: E402
from umtam_jax import experiments as E  # noqa: E402
from umtam_jax.experiments import data as data_lib  # noqa: E402
from umtam_jax.experiments.models import minilm  # noqa: E402

LR = 1e-4


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "sgd": optax.sgd(LR),
        "adamw": optax.adamw(LR),
        "umtam (defaults, svd_every=1)": umtam_jax.umtam(LR),
        "umtam (demo, svd_every=10)": umtam_jax.umtam(LR, svd_every=10),
        'umtam lean (error_decay=0, saliency="final")': umtam_jax.umtam(
            LR, error_decay=0.0, saliency="final"
        ),
        "umtam lean, svd_every=10": umtam_jax.umtam(
            LR, error_decay=0.0, saliency="final", svd_every=10
        ),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--task", default="fortune_topic")
    data_lib.add_task_import_option(ap)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7 / 15)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workdir", default="umtam-demo-work")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    data_lib.import_task_modules(args.imports)
    rounds = args.rounds or (7 if args.quick else 15)
    E.enable_compilation_cache(Path(args.workdir) / "jax_cache")

    cfg = dataclasses.replace(E.QUICK, max_length=args.max_length, max_train=args.batch_size * 4)
    tt = E.prepare_task(args.task, minilm.load_minilm_tokenizer(), cfg)
    batch = {k: v[: args.batch_size] for k, v in tt.arrays["train"].items()}
    base = minilm.load_minilm()
    params0 = E.init_expert(base, tt.num_labels, cfg, tt.name)
    param_bytes = E.tree_bytes(params0)
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params0))

    runs = {}
    for name, tx in optimizers().items():
        step = minilm.make_classifier_train_step(tx)
        state = tx.init(params0)
        t = time.perf_counter()
        p, s, loss = step(params0, state, batch, None)
        jax.block_until_ready(p)
        compile_s = time.perf_counter() - t
        for _ in range(args.warmup):
            p, s, loss = step(p, s, batch, None)
        jax.block_until_ready(p)
        runs[name] = {
            "step": step,
            "params": p,
            "state": s,
            "times": [],
            "compile_plus_first_s": compile_s,
            "state_bytes": E.tree_bytes(s),
        }
        print(
            f"{name}: compiled+first step {compile_s:.1f}s, "
            f"state {runs[name]['state_bytes'] / 2**20:.1f} MiB"
        )
    for r in range(rounds):
        for run in runs.values():
            t = time.perf_counter()
            run["params"], run["state"], loss = run["step"](
                run["params"], run["state"], batch, None
            )
            jax.block_until_ready(run["params"])
            run["times"].append(time.perf_counter() - t)
        print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{n.split(' (')[0]} {run['times'][-1]:.2f}s" for n, run in runs.items())
        )

    ref = runs["adamw"]
    ref_t = float(np.median(ref["times"]))
    rows, payload_runs = [], {}
    for name, run in runs.items():
        med = float(np.median(run["times"]))
        payload_runs[name] = {
            "median_step_s": med,
            "times_s": run["times"],
            "compile_plus_first_s": run["compile_plus_first_s"],
            "state_bytes": run["state_bytes"],
            "state_over_params": run["state_bytes"] / param_bytes,
            "time_over_adamw": med / ref_t,
            "state_over_adamw": run["state_bytes"] / ref["state_bytes"],
        }
        q = payload_runs[name]
        rows.append(
            f"| {name} | {med * 1000:.0f} | {q['time_over_adamw']:.2f} | "
            f"{run['state_bytes'] / 2**20:.1f} | {q['state_over_params']:.2f} | "
            f"{q['state_over_adamw']:.2f} |"
        )
    load = os.getloadavg()
    md = (
        f"Full MiniLM-L6 fine-tune step (forward + backward + update, one jit) on "
        f"`{args.task}`, batch {args.batch_size} × {args.max_length} tokens, "
        f"{n_params / 1e6:.1f}M parameters ({param_bytes / 2**20:.0f} MiB); median of "
        f"{rounds} interleaved rounds after {args.warmup} warm-up steps. Load average at "
        f"the end {load[0]:.1f} on {os.cpu_count()} cores (the machine was shared, so "
        "absolute times are inflated; the ratios are the comparable numbers).\n\n"
        "| Optimizer | ms / step | × AdamW | state MiB | state / params | state × AdamW |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    payload = {
        "task": args.task,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rounds": rounds,
        "warmup": args.warmup,
        "n_params": n_params,
        "param_bytes": param_bytes,
        "runs": payload_runs,
        "loadavg_end": load,
    }
    write_results(
        "efficiency", payload, md, results_dir=args.results_dir, title="efficiency (Table 8)"
    )
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
