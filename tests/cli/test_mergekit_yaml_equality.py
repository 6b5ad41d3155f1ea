"""``umtam-merge`` and real ``mergekit-yaml`` on the same mergekit YAML files.

Tiny Llama models (a base and three experts, safetensors folders with a ``config.json``
mergekit accepts) are merged by mergekit 0.1.5 and by ``umtam-merge`` with the same
configuration file; every tensor of the two outputs must agree: the same names, shapes and
dtypes, values within float32 tolerance (``rtol=1e-5, atol=1e-6``). Stochastic methods
(``dare_*``, ``della*``) run at density 1, where mergekit keeps every entry and draws no
mask. Where the two legitimately differ, the case says why next to its adapted comparison:
one bfloat16 rounding step, a few entries decided at a threshold, a reference file for
mergekit (16-bit arithmetic), tensors only umtam-merge writes (mergekit's architecture).

mergekit runs as a subprocess of the interpreter it is installed in, through the entry
point of its ``mergekit-yaml`` command (``mergekit.scripts.run_yaml:main``, the same click
command, so the same options); all files go through one process, since importing
mergekit takes seconds, and ``test_command_line`` checks that the ``mergekit-yaml``
command itself writes the same tensors.

Skipped unless mergekit and torch are installed beside a ``mergekit-yaml`` command (CI
skips it without importing torch). To run it, in a virtual environment with both::

    python3.11 -m venv /tmp/mkcheck/venv
    /tmp/mkcheck/venv/bin/pip install torch "mergekit==0.1.5"  # a CPU torch is enough
    /tmp/mkcheck/venv/bin/pip install -e ".[test,experiments]"
    /tmp/mkcheck/venv/bin/python -m pytest -o addopts="" -n 0 \\
        tests/cli/test_mergekit_yaml_equality.py
"""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mergekit")
torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"
if not MERGEKIT_YAML.exists():
    pytest.skip(f"no mergekit-yaml command at {MERGEKIT_YAML}", allow_module_level=True)

from umtam_jax.cli.merge import main  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS, VOCAB = 16, 32, 4, 2, 3, 32
FLAGS = ["--no-cuda", "--quiet", "--random-seed", "0", "--no-copy-tokenizer"]
TOL = {"rtol": 1e-5, "atol": 1e-6}
MODELS = ("base", "e0", "e1", "e2")

# Expert weights and densities of the task-arithmetic family (YAML flow mappings).
_W3 = (
    "{weight: 1.0, density: 0.5}",
    "{weight: 0.5, density: 0.7}",
    "{weight: 0.7, density: 0.6}",
)


def _file(method, models, params="{}", base=True, extra=""):
    """A mergekit file: ``models`` is a sequence of (``base``/``e0``/..., parameters or "")."""
    lines = [f"merge_method: {method}", *(["base_model: $base"] if base else []), "models:"]
    for name, p in models:
        lines.append(f"  - {{model: ${name}, parameters: {p}}}" if p else f"  - model: ${name}")
    return "\n".join([*lines, f"parameters: {params}", extra, ""])


def _three(method, params="{}", weights=_W3, extra=""):
    return _file(method, zip(("e0", "e1", "e2"), weights, strict=True), params, extra=extra)


def _pair(method, params):
    return _file(method, [("base", ""), ("e0", "")], params)


_LINEAR = [("e0", "{weight: 0.3}"), ("e1", "{weight: 0.7}")]
_T_FILTERED = "{t: [{filter: self_attn, value: 0.2}, {filter: mlp, value: 0.8}, {value: 0.5}]}"
_SLICES = f"""merge_method: slerp
base_model: $base
slices:
  - sources:
      - {{model: $base, layer_range: [0, {LAYERS}]}}
      - {{model: $e0, layer_range: [0, {LAYERS}]}}
parameters: {{t: 0.4}}
"""
_NO_DENSITY = tuple(w.split(",")[0] + "}" for w in _W3)
_THREE = [("e0", ""), ("e1", ""), ("e2", "")]
# One bfloat16 rounding step (2**-8 to 2**-7 of the value): the float32 results of two
# computation orders may lie on either side of a bfloat16 rounding boundary.
_BF16 = {"rtol": 2**-7, "atol": 1e-6}


def _bf16(case_id, text, tol=_BF16):
    """A case with ``dtype: bfloat16`` and its reference. Documented difference
    (docs/methods.md §2, "mergekit parity", and the methods' sections): mergekit computes
    the task-arithmetic family, ``karcher``, ``arcee_fusion``, ``model_stock``, ``nuslerp``,
    ``multislerp`` and ``sce`` in the inputs' dtype (each step rounded to bfloat16),
    umtam_jax in float32 from the bfloat16 inputs. The reference is mergekit computing in
    float32 (``dtype: float32``) on copies of the models rounded to bfloat16 (``$r_base``,
    ...), its output written as bfloat16."""
    ref = text.replace("$", "$r_").replace("dtype: bfloat16", "dtype: float32\nout_dtype: bfloat16")
    return (case_id, text, tol, ref)


