"""``umtam-demo``: fine-tune MiniLM experts with UMTAM, merge them with every method.

The main job of the project, on real offline data:

1. fine-tunes one expert per task (default: the four built-in tasks) from the shared
   pretrained MiniLM-L6 encoder with :func:`umtam_jax.umtam`, saving each as an Orbax
   checkpoint with its UMTAM statistics under ``--workdir`` (reused on reruns);
2. merges the experts' encoders through :mod:`umtam_jax.merging` with Linear (task
   arithmetic, 1/K), TIES, DARE, DARE-TIES, Fisher (post-hoc Fisher; its extra time is
   reported), OTA (from the UMTAM statistics) and UMTAM; each task keeps its own head
   (``--methods`` also selects task arithmetic and RegMean, whose post-hoc Gram pass is
   reported like Fisher's);
3. selects each method's density/scaling on the validation split and reports the test
   split: per-task metric, average, and normalized average (merged / expert);
4. prints the table, writes it with all numbers to ``<workdir>/demo_results.json`` and a
   plot to ``<workdir>/demo_results.png``.

The quick default takes about 5 minutes on 2 CPU cores (measured 4 min 21 s); ``--full`` runs the
full-size experiment (all training data, 600 steps, up to 2,000 evaluation examples per
split and larger merge grids: hours on a CPU). Runs are deterministic for a ``--seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]

# The file that makes a folder the demo's work directory: written into a new or empty
# folder before anything else, so a folder without it holds only the user's files.
_MARKER = ".umtam-demo"


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _claim_workdir(workdir: Path) -> str | None:
    """Makes ``workdir`` the demo's (a new or empty folder, or one the demo wrote before);
    returns why it cannot be, or None. Nothing else's files are ever written over."""
    if workdir.is_symlink() and not workdir.exists():
        return f"--workdir {workdir} is a link to {os.readlink(workdir)}, which does not exist"
    if workdir.exists() and not workdir.is_dir():
        return f"--workdir {workdir} is a file, not a folder"
    if workdir.is_dir() and not (workdir / _MARKER).is_file():
        # Without the demo's marker every name is the user's, the demo's own names too.
        foreign = sorted(p.name for p in workdir.iterdir())
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            return (
                f"--workdir {workdir} holds files the demo did not write ({shown}); give a "
                "new or empty folder (the demo writes its checkpoints, caches and results there)"
            )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / _MARKER).write_text("umtam-demo work directory\n")
    except OSError as err:  # a file above it, a read-only folder
        return f"--workdir {workdir} cannot be made the demo's folder: {err.strerror or err}"
    return None


