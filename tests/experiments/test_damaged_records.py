"""Damaged records are errors naming the file, never taken for missing data: expert
checkpoints, ``.npz`` records, benchmark and protocol records."""

from __future__ import annotations

import json
import os
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.experiments.test_claims import _benchmarks
from umtam_jax import checkpoint
from umtam_jax.experiments import claims, comparison, pruning, store
from umtam_jax.experiments import experts as X

# ----------------------------------------------------------------------------- experts


@pytest.fixture
def fake_training(monkeypatch):
    """train_expert with a fixed fingerprint and an instant "training"; counts the calls."""
    calls = []
    monkeypatch.setattr(X, "expert_fingerprint", lambda *a, **k: "fp0")
    monkeypatch.setattr(X, "optimizer_for", lambda *a, **k: None)
    monkeypatch.setattr(X, "evaluate_params", lambda *a, **k: 0.5)

    def finetune(*a, **k):
        calls.append(1)
        return {"w": np.full(4, 9.0, "f4")}, {}, {"seconds": 0}

    monkeypatch.setattr(X, "finetune", finetune)
    return calls


def _train(workdir: Path):
    return X.train_expert(types.SimpleNamespace(name="t"), None, None, workdir,
                          optimizer="adamw", progress=False)  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_corrupt_expert_checkpoint_is_an_error_not_retrained(fake_training, tmp_path):
    first = _train(tmp_path)
    assert fake_training == [1] and _train(tmp_path).info["restored"]
    data = sorted((first.path / "params" / "d").iterdir())[0]
    b = bytearray(data.read_bytes())
    b[len(b) // 2] ^= 0x01
    data.write_bytes(b)
    before = _snapshot(first.path)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="never retrained") as err:
        _train(tmp_path)
    assert str(first.path) in str(err.value)
    assert fake_training == [1] and _snapshot(first.path) == before


def test_an_expert_of_another_fingerprint_is_retrained(fake_training, tmp_path):
    path = tmp_path / "experts" / "t-fp0"
    checkpoint.save_checkpoint(path, {"w": np.zeros(4, "f4")}, metadata={
        "fingerprint": "other", "task": "t", "scores": {}, "info": {}})  # fmt: skip
    e = _train(tmp_path)
    assert fake_training == [1] and not e.info["restored"]
    assert checkpoint.restore_params(path)["w"].tolist() == [9.0] * 4


def test_a_checkpoint_without_a_fingerprint_is_refused_naming_it(fake_training, tmp_path):
    """An older version's expert, or a user's checkpoint, is never trained over."""
    path = tmp_path / "experts" / "t-fp0"
    checkpoint.save_checkpoint(path, {"w": np.zeros(4, "f4")}, metadata={"task": "t"})
    with pytest.raises(ValueError, match="holds no expert fingerprint") as err:
        _train(tmp_path)
    assert str(path) in str(err.value) and "delete it to train the expert again" in str(err.value)
    assert fake_training == [] and checkpoint.restore_params(path)["w"].tolist() == [0.0] * 4


# ----------------------------------------------------------------------------- .npz records


def _flip_central_directory(path: Path, offset: int, bit: int) -> None:
    b = bytearray(path.read_bytes())
    b[b.rfind(b"PK\x01\x02") + offset] ^= bit
    path.write_bytes(b)


@pytest.mark.parametrize(
    ("offset", "bit", "raised"),
    [
        (8, 0x01, RuntimeError),  # the "encrypted" flag: "File ... is encrypted"
        (10, 0x01, NotImplementedError),  # compression method: "not supported"
        (46, 0x01, zipfile.BadZipFile),  # its name: "x.npy" -> "y.npy"
    ],
)
def test_a_byte_flip_in_the_zip_directory_is_damage(tmp_path, offset, bit, raised):
    path = tmp_path / "a.npz"
    store.write_npz(path, {"x": np.arange(64, dtype="i4")})
    _flip_central_directory(path, offset, bit)
    with pytest.raises(raised), np.load(path) as z:  # what NumPy raises on its own
        {k: z[k] for k in z.files}
    assert store.read_npz(path) is None  # a cache entry: computed again
    with pytest.raises(ValueError, match=f"{path} is damaged or unreadable"):
        store.read_npz_record(path)
    assert store.read_npz_record(tmp_path / "missing.npz") is None


