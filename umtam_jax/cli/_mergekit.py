"""mergekit configurations, translated into ``umtam-merge``'s own.

A file with a ``merge_method`` key is a mergekit configuration::

    merge_method: ties
    base_model: models/base
    models:
      - model: models/math
        parameters: {weight: 1.0, density: 0.5}
      - model: models/code
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, int8_mask: true, lambda: 1.0}
    dtype: bfloat16
    tokenizer_source: base

It runs unchanged, with mergekit's semantics for the methods both support:

========================  =====================================================
mergekit                  umtam_jax
========================  =====================================================
``task_arithmetic``       ``task_arithmetic``; ``normalize: true`` divides by Σ weight
                          (of the weights merged, after ``--param``/``--expert``)
``ties``                  ``ties`` (``normalize: true``, the default, only)
``dare_linear``           ``dare`` with mergekit's L1 ``rescale`` (default true)
``dare_ties``             ``dare_ties`` with mergekit's L1 ``rescale`` (default true)
``breadcrumbs[_ties]``    the same, ``gamma`` shared by every model
``della[_linear]``        the same, ``epsilon`` shared by every model, ranked along
                          PyTorch's input axis (``layout: out_in``) as mergekit does
other mergekit methods    the registry method of the same name (``slerp``, ``linear``,
                          ``model_stock``, ``sce``, ...), its parameters by name
========================  =====================================================

``lambda`` is ``scaling``; a model's ``weight`` and ``density`` are the expert's (mergekit's
defaults: density 1), and given under ``parameters`` they are every model's default;
``int8_mask`` only changes mergekit's mask dtype and is accepted, and so is a ``density``
for a method that does not sparsify (mergekit declares it, unused, for ``task_arithmetic``).
A ``models`` entry naming the base model is the base, not an expert, except for ``linear``,
``karcher`` and ``passthrough``, which have no base role: mergekit merges their base model
as one more input (appended when ``models`` does not list it), and so does this (for
``linear`` the base then needs a weight, listed under ``models`` or given as the default,
as mergekit requires); it still gives the output's config and tokenizer files. Any method of
:data:`umtam_jax.merging.METHODS` may be named (``merge_method: umtam``), its parameters
under ``parameters``. ``dtype`` is the dtype the inputs are read in (the merge computes in
float32 or wider) and ``out_dtype`` the output's (default: ``dtype``, else the inputs').
A Hugging Face output gets the base's config and tokenizer files. Without
``tokenizer_source`` embedding rows are merged by token id, as in mergekit; with
``tokenizer_source: base`` mergekit aligns them to the base's tokenizer by token, which
umtam-merge does not: it checks that every model's token ids are the base's and that the
base's embeddings have no padding rows past its tokenizer (then the two agree), and
refuses otherwise, naming a token that differs.

Numbers may vary by tensor (per-layer gradients and filtered values,
:mod:`umtam_jax.cli._mergekit_settings`); ``slices`` of whole models are ``models``
(:mod:`umtam_jax.cli._mergekit_slices`). What umtam_jax does not have (other slices,
varying true/false options, tokenizer merging, chat templates, LoRA ``model+lora``
references, other methods) is refused with one error naming the key.
A quoted number (``weight: "0.5"``) is the number; another string, for a parameter
mergekit reads as a number or a bool, is refused as mergekit refuses it (its values as
mergekit reads them: :mod:`umtam_jax.cli._mergekit_values`). A value the method's
registry check refuses is one error naming its key (``models[1].parameters.gamma``,
``parameters.lambda``). Keys mergekit never reads (an unknown top-level key, a parameter
neither mergekit's method nor, for a method passed by name, the registry's declares, a
typo) are ignored, as in mergekit, with one warning naming them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from umtam_jax.cli._mergekit_models import (
    KEY,
    SHARED_PER_MODEL,
    VARYING,
    FileParameters,
    entries,
    expert,
    model_path,
    settle_shared,
)
from umtam_jax.cli._mergekit_settings import TensorSetting
from umtam_jax.cli._mergekit_slices import whole_model_slices
from umtam_jax.cli._mergekit_values import number, read_params
from umtam_jax.cli._yaml import ConfigError
from umtam_jax.merging import METHODS
from umtam_jax.merging._registry import PER_EXPERT_KINDS

# mergekit method → (registry method, default normalize, default rescale).
_GTA = {
    "task_arithmetic": ("task_arithmetic", False, False),
    "ties": ("ties", True, False),
    "dare_linear": ("dare", False, True),
    "dare_ties": ("dare_ties", False, True),
    "breadcrumbs": ("breadcrumbs", False, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", False, False),
    "della": ("della", True, True),
    "della_linear": ("della_linear", False, True),
}
# The parameters mergekit's methods read: (global, per model). mergekit never reads any
# other (its configuration keeps them, unchecked), so they are ignored here too, with a
# warning; a per-model one given globally is every model's default, as in mergekit.
_GTA_GLOBAL = ("int8_mask", "normalize", "rescale", "lambda")
# Their registry names, where the registry's differs.
_GTA_NAMES = {"lambda": "scaling", "rescale": "l1_rescale"}


def native_names(names: set[Any], allowed: set[str]) -> str:
    """A hint for parameters given by their mergekit names where the registry's are
    meant (``--param lambda=2``: ``scaling``), or ``""``."""
    hints = [f"{k} is {v}" for k, v in _GTA_NAMES.items() if k in names and v in allowed]
    return f" (mergekit's {', '.join(hints)})" if hints else ""


_READ: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{m: (_GTA_GLOBAL, ("weight", "density")) for m in _GTA},
    "breadcrumbs": (_GTA_GLOBAL, ("weight", "density", "gamma")),
    "breadcrumbs_ties": (_GTA_GLOBAL, ("weight", "density", "gamma")),
    "della": (_GTA_GLOBAL, ("weight", "density", "epsilon")),
    "della_linear": (_GTA_GLOBAL, ("weight", "density", "epsilon")),
    "linear": (("normalize",), ("weight",)),
    "slerp": (("t",), ()),
    "nearswap": (("t",), ()),
    "nuslerp": (("nuslerp_row_wise", "nuslerp_flatten"), ("weight",)),
    "multislerp": (("normalize_weights", "eps"), ("weight",)),
    "model_stock": (("filter_wise",), ()),
    "karcher": (("max_iter", "tol"), ()),
    "arcee_fusion": ((), ()),
    "passthrough": ((), ("scale",)),
    "sce": (("int8_mask", "select_topk"), ()),
    "ram": (("epsilon",), ()),
    "ramplus_tl": (("r", "alpha", "epsilon"), ()),
}
# umtam-merge's own additions, read by every method that takes them.
_ADDED_GLOBAL = ("layout",)
_TOP_LEVEL = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
}
_UNSUPPORTED = {
    "tokenizer": "tokenizer merging",
    "chat_template": "setting a chat template",
    "modules": "a configuration per module",
}
DTYPES = ("float32", "bfloat16", "float16", "float64")


def is_mergekit(config: Any) -> bool:
    """Whether ``config`` is a mergekit configuration (it has ``merge_method``)."""
    return isinstance(config, dict) and "merge_method" in config


def _dtype(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, str) and value.startswith("torch."):  # mergekit takes torch's names
        value = value.removeprefix("torch.")
    if value is not None and value not in DTYPES:
        raise ConfigError(f"'{key}' must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


#: The key under which a translated configuration maps each parameter (by the registry's
#: name) to the file's key that gave it (``scaling``: ``parameters.lambda``), for messages.
PARAMETER_KEYS = "_mergekit_parameter_keys"
#: Set in a translated configuration whose ``normalize: true`` divides ``scaling`` by the
#: experts' Σ weight (see :func:`normalized_scaling`).
NORMALIZE = "_mergekit_normalize"
#: The method's parameters that vary by tensor, by the registry's name (TensorSetting).
TENSOR_SETTINGS = "_mergekit_tensor_settings"
#: Set in a translated configuration with ``tokenizer_source: base``: every model's token
#: ids must be the base's (checked once the command line has replaced any models).
SAME_VOCABULARY = "_mergekit_same_vocabulary"
#: Every key a translated configuration may carry besides the native ones.
INTERNAL_KEYS = frozenset(
    {KEY, PARAMETER_KEYS, NORMALIZE, TENSOR_SETTINGS, VARYING, SAME_VOCABULARY}
)


def normalized_scaling(scaling: Any, weights: list[Any]) -> Any:
    """mergekit's ``normalize: true`` of the task-arithmetic family: the weighted sum of
    task vectors divided by Σ weight, unless ``|Σ weight| < 1e-8``; applied to ``scaling``
    once the command line has replaced any weights or experts."""
    total = sum(weights)
    return scaling / total if abs(total) >= 1e-8 else scaling


def translate(config: dict[str, Any], warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The native configuration (``method``, ``base``, ``experts``, ...) of a mergekit one.

    The parameters' values are checked where the native configuration's are, which names
    the file's keys from the map under :data:`PARAMETER_KEYS` (and each expert's place in
    the file under :data:`KEY`).

    Args:
      config: the mergekit configuration, as read from its YAML file.
      warn: called with one message listing the keys mergekit would not read (which are
        ignored, as mergekit ignores them); None: no message.

    Returns:
      The native configuration, with the internal keys of :data:`INTERNAL_KEYS`.

    Raises:
      ConfigError: an unsupported key or method, naming it.
    """
    if "slices" in config:
        config = {**config, "models": whole_model_slices(config)}
        del config["slices"]
    file = _file_parameters(config)
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError("'models' must be a non-empty list of {model, parameters} entries")
    experts = [e for where, entry in entries(file, models) if (e := expert(file, where, entry))]
    if not experts:
        raise ConfigError("'models' lists no model besides the base model")
    settle_shared(file, experts)
    if file.ignored and warn is not None:
        warn(
            f"ignoring {', '.join(file.ignored)}: not read by merge_method {file.name!r} in a "
            "mergekit file (mergekit ignores such keys too)"
        )
    out: dict[str, Any] = {"base": file.base, "experts": experts}
    if config.get("tokenizer_source") == "base":
        out[SAME_VOCABULARY] = True
    for key in ("output", "seed"):
        if key in config:
            out[key] = config[key]
    out["dtype"], out["out_dtype"] = _dtype(config, "dtype"), _dtype(config, "out_dtype")
    if file.varying:
        out[TENSOR_SETTINGS] = {_GTA_NAMES.get(k, k): v for k, v in file.varying.items()}
    return _parameters(file, out)


