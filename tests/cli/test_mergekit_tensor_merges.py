"""mergekit's parameter values that vary by tensor (layer gradients, filtered values) and
whole-model ``slices``, merged and checked against float64 NumPy references of mergekit's
formulas: the classic SLERP file (``slices`` of two whole models, ``t`` filtered by
``self_attn`` and ``mlp`` with gradients), a TIES ``lambda`` by filter, a task-arithmetic
gradient under ``normalize: true``, per-model gradients of mergekit's README TIES file,
checkpoints whose keys hold dots, and UMTAM with the experts' statistics; out of core and
in memory alike."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from tests.cli.mergekit_settings_helpers import LAYERS, _model
from umtam_jax import checkpoint
from umtam_jax.cli.merge import main

pytest.importorskip("safetensors.numpy")


def _evaluate(value, name, x):
    """mergekit's ``evaluate_setting``, written out for the references."""
    if not isinstance(value, list):
        return value
    if all(isinstance(v, dict) for v in value):
        for cond in value:
            if cond.get("filter") in (None, "*") or cond["filter"] in name:
                return _evaluate(cond["value"], name, x)
        return None
    scaled = x * (len(value) - 1)
    i0 = int(np.floor(scaled))
    i1 = min(len(value) - 1, i0 + 1)
    return (1 - (scaled - i0)) * value[i0] + (scaled - i0) * value[i1]


def _x(name):
    """The layer position mergekit plans a tensor at: i / (N − 1), 0 outside the layers."""
    for i in range(LAYERS):
        if f".layers.{i}." in name:
            return i / (LAYERS - 1)
    return 0.0


def _merge(tmp_path, text, *flags, out="out"):
    config = tmp_path / "merge.yaml"
    config.write_text(textwrap.dedent(text).replace("{root}", str(tmp_path)))
    status = main([str(config), "-o", str(tmp_path / out), "--no-progress", *flags])
    assert status == 0
    reader = checkpoint.SafetensorsReader(tmp_path / out)
    names = list(checkpoint.names_from_tree(reader.abstract()))
    return dict(zip(names, reader.read(names), strict=True))


def _slerp(t, v0, v1):
    """mergekit's ``slerp`` in float64."""
    a, b = v0.astype(np.float64), v1.astype(np.float64)
    dot = np.sum(a / np.linalg.norm(a) * b / np.linalg.norm(b))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return (np.sin(theta * (1 - t)) * a + np.sin(theta * t) * b) / np.sin(theta)


SLERP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


@pytest.mark.parametrize("in_memory", [False, True])
def test_the_classic_slerp_file_matches_mergekits_formulas(tmp_path, in_memory):
    a, b = _model(tmp_path, "a", 0), _model(tmp_path, "b", 1)
    merged = _merge(
        tmp_path,
        f"""
        slices:
          - sources:
              - model: {{root}}/a
                layer_range: [0, {LAYERS}]
              - model: {{root}}/b
                layer_range: [0, {LAYERS}]
        merge_method: slerp
        base_model: {{root}}/a
        parameters:
          t: {json.dumps(SLERP_T)}
        """,
        *(["--in-memory"] if in_memory else []),
    )
    ts = set()
    for name in a:
        t = _evaluate(SLERP_T, name, _x(name))
        ts.add(t)
        np.testing.assert_allclose(merged[name], _slerp(t, a[name], b[name]), atol=2e-6)
    # Both gradients between their steps (13/30 at layer 1 of 4) and the fallback.
    assert 0.5 in ts and any(abs(t - 13 / 30) < 1e-12 for t in ts) and len(ts) >= 6


