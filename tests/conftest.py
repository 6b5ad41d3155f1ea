"""Settings shared by the whole test suite.

JAX's persistent compilation cache stays off here. The demo, the protocol and several
benchmarks turn it on for their reruns (``experiments.pipeline.enable_compilation_cache``);
called in a test, that setting would outlive the test and make every later compile of the
worker process read and write the cache, and XLA:CPU has crashed (segmentation fault)
inside those cached compiles on a loaded two-core machine.

The tests compile hundreds of small programs and run each a few times, so most of their
time is XLA's compiler. ``jax_disable_most_optimizations`` skips LLVM's expensive
machine-code optimizations (backend optimization level 0). Every HLO pass still runs, so
the tests check the same fused program and kernels a user's build has (only the machine
code of each kernel is less optimized), in about a quarter less time. Benchmarks, which
time programs, keep the default.

The environment variables reach the subprocesses the tests start; the config updates
cover this process, where ``jax`` may already have been imported.
"""

import os

import pytest

os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"

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
