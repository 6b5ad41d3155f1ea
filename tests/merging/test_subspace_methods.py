"""TSV-Merge, Iso-C and Iso-CTS against float64 NumPy references written here (whitening
by an eigendecomposition, not the implementation's SVD polar factor), their defining
properties, degenerate inputs, jit, validation and the out-of-core engine."""

from __future__ import annotations

from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from tests.compilations import compilations
from umtam_jax import checkpoint, engine, merging

SHAPES = {"bias": (5,), "kernel": (6, 5), "wide": (3, 4), "stack": (2, 6, 5), "scale": ()}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _random(rng, k, dtype=np.float64):
    base = {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}
    experts = [
        {n: (x + 0.1 * rng.standard_normal(x.shape)).astype(dtype) for n, x in base.items()}
        for _ in range(k)
    ]
    return base, experts


# ------------------------------------------------------------------ float64 references


def _whiten(x):
    """``x (xᵀx)^{-1/2}`` (pseudo-inverse square root) by an eigendecomposition."""
    lam, q = np.linalg.eigh(x.T @ x)
    keep = lam > 1e-10 * lam.max()
    inv = np.where(keep, 1 / np.sqrt(np.where(keep, lam, 1)), 0)
    return x @ (q * inv) @ q.T


def _per_matrix(fn):
    """A reference on matrices, applied per matrix of a stack; other leaves: the mean."""

    def leaf(base, ws, scaling=1.0, **kw):
        deltas = [np.asarray(w, np.float64) - np.asarray(base, np.float64) for w in ws]
        if np.ndim(base) < 2:
            return base + scaling * sum(deltas) / len(deltas)
        shape = np.shape(base)
        stacks = [d.reshape(-1, *shape[-2:]) for d in deltas]
        out = np.stack([fn([s[i] for s in stacks], **kw) for i in range(stacks[0].shape[0])])
        return base + scaling * out.reshape(shape)

    return leaf


@_per_matrix
def ref_tsv(deltas, rank_fraction=1.0):
    t, r = len(deltas), min(deltas[0].shape)
    k = max(1, int(r * Fraction(str(rank_fraction)) // t))  # the decimal fraction, exactly
    svds = [np.linalg.svd(d, full_matrices=False) for d in deltas]
    u = np.concatenate([u[:, :k] for u, _, _ in svds], 1)
    s = np.concatenate([s[:k] for _, s, _ in svds])
    v = np.concatenate([vh[:k].T for _, _, vh in svds], 1)
    return _whiten(u) @ np.diag(s) @ _whiten(v).T


@_per_matrix
def ref_iso_c(deltas):
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    return s.mean() * u @ vh


@_per_matrix
def ref_iso_cts(deltas, common_space_fraction=0.8, layout="in_out"):
    if layout == "in_out":  # the paper's (out, in) orientation
        deltas = [d.T for d in deltas]
    t, r = len(deltas), min(deltas[0].shape)
    common = int(r * common_space_fraction)
    specific = round((r - common) / t) * t
    specific = specific - t if specific > r else specific
    c, per = r - specific, specific // t
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c].T]
    for d in deltas:
        ut, st, vht = np.linalg.svd(d - u[:, :c] @ u[:, :c].T @ d, full_matrices=False)
        us.append(ut[:, :per]), ss.append(st[:per]), vs.append(vht[:per].T)
    sigma = np.concatenate(ss).mean()
    out = sigma * _whiten(np.concatenate(us, 1)) @ _whiten(np.concatenate(vs, 1)).T
    return out.T if layout == "in_out" else out


REFS = {"tsv_merge": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}
CASES = [
    ("tsv_merge", 3, {}),
    ("tsv_merge", 2, {"scaling": 0.7, "rank_fraction": 0.5}),
    ("iso_c", 3, {"scaling": 1.5}),
    ("iso_cts", 3, {}),
    ("iso_cts", 3, {"common_space_fraction": 0.4, "scaling": 1.3}),  # c = 0 at (3, 4)
    ("iso_cts", 2, {"common_space_fraction": 0.0}),  # FusionBench's c < 0 clamped
    ("iso_cts", 3, {"common_space_fraction": 0.4, "layout": "out_in"}),
]


