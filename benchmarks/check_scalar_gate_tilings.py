"""Interleaved repeats of a few scalar-gate (simple GLA) kernel tilings, to pick the GPU default despite run-to-run
noise (one sweep of ``benchmarks/linear_recurrent.py --sweep`` moved the same tiling by 20-30 % between runs);
``--variant delta_rule`` or ``gated_delta_rule``: the delta rule's tilings instead.

Run on the GPU machine from the repository root: ``PYTHONPATH=. python benchmarks/check_scalar_gate_tilings.py
[--variant simple_gla]``. B4 S8192 H16 D128 bf16 (``linear_recurrent.inputs``), forward and forward+backward,
every tiling once per repeat (REPEATS, default 3), printing M tokens/s per (repeat, mode, tiling);
``linear_recurrent.run_jax`` times them.
"""

import argparse
import dataclasses
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear_recurrent as lr  # noqa: E402

# The first four as measured on 2026-12-02 ("two-pass" was the GPU default then; "fused+warps8+stages3" is now).
TWO_PASS = lr.scalar_config.ChunkConfig(chunk_size=64, block_k=64, block_v=64, num_warps=4, num_stages=2)
TILINGS = {
    "two-pass": TWO_PASS,
    "fused+stages3": dataclasses.replace(TWO_PASS, fused_forward=True, num_stages=3),
    "fused+warps8": dataclasses.replace(TWO_PASS, fused_forward=True, num_warps=8),
    "fused+warps8+stages3": dataclasses.replace(TWO_PASS, fused_forward=True, num_warps=8, num_stages=3),
    # Not yet measured: the forward's best launch settings with the backward's (ChunkConfig.num_warps_bwd).
    "fused+stages3, bwd warps8": dataclasses.replace(TWO_PASS, fused_forward=True, num_stages=3, num_warps_bwd=8),
    "fused+stages3, bwd warps8+stages2": dataclasses.replace(TWO_PASS, fused_forward=True, num_stages=3,
                                                             num_warps_bwd=8, num_stages_bwd=2),
}

# The delta rule's GPU default against other blocks of its kernels' tiles (profile_fla.py --tilings shows which
# kernels gain): the WY forward's inversion in its own kernel by [16, 16] blocks at 1, 2 or 4 warps.
DELTA_TILINGS = {
    "default": lr.delta_ops.GPU_DEFAULT,
    **{f"WY inverse kernel {warps} warps": dataclasses.replace(lr.delta_ops.GPU_DEFAULT, wy_inverse_warps=warps)
       for warps in (1, 2, 4)},
    "WY inverse kernel 1 warp, whole columns": dataclasses.replace(lr.delta_ops.GPU_DEFAULT, wy_inverse_warps=1,
                                                                   wy_column_block=128),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="simple_gla", choices=["simple_gla", "delta_rule", "gated_delta_rule"])
    variant = parser.parse_args().variant
    tilings = TILINGS if variant == "simple_gla" else DELTA_TILINGS
    b, s, h, d = 4, 8192, 16, 128
    q, k, v, gate, dout = lr.inputs(jax.random.key(0), b, s, h, d, variant)
    for repeat in range(int(os.environ.get("REPEATS", "3"))):
        for mode in ("forward", "forward+backward"):
            for name, config in tilings.items():
                seconds = lr.run_jax("pallas", variant, mode, q, k, v, gate, dout, config)[0]
                print(repeat, mode, name, f"{b * s / seconds / 1e6:.2f} M tokens/s", flush=True)


if __name__ == "__main__":
    main()
