"""mergekit's sparsification-based merges: Model Breadcrumbs, DELLA, SCE and RAM.

Semantics, parameter names and defaults follow mergekit 0.1.x (``merge_methods/registry.py``,
``generalized_task_arithmetic.py``, ``sce.py``, ``ram.py``, ``sparsify.py``). Its ``lambda`` is
``scaling``, a model's ``weight`` is ``weights`` and its ``rescale`` (an L1-norm rescale) is
``l1_rescale``. Everything is computed per tensor (leaf), so a tree merged whole or leaf by
leaf (the out-of-core engine) gives the same result. 16-bit inputs are computed in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _baselines as B
from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V
from umtam_jax.merging._registry import DENSITY, SCALING, WEIGHTS, Param
from umtam_jax.merging._select import _kth_largest_key, _sortable_keys

# Up to this many entries a sort ranks them (cheaper to compile than the radix select).
_SORT_MAX = 1 << 14


def _top(scores: jax.Array, k: jax.Array) -> jax.Array:
    """The ``k`` largest ``scores`` (≥ 0; equal ones: lower flat index first; none for
    ``k <= 0``), ``k`` traced: one compilation per shape."""
    flat = scores.reshape(-1)
    if flat.size <= _SORT_MAX:
        order = jnp.argsort(-flat, stable=True)
        mask = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(flat.size) < k)
    else:  # _select's radix select, with a traced rank
        keys, utype, nbits = _sortable_keys(flat)
        t, need, _ = _kth_largest_key(keys, k, utype, nbits)
        equal = keys == t
        mask = (keys > t) | (equal & (jnp.cumsum(equal, dtype=jnp.int32) <= need))
    return (mask & (k > 0)).reshape(scores.shape)


def _ranks(x: jax.Array) -> jax.Array:
    """Ranks ``0 … m − 1`` of ascending values along axis 1 (equal values by index)."""
    rows = jnp.moveaxis(x, 1, -1)
    flat = rows.reshape(-1, rows.shape[-1])
    order = jnp.argsort(flat, axis=1, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[jnp.arange(flat.shape[0])[:, None], order]
    rank = rank.set(jnp.arange(flat.shape[1], dtype=jnp.int32)[None, :], unique_indices=True)
    return jnp.moveaxis(rank.reshape(rows.shape), -1, 1)


def _run(method: R.Method, args: dict[str, Any]) -> Any:
    """``R.merge`` with a public function's arguments (its ``locals()``)."""
    args = dict(args)
    return R.merge(method, args.pop("base"), args.pop("experts"), None, **args)


def _static(name: str, value: Any) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python float (mark it static under jit)")
    return float(value)


# --------------------------------------------------------------------------- Breadcrumbs


def breadcrumbs(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    gamma: float = 0.01,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    l1_rescale: bool = False,
) -> Any:
    """Model Breadcrumbs: drop each task vector's largest outliers and smallest entries.

    Per tensor of ``N`` entries, ``Δ_τ = w_τ − w0`` is ranked by ``|Δ|`` (equal magnitudes:
    the lower flat index ranks higher). With ``n_keep = int(density · N)``, ``n_top =
    int(gamma · N)`` and ``n_bot = max(0, N − n_keep − n_top)``, the entries of ascending
    rank ``n_bot … n_bot + n_keep − 1`` are kept: the ``n_top`` largest are dropped (fewer
    when needed to keep ``n_keep``; no ``max(1, ·)`` as in TIES), the rest set to 0; at
    ``density ≥ 1`` nothing is. Difference from mergekit: when ``int(gamma · N) = 0``
    (``gamma = 0``, or the default 0.01 on a tensor under 100 entries) mergekit's slice
    ``[n_bot:-0]`` is empty and drops the whole task vector of that tensor; here nothing
    is dropped from the top and ``n_keep`` entries are kept. ``l1_rescale`` rescales the
    kept vector to the L1 norm of ``Δ_τ`` (skipped when either is below 1e-7). Result
    ``w0 + scaling · Σ_τ weight_τ Δ̃_τ``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: fraction in (0, 1] kept, or one per expert.
      gamma: fraction in [0, 1] of the largest magnitudes dropped (static).
      scaling: factor on the merged task vector (mergekit's ``lambda``).
      weights: one weight per expert (default 1.0 each).
      l1_rescale: mergekit's ``rescale: true``.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(5)}
      >>> experts = [{"w": jnp.array([5., -1., 2., 0.5, -3.])}]
      >>> merging.breadcrumbs(base, experts, density=0.4, gamma=0.2)["w"].tolist()
      [0.0, 0.0, 2.0, 0.0, -3.0]

    References:
      Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
      Masks", arXiv:2312.06795; mergekit ``breadcrumbs``.
    """
    return _run(BREADCRUMBS, locals())