# (id, mergekit YAML with $base, $e0, $e1, $e2 for the model folders[, tolerance[, the file
# mergekit runs instead]]). A tolerance's "flips" is the fraction of each tensor's entries
# allowed outside it, for selections at a threshold that rounding or ties decide.
CASES = [
    ("linear", _file("linear", _LINEAR, "{normalize: true}", base=False)),
    ("linear_unnormalized", _file("linear", _LINEAR, "{normalize: false}", base=False)),
    ("linear_with_base_model", _file("linear", [*_LINEAR, ("base", "{weight: 0.5}")])),
    (
        "linear_weight_gradient",
        _file("linear", [("e0", "{weight: [0.2, 0.8]}"), ("e1", "{weight: 0.7}")], base=False),
    ),
    ("task_arithmetic", _three("task_arithmetic", "{lambda: 0.8}", _NO_DENSITY)),
    ("task_arithmetic_normalize", _three("task_arithmetic", "{normalize: true}", _NO_DENSITY)),
    (
        "task_arithmetic_weight_gradient",
        _three("task_arithmetic", "{}", ("{weight: [0.2, 0.8]}", *_NO_DENSITY[1:])),
    ),
    (
        "task_arithmetic_filtered_lambda",
        _file(
            "task_arithmetic",
            _THREE,
            "{weight: 0.5, lambda: [{filter: mlp, value: 0.5}, {value: 1.0}]}",
        ),
    ),
    ("ties", _three("ties")),
    ("ties_lambda_int8_mask", _three("ties", "{lambda: 0.7, int8_mask: true}")),
    (
        "ties_filtered_density",
        _three("ties", "{density: [{filter: self_attn, value: 0.3}, {value: 0.8}]}", _NO_DENSITY),
    ),
    ("dare_ties_density_1", _three("dare_ties", "{}", _NO_DENSITY)),
    ("dare_linear_density_1", _three("dare_linear", "{lambda: 0.9, density: 1}", _NO_DENSITY)),
    ("breadcrumbs", _three("breadcrumbs", "{gamma: 0.05}")),
    ("breadcrumbs_ties", _three("breadcrumbs_ties", "{gamma: 0.05}")),
    ("breadcrumbs_ties_normalize", _three("breadcrumbs_ties", "{gamma: 0.05, normalize: true}")),
    ("della_density_1_epsilon_0", _three("della", "{epsilon: 0.0}", _NO_DENSITY)),
    ("della_density_1", _three("della", "{}", _NO_DENSITY)),
    ("della_linear_density_1_epsilon_0", _three("della_linear", "{epsilon: 0.0}", _NO_DENSITY)),
    ("della_linear_density_1_normalize", _three("della_linear", "{normalize: true}", _NO_DENSITY)),
    ("slerp", _pair("slerp", "{t: 0.3}")),
    ("slerp_base_listed_second", _file("slerp", [("e0", ""), ("base", "")], "{t: 0.3}")),
    ("slerp_gradient", _pair("slerp", "{t: [0, 0.5, 1]}")),
    ("slerp_filtered", _pair("slerp", _T_FILTERED)),
    ("slerp_slices", _SLICES),
    ("nuslerp", _file("nuslerp", _LINEAR)),
    ("nuslerp_no_base", _file("nuslerp", _LINEAR, base=False)),
    (
        "nuslerp_no_base_row_wise",
        _file("nuslerp", _LINEAR, "{nuslerp_flatten: false, nuslerp_row_wise: true}", base=False),
    ),
    ("multislerp", _three("multislerp", "{}", _NO_DENSITY)),
    ("multislerp_no_base", _file("multislerp", _LINEAR, "{normalize_weights: false}", base=False)),
    ("karcher", _file("karcher", [("e0", ""), ("e1", "")])),
    ("karcher_no_base", _file("karcher", _THREE, "{max_iter: 20}", base=False)),
    ("model_stock", _file("model_stock", _THREE)),
    ("model_stock_filter_wise", _file("model_stock", _THREE, "{filter_wise: true}")),
    ("nearswap", _pair("nearswap", "{t: 0.01}")),
    # Undocumented but legitimate: the importance |w - w0| * KL(softmax(w) || softmax(w0))
    # of nearly equal rows is a difference of near-equal terms, about 1e-3 relative error
    # in float32 in mergekit as here (both against float64); an entry within that of the
    # threshold takes the expert's value in one and the base's in the other (one entry in
    # 6 of the 30 tensors here).
    ("arcee_fusion", _pair("arcee_fusion", "{}"), {**TOL, "flips": 0.01}),
    ("sce", _file("sce", _THREE, "{select_topk: 0.5}")),
    ("sce_topk_1", _file("sce", _THREE)),
    ("ram", _file("ram", _THREE, "{epsilon: 0.01}")),
    ("ramplus_tl", _file("ramplus_tl", _THREE, "{epsilon: 0.008, r: 0.5, alpha: 0.6}")),
    ("passthrough", _file("passthrough", [("e0", "")], base=False)),
    ("passthrough_scale", _file("passthrough", [("e0", "{scale: 0.5}")], base=False)),
    # mergekit's linear computes in float32 too: Σ c·w then / Σ c; one entry in 8048 ends
    # on the other side of a bfloat16 rounding boundary.
    ("linear_bfloat16", _file("linear", _LINEAR, base=False, extra="dtype: bfloat16"), _BF16),
    ("linear_out_float16", _file("linear", _LINEAR, base=False, extra="out_dtype: float16")),
    _bf16(
        "task_arithmetic_bfloat16",
        _three("task_arithmetic", "{lambda: 0.8}", extra="dtype: bfloat16"),
    ),
    # Also documented (docs/algorithm.md, TIES): bfloat16 deltas have many equal magnitudes
    # and mergekit breaks ties at the top-k threshold with an unstable argsort, umtam_jax to
    # the lower index: 113 of 8048 entries differ, each at such a tie.
    _bf16("ties_bfloat16", _three("ties", extra="dtype: bfloat16"), {**_BF16, "flips": 0.05}),
    _bf16("karcher_bfloat16", _file("karcher", _THREE, base=False, extra="dtype: bfloat16")),
    # The reference also avoids a mergekit defect: with dtype: bfloat16 and no out_dtype its
    # arcee_fusion writes float32 tensors (its mask is .float(), which promotes the result,
    # and nothing casts it back), while its config.json says bfloat16.
    _bf16(
        "arcee_fusion_bfloat16",
        _pair("arcee_fusion", "{}") + "dtype: bfloat16\n",
        {**_BF16, "flips": 0.01},
    ),
    # The same models in two shards with an index, and without lm_head (tied embeddings).
    ("sharded_inputs", _three("ties").replace("$", "$s_")),
    ("tied_embeddings", _three("ties").replace("$", "$t_")),
    # Undocumented difference: mergekit writes only the tensors of its architecture file
    # (mergekit/_data/architectures/llama.json) and silently drops any other, here the
    # q/k/v biases of attention_bias: true and an old checkpoint's rotary_emb.inv_freq;
    # umtam-merge merges every tensor of the files. The tensors both write must agree.
    ("extra_tensors", _three("ties").replace("$", "$x_"), {**TOL, "extra": ("inv_freq", "bias")}),
]


