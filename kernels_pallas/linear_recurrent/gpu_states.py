"""The sequential state passes on GPU (Pallas, Triton backend): the only part of the chunked recurrence that
walks the chunks in order.

One program per (batch, head, dk block, dv block) carries a float32 state block [block_k, block_v] in registers
through a ``fori_loop`` over chunks; both updates are separable over dk and dv, so the blocks are independent.
``states``: forward, stores the state entering each chunk (in q's dtype, as fla does: the output and gradient
kernels cast it to that dtype for their matmuls anyway) and returns the final state. ``dstates``: reverse,
starting from the final state's cotangent, stores the gradient of the state leaving each chunk and returns the
gradient of the initial state.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.linear_recurrent import chunk_math
from kernels_pallas.linear_recurrent.gpu_forward import acc_dtype, compiler_params, gate_tiles, make_dot, seq_spec


def _walk(a_ref, b_ref, cum_ref, start_ref, stored_ref, end_ref, *, step, chunk, n_chunks, reverse, gated):
    """Shared loop: stores the carried block before each chunk's update (in walk order), then updates it."""
    dot = make_dot(a_ref.dtype)

    def body(i, carry):
        n = n_chunks - 1 - i if reverse else i
        rows = pl.ds(n * chunk, chunk)
        cum_col, _, last = gate_tiles(cum_ref, rows, gated)
        stored_ref[n] = carry.astype(stored_ref.dtype)
        return step(a_ref[rows, :], b_ref[rows, :], cum_col, last, carry, dot)

    end_ref[...] = lax.fori_loop(0, n_chunks, body, start_ref[...].astype(end_ref.dtype))


def _pass(a, b_, cum, start, *, step, reverse, config, interpret, name, gated):
    """a [b, s, h, dk] (k or q), b_ [b, s, h, dv] (v or dout), cum [b, h, s], start [b, h, dk, dv] ->
    (stored [b, h, n_chunks, dk, dv] in a's dtype, end [b, h, dk, dv] in the accumulation dtype)."""
    b, s, h, dk = a.shape
    dv = b_.shape[-1]
    chunk = config.chunk_size
    block_k = dk if config.block_k is None else min(config.block_k, dk)
    block_v = dv if config.block_v is None else min(config.block_v, dv)
    n_chunks = s // chunk
    a_spec = seq_spec(s, block_k, True, lambda bi, hi, ki, vi: (bi, hi, 0, ki))
    b_spec = seq_spec(s, block_v, True, lambda bi, hi, ki, vi: (bi, hi, 0, vi))
    cum_spec = pl.BlockSpec((None, None, s), lambda bi, hi, ki, vi: (bi, hi, 0))
    block_spec = pl.BlockSpec((None, None, block_k, block_v), lambda bi, hi, ki, vi: (bi, hi, ki, vi))
    stored_spec = pl.BlockSpec((None, None, n_chunks, block_k, block_v), lambda bi, hi, ki, vi: (bi, hi, 0, ki, vi))
    return pl.pallas_call(
        functools.partial(_walk, step=step, chunk=chunk, n_chunks=n_chunks, reverse=reverse, gated=gated),
        grid=(b, h, dk // block_k, dv // block_v),
        in_specs=[a_spec, b_spec, cum_spec, block_spec],
        out_specs=[stored_spec, block_spec],
        out_shape=[jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), a.dtype),
                   jax.ShapeDtypeStruct((b, h, dk, dv), acc_dtype(a.dtype))],
        compiler_params=compiler_params(config, *config.state_launch()),
        interpret=interpret,
        name=name,
    )(a, b_, cum, start)


def states(k, v, cum, h0, *, config, interpret, gated=True):
    """-> (state entering each chunk [b, h, n_chunks, dk, dv] in k's dtype, final state [b, h, dk, dv])."""
    return _pass(k, v, cum, h0, step=chunk_math.advance_state, reverse=False, config=config, interpret=interpret,
                 name="scalar_gate_states", gated=gated)


def dstates(q, dout, cum, dfinal, *, config, interpret, gated=True):
    """-> (gradient of the state leaving each chunk [b, h, n_chunks, dk, dv] in q's dtype, d initial state)."""
    return _pass(q, dout, cum, dfinal, step=chunk_math.retreat_dstate, reverse=True, config=config,
                 interpret=interpret, name="scalar_gate_dstates", gated=gated)
