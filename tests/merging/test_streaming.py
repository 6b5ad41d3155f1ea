"""Out-of-core merging (``engine.merge_checkpoints``) equals the in-memory methods."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import umtam_jax
from tests import trees
from tests.merging import helpers as H
from umtam_jax import checkpoint, engine, merging
from umtam_jax.engine import _global_topk, _job

K = 3


def _quantized(rng, base, scale):
    """Task vectors on a coarse grid: many equal magnitudes within and across leaves."""
    return jax.tree.map(
        lambda b: (b + scale * rng.integers(-2, 3, np.shape(b))).astype(np.float32), base
    )


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    base, experts = H.random_experts(rng, K, dtype=np.float32)
    stats = H.random_statistics(rng, K, dtype=np.float32)
    stats[1] = H.random_statistics(rng, 1, tracked=False, dtype=np.float32)[0]
    fishers = [jax.tree.map(np.abs, H.random_params(rng, dtype=np.float32)) for _ in range(K)]
    tied = [_quantized(rng, base, 0.5) for _ in range(K)]
    paths = {"base": str(root / "base")}
    checkpoint.save_checkpoint(paths["base"], base)
    for i in range(K):
        paths[f"e{i}"] = str(root / f"e{i}")
        checkpoint.save_checkpoint(paths[f"e{i}"], experts[i], statistics=stats[i])
        paths[f"f{i}"] = str(root / f"f{i}")
        checkpoint.save_checkpoint(paths[f"f{i}"], fishers[i])
        paths[f"t{i}"] = str(root / f"t{i}")
        checkpoint.save_checkpoint(paths[f"t{i}"], tied[i])
    # Restored exactly as the in-memory CLI path restores them.
    restored = {
        "base": checkpoint.restore_params(paths["base"]),
        "experts": [checkpoint.restore_params(paths[f"e{i}"]) for i in range(K)],
        "stats": [checkpoint.restore_statistics(paths[f"e{i}"]) for i in range(K)],
        "fishers": [checkpoint.restore_params(paths[f"f{i}"]) for i in range(K)],
        "tied": [checkpoint.restore_params(paths[f"t{i}"]) for i in range(K)],
    }
    return {"paths": paths, **restored}


def _experts(p, prefix="e", n=K):
    return [p[f"{prefix}{i}"] for i in range(n)]


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


# ------------------------------------------------------------------------------ errors


def test_overwrite_refused_then_allowed(ckpts, tmp_path):
    p = ckpts["paths"]
    out = tmp_path / "out"
    args = ("task_arithmetic", p["base"], [p["e0"]], out)
    engine.merge_checkpoints(*args, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        engine.merge_checkpoints(*args, progress=False, scaling=0.5)
    engine.merge_checkpoints(*args, progress=False, scaling=0.5, overwrite=True)
    want = merging.task_arithmetic(ckpts["base"], ckpts["experts"][:1], scaling=0.5)
    trees.assert_trees_equal(checkpoint.restore_params(out), want)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging leftovers
    with pytest.raises(ValueError, match="the output .* is expert 0"):
        engine.merge_checkpoints(
            "task_arithmetic", p["base"], [p["e0"]], p["e0"], overwrite=True, progress=False
        )


def _fail_on_third_leaf(monkeypatch):
    calls = []
    original = _job.Job.merge

    def failing(self, call, topk):
        calls.append(call)
        if len(calls) == 3:
            raise RuntimeError("simulated failure mid-merge")
        return original(self, call, topk)

    monkeypatch.setattr(_job.Job, "merge", failing)


def test_failed_merge_is_atomic(ckpts, tmp_path, monkeypatch, caplog):
    p = ckpts["paths"]
    out = tmp_path / "out"
    _fail_on_third_leaf(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        engine.merge_checkpoints("task_arithmetic", p["base"], [p["e0"]], out, progress=False)
    assert os.listdir(tmp_path) == []
    # The caller gets the producer's error; Orbax's writer threads log no traces of the abort.
    assert not [r for r in caplog.records if r.exc_info], caplog.text[:2000]
    # A failed overwrite keeps the old checkpoint.
    monkeypatch.undo()
    engine.merge_checkpoints("task_arithmetic", p["base"], [p["e0"]], out, progress=False)
    _fail_on_third_leaf(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        engine.merge_checkpoints(
            "task_arithmetic", p["base"], [p["e1"]], out, overwrite=True, progress=False
        )
    assert sorted(os.listdir(tmp_path)) == ["out"]
    want = merging.task_arithmetic(ckpts["base"], ckpts["experts"][:1])
    trees.assert_trees_equal(checkpoint.restore_params(out), want)


def test_missing_checkpoint_and_statistics(ckpts, tmp_path):
    p = ckpts["paths"]
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="expert 1's checkpoint"):
        engine.merge_checkpoints(
            "ties", p["base"], [p["e0"], str(tmp_path / "nope")], out, density=0.5
        )
    with pytest.raises(FileNotFoundError, match="the base checkpoint"):
        engine.merge_checkpoints("ties", str(tmp_path / "nope"), [p["e0"]], out, density=0.5)
    with pytest.raises(ValueError, match="expert 0 .* has none"):
        engine.merge_checkpoints("umtam", p["base"], [p["t0"]], out)
    assert not out.exists()


def test_lone_safetensors_files_take_nothing_from_the_folder_they_share(tmp_path):
    # Three models as lone files in one folder, beside one model's statistics and config.
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((4, 3)).astype(np.float32)}
    experts = [{"w": base["w"] + rng.standard_normal((4, 3)).astype(np.float32)} for _ in "ab"]
    folder = tmp_path / "models"
    files = {}
    for name, tree in zip(("base", "a", "b"), (base, *experts), strict=True):
        staged = checkpoint.save_safetensors(tmp_path / f"staged_{name}", tree)
        folder.mkdir(exist_ok=True)
        files[name] = folder / f"{name}.safetensors"
        os.rename(staged / "model.safetensors", files[name])
    stats = {"w": {"mu": np.ones((4, 3), np.float32), "nu": np.ones((4, 3), np.float32),
                   "saliency": np.ones((4, 3), np.float32)}}  # fmt: skip
    checkpoint.save_safetensors(folder / engine.STATISTICS_FOLDER, stats)
    (folder / "config.json").write_text("{}")
    experts_in = [files["a"], files["b"]]
    with pytest.raises(ValueError, match=r"a\.safetensors\) has none \(a lone \.safetensors"):
        engine.merge_checkpoints("umtam", files["base"], experts_in, tmp_path / "out")
    # An output in the folder beside them is not inside an input; no config is copied.
    out = engine.merge_checkpoints(
        "task_arithmetic", files["base"], experts_in, folder / "merged", progress=False
    )
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "model.safetensors",
        "umtam_jax_safetensors.json",
    ]
    want = merging.task_arithmetic(base, experts)  # the out-of-core merge is the in-memory one
    trees.assert_trees_bitwise_equal(checkpoint.SafetensorsReader(out).read(["w"])[0], want["w"])


def test_invalid_merge_writes_nothing(ckpts, tmp_path):
    p = ckpts["paths"]
    bad = jax.tree.map(lambda x: x, ckpts["experts"][0])
    bad["attn"]["kernel"] = np.zeros((5, 6), np.float32)
    checkpoint.save_checkpoint(tmp_path / "bad", bad)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"\['attn'\]\['kernel'\]"):
        engine.merge_checkpoints("ties", p["base"], [str(tmp_path / "bad")], out, density=0.5)
    with pytest.raises(ValueError, match="density must lie in"):
        engine.merge_checkpoints("ties", p["base"], [p["e0"]], out, density=1.5)
    with pytest.raises(ValueError, match="unknown method"):
        engine.merge_checkpoints("frankenmerge", p["base"], [p["e0"]], out)
    assert not out.exists()
    shapes = engine.validate_merge_checkpoints("ties", p["base"], [p["e0"]], density=0.5)
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(np.shape, ckpts["base"])


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


def test_a_job_names_extras_it_cannot_read(ckpts):
    """A string other than "statistics" was iterated as sources, one per character."""
    p = ckpts["paths"]
    base, expert = (engine.OrbaxSource(p[k], k) for k in ("base", "e0"))
    with pytest.raises(ValueError, match="extras must be 'statistics'.*not 'fisher'"):
        engine.Job(merging.METHODS["fisher"], base, [expert], "fisher", {})  # type: ignore[arg-type]


def test_a_checkpoint_holding_a_prng_key_is_refused_naming_the_leaf(tmp_path, capsys):
    """A typed PRNG key (savable since format version 4) has nothing to merge: opening
    such a checkpoint is one error naming it and the leaf (it was NumPy's TypeError
    "Cannot interpret 'key<fry>' as a data type", naming neither), in every mode."""
    from umtam_jax.cli.merge import main

    w = {"w": np.ones(4, np.float32)}
    base = checkpoint.save_checkpoint(tmp_path / "base", w)
    keyed = checkpoint.save_checkpoint(tmp_path / "keyed", {**w, "rng": jax.random.key(0)})
    out = tmp_path / "out"
    refused = rf"cannot merge expert 0's checkpoint {keyed}: its leaf \['rng'\] is a PRNG key"
    for fmt in ("orbax", "safetensors"):
        with pytest.raises(ValueError, match=refused):
            engine.merge_checkpoints("task_arithmetic", base, [keyed], out, output_format=fmt)
    with pytest.raises(ValueError, match=r"the base checkpoint .*: its leaf \['rng'\]"):
        engine.merge_checkpoints("task_arithmetic", keyed, [base], out)
    assert not out.exists()
    common = ["--method", "task_arithmetic", "--base", str(base), "--expert", str(keyed)]
    for mode in ([], ["--in-memory"], ["--dry-run"]):
        assert main([*common, *mode, "--no-progress", "-o", str(out)]) != 0
        err = capsys.readouterr().err
        assert "its leaf ['rng'] is a PRNG key" in err and str(keyed) in err, err
    assert not out.exists()
