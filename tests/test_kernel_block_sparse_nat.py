"""2D neighbourhood attention (NAT / DiNAT) through the block-sparse kernels (``implementation="pallas"``): the
windows as the kernels' ``window2d`` fine mask inside the block-any layout, GPU (Triton) and TPU (Mosaic)
builds in Pallas' interpreters, against the dense "xla" form.

Forward and the gradients of q, k, v; kernel 3 and 5, dilation 1 and 2 (also per axis), non-square images,
GQA / MQA, blocks smaller than an image row and spanning several rows; the O(n) layout and windows against the
dense pattern; the registered form under jit; bad arguments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn.neighborhood_2d import (
    neighborhood_block_layout,
    neighborhood_pallas,
    neighborhood_pattern,
    neighborhood_windows,
)
from kernels_pallas.block_sparse import block_sparse_attention, tables

import _kernel_helpers as helpers


def _inputs(seed, s, h, hkv, d):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (1, s, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (1, s, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (1, s, hkv, d), jnp.float32)
    dout = jax.random.normal(keys[3], (1, s, h, d), jnp.float32)
    return q, k, v, dout


# backend, seed, spatial, kernel, dilation, h, hkv, block (None: the default, largest power of two <= 64)
CASES = {
    # 60 pixels: default block 4, less than a row of 10; a 6 x 10 image with dilation 2 on both axes.
    "gpu-6x10-k3-d2-gqa": ("triton", 0, (6, 10), 3, 2, 4, 2, None),
    # 48 pixels: blocks of 16 span rows of 6; kernel 5 x 3, dilation (1, 2).
    "gpu-8x6-k5x3-d1x2-mqa": ("triton", 1, (8, 6), (5, 3), (1, 2), 2, 1, None),
    # One TPU case (CI time): the mask rule itself is shared by both builds (tables.py).
    "tpu-6x8-k5-d1-gqa": ("mosaic_tpu", 2, (6, 8), 5, 1, 4, 2, 16),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_the_xla_form(case):
    backend, seed, spatial, kernel, dilation, h, hkv, block = case
    q, k, v, dout = _inputs(seed, spatial[0] * spatial[1], h, hkv, 16)
    kw = dict(spatial=spatial, kernel_size=kernel, dilation=dilation)
    helpers.assert_matches_float64(
        lambda q, k, v: neighborhood_pallas(q, k, v, block_size=block, backend=backend, interpret=True, **kw),
        lambda q, k, v: attn.get("neighborhood_2d")(q, k, v, implementation="xla", **kw), q, k, v, dout)


def test_layout_and_windows_reproduce_the_dense_pattern():
    for spatial, kernel, dilation in (((6, 10), (3, 3), (2, 2)), ((7, 9), (5, 3), (1, 2)), ((8, 8), (5, 5), (1, 1))):
        pattern = neighborhood_pattern(spatial, kernel, dilation)
        n = pattern.shape[0]
        for block in (1, 4, 8):
            if n % block:
                continue
            layout = neighborhood_block_layout(spatial, kernel, dilation, block)
            np.testing.assert_array_equal(layout, pattern.reshape(n // block, block, n // block, block).any((1, 3)))
        q_window, k_pos = neighborhood_windows(spatial, kernel, dilation)
        assert q_window.dtype == k_pos.dtype == np.int32
        query = tuple(jnp.asarray(q_window[:, i:i + 1]) for i in range(4))
        key = tuple(jnp.asarray(k_pos[None, :, i]) for i in range(2))
        np.testing.assert_array_equal(tables.in_window_2d(query, key, (*kernel, *dilation)), pattern)


def test_registered_pallas_form_under_jit():
    q, k, v, _ = _inputs(4, 32, 2, 1, 8)
    fn = attn.get("neighborhood_2d")
    kw = dict(spatial=(4, 8), kernel_size=3, dilation=(1, 2))
    run = jax.jit(lambda q, k, v: fn(q, k, v, implementation="pallas", **kw))
    np.testing.assert_allclose(run(q, k, v), fn(q, k, v, implementation="xla", **kw), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_value_error_naming_them():
    q = jnp.zeros((1, 60, 2, 8), jnp.float32)
    fn = attn.get("neighborhood_2d")
    with pytest.raises(ValueError, match="mask"):
        fn(q, q, q, spatial=(6, 10), kernel_size=3, mask=np.ones((1, 1, 60, 60), bool), implementation="pallas")
    with pytest.raises(ValueError, match="spatial"):
        fn(q, q, q, spatial=(5, 10), kernel_size=3, implementation="pallas")
    with pytest.raises(ValueError, match="kernel_size"):
        fn(q, q, q, spatial=(6, 10), kernel_size=7, implementation="pallas")
    # 60 pixels: no power-of-two block >= 16 for a compiled kernel.
    with pytest.raises(ValueError, match=r"spatial \(6, 10\).*seq = 60"):
        neighborhood_pallas(q, q, q, spatial=(6, 10), kernel_size=3, backend="triton", interpret=False)
    with pytest.raises(ValueError, match="block_size"):
        neighborhood_pallas(q, q, q, spatial=(6, 10), kernel_size=3, block_size=8, interpret=True)
    layout = np.ones((15, 15), bool)
    q_window, k_pos = neighborhood_windows((6, 10), (3, 3), (1, 1))
    bad = {
        "q_window": (q_window[:, :3], k_pos, (3, 3, 1, 1)),
        "k_pos": (q_window, k_pos.astype(np.float32), (3, 3, 1, 1)),
        "dilation": (q_window, k_pos, (3, 3, 1)),
        "window2d": (q_window, k_pos),
        "window2d kernel and dilation sizes": (q_window, k_pos, (3, 0, 1, 1)),
    }
    for name, window2d in bad.items():
        with pytest.raises(ValueError, match=name):
            block_sparse_attention(q, q, q, layout, block_size=4, window2d=window2d, interpret=True)
    with pytest.raises(ValueError, match="tags and window2d"):
        block_sparse_attention(q, q, q, layout, block_size=4, window2d=(q_window, k_pos, (3, 3, 1, 1)),
                               tags=(jnp.zeros((1, 2, 60), jnp.int32),) * 2, interpret=True)
