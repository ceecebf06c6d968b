"""Routing Transformer attention: queries and keys clustered by centroids, attention within a cluster."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import _common as c
from attn._block_layouts import (
    attend_with_pattern,
    nearest_centroid,
    pad_sequence,
    routing_block_layout,
    routing_layout,
)
from attn._registry import register


def _normalise(x):
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def update_centroids(centroids, q, k, decay: float):
    """One online (mini-batch) spherical k-means step, as an exponential moving average.

    Normalised queries and keys of head h are assigned to their nearest centroid of head h; each centroid
    moves to ``decay * old + (1 - decay) * mean(assigned vectors)``; a centroid with nothing assigned stays.
    Pure: returns the new centroids [heads, num_clusters, head_dim]; the model keeps them as state.
    """
    if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:  # checked when not traced
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    h, num_clusters = centroids.shape[0], centroids.shape[1]
    xs = jnp.concatenate([q, c.repeat_kv(k, h)], axis=1)  # [b, sq + sk, h, d]
    ids = nearest_centroid(xs, centroids)  # [b, h, s]
    onehot = jax.nn.one_hot(ids, num_clusters, dtype=centroids.dtype)  # [b, h, s, C]
    sums = jnp.einsum("bhsc,bshd->hcd", onehot, _normalise(xs).astype(centroids.dtype))
    counts = onehot.sum(axis=(0, 2))[..., None]  # [h, C, 1]
    means = sums / jnp.maximum(counts, 1.0)
    return jnp.where(counts > 0, decay * centroids + (1.0 - decay) * means, centroids)


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    return {"centroids": jax.random.normal(key, (q_shape[2], 3, q_shape[3]))}


@register(
    "routing",
    family="sparse",
    complexity="O(n^1.5 d)",
    paper="Efficient Content-Based Sparse Attention with Routing Transformers",
    mask=True,
    segment_ids=True,
    cross=False,
    gqa=True,
    implementations=("xla", "pallas"),
    example_params=_example_params,
    exact=True,
)
def routing_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask=None,
    segment_ids=None,
    centroids=None,
    implementation: str | None = None,
):
    """Softmax attention of query i over the keys j in the same cluster: ``c(q_i) == c(k_j)`` or ``j == i``.

    ``centroids`` [heads, num_clusters, head_dim] are explicit (kept by the model, moved by
    ``update_centroids``); each query/key goes to the centroid of largest cosine similarity (its kv head's key
    for GQA). We use this nearest-centroid assignment in both modes rather than the paper's balanced top-k per
    centroid: it depends on the token alone, so causal=True stays causal, and the clusters need no sorting.
    Every query also sees its own position, so no row is empty. The "xla" form is the reference (dense mask);
    "pallas" is the block-sparse kernel with the cluster ids as a fine mask (``routing_pallas``), exact too.

    Paper: "Efficient Content-Based Sparse Attention with Routing Transformers".
    """
    c.check_qkv(q, k, v, cross=False)
    implementation = c.check_implementation(implementation, ("xla", "pallas"), "routing")
    causal = c.check_causal(causal, (False, True), "routing")
    if implementation == "pallas":
        if mask is not None:
            raise ValueError("mask is not supported by implementation='pallas'; use causal or segment_ids")
        return routing_pallas(q, k, v, centroids, causal=causal, scale=scale, segment_ids=segment_ids)
    q_ids, k_ids = _clusters(q, k, centroids)
    pattern = routing_layout(q_ids, k_ids)
    return attend_with_pattern(q, k, v, pattern, causal=causal, scale=scale, mask=mask, segment_ids=segment_ids)


def _clusters(q, k, centroids):
    """Checked ``centroids`` -> cluster ids of the queries and keys [b, h, s] (keys per query head)."""
    if centroids is None:
        raise ValueError("centroids [heads, num_clusters, head_dim] are required for routing")
    h, d = q.shape[2], q.shape[3]
    centroids = jnp.asarray(centroids)
    if centroids.ndim != 3 or centroids.shape[0] != h or centroids.shape[2] != d or centroids.shape[1] < 1:
        raise ValueError(f"centroids must have shape [heads, num_clusters, head_dim] = ({h}, C, {d}), "
                         f"got {centroids.shape}")
    qf, kf = c.upcast(q, k)
    cf = jax.lax.stop_gradient(centroids.astype(qf.dtype))  # routing is not differentiated (argmax)
    q_ids = nearest_centroid(jax.lax.stop_gradient(qf), cf)
    k_ids = nearest_centroid(jax.lax.stop_gradient(c.repeat_kv(kf, h)), cf)
    return q_ids, k_ids


def routing_pallas(q, k, v, centroids, *, causal=False, scale=None, segment_ids=None, block_size=None,
                   backend=None, interpret=None):
    """Routing attention through the block-sparse Pallas kernel (``implementation="pallas"``), exact.

    The kernel's layout keeps block (I, J) iff a query of I and a key of J share a cluster or the blocks
    hold a diagonal pair (``routing_block_layout``, built under jit); inside a kept block the cluster ids are
    the kernel's ``tags``: query i sees key j iff c(q_i) == c(k_j) or i == j (and causal, segment ids).
    The sequence is padded to a multiple of ``block_size`` (None: 64, or the sequence rounded up to a power
    of two >= 16 when shorter); padded keys carry a tag no query has, so they stay invisible.
    ``backend`` / ``interpret``: as in ``kernels_pallas.block_sparse.block_sparse_attention`` (interpret None:
    on when the default device is the CPU).
    """
    from kernels_pallas.block_sparse import block_sparse_attention  # late: the kernels import attn

    c.check_qkv(q, k, v, cross=False)
    q_ids, k_ids = _clusters(q, k, centroids)
    b, s = q.shape[0], q.shape[1]
    if block_size is None:
        block_size = 64 if s >= 64 else max(16, 1 << (s - 1).bit_length())
    block_size = c.positive_int(block_size, "block_size")
    padded = -(-s // block_size) * block_size
    # Padded queries tag -1 (they see only themselves), padded keys -2: no real query sees them.
    q_ids = pad_sequence(q_ids.astype(jnp.int32), padded, 2, -1)
    k_ids = pad_sequence(k_ids.astype(jnp.int32), padded, 2, -2)
    q, k, v = (pad_sequence(x, padded, 1) for x in (q, k, v))
    if segment_ids is not None:
        pair = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        if len(pair) != 2 or any(jnp.shape(x) != (b, s) for x in pair):
            raise ValueError(f"segment_ids must be [batch, seq] = {(b, s)} or a pair of them, got "
                             f"{[jnp.shape(x) for x in pair]}")
        segment_ids = tuple(pad_sequence(jnp.asarray(x), padded, 1, -1) for x in pair)
    layout = routing_block_layout(q_ids, k_ids, jnp.shape(centroids)[1], block_size, block_size)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    out = block_sparse_attention(q, k, v, layout, block_size=block_size, causal=causal, scale=scale,
                                 segment_ids=segment_ids, tags=(q_ids, k_ids), backend=backend,
                                 interpret=interpret)
    return out[:, :s]