def _shapes() -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HEADS * head, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    return shapes


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 64,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def _variant(prefix: str, tensors: dict, config: dict) -> tuple[dict, dict, int]:
    """(tensors, config, shards) of a model in set ``prefix``: ``r_`` rounded to bfloat16
    (stored as float32), ``s_`` in two shards, ``t_`` tied embeddings (no ``lm_head``),
    ``x_`` with attention biases and ``rotary_emb.inv_freq``; ``""`` as it is."""
    if prefix == "r_":
        tensors = {k: torch.from_numpy(v).bfloat16().float().numpy() for k, v in tensors.items()}
    elif prefix == "t_":
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        config = {**config, "tie_word_embeddings": True}
    elif prefix == "x_":
        tensors = dict(tensors)
        for k in [k for k in tensors if k.endswith(tuple(f"{p}_proj.weight" for p in "qkv"))]:
            tensors[k.replace("weight", "bias")] = np.ascontiguousarray(tensors[k][:, 0])
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.arange(1, 3, dtype="f4")
        config = {**config, "attention_bias": True}
    return tensors, config, 2 if prefix == "s_" else 1


def _write(folder: Path, tensors: dict, config: dict, shards: int) -> None:
    folder.mkdir()
    names = sorted(tensors)
    files = {
        f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)
    }
    if shards == 1:
        files = {"model.safetensors": names}
    for file, part in files.items():
        part_tensors = {k: tensors[k] for k in part}
        safetensors_numpy.save_file(part_tensors, str(folder / file), metadata={"format": "pt"})
    if shards > 1:
        index = {"metadata": {}, "weight_map": {k: f for f, part in files.items() for k in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """The model folders by name: a base (norm weights near 1), three experts (the base
    plus seeded noise of standard deviation 0.01 on every tensor), and the same in each set
    of :func:`_variant` (``r_base``, ``s_e0``, ...)."""
    root = tmp_path_factory.mktemp("llama")
    rng = np.random.default_rng(0)
    base = {
        k: (1 + rng.normal(0, 0.05, s) if len(s) == 1 else rng.normal(0, 0.1, s)).astype("f4")
        for k, s in _shapes().items()
    }
    paths = {}
    for name in MODELS:
        noise = 0.0 if name == "base" else 0.01
        tensors = {k: (v + rng.normal(0, noise, v.shape)).astype("f4") for k, v in base.items()}
        for prefix in ("", "r_", "s_", "t_", "x_"):
            paths[prefix + name] = str(root / (prefix + name))
            _write(root / (prefix + name), *_variant(prefix, tensors, _config()))
    return paths


# Runs mergekit-yaml's click command once per (config, output, error file), in one process.
_DRIVER = """
import json, sys, traceback
from pathlib import Path
from mergekit.scripts.run_yaml import main
for config, out, error in json.loads(sys.argv[1]):
    try:
        main([config, out, *json.loads(sys.argv[2])], standalone_mode=False)
    except Exception:
        Path(error).write_text(traceback.format_exc())
"""


@pytest.fixture(scope="module")
def mergekit_outputs(models, tmp_path_factory) -> Path:
    """mergekit's output of every case, under ``ROOT/<id>/mergekit``."""
    root = tmp_path_factory.mktemp("cases")
    jobs = []
    for case_id, text, *rest in CASES:
        (root / case_id).mkdir()
        config = root / case_id / "config.yaml"
        config.write_text(string.Template(text).substitute(models))
        if len(rest) > 1:  # mergekit runs the reference file instead
            config = root / case_id / "reference.yaml"
            config.write_text(string.Template(rest[1]).substitute(models))
        jobs.append([str(config), str(root / case_id / "mergekit"), str(root / case_id / "error")])
    subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(jobs), json.dumps(FLAGS)],
        check=True,
        timeout=600,
    )
    return root


