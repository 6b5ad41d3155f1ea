"""Tests of the language-modelling corpus pipeline (BPE tokenizer, token arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from umtam_jax.experiments import lm_data

DOCS = {
    "library/a.rst.txt": "The :mod:`os` module\n==================\n\nUse ``os.path.join``.\n" * 20,
    "library/b.rst.txt": ".. function:: print(*objects, sep=' ')\n\n   Print objects.\n" * 20,
    "tutorial/c.rst.txt": "Python is an easy to learn, powerful language. Ünïcode too.\n" * 20,
    "d.rst.txt": "def f(x):\n    return x + 1  # comment\n" * 20,
}


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch):
    src = tmp_path / "sources"
    for rel, text in DOCS.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    monkeypatch.setenv("UMTAM_PYDOC_SOURCES", str(src))
    return tmp_path / "cache"


def test_documents_and_split(fake_corpus):
    docs = lm_data.lm_documents(fake_corpus)
    assert [p for p, _ in docs] == sorted(DOCS)
    train, val = lm_data.split_documents(docs, val_fraction=0.25, seed=0)
    assert len(val) == 1 and len(train) == 3
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert lm_data.split_documents(docs, 0.25, 0) == (train, val)


def test_bpe_roundtrip_and_token_arrays(fake_corpus):
    tok = lm_data.train_bpe_tokenizer([t for t in DOCS.values()], vocab_size=400)
    assert tok.token_to_id(lm_data.EOT) == 0
    assert 256 < tok.get_vocab_size() <= 400
    s = "def g(y):\n    return ünïcode  # ok"
    assert tok.decode(tok.encode(s).ids) == s

    train, val = lm_data.lm_token_arrays(vocab_size=300, val_fraction=0.25, root=fake_corpus)
    assert train.dtype == np.int32 and train.ndim == 1 and val.size > 0
    assert train.max() < 300 and (train == 0).sum() == 3 and (val == 0).sum() == 1
    assert (fake_corpus / "lm" / "tokens-300-seed0-val0.25.npz").exists()
    train2, _ = lm_data.lm_token_arrays(vocab_size=300, val_fraction=0.25, root=fake_corpus)
    np.testing.assert_array_equal(train, train2)

    batch = lm_data.sample_lm_batch(train, 4, 16, np.random.default_rng(0))
    assert batch.shape == (4, 17) and batch.dtype == np.int32


def test_caches_follow_their_inputs_and_damaged_ones_are_rebuilt(fake_corpus, tmp_path):
    path = tmp_path / "bpe.json"
    texts = list(DOCS.values())
    first = lm_data.train_bpe_tokenizer(texts, vocab_size=300, path=path)
    assert lm_data.train_bpe_tokenizer(texts, vocab_size=300, path=path).to_str() == (
        first.to_str()
    )
    bigger = lm_data.train_bpe_tokenizer(texts, vocab_size=400, path=path)  # another key
    assert bigger.get_vocab_size() > first.get_vocab_size()
    other = lm_data.train_bpe_tokenizer(["zebra quagga " * 30] * 20, vocab_size=400, path=path)
    assert other.encode("zebra").tokens == ["zebra"] and bigger.encode("zebra").tokens != ["zebra"]
    path.write_text("{ damaged")
    assert lm_data.train_bpe_tokenizer(texts, vocab_size=300, path=path).to_str() == (
        first.to_str()
    )
    # A crash between the two writes: another tokenizer beside this one's record.
    path.write_text(other.to_str(pretty=True))
    assert lm_data.train_bpe_tokenizer(texts, vocab_size=300, path=path).to_str() == (
        first.to_str()
    )
    train, val = lm_data.lm_token_arrays(vocab_size=300, val_fraction=0.25, root=fake_corpus)
    arrays = fake_corpus / "lm" / "tokens-300-seed0-val0.25.npz"
    arrays.write_bytes(arrays.read_bytes()[:60])  # a truncated cache
    again = lm_data.lm_token_arrays(vocab_size=300, val_fraction=0.25, root=fake_corpus)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], val)


def test_missing_corpus_names_commands(tmp_path, monkeypatch):
    monkeypatch.delenv("UMTAM_PYDOC_SOURCES", raising=False)
    monkeypatch.setattr(lm_data, "_SOURCES", lm_data.Path("no/such/dir"))
    with pytest.raises(lm_data.MissingDataError, match="apt-get download python3.11-doc"):
        lm_data.python_docs_dir(tmp_path, download=False)


def test_real_corpus_if_present():
    try:
        src = lm_data.python_docs_dir(download=False)
    except lm_data.MissingDataError as e:
        pytest.skip(f"python3.11-doc sources not fetched: {e}")
    files = list(src.rglob("*.rst.txt"))
    assert len(files) > 400
    assert any(f.name == "functions.rst.txt" for f in files)
