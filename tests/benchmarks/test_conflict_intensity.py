"""benchmarks/conflict_intensity.py: each constructed pair is studied with learned heads in
the work directory and with fixed heads in its own, set beside the natural pairs of a
merging record of the same size and seeds (and only such a record), and correlated over
all pairs. The study itself (:func:`conflict_study`, run for real in
tests/experiments/test_protocol_evaluation.py) is replaced by a recorder here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import conflict_intensity as ci
from umtam_jax.experiments import store


def _gain(x):
    return {"estimate": x, "low": x - 0.1, "high": x + 0.1, "verdict": "tied"}


def _row(tasks, conflict, gain):
    row = {"tasks": list(tasks), "conflict": conflict, "conflict_mass": 0.4,
           "conflict_kept": None, "gain_umtam": _gain(gain), "gain_ties": _gain(-gain)}  # fmt: skip
    row.update({m: {"score": 0.9, "low": 0.8, "high": 1.0} for m in ci.METHODS})
    row["conflict_per_leaf"] = {"a": 0.2, "b": conflict, "c": None, "d": 0.3}
    return row


def _spearman(x, y):  # the reference: Pearson correlation of the ranks (no ties here)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def test_both_head_settings_beside_the_natural_pairs(tmp_path, monkeypatch):
    calls = []

    def study(workdir, *, size, pairs, methods, seeds, samples, log):
        assert samples == size.bootstrap_samples
        calls.append((Path(workdir), size, list(pairs), list(methods), list(seeds)))
        fixed = not size.config.train_head
        return {"pairs": [_row(p, 0.9 if fixed else 0.4, 0.05 if fixed else 0.01) for p in pairs]}

    monkeypatch.setattr(ci, "conflict_study", study)
    natural = [_row(["a", "b"], 0.49, 0.02), _row(["a", "c"], 0.51, -0.03)]
    record = tmp_path / "merging.json"
    payload = {"protocol": {"size": "tiny"}, "samples": 200,
               "conflict": {"pairs": natural, "seeds": [0, 1]}}  # fmt: skip
    store.write_json(record, {"result": payload})
    results, work = tmp_path / "results", tmp_path / "work"
    out = ci.main(["--quick", "--workdir", str(work), "--natural", str(record),
                   "--results-dir", str(results)])  # fmt: skip
    assert [(c[0], c[1].config.train_head) for c in calls] == [
        (work, True), (tmp_path / "work-fixed-heads", False)
    ]  # fmt: skip
    for _, size, pairs, methods, seeds in calls:
        assert size.name == "tiny" and seeds == [0, 1] and methods == list(ci.METHODS)
        assert pairs == [("wn_defmatch", "wn_defmatch_mirror")]
    rows = out["constructed"]
    assert [(r["heads"], r["conflict"]) for r in rows] == [("learned", 0.4), ("fixed", 0.9)]
    assert out["natural"] == natural
    for key, every in (("all", rows + natural), ("learned", rows[:1] + natural)):
        for m in ("umtam", "ties"):
            expected = _spearman([r["conflict"] for r in every],
                                 [r[f"gain_{m}"]["estimate"] for r in every])  # fmt: skip
            assert out["correlations"][key]["spearman"][m] == pytest.approx(expected)
    assert out["correlations"]["learned"]["pairs"] == 3
    text = json.loads((results / "conflict_intensity_quick.json").read_text())["markdown"]
    table = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ")][1:]
    assert "(learned heads): `b` 0.40, `d` 0.30, `a` 0.20; median over 3 leaves 0.30" in text
    assert ci.where_they_disagree({"tasks": ["a", "b"]}) == "per-leaf rates not recorded"
    assert table == ["| wn_defmatch + wn_defmatch_mirror (learned heads)", "| a + b",
                     "| a + c", "| wn_defmatch + wn_defmatch_mirror (fixed heads)"]  # fmt: skip
    # A record of another size, other seeds or other replicates is not set beside.
    assert ci.natural_pairs(str(record), "tiny", [0, 1], 200) == natural
    assert ci.natural_pairs(str(record), "tiny", [0], 200) == []
    assert ci.natural_pairs(str(record), "medium", [0, 1], 200) == []
    assert ci.natural_pairs(str(record), "tiny", [0, 1], 2000) == []
    assert ci.natural_pairs("", "tiny", [0, 1], 200) == []
    assert ci.natural_pairs(str(tmp_path / "none.json"), "tiny", [0, 1], 200) == []
    # A damaged record is an error, never taken for one without natural pairs.
    text = record.read_text()
    record.write_text(text.replace('"samples": 200', '"samples": 201'))
    with pytest.raises(ValueError, match=f"{record} is damaged"):
        ci.natural_pairs(str(record), "tiny", [0, 1], 200)
    # One head setting only, without natural pairs.
    calls.clear()
    alone = ci.main(["--quick", "--workdir", str(work), "--heads", "fixed", "--natural", "",
                     "--results-dir", str(results)])  # fmt: skip
    assert [c[1].config.train_head for c in calls] == [False] and alone["natural"] == []
    with pytest.raises(SystemExit):
        ci.parse_args(["--workdir", "w", "--pairs", "a+b+c"])
