"""Merge methods of the experiments: the method table, their grids and the encoder merge.

Only the experts' *encoders* are merged (each task keeps its own head), through
:mod:`umtam_jax.merging`. :data:`MERGE_METHODS` names the methods the experiments run (a
registry method with experiment defaults), :func:`default_grids` their hyper-parameter
grids for selection on validation, and :func:`merge_encoders` merges K encoders with one
of them, given the per-expert input it needs (UMTAM statistics, Fishers or Grams, see
:mod:`umtam_jax.experiments.posthoc` for the last two).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from umtam_jax.experiments._keys import seed_for
from umtam_jax.experiments.config import PipelineConfig

__all__ = ["MERGE_METHODS", "MergeMethod", "default_grids", "merge_encoders", "merge_key"]

Params = dict[str, Any]

#: What :attr:`MergeMethod.needs` calls each registry extra kind.
_NEEDS: dict[str | None, str] = {
    "statistics": "statistics",
    "curvatures": "statistics",
    "fishers": "fisher",
    "grams": "grams",
}


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A method of :data:`umtam_jax.merging.METHODS` as the experiments run it.

    Attributes:
        name: Display name.
        method: The registry key.
        defaults: Experiment defaults for parameters the registry requires (``density``)
            or sets otherwise; ``scaling=None`` means ``1/K``.

    Example:
      >>> from umtam_jax.experiments.merge import MERGE_METHODS
      >>> MERGE_METHODS["umtam"].needs, MERGE_METHODS["ties"].defaults
      ('statistics', {'density': 0.2})
    """

    name: str
    method: str
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def needs(self) -> str:
        """``"statistics"``, ``"fisher"``, ``"grams"`` or ``""``: the per-expert input
        besides the experts."""
        from umtam_jax import merging

        return _NEEDS.get(merging.METHODS[self.method].extra, "")


#: Merge methods by key (display name in ``.name``).
MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod("Linear (TA 1/K)", "task_arithmetic", {"scaling": None}),
    "task_arithmetic": MergeMethod("Task arithmetic", "task_arithmetic"),
    "ties": MergeMethod("TIES", "ties", {"density": 0.2}),
    "dare": MergeMethod("DARE", "dare", {"density": 0.5}),
    "dare_ties": MergeMethod("DARE-TIES", "dare_ties", {"density": 0.5}),
    "fisher": MergeMethod("Fisher (post-hoc)", "fisher"),
    "regmean": MergeMethod("RegMean (post-hoc Grams)", "regmean"),
    "ota": MergeMethod("OTA (UMTAM stats)", "ota"),
    "umtam": MergeMethod("UMTAM", "umtam"),
}


def _grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*axes.values())]


