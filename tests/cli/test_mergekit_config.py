"""mergekit configurations run unchanged through ``umtam-merge`` with mergekit's semantics,
checked against the float64 reference of mergekit's generalized task arithmetic."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from tests import trees
from tests.cli.mergekit_helpers import TOL, restored, run
from tests.merging import helpers as H
from umtam_jax import checkpoint


@pytest.mark.parametrize("flags", [(), ("--in-memory",)])
def test_ties_with_weights_densities_lambda_and_the_base_among_the_models(tmp_path, models, flags):
    status, out = run(
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
    status, out = run(tmp_path, models, text)
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
    status, out = run(
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
    status, out = run(
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


def test_dry_run_and_mergekit_parameter_names(tmp_path, models, capsys):
    status, _ = run(
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
    status, out = run(tmp_path, models, text, "--param", "density=0.3")
    assert status == 0
    ref = H.ref_ties(models["base"], models["experts"], density=want)
    trees.assert_tree_close(checkpoint.restore_params(out), ref, **TOL)


def test_any_registry_method_in_mergekit_syntax_keeps_its_own_parameters():
    from umtam_jax.cli import _mergekit, _mergekit_models

    config = _mergekit.translate(
        {
            "merge_method": "umtam",
            "base_model": "b",
            "models": [{"model": "b"}, {"model": "x", "parameters": {"density": 0.3}}, "y"],
            "parameters": {"normalize": "selected", "scope": "global"},
        }
    )
    assert config["method"] == "umtam"
    key = _mergekit_models.KEY  # each expert's place in the file, for messages
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


def test_linear_without_a_base_model_and_global_weight_defaults(tmp_path, models):
    status, out = run(
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
    # --base gives linear, which reads no base, the structure only: it is not merged in.
    (tmp_path / "flag").mkdir()
    text = (
        "merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
        "parameters: {{weight: 1.0}}\n"
    )
    status, out = run(tmp_path / "flag", models, text, "--base", models["paths"]["base"])
    assert status == 0
    want = {p: (H.f64(H.get(a, p)) + H.f64(H.get(b, p))) / 2.0 for p in H.PATHS}
    trees.assert_tree_close(checkpoint.restore_params(out), want, **TOL)


def test_karcher_takes_the_base_model_as_one_more_input(tmp_path, models):
    status, out = run(
        tmp_path,
        models,
        "merge_method: karcher\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]",
    )
    assert status == 0
    from umtam_jax import merging

    want = merging.karcher(None, [*models["experts"], models["base"]])  # appended, as there
    chex.assert_trees_all_equal(restored(out), want)


def test_slerp_and_nuslerp_with_a_base_model(tmp_path, models):
    from umtam_jax import merging

    status, out = run(
        tmp_path,
        models,
        "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters: {{t: 0.3}}",
    )
    assert status == 0
    want = merging.slerp(models["base"], models["experts"][0], t=0.3)
    chex.assert_trees_all_equal(restored(out), want)
    status, out = run(
        tmp_path / "nu" if (tmp_path / "nu").mkdir() is None else tmp_path,
        models,
        "merge_method: nuslerp\nbase_model: {base}\nmodels:\n"
        "  - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
        "  - {{model: {b}, parameters: {{weight: 0.7}}}}",
    )
    assert status == 0
    want = merging.nuslerp(models["base"], models["experts"], weights=[0.3, 0.7])
    chex.assert_trees_all_equal(restored(out), want)


def test_della_uses_mergekit_rescale_and_shared_epsilon(tmp_path, models):
    from umtam_jax import merging

    status, out = run(
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
    chex.assert_trees_all_equal(restored(out), want)
    status, _ = run(
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


def test_each_models_gamma_is_its_own_else_the_files_else_the_methods_default():
    """As mergekit reads them: a model's own gamma/epsilon overrides the file's value (or
    gradient), which overrides the method's default; umtam-merge merges with one value
    for every model, so the values the models get must agree."""
    from umtam_jax.cli._mergekit import translate
    from umtam_jax.cli._yaml import ConfigError

    def config(method, top, *own):
        models = [{"model": f"m{i}", "parameters": {**p, "density": 0.5}} for i, p in
                  enumerate(own)]  # fmt: skip
        return {"merge_method": method, "base_model": "b", "models": models, "parameters": top}

    every = translate(config("breadcrumbs", {"gamma": 0.05}, {"gamma": 0.2}, {"gamma": 0.2}))
    assert every["parameters"]["gamma"] == 0.2  # each model's own overrides the file's
    gradient = {"gamma": [0.0, 0.1, 0.3]}
    every = translate(config("breadcrumbs", gradient, {"gamma": 0.2}, {"gamma": 0.2}))
    assert every["parameters"]["gamma"] == 0.2 and "_mergekit_tensor_settings" not in every
    same = translate(config("breadcrumbs", {"gamma": 0.2}, {"gamma": 0.2}, {}))
    assert same["parameters"]["gamma"] == 0.2  # the other model takes the file's 0.2
    default = translate(config("della", {}, {"epsilon": 0.15}, {}))
    assert default["parameters"]["epsilon"] == 0.15  # the method's default: mergekit's too
    for top, own, other in [
        ({}, {"gamma": 0.2}, r"models\[1\] the method's default for gamma \(0.01\)"),
        ({"gamma": 0.05}, {"gamma": 0.2}, r"models\[1\] parameters.gamma \(0.05\)"),
        (gradient, {"gamma": 0.2}, r"models\[1\] parameters.gamma, which varies by tensor"),
    ]:
        with pytest.raises(ConfigError, match=r"models\[0\] 0.2; " + other):
            translate(config("breadcrumbs", top, own, {}))
    with pytest.raises(ConfigError, match=r"models\[0\] 0.1; models\[1\] 0.2\)"):
        translate(config("della", {}, {"epsilon": 0.1}, {"epsilon": 0.2}))


def test_a_density_gradient_is_accepted_and_unused_by_task_arithmetic():
    """mergekit declares density for task_arithmetic and never reads it: a gradient of it
    (global or a model's) crashed the configuration check with a KeyError."""
    from umtam_jax.cli._config import build_plan
    from umtam_jax.cli._mergekit import translate

    config = translate({
        "merge_method": "task_arithmetic", "base_model": "b",
        "models": [{"model": "x", "parameters": {"density": [0.1, 0.5]}}, {"model": "y"}],
        "parameters": {"density": [0.2, 0.8]},
    })  # fmt: skip
    plan = build_plan(config)
    assert plan.parameters == {"scaling": 1.0} and plan.tensor_parameters == {}
    assert [e.varying for e in plan.experts] == [{}, {}]


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


def test_method_and_base_flags_translate_the_file_for_the_merge_that_runs(tmp_path, models):
    """``--method`` on a mergekit file merges as if the file named that ``merge_method``
    (its normalize and rescale defaults too; the file's own were applied as well), and
    ``--base`` gives a file without ``base_model`` its base."""
    text = (
        "merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{lambda: 0.8}}\n"
        "models: [{{model: {a}, parameters: {{weight: 0.5}}}}, "
        "{{model: {b}, parameters: {{weight: 1.5}}}}]\n"
    )
    for sub in ("w", "n"):
        (tmp_path / sub).mkdir()
    status, out = run(tmp_path, models, text, "--method", "ties", "--param", "density=1")
    assert status == 0
    status, want = run(tmp_path / "w", models, text.replace("task_arithmetic", "ties"),
                       "--param", "density=1")  # fmt: skip
    assert status == 0
    trees.assert_tree_close(restored(out), restored(want), rtol=0, atol=0)
    no_base = text.replace("base_model: {base}\n", "")
    status, out = run(tmp_path / "n", models, no_base, "--base", models["paths"]["base"])
    assert status == 0
    ref = H.ref_task_arithmetic(models["base"], models["experts"], scaling=0.8, weights=[0.5, 1.5])
    trees.assert_tree_close(restored(out), ref, **TOL)