def _protocol(root: Path) -> Path:
    """A protocol work directory of one seed, one task and three methods."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    store.write_npz(root / "labels/seed0.npz", {"t": y})
    runs = {}
    for m in ("umtam", "linear", "ties"):
        store.write_npz(root / f"runs/{m}.npz", {"t": np.where(rng.random(40) < 0.8, y, 1 - y)})
        runs[m] = {"0": {"predictions": f"runs/{m}.npz", "name": m, "validation_norm": 1.0,
                         "budget": 1, "evaluations": 1, "open_edges": [], "merge_seconds": 0.1,
                         "hparams": {}}}  # fmt: skip
    store.write_json(root / "results.json", {
        "protocol": {"tasks": ["t"], "methods": list(runs),
                     "metrics": {"t": {"metric": "accuracy", "num_labels": 2}}},
        "experts": {"0": {"t": {"test": 0.9}}}, "labels": {"0": "labels/seed0.npz"},
        "runs": runs})  # fmt: skip
    return root


def _flip(path: Path, at: int = 100) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 1
    path.write_bytes(b)


@pytest.mark.parametrize("damaged", ["runs/ties.npz", "labels/seed0.npz"])
def test_a_damaged_npz_record_is_never_a_missing_method(tmp_path, damaged):
    wd = _protocol(tmp_path)
    assert comparison.summarize(wd, samples=20).missing == ()
    _flip(wd / damaged)
    with pytest.raises(ValueError, match=f"{wd / damaged} is damaged"):
        comparison.summarize(wd, samples=20)
    with pytest.raises(ValueError, match=f"{wd / damaged} is damaged"):
        comparison.compare_runs((wd, "umtam"), (wd, "ties"), samples=20)


@pytest.mark.parametrize(
    ("text", "error"),
    [('{"protocol": {"tasks": ', "is damaged"), ("[1, 2, 3]", "is not the record of a"),
     ('{"accuracy": 0.91}', "is not the record"), ('{"protocol": {}, "runs": [1]}', "is not the")],
)  # fmt: skip
def test_a_damaged_or_foreign_results_json_is_an_error(tmp_path, text, error):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(ValueError, match=error):
        comparison.summarize(tmp_path, samples=20)
    with pytest.raises(ValueError, match=error):
        claims.paper_claims(tmp_path / "results.json", tmp_path)


def test_damaged_pruning_predictions_are_an_error(tmp_path):
    path = tmp_path / "pruning" / "seed0.npz"
    store.write_npz(path, {"t/labels": np.zeros(4, "i4")})
    _flip(path)
    run = {"tasks": ["t"], "seeds": [0], "metrics": {"t": {"metric": "accuracy",
           "num_labels": 2}}, "files": {"0": "pruning/seed0.npz"}}  # fmt: skip
    with pytest.raises(ValueError, match=f"{path} is damaged"):
        pruning.summarize_pruning(tmp_path, run)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="pruning predictions missing"):
        pruning.summarize_pruning(tmp_path, run)


# ----------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize(
    ("text", "error"),
    [('{"result": {"summary": {"me', "pruning.json is damaged"),
     ("[1]", "pruning.json is not a benchmark record"),
     ('{"result": [1]}', "pruning.json is not a benchmark record"),
     ('{"result": {}, "environment": "cpu"}', "pruning.json is not a benchmark record")],
)  # fmt: skip
def test_a_damaged_benchmark_record_is_an_error_not_no_data(tmp_path, text, error):
    (tmp_path / "pruning.json").write_text(text)
    with pytest.raises(ValueError, match=error):
        claims.paper_claims(None, tmp_path)


def test_a_damaged_gpu_repeat_is_an_error(tmp_path):
    bdir = _benchmarks(tmp_path / "b")  # the CPU record, with an interval over repeats
    folder = bdir / "train_throughput_gpu_repeats"
    folder.mkdir()
    (folder / "r1.json").write_text(json.dumps([1]))
    with pytest.raises(ValueError, match="r1.json is not a benchmark record"):
        claims.paper_claims(None, bdir)
    os.unlink(folder / "r1.json")
    assert claims.paper_claims(None, bdir)[6].low is not None