def breadcrumbs_ties(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    gamma: float = 0.01,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    l1_rescale: bool = False,
    normalize: bool = False,
) -> Any:
    """Model Breadcrumbs, then TIES's sign consensus (mergekit's ``breadcrumbs_ties``).

    Task vectors are sparsified as in :func:`breadcrumbs`; ``vote = sign(Σ_τ weight_τ Δ̃_τ)``
    (0 votes +1); entries whose ``sign(weight_τ Δ̃_τ)`` equals the vote are summed (zeros
    never do), divided by their summed weights (0 → 1) only with ``normalize`` (mergekit's
    default: false, unlike ``ties``). Result ``w0 + scaling · merged``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: fraction in (0, 1] kept, or one per expert.
      gamma: fraction in [0, 1] of the largest magnitudes dropped (static).
      scaling: factor on the merged task vector.
      weights: one weight per expert (default 1.0 each).
      l1_rescale: mergekit's ``rescale: true``.
      normalize: divide by the summed weights of the agreeing experts.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., -1.])}, {"w": jnp.array([2., 3.])}]
      >>> merging.breadcrumbs_ties(base, experts, density=1.0)["w"].tolist()
      [3.0, 3.0]

    References:
      Davari & Belilovsky, arXiv:2312.06795; TIES, arXiv:2306.01708; mergekit
      ``breadcrumbs_ties``.
    """
    return _run(BREADCRUMBS_TIES, locals())


@jax.jit
def _window(base: jax.Array, w: jax.Array, lo: Any, hi: Any) -> jax.Array:
    """Keeps the entries of descending ``|w − base|`` rank in ``[lo, hi)``."""
    dt = B._compute_dtype(base)
    mag = jnp.abs(w.astype(dt) - base.astype(dt))
    return _top(mag, hi) & ~_top(mag, lo)


def _breadcrumbs_kernel(consensus: bool):
    def kernel(opts, b, ws, masks, scores, extras):
        gamma, n, masks = _static("gamma", opts["gamma"]), b.size, []
        for w, d in zip(ws, opts["density"], strict=True):
            if d >= 1:  # mergekit returns the task vector unchanged
                masks.append(jnp.ones(b.shape, bool))
                continue
            n_keep, n_top = int(d * n), int(gamma * n)
            hi = n - max(0, n - n_keep - n_top)
            masks.append(_window(b, w, hi - n_keep, hi))
        rescale = B._L1 if opts["l1_rescale"] else B._NO_RESCALE
        normalize = opts.get("normalize", False)
        return B._gta(b, ws, masks, opts["weights"], opts["scaling"], opts["density"],
                    rescale, consensus, normalize)  # fmt: skip

    return kernel


# --------------------------------------------------------------------------- DELLA


