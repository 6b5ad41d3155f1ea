"""The benchmarks' records: the one results writer (:func:`write_results`), which every
benchmark uses for its JSON file and which rebuilds ``RESULTS.md`` from them; parts of a
benchmark recorded on their own so that it resumes (:func:`recorded_run`); and the
append-only journals of long runs.

Nothing here replaces a file it did not write: a JSON file that is not a record, or a
``RESULTS.md`` that is not generated, is refused. A record carries the library's integrity
checksum (:mod:`umtam_jax.experiments._sealed`): one read back whose content no longer
matches it is damaged, never taken as measured.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import CODE_GIT, RESULTS_DIR, command, environment, git_commit


def _jsonable(x: Any) -> Any:
    """NumPy/JAX scalars and arrays to lists and numbers, paths to strings; non-finite
    floats become None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, str | bytes):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _atomic_write(path: Path, text: str) -> None:
    # Imported here: importing umtam_jax loads JAX, which scripts that only read results
    # (and the memory probes' parents) do not need.
    from umtam_jax.experiments import store

    store.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def read_record(path: Path) -> Any:
    """The JSON at ``path``, its ``"checksum"`` entry verified and removed (one written
    before records had it is read as it is).

    Raises:
        OSError: it cannot be read.
        ValueError: it is not UTF-8 JSON, or its content does not match its checksum (the
            reason alone: the callers name the file, or not, as their output needs).
    """
    from umtam_jax.experiments import _sealed  # imported here: see _atomic_write

    return _sealed.unseal(json.loads(path.read_text(encoding="utf-8")))


# ----------------------------------------------------------------------------- the writer


