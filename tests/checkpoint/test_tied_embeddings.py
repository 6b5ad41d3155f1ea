"""Merging Hugging Face models whose output embedding is tied in some and stored in
others (a tied Llama-3.2/Qwen2.5 base whose fine-tunes saved ``lm_head``), as mergekit
does: a tied model's ``lm_head`` is its input embedding; the output stores both and says
``tie_word_embeddings: false``, so that transformers loads the merged ``lm_head``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from umtam_jax import engine

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _model(path, tensors, tie, text_config=None):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    config = {"model_type": "llama", "torch_dtype": "float32"}
    if tie is not None:
        config["tie_word_embeddings"] = tie
    if text_config is not None:  # multimodal configs (Gemma 3) nest the text model's
        config["text_config"] = text_config
    (path / "config.json").write_text(json.dumps(config))
    return path


def _tensors(rng, head):
    out = {EMBED: rng.normal(size=(6, 4)).astype(np.float32),
           "model.norm.weight": rng.normal(size=(4,)).astype(np.float32)}  # fmt: skip
    if head:
        out[HEAD] = rng.normal(size=(6, 4)).astype(np.float32)
    return out


@pytest.mark.parametrize("base_tied", [True, False])
def test_task_arithmetic_over_tied_and_untied_models(tmp_path, base_tied):
    rng = np.random.default_rng(0)
    base = _tensors(rng, head=not base_tied)
    e0, e1 = _tensors(rng, head=True), _tensors(rng, head=False)  # e1 tied
    paths = [
        _model(tmp_path / "base", base, base_tied, {"tie_word_embeddings": base_tied}),
        _model(tmp_path / "e0", e0, False),
        _model(tmp_path / "e1", e1, None),  # no key: transformers' default ties
    ]
    out = engine.merge_checkpoints("task_arithmetic", paths[0], paths[1:], tmp_path / "out",
                                   weights=[0.5, 0.25], progress=False)  # fmt: skip

    def head(t):  # a tied model's lm_head is its input embedding
        return t.get(HEAD, t[EMBED]).astype(np.float64)

    got = load_file(str(out / "model.safetensors"))
    for name, of in ((EMBED, lambda t: t[EMBED].astype(np.float64)), (HEAD, head)):
        want = of(base) + 0.5 * (of(e0) - of(base)) + 0.25 * (of(e1) - of(base))
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["text_config"]["tie_word_embeddings"] is False
    assert {p.name for p in tmp_path.iterdir()} == {"base", "e0", "e1", "out"}
    assert HEAD not in load_file(str(paths[2] / "model.safetensors"))  # inputs untouched


def test_an_orbax_expert_that_stores_lm_head_unties_a_tied_safetensors_base(tmp_path):
    """A merge written as an Orbax checkpoint (both embeddings) merged again with its tied
    Hugging Face base: the base's lm_head is its input embedding, as with a folder."""
    from umtam_jax import checkpoint

    rng = np.random.default_rng(1)
    base, expert = _tensors(rng, head=False), _tensors(rng, head=True)
    base_path = _model(tmp_path / "base", base, None)
    expert_path = checkpoint.save_checkpoint(
        tmp_path / "expert", checkpoint.tree_from_names(expert)
    )
    out = engine.merge_checkpoints("task_arithmetic", base_path, [expert_path],
                                   tmp_path / "out", weights=[0.5], progress=False)  # fmt: skip
    got = load_file(str(out / "model.safetensors"))
    for name, of_base in ((EMBED, base[EMBED]), (HEAD, base[EMBED])):
        want = of_base + 0.5 * (expert[name] - of_base)
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6)


def test_a_model_that_says_it_is_untied_but_lacks_lm_head_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    base = _model(tmp_path / "base", _tensors(rng, head=True), False)
    broken = _model(tmp_path / "e0", _tensors(rng, head=False), False)
    with pytest.raises(ValueError, match=r"lm_head"):
        engine.merge_checkpoints("task_arithmetic", base, [broken], tmp_path / "out",
                                 progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_all_tied_models_stay_tied(tmp_path):
    rng = np.random.default_rng(0)
    paths = [_model(tmp_path / n, _tensors(rng, head=False), True) for n in ("b", "e0", "e1")]
    out = engine.merge_checkpoints("task_arithmetic", paths[0], paths[1:], tmp_path / "out",
                                   progress=False)  # fmt: skip
    assert HEAD not in load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_umtam_statistics_of_a_tied_expert_serve_its_lm_head(tmp_path):
    """A tied expert's saved statistics have no lm_head entry: its input embedding's
    statistics (one parameter) serve, as its values do."""
    from umtam_jax import checkpoint, merging
    from umtam_jax.optimizer import DenseStatistics

    rng = np.random.default_rng(1)

    def stats(tensors):
        node = lambda x: DenseStatistics(  # noqa: E731
            mu=rng.normal(size=x.shape).astype(np.float32),
            nu=rng.random(x.shape).astype(np.float32) + 0.1,
            saliency=rng.random(x.shape).astype(np.float32),
        )
        return {name: node(x) for name, x in tensors.items()}

    models = {"base": _tensors(rng, head=True), "e0": _tensors(rng, head=True),
              "e1": _tensors(rng, head=False)}  # fmt: skip
    paths, node_stats, ties = {}, {}, {"base": False, "e0": False, "e1": None}
    for name, tensors in models.items():
        paths[name] = _model(tmp_path / name, tensors, ties[name])
        if name != "base":
            node_stats[name] = stats(tensors)
            checkpoint.save_safetensors(
                paths[name] / "umtam_statistics", checkpoint.tree_from_names(node_stats[name])
            )
    out = engine.merge_checkpoints("umtam", paths["base"], [paths["e0"], paths["e1"]],
                                   tmp_path / "out", density=0.5, progress=False)  # fmt: skip
    tree = checkpoint.tree_from_names
    tied = {**models["e1"], HEAD: models["e1"][EMBED]}
    tied_stats = {**node_stats["e1"], HEAD: node_stats["e1"][EMBED]}
    want = merging.umtam(tree(models["base"]), [tree(models["e0"]), tree(tied)],
                         [tree(node_stats["e0"]), tree(tied_stats)], density=0.5)  # fmt: skip
    got = checkpoint.tree_from_names(load_file(str(out / "model.safetensors")))
    for name in (EMBED, HEAD):
        keys = name.split(".")
        a, b = got, want
        for k in keys:
            a, b = a[k], b[k]
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6, atol=1e-7)