def test_a_filtered_lambda_and_a_gradient_under_normalize(tmp_path):
    base, e1, e2 = (_model(tmp_path, n, s) for n, s in (("base", 0), ("e1", 1), ("e2", 2)))
    lam = [{"filter": "mlp", "value": [0.5, 2.0]}, {"filter": "norm", "value": 3}, {"value": 1}]
    models = textwrap.dedent("""
        models:
          - model: {root}/e1
            parameters: {weight: 1.0}
          - model: {root}/e2
            parameters: {weight: 0.5}
        base_model: {root}/base
        dtype: float32
        """)
    merged = _merge(
        tmp_path,
        models + "merge_method: task_arithmetic\nparameters: {normalize: true, "
        "lambda: [1.0, 0.2, 1.5]}\n",
    )
    for name in base:
        scaling = _evaluate([1.0, 0.2, 1.5], name, _x(name)) / 1.5
        tau = 1.0 * (e1[name] - base[name].astype(np.float64)) + 0.5 * (e2[name] - base[name])
        np.testing.assert_allclose(merged[name], base[name] + scaling * tau, atol=2e-6)
    # A filtered lambda that gives some tensors no value: mergekit's λ = 1 there, still
    # divided by Σ weight.
    merged = _merge(
        tmp_path,
        models + "merge_method: task_arithmetic\nparameters: {normalize: true, "
        "lambda: [{filter: mlp, value: [0.5, 2.0]}]}\n",
        out="filtered",
    )
    for name in base:
        scaling = (_evaluate([0.5, 2.0], name, _x(name)) if "mlp" in name else 1.0) / 1.5
        tau = 1.0 * (e1[name] - base[name].astype(np.float64)) + 0.5 * (e2[name] - base[name])
        np.testing.assert_allclose(merged[name], base[name] + scaling * tau, atol=2e-6)
    # TIES at density 1 is task arithmetic with sign election: check the lambda by filter.
    merged = _merge(
        tmp_path,
        models + f"merge_method: ties\nparameters: {{density: 1.0, lambda: {json.dumps(lam)}}}\n",
        out="ties",
    )
    weights = np.array([1.0, 0.5])
    for name in base:
        w = weights.reshape(2, *[1] * base[name].ndim)
        weighted = np.stack([e1[name] - base[name], e2[name] - base[name]]) * w
        sign = np.where(weighted.sum(0) > 0, 1.0, -1.0)  # mergekit's "sum" election
        keep = np.sign(weighted) == sign
        divisor = (w * keep).sum(0)
        divisor[np.abs(divisor) < 1e-8] = 1.0
        want = base[name] + _evaluate(lam, name, _x(name)) * (weighted * keep).sum(0) / divisor
        np.testing.assert_allclose(merged[name], want, atol=2e-6)


def test_a_param_flag_replaces_the_files_gradient(tmp_path):
    a, b = _model(tmp_path, "a", 0), _model(tmp_path, "b", 1)
    text = """
        models: [{model: {root}/b}]
        merge_method: slerp
        base_model: {root}/a
        parameters: {t: [0, 1]}
        """
    merged = _merge(tmp_path, text, "--param", "t=0.3")
    for name in a:
        np.testing.assert_allclose(merged[name], _slerp(0.3, a[name], b[name]), atol=2e-6)


def _ties_reference(base, deltas, weights, densities):
    """mergekit's TIES on one tensor in float64: magnitude trim (``max(1, int(d·n))``
    entries kept), "sum" sign election, mean over the agreeing weights."""
    kept = []
    for delta, density in zip(deltas, densities, strict=True):
        flat = np.abs(delta).reshape(-1)
        keep = np.zeros(flat.size, bool)
        if density >= 1:
            keep[:] = True
        else:
            keep[np.argsort(-flat, kind="stable")[: max(1, int(density * flat.size))]] = True
        kept.append(delta * keep.reshape(delta.shape))
    w = np.array(weights).reshape(-1, *[1] * base.ndim)
    weighted = np.stack(kept).astype(np.float64) * w
    sign = np.where(weighted.sum(0) > 0, 1.0, -1.0)
    agree = np.sign(weighted) == sign
    divisor = (w * agree).sum(0)
    divisor[np.abs(divisor) < 1e-8] = 1.0
    return base + (weighted * agree).sum(0) / divisor


