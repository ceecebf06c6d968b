"""The Mosaic GPU (Hopper) sliding-window forward, on the CPU: Pallas' GPU interpreter and lowering.

The interpreter simulates the warpgroups, shared memory, TMA copies and barriers (it raises on a barrier phase
left unobserved, and would hang on a deadlock), so these tests check the band arithmetic, the barrier protocol
between the memory and compute warpgroups, the online softmax and the saved log-sum-exp. They cannot check the
wgmma register layouts, the p @ v product from registers (interpreted as a plain dot), ptxas, or speed: that is
benchmarks/check_sliding_window_mgpu.py on the GPU. Shapes stay tiny: one interpreted call takes seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.sliding_window import (BlockSizes, band, config, gpu_forward, mosaic_gpu_forward,
                                           sliding_window_attention, sliding_window_reference)
from kernels_pallas.sliding_window.mosaic_gpu_forward import MosaicBlocks

import _kernel_helpers as helpers


# seq_len, padded length, left, right, blocks: a causal window whose rows meet fully masked edge tiles, and a
# two-sided one with two compute warpgroups taking turns (rows of one warpgroup skip tiles of the other).
FORWARD_CASES = {
    "1wg-causal-odd-length": (300, 384, 70, 0, MosaicBlocks(block_q=64, block_k=64)),
    "2wg-pingpong-two-sided": (330, 384, 100, 37, MosaicBlocks(block_k=64, compute_wgs=2, pingpong=True)),
}


@pytest.mark.parametrize("case", FORWARD_CASES.values(), ids=FORWARD_CASES.keys())
def test_interpreted_forward_matches_reference_and_triton_lse(case):
    seq_len, s_pad, left, right, blocks = case
    q, k, v, _ = helpers.qkv_dout(0, 1, s_pad, 4, 2, 64)  # GQA: two query heads per key/value head
    kw = dict(left=left, right=right, scale=64 ** -0.5, seq_len=seq_len)
    out, lse = mosaic_gpu_forward.forward(q, k, v, blocks=blocks, interpret=plgpu.InterpretGPUParams(), **kw)
    f32 = lambda x: x[:, :seq_len].astype(jnp.float32)
    ref = sliding_window_reference(f32(q), f32(k), f32(v), window=(left, right))
    assert out.dtype == q.dtype
    assert helpers.rel_err(f32(out), ref) < 1e-2  # p is rounded to bfloat16 for the second product
    assert np.isfinite(np.asarray(out, np.float32)).all()  # padded rows too: the backward reads them
    # The Triton backward reads this lse: same values as the Triton forward's, PAD_LSE on padded rows.
    _, lse_triton = gpu_forward.forward(q, k, v, None, softcap=None, blocks=config.INTERPRET_DEFAULT,
                                        interpret=True, **kw)
    np.testing.assert_allclose(lse[..., :seq_len], lse_triton[..., :seq_len], atol=1e-3)
    assert (np.asarray(lse[..., seq_len:]) == band.PAD_LSE).all()


def test_gradients_through_ops_mosaic_forward_and_triton_backward():
    q, k, v, dout = helpers.qkv_dout(1, 1, 150, 2, 1, 48, jnp.float16)  # head_dim 48 is padded to 64
    kw = dict(window=(20, 9), causal=False)
    out, vjp = jax.vjp(lambda q, k, v: sliding_window_attention(
        q, k, v, backend="mosaic_gpu", interpret=True, mosaic_blocks=MosaicBlocks(block_k=64), mosaic_backward=False,
        **kw), q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    ref, ref_vjp = jax.vjp(lambda q, k, v: sliding_window_reference(q, k, v, **kw), f32(q), f32(k), f32(v))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert helpers.rel_err(f32(out), ref) < 5e-3
    for name, g, r in zip(("dq", "dk", "dv"), vjp(dout), ref_vjp(f32(dout))):
        assert g.shape == r.shape, name
        assert helpers.rel_err(f32(g), r) < 5e-3, name


def test_lowers_to_a_mosaic_gpu_kernel_on_a_cpu_only_machine():
    """Pallas -> Mosaic GPU lowering (layouts, shared memory, barriers) runs without a GPU; ptxas does not."""
    q = jax.ShapeDtypeStruct((2, 1024, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
    blocks = MosaicBlocks(block_k=128, compute_wgs=2, pingpong=True)
    f = lambda q, k, v: sliding_window_attention(q, k, v, window=(511, 0), causal=True, backend="mosaic_gpu",
                                                 mosaic_blocks=blocks)
    text = jax.jit(f).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_warpgroup_tile_runs_match_what_the_memory_warpgroup_streams():
    """Each compute warpgroup steps through exactly the program's run [first, end), which the memory
    warpgroup streams in order (one step more or less would hang the GPU), computing every tile its rows
    meet; together the warpgroups need every tile of the run. Padded rows and large padding included."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        block_q, block_k, wgs = int(rng.choice([64, 128])), int(rng.choice([64, 128])), int(rng.integers(1, 3))
        seq_len = int(rng.integers(1, 1000))
        left, right = (int(x) for x in rng.integers(0, seq_len, size=2))
        rows = block_q * wgs
        s_pad = -(-seq_len // 256) * 256 + 256 * int(rng.integers(0, 2))  # up to a whole padded program
        start = int(rng.integers(0, s_pad // rows)) * rows
        first, end = (int(x) for x in mosaic_gpu_forward.program_tiles(start, rows, block_k, left, right,
                                                                       seq_len))
        needed = set()
        for w in range(wgs):
            q_start = start + w * block_q
            own = [int(x) for x in band.key_tiles(q_start, block_q, block_k, left, right, seq_len)]
            lo, mid_lo, mid_hi, hi = (int(x) for x in mosaic_gpu_forward.warpgroup_tiles(
                q_start, block_q, block_k, left, right, seq_len, first, end))
            assert first <= lo <= mid_lo <= mid_hi <= hi <= end
            if own[0] < own[3]:  # rows that meet some key: the run is unchanged
                assert [lo, mid_lo, mid_hi, hi] == own
                needed |= set(range(lo, hi))
        assert needed == set(range(first, end))


BAD = {
    "float32": (dict(dtype=jnp.float32), "bfloat16 or float16"),
    "head_dim 256": (dict(d=256), "head_dim"),
    "softcap": (dict(softcap=5.0), "softcap"),
    "segment ids": (dict(segment_ids=jnp.zeros((1, 64), jnp.int32)), "segment_ids"),
    "block_k not a multiple of 64": (dict(mosaic_blocks=MosaicBlocks(block_k=96)), "block_k"),
    "three compute warpgroups": (dict(mosaic_blocks=MosaicBlocks(compute_wgs=3)), "compute_wgs"),
    "one ring slot": (dict(mosaic_blocks=MosaicBlocks(num_slots=1)), "num_slots"),
    "pingpong with one warpgroup": (dict(mosaic_blocks=MosaicBlocks(pingpong=True)), "pingpong"),
    "blocks of the wrong type": (dict(mosaic_blocks=BlockSizes()), "mosaic_blocks"),
    "mosaic blocks for triton": (dict(backend="triton", mosaic_blocks=MosaicBlocks()), "mosaic_blocks"),
}


@pytest.mark.parametrize("kwargs,name", BAD.values(), ids=BAD.keys())
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    kwargs = dict(kwargs)
    q = jnp.zeros((1, 64, 2, kwargs.pop("d", 64)), kwargs.pop("dtype", jnp.bfloat16))
    kwargs.setdefault("backend", "mosaic_gpu")
    with pytest.raises(ValueError, match=name):
        sliding_window_attention(q, q, q, window=(3, 3), interpret=True, **kwargs)
