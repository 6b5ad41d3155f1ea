"""The evaluation protocol: seeds, early-stopped experts, equal-budget searches, intervals.

One run of the protocol, for every seed (the training seed *and* the data split seed):

1. Tokenize the tasks (validation capped at ``max_eval``, test at ``max_test``: ≥ 1000
   examples per task where the data has them) and train one expert per task until its
   validation score stops improving (:class:`~umtam_jax.experiments.training.\
EarlyStopping`, best checkpoint kept).
2. For every compared method (:func:`~umtam_jax.experiments.spaces.candidates`: every
   registered K-expert method, UMTAM's ablations and ``normalize`` modes, EMR and TALL
   masks), choose hyper-parameters on validation only with
   :func:`~umtam_jax.experiments.search.grid_search`, the same evaluation budget for every
   method with hyper-parameters (1 for those without); then predict the test split at
   the chosen setting. Fisher and RegMean get their post-hoc passes
   (:mod:`~umtam_jax.experiments.posthoc`).
3. Store, per (seed, method): the validation score of every trial, the chosen setting, the
   axes left on an open edge, merge seconds, the test predictions of every example
   (``.npz``) and the merge diagnostics (:func:`umtam_jax.merging.diagnostics.diagnose`);
   per seed and task the experts' scores (the normalizers) and the test labels.

Everything is cached in the work directory with atomic writes
(:mod:`~umtam_jax.experiments.store`): experts as checkpoints, every validation trial,
every finished (seed, method); an interrupted run resumes where it stopped, and
``results.json`` is rewritten after every finished (seed, method).
:func:`~umtam_jax.experiments.comparison.summarize` turns the stored predictions into the
table of intervals; :func:`evaluate_merges` runs both.

Sizes (:data:`SIZES`):

* ``tiny``: a random 1-layer BERT, 2 seeds, budget 4, at most 12 steps: seconds (tests).
* ``medium``: pretrained MiniLM-L6, 3 seeds x 4 tasks, experts early-stopped within 250
  steps (validation every 25, patience 3), 300 validation and up to 1000 test examples per
  task, budget 6, every method. Estimated from a timing run on a shared 2-core CPU (1.3 s
  per training step, 6 ms per evaluated example, each method's merge of 4 MiniLM
  encoders timed once): at most about 70 min of training and about 65 min of merging,
  validation, test predictions and diagnostics per seed, 4-4.5 h in all (less when
  experts stop early or the CPU is idle). The slowest merges are Iso-CTS (about 8 min),
  TSV-M and DELLA (about 2 min each); a searched ``scaling`` costs no extra merge.
* ``full``: the same on a GPU: 5 seeds, 3000 steps at most, all training data, 2000
  validation and all test examples, budget 12.

From a shell::

    python -m umtam_jax.experiments.protocol --size medium --workdir protocol-medium
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from umtam_jax.experiments import store
from umtam_jax.experiments.comparison import MergeTable, read_results, summarize
from umtam_jax.experiments.models import minilm_pretrained
from umtam_jax.experiments.protocol_setup import (
    EXPERT_OPTIMIZERS,
    EXPERT_RECIPES,
    SIZES,
    TINY_BERT,
    ProtocolSize,
    _expert_kwargs,
    resolve_size,
    seed_inputs,
    start_encoder,
    usable,
)
from umtam_jax.experiments.search import Axis
from umtam_jax.experiments.seed_run import SeedRun
from umtam_jax.experiments.spaces import EXCLUDED, candidates

__all__ = [
    "EXPERT_OPTIMIZERS",
    "EXPERT_RECIPES",
    "ProtocolSize",
    "SIZES",
    "TINY_BERT",
    "evaluate_merges",
    "main",
    "resolve_size",
    "run_protocol",
    "seed_inputs",
    "start_encoder",
    "usable",
]

Params = dict[str, Any]
Log = Callable[[str], None] | None


def run_protocol(
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    *,
    size: str | ProtocolSize = "medium",
    workdir: str | Path,
    base_encoder: Params | None = None,
    tokenizer: Any = None,
    experts_by: str = "umtam",
    diagnostics: bool = True,
    progress: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Runs (or resumes) the protocol in ``workdir``; returns the results dict.

    Args:
        tasks: Registered task names (default: the size's).
        methods: Keys of :func:`~umtam_jax.experiments.spaces.candidates` (default: the
            size's, or every candidate).
        seeds: Seeds; each is the training seed and the data split seed.
        size: A key of :data:`SIZES` or a :class:`ProtocolSize`.
        workdir: The cache and results directory (resumed when it exists).
        base_encoder: The shared start encoder (default: the size's).
        tokenizer: The MiniLM tokenizer (default: loaded).
        experts_by: The experts' recipe, a key of :data:`EXPERT_RECIPES`: ``"umtam"``
            (the size's ``optimizer_kwargs``), a UMTAM memory mode, or ``"adamw"``
            (Optax defaults, same schedule; the methods that merge UMTAM statistics are
            then left out).
        diagnostics: Record :func:`umtam_jax.merging.diagnostics.diagnose` per merge.
        progress: Show progress bars.
        log: Where progress lines go (None: silent).

    Returns:
        The content of ``workdir/results.json``: ``protocol`` (settings, task metrics,
        excluded methods), ``experts[seed][task]`` (scores, early-stopping steps),
        ``posthoc[seed]`` (seconds of the Fisher/Gram passes), ``runs[method][seed]``
        (every trial, the choice, open edges, test scores, diagnostics and the path of
        the test predictions) and ``labels[seed]`` (path of the test labels).

    Raises:
        ValueError: an unknown method, a method that needs UMTAM statistics with AdamW
            experts, ``workdir`` holds a run of another size, task list or expert
            optimizer, or its ``results.json`` is damaged or not a protocol run's record.

    Example (trains models, so not run as a doctest)::

        results = run_protocol(["kjv_section", "fortune_topic"], ["umtam", "ties"],
                               size="medium", workdir="protocol-medium")
    """
    sz = resolve_size(size)
    tasks = list(tasks or sz.tasks)
    seeds = list(sz.seeds if seeds is None else seeds)
    if experts_by not in EXPERT_OPTIMIZERS:
        raise ValueError(f"experts_by={experts_by!r}; use one of {EXPERT_OPTIMIZERS}")
    pool = candidates(len(tasks))
    methods = list(methods or sz.methods or usable(pool, experts_by))
    unknown = [m for m in methods if m not in pool]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(pool)}")
    unusable = [m for m in methods if m not in usable(pool, experts_by)]
    if unusable:
        raise ValueError(
            f"methods {unusable} merge the UMTAM statistics saved during training; experts "
            f"trained with {experts_by!r} have none (use experts_by='umtam')"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with store.exclusive(workdir, "a protocol run"):
        say = log or (lambda _: None)
        if base_encoder is None:
            base_encoder = start_encoder(sz)
        if tokenizer is None:
            tokenizer = minilm_pretrained.load_minilm_tokenizer()
        results_path = workdir / "results.json"
        results = read_results(results_path) or {}
        previous = results.get("protocol", {})
        held = (previous.get("size"), previous.get("tasks"), previous.get("experts_by", "umtam"))
        if previous and held != (sz.name, tasks, experts_by):
            raise ValueError(
                f"{workdir} holds a run of size {held[0]!r} on tasks {held[1]} with experts "
                f"trained by {held[2]!r}; use another work directory for size {sz.name!r} on "
                f"{tasks} with experts trained by {experts_by!r}"
            )
        config = store.jsonable({**sz.config.training_key(), "max_test": sz.config.test_cap})
        if previous.get("config", config) != config:
            changed = sorted(k for k in {*config, *previous["config"]}
                             if config.get(k) != previous["config"].get(k))  # fmt: skip
            raise ValueError(
                f"{workdir} holds a run of size {sz.name!r} whose experts were trained with "
                f"other settings ({', '.join(changed)} differ); use another work directory"
            )
        for part in ("experts", "posthoc", "runs", "labels"):
            results.setdefault(part, {})
        results["protocol"] = {
            "size": sz.name,
            "tasks": tasks,
            "seeds": sorted({*map(int, previous.get("seeds", [])), *seeds}),
            "methods": list(dict.fromkeys([*previous.get("methods", []), *methods])),
            "budget": sz.budget,
            "early_stopping": sz.early_stopping.key(),
            "config": config,
            "experts_by": experts_by,
            "optimizer_kwargs": _expert_kwargs(sz, experts_by),
            "excluded": EXCLUDED,
            "metrics": {},
        }
        for seed in seeds:
            t0 = time.perf_counter()
            cfg, ttasks, experts = seed_inputs(
                sz,
                seed,
                tasks,
                workdir,
                base_encoder,
                tokenizer,
                experts=experts_by,
                progress=progress,
            )
            say(f"seed {seed}: {len(experts)} experts ready in {time.perf_counter() - t0:.0f}s")
            results["protocol"]["metrics"] = {
                t: {"metric": tt.task.metric, "num_labels": tt.num_labels}
                for t, tt in ttasks.items()
            }
            labels_path = workdir / "labels" / f"seed{seed}.npz"
            store.write_npz(
                labels_path, {t: tt.arrays["test"]["labels"] for t, tt in ttasks.items()}
            )
            results["labels"][str(seed)] = str(labels_path.relative_to(workdir))
            results["experts"][str(seed)] = {
                e.task: {
                    **e.scores,
                    "n_test": len(ttasks[e.task].arrays["test"]["labels"]),
                    "n_validation": len(ttasks[e.task].arrays["validation"]["labels"]),
                    "checkpoint": e.path.name,
                    **{
                        k: e.info.get(k)
                        for k in ("best_step", "stopped_step", "stopped_early", "seconds")
                    },
                }
                for e in experts
            }
            store.write_json(results_path, results)
            runner = SeedRun(
                seed,
                base_encoder,
                ttasks,
                experts,
                cfg,
                dataclasses.replace(sz, optimizer_kwargs=_expert_kwargs(sz, experts_by)),
                workdir,
                progress=progress,
                diagnostics=diagnostics,
            )
            for m in methods:
                t1 = time.perf_counter()
                record = runner.run(pool[m])
                results["runs"].setdefault(m, {})[str(seed)] = record
                if runner.posthoc:
                    results["posthoc"].setdefault(str(seed), {}).update(runner.posthoc)
                store.write_json(results_path, results)
                edges = f" open edges {record['open_edges']}" if record["open_edges"] else ""
                say(
                    f"seed {seed} {m:<32} val {record['validation_norm']:.3f} "
                    f"test {record['test_norm']:.3f} ({time.perf_counter() - t1:.0f}s){edges}"
                )
        return results


def evaluate_merges(
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    *,
    size: str | ProtocolSize = "medium",
    workdir: str | Path,
    references: Sequence[str] = ("umtam", "task_arithmetic"),
    samples: int | None = None,
    level: float = 0.95,
    **kwargs: Any,
) -> MergeTable:
    """Runs (or resumes) the protocol and returns the table of intervals.

    Per method: the mean normalized test score (merged / expert, per seed and task) with
    its Student-t interval over the seeds; per method and reference, the
    paired difference with its interval and verdict (better / worse / tied).

    Args:
        tasks, methods, seeds, size, workdir: As :func:`run_protocol`.
        references: Methods every other one is compared with (those that were run).
        samples: Bootstrap replicates of a one-seed run (default: the size's).
        level: Interval coverage.
        **kwargs: Passed to :func:`run_protocol` (``progress``, ``log``, ...).

    Returns:
        A :class:`~umtam_jax.experiments.comparison.MergeTable` (``.rows``,
        ``.to_markdown()``).

    Example (trains models, so not run as a doctest)::

        table = evaluate_merges(["kjv_section", "fortune_topic"],
                                ["umtam", "task_arithmetic", "ties", "tall_masks"],
                                seeds=[0, 1, 2], size="medium", workdir="protocol-medium")
        print(table.to_markdown())
    """
    sz = resolve_size(size)
    run_protocol(tasks, methods, seeds, size=sz, workdir=workdir, **kwargs)
    return summarize(
        workdir,
        methods=methods or sz.methods,
        seeds=seeds if seeds is not None else sz.seeds,
        references=references,
        samples=samples or sz.bootstrap_samples,
        level=level,
    )


def _axis_text(a: Axis) -> str:
    return f"{a.name}{list(a.values)}" + (" log" if a.log else "")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run or resume the protocol, then print and save the table."""
    p = argparse.ArgumentParser(
        prog="python -m umtam_jax.experiments.protocol", description=__doc__.split("\n")[0]
    )
    p.add_argument("--size", default="medium", choices=sorted(SIZES))
    p.add_argument("--workdir", default="protocol-work")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument(
        "--experts",
        default="umtam",
        choices=EXPERT_OPTIMIZERS,
        help="the experts' recipe: UMTAM, a UMTAM memory mode, or AdamW (then the methods "
        "merging UMTAM statistics are left out)",
    )
    p.add_argument("--references", nargs="+", default=["umtam", "task_arithmetic"])
    p.add_argument("--samples", type=int, default=None, help="bootstrap replicates")
    p.add_argument("--no-diagnostics", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--list-methods", action="store_true")
    args = p.parse_args(argv)
    sz = SIZES[args.size]
    if args.list_methods:
        for c in candidates(len(args.tasks or sz.tasks)).values():
            print(f"{c.key:<32} {c.name:<36} {' '.join(_axis_text(a) for a in c.axes)}")
        for m, why in EXCLUDED.items():
            print(f"{m:<32} excluded: {why}")
        return 0
    from umtam_jax.experiments.pipeline import enable_compilation_cache

    enable_compilation_cache(Path(args.workdir) / "jax-cache")
    t0 = time.perf_counter()
    table = evaluate_merges(
        args.tasks,
        args.methods,
        args.seeds,
        size=sz,
        workdir=args.workdir,
        references=args.references,
        samples=args.samples,
        experts_by=args.experts,
        diagnostics=not args.no_diagnostics,
        progress=args.progress,
        log=lambda s: print(s, flush=True),
    )
    text = table.to_markdown()
    store.write_atomic(Path(args.workdir) / "table.md", lambda f: f.write(text.encode() + b"\n"))
    print(text)
    print(f"done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