def test_mergekits_readme_ties_file_with_per_model_gradients(tmp_path):
    """The TIES example of mergekit's README: a density gradient, a weight gradient and a
    filtered weight without a fallback (the file's default weight, itself a gradient)."""
    models = [_model(tmp_path, n, s) for n, s in (("base", 0), ("e1", 1), ("e2", 2), ("e3", 3))]
    density = [[1, 0.7, 0.1], 0.5, 0.33]
    weight = [1.0, [0, 0.3, 0.7, 1], [{"filter": "mlp", "value": 0.5}]]
    default_weight = [1.0, 0.0]
    entries = "".join(
        f"  - model: {{root}}/e{i + 1}\n    parameters: {{density: {json.dumps(d)}, "
        f"weight: {json.dumps(w)}}}\n"
        for i, (d, w) in enumerate(zip(density, weight, strict=True))
    )
    text = (
        f"models:\n{entries}merge_method: ties\nbase_model: {{root}}/base\n"
        f"parameters: {{normalize: true, int8_mask: true, weight: {default_weight}}}\n"
    )
    for flags in ((), ("--in-memory",)):
        merged = _merge(tmp_path, text, *flags, out=f"out{len(flags)}")
        base, experts = models[0], models[1:]
        for name in base:
            x = _x(name)
            ws = [_evaluate(w, name, x) for w in weight]
            ws = [_evaluate(default_weight, name, x) if w is None else w for w in ws]
            ds = [_evaluate(d, name, x) for d in density]
            deltas = [e[name].astype(np.float64) - base[name] for e in experts]
            want = _ties_reference(base[name], deltas, ws, ds)
            np.testing.assert_allclose(merged[name], want, atol=2e-6, err_msg=name)


def test_layers_of_a_checkpoint_whose_keys_hold_dots_are_found(tmp_path):
    """Such a tree has no safetensors names; its tensors' dotted paths still give layers."""
    rng = np.random.default_rng(0)
    trees = {}
    for name in ("a", "b"):
        layers = {str(i): {"mlp": {"w": rng.normal(size=(3, 2)).astype(np.float32)}}
                  for i in range(3)}  # fmt: skip
        trees[name] = {
            "model": {"layers": layers},
            "head.proj": rng.normal(size=(2,)).astype(np.float32),
        }
        checkpoint.save_checkpoint(tmp_path / name, trees[name])
    text = "models: [{model: {root}/b}]\nmerge_method: slerp\nbase_model: {root}/a\n"
    merged = checkpoint.restore_params(_merge_path(tmp_path, text + "parameters: {t: [0, 1]}"))
    for i, t in enumerate((0.0, 0.5, 1.0)):
        a, b = (trees[n]["model"]["layers"][str(i)]["mlp"]["w"] for n in ("a", "b"))
        got = merged["model"]["layers"][str(i)]["mlp"]["w"]
        np.testing.assert_allclose(got, _slerp(t, a, b), atol=2e-6)
    np.testing.assert_allclose(merged["head.proj"], trees["a"]["head.proj"], atol=1e-7)  # x = 0


