"""Memory XLA plans for one training step's optimizer part, per UMTAM setting.

Compiles (does not run) update + ``apply_updates`` with parameters and state donated, as
``step_time.py --apply`` times it, on the GPT-2-shaped pytree, and prints XLA's memory
analysis of the compiled step in multiples of the parameter bytes: arguments (gradients,
parameters, state), temporary buffers, and the peak it implies (arguments + temporaries;
the outputs alias the donated arguments). Used to size the cost of ``group_leaves=True``
(stacked copies). Compiled for the default backend.

Usage::

    python -m benchmarks.update_memory                  # 4 blocks, this backend
    python -m benchmarks.update_memory --blocks 12 --out benchmarks/results/update_memory_gpu.json

Writes ``benchmarks/results/update_memory.json`` (``--out`` to change, ``--no-write`` to
skip) and prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._common import (
    RESULTS_DIR,
    environment,
    gpt2_params,
    like,
    markdown_table,
    tree_bytes,
    write_results,
)
from benchmarks.step_time import _update_step


def planned_memory(opt, params, grads) -> dict[str, int]:
    """Bytes of arguments and temporaries of the compiled, donating update + apply step
    (the step ``step_time.py --apply`` times)."""
    step, _ = _update_step(opt, params, grads, apply=True)
    analysis = step.lower().compile().memory_analysis()
    return {
        "arguments": analysis.argument_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "update_memory.json")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import umtam_jax

    env = environment()

    params = gpt2_params(args.blocks)
    grads = like(params, seed=1)
    param_bytes = tree_bytes(params)
    lean = {"error_decay": 0.0, "saliency": "final"}
    cases = {
        "umtam default": {},
        "umtam default, group_leaves=True": {"group_leaves": True},
        "umtam lean": lean,
        "umtam lean, group_leaves=True": {**lean, "group_leaves": True},
    }
    rows, settings = [], []
    for name, options in cases.items():
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
    print(markdown)
    if not args.no_write:
        path = write_results(
            args.out.stem,
            {"blocks": args.blocks, "param_bytes": param_bytes, "settings": settings},
            markdown,
            title="planned memory of the update step (group_leaves)",
            results_dir=args.out.parent,
            env=env,
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