def _reference(name, base, experts, kwargs):
    return {n: REFS[name](base[n], [e[n] for e in experts], **kwargs) for n in base}


def _assert_close(got, want, rtol, atol):
    for n in want:
        np.testing.assert_allclose(np.asarray(got[n]), want[n], rtol=rtol, atol=atol, err_msg=n)


def test_tsv_rank_fraction_counts_as_written(x64):
    """``k = ⌊r · rank_fraction / T⌋`` with the decimal fraction: r = 10, T = 3 and
    ``rank_fraction=0.6`` keep 2 directions per task (``10 * (0.6 / 3)`` is 1.999…), so
    the merged task vector has rank 6, as the float64 reference."""
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((10, 12))}
    experts = [{"w": base["w"] + rng.standard_normal((10, 12))} for _ in range(3)]
    got = np.asarray(merging.tsv_merge(base, experts, rank_fraction=0.6)["w"]) - base["w"]
    assert np.linalg.matrix_rank(got) == 6
    want = ref_tsv(base["w"], [e["w"] for e in experts], rank_fraction=0.6) - base["w"]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,k,kwargs", CASES)
def test_matches_float64_reference(x64, name, k, kwargs):
    base, experts = _random(np.random.default_rng(k + len(kwargs)), k)
    got = getattr(merging, name)(base, experts, **kwargs)
    assert jax.tree.structure(got) == jax.tree.structure(base)
    _assert_close(got, _reference(name, base, experts, kwargs), 1e-9, 1e-10)
    by_name = merging.merge(name, base, experts, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, by_name, got)


FLOAT32 = [("tsv_merge", {}), ("iso_c", {}), ("iso_cts", {"common_space_fraction": 0.4})]


@pytest.mark.parametrize("name,kwargs", FLOAT32)
def test_float32_within_float32_tolerance(name, kwargs):
    base, experts = _random(np.random.default_rng(7), 2, np.float32)
    got = getattr(merging, name)(base, experts, **kwargs)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
    _assert_close(got, _reference(name, base, experts, kwargs), 1e-4, 2e-5)


@pytest.mark.parametrize("name", list(REFS))
def test_bfloat16_computed_in_float32_and_cast_back(name):
    base, experts = _random(np.random.default_rng(3), 2, np.float32)
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)  # noqa: E731
    got = getattr(merging, name)(cast(base), [cast(e) for e in experts])
    up = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)  # noqa: E731
    want = getattr(merging, name)(up(cast(base)), [up(cast(e)) for e in experts])
    for n in SHAPES:
        assert got[n].dtype == jnp.bfloat16
        np.testing.assert_array_equal(got[n], jnp.asarray(want[n], jnp.bfloat16), err_msg=n)


# ------------------------------------------------------------------ properties


def test_tsv_one_full_rank_expert_is_task_arithmetic(x64):
    base, experts = _random(np.random.default_rng(0), 1)
    got = merging.tsv_merge(base, experts, scaling=0.6)
    want = merging.task_arithmetic(base, experts, scaling=0.6)
    _assert_close(got, {n: np.asarray(x) for n, x in want.items()}, 1e-10, 1e-12)


def _orthogonal(rng, n):
    return np.linalg.qr(rng.standard_normal((n, n)))[0]