def della(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    key: jax.Array,
    epsilon: float = 0.15,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    rescale: bool = True,
    l1_rescale: bool = False,
    normalize: bool = True,
    layout: str = "in_out",
) -> Any:
    """DELLA: magnitude-ranked random drop (MagPrune), rescale, then TIES's sign consensus.

    ``Δ_τ = w_τ − w0`` is ranked by ``|Δ|`` among the weights into each output unit, in
    ascending order, equal magnitudes by index: ranks ``r = 0 … m − 1`` over the ``m``
    inputs. That is along axis ``-2`` of a Flax kernel (``layout="in_out"``, ``(..., d_in,
    d_out)``) and along axis 1 of a PyTorch weight (``layout="out_in"``, ``(d_out, d_in,
    ...)``, mergekit's ranking); a vector is ranked whole. Entry ``i`` is kept with probability
    ``p_i = density − ε + 2ε · r_i / (m − 1)`` (``density`` if ``m = 1``, where mergekit
    raises): where ``u_i < p_i``, ``u = uniform(leaf_key, shape, float32)``, ``leaf_key =
    fold_in(fold_in(key, expert_index), crc32(keystr(leaf path)))`` as in :func:`dare`.
    Kept entries are divided by ``p_i`` (``rescale``, the paper), or the kept vector is
    rescaled to the L1 norm of ``Δ_τ`` (``l1_rescale``, mergekit ≥ 0.1's ``rescale: true``;
    takes precedence). At ``density ≥ 1`` nothing is dropped. Then as :func:`dare_ties`:
    ``vote = sign(Σ_τ weight_τ Δ̃_τ)``, agreeing entries summed, divided by their summed
    weights with ``normalize`` (mergekit's default: true); ``w0 + scaling · merged``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: mean keep probability in (0, 1], or one per expert.
      key: a JAX PRNG key.
      epsilon: ``ε ≥ 0``, half the spread of the keep probabilities; each ``density < 1``
        needs ``density ± ε`` in (0, 1).
      scaling: factor on the merged task vector (mergekit's ``lambda``).
      weights: one weight per expert (default 1.0 each).
      rescale: divide kept entries by their keep probability.
      l1_rescale: rescale to the unmasked L1 norm instead (mergekit ≥ 0.1).
      normalize: divide by the summed weights of the agreeing experts.
      layout: ``"in_out"`` (Flax/JAX kernels) or ``"out_in"`` (PyTorch / safetensors
        weights, as mergekit ranks them).

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options (``density ± ε`` outside (0, 1));
        messages name the leaf path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., -1.])}, {"w": jnp.array([2., 3.])}]
      >>> merging.della(base, experts, density=1.0, key=jax.random.key(0))["w"].tolist()
      [1.5, 3.0]

    References:
      Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
      Magnitude-Based Sampling", arXiv:2406.11617; mergekit ``della``.
    """
    return _run(DELLA, locals())


def della_linear(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    key: jax.Array,
    epsilon: float = 0.15,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    rescale: bool = True,
    l1_rescale: bool = False,
    layout: str = "in_out",
) -> Any:
    """DELLA's MagPrune and rescale, then task arithmetic (mergekit's ``della_linear``).

    Task vectors are dropped and rescaled as in :func:`della` (the same probabilities and
    draws), then ``w0 + scaling · Σ_τ weight_τ Δ̃_τ`` (mergekit's ``normalize: false``).

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: mean keep probability in (0, 1], or one per expert.
      key: a JAX PRNG key.
      epsilon: ``ε ≥ 0``; each ``density < 1`` needs ``density ± ε`` in (0, 1).
      scaling: factor on the merged task vector.
      weights: one weight per expert (default 1.0 each).
      rescale: divide kept entries by their keep probability.
      l1_rescale: rescale to the unmasked L1 norm instead (mergekit ≥ 0.1).
      layout: ``"in_out"`` (Flax/JAX kernels) or ``"out_in"`` (PyTorch / safetensors
        weights, as mergekit ranks them).

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base, expert = {"w": jnp.zeros(1000)}, {"w": jnp.ones(1000)}
      >>> out = merging.della_linear(base, [expert], density=0.5, key=jax.random.key(0),
      ...                            l1_rescale=True)
      >>> round(float(out["w"].sum()), 3)
      1000.0

    References:
      Deep et al., arXiv:2406.11617; mergekit ``della_linear``.
    """
    return _run(DELLA_LINEAR, locals())


