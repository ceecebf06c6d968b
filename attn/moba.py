"""MoBA: mixture of block attention, each query routed to its top-k key blocks."""

from __future__ import annotations

import jax

from attn import _common as c
from attn._block_layouts import attend_with_pattern, expand_layout, moba_bits, moba_block_layout, moba_layout
from attn._registry import register


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    return {"block_size": 4, "top_k": 2}


@register(
    "moba",
    family="sparse",
    complexity="O(n k B d + n^2 d / B)",
    paper="MoBA: Mixture of Block Attention for Long-Context LLMs",
    mask=True,
    segment_ids=True,
    cross=False,
    gqa=True,
    implementations=("xla", "pallas"),
    example_params=_example_params,
    seq_multiple=4,
    exact=True,
)
def moba_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask=None,
    segment_ids=None,
    block_size=64,
    top_k=3,
    implementation: str | None = None,
):
    """Each query attends (exact softmax) to the ``top_k`` key blocks with the largest gate ``q_i . mean(K_b)``.

    causal: only blocks before the query's own compete; its own block is always picked (taking one of the top_k
    slots, as in MoBA) with the causal mask inside it. Non-causal: plain top-k over all blocks. With a ``mask``
    or ``segment_ids`` the block mean runs over the keys the query may see (hidden keys do not steer the gate;
    a block with none is never picked) — our extension, MoBA has no masks. ``top_k`` above the number of
    blocks keeps them all. The "xla" form is the reference: the selection is expanded to a dense element mask;
    "pallas" runs the block-sparse kernel on the selection (``moba_pallas``), exact too.

    Paper: "MoBA: Mixture of Block Attention for Long-Context LLMs".
    """
    c.check_qkv(q, k, v, cross=False)
    implementation = c.check_implementation(implementation, ("xla", "pallas"), "moba")
    causal = c.check_causal(causal, (False, True), "moba")
    if implementation == "pallas":
        if mask is not None:
            raise ValueError("mask is not supported by implementation='pallas'; use causal or segment_ids")
        return moba_pallas(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids, block_size=block_size,
                           top_k=top_k)
    picked = _selection(q, k, causal, mask, segment_ids, block_size, top_k)
    pattern = expand_layout(picked, 1, block_size)
    return attend_with_pattern(q, k, v, pattern, causal=causal, scale=scale, mask=mask, segment_ids=segment_ids)


def _selection(q, k, causal, mask, segment_ids, block_size, top_k):
    """Checked arguments -> each query's selected key blocks [b, h, sq, kv_blocks] (``moba_layout``)."""
    block_size = c.positive_int(block_size, "block_size")
    top_k = c.positive_int(top_k, "top_k")
    c.divides(block_size, k.shape[1], "block_size", "sequence length")
    b, sq, h, _ = q.shape
    if mask is not None:
        mask = c.check_mask(mask, b, h, sq, k.shape[1])
    visible = c.build_mask(q, k, mask=mask, segment_ids=segment_ids)
    return moba_layout(q, k, block_size, top_k, causal=causal, visible=visible)


def moba_pallas(q, k, v, *, causal=False, scale=None, segment_ids=None, block_size=64, top_k=3, tiles=None,
                backend=None, interpret=None):
    """MoBA through the block-sparse Pallas kernel (``implementation="pallas"``), exact.

    Query i's selected key blocks (``moba_layout``) become the kernel's two masks: the layout keeps, for each
    block of ``block_size`` queries, the union of its queries' selections (``moba_block_layout``, built under
    jit), and inside a kept block a bit per key block and query (``moba_bits``, the kernel's
    ``key_block_bits``) keeps only the query's own selection; causal and segment ids apply on top.
    No static bound is passed (a bound would add the kernel's run-time overflow check, a host callback): on
    TPU the grid walks kv_blocks steps per row, those past the row's count fetching and computing nothing.
    ``tiles``: the kernel's tiles (``kernels_pallas.block_sparse.Tiles``), each dividing ``block_size``
    (else ValueError naming the tile); ``backend`` / ``interpret`` as in the kernel (interpret None: on when
    the default device is the CPU).
    """
    from kernels_pallas.block_sparse import block_sparse_attention  # late: the kernels import attn

    c.check_qkv(q, k, v, cross=False)
    picked = _selection(q, k, causal, None, segment_ids, block_size, top_k)  # [b, h, sq, kv_blocks]
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return block_sparse_attention(
        q, k, v, moba_block_layout(picked, block_size), block_size=block_size, causal=causal, scale=scale,
        segment_ids=segment_ids, key_block_bits=moba_bits(picked),
        tiles=tiles, backend=backend, interpret=interpret)
