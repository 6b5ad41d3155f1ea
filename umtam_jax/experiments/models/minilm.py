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

A sequence classifier on this encoder: :mod:`.classifier`; the pretrained weights and
the tokenizer: :mod:`.minilm_pretrained`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MINILM_L6",
    "BertConfig",
    "BertEncoder",
    "embed_sentences",
    "encoder_apply",
    "init_encoder",
    "mean_pool",
]

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
        ``{"embeddings", "layer_0", ...}``, as :func:`.minilm_pretrained.load_minilm` returns them.

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
    # No mutable collections: apply returns the output alone, not (output, variables).
    return BertEncoder(config).apply(  # type: ignore[return-value]
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
        batch: Tokenized batch (see :func:`.minilm_pretrained.tokenize_batch`).
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