@functools.partial(jax.jit, static_argnames="layout")
def _magprune(base, w, key, low, spread, layout):
    """DELLA's keep mask and probabilities ``low + spread · r / (m − 1)`` (one leaf)."""
    dt = B._compute_dtype(base)
    mag = jnp.abs(w.astype(dt) - base.astype(dt))
    if mag.ndim < 2:
        rows = mag.reshape(1, -1)
    else:  # the inputs of each output unit along axis 1
        rows = mag if layout == "out_in" else jnp.moveaxis(mag, -2, 1)
    m = rows.shape[1]
    norm = _ranks(rows).astype(dt) / (m - 1) if m > 1 else jnp.full(rows.shape, 0.5, dt)
    if mag.ndim >= 2 and layout == "in_out":
        norm = jnp.moveaxis(norm, 1, -2)
    p = (low + norm * spread).reshape(base.shape).astype(dt)
    return jax.random.uniform(key, base.shape, jnp.float32) < p, p


def _della_check(call: R.Call) -> None:
    """Checks ``density ± ε`` in (0, 1) and hands each leaf's keys to the kernel."""
    opts = call.options
    eps = opts["epsilon"]
    for i, d in enumerate(opts["density"]):
        if not isinstance(eps, jax.core.Tracer) and d < 1 and not (d - eps > 0 and d + eps < 1):
            raise ValueError(
                "epsilon must be chosen such that density ± epsilon lies in (0, 1); got "
                f"density {d} (expert {i}) and epsilon {eps}"
            )
    # The registry's only per-leaf random step is the Bernoulli one: the kernel gets each
    # expert's key for its leaf as the call's (otherwise unused) extras.
    keys = [jax.random.fold_in(opts["key"], t) for t in range(len(call.prepared.experts))]
    call.extras = [[jax.random.fold_in(k, V.leaf_seed(p)) for p in call.prepared.paths]
                   for k in keys]  # fmt: skip


def _della_kernel(consensus: bool):
    def kernel(opts, b, ws, masks, scores, keys):
        masks, probs, eps = [], [], opts["epsilon"]
        for w, d, k in zip(ws, opts["density"], keys, strict=True):
            m, p = (
                (jnp.ones(b.shape, bool), 1.0)
                if d >= 1
                else _magprune(b, w, k, d - eps, 2 * eps, opts["layout"])
            )
            masks.append(m)
            probs.append(p)
        normalize = opts.get("normalize", False)
        return B._gta(b, ws, masks, opts["weights"], opts["scaling"], probs,
                    B._dare_rescale(opts), consensus, normalize)  # fmt: skip

    return kernel


# --------------------------------------------------------------------------- SCE


def sce(
    base: Any, experts: Sequence[Any], *, select_topk: float = 1.0, scaling: float = 1.0
) -> Any:
    """SCE: select by variance, calculate weights, erase minority signs (mergekit's ``sce``).

    Per tensor, with ``Δ_τ = w_τ − w0``:

    1. Select (``select_topk < 1``): ``v = Var_τ(Δ_τ)`` (population variance over the
       experts); the ``k = ⌊n_nz · select_topk⌋`` entries of largest ``v`` (``n_nz``: the
       nonzero ``v``; the product in float32 as in mergekit; equal ``v``: lower index) are
       kept in every ``Δ_τ``, the others set to 0.
    2. Calculate: ``c_τ = mean(Δ_τ²)`` over the tensor, divided by ``Σ c`` (``1/K`` each
       when ``|Σ c| < 1e-6``, which small task vectors fall under).
    3. Erase: ``m_τ = [sign(Δ_τ) = vote]``, ``vote = sign(Σ_τ Δ_τ)`` (0 votes +1).
    4. ``w0 + scaling · Σ_τ c_τ m_τ Δ_τ / max(Σ_τ c_τ m_τ, 1e-6)``.

    mergekit's ``sce`` takes no model weights, densities or ``lambda`` (``scaling = 1``).

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      select_topk: fraction in [0, 1] of the nonzero-variance entries kept (1: all).
      scaling: factor on the merged task vector.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., -1.])}, {"w": jnp.array([3., 1.])}]
      >>> [round(x, 4) for x in merging.sce(base, experts)["w"].tolist()]  # c = 1/6, 5/6
      [2.6667, 1.0]

    References:
      Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (SCE), arXiv:2408.07990;
      mergekit ``sce``.
    """
    return _run(SCE, locals())


