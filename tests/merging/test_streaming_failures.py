"""What out-of-core merging (``engine.merge_checkpoints``) refuses, and what a failure leaves:
an existing output, a merge failing midway (atomic), missing checkpoints or statistics,
lone safetensors files, invalid merges, extras a job cannot read, and PRNG key leaves."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from tests import trees
from tests.merging.streaming_helpers import make_ckpts
from umtam_jax import checkpoint, engine, merging
from umtam_jax.engine import _job


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_ckpts(tmp_path_factory)


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
