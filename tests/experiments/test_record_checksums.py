"""JSON records carry a SHA-256 checksum: a flipped digit is damage (an error naming the
file for a record, a recomputation for a cache entry), never another number; records
without one (older, or edited by hand with the entry deleted) read as before."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from benchmarks import _records
from tests.experiments.test_damaged_records import _protocol
from umtam_jax.experiments import _claim_rows, comparison, store

ROOT = Path(__file__).resolve().parents[2]


def _sha256(body: dict) -> str:
    """The checksum computed here, independently of the library's helper."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def _flip_digit(path: Path, number: str) -> None:
    """Flips the lowest bit of the last digit of ``number`` (once in the file): another
    digit, so the file stays valid JSON and reads as another number."""
    data = path.read_bytes()
    assert data.count(number.encode()) == 1, number
    at = data.index(number.encode()) + len(number) - 1
    flipped = bytearray(data)
    flipped[at] ^= 0x01
    path.write_bytes(bytes(flipped))
    assert json.loads(flipped) != json.loads(data)  # still JSON, another value


RECORD = {
    "protocol": {"tasks": ["t"], "budget": 4},
    "experts": {"0": {"t": {"test": 0.9137, "validation": 0.8813}}},
    "values": [0.1, -0.0, 1e-300, 1.5e16, 2**70, True, None, "é ☃ 😀", {"sha256": "ab"}],
}


def test_a_record_round_trips_with_the_checksum_of_its_content(tmp_path):
    path = store.write_json(tmp_path / "results.json", RECORD)
    written = json.loads(path.read_text())
    body = {k: v for k, v in written.items() if k != "checksum"}
    assert body == RECORD and written["checksum"] == _sha256(RECORD)
    assert store.read_record(path) == RECORD  # the entry is not returned
    assert store.read_json(path) == RECORD
    # A record read back and written again (the protocol rewrites results.json) keeps
    # one checksum, of its new content.
    again = store.write_json(path, {**store.read_record(path), "more": 1})
    assert json.loads(again.read_text())["checksum"] == _sha256({**RECORD, "more": 1})
    # Values that are not JSON objects carry none.
    assert json.loads(store.write_json(tmp_path / "l.json", [1, 2]).read_text()) == [1, 2]


def test_a_flipped_digit_in_a_record_is_an_error_naming_the_file(tmp_path):
    path = store.write_json(tmp_path / "results.json", RECORD)
    _flip_digit(path, "0.9137")
    with pytest.raises(ValueError, match="does not match its checksum") as err:
        store.read_record(path)
    assert str(path) in str(err.value) and 'deleting its "checksum" entry' in str(err.value)


def test_a_flipped_digit_in_a_protocol_results_json_is_never_summarized(tmp_path):
    wd = _protocol(tmp_path)
    assert comparison.summarize(wd, samples=20).missing == ()
    _flip_digit(wd / "results.json", "0.9")  # the expert's test score: the normalizer
    with pytest.raises(ValueError, match=f"{wd / 'results.json'} is damaged .*checksum"):
        comparison.summarize(wd, samples=20)


def test_a_flipped_digit_in_a_cache_entry_makes_it_missing(tmp_path):
    path = store.write_json(tmp_path / "trials.json", {"k": {"val_norm": 0.8125}})
    assert store.read_json(path) == {"k": {"val_norm": 0.8125}}
    _flip_digit(path, "0.8125")
    assert json.loads(path.read_text())["k"]["val_norm"] == 0.8124  # another number...
    assert store.read_json(path) is None  # ...never read: computed again


@pytest.mark.parametrize(
    "checksum",
    [5, None, ["sha256:00"], "", "md5:0123", "SHA256:" + "0" * 64, "sha256:" + "0" * 64],
)
def test_a_malformed_or_wrong_checksum_is_damage(tmp_path, checksum):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"x": 1, "checksum": checksum}))
    with pytest.raises(ValueError, match=f"{path} is damaged .*checksum"):
        store.read_record(path)
    assert store.read_json(path) is None


