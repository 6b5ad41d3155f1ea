"""Out-of-core merging (``engine.merge_checkpoints``) equals the in-memory methods: tensor,
layer, global and scanned scopes, global top-k with many ties and float64 keys, bare
array parameters, the CLI's streaming and in-memory paths, options checked once per
merge; and the reader, streaming writer and histogram it builds on."""

from __future__ import annotations

import weakref

import jax
import numpy as np
import pytest

import umtam_jax
from tests import trees
from tests.merging import helpers as H
from tests.merging.streaming_helpers import _experts, _quantized, make_ckpts
from umtam_jax import checkpoint, engine, merging
from umtam_jax.engine import _global_topk


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_ckpts(tmp_path_factory)


CASES = [
    ("task_arithmetic", None, {"scaling": 0.5, "weights": [1.0, 2.0, 0.5]}),
    ("ties", None, {"density": [0.3, 0.6, 0.2], "weights": [1.0, 2.0, 0.5]}),
    ("dare", None, {"density": 0.5, "key": jax.random.key(3)}),
    (
        "dare_ties",
        None,
        {"density": 0.6, "key": jax.random.key(1), "normalize": True, "l1_rescale": True},
    ),
    ("fisher", "fishers", {"weights": [1.0, 0.5, 2.0]}),
    ("ota", "stats", {"power": 1.0}),
    ("umtam", "stats", {"density": 0.3, "normalize": "selected"}),
    ("umtam", "stats", {"density": [0.2, 0.5, 0.9], "sign_election": False}),
]


@pytest.mark.parametrize("method,extra,kwargs", CASES)
def test_tensor_scope_equals_in_memory(ckpts, tmp_path, method, extra, kwargs):
    p = ckpts["paths"]
    out = tmp_path / "out"
    fisher_dirs = _experts(p, "f") if extra == "fishers" else None
    engine.merge_checkpoints(
        method,
        p["base"],
        _experts(p),
        out,
        fisher_dirs=fisher_dirs,
        progress=False,
        group_bytes=100,
        **kwargs,
    )
    fn = getattr(merging, method)
    if extra is None:
        want = fn(ckpts["base"], ckpts["experts"], **kwargs)
    else:
        want = fn(ckpts["base"], ckpts["experts"], ckpts[extra], **kwargs)
    trees.assert_trees_equal(checkpoint.restore_params(out), want)
    meta = checkpoint.read_metadata(out)
    assert meta["user"]["merge"]["method"] == method
    assert meta["items"] == ["params"]


@pytest.mark.parametrize("statistics", [True, False])
@pytest.mark.parametrize(
    "scope",
    ["tensor", "layer", "global", pytest.param(umtam_jax.scanned("conv", axis=2), id="scanned")],
)
def test_prune_equals_in_memory(ckpts, tmp_path, statistics, scope):
    p = ckpts["paths"]
    out = tmp_path / "out"
    engine.merge_checkpoints(
        "prune",
        p["base"],
        [p["e1"]],
        out,
        statistics=statistics,
        density=0.3,
        scope=scope,
        progress=False,
    )
    scores = ckpts["stats"][1] if statistics else None
    want = merging.prune(ckpts["base"], ckpts["experts"][1], scores, density=0.3, scope=scope)
    trees.assert_trees_equal(checkpoint.restore_params(out), want)
    recorded = checkpoint.read_metadata(out)["user"]["merge"]["parameters"]["scope"]
    assert recorded == (scope if isinstance(scope, str) else "scanned('conv', batch=1, axis=2)")


