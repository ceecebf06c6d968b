"""The Mosaic GPU (Hopper) sliding-window backward (dk/dv and dq passes), on the CPU: Pallas' GPU interpreter
and lowering.

As for the forward (tests/test_kernel_sliding_window_mgpu.py), the interpreter simulates the warpgroups, shared
memory, TMA copies and barriers (it raises on a barrier phase left unobserved), so these tests check the band
arithmetic of the key-tile and query-tile programs, the barrier protocols of their rings, and the gradient math.
They cannot check wgmma register layouts, the products from registers (plain dots there), ptxas or speed: that is
benchmarks/check_sliding_window_mgpu.py on the GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.sliding_window import (band, config, gpu_backward, mosaic_gpu_backward, mosaic_gpu_forward,
                                           sliding_window_attention, sliding_window_reference)
from kernels_pallas.sliding_window.mosaic_gpu_backward import MosaicBackwardBlocks
from kernels_pallas.sliding_window.mosaic_gpu_forward import MosaicBlocks

import _kernel_helpers as helpers


f32 = lambda x: x.astype(jnp.float32)

# dtype, seq_len, head_dim, window, causal, blocks: a causal window over an odd length whose edge tiles are
# partly masked, with one compute warpgroup and the Mosaic dq pass; a two-sided window with two compute
# warpgroups (each skips tiles of the other's run), 3 ring slots, head_dim 48 padded to 64 and the Triton dq
# pass. Both GQA (2 query heads per kv head).
GRAD_CASES = {
    "bf16-causal-odd-length-1wg": (jnp.bfloat16, 201, 64, (70, 0), True, MosaicBackwardBlocks(compute_wgs=1)),
    "fp16-two-sided-2wg-3slots-triton-dq": (jnp.float16, 150, 48, (20, 41), False,
                                            MosaicBackwardBlocks(compute_wgs=2, num_slots=3, mosaic_dq=False)),
}


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradients_through_ops_match_float32_reference(case):
    dtype, seq_len, d, window, causal, blocks = case
    q, k, v, dout = helpers.qkv_dout(1, 1, seq_len, 4, 2, d, dtype)
    kw = dict(window=window, causal=causal)
    ours = lambda q, k, v: sliding_window_attention(q, k, v, backend="mosaic_gpu", interpret=True,
                                                    mosaic_blocks=MosaicBlocks(block_k=64),
                                                    mosaic_backward=blocks, **kw)
    out, vjp = jax.vjp(ours, q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: sliding_window_reference(q, k, v, **kw), f32(q), f32(k), f32(v))
    assert helpers.rel_err(f32(out), ref) < 1e-2
    for name, g, r in zip(("dq", "dk", "dv"), vjp(dout), ref_vjp(f32(dout))):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert np.isfinite(np.asarray(f32(g))).all(), name
        assert helpers.rel_err(f32(g), r) < 1e-2, name


def test_passes_match_triton_backward_on_the_same_residuals():
    """Same lse, delta and padded inputs as the Triton passes get (padded query rows carry PAD_LSE, padded keys
    are masked): they must agree up to bfloat16 rounding of p and ds, on the real rows. Two compute warpgroups,
    128-key steps in the dq pass."""
    seq_len, s_pad, left, right = 300, 384, 70, 33
    q, k, v, dout = helpers.qkv_dout(0, 1, s_pad, 4, 2, 64)
    kw = dict(left=left, right=right, scale=64 ** -0.5, seq_len=seq_len)
    out, lse = mosaic_gpu_forward.forward(q, k, v, blocks=MosaicBlocks(block_k=64),
                                          interpret=plgpu.InterpretGPUParams(), **kw)
    delta = jnp.einsum("bshd,bshd->bhs", f32(out), f32(dout))
    dq_t, dk_t, dv_t = gpu_backward.backward(q, k, v, None, dout, lse, delta, softcap=None,
                                             blocks=config.INTERPRET_DEFAULT, interpret=True, **kw)
    dk, dv = mosaic_gpu_backward.dkv(q, k, v, dout, lse, delta, blocks=MosaicBackwardBlocks(compute_wgs=2),
                                     interpret=plgpu.InterpretGPUParams(), **kw)
    dq = mosaic_gpu_backward.dq(q, k, v, dout, lse, delta, blocks=MosaicBackwardBlocks(block_k=128),
                                interpret=plgpu.InterpretGPUParams(), **kw)
    for name, a, b in (("dq", dq, dq_t), ("dk", dk, dk_t), ("dv", dv, dv_t)):
        assert a.dtype == b.dtype, name
        assert helpers.rel_err(f32(a[:, :seq_len]), f32(b[:, :seq_len])) < 1e-3, name


def test_whole_vjp_lowers_to_three_mosaic_gpu_kernels_on_a_cpu_only_machine():
    """Pallas -> Mosaic GPU lowering (layouts, shared memory, barriers) of the forward, dq and dk/dv kernels,
    head_dim 64 and 128; ptxas does not run here."""
    for d, blocks in ((64, MosaicBackwardBlocks(compute_wgs=1)), (128, MosaicBackwardBlocks())):
        q = jax.ShapeDtypeStruct((2, 1024, 4, d), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((2, 1024, 2, d), jnp.bfloat16)
        f = lambda q, k, v: sliding_window_attention(q, k, v, window=(511, 0), causal=True, backend="mosaic_gpu",
                                                     mosaic_backward=blocks).astype(jnp.float32).sum()
        text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).trace(q, kv, kv).lower(
            lowering_platforms=("cuda",)).as_text()
        assert text.count("stablehlo.custom_call @mosaic_gpu") == 3, d


def test_query_tile_runs_match_what_the_memory_warpgroup_streams():
    """Each compute warpgroup steps through exactly the program's run [first, end) of query tiles, computing
    every tile its keys meet; together the warpgroups need every tile of the run."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        block_q, block_k, wgs = int(rng.choice([64, 128])), int(rng.choice([64, 128])), int(rng.integers(1, 3))
        seq_len = int(rng.integers(1, 1000))
        left, right = (int(x) for x in rng.integers(0, seq_len, size=2))
        keys = block_k * wgs
        s_pad = -(-seq_len // 256) * 256 + 256 * int(rng.integers(0, 2))
        start = int(rng.integers(0, s_pad // keys)) * keys
        first, end = (int(x) for x in mosaic_gpu_backward.program_query_tiles(start, keys, block_q, left, right,
                                                                              seq_len))
        needed = set()
        for w in range(wgs):
            k_start = start + w * block_k
            own = [int(x) for x in band.query_tiles(k_start, block_q, block_k, left, right, seq_len)]
            lo, mid_lo, mid_hi, hi = (int(x) for x in mosaic_gpu_backward.warpgroup_query_tiles(
                k_start, block_q, block_k, left, right, seq_len, first, end))
            assert first <= lo <= mid_lo <= mid_hi <= hi <= end
            if own[0] < own[3]:
                assert [lo, mid_lo, mid_hi, hi] == own
                needed |= set(range(lo, hi))
        assert needed == set(range(first, end))


def test_the_mosaic_forward_takes_the_mosaic_backward_by_default():
    """mosaic_backward=None: the Mosaic backward with the Mosaic forward (faster on the H200), the Triton one
    with every other forward; False keeps the Triton backward behind the Mosaic forward."""
    from kernels_pallas.sliding_window import ops

    assert ops._mosaic_backward_blocks(None, mosaic_gpu=True) == mosaic_gpu_backward.DEFAULT_BACKWARD_BLOCKS
    assert ops._mosaic_backward_blocks(None, mosaic_gpu=False) is None
    assert ops._mosaic_backward_blocks(False, mosaic_gpu=True) is None


BAD = {
    "block_q not a multiple of 64": (dict(mosaic_backward=MosaicBackwardBlocks(block_q=32)), "block_q"),
    "three compute warpgroups": (dict(mosaic_backward=MosaicBackwardBlocks(compute_wgs=3)), "compute_wgs"),
    "one ring slot": (dict(mosaic_backward=MosaicBackwardBlocks(num_slots=1)), "num_slots"),
    "mosaic_dq not a bool": (dict(mosaic_backward=MosaicBackwardBlocks(mosaic_dq=None)), "mosaic_dq"),
    "wrong type": (dict(mosaic_backward=MosaicBlocks()), "mosaic_backward"),
    "triton forward": (dict(backend="triton", mosaic_backward=True), "mosaic_backward"),
}


@pytest.mark.parametrize("kwargs,name", BAD.values(), ids=BAD.keys())
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    kwargs = dict(kwargs)
    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    kwargs.setdefault("backend", "mosaic_gpu")
    with pytest.raises(ValueError, match=name):
        sliding_window_attention(q, q, q, window=(3, 3), interpret=True, **kwargs)
