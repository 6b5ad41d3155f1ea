"""A small decoder-only GPT (pre-LN, learned positions) in Flax linen.

Parameters are a plain nested dict (linen ``params``); every kernel is 2-D
``[in, out]``. Layout::

    {"wte": {"embedding": [V, D]}, "wpe": {"embedding": [context, D]},
     "block_0": {"ln_1": {"scale", "bias"},
                 "attn": {"qkv": {"kernel": [D, 3D], "bias"}, "proj": {"kernel", "bias"}},
                 "ln_2": {"scale", "bias"},
                 "mlp": {"fc": {"kernel": [D, F], "bias"}, "proj": {"kernel": [F, D], "bias"}}},
     ..., "ln_f": {"scale", "bias"},
     "lm_head": {"kernel": [D, V]}}          # only when tie_embeddings=False

Example::

    cfg = GPTConfig(vocab_size=4096, context=128, d_model=256, n_layers=4, n_heads=4)
    params = init_gpt(jax.random.key(0), cfg)
    loss = gpt_loss(params, tokens, config=cfg)   # tokens: int [B, context + 1]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["GPT", "GPTConfig", "gpt_apply", "gpt_loss", "init_gpt", "make_gpt_train_step"]

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """GPT hyper-parameters.

    Attributes:
        vocab_size: Vocabulary size.
        context: Maximum sequence length (number of learned positions).
        d_model: Width.
        n_layers: Transformer blocks.
        n_heads: Attention heads (must divide ``d_model``).
        d_ff: Feed-forward width (default ``4 * d_model``).
        tie_embeddings: Output projection is ``wte`` transposed when True.
        dropout_rate: Dropout (used only when a dropout rng is given).
        layer_norm_eps: LayerNorm epsilon.

    Example:
      >>> from umtam_jax.experiments.models.gpt import GPTConfig
      >>> GPTConfig(d_model=64).ff
      256
    """

    vocab_size: int = 4096
    context: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    layer_norm_eps: float = 1e-5

    @property
    def ff(self) -> int:
        """Feed-forward width."""
        return self.d_ff or 4 * self.d_model


def _dense(features: int, name: str, std: float = 0.02) -> nn.Dense:
    return nn.Dense(features, name=name, kernel_init=nn.initializers.normal(std))


class _Attention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.config
        b, t, d = x.shape
        dh = d // c.n_heads
        qkv = _dense(3 * d, "qkv")(x).reshape(b, t, 3, c.n_heads, dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh).astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(c.dropout_rate)(probs, deterministic=deterministic)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return _dense(d, "proj", 0.02 / np.sqrt(2 * c.n_layers))(y)


class _MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = nn.gelu(_dense(c.ff, "fc")(x))
        return _dense(c.d_model, "proj", 0.02 / np.sqrt(2 * c.n_layers))(h)


class _Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.config
        drop = nn.Dropout(c.dropout_rate)
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="ln_1")(x)
        x = x + drop(_Attention(c, name="attn")(h, deterministic), deterministic=deterministic)
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="ln_2")(x)
        return x + drop(_MLP(c, name="mlp")(h), deterministic=deterministic)


class GPT(nn.Module):
    """Decoder-only transformer returning next-token logits ``[B, T, vocab]``.

    GPT-2's architecture (pre-LayerNorm blocks, learned positions, tied embeddings by
    default), without its pretrained weights.

    Attributes:
        config: The model's hyper-parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax.experiments.models.gpt import GPT, GPTConfig
      >>> model = GPT(GPTConfig(vocab_size=32, context=8, d_model=16, n_layers=1, n_heads=2))
      >>> tokens = jnp.zeros((2, 8), jnp.int32)
      >>> variables = jax.jit(model.init)(jax.random.key(0), tokens)  # eager init: slow
      >>> model.apply(variables, tokens).shape
      (2, 8, 32)

    References:
        Radford et al., "Language Models are Unsupervised Multitask Learners", 2019.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens, deterministic: bool = True):
        c = self.config
        t = tokens.shape[1]
        if t > c.context:
            raise ValueError(f"sequence length {t} exceeds context {c.context}")
        init = nn.initializers.normal(0.02)
        wte = nn.Embed(c.vocab_size, c.d_model, embedding_init=init, name="wte")
        x = wte(tokens) + nn.Embed(c.context, c.d_model, embedding_init=init, name="wpe")(
            jnp.arange(t)[None, :]
        )
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        for i in range(c.n_layers):
            x = _Block(c, name=f"block_{i}")(x, deterministic)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="ln_f")(x)
        if c.tie_embeddings:
            return wte.attend(x)
        return nn.Dense(c.vocab_size, use_bias=False, kernel_init=init, name="lm_head")(x)


