"""Update time of this checkout's UMTAM against a git revision's, in one process.

The revision's ``umtam_jax`` is exported with ``git archive`` into a temporary folder and
imported under another name, so both versions (and ``optax.adamw``) are jitted side by
side on the same GPT-2-shaped pytree and timed round-robin by ``step_time``'s harness:
load hits every variant alike. Prints a markdown table (wall and CPU medians, ratios to
AdamW); nothing is written.

Usage::

    .venv/bin/python benchmarks/step_time_ab.py 0c8fc74            # 4 blocks, 21 rounds
    .venv/bin/python benchmarks/step_time_ab.py HEAD~3 --blocks 12 --reps 11
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see step_time.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def import_revision(rev: str, folder: Path):
    """``umtam_jax`` as of ``rev``, imported as the module ``umtam_rev``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "umtam_jax"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    package = folder / "umtam_rev"
    (folder / "umtam_jax").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bumtam_jax\b", "umtam_rev", path.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module("umtam_rev")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="git revision to compare against (e.g. a commit)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args(argv)

    import jax
    import optax
    from _common import gpt2_params, like
    from step_time import _update_step, time_interleaved

    import umtam_jax

    with tempfile.TemporaryDirectory() as tmp:
        old = import_revision(args.rev, Path(tmp))
        params = jax.device_put(gpt2_params(args.blocks))
        grads = jax.device_put(like(params, seed=1))
        lean = dict(error_decay=0.0, saliency="final")
        factories = {"optax.adamw": lambda: optax.adamw(1e-3)}
        for lib, tag in ((umtam_jax, "this checkout"), (old, args.rev)):
            factories[f"umtam default ({tag})"] = lambda lib=lib: lib.umtam(1e-3)
            factories[f"umtam lean ({tag})"] = lambda lib=lib: lib.umtam(1e-3, **lean)
        steps = {name: _update_step(make(), params, grads)[0] for name, make in factories.items()}
        times, _ = time_interleaved(steps, reps=args.reps, warmup=2)
    cpu = time_interleaved.cpu
    wall0, cpu0 = statistics.median(times["optax.adamw"]), statistics.median(cpu["optax.adamw"])
    print(f"\n{args.blocks} blocks, median of {args.reps}, load {os.getloadavg()}\n")
    print("| optimizer | ms / update | × AdamW | CPU ms | CPU × AdamW |\n|---|---|---|---|---|")
    for name in steps:
        wall, used = statistics.median(times[name]), statistics.median(cpu[name])
        print(
            f"| {name} | {1e3 * wall:.1f} | {wall / wall0:.2f}× | {1e3 * used:.0f} | "
            f"{used / cpu0:.2f}× |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
