"""Test set-up: float64 available (numerical gradients, naive references), CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling is most of the suite's time on the CPU; without LLVM's optimisations it takes a third less (2026-12-02:
# the model tests 88 -> 58 s, the GLA and sliding-window kernel tests 102 -> 70 s). Results are checked against
# references within tolerances, and the GPU and TPU builds do not go through this backend. Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
