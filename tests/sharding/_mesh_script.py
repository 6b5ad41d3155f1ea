"""Runs a test's script on a fake multi-device CPU platform and returns its JSON report.

The device count must be fixed before JAX starts, so the script runs in a subprocess. The
prelude gives it JAX, ``umtam_jax`` and the helpers below; the script fills the dict
``report``, which is printed as JSON and parsed here.

- ``trim(spec)``: a partition spec as a list of strings without trailing ``None``s.
- ``on_mesh(kind, spec, *arrays)``: a context manager that sets a 1-D mesh over all the
  devices, its axis ``"x"`` of type ``kind`` (``"Auto"`` or ``"Explicit"``), and yields
  the arrays put on it with ``spec``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_PRELUDE = """
import contextlib, json
import jax, jax.numpy as jnp, numpy as np
import umtam_jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

def trim(spec):
    spec = [str(s) for s in spec]
    while spec and spec[-1] == "None":
        spec.pop()
    return spec

@contextlib.contextmanager
def on_mesh(kind, spec, *arrays):
    mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(getattr(AxisType, kind),))
    sharding = NamedSharding(mesh, spec)
    with jax.set_mesh(mesh):
        yield [jax.device_put(jnp.asarray(a), sharding) for a in arrays]

report = {}
"""


def run_on_devices(devices: int, script: str) -> dict:
    """Runs ``script`` (indented as in a test module: it is dedented) after the prelude on
    ``devices`` fake CPU devices and returns its ``report``."""
    env = (
        "import os\nos.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + "
        f"' --xla_force_host_platform_device_count={devices}'"
    )
    source = env + _PRELUDE + textwrap.dedent(script) + "\nprint(json.dumps(report))\n"
    out = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