def test_tsv_merges_tasks_with_disjoint_singular_subspaces_as_their_sum():
    rng = np.random.default_rng(1)
    u, v = _orthogonal(rng, 8), _orthogonal(rng, 6)
    tasks = [  # rank 2 each (below k = 3: the third triplet is zero and dropped)
        u[:, 2 * t : 2 * t + 2] @ np.diag(rng.uniform(0.5, 2, 2)) @ v[:, 2 * t : 2 * t + 2].T
        for t in range(2)
    ]
    base = {"w": rng.standard_normal((8, 6)).astype(np.float32)}
    experts = [{"w": (base["w"] + d).astype(np.float32)} for d in tasks]
    got = merging.tsv_merge(base, experts)["w"]
    want = merging.task_arithmetic(base, experts)["w"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_iso_c_flattens_the_spectrum_of_every_matrix():
    base, experts = _random(np.random.default_rng(2), 2, np.float32)
    got = merging.iso_c(base, experts)
    for n in ("kernel", "wide", "stack"):
        delta = np.asarray(got[n], np.float64) - base[n]
        total = sum(e[n].astype(np.float64) - base[n] for e in experts)
        s = np.linalg.svd(delta.reshape(-1, *delta.shape[-2:]), compute_uv=False)
        mean = np.linalg.svd(total.reshape(s.shape[0], *delta.shape[-2:]), compute_uv=False)
        np.testing.assert_allclose(s, np.broadcast_to(mean.mean(-1)[:, None], s.shape), 1e-4)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base, experts = _random(np.random.default_rng(4), 2, np.float32)
    got = merging.iso_cts(base, experts, common_space_fraction=1.0)
    want = merging.iso_c(base, experts)
    _assert_close(got, {n: np.asarray(x) for n, x in want.items()}, 1e-5, 1e-6)


@pytest.mark.parametrize("name", list(REFS))
def test_transposition(x64, name):
    base, experts = _random(np.random.default_rng(5), 3)
    tr = lambda t: {n: np.swapaxes(x, -1, -2) if x.ndim >= 2 else x for n, x in t.items()}  # noqa: E731
    kwargs = {"common_space_fraction": 0.4} if name == "iso_cts" else {}
    want = tr(getattr(merging, name)(base, experts, **kwargs))
    if name == "iso_cts":  # not invariant: the transposed layers need their layout
        other = merging.iso_cts(tr(base), [tr(e) for e in experts], **kwargs)
        assert not np.allclose(other["kernel"], want["kernel"], atol=1e-6)
        kwargs["layout"] = "out_in"
    got = getattr(merging, name)(tr(base), [tr(e) for e in experts], **kwargs)
    _assert_close(got, {n: np.asarray(x) for n, x in want.items()}, 1e-10, 1e-12)


@pytest.mark.parametrize("name", list(REFS))
def test_inputs_not_mutated_and_degenerate_inputs(name):
    base, experts = _random(np.random.default_rng(6), 2, np.float32)
    copies = jax.tree.map(np.copy, (base, experts))
    fn = getattr(merging, name)
    fn(base, experts)
    jax.tree.map(np.testing.assert_array_equal, (base, experts), copies)
    # Zero task vectors: the base; empty leaves pass through.
    same = fn(base, [base, base])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), same, base)
    empty = {"e": np.zeros((0, 3), np.float32), "f": np.zeros((2, 3, 0), np.float32)}
    assert jax.tree.map(np.shape, fn(empty, [empty])) == jax.tree.map(np.shape, empty)


def test_rank_deficient_inputs_are_deterministic():
    rng = np.random.default_rng(8)
    low = rng.standard_normal((6, 2)) @ rng.standard_normal((2, 5))  # rank 2 of 5
    base = {"w": np.zeros((6, 5), np.float32)}
    twins = [{"w": low.astype(np.float32)}] * 2
    # Identical tasks (k = 2 each): whitening merges the shared directions once.
    np.testing.assert_allclose(merging.tsv_merge(base, twins)["w"], low, atol=1e-5)
    # Iso-C keeps the sum's two directions, each with the mean of all five σ.
    s = np.linalg.svd(2 * low, compute_uv=False)
    got = np.linalg.svd(np.asarray(merging.iso_c(base, twins)["w"]), compute_uv=False)
    np.testing.assert_allclose(got, [s.mean()] * 2 + [0] * 3, atol=1e-5)


