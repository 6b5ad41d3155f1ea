"""benchmarks/conflict_intensity.py at ``--quick`` (tiny protocol size, seed 0): the
constructed pair is merged with fixed heads in its own work directory, set beside the natural pairs
of a merging record of the same size and seeds (and only such a record), correlated over
all pairs, and a rerun reads everything back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import conflict_intensity as ci
from umtam_jax.experiments import experts as experts_lib
from umtam_jax.experiments import store


def _gain(x):
    return {"estimate": x, "low": x - 0.1, "high": x + 0.1, "verdict": "tied"}


def _natural(tasks, conflict, gain):
    row = {"tasks": tasks, "conflict": conflict, "conflict_mass": 0.4,
           "gain_umtam": _gain(gain), "gain_ties": _gain(-gain)}  # fmt: skip
    row.update({m: {"score": 0.9, "low": 0.8, "high": 1.0} for m in ci.METHODS})
    return row


def _spearman(x, y):  # the reference: Pearson correlation of the ranks (no ties here)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def test_constructed_pairs_beside_the_natural_ones_and_a_rerun_reads_them(tmp_path, monkeypatch):
    natural = [_natural(["a", "b"], 0.49, 0.02), _natural(["a", "c"], 0.51, -0.03)]
    record = tmp_path / "merging.json"
    study = {"pairs": natural, "seeds": [0]}
    store.write_json(record, {"result": {"protocol": {"size": "tiny"}, "conflict": study}})
    results = tmp_path / "results"
    argv = ["--quick", "--workdir", str(tmp_path / "work"), "--seeds", "0", "--heads", "fixed",
            "--natural", str(record), "--results-dir", str(results)]  # fmt: skip
    out = ci.main(argv)
    rows = out["constructed"]
    assert [r["heads"] for r in rows] == ["fixed"]  # the learned-heads run: the same code
    assert all(r["tasks"] == ["wn_defmatch", "wn_defmatch_mirror"] for r in rows)
    assert out["natural"] == natural
    every = rows + natural
    for m in ("umtam", "ties"):
        expected = _spearman([r["conflict"] for r in every],
                             [r[f"gain_{m}"]["estimate"] for r in every])  # fmt: skip
        assert out["spearman"][m] == pytest.approx(expected)
    text = json.loads((results / "conflict_intensity_quick.json").read_text())["markdown"]
    assert "| wn_defmatch + wn_defmatch_mirror (fixed heads) |" in text and "| a + c |" in text
    assert (tmp_path / "work-fixed-heads" / "pairs").is_dir()
    assert not (tmp_path / "work" / "pairs").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("the experts are in the work directories' caches")

    monkeypatch.setattr(experts_lib, "finetune", no_training)
    again = ci.main(argv)
    assert again["constructed"] == rows
    # A record of other seeds is not set beside.
    assert ci.natural_pairs(str(record), "tiny", [0, 1]) == []
    assert ci.natural_pairs(str(record), "medium", [0]) == []
