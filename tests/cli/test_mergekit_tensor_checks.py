"""How mergekit's values by tensor are evaluated and checked: ``setting`` and
``layer_positions`` against mergekit's evaluation, one error naming the key for whatever
is not supported or wrong (before anything is written), and the warning of a ``--param``
flag that only sets the default of per-model values."""

from __future__ import annotations

import os
import re

import pytest

from tests.cli.mergekit_settings_helpers import _model
from umtam_jax.cli._mergekit_settings import layer_positions, setting
from umtam_jax.cli._yaml import ConfigError
from umtam_jax.cli.merge import main

pytest.importorskip("safetensors.numpy")


def test_setting_values_follow_mergekits_evaluation():
    grad = setting([0.0, 1.0, 0.0], "parameters.t")
    assert [grad.at("x", x) for x in (0.0, 0.25, 0.5, 1.0)] == [0.0, 0.5, 1.0, 0.0]
    first = setting([{"filter": "mlp", "value": 1}, {"filter": "mlp.up", "value": 2}], "p.t")
    assert first.at("model.layers.0.mlp.up_proj.weight", 0.0) == 1  # the first match
    assert first.at("model.layers.0.self_attn.q_proj.weight", 0.0) is None
    assert setting([True, False], "p.normalize").at("x", 0.99) is True  # the step below
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.2.mlp.c_fc.weight",
             "transformer.wte.weight", "transformer.h.1.ln_1.weight",
             "model.h_norm.weight"]  # fmt: skip
    assert layer_positions(names) == [0.0, 1.0, 0.0, 0.5, 0.0]
    assert layer_positions(["bert.encoder.layer.1.output.dense.weight", "params.layers_1.kernel",
                            "params.layers_0.kernel"]) == [1.0, 1.0, 0.0]  # fmt: skip
    # A multimodal model: 2 text layers and 4 vision blocks, each stack its own depth (the
    # last text layer is at x = 1, as mergekit places it, not at 1/3).
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]
    names += [f"visual.blocks.{i}.attn.qkv.weight" for i in range(4)]
    assert layer_positions(names) == [0.0, 1.0, 0.0, 1 / 3, 2 / 3, 1.0]
    assert layer_positions(["model.layers.0.w"]) == [1.0]  # one layer: x = 1, as mergekit
    for bad, message in (
        ([], "an empty list"),
        ([{"filter": "a"}], r"p.t\[0\] must be a mapping with 'value'"),
        ([[1, 2]], "a gradient is a list of values"),
    ):
        with pytest.raises(ConfigError, match=message):
            setting(bad, "p.t")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "slices:\n  - sources:\n      - {model: {root}/a, layer_range: [0, 2]}\n"
            "      - {model: {root}/b, layer_range: [0, 2]}\n"
            "merge_method: slerp\nbase_model: {root}/a\nparameters: {t: 0.5}\n",
            r"slices\[0\].sources\[0\].layer_range' is \[0, 2\], but only whole models are "
            r"supported: \[0, 4\]",
        ),
        (
            "slices:\n  - sources: [{model: {root}/b, layer_range: [0, 4]}]\n"
            "merge_method: ties\nbase_model: {root}/a\n",
            "'base_model' .* is not among 'slices\\[0\\].sources'",
        ),
        (
            "slices:\n  - sources: [{model: {root}/a, layer_range: [0, 4]}]\n"
            "  - sources: [{model: {root}/b, layer_range: [0, 4]}]\n"
            "merge_method: slerp\nbase_model: {root}/a\nparameters: {t: 0.5}\n",
            "only one slice of whole models",
        ),
        (
            "models: [{model: {root}/b, parameters: {gamma: [0.01, 0.02]}}]\n"
            "merge_method: breadcrumbs\nbase_model: {root}/a\n",
            r"models\[0\].parameters.gamma: per-layer gradients and filtered values of a model",
        ),
        (  # the model without its own gamma takes the gradient: not one value for all
            "models: [{model: {root}/b, parameters: {gamma: 0.1}}, {model: {root}/c}]\n"
            "merge_method: breadcrumbs\nbase_model: {root}/a\nparameters: {gamma: [0, 0.2]}\n",
            r"models\[0\].parameters.gamma: umtam-merge merges with one gamma for every model, "
            r"and the models would get different ones \(models\[0\] 0.1; models\[1\] "
            r"parameters.gamma, which varies by tensor\)",
        ),
        (
            "models: [{model: {root}/b}]\nmerge_method: slerp\nbase_model: {root}/a\n"
            "parameters: {t: [{filter: mlp, value: 0.5}]}\n",
            "parameters.t: no filter matches tensor 'model.embed_tokens.weight'",
        ),
        (
            "models: [{model: {root}/b}]\nmerge_method: slerp\nbase_model: {root}/a\n"
            "parameters: {t: [{filter: mlp, value: abc}, {value: 0.5}]}\n",
            r"parameters.t\[0\].value must be a number, got 'abc'",
        ),
        (  # the position within the gradient, not the expert's index
            "models: [{model: {root}/b, parameters: {density: [0.5, 0.6, 1.5]}}]\n"
            "merge_method: ties\nbase_model: {root}/a\n",
            r"models\[0\].parameters.density\[2\] must lie in \(0, 1\], got 1.5",
        ),
        (
            "models: [{model: {root}/b, "
            "parameters: {density: [{filter: mlp, value: 0.5}, {value: [0.3, 2.0]}]}}]\n"
            "merge_method: ties\nbase_model: {root}/a\n",
            r"models\[0\].parameters.density\[1\].value\[1\] must lie in \(0, 1\], got 2.0",
        ),
        (
            "models: [{model: {root}/b}]\nmerge_method: ties\nbase_model: {root}/a\n"
            "tokenizer: {source: union}\n",
            "'tokenizer': tokenizer merging is not supported by umtam-merge",
        ),
        (
            "models: [{model: {root}/b}]\nmerge_method: ties\nbase_model: {root}/a\n"
            "chat_template: chatml\n",
            "'chat_template': setting a chat template is not supported by umtam-merge",
        ),
        (
            "models: [{model: {root}/b, parameters: {density: 0.5}}]\nmerge_method: ties\n"
            "base_model: {root}/a\nparameters: {normalize: false}\n",
            "parameters.normalize: merge_method 'ties' is supported with normalize: true",
        ),
        (  # a value the gradient gives between its integers: the key and the tensor
            "models: [{model: {root}/b}, {model: {root}/a}]\nmerge_method: karcher\n"
            "parameters: {max_iter: [5, 6]}\n",
            r"tensor model.layers.1.mlp.up_proj.weight \(max_iter=5.3+\d\): max_iter must "
            r"be a non-negative integer, got 5.3+\d \(max_iter is from parameters.max_iter\)",
        ),
    ],
)
def test_what_is_not_supported_or_wrong_is_one_error_naming_its_key(
    tmp_path, capsys, text, message
):
    _model(tmp_path, "a", 0), _model(tmp_path, "b", 1)
    config = tmp_path / "merge.yaml"
    config.write_text(text.replace("{root}", str(tmp_path)))
    assert main([str(config), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_param_flag_of_a_per_model_value_warns_that_it_is_only_their_default(tmp_path, capsys):
    _model(tmp_path, "a", 0), _model(tmp_path, "b", 1), _model(tmp_path, "c", 2)
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: ties\nbase_model: {tmp_path}/a\nmodels: [{{model: {tmp_path}/b, "
        f"parameters: {{density: 0.5}}}}, {{model: {tmp_path}/c}}]\n"
    )
    assert main([str(config), "--dry-run", "--param", "density=0.9"]) == 0
    out = capsys.readouterr()
    assert "--param density is the default of the models without their own density; " in out.err
    assert "models[0] give theirs" in out.err
    assert "'density': [0.5, 0.9]" in out.out


def test_flags_replacing_the_models_own_gamma_warn(tmp_path, capsys):
    """The merge takes one gamma, which every model of the file gives: a --param flag
    replaces it, and --expert flags replacing the models still merge with it (both warn)."""
    _model(tmp_path, "a", 0), _model(tmp_path, "b", 1), _model(tmp_path, "c", 2)
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: breadcrumbs\nbase_model: {tmp_path}/a\nparameters: {{gamma: 0.05}}\n"
        f"models: [{{model: {tmp_path}/b, parameters: {{density: 0.5, gamma: 0.2}}}}, "
        f"{{model: {tmp_path}/c, parameters: {{density: 0.5, gamma: 0.2}}}}]\n"
    )
    assert main([str(config), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "'gamma': 0.2" in out.out and "warning" not in out.err
    assert main([str(config), "--dry-run", "--param", "gamma=0.1"]) == 0
    out = capsys.readouterr()
    assert "--param gamma replaces the gamma every model of the file gives (0.2)" in out.err
    assert "'gamma': 0.1" in out.out
    assert main([str(config), "--dry-run", "--expert", f"{tmp_path}/c"]) == 0
    assert "but the merge still takes the gamma they give (0.2)" in capsys.readouterr().err


def test_a_weight_that_no_filter_gives_without_a_default_names_the_model(tmp_path, capsys):
    _model(tmp_path, "a", 0), _model(tmp_path, "b", 1)
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"models:\n  - model: {tmp_path}/b\n    parameters:\n      weight: "
        "[{filter: mlp, value: 0.5}]\nmerge_method: task_arithmetic\n"
        f"base_model: {tmp_path}/a\n"
    )
    assert main([str(config), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "models[0].parameters.weight: no filter matches tensor 'model.embed_tokens" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("method", "parameters", "message"),
    [
        # density ± epsilon leaves (0, 1) at layer 3 only: refused before any write,
        # naming the first tensor whose merge would fail.
        ("della", "{density: 0.5, epsilon: [0.1, 0.6]}", "tensor model.layers.3."),
        ("consensus_ties", "{density: 0.5, scope: [tensor, global]}", "parameters.scope: per-"),
        ("consensus", "{lambdas: [0.5, 1.0], k: 2}", "parameters.lambdas: per-layer"),
    ],
)
def test_values_by_tensor_are_checked_before_anything_is_written(
    tmp_path, capsys, method, parameters, message
):
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        _model(tmp_path, name, seed)
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: {method}\nbase_model: {tmp_path}/a\nmodels: [{{model: {tmp_path}/b, "
        f"parameters: {{weight: 1.0}}}}, {{model: {tmp_path}/c, parameters: {{weight: 0.5}}}}]\n"
        f"parameters: {parameters}\n"
    )
    for flags in (["--dry-run"], ["-o", str(tmp_path / "out")]):
        assert main([str(config), "--no-progress", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_an_expert_count_error_names_the_files_key(tmp_path, capsys):
    _model(tmp_path, "a", 0), _model(tmp_path, "b", 1)
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: model_stock\nbase_model: {tmp_path}/a\nmodels: [{{model: {tmp_path}/b}}]\n"
    )
    assert main([str(config), "--dry-run"]) == 2
    assert "'models': model_stock merges at least 2 experts, got 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "parameters", "refused"),
    [
        ("della", "{density: 0.5}", True),
        ("iso_cts", "{}", True),
        ("nuslerp", "{}", False),  # flattened: no layout read
        ("nuslerp", "{nuslerp_flatten: false}", True),
        ("model_stock", "{}", False),
        ("model_stock", "{filter_wise: true}", True),
        ("della", "{density: 0.5, layout: out_in}", False),
    ],
)
def test_a_native_file_on_hugging_face_folders_names_the_layout(
    tmp_path, capsys, method, parameters, refused
):
    """The default layout, Flax's (d_in, d_out), silently merged PyTorch (d_out, d_in)
    weights along the wrong axis where a method reads it: a native file must name it."""
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        _model(tmp_path, name, seed)
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"method: {method}\nbase: {tmp_path}/a\nexperts: [{tmp_path}/b, {tmp_path}/c]\n"
        f"parameters: {parameters}\n"
    )
    assert main([str(config), "--dry-run"]) == (2 if refused else 0)
    err = capsys.readouterr().err
    if refused:
        assert f"parameters.layout: method {method!r} reads the weights' layout" in err, err
        assert "set layout: 'out_in' for PyTorch (d_out, d_in) weights" in err


def test_slices_read_a_models_layer_count_from_a_regular_config_json_only(tmp_path):
    """A FIFO at config.json hung the read; JSON nested too deeply raised RecursionError."""
    from umtam_jax.cli._mergekit_slices import whole_model_slices

    fifo, deep = tmp_path / "fifo", tmp_path / "deep"
    fifo.mkdir(), deep.mkdir()
    os.mkfifo(fifo / "config.json")
    (deep / "config.json").write_text("[" * 100_000)
    for model, reason in ((fifo, "is a FIFO"), (deep, "JSON nested too deeply")):
        source = {"model": str(model), "layer_range": [0, 2]}
        with pytest.raises(ConfigError, match=rf"sources\[0\]': cannot read .*\({reason}"):
            whole_model_slices({"slices": [{"sources": [source]}]})
