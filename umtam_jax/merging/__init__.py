"""Model merging over parameter pytrees: UMTAM (Algorithm 2) and standard baselines.

Every function is pure. It takes pytrees of arrays: nested dicts of ``jax.Array``/NumPy
arrays as Orbax restores them, or ``flax.nnx`` states, whose Variables count as the arrays
they wrap. It never modifies them, and returns a new pytree with the base's structure,
Variables and dtypes (16-bit floats are computed in float32 and cast back).

Inputs are validated first:
- leaf paths, shapes and dtypes across base, experts and statistics;
- outside tracing, finite values;
- density in (0, 1] and the other option values.

Errors name the offending leaf path. With their Python options (densities, mode strings,
flags) static, all merges are jit-compatible. Random methods take an explicit PRNG ``key``.

Keep counts of the top-k methods (TIES's trim, UMTAM, prune, consensus TIES)
are exact: ``max(1, int(density · N))`` entries per tensor (``scope="tensor"``), per
layer of a stacked tensor (``scope="layer"``: each slice of the first axis of a tensor with
three or more; or a layout such as ``scope=umtam_jax.scanned("blocks")``: each layer of the
leaves it names) or per expert (``scope="global"``), equal scores going to the lower flat
index; Model Breadcrumbs keeps ``int(density · N)``, which may be none.

Methods:
  - :func:`umtam`: curvature-aware merging with the optimizer's statistics (docs/algorithm.md §4).
  - :func:`task_arithmetic`, :func:`ties`, :func:`dare`, :func:`dare_ties`: mergekit's
    generalized task arithmetic family (docs/algorithm.md §5).
  - :func:`fisher` (with :func:`diagonal_fisher`) and :func:`ota`: curvature-weighted
    averages.
  - :func:`prune`: keep the top-density entries of one expert's task vector.
  - :func:`regmean` (with :func:`input_grams`): least-squares merging of linear layers
    from their inputs' Gram matrices.
  - mergekit's other data-free methods, with its parameter names: :func:`linear`,
    :func:`slerp`, :func:`nuslerp`, :func:`multislerp`, :func:`karcher`,
    :func:`model_stock`, :func:`nearswap`, :func:`arcee_fusion`, :func:`passthrough`; and
    its sparsification methods :func:`breadcrumbs`, :func:`breadcrumbs_ties`,
    :func:`della`, :func:`della_linear`, :func:`sce`, :func:`ram`, :func:`ramplus_tl`
    (defaults, and where they differ from mergekit's, in docs/methods.md).
  - :func:`tsv_merge`, :func:`iso_c`, :func:`iso_cts`: SVD subspace merges (TSV, isotropic).
  - :func:`consensus`, :func:`consensus_ties` (with :func:`tall_masks`,
    :func:`apply_task_mask`) and :func:`emr_merge` (with :func:`emr_task_model`): mask-based
    merges and per-task models (TALL masks, consensus merging, EMR-merging).
  - :data:`METHODS`: the registry of the methods above (name → :class:`Method`: inputs,
    parameters with kinds and defaults, steps), read by every entry point, and
    :func:`merge`, any of them by name.

Out of core, from files to files, the same methods run in :mod:`umtam_jax.engine`.

References:
  UMTAM, arXiv:2512.17109; TIES, arXiv:2306.01708; DARE, arXiv:2311.03099; Fisher merging,
  arXiv:2111.09832; OTA merging, arXiv:2509.11167; RegMean, arXiv:2212.09849; TSV,
  arXiv:2412.00081; Iso-C/Iso-CTS, arXiv:2502.04959.
"""

# Each module registers its methods when imported, and METHODS lists them in that order:
# the modules are imported here in the order METHODS presents them.
# isort: off
from umtam_jax.merging import _umtam, _baselines, _curvature_baselines  # noqa: F401
from umtam_jax.merging import _interpolation, _spherical_means, _data_free  # noqa: F401
from umtam_jax.merging import _fisher, _regmean, _breadcrumbs, _della, _sce_ram  # noqa: F401
from umtam_jax.merging import _subspace, _isotropic, _task_masks  # noqa: F401

# isort: on
from umtam_jax.merging import diagnostics
from umtam_jax.merging._baselines import dare, dare_ties, task_arithmetic, ties
from umtam_jax.merging._breadcrumbs import breadcrumbs, breadcrumbs_ties
from umtam_jax.merging._curvature_baselines import ota, prune
from umtam_jax.merging._data_free import (
    arcee_fusion,
    model_stock,
    nearswap,
    passthrough,
)
from umtam_jax.merging._della import della, della_linear
from umtam_jax.merging._emr import EMRMerged, emr_merge, emr_task_model
from umtam_jax.merging._fisher import diagonal_fisher, fisher
from umtam_jax.merging._input_grams import input_grams
from umtam_jax.merging._interpolation import linear, nuslerp, slerp
from umtam_jax.merging._isotropic import iso_c, iso_cts
from umtam_jax.merging._mask_packing import pack_mask, unpack_mask
from umtam_jax.merging._pipeline import merge
from umtam_jax.merging._registry import METHODS, REQUIRED, Method, Param, describe
from umtam_jax.merging._regmean import regmean
from umtam_jax.merging._sce_ram import ram, ramplus_tl, sce
from umtam_jax.merging._spherical_means import karcher, multislerp
from umtam_jax.merging._subspace import tsv_merge
from umtam_jax.merging._task_masks import apply_task_mask, consensus, consensus_ties, tall_masks
from umtam_jax.merging._umtam import umtam

__all__ = [
    "METHODS",
    "REQUIRED",
    "EMRMerged",
    "Method",
    "Param",
    "apply_task_mask",
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "consensus",
    "consensus_ties",
    "dare",
    "dare_ties",
    "della",
    "della_linear",
    "describe",
    "diagnostics",
    "diagonal_fisher",
    "emr_merge",
    "emr_task_model",
    "fisher",
    "input_grams",
    "iso_c",
    "iso_cts",
    "karcher",
    "linear",
    "merge",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "ota",
    "pack_mask",
    "passthrough",
    "prune",
    "ram",
    "ramplus_tl",
    "regmean",
    "sce",
    "slerp",
    "tall_masks",
    "task_arithmetic",
    "ties",
    "tsv_merge",
    "umtam",
    "unpack_mask",
]
