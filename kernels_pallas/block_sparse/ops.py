"""Public entry: argument checks, layout compression, backend dispatch and the custom VJP."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn import _common as c
from kernels_pallas._common import on_hopper, resolve_backend
from kernels_pallas.block_sparse import tables

MAX_HEAD_DIM = 256
# The Mosaic GPU kernels copy a program's table rows into shared memory, beside 130-165 KiB of tiles at head_dim
# 128 (of 227 KiB); 8192 int32 entries (32 KiB) is what they may take.
MOSAIC_TABLE_ENTRIES = 8192


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Kernel tiles along the sequence (each dividing the layout's block) and the Triton launch knobs.

    A layout block larger than a tile is split into tiles that inherit its keep flag, so the kernels'
    tiles need not be the layout's blocks. ``q``/``k``: forward; ``q_bwd``/``k_bwd``: both backward passes.
    """

    # H100, B4 S8192 H16 D128, 128-blocks: 128x128 forward tiles with 2 stages beat 128x64 with 3 or 4 by
    # 10-18 % at every density (benchmarks/results/block_sparse_h100.md).
    q: int = 128
    k: int = 128
    q_bwd: int = 64
    k_bwd: int = 64
    num_warps: int = 8
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2


@dataclasses.dataclass(frozen=True)
class _Static:
    """What one pass's kernels need that is not an array (hashable: custom_vjp's non-differentiable arg)."""

    scale: float
    causal_offset: int | None  # key j visible from query i iff j <= i + offset; None: no causal rule
    q_block: int  # the kernel's tiles
    kv_block: int
    backend: str
    interpret: Any
    max_row: int  # kept tiles per row (per column) the tables hold: the TPU grid's last axis
    max_col: int
    num_warps: int
    num_stages: int
    fine: str | None = None  # element mask besides causal / segments: None, "tags", "bits" or "window2d"
    bits_block: int = 0  # keys per bit of the "bits" mask (the layout's key block)
    window: tuple[int, int, int, int] | None = None  # (kh, kw, dh, dw) of the "window2d" mask
    mosaic_blocks: Any = None  # sliding_window.mosaic_gpu_forward.MosaicBlocks, for backend "mosaic_gpu"
    mosaic_backward: Any = None  # sliding_window.mosaic_gpu_backward.MosaicBackwardBlocks: Mosaic GPU backward


def _kernels(backend):
    if backend == "triton":
        from kernels_pallas.block_sparse import gpu_backward, gpu_forward

        return gpu_forward.forward, gpu_backward.backward
    if backend == "mosaic_gpu":  # Mosaic GPU forward; the Triton backward reads its base-2 lse
        from kernels_pallas.block_sparse import gpu_backward

        return _mosaic_gpu_forward, gpu_backward.backward
    from kernels_pallas.block_sparse import tpu_backward, tpu_forward

    return tpu_forward.forward, tpu_backward.backward


def _mosaic_gpu_forward(q, k, v, seg_q, seg_k, fine_q, fine_k, row_tables, *, st):
    from kernels_pallas.block_sparse import mosaic_gpu_forward

    del seg_q, seg_k, fine_q, fine_k  # refused by the argument checks
    interpret = st.interpret
    if interpret is True:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        interpret = plgpu.InterpretGPUParams()
    return mosaic_gpu_forward.forward(q, k, v, row_tables, scale=st.scale, causal_offset=st.causal_offset,
                                      blocks=st.mosaic_blocks, interpret=interpret or None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11))
def _attention(q, k, v, seg_q, seg_k, fine_q, fine_k, row_fwd, row_bwd, col_bwd, st_fwd: _Static,
               st_bwd: _Static):
    return _forward(q, k, v, seg_q, seg_k, fine_q, fine_k, row_fwd, row_bwd, col_bwd, st_fwd, st_bwd)[0]


def _forward(q, k, v, seg_q, seg_k, fine_q, fine_k, row_fwd, row_bwd, col_bwd, st_fwd, st_bwd):
    forward, _ = _kernels(st_fwd.backend)
    out, lse = forward(q, k, v, seg_q, seg_k, fine_q, fine_k, row_fwd, st=st_fwd)
    return out, (q, k, v, seg_q, seg_k, fine_q, fine_k, row_bwd, col_bwd, out, lse)


