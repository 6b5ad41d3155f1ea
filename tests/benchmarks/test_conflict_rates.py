"""benchmarks/conflict_rates.py at ``--quick`` (tiny protocol size, one pair): the rates
are those of the protocol's experts, the summary is theirs, and a rerun reads the pair
back."""

from __future__ import annotations

import json

import pytest

from benchmarks import conflict_rates as cr
from umtam_jax.experiments import protocol
from umtam_jax.experiments.models import minilm_pretrained
from umtam_jax.merging.diagnostics import sign_conflict

TASKS = ["fortune_topic", "py_package"]


def test_rates_of_every_pair_are_the_experts_and_a_rerun_reads_them_back(tmp_path, monkeypatch):
    workdir, results = tmp_path / "work", tmp_path / "results"
    argv = ["--quick", "--workdir", str(workdir), "--densities", "0.2", "0.05",
            "--results-dir", str(results)]  # fmt: skip
    out = cr.main(argv)
    assert [r["tasks"] for r in out["rows"]] == [TASKS]
    size = protocol.SIZES["tiny"]
    base = protocol.start_encoder(size)
    _, _, experts = protocol.seed_inputs(
        size, 0, TASKS, workdir, base, minilm_pretrained.load_minilm_tokenizer()
    )
    enc = {t: e.params["encoder"] for t, e in zip(TASKS, experts, strict=True)}
    for row in out["rows"]:
        a, b = (enc[t] for t in row["tasks"])
        assert row["rates"]["all"]["rate"] == sign_conflict(base, [a, b])["rate"]
        assert row["rates"]["0.05"]["rate"] == sign_conflict(base, [a, b], density=0.05)["rate"]
    for key in ("all", "0.2", "0.05"):
        rates = [r["rates"][key]["rate"] for r in out["rows"]]
        assert out["summary"][key]["min"] == pytest.approx(min(rates))
        assert out["summary"][key]["max"] == pytest.approx(max(rates))
    record = json.loads((results / "conflict_rates_quick.json").read_text())
    assert "| fortune_topic + py_package | 0 |" in record["markdown"]

    def no_training(*args, **kwargs):
        raise AssertionError("every pair is in the work directory's cache")

    monkeypatch.setattr(cr, "seed_inputs", no_training)
    assert cr.main(argv)["rows"] == out["rows"]
