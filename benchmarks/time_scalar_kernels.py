"""The chunked recurrences' GPU kernels one at a time, under many launch settings: which tiling each kernel wants.

    PYTHONPATH=. python benchmarks/time_scalar_kernels.py [--shapes 0 1] [--kernels states output ...] [--quick]
        [--state-warps 2 4] [--state-stages 3 4] [--smoke]

Each kernel (the scalar gate's ``gpu_states.states`` / ``dstates``, ``gpu_forward.output`` / ``fused``,
``gpu_backward.gradients``; the gated delta rule's walks ``delta_gpu.states`` / ``dstates``, the latter with its
chunk-parallel weights kernel, by value block, warps and ``DeltaConfig.walk_stages``; GLA's state passes
``vector_gate_gpu.states`` / ``dstates`` by state block, warps and stages) is called directly on
``linear_recurrent.inputs``' simple-GLA tensors in the kernels' layout (q, k, v [b, s, h, d] bf16, chunk-local
cumulative gates [b, h, s] float32, for GLA broadcast over d and divided by 16), jitted alone, and timed by
``linear_recurrent.timed`` (batches of calls queued and waited for once). Prints ms per (shape, kernel, tiling),
fastest first, and writes $OUT/time_scalar_kernels.json. Nothing is asserted; end-to-end numbers against fla are
``linear_recurrent.py``'s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear_recurrent as lr  # noqa: E402
from kernels_pallas.linear_recurrent import (delta_gpu, gpu_backward, gpu_forward, gpu_states,  # noqa: E402
                                              vector_gate_gpu)
from kernels_pallas.linear_recurrent.config import ChunkConfig  # noqa: E402
from kernels_pallas.linear_recurrent.delta_ops import DeltaConfig  # noqa: E402
from kernels_pallas.linear_recurrent.vector_gate_ops import VectorGateConfig  # noqa: E402

OUT = os.environ.get("OUT", ".")
CHUNK = 64


def tilings(kernel, quick, width, warps_given=None, stages_given=None):
    """ChunkConfigs to time for ``kernel`` at head dims ``width``: its blocks crossed with warps and stages (for
    the state passes ``warps_given`` / ``stages_given`` replace the defaults)."""
    warps, stages = ((4, 8), (2, 3)) if quick else ((1, 2, 4, 8), (2, 3, 4))
    if kernel.startswith("delta"):  # the walks carry [dk, block_v]; the weights kernel runs at num_warps
        blocks, warps, stages = ((16, 32), (4,), (4,)) if quick else ((16, 32, 64), (2, 4), (3, 4, 5))
        return [DeltaConfig(chunk_size=CHUNK, block_v=bv, num_warps=w, num_stages=3, walk_stages=st)
                for bv, w, st in itertools.product(blocks, warps, stages) if bv <= width]
    if kernel.startswith("gla"):  # GLA's state passes: [state_block_k, state_block_v] blocks
        blocks = [(64, 64), (32, 64), (16, 64)]
        warps, stages = warps_given or (2, 4, 8), stages_given or (2, 3, 4, 5)
        return [VectorGateConfig(chunk_size=CHUNK, sub_chunk=16, state_block_k=bk, state_block_v=bv, state_warps=w,
                                 state_stages=st, dstate_warps=w, dstate_stages=st)
                for (bk, bv), w, st in itertools.product(blocks, warps, stages) if max(bk, bv) <= width]
    if kernel in ("states", "dstates"):
        blocks = [(64, 64), (32, 64), (64, 32), (16, 64), (32, 32)]
        warps, stages = warps_given or warps, stages_given or stages
    elif kernel == "output":
        blocks, warps, stages = [(None, 64), (None, 128)], tuple(w for w in warps if w > 1), (1, 2, 3)
    elif kernel == "fused":
        blocks, warps = [(None, 32), (None, 64), (None, 128)], tuple(w for w in warps if w > 2)
    else:  # gradients: whole heads
        blocks, warps, stages = [(None, None)], (4, 8), (1, 2, 3)
    return [ChunkConfig(chunk_size=CHUNK, block_k=bk, block_v=bv, output_block_v=bv, num_warps=w, num_stages=st)
            for (bk, bv), w, st in itertools.product(blocks, warps, stages) if max(bk or 0, bv or 0) <= width]


def kernel_fn(kernel, config, interpret):
    """A jitted call of one kernel on (q, k, v, cum, h0, states, dout, vector_cum) under ``config``."""
    opts = dict(config=config, interpret=interpret)
    calls = {
        "states": lambda q, k, v, cum, h0, st, do, vcum: gpu_states.states(k, v, cum, h0, **opts),
        "dstates": lambda q, k, v, cum, h0, st, do, vcum: gpu_states.dstates(q, do, cum, h0, **opts),
        # q for the WY weights w (any finite values time the same)
        "delta_states": lambda q, k, v, cum, h0, st, do, vcum: delta_gpu.states(q, v, k, cum, h0, **opts),
        "delta_dstates": lambda q, k, v, cum, h0, st, do, vcum: delta_gpu.dstates(q, k, cum, st, v, st, do, h0,
                                                                                  **opts),
        "gla_states": lambda q, k, v, cum, h0, st, do, vcum: vector_gate_gpu.states(k, v, vcum, h0, **opts),
        "gla_dstates": lambda q, k, v, cum, h0, st, do, vcum: vector_gate_gpu.dstates(q, do, vcum, h0, **opts),
        "output": lambda q, k, v, cum, h0, st, do, vcum: gpu_forward.output(q, k, v, cum, st, **opts),
        "fused": lambda q, k, v, cum, h0, st, do, vcum: gpu_forward.fused(q, k, v, cum, h0, save_states=True,
                                                                          **opts)[:2],
        "gradients": lambda q, k, v, cum, h0, st, do, vcum: gpu_backward.gradients(q, k, v, do, cum, st, st,
                                                                                   **opts),
    }
    return jax.jit(calls[kernel])


def label(config):
    if isinstance(config, VectorGateConfig):
        return f"[{config.state_block_k}, {config.state_block_v}] w{config.state_warps} s{config.state_stages}"
    if isinstance(config, DeltaConfig):
        return f"[dk, {config.block_v}] w{config.num_warps} walk s{config.walk_stages}"
    return f"[{config.block_k or 'dk'}, {config.block_v or 'dv'}] w{config.num_warps} s{config.num_stages}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--kernels", nargs="+", default=["states", "dstates", "output", "fused", "gradients"],
                        choices=["states", "dstates", "output", "fused", "gradients", "delta_states",
                                 "delta_dstates", "gla_states", "gla_dstates"])
    parser.add_argument("--quick", action="store_true", help="2 warps x 2 stages settings only")
    parser.add_argument("--state-warps", type=int, nargs="+", help="the state passes' warps to try")
    parser.add_argument("--state-stages", type=int, nargs="+", help="the state passes' stages to try")
    parser.add_argument("--smoke", action="store_true", help="a dry run on the CPU: tiny shape, interpreter")
    args = parser.parse_args()
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, commit "
          f"{os.environ.get('BENCH_COMMIT', '?')}, bf16, chunk {CHUNK}", flush=True)
    results = []
    for shape in args.shapes:
        b, s, h, d = (1, 256, 2, 64) if args.smoke else lr.SHAPES[shape]
        q, k, v, gate, dout = lr.inputs(jax.random.PRNGKey(0), b, s, h, d, "simple_gla")
        cum = jnp.cumsum(jnp.swapaxes(gate, 1, 2).reshape(b, h, s // CHUNK, CHUNK), axis=-1).reshape(b, h, s)
        h0 = jnp.zeros((b, h, d, d), jnp.float32)
        states = jnp.zeros((b, h, s // CHUNK, d, d), jnp.bfloat16) + 0.01
        vector_cum = jnp.broadcast_to(jnp.swapaxes(cum, 1, 2)[..., None] / 16, (b, s, h, d))  # a GLA-like gate
        operands = (q, k, v, cum, h0, states, dout, vector_cum)
        for kernel in args.kernels:
            rows = []
            for config in tilings(kernel, args.quick, d, args.state_warps, args.state_stages):
                fn = kernel_fn(kernel, config, args.smoke)
                try:
                    ms = 1e3 * lr.timed(lambda: fn(*operands), jax.block_until_ready, min_time=0.2)
                except Exception as e:  # a tiling Triton cannot compile (shared memory, registers)
                    ms, error = None, f"{type(e).__name__}: {str(e)[:80]}"
                else:
                    error = None
                rows.append(dict(shape=f"B{b} S{s} H{h} D{d}", kernel=kernel, tiling=label(config), ms=ms,
                                 error=error))
            rows.sort(key=lambda r: float("inf") if r["ms"] is None else r["ms"])
            for r in rows:
                print(f"{r['shape']:>20} {kernel:>13} {r['tiling']:>22} "
                      f"{'%.4f ms' % r['ms'] if r['ms'] is not None else r['error']}", flush=True)
            results += rows
            with open(os.path.join(OUT, "time_scalar_kernels.json"), "w") as f:
                json.dump(dict(device=jax.devices()[0].device_kind, commit=os.environ.get("BENCH_COMMIT"),
                               results=results), f, indent=1)


if __name__ == "__main__":
    main()
