"""Memory XLA plans for one training step's optimizer part, per UMTAM setting.

Compiles (does not run) update + ``apply_updates`` with parameters and state donated, as
``step_time.py --apply`` times it, on the GPT-2-shaped pytree, and prints XLA's memory
analysis of the compiled step in multiples of the parameter bytes: arguments (gradients,
parameters, state), temporary buffers, and the peak it implies (arguments + temporaries;
the outputs alias the donated arguments). Used to size the cost of ``group_leaves=True``
(stacked copies). Compiled for the default backend; nothing is written.

Usage::

    .venv/bin/python benchmarks/update_memory.py               # 4 blocks, this backend
    python3 benchmarks/update_memory.py --blocks 12            # e.g. on a GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def planned_memory(opt, params, grads) -> dict[str, int]:
    """Bytes of arguments and temporaries of the compiled, donating update + apply step
    (the step ``step_time.py --apply`` times)."""
    from step_time import _update_step

    step, _ = _update_step(opt, params, grads, apply=True)
    analysis = step.lower().compile().memory_analysis()
    return {
        "arguments": analysis.argument_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args(argv)

    import jax
    from _common import gpt2_params, like, markdown_table, tree_bytes

    import umtam_jax

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
    rows = []
    for name, options in cases.items():
        memory = planned_memory(umtam_jax.umtam(1e-3, **options), params, grads)
        ratio = {k: v / param_bytes for k, v in memory.items()}
        peak = ratio["arguments"] + ratio["temporaries"]
        rows.append(
            [name, f"{ratio['arguments']:.2f}", f"{ratio['temporaries']:.2f}", f"{peak:.2f}"]
        )
    print(
        f"{args.blocks} blocks, {param_bytes / 2**20:.0f} MiB of parameters, "
        f"backend {jax.default_backend()}; multiples of the parameter bytes\n"
    )
    headers = ["setting", "arguments", "temporaries", "arguments + temporaries"]
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
