"""Backward pass on TPU (Pallas, Mosaic TPU backend): dq pass over the row tables, dk/dv pass over the
column tables.

Same grid scheme as ``tpu_forward``: the last grid axis walks a table (for dk/dv: every query head of the kv
head's group, then the entries of that head's column table), accumulators in VMEM scratch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.block_sparse import tables
from kernels_pallas.block_sparse.tpu_forward import fine_args, fine_specs, flat_row, table_entry
from kernels_pallas.sliding_window.band import mask_value
from kernels_pallas.sliding_window.tpu_forward import LOG2E, dot, to_heads_first

_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale, causal_offset,
               block_k, n_steps, row_of, width, has_segments, fine, bits_block, window):
    seg_q_ref, seg_k_ref, fine_q_ref, fine_k_ref, (dq_ref, acc_ref) = tables.split_mask_refs(
        rest, has_segments, fine)
    block_q = q_ref.shape[0]
    bi, hi, i, j = (pl.program_id(a) for a in range(4))
    row = row_of(bi, hi, i)
    count, lo, hi_ = (table_entry(table_ref, row, n, width=width) for n in range(tables.HEADER))
    kb = table_entry(table_ref, row, tables.HEADER + j, width=width)
    c = scale * LOG2E

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def step(masked):
        k = k_ref[...]
        s = dot(q_ref[...], k, trans_b=True)
        if masked:
            rows = i * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
            cols = kb * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            seg_q = seg_q_ref[...] if has_segments else None
            seg_k = seg_k_ref[...] if has_segments else None
            ok = tables.visible(rows, cols, causal_offset, seg_q, seg_k,
                                **fine_args(fine, fine_q_ref, fine_k_ref, kb * block_k, bits_block, window))
            s = jnp.where(ok, s, mask_value(c))
        p = jnp.exp2(s * c - lse_ref[...])
        ds = p * (dot(do_ref[...], v_ref[...], trans_b=True) - delta_ref[...])
        acc_ref[...] += dot(ds.astype(k.dtype), k).astype(acc_ref.dtype)

    unmasked = (j >= lo) & (j < hi_)
    if causal_offset is not None or has_segments or fine is not None:
        pl.when((j < count) & jnp.logical_not(unmasked))(functools.partial(step, True))
    pl.when((j < count) & unmasked)(functools.partial(step, False))

    @pl.when(j == n_steps - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale, causal_offset,
                block_q, n_steps, groups, col_of, width, has_segments, fine, bits_block, window):
    # Segment ids, tags and window2d come key side first here ([keys, queries] tiles); the words are the
    # queries'.
    seg_k_ref, seg_q_ref, fine_a_ref, fine_b_ref, (dk_ref, dv_ref, dk_acc, dv_acc) = tables.split_mask_refs(
        rest, has_segments, fine)
    fine_q_ref, fine_k_ref = (fine_b_ref, fine_a_ref) if tables.two_sided(fine) else (fine_a_ref, None)
    block_k = k_ref.shape[0]
    bi, hk, kt, t = (pl.program_id(a) for a in range(4))
    col = col_of(bi, hk * groups + t // n_steps, kt)
    position = t % n_steps
    count, lo, hi_ = (table_entry(table_ref, col, n, width=width) for n in range(tables.HEADER))
    qb = table_entry(table_ref, col, tables.HEADER + position, width=width)
    c = scale * LOG2E

    @pl.when(t == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    # Tiles are [keys, queries]: dk and dv come out of plain products.
    def step(masked):
        q, do = q_ref[...], do_ref[...]
        st = dot(k_ref[...], q, trans_b=True)
        if masked:
            keys = kt * block_k + lax.broadcasted_iota(jnp.int32, st.shape, 0)
            queries = qb * block_q + lax.broadcasted_iota(jnp.int32, st.shape, 1)
            seg_k = seg_k_ref[...] if has_segments else None
            seg_q = seg_q_ref[...] if has_segments else None
            ok = tables.visible(queries, keys, causal_offset, seg_q, seg_k,
                                **fine_args(fine, fine_q_ref, fine_k_ref, kt * block_k, bits_block, window,
                                            keys_first=True))
            st = jnp.where(ok, st, mask_value(c))
        pt = jnp.exp2(st * c - lse_ref[...])
        dv_acc[...] += dot(pt.astype(do.dtype), do).astype(dv_acc.dtype)
        dst = pt * (dot(v_ref[...], do, trans_b=True) - delta_ref[...])
        dk_acc[...] += dot(dst.astype(q.dtype), q).astype(dk_acc.dtype)

    unmasked = (position >= lo) & (position < hi_)
    if causal_offset is not None or has_segments or fine is not None:
        pl.when((position < count) & jnp.logical_not(unmasked))(functools.partial(step, True))
    pl.when((position < count) & unmasked)(functools.partial(step, False))

    @pl.when(t == groups * n_steps - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, seg_q, seg_k, fine_q, fine_k, row_tables, col_tables, do, lse, delta, *, st):
    """Same contract as ``gpu_backward.backward``."""
    q, k, v, do = (to_heads_first(x) for x in (q, k, v, do))
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    groups = h // hkv
    bq, bk = st.q_block, st.kv_block
    has_segments = seg_q is not None
    acc_dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    common = dict(scale=st.scale, causal_offset=st.causal_offset, has_segments=has_segments, fine=st.fine,
                  bits_block=st.bits_block, window=st.window)

    # dq: grid (batch, head, query block, row-table entry); lse and delta as columns [bq, 1].
    width = row_tables.shape[-1]
    n_steps = max(st.max_row, 1)
    row_of = flat_row(row_tables.shape[0] > 1, h, sq // bq)
    kv_block = lambda bi, hi, i, j, table: table_entry(table, row_of(bi, hi, i), tables.HEADER + j, width=width)
    q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, table: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda bi, hi, i, j, table: (bi, hi // groups, kv_block(bi, hi, i, j, table), 0))
    col_spec = pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j, table: (bi, hi, i, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec]
    args = [q, k, v, do, lse[..., None], delta[..., None]]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j, table: (bi, i, 0)),
                     pl.BlockSpec((None, 1, bk), lambda bi, hi, i, j, table: (bi, 0, kv_block(bi, hi, i, j, table)))]
        args += [seg_q[:, :, None], seg_k[:, None, :]]
    extra_args, extra_specs = fine_specs(fine_q, fine_k, st, bq, bk, kv_block)
    in_specs, args = in_specs + extra_specs, args + extra_args
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=bk, n_steps=n_steps, row_of=row_of, width=width, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, h, sq // bq, n_steps), in_specs=in_specs, out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), acc_dtype)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_SEMANTICS,
        interpret=st.interpret,
        name="block_sparse_bwd_dq_tpu",
    )(row_tables.reshape(-1), *args)

    # dk, dv: grid (batch, kv head, key block, group member x column-table entry); lse, delta as rows [1, bq].
    width = col_tables.shape[-1]
    n_steps = max(st.max_col, 1)
    col_of = flat_row(col_tables.shape[0] > 1, h, sk // bk)
    head = lambda hk, t: hk * groups + t // n_steps
    q_block = lambda bi, hk, kt, t, table: table_entry(table, col_of(bi, head(hk, t), kt),
                                                       tables.HEADER + t % n_steps, width=width)
    q_spec = pl.BlockSpec((None, None, bq, d),
                          lambda bi, hk, kt, t, table: (bi, head(hk, t), q_block(bi, hk, kt, t, table), 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, hk, kt, t, table: (bi, hk, kt, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq),
                            lambda bi, hk, kt, t, table: (bi, head(hk, t), 0, q_block(bi, hk, kt, t, table)))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse[:, :, None, :], delta[:, :, None, :]]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bk, 1), lambda bi, hk, kt, t, table: (bi, kt, 0)),
                     pl.BlockSpec((None, 1, bq), lambda bi, hk, kt, t, table: (bi, 0, q_block(bi, hk, kt, t, table)))]
        args += [seg_k[:, :, None], seg_q[:, None, :]]
    if st.fine == "tags":  # key tags as a column [bk, 1], query tags as a row [1, bq]
        in_specs += [pl.BlockSpec((None, None, bk, 1), lambda bi, hk, kt, t, table: (bi, head(hk, t), kt, 0)),
                     pl.BlockSpec((None, None, 1, bq),
                                  lambda bi, hk, kt, t, table: (bi, head(hk, t), 0, q_block(bi, hk, kt, t, table)))]
        args += [fine_k[..., None], fine_q[:, :, None, :]]
    elif st.fine == "window2d":  # key positions as columns [bk, 2], the step's query windows as rows [4, bq]
        in_specs += [pl.BlockSpec((bk, 2), lambda bi, hk, kt, t, table: (kt, 0)),
                     pl.BlockSpec((4, bq), lambda bi, hk, kt, t, table: (0, q_block(bi, hk, kt, t, table)))]
        args += [fine_k.T, fine_q]
    elif st.fine == "bits":  # the word holding this key tile's block, for the step's queries, as a row
        word = lambda kt: tables.bit_of(kt * bk, st.bits_block)[0]
        in_specs.append(pl.BlockSpec(
            (None, None, None, 1, bq),
            lambda bi, hk, kt, t, table: (bi, head(hk, t), word(kt), 0, q_block(bi, hk, kt, t, table))))
        args.append(fine_q[:, :, :, None, :])
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq, n_steps=n_steps, groups=groups, col_of=col_of, width=width,
                          **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, hkv, sk // bk, groups * n_steps), in_specs=in_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), acc_dtype), pltpu.VMEM((bk, d), acc_dtype)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_SEMANTICS,
        interpret=st.interpret,
        name="block_sparse_bwd_dkv_tpu",
    )(col_tables.reshape(-1), *args)
    return to_heads_first(dq), to_heads_first(dk), to_heads_first(dv)