def _backward(st_fwd, st_bwd, residuals, dout):
    q, k, v, seg_q, seg_k, fine_q, fine_k, row_bwd, col_bwd, out, lse = residuals
    _, backward = _kernels(st_bwd.backend)
    # delta_i = sum_j p_ij dp_ij = out_i . dout_i: one elementwise pass, [b, s, h] -> [b, h, s].
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(lse.dtype), dout.astype(lse.dtype))
    if st_bwd.mosaic_backward is not None:  # opt-in: Mosaic GPU dq and dk/dv passes over their own tables
        from kernels_pallas.block_sparse import mosaic_gpu_backward

        dq, dk, dv = mosaic_gpu_backward.backward(
            q, k, v, dout, lse, delta, row_bwd, col_bwd, scale=st_bwd.scale, causal_offset=st_bwd.causal_offset,
            blocks=st_bwd.mosaic_backward, interpret=st_bwd.interpret)
        return dq, dk, dv, None, None, None, None, None, None, None
    dq, dk, dv = backward(q, k, v, seg_q, seg_k, fine_q, fine_k, row_bwd, col_bwd, dout, lse, delta, st=st_bwd)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention.defvjp(_forward, _backward)


def _segment_pair(segment_ids, batch, q_len, kv_len):
    """``segment_ids`` [b, s] or a (q_ids, kv_ids) pair -> int32 (q_ids [b, sq], kv_ids [b, sk]) or Nones."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"segment_ids must be one [batch, seq] array or a (q_ids, kv_ids) pair, "
                             f"got {len(segment_ids)} arrays")
        q_ids, kv_ids = (jnp.asarray(x) for x in segment_ids)
    else:
        q_ids = kv_ids = jnp.asarray(segment_ids)
    for name, ids, length in (("q segment_ids", q_ids, q_len), ("kv segment_ids", kv_ids, kv_len)):
        if ids.shape != (batch, length) or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array of shape [batch, seq] = {(batch, length)}, "
                             f"got {ids.dtype} {ids.shape}")
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def _window2d(window2d, q_len, kv_len):
    """``window2d`` -> (q_window [4, sq], k_pos [2, sk] int32, static (kh, kw, dh, dw))."""
    if not isinstance(window2d, (tuple, list)) or len(window2d) != 3:
        raise ValueError("window2d must be a triple (q_window [q_seq, 4], k_pos [kv_seq, 2], "
                         "(kernel_h, kernel_w, dilation_h, dilation_w))")
    arrays = []
    for name, x, shape in (("q_window", window2d[0], (q_len, 4)), ("k_pos", window2d[1], (kv_len, 2))):
        x = jnp.asarray(x)
        if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"window2d: {name} must be an integer array of shape {shape}, got {x.dtype} {x.shape}")
        arrays.append(jnp.swapaxes(x.astype(jnp.int32), 0, 1))  # component-major: a tile's tokens contiguous
    sizes = window2d[2]
    if not isinstance(sizes, (tuple, list)) or len(sizes) != 4:
        raise ValueError(f"window2d: the third entry must be (kernel_h, kernel_w, dilation_h, dilation_w), "
                         f"got {sizes!r}")
    sizes = tuple(c.positive_int(x, "window2d kernel and dilation sizes") for x in sizes)
    return arrays[0], arrays[1], sizes


def _fine_mask(tags, key_block_bits, window2d, batch, heads, q_len, kv_len, kv_blocks):
    """``tags`` / ``key_block_bits`` / ``window2d`` -> (kind, fine_q, fine_k, window) in the kernels' layout
    (see gpu_forward); window: the static (kh, kw, dh, dw) of window2d, else None."""
    given = [name for name, x in (("tags", tags), ("key_block_bits", key_block_bits), ("window2d", window2d))
             if x is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of tags, key_block_bits and window2d, got {' and '.join(given)}")
    if window2d is not None:
        return ("window2d",) + _window2d(window2d, q_len, kv_len)
    if tags is not None:
        if not isinstance(tags, (tuple, list)) or len(tags) != 2:
            raise ValueError("tags must be a pair (q_tags [batch, heads, q_seq], k_tags [batch, heads, kv_seq])")
        pair = []
        for name, x, length in (("q_tags", tags[0], q_len), ("k_tags", tags[1], kv_len)):
            x = jnp.asarray(x)
            if x.shape != (batch, heads, length) or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"tags: {name} must be an integer array of shape [batch, heads, seq] = "
                                 f"{(batch, heads, length)}, got {x.dtype} {x.shape}")
            pair.append(x.astype(jnp.int32))
        return "tags", pair[0], pair[1], None
    if key_block_bits is not None:
        bits = jnp.asarray(key_block_bits)
        words = -(-kv_blocks // 32)
        if bits.shape != (batch, heads, q_len, words) or bits.dtype != jnp.int32:
            raise ValueError(f"key_block_bits must be int32 of shape [batch, heads, q_seq, ceil(kv_blocks / 32)] "
                             f"= {(batch, heads, q_len, words)}, got {bits.dtype} {bits.shape}")
        return "bits", jnp.swapaxes(bits, -1, -2), None, None  # [b, h, words, sq]: a tile's queries contiguous
    return None, None, None, None


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)  # numpy, or a jax array outside any trace


def _overflow_message(actual, name, value):
    return f"the layout keeps up to {actual} blocks in a row, more than {name}={value}"


def _raise_if_over(actual, name, value):
    """Host side of the run-time check of a traced layout (``jax.debug.callback``)."""
    actual = int(np.max(actual))  # an array of counts under vmap
    if actual > value:
        raise ValueError(_overflow_message(actual, name, value))


def _max_blocks(value, name, layout, axis, full):
    """Static bound on kept blocks per row (axis=-1) or column (axis=-2).

    A concrete layout is checked now (ValueError at trace time). A traced one over an explicit bound would
    lose blocks in the tables, so it is checked when the program runs: one reduction over the layout and a
    host callback that raises the same ValueError (surfacing as a runtime error of the jitted call).
    """
    concrete = _is_concrete(layout)
    actual = int(np.asarray(layout).sum(axis).max(initial=0)) if concrete else None
    if value is None:
        return max(actual, 1) if concrete else full
    value = c.positive_int(value, name)
    if concrete and actual > value:
        raise ValueError(_overflow_message(actual, name, value))
    if not concrete and value < full:  # a bound of every block cannot overflow
        actual = jnp.max(jnp.sum(layout, axis, dtype=jnp.int32))
        jax.debug.callback(functools.partial(_raise_if_over, name=name, value=value), actual)
    return min(value, full)


def block_tables(layout, *, q_tile, kv_tile, repeat_q, repeat_kv, causal_offset, element_mask, heads,
                 max_row, columns):
    """Layout [b|1, h|1, qb, kb] (blocks of repeat_q x q_tile by repeat_kv x kv_tile) -> row tables
    [b|1, heads, q_tiles, w] and max kept tiles per row, plus (with ``columns``) column tables and their max.

    ``max_row`` bounds kept blocks per row of the layout; the tables are over tiles. ``element_mask``
    (segment ids, tags or bits): every kept tile needs the element mask.
    """
    xp = np if isinstance(layout, np.ndarray) else jnp  # numpy keeps a concrete layout concrete under jit
    layout = xp.repeat(xp.repeat(layout, repeat_q, axis=-2), repeat_kv, axis=-1)
    qt, kt = layout.shape[-2:]
    any_visible, all_visible = tables.block_visibility(qt, kt, q_tile, kv_tile,
                                                       0 if causal_offset is None else causal_offset)
    if causal_offset is None:
        any_visible, all_visible = np.ones_like(any_visible), np.ones_like(all_visible)
    if element_mask:
        all_visible = np.zeros_like(all_visible)
    layout = xp.broadcast_to(layout, layout.shape[:1] + (heads, qt, kt)) & any_visible
    max_row = min(max_row * repeat_kv, kt)
    # A concrete layout gives concrete tables, even under jit: constants of the program, not work in it.
    concrete = contextlib.nullcontext if xp is jnp else jax.ensure_compile_time_eval
    with concrete():
        rows = tables.compress(jnp.asarray(layout), all_visible, max_row, prefix_unmasked=True)
    if not columns:
        return rows, max_row
    max_col = _max_blocks(None, "", layout, -2, qt)
    with concrete():
        cols = tables.compress(jnp.swapaxes(jnp.asarray(layout), -1, -2), all_visible.T, max_col,
                               prefix_unmasked=False)
    return rows, max_row, cols, max_col


def _tile(tile, block, name):
    tile = min(c.positive_int(tile, f"tiles.{name}"), block)
    if block % tile:
        raise ValueError(f"tiles.{name} ({tile}) must divide the block size ({block})")
    return tile


def _mosaic_gpu_fits(dtype, head_dim, segment_ids, fine, q_block, kv_block, q_len, kv_len, groups) -> bool:
    """Whether backend=None takes the Mosaic GPU build (forward and backward): on a Hopper GPU, for what it
    supports, with blocks that its default tiles divide and table rows that fit in shared memory even with every
    block kept. H200, B4 S8192 H16 D128 bf16: forward+backward 1.06-1.20x flex_attention where the Triton build
    reached 0.84-0.93x (``benchmarks/results/check_block_sparse_mgpu_h200.txt``)."""
    from kernels_pallas.block_sparse import mosaic_gpu_backward, mosaic_gpu_forward

    if not on_hopper() or segment_ids is not None or fine is not None or head_dim > 128:
        return False
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    fwd, bwd = mosaic_gpu_forward.DEFAULT_BLOCKS, mosaic_gpu_backward.DEFAULT_BACKWARD_BLOCKS
    if q_block % max(fwd.rows_per_program, bwd.rows_per_program) or kv_block % max(fwd.block_k,
                                                                                   bwd.keys_per_program):
        return False
    return _mosaic_table_entries(tables.width(kv_len // bwd.block_k), tables.width(q_len // bwd.block_q),
                                 groups) <= MOSAIC_TABLE_ENTRIES


def _mosaic_table_entries(row_width, col_width, groups) -> int:
    """int32 entries of shared memory that the Mosaic GPU programs take for their table rows: one row (forward,
    dq) or one column per query head of the GQA group (dk/dv)."""
    return max(row_width, col_width * groups)


def _mosaic_gpu_blocks(mosaic_blocks, mosaic_gpu, dtype, head_dim, segment_ids, fine, q_block, kv_block):
    """The Mosaic GPU forward's tiles (None for the other backends), after its argument checks: its row tables
    are over tiles of ``rows_per_program`` queries by ``block_k`` keys, which must divide the layout's blocks."""
    if not mosaic_gpu:
        if mosaic_blocks is not None:
            raise ValueError("mosaic_blocks is only used with backend='mosaic_gpu'")
        return None
    from kernels_pallas.block_sparse import mosaic_gpu_forward
    from kernels_pallas.sliding_window.mosaic_gpu_forward import resolve_blocks

    mosaic_gpu_forward.check_supported(dtype, head_dim, segment_ids, fine)
    mosaic_blocks = resolve_blocks(mosaic_blocks, mosaic_gpu_forward.DEFAULT_BLOCKS)
    rows, keys = mosaic_blocks.rows_per_program, mosaic_blocks.block_k
    if q_block % rows or kv_block % keys:
        raise ValueError(f"backend='mosaic_gpu' needs block_size ({q_block}, {kv_block}) to be multiples of "
                         f"mosaic_blocks' {rows} rows per program (block_q x compute_wgs) and block_k={keys}")
    return mosaic_blocks


