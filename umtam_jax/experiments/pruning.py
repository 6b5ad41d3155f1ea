"""Saliency vs magnitude pruning under the protocol: every seed, intervals, verdicts.

For each seed of a protocol size and each task, the expert's *encoder* task vector
``w − w0`` is pruned per tensor to each density with :func:`umtam_jax.merging.prune`,
ranking entries either by the optimizer's saliency ``S`` (the statistics saved during
training) or by ``|w − w0|`` (magnitude); the rest revert to the shared start encoder
``w0`` and the task keeps its fine-tuned head. Densities are fixed, so nothing is chosen
and only the test split is predicted. The experts, tokenized tasks and test labels are
those of :func:`~umtam_jax.experiments.protocol.run_protocol` in the same work directory
(trained there if missing); the test predictions are cached in
``pruning/seed<N>-<hash of the experts>.npz`` (atomic writes, one task at a time), so an
interrupted run resumes and other experts never read them.

:func:`summarize_pruning` turns the predictions into, per density, each ranking's mean
normalized score (score ÷ the expert's) with its interval and the paired difference
saliency − magnitude with its verdict, and the same difference per (task, density) on the
task's raw metric — the intervals of :mod:`~umtam_jax.experiments.intervals`
(Student-t over the seeds; one seed: a paired bootstrap over its test examples).

From a shell (the benchmark front end writes the results file and the figure)::

    python -m benchmarks.pruning --size medium --workdir protocol-medium
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umtam_jax import merging
from umtam_jax.experiments import intervals, store
from umtam_jax.experiments._keys import stable_hash
from umtam_jax.experiments.comparison import task_metrics
from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.evaluation import predict
from umtam_jax.experiments.protocol import ProtocolSize, resolve_size, seed_inputs, start_encoder

__all__ = ["DENSITIES", "RANKINGS", "run_pruning", "summarize_pruning"]

#: Densities of the study (fraction of each tensor's entries kept).
DENSITIES = (0.01, 0.05, 0.10, 0.20, 0.40)
#: The two rankings compared.
RANKINGS = ("saliency", "magnitude")

Params = dict[str, Any]


def _key(task: str, ranking: str, density: float | None = None) -> str:
    return f"{task}/{ranking}" + ("" if density is None else f"/{density:g}")


def _predict(encoder: Params, head: Params, test: Any, cfg: PipelineConfig) -> np.ndarray:
    params = {"encoder": encoder, "head": head}
    return predict(params, test, batch_size=cfg.eval_batch_size, config=cfg.config)


def _prune_seed(
    sz: ProtocolSize,
    seed: int,
    tasks: Sequence[str],
    densities: Sequence[float],
    workdir: Path,
    base: Params,
    tokenizer: Any,
    say: Callable[[str], None],
) -> tuple[dict[str, Any], list[Any], Path]:
    """Prunes and predicts the experts of one seed, adding what is missing to its cached
    file; returns the seed's tasks, its experts and the file."""
    cfg, ttasks, experts = seed_inputs(sz, seed, tasks, workdir, base, tokenizer)
    expert_names = stable_hash([e.path.name for e in experts])
    path = workdir / "pruning" / f"seed{seed}-{expert_names}.npz"
    have = store.read_npz(path)
    if have is None and path.exists():
        warnings.warn(f"{path} is damaged: its predictions are computed again", stacklevel=2)
    have = have or {}
    for e in experts:
        wanted = {_key(e.task, "labels"), _key(e.task, "base")}
        wanted |= {_key(e.task, r, d) for r in RANKINGS for d in densities}
        if wanted <= have.keys():
            continue
        test, head, enc = ttasks[e.task].arrays["test"], e.params["head"], e.params["encoder"]
        have[_key(e.task, "labels")] = np.asarray(test["labels"])
        have[_key(e.task, "base")] = _predict(base, head, test, cfg)
        for d, ranking in itertools.product(densities, RANKINGS):
            scores = e.statistics["encoder"] if ranking == "saliency" else None
            pruned = merging.prune(base, enc, scores, density=float(d))
            have[_key(e.task, ranking, d)] = _predict(pruned, head, test, cfg)
        store.write_npz(path, have)
        say(f"seed {seed} {e.task}: pruned and predicted")
    return ttasks, experts, path


