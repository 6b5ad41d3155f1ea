"""``umtam-merge``'s configuration and command-line errors (one line each, before
anything is read), its module entry point, an interruption and Python warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.cli.cli_merge_helpers import _write
from umtam_jax.cli.merge import main

checkpoint = pytest.importorskip("umtam_jax.checkpoint")


@pytest.mark.parametrize(
    "config,message",
    [
        (
            "method: frankenmerge\nbase: b\nexperts: [a]\noutput: o\n",
            "unknown method 'frankenmerge'",
        ),
        ("method: ties\nbase: b\nexperts: [a]\noutput: o\n", "requires the parameter 'density'"),
        (
            "method: ties\nbase: b\nexperts: [a]\nparameters: {density: 0.2, lamda: 1}\n",
            "unknown parameters ['lamda']",
        ),
        (
            "method: umtam\nbase: b\nexperts: [a]\nparameters: {sign_election: 1}\n",
            "must be true or false",
        ),
        (
            "method: ota\nbase: b\nexperts: [{path: a, weight: 2}]\nparameters: {power: x}\n",
            "must be a number",
        ),
        ("method: umtam\nbase: b\nexperts: [{path: a, weight: 2}]\n", "no per-expert weights"),
        (
            "method: prune\nbase: b\nexperts: [a, c]\nparameters: {density: 0.1}\n",
            "exactly one expert",
        ),
        ("method: fisher\nbase: b\nexperts: [a]\n", "needs a 'fisher' checkpoint"),
        ("method: ties\nbase: b\nexperts: [{path: a, alpha: 1}]\n", "unknown keys ['alpha']"),
        ("method: ties\nmodel: x\n", "unknown configuration keys ['model']"),
        ("!!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
        ("method: ties\nbase: b\nexperts: []\n", "non-empty list"),
        (
            "method: ties\nbase: b\nexperts: [a]\nparameters: {density: 0.2, scope: layers}\n",
            "'scope' of method 'ties' must be one of tensor, layer, global or a mapping",
        ),
        (
            "method: ties\nbase: b\nexperts: [a]\n"
            "parameters: {density: 0.2, scope: {scaned: [blocks]}}\n",
            "parameters.scope as a mapping takes 'scanned'",
        ),
        (
            "method: ties\nbase: b\nexperts: [a]\n"
            "parameters: {density: 0.2, scope: {scanned: blocks, axis: -1}}\n",
            "parameters.scope: axis must be a non-negative int, got -1",
        ),
        (
            "method: ties\nbase: b\nexperts: [a]\n"
            "parameters: {density: 0.2, scope: {scanned: [1]}}\n",
            "parameters.scope.scanned must be a list of key names, got [1]",
        ),
        (
            "method: ties\nbase: b\nexperts: [a, b/../a]\nparameters: {density: 0.2}\n",
            "experts[1] ('b/../a') repeats experts[0]: a model merged twice counts twice",
        ),
        (
            "method: ties\nbase: b\nexperts: [a]\n_mergekit_parameter_keys: {density: x}\n",
            "unknown configuration key ['_mergekit_parameter_keys']",
        ),
        (
            "method: ties\nbase: b\nexperts: [{path: a, _mergekit_key: x}]\n",
            "unknown configuration key experts[0]['_mergekit_key']",
        ),
        (
            "method: task_arithmetic\nbase: b\nexperts: [a, ./b]\n",
            "experts[1] ('./b') is the base: method 'task_arithmetic' reads the base as the",
        ),
    ],
)
def test_config_errors(tmp_path, capsys, config, message):
    assert main([_write(tmp_path, config), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_module_entry_point():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-m", "umtam_jax.merge", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0
    assert "umtam-merge" in res.stdout


def test_an_interruption_a_missing_method_and_a_seed_nothing_draws_are_one_line(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C printed a KeyboardInterrupt traceback; no method read "unknown method None";
    a seed for a method that draws nothing was ignored."""
    from umtam_jax.cli import merge as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert cli.main(["--method", "ties", "--base", "b", "--expert", "e"]) == 130
    assert capsys.readouterr().err == "umtam-merge: interrupted\n"
    monkeypatch.undo()
    assert cli.main(["--base", "b", "--expert", "e", "--dry-run"]) == 2
    assert "'method' is required" in capsys.readouterr().err
    args = ["--method", "ties", "--base", "b", "--expert", "e", "--seed", "3", "--dry-run"]
    assert cli.main([*args, "--param", "density=0.5"]) == 2
    assert "method 'ties' draws nothing at random: it takes no 'seed'" in capsys.readouterr().err


def test_flag_options_given_twice_or_without_a_key_are_refused(capsys):
    from umtam_jax.cli import merge as cli

    for flags, needle in [
        (["--expert", "e,weight=1,weight=2"], "--expert e: weight is given twice"),
        (["--expert", "e", "--param", "=0.3"], "--param '=0.3' is not KEY=VALUE"),
        (["--expert", "e,=2"], "--expert option '=2' is not KEY=VALUE"),
        (["--expert", "e,density"], "--expert option 'density' is not KEY=VALUE"),
        (["--expert", "e,density=0.5,"], "--expert option '' is not KEY=VALUE"),
        # A comma without '=' after it belongs to the path.
        (["--expert", "e,v2,weight=2", "--param", "density=0.5"], "checkpoint e,v2: no checkpoint"),
    ]:
        assert cli.main(["--method", "ties", "--base", "b", *flags, "--dry-run"]) == 2
        assert needle in capsys.readouterr().err


def test_a_native_parameter_out_of_range_names_its_key(capsys):
    """It read 'the merge would fail: gamma must lie ...' without the key."""
    from umtam_jax.cli import merge as cli

    args = ["--method", "breadcrumbs", "--base", "b", "--expert", "e", "--dry-run"]
    assert cli.main([*args, "--param", "density=0.5", "--param", "gamma=7"]) == 2
    assert "error: --param gamma must lie in [0.0, 1.0], got 7\n" in capsys.readouterr().err


def test_python_warnings_are_one_line_each(tmp_path, capsys):
    """A warning raised during the run (here the reader's, for a folder holding both
    model.safetensors and an index) is one 'umtam-merge: warning:' line, not a file, line
    and source dump."""
    for name, value in (("base", 0.0), ("a", 1.0)):
        checkpoint.save_safetensors(tmp_path / name, {"w": np.full(3, value, np.float32)})
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors"}}
    (tmp_path / "base" / "model.safetensors.index.json").write_text(json.dumps(index))
    argv = ["--method", "task_arithmetic", "--base", str(tmp_path / "base"), "--expert",
            str(tmp_path / "a"), "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("umtam-merge: warning: ") for line in lines), lines
    assert "holds both model.safetensors and model.safetensors.index.json" in lines[0]
