"""``umtam-merge``: merge models with any ``umtam_jax.merging`` method.

Every model (base, experts, ``fisher`` and ``curvature`` inputs) is a umtam_jax checkpoint,
an Orbax ``CheckpointManager`` step or a Hugging Face safetensors folder (PyTorch pickles
are refused, never unpickled); the output is a umtam_jax checkpoint or a safetensors folder
(``--output-format``, default: the base's).

A YAML configuration of its own, or a mergekit configuration unchanged (see
:mod:`umtam_jax.cli._mergekit` for what carries over)::

    method: umtam                 # any name of `umtam-merge --list-methods`
    base: ckpt/base               # checkpoint of the shared initial parameters
    experts:
      - path: ckpt/task_a         # checkpoint of a fine-tuned expert
        weight: 1.0               # per-expert weight (methods with `weights`)
        density: 0.3              # per-expert density (methods with `density`)
        tall_lambda: 0.4          # per-expert TALL threshold (consensus methods)
      - ckpt/task_b               # a bare path is fine too
      # per expert too: fisher: PATH (method fisher), curvature: PATH (method ota)
    parameters:                   # keyword arguments of the merging function
      density: 0.2
      normalize: all
      scope: {scanned: [blocks], axis: 0}   # keep counts per layer of scanned leaves
    output: ckpt/merged           # where the merged parameters are written
    seed: 0                       # PRNG seed of dare, dare_ties, della, della_linear (default 0)

or the same through flags (which override the file; a ``--param`` is, like the file's
``parameters``, the default of the experts that give no value of their own)::

    umtam-merge --method ties --base ckpt/base --expert ckpt/a --expert ckpt/b,weight=0.5 \\
        --param density=0.2 --output ckpt/merged

Statistics for ``umtam`` (and the curvature for ``ota``, the saliency for ``prune``) are
restored from each expert's checkpoint (``umtam_jax.checkpoint``, the optimizer state saved
beside the parameters in an Orbax ``CheckpointManager`` step, or a safetensors model's
``umtam_statistics`` folder); ``fisher`` takes a ``fisher: PATH`` per expert, a checkpoint
whose parameters hold that expert's diagonal Fisher; ``ota`` may take a ``curvature: PATH``
per expert (every expert or none), a model holding that expert's curvature (Adam second
moments) under the parameters' names, in place of its UMTAM statistics. ``prune`` takes
exactly one expert and a ``scores`` parameter, ``saliency`` (default) or ``magnitude``.
``scope`` is ``tensor``, ``layer`` or ``{scanned: [key names], axis: A, batch: B}`` (each
layer of the leaves under those keys, stacked on axis A: ``umtam_jax.scanned``; ``scanned:
[]`` takes every leaf with three or more axes): exact keep counts per layer for ``umtam``,
``ties``, ``prune`` and ``consensus_ties``, which also take ``global`` (one count over the
whole expert); each layer merged as a tensor of its own for ``breadcrumbs``,
``breadcrumbs_ties``, ``sce``, ``della``, ``della_linear``, ``tsv_merge``, ``iso_c`` and
``iso_cts``.
Relative paths are taken from the working directory; in ``--expert PATH,KEY=VALUE,...``
the options are the trailing pieces holding ``=``, so a path may hold commas. An expert
listed twice is refused (it would count twice: give it a weight), and so is the base as
an expert of a method that merges task vectors (its task vector is zero; ``linear`` may
average the base with experts).

The configuration is read with a safe YAML loader (no tags that build objects) that
also refuses anchors and aliases (so no "billion laughs" expansion), merge keys (``<<``),
duplicate keys, nesting deeper than 64 levels and files over 1 MiB, naming the file and
line; values given with ``--param``/``--expert`` go through the same loader. ``seed`` is
any integer ``jax.random.key`` takes, in [-2**63, 2**63 - 1].
The method, the parameter names and their types are checked against the method's entry in
``umtam_jax.merging.METHODS`` before anything is loaded (``--list-methods`` prints them).
``--dry-run`` validates the whole merge (structures, shapes, dtypes, statistics, options)
with ``jax.eval_shape``, without computing or writing anything. An existing output is
replaced only with ``--force`` and only if it is an earlier merge's output (never a model
saved with ``save_checkpoint`` or ``save_safetensors``, nor a training checkpoint); the
output may not be, contain or lie inside an input.

By default the merge is out of core (``umtam_jax.engine.merge_checkpoints``): small
groups of leaves are read from every checkpoint with Orbax's partial restore, merged and
written to the output one array at a time, with a progress bar over the leaves, so peak
host memory is set by the largest tensor, about (K + 3) times it, rather than K + 1
models (see ``benchmarks/merge_memory.py`` and docs/performance.md); ``scope: global``
takes two extra passes over the inputs to find the exact global threshold. The results
are identical to the in-memory merge. ``--dry-run`` then reads only the checkpoints'
metadata. ``--in-memory`` restores every checkpoint whole (``--dry-run`` too) and calls
the in-memory method on the whole trees.

Exit status: 0 on success, 2 for an invalid command line, configuration, input or output
(one line on standard error naming the flag, key, file or leaf; nothing is written).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import yaml

from umtam_jax import engine, merging
from umtam_jax.cli import _run
from umtam_jax.cli._config import build_plan
from umtam_jax.cli._load import PROG, load_config, one_line, warn
from umtam_jax.cli._yaml import ConfigError
from umtam_jax.merging import METHODS


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line as one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog=PROG,
        description="Merge models (umtam_jax or Orbax checkpoints, Hugging Face safetensors "
        "folders) with UMTAM (Algorithm 2) or another umtam_jax.merging method.",
        epilog=f"Methods: {', '.join(METHODS)}. See the module docstring of "
        "umtam_jax.cli.merge for the YAML schema.",
    )
    p.add_argument(
        "config", nargs="?", help="YAML configuration file: umtam-merge's own or mergekit's"
    )
    p.add_argument(
        "--method",
        choices=list(METHODS),
        help="merging method (a mergekit file is read as if its merge_method named it)",
    )
    p.add_argument(
        "--base",
        help="base model: a checkpoint or a safetensors folder (the base_model of a mergekit "
        "file without one)",
    )
    p.add_argument(
        "--expert",
        action="append",
        metavar="PATH[,weight=W][,density=D][,tall_lambda=L][,fisher=PATH][,curvature=PATH]",
        help="expert model, a checkpoint or a safetensors folder, and its own values (repeat; "
        "replaces the file's experts)",
    )
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="method parameter (repeat); a per-model one (density) is the default of the "
        "models without their own",
    )
    p.add_argument(
        "--output", "-o", help="output: a checkpoint or a safetensors folder (--output-format)"
    )
    p.add_argument("--seed", type=int, help="PRNG seed of dare, dare_ties, della, della_linear")
    p.add_argument(
        "--force", action="store_true", help="replace an earlier merge's output at --output"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="load and validate everything, write nothing"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--in-memory",
        action="store_true",
        help="restore every checkpoint whole and merge in memory (default: out of core, "
        "leaf by leaf, same result)",
    )
    p.add_argument(
        "--output-format",
        choices=engine.OUTPUT_FORMATS,
        default="auto",
        help="output format (default auto: the base's, a umtam_jax checkpoint or a Hugging "
        "Face safetensors folder)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors shard, e.g. 5GB or 500MB (default 5GB)",
    )
    p.add_argument(
        "--list-methods",
        action="store_true",
        help="print every method with its inputs and parameters (defaults), then exit",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Executes a parsed command line; returns the exit status."""
    if args.list_methods:
        print("\n".join(merging.describe(m) for m in METHODS.values()))
        return 0
    return _run.execute(build_plan(load_config(args)), args)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``umtam-merge``; returns the exit status.

    Every problem the user can fix (configuration, inputs, output, disk) is reported as
    one line on standard error with exit status 2, an interruption (Ctrl-C) as one line
    with status 130; programming errors propagate.
    """
    args = _parser().parse_args(argv)
    try:
        with _orbax_logs_silenced(), _warnings_as_lines():
            return run(args)
    except (ConfigError, ValueError, TypeError, OSError, yaml.YAMLError) as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the output is published whole or not at all
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Each Python warning raised while the command runs (a library's, NumPy's) as one
    ``umtam-merge: warning:`` line, without the file, line and source of the default."""

    def show(message: Warning | str, *_: Any, **__: Any) -> None:
        warn(" ".join(str(message).split()))

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _orbax_logs_silenced() -> Iterator[None]:
    """Orbax logs (through absl) each failure of its background threads with a
    traceback, before the save re-raises it: the command reports every failure as its one
    error line instead. Its progress logs are not for a command-line user either."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
