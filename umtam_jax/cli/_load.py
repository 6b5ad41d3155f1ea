"""The ``umtam-merge`` configuration as given: a YAML file (the project's schema, or a
mergekit file translated by :mod:`umtam_jax.cli._mergekit`) with the command-line flags
applied on top, as a dictionary that :func:`umtam_jax.cli._config.build_plan` checks.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml

from umtam_jax.cli import _mergekit, _mergekit_models
from umtam_jax.cli._config import EXPERT_KEYS
from umtam_jax.cli._config_parameters import PER_EXPERT
from umtam_jax.cli._yaml import MAX_CONFIG_BYTES, ConfigError, load_yaml

PROG = "umtam-merge"


def warn(message: str) -> None:
    """One warning line on standard error."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _parse_value(text: str, flag: str) -> Any:
    if not text.strip():
        return ""
    try:
        return load_yaml(text, flag)
    except yaml.YAMLError as err:
        raise ConfigError(f"{flag} value {text!r} is not valid: {one_line(err)}") from None


def _expert_flag(text: str) -> dict[str, Any]:
    """``PATH[,weight=W][,density=D][,fisher=PATH]``: the options are the trailing
    comma-separated pieces holding ``=``, so a path may hold commas."""
    pieces = text.split(",")
    first = len(pieces)
    while first > 1 and ("=" in pieces[first - 1] or _is_option_name(pieces[first - 1])):
        first -= 1
    path, options = ",".join(pieces[:first]), pieces[first:]
    entry: dict[str, Any] = {"path": path}
    options_given = _key_values(options, "--expert option", f"--expert {path}: ")
    if "path" in options_given:
        raise ConfigError(f"--expert {path}: path is given twice")
    for key, value in options_given.items():
        path_key = key in ("fisher", "curvature")
        entry[key] = value if path_key else _parse_value(value, "--expert")
    return entry


def _is_option_name(piece: str) -> bool:
    """Whether a piece after a comma is an --expert option without its value (or empty),
    which is an error to report rather than a part of the path."""
    return not piece.strip() or piece.strip() in EXPERT_KEYS