@jax.jit
def _sce_leaf(base, ws, select_topk, scaling):
    dt = B._compute_dtype(base)
    b = base.astype(dt)
    tv = jnp.stack([w.astype(dt) - b for w in ws])
    var = jnp.var(tv, axis=0)
    nonzero = jnp.count_nonzero(var).astype(jnp.float32)
    k = jnp.floor(nonzero * jnp.asarray(select_topk, jnp.float32)).astype(jnp.int32)
    tv = jnp.where(jnp.where(select_topk < 1, _top(var, k), True), tv, 0)
    erase = jnp.sign(tv) == jnp.where(jnp.sum(tv, axis=0) >= 0, 1, -1)
    c = jnp.mean(tv.reshape(len(ws), -1) ** 2, axis=1)
    small = jnp.abs(jnp.sum(c)) < 1e-6
    c = jnp.where(small, 1.0 / len(ws), c / jnp.where(small, 1, jnp.sum(c)))
    c = jnp.where(erase, c.reshape((-1,) + (1,) * base.ndim), 0)
    merged = jnp.sum(tv * c, axis=0) / jnp.maximum(jnp.sum(c, axis=0), 1e-6)
    return (b + scaling * merged).astype(base.dtype)


# --------------------------------------------------------------------------- RAM


def ram(base: Any, experts: Sequence[Any], *, epsilon: float = 1e-5, scaling: float = 1.0) -> Any:
    """RAM: entries one expert changes are kept, those several change averaged.

    Per entry, the experts with ``|Δ_τ| > ε`` contribute: one contributor's ``Δ_τ`` is
    taken as it is, several contributors' are averaged, none gives 0 (mergekit's ``ram``).
    Result ``w0 + scaling · merged`` (mergekit has no ``lambda``: ``scaling = 1``).

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      epsilon: ``ε ≥ 0``, the magnitude a change must exceed to count.
      scaling: factor on the merged task vector.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., 2., 0.])}, {"w": jnp.array([0., 4., 0.])}]
      >>> merging.ram(base, experts)["w"].tolist()
      [1.0, 3.0, 0.0]

    References:
      "Reinforced Agent Merging" (RAM), arXiv:2601.13572; mergekit ``ram``.
    """
    return _run(RAM, locals())


def ramplus_tl(
    base: Any,
    experts: Sequence[Any],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    scaling: float = 1.0,
) -> Any:
    """RAM+ (tensor-local): :func:`ram` with each expert's unique entries amplified.

    Per tensor, expert ``τ``'s entries with ``|Δ_τ| > ε`` are counted where it is the only
    such expert (``u_τ``) and where others are too (``s_τ``); its unique entries are
    multiplied by ``λ_τ = 1 + r · clip(s_τ / max(u_τ, ε), 0, α)``, shared entries averaged
    as in :func:`ram` (mergekit's ``ramplus_tl``). Result ``w0 + scaling · merged``.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      r: gain of the amplification.
      alpha: the cap ``α`` on the overlap ratio.
      epsilon: ``ε ≥ 0``, the magnitude a change must exceed to count.
      scaling: factor on the merged task vector.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., 2., 0.])}, {"w": jnp.array([0., 4., 0.])}]
      >>> [round(x, 4) for x in merging.ramplus_tl(base, experts, r=0.5)["w"].tolist()]
      [1.1, 3.0, 0.0]

    References:
      "Reinforced Agent Merging" (RAM+), arXiv:2601.13572; mergekit ``ramplus_tl``.
    """
    return _run(RAMPLUS_TL, locals())