def write_results(
    name: str,
    result: dict[str, Any],
    markdown: str,
    *,
    title: str | None = None,
    results_dir: str | os.PathLike | None = None,
    env: dict[str, Any] | None = None,
    command_line: str | None = None,
    replace_damaged: bool = False,
) -> Path:
    """Writes ``<results_dir>/<name>.json`` atomically (temporary file + ``os.replace``).

    The record holds ``name``, ``title``, ``command`` (this process's, as run from the
    repository root), ``date`` (UTC), ``git`` (the commit of the code that ran, read when
    the benchmarks were imported, and whether tracked files differed from it; also
    ``git_at_write`` where the checkout changed before the write), ``environment``
    (machine, device, package versions, load average at the start and at the end),
    ``markdown`` (the human-readable summary) and ``result`` (the data; NumPy values
    converted, non-finite floats as null). When ``results_dir`` is a folder
    named ``results`` (``benchmarks/results`` by default), ``RESULTS.md`` beside it is
    regenerated from all of its JSON files.

    Args:
        name: File stem and section name.
        result: The benchmark's data.
        markdown: Markdown body of its ``RESULTS.md`` section (links relative to
            ``RESULTS.md``).
        title: Section heading (default ``name``).
        results_dir: Output folder (default ``benchmarks/results``).
        env: An :func:`environment` record taken at the benchmark's start (default: taken
            now), possibly extended by the benchmark.
        command_line: The command to record (default: :func:`command`).
        replace_damaged: Whether a file at the record's path that is not JSON (a damaged
            record) may be replaced; any other file that is not a record never is.

    Returns:
        The path of the JSON file.
    """
    rdir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    env = dict(env) if env is not None else environment()
    env["loadavg_end"] = list(os.getloadavg())
    record = {
        "name": name,
        "title": title or name,
        "command": command_line or command(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": CODE_GIT,
        "environment": env,
        "markdown": markdown,
        "result": result,
    }
    at_write = git_commit()
    if at_write != CODE_GIT:  # the checkout changed while this ran
        record["git_at_write"] = at_write
    path = rdir / f"{name}.json"
    _check_own_record(path, replace_damaged)
    _write_record(path, record)
    return path


def _write_record(path: Path, record: dict[str, Any]) -> None:
    """Writes ``record`` to ``path`` atomically, with its checksum; beside a ``results``
    folder's records, regenerates ``RESULTS.md`` from them."""
    from umtam_jax.experiments import _sealed  # imported here: see _atomic_write

    # The checksum covers the record as written; strict JSON (no NaN) in the file.
    sealed = _sealed.seal(_jsonable(record))
    _atomic_write(path, json.dumps(sealed, indent=1, allow_nan=False) + "\n")
    rdir = path.parent
    if rdir.resolve().name == "results" and _is_generated(rdir.parent / "RESULTS.md"):
        regenerate_results_md(rdir)


def _check_own_record(path: Path, replace_damaged: bool = False) -> None:
    """Refuses to replace a file at ``path`` that is not a benchmark record (with
    ``replace_damaged``, one that is not JSON at all may be: a damaged record)."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        ours = path.is_file() and _is_record(json.loads(path.read_text(encoding="utf-8")))
    except ValueError:
        ours = replace_damaged and path.is_file() and not path.is_symlink()
    except OSError:
        ours = False
    if not ours:
        raise FileExistsError(f"{path} exists and is not a benchmark record; not replaced")


def _is_record(data: Any) -> bool:
    return isinstance(data, dict) and {"name", "markdown"} <= data.keys()


_GENERATED = "# Benchmark results\n\nGenerated by `benchmarks/_records.py`"
#: The header of a ``RESULTS.md`` generated by earlier versions of this writer.
_GENERATED_BEFORE = "# Benchmark results\n\nGenerated by `benchmarks/_common.py`"


def _is_generated(md: Path) -> bool:
    """Whether ``md`` is absent or a ``RESULTS.md`` this module wrote (never a user's)."""
    if not md.exists() and not md.is_symlink():
        return True
    try:
        text = md.read_text(encoding="utf-8") if md.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith((_GENERATED, _GENERATED_BEFORE))


def reword_record(
    path: Path, markdown: str, why: str, result: dict[str, Any] | None = None
) -> None:
    """Replaces the markdown of the record at ``path`` (measured earlier, by older report
    code) and regenerates ``RESULTS.md``; the measurement's fields (date, commit, command,
    environment) stay, and ``reworded`` records when, by which code and why.

    Args:
        path: A benchmark record (refused if it is not one).
        markdown: Its new summary, computed from the record alone.
        why: What changed in the wording (or in the judgement).
        result: The record's result judged again by the current code from its own data
            (None: unchanged).

    Raises:
        FileExistsError: ``path`` is not a benchmark record.
        ValueError: the record is damaged (not JSON, or its content does not match its
            checksum): rewording it would give the damage a valid checksum.
    """
    _check_own_record(path)
    try:
        record = read_record(path)
    except ValueError as err:
        raise ValueError(f"{path} is damaged ({err}); not reworded") from None
    if record.get("markdown") == markdown and result in (None, record.get("result")):
        return
    record["markdown"] = markdown
    if result is not None:
        record["result"] = result
    record["reworded"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "why": why,
    }
    _write_record(path, record)


# ----------------------------------------------------------------------------- journals


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines journal of finished runs ([] when there is none).

    A last line cut off by a killed append (no newline, not JSON) is dropped from the
    file, so the run is done again; any other damage is a ``ValueError`` naming the file
    and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]
    records = []
    for number, line in enumerate(complete, start=1):
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise ValueError(f"{path}, line {number}, is damaged: {err}") from None
    if torn:
        print(f"[journal] {path}: dropping a cut-off last line (a killed write)", flush=True)
        _atomic_write(path, "".join(f"{line}\n" for line in complete))
    return records


def append_journal(path: Path, record: dict[str, Any]) -> None:
    """Appends ``record`` as one line of ``path`` and flushes it to the disk."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- RESULTS.md


#: A command of the benchmarks' script form (``python benchmarks/step_time.py``).
_SCRIPT_FORM = re.compile(r"^python3? benchmarks/(\w+)\.py\b")


def _section(record: dict[str, Any], stem: str) -> str:
    env = record.get("environment") or {}
    lines = [f"## {record.get('title') or record.get('name') or stem}", ""]
    command = record.get("command")
    if command and (today := _SCRIPT_FORM.sub(r"python -m benchmarks.\1", command)) != command:
        # Run as a script before the benchmarks became a package: as a module today.
        lines += [f"Command: `{command}` (as run then; today `{today}`)", ""]
    elif command:
        lines += [f"Command: `{command}`", ""]
    meta = []
    date = record.get("date") or env.get("date")
    if date:
        meta.append(f"date {date}")
    commit = (record.get("git") or {}).get("commit")
    if commit:
        dirty = (record.get("git") or {}).get("dirty")
        meta.append(f"commit {commit[:10]}" + (" with local changes" if dirty else ""))
    if record.get("git_at_write"):
        meta.append("the checkout changed while it ran")
    if record.get("reworded"):
        meta.append(
            f"summary reworded {record['reworded']['date'][:10]}: {record['reworded']['why']}"
        )
    parts = (record.get("result") or {}).get("part_commits") or []
    if len(parts) > 1:
        meta.append("its parts measured at commits " + ", ".join(c[:10] for c in parts))
    versions = env.get("packages") or env
    names = ("jax", "optax", "flax")
    if any(versions.get(k) for k in names):
        meta.append(", ".join(f"{k} {versions[k]}" for k in names if versions.get(k)))
    cpu = env.get("cpu")
    if isinstance(cpu, dict):
        meta.append(f"CPU {cpu.get('model')} × {cpu.get('affinity')}")
    elif cpu:
        meta.append(f"CPU {cpu} × {env.get('cpu_count')}")
    if env.get("backend") not in (None, "cpu"):
        meta.append(f"device {env.get('device_kind')}")
    if env.get("loadavg_1_5_15min") is not None:
        meta.append(f"load avg at write {env['loadavg_1_5_15min']}")
    elif env.get("loadavg_end") is not None:
        meta.append(f"load avg at end {[round(x, 2) for x in env['loadavg_end']]}")
    if meta:
        lines += ["_" + "; ".join(meta) + "_", ""]
    body = record.get("markdown")
    lines.append(body.strip() if body else f"(no markdown summary; see `results/{stem}.json`)")
    lines.append("")
    return "\n".join(lines)


def regenerate_results_md(results_dir: str | os.PathLike | None = None) -> Path:
    """Rebuilds ``RESULTS.md`` (next to ``results_dir``) from every ``results_dir/*.json``,
    one section per file, each with the command that produced it. A ``RESULTS.md`` this
    module did not write is never replaced (``FileExistsError``)."""
    rdir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    if not _is_generated(rdir.parent / "RESULTS.md"):
        raise FileExistsError(f"{rdir.parent / 'RESULTS.md'} was not generated here")
    parts = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/_records.py` from `benchmarks/results/*.json`; do not edit "
        "by hand — rerun the command shown in a section (from the repository root) to "
        "refresh it. What the numbers mean: `docs/performance.md`.",
        "",
        "The paper's headline claims beside these measurements, with verdicts: "
        "[results/claims.md](results/claims.md) (`python -m umtam_jax.experiments.claims "
        "--out benchmarks/results/claims.md`, from the results below).",
        "",
    ]
    for path in sorted(rdir.glob("*.json")):
        try:
            record = read_record(path)
        except (OSError, ValueError) as e:  # not JSON, or fails its checksum
            parts.append(f"## {path.stem}\n\n(unreadable: {e})\n")
            continue
        if _is_record(record):  # other JSON files in the folder are not sections
            parts.append(_section(record, path.stem))
    out = rdir.parent / "RESULTS.md"
    _atomic_write(out, "\n".join(parts).rstrip() + "\n")
    return out


def recorded_run(
    label: str,
    signature: dict[str, Any],
    path: Path,
    fresh: bool,
    run: Callable[[], dict[str, Any]],
    *,
    title: str,
    env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One part of a benchmark (a seed, a repeat) recorded on its own, so that an
    interrupted benchmark resumes: read back from ``path`` when it was recorded with the
    same ``signature`` (and ``fresh`` is false), else ``run()``, written to ``path`` by
    :func:`write_results` as soon as it ends.

    Args:
        label: How progress lines name the part (``"[spectrum] seed 1"``).
        signature: The settings the record must match (stored in it).
        path: The record's JSON file.
        fresh: Run again even if a matching record exists.
        run: Computes the part's result (a dict).
        title: The record's title.
        env: The environment record (default: measured now).

    Returns:
        The part's result, ``signature`` included.
    """
    if path.exists() and not fresh:
        try:
            record = read_record(path)
            rec = record["result"]
        except ValueError as err:  # not JSON, or fails its checksum
            print(f"{label}: {path} is damaged ({err}); running the part again", flush=True)
            rec = None
        except (OSError, KeyError, TypeError):
            rec = None
        if isinstance(rec, dict) and rec.get("signature") == signature:
            print(f"{label}: read back {path}", flush=True)
            return {**rec, "git": record.get("git")}  # the code that measured it
    rec = {"signature": signature, **run()}
    write_results(path.stem, rec, "", results_dir=path.parent, title=title, env=env,
                  replace_damaged=True)  # fmt: skip
    return {**rec, "git": CODE_GIT}


def commits_of(parts: list[dict[str, Any]]) -> list[str]:
    """The commits the parts returned by :func:`recorded_run` were measured at (a
    benchmark resumed after the code changed combines several; its summary says so)."""
    found = {(p.get("git") or {}).get("commit") for p in parts}
    return sorted(c for c in found if c)