def _mosaic_backward_blocks(mosaic_backward, mosaic_gpu, q_block, kv_block):
    """The Mosaic GPU backward's tiles, or None for the Triton backward. None (the default) takes the Mosaic
    backward wherever the forward is the Mosaic GPU one."""
    if mosaic_backward is False or (mosaic_backward is None and not mosaic_gpu):
        return None
    if not mosaic_gpu:
        raise ValueError("mosaic_backward needs backend='mosaic_gpu' (or None picking it on a Hopper GPU)")
    from kernels_pallas.block_sparse import mosaic_gpu_backward
    from kernels_pallas.sliding_window.mosaic_gpu_backward import resolve_blocks

    mosaic_backward = resolve_blocks(mosaic_backward, mosaic_gpu_backward.DEFAULT_BACKWARD_BLOCKS)
    if not mosaic_backward.mosaic_dq:
        raise ValueError("mosaic_backward.mosaic_dq=False (a Triton dq pass) is not supported for block_sparse")
    rows, keys = mosaic_backward.rows_per_program, mosaic_backward.keys_per_program
    if q_block % rows or kv_block % keys:
        raise ValueError(f"mosaic_backward needs block_size ({q_block}, {kv_block}) to be multiples of its {rows} "
                         f"query rows (block_q x compute_wgs) and {keys} keys (block_k x compute_wgs) per program; "
                         "mosaic_backward=False takes the Triton backward")
    return mosaic_backward


