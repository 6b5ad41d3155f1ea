"""UMTAM on a simulated 8-device mesh equals single-device training.

The mesh runs in a subprocess (the device count must be set before JAX starts), for
several partitions of a dict of two matrices and a bias, with Auto and Explicit axes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sharded_steps.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded") / "ckpt"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "subspace", str(directory)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _trim(spec):
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return spec


MESH_RUNS = [
    f"{mesh}/{axes}"
    for mesh in ("data_x_model", "model_only", "replicated")
    for axes in ("Auto", "Explicit")
]


@pytest.mark.parametrize("run", MESH_RUNS)
def test_sharded_steps_equal_single_device_steps(report, run):
    assert report[run]["max_update_rel_err"] < 1e-4
    assert report[run]["param_rel_err"] < 1e-4


@pytest.mark.parametrize("run", MESH_RUNS)
def test_updates_keep_the_parameters_sharding(report, run):
    entry = report[run]
    for name, spec in entry["input_specs"].items():
        assert _trim(entry["update_specs"][name]) == _trim(spec), name


@pytest.mark.parametrize("run", [r for r in MESH_RUNS if r.endswith("Explicit")])
def test_updates_and_state_keep_the_parameters_sharding(report, run):
    entry = report[run]
    for name, spec in entry["input_specs"].items():
        assert _trim(entry["update_specs"][name]) == _trim(spec), name
    a_rows, a_cols = (entry["input_specs"]["a"] + [None, None])[:2]
    state = entry["state_a"]
    assert _trim(state["u"]) == _trim([a_rows])
    assert _trim(state["v"]) == _trim([a_cols])
    assert _trim(state["row"]) == _trim([a_rows])
    assert _trim(state["col"]) == _trim([a_cols])
    assert _trim(state["dense_momentum"]) == _trim([a_rows, a_cols])


def test_checkpoint_from_one_mesh_restores_onto_another(report):
    entry = report["checkpoint"]
    assert entry["values_equal"]
    assert entry["a_spec"] == ["model", "data"]
    assert entry["u_spec"] == ["model"] and entry["v_spec"] == ["data"]
    assert entry["dense_momentum_spec"] == ["model", "data"]
    assert entry["n_devices_u"] == 8


@pytest.mark.parametrize("axes", ["Auto", "Explicit"])
def test_stacked_leaves_on_a_mesh_equal_single_device_steps(report, axes):
    entry = report["grouped"][axes]
    assert entry["param_rel_err"] < 1e-4
    assert entry["update_specs"]["a2"] == ["data", "model"]
    assert entry["update_specs"]["bias2"] == ["model"]


def test_eager_updates_compile_per_placement_and_name_their_arguments(report):
    """One kept compilation per placement of the inputs (each holds one executable); an
    error about the inputs names them as the user passed them."""
    entry = report["eager"]
    assert entry["entries"] == 2
    assert "updates['b']" in entry["message"] and "_Option" not in entry["message"]
    assert len(entry["message"]) < 1500
