"""mergekit configurations run unchanged through ``umtam-merge`` with mergekit's semantics,
checked against the float64 reference of mergekit's generalized task arithmetic."""

from __future__ import annotations

import os
import textwrap

import chex
import jax
import numpy as np
import pytest

from tests import trees
from tests.merging import helpers as H
from umtam_jax import checkpoint
from umtam_jax.cli.merge import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    rng = np.random.default_rng(3)
    base, experts = H.random_experts(rng, 2, dtype=np.float32)
    paths = {"base": str(root / "base"), "a": str(root / "a"), "b": str(root / "b")}
    checkpoint.save_checkpoint(paths["base"], base)
    for name, expert in zip("ab", experts, strict=True):
        checkpoint.save_checkpoint(paths[name], expert)
    return {"paths": paths, "base": base, "experts": experts}


def _run(tmp_path, models, text, *flags):
    p = models["paths"]
    config = tmp_path / "mergekit.yaml"
    config.write_text(textwrap.dedent(text).format(**p))
    out = tmp_path / "out"
    status = main([str(config), "--output", str(out), "--no-progress", *flags])
    return status, out


# float32 outputs against the float64 reference by path.
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("flags", [(), ("--in-memory",)])
def test_ties_with_weights_densities_lambda_and_the_base_among_the_models(tmp_path, models, flags):
    status, out = _run(
        tmp_path,
        models,
        """
        merge_method: ties
        base_model: {base}
        models:
          - model: {base}
          - model: {a}
            parameters: {{weight: 1.0, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.3}}
        parameters: {{normalize: true, int8_mask: true, lambda: 0.8}}
        dtype: float32
        tokenizer_source: base
        """,
        *flags,
    )
    assert status == 0
    want = H.ref_ties(
        models["base"], models["experts"], density=[0.5, 0.3], scaling=0.8, weights=[1.0, 0.5]
    )
    trees.assert_tree_close(checkpoint.restore_params(out), want, **TOL)


# normalize: true divides lambda by the summed weights; the second file spells numbers in
# YAML 1.2 exponent notation, gives tokenizer_source: null (mergekit's default) and a density
# mergekit declares for task_arithmetic without using it.
TASK_ARITHMETIC = {
    "normalize": (
        "models:\n  - {{model: {a}, parameters: {{weight: 0.7}}}}\n"
        "  - {{model: {b}, parameters: {{weight: 0.8}}}}\n"
        "parameters: {{normalize: true, lambda: 1.5}}",
        1.5 / 1.5,
    ),
    "mergekit spellings": (
        "models:\n  - {{model: {a}, parameters: {{weight: 7e-1, density: 0.5}}}}\n"
        "  - {{model: {b}, parameters: {{weight: 8E-1}}}}\n"
        "parameters: {{lambda: 15e-1}}\ntokenizer_source: null",
        1.5,
    ),
}


@pytest.mark.parametrize("case", list(TASK_ARITHMETIC))
def test_task_arithmetic_weights_and_lambda(tmp_path, models, case):
    body, scaling = TASK_ARITHMETIC[case]
    text = "merge_method: task_arithmetic\nbase_model: {base}\n" + body
    status, out = _run(tmp_path, models, text)
    assert status == 0
    want = H.ref_task_arithmetic(
        models["base"], models["experts"], scaling=scaling, weights=[0.7, 0.8]
    )
    trees.assert_tree_close(checkpoint.restore_params(out), want, **TOL)


