"""Forward kernels on GPU (Pallas, Triton backend).

``output``: chunk-parallel, one program per (batch, head, chunk, dv block): the intra-chunk [C, C] product plus
the read of the state entering the chunk, which ``gpu_states.states`` stored. ``fused``: the older single
sequential kernel, one program per (batch, head, dv block) walking the chunks with the state in registers; it
needs no state round trip through memory but has few programs (``ChunkConfig.fused_forward`` picks it).
Inputs arrive in the caller's [batch, seq, heads, dim] layout (the BlockSpecs pick one head's rows: no transposes
in XLA; Triton's loads take the heads' stride), padded by ``ops``: sequence to a chunk multiple, head dims to
powers of two >= 16 (Triton's dot needs them). The cumulative log gates are heads-first [batch, heads, seq].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.linear_recurrent import chunk_math
from kernels_pallas.linear_recurrent.chunk_math import acc_dtype


def make_dot(dtype):
    """Triton dot accumulating in the accumulation dtype; float32 inputs get true float32 (not tf32) products."""
    precision = lax.Precision.HIGHEST if dtype in (jnp.float32, jnp.float64) else None
    acc = acc_dtype(dtype)

    def dot(a, b, trans_a=False, trans_b=False):
        return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision).astype(acc)

    return dot


def chunk_tiles(chunk):
    """(causal [C, C] bool, is_last [C] bool) from aranges (what Triton lowers)."""
    t = jnp.arange(chunk)
    return t[:, None] >= t[None, :], t == chunk - 1


def column_blocks(width, block):
    """Static slices of ``block`` (None: all) columns covering ``width``: kernels that load, compute and store a
    [rows, width] tile a column block at a time, so that less of it is live in registers at once."""
    size = width if block is None else min(block, width)
    return tuple(pl.ds(start, size) for start in range(0, width, size))


def compiler_params(config, num_warps=None, num_stages=None):
    """Triton launch settings: ``num_warps`` / ``num_stages`` where given, else ``config``'s."""
    return plgpu.CompilerParams(num_warps=config.num_warps if num_warps is None else num_warps,
                                num_stages=config.num_stages if num_stages is None else num_stages)


def seq_spec(rows, width, seq_major, index):
    """BlockSpec of a [rows, width] tile of a [b, s, h, d] (seq_major) or [b, h, s, d] array; ``index`` maps the
    grid ids to (batch, head, row block, column block)."""
    if not seq_major:
        return pl.BlockSpec((None, None, rows, width), index)

    def seq_index(*ids):
        b, h, r, c = index(*ids)
        return b, r, h, c

    return pl.BlockSpec((None, rows, None, width), seq_index)


def chunk_specs(chunk, dk, dv):
    """Block specs of one chunk of whole heads on the grid (batch, head, chunk): (q/k [C, dk], v [C, dv] of
    [b, s, h, d] arrays, cum [C] of [b, h, s], state [dk, dv])."""
    return (seq_spec(chunk, dk, True, lambda bi, hi, n: (bi, hi, n, 0)),
            seq_spec(chunk, dv, True, lambda bi, hi, n: (bi, hi, n, 0)),
            pl.BlockSpec((None, None, chunk), lambda bi, hi, n: (bi, hi, n)),
            pl.BlockSpec((None, None, None, dk, dv), lambda bi, hi, n: (bi, hi, n, 0, 0)))


def gate_tiles(cum_ref, rows, gated):
    """(column [C, 1], row [1, C], last: the chunk's total) of the chunk's cumulative log gates ``cum_ref[rows]``;
    (None, None, None) without a gate (not even loaded: ``chunk_math`` then skips every exp)."""
    if not gated:
        return None, None, None
    cum = cum_ref[rows]
    _, is_last = chunk_tiles(cum.shape[0])
    return cum[:, None], cum[None, :], jnp.sum(jnp.where(is_last, cum, 0.0))


def _output_kernel(q_ref, k_ref, v_ref, cum_ref, state_ref, out_ref, *, gated):
    causal, _ = chunk_tiles(q_ref.shape[0])
    cum_col, cum_row, _ = gate_tiles(cum_ref, slice(None), gated)
    out = chunk_math.chunk_output(q_ref[...], k_ref[...], v_ref[...], cum_col, cum_row, causal,
                                  state_ref[...], make_dot(q_ref.dtype))
    out_ref[...] = out.astype(out_ref.dtype)


