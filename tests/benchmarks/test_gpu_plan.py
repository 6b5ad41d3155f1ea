"""The GPU plan benchmark's reading of compiled programs (bytes moved, the floor, products'
work), checked on programs compiled for this CPU and on hand-written HLO; and its one clear
error where JAX cannot compile for a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_plan


def test_products_work_and_floor_of_a_compiled_program():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    text = jax.jit(lambda a, b: a @ b + 1.0).lower(a, b).compile().as_text()
    traffic = gpu_plan.kernel_traffic(text)
    assert traffic["flops"] == 2 * 8 * 16 * 4
    assert traffic["floor"] == 4 * (8 * 16 + 16 * 4 + 8 * 4)  # inputs read, result written
    assert traffic["bytes"] >= traffic["floor"]


def test_long_tuples_and_control_flow_are_read_right():
    """XLA marks every fifth element of a long tuple with ``/*index=5*/``; an output that is
    a parameter passed through is not written; a conditional's operands are not read; of
    an operand a fusion only slices, the slices are read."""
    hlo = "\n".join(
        [
            "%branch (p: f32[4]) -> f32[4] {",
            "  ROOT %p = f32[4]{0} parameter(0)",
            "}",
            "",
            "%slicer (q: f32[4], r: f32[4]) -> f32[1] {",
            "  %q = f32[4]{0} parameter(0)",
            "  %r = f32[4]{0} parameter(1)",
            "  %head = f32[1]{0} slice(%q), slice={[0:1]}",
            "  %first = f32[1]{0} slice(%r), slice={[0:1]}",
            "  %rest = f32[3]{0} slice(%r), slice={[1:4]}",
            "  %sum = f32[1]{0} reduce(%rest, %head), dimensions={0}, to_apply=%branch",
            "  ROOT %out = f32[1]{0} add(%sum, %first)",
            "}",
            "",
            "ENTRY %main (a: f32[4], b: f32[4], c: pred[]) -> (f32[4], f32[4], f32[4]) {",
            "  %a = f32[4]{0} parameter(0)",
            "  %b = f32[4]{0} parameter(1)",
            "  %c = pred[] parameter(2)",
            "  %f = f32[4]{0} fusion(%a, %b), kind=kLoop, calls=%branch",
            "  %k = f32[4]{0} conditional(%c, %a, %b), true_computation=%branch, "
            "false_computation=%branch",
            "  %s = f32[1]{0} fusion(%a, %b), kind=kInput, calls=%slicer",
            "  ROOT %t = (f32[4]{0}, f32[4]{0}, f32[1]{0}, /*index=3*/f32[4]{0}) "
            "tuple(%f, %k, %s, /*index=3*/%b)",
            "}",
        ]
    )
    traffic = gpu_plan.kernel_traffic(hlo)
    # %f: two operands and one result; %s: one entry of a and all four of b, one result.
    assert traffic["bytes"] == 3 * 16 + (4 + 16 + 4)
    assert traffic["floor"] == 16 + 16 + 1 + 16 + 16 + 4  # a, b, c read; f, k, s written
    assert traffic["flops"] == 0


def test_without_the_cuda_plugin_one_clear_error(monkeypatch):
    from jax.experimental import topologies

    def unavailable(*args, **kwargs):
        raise RuntimeError("Unknown backend cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", unavailable)
    with pytest.raises(SystemExit, match=r"pip install \"jax\[cuda13\]=="):
        gpu_plan.main(["--quick"])


def _affine(x):
    return 2.0 * x + 1.0


def test_kernels_are_traced_to_their_source_line():
    text = jax.jit(_affine).lower(jnp.ones(256)).compile().as_text()
    (source,) = gpu_plan.kernel_sources(text, package="tests")
    line = _affine.__code__.co_firstlineno + 1
    assert source == {
        "source": f"benchmarks/test_gpu_plan.py:{line} (_affine)",
        "kernels": 1,
        "bytes": 2 * 4 * 256,
    }
