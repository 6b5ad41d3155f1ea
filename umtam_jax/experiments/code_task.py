"""A source-code task: far from the English prose of the other built-in tasks.

``py_package`` asks which package of the Python standard library a function comes from
(``asyncio``, ``xml``, ``multiprocessing`` or ``email``). Its inputs are Python source,
a domain far from the Bible verses, fortunes and WordNet definitions of the other
built-in tasks, so an expert fine-tuned on it moves the encoder in directions unrelated
to theirs: the distant-domain task of the conflict-intensity study
(:mod:`umtam_jax.experiments.conflict`).

The source is Debian's ``libpython3.11-stdlib`` (``/usr/lib/python3.11``, or
``$UMTAM_PYTHON_STDLIB``), a pinned package version, so the examples are the same on
every machine; the interpreter running the code is not read.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from umtam_jax.experiments.data import Examples, _dedupe, _missing

__all__ = ["PY_PACKAGES", "STDLIB_DIRS", "build_py_package", "stdlib_functions"]

#: The labels of ``py_package``: standard-library packages with 500-1000 functions each.
PY_PACKAGES = ("asyncio", "xml", "multiprocessing", "email")

#: Where the standard library's sources are looked for (after ``$UMTAM_PYTHON_STDLIB``).
STDLIB_DIRS = ("/usr/lib/python3.11",)


def _stdlib_dir() -> Path:
    dirs = [os.environ.get("UMTAM_PYTHON_STDLIB"), *STDLIB_DIRS]
    found = next((Path(d) for d in dirs if d and (Path(d) / PY_PACKAGES[0]).is_dir()), None)
    if found is None:
        raise _missing("The Python 3.11 standard library sources", ["libpython3.11-stdlib"])
    return found


def stdlib_functions(package: str, root: str | os.PathLike | None = None) -> list[str]:
    """The source of every function and method defined in one standard-library package.

    Files are read in sorted path order and functions in source order (nested ones
    after their parent), each with its indentation removed and blank lines dropped.

    Args:
        package: A top-level package, e.g. ``"email"``.
        root: The standard library's directory (default: ``$UMTAM_PYTHON_STDLIB`` or
            ``/usr/lib/python3.11``).

    Returns:
        The functions' source texts.

    Raises:
        MissingDataError: the sources are not installed.
    """
    base = Path(root) if root is not None else _stdlib_dir()
    if not (base / package).is_dir():
        raise _missing(f"The package {package!r} under {base}", ["libpython3.11-stdlib"])
    out = []
    for path in sorted((base / package).rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        lines = [line.encode() for line in _LINE.findall(source)]
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                text = _segment(lines, node)
                kept = [line.strip() for line in text.splitlines() if line.strip()]
                out.append("\n".join(kept))
    return out


# The parser's lines: ended by \r\n, \r or \n (not by form feeds), the last one possibly open.
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def _segment(lines: list[bytes], node: ast.stmt) -> str:
    """``ast.get_source_segment`` on lines split and encoded once per file.

    Node columns are UTF-8 byte offsets; splitting the file again for each of its
    thousands of functions, as ``get_source_segment`` does, dominated the build time.
    """
    first, last = node.lineno - 1, (node.end_lineno or node.lineno) - 1
    start, end = node.col_offset, node.end_col_offset
    if first == last:
        return lines[first][start:end].decode()
    body = [lines[first][start:], *lines[first + 1 : last], lines[last][:end]]
    return b"".join(body).decode()


def build_py_package(seed: int = 0) -> Examples:
    """Functions of the standard library labelled with their package (:data:`PY_PACKAGES`).

    Args:
        seed: Unused (the data are fixed).

    Returns:
        The deduplicated examples (identical functions in two packages are dropped).

    Example:
      >>> from umtam_jax.experiments import data
      >>> task = data.load_task("py_package", seed=0)  # doctest: +SKIP
      >>> task.label_names  # doctest: +SKIP
      ('asyncio', 'xml', 'multiprocessing', 'email')
    """
    del seed
    texts, labels = [], []
    for label, package in enumerate(PY_PACKAGES):
        for text in stdlib_functions(package):
            texts.append(text)
            labels.append(label)
    return _dedupe(texts, labels)
