"""The Mosaic GPU (Hopper) block-sparse forward and backward, on the CPU: Pallas' GPU interpreter and lowering,
and when backend=None picks them.

The interpreter simulates the warpgroups, shared memory, TMA copies and barriers (it raises on a barrier phase
left unobserved, and would hang on a deadlock), so these tests check the table walk (the shared copy of the
row that keeps the memory and compute warpgroups in step), the causal mask of the diagonal entries, empty
rows, the online softmax, the saved log-sum-exp that the Triton backward reads, and the Mosaic dq and dk/dv
passes (the column rows of a GQA group walked in turn). They cannot check wgmma register layouts, products
from registers (plain dots there), ptxas, or speed: that is benchmarks/check_block_sparse_mgpu.py on the GPU.
Shapes stay tiny: one interpreted call takes seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.block_sparse import (Tiles, block_sparse_attention, block_sparse_reference, gpu_forward,
                                         mosaic_gpu_forward, ops)
from kernels_pallas.sliding_window.band import PAD_LSE
from kernels_pallas.sliding_window.mosaic_gpu_backward import MosaicBackwardBlocks
from kernels_pallas.sliding_window.mosaic_gpu_forward import MosaicBlocks

import _kernel_helpers as helpers

f32 = lambda x: x.astype(jnp.float32)


def _layout(seed, heads, blocks, density):
    """Random per-head layout whose first block row is empty and last block row full."""
    layout = np.random.default_rng(seed).random((heads, blocks, blocks)) < density
    layout[:, 0] = False
    layout[:, -1] = True
    return layout


def _row_tables(layout, block, q_tile, k_tile, causal_offset, heads):
    return ops.block_tables(layout, q_tile=q_tile, kv_tile=k_tile, repeat_q=block // q_tile,
                            repeat_kv=block // k_tile, causal_offset=causal_offset, element_mask=False,
                            heads=heads, max_row=layout.shape[-1], columns=False)[0]


# One interpreted kernel call costs ~2 s whatever its size, so the cases are few and each covers much: here
# two compute warpgroups taking turns over 128-blocks in 64-key steps (a diagonal block is two entries, one of
# them invisible to the first warpgroup's rows), 3 ring slots, causal, GQA, first block row empty; one
# compute warpgroup, no causal rule and the Mosaic backward are in test_gradients_through_ops.
def test_interpreted_forward_matches_reference_and_triton_lse():
    seq, block, heads, scale, offset = 384, 128, 2, 64 ** -0.5, 0
    blocks = MosaicBlocks(block_k=64, compute_wgs=2, num_slots=3, pingpong=True)
    q, k, v, _ = helpers.qkv_dout(0, 1, seq, heads, 1, 64)
    layout = _layout(0, heads, seq // block, 0.4)
    rows = _row_tables(layout, block, blocks.rows_per_program, blocks.block_k, offset, heads)
    out, lse = mosaic_gpu_forward.forward(q, k, v, rows, scale=scale, causal_offset=offset, blocks=blocks,
                                          interpret=plgpu.InterpretGPUParams())
    ref = block_sparse_reference(f32(q), f32(k), f32(v), layout, block_size=block, causal=True)
    assert out.dtype == q.dtype
    assert helpers.rel_err(f32(out), ref) < 1e-2  # p is rounded to bfloat16 for the second product
    assert not np.any(np.asarray(f32(out[:, :block])))  # the empty block row: zeros
    assert (np.asarray(lse[..., :block]) == PAD_LSE).all()
    # The Triton backward reads this lse: the Triton forward's values (its own tiles), PAD_LSE on empty rows.
    st = ops._Static(scale, offset, block, block, "triton", True, layout.shape[-1], 0, 4, 2)
    _, lse_triton = gpu_forward.forward(q, k, v, None, None, None, None,
                                        _row_tables(layout, block, block, block, offset, heads), st=st)
    np.testing.assert_allclose(lse[..., block:], lse_triton[..., block:], atol=1e-3)


# seq, block, dtype, causal, mosaic_backward: the Triton backward behind a one-warpgroup Mosaic forward, no
# causal rule; the Mosaic GPU dq and dk/dv passes (two compute warpgroups, 3 slots) over 128-blocks, causal.
# Both: a key block column left empty, head_dim 48 padded to 64, 2 query heads on one kv head.
GRAD_CASES = {
    "fp16-1wg-triton-backward": (128, 64, jnp.float16, False, False),
    "bf16-2wg-causal-mosaic-backward": (256, 128, jnp.bfloat16, True,
                                        MosaicBackwardBlocks(compute_wgs=2, num_slots=3)),
}


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradients_through_ops(case):
    seq, block, dtype, causal, mosaic_backward = case
    q, k, v, dout = helpers.qkv_dout(1, 1, seq, 2, 1, 48, dtype)
    layout = _layout(1, 2, seq // block, 0.5)
    layout[:, :, 0] = False  # no query sees the first key block: dk, dv zero there
    layout[:, 1:, 1:] |= np.eye(seq // block - 1, dtype=bool)  # the other rows see their diagonal block
    kw = dict(block_size=block, causal=causal)
    mosaic_blocks = MosaicBlocks(block_k=64, compute_wgs=block // 64)
    out, vjp = jax.vjp(lambda q, k, v: block_sparse_attention(
        q, k, v, layout, backend="mosaic_gpu", interpret=True, mosaic_blocks=mosaic_blocks,
        mosaic_backward=mosaic_backward, **kw), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: block_sparse_reference(q, k, v, layout, **kw), f32(q), f32(k), f32(v))
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = 5e-3 if dtype == jnp.float16 else 1e-2  # p and ds are rounded to q's dtype for the products
    assert helpers.rel_err(f32(out), ref) < tol
    for name, g, r in zip(("dq", "dk", "dv"), vjp(dout), ref_vjp(f32(dout))):
        assert g.shape == r.shape and g.dtype == q.dtype, name
        assert helpers.rel_err(f32(g), r) < tol, name


def test_whole_vjp_lowers_to_three_mosaic_gpu_kernels_on_a_cpu_only_machine():
    """Pallas -> Mosaic GPU lowering (layouts, shared memory, barriers, the table rows' bulk copies) runs without
    a GPU; ptxas does not. The default tiles, GQA, causal, head_dim 128: the forward, dq and dk/dv kernels."""
    q = jax.ShapeDtypeStruct((2, 1024, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
    layout = _layout(2, 4, 8, 0.3)
    attend = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=128, causal=True,
                                                    backend="mosaic_gpu", mosaic_backward=True)
    f = jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    text = jax.jit(f).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 3


def test_backend_none_takes_the_mosaic_build_on_hopper_where_it_applies(monkeypatch):
    """backend=None: the Mosaic GPU forward and backward on a Hopper GPU for 16-bit inputs, head_dim <= 128, no
    segment ids or fine mask, blocks that its default tiles divide and tables that fit in shared memory."""
    from kernels_pallas.block_sparse import mosaic_gpu_backward

    fits = lambda **kw: ops._mosaic_gpu_fits(**{**dict(dtype=jnp.bfloat16, head_dim=128, segment_ids=None,
                                                       fine=None, q_block=128, kv_block=128, q_len=8192,
                                                       kv_len=8192, groups=1), **kw})
    monkeypatch.setattr(ops, "on_hopper", lambda: False)
    assert not fits()
    monkeypatch.setattr(ops, "on_hopper", lambda: True)
    assert fits() and fits(dtype=jnp.float16, head_dim=64, q_block=256, groups=8, q_len=32768, kv_len=32768)
    assert not fits(dtype=jnp.float32)
    assert not fits(head_dim=256)
    assert not fits(segment_ids=jnp.zeros((1, 8192), jnp.int32))
    assert not fits(fine="tags")
    assert not fits(q_block=64) and not fits(kv_block=64)
    assert not fits(groups=16, q_len=32768)  # 16 column rows of 1024 entries in one dk/dv program
    assert ops._mosaic_backward_blocks(None, True, 128, 128) == mosaic_gpu_backward.DEFAULT_BACKWARD_BLOCKS
    assert ops._mosaic_backward_blocks(None, False, 128, 128) is None
    assert ops._mosaic_backward_blocks(False, True, 128, 128) is None


def test_tables_over_the_shared_memory_budget_raise_value_error():
    q = jax.ShapeDtypeStruct((1, 32768, 16, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 32768, 1, 64), jnp.bfloat16)
    layout = np.ones((256, 256), bool)
    attend = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=128, backend="mosaic_gpu")
    with pytest.raises(ValueError, match="shared memory"):
        jax.eval_shape(attend, q, kv, kv)


BAD = {
    "float32": (dict(dtype=jnp.float32), "bfloat16 or float16"),
    "head_dim 256": (dict(d=256), "head_dim"),
    "segment ids": (dict(segment_ids=jnp.zeros((1, 128), jnp.int32)), "segment_ids"),
    "tags": (dict(tags=(jnp.zeros((1, 2, 128), jnp.int32),) * 2), "tags"),
    "key block bits": (dict(key_block_bits=jnp.zeros((1, 2, 128, 1), jnp.int32)), "key_block_bits"),
    "window2d": (dict(window2d=(jnp.zeros((128, 4), jnp.int32), jnp.zeros((128, 2), jnp.int32), (3, 3, 1, 1))),
                 "window2d"),
    "block smaller than the rows per program": (dict(block_size=64, mosaic_blocks=MosaicBlocks(compute_wgs=2)),
                                                "block_size"),
    "block_k not a multiple of 64": (dict(mosaic_blocks=MosaicBlocks(block_k=96)), "block_k"),
    "pingpong with one warpgroup": (dict(mosaic_blocks=MosaicBlocks(pingpong=True)), "pingpong"),
    "blocks of the wrong type": (dict(mosaic_blocks=Tiles()), "mosaic_blocks"),
    "mosaic blocks for triton": (dict(backend="triton", mosaic_blocks=MosaicBlocks()), "mosaic_blocks"),
    "mosaic backward for triton": (dict(backend="triton", mosaic_backward=True), "mosaic_backward"),
    "mosaic backward of the wrong type": (dict(mosaic_backward=MosaicBlocks()), "mosaic_backward"),
    "mosaic backward with a Triton dq": (dict(mosaic_backward=MosaicBackwardBlocks(mosaic_dq=False)), "mosaic_dq"),
    "block smaller than the keys per dk/dv program": (
        dict(block_size=64, mosaic_blocks=MosaicBlocks(block_k=64), mosaic_backward=MosaicBackwardBlocks()),
        "mosaic_backward"),
}


@pytest.mark.parametrize("kwargs,name", BAD.values(), ids=BAD.keys())
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    kwargs = dict(kwargs)
    q = jnp.zeros((1, 128, 2, kwargs.pop("d", 64)), kwargs.pop("dtype", jnp.bfloat16))
    kwargs.setdefault("backend", "mosaic_gpu")
    block = kwargs.pop("block_size", 128)
    layout = np.ones((128 // block, 128 // block), bool)
    with pytest.raises(ValueError, match=name):
        block_sparse_attention(q, q, q, layout, block_size=block, interpret=True, **kwargs)