def default_grids(full: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Per-method hyper-parameter grids selected on validation.

    Linear is task arithmetic at ``1/K`` by definition (no grid). Density-based methods
    search density and scaling; normalised averages (TIES, OTA, UMTAM) a scaling factor;
    summing ones (DARE, DARE-TIES) a scaling from ``1/K``-like to 1 (``None`` scaling for
    DARE is never used). Fisher has no hyper-parameter; RegMean searches the factor
    ``alpha`` on its Grams' off-diagonal entries.

    Args:
        full: the larger grids (three values per axis) instead of the quick ones.

    Returns:
        Per method name, the list of keyword-argument settings to try.

    Example:
        >>> from umtam_jax.experiments import default_grids
        >>> grids = default_grids()
        >>> grids["linear"], grids["ties"][0]
        ([{}], {'density': 0.2, 'scaling': 1.0})
    """
    dens: tuple[float, ...]
    norm_scale: tuple[float, ...]
    sum_scale: tuple[float, ...]
    dare_dens: tuple[float, ...]
    alphas: tuple[float, ...]
    if full:
        dens = (0.1, 0.2, 0.4)
        norm_scale = (1.0, 1.5, 2.0)
        sum_scale = (0.3, 0.5, 1.0)
        dare_dens = (0.2, 0.5, 0.8)
        alphas = (0.5, 0.7, 0.9, 0.95)
    else:
        dens = (0.2, 0.4)
        norm_scale = (1.0, 2.0)
        sum_scale = (0.3, 0.6)
        dare_dens = (0.3, 0.6)
        alphas = (0.7, 0.9, 0.95)
    return {
        "linear": [{}],
        "task_arithmetic": _grid(scaling=sum_scale),
        "ties": _grid(density=dens, scaling=norm_scale),
        "dare": _grid(density=dare_dens, scaling=sum_scale),
        "dare_ties": _grid(density=dare_dens, scaling=sum_scale),
        "fisher": [{}],
        "regmean": _grid(alpha=alphas),
        "ota": _grid(scaling=norm_scale),
        "umtam": _grid(density=dens, scaling=norm_scale),
    }


def merge_key(config: PipelineConfig) -> jax.Array:
    """The PRNG key of the random merges (DARE, DARE-TIES) of an experiment.

    Args:
        config: the experiment's configuration; the key derives from ``config.seed``.

    Returns:
        A typed PRNG key, the same for every run of the experiment.

    Example:
      >>> import jax
      >>> from umtam_jax.experiments.config import PipelineConfig
      >>> from umtam_jax.experiments.merge import merge_key
      >>> a, b = merge_key(PipelineConfig(seed=1)), merge_key(PipelineConfig(seed=1))
      >>> bool((jax.random.key_data(a) == jax.random.key_data(b)).all())
      True
    """
    return jax.random.key(seed_for(config.seed, "merge"))


def merge_encoders(
    method: str | MergeMethod,
    base_encoder: Params,
    expert_encoders: Sequence[Params],
    *,
    statistics: Sequence[Any] | None = None,
    fishers: Sequence[Any] | None = None,
    grams: Sequence[Any] | None = None,
    key: jax.Array | None = None,
    **hparams: Any,
) -> Params:
    """Merges K fine-tuned encoders with a named method through :mod:`umtam_jax.merging`.

    Args:
        method: A key of :data:`MERGE_METHODS` or a :class:`MergeMethod`.
        base_encoder: The shared pretrained encoder.
        expert_encoders: The experts' encoders.
        statistics: The experts' encoder statistics (UMTAM and OTA).
        fishers: The experts' encoder Fishers (Fisher merging).
        grams: The experts' encoder input Grams (RegMean), e.g. from
            :func:`~umtam_jax.experiments.posthoc.post_hoc_grams`.
        key: PRNG key (DARE, DARE-TIES).
        **hparams: Method hyper-parameters (density, scaling, alpha, UMTAM flags, ...).

    Returns:
        The merged encoder.

    Raises:
        ValueError: the method needs statistics, Fishers or Grams that were not given.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax.experiments.merge import merge_encoders
      >>> base = {"w": jnp.zeros(4)}
      >>> experts = [{"w": jnp.array([1.0, 2, 0, 0])}, {"w": jnp.array([3.0, 0, 0, -2])}]
      >>> merge_encoders("linear", base, experts)["w"].tolist()  # the mean
      [2.0, 1.0, 0.0, -1.0]
    """
    from umtam_jax import merging

    m = MERGE_METHODS[method] if isinstance(method, str) else method
    if m.needs == "statistics" and statistics is None:
        raise ValueError(f"{m.name} needs the experts' UMTAM statistics")
    if m.needs == "fisher" and fishers is None:
        raise ValueError(f"{m.name} needs the experts' Fishers")
    if m.needs == "grams" and grams is None:
        raise ValueError(f"{m.name} needs the experts' input Grams")
    registered = merging.METHODS[m.method]
    options = {**m.defaults, **hparams}
    if options.get("scaling", 0.0) is None:
        options["scaling"] = 1.0 / len(expert_encoders)
    if registered.param("key") is not None:
        options["key"] = jax.random.key(0) if key is None else key
    extra = {"statistics": statistics, "fisher": fishers, "grams": grams}.get(m.needs)
    return merging.merge(registered, base_encoder, list(expert_encoders), extra, **options)
