"""Flax models for the experiments: the MiniLM-L6 encoder, a classifier on it, and a small GPT.

All keep their parameters as plain nested dicts (linen ``params``) with 2-D
``[in, out]`` kernels, so they go straight into Optax, the merging library and
Orbax checkpoints.
"""

from umtam_jax.experiments.models.classifier import (
    classifier_apply,
    classifier_loss,
    init_classifier,
    make_classifier_train_step,
)
from umtam_jax.experiments.models.gpt import (
    GPT,
    GPTConfig,
    gpt_apply,
    gpt_loss,
    init_gpt,
    make_gpt_train_step,
)
from umtam_jax.experiments.models.minilm import (
    MINILM_L6,
    BertConfig,
    BertEncoder,
    embed_sentences,
    encoder_apply,
    init_encoder,
)
from umtam_jax.experiments.models.minilm_pretrained import (
    load_minilm,
    load_minilm_tokenizer,
    minilm_files,
    tokenize_batch,
)

__all__ = [
    "GPT",
    "MINILM_L6",
    "BertConfig",
    "BertEncoder",
    "GPTConfig",
    "classifier_apply",
    "classifier_loss",
    "embed_sentences",
    "encoder_apply",
    "gpt_apply",
    "gpt_loss",
    "init_classifier",
    "init_encoder",
    "init_gpt",
    "load_minilm",
    "load_minilm_tokenizer",
    "make_classifier_train_step",
    "make_gpt_train_step",
    "minilm_files",
    "tokenize_batch",
]
