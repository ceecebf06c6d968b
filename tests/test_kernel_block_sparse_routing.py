"""Routing attention through the block-sparse kernels (``implementation="pallas"``): the cluster ids as the
kernels' tag mask, GPU (Triton) and TPU (Mosaic) builds in Pallas' interpreters, against the "xla" form.

Forward and the gradients of q, k, v; causal and not, GQA, per-head clusters, segment ids, a sequence that is
not a multiple of the block (padding), and the block layout itself against the dense pattern.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from attn._block_layouts import expand_layout, routing_block_layout, routing_layout
from attn.routing import routing_pallas

import _kernel_helpers as helpers


def _inputs(seed, b, s, h, hkv, d, clusters):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, s, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.float32)
    dout = jax.random.normal(keys[3], (b, s, h, d), jnp.float32)
    centroids = jax.random.normal(keys[4], (h, clusters, d), jnp.float32)  # a different clustering per head
    return q, k, v, dout, centroids


# backend, seed, b, s, h, hkv, d, clusters, block, causal, segments
CASES = {
    "gpu-gqa-causal-padded": ("triton", 0, 2, 20, 4, 2, 16, 3, 8, True, False),
    "gpu-full-segments": ("triton", 1, 1, 24, 2, 2, 16, 4, 8, False, True),
    # One TPU case (CI time): the mask rule itself is shared by both builds (tables.py).
    "tpu-mqa-causal-segments": ("mosaic_tpu", 3, 1, 24, 2, 1, 16, 4, 8, True, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_the_xla_form(case):
    backend, seed, b, s, h, hkv, d, clusters, block, causal, segments = case
    q, k, v, dout, centroids = _inputs(seed, b, s, h, hkv, d, clusters)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], b, 0).repeat([9, 7, s - 16], 1), jnp.int32) if segments else None
    kw = dict(causal=causal, segment_ids=seg)
    helpers.assert_matches_float64(
        lambda q, k, v: routing_pallas(q, k, v, centroids, block_size=block, backend=backend, interpret=True, **kw),
        lambda q, k, v: attn.get("routing")(q, k, v, centroids=centroids, implementation="xla", **kw),
        q, k, v, dout)


def test_registered_pallas_form_under_jit():
    q, k, v, _, centroids = _inputs(4, 1, 16, 2, 1, 16, 2)
    fn = attn.get("routing")
    run = jax.jit(lambda q, k, v: fn(q, k, v, centroids=centroids, causal=True, implementation="pallas"))
    ref = fn(q, k, v, centroids=centroids, causal=True, implementation="xla")
    np.testing.assert_allclose(run(q, k, v), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        fn(q, k, v, centroids=centroids, mask=np.ones((1, 1, 16, 16), bool), implementation="pallas")


def test_block_layout_covers_exactly_the_blocks_with_a_visible_pair():
    rng = np.random.default_rng(0)
    q_ids = jnp.asarray(rng.integers(0, 5, (2, 3, 24)))
    k_ids = jnp.asarray(rng.integers(0, 5, (2, 3, 32)))
    layout = routing_block_layout(q_ids, k_ids, 5, 4, 8)
    dense = np.asarray(routing_layout(q_ids, k_ids))  # [b, h, 24, 32]
    expected = dense.reshape(2, 3, 6, 4, 4, 8).any((3, 5))
    np.testing.assert_array_equal(layout, expected)
    assert np.all(np.asarray(expand_layout(layout, 4, 8)) >= dense)
