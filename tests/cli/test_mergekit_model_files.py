"""mergekit files on small Hugging Face folders: which model gives the output's config and
tokenizer, ``normalize: true`` after the command line's flags, tied embeddings."""

from __future__ import annotations

import json
import textwrap

import chex
import numpy as np
import pytest

from umtam_jax import checkpoint
from umtam_jax.cli.merge import main

pytest.importorskip("safetensors.numpy")


def _model(root, name, seed, config=None):
    """A tiny Llama-like folder: embedding, one projection and a norm, with config and
    tokenizer files naming the model."""
    rng = np.random.default_rng(seed)
    tree = {
        "model": {
            "embed_tokens": {"weight": rng.normal(size=(6, 4)).astype(np.float32)},
            "layers": {"0": {"q_proj": {"weight": rng.normal(size=(4, 4)).astype(np.float32)}}},
            "norm": {"weight": rng.normal(size=(4,)).astype(np.float32)},
        }
    }
    if config and config.get("lm_head"):
        tree["lm_head"] = {"weight": tree["model"]["embed_tokens"]["weight"].copy()}
    source = root / f"{name}-files"
    source.mkdir()
    record = {"_name_or_path": name, **{k: v for k, v in (config or {}).items() if k != "lm_head"}}
    (source / "config.json").write_text(json.dumps(record))
    (source / "tokenizer_config.json").write_text(json.dumps({"name": name}))
    tied = bool(record.get("tie_word_embeddings"))  # as saved tied, with a copy of lm_head
    checkpoint.save_safetensors(
        root / name, tree, copy_files_from=source, keep_tied_embeddings=tied
    )
    return tree


def _run(tmp_path, text, *flags):
    config = tmp_path / "merge.yaml"
    config.write_text(textwrap.dedent(text).format(root=tmp_path))
    out = tmp_path / "out"
    status = main([str(config), "-o", str(out), "--no-progress", *flags])
    return status, out


def _read(out):
    return checkpoint.tree_from_names(
        dict(zip(*_names_and_arrays(checkpoint.SafetensorsReader(out)), strict=True))
    )


def _names_and_arrays(reader):
    names = list(checkpoint.names_from_tree(reader.abstract()))
    return names, reader.read(names)


@pytest.mark.parametrize("method", ["linear", "karcher"])
def test_a_base_model_listed_after_an_expert_gives_the_config_and_tokenizer(tmp_path, method):
    """linear and karcher merge a base_model as one more input, as mergekit does; it was
    dropped as the base, so the output took the first listed model's config.json and
    tokenizer (its chat template, its name) instead of the base model's."""
    trees = {name: _model(tmp_path, name, seed) for seed, name in enumerate(["base", "x"])}
    status, out = _run(
        tmp_path,
        f"""
        merge_method: {method}
        base_model: {{root}}/base
        models:
          - {{{{model: {{root}}/x, parameters: {{{{weight: 0.5}}}}}}}}
          - {{{{model: {{root}}/base, parameters: {{{{weight: 0.5}}}}}}}}
        """,
    )
    assert status == 0
    assert json.loads((out / "config.json").read_text())["_name_or_path"] == "base"
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"name": "base"}
    if method == "linear":  # both models, each weighing a half
        got = _read(out)["model"]["norm"]["weight"]
        want = 0.5 * (trees["x"]["model"]["norm"]["weight"].astype(np.float64)
                      + trees["base"]["model"]["norm"]["weight"])  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_expert_flags_on_a_file_that_merges_its_base_model_warn(tmp_path, capsys):
    for seed, name in enumerate(["base", "x", "y"]):
        _model(tmp_path, name, seed)
    text = """
        merge_method: linear
        base_model: {root}/base
        models: [{{model: {root}/x, parameters: {{weight: 1}}}}]
        parameters: {{weight: 1}}
        """
    status, _ = _run(tmp_path, text, "--expert", f"{tmp_path}/x", "--expert", f"{tmp_path}/y")
    assert status == 0
    err = capsys.readouterr().err
    assert "warning: --expert replaces the file's models, base_model" in err, err
    assert "merges it only if an --expert names it" in err
    # --base replaces the base, not the file's base_model among the models it merged.
    _model(tmp_path, "other", 3)
    flags = ("--base", f"{tmp_path}/other", "--expert", f"{tmp_path}/x", "--force")
    status, _ = _run(tmp_path, text, *flags)
    assert status == 0
    assert f"base_model '{tmp_path}/base' among them" in capsys.readouterr().err


