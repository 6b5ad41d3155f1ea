"""A sequence classifier on the MiniLM encoder: a linear head on the mean-pooled states.

Its parameters are ``{"encoder": <the encoder's>, "head": {"kernel": [H, C], "bias": [C]}}``
(plain nested dicts, so they train with any Optax transformation and merge as they are).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from umtam_jax.experiments.models.classifier import (
  ...     init_classifier, make_classifier_train_step)
  >>> from umtam_jax.experiments.models.minilm import BertConfig
  >>> config = BertConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2,
  ...                     intermediate_size=16, max_position=8)
  >>> params = init_classifier(jax.random.key(0), 3, config=config)
  >>> tx = optax.adamw(1e-3)
  >>> step = make_classifier_train_step(tx, config=config)
  >>> batch = {"input_ids": jnp.ones((2, 8), jnp.int32),
  ...          "attention_mask": jnp.ones((2, 8), jnp.int32),
  ...          "token_type_ids": jnp.zeros((2, 8), jnp.int32),
  ...          "labels": jnp.array([0, 2])}
  >>> params, opt_state, loss = step(params, tx.init(params), batch)
  >>> bool(jnp.isfinite(loss)), params["head"]["kernel"].shape
  (True, (8, 3))

References:
  Reimers & Gurevych, "Sentence-BERT", arXiv:1908.10084 (mean pooling).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from umtam_jax.experiments.models.minilm import (
    MINILM_L6,
    Batch,
    BertConfig,
    Params,
    encoder_apply,
    init_encoder,
    mean_pool,
)

__all__ = [
    "classifier_apply",
    "classifier_loss",
    "init_classifier",
    "make_classifier_train_step",
]


def init_classifier(
    key: jax.Array,
    num_labels: int,
    encoder_params: Params | None = None,
    *,
    config: BertConfig = MINILM_L6,
) -> Params:
    """Builds classifier parameters ``{"encoder": ..., "head": {"kernel", "bias"}}``.

    Args:
        key: PRNG key (head init; encoder init too when ``encoder_params`` is None).
        num_labels: Number of classes.
        encoder_params: Pretrained encoder (e.g. :func:`load_minilm`); random if None.
        config: Model configuration.

    Returns:
        The parameters (a plain nested dict).
    """
    k_enc, k_head = jax.random.split(key)
    if encoder_params is None:
        encoder_params = init_encoder(k_enc, config)
    head = {
        "kernel": 0.02 * jax.random.normal(k_head, (config.hidden_size, num_labels)),
        "bias": jnp.zeros((num_labels,)),
    }
    return {"encoder": encoder_params, "head": head}


def classifier_apply(
    params: Params,
    batch: Batch,
    *,
    config: BertConfig = MINILM_L6,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Logits ``[B, num_labels]`` from the mean-pooled encoder output.

    Args:
        params: Classifier parameters (see :func:`init_classifier`).
        batch: Tokenized batch (see :func:`tokenize_batch`).
        config: Model configuration.
        dropout_rng: Enables dropout (encoder and before the head) when given.

    Returns:
        The logits (the module's example trains through them).
    """
    r1 = r2 = None
    if dropout_rng is not None:
        r1, r2 = jax.random.split(dropout_rng)
    h = encoder_apply(params["encoder"], batch, config=config, dropout_rng=r1)
    pooled = mean_pool(h, batch["attention_mask"])
    if r2 is not None and config.dropout_rate > 0:
        keep = jax.random.bernoulli(r2, 1.0 - config.dropout_rate, pooled.shape)
        pooled = jnp.where(keep, pooled / (1.0 - config.dropout_rate), 0.0)
    return pooled @ params["head"]["kernel"] + params["head"]["bias"]


def classifier_loss(
    params: Params,
    batch: Batch,
    *,
    config: BertConfig = MINILM_L6,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy against ``batch["labels"]``.

    Args:
        params: Classifier parameters.
        batch: Tokenized batch with int ``labels`` ``[B]``; an optional float
            ``weights`` ``[B]`` masks padding examples.
        config: Model configuration.
        dropout_rng: Enables dropout when given.

    Returns:
        ``(loss, logits)`` (use ``jax.value_and_grad(..., has_aux=True)``).
    """
    logits = classifier_apply(params, batch, config=config, dropout_rng=dropout_rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    w = batch.get("weights")
    if w is None:
        return ce.mean(), logits
    return (ce * w).sum() / jnp.maximum(w.sum(), 1.0), logits


def make_classifier_train_step(
    tx: optax.GradientTransformation, *, config: BertConfig = MINILM_L6
) -> Callable:
    """A jitted ``step(params, opt_state, batch, dropout_rng) -> (params, opt_state, loss)``.

    Args:
        tx: Any Optax transformation (AdamW, UMTAM, ...).
        config: Model configuration.

    Returns:
        The jitted step; pass ``dropout_rng=None`` to train without dropout.
    """

    @jax.jit
    def step(params, opt_state, batch, dropout_rng=None):
        (loss, _), grads = jax.value_and_grad(classifier_loss, has_aux=True)(
            params, batch, config=config, dropout_rng=dropout_rng
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
