"""MoBA through the block-sparse kernels (``implementation="pallas"``): each query's selected key blocks as the
kernels' bit mask inside the union layout, GPU (Triton) and TPU (Mosaic) builds in Pallas' interpreters,
against the "xla" form.

Forward and the gradients of q, k, v; causal and not, GQA, segment ids, a top_k over the number of blocks, a
top_k of 1 under causal (rows selecting no block besides their own), tiles smaller than the MoBA block,
more than 32 key blocks (two bit words), and the packing of the selection into bits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn._block_layouts import moba_bits, moba_block_layout
from attn.moba import moba_pallas
from kernels_pallas.block_sparse import Tiles

import _kernel_helpers as helpers


def _inputs(seed, b, s, h, hkv, d):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.float32)
    dout = jax.random.normal(keys[3], (b, s, h, d), jnp.float32)
    return q, k, v, dout


# backend, seed, b, s, h, hkv, d, block, top_k, causal, segments, tiles
CASES = {
    "gpu-gqa-causal": ("triton", 0, 2, 32, 4, 2, 16, 4, 2, True, False, None),
    "gpu-full-segments-small-tiles": ("triton", 1, 1, 32, 2, 2, 16, 8, 2, False, True, Tiles(4, 8, 8, 2)),
    "gpu-causal-top1-own-block-only": ("triton", 2, 1, 24, 2, 1, 8, 4, 1, True, False, None),
    # One TPU case (CI time): the mask rule itself is shared by both builds (tables.py).
    "tpu-mqa-causal-segments": ("mosaic_tpu", 4, 1, 32, 2, 1, 16, 4, 2, True, True, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_the_xla_form(case):
    backend, seed, b, s, h, hkv, d, block, top_k, causal, segments, tiles = case
    q, k, v, dout = _inputs(seed, b, s, h, hkv, d)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], b, 0).repeat([9, 13, s - 22], 1), jnp.int32) if segments else None
    kw = dict(causal=causal, segment_ids=seg, block_size=block, top_k=top_k)
    helpers.assert_matches_float64(
        lambda q, k, v: moba_pallas(q, k, v, tiles=tiles, backend=backend, interpret=True, **kw),
        lambda q, k, v: attn.get("moba")(q, k, v, implementation="xla", **kw), q, k, v, dout)


def test_registered_pallas_form_under_jit_with_two_bit_words():
    # 36 key blocks of 2: the selections of blocks 32..35 live in the second word.
    q, k, v, _ = _inputs(5, 1, 72, 2, 1, 8)
    fn = attn.get("moba")
    kw = dict(causal=True, block_size=2, top_k=3)
    run = jax.jit(lambda q, k, v: fn(q, k, v, implementation="pallas", **kw))
    np.testing.assert_allclose(run(q, k, v), fn(q, k, v, implementation="xla", **kw), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        fn(q, k, v, mask=np.ones((1, 1, 72, 72), bool), implementation="pallas", **kw)
    with pytest.raises(ValueError, match="tiles.q"):  # a tile must divide the MoBA block
        moba_pallas(q, k, v, block_size=4, tiles=Tiles(q=3), interpret=True)


def test_bits_and_block_layout_pack_the_selection():
    rng = np.random.default_rng(0)
    picked = rng.random((2, 3, 8, 40)) < 0.3
    bits = np.asarray(moba_bits(jnp.asarray(picked)))
    assert bits.dtype == np.int32 and bits.shape == (2, 3, 8, 2)
    unpacked = (bits.view(np.uint32)[..., :, None] >> np.arange(32, dtype=np.uint32)) & 1
    np.testing.assert_array_equal(unpacked.reshape(2, 3, 8, 64)[..., :40], picked)
    assert not unpacked.reshape(2, 3, 8, 64)[..., 40:].any()
    layout = np.asarray(moba_block_layout(jnp.asarray(picked), 4))
    np.testing.assert_array_equal(layout, picked.reshape(2, 3, 2, 4, 40).any(3))
