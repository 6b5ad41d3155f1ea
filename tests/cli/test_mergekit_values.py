"""mergekit files are read as mergekit reads them: quoted numbers, bools and ints, keys it
ignores (one warning), and one clear error naming the key for anything else."""

from __future__ import annotations

import os

import chex
import numpy as np
import pytest

from tests import trees
from tests.cli.mergekit_helpers import TOL, restored, run
from tests.merging import helpers as H
from umtam_jax import checkpoint
from umtam_jax.cli.merge import main


@pytest.mark.parametrize("flags", [(), ("--in-memory",)])
@pytest.mark.parametrize(
    "key,needle",
    [
        ("out_dtype", "the merged ['w'] (written as float16) holds 80000"),
        ("dtype", "tensor ['w'] (read as float16) holds 70000"),
    ],
)
def test_a_narrowing_dtype_that_overflows_is_an_error_naming_the_leaf(
    tmp_path, key, needle, flags, capsys
):
    paths = {}
    for name, value in (("base", 6e4), ("a", 7e4), ("b", 7e4)):
        paths[name] = checkpoint.save_safetensors(tmp_path / name, {"w": np.full(3, value, "f4")})
    config = tmp_path / "c.yaml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {paths['base']}\n"
        f"models: [{{model: {paths['a']}}}, {{model: {paths['b']}}}]\n{key}: float16\n"
    )
    out = tmp_path / "out"
    assert main([str(config), "--output", str(out), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and "float16's largest finite value 65504" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "body,needle",
    [
        (
            "merge_method: frankenmerge\nbase_model: {base}\nmodels: [{{model: {a}}}]",
            "merge_method",
        ),
        ("merge_method: ties\nslices: []\nbase_model: {base}\nmodels: [{{model: {a}}}]", "slices"),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "tokenizer_source: union",
            "tokenizer_source",
        ),
        (
            "merge_method: breadcrumbs\nbase_model: {base}\n"
            "models: [{{model: {a}, parameters: {{gamma: [0.1, 0.9]}}}}]",
            "models[0].parameters.gamma: per-layer gradients and filtered values of a model",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "parameters: {{normalize: [{{filter: mlp, value: true}}]}}",
            "parameters.normalize: per-layer gradients and filtered values are supported for",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "parameters: {{lambda: {{filter: mlp, value: 1}}}}",
            "parameters.lambda: a mapping is not a parameter value",
        ),
        ("merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}+lora}}]", "LoRA"),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "parameters: {{normalize: false}}",
            "normalize",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {base}}}]",
            "no model besides",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\ndtype: int8",
            "dtype",
        ),
        # Errors name the key as the file spells it, at its index in the file.
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {a}}},"
            " {{model: {b}, parameters: {{weight: oops}}}}]",
            "models[2].parameters.weight must be a number, got 'oops'",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "parameters: {{lambda: big}}",
            "parameters.lambda must be a number, got 'big'",
        ),
        (
            "merge_method: linear\nmodels: [{{parameters: {{weight: 1}}}}, {{model: {b}}}]",
            "models[0] must be a mapping with a 'model'",
        ),
        # A library message naming an expert, or its per-expert value, by index among
        # the experts names the file's models[k] (the base listed first) and its path.
        (
            "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: '0.5'}}}}, "
            "{{model: {b}, parameters: {{weight: .inf}}}}]",
            "models[1].parameters.weight must be finite, got inf (models[1] is {b})",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {a}}},"
            " {{model: {b}, parameters: {{density: 1.5}}}}]",
            "models[2].parameters.density must lie in (0, 1], got 1.5 (models[2] is {b})",
        ),
        # Every model giving the same bad density: still its key, not a bare 'density'.
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: "
            "{{density: 2}}}}, {{model: {b}, parameters: {{density: 2}}}}]",
            "models[0].parameters.density must lie in (0, 1], got 2 (models[0] is {a})",
        ),
        (
            "merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}, "
            "parameters: {{weight: .nan}}}}, {{model: {b}}}]",
            "models[0].parameters.weight must be finite, got nan (models[0] is {a})",
        ),
        (
            "merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "parameters: {{normalize: 'yes'}}",
            "parameters.normalize must be true or false, got 'yes'",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}, "
            "{{model: {a}/.}}]",
            "models[2] ('{a}/.') repeats models[0]",
        ),
        # A value out of the registry's range names the key it came from: under a model
        # for the per-model parameters, under 'parameters' for the global ones.
        (
            "merge_method: breadcrumbs\nbase_model: {base}\nmodels: [{{model: {a}, parameters: "
            "{{gamma: 5}}}}, {{model: {b}, parameters: {{gamma: 5}}}}]",
            "models[0].parameters.gamma must lie in [0.0, 1.0], got 5",
        ),
        # NaN is one value, not a difference between the models: its own check names it.
        (
            "merge_method: breadcrumbs\nbase_model: {base}\nmodels: [{{model: {a}, parameters: "
            "{{gamma: .nan}}}}, {{model: {b}, parameters: {{gamma: .nan}}}}]",
            "models[0].parameters.gamma must be finite, got nan",
        ),
        (
            "merge_method: task_arithmetic\nmodels: [{{model: {a}}}, {{model: {b}}}]",
            "'base_model' is required by merge_method 'task_arithmetic'",
        ),
        (
            "merge_method: della\nbase_model: {base}\nmodels: [{{model: {a}, parameters: "
            "{{epsilon: -1}}}}, {{model: {b}, parameters: {{epsilon: -1}}}}]",
            "models[0].parameters.epsilon must lie in [0.0, inf], got -1",
        ),
        (
            "merge_method: passthrough\nbase_model: {base}\nmodels: [{{model: {a}}}]",
            "'base_model': merge_method 'passthrough' takes one model, and mergekit merges a "
            "base model that 'models' does not list as one more",
        ),
        (
            "merge_method: passthrough\nmodels: [{{model: {a}, parameters: {{scale: .nan}}}}]",
            "models[0].parameters.scale must be finite, got nan",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "parameters: {{lambda: .inf}}",
            "parameters.lambda must be finite, got inf",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "parameters: {{density: 2}}",
            "parameters.density must lie in (0, 1], got 2",
        ),
        (
            "merge_method: consensus\nbase_model: {base}\nmodels: [{{model: {a}}}, "
            "{{model: {b}}}]\nparameters: {{k: -1}}",
            "parameters.k must lie in [0.0, inf], got -1",
        ),
        (
            "merge_method: sce\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
            "parameters: {{select_topk: '5'}}",
            "parameters.select_topk must lie in [0.0, 1.0], got 5",
        ),
        # A string that is not a number, for a parameter mergekit reads as a number or a
        # bool, is refused as mergekit's configuration refuses it.
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "parameters: {{int8_mask: 'yes'}}",
            "parameters.int8_mask must be true or false, got 'yes'",
        ),
        (
            "merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
            "parameters: {{normalize: maybe}}",
            "parameters.normalize must be true or false, got 'maybe'",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}, "
            "parameters: {{density: abc}}}}]",
            "models[1].parameters.density must be a number, got 'abc'",
        ),
        (
            "merge_method: breadcrumbs\nbase_model: {base}\nmodels: [{{model: {a}, parameters: "
            "{{gamma: abc}}}}]",
            "models[0].parameters.gamma must be a number, got 'abc'",
        ),
        (
            "merge_method: passthrough\nmodels: [{{model: {a}, parameters: {{scale: big}}}}]",
            "models[0].parameters.scale must be a number, got 'big'",
        ),
        (
            "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "parameters: {{t: half}}",
            "parameters.t must be a number, got 'half'",
        ),
        (
            "merge_method: karcher\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
            "parameters: {{max_iter: 2.5}}",
            "parameters.max_iter must be a whole number, got 2.5",
        ),
        (
            "merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {a}}}, "
            "{{model: {b}}}]\nparameters: {{filter_wise: 2}}",
            "parameters.filter_wise must be true or false, got 2",
        ),
        # linear merges base_model as an input (as mergekit does): it needs a weight.
        (
            "merge_method: linear\nbase_model: {base}\nmodels: [{{model: {a}, parameters: "
            "{{weight: 0.3}}}}, {{model: {b}, parameters: {{weight: 0.7}}}}]",
            "'base_model': merge_method 'linear' merges the base model as one more input",
        ),
    ],
)
def test_unsupported_mergekit_features_are_one_clear_error(tmp_path, models, capsys, body, needle):
    status, out = run(tmp_path, models, body)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert needle.format(**models["paths"]) in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)