@pytest.mark.parametrize("group_bytes", [1, 10**9])
@pytest.mark.parametrize("density", [0.05, 0.37, 1.0])
def test_global_ties_exact_with_many_ties(ckpts, tmp_path, group_bytes, density):
    # Task vectors in {0, ±0.5, ±1}: the threshold falls inside groups of equal scores
    # spanning several leaves, so the lower-flat-index rule decides what is kept.
    p = ckpts["paths"]
    out = tmp_path / "out"
    engine.merge_checkpoints(
        "ties",
        p["base"],
        _experts(p, "t"),
        out,
        density=density,
        scope="global",
        group_bytes=group_bytes,
        progress=False,
    )
    want = merging.ties(ckpts["base"], ckpts["tied"], density=density, scope="global")
    trees.assert_trees_equal(checkpoint.restore_params(out), want)


def test_global_thresholds_hold_one_experts_scores_at_a_time(ckpts, tmp_path, monkeypatch):
    """The threshold passes compute an expert's scores when its histogram is taken (every
    expert's at once held K leaves of scores beside the inputs)."""
    from umtam_jax.merging import _pipeline

    events, made = [], []
    importance, keys = _pipeline.expert_importance, _global_topk.GlobalTopK.keys

    def scores(*args):  # from the first pass on, no earlier expert's scores are alive
        if "keys" in events:
            assert [r() for r in made if r() is not None] == []
        events.append("scores")
        out = importance(*args)
        if "keys" in events:
            made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(_pipeline, "expert_importance", scores)
    monkeypatch.setattr(_global_topk.GlobalTopK, "keys",
                        lambda self, s: events.append("keys") or keys(self, s))  # fmt: skip
    p = ckpts["paths"]
    engine.merge_checkpoints("ties", p["base"], _experts(p), tmp_path / "out", density=0.3,
                             scope="global", progress=False)  # fmt: skip
    monkeypatch.undo()  # the in-memory merge below computes every expert's scores at once
    # From the first pass on (the job's abstract validation traces every expert before).
    passes = " ".join(events[events.index("keys") - 1 :])
    assert passes.count("scores") > 6 and "scores scores" not in passes
    want = merging.ties(ckpts["base"], ckpts["experts"], density=0.3, scope="global")
    trees.assert_trees_equal(checkpoint.restore_params(tmp_path / "out"), want)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 0.25},
        {"density": [0.1, 0.4, 0.7], "normalize": "selected", "curvature_pruning": False},
    ],
)
def test_global_umtam_equals_in_memory(ckpts, tmp_path, kwargs):
    p = ckpts["paths"]
    out = tmp_path / "out"
    engine.merge_checkpoints(
        "umtam", p["base"], _experts(p), out, scope="global", progress=False, **kwargs
    )
    want = merging.umtam(ckpts["base"], ckpts["experts"], ckpts["stats"], scope="global", **kwargs)
    trees.assert_trees_equal(checkpoint.restore_params(out), want)


def test_global_ties_weights(ckpts, tmp_path):
    p = ckpts["paths"]
    kwargs = {"density": [0.2, 0.5, 0.35], "weights": [2.0, -1.0, 0.5], "scaling": 0.7}
    engine.merge_checkpoints(
        "ties", p["base"], _experts(p), tmp_path / "o", scope="global", progress=False, **kwargs
    )
    want = merging.ties(ckpts["base"], ckpts["experts"], scope="global", **kwargs)
    trees.assert_trees_equal(checkpoint.restore_params(tmp_path / "o"), want)


# ------------------------------------------------------------------------------ checkpoint I/O


def test_reader_and_streaming_writer_round_trip(tmp_path):
    import ml_dtypes

    params = {
        "layers": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, ml_dtypes.bfloat16)],
        "scale": np.float32(2.0),
    }
    checkpoint.save_checkpoint(tmp_path / "src", params)
    reader = checkpoint.CheckpointReader(tmp_path / "src")
    a, b = reader.restore_arrays("params", [("layers", "1"), ("scale",)])
    assert a.dtype == ml_dtypes.bfloat16 and a.shape == (4,)
    assert b.shape == () and float(b) == 2.0
    abstract = reader.abstract("params")
    leaves = jax.tree.leaves(params)
    order = []

    def produce(i):
        order.append(i)
        return np.asarray(leaves[i]) * 2

    checkpoint.save_params_streaming(tmp_path / "out", abstract, produce)
    assert order == [0, 1, 2]
    got = checkpoint.restore_params(tmp_path / "out")
    assert isinstance(got["layers"], list)
    trees.assert_trees_equal(got, jax.tree.map(lambda y: np.asarray(y) * 2, params))
    with pytest.raises(ValueError, match="expected"):
        checkpoint.save_params_streaming(
            tmp_path / "bad", abstract, lambda i: np.zeros(7, np.float32)
        )
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------ CLI


