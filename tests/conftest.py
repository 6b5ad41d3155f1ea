"""Settings shared by the whole test suite.

JAX's persistent compilation cache stays off here. The demo, the protocol and several
benchmarks turn it on for their reruns (``experiments.pipeline.enable_compilation_cache``);
called in a test, that setting would outlive the test and make every later compile of the
worker process read and write the cache, and XLA:CPU has crashed (segmentation fault)
inside those cached compiles on a loaded two-core machine.

The tests compile hundreds of small programs and run each a few times, so most of their
time is XLA's compiler. Every HLO pass still runs, so the tests check the fused program a
user's build has; three settings only make its machine code cheaper to produce:

- ``jax_disable_most_optimizations``: no expensive LLVM optimizations (backend
  optimization level 0), about a quarter less time;
- ``xla_cpu_use_fusion_emitters=false``: the fusions are emitted to LLVM IR directly by
  XLA:CPU's previous emitters, not through MLIR;
- ``xla_cpu_parallel_codegen_split_count=1``: one LLVM module per program, not a split
  compiled on a thread pool that the two test workers would share.

The two flags: the optimizer and merging contract files in one process 196 s, 118 s with
both; the whole suite's tests on two cores 17 min 43 s without them (2309 tests), 10 min
12 s with them (2344 tests, a fresh clone, nothing else running; 2026-12-07, jaxlib
0.10.2). XLA aborts on a flag it does not know, so they are set only for the jaxlib minor
version they were checked with. Benchmarks, which time programs, keep the defaults.

The environment variables reach the subprocesses the tests start (a test that sets
``XLA_FLAGS`` for its subprocess appends to them); the config updates cover this process,
where ``jax`` may already have been imported.
"""

import importlib.metadata
import os

import pytest

os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
_JAXLIB = tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
if _JAXLIB == (0, 10):
    os.environ["XLA_FLAGS"] = " ".join(
        [
            os.environ.get("XLA_FLAGS", ""),
            "--xla_cpu_use_fusion_emitters=false",
            "--xla_cpu_parallel_codegen_split_count=1",
        ]
    ).strip()

import jax  # noqa: E402  (after the environment variables, for a first import of jax)

jax.config.update("jax_enable_compilation_cache", False)
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compilations():
    """Drops JAX's compilation caches after each test file. A worker process runs hundreds
    of files, and on XLA:CPU every kept executable holds memory maps of its machine code
    (about a hundred for an optimizer update): kept for the worker's life, they pass Linux's
    limit of 65,530 maps per process, and the next compile crashes (segmentation fault)."""
    yield
    jax.clear_caches()


@pytest.fixture
def retrace(monkeypatch):
    """``monkeypatch.setattr`` for a constant read while tracing: JAX's caches are dropped
    after each change and after the test, so no trace made with another value is reused."""

    def setattr(target, name, value):
        monkeypatch.setattr(target, name, value)
        jax.clear_caches()

    yield setattr
    jax.clear_caches()
