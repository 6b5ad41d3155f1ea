"""Every docstring example names only what it imports or defines, so that it runs when
copied into a fresh script (doctest runs it in its module's namespace, which hides a
missing import)."""

from __future__ import annotations

import ast
import builtins
import doctest
import importlib
import pkgutil

import umtam_jax


def _examples():
    finder = doctest.DocTestFinder(recurse=True, exclude_empty=True)
    names = [umtam_jax.__name__] + [
        m.name for m in pkgutil.walk_packages(umtam_jax.__path__, umtam_jax.__name__ + ".")
    ]
    for name in names:
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            if test.examples:
                yield test.name, "\n".join(e.source for e in test.examples)


def _free_names(source: str) -> set[str]:
    """Names read in ``source`` that nothing in it binds (imports, assignments, loop and
    ``with`` targets, functions, their arguments, comprehension variables, ``except``
    names)."""
    tree = ast.parse(source)
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound - set(dir(builtins))


def test_every_docstring_example_imports_what_it_uses():
    examples = list(_examples())
    assert len(examples) > 100  # the walk found the package's examples
    missing = {name: sorted(free) for name, src in examples if (free := _free_names(src))}
    assert not missing, missing


def test_the_check_finds_a_name_an_example_does_not_import():
    assert _free_names("import jax\nx = jax.numpy.ones(2)\nrestore(x)") == {"restore"}
    assert _free_names("[y for y in range(2)]\nf = lambda a: a") == set()
    assert _free_names("try:\n    pass\nexcept ValueError as err:\n    print(err)") == set()
