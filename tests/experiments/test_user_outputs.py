"""Outputs never replace what the library did not write: symbolic links, a user's file at
a claims table's, tokenizer's or figure's path, a foreign ``results.json``."""

from __future__ import annotations

import os

import pytest

from umtam_jax.experiments import claims, lm_data, protocol, reporting, store

TEXTS = ["the cat sat on the mat"] * 20


def test_write_atomic_refuses_a_symbolic_link(tmp_path):
    target = tmp_path / "mine.txt"
    target.write_text("mine")
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match=f"refusing to write {link}: it is a symbolic"):
        store.write_atomic(link, lambda f: f.write(b"new"))
    assert link.is_symlink() and target.read_text() == "mine"
    with pytest.raises(FileExistsError, match="symbolic link"):
        store.write_json(link, {"x": 1})
    assert sorted(os.listdir(tmp_path)) == ["mine.txt", "out.txt"]  # no temporary left


def test_claims_out_replaces_its_own_table_only(tmp_path):
    out = tmp_path / "claims.md"
    out.write_text("my own notes\n")
    with pytest.raises(FileExistsError, match=f"refusing to write the claims table to {out}"):
        claims.main(["--benchmarks", str(tmp_path), "--out", str(out)])
    assert out.read_text() == "my own notes\n"
    assert claims.main(["--benchmarks", str(tmp_path), "--out", str(out), "--overwrite"]) == 0
    table = out.read_text()
    assert table.startswith("# Paper claims")
    assert claims.main(["--benchmarks", str(tmp_path), "--out", str(out)]) == 0  # its own
    assert out.read_text() == table


def test_a_tokenizer_path_holding_a_users_file_is_refused(tmp_path):
    path = tmp_path / "my_tokenizer.json"
    path.write_text('{"my": "hand-tuned tokenizer"}')
    with pytest.raises(FileExistsError, match=f"refusing to write the tokenizer to {path}"):
        lm_data.train_bpe_tokenizer(TEXTS, vocab_size=300, path=path)
    assert sorted(os.listdir(tmp_path)) == ["my_tokenizer.json"]
    assert path.read_text() == '{"my": "hand-tuned tokenizer"}'
    first = lm_data.train_bpe_tokenizer(TEXTS, vocab_size=300, path=path, overwrite=True)
    # Its own file (described by the record beside it) is replaced, even damaged.
    path.write_text("{ damaged")
    again = lm_data.train_bpe_tokenizer(TEXTS, vocab_size=300, path=path)
    assert again.to_str() == first.to_str()
    other = lm_data.train_bpe_tokenizer(TEXTS, vocab_size=280, path=path)
    assert other.get_vocab_size() <= 280


def test_a_key_record_path_holding_a_users_file_is_refused(tmp_path):
    path = tmp_path / "tok.json"
    record = tmp_path / "tok.json.key.json"
    record.write_text('{"mine": 1}')
    with pytest.raises(FileExistsError, match=f"to {record}"):
        lm_data.train_bpe_tokenizer(TEXTS, vocab_size=300, path=path)
    assert record.read_text() == '{"mine": 1}' and not path.exists()


def test_save_figure_replaces_its_own_figures_only(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "fig.png"
    fig, _ = plt.subplots()
    fig.savefig(path)  # the user's own figure
    mine = path.read_bytes()
    fig, _ = plt.subplots()
    with pytest.raises(FileExistsError, match=f"refusing to write the figure to {path}"):
        reporting.save_figure(fig, path)
    assert path.read_bytes() == mine and not plt.fignum_exists(fig.number)
    reporting.save_figure(plt.subplots()[0], path, overwrite=True)
    assert path.read_bytes() != mine
    reporting.save_figure(plt.subplots()[0], path)  # its own: replaced


@pytest.mark.parametrize(
    "text", ['{"accuracy": 0.91, "notes": "my thesis"}', "[1, 2, 3]", '{"protocol": "x"}']
)
def test_a_foreign_results_json_is_never_taken_over(tmp_path, text):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(ValueError, match="results.json is not the record of a protocol run"):
        protocol.run_protocol(
            ["kjv_section", "fortune_topic"], ["ties"], [0], size="medium", workdir=tmp_path,
            base_encoder=object(), tokenizer=object(),
        )  # fmt: skip
    assert (tmp_path / "results.json").read_text() == text