@pytest.mark.parametrize(
    "method,rescale,normalize",
    [("dare_ties", None, None), ("dare_ties", False, True), ("dare_linear", None, None)],
)
def test_dare_methods_use_mergekit_rescale_defaults(tmp_path, models, method, rescale, normalize):
    params = {"rescale": rescale, "normalize": normalize}
    given = ", ".join(f"{k}: {str(v).lower()}" for k, v in params.items() if v is not None)
    status, out = _run(
        tmp_path,
        models,
        f"""
        merge_method: {method}
        base_model: {{base}}
        models:
          - {{{{model: {{a}}, parameters: {{{{weight: 1.0, density: 0.6}}}}}}}}
          - {{{{model: {{b}}, parameters: {{{{weight: 0.5, density: 0.4}}}}}}}}
        parameters: {{{{{given}}}}}
        """,
        "--seed",
        "7",
    )
    assert status == 0
    keeps = H.dare_keeps(jax.random.key(7), [0.6, 0.4], models["base"])
    l1 = True if rescale is None else rescale  # mergekit's dare default: L1 rescale
    kw = dict(density=[0.6, 0.4], weights=[1.0, 0.5], rescale=False, l1_rescale=l1)
    if method == "dare_ties":
        want = H.ref_dare_ties(
            models["base"], models["experts"], keeps, normalize=bool(normalize), **kw
        )
    else:
        want = H.ref_dare(models["base"], models["experts"], keeps, **kw)
    trees.assert_tree_close(checkpoint.restore_params(out), want, **TOL)


@pytest.mark.parametrize("name", ["bfloat16", "torch.bfloat16"])  # mergekit takes both
def test_out_dtype_casts_the_merge(tmp_path, models, name):
    status, out = _run(
        tmp_path,
        models,
        f"""
        merge_method: task_arithmetic
        base_model: {{base}}
        models: [{{{{model: {{a}}}}}}, {{{{model: {{b}}}}}}]
        out_dtype: {name}
        """,
    )
    assert status == 0
    got = checkpoint.restore_params(out)
    assert {np.asarray(x).dtype.name for x in jax.tree.leaves(got)} == {"bfloat16"}
    want = H.ref_task_arithmetic(models["base"], models["experts"])
    trees.assert_tree_close(got, want, rtol=1e-2, atol=1e-2)


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
            "merge_method: ties\nbase_model: {base}\n"
            "models: [{{model: {a}, parameters: {{density: [0.1, 0.9]}}}}]",
            "gradients",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
            "parameters: {{lambda: [{{filter: mlp, value: 1}}]}}",
            "gradients",
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
            "models[2].model repeats models[0].model",
        ),
        # A value out of the registry's range names the key it came from: under a model
        # for the per-model parameters, under 'parameters' for the global ones.
        (
            "merge_method: breadcrumbs\nbase_model: {base}\nmodels: [{{model: {a}, parameters: "
            "{{gamma: 5}}}}, {{model: {b}, parameters: {{gamma: 5}}}}]",
            "models[0].parameters.gamma must lie in [0.0, 1.0], got 5",
        ),
        (
            "merge_method: della\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}, "
            "parameters: {{epsilon: -1}}}}]",
            "models[1].parameters.epsilon must lie in [0.0, inf], got -1",
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
    status, out = _run(tmp_path, models, body)
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert needle.format(**models["paths"]) in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)


def test_dry_run_and_mergekit_parameter_names(tmp_path, models, capsys):
    status, _ = _run(
        tmp_path,
        models,
        """
        merge_method: ties
        base_model: {base}
        models: [{{model: {a}, parameters: {{density: 0.5}}}}, {{model: {b}}}]
        """,
        "--dry-run",
    )
    assert status == 0
    assert "dry run OK: ties of 2 expert(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("file_density", "own", "want"),
    [(None, None, [0.3, 0.3]), (0.5, None, [0.3, 0.3]), (0.5, 0.7, [0.7, 0.3])],
)
def test_a_density_flag_replaces_the_files_default_density(
    tmp_path, models, file_density, own, want
):
    """``--param density=…`` overrides the file: mergekit's default density (1) and the
    file's global one; a model's own density still wins, as in the file."""
    a = f"{{{{model: {{a}}, parameters: {{{{density: {own}}}}}}}}}" if own else "{{model: {a}}}"
    head = f"parameters: {{{{density: {file_density}}}}}\n" if file_density else ""
    text = f"merge_method: ties\nbase_model: {{base}}\n{head}models: [{a}, {{{{model: {{b}}}}}}]\n"
    status, out = _run(tmp_path, models, text, "--param", "density=0.3")
    assert status == 0
    ref = H.ref_ties(models["base"], models["experts"], density=want)
    trees.assert_tree_close(checkpoint.restore_params(out), ref, **TOL)


