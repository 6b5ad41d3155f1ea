"""Running a validated ``umtam-merge`` plan: out of core through the engine, or in memory.

Both paths open the inputs as :mod:`umtam_jax.engine` sources (umtam_jax checkpoints,
Orbax's own checkpoints such as a CheckpointManager step, or Hugging Face safetensors
models), validate the whole merge on their metadata first, and write through the same
writer; ``--in-memory`` only reads every input whole and calls the
in-memory method on the whole trees (on each group of tensors that take the same
arguments, where a mergekit file's values vary by tensor) instead of merging leaf by leaf.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

import jax
import numpy as np

from umtam_jax import engine, merging
from umtam_jax.checkpoint import _format
from umtam_jax.cli._config import Plan
from umtam_jax.cli._config_parameters import PER_EXPERT, layer_scope
from umtam_jax.cli._load import PROG
from umtam_jax.cli._mergekit_settings import resolver
from umtam_jax.cli._yaml import ConfigError
from umtam_jax.merging import METHODS

# Per-expert parameter → its key in an expert's entry (weights → weight).
_PER_EXPERT_KEY = {name: key for key, name in PER_EXPERT.items()}
# Per-expert inputs the library names by index (statistics[1]) → what they are of an expert.
_EXPERT_INPUTS = {"statistics": "statistics", "fishers": "Fisher", "curvatures": "curvature"}


def needs_statistics(plan: Plan) -> bool:
    """Whether the plan reads the experts' UMTAM statistics."""
    method = METHODS[plan.method]
    if method.extra == "curvatures":
        return not any(e.curvature for e in plan.experts)
    return method.extra == "statistics" or (
        method.extra == "scores" and plan.parameters.get("scores", "saliency") == "saliency"
    )


def method_kwargs(plan: Plan) -> dict[str, Any]:
    """The method's keyword arguments: the parameters, and the PRNG key from the seed."""
    kwargs = {k: v for k, v in plan.parameters.items() if k != "scores"}
    if isinstance(kwargs.get("scope"), dict):
        kwargs["scope"] = layer_scope(kwargs["scope"])
    if METHODS[plan.method].param("key") is not None:
        kwargs["key"] = jax.random.key(plan.seed)
    return kwargs


def _job(plan: Plan) -> engine.Job:
    method = METHODS[plan.method]
    extra = {
        "fisher_dirs": [e.fisher for e in plan.experts] if method.extra == "fishers" else None,
        "curvature_dirs": (
            [e.curvature for e in plan.experts] if any(e.curvature for e in plan.experts) else None
        ),
    }
    try:
        return engine.job_from_paths(
            plan.method,
            plan.base,
            [e.path for e in plan.experts],
            statistics=needs_statistics(plan) if method.extra is not None else None,
            kwargs=method_kwargs(plan),
            dtype=plan.dtype,
            out_dtype=plan.out_dtype,
            tensor_kwargs=(
                resolver(plan.tensor_parameters, METHODS[plan.method].defaults())
                if plan.tensor_parameters
                else None
            ),
            **extra,
        )
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    except (ValueError, TypeError) as err:
        hint = (
            " (or use scores: magnitude)"
            if method.extra == "scores" and "has none" in str(err)
            else ""
        )
        raise _failure("the merge would fail", err, plan, hint) from None


# A pytree path of string keys, ['model']['layers']['0']['mlp']['weight'], as the library
# names a leaf; Hugging Face models' users know it as the tensor model.layers.0.mlp.weight.
_TREE_PATH = re.compile(r"(?:\['[^'\[\]]*'\]){2,}")


def _tensor_name(match: re.Match) -> str:
    before = match.string[match.start() - 1] if match.start() else " "
    glued = before.isalnum() or before == "]"
    name = ".".join(re.findall(r"\['([^']*)'\]", match.group(0)))
    if match.string[: match.start()].endswith("tensor "):  # "a's tensor ['w']": named so
        return name
    return f" tensor {name}" if glued else f"tensor {name}"  # experts[1] tensor a.w


