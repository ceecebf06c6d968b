"""Attention patterns for the local and sparse mechanisms, and the one function that applies them.

Block layouts are boolean ``[..., q_blocks, kv_blocks]`` arrays (True = the query block attends to the key
block); element patterns are boolean ``[batch|1, heads|1, q_seq, kv_seq]``. The data-dependent builders (MoBA
top-k, routing by cluster) are pure jnp and trace under jit. They are re-exported by ``attn.block_sparse``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attn import _common as c
from attn.softmax import grouped_logits, softmax_attention


def attend_with_pattern(q, k, v, pattern, *, causal=False, scale=None, mask=None, segment_ids=None, softcap=None):
    """Exact softmax attention restricted to ``pattern`` (and causal / mask / segment_ids).

    This is the reference form shared by every pattern mechanism: a dense boolean mask, O(n^2) memory.
    ``pattern`` is boolean, broadcastable to [batch, heads, q_seq, kv_seq].
    """
    b, sq, h, _ = q.shape
    if mask is not None:  # checked on its own first so that a bad mask is reported as `mask`
        mask = c.check_mask(mask, b, h, sq, k.shape[1])
    pattern = jax.lax.stop_gradient(jnp.asarray(pattern, bool))
    return softmax_attention(
        q, k, v, causal=causal, scale=scale, mask=c.combine_masks(pattern, mask), segment_ids=segment_ids,
        softcap=softcap,
    )


def expand_layout(layout, q_block: int, kv_block: int):
    """Block layout [..., qb, kb] -> element pattern [..., qb*q_block, kb*kv_block]."""
    layout = jnp.asarray(layout, bool)
    return jnp.repeat(jnp.repeat(layout, q_block, axis=-2), kv_block, axis=-1)


# --- static layouts (numpy) ------------------------------------------------------------------------------


def causal_layout(q_blocks: int, kv_blocks: int | None = None) -> np.ndarray:
    """[qb, kb] lower-triangular layout, bottom-right aligned like ``_common.causal_mask``."""
    kv_blocks = q_blocks if kv_blocks is None else kv_blocks
    return c.causal_mask(q_blocks, kv_blocks)


def sliding_window_layout(num_blocks: int, left: int, right: int = 0) -> np.ndarray:
    """[n, n]: block i keeps blocks j with i - left <= j <= i + right (banded, local attention)."""
    if left < 0 or right < 0:
        raise ValueError(f"window blocks must be >= 0, got left={left}, right={right}")
    d = np.arange(num_blocks)[None, :] - np.arange(num_blocks)[:, None]
    return (d >= -left) & (d <= right)


def strided_layout(num_blocks: int, stride: int, causal: bool = True) -> np.ndarray:
    """[n, n] Sparse Transformer "strided" pattern on blocks ("Generating Long Sequences with Sparse
    Transformers"): block i keeps j when i - j < stride (local part) or (i - j) % stride == 0 (strided part);
    with ``causal`` only j <= i, else the pattern is made symmetric in |i - j|."""
    stride = c.positive_int(stride, "stride")
    d = np.arange(num_blocks)[:, None] - np.arange(num_blocks)[None, :]
    dist = d if causal else np.abs(d)
    keep = (dist >= 0) & ((dist < stride) | (dist % stride == 0))
    return keep


def bigbird_layout(key, heads: int, num_blocks: int, *, num_global: int = 1, window: int = 1,
                   num_random: int = 1) -> jax.Array:
    """[heads, n, n] BigBird-like layout ("Big Bird: Transformers for Longer Sequences"): the first
    ``num_global`` blocks see and are seen by all, a band of ``window`` blocks each side, and ``num_random``
    random key blocks per query block and head drawn from ``key``."""
    band = jnp.asarray(sliding_window_layout(num_blocks, window, window))
    glob = jnp.arange(num_blocks) < num_global
    base = band | glob[None, :] | glob[:, None]
    # Random blocks: the first num_random of a random permutation per (head, query block).
    scores = jax.random.uniform(key, (heads, num_blocks, num_blocks))
    rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    rand = rank < num_random
    return base[None] | rand


def sharded_heads_layout(heads: int, num_blocks: int, *, num_shards: int, local_blocks: int = 1,
                         causal: bool = True) -> np.ndarray:
    """[heads, n, n] per-head heterogeneous layout ("Efficient LLM Training and Serving with Heterogeneous
    Context Sharding among Attention Heads"): head h keeps the key blocks j with j % num_shards ==
    h % num_shards (its shard of the context) plus the ``local_blocks`` most recent blocks; together the
    heads cover the whole context while each head reads only about 1/num_shards of it."""
    num_shards = c.positive_int(num_shards, "num_shards")
    j = np.arange(num_blocks)
    shard = (j[None, :] % num_shards) == (np.arange(heads)[:, None] % num_shards)  # [h, kb]
    d = j[:, None] - j[None, :]  # i - j
    local = (d >= 0) & (d < local_blocks) if causal else np.abs(d) < local_blocks
    keep = shard[:, None, :] | local[None]
    if causal:
        keep &= (d >= 0)[None]
    return keep


def heterogeneous_layout(layouts) -> np.ndarray:
    """Stacks one [qb, kb] layout per head into [heads, qb, kb] (a different pattern per head)."""
    layouts = [np.asarray(x, bool) for x in layouts]
    if len({x.shape for x in layouts}) != 1:
        raise ValueError(f"layouts must all have one shape, got {[x.shape for x in layouts]}")
    return np.stack(layouts)


# --- data-dependent layouts (jnp, traceable) -------------------------------------------------------------


def moba_layout(q, k, block_size: int, top_k: int, *, causal: bool, visible=None) -> jax.Array:
    """[b, h, q_seq, kv_blocks] MoBA selection ("MoBA: Mixture of Block Attention for Long-Context LLMs").

    Gate of query i for block b: q_i . mean(K_b) = mean over j in b of q_i . k_j. With ``visible`` (a boolean
    mask broadcastable to [b, h, q_seq, kv_seq]) the mean runs over the keys query i may see, so hidden keys do
    not steer the routing; a block with no visible key is never picked. causal: blocks after the query's own
    are out, the own block is always picked (it takes one of the top_k slots, as in MoBA) and the remaining
    slots go to the best past blocks. ``top_k`` larger than the number of blocks keeps every candidate.
    Without ``visible`` the gate uses the pooled keys (O(n * kv_blocks) memory, as in the paper); with it, every
    q . k product (O(n^2)), since each query pools its own visible keys.
    """
    b, sq, h, _ = q.shape
    sk, hkv, d = k.shape[1], k.shape[2], k.shape[3]
    nb = sk // block_size
    qf, kf = c.upcast(q, k)
    if visible is None:
        pooled = kf.reshape(b, nb, block_size, hkv, d).mean(2)
        gate = jax.lax.stop_gradient(grouped_logits(qf, pooled, 1.0))  # [b, h, sq, nb]
        has_keys = jnp.ones(gate.shape, bool)
    else:
        dots = jax.lax.stop_gradient(grouped_logits(qf, kf, 1.0)).reshape(b, h, sq, nb, block_size)
        w = jnp.broadcast_to(visible, (b, h, sq, sk)).reshape(b, h, sq, nb, block_size).astype(dots.dtype)
        count = w.sum(-1)
        gate = (dots * w).sum(-1) / jnp.maximum(count, 1.0)
        has_keys = count > 0
    candidate = has_keys
    if causal:
        own = (jnp.arange(sq) + (sk - sq)) // block_size  # block holding query i (bottom-right aligned)
        is_own = jnp.arange(nb)[None, :] == own[:, None]
        is_past = jnp.arange(nb)[None, :] < own[:, None]
        candidate = (candidate & is_past) | is_own  # own block kept even when the mask hides all of it
        gate = jnp.where(is_own, jnp.inf, gate)
    gate = jnp.where(candidate, gate, -jnp.inf)
    _, idx = jax.lax.top_k(gate, min(top_k, nb))
    picked = jnp.any(idx[..., :, None] == jnp.arange(nb), axis=-2)
    # top_k also returns -inf entries when fewer than top_k blocks are candidates: drop those.
    return picked & candidate


def nearest_centroid(x, centroids) -> jax.Array:
    """x [b, s, h, d], centroids [h, C, d] -> cluster ids [b, h, s] by cosine similarity."""
    xn = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
    cn = centroids / (jnp.linalg.norm(centroids, axis=-1, keepdims=True) + 1e-6)
    return jnp.argmax(jnp.einsum("bshd,hcd->bhsc", xn, cn), axis=-1)


def routing_layout(q_clusters, k_clusters, *, include_self: bool = True) -> jax.Array:
    """[b, h, sq, sk]: query i sees key j when they share a cluster (and j == i when ``include_self``)."""
    keep = q_clusters[..., :, None] == k_clusters[..., None, :]
    if include_self:
        keep = keep | jnp.eye(q_clusters.shape[-1], k_clusters.shape[-1], dtype=bool)
    return keep


# --- block layouts and fine masks for the block-sparse kernels (implementation="pallas") ----------------


def diagonal_blocks(q_blocks: int, kv_blocks: int, q_block: int, kv_block: int) -> np.ndarray:
    """[qb, kb]: the blocks holding some pair of equal positions i == j."""
    first_row = np.arange(q_blocks)[:, None] * q_block
    first_col = np.arange(kv_blocks)[None, :] * kv_block
    return (first_col < first_row + q_block) & (first_row < first_col + kv_block)


def routing_block_layout(q_clusters, k_clusters, num_clusters: int, q_block: int, kv_block: int) -> jax.Array:
    """[b, h, qb, kb] blocks of ``routing_layout``: block (I, J) kept iff a query of I and a key of J share a
    cluster, or I and J hold a diagonal pair. Ids outside [0, num_clusters) (padding) match nothing."""
    b, h, sq = q_clusters.shape
    sk = k_clusters.shape[-1]
    present = lambda ids, block: jax.nn.one_hot(ids, num_clusters, dtype=jnp.int32).reshape(
        b, h, ids.shape[-1] // block, block, num_clusters).max(3)  # [b, h, blocks, C]: cluster occurs in block
    shared = jnp.einsum("bhic,bhjc->bhij", present(q_clusters, q_block), present(k_clusters, kv_block)) > 0
    return shared | diagonal_blocks(sq // q_block, sk // kv_block, q_block, kv_block)


def moba_block_layout(picked, q_block: int) -> jax.Array:
    """MoBA selection [b, h, sq, kb] -> [b, h, sq / q_block, kb]: the union over each block's queries."""
    b, h, sq, kb = picked.shape
    return picked.reshape(b, h, sq // q_block, q_block, kb).any(3)


def moba_bits(picked) -> jax.Array:
    """MoBA selection [b, h, sq, kb] -> int32 words [b, h, sq, ceil(kb / 32)]: bit n % 32 of word n // 32
    is set iff the query picked key block n (the kernels' ``key_block_bits``)."""
    kb = picked.shape[-1]
    words = -(-kb // 32)
    picked = jnp.pad(picked, [(0, 0)] * (picked.ndim - 1) + [(0, words * 32 - kb)])
    weights = jnp.left_shift(jnp.uint32(1), jnp.arange(32, dtype=jnp.uint32))
    packed = (picked.reshape(picked.shape[:-1] + (words, 32)).astype(jnp.uint32) * weights).sum(-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(packed, jnp.int32)


def pad_sequence(x, length: int, axis: int, value=0):
    """Pads ``x`` with ``value`` along ``axis`` up to ``length`` (a multiple of the kernels' block)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)
