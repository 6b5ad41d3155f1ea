"""Cost of checkpoint checksums: restore with verification against ``verify=False``.

Every array a ``umtam_jax.checkpoint`` save writes gets a CRC-32 record; restores verify
it unless ``verify=False``. This script saves a GPT-2-shaped float32 pytree (4 blocks ≈
28.4M parameters, 113 MB; ``--quick``: 1 block) with parameters + UMTAM statistics, then
times, interleaved in one process (so both see the same machine state and page cache):

- ``restore_params`` / ``restore_statistics`` with and without verification;
- the out-of-core reader (``CheckpointReader.restore_arrays`` of every parameter) with
  and without verification;
- ``save_checkpoint`` against the checksum computation it contains (CRC-32 of every
  array), to give the share of a save spent on checksums.

Reported: the median of ``--reps`` runs and the min–max, and the ratio verify / no-verify.

Usage::

    python -m benchmarks.checkpoint_integrity            # 4 blocks, 7 reps
    python -m benchmarks.checkpoint_integrity --quick    # 1 block, 3 reps

Writes ``benchmarks/results/checkpoint_integrity.json`` and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import gpt2_params, tree_bytes, tree_size
from benchmarks._records import write_results


def _time(fn) -> float:
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 block, 3 repetitions")
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    blocks = args.blocks or (1 if args.quick else 4)
    reps = args.reps or (3 if args.quick else 7)

    import jax
    import jax.numpy as jnp

    import umtam_jax
    from umtam_jax import checkpoint
    from umtam_jax.checkpoint import _encoding, _save

    params = jax.tree.map(jnp.asarray, gpt2_params(blocks))
    opt = umtam_jax.umtam(1e-3, rank=32)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    _, state = opt.update(grads, state, params)

    work = Path(tempfile.mkdtemp(prefix="umtam_integrity_"))
    try:
        path = checkpoint.save_checkpoint(work / "ckpt", params, opt_state=state)
        stats = umtam_jax.statistics(state)
        encoded = [_encoding.encode(t, "tree") for t in (params, stats, state)]
        reader_paths = [
            p
            for p, _ in _encoding.spec_arrays(checkpoint.CheckpointReader(path).structure("params"))
        ]

        cases = {
            "restore_params": lambda v: checkpoint.restore_params(path, verify=v),
            "restore_statistics": lambda v: checkpoint.restore_statistics(path, verify=v),
            "CheckpointReader (all params)": lambda v: checkpoint.CheckpointReader(
                path, verify=v
            ).restore_arrays("params", reader_paths),
        }
        times: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in cases}
        save_times, crc_times = [], []
        for _ in range(reps):
            for name, fn in cases.items():
                for verify in (True, False):
                    times[name][verify].append(_time(lambda fn=fn, v=verify: fn(v)))
            save_times.append(
                _time(
                    lambda: checkpoint.save_checkpoint(
                        work / "save", params, opt_state=state, overwrite=True
                    )
                )
            )
            crc_times.append(_time(lambda: [_save._checksums(e) for e in encoded]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def summary(xs: list[float]) -> dict[str, float]:
        return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs)}

    rows, result = [], {"blocks": blocks, "reps": reps, "cases": {}}
    result["parameters"] = tree_size(params)
    result["params_bytes"] = tree_bytes(params)
    result["statistics_bytes"] = tree_bytes(stats)
    for name in cases:
        on, off = summary(times[name][True]), summary(times[name][False])
        ratio = on["median_s"] / off["median_s"]
        result["cases"][name] = {"verify": on, "no_verify": off, "ratio": ratio}
        rows.append(
            f"| {name} | {on['median_s'] * 1e3:.0f} ({on['min_s'] * 1e3:.0f}–"
            f"{on['max_s'] * 1e3:.0f}) | {off['median_s'] * 1e3:.0f} ({off['min_s'] * 1e3:.0f}–"
            f"{off['max_s'] * 1e3:.0f}) | {ratio:.2f}× |"
        )
    save, crc = summary(save_times), summary(crc_times)
    result["save"] = save
    result["checksums_in_save"] = crc
    result["checksum_share_of_save"] = crc["median_s"] / save["median_s"]
    saved_bytes = sum(tree_bytes(t) for t in (params, stats, state))
    result["saved_bytes"] = saved_bytes
    gbps = saved_bytes / crc["median_s"] / 1e9
    result["checksum_gb_per_s"] = gbps
    markdown = "\n".join(
        [
            f"{result['parameters'] / 1e6:.1f}M float32 parameters ({blocks} GPT-2 blocks) "
            f"+ UMTAM statistics, median of {reps} interleaved runs (min–max), ms:",
            "",
            "| read | verify (default) | verify=False | ratio |",
            "|---|---|---|---|",
            *rows,
            "",
            f"save_checkpoint (params + statistics + opt_state): {save['median_s'] * 1e3:.0f} ms, "
            f"of which the CRC-32 of every saved array {crc['median_s'] * 1e3:.0f} ms "
            f"({100 * result['checksum_share_of_save']:.0f} %, {gbps:.2f} GB/s).",
        ]
    )
    print(markdown)
    write_results(
        "checkpoint_integrity",
        result,
        markdown,
        **({"results_dir": args.results_dir} if args.results_dir else {}),
    )
    return result


if __name__ == "__main__":
    main()