def test_cli_streaming_equals_in_memory(ckpts, tmp_path, capsys):
    from umtam_jax.cli.merge import main

    p = ckpts["paths"]
    common = ["--method", "ties", "--base", p["base"], "--expert", p["t0"], "--expert", p["t1"]]
    common += ["--param", "density=0.3", "--param", "scope=global"]
    assert main([*common, "-o", str(tmp_path / "s")]) == 0
    assert "out of core" in capsys.readouterr().out
    assert main([*common, "--no-progress", "--in-memory", "-o", str(tmp_path / "m")]) == 0
    trees.assert_trees_equal(
        checkpoint.restore_params(tmp_path / "s"), checkpoint.restore_params(tmp_path / "m")
    )
    assert main([*common, "--dry-run"]) == 0
    assert "dry run OK" in capsys.readouterr().out


def test_global_scope_float64_keys(tmp_path):
    # float64 scores have 64-bit keys: four 16-bit histogram passes before the final one.
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        base, _ = H.random_experts(rng, 1)
        experts = [_quantized(rng, base, 0.25) for _ in range(2)]
        experts = [jax.tree.map(lambda x: x.astype(np.float64), e) for e in experts]
        checkpoint.save_checkpoint(tmp_path / "b", base)
        for i, e in enumerate(experts):
            checkpoint.save_checkpoint(tmp_path / f"e{i}", e)
        dirs = [str(tmp_path / f"e{i}") for i in range(2)]
        engine.merge_checkpoints(
            "ties",
            tmp_path / "b",
            dirs,
            tmp_path / "o",
            density=0.3,
            scope="global",
            progress=False,
        )
        got = checkpoint.restore_params(tmp_path / "o")
        restored = [checkpoint.restore_params(d) for d in dirs]
        want = merging.ties(
            checkpoint.restore_params(tmp_path / "b"), restored, density=0.3, scope="global"
        )
        assert jax.tree.leaves(got)[0].dtype == np.float64
        trees.assert_trees_equal(got, want)


def test_bare_array_params_with_statistics(tmp_path):
    from umtam_jax.optimizer._state import DenseStatistics

    rng = np.random.default_rng(0)
    base = rng.standard_normal(10).astype(np.float32)
    checkpoint.save_checkpoint(tmp_path / "b", base)
    for i in range(2):
        node = DenseStatistics(
            mu=rng.standard_normal(10).astype(np.float32),
            nu=rng.random(10).astype(np.float32),
            saliency=rng.random(10).astype(np.float32),
        )
        expert = base + rng.standard_normal(10).astype(np.float32)
        checkpoint.save_checkpoint(tmp_path / f"e{i}", expert, statistics=node)
    dirs = [tmp_path / "e0", tmp_path / "e1"]
    engine.merge_checkpoints(
        "umtam", tmp_path / "b", dirs, tmp_path / "o", density=0.3, scope="global", progress=False
    )
    want = merging.umtam(
        checkpoint.restore_params(tmp_path / "b"),
        [checkpoint.restore_params(d) for d in dirs],
        [checkpoint.restore_statistics(d) for d in dirs],
        density=0.3,
        scope="global",
    )
    trees.assert_trees_equal(checkpoint.restore_params(tmp_path / "o"), want)