def init_gpt(key: jax.Array, config: GPTConfig) -> Params:
    """Random GPT parameters (a plain nested dict).

    Args:
        key: The initialization's random key.
        config: Model configuration.

    Returns:
        ``{"wte", "wpe", "block_0", ..., "ln_f"}`` (and ``"lm_head"`` when untied).

    Example:
      >>> import jax
      >>> from umtam_jax.experiments.models.gpt import GPTConfig, init_gpt
      >>> config = GPTConfig(vocab_size=32, context=8, d_model=16, n_layers=1, n_heads=2)
      >>> sorted(init_gpt(jax.random.key(0), config))
      ['block_0', 'ln_f', 'wpe', 'wte']
    """
    tokens = jnp.zeros((1, min(8, config.context)), jnp.int32)
    # jit: eager linen init compiles every primitive separately (seconds on CPU).
    return dict(jax.jit(GPT(config).init)(key, tokens)["params"])


def gpt_apply(
    params: Params, tokens: jax.Array, *, config: GPTConfig, dropout_rng: jax.Array | None = None
) -> jax.Array:
    """Next-token logits ``[B, T, vocab]`` for int tokens ``[B, T]``.

    Args:
        params: GPT parameters.
        tokens: Token ids, ``T <= config.context``.
        config: Model configuration.
        dropout_rng: Enables dropout when given.

    Returns:
        The logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax.experiments.models.gpt import GPTConfig, gpt_apply, init_gpt
      >>> config = GPTConfig(vocab_size=32, context=8, d_model=16, n_layers=1, n_heads=2)
      >>> params = init_gpt(jax.random.key(0), config)
      >>> gpt_apply(params, jnp.zeros((2, 8), jnp.int32), config=config).shape
      (2, 8, 32)
    """
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    # No mutable collections: apply returns the output alone, not (output, variables).
    return GPT(config).apply(  # type: ignore[return-value]
        {"params": params}, tokens, deterministic=dropout_rng is None, rngs=rngs
    )


def gpt_loss(
    params: Params, tokens: jax.Array, *, config: GPTConfig, dropout_rng: jax.Array | None = None
) -> jax.Array:
    """Mean next-token cross-entropy (nats) on windows ``[B, T + 1]``.

    Args:
        params: GPT parameters.
        tokens: Token windows; inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``.
        config: Model configuration.
        dropout_rng: Enables dropout when given.

    Returns:
        The scalar loss.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from umtam_jax.experiments.models.gpt import GPTConfig, gpt_loss, init_gpt
      >>> config = GPTConfig(vocab_size=32, context=8, d_model=16, n_layers=1, n_heads=2)
      >>> params = init_gpt(jax.random.key(0), config)
      >>> tokens = jnp.arange(18, dtype=jnp.int32).reshape(2, 9)
      >>> round(float(gpt_loss(params, tokens, config=config)), 1)  # about log(32) at init
      3.5
    """
    logits = gpt_apply(params, tokens[:, :-1], config=config, dropout_rng=dropout_rng)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]
    ).mean()


def make_gpt_train_step(tx: optax.GradientTransformation, *, config: GPTConfig) -> Callable:
    """A jitted ``step(params, opt_state, tokens, dropout_rng=None) -> (params, opt_state, loss)``.

    Args:
        tx: Any Optax transformation.
        config: Model configuration.

    Returns:
        The jitted step.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from umtam_jax.experiments.models.gpt import GPTConfig, init_gpt, make_gpt_train_step
      >>> config = GPTConfig(vocab_size=32, context=8, d_model=16, n_layers=1, n_heads=2)
      >>> params = init_gpt(jax.random.key(0), config)
      >>> tx = optax.adam(1e-2)  # umtam_jax.umtam(...) alike
      >>> step, state = make_gpt_train_step(tx, config=config), tx.init(params)
      >>> tokens = jnp.arange(18, dtype=jnp.int32).reshape(2, 9)
      >>> losses = []
      >>> for _ in range(5):
      ...     params, state, loss = step(params, state, tokens)
      ...     losses.append(float(loss))
      >>> losses[-1] < losses[0]
      True
    """

    @jax.jit
    def step(params, opt_state, tokens, dropout_rng=None):
        loss, grads = jax.value_and_grad(gpt_loss)(
            params, tokens, config=config, dropout_rng=dropout_rng
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