def _load(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a safetensors folder: its dtype and its values in float64 (read with
    torch: ``safetensors.numpy`` cannot read bfloat16)."""
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in safetensors_torch.load_file(str(f)).items():
            tensors[k] = (str(v.dtype).removeprefix("torch."), v.to(torch.float64).numpy())
    return tensors


def _compare(expected: Path, actual: Path, tol: dict) -> None:
    """Same names, dtypes and shapes, values within ``tol`` (``rtol``, ``atol``) but for a
    fraction ``tol["flips"]`` (default 0) of each tensor's entries; ``actual`` may have
    more tensors only with a name holding one of ``tol["extra"]``."""
    want, got = _load(expected), _load(actual)
    more = [n for n in got if n not in want]
    assert set(want) <= set(got), sorted(set(want) - set(got))
    assert all(any(s in n for s in tol.get("extra", ())) for n in more), more
    assert not tol.get("extra") or more, "no extra tensors: the case no longer checks them"
    bad = []
    for name, (dtype, value) in want.items():
        assert (got[name][0], got[name][1].shape) == (dtype, value.shape), name
        close = np.isclose(got[name][1], value, rtol=tol["rtol"], atol=tol["atol"])
        if (~close).sum() > tol.get("flips", 0) * close.size:
            diff = np.abs(got[name][1] - value).max()
            bad.append(f"{name}: {(~close).sum()} entries, max |diff| {diff:.3g}")
    assert not bad, f"{len(bad)} of {len(want)} tensors differ: " + "; ".join(bad)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_tensors(case, mergekit_outputs):
    case_id, _text, *rest = case
    tol = rest[0] if rest else TOL
    folder = mergekit_outputs / case_id
    assert not (folder / "error").exists(), (folder / "error").read_text()
    out = folder / "umtam"
    config = str(folder / "config.yaml")
    assert main([config, "-o", str(out), "--no-progress", "--output-format", "safetensors"]) == 0
    _compare(folder / "mergekit", out, tol)


def test_command_line(mergekit_outputs, tmp_path):
    """The ``mergekit-yaml`` command writes what the batched entry point wrote."""
    folder = mergekit_outputs / "ties"
    subprocess.run(
        [str(MERGEKIT_YAML), str(folder / "config.yaml"), str(tmp_path / "out"), *FLAGS],
        check=True,
        timeout=300,
    )
    _compare(folder / "mergekit", tmp_path / "out", {"rtol": 0, "atol": 0})