def _file_parameters(config: dict[str, Any]) -> FileParameters:
    """The method, the base model and the ``parameters`` of a mergekit file, checked."""
    for key, what in _UNSUPPORTED.items():
        if key in config:
            raise ConfigError(f"'{key}': {what} is not supported by umtam-merge")
    ignored = [repr(k) for k in config if k not in _TOP_LEVEL | {"output", "seed"}]
    name = config["merge_method"]
    if not isinstance(name, str) or (name not in _GTA and name not in METHODS):
        known = sorted(set(_GTA) | set(METHODS))
        raise ConfigError(f"merge_method {name!r} is not supported; supported: {', '.join(known)}")
    if config.get("tokenizer_source") not in (None, "base"):  # None: mergekit's default, base
        raise ConfigError("'tokenizer_source': only 'base' is supported")
    registered = METHODS[_GTA[name][0] if name in _GTA else name]  # checked just above
    base = config.get("base_model")
    if base is None and not registered.base_optional:
        raise ConfigError(f"'base_model' is required by merge_method {name!r}")
    if base is not None:
        base = model_path(base, "'base_model'")
    read_global, read_per_model = _READ.get(name, (None, None))
    typed = (read_global or ()) + (read_per_model or ())  # read as mergekit reads them
    if read_global is not None and name not in _GTA:  # passed by name: the registry's too
        read_global += tuple(p.name for p in registered.params if p.kind not in PER_EXPERT_KINDS)
    read_top = None  # the keys read under 'parameters' (both None: every key, see _READ)
    if read_global is not None and read_per_model is not None:
        read_top = read_global + read_per_model + _ADDED_GLOBAL
    varying: dict[str, TensorSetting] = {}
    global_params = read_params(
        config.get("parameters") or {}, "parameters", read_top, ignored, typed, varying
    )
    default_varying = {k: varying.pop(k) for k in ["weight", "density"] if k in varying}
    for key, value in varying.items():
        param = registered.param(_GTA_NAMES.get(key, key))
        if param is None or param.kind != "number":  # a flag, a choice, one value per model
            raise ConfigError(
                f"{value.key}: per-layer gradients and filtered values are supported for "
                "single numbers (t, lambda, epsilon, weight, density, ...)"
            )
    keys = {k: f"parameters.{k}" for k in global_params}
    # mergekit's tensor parameters given globally are every model's default.
    model_defaults: dict[str, Any] = {
        k: number(global_params.pop(k), f"parameters.{k}")
        for k in ("weight", "density")
        if k in global_params
    }
    return FileParameters(
        name=name,
        registered=registered,
        base=base,
        read_per_model=read_per_model,
        typed=typed,
        ignored=ignored,
        keys=keys,
        model_defaults=model_defaults,
        global_params=global_params,
        varying=varying,
        default_varying=default_varying,
    )