def test_statistics_of_a_model_with_an_integer_buffer_merge_out_of_core(tmp_path):
    """optax.masked keeps an integer buffer from the optimizer: its statistics hold an
    empty MaskedNode there, which the engine refused as "an extra leaf ['i']"."""
    import optax

    rng = np.random.default_rng(1)
    base = {"w": rng.standard_normal((4, 4)).astype(np.float32), "i": np.arange(3)}
    mask = {"w": True, "i": False}
    dirs = []
    for k in range(2):
        params = {**base, "w": base["w"] + rng.standard_normal((4, 4)).astype(np.float32)}
        opt = optax.masked(umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=2), mask)
        state = opt.init(params)
        grads = {"w": rng.standard_normal((4, 4)).astype(np.float32), "i": np.zeros(3, int)}
        _, state = opt.update(grads, state, params)
        dirs.append(tmp_path / f"e{k}")
        checkpoint.save_checkpoint(dirs[-1], params, statistics=umtam_jax.statistics(state))
    checkpoint.save_checkpoint(tmp_path / "b", base)
    engine.merge_checkpoints("umtam", tmp_path / "b", dirs, tmp_path / "o", density=0.5,
                             progress=False)  # fmt: skip
    weights = [{"w": checkpoint.restore_params(d)["w"]} for d in dirs]
    stats = [{"w": checkpoint.restore_statistics(d)["w"]} for d in dirs]
    want = merging.umtam({"w": base["w"]}, weights, stats, density=0.5)  # the buffer: copied
    copied = checkpoint.restore_params(tmp_path / "b")["i"]
    trees.assert_trees_equal(checkpoint.restore_params(tmp_path / "o"), {**want, "i": copied})


def test_chunked_histogram_and_mask(monkeypatch):
    monkeypatch.setattr(_global_topk, "_CHUNK", 7)  # many slices on a small array
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 4, 100).astype(np.uint32) << np.uint32(16)
    keys |= rng.integers(0, 3, 100).astype(np.uint32)
    np.testing.assert_array_equal(
        _global_topk._histogram(keys, 16, None), np.bincount(keys >> 16, minlength=2**16)
    )
    sel = keys[(keys >> 16) == 2] & 0xFFFF
    np.testing.assert_array_equal(
        _global_topk._histogram(keys, 0, 2), np.bincount(sel, minlength=2**16)
    )
    t = (2 << 16) | 1
    equal = np.flatnonzero(keys == t)
    for take in [0, 1, 5, equal.size, equal.size + 3]:
        mask, took = _global_topk._leaf_mask(keys, t, take)
        want = keys > t
        want[equal[: min(take, equal.size)]] = True
        np.testing.assert_array_equal(mask, want)
        assert took == min(take, equal.size)


def test_options_are_checked_once_per_merge_not_per_leaf(ckpts, tmp_path, monkeypatch):
    """The engine validates the method's options once; every leaf reuses them."""
    from umtam_jax.merging import _registry as R

    calls = []
    check = R.Param.check
    monkeypatch.setattr(
        R.Param, "check", lambda self, v, k: calls.append(self.name) or check(self, v, k)
    )
    p = ckpts["paths"]
    n_leaves = len(jax.tree.leaves(ckpts["base"]))
    assert n_leaves > 2
    kwargs = {"density": [0.3, 0.6, 0.2], "weights": [1.0, 2.0, 0.5]}
    engine.merge_checkpoints("ties", p["base"], _experts(p), tmp_path / "o", progress=False,
                             group_bytes=100, **kwargs)  # fmt: skip
    n_params = len(R.get("ties").params)
    # The abstract validation merge and the engine's check: twice per parameter, whatever
    # the number of leaves.
    assert len(calls) == 2 * n_params, (len(calls), n_params, n_leaves)
    want = merging.ties(ckpts["base"], ckpts["experts"], **kwargs)
    trees.assert_trees_equal(checkpoint.restore_params(tmp_path / "o"), want)