def _failure(what: str, err: Exception, plan: Plan, hint: str = "") -> ConfigError:
    """The one-line error of a failed merge, naming experts as the file does.

    The library names an expert by its index among the experts (``experts[1]``) and its
    per-expert values by parameter (``weights[1]``, ``density[1]``); a mergekit file lists
    them as ``models[2]`` (its base may come first) and ``models[2].parameters.weight``.
    Each expert named is followed by its path, and each value a tensor got from a
    setting that varies by tensor (a gradient, filtered values) by its key in the file.
    Where every input is a Hugging Face model, a leaf's pytree path is given as its tensor
    name.
    """
    named: dict[int, None] = {}

    def rename(match: re.Match) -> str:
        name, i = match.group(1), int(match.group(2))
        if i >= len(plan.experts):
            return match.group(0)
        expert = plan.experts[i]
        if name in _EXPERT_INPUTS:  # read from the expert's folder or its own path
            named[i] = None
            return f"{expert.key}'s {_EXPERT_INPUTS[name]}"
        if name != "experts" and _PER_EXPERT_KEY[name] not in expert.values:
            # a list under 'parameters', not the expert's own value
            return f"parameters.{match.group(0)}" if name in plan.parameters else match.group(0)
        named[i] = None
        return expert.key if name == "experts" else expert.value_key(_PER_EXPERT_KEY[name])

    # Not inside a quoted leaf name (a tensor may be called "density[1]").
    names = "|".join(["experts", *_EXPERT_INPUTS, *map(re.escape, _PER_EXPERT_KEY)])
    message = re.sub(rf"(?<![\w'.])({names})\[(\d+)\]", rename, str(err))
    if all(engine.is_huggingface(p) for p in (plan.base, *(e.path for e in plan.experts)) if p):
        message = _TREE_PATH.sub(_tensor_name, message)
    paths = [f"{plan.experts[i].key} is {plan.experts[i].path}" for i in sorted(named)]
    paths += [  # a Fisher or curvature read from a path of its own
        f"{plan.experts[i].key}'s {label} is {getattr(plan.experts[i], attr)}"
        for i in sorted(named)
        for attr, label in (("fisher", "Fisher"), ("curvature", "curvature"))
        if getattr(plan.experts[i], attr) and f"{plan.experts[i].key}'s {label}" in message
    ]
    # The values a tensor got from settings that vary by tensor, shown by the engine as
    # "tensor NAME (max_iter=5.5, ...)": where the file gives each.
    shown = re.match(r"tensor \S+ \(([^)]*)\)", str(err))
    paths += [
        f"{param} is from {setting.key}"
        for param, setting in plan.tensor_parameters.items()
        if shown and re.search(rf"(?:^|, ){re.escape(param)}=", shown.group(1))
    ]
    legend = f" ({'; '.join(paths)})" if paths else ""
    return ConfigError(f"{what}: {message}{hint}{legend}")


def _metadata(plan: Plan) -> dict[str, Any]:
    return {
        "merge": {
            "method": plan.method,
            "base": plan.base,
            "experts": [dataclasses.asdict(e) for e in plan.experts],
            "parameters": plan.parameters,
            "tensor_parameters": {k: v.as_json() for k, v in plan.tensor_parameters.items()},
            "seed": plan.seed,
        }
    }


def _describe(plan: Plan, job: engine.Job, fmt: str, max_shard_size: int) -> str:
    """The dry run's plan: inputs, tensors and bytes, method, parameters, output."""
    kinds = {
        engine.SafetensorsSource: "safetensors",
        engine.OrbaxSource: "umtam_jax checkpoint",
        engine.PlainOrbaxSource: "Orbax checkpoint",
    }
    total = sum(leaf.nbytes for leaf in job.leaves)
    lines = [f"{PROG}: dry run OK: {plan.method} of {len(job.experts)} expert(s)"]
    if plan.base is not None:
        lines.append(f"  base: {plan.base} ({kinds[type(job.base)]})")
    else:
        lines.append("  base: none (the method takes none; expert 0 gives the structure)")
    for i, e in enumerate(plan.experts):
        lines.append(f"  expert {i}: {e.path} ({kinds[type(job.experts[i])]})")
    shown = {k: v for k, v in plan.parameters.items() if k not in plan.tensor_parameters}
    lines.append(f"  parameters: {shown}" + (f", seed {plan.seed}" if "key" in job.kwargs else ""))
    for name, setting in plan.tensor_parameters.items():
        values = {repr(o[name]): o[name] for o in job.leaf_options.values()}
        span = ""
        if all(isinstance(v, int | float) for v in values.values()):
            span = f" from {min(values.values()):g} to {max(values.values()):g}"
        lines.append(
            f"  {name} by tensor ({setting.key}): {len(values)} value(s){span} over "
            f"{len(job.leaf_options)} tensor(s)"
        )
    lines.append(f"  tensors: {len(job.leaves)}, {total:,} bytes merged")
    if plan.output is not None:
        where = f"  output: {plan.output} ({fmt}"
        if fmt == "safetensors":
            shards = _shard_count([leaf.nbytes for leaf in job.leaves], max_shard_size)
            where += f", {shards} shard(s)"
        lines.append(where + ")")
    return "\n".join(lines)


