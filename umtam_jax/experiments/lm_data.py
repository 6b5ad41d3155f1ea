"""Language-modelling corpus: the reStructuredText sources of the Python docs.

The sources come from Debian's ``python3.11-doc`` package, fetched with
``apt-get download`` and unpacked with ``dpkg -x`` into the cache directory, so the
system Python is never upgraded. A byte-level BPE tokenizer is trained on the
training documents with ``tokenizers`` and the token streams are cached as NPZ::

    from umtam_jax.experiments import lm_data

    train, val = lm_data.lm_token_arrays(vocab_size=4096)
    batch = lm_data.sample_lm_batch(train, batch_size=8, seq_len=128, rng=rng)

Run ``python -m umtam_jax.experiments.lm_data`` to fetch the corpus and build the
default tokenizer and token arrays ahead of time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from umtam_jax.experiments import store
from umtam_jax.experiments._keys import stable_hash
from umtam_jax.experiments._outputs import check_replaceable
from umtam_jax.experiments.data import MissingDataError, cache_dir

__all__ = [
    "EOT",
    "lm_documents",
    "lm_token_arrays",
    "python_docs_dir",
    "sample_lm_batch",
    "split_documents",
    "train_bpe_tokenizer",
]

DOC_PACKAGE = "python3.11-doc"
_SOURCES = Path("usr/share/doc/python3.11/html/_sources")
#: End-of-text token inserted between documents (id 0 of every trained tokenizer).
EOT = "<|endoftext|>"


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else cache_dir()


def python_docs_dir(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Returns the directory of ``*.rst.txt`` sources, fetching them if needed.

    Looks in ``$UMTAM_PYDOC_SOURCES``, in the cache, then in a system-wide install of
    ``python3.11-doc``; otherwise runs ``apt-get download python3.11-doc`` and
    ``dpkg -x`` into ``<cache>/python3.11-doc``.

    Args:
        root: Cache directory (default: :func:`~umtam_jax.experiments.data.cache_dir`).
        download: Fetch the package when no copy is found.

    Returns:
        The ``_sources`` directory.

    Raises:
        MissingDataError: The sources are absent and cannot be fetched.
    """
    env = os.environ.get("UMTAM_PYDOC_SOURCES")
    dest = _root(root) / DOC_PACKAGE
    for cand in (Path(env) if env else None, dest / _SOURCES, Path("/") / _SOURCES):
        if cand is not None and cand.is_dir() and any(cand.rglob("*.rst.txt")):
            return cand
    hint = (
        f"The Python documentation sources ({DOC_PACKAGE}) were not found. Fetch them with:\n"
        f"    apt-get update && cd $(mktemp -d) && apt-get download {DOC_PACKAGE} && "
        f"dpkg -x {DOC_PACKAGE}_*.deb {dest}\n"
        "(or run umtam_jax/experiments/install_data.sh)"
    )
    if not download or shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise MissingDataError(hint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        os.chmod(tmp, 0o777)  # lets apt's sandbox user write the .deb
        try:
            subprocess.run(
                ["apt-get", "download", "-q", DOC_PACKAGE],
                cwd=tmp,
                check=True,
                capture_output=True,
                stdin=subprocess.DEVNULL,
            )
            deb = next(Path(tmp).glob(f"{DOC_PACKAGE}_*.deb"))
            unpacked = Path(tmp) / "x"
            subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
        except (subprocess.CalledProcessError, StopIteration) as e:
            raise MissingDataError(f"{hint}\n(automatic fetch failed: {e})") from e
        if dest.exists():  # an incomplete copy: moved aside, deleted with ``tmp``
            os.replace(dest, Path(tmp) / "old")
        os.replace(unpacked, dest)
    return dest / _SOURCES


def lm_documents(root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """Returns ``(relative_path, text)`` for every ``.rst.txt`` source, sorted by path.

    Args:
        root: Cache directory.
    """
    src = python_docs_dir(root)
    return [
        (p.relative_to(src).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
        for p in sorted(src.rglob("*.rst.txt"))
    ]


def split_documents(
    docs: list[tuple[str, str]], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Splits documents (whole files) into train and validation, deterministically.

    Args:
        docs: ``(path, text)`` pairs.
        val_fraction: Fraction of documents for validation (at least one).
        seed: Seed of the permutation.

    Returns:
        ``(train_docs, val_docs)``, each in path order.

    Example:
      >>> from umtam_jax.experiments.lm_data import split_documents
      >>> train, val = split_documents([(f"d{i}", "text") for i in range(10)], 0.2, seed=0)
      >>> len(train), [path for path, _ in val]
      (8, ['d0', 'd6'])
    """
    rng = np.random.default_rng([seed, zlib.crc32(b"split_documents")])
    perm = rng.permutation(len(docs))
    n_val = max(1, int(round(len(docs) * val_fraction)))
    val_idx = set(perm[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def train_bpe_tokenizer(
    texts: list[str] | None = None,
    vocab_size: int = 4096,
    *,
    path: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
):
    """Trains (or loads from cache) a byte-level BPE tokenizer.

    Args:
        texts: Training texts (default: the training split of :func:`lm_documents`).
        vocab_size: Vocabulary size, special token included.
        path: Where to cache the tokenizer JSON (default:
            ``<cache>/lm/bpe-<vocab>-seed<seed>-val<frac>.json`` when ``texts`` is
            None; no caching for explicit texts unless ``path`` is given). A cached
            tokenizer is used only if it was trained on the same texts with the same
            vocabulary size (recorded beside it in ``<path>.key.json`` with the file's
            SHA-256); a damaged one, or one the record does not describe, is trained
            again. A file at ``path`` without such a record (one this function did not
            write) is never replaced unless ``overwrite``.
        root: Cache directory.
        val_fraction: Validation fraction of the default document split.
        seed: Seed of the default document split.
        overwrite: Replace a file at ``path`` that this function did not write.

    Returns:
        A ``tokenizers.Tokenizer``; ``EOT`` has id 0.

    Raises:
        FileExistsError: ``path`` holds a file this function did not write (and not
            ``overwrite``), or is a symbolic link.

    Example:
      >>> from umtam_jax.experiments.lm_data import train_bpe_tokenizer
      >>> tokenizer = train_bpe_tokenizer(["the cat sat on the mat"] * 20, vocab_size=300)
      >>> tokenizer.decode(tokenizer.encode("the cat").ids)
      'the cat'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path is None and texts is None:  # the cache's own file: replaced when damaged
        path = _root(root) / "lm" / f"bpe-{vocab_size}-seed{seed}-val{val_fraction}.json"
        overwrite = True
    key = stable_hash([vocab_size, texts if texts is not None else [seed, val_fraction]])
    if path is not None:
        record = store.read_json(f"{path}.key.json")
        try:
            cached = Path(path).read_text(encoding="utf-8")
            # The record names the file's content: a file it does not describe (a crash
            # between the two writes) is not taken for this tokenizer.
            # A default-path file without a record predates it: its name holds its key.
            digest = hashlib.sha256(cached.encode()).hexdigest()
            if record == {"key": key, "sha256": digest} or (record is None and texts is None):
                return Tokenizer.from_str(cached)
        except Exception:  # noqa: BLE001 - missing or damaged: trained again
            pass
        for p in (Path(path), Path(f"{path}.key.json")):  # refused before the training
            check_replaceable(p, lambda _: _is_key_record(record), overwrite=overwrite,
                              what="the tokenizer", how="pass overwrite=True")  # fmt: skip
    if texts is None:
        train_docs, _ = split_documents(lm_documents(root), val_fraction, seed)
        texts = [t for _, t in train_docs]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if path is not None:
        text = tok.to_str(pretty=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        # The record first: a crash before the tokenizer's write leaves a record that
        # marks the file as this cache's (so it is replaced) but does not describe it.
        store.write_json(f"{path}.key.json", {"key": key, "sha256": digest})
        store.write_atomic(path, lambda f: f.write(text.encode()))
    return tok


def _is_key_record(record: Any) -> bool:
    """Whether ``record`` is what :func:`train_bpe_tokenizer` writes beside its file."""
    return isinstance(record, dict) and set(record) == {"key", "sha256"}


def _encode_docs(tok, docs: list[tuple[str, str]]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch([t for _, t in docs]):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16 if tok.get_vocab_size() <= 65536 else np.int32)


def lm_token_arrays(
    vocab_size: int = 4096,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the train and validation token streams of the Python-docs corpus.

    Documents are split whole (:func:`split_documents`), tokenized with
    :func:`train_bpe_tokenizer` (trained on the training documents) and concatenated
    with ``EOT`` after each. Cached as ``<cache>/lm/tokens-<vocab>-seed<seed>-val<frac>.npz``.

    Args:
        vocab_size: BPE vocabulary size.
        val_fraction: Fraction of documents held out.
        seed: Seed of the document split.
        root: Cache directory.

    Returns:
        ``(train, val)`` int32 arrays of token ids.
    """
    base = _root(root) / "lm"
    path = base / f"tokens-{vocab_size}-seed{seed}-val{val_fraction}.npz"
    cached = store.read_npz(path)  # None: missing or damaged, built again
    if cached is not None and {"train", "val"} <= cached.keys():
        return cached["train"].astype(np.int32), cached["val"].astype(np.int32)
    tok = train_bpe_tokenizer(
        vocab_size=vocab_size, root=root, val_fraction=val_fraction, seed=seed
    )
    train_docs, val_docs = split_documents(lm_documents(root), val_fraction, seed)
    train, val = _encode_docs(tok, train_docs), _encode_docs(tok, val_docs)
    store.write_npz(path, {"train": train, "val": val})
    meta = {"vocab_size": vocab_size, "train_tokens": int(train.size), "val_tokens": int(val.size)}
    store.write_json(base / f"tokens-{vocab_size}-seed{seed}-val{val_fraction}.json", meta)
    return train.astype(np.int32), val.astype(np.int32)


def sample_lm_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
) -> np.ndarray:
    """Draws random windows of ``seq_len + 1`` tokens (inputs and shifted targets).

    Args:
        tokens: 1-D token stream.
        batch_size: Number of windows.
        seq_len: Model context length.
        rng: NumPy generator.

    Returns:
        int32 array ``[batch_size, seq_len + 1]``.

    Example:
      >>> import numpy as np
      >>> from umtam_jax.experiments.lm_data import sample_lm_batch
      >>> sample_lm_batch(np.arange(100), 2, 4, np.random.default_rng(0)).tolist()
      [[80, 81, 82, 83, 84], [60, 61, 62, 63, 64]]
    """
    starts = rng.integers(0, tokens.size - seq_len - 1, size=batch_size)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def main() -> None:
    """Fetches the corpus and builds the default tokenizer and token arrays."""
    src = python_docs_dir()
    train, val = lm_token_arrays()
    print(f"sources: {src}\ntrain tokens: {train.size:,}  val tokens: {val.size:,}")


if __name__ == "__main__":
    main()