def _refused_task_arithmetic(tmp_path, capsys, weight, extra, *flags):
    """The error line of a dry run of a task-arithmetic file merging model ``a`` (of the
    given ``weight``) into ``base``, with ``extra`` appended to the file."""
    for seed, name in enumerate(["base", "a"]):
        _model(tmp_path, name, seed)
    text = f"""
        merge_method: task_arithmetic
        base_model: {{root}}/base
        models: [{{{{model: {{root}}/a, parameters: {{{{weight: {weight}}}}}}}}}]
        {extra}
        """
    assert _run(tmp_path, text, "--dry-run", *flags)[0] == 2
    return capsys.readouterr().err


def test_a_normalized_scaling_that_overflows_names_its_key(tmp_path, capsys):
    extra = "parameters: {{normalize: true, lambda: 1.0e+308}}"
    err = _refused_task_arithmetic(tmp_path, capsys, 0.25, extra)
    assert (
        "error: parameters.lambda divided by the weights' sum (normalize: true) must be "
        "finite, got inf" in err
    ), err


def test_normalize_divides_the_scaling_and_weights_the_flags_give(tmp_path):
    """normalize: true was folded into scaling when the file was read, so --param scaling
    dropped it and --expert weights were divided by the file's Σ weight."""
    trees = {name: _model(tmp_path, name, seed) for seed, name in enumerate(["base", "a", "b"])}
    text = """
        merge_method: task_arithmetic
        base_model: {root}/base
        models:
          - {{model: {root}/a, parameters: {{weight: 0.5}}}}
          - {{model: {root}/b, parameters: {{weight: 0.3}}}}
        parameters: {{normalize: true}}
        """

    def want(scaling, weights):
        leaf = [np.float64(t["model"]["norm"]["weight"]) for t in trees.values()]
        deltas = [w * (x - leaf[0]) for w, x in zip(weights, leaf[1:], strict=True)]
        return leaf[0] + scaling / sum(weights) * sum(deltas)

    for flags, scaling, weights in (
        ((), 1.0, (0.5, 0.3)),
        (("--param", "scaling=2"), 2.0, (0.5, 0.3)),
        (("--expert", f"{tmp_path}/a,weight=1", "--expert", f"{tmp_path}/b,weight=1"), 1.0,
         (1.0, 1.0)),
    ):  # fmt: skip
        status, out = _run(tmp_path, text, *flags, "--force")
        assert status == 0, flags
        got = _read(out)["model"]["norm"]["weight"]
        np.testing.assert_allclose(got, want(scaling, weights), rtol=1e-5, err_msg=str(flags))


def test_models_that_all_tie_their_stored_output_embedding_stay_tied(tmp_path):
    """Models whose config ties lm_head to the embedding but whose files store a copy of it
    (transformers does not read it): the output's config said tie_word_embeddings: false,
    so the merged model read its own merged lm_head (a different random draw for DARE)
    rather than the merged embedding, unlike mergekit's output and the inputs."""
    tied = {"tie_word_embeddings": True, "lm_head": True}
    for seed, name in enumerate(["base", "x"]):
        _model(tmp_path, name, seed, tied)
    text = """
        merge_method: dare_ties
        base_model: {root}/base
        models: [{{model: {root}/x, parameters: {{weight: 1, density: 0.5}}}}]
        """
    status, out = _run(tmp_path, text)
    assert status == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head" in _read(out)  # written, as mergekit writes it
    # A model that stores its own output embedding (no explicit tie) unties the merge.
    _model(tmp_path, "untied", 2, {"lm_head": True})
    status, out = _run(tmp_path, text.replace("/x,", "/untied,"), "--force")
    assert status == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_mergekit_parameter_name_on_the_command_line_names_the_native_one(tmp_path, capsys):
    err = _refused_task_arithmetic(tmp_path, capsys, 1, "", "--param", "lambda=2")
    assert (
        "unknown parameters ['lambda'] for method 'task_arithmetic'; allowed: ['scaling'] "
        "(mergekit's lambda is scaling)" in err
    ), err


def _tokenizer(folder, tokens, added=()):
    record = {"model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}},
              "added_tokens": [{"id": i, "content": t} for i, t in added]}  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(record))