def test_iso_cts_keeps_no_direction_outside_the_tasks_span():
    """Three rank-2 task vectors: the merge spans their six directions and no more. Each
    task's residual after the common subspace is rounding noise of the common basis; with
    a cutoff at the residual's own scale those noise directions were kept at weight σ̄."""
    rng = np.random.default_rng(12)
    n = 48
    tasks = [rng.standard_normal((n, 2)) @ rng.standard_normal((2, n)) * 0.01 for _ in range(3)]
    base = {"w": np.zeros((n, n), np.float32)}
    merged = merging.iso_cts(base, [{"w": t.astype(np.float32)} for t in tasks])["w"]
    s = np.linalg.svd(np.asarray(merged, np.float64), compute_uv=False)
    assert int(np.sum(s > 1e-3 * s[0])) == 6, s[:8]


@pytest.mark.parametrize("name", ["tsv_merge", "iso_c", "iso_cts"])
def test_products_of_svd_factors_run_at_full_float32_precision(name):
    """GPU/TPU default float32 matmuls run as TF32/bf16 passes (~1e-3 relative error), far
    above the cutoffs that tell a direction from rounding noise."""
    base = {"w": jnp.zeros((8, 6))}
    experts = [{"w": jnp.ones((8, 6))}, {"w": -jnp.ones((8, 6))}]
    fn = getattr(merging, name)
    text = jax.jit(lambda b, e: fn(b, e)).lower(base, experts).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots and all("HIGHEST" in line for line in dots)


def test_small_but_resolved_singular_values_are_kept():
    """σ = 3e-5 beside sixty σ = 1 in a 64 × 64 float32 task vector is four times the
    SVD's resolution (64 · ε · σ₁ = 7.6e-6): kept. A cutoff scaled by ‖Δ‖_F (5.9e-5,
    √60 times larger) dropped those four directions of a full-rank input."""
    rng = np.random.default_rng(11)
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    s = np.array([1.0] * 60 + [3e-5] * 4)
    delta = (u * s) @ v.T
    base, expert = {"w": np.zeros((64, 64), np.float32)}, {"w": delta.astype(np.float32)}
    np.testing.assert_allclose(merging.tsv_merge(base, [expert])["w"], delta, atol=2e-6)
    # Iso-C of one task: every direction with the mean σ (of the float32 input). The small
    # directions' vectors are resolved to ~ε/3e-5 = 4e-3; dropping them moves entries by
    # up to ~0.05.
    u, s, vt = np.linalg.svd(expert["w"].astype(np.float64))
    want = s.mean() * u @ vt
    got = np.asarray(merging.iso_c(base, [expert])["w"])
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert np.abs(got - want).max() * 20 < np.abs(want - s[:60].mean() * u[:, :60] @ vt[:60]).max()


def test_jit_with_traced_scaling():
    base, experts = _random(np.random.default_rng(9), 2, np.float32)
    base = {n: base[n] for n in ("bias", "stack")}
    experts = [{n: e[n] for n in base} for e in experts]
    for name in REFS:
        fn = getattr(merging, name)
        jitted = jax.jit(lambda b, e, s, fn=fn: fn(b, e, scaling=s))  # noqa: B023
        _assert_close(
            jitted(base, experts, 0.5),
            {n: np.asarray(x) for n, x in fn(base, experts, scaling=0.5).items()},
            1e-5,
            1e-6,
        )
    with pytest.raises(TypeError, match="rank_fraction must be a Python number, not traced"):
        jax.jit(lambda f: merging.tsv_merge(base, experts, rank_fraction=f))(0.5)


