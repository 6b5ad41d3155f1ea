"""Tests of the MiniLM-L6 encoder, its pretrained weights and the classifier."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.compilations import compilations
from umtam_jax.experiments.models import classifier, minilm, minilm_pretrained

HAS_WHEEL = importlib.util.find_spec(minilm_pretrained.MINILM_PACKAGE) is not None
needs_wheel = pytest.mark.skipif(
    not HAS_WHEEL,
    reason=f"pretrained MiniLM wheel not installed ({minilm_pretrained.MINILM_PIP})",
)

# The usage example of sentence-transformers (all-MiniLM-L6-v2) and its printed
# cosine similarities: (0, 1) 0.6660, (0, 2) 0.1046, (1, 2) 0.1411.
SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]

TINY = minilm.BertConfig(
    vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
    max_position=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def pretrained():
    return minilm_pretrained.load_minilm(), minilm_pretrained.load_minilm_tokenizer()


@needs_wheel
def test_reference_similarities(pretrained):
    params, tok = pretrained
    batch = minilm_pretrained.tokenize_batch(tok, SENTENCES, max_length=16)
    emb = np.asarray(minilm.embed_sentences(params, batch))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    np.testing.assert_allclose(
        [sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411], atol=5e-4
    )
    # Padding to a longer length does not change the embeddings.
    emb_long = minilm.embed_sentences(params, minilm_pretrained.tokenize_batch(tok, SENTENCES, 40))
    np.testing.assert_allclose(emb_long, emb, atol=1e-5)


@needs_wheel
def test_pretrained_layout_matches_init(pretrained):
    params, _ = pretrained
    shapes = jax.eval_shape(minilm.init_encoder, jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(params), strict=True):
        assert a.shape == b.shape
    q = params["layer_0"]["attention"]["query"]["kernel"]
    assert q.shape == (384, 384)
    assert params["layer_0"]["intermediate"]["kernel"].shape == (384, 1536)  # transposed
    assert sum(x.size for x in jax.tree.leaves(params)) == 22_565_376


@needs_wheel
def test_pair_tokenization(pretrained):
    _, tok = pretrained
    b = minilm_pretrained.tokenize_batch(tok, [("a dog", "an animal that barks")], max_length=16)
    ids, types, mask = b["input_ids"][0], b["token_type_ids"][0], b["attention_mask"][0]
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    seps = np.flatnonzero(ids == sep)
    assert ids[0] == cls and len(seps) == 2
    assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : seps[1] + 1] == 1).all()
    assert mask.sum() == seps[1] + 1 and (ids[mask == 0] == 0).all()
    long = minilm_pretrained.tokenize_batch(tok, [("word " * 50, "other " * 50)], max_length=24)
    assert long["input_ids"].shape == (1, 24) and long["attention_mask"].all()


def test_classifier_trains_tiny():
    key = jax.random.key(0)
    params = classifier.init_classifier(key, 3, config=TINY)
    assert params["head"]["kernel"].shape == (16, 3)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (12, 8)).astype(np.int32)
    labels = ids[:, 1] % 3
    batch = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.ones_like(ids).at[:, 6:].set(0),
        "token_type_ids": jnp.zeros_like(ids),
        "labels": jnp.asarray(labels),
    }
    apply = lambda p, b: classifier.classifier_apply(p, b, config=TINY)  # noqa: E731
    logits = jax.eval_shape(apply, params, batch)
    assert logits.shape == (12, 3)
    tx = optax.adamw(1e-2)
    step = classifier.make_classifier_train_step(tx, config=TINY)
    state = tx.init(params)
    losses = []
    for _ in range(30):
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    # Example weights: zero weight removes an example from the mean.
    loss_fn = jax.jit(lambda p, b: classifier.classifier_loss(p, b, config=TINY)[0])
    w = jnp.ones(12).at[6:].set(0.0)
    loss_w = loss_fn(params, {**batch, "weights": w})
    loss_u = loss_fn(params, jax.tree.map(lambda x: x[:6], batch))
    np.testing.assert_allclose(loss_w, loss_u, rtol=1e-5)


def test_the_finetune_step_compiles_its_gradient_once_for_all_optimizers(caplog):
    """The forward and backward pass is compiled once per model, whatever the optimizer
    (it was compiled again, and kept, for every new transform); steps equal a plain
    step of the whole classifier."""
    from umtam_jax.experiments import training

    params = classifier.init_classifier(jax.random.key(0), 3, config=TINY)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, (4, 8)), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
             "token_type_ids": jnp.zeros_like(ids), "labels": ids[:, 1] % 3}  # fmt: skip
    compiled_grads = []
    for lr in (1e-2, 2e-2):
        tx = optax.sgd(lr)  # a new transform: a new compiled update, the same gradient
        step = training._train_step(tx, TINY)
        state = training.init_opt_state(tx, params)
        with compilations(caplog) as compiled:
            got, _, _ = step(params, state, batch)
        compiled_grads += [m for m in compiled if "Compiling jit(grad_fn)" in m]
        want, _, _ = classifier.make_classifier_train_step(tx, config=TINY)(
            params, tx.init(params), batch
        )
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     got, want)  # fmt: skip
    assert len(compiled_grads) == 1, compiled_grads


def test_a_setting_in_use_stays_among_the_kept_optimizers():
    from umtam_jax.experiments import training
    from umtam_jax.experiments.config import PipelineConfig

    hot = training.optimizer_for("sgd", PipelineConfig(steps=10), {})
    for steps in range(11, 11 + 2 * training._KEPT):  # other settings, the hot one in use
        training.optimizer_for("sgd", PipelineConfig(steps=steps), {})
        assert training.optimizer_for("sgd", PipelineConfig(steps=10), {}) is hot