def test_tokenizer_source_base_needs_the_bases_token_ids(tmp_path, capsys):
    """mergekit's ``tokenizer_source: base`` aligns embedding rows by token; umtam-merge
    merges them by id, so it accepts the key only where every model's token ids are the
    base's (the two then agree) and refuses otherwise, naming a token that differs."""
    for name, seed in [("base", 0), ("a", 1), ("b", 2)]:
        _model(tmp_path, name, seed)
    tokens = ["<s>", "a", "b", "c", "d", "e"]
    for name in ("base", "a", "b"):
        _tokenizer(tmp_path / name, tokens, added=[(6, "<pad>")])
    text = """
        merge_method: ties
        base_model: {root}/base
        models:
          - {{model: {root}/a, parameters: {{weight: 1.0, density: 0.5}}}}
          - {{model: {root}/b, parameters: {{weight: 0.5, density: 0.5}}}}
        """
    (tmp_path / "by_id").mkdir()
    assert _run(tmp_path / "by_id", text.replace("{root}", str(tmp_path)))[0] == 0
    status, out = _run(tmp_path, text + "tokenizer_source: base\n")
    assert status == 0  # the same ids: the merge by id is mergekit's alignment
    chex.assert_trees_all_equal(_read(out), _read(tmp_path / "by_id" / "out"))
    _tokenizer(tmp_path / "b", ["<s>", "b", "a", "c", "d", "e"], added=[(6, "<pad>")])
    capsys.readouterr()
    status, _ = _run(tmp_path, text + "tokenizer_source: base\n", "--force")
    err = capsys.readouterr().err
    assert status == 2 and "the token ids of models[1]" in err, err
    assert "token 'a' has id 1 in the reference and 2 here" in err
    # A token the reference lacks (the empty string is a token too).
    _tokenizer(tmp_path / "b", ["", "a", "b", "c", "d", "e"], added=[(6, "<pad>")])
    assert _run(tmp_path, text + "tokenizer_source: base\n", "--force")[0] == 2
    assert "token '<s>' has id 0 in the reference and None here" in capsys.readouterr().err
    _tokenizer(tmp_path / "base", ["", "a", "b", "c", "d", "e"], added=[(6, "<pad>")])
    _tokenizer(tmp_path / "a", ["a", "", "b", "c", "d", "e"], added=[(6, "<pad>")])
    assert _run(tmp_path, text + "tokenizer_source: base\n", "--force")[0] == 2
    assert "token '' has id 0 in the reference and 1 here" in capsys.readouterr().err
    # A model without tokenizer files counts as the same, as in mergekit.
    (tmp_path / "a" / "tokenizer.json").unlink()
    assert _run(tmp_path, text + "tokenizer_source: base\n", "--force")[0] == 0
    # Embeddings padded past the tokenizer (config.json's vocab_size): mergekit cuts them.
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "vocab_size": 8}))
    assert _run(tmp_path, text + "tokenizer_source: base\n", "--force")[0] == 2
    err = capsys.readouterr().err
    assert "its config.json has vocab_size 8 and its tokenizer 7 tokens" in err, err
    (tmp_path / "base" / "tokenizer.json").unlink()  # the reference needs a tokenizer
    assert _run(tmp_path, text + "tokenizer_source: base\n", "--force")[0] == 2
    assert "base has no tokenizer files" in capsys.readouterr().err


def test_tokenizer_source_base_without_a_base_model_reads_the_first_models(tmp_path, capsys):
    """mergekit takes the first model's tokenizer where there is no base model."""
    for name, seed in [("a", 1), ("b", 2)]:
        _model(tmp_path, name, seed)
        _tokenizer(tmp_path / name, ["x", "y"] if name == "a" else ["y", "x"])
    text = """
        merge_method: linear
        models: [{{model: {root}/a, parameters: {{weight: 1}}}}, {{model: {root}/b,
                  parameters: {{weight: 1}}}}]
        tokenizer_source: base
        """
    assert _run(tmp_path, text)[0] == 2
    err = capsys.readouterr().err
    assert f"of models[1] ({tmp_path}/b) may not be those of {tmp_path}/a" in err, err
    _tokenizer(tmp_path / "b", ["x", "y"])
    assert _run(tmp_path, text)[0] == 0