def _merge_path(tmp_path, text):
    config = tmp_path / "merge.yaml"
    config.write_text(text.replace("{root}", str(tmp_path)))
    assert main([str(config), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    return tmp_path / "out"


def test_values_by_tensor_with_the_experts_statistics(tmp_path, capsys):
    """UMTAM reads each expert's statistics: a lambda_momentum gradient merges each layer
    as merging.umtam does with that layer's value; --in-memory refuses it in one line."""
    import jax
    import optax

    import umtam_jax
    from umtam_jax import merging

    trees, stats = {}, {}
    for seed, name in enumerate(("base", "e1", "e2")):
        keys = jax.random.split(jax.random.key(seed), 3)
        params = {f"layers_{i}": {"kernel": jax.random.normal(keys[i], (6, 4))} for i in range(3)}
        opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=2)
        state = opt.init(params)
        for _ in range(2):
            grads = jax.tree.map(lambda x, s=seed: np.sin(x * (s + 1)), params)
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        checkpoint.save_checkpoint(tmp_path / name, params, opt_state=state)
        trees[name], stats[name] = params, umtam_jax.statistics(state)
    text = (
        "models: [{model: {root}/e1}, {model: {root}/e2}]\nmerge_method: umtam\n"
        "base_model: {root}/base\nparameters: {lambda_momentum: [0.0, 0.5, 1.0]}\n"
    )
    merged = checkpoint.restore_params(_merge_path(tmp_path, text))
    for i, lam in enumerate((0.0, 0.5, 1.0)):
        want = merging.umtam(
            trees["base"], [trees["e1"], trees["e2"]], [stats["e1"], stats["e2"]],
            lambda_momentum=lam,
        )  # fmt: skip
        leaf = f"layers_{i}"
        np.testing.assert_allclose(merged[leaf]["kernel"], want[leaf]["kernel"], atol=1e-6)
    config = tmp_path / "merge.yaml"
    for flags in (["--dry-run"], ["-o", str(tmp_path / "mem")]):  # refused before any read
        assert main([str(config), "--in-memory", "--no-progress", *flags]) == 2
        assert "values that vary by tensor are merged out of core only" in capsys.readouterr().err
    # A check of the method's that fails at one tensor names it (ota's convex weights).
    config.write_text(
        text.replace("{root}", str(tmp_path)).replace("umtam", "ota")
        .replace("lambda_momentum: [0.0, 0.5, 1.0]", "power: 0.5")
        .replace("{model: " + str(tmp_path) + "/e2}",
                 "{model: " + str(tmp_path) + "/e2, parameters: {weight: [1.0, 0.0]}}")
        .replace("{model: " + str(tmp_path) + "/e1}",
                 "{model: " + str(tmp_path) + "/e1, parameters: {weight: [1.0, 0.0]}}")
    )  # fmt: skip
    assert main([str(config), "-o", str(tmp_path / "ota"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "tensor layers_2.kernel: weights must be non-negative" in err, err
    assert not (tmp_path / "ota").exists()


def test_in_memory_merges_without_a_base_as_out_of_core(tmp_path):
    """--in-memory gave multislerp without base_model the first model as its base."""
    a = _model(tmp_path, "a", 0)
    _model(tmp_path, "b", 1)
    text = (
        "merge_method: multislerp\nmodels:\n  - {model: {root}/a, parameters: {weight: 0.3}}\n"
        "  - {model: {root}/b, parameters: {weight: 0.7}}\n"
    )
    out = _merge(tmp_path, text, out="out")
    mem = _merge(tmp_path, text, "--in-memory", out="mem")
    for name in a:
        np.testing.assert_array_equal(out[name], mem[name])


def test_a_file_wide_density_gradient_is_every_models(tmp_path):
    """No model gives its own density: each takes the file's gradient (it crashed)."""
    base, e1, e2 = (_model(tmp_path, n, s) for n, s in (("base", 0), ("e1", 1), ("e2", 2)))
    text = (
        "models: [{model: {root}/e1, parameters: {weight: 1.0}}, "
        "{model: {root}/e2, parameters: {weight: 0.7}}]\nmerge_method: ties\n"
        "base_model: {root}/base\nparameters: {density: [0.3, 0.9]}\n"
    )
    merged = _merge(tmp_path, text)
    for name in base:
        d = _evaluate([0.3, 0.9], name, _x(name))
        deltas = [e[name].astype(np.float64) - base[name] for e in (e1, e2)]
        want = _ties_reference(base[name], deltas, [1.0, 0.7], [d, d])
        np.testing.assert_allclose(merged[name], want, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("where", ["model", "file"])
def test_a_filtered_density_without_a_fallback_is_mergekits_default_1_elsewhere(tmp_path, where):
    """A density filter that matches some tensors only: the others take mergekit's
    default density, 1 (they were refused as having none)."""
    base, e1, e2 = (_model(tmp_path, n, s) for n, s in (("base", 0), ("e1", 1), ("e2", 2)))
    filtered = "[{filter: mlp, value: 0.5}]"
    own, file_wide = (f", density: {filtered}", "") if where == "model" else ("", filtered)
    text = (
        f"models: [{{model: {{root}}/e1, parameters: {{weight: 1.0{own}}}}}, "
        "{model: {root}/e2, parameters: {weight: 0.8}}]\nmerge_method: ties\n"
        "base_model: {root}/base\n" + (f"parameters: {{density: {file_wide}}}\n" * bool(file_wide))
    )
    merged = _merge(tmp_path, text)
    for name in base:
        d = 0.5 if "mlp" in name else 1.0
        ds = [d, d if where == "file" else 1.0]
        deltas = [e[name].astype(np.float64) - base[name] for e in (e1, e2)]
        want = _ties_reference(base[name], deltas, [1.0, 0.8], ds)
        np.testing.assert_allclose(merged[name], want, atol=2e-6, err_msg=name)
