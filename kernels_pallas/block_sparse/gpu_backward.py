"""Backward pass on GPU (Pallas, Triton backend): the flash backward over the kept blocks only.

Two kernels, both recomputing probabilities from the saved base-2 logsumexp:
- dq: one program per (query block, batch, head), walking the kept key blocks of its row table;
- dk/dv: one program per (key block, batch, kv head), walking, for each query head of its group, the query
  blocks of that head's column table (the layout may differ per head), so GQA needs neither repeated kv
  heads nor a reduction over heads afterwards.
``delta = rowsum(out * dout)`` comes from ``ops``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.block_sparse import tables
from kernels_pallas.block_sparse.gpu_forward import fine_args, fine_specs, query_side
from kernels_pallas.sliding_window.band import mask_value
from kernels_pallas.sliding_window.gpu_forward import LOG2E, dot_precision


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale, causal_offset,
               block_k, has_segments, fine, bits_block, window):
    seg_q_ref, seg_k_ref, fine_q_ref, fine_k_ref, (dq_ref,) = tables.split_mask_refs(rest, has_segments, fine)
    block_q, head_dim = q_ref.shape
    acc_dtype = jnp.float64 if q_ref.dtype == jnp.float64 else jnp.float32
    precision = dot_precision(q_ref.dtype)
    c = scale * LOG2E
    rows = pl.program_id(0) * block_q + jnp.arange(block_q)[:, None]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    seg_q = seg_q_ref[...][:, None] if has_segments else None
    fine_rows = query_side(fine, fine_q_ref)
    has_mask = causal_offset is not None or has_segments or fine is not None

    def step(j, dq, masked):
        kb = table_ref[tables.HEADER + j]
        k_slice = pl.ds(kb * block_k, block_k)
        k, v = k_ref[k_slice, :], v_ref[k_slice, :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision).astype(acc_dtype)
        if masked and has_mask:
            cols = kb * block_k + jnp.arange(block_k)[None, :]
            seg_k = seg_k_ref[k_slice][None, :] if has_segments else None
            ok = tables.visible(rows, cols, causal_offset, seg_q, seg_k, **fine_args(
                fine, fine_rows, fine_k_ref, fine_q_ref, k_slice, kb * block_k, bits_block, window))
            s = jnp.where(ok, s, mask_value(c))
        p = jnp.exp2(s * c - lse)
        dp = plgpu.dot(do, v, trans_b=True, precision=precision).astype(acc_dtype)
        ds = p * (dp - delta)
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision).astype(acc_dtype)

    count, lo, hi = table_ref[0], table_ref[1], table_ref[2]
    dq = jnp.zeros((block_q, head_dim), acc_dtype)
    dq = lax.fori_loop(0, lo, functools.partial(step, masked=True), dq)
    dq = lax.fori_loop(lo, hi, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(hi, count, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale, causal_offset,
                block_q, has_segments, fine, bits_block, window):
    seg_q_ref, seg_k_ref, fine_q_ref, fine_k_ref, (dk_ref, dv_ref) = tables.split_mask_refs(
        rest, has_segments, fine)
    block_k, head_dim = k_ref.shape
    groups = q_ref.shape[1]
    acc_dtype = jnp.float64 if q_ref.dtype == jnp.float64 else jnp.float32
    precision = dot_precision(q_ref.dtype)
    c = scale * LOG2E
    keys = pl.program_id(0) * block_k + jnp.arange(block_k)[:, None]
    k, v = k_ref[...], v_ref[...]
    seg_k = seg_k_ref[...][:, None] if has_segments else None
    has_mask = causal_offset is not None or has_segments or fine is not None
    word, bit = tables.bit_of(pl.program_id(0) * block_k, bits_block) if fine == "bits" else (None, None)
    # window2d: this program's key positions (y', x') as columns [bk, 1].
    key_pos = tuple(fine_k_ref[n, :][:, None] for n in range(2)) if fine == "window2d" else None

    # Tiles here are transposed, [keys, queries], so that dk and dv come out of plain products.
    def step(t, carry, g, masked):
        dk, dv = carry
        qb = table_ref[g, tables.HEADER + t]
        q_slice = pl.ds(qb * block_q, block_q)
        q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
        st = plgpu.dot(k, q, trans_b=True, precision=precision).astype(acc_dtype)
        if masked and has_mask:
            queries = qb * block_q + jnp.arange(block_q)[None, :]
            seg_q = seg_q_ref[q_slice][None, :] if has_segments else None
            extra = {}
            if fine == "tags":  # tags of query head g: its queries (a row) and this program's keys (a column)
                extra["tags"] = (fine_q_ref[g, q_slice][None, :], fine_k_ref[g, :][:, None])
            elif fine == "bits":
                extra["bits"] = (fine_q_ref[g, word, q_slice][None, :], bit)
            elif fine == "window2d":  # the queries' windows as rows [1, bq]
                extra["window"] = (tuple(fine_q_ref[n, q_slice][None, :] for n in range(4)), key_pos, window)
            ok = tables.visible(queries, keys, causal_offset, seg_q, seg_k, **extra)
            st = jnp.where(ok, st, mask_value(c))
        pt = jnp.exp2(st * c - lse_ref[g, q_slice][None, :])
        dv = dv + plgpu.dot(pt.astype(do.dtype), do, precision=precision).astype(acc_dtype)
        dpt = plgpu.dot(v, do, trans_b=True, precision=precision).astype(acc_dtype)
        dst = pt * (dpt - delta_ref[g, q_slice][None, :])
        dk = dk + plgpu.dot(dst.astype(q.dtype), q, precision=precision).astype(acc_dtype)
        return dk, dv

    carry = (jnp.zeros((block_k, head_dim), acc_dtype), jnp.zeros((block_k, head_dim), acc_dtype))
    for g in range(groups):  # the query heads sharing this kv head; static, usually 1..8
        count, lo, hi = table_ref[g, 0], table_ref[g, 1], table_ref[g, 2]
        carry = lax.fori_loop(0, lo, functools.partial(step, g=g, masked=True), carry)
        carry = lax.fori_loop(lo, hi, functools.partial(step, g=g, masked=False), carry)
        carry = lax.fori_loop(hi, count, functools.partial(step, g=g, masked=True), carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, seg_q, seg_k, fine_q, fine_k, row_tables, col_tables, do, lse, delta, *, st):
    """Inputs as in ``gpu_forward.forward``; col_tables [b|1, h, kv_blocks, width]; lse, delta [b, h, sq]."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    groups = h // hkv
    bq, bk = st.q_block, st.kv_block
    has_segments = seg_q is not None
    params = plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)
    common = dict(scale=st.scale, causal_offset=st.causal_offset, has_segments=has_segments, fine=st.fine,
                  bits_block=st.bits_block, window=st.window)

    # dq: grid over (query block, batch, head).
    per_batch = row_tables.shape[0] > 1
    row_spec = pl.BlockSpec((None, None, None, row_tables.shape[-1]),
                            lambda i, bi, hi: (bi if per_batch else 0, hi, i, 0))
    tile_q = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    full_kv = pl.BlockSpec((None, sk, None, d), lambda i, bi, hi: (bi, 0, hi // groups, 0))
    tile_row = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    in_specs = [row_spec, tile_q, full_kv, full_kv, tile_q, tile_row, tile_row]
    args = [row_tables, q, k, v, do, lse, delta]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
                     pl.BlockSpec((None, sk), lambda i, bi, hi: (bi, 0))]
        args += [seg_q, seg_k]
    extra_args, extra_specs = fine_specs(fine_q, fine_k, st.fine, bq, sk)
    args, in_specs = args + extra_args, in_specs + extra_specs
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=bk, **common),
        grid=(sq // bq, b, h),
        in_specs=in_specs,
        out_specs=tile_q,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=st.interpret,
        name="block_sparse_bwd_dq",
    )(*args)

    # dk, dv: grid over (key block, batch, kv head); the q heads of one group travel whole.
    per_batch = col_tables.shape[0] > 1
    col_spec = pl.BlockSpec((None, groups, None, col_tables.shape[-1]),
                            lambda j, bi, hk: (bi if per_batch else 0, hk, j, 0))
    group_q = pl.BlockSpec((None, sq, groups, d), lambda j, bi, hk: (bi, 0, hk, 0))
    group_row = pl.BlockSpec((None, groups, sq), lambda j, bi, hk: (bi, hk, 0))
    tile_kv = pl.BlockSpec((None, bk, None, d), lambda j, bi, hk: (bi, j, hk, 0))
    in_specs = [col_spec, group_q, tile_kv, tile_kv, group_q, group_row, group_row]
    args = [col_tables, q, k, v, do, lse, delta]
    if has_segments:
        in_specs += [pl.BlockSpec((None, sq), lambda j, bi, hk: (bi, 0)),
                     pl.BlockSpec((None, bk), lambda j, bi, hk: (bi, j))]
        args += [seg_q, seg_k]
    if st.fine == "tags":  # the group's query tags whole, its key tags over this key tile
        in_specs += [pl.BlockSpec((None, groups, sq), lambda j, bi, hk: (bi, hk, 0)),
                     pl.BlockSpec((None, groups, bk), lambda j, bi, hk: (bi, hk, j))]
        args += [fine_q, fine_k]
    elif st.fine == "window2d":  # every query's window, this key tile's positions
        in_specs += [pl.BlockSpec((4, sq), lambda j, bi, hk: (0, 0)), pl.BlockSpec((2, bk), lambda j, bi, hk: (0, j))]
        args += [fine_q, fine_k]
    elif st.fine == "bits":  # every word of the group's queries
        in_specs.append(pl.BlockSpec((None, groups) + fine_q.shape[2:], lambda j, bi, hk: (bi, hk, 0, 0)))
        args.append(fine_q)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq, **common),
        grid=(sk // bk, b, hkv),
        in_specs=in_specs,
        out_specs=[tile_kv, tile_kv],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=st.interpret,
        name="block_sparse_bwd_dkv",
    )(*args)
    return dq, dk, dv
