"""Search spaces of the evaluation protocol: every merge method with its searched axes.

:func:`candidates` lists what :mod:`umtam_jax.experiments.protocol` compares: every
registered method of :data:`umtam_jax.merging.METHODS` that makes one model from a base and
K experts, UMTAM's ablations and both ``normalize`` modes, and two per-task methods (EMR
and TALL masks, where each task is evaluated with its own model). Each
:class:`Candidate` names its searched hyper-parameters as
:class:`~umtam_jax.experiments.search.Axis` objects (bounds, log scales, integer axes);
:func:`~umtam_jax.experiments.search.grid_search` grows them past their edges within the
protocol's budget, the same for every method. :data:`EXCLUDED` says which registered
methods are left out and why.

Initial grids: a scaling starts at ``(0.3, 0.6)`` for methods that *sum* task vectors and
``(1, 2)`` for those that *average* them; UMTAM with ``normalize="all"`` divides by every
expert's weight, shrinking the merged vector by about K, so its scaling starts at
``(K/2, K)``. Every grid has at most 2 × 2 points so a budget of 4 fits all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from umtam_jax.experiments.merge import MergeMethod
from umtam_jax.experiments.search import Axis

__all__ = ["EXCLUDED", "PER_TASK", "Candidate", "candidates"]

#: Registered methods the protocol leaves out, with the reason.
EXCLUDED: dict[str, str] = {
    "prune": "one expert's task vector pruned (a single-expert operation, not a merge of K)",
    "slerp": "interpolates the base and exactly one expert",
    "nearswap": "interpolates the base and exactly one expert",
    "arcee_fusion": "fuses the base and exactly one expert",
    "passthrough": "returns its one input model unchanged (layer stacking, not a merge of K)",
    "nuslerp": "merges exactly 2 experts (the protocol merges one expert per task, 4 by default)",
}

#: The per-task methods: one model per task, each task evaluated with its own.
PER_TASK = ("emr", "tall_masks")

#: Initial scalings of methods that sum task vectors / that average them.
_SUM = (0.3, 0.6)
_MEAN = (1.0, 2.0)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One compared method: a registered method (or a per-task one) with its search space.

    Attributes:
        key: The result key (``"umtam_no_sign_election"``, ...).
        name: Display name.
        method: The :data:`umtam_jax.merging.METHODS` key, or ``"emr"`` /
            ``"tall_masks"`` for the per-task methods.
        axes: The searched hyper-parameters (none: one evaluation).
        fixed: Parameters passed unchanged with every setting.

    Example:
      >>> from umtam_jax.experiments.spaces import candidates
      >>> ties = candidates(2)["ties"]
      >>> [axis.name for axis in ties.axes], ties.per_task, candidates(2)["emr"].per_task
      (['density', 'scaling'], False, True)
    """

    key: str
    name: str
    method: str
    axes: tuple[Axis, ...] = ()
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def per_task(self) -> bool:
        """Whether each task gets its own model (EMR, TALL masks)."""
        return self.method in PER_TASK

    @property
    def merge_method(self) -> MergeMethod:
        """The :class:`~umtam_jax.experiments.merge.MergeMethod` that merges it."""
        if self.per_task:
            raise ValueError(f"{self.key} is a per-task method")
        return MergeMethod(self.name, self.method, dict(self.fixed))

    @property
    def needs(self) -> str:
        """``"statistics"``, ``"fisher"``, ``"grams"`` or ``""`` (see
        :attr:`~umtam_jax.experiments.merge.MergeMethod.needs`)."""
        return "" if self.per_task else self.merge_method.needs


def _scaling(values: tuple[float, float]) -> Axis:
    return Axis("scaling", values, low=0.0, log=True)


def _density(values: tuple[float, float] = (0.2, 0.4), high: float = 1.0) -> Axis:
    return Axis("density", values, low=0.01, high=high, log=True)