@jax.jit
def _ram_leaf(base, ws, epsilon, r, alpha, plus, scaling):
    dt = B._compute_dtype(base)
    b = base.astype(dt)
    tv = jnp.stack([w.astype(dt) - b for w in ws])
    counted = jnp.abs(tv) > epsilon
    count = jnp.sum(counted, axis=0)
    unique, shared = counted & (count == 1), counted & (count > 1)
    u = jnp.sum(unique.reshape(len(ws), -1), axis=1).astype(dt)
    s = jnp.sum(shared.reshape(len(ws), -1), axis=1).astype(dt)
    gain = jnp.where(plus, 1 + r * jnp.clip(s / jnp.maximum(u, epsilon), 0, alpha), 1)
    gain = gain.reshape((-1,) + (1,) * base.ndim)
    mixed = jnp.where(unique, tv * gain, 0) + jnp.where(shared, tv / jnp.maximum(count, 1), 0)
    return (b + scaling * jnp.sum(mixed, axis=0)).astype(base.dtype)


# --------------------------------------------------------------------------- registry


def _register(name, fn, summary, params, kernel, check=None) -> R.Method:
    return R.register(R.Method(name, fn, summary, tuple(params), kernel, check=check))


def _check_gamma(call: R.Call) -> None:
    _static("gamma", call.options["gamma"])


_GAMMA = Param("gamma", "number", "fraction of the largest |Δ| dropped", low=0.0, high=1.0)
_NORMALIZE = Param("normalize", "bool", "divide by the summed weights of agreeing experts")
_BC = (DENSITY, _GAMMA, SCALING, WEIGHTS, B._L1_RESCALE)
_DELLA = (
    DENSITY,
    B._KEY,
    Param("epsilon", "number", "half the spread of the keep probabilities", low=0.0),
    SCALING,
    WEIGHTS,
    Param("rescale", "bool", "divide kept entries by their keep probability"),
    B._L1_RESCALE,
)
_DELLA_LAYOUT = (R.LAYOUT,)
_RAM_EPSILON = Param("epsilon", "number", "magnitude a change must exceed to count", low=0.0)

BREADCRUMBS = _register(
    "breadcrumbs", breadcrumbs, "keep the density of |Δ| below the top gamma, then sum",
    _BC, _breadcrumbs_kernel(False), _check_gamma,
)  # fmt: skip
BREADCRUMBS_TIES = _register(
    "breadcrumbs_ties", breadcrumbs_ties, "Model Breadcrumbs' drop, then TIES's sign consensus",
    (*_BC, _NORMALIZE), _breadcrumbs_kernel(True), _check_gamma,
)  # fmt: skip
DELLA = _register(
    "della", della, "random drop, keep probabilities ranked by |Δ|, rescale, sign consensus",
    (*_DELLA, _NORMALIZE, *_DELLA_LAYOUT), _della_kernel(True), _della_check,
)  # fmt: skip
DELLA_LINEAR = _register(
    "della_linear", della_linear, "DELLA's random drop and rescale, then task arithmetic",
    (*_DELLA, *_DELLA_LAYOUT), _della_kernel(False), _della_check,
)  # fmt: skip
SCE = _register(
    "sce", sce, "keep top-variance entries, weight experts by mean Δ², erase minority signs",
    (Param("select_topk", "number", "fraction kept by variance", low=0.0, high=1.0), SCALING),
    lambda opts, b, ws, *_: _sce_leaf(b, ws, opts["select_topk"], opts["scaling"]),
)  # fmt: skip
RAM = _register(
    "ram", ram, "entries one expert changes kept, entries several change averaged",
    (_RAM_EPSILON, SCALING),
    lambda opts, b, ws, *_: _ram_leaf(b, ws, opts["epsilon"], 0.0, 0.0, False, opts["scaling"]),
)  # fmt: skip
RAMPLUS_TL = _register(
    "ramplus_tl", ramplus_tl, "RAM, each expert's unique entries scaled up by its overlap",
    (Param("r", "number", "gain on unique entries"),
     Param("alpha", "number", "cap on the overlap ratio"), _RAM_EPSILON, SCALING),
    lambda o, b, ws, *_: _ram_leaf(b, ws, o["epsilon"], o["r"], o["alpha"], True, o["scaling"]),
)  # fmt: skip