def test_validation_names_the_parameter_or_leaf():
    base, experts = _random(np.random.default_rng(10), 2, np.float32)
    with pytest.raises(ValueError, match=r"rank_fraction must lie in \(0, 1\], got 0"):
        merging.tsv_merge(base, experts, rank_fraction=0)
    with pytest.raises(ValueError, match=r"rank_fraction must lie in \(0, 1\], got 1.5"):
        merging.tsv_merge(base, experts, rank_fraction=1.5)
    with pytest.raises(ValueError, match=r"common_space_fraction must lie in \[0, 1\]"):
        merging.iso_cts(base, experts, common_space_fraction=-0.1)
    with pytest.raises(ValueError, match="unknown layout='torch'; expected one of 'in_out'"):
        merging.iso_cts(base, experts, layout="torch")
    with pytest.raises(ValueError, match="scaling must be finite"):
        merging.iso_c(base, experts, scaling=float("inf"))
    bad = dict(experts[1], stack=np.zeros((2, 5, 6), np.float32))
    with pytest.raises(ValueError, match=r"shape mismatch at \['stack'\]"):
        merging.tsv_merge(base, [experts[0], bad])
    bad = dict(experts[1], kernel=np.full((6, 5), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\['kernel'\]"):
        merging.iso_c(base, [experts[0], bad])


def test_registered():
    tensor = {"scope": "tensor"}
    assert merging.METHODS["tsv_merge"].defaults() == {
        "scaling": 1.0,
        "rank_fraction": 1.0,
        **tensor,
    }
    assert merging.METHODS["iso_c"].defaults() == {"scaling": 1.0, **tensor}
    assert merging.METHODS["iso_cts"].defaults() == {
        "scaling": 1.0,
        "common_space_fraction": 0.8,
        "layout": "in_out",
        **tensor,
    }
    for name in REFS:
        assert merging.METHODS[name].fn is getattr(merging, name)
        assert name in merging.__all__
        assert merging.describe(merging.METHODS[name]).startswith(f"{name}: ")


# ------------------------------------------------------------------ out of core


def test_out_of_core_equals_in_memory(tmp_path):
    base, experts = _random(np.random.default_rng(11), 2, np.float32)
    base = {n: base[n] for n in ("bias", "stack", "scale")}
    experts = [{n: e[n] for n in base} for e in experts]
    checkpoint.save_checkpoint(str(tmp_path / "base"), base)
    dirs = []
    for i, e in enumerate(experts):
        dirs.append(str(tmp_path / f"e{i}"))
        checkpoint.save_checkpoint(dirs[-1], e)
    restored = checkpoint.restore_params(str(tmp_path / "base"))
    restored_experts = [checkpoint.restore_params(d) for d in dirs]
    scoped = ("iso_c", {"scope": umtam_jax.scanned("stack", axis=1)})  # per slice of axis 1
    for i, (name, kwargs) in enumerate([*FLOAT32, scoped]):
        out = tmp_path / f"out{i}"
        engine.merge_checkpoints(
            name, str(tmp_path / "base"), dirs, out, progress=False, group_bytes=100, **kwargs
        )
        got = checkpoint.restore_params(out)
        want = getattr(merging, name)(restored, restored_experts, **kwargs)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.asarray(x).dtype == np.asarray(y).dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("tsv_merge", {"rank_fraction": 0.6}),
        ("iso_c", {}),
        ("iso_cts", {"common_space_fraction": 0.5}),
    ],
)
def test_scanned_scope_merges_a_layer_axis_not_first_as_the_unrolled_model(x64, name, kwargs):
    """A ``[d_in, L, d_out]`` stack (MaxText's layer axis second) and its ``[d, L]`` bias:
    with ``scope=umtam_jax.scanned("blocks", axis=1)`` each layer is merged as its own
    matrix (by default the stack's last two axes, ``(L, d_out)``, would be the matrices)."""
    rng = np.random.default_rng(5)
    shapes = {"kernel": (6, 3, 5), "bias": (5, 3)}
    base = {"blocks": {n: rng.standard_normal(s) for n, s in shapes.items()}}
    experts = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape), base) for _ in range(3)]
    merge = getattr(merging, name)
    got = merge(base, experts, scope=umtam_jax.scanned("blocks", axis=1), **kwargs)
    for i in range(3):

        def layer(t, i=i):
            return jax.tree.map(lambda x: np.take(np.asarray(x), i, axis=1), t)

        alone = merge(layer(base), [layer(e) for e in experts], **kwargs)
        chex.assert_trees_all_close(layer(got), alone, rtol=1e-10, atol=1e-12)
    per_stack = merge(base, experts, **kwargs)["blocks"]["kernel"]
    assert not np.allclose(per_stack, got["blocks"]["kernel"])


