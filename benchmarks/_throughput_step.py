"""The timed step of :mod:`benchmarks.train_throughput` and its memory.

The optimizers, the GPT and its fixed batch, the training step in a jit that donates
parameters and optimizer state, XLA's memory plan of the compiled step
(:func:`planned_memory`), and the peak device memory of a few steps, measured per optimizer
in a subprocess of its own (:func:`measure_peaks` runs ``python -m
benchmarks.train_throughput --memory-probe NAME``, which calls :func:`memory_probe`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import umtam_jax
from benchmarks._common import LEAN_UMTAM, ROOT
from benchmarks._throughput_report import REFERENCE, UMTAM_DEFAULT, UMTAM_LEAN
from umtam_jax.experiments.lm_data import lm_token_arrays, sample_lm_batch
from umtam_jax.experiments.models.gpt import GPTConfig, init_gpt, make_gpt_train_step
from umtam_jax.experiments.pipeline import enable_compilation_cache

LR = 1e-4
#: The BPE vocabulary of the project's LM data (``lm_token_arrays``' default).
VOCAB = 4096
#: GPT-2's vocabulary, for the note on embedding parameters.
GPT2_VOCAB = 50257
#: Marks the JSON line a memory-probe subprocess prints.
PROBE_MARK = "TRAIN_THROUGHPUT_MEMORY "


def optimizers(grouped: bool = False) -> dict[str, optax.GradientTransformation]:
    """The timed optimizers by name, all at learning rate :data:`LR`; with ``grouped`` also
    both UMTAM settings with ``group_leaves=True`` (shown, not judged)."""
    txs = {
        REFERENCE: optax.adamw(LR),
        "adafactor": optax.adafactor(LR),
        UMTAM_DEFAULT: umtam_jax.umtam(LR),
        UMTAM_LEAN: umtam_jax.umtam(LR, **LEAN_UMTAM),
    }
    if grouped:
        txs[f"{UMTAM_DEFAULT}, group_leaves"] = umtam_jax.umtam(LR, group_leaves=True)
        txs[f"{UMTAM_LEAN}, group_leaves"] = umtam_jax.umtam(LR, **LEAN_UMTAM, group_leaves=True)
    return txs


def model_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(
        vocab_size=VOCAB,
        context=args.context,
        d_model=args.d_model,
        n_layers=args.blocks,
        n_heads=args.heads,
    )


def batch_tokens(args: argparse.Namespace) -> np.ndarray:
    """The fixed training batch: ``batch_size`` windows of ``context + 1`` tokens."""
    train, _ = lm_token_arrays(vocab_size=VOCAB)
    tokens = sample_lm_batch(train, args.batch_size, args.context, np.random.default_rng(args.seed))
    assert int(tokens.max()) < VOCAB
    return tokens


def donating_step(tx: optax.GradientTransformation, cfg: GPTConfig) -> Callable:
    """``make_gpt_train_step(tx)`` in an outer jit that donates parameters and state."""
    return jax.jit(make_gpt_train_step(tx, config=cfg), donate_argnums=(0, 1))


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def keep_start(compiled: Callable, params0: Any) -> Callable:
    """The donating ``compiled`` step, called on copies when handed ``params0`` itself (a
    repeat's first, untimed warm-up step), so ``params0`` is never donated."""

    def step(params, opt_state, tokens, rng):
        if params is params0:
            params, opt_state = _copy(params), _copy(opt_state)
        return compiled(params, opt_state, tokens, rng)

    return step


def planned_memory(compiled: Any) -> dict[str, int]:
    """XLA's memory plan of a compiled step: argument, output, temporary and aliased bytes,
    and ``planned`` = argument + output + temporary − alias."""
    m = compiled.memory_analysis()
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }
    out["planned"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


# ----------------------------------------------------------------------------- memory


def _size_argv(args: argparse.Namespace) -> list[str]:
    return [
        "--blocks", str(args.blocks), "--d-model", str(args.d_model), "--heads",
        str(args.heads), "--context", str(args.context), "--batch-size", str(args.batch_size),
        "--seed", str(args.seed), "--warmup", str(args.warmup), "--workdir", args.workdir,
        *(["--grouped"] if args.grouped else []),
    ]  # fmt: skip


def memory_probe(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: ``warmup + 2`` donating training steps of one optimizer, from
    its parameters' initialisation, and the device's ``memory_stats()`` after them."""
    enable_compilation_cache(Path(args.workdir) / "jax_cache")
    name = args.memory_probe
    cfg = model_config(args)
    tokens = jnp.asarray(batch_tokens(args))
    tx = optimizers(args.grouped)[name]
    params = init_gpt(jax.random.key(args.seed), cfg)
    state = tx.init(params)
    compiled = donating_step(tx, cfg).lower(params, state, tokens, None).compile()
    for _ in range(args.warmup + 2):
        params, state, loss = compiled(params, state, tokens, None)
    jax.block_until_ready((params, state, loss))
    stats = jax.devices()[0].memory_stats()
    out = {
        "optimizer": name,
        "backend": jax.default_backend(),
        "peak_bytes_in_use": None if stats is None else stats.get("peak_bytes_in_use"),
        "bytes_in_use": None if stats is None else stats.get("bytes_in_use"),
        "planned": planned_memory(compiled),
        "steps": args.warmup + 2,
    }
    print(PROBE_MARK + json.dumps(out), flush=True)
    return out


def measure_peaks(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each optimizer's :func:`memory_probe` in its own subprocess (no preallocation)."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    out = {}
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--memory-probe", name]
        t = time.perf_counter()
        proc = subprocess.run(cmd + _size_argv(args), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=1800)  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PROBE_MARK)]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise RuntimeError(f"memory probe of {name} failed ({proc.returncode}):\n{tail}")
        out[name] = json.loads(lines[-1][len(PROBE_MARK) :])
        peak = out[name]["peak_bytes_in_use"]
        print(
            f"[train_throughput] {name}: peak "
            + ("not reported" if peak is None else f"{peak / 2**20:.0f} MiB")
            + f" (probe {time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    return out
