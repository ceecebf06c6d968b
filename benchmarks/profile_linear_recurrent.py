"""One forward+backward of the GLA and gated delta-rule Triton kernels at B4 S8192 H16 D128 bf16, for Nsight
Compute to profile (each function runs exactly once, so every kernel launch ncu sees is a distinct kernel).

On the GPU machine, from the repository root (``benchmarks/profile_linear_recurrent.sh`` runs both passes):
  ncu --clock-control none --metrics gpu__time_duration.sum python benchmarks/profile_linear_recurrent.py
gives every kernel's time (the XLA glue included); with ``-k regex:'vector_gate|delta'`` and the stall sections it
says why the Pallas kernels take it. ``PROFILE_ONLY=gla-default,delta,...`` picks the functions (``FUNCTIONS``:
GLA forward+backward and forward alone for the default and the one-kernel output and gradients; the gated delta
rule); ``PROFILE_SHAPE=1,256,2,128`` (batch, seq, heads, head_dim) sets a smaller shape, e.g. under
``compute-sanitizer --tool memcheck`` (with ``XLA_FLAGS=--xla_gpu_enable_command_buffer=``: under CUDA graphs the
sanitizer reports CUDA_ERROR_INVALID_PC at the graph's launch); ``--smoke`` runs tiny shapes in Pallas'
interpreter (a CPU dry run).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import check_delta_kernel, check_gla_kernel  # noqa: E402
from kernels_pallas.linear_recurrent import delta_ops, vector_gate_ops  # noqa: E402

SMOKE = "--smoke" in sys.argv
SHAPE = (1, 64, 2, 32) if SMOKE else tuple(int(n) for n in os.environ.get("PROFILE_SHAPE", "4,8192,16,128").split(","))


def fwd_bwd(forward, args, dout):
    def loss(*xs):
        return jnp.sum(forward(*xs).astype(jnp.float32) * dout.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))), args


def gla(config, backward=True):
    q, k, v, gate, _, dout, _ = check_gla_kernel.inputs(jax.random.key(0), *SHAPE, jnp.bfloat16)
    forward = lambda q, k, v, g: vector_gate_ops.chunked_vector_gate_recurrence(
        q, k, v, g, config=config, backend="triton", interpret=SMOKE)[0]
    # The gradient of a linear loss never needs the output: the forward's output kernel runs only without it.
    return fwd_bwd(forward, (q, k, v, gate), dout) if backward else (jax.jit(forward), (q, k, v, gate))


def delta():
    q, k, v, beta, gate, _, dout, _ = check_delta_kernel.inputs(jax.random.key(0), *SHAPE, jnp.bfloat16)
    return fwd_bwd(check_delta_kernel.kernel_forward(delta_ops.GPU_DEFAULT), (q, k, v, beta, gate), dout)


GLA_CONFIGS = {
    "default": vector_gate_ops.GPU_DEFAULT,
    "one-kernel": dataclasses.replace(vector_gate_ops.GPU_DEFAULT, scores_kernel=False),
}
FUNCTIONS = {
    **{f"gla-{name}": functools.partial(gla, config) for name, config in GLA_CONFIGS.items()},
    **{f"gla-{name}-forward": functools.partial(gla, config, backward=False) for name, config in GLA_CONFIGS.items()},
    "delta": delta,
}


def main():
    names = os.environ.get("PROFILE_ONLY", ",".join(FUNCTIONS)).split(",")
    for name in names:
        fn, args = FUNCTIONS[name]()
        jax.block_until_ready(fn(*args))  # the one run (compile, then execute)
        print(f"ran {name}", flush=True)


if __name__ == "__main__":
    main()
