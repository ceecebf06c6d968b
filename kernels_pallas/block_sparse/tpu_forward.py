"""Forward pass on TPU (Pallas, Mosaic TPU backend).

TPU kernels see one tile per grid step, fetched by the pipeline from the BlockSpecs, so the walk over kept
blocks lives in the grid: the last axis counts the entries of a row table (its static maximum), and the index
map reads the key block of each step from the tables, prefetched into SMEM. Steps past a row's count repeat
its last block (no new fetch) and skip their work. The online-softmax state lives in VMEM scratch across
the steps. Tiles are [heads-first, seq, head_dim] so that (seq, head_dim) are the (sublane, lane) axes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.block_sparse import tables
from kernels_pallas.sliding_window.band import PAD_LSE, mask_value
from kernels_pallas.sliding_window.tpu_forward import LOG2E, dot, segment_specs, to_heads_first


def table_entry(table_ref, row, position, *, width):
    """Entry ``position`` of table row ``row`` (flat index of the row) in the flattened tables."""
    return table_ref[row * width + position]


def fine_specs(fine_q, fine_k, st, bq, bk, kv_block):
    """The fine mask's arrays and BlockSpecs for a (batch, head, query tile, step) grid whose key tile is
    ``kv_block(*grid indices, table)``: query tags or words as a column [bq, 1], key tags as a row [1, bk];
    window2d: the query windows as columns [bq, 4] (from [4, sq]), the key positions as rows [2, bk]."""
    if st.fine == "tags":
        return [fine_q[..., None], fine_k[:, :, None, :]], [
            pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j, table: (bi, hi, i, 0)),
            pl.BlockSpec((None, None, 1, bk), lambda bi, hi, i, j, table: (bi, hi, 0, kv_block(bi, hi, i, j, table)))]
    if st.fine == "window2d":
        return [fine_q.T, fine_k], [
            pl.BlockSpec((bq, 4), lambda bi, hi, i, j, table: (i, 0)),
            pl.BlockSpec((2, bk), lambda bi, hi, i, j, table: (0, kv_block(bi, hi, i, j, table)))]
    if st.fine == "bits":  # only the word holding the key tile's block
        word = lambda bi, hi, i, j, table: tables.bit_of(kv_block(bi, hi, i, j, table) * bk, st.bits_block)[0]
        return [fine_q[..., None]], [pl.BlockSpec(
            (None, None, None, bq, 1), lambda bi, hi, i, j, table: (bi, hi, word(bi, hi, i, j, table), i, 0))]
    return [], []


def fine_args(fine, fine_q_ref, fine_k_ref, first_key, bits_block, window, keys_first=False):
    """``tables.visible``'s tags / bits / window from the fine-mask tiles (either orientation).

    window2d: [queries, keys] tiles (``keys_first`` False) get the query windows [bq, 4] and the key
    positions [2, bk]; [keys, queries] tiles get them transposed, [4, bq] and [bk, 2]. Each value is sliced
    to a column or a row along the tile's own axis.
    """
    if fine == "tags":
        return {"tags": (fine_q_ref[...], fine_k_ref[...])}
    if fine == "bits":
        return {"bits": (fine_q_ref[...], tables.bit_of(first_key, bits_block)[1])}
    if fine == "window2d":
        rows = lambda ref, n: tuple(ref[i:i + 1, :] for i in range(n))
        cols = lambda ref, n: tuple(ref[:, i:i + 1] for i in range(n))
        if keys_first:
            return {"window": (rows(fine_q_ref, 4), cols(fine_k_ref, 2), window)}
        return {"window": (cols(fine_q_ref, 4), rows(fine_k_ref, 2), window)}
    return {}


def _forward_kernel(table_ref, q_ref, k_ref, v_ref, *rest, scale, causal_offset, block_k, n_steps, row_of,
                    width, has_segments, fine, bits_block, window):
    seg_q_ref, seg_k_ref, fine_q_ref, fine_k_ref, (o_ref, lse_ref, acc_ref, m_ref, l_ref) = (
        tables.split_mask_refs(rest, has_segments, fine))
    block_q = q_ref.shape[0]
    bi, hi, i, j = (pl.program_id(a) for a in range(4))
    row = row_of(bi, hi, i)
    count, lo, hi_ = (table_entry(table_ref, row, n, width=width) for n in range(tables.HEADER))
    kb = table_entry(table_ref, row, tables.HEADER + j, width=width)
    c = scale * LOG2E

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)

    def step(masked):
        s = dot(q_ref[...], k_ref[...], trans_b=True)
        if masked:
            rows = i * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
            cols = kb * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            seg_q = seg_q_ref[...] if has_segments else None
            seg_k = seg_k_ref[...] if has_segments else None
            ok = tables.visible(rows, cols, causal_offset, seg_q, seg_k,
                                **fine_args(fine, fine_q_ref, fine_k_ref, kb * block_k, bits_block, window))
            s = jnp.where(ok, s, mask_value(c))
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True) * c)
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s * c - m_new)
        if masked:  # a row that has seen only masked keys so far would otherwise count exp2(0) = 1 for them
            p = jnp.where(ok, p, 0.0)
        l_ref[...] = l_ref[...] * alpha + p.sum(axis=1, keepdims=True)
        acc_ref[...] = acc_ref[...] * alpha + dot(p.astype(v_ref.dtype), v_ref[...]).astype(acc_ref.dtype)
        m_ref[...] = m_new

    unmasked = (j >= lo) & (j < hi_)
    if causal_offset is not None or has_segments or fine is not None:
        pl.when((j < count) & jnp.logical_not(unmasked))(functools.partial(step, True))
    pl.when((j < count) & unmasked)(functools.partial(step, False))

    @pl.when(j == n_steps - 1)
    def _finish():
        l = l_ref[...]
        empty = l == 0  # no kept block, or every key of them masked: zeros out, p = 0 in the backward
        o_ref[...] = (acc_ref[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        lse = m_ref[...] + jnp.log2(jnp.where(empty, 1.0, l))
        lse_ref[...] = jnp.where(empty, PAD_LSE, lse).astype(lse_ref.dtype)


def flat_row(per_batch, heads, rows):
    """(batch, head, row) -> flat row index into tables [b|1, heads, rows, width]."""
    return lambda bi, hi, r: ((bi if per_batch else 0) * heads + hi) * rows + r


def forward(q, k, v, seg_q, seg_k, fine_q, fine_k, row_tables, *, st):
    """Same contract as ``gpu_forward.forward``."""
    q, k, v = to_heads_first(q), to_heads_first(k), to_heads_first(v)
    b, h, sq, d = q.shape
    groups = h // k.shape[1]
    bq, bk = st.q_block, st.kv_block
    has_segments = seg_q is not None
    width = row_tables.shape[-1]
    n_steps = max(st.max_row, 1)
    row_of = flat_row(row_tables.shape[0] > 1, h, sq // bq)

    def kv_block(bi, hi, i, j, table):
        return table_entry(table, row_of(bi, hi, i), tables.HEADER + j, width=width)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, table: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda bi, hi, i, j, table: (bi, hi // groups, kv_block(bi, hi, i, j, table), 0))
    in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
    if has_segments:
        seg_args, seg_specs = segment_specs(
            seg_q, bq, bk, lambda bi, hi, i, j, table: (bi, i, 0),
            lambda bi, hi, i, j, table: (bi, 0, kv_block(bi, hi, i, j, table)))
        seg_args[1] = seg_k[:, None, :]
        in_specs, args = in_specs + seg_specs, args + seg_args
    extra_args, extra_specs = fine_specs(fine_q, fine_k, st, bq, bk, kv_block)
    in_specs, args = in_specs + extra_specs, args + extra_args
    acc_dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    kernel = functools.partial(
        _forward_kernel, scale=st.scale, causal_offset=st.causal_offset, block_k=bk, n_steps=n_steps,
        row_of=row_of, width=width, has_segments=has_segments, fine=st.fine, bits_block=st.bits_block,
        window=st.window,
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h, sq // bq, n_steps),
            in_specs=in_specs,
            out_specs=[q_spec, pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j, table: (bi, hi, i, 0))],
            scratch_shapes=[pltpu.VMEM((bq, d), acc_dtype), pltpu.VMEM((bq, 1), acc_dtype),
                            pltpu.VMEM((bq, 1), acc_dtype)],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, sq, 1), acc_dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="block_sparse_fwd_tpu",
    )(row_tables.reshape(-1), *args)
    return to_heads_first(out), lse[..., 0]
