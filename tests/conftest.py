"""Settings shared by the whole test suite.

JAX's persistent compilation cache stays off here. The demo, the protocol and several
benchmarks turn it on for their reruns (``experiments.pipeline.enable_compilation_cache``);
called in a test, that setting would outlive the test and make every later compile of the
worker process read and write the cache, and XLA:CPU has crashed (segmentation fault)
inside those cached compiles on a loaded two-core machine. The environment variable reaches
the subprocesses the tests start; the config update covers this process, where ``jax`` may
already have been imported.
"""

import os

os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import jax  # noqa: E402  (after the environment variable, for a first import of jax)

jax.config.update("jax_enable_compilation_cache", False)