def output(q, k, v, cum, states, *, config, interpret, gated=True):
    """q/k [b, s, h, dk], v [b, s, h, dv], cum [b, h, s], states [b, h, n_chunks, dk, dv] (entering each chunk)
    -> out [b, s, h, dv] in q's dtype, by ``config.output_block_v`` value columns (None: all). ``gated=False``: no
    gate (cum is zeros and not read)."""
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    chunk, block_v = config.chunk_size, config.output_block_v or dv
    qk_spec = seq_spec(chunk, dk, True, lambda bi, hi, n, vi: (bi, hi, n, 0))
    v_spec = seq_spec(chunk, block_v, True, lambda bi, hi, n, vi: (bi, hi, n, vi))
    cum_spec = pl.BlockSpec((None, None, chunk), lambda bi, hi, n, vi: (bi, hi, n))
    state_spec = pl.BlockSpec((None, None, None, dk, block_v), lambda bi, hi, n, vi: (bi, hi, n, 0, vi))
    return pl.pallas_call(
        functools.partial(_output_kernel, gated=gated),
        grid=(b, h, s // chunk, dv // block_v),
        in_specs=[qk_spec, qk_spec, v_spec, cum_spec, state_spec],
        out_specs=v_spec,
        out_shape=jax.ShapeDtypeStruct(v.shape, q.dtype),
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="scalar_gate_output",
    )(q, k, v, cum, states)


def _fused_kernel(q_ref, k_ref, v_ref, cum_ref, h0_ref, out_ref, final_ref, *states_ref, chunk, n_chunks, gated):
    dot = make_dot(q_ref.dtype)
    causal, _ = chunk_tiles(chunk)

    def body(n, state):
        rows = pl.ds(n * chunk, chunk)
        cum_col, cum_row, last = gate_tiles(cum_ref, rows, gated)
        if states_ref:  # the backward reads the state entering every chunk
            states_ref[0][n] = state.astype(states_ref[0].dtype)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        out_ref[rows, :] = chunk_math.chunk_output(q, k, v, cum_col, cum_row, causal, state,
                                                   dot).astype(out_ref.dtype)
        return chunk_math.advance_state(k, v, cum_col, last, state, dot)

    final_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(final_ref.dtype))


def fused(q, k, v, cum, h0, *, config, save_states, interpret, gated=True):
    """q/k [b, s, h, dk], v [b, s, h, dv], cum [b, h, s], h0 [b, h, dk, dv] (acc dtype) -> (out [b, s, h, dv] in
    q's dtype, final state [b, h, dk, dv], states [b, h, n_chunks, dk, dv] in q's dtype or None)."""
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    chunk, block_v = config.chunk_size, config.block_v
    n_chunks = s // chunk
    acc = acc_dtype(q.dtype)
    qk_spec = seq_spec(s, dk, True, lambda bi, hi, vi: (bi, hi, 0, 0))
    v_spec = seq_spec(s, block_v, True, lambda bi, hi, vi: (bi, hi, 0, vi))
    cum_spec = pl.BlockSpec((None, None, s), lambda bi, hi, vi: (bi, hi, 0))
    state_spec = pl.BlockSpec((None, None, dk, block_v), lambda bi, hi, vi: (bi, hi, 0, vi))
    out_specs = [v_spec, state_spec]
    out_shape = [jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), acc)]
    if save_states:
        out_specs.append(pl.BlockSpec((None, None, n_chunks, dk, block_v), lambda bi, hi, vi: (bi, hi, 0, 0, vi)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), q.dtype))
    results = pl.pallas_call(
        functools.partial(_fused_kernel, chunk=chunk, n_chunks=n_chunks, gated=gated),
        grid=(b, h, dv // block_v),
        in_specs=[qk_spec, qk_spec, v_spec, cum_spec, state_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="scalar_gate_fused_fwd",
    )(q, k, v, cum, h0)
    return results[0], results[1], (results[2] if save_states else None)