def _parameters(file: FileParameters, out: dict[str, Any]) -> dict[str, Any]:
    """``out`` with the method and its parameters: a method passed by name takes them as
    they are; the task-arithmetic family's are mergekit's, translated."""
    name, registered, global_params = file.name, file.registered, file.global_params
    global_params.pop("int8_mask", None)  # only mergekit's mask dtype, in any method
    # mergekit reads PyTorch (d_out, d_in) weights: methods that depend on the layout say so.
    layout = {}
    if registered.param("layout") is not None:
        layout["layout"] = global_params.pop("layout", "out_in")
    # The file's default density (mergekit's own is 1) is the method's parameter, which a
    # model's own density overrides and umtam-merge's --param flag replaces.
    density = {}
    if "density" in file.default_varying and registered.param("density") is not None:
        density["density"] = 1.0  # where no filter matches: mergekit's default
    elif "density" in file.model_defaults and registered.param("density") is not None:
        density["density"] = file.model_defaults["density"]
    elif "density" in file.model_defaults and name not in _GTA:
        raise ConfigError(f"parameters.density: merge_method {name!r} takes no density")
    if name not in _GTA:
        out["method"], out["parameters"] = name, {**global_params, **density, **layout}
        out[PARAMETER_KEYS] = file.keys
        return out
    method, normalize, rescale = _GTA[name]
    normalize = global_params.pop("normalize", normalize)
    rescale = global_params.pop("rescale", rescale)
    scaling = global_params.pop("lambda", 1.0)
    own = {k: global_params.pop(k) for k in SHARED_PER_MODEL if k in global_params}
    if global_params:
        raise ConfigError(
            f"parameters {sorted(global_params)} are not supported for merge_method {name!r} "
            "(supported: lambda, normalize, rescale, int8_mask"
            + "".join(f", {k}" for k in SHARED_PER_MODEL if registered.param(k))
            + ")"
        )
    not_taken = [k for k in own if registered.param(k) is None]
    if not_taken:
        raise ConfigError(f"merge_method {name!r} takes no {not_taken[0]!r}")
    parameters: dict[str, Any] = {"scaling": scaling, **own}
    if registered.param("density") is not None:
        parameters["density"] = density.get("density", 1.0)  # mergekit's default density
    else:  # mergekit declares density for every method of the family; unused here
        for e in out["experts"]:
            e.pop("density", None)
            if "density" in e.get(VARYING, {}):  # a gradient or filtered values of it
                e[VARYING] = {k: v for k, v in e[VARYING].items() if k != "density"}
                if not e[VARYING]:
                    del e[VARYING]
    if method == "ties":
        if not normalize or rescale:
            key = "rescale" if normalize else "normalize"
            raise ConfigError(
                f"parameters.{key}: merge_method 'ties' is supported with normalize: true and "
                "rescale: false only"
            )
    elif registered.param("normalize") is not None:
        parameters["normalize"] = normalize
    elif normalize:  # Σ weight is read once the flags have replaced weights or experts
        out[NORMALIZE] = True
    if registered.param("l1_rescale") is not None:  # mergekit's rescale is an L1 rescale
        parameters["l1_rescale"] = rescale
        if registered.param("rescale") is not None:
            parameters["rescale"] = False
    out["method"], out["parameters"] = method, {**parameters, **layout}
    # By the registry's names (lambda: scaling).
    out[PARAMETER_KEYS] = {_GTA_NAMES.get(k, k): key for k, key in file.keys.items()}
    return out