def test_a_record_without_a_checksum_reads_as_before(tmp_path):
    """A record edited by hand is refused until its entry is deleted; then it, like one
    written before records had checksums, reads as it is."""
    path = store.write_json(tmp_path / "results.json", {"accuracy": 0.91, "n": 3})
    edited = {**json.loads(path.read_text()), "accuracy": 0.95}
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="edited by hand"):
        store.read_record(path)
    del edited["checksum"]
    path.write_text(json.dumps(edited))
    assert store.read_record(path) == store.read_json(path) == {"accuracy": 0.95, "n": 3}
    # The benchmarks' committed records, written before checksums, read unchanged
    # (compared as text: a NaN in one is not equal to itself).
    committed = sorted((ROOT / "benchmarks" / "results").rglob("*.json"))
    assert len(committed) > 20
    for p in committed:
        assert json.dumps(store.read_record(p)) == json.dumps(json.loads(p.read_text())), p
    pruning = ROOT / "benchmarks" / "results" / "pruning.json"
    assert _claim_rows.read_benchmark(pruning) == json.loads(pruning.read_text())


def test_the_checksum_key_is_reserved(tmp_path):
    with pytest.raises(ValueError, match='"checksum" entry: the name is reserved'):
        store.write_json(tmp_path / "r.json", {"checksum": "mine"})
    assert not (tmp_path / "r.json").exists()
    # A field of another name (the tokenizer's key record has "sha256") is unaffected.
    path = store.write_json(tmp_path / "k.json", {"key": "abc", "sha256": "0" * 64})
    assert store.read_json(path) == {"key": "abc", "sha256": "0" * 64}


# ----------------------------------------------------------------------------- benchmarks


def test_a_flipped_digit_in_a_benchmark_record_is_refused(tmp_path):
    rdir = tmp_path / "bench"
    result = {"summary": {"ratio": 0.8317}, "nan": float("nan")}
    path = _records.write_results("pruning", result, "body", results_dir=rdir, env={},
                                  command_line="python -m benchmarks.pruning")  # fmt: skip
    written = json.loads(path.read_text())
    assert "NaN" not in path.read_text()  # strict JSON in the file, as before
    body = {k: v for k, v in written.items() if k != "checksum"}
    assert written["checksum"] == _sha256(body)
    assert _claim_rows.read_benchmark(path) == body
    _flip_digit(path, "0.8317")
    with pytest.raises(ValueError, match=f"{path} is damaged .*checksum"):
        _claim_rows.read_benchmark(path)


def test_the_benchmark_writers_readers_refuse_a_damaged_record(tmp_path, capsys):
    """A damaged part is measured again (as one that is not JSON), a damaged record is
    never reworded (which would give the damage a valid checksum), and RESULTS.md shows
    it as unreadable, not its numbers."""
    calls = []

    def run():
        calls.append(1)
        return {"value": 123.4567 + len(calls)}

    path = tmp_path / "results" / "part.json"
    first = _records.recorded_run("[x]", {"seed": 0}, path, False, run, title="x", env={})
    assert first["value"] == 124.4567 and len(calls) == 1
    _flip_digit(path, "124.4567")
    again = _records.recorded_run("[x]", {"seed": 0}, path, False, run, title="x", env={})
    assert again["value"] == 125.4567 and len(calls) == 2  # run again, not read back
    assert "part.json is damaged (its content does not match" in capsys.readouterr().out
    _flip_digit(path, "125.4567")
    with pytest.raises(ValueError, match="part.json is damaged .*checksum.*not reworded"):
        _records.reword_record(path, "new words", "why")
    assert "125.4566" in path.read_text()  # untouched
    md = _records.regenerate_results_md(path.parent).read_text()
    assert "## part\n\n(unreadable: its content does not match its checksum" in md


def test_records_read_back_by_the_training_benchmarks_are_checked(tmp_path):
    """spectrum's default learning rate (from training.json) and training_seeds' recorded
    seeds read the records with plain json: a damaged one gave another number, or
    (spectrum) silently the fixed default rate."""
    from benchmarks import spectrum, training_seeds

    rdir = tmp_path / "results"
    path = _records.write_results("training", {"config": {}, "summary": [],
                                  "lr": 0.0123}, "body", results_dir=rdir, env={},
                                  command_line="python -m benchmarks.training")  # fmt: skip
    assert spectrum._default_lr(rdir, None, 32, False)[0] == 3e-3  # no matching config
    _flip_digit(path, "0.0123")
    with pytest.raises(ValueError, match=f"{path} is damaged .*checksum"):
        spectrum._default_lr(rdir, None, 32, False)
    seed = rdir / "training_seeds" / "training_quick_seed0.json"
    seed.parent.mkdir()
    seed.write_bytes(path.read_bytes())
    args = argparse.Namespace(quick=True)
    with pytest.raises(ValueError, match=f"{seed} is damaged .*checksum"):
        training_seeds._seed_record(0, args, rdir)
