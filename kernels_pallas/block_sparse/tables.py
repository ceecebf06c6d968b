"""Block layouts compressed into the per-row tables the kernels walk, and the element mask inside a block.

A table row describes one query block (or, for the dk/dv pass, one key block) as int32:
``[count, unmasked_lo, unmasked_hi, block_0, block_1, ..., block_{max-1}, pad...]``: the ``count`` kept
blocks of the other axis in ascending order; entries ``[unmasked_lo, unmasked_hi)`` need no element mask
(wholly visible under causal, and no segment ids), the others do. Entries past ``count`` repeat the last kept
block, so that a TPU pipeline sees an unchanged block index and fetches nothing new. Everything here is jnp
on a traced layout: data-dependent layouts (MoBA top-k, routing clusters) compress under jit.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

HEADER = 3  # count, unmasked_lo, unmasked_hi


def block_visibility(q_blocks, kv_blocks, q_block, kv_block, causal_offset):
    """(any_visible, all_visible) [qb, kb] numpy booleans under the causal rule ``j <= i + offset``."""
    first_row = np.arange(q_blocks)[:, None] * q_block
    last_row = first_row + q_block - 1
    first_col = np.arange(kv_blocks)[None, :] * kv_block
    last_col = first_col + kv_block - 1
    return first_col <= last_row + causal_offset, last_col <= first_row + causal_offset


def width(max_blocks: int) -> int:
    """HEADER + max_blocks rounded up to a power of two (Triton loads power-of-two shapes)."""
    return 1 << (HEADER + max_blocks - 1).bit_length()


def compress(layout, unmasked, max_blocks: int, prefix_unmasked: bool):
    """layout, unmasked [..., rows, cols] boolean -> tables [..., rows, width] int32 (see the module doc).

    ``prefix_unmasked``: the unmasked entries of a row form a prefix of its kept blocks (rows = query blocks
    under causal), else a suffix (rows = key blocks). Rows keeping more than ``max_blocks`` are truncated.
    """
    cols = layout.shape[-1]
    # A stable sort of "not kept" puts the kept columns first, in ascending order.
    order = jnp.argsort(jnp.logical_not(layout).astype(jnp.int8), axis=-1, stable=True).astype(jnp.int32)
    take = min(max_blocks, cols)
    order = order[..., :take]
    count = jnp.minimum(layout.sum(-1, dtype=jnp.int32), take)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    position = lax.broadcasted_iota(jnp.int32, order.shape, order.ndim - 1)
    blocks = jnp.where(position < count[..., None], order, last)
    free = jnp.take_along_axis(unmasked & layout, blocks, axis=-1) & (position < count[..., None])
    n_free = free.sum(-1, dtype=jnp.int32)
    lo = jnp.zeros_like(count) if prefix_unmasked else count - n_free
    hi = n_free if prefix_unmasked else count
    pad = jnp.broadcast_to(last, blocks.shape[:-1] + (width(max_blocks) - HEADER - take,))
    return jnp.concatenate([count[..., None], lo[..., None], hi[..., None], blocks, pad], axis=-1)


def visible(rows, cols, causal_offset, seg_rows=None, seg_cols=None, *, tags=None, bits=None, window=None):
    """Boolean tile: query ``rows`` [m, 1] may see key ``cols`` [1, n] (either may be the transposed pair).

    ``causal_offset`` None means no causal rule. ``tags``: (query tags, key tags) shaped like rows and cols:
    visible iff the tags are equal or the positions are (routing: same cluster, or the query itself).
    ``bits``: (query words, bit): the word of each query (shaped like rows) holding the tile's key block, and
    that block's bit in it (MoBA: the key block is one the query selected). ``window``: ((y % dh, start_y,
    x % dw, start_x) of each query, (y', x') of each key, (kh, kw, dh, dw)): see ``in_window_2d``.
    Every rule present must hold.
    """
    rules = []
    if causal_offset is not None:
        rules.append(cols <= rows + causal_offset)
    if seg_rows is not None:
        rules.append(seg_rows == seg_cols)
    if tags is not None:
        rules.append((tags[0] == tags[1]) | (rows == cols))
    if bits is not None:
        words, bit = bits
        rules.append((jnp.right_shift(words, bit) & 1) == 1)  # arithmetic shift: bit 31 still ends in 1
    if window is not None:
        rules.append(in_window_2d(*window))
    ok = None
    for rule in rules:
        ok = rule if ok is None else ok & rule
    return ok


def in_window_2d(query, key, window):
    """2D neighbourhood rule ("Neighborhood Attention Transformer"; "Dilated Neighborhood Attention
    Transformer"): key (y', x') is in the window of a query with (ry, sy, rx, sx) = (y % dh, start_y, x % dw,
    start_x) iff, on both axes, y' % dh == ry and sy <= y' // dh < sy + kh (``attn.neighborhood_2d``).

    ``query``: the 4 values, each shaped like the tile's rows (or columns); ``key``: (y', x') shaped like the
    other axis; ``window``: static (kh, kw, dh, dw). Positions are non-negative.
    """
    ry, sy, rx, sx = query
    yk, xk = key
    kh, kw, dh, dw = window
    ok = None
    for r, start, pos, kernel, dilation in ((ry, sy, yk, kh, dh), (rx, sx, xk, kw, dw)):
        # lax.div / lax.rem: truncating integer ops (non-negative here); dilation 1 needs neither.
        lattice = pos if dilation == 1 else lax.div(pos, jnp.int32(dilation))
        axis_ok = (lattice >= start) & (lattice < start + kernel)
        if dilation > 1:
            axis_ok = axis_ok & (lax.rem(pos, jnp.int32(dilation)) == r)
        ok = axis_ok if ok is None else ok & axis_ok
    return ok


def two_sided(fine) -> bool:
    """Whether the fine mask has a key-side array too (tags, window2d) or only a query side (bits)."""
    return fine in ("tags", "window2d")


def split_mask_refs(refs, has_segments, fine):
    """A kernel's trailing refs -> (seg_q, seg_k, fine_q, fine_k, remaining refs), None where absent.

    The order is segment ids (q, k), then the fine mask: tags (q, k), window2d (q windows, k positions) or
    bit words (q only).
    """
    refs = list(refs)
    take = lambda present: refs.pop(0) if present else None
    seg_q, seg_k = take(has_segments), take(has_segments)
    fine_q, fine_k = take(fine is not None), take(two_sided(fine))
    return seg_q, seg_k, fine_q, fine_k, refs


def bit_of(first_key, bits_block):
    """(word, bit) of the key block holding key ``first_key`` in a query's bit words (32 blocks a word)."""
    # lax.div / lax.rem: plain truncating integer ops (non-negative here), no floor-division fix-up to lower.
    block = lax.div(first_key, jnp.int32(bits_block))
    return lax.div(block, jnp.int32(32)), lax.rem(block, jnp.int32(32))
