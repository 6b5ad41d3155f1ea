"""One seed of the evaluation protocol: every method's validation search, cached on disk.

:class:`SeedRun` holds one seed's base, tokenized tasks and experts, and runs one compared
method (:class:`~umtam_jax.experiments.spaces.Candidate`) at a time
(:meth:`SeedRun.run`): :func:`~umtam_jax.experiments.search.grid_search` over its axes on
the validation split within the budget (every trial's scores cached in
``trials/seed<N>/``), then the test predictions at the chosen setting and the merge
diagnostics, stored as ``runs/seed<N>/<method>-<key>.json`` and ``.npz``. A finished
record is returned as is, so a rerun evaluates nothing; a lost record is rebuilt from the
trial cache. The per-task methods (EMR, TALL masks) give each task its own model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from umtam_jax.experiments import store
from umtam_jax.experiments._keys import stable_hash
from umtam_jax.experiments.config import PipelineConfig
from umtam_jax.experiments.evaluation import predict
from umtam_jax.experiments.experts import ExpertResult
from umtam_jax.experiments.merge import merge_encoders, merge_key
from umtam_jax.experiments.posthoc import post_hoc_fishers, post_hoc_grams
from umtam_jax.experiments.search import grid_search
from umtam_jax.experiments.spaces import Candidate
from umtam_jax.experiments.tasks import TokenizedTask

if TYPE_CHECKING:
    from umtam_jax.experiments.protocol import ProtocolSize

__all__ = ["SeedRun"]

Params = dict[str, Any]


def _median(xs: Sequence[float]) -> float:
    return float(np.median(xs)) if len(xs) else float("nan")


class SeedRun:
    """One seed's experts and the cached searches of its methods.

    Args:
        seed: The seed (training and data split).
        base: The shared start encoder.
        ttasks: The seed's tokenized tasks by name.
        experts: The seed's experts, in task order.
        config: The seed's config.
        size: The protocol size (budget, post-hoc pass sizes, optimizer settings).
        workdir: The work directory (trial cache in ``trials/``, records in ``runs/``).
        progress: Show progress bars in the post-hoc passes.
        diagnostics: Record :func:`umtam_jax.merging.diagnostics.diagnose`.
    """

    def __init__(
        self,
        seed: int,
        base: Params,
        ttasks: Mapping[str, TokenizedTask],
        experts: Sequence[ExpertResult],
        config: PipelineConfig,
        size: ProtocolSize,
        workdir: Path,
        *,
        progress: bool = False,
        diagnostics: bool = True,
    ) -> None:
        self.seed, self.base, self.ttasks, self.experts = seed, base, ttasks, list(experts)
        self.config, self.size, self.workdir = config, size, workdir
        self.progress, self.diagnostics = progress, diagnostics
        self.encs = [e.params["encoder"] for e in self.experts]
        self.key = merge_key(config)
        self.posthoc: dict[str, float] = {}
        self._extras: dict[str, Any] = {}
        self._units: dict[str, tuple[Params, float]] = {}  # merges at scaling 1
        self._units_for = ""
        self.fingerprint = stable_hash(
            [config.data_key(), [e.path.name for e in self.experts], size.optimizer_kwargs]
        )

    # ------------------------------------------------------------------ inputs

    def extra(self, needs: str) -> Any:
        """The per-expert input of a method (computed once per seed, on first need)."""
        if not needs:
            return None
        if needs not in self._extras:
            if needs == "statistics":
                if any(e.statistics is None for e in self.experts):
                    raise ValueError("UMTAM/OTA merging needs experts trained with UMTAM")
                self._extras[needs] = [e.statistics["encoder"] for e in self.experts]
            elif needs == "fisher":
                self._extras[needs], self.posthoc["fisher_seconds"] = post_hoc_fishers(
                    self.experts,
                    self.ttasks,
                    self.config,
                    num_examples=self.size.fisher_examples,
                    progress=self.progress,
                )
            elif needs == "grams":
                self._extras[needs], self.posthoc["gram_seconds"] = post_hoc_grams(
                    self.experts,
                    self.ttasks,
                    self.config,
                    num_examples=self.size.gram_examples,
                    progress=self.progress,
                )
        return self._extras[needs]

    def merge(self, cand: Candidate, hp: Mapping[str, Any]) -> tuple[Params, float]:
        """The merged encoder of ``cand`` at ``hp`` and the merge's seconds.

        A searched ``scaling`` multiplies the merged task vector (checked for every
        candidate by the tests), so the merge at ``scaling=1`` is computed once per
        setting of the other axes and rescaled: ``w0 + s (merged_1 - w0)``. The seconds
        are those of that merge.
        """
        if "scaling" not in {a.name for a in cand.axes}:
            return self._merge(cand, hp)
        rest = {k: v for k, v in hp.items() if k != "scaling"}
        key = stable_hash([cand.key, rest])
        if key not in self._units:
            if self._units_for != cand.key or len(self._units) >= 4:  # bounded memory
                self._units, self._units_for = {}, cand.key
            self._units[key] = self._merge(cand, {**rest, "scaling": 1.0})
        unit, seconds = self._units[key]
        s = float(hp["scaling"])
        rescaled = jax.tree.map(lambda b, u: (b + s * (u - b)).astype(u.dtype), self.base, unit)
        return rescaled, seconds

    def _merge(self, cand: Candidate, hp: Mapping[str, Any]) -> tuple[Params, float]:
        needs = cand.needs
        extra = {needs: self.extra(needs)} if needs else {}
        kw = {"fishers" if k == "fisher" else k: v for k, v in extra.items()}
        t0 = time.perf_counter()
        merged = merge_encoders(cand.merge_method, self.base, self.encs, key=self.key, **kw, **hp)
        jax.block_until_ready(merged)
        return merged, time.perf_counter() - t0

    # -------------------------------------------------------------- evaluation

    def predictions(self, encoders: Mapping[str, Params], split: str) -> dict[str, np.ndarray]:
        """Predicted labels of each task's encoder (under its expert's head) on ``split``."""
        heads = {e.task: e.params["head"] for e in self.experts}
        return {
            t: predict(
                {"encoder": enc, "head": heads[t]},
                self.ttasks[t].arrays[split],
                batch_size=self.config.eval_batch_size,
                config=self.config.config,
            )
            for t, enc in encoders.items()
        }

    def scores(self, preds: Mapping[str, np.ndarray], split: str) -> dict[str, float]:
        return {
            t: float(self.ttasks[t].evaluate(self.ttasks[t].arrays[split]["labels"], p))
            for t, p in preds.items()
        }

    def normalized(self, scores: Mapping[str, float], split: str) -> float:
        by_task = {e.task: e for e in self.experts}
        return float(np.mean([s / max(by_task[t].scores[split], 1e-12) for t, s in scores.items()]))

    # ------------------------------------------------------------------ search

    def _trial_cache(self, cand: Candidate) -> tuple[Path, dict[str, Any]]:
        fp = stable_hash([self.fingerprint, cand.method, dict(cand.fixed)])
        path = self.workdir / "trials" / f"seed{self.seed}" / f"{cand.key}-{fp}.json"
        return path, store.read_json(path) or {}

    def run(self, cand: Candidate) -> dict[str, Any]:
        """Searches ``cand`` on validation, predicts test at the choice; cached on disk."""
        axes = [dataclasses.asdict(a) for a in cand.axes]
        budget = self.size.budget if cand.axes else 1
        fp = stable_hash([self.fingerprint, cand.method, dict(cand.fixed), axes, budget])
        path = self.workdir / "runs" / f"seed{self.seed}" / f"{cand.key}-{fp}.json"
        record = store.read_json(path)
        preds_path = path.with_suffix(".npz")
        if record is not None and store.read_npz(preds_path) is not None:
            return record  # done: both files whole (a damaged one is computed again)
        t0 = time.perf_counter()
        if cand.per_task:
            record, test_preds = self._run_per_task(cand, budget)
        else:
            record, test_preds = self._run_merge(cand, budget)
        record.update(
            method=cand.key,
            name=cand.name,
            registry=cand.method,
            seed=self.seed,
            budget=budget,
            axes=axes,
            fixed=dict(cand.fixed),
            test_norm=self.normalized(record["test"], "test"),
            predictions=str(preds_path.relative_to(self.workdir)),
            seconds=time.perf_counter() - t0,
        )
        store.write_npz(preds_path, test_preds)  # predictions first: the record marks done
        store.write_json(path, record)
        return store.read_json(path)

    def _cached_evaluate(
        self, cand: Candidate, compute: Callable[[dict[str, Any]], dict[str, Any]], tag: str = ""
    ) -> tuple[Callable[[dict[str, Any]], float], list[dict[str, Any]]]:
        """``evaluate(hp) -> normalized validation score`` through the trial cache."""
        cache_path, cache = self._trial_cache(cand)
        trials: list[dict[str, Any]] = []

        def evaluate(hp: dict[str, Any]) -> float:
            key = stable_hash([tag, hp])
            if key not in cache:
                cache[key] = store.jsonable({**compute(hp), "hparams": hp, "task": tag or None})
                store.write_json(cache_path, cache)
            trials.append(cache[key])
            value = cache[key]["val_norm"]
            return float("-inf") if value is None else float(value)

        return evaluate, trials

    def _run_merge(self, cand: Candidate, budget: int) -> tuple[dict[str, Any], dict]:
        merged_cache: dict[str, Params] = {}

        def compute(hp: dict[str, Any]) -> dict[str, Any]:
            merged, seconds = self.merge(cand, hp)
            preds = self.predictions({e.task: merged for e in self.experts}, "validation")
            scores = self.scores(preds, "validation")
            merged_cache.clear()
            merged_cache[stable_hash(hp)] = merged
            return {"val": scores, "val_norm": self.normalized(scores, "validation"),
                    "merge_seconds": seconds}  # fmt: skip

        evaluate, trials = self._cached_evaluate(cand, compute)
        found = grid_search(evaluate, list(cand.axes), budget=budget)
        best = dict(found.best)
        merged = merged_cache.get(stable_hash(best))
        if merged is None:  # chosen from the cache: merge once more
            merged, _ = self.merge(cand, best)
        test_preds = self.predictions({e.task: merged for e in self.experts}, "test")
        chosen = next(t for t in trials if t["hparams"] == store.jsonable(best))
        record = {
            "hparams": {**cand.fixed, **best},
            "validation": chosen["val"],
            "validation_norm": found.score,
            "open_edges": found.open_edges,
            "evaluations": len(found.trials),
            "trials": trials,
            "merge_seconds": _median([t["merge_seconds"] for t in trials]),
            "test": self.scores(test_preds, "test"),
            "diagnostics": self._diagnose(cand, best, merged) if self.diagnostics else None,
        }
        return record, test_preds

    def _diagnose(self, cand: Candidate, hp: Mapping[str, Any], merged: Params) -> dict:
        """:func:`umtam_jax.merging.diagnostics.diagnose` at the chosen setting (JSON)."""
        try:
            from umtam_jax.merging import diagnostics
        except ImportError:  # the hook: diagnostics recorded once the module exists
            return {"skipped": "umtam_jax.merging.diagnostics is not available"}
        from umtam_jax import merging

        options = {**cand.fixed, **hp}
        if merging.METHODS[cand.method].param("key") is not None:
            options["key"] = self.key
        t0 = time.perf_counter()
        try:
            out = diagnostics.diagnose(
                cand.method, self.base, self.encs, merged, self.extra(cand.needs), **options
            )
        except Exception as e:  # a diagnostic must never stop a multi-hour run
            return {"error": f"{type(e).__name__}: {e}"}
        return store.jsonable({**out, "seconds": time.perf_counter() - t0})

    def _run_per_task(self, cand: Candidate, budget: int) -> tuple[dict[str, Any], dict]:
        from umtam_jax import merging

        tasks = [e.task for e in self.experts]
        if cand.method == "emr":
            t0 = time.perf_counter()
            emr = merging.emr_merge(self.base, self.encs)
            models = {t: merging.emr_task_model(self.base, emr, i) for i, t in enumerate(tasks)}
            jax.block_until_ready(models)
            seconds = time.perf_counter() - t0

            def compute(hp: dict[str, Any]) -> dict[str, Any]:
                scores = self.scores(self.predictions(models, "validation"), "validation")
                return {"val": scores, "val_norm": self.normalized(scores, "validation"),
                        "merge_seconds": seconds}  # fmt: skip

            evaluate, trials = self._cached_evaluate(cand, compute)
            found = grid_search(evaluate, [], budget=1)
            searches = {t: found for t in tasks}
            chosen_models = models
        elif cand.method == "tall_masks":
            chosen_models, searches, trials = self._tall_masks(cand, budget, tasks)
        else:
            raise ValueError(f"unknown per-task method {cand.method!r}")
        test_preds = self.predictions(chosen_models, "test")
        if cand.method == "emr":
            val = trials[0]["val"]
            hparams: dict[str, Any] = {}
            open_edges: list[str] = []
        else:
            best_trials = self._best_trials(searches, trials)
            val = {t: best_trials[t]["val"][t] for t in tasks}
            hparams = {"lambdas": {t: searches[t].best["lambdas"] for t in tasks}}
            open_edges = [f"lambdas[{t}]" for t in tasks if searches[t].open_edges]
        record = {
            "hparams": hparams,
            "validation": val,
            "validation_norm": self.normalized(val, "validation"),
            "open_edges": open_edges,
            "evaluations": max(len(s.trials) for s in searches.values()),
            "trials": trials,
            "merge_seconds": _median([t["merge_seconds"] for t in trials]),
            "test": self.scores(test_preds, "test"),
            "diagnostics": {"skipped": "per-task method: no single merged model"},
        }
        return record, test_preds

    @staticmethod
    def _best_trials(searches: Mapping[str, Any], trials: Sequence[dict]) -> dict[str, dict]:
        out = {}
        for t, s in searches.items():
            best = store.jsonable(s.best)
            out[t] = next(x for x in trials if x["task"] == t and x["hparams"] == best)
        return out

    def _tall_masks(
        self, cand: Candidate, budget: int, tasks: Sequence[str]
    ) -> tuple[dict[str, Params], dict[str, Any], list[dict[str, Any]]]:
        """TALL masks on task arithmetic (``θ0 + Σ τ_t``): ``λ_t`` per task on its own
        validation, ``budget`` evaluations per task (the cost of ``budget`` evaluations of
        one model on every task)."""
        from umtam_jax import merging

        t0 = time.perf_counter()
        summed = merging.task_arithmetic(self.base, self.encs, scaling=1.0)
        sum_seconds = time.perf_counter() - t0
        masks: dict[float, list[Params]] = {}
        all_trials: list[dict[str, Any]] = []

        def task_model(i: int, lam: float) -> tuple[Params, float]:
            t1 = time.perf_counter()
            if lam not in masks:
                masks[lam] = merging.tall_masks(self.base, self.encs, lambdas=lam)
            model = merging.apply_task_mask(self.base, summed, masks[lam][i])
            jax.block_until_ready(model)
            return model, sum_seconds + time.perf_counter() - t1

        searches = {}
        for i, t in enumerate(tasks):

            def compute(hp: dict[str, Any], i: int = i, t: str = t) -> dict[str, Any]:
                model, seconds = task_model(i, hp["lambdas"])
                scores = self.scores(self.predictions({t: model}, "validation"), "validation")
                return {"val": scores, "val_norm": self.normalized(scores, "validation"),
                        "merge_seconds": seconds}  # fmt: skip

            evaluate, trials = self._cached_evaluate(cand, compute, tag=t)
            searches[t] = grid_search(evaluate, list(cand.axes), budget=budget)
            all_trials += trials
        chosen = {t: task_model(i, searches[t].best["lambdas"])[0] for i, t in enumerate(tasks)}
        return chosen, searches, all_trials
