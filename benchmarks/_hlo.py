"""What a compiled executable launches, read from its optimized HLO text."""

from __future__ import annotations

import re

# An instruction of an optimized HLO module: ``[ROOT] %name = <shape> opcode(...``.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[^\s=]+ = .*? ([a-z][a-z0-9-]*)\(")
# Instructions that only name or regroup buffers: no kernel runs for them.
NO_KERNEL = frozenset(
    {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "opt-barrier"}
)


def executable_ops(hlo_text: str) -> dict[str, int]:
    """What one call of a compiled executable launches, read from its optimized HLO text
    (``jax.jit(f).lower(...).compile().as_text()``).

    ``kernels``: the instructions of the entry computation that run as a kernel or a
    library call (fusions, custom calls such as cuBLAS/cuSOLVER, copies, collectives...);
    a ``while`` loop counts once there, its body running once per iteration. ``loops`` and
    ``conditionals``: the ``while`` and ``conditional`` instructions of the whole module
    (a conditional's predicate is read by the host on a GPU).

    Example:
        >>> lines = ["ENTRY %main {", "  %p = f32[2]{0} parameter(0)",
        ...          "  ROOT %f = f32[2]{0} fusion(%p), kind=kLoop", "}"]
        >>> executable_ops("\\n".join(lines))
        {'kernels': 1, 'loops': 0, 'conditionals': 0}
    """
    ops, entry = [], []
    in_entry = False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY "):
            in_entry = True
        elif in_entry and line.startswith("}"):
            in_entry = False
        match = _INSTRUCTION.match(line)
        if match:
            ops.append(match.group(1))
            if in_entry:
                entry.append(match.group(1))
    return {
        "kernels": sum(op not in NO_KERNEL for op in entry),
        "loops": ops.count("while"),
        "conditionals": ops.count("conditional"),
    }