def test_quoted_numbers_are_numbers_as_in_mergekit(tmp_path, models):
    """mergekit's configuration reads a quoted number as the number."""
    status, out = run(
        tmp_path,
        models,
        """
        merge_method: ties
        base_model: {base}
        models:
          - {{model: {a}, parameters: {{weight: "0.7", density: " 0.5"}}}}
          - {{model: {b}, parameters: {{weight: '1', density: "5e-1"}}}}
        parameters: {{lambda: "0.8"}}
        """,
    )
    assert status == 0
    want = H.ref_ties(
        models["base"], models["experts"], density=[0.5, 0.5], scaling=0.8, weights=[0.7, 1.0]
    )
    trees.assert_tree_close(checkpoint.restore_params(out), want, **TOL)


def test_bools_and_ints_are_read_as_mergekit_reads_them():
    """mergekit's configuration reads every parameter value as a number (pydantic, lax:
    a quoted number is the number), then its method as a bool (0 or 1), an int (a whole
    number) or a float."""
    from umtam_jax.cli._config import build_plan
    from umtam_jax.cli._mergekit import translate

    two = [{"model": "x"}, {"model": "y"}]
    linear = translate({"merge_method": "linear", "models": two, "parameters": {
        "normalize": "0"}})  # fmt: skip
    assert linear["parameters"] == {"normalize": False}
    ta = translate({"merge_method": "task_arithmetic", "base_model": "b", "models": two,
                    "parameters": {"normalize": 1, "int8_mask": "1", "lambda": "3"}})  # fmt: skip
    assert ta["parameters"] == {"scaling": 3}  # normalize: 3 / (1 + 1), in build_plan
    assert build_plan(ta).parameters["scaling"] == 1.5
    karcher = translate({"merge_method": "karcher", "models": two, "parameters": {
        "max_iter": "10", "tol": 1e-6}})  # fmt: skip
    assert karcher["parameters"] == {"max_iter": 10, "tol": 1e-6}
    assert type(karcher["parameters"]["max_iter"]) is int


