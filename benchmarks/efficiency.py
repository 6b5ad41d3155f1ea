"""Time per MiniLM fine-tune step and optimizer-state memory (paper Table 8).

One process, one MiniLM-L6 classifier (22.7M parameters, 4 labels), one fixed real batch
(``fortune_topic`` by default, batch × max_length tokens), and one jitted full training
step (forward, backward, optimizer update: ``make_classifier_train_step``) per optimizer:
``optax.sgd``, ``optax.adamw``, UMTAM with library defaults (fresh subspace decomposition
every step), UMTAM as the demo runs it (``svd_every=10``) and lean UMTAM
(``error_decay=0, saliency="final"``).

Every step is compiled once; then the measurement is repeated ``--repeats`` times. A
repeat starts every optimizer from a fresh state (``tx.init`` of the same parameters),
runs ``--warmup`` untimed steps each, then ``--rounds`` timed rounds; a round times one
step of every optimizer in turn, the starting optimizer rotating from round to round, so
machine-load drift hits all alike and none always follows the same one. Per repeat and
optimizer the median step time gives the throughput ratio to AdamW (AdamW's median time ÷
the optimizer's, equal to the ratio of tokens per second) and the throughput cost
``100 × (1 − ratio)`` %; over repeats each gets its mean with a 95 % Student-t interval
(:func:`benchmarks._common.t_interval`). The paper's 8.3 % cost of UMTAM (Table 8) is
judged on the interval of UMTAM with library defaults by
:func:`umtam_jax.experiments.verdicts.judge`.

The load average (``os.getloadavg()``) is recorded before and after every repeat, with the
CPU count: on a shared machine absolute times are inflated, the ratios are the comparable
numbers. Each repeat is written to ``results/efficiency_repeats/<name>_repeat<i>.json`` as
it ends and read back when the command is rerun with the same settings, so an interrupted
invocation resumes at the next repeat (``--fresh`` measures every repeat again).

    python -m benchmarks.efficiency --quick     # 3 repeats × 3 rounds
    python -m benchmarks.efficiency             # 8 repeats × 5 rounds

Writes ``benchmarks/results/<name>.json`` (default ``efficiency``, ``efficiency_quick``
with ``--quick``) and its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import umtam_jax
from benchmarks._common import LEAN_UMTAM, RESULTS_DIR, cpu_info, environment, t_interval
from benchmarks._efficiency_report import REFERENCE, markdown
from benchmarks._records import commits_of, recorded_run, write_results
from umtam_jax import experiments as E
from umtam_jax.experiments.data import add_task_import_option, import_task_modules
from umtam_jax.experiments.models import classifier, minilm_pretrained
from umtam_jax.experiments.verdicts import judge

LR = 1e-4
#: The paper's end-to-end throughput cost of UMTAM against AdamW, in % (Table 8: 3,191 vs
#: 3,481 tokens/s).
CLAIMED_COST = 8.3
#: The optimizer the paper's claim is judged on.
CLAIM_OPTIMIZER = "umtam (defaults, svd_every=1)"


def optimizers() -> dict[str, optax.GradientTransformation]:
    """The timed optimizers by name, all at learning rate :data:`LR`."""
    return {
        "sgd": optax.sgd(LR),
        "adamw": optax.adamw(LR),
        "umtam (defaults, svd_every=1)": umtam_jax.umtam(LR),
        "umtam (demo, svd_every=10)": umtam_jax.umtam(LR, svd_every=10),
        'umtam lean (error_decay=0, saliency="final")': umtam_jax.umtam(LR, **LEAN_UMTAM),
        "umtam lean, svd_every=10": umtam_jax.umtam(LR, **LEAN_UMTAM, svd_every=10),
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats × 3 rounds")
    ap.add_argument("--task", default="fortune_topic")
    add_task_import_option(ap)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument(
        "--repeats", type=int, default=None, help="repeats of the measurement (default 8 / 3)"
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per repeat (default 5 / 3)"
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per repeat")
    ap.add_argument(
        "--fresh", action="store_true", help="measure every repeat, ignoring recorded repeats"
    )
    ap.add_argument("--name", default=None, help="result name (default efficiency[_quick])")
    ap.add_argument("--workdir", default="umtam-demo-work", help="holds the compilation cache")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 8)
    args.rounds = args.rounds or (3 if args.quick else 5)
    if args.repeats < 1 or args.rounds < 1 or args.warmup < 0:
        ap.error("--repeats and --rounds must be ≥ 1, --warmup ≥ 0")
    return args


def _block(tree: Any) -> None:
    jax.block_until_ready(tree)


def run_repeat(
    index: int,
    steps: dict[str, Callable],
    txs: dict[str, optax.GradientTransformation],
    params0: Any,
    batch: dict[str, Any],
    *,
    rounds: int,
    warmup: int,
) -> dict[str, Any]:
    """One repeat: fresh states, ``warmup`` untimed steps each, ``rounds`` timed rounds.

    Args:
        index: The repeat's number; with the round it sets which optimizer starts a round.
        steps: The compiled training step of each optimizer.
        txs: The optimizers (for their fresh states).
        params0: The parameters every optimizer starts from.
        batch: The fixed training batch.
        rounds: Timed rounds; each times one step of every optimizer.
        warmup: Untimed steps per optimizer before the first round.

    Returns:
        ``{"repeat", "times_s" (per optimizer, one per round), "order" (per round),
        "loadavg_before", "loadavg_after", "wall_s"}``.
    """
    names = list(steps)
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    live = {}
    for name in names:
        p, s = params0, txs[name].init(params0)
        for _ in range(warmup):
            p, s, _loss = steps[name](p, s, batch, None)
        _block((p, s))
        live[name] = (p, s)
    times: dict[str, list[float]] = {name: [] for name in names}
    orders = []
    for r in range(rounds):
        k = (index * rounds + r) % len(names)
        order = names[k:] + names[:k]
        orders.append(order)
        for name in order:
            p, s = live[name]
            t = time.perf_counter()
            p, s, _loss = steps[name](p, s, batch, None)
            _block((p, s))
            times[name].append(time.perf_counter() - t)
            live[name] = (p, s)
    return {
        "repeat": index,
        "times_s": times,
        "order": orders,
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t0,
    }


def recorded_repeats(
    label: str,
    folder: Path,
    name: str,
    count: int,
    signature: dict[str, Any],
    fresh: bool,
    run: Callable[[int], dict[str, Any]],
    env: dict[str, Any],
) -> tuple[list[Path], list[dict[str, Any]]]:
    """``run(i)`` for each of ``count`` repeats, each recorded as
    ``<folder>/<name>_repeat<i>.json`` and read back when rerun with the same ``signature``
    (:func:`benchmarks._records.recorded_run`). With ``fresh``, the records of an earlier
    run's further repeats move to ``<folder>/superseded/``, so that a later run with more
    repeats measures them again instead of reading the earlier run's back.

    Returns:
      The records' paths and the repeats' results.
    """
    paths = [folder / f"{name}_repeat{i}.json" for i in range(count)]
    if fresh:
        for stale in sorted(folder.glob(f"{name}_repeat*.json")):
            index = stale.stem.removeprefix(f"{name}_repeat")
            if index.isdigit() and int(index) >= count:
                (folder / "superseded").mkdir(exist_ok=True)
                target = folder / "superseded" / stale.name
                while target.exists():  # an older superseded run's: both are kept
                    target = target.with_name(f"{target.stem}_{target.suffix}")
                stale.rename(target)
    repeats = [
        recorded_run(
            f"[{label}] repeat {i}", {**signature, "repeat": i}, paths[i], fresh,
            lambda i=i: run(i), title=f"{paths[i].stem} (step times of one repeat)", env=env,
        )
        for i in range(count)
    ]  # fmt: skip
    return paths, repeats


def combine_repeats(
    repeats: list[dict[str, Any]],
    *,
    reference: str = REFERENCE,
    claim_optimizer: str = CLAIM_OPTIMIZER,
    claimed_cost: float = CLAIMED_COST,
) -> dict[str, Any]:
    """Per repeat and optimizer the throughput ratio to ``reference``, and over repeats its
    mean with a 95 % Student-t interval.

    The ratio of a repeat is ``median(reference's step times) / median(optimizer's)``: the
    optimizer's tokens per second over the reference's. The cost is ``100 × (1 − ratio)``
    in %, and the time ratio ``1 / ratio``; each gets its own interval over repeats.

    Args:
        repeats: :func:`run_repeat` records (``repeat`` and ``times_s`` are read).
        reference: The optimizer the ratios are taken to.
        claim_optimizer: The optimizer the paper's cost is judged on.
        claimed_cost: The paper's cost in %.

    Returns:
        ``{"repeats", "interval", "by_optimizer", "claim_check"}``. ``by_optimizer[name]``
        holds ``median_step_s_by_repeat``, ``throughput_ratio_by_repeat``,
        ``cost_percent_by_repeat`` and the intervals ``throughput_ratio``,
        ``cost_percent`` and ``time_over_reference``; ``claim_check`` (None when
        ``claim_optimizer`` was not timed) the claimed cost, the optimizer, its cost
        interval and the verdict of :func:`~umtam_jax.experiments.verdicts.judge` as a
        ``"cost"`` claim.
    """
    medians = {
        name: [float(np.median(rep["times_s"][name])) for rep in repeats]
        for name in repeats[0]["times_s"]
    }
    ref = np.asarray(medians[reference])
    by_optimizer = {}
    for name, med in medians.items():
        ratio = ref / np.asarray(med)
        cost = 100 * (1 - ratio)
        by_optimizer[name] = {
            "median_step_s_by_repeat": med,
            "throughput_ratio_by_repeat": ratio.tolist(),
            "cost_percent_by_repeat": cost.tolist(),
            "throughput_ratio": t_interval(ratio.tolist()),
            "cost_percent": t_interval(cost.tolist()),
            "time_over_reference": t_interval((1 / ratio).tolist()),
        }
    claim = None
    if claim_optimizer in by_optimizer:
        c = by_optimizer[claim_optimizer]["cost_percent"]
        verdict, why = judge(c["low"], c["high"], claimed_cost, "cost", estimate=c["estimate"])
        claim = {
            "claim": f"throughput cost of UMTAM versus AdamW ≈ {claimed_cost:g} %",
            "claimed_cost_percent": claimed_cost,
            "optimizer": claim_optimizer,
            "cost_percent": c,
            "verdict": verdict,
            "why": why,
        }
    return {
        "repeats": [rep["repeat"] for rep in repeats],
        "reference": reference,
        "interval": "95 % Student-t interval over repeats (n − 1 degrees of freedom)",
        "by_optimizer": by_optimizer,
        "claim_check": claim,
    }


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    import_task_modules(args.imports)
    name = args.name or ("efficiency_quick" if args.quick else "efficiency")
    rdir = Path(args.results_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    env = environment()
    E.enable_compilation_cache(Path(args.workdir) / "jax_cache")

    cfg = dataclasses.replace(E.QUICK, max_length=args.max_length, max_train=args.batch_size * 4)
    tt = E.prepare_task(args.task, minilm_pretrained.load_minilm_tokenizer(), cfg)
    batch = {k: v[: args.batch_size] for k, v in tt.arrays["train"].items()}
    base = minilm_pretrained.load_minilm()
    params0 = E.init_expert(base, tt.num_labels, cfg, tt.task.seed_name)
    param_bytes = E.tree_bytes(params0)
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params0))
    txs = optimizers()
    state_bytes = {n: E.tree_bytes(tx.init(params0)) for n, tx in txs.items()}

    signature = {
        "task": args.task,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "optimizers": list(txs),
        "lr": LR,
        "jax": jax.__version__,
        "cpu": cpu_info()["model"],
    }
    steps: dict[str, Callable] = {}
    compile_s: dict[str, float] = {}

    def compiled() -> dict[str, Callable]:
        """The jitted steps, compiled (with a first step) on first use in this process."""
        if not steps:
            for n, tx in txs.items():
                step = classifier.make_classifier_train_step(tx)
                t = time.perf_counter()
                _block(step(params0, tx.init(params0), batch, None))
                compile_s[n] = time.perf_counter() - t
                steps[n] = step
                print(f"[efficiency] {n}: compiled + first step {compile_s[n]:.1f} s", flush=True)
        return steps

    def run(index: int) -> dict[str, Any]:
        rec = run_repeat(index, compiled(), txs, params0, batch, rounds=args.rounds,
                         warmup=args.warmup)  # fmt: skip
        rec["compile_plus_first_s"] = dict(compile_s)
        med = {n: float(np.median(t)) for n, t in rec["times_s"].items()}
        print(
            f"[efficiency] repeat {index + 1}/{args.repeats} ({rec['wall_s']:.0f} s, load "
            f"{rec['loadavg_before'][0]:.1f} -> {rec['loadavg_after'][0]:.1f}): "
            + ", ".join(f"{n.split(' (')[0]} {1000 * m:.0f} ms" for n, m in med.items())
            + f"; {CLAIM_OPTIMIZER} ratio {med[REFERENCE] / med[CLAIM_OPTIMIZER]:.3f}",
            flush=True,
        )
        return rec

    print(
        f"[efficiency] {n_params / 1e6:.1f}M parameters, batch {args.batch_size} × "
        f"{args.max_length} tokens, {args.repeats} repeats × {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    paths, repeats = recorded_repeats("efficiency", rdir / "efficiency_repeats", name,
                                      args.repeats, signature, args.fresh, run, env)  # fmt: skip
    over = combine_repeats(repeats)
    tokens = args.batch_size * args.max_length
    compile_rec = next(
        (r["compile_plus_first_s"] for r in reversed(repeats) if r.get("compile_plus_first_s")),
        {},
    )
    runs = {}
    for n in txs:
        med = float(np.median([t for rep in repeats for t in rep["times_s"][n]]))
        runs[n] = {
            "median_step_s": med,
            "tokens_per_s": tokens / med,
            "compile_plus_first_s": compile_rec.get(n),
            "state_bytes": state_bytes[n],
            "state_over_params": state_bytes[n] / param_bytes,
            "state_over_adamw": state_bytes[n] / state_bytes[REFERENCE],
        }
    loads = [(r["loadavg_before"], r["loadavg_after"]) for r in repeats]
    payload = {
        "task": args.task,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "tokens_per_step": tokens,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "design": "steps compiled once per process; per repeat fresh optimizer states, "
        "warm-up steps, then interleaved rounds (one step of every optimizer per round, the "
        "starting optimizer rotating); per repeat the median step time per optimizer",
        "n_params": n_params,
        "param_bytes": param_bytes,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": cpu_info()["affinity"],
        "load": load_summary(loads),
        "runs": runs,
        "over_repeats": over,
        "claim_check": over["claim_check"],
        "repeat_records": [str(p.relative_to(rdir)) for p in paths],
        "part_commits": commits_of(repeats),
        "wall_s_by_repeat": [r["wall_s"] for r in repeats],
    }
    md = markdown(payload, n_params=n_params, param_bytes=param_bytes)
    write_results(name, payload, md, results_dir=rdir, env=env, title="efficiency (Table 8)")
    print(md, flush=True)
    return payload


def load_summary(loads: list[tuple[Any, Any]]) -> dict[str, Any]:
    """The load averages before and after each repeat, and the range of the 1-minute one."""
    return {
        "by_repeat": [{"before": b, "after": a} for b, a in loads],
        "min_1min": min(x[0] for pair in loads for x in pair),
        "max_1min": max(x[0] for pair in loads for x in pair),
    }


if __name__ == "__main__":
    main()