def _shard_count(sizes: list[int], limit: int) -> int:
    count, current = 1, 0
    for size in sizes:
        if current and current + size > limit:
            count, current = count + 1, 0
        current += size
    return count


def _in_memory(plan: Plan, job: engine.Job) -> list[np.ndarray]:
    """Every input read whole, then the in-memory method on the whole trees (on each group
    of leaves that takes the same arguments, where some vary by tensor); returns the
    output's leaves (non-floating ones copied from the base)."""
    everything = list(range(len(job.leaves)))
    data: dict[str, Any] = {}
    for group in job.groups(engine.DEFAULT_GROUP_BYTES):  # bounded reads, all kept
        part = job.read(group)
        if not data:
            data = part
            continue
        data["base"].update(part["base"])
        for key in ("experts", "extra"):
            for whole, more in zip(data.get(key, []), part.get(key, []), strict=True):
                whole.update(more)

    def tree(leaves: dict[int, Any]) -> Any:
        values = [None if j in job.passthrough else leaves[j] for j in everything]
        return jax.tree_util.tree_unflatten(job._treedef, values)

    method = METHODS[plan.method]
    merged: dict[int, Any] = {}
    try:  # in groups of leaves that take the same arguments (one group unless some vary)
        for given, members in job.option_groups:
            base = job.subset(tree(data["base"]), members) if job.base_input else None
            experts = [job.subset(tree(e), members) for e in data["experts"]]
            extra = (
                [job.subset(tree(x), members) for x in data["extra"]] if "extra" in data else None
            )
            if method.single_expert:
                experts, extra = experts[0], None if extra is None else extra[0]
            result = merging.merge(method, base, experts, extra, **{**job.kwargs, **given})
            merged.update(zip(members, jax.tree.leaves(result), strict=True))
        out = [job.copy(j, data) if j in job.passthrough else merged[j] for j in everything]
    except (ValueError, TypeError) as err:
        raise _failure("merge failed", err, plan) from None
    return [job.cast_output(j, x) for j, x in zip(everything, out, strict=True)]


def execute(plan: Plan, args: argparse.Namespace) -> int:
    """Validates the inputs and the output, then merges (or prints the dry run's plan)."""

    if plan.output is None and not args.dry_run:
        raise ConfigError("'output' is required (or use --dry-run)")
    job = _job(plan)
    fmt = engine.resolve_output_format(job.base, args.output_format)
    limit = _shard_limit(args.max_shard_size)
    if plan.output is not None:
        output = _format._absolute(plan.output)
        try:
            engine.check_output(output, job, fmt, overwrite=args.force)
        except FileExistsError:
            raise ConfigError(
                f"the output {plan.output} exists; pass --force to replace it"
            ) from None
    if args.in_memory and job.extras is not None and len(job.option_groups) > 1:
        raise ConfigError(
            f"--in-memory: method {plan.method!r} reads each expert's "
            f"{METHODS[plan.method].extra}, and values that vary by tensor are merged out of "
            "core only: drop --in-memory"
        )
    if args.dry_run:
        print(_describe(plan, job, fmt, limit))
        return 0
    write = engine.writer(
        job, output, fmt, overwrite=args.force, metadata=_metadata(plan), max_shard_size=limit
    )
    if args.in_memory:
        leaves = _in_memory(plan, job)
        path = write(job.output, lambda j: leaves[j])
        how = "in memory"
    else:
        try:
            path = engine.merge(job, write, progress=not args.no_progress)
        except (ValueError, TypeError) as err:
            raise _failure("merge failed", err, plan) from None
        how = "out of core"
    print(f"{PROG}: wrote {path} ({plan.method} of {len(job.experts)} expert(s), {fmt}, {how})")
    return 0


def _shard_limit(size: Any) -> int:
    from umtam_jax.checkpoint._safetensors_write import _parse_size

    try:
        return _parse_size(size)
    except ValueError as err:
        raise ConfigError(f"--max-shard-size: {err}") from None