def test_keys_mergekit_does_not_read_are_ignored_with_one_warning(tmp_path, models, capsys):
    """mergekit keeps, unread, what its method does not declare (a top-level key, a
    per-model weight for slerp, a global density for it): the merge runs as mergekit's,
    and one warning names each ignored key where the file has it."""
    status, out = run(
        tmp_path,
        models,
        """
        merge_method: slerp
        base_model: {base}
        models:
          - {{model: {base}}}
          - {{model: {a}, parameters: {{weight: 1.0, normalize: true}}, note: tuned}}
        parameters: {{t: 0.3, density: 0.5, scaling: 2}}
        comment: from a model card
        """,
    )
    from umtam_jax import merging

    assert status == 0
    assert capsys.readouterr().err.strip() == (
        "umtam-merge: warning: ignoring 'comment', parameters.density, parameters.scaling, "
        "models[1].note, models[1].parameters.weight, models[1].parameters.normalize: not read by "
        "merge_method 'slerp' in a mergekit file (mergekit ignores such keys too)"
    )
    want = merging.slerp(models["base"], models["experts"][0], t=0.3)
    chex.assert_trees_all_equal(restored(out), want)
    status, _ = run(
        tmp_path / "typo" if (tmp_path / "typo").mkdir() is None else tmp_path,
        models,
        "merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
        "parameters: {{scaling: 0.5}}",
        "--dry-run",
    )
    assert status == 0  # mergekit's task_arithmetic names it lambda: scaling is unread
    assert "ignoring parameters.scaling" in capsys.readouterr().err


def test_a_flag_replaces_a_file_value_out_of_range(tmp_path, models, capsys):
    """``--param`` replaces the file's value, so the file's is not checked: an out-of-range
    density in the file with ``--param density=0.5`` merges (it was refused)."""
    text = "merge_method: dare_linear\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
    text += "parameters: {{density: 0}}\n"
    status, _ = run(tmp_path, models, text, "--dry-run")
    assert status == 2 and "parameters.density must lie in (0, 1], got 0" in capsys.readouterr().err
    status, _ = run(tmp_path, models, text, "--param", "density=0.5", "--dry-run")
    assert status == 0, capsys.readouterr().err