def _key_values(items: list[str], what: str, owner: str) -> dict[str, str]:
    """``KEY=VALUE`` items as ``{key: value text}``; ``what`` names an item and ``owner``
    begins the message for a key given twice (as a duplicate key in a file is refused)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r} is not KEY=VALUE")
        if key.strip() in out:
            raise ConfigError(f"{owner}{key.strip()} is given twice")
        out[key.strip()] = value
    return out


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML file (if any) with the command-line flags applied on top."""
    flag_params = _key_values(args.param or [], "--param", "--param ")
    config: dict[str, Any] = {}
    if args.config is not None:
        try:
            with open(args.config, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as err:
            raise ConfigError(f"cannot read {args.config}: {err.strerror}") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{args.config} is larger than {MAX_CONFIG_BYTES} bytes")
        try:
            config = load_yaml(raw.decode("utf-8"), args.config) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{args.config} is not UTF-8 text") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{args.config} is not valid YAML: {one_line(err)}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{args.config} must hold a YAML mapping")
        if _mergekit.is_mergekit(config):
            # Translated for the method that runs; --base is the base_model of a file
            # without one, where the method reads a base (linear, karcher and passthrough
            # would merge a base_model as one more model: --base only gives the structure).
            named, note = config.get("merge_method"), ""
            if args.method is not None:
                config = {**config, "merge_method": args.method}
                if args.method != named:  # messages naming merge_method say where it is
                    names = f"; the file names {named!r}" if named is not None else ""
                    note = f" (merge_method {args.method!r} from --method{names})"
            base_input = config["merge_method"] in _mergekit_models.BASE_IS_AN_INPUT
            if args.base is not None and config.get("base_model") is None and not base_input:
                config = {**config, "base_model": args.base}
            try:
                config = _mergekit.translate(config, warn=lambda message: warn(message + note))
            except ConfigError as err:
                raise ConfigError(f"{err}{note}") from None
        else:
            _refuse_internal_keys(config)
    given_by_models = [  # gamma/epsilon that every model of the file gives as its own
        k for k, at in (config.get(_mergekit.PARAMETER_KEYS) or {}).items()
        if k in _mergekit_models.SHARED_PER_MODEL and at.startswith("models[")
    ]  # fmt: skip
    for key in given_by_models:
        value = (config.get("parameters") or {}).get(key)
        if key in flag_params:
            warn(f"--param {key} replaces the {key} every model of the file gives ({value!r}): "
                 f"the merge takes one {key} for every model")  # fmt: skip
        elif args.expert:
            warn(f"--expert replaces the file's models, but the merge still takes the {key} "
                 f"they give ({value!r}); give --param {key} to choose another")  # fmt: skip
    if args.expert and _merges_the_base(config):
        warn(
            f"--expert replaces the file's models, base_model {config['base']!r} among them: "
            f"merge_method {config['method']!r} merges it only if an --expert names it"
        )
    for key in ("method", "base", "output", "seed"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    if args.expert:
        config["experts"] = [_expert_flag(e) for e in args.expert]
    if flag_params:
        params = dict(config.get("parameters") or {})
        params.update({k: _parse_value(v, "--param") for k, v in flag_params.items()})
        config["parameters"] = params
        keys = dict(config.get(_mergekit.PARAMETER_KEYS) or {})
        config[_mergekit.PARAMETER_KEYS] = keys | {k: f"--param {k}" for k in flag_params}
        varying = config.get(_mergekit.TENSOR_SETTINGS) or {}
        config[_mergekit.TENSOR_SETTINGS] = {
            k: v for k, v in varying.items() if k not in flag_params
        }
        _warn_of_own_values(config, flag_params)
    if config.pop(_mergekit.SAME_VOCABULARY, False):
        _check_vocabularies(config)
    return config


def _check_vocabularies(config: dict[str, Any]) -> None:
    """``tokenizer_source: base``: mergekit aligns the models' embedding rows to the base's
    tokenizer (``models[0]``'s without a base) by token, umtam-merge merges them by id,
    which is the same only where each model's token ids are the reference's and the
    embeddings have as many rows as the tokenizer has tokens; refuses the others. A model
    without tokenizer files counts as the same (as in mergekit); a path that is no folder
    is left to the merge's own check."""
    from umtam_jax.checkpoint import _model_files as M

    experts = config.get("experts")
    entries: list[Any] = experts if isinstance(experts, list) else []
    paths = [(_entry_key(e, i), e.get("path") if isinstance(e, dict) else e)
             for i, e in enumerate(entries)]  # fmt: skip
    reference = config.get("base")
    if not isinstance(reference, str):  # mergekit: the first model's tokenizer
        reference = paths[0][1] if paths else None
    if not isinstance(reference, str) or not os.path.isdir(reference):
        return
    refused = "'tokenizer_source: base'"
    try:
        ours = M.vocabulary(reference)  # read once, compared with every model's
        if ours is None:
            raise ValueError(f"{reference} has no tokenizer files")
        why = M.padded_embeddings(reference, ours)
        if why is not None:
            raise ConfigError(
                f"{refused}: {reference}'s embeddings have padding rows ({why}), which "
                "mergekit cuts to the tokenizer's length when it aligns the rows by token; "
                "umtam-merge merges the rows by id and keeps them: leave out "
                "tokenizer_source to merge by id, as mergekit then does"
            )
        for where, path in paths:
            if not isinstance(path, str) or not os.path.isdir(path):
                continue
            why = None if _mergekit_models.same_model(path, reference) else (
                M.vocabulary_difference(ours, path))  # fmt: skip
            if why is not None:
                raise ConfigError(
                    f"{refused}: the token ids of {where} ({path}) may not be those of "
                    f"{reference} ({why}); mergekit would align the embedding rows by token, "
                    "umtam-merge merges them by id and does not align them: give models "
                    "that share the tokenizer (or leave out tokenizer_source to merge by "
                    "id, as mergekit then does)"
                )
    except ConfigError:
        raise
    except ValueError as err:  # a vocabulary file that cannot be read, or none
        raise ConfigError(f"{refused}: {err}") from None


def _entry_key(entry: Any, index: int) -> str:
    """Where an expert entry stands in the file: a mergekit file's ``models[k]``, else
    ``experts[index]``."""
    default = f"experts[{index}]"
    return str(entry.get(_mergekit_models.KEY, default)) if isinstance(entry, dict) else default


def _warn_of_own_values(config: dict[str, Any], flag_params: dict[str, str]) -> None:
    """Warns where a --param flag sets a per-expert parameter that models give their own
    values of: the flag is the default of the others (as the file's 'parameters' is),
    not a replacement of theirs."""
    experts = config.get("experts")
    for name in flag_params:
        if name == "weights":  # not a --param (an expert's weight): refused by the plan
            continue
        keys = [key for key, param in PER_EXPERT.items() if param == name]
        own = [
            _entry_key(e, i)
            for i, e in enumerate(experts if isinstance(experts, list) else [])
            if isinstance(e, dict)
            and any(k in e or k in (e.get(_mergekit_models.VARYING) or {}) for k in keys)
        ]
        if own:
            warn(
                f"--param {name} is the default of the models without their own {keys[0]}; "
                f"{', '.join(own)} give theirs, which it does not replace"
            )


def _merges_the_base(config: dict[str, Any]) -> bool:
    """Whether a translated mergekit configuration merges its base model as one of the
    experts (``linear``, ``karcher``, ``passthrough``, which have no base role)."""
    base, experts = config.get("base"), config.get("experts")
    if _mergekit.PARAMETER_KEYS not in config or not isinstance(experts, list):
        return False  # a native configuration
    return any(
        isinstance(e, dict) and _mergekit_models.same_model(e.get("path"), base) for e in experts
    )


def _refuse_internal_keys(config: dict[str, Any]) -> None:
    """Refuses, in a native file, the keys a translated mergekit file carries for messages
    (they would rename the keys that errors name)."""
    experts = config.get("experts")
    entries = experts if isinstance(experts, list) else []
    for where, entry in [("", config)] + [(f"experts[{i}]", e) for i, e in enumerate(entries)]:
        internal = _mergekit.INTERNAL_KEYS & set(entry if isinstance(entry, dict) else ())
        if internal:
            raise ConfigError(f"unknown configuration key {where}{sorted(internal)}")


def one_line(err: BaseException) -> str:
    """An exception's message on one line (an OSError's reason and file)."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.strerror and err.filename and str(err.filename) not in text:
        text = f"{err.strerror}: {err.filename}"
    return text or type(err).__name__