def run_pruning(
    workdir: str | Path,
    *,
    size: str | ProtocolSize = "medium",
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    densities: Sequence[float] = DENSITIES,
    base_encoder: Params | None = None,
    tokenizer: Any = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Predicts the test split of every pruned expert (cached); returns what
    :func:`summarize_pruning` reads.

    Args:
        workdir: The protocol work directory (experts, token cache; ``pruning/`` is added).
        size: A protocol size name or :class:`~umtam_jax.experiments.protocol.ProtocolSize`.
        tasks: Registered task names (default: the size's).
        seeds: Seeds (default: the size's).
        densities: Fractions kept, each in (0, 1].
        base_encoder: The shared start encoder (default: the size's).
        tokenizer: The MiniLM tokenizer (default: loaded).
        log: Where progress lines go (None: silent).

    Returns:
        ``{"size", "tasks", "seeds", "densities", "metrics", "experts", "files",
        "seconds"}``: per seed the expert's test score per task and the file holding
        the test labels and predictions (``<task>/labels``, ``<task>/base`` for the start
        encoder with the task's head, ``<task>/<ranking>/<density>``).

    Raises:
        ValueError: a density outside (0, 1].
        BlockingIOError: another process works in ``workdir``.
    """
    from umtam_jax.experiments.models import minilm_pretrained

    bad = [d for d in densities if not 0 < float(d) <= 1]
    if bad:
        raise ValueError(f"densities must lie in (0, 1]; got {bad}")
    sz = resolve_size(size)
    tasks = list(tasks or sz.tasks)
    seeds = list(sz.seeds if seeds is None else seeds)
    workdir = Path(workdir)
    say = log or (lambda _: None)
    base = start_encoder(sz) if base_encoder is None else base_encoder
    tokenizer = tokenizer or minilm_pretrained.load_minilm_tokenizer()
    out: dict[str, Any] = {"size": sz.name, "tasks": tasks, "seeds": seeds,
                           "densities": [float(d) for d in densities], "metrics": {},
                           "experts": {}, "files": {}}  # fmt: skip
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    with store.exclusive(workdir, "a pruning study"):  # a protocol run writes there too
        for seed in seeds:
            ttasks, experts, path = _prune_seed(
                sz, seed, tasks, densities, workdir, base, tokenizer,
                lambda msg: say(f"{msg} ({time.perf_counter() - t0:.0f}s)"),
            )  # fmt: skip
            out["metrics"] = {
                t: {"metric": tt.task.metric, "num_labels": tt.num_labels}
                for t, tt in ttasks.items()
            }
            out["experts"][str(seed)] = {e.task: float(e.scores["test"]) for e in experts}
            out["files"][str(seed)] = str(path.relative_to(workdir))
    out["seconds"] = time.perf_counter() - t0
    return out


def summarize_pruning(
    workdir: str | Path,
    run: dict[str, Any],
    *,
    samples: int = 2000,
    level: float = 0.95,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """Intervals and verdicts of a :func:`run_pruning` result.

    Args:
        workdir: The work directory of the run.
        run: What :func:`run_pruning` returned.
        samples: Bootstrap replicates (one seed only).
        level: Interval coverage.
        bootstrap_seed: The resampling's seed (one seed only).

    Returns:
        ``{"mean": {density: {"saliency", "magnitude", "difference"}}, "per_task":
        {task: {density: {"saliency", "magnitude", "difference", "relative"}}},
        "reference": {"expert", "base"}, "counts": {"better", "tied", "worse"}}``:
        intervals as ``{"estimate", "low", "high", "level", "per_seed", "verdict"}``;
        ``mean`` scores are normalized by each seed's expert, ``per_task`` ones are raw
        metrics;
        ``relative`` is the difference in % of the magnitude ranking's score; ``counts``
        tallies the per-(task, density) verdicts of saliency against magnitude.

    Raises:
        FileNotFoundError: a seed's predictions file is missing.
        ValueError: a seed's predictions file is damaged (never summarized without it).
    """
    workdir = Path(workdir)
    tasks, seeds = run["tasks"], [str(s) for s in run["seeds"]]
    metric = task_metrics(run["metrics"])
    arrays = [store.read_npz_record(workdir / run["files"][s]) for s in seeds]
    if any(a is None for a in arrays):
        raise FileNotFoundError(f"pruning predictions missing in {workdir / 'pruning'}")
    labels = [{t: a[_key(t, "labels")] for t in tasks} for a in arrays if a is not None]

    def preds(ranking: str, d: float | None, only: Sequence[str] = tasks) -> list:
        return [{t: a[_key(t, ranking, d)] for t in only} for a in arrays if a is not None]

    norm = [{t: max(run["experts"][s][t], 1e-12) for t in tasks} for s in seeds]
    kw: dict[str, Any] = {"samples": samples, "level": level, "seed": bootstrap_seed}
    out: dict[str, Any] = {"mean": {}, "per_task": {t: {} for t in tasks}}
    for d in run["densities"]:
        sal, mag = preds("saliency", d), preds("magnitude", d)
        out["mean"][f"{d:g}"] = {
            "saliency": intervals.score_interval(metric, labels, sal, normalizers=norm, **kw),
            "magnitude": intervals.score_interval(metric, labels, mag, normalizers=norm, **kw),
            "difference": intervals.paired_difference(
                metric, labels, sal, mag, normalizers=norm, **kw
            ),
        }
        for t in tasks:
            lab = [{t: x[t]} for x in labels]
            s1, m1 = preds("saliency", d, [t]), preds("magnitude", d, [t])
            diff = intervals.paired_difference(metric, lab, s1, m1, **kw)
            mag_score = intervals.score_interval(metric, lab, m1, **kw)
            scale = 100 / max(mag_score.estimate, 1e-12)
            out["per_task"][t][f"{d:g}"] = {
                "saliency": intervals.score_interval(metric, lab, s1, **kw),
                "magnitude": mag_score,
                "difference": diff,
                "relative": intervals.Interval(
                    diff.estimate * scale, diff.low * scale, diff.high * scale, level
                ),
            }
    base = preds("base", None)
    out["reference"] = {
        "expert": float(np.mean([[run["experts"][s][t] for t in tasks] for s in seeds])),
        "base": intervals.score_interval(metric, labels, base, normalizers=norm, **kw),
    }
    verdicts = [c["difference"].verdict() for per in out["per_task"].values() for c in per.values()]
    out["counts"] = {v: verdicts.count(v) for v in ("better", "tied", "worse")}
    return store.jsonable(_as_dicts(out))


def _as_dicts(x: Any) -> Any:
    if isinstance(x, intervals.Interval):
        return x.as_dict()
    if isinstance(x, dict):
        return {k: _as_dicts(v) for k, v in x.items()}
    return x