@pytest.mark.parametrize(
    "merge, option, values",
    [
        (merging.tsv_merge, "rank_fraction", (0.7, 0.72, 0.74)),  # 1 direction per task
        (merging.iso_cts, "common_space_fraction", (0.8, 0.82, 0.84)),  # one split
    ],
)
def test_fractions_of_one_rank_share_a_compilation(caplog, merge, option, values):
    """The compiled kernel takes the ranks a fraction gives, not the fraction: a sweep
    over fractions giving the same ranks compiles once."""
    base = {"w": jnp.zeros((4, 3))}
    experts = [{"w": jnp.sin(jnp.arange(12.0) + i).reshape(4, 3)} for i in range(2)]
    first = merge(base, experts, **{option: values[0]})
    with compilations(caplog) as compiled:
        for value in values[1:]:
            again = merge(base, experts, **{option: value})
            chex.assert_trees_all_equal(again, first)
    assert compiled == [], compiled[:3]


@pytest.mark.parametrize("name,k,kwargs", CASES)
def test_flax_attention_kernels_are_merged_as_their_projection_matrices(x64, name, k, kwargs):
    """``nnx.MultiHeadAttention``'s ``query`` kernel ``(in, heads, head_dim)`` is the
    matrix ``(in, heads·head_dim)`` and its ``out`` kernel ``(heads, head_dim, out)`` the
    matrix ``(heads·head_dim, out)``, as FusionBench decomposes ``q_proj``/``o_proj``;
    per layer of a scanned stack of them with a scanned scope."""
    rng = np.random.default_rng(11)
    shapes = {"query": ((6, 2, 3), (6, 6)), "out": ((2, 3, 6), (6, 6))}
    base = {"attn": {n: {"kernel": rng.standard_normal(s)} for n, (s, _) in shapes.items()}}
    base["attn"]["query"]["bias"] = rng.standard_normal((2, 3))  # (heads, head_dim)
    experts = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape), base) for _ in range(k)]
    merge = getattr(merging, name)
    got = merge(base, experts, **kwargs)
    b0 = base["attn"]["query"]["bias"]
    mean = sum(e["attn"]["query"]["bias"] - b0 for e in experts) / k  # a vector: the mean
    np.testing.assert_allclose(
        got["attn"]["query"]["bias"], b0 + kwargs.get("scaling", 1.0) * mean, rtol=1e-12
    )
    for n, (shape, matrix) in shapes.items():
        ws = [e["attn"][n]["kernel"].reshape(matrix) for e in experts]
        want = REFS[name](base["attn"][n]["kernel"].reshape(matrix), ws, **kwargs)
        np.testing.assert_allclose(
            got["attn"][n]["kernel"], want.reshape(shape), rtol=1e-9, atol=1e-10, err_msg=n
        )
    stacked = [jax.tree.map(lambda *xs: np.stack(xs), t, t) for t in (base, *experts)]
    layers = merge(stacked[0], stacked[1:], scope=umtam_jax.scanned("attn"), **kwargs)
    for i in range(2):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], layers), got, rtol=1e-10, atol=1e-12
        )


def test_a_stacked_kernel_named_out_is_merged_per_layer():
    """``(L, in, out)`` under ``out`` with ``L · in ≠ out`` is a stack (an ``nn.scan``-ned
    Dense), merged per layer as other stacks, not as one attention matrix."""
    rng = np.random.default_rng(16)
    base = {"blocks": {"out": {"kernel": rng.standard_normal((3, 4, 5)).astype("f4")}}}
    experts = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype("f4"), base)]
    experts.append(jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype("f4"), base))
    got = merging.iso_c(base, experts)["blocks"]["out"]["kernel"]
    for i in range(3):
        alone = merging.iso_c(
            {"w": base["blocks"]["out"]["kernel"][i]},
            [{"w": e["blocks"]["out"]["kernel"][i]} for e in experts],
        )["w"]
        np.testing.assert_allclose(got[i], alone, rtol=1e-6, atol=1e-6)
