"""End-to-end GPT training throughput and memory per optimizer (paper Table 8's setting).

On a GPU machine, one prepared command (the token cache of ``lm_token_arrays`` must be
there: copy ``~/.cache/umtam_jax/lm/`` along and point ``UMTAM_JAX_CACHE`` at its parent;
the machine needs no network then)::

    UMTAM_JAX_CACHE=.cache/umtam_jax python -m benchmarks.train_throughput --grouped \
        --workdir /tmp/tt-work

It writes ``benchmarks/results/train_throughput_gpu.json`` (the backend is appended to the
default name on any backend but the CPU); ``bash scripts/gpu_checks.sh throughput`` runs it
with 4 repeats, without ``--grouped``, as a prepared part of the GPU checks. Other commands::

    python -m benchmarks.train_throughput --quick       # tiny GPT, 2 repeats × 2 rounds
    python -m benchmarks.train_throughput               # GPT-2 small body, 8 repeats × 5 rounds
    python -m benchmarks.train_throughput --blocks 4    # fewer blocks where 12 is too slow

What is measured: one GPT-2-small-sized model (the project's GPT,
:mod:`umtam_jax.experiments.models.gpt`: ``GPTConfig(d_model=768, n_layers=12,
n_heads=12, context=256)``), trained on one fixed batch of 4 × 256 tokens of the project's
offline LM data (:func:`~umtam_jax.experiments.lm_data.lm_token_arrays`, the Python-docs
corpus with its byte-level BPE of 4,096 tokens; embeddings tied). The vocabulary is the
data's: GPT-2's 50,257-token vocabulary would make the token embedding 38.6M parameters
instead of 3.1M, so the model here is 88.4M parameters, 85.1M of them in the body (blocks
and final norm), against GPT-2 small's 124M. Optimizers, all at learning rate 1e-4 and
each with its state initialised from the same parameters: ``optax.adamw`` (the
reference), ``optax.adafactor``, UMTAM with library defaults and lean UMTAM
(``error_decay=0.0, saliency="final"``); with ``--grouped`` also both UMTAM settings with
``group_leaves=True`` (equally shaped leaves updated as one stack), the measurement that
decides whether grouping pays for its memory on that device.

The training step is the project's ``make_gpt_train_step`` (forward, backward, update in
one ``jax.jit``). That function has no donation option, so it is wrapped in an outer
``jax.jit(..., donate_argnums=(0, 1))``: parameters and optimizer state are donated, as a
training loop would. A repeat's first (untimed, warm-up) step donates copies, so the shared
starting parameters survive for the next optimizer and repeat.

Timing reuses :mod:`benchmarks.efficiency` (``run_repeat``, ``combine_repeats`` and its
per-repeat cache): ``--repeats`` repeats, each from fresh optimizer states with
``--warmup`` untimed steps and ``--rounds`` interleaved rounds (one step of every optimizer
per round, the starting optimizer rotating, every step followed by
``jax.block_until_ready``); per repeat the median step time per optimizer gives the
tokens/s ratio to AdamW; over repeats its mean with a 95 % Student-t interval
(:func:`benchmarks._common.t_interval`). The load average is recorded before and after each
repeat. Each repeat is written to ``<results-dir>/<name>_repeats/<name>_repeat<i>.json``
and read back on rerun with the same settings (``--fresh`` measures again); its log lines
carry efficiency's ``[efficiency]`` prefix.

Memory: where the device reports ``memory_stats()`` (a GPU), the peak
``peak_bytes_in_use`` of a few training steps, measured per optimizer in its own
subprocess (JAX cannot reset the peak; the subprocess runs without preallocation and
leaves its compiled step in the compilation cache of ``--workdir``); on a CPU, where
``memory_stats()`` is None, XLA's planned memory of the compiled, donating step (argument
+ output + temporary − aliased bytes of ``compiled.memory_analysis()``). The record says
which. Also optimizer-state bytes ÷ parameter bytes.

Targets, judged by the script on the interval (met if its worse end meets the target, not
met if its better end misses it, else inconclusive) for the two UMTAM settings: step time
≤ 1.10× AdamW's, i.e. tokens/s ratio ≥ 1/1.10 (every backend), and on a GPU peak memory
≤ 1.35× AdamW's (one measurement per optimizer, judged as it is). The planned CPU memory
ratio is shown, not judged.

No ``--scanned`` option: the project's GPT unrolls its blocks (``block_0`` …
``block_{n-1}``) and has no layer-stacked variant, so ``row_axes=umtam_jax.scanned(...)``
has no stacked parameters to describe.

Writes ``<results-dir>/<name>.json`` (default ``train_throughput``, ``_quick`` with
``--quick``) and, when the folder is ``benchmarks/results``, its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import RESULTS_DIR, cpu_info, environment, tree_bytes, tree_size
from benchmarks._records import commits_of, write_results
from benchmarks._throughput_report import REFERENCE, check_targets, markdown
from benchmarks._throughput_step import (
    GPT2_VOCAB,
    LR,
    VOCAB,
    batch_tokens,
    donating_step,
    keep_start,
    measure_peaks,
    memory_probe,
    model_config,
    optimizers,
    planned_memory,
)
from benchmarks.efficiency import (
    combine_repeats,
    load_summary,
    recorded_repeats,
    run_repeat,
)
from umtam_jax.experiments.models.gpt import init_gpt
from umtam_jax.experiments.pipeline import enable_compilation_cache


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny GPT (2 blocks, width 64, 32 tokens), 2 × 2"
    )
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 8 / 2)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 / 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per repeat (≥ 1)")
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks (12 / 2)")
    ap.add_argument("--d-model", type=int, default=None, help="width (768 / 64)")
    ap.add_argument("--heads", type=int, default=None, help="heads (default d_model / 64)")
    ap.add_argument("--context", type=int, default=None, help="tokens per sequence (256 / 32)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="parameters and batch")
    ap.add_argument(
        "--grouped",
        action="store_true",
        help="also both UMTAM settings with group_leaves=True (equally shaped leaves updated "
        "as one stack: fewer kernel launches, more memory)",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="measure every repeat, ignoring recorded repeats"
    )
    ap.add_argument(
        "--name",
        default=None,
        help="result name (default train_throughput[_quick], _<backend> appended off CPU)",
    )
    ap.add_argument("--workdir", default="umtam-demo-work", help="holds the compilation cache")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or (2 if q else 8)
    args.rounds = args.rounds or (2 if q else 5)
    args.blocks = args.blocks or (2 if q else 12)
    args.d_model = args.d_model or (64 if q else 768)
    args.context = args.context or (32 if q else 256)
    args.heads = args.heads or max(1, args.d_model // 64)
    if args.repeats < 1 or args.rounds < 1 or args.warmup < 1:
        ap.error("--repeats, --rounds and --warmup must be ≥ 1")
    if args.d_model % args.heads:
        ap.error("--heads must divide --d-model")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)
    rdir = Path(args.results_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    env = environment()
    backend = jax.default_backend()
    name = args.name or (
        "train_throughput"
        + ("_quick" if args.quick else "")
        + ("" if backend == "cpu" else f"_{backend}")
    )
    enable_compilation_cache(Path(args.workdir) / "jax_cache")

    cfg = model_config(args)
    tokens = jnp.asarray(batch_tokens(args))
    params0 = init_gpt(jax.random.key(args.seed), cfg)
    n_params = tree_size(params0)
    n_embed = tree_size(params0["wte"]) + tree_size(params0["wpe"])
    param_bytes = tree_bytes(params0)
    txs = optimizers(args.grouped)
    names = list(txs)
    state_bytes = {n: tree_bytes(tx.init(params0)) for n, tx in txs.items()}
    tokens_per_step = args.batch_size * args.context

    stats = jax.devices()[0].memory_stats()
    measured = stats is not None and "peak_bytes_in_use" in stats
    print(
        f"[train_throughput] {n_params / 1e6:.1f}M parameters ({(n_params - n_embed) / 1e6:.1f}M "
        f"body), batch {args.batch_size} × {args.context} tokens, {args.repeats} repeats × "
        f"{args.rounds} rounds, {backend}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    steps: dict[str, Callable] = {}
    compile_s: dict[str, float] = {}
    planned: dict[str, dict[str, int]] = {}

    def compiled() -> dict[str, Callable]:
        """The donating steps, compiled on first use in this process."""
        if not steps:
            for n, tx in txs.items():
                t = time.perf_counter()
                c = donating_step(tx, cfg).lower(params0, tx.init(params0), tokens, None).compile()
                compile_s[n] = time.perf_counter() - t
                planned[n] = planned_memory(c)
                steps[n] = keep_start(c, params0)
                print(f"[train_throughput] {n}: compiled in {compile_s[n]:.1f} s", flush=True)
        return steps

    def run(index: int) -> dict[str, Any]:
        rec = run_repeat(index, compiled(), txs, params0, tokens, rounds=args.rounds,
                         warmup=args.warmup)  # fmt: skip
        rec["compile_s"] = dict(compile_s)
        rec["planned_memory"] = dict(planned)
        med = {n: float(np.median(t)) for n, t in rec["times_s"].items()}
        print(
            f"[train_throughput] repeat {index + 1}/{args.repeats} ({rec['wall_s']:.0f} s, load "
            f"{rec['loadavg_before'][0]:.1f} -> {rec['loadavg_after'][0]:.1f}): "
            + ", ".join(f"{n.split(' (')[0]} {med[REFERENCE] / m:.3f}" for n, m in med.items())
            + " × AdamW tokens/s",
            flush=True,
        )
        return rec

    signature = {
        "model": {"vocab": VOCAB, "context": args.context, "d_model": args.d_model,
                  "blocks": args.blocks, "heads": args.heads},
        "batch_size": args.batch_size, "seed": args.seed, "rounds": args.rounds,
        "warmup": args.warmup, "optimizers": names, "lr": LR, "donated": True,
        "jax": jax.__version__, "cpu": cpu_info()["model"], "backend": backend,
        "device_kind": jax.devices()[0].device_kind,
    }  # fmt: skip
    paths, repeats = recorded_repeats("train_throughput", rdir / f"{name}_repeats", name,
                                      args.repeats, signature, args.fresh, run, env)  # fmt: skip
    # Peaks after the timed repeats (each written as it ends, so a run stopped early keeps
    # them); the probes read the steps this process compiled from the compilation cache.
    peaks = measure_peaks(args, names) if measured else None
    over = combine_repeats(repeats, reference=REFERENCE, claim_optimizer="")
    over.pop("claim_check", None)
    if not planned:  # every repeat read back: the plan recorded with them
        planned.update(
            next((r["planned_memory"] for r in reversed(repeats) if "planned_memory" in r), {})
        )
    compile_rec = next((r["compile_s"] for r in reversed(repeats) if r.get("compile_s")), {})

    if peaks is not None:
        mem = {n: float(peaks[n]["peak_bytes_in_use"]) for n in names}
        memory_method = (
            "measured: peak_bytes_in_use of memory_stats() after "
            f"{args.warmup + 2} donating training steps, one fresh subprocess per optimizer"
        )
    else:
        mem = {n: float(planned[n]["planned"]) for n in names} if planned else {}
        memory_method = (
            "planned: XLA's memory_analysis() of the compiled donating step, argument + "
            "output + temp − alias bytes (memory_stats() is None on this backend)"
        )
    mem_ratio = {n: mem[n] / mem[REFERENCE] for n in mem} if mem else {}
    targets = check_targets(over["by_optimizer"], mem_ratio if peaks is not None else None)

    runs = {}
    for n in names:
        med = float(np.median([t for rep in repeats for t in rep["times_s"][n]]))
        runs[n] = {
            "median_step_s": med,
            "tokens_per_s": tokens_per_step / med,
            "compile_s": compile_rec.get(n),
            "memory_bytes": mem.get(n),
            "memory_over_adamw": mem_ratio.get(n),
            "planned_memory": planned.get(n),
            "measured_peak": None if peaks is None else peaks[n],
            "state_bytes": state_bytes[n],
            "state_over_params": state_bytes[n] / param_bytes,
        }
    loads = [(r["loadavg_before"], r["loadavg_after"]) for r in repeats]
    d = args.d_model
    payload = {
        "model": {
            "config": {
                "vocab_size": VOCAB,
                "context": args.context,
                "d_model": d,
                "n_layers": args.blocks,
                "n_heads": args.heads,
                "tie_embeddings": True,
            },
            "n_params": n_params,
            "n_params_body": n_params - n_embed,
            "n_params_embeddings": n_embed,
            "param_bytes": param_bytes,
            "vocab_note": f"vocabulary {VOCAB} (the data's BPE); GPT-2's {GPT2_VOCAB} would "
            f"make the token embedding {GPT2_VOCAB * d / 1e6:.1f}M parameters instead of "
            f"{VOCAB * d / 1e6:.1f}M",
        },
        "data": "lm_token_arrays(vocab_size=4096): Python-docs reST corpus, one fixed batch "
        f"drawn with seed {args.seed}",
        "batch_size": args.batch_size,
        "context": args.context,
        "tokens_per_step": tokens_per_step,
        "seed": args.seed,
        "lr": LR,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "quick": args.quick,
        "design": "make_gpt_train_step in an outer jit donating parameters and state; steps "
        "compiled once per process; per repeat fresh optimizer states from the same "
        "parameters, warm-up steps, then interleaved rounds (one step of every optimizer per "
        "round, the starting optimizer rotating, jax.block_until_ready after each); per "
        "repeat the median step time per optimizer (benchmarks.efficiency.run_repeat)",
        "backend": backend,
        "device_kind": jax.devices()[0].device_kind,
        "memory_method": memory_method,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": cpu_info()["affinity"],
        "load": load_summary(loads),
        "runs": runs,
        "over_repeats": over,
        "targets": targets,
        "repeat_records": [str(p.relative_to(rdir)) for p in paths],
        "part_commits": commits_of(repeats),
        "wall_s_by_repeat": [r["wall_s"] for r in repeats],
    }
    md = markdown(payload)
    write_results(name, payload, md, results_dir=rdir, env=env,
                  title="end-to-end GPT training throughput and memory")  # fmt: skip
    print(md, flush=True)
    return payload


if __name__ == "__main__":
    main()
