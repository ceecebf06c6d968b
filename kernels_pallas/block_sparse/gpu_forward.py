"""Forward pass on GPU (Pallas, Triton backend): flash attention over the kept key blocks of each query block.

One program per (query block, batch, head). It reads its row of the block table (``tables``), keeps its query
block in registers and walks the kept key blocks with an online softmax in base 2: first the blocks needing
no element mask, then those that do (the causal diagonal, or all of them with segment ids).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.block_sparse import tables
from kernels_pallas.sliding_window.band import PAD_LSE, mask_value
from kernels_pallas.sliding_window.gpu_forward import LOG2E, dot_precision


def _forward_kernel(table_ref, q_ref, k_ref, v_ref, *rest, scale, causal_offset, block_k, has_segments, fine,
                    bits_block, window):
    seg_q_ref, seg_k_ref, fine_q_ref, fine_k_ref, (o_ref, lse_ref) = tables.split_mask_refs(
        rest, has_segments, fine)
    block_q, head_dim = q_ref.shape
    acc_dtype = jnp.float64 if q_ref.dtype == jnp.float64 else jnp.float32
    precision = dot_precision(q_ref.dtype)
    c = scale * LOG2E
    rows = pl.program_id(0) * block_q + jnp.arange(block_q)[:, None]
    q = q_ref[...]
    seg_q = seg_q_ref[...][:, None] if has_segments else None
    fine_rows = query_side(fine, fine_q_ref)
    has_mask = causal_offset is not None or has_segments or fine is not None  # else no entry needs the mask

    def step(j, carry, masked):
        acc, m, l = carry
        kb = table_ref[tables.HEADER + j]
        k_slice = pl.ds(kb * block_k, block_k)
        s = plgpu.dot(q, k_ref[k_slice, :], trans_b=True, precision=precision).astype(acc_dtype)
        masked = masked and has_mask
        if masked:
            cols = kb * block_k + jnp.arange(block_k)[None, :]
            seg_k = seg_k_ref[k_slice][None, :] if has_segments else None
            ok = tables.visible(rows, cols, causal_offset, seg_q, seg_k, **fine_args(
                fine, fine_rows, fine_k_ref, fine_q_ref, k_slice, kb * block_k, bits_block, window))
            s = jnp.where(ok, s, mask_value(c))
        m_new = jnp.maximum(m, s.max(axis=1) * c)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * c - m_new[:, None])
        if masked:  # a row that has seen only masked keys so far would otherwise count exp2(0) = 1 for them
            p = jnp.where(ok, p, 0.0)
        l = l * alpha + p.sum(axis=1)
        v = v_ref[k_slice, :]
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision).astype(acc_dtype)
        return acc, m_new, l

    count, lo, hi = table_ref[0], table_ref[1], table_ref[2]
    carry = (
        jnp.zeros((block_q, head_dim), acc_dtype),
        jnp.full((block_q,), -jnp.inf, acc_dtype),
        jnp.zeros((block_q,), acc_dtype),
    )
    carry = lax.fori_loop(0, lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(lo, hi, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(hi, count, functools.partial(step, masked=True), carry)
    empty = l == 0  # no kept block, or every key of them masked: zeros out, and p = 0 in the backward
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, PAD_LSE, m + jnp.log2(jnp.where(empty, 1.0, l))).astype(lse_ref.dtype)


def query_side(fine, fine_q_ref):
    """The fine mask's per-query values of this program's query tile, loaded once, as columns [bq, 1]:
    tags, or the 4 window2d values (y % dh, start_y, x % dw, start_x); None for bits (loaded per key tile)."""
    if fine == "tags":
        return fine_q_ref[...][:, None]
    if fine == "window2d":
        return tuple(fine_q_ref[n, :][:, None] for n in range(4))
    return None


def fine_args(fine, fine_rows, fine_k_ref, words_ref, k_slice, first_key, bits_block, window):
    """``tables.visible``'s tags / bits / window for a [queries, keys] tile (rows of this program, whose
    ``query_side`` values are ``fine_rows``, and keys k_slice)."""
    if fine == "tags":
        return {"tags": (fine_rows, fine_k_ref[k_slice][None, :])}
    if fine == "bits":
        word, bit = tables.bit_of(first_key, bits_block)
        return {"bits": (words_ref[word, :][:, None], bit)}
    if fine == "window2d":
        return {"window": (fine_rows, (fine_k_ref[0, k_slice][None, :], fine_k_ref[1, k_slice][None, :]), window)}
    return {}


def fine_specs(fine_q, fine_k, fine, q_block, kv_len):
    """BlockSpecs of the fine mask for a (query tile, batch, head) grid: q tags [b, h, sq] -> one tile,
    k tags [b, h, sk] -> whole; bit words [b, h, words, sq] -> every word of the tile's queries; window2d
    q windows [4, sq] -> one tile, k positions [2, sk] -> whole (shared by batch and heads)."""
    if fine == "tags":
        return [fine_q, fine_k], [pl.BlockSpec((None, None, q_block), lambda i, bi, hi: (bi, hi, i)),
                                  pl.BlockSpec((None, None, kv_len), lambda i, bi, hi: (bi, hi, 0))]
    if fine == "window2d":
        return [fine_q, fine_k], [pl.BlockSpec((4, q_block), lambda i, bi, hi: (0, i)),
                                  pl.BlockSpec((2, kv_len), lambda i, bi, hi: (0, 0))]
    if fine == "bits":
        return [fine_q], [pl.BlockSpec((None, None, fine_q.shape[2], q_block), lambda i, bi, hi: (bi, hi, 0, i))]
    return [], []


def forward(q, k, v, seg_q, seg_k, fine_q, fine_k, row_tables, *, st):
    """q [b, sq, h, d], k/v [b, sk, hkv, d], row_tables [b|1, h, q_blocks, width]
    -> (out like q, lse [b, h, sq] float32, base 2).

    Fine mask (``st.fine``): "tags": fine_q [b, h, sq], fine_k [b, h, sk] int32; "bits": fine_q
    [b, h, words, sq] int32 (bit n of word w: key block 32 w + n of ``st.bits_block`` keys), fine_k None;
    "window2d": fine_q [4, sq] (y % dh, start_y, x % dw, start_x), fine_k [2, sk] (y', x') int32, with
    ``st.window`` = (kh, kw, dh, dw)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    groups = h // k.shape[2]
    bq, bk = st.q_block, st.kv_block
    has_segments = seg_q is not None
    per_batch = row_tables.shape[0] > 1
    width = row_tables.shape[-1]
    kernel = functools.partial(_forward_kernel, scale=st.scale, causal_offset=st.causal_offset, block_k=bk,
                               has_segments=has_segments, fine=st.fine, bits_block=st.bits_block,
                               window=st.window)
    table_spec = pl.BlockSpec((None, None, None, width),
                              lambda i, bi, hi: (bi if per_batch else 0, hi, i, 0))
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, sk, None, d), lambda i, bi, hi: (bi, 0, hi // groups, 0))
    in_specs = [table_spec, q_spec, kv_spec, kv_spec]
    args = [row_tables, q, k, v]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
                     pl.BlockSpec((None, sk), lambda i, bi, hi: (bi, 0))]
        args += [seg_q, seg_k]
    extra_args, extra_specs = fine_specs(fine_q, fine_k, st.fine, bq, sk)
    args, in_specs = args + extra_args, in_specs + extra_specs
    lse_dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    return pl.pallas_call(
        kernel,
        grid=(sq // bq, b, h),
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, sq), lse_dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
        interpret=st.interpret,
        name="block_sparse_fwd",
    )(*args)
