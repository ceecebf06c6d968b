"""Block-sparse softmax attention from a boolean block layout, plus the layout builders."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import _common as c
from attn._block_layouts import (  # layout builders are public through this module
    attend_with_pattern,
    bigbird_layout,
    causal_layout,
    expand_layout,
    heterogeneous_layout,
    moba_layout,
    nearest_centroid,
    routing_layout,
    sharded_heads_layout,
    sliding_window_layout,
    strided_layout,
)
from attn._registry import register

__all__ = [
    "block_sparse_attention", "bigbird_layout", "causal_layout", "check_layout", "expand_layout",
    "heterogeneous_layout", "moba_layout", "nearest_centroid", "resolve_block_size", "routing_layout",
    "sharded_heads_layout", "sliding_window_layout", "strided_layout",
]


def resolve_block_size(block_size) -> tuple[int, int]:
    """``block_size`` int or (q_block, kv_block) -> pair of positive ints."""
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a pair (q_block, kv_block), got {block_size!r}")
        return c.positive_int(block_size[0], "block_size"), c.positive_int(block_size[1], "block_size")
    size = c.positive_int(block_size, "block_size")
    return size, size


def check_layout(layout, batch: int, heads: int, q_blocks: int, kv_blocks: int) -> jax.Array:
    """Layout [qb, kb], [heads, qb, kb] or [batch, heads, qb, kb] (boolean; in rank 4, batch and heads may be 1
    to broadcast) -> rank 4 array [batch|1, heads|1, qb, kb]."""
    layout = jnp.asarray(layout)
    if layout.dtype != jnp.bool_:
        raise ValueError(f"layout must be boolean (True = keep the block), got dtype {layout.dtype}")
    shapes = [(q_blocks, kv_blocks), (heads, q_blocks, kv_blocks)]
    rank4 = (layout.ndim == 4 and layout.shape[0] in (1, batch) and layout.shape[1] in (1, heads)
             and layout.shape[2:] == (q_blocks, kv_blocks))
    if layout.shape not in shapes and not rank4:
        raise ValueError(f"layout must have shape [q_blocks, kv_blocks] = {shapes[0]}, [heads, ...] = "
                         f"{shapes[1]} or [batch|1, heads|1, ...] = {(batch, heads, q_blocks, kv_blocks)}, got "
                         f"{layout.shape}")
    return layout.reshape((1,) * (4 - layout.ndim) + layout.shape)


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    block = 4
    heads, qb, kb = q_shape[2], q_shape[1] // block, kv_shape[1] // block
    # A different random pattern per head; the diagonal block stays, so most rows keep some keys.
    layout = jax.random.bernoulli(key, 0.5, (heads, qb, kb))
    diag = jnp.arange(kb)[None, :] == jnp.minimum(jnp.arange(qb), kb - 1)[:, None]
    return {"layout": layout | diag, "block_size": block}


@register(
    "block_sparse",
    family="sparse",
    complexity="O(n^2 d ρ)",
    paper=(
        "Flex Attention: A Programming Model for Generating Optimized Attention Kernels; "
        "Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention Heads"
    ),
    mask=True,
    segment_ids=True,
    cross=True,
    gqa=True,
    implementations=("xla", "pallas"),
    example_params=_example_params,
    seq_multiple=4,
    exact=True,
)
def block_sparse_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask=None,
    segment_ids=None,
    layout=None,
    block_size=64,
    implementation: str | None = None,
):
    """Softmax attention restricted to the kept (query block, key block) pairs of a boolean ``layout``.

    ``layout`` is [q_blocks, kv_blocks], [heads, q_blocks, kv_blocks] (a pattern per head, as in heterogeneous
    context sharding) or [batch, heads, q_blocks, kv_blocks]; ``block_size`` an int or (q_block, kv_block)
    dividing the sequence lengths. ``causal``, ``mask`` and ``segment_ids`` further restrict single elements.
    A query whose kept blocks hold no visible key gives zeros. The "xla" form is the reference: the layout is
    expanded to a dense element mask (O(n^2) memory); builders for common layouts live in this module.

    Paper: "Flex Attention: A Programming Model for Generating Optimized Attention Kernels" (block masks) and
    "Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention Heads".
    """
    c.check_qkv(q, k, v)
    implementation = c.check_implementation(implementation, ("xla", "pallas"), "block_sparse")
    causal = c.check_causal(causal, (False, True), "block_sparse")
    q_block, kv_block = resolve_block_size(block_size)
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    c.divides(q_block, sq, "block_size", "q sequence length")
    c.divides(kv_block, sk, "block_size", "kv sequence length")
    if layout is None:
        raise ValueError("layout (boolean [q_blocks, kv_blocks] block layout) is required for block_sparse")
    layout = check_layout(layout, b, h, sq // q_block, sk // kv_block)
    if implementation == "pallas":  # the Pallas kernels; on a CPU through Pallas' interpreter
        from kernels_pallas.block_sparse import block_sparse_attention as kernel

        if mask is not None:
            raise ValueError("mask is not supported by implementation='pallas'; use causal, segment_ids or layout")
        return kernel(q, k, v, layout, block_size=(q_block, kv_block), causal=causal, scale=scale,
                      segment_ids=segment_ids, interpret=jax.default_backend() == "cpu")
    pattern = expand_layout(layout, q_block, kv_block)
    return attend_with_pattern(q, k, v, pattern, causal=causal, scale=scale, mask=mask, segment_ids=segment_ids)
