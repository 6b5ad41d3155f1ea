"""Memory XLA plans for one training step's optimizer part, per UMTAM setting.

Compiles (does not run) update + ``apply_updates`` with parameters and state donated, as
``step_time.py --apply`` times it, on the GPT-2-shaped pytree, and prints XLA's memory
analysis of the compiled step in multiples of the parameter bytes: arguments (gradients,
parameters, state), temporary buffers, and the peak it implies (arguments + temporaries;
the outputs alias the donated arguments). Used to size the cost of ``group_leaves=True``
(stacked copies). Compiled for the default backend.

A stacked update's extra buffers matter only if they raise the peak of the whole training
step, where the forward and backward pass's activations also live. So the same settings
(and AdamW) are also compiled into the end-to-end GPT training step of
``benchmarks/train_throughput.py`` (forward + backward + update, parameters and state
donated, its default size unless ``--train-blocks`` says otherwise) and its planned memory
(argument + output + temporary − aliased bytes) is shown in multiples of AdamW's.

Usage::

    python -m benchmarks.update_memory                  # 4 blocks, this backend
    python -m benchmarks.update_memory --blocks 12 --out benchmarks/results/update_memory_gpu.json
    python -m benchmarks.update_memory --train-blocks 0   # the update step only
    python -m benchmarks.update_memory --quick --no-write  # 1 block (a smoke run)

Writes ``benchmarks/results/update_memory.json`` (``--out`` to change, ``--no-write`` to
skip) and prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks._common import (
    LEAN_UMTAM,
    RESULTS_DIR,
    environment,
    gpt2_params,
    like,
    markdown_table,
    tree_bytes,
)
from benchmarks._records import write_results
from benchmarks.step_time import update_step

#: The compared UMTAM settings (``umtam_jax.umtam`` options).
CASES = {
    "umtam default": {},
    "umtam default, group_leaves=True": {"group_leaves": True},
    "umtam lean": LEAN_UMTAM,
    "umtam lean, group_leaves=True": {**LEAN_UMTAM, "group_leaves": True},
}


def training_step_memory(train_argv: list[str]) -> dict[str, Any]:
    """Planned memory of train_throughput's donating GPT training step (its size options
    ``train_argv``, e.g. ``["--blocks", "12"]``) for AdamW and every case of
    :data:`CASES`, compiled from abstract parameters, state and tokens: no array is
    allocated and no data is read.

    Args:
        train_argv: Options of ``benchmarks.train_throughput`` giving the model's size.

    Returns:
        ``{"model": {"blocks", "d_model", "context", "batch_size"}, "planned": {setting:
        train_throughput.planned_memory(...)}}``.
    """
    import jax
    import optax

    import umtam_jax
    from benchmarks import train_throughput as tt

    args = tt.parse_args(train_argv)
    cfg = tt.model_config(args)
    tokens = jax.ShapeDtypeStruct((args.batch_size, args.context + 1), jax.numpy.int32)
    params = jax.eval_shape(lambda: tt.init_gpt(jax.random.key(args.seed), cfg))
    txs = {"adamw": optax.adamw(tt.LR)}
    txs.update({n: umtam_jax.umtam(tt.LR, **o) for n, o in CASES.items()})
    out = {}
    for name, tx in txs.items():
        step = tt.donating_step(tx, cfg).lower(
            params, jax.eval_shape(tx.init, params), tokens, None
        )
        out[name] = tt.planned_memory(step.compile())
    model = {"blocks": args.blocks, "d_model": args.d_model, "context": args.context,
             "batch_size": args.batch_size}  # fmt: skip
    return {"model": model, "planned": out}


def planned_memory(opt, params, grads) -> dict[str, int]:
    """Bytes of arguments and temporaries of the compiled, donating update + apply step
    (the step ``step_time.py --apply`` times)."""
    step, _ = update_step(opt, params, grads, apply=True)
    analysis = step.lower().compile().memory_analysis()
    return {
        "arguments": analysis.argument_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument(
        "--train-blocks", type=int, default=12, help="blocks of the GPT training step (0: skip)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "update_memory.json")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="1 block, 2 training blocks (a smoke run)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.train_blocks = 1, min(args.train_blocks, 2)

    import umtam_jax

    env = environment()

    params = gpt2_params(args.blocks)
    grads = like(params, seed=1)
    param_bytes = tree_bytes(params)
    rows, settings = [], []
    for name, options in CASES.items():
        memory = planned_memory(umtam_jax.umtam(1e-3, **options), params, grads)
        ratio = {k: v / param_bytes for k, v in memory.items()}
        peak = ratio["arguments"] + ratio["temporaries"]
        settings.append({"setting": name, "options": options, "bytes": memory})
        rows.append(
            [name, f"{ratio['arguments']:.2f}", f"{ratio['temporaries']:.2f}", f"{peak:.2f}"]
        )
    headers = ["setting", "arguments", "temporaries", "arguments + temporaries"]
    markdown = (
        f"{args.blocks} GPT-2 blocks, {param_bytes / 2**20:.0f} MiB of float32 parameters, "
        f"compiled for {env['backend']} ({env.get('device_kind')}); XLA's planned memory of "
        "update + apply_updates with parameters and state donated, in multiples of the "
        "parameter bytes.\n\n" + markdown_table(headers, rows)
    )
    result = {"blocks": args.blocks, "param_bytes": param_bytes, "settings": settings}
    if args.train_blocks:
        training = training_step_memory(["--blocks", str(args.train_blocks)])
        plans, model = training["planned"], training["model"]
        ref = plans["adamw"]["planned"]
        result["training_step"] = training
        train_rows = [
            [
                n,
                f"{p['planned'] / 2**20:.0f}",
                f"{p['temp'] / 2**20:.0f}",
                f"{p['planned'] / ref:.2f}",
            ]
            for n, p in plans.items()
        ]
        markdown += (
            f"\n\nThe whole GPT training step of `benchmarks/train_throughput.py` "
            f"({model['blocks']} blocks of width {model['d_model']}, batch "
            f"{model['batch_size']} × {model['context']} tokens; forward, backward "
            "and update, parameters and state donated): planned memory (argument + output + "
            "temporary − aliased bytes), compiled for the same backend.\n\n"
            + markdown_table(["setting", "planned MiB", "temporaries MiB", "× AdamW"], train_rows)
        )
    print(markdown)
    if not args.no_write:
        path = write_results(
            args.out.stem,
            result,
            markdown,
            title="planned memory of the update step and the training step (group_leaves)",
            results_dir=args.out.parent,
            env=env,
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