def _parser() -> argparse.ArgumentParser:
    from umtam_jax import experiments as E
    from umtam_jax.experiments import data as data_lib

    p = argparse.ArgumentParser(
        prog="umtam-demo",
        description="Fine-tune MiniLM experts with UMTAM on real offline tasks, merge them "
        "with every method (hyper-parameters chosen on validation), print the test table.",
    )
    p.add_argument("--full", action="store_true", help="full-size experiment (hours on CPU)")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated registered task names (default: the four built-in tasks)",
    )
    data_lib.add_task_import_option(p)
    p.add_argument("--workdir", default="umtam-demo-work", help="checkpoints, caches, results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive(int), default=None, help="override fine-tuning steps")
    p.add_argument("--learning-rate", type=_positive(float), default=None, help="override peak LR")
    p.add_argument(
        "--max-eval", type=_positive(int), default=None, help="override eval examples/split"
    )
    p.add_argument(
        "--svd-every",
        type=_positive(int),
        default=None,
        help="UMTAM fresh decomposition period (demo default 10; library default 1)",
    )
    p.add_argument(
        "--methods",
        default="linear,ties,dare,dare_ties,fisher,ota,umtam",
        help="comma-separated merge methods (known: " + ", ".join(E.MERGE_METHODS) + ")",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--list-tasks", action="store_true", help="list registered tasks and exit")
    return p


class _Refused(Exception):
    """A command line the demo refuses (its message is printed, the exit status is 2)."""


def main(argv: list[str] | None = None) -> int:
    """Runs ``umtam-demo`` with the arguments ``argv`` (default: the command line's).

    Args:
      argv: the command-line arguments, without the program name.

    Returns:
      The exit status: 0, or 2 for a command line it refuses (the reason on stderr).
    """
    args = _parser().parse_args(argv)
    from umtam_jax import experiments as E
    from umtam_jax.experiments import data as data_lib

    try:
        data_lib.import_task_modules(args.imports)
        if args.list_tasks:
            for t in data_lib.available_tasks():
                s = data_lib.get_task(t)
                print(f"{t:<20} {s.kind:<6} {s.metric:<9} {', '.join(s.labels)}")
            return 0
        tasks, methods = _tasks_and_methods(args)
        config = E.FULL if args.full else E.QUICK
        over = {"seed": args.seed, "steps": args.steps, "learning_rate": args.learning_rate,
                "max_eval": args.max_eval}  # fmt: skip
        config = dataclasses.replace(config, **{k: v for k, v in over.items() if v is not None})
        umtam_kwargs = dict(E.DEMO_UMTAM_KWARGS)
        if args.svd_every is not None:
            umtam_kwargs["svd_every"] = args.svd_every
        workdir = Path(args.workdir)
        refused = _claim_workdir(workdir)
        if refused:
            raise _Refused(refused)
    except (_Refused, ImportError, FileNotFoundError) as e:
        print(f"umtam-demo: {e}", file=sys.stderr)
        return 2
    E.enable_compilation_cache(workdir / "jax_cache")
    progress = not args.no_progress

    t_start = time.perf_counter()
    mode = "full" if args.full else "quick"
    print(
        f"umtam-demo ({mode}): tasks {', '.join(tasks)}; {config.steps} steps x batch "
        f"{config.batch_size} x {config.max_length} tokens, lr {config.learning_rate:g}, "
        f"UMTAM {umtam_kwargs}, seed {config.seed}; workdir {workdir}"
    )
    print("1) fine-tuning experts with UMTAM (checkpoints with statistics)")
    base, ttasks, experts = E.prepare_experts(
        tasks, config, workdir, optimizer="umtam", optimizer_kwargs=umtam_kwargs,
        progress=progress,
    )  # fmt: skip
    t_train = time.perf_counter() - t_start
    print(
        "2) merging encoders (each task keeps its head); hyper-parameters chosen on "
        "validation, reported on test"
    )
    result = E.run_merging(
        experts, ttasks, base, config, methods=methods, grids=E.default_grids(full=args.full),
        fisher_examples=256 if args.full else 64, progress=progress,
    )  # fmt: skip
    seconds = {"fine_tuning": t_train, "total": time.perf_counter() - t_start}
    _report(result, ttasks, tasks, config, mode, seconds)
    out = {
        "command": "umtam-demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mode": mode,
        "config": {**dataclasses.asdict(config), "config": None},
        "umtam_kwargs": umtam_kwargs,
        "tasks": tasks,
        "metrics": {t: ttasks[t].task.metric for t in tasks},
        "experts_info": {
            e.task: {
                "path": str(e.path),
                "train_seconds": e.info.get("seconds"),
                "restored": e.info.get("restored"),
            }
            for e in experts
        },
        "result": result,
        "seconds": seconds,
        "environment": {"python": platform.python_version(), "platform": platform.platform()},
    }
    _write(out, result, workdir, mode)
    return 0


def _tasks_and_methods(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The tasks and merge methods the command line selects, checked."""
    from umtam_jax import experiments as E
    from umtam_jax.experiments import data as data_lib

    tasks = (
        [t.strip() for t in args.tasks.split(",") if t.strip()]
        if args.tasks
        else list(E.DEFAULT_TASKS)
    )
    unknown = [t for t in tasks if t not in data_lib.available_tasks()]
    if unknown:
        raise _Refused(f"unknown task(s) {unknown}; registered: {data_lib.available_tasks()}")
    if len(tasks) < 2:
        raise _Refused("merging needs at least two tasks")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise _Refused("--methods names no merge method")
    bad = [m for m in methods if m not in E.MERGE_METHODS]
    if bad:
        raise _Refused(f"unknown method(s) {bad}; known: {list(E.MERGE_METHODS)}")
    return tasks, methods


def _report(
    result: dict[str, Any],
    ttasks: dict[str, Any],
    tasks: list[str],
    config: Any,
    mode: str,
    seconds: dict[str, float],
) -> None:
    """Prints the test table and what it rests on: metrics, sizes, post-hoc passes, time."""
    from umtam_jax import experiments as E

    print()
    print(E.format_table(result, "test"))
    print()
    tdesc = ", ".join(f"{t}: {ttasks[t].task.metric}" for t in tasks)
    n_test = ", ".join(f"{t}: {len(ttasks[t].arrays['test']['labels'])}" for t in tasks)
    print(
        f"Metrics: {tdesc}. Norm. avg = mean over tasks of merged/expert (test). Size "
        f"{mode}: one seed ({config.seed}), test examples {n_test}; the 95 % intervals "
        "resample test examples only (seed-to-seed noise is larger: `python -m "
        "umtam_jax.experiments.protocol` runs several seeds)."
    )
    if result.get("fisher_seconds") is not None:
        print(
            f"Fisher merging's post-hoc Fisher pass took {result['fisher_seconds']:.1f}s "
            "extra (UMTAM/OTA statistics come free from training)."
        )
    if result.get("gram_seconds") is not None:
        print(f"RegMean's post-hoc Gram pass took {result['gram_seconds']:.1f}s extra.")
    print(f"Time: fine-tuning {seconds['fine_tuning']:.0f}s, total {seconds['total']:.0f}s.")


def _write(out: dict[str, Any], result: dict[str, Any], workdir: Path, mode: str) -> None:
    """Writes ``<workdir>/demo_results.json`` (atomically) and the plot beside it."""
    from umtam_jax import experiments as E
    from umtam_jax.experiments import store

    text = json.dumps(out, indent=1, default=str)
    store.write_atomic(workdir / "demo_results.json", lambda f: f.write(text.encode()))
    png = E.plot_merging(
        result, workdir / "demo_results.png", title=f"umtam-demo ({mode})", overwrite=True
    )  # in the claimed work directory: the demo's own
    print(f"Wrote {workdir / 'demo_results.json'} and {png}")


if __name__ == "__main__":
    raise SystemExit(main())