def candidates(k: int) -> dict[str, Candidate]:
    """Every compared method for K experts, by key.

    Args:
        k: The number of experts (UMTAM ``normalize="all"``'s scaling grid starts at
            ``(K/2, K)``; consensus's ``k`` is at most K; TSV keeps ``1/K`` of each
            task's rank, as its paper does).

    Returns:
        :class:`Candidate` by key, UMTAM first.

    Example:
        >>> from umtam_jax import merging
        >>> from umtam_jax.experiments.spaces import EXCLUDED, candidates
        >>> c = candidates(4)
        >>> c["umtam"].axes[1].values, c["fisher"].axes
        ((2.0, 4.0), ())
        >>> covered = {x.method for x in c.values()} | set(EXCLUDED)
        >>> sorted(set(merging.METHODS) - covered)
        []
    """
    if k < 1:
        raise ValueError(f"need at least one expert, got k={k}")
    consensus_k = Axis("k", (1.0, 2.0) if k > 1 else (1.0,), low=1.0, high=float(k), integer=True)
    umtam_all = (_density(), _scaling((k / 2, float(k)) if k > 1 else (1.0, 2.0)))
    out = [
        Candidate("umtam", "UMTAM", "umtam", umtam_all, {"normalize": "all"}),
        Candidate(
            "umtam_selected",
            "UMTAM (normalize=selected)",
            "umtam",
            (_density(), _scaling(_MEAN)),
            {"normalize": "selected"},
        ),
        *[
            Candidate(
                f"umtam_no_{flag}",
                f"UMTAM without {flag.replace('_', ' ')}",
                "umtam",
                umtam_all,
                {"normalize": "all", flag: False},
            )
            for flag in ("curvature_pruning", "sign_election", "curvature_aggregation")
        ],
        Candidate("task_arithmetic", "Task arithmetic", "task_arithmetic", (_scaling(_SUM),)),
        Candidate("linear", "Linear (mean)", "linear"),
        Candidate("ties", "TIES", "ties", (_density(), _scaling(_MEAN))),
        Candidate("dare", "DARE", "dare", (_density((0.3, 0.6)), _scaling(_SUM))),
        Candidate("dare_ties", "DARE-TIES", "dare_ties", (_density((0.3, 0.6)), _scaling(_SUM))),
        Candidate(
            "breadcrumbs",
            "Breadcrumbs",
            "breadcrumbs",
            (_density((0.5, 0.8), high=0.99), _scaling(_SUM)),
        ),
        Candidate(
            "breadcrumbs_ties",
            "Breadcrumbs-TIES",
            "breadcrumbs_ties",
            (_density((0.5, 0.8), high=0.99), _scaling(_SUM)),
        ),
        Candidate("della", "DELLA", "della", (_density((0.3, 0.6)), _scaling(_MEAN))),
        Candidate(
            "della_linear", "DELLA-linear", "della_linear", (_density((0.3, 0.6)), _scaling(_SUM))
        ),
        Candidate(
            "sce",
            "SCE",
            "sce",
            (Axis("select_topk", (0.5, 1.0), low=0.01, high=1.0, log=True), _scaling(_MEAN)),
        ),
        Candidate("ram", "RAM", "ram", (_scaling(_MEAN),)),
        Candidate("ramplus_tl", "RAM+ (TL)", "ramplus_tl", (_scaling(_MEAN),)),
        Candidate(
            "tsv_merge", "TSV-M", "tsv_merge", (_scaling((0.5, 1.0)),), {"rank_fraction": 1 / k}
        ),
        Candidate("iso_c", "Iso-C", "iso_c", (_scaling((0.5, 1.0)),)),
        Candidate("iso_cts", "Iso-CTS", "iso_cts", (_scaling((0.5, 1.0)),)),
        Candidate(
            "consensus",
            "Consensus (TA)",
            "consensus",
            (consensus_k, _scaling(_SUM)),
        ),
        Candidate(
            "consensus_ties",
            "Consensus (TIES)",
            "consensus_ties",
            (consensus_k, _scaling(_SUM)),
            {"density": 0.2},
        ),
        Candidate("ota", "OTA (UMTAM stats)", "ota", (_scaling(_MEAN),)),
        Candidate("fisher", "Fisher (post-hoc)", "fisher"),
        Candidate(
            "regmean",
            "RegMean (post-hoc Grams)",
            "regmean",
            (Axis("alpha", (0.7, 0.9), low=0.0, high=1.0),),
        ),
        Candidate("multislerp", "Multi-SLERP", "multislerp"),
        Candidate("karcher", "Karcher mean", "karcher"),
        Candidate("model_stock", "Model Stock", "model_stock"),
        Candidate("emr", "EMR-merging (per task)", "emr"),
        Candidate(
            "tall_masks",
            "TALL masks on TA (per task)",
            "tall_masks",
            (Axis("lambdas", (0.2, 0.4), low=0.0, step=0.2),),
        ),
    ]
    return {c.key: c for c in out}