def test_any_registry_method_in_mergekit_syntax_keeps_its_own_parameters():
    from umtam_jax.cli import _mergekit

    config = _mergekit.translate(
        {
            "merge_method": "umtam",
            "base_model": "b",
            "models": [{"model": "b"}, {"model": "x", "parameters": {"density": 0.3}}, "y"],
            "parameters": {"normalize": "selected", "scope": "global"},
        }
    )
    assert config["method"] == "umtam"
    key = _mergekit.KEY  # each expert's place in the file, for messages
    assert config["experts"] == [
        {"path": "x", "density": 0.3, key: "models[1]"},
        {"path": "y", key: "models[2]"},
    ]
    assert config["parameters"] == {"normalize": "selected", "scope": "global"}


def test_the_base_is_found_among_the_models_by_real_path():
    """``base_model: ./a`` and a models entry ``a`` are one model: not an expert (a zero
    task vector), and for linear the listed base with its weight."""
    from umtam_jax.cli import _mergekit

    ties = _mergekit.translate({"merge_method": "ties", "base_model": "./a",
                                "models": [{"model": "a"}, {"model": "b"}]})  # fmt: skip
    assert [e["path"] for e in ties["experts"]] == ["b"]
    linear = _mergekit.translate({
        "merge_method": "linear", "base_model": "./a",
        "models": [{"model": "a", "parameters": {"weight": 0.3}},
                   {"model": "b", "parameters": {"weight": 0.7}}],
    })  # fmt: skip
    assert [(e["path"], e["weight"]) for e in linear["experts"]] == [("a", 0.3), ("b", 0.7)]


def _restored(out):
    return jax.tree.map(np.asarray, checkpoint.restore_params(out))


def test_linear_without_a_base_model_and_global_weight_defaults(tmp_path, models):
    status, out = _run(
        tmp_path,
        models,
        """
        merge_method: linear
        models:
          - model: {a}
            parameters: {{weight: 3.0}}
          - model: {b}
        parameters: {{weight: 1.0}}
        """,
    )
    assert status == 0
    a, b = models["experts"]
    want = {p: (3.0 * H.f64(H.get(a, p)) + H.f64(H.get(b, p))) / 4.0 for p in H.PATHS}
    trees.assert_tree_close(checkpoint.restore_params(out), want, **TOL)


def test_karcher_takes_the_base_model_as_one_more_input(tmp_path, models):
    status, out = _run(
        tmp_path,
        models,
        "merge_method: karcher\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]",
    )
    assert status == 0
    from umtam_jax import merging

    want = merging.karcher(None, [models["base"], *models["experts"]])
    chex.assert_trees_all_equal(_restored(out), want)


def test_slerp_and_nuslerp_with_a_base_model(tmp_path, models):
    from umtam_jax import merging

    status, out = _run(
        tmp_path,
        models,
        "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters: {{t: 0.3}}",
    )
    assert status == 0
    want = merging.slerp(models["base"], models["experts"][0], t=0.3)
    chex.assert_trees_all_equal(_restored(out), want)
    status, out = _run(
        tmp_path / "nu" if (tmp_path / "nu").mkdir() is None else tmp_path,
        models,
        "merge_method: nuslerp\nbase_model: {base}\nmodels:\n"
        "  - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
        "  - {{model: {b}, parameters: {{weight: 0.7}}}}",
    )
    assert status == 0
    want = merging.nuslerp(models["base"], models["experts"], weights=[0.3, 0.7])
    chex.assert_trees_all_equal(_restored(out), want)


