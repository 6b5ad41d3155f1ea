"""The configuration and tokenizer files a safetensors output takes from its base:
which may be copied (:func:`files_to_copy`) and how a copied ``config.json`` is updated
for the tensors written beside it (:func:`adjust_config`)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from etils import epath

from umtam_jax import _json
from umtam_jax.checkpoint import _targets

# A model's config and the files its tokenizer or processor is loaded from (GPT-2 and BERT
# vocabularies, SentencePiece models of Llama, T5, XLM-R and Marian, chat templates).
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "source.spm", "target.spm",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json",
)  # fmt: skip
#: (output, input) embedding names of Hugging Face models whose output embedding may be
#: tied to the input one (``tie_word_embeddings``); a tied model's files leave the output
#: one out. Llama-family decoders, Gemma 3, GPT-2, OPT, Mamba.
TIED_EMBEDDINGS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "model.language_model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),
    ("lm_head.weight", "backbone.embeddings.weight"),
)


#: The most bytes a model folder's ``config.json`` may hold (it is read whole).
MAX_CONFIG_BYTES = 2**26


def read_config(folder: str | os.PathLike[str]) -> Any:
    """The decoded ``config.json`` of a model folder, read as a record (a regular file of
    at most :data:`MAX_CONFIG_BYTES`, opened without blocking: see
    :func:`._targets.read_record`).

    Raises:
      FileNotFoundError: there is none.
      ValueError: it is not a regular file, too large, not UTF-8 or not JSON.
      OSError: it cannot be read.
    """
    return _json.loads(_targets.read_record(epath.Path(folder, "config.json"), MAX_CONFIG_BYTES))


def tie_settings(config: Any) -> list[dict[str, Any]]:
    """The mappings of a Hugging Face ``config.json`` record that may set
    ``tie_word_embeddings``: the record and its ``text_config`` (multimodal models such as
    Gemma 3); none for a record that is not a mapping."""
    if not isinstance(config, dict):
        return []
    text = config.get("text_config")
    return [config] + ([text] if isinstance(text, dict) else [])


#: The largest configuration or tokenizer file copied beside the tensors.
_MAX_COPIED = 2**30


def files_to_copy(source: epath.Path) -> list[str]:
    """The names of :data:`COPIED_FILES` that ``source`` holds, each checked: a regular
    file of at most :data:`_MAX_COPIED` bytes whose real path lies in ``source`` or in a
    Hugging Face cache's ``models--…/blobs`` folder (where the files of its snapshots, and
    of folders downloaded with links into it, lie). A link elsewhere would copy a file the
    model does not own (a private key, a process's environment) into an output that may
    be published.

    Raises:
      ValueError: naming the first file that may not be copied and why.
    """
    names = [n for n in COPIED_FILES if (source / n).exists()]  # a dangling link: skipped
    if not _targets.is_local(source):
        return [n for n in names if (source / n).is_file()]
    root = os.path.realpath(source)
    for name in names:
        path = source / name
        try:
            _targets.check_regular_file(path, _MAX_COPIED)
        except _targets.UnsafeFileError as err:  # "is a FIFO, not a regular file"
            raise ValueError(f"refusing to copy {path}: it {err}") from None
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root and not _in_hub_cache(real):
            raise ValueError(
                f"refusing to copy {path}: it links to {real}, outside the model folder "
                "(such a file would be written into the output); copy it into the folder"
            )
    return names


def _in_hub_cache(real: str) -> bool:
    """Whether ``real`` is a blob of a Hugging Face hub cache: ``…/models--org--name/blobs/
    <hash>`` (or a dataset's or a space's)."""
    blobs = os.path.dirname(real)
    repo = os.path.basename(os.path.dirname(blobs))
    return os.path.basename(blobs) == "blobs" and repo.startswith(
        ("models--", "datasets--", "spaces--")
    )


def adjust_config(
    config: epath.Path, dtype: np.dtype | None, names: set[str], keep_tied: bool = False
) -> None:
    """Rewrites a copied ``config.json`` for the tensors written beside it.

    ``torch_dtype`` (``dtype`` in newer transformers) becomes the tensors' one floating
    dtype, as mergekit does, so that ``from_pretrained(torch_dtype="auto")`` loads the
    written precision. A config that ties the output embedding to the input one
    (``tie_word_embeddings`` true, or absent: transformers' default) while both are
    written (a merge of a tied base with untied experts) gets ``tie_word_embeddings:
    false``: tied, transformers would replace the written output embedding by the input
    one when loading (unless ``keep_tied``: the written one is a copy not to be read). A
    config that is not a JSON object stays as it was.
    """
    try:
        record = _json.loads(config.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(record, dict):
        return
    changed = False
    if dtype is not None:
        for k in ("torch_dtype", "dtype"):
            if k in record and record[k] != dtype.name:  # float32, float16, bfloat16
                record[k], changed = dtype.name, True
    written = not keep_tied and any(out in names and inp in names for out, inp in TIED_EMBEDDINGS)
    for part in tie_settings(record):
        if written and part.get("tie_word_embeddings", True) is not False:
            part["tie_word_embeddings"], changed = False, True
    if changed:
        config.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


#: The files a tokenizer's vocabulary is read from, tokenizer.json first.
_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model",
                     "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")  # fmt: skip


def vocabulary(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What decides a model folder's token ids: the token → id map of its
    ``tokenizer.json`` (its model's vocabulary and its added tokens), else the contents of
    its other vocabulary files, by name; None where it has none of them.

    Raises:
      ValueError: a vocabulary file that cannot be read, naming it.
    """
    names = [n for n in _VOCABULARY_FILES if os.path.isfile(os.path.join(folder, n))]
    if not names:
        return None
    path = os.path.join(folder, names[0])
    try:
        for name in names:  # read whole: each a regular file of a bounded size
            _targets.check_regular_file(epath.Path(folder, name), _MAX_COPIED)
        if names[0] != "tokenizer.json":
            return {n: epath.Path(folder, n).read_bytes() for n in names}
        record = _json.loads(epath.Path(path).read_text())
        vocab = record["model"]["vocab"]
        ids = dict(vocab) if isinstance(vocab, dict) else {v[0]: i for i, v in enumerate(vocab)}
        ids.update({t["content"]: t["id"] for t in record.get("added_tokens") or []})
    except (OSError, ValueError, KeyError, TypeError, IndexError, _targets.UnsafeFileError) as e:
        raise ValueError(f"cannot read the vocabulary of {folder} from {path}: {e}") from None
    return {"tokenizer.json": ids}


def vocabulary_difference(reference: dict[str, Any], model: str) -> str | None:
    """Why ``model``'s token ids may not be those of the :func:`vocabulary` ``reference``
    (a token both have at different ids, a token one lacks, other vocabulary files), or
    None where they are the same or ``model`` has no tokenizer files (mergekit then takes
    them to be the same).

    Raises:
      ValueError: a vocabulary file of ``model`` that cannot be read.
    """
    theirs = vocabulary(model)
    if theirs is None or reference == theirs:
        return None
    if reference.keys() != theirs.keys():
        return f"their vocabularies are in different files ({sorted(reference)}, {sorted(theirs)})"
    if "tokenizer.json" not in reference:
        return "their vocabulary files differ"
    a, b = reference["tokenizer.json"], theirs["tokenizer.json"]
    token = next((t for t in a if a[t] != b.get(t)), None)
    if token is None:  # every token of the reference at its id: the model has more
        token = next(t for t in b if t not in a)
    return f"token {token!r} has id {a.get(token)} in the reference and {b.get(token)} here"


def padded_embeddings(folder: str, vocab: dict[str, Any]) -> str | None:
    """Why aligning embedding rows to ``folder``'s tokenizer (its :func:`vocabulary`
    ``vocab``) would change their number: its ``config.json`` gives a ``vocab_size`` other
    than its ``tokenizer.json``'s token count (embeddings padded past the tokenizer, as
    Qwen2.5's); None where they agree or either is unknown."""
    ids = vocab.get("tokenizer.json")
    try:
        record = read_config(folder)
    except (OSError, ValueError):
        return None
    sizes = [part.get("vocab_size") for part in tie_settings(record)]
    size = next((n for n in sizes if type(n) is int), None)
    tokens = max(ids.values(), default=-1) + 1 if ids else None
    if size is None or tokens is None or size == tokens:
        return None
    return f"its config.json has vocab_size {size} and its tokenizer {tokens} tokens"