def block_sparse_attention(
    q,
    k,
    v,
    layout,
    *,
    block_size,
    causal: bool = False,
    scale: float | None = None,
    segment_ids=None,
    tags=None,
    key_block_bits=None,
    window2d=None,
    max_blocks_per_row: int | None = None,
    tiles: Tiles | None = None,
    backend: str | None = None,
    interpret=False,
    mosaic_blocks=None,
    mosaic_backward=None,
):
    """Softmax attention restricted to the kept (query block, key block) pairs of a boolean ``layout``.

    ``layout``: [q_blocks, kv_blocks], [heads, ...] or [batch, heads, ...], a concrete or traced boolean array;
    ``block_size``: int or (q_block, kv_block), dividing the sequence lengths.
    ``causal`` (bottom-right aligned) and ``segment_ids`` (one [batch, seq] array or a (q_ids, kv_ids) pair)
    mask single elements inside the kept blocks, and so may one fine mask, for masks finer than blocks
    whose dense form would cost O(n^2):
    ``tags``: (q_tags [b, h, sq], k_tags [b, h, sk]) integers (per query head, also under GQA): query i sees
    key j iff q_tags[i] == k_tags[j] or i == j (routing attention: same cluster, or itself);
    ``key_block_bits``: int32 [b, h, sq, ceil(kv_blocks / 32)]: query i sees the keys of key block n iff bit
    n % 32 of its word n // 32 is set (MoBA: the blocks the query selected);
    ``window2d``: (q_window int [q_seq, 4], k_pos int [kv_seq, 2], (kh, kw, dh, dw) static ints), shared by
    batch and heads: query i with q_window[i] = (y % dh, start_y, x % dw, start_x) sees key j at
    k_pos[j] = (y', x') iff on both axes y' % dh == y % dh and start_y <= y' // dh < start_y + kh
    (2D neighbourhood attention, ``attn.neighborhood_2d``; positions non-negative).
    The layout must keep every block holding a visible pair. A query that sees no key gives zeros.
    ``max_blocks_per_row``: static bound on kept key blocks per query block; None takes the layout's own when
    it is concrete, else all key blocks. A concrete layout over the bound raises ValueError when traced; a
    traced one (under jit) is checked when it runs (one reduction and a host callback), and the call fails
    with a runtime error carrying that ValueError's message (max_blocks_per_row and the actual count).
    ``tiles``: kernel tiles and launch settings (``Tiles``); None: the layout's blocks in interpret mode and on
    TPU, ``Tiles()`` capped by the blocks on GPU.
    Layout [batch, seq, heads, head_dim]; k/v may have fewer heads (GQA/MQA), never repeated in memory.
    ``backend``: "triton" (GPU), "mosaic_tpu" (TPU), "mosaic_gpu" (Hopper: Mosaic GPU forward and backward;
    bf16/fp16, head_dim <= 128, causal but no segment ids, tags, key_block_bits or window2d; tiles from
    ``mosaic_blocks``, a ``sliding_window.mosaic_gpu_forward.MosaicBlocks`` whose rows per program and block_k
    divide the blocks; table rows of at most ``MOSAIC_TABLE_ENTRIES``) or None (from the default device:
    "mosaic_gpu" on a Hopper GPU where it applies with its default tiles (blocks multiples of 128) and even a
    full layout's tables fit, else "triton" on a GPU, "mosaic_tpu" on a TPU).
    ``mosaic_backward``: with the Mosaic GPU forward, None (default) or True takes the Mosaic GPU dq and dk/dv
    passes with their default tiles, a ``sliding_window.mosaic_gpu_backward.MosaicBackwardBlocks`` with those;
    False: the Triton backward.
    ``interpret=True`` runs Pallas' interpreter (on the CPU; for the TPU kernel it may be a
    ``pltpu.InterpretParams``).

    Papers: "Flex Attention: A Programming Model for Generating Optimized Attention Kernels";
    "Generating Long Sequences with Sparse Transformers"; for window2d "Neighborhood Attention Transformer".
    """
    from attn.block_sparse import check_layout, resolve_block_size  # late: attn imports this lazily too

    c.check_qkv(q, k, v, cross=True, gqa=True, same_v_dim=True)
    if q.dtype == jnp.float64 and not interpret:
        raise ValueError("q, k, v in float64 are only supported with interpret=True; use float32 or lower")
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {head_dim}")
    q_block, kv_block = resolve_block_size(block_size)
    c.divides(q_block, q_len, "block_size", "q sequence length")
    c.divides(kv_block, kv_len, "block_size", "kv sequence length")
    if layout is None:
        raise ValueError("layout (boolean [q_blocks, kv_blocks] block layout) is required")
    given = layout
    layout = check_layout(layout, batch, heads, q_len // q_block, kv_len // kv_block)
    if _is_concrete(given):  # numpy from here on, so that bounds stay checkable under jit
        layout = np.asarray(given).reshape(layout.shape)
    scale = float(c.default_scale(scale, head_dim))
    if not scale > 0:  # the kernels take row maxima of raw products, then scale: needs scale > 0
        raise ValueError(f"scale must be positive or None, got {scale!r}")
    causal = c.check_causal(causal, (False, True), "block_sparse")
    seg_q, seg_k = _segment_pair(segment_ids, batch, q_len, kv_len)
    fine, fine_q, fine_k, window = _fine_mask(tags, key_block_bits, window2d, batch, heads, q_len, kv_len,
                                              kv_len // kv_block)
    mosaic_gpu = backend == "mosaic_gpu" or (
        backend is None and not interpret and _mosaic_gpu_fits(q.dtype, head_dim, seg_q, fine, q_block, kv_block,
                                                               q_len, kv_len, heads // k.shape[2]))
    backend = "triton" if mosaic_gpu else resolve_backend(backend, interpret)  # Triton: the backward
    mosaic_gpu_blocks = _mosaic_gpu_blocks(mosaic_blocks, mosaic_gpu, q.dtype, head_dim, seg_q, fine, q_block,
                                           kv_block)
    mosaic_bwd_blocks = _mosaic_backward_blocks(mosaic_backward, mosaic_gpu, q_block, kv_block)
    if backend == "mosaic_tpu" and interpret is True:
        from jax.experimental.pallas import tpu as pltpu

        interpret = pltpu.InterpretParams()
    if tiles is None:
        gpu = backend == "triton" and not interpret
        tiles = Tiles() if gpu else Tiles(q_block, kv_block, q_block, kv_block)
    if not isinstance(tiles, Tiles):
        raise ValueError(f"tiles must be a Tiles or None, got {type(tiles).__name__}")
    tq, tk = _tile(tiles.q, q_block, "q"), _tile(tiles.k, kv_block, "k")
    tq_bwd, tk_bwd = _tile(tiles.q_bwd, q_block, "q_bwd"), _tile(tiles.k_bwd, kv_block, "k_bwd")
    if not interpret and backend == "triton":
        for size in (tq, tk, tq_bwd, tk_bwd):
            if size < 16 or size & (size - 1):
                raise ValueError(f"block_size and tiles must be powers of two >= 16 for the GPU kernel, got {size}")

    # The static bound is checked on the layout's own blocks, before they are split into tiles.
    kv_blocks = kv_len // kv_block
    causal_offset = kv_len - q_len if causal else None
    visible_blocks, _ = tables.block_visibility(q_len // q_block, kv_blocks, q_block, kv_block,
                                                0 if causal_offset is None else causal_offset)
    kept = layout & visible_blocks if causal else layout
    max_row = _max_blocks(max_blocks_per_row, "max_blocks_per_row", kept, -1, kv_blocks)
    common = dict(causal_offset=causal_offset, element_mask=seg_q is not None or fine is not None, heads=heads,
                  max_row=max_row)
    if mosaic_gpu_blocks is not None:  # its row tables are over its own tiles
        tq, tk = mosaic_gpu_blocks.rows_per_program, mosaic_gpu_blocks.block_k
    row_fwd, max_row_fwd = block_tables(layout, q_tile=tq, kv_tile=tk, repeat_q=q_block // tq,
                                        repeat_kv=kv_block // tk, columns=False, **common)
    if mosaic_bwd_blocks is None:
        row_bwd, max_row_bwd, col_bwd, max_col_bwd = block_tables(
            layout, q_tile=tq_bwd, kv_tile=tk_bwd, repeat_q=q_block // tq_bwd, repeat_kv=kv_block // tk_bwd,
            columns=True, **common)
    else:  # dq: rows over its super-tiles of queries; dk/dv: columns over its super-tiles of keys
        rows_q, keys = mosaic_bwd_blocks.rows_per_program, mosaic_bwd_blocks.keys_per_program
        tq_bwd, tk_bwd = mosaic_bwd_blocks.block_q, mosaic_bwd_blocks.block_k
        row_bwd, max_row_bwd = block_tables(layout, q_tile=rows_q, kv_tile=tk_bwd, repeat_q=q_block // rows_q,
                                            repeat_kv=kv_block // tk_bwd, columns=False, **common)
        _, _, col_bwd, max_col_bwd = block_tables(layout, q_tile=tq_bwd, kv_tile=keys, repeat_q=q_block // tq_bwd,
                                                  repeat_kv=kv_block // keys, columns=True, **common)

    if mosaic_gpu:  # the Triton backward reads its tables from global memory
        mosaic_bwd = mosaic_bwd_blocks is not None
        entries = _mosaic_table_entries(max(row_fwd.shape[-1], row_bwd.shape[-1] if mosaic_bwd else 0),
                                        col_bwd.shape[-1] if mosaic_bwd else 0, heads // k.shape[2])
        if entries > MOSAIC_TABLE_ENTRIES:
            raise ValueError(f"backend='mosaic_gpu': the block tables take {entries} int32 entries of shared memory "
                             f"per program, more than {MOSAIC_TABLE_ENTRIES}; keep fewer blocks per row or column "
                             "(max_blocks_per_row, a shorter sequence, fewer query heads per kv head) or use "
                             "backend='triton'")

    # Triton loads power-of-two shapes: pad head_dim with zeros (changes no product); the Mosaic forward's
    # 128-byte swizzled rows take 64 or 128 columns.
    dim_pad = max(16, 1 << (head_dim - 1).bit_length()) if backend == "triton" else head_dim
    if mosaic_gpu_blocks is not None:
        dim_pad = max(64, dim_pad)
    if dim_pad != head_dim:
        pad = ((0, 0), (0, 0), (0, 0), (0, dim_pad - head_dim))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    st_fwd = _Static(scale, causal_offset, tq, tk, "mosaic_gpu" if mosaic_gpu else backend, interpret, max_row_fwd,
                     0, tiles.num_warps, tiles.num_stages, fine, kv_block, window, mosaic_gpu_blocks)
    st_bwd = _Static(scale, causal_offset, tq_bwd, tk_bwd, backend, interpret, max_row_bwd, max_col_bwd,
                     tiles.num_warps_bwd, tiles.num_stages_bwd, fine, kv_block, window,
                     mosaic_backward=mosaic_bwd_blocks)
    out = _attention(q, k, v, seg_q, seg_k, fine_q, fine_k, row_fwd, row_bwd, col_bwd, st_fwd, st_bwd)
    return out[..., :head_dim]