def test_della_uses_mergekit_rescale_and_shared_epsilon(tmp_path, models):
    from umtam_jax import merging

    status, out = _run(
        tmp_path,
        models,
        """
        merge_method: della
        base_model: {base}
        models:
          - {{model: {a}, parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}}}
          - {{model: {b}, parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}}}
        parameters: {{lambda: 0.9, int8_mask: true}}
        """,
        "--seed",
        "3",
    )
    assert status == 0
    want = merging.della(
        models["base"], models["experts"], density=0.5, epsilon=0.1, key=jax.random.key(3),
        scaling=0.9, weights=[1.0, 0.5], rescale=False, l1_rescale=True, normalize=True,
        layout="out_in",  # mergekit configurations name PyTorch-layout weights
    )  # fmt: skip
    chex.assert_trees_all_equal(_restored(out), want)
    status, _ = _run(
        tmp_path,
        models,
        """
        merge_method: della
        base_model: {base}
        models:
          - {{model: {a}, parameters: {{epsilon: 0.1}}}}
          - {{model: {b}, parameters: {{epsilon: 0.2}}}}
        """,
    )
    assert status == 2


def test_int8_mask_and_layout_for_methods_passed_by_name():
    from umtam_jax.cli._mergekit import translate

    config = {
        "merge_method": "sce",
        "base_model": "b",
        "models": [{"model": "x"}, {"model": "y"}],
        "parameters": {"int8_mask": True, "select_topk": 0.5},
    }
    assert translate(config)["parameters"] == {"select_topk": 0.5}
    # The registry's own parameters of a method passed by name are read too.
    scope = {"scanned": ["blocks"]}
    own = {**config, "parameters": {"select_topk": 0.5, "scaling": 0.5, "scope": scope}}
    assert translate(own)["parameters"] == {"select_topk": 0.5, "scaling": 0.5, "scope": scope}
    warned = []  # a per-expert registry parameter is not a global one
    linear = {**config, "merge_method": "linear", "base_model": None, "parameters": {
        "weights": [1, 2]}}  # fmt: skip
    translate(linear, warn=warned.append)
    assert warned and "parameters.weights" in warned[0]
    # mergekit files name PyTorch-layout weights: methods taking a layout read it so
    iso = translate({**config, "merge_method": "iso_cts", "parameters": {}})
    assert iso["parameters"] == {"layout": "out_in"}
    own = translate({**config, "merge_method": "iso_cts", "parameters": {"layout": "in_out"}})
    assert own["parameters"] == {"layout": "in_out"}
    della = translate({**config, "merge_method": "della", "parameters": {"epsilon": 0.1}})
    assert della["parameters"]["layout"] == "out_in"


def test_quoted_numbers_are_numbers_as_in_mergekit(tmp_path, models):
    """mergekit's configuration reads a quoted number as the number."""
    status, out = _run(
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
    from umtam_jax.cli._mergekit import translate

    two = [{"model": "x"}, {"model": "y"}]
    linear = translate({"merge_method": "linear", "models": two, "parameters": {
        "normalize": "0"}})  # fmt: skip
    assert linear["parameters"] == {"normalize": False}
    ta = translate({"merge_method": "task_arithmetic", "base_model": "b", "models": two,
                    "parameters": {"normalize": 1, "int8_mask": "1", "lambda": "3"}})  # fmt: skip
    assert ta["parameters"] == {"scaling": 1.5}  # normalize: 3 / (1 + 1)
    karcher = translate({"merge_method": "karcher", "models": two, "parameters": {
        "max_iter": "10", "tol": 1e-6}})  # fmt: skip
    assert karcher["parameters"] == {"max_iter": 10, "tol": 1e-6}
    assert type(karcher["parameters"]["max_iter"]) is int


def test_keys_mergekit_does_not_read_are_ignored_with_one_warning(tmp_path, models, capsys):
    """mergekit keeps, unread, what its method does not declare (a top-level key, a
    per-model weight for slerp, a global density for it): the merge runs as mergekit's,
    and one warning names each ignored key where the file has it."""
    status, out = _run(
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
    chex.assert_trees_all_equal(_restored(out), want)
    status, _ = _run(
        tmp_path / "typo" if (tmp_path / "typo").mkdir() is None else tmp_path,
        models,
        "merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
        "parameters: {{scaling: 0.5}}",
        "--dry-run",
    )
    assert status == 0  # mergekit's task_arithmetic names it lambda: scaling is unread
    assert "ignoring parameters.scaling" in capsys.readouterr().err
