"""The vector-gate (GLA) kernels on GPU (Pallas, Triton backend): two sequential state passes, two chunk-parallel
passes (fla's layout).

- ``states``: one program per (batch, head, dk block, dv block) walks the chunks in order, carrying the float32
  state block, and stores the state entering every chunk ([b, h, n_chunks, dk, dv] in the input dtype). Rows of
  the state are independent under a per-dimension gate, so dk blocks need no communication.
- ``output``: one program per (batch, head, chunk, dv block): the chunk's output from its entering state.
- ``dstates``: the reverse walk of the state gradient (per dk and dv block): the gradient of the state leaving
  every chunk, and d initial_state.
- ``backward``: one program per (batch, head, chunk, dv block): dq, dk, dv and the cumulative gates' gradient.
- With ``VectorGateConfig.scores_kernel``, as fla lays it out: ``scores`` (the intra-chunk A) before ``output``;
  ``dscores`` (dA and its transpose) and ``intra_gradients`` (the terms of dq and dk from inside the chunk) before
  ``backward``, which then needs whole-chunk matmuls only; one program per chunk each.

Inputs arrive in the caller's [batch, seq, heads, dim] layout (the BlockSpecs pick one head's rows, so no
transposes), padded by ``vector_gate_ops``: sequence to a chunk multiple, head dims to powers of two >= 16 (Triton's
dot needs them). ``seq_major=False`` takes heads-first [batch, heads, seq, dim] instead (the TPU build's layout).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.linear_recurrent import vector_gate_backward as bwd
from kernels_pallas.linear_recurrent import vector_gate_forward as fwd
from kernels_pallas.linear_recurrent.gpu_forward import compiler_params as _params, seq_spec


def _states_kernel(k_ref, v_ref, cum_ref, h0_ref, states_ref, final_ref, *, chunk, n_chunks):
    dot = fwd.make_dot(k_ref.dtype)

    def body(n, state):
        rows = pl.ds(n * chunk, chunk)
        states_ref[n] = state.astype(states_ref.dtype)
        last = cum_ref[pl.ds(n * chunk + chunk - 1, 1), :]
        return fwd.next_state(state, k_ref[rows, :], v_ref[rows, :], cum_ref[rows, :], last, dot)

    final_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(final_ref.dtype))


def _sequential_specs(s, chunk, bk, bv, n_chunks, seq_major):
    """Specs of the state passes, grid (b, h, dk block, dv block): whole-sequence tiles, state, all states."""
    seq_k = seq_spec(s, bk, seq_major, lambda bi, hi, ki, vi: (bi, hi, 0, ki))
    seq_v = seq_spec(s, bv, seq_major, lambda bi, hi, ki, vi: (bi, hi, 0, vi))
    state = pl.BlockSpec((None, None, bk, bv), lambda bi, hi, ki, vi: (bi, hi, ki, vi))
    all_states = pl.BlockSpec((None, None, n_chunks, bk, bv), lambda bi, hi, ki, vi: (bi, hi, 0, ki, vi))
    return seq_k, seq_v, state, all_states


def states(k, v, cum, h0, *, config, interpret):
    """k/cum [b, s, h, dk], v [b, s, h, dv], h0 [b, h, dk, dv] (acc dtype) ->
    (states entering each chunk [b, h, n, dk, dv] in k's dtype, final state [b, h, dk, dv] in h0's dtype)."""
    b, s, h, dk = k.shape
    dv = v.shape[-1]
    chunk, bk, bv = config.chunk_size, config.state_block_k, config.state_block_v
    n_chunks = s // chunk
    seq_k, seq_v, state, all_states = _sequential_specs(s, chunk, bk, bv, n_chunks, True)
    return pl.pallas_call(
        functools.partial(_states_kernel, chunk=chunk, n_chunks=n_chunks),
        grid=(b, h, dk // bk, dv // bv),
        in_specs=[seq_k, seq_v, seq_k, state],
        out_specs=[all_states, state],
        out_shape=[jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), k.dtype), jax.ShapeDtypeStruct(h0.shape, h0.dtype)],
        compiler_params=_params(config, config.state_warps, config.state_stages),
        interpret=interpret,
        name="vector_gate_states",
    )(k, v, cum, h0)


def _dstates_kernel(q_ref, dout_ref, cum_ref, dfinal_ref, dstates_ref, dh0_ref, *, chunk, n_chunks):
    dot = fwd.make_dot(q_ref.dtype)

    def body(i, dstate):
        n = n_chunks - 1 - i
        rows = pl.ds(n * chunk, chunk)
        dstates_ref[n] = dstate.astype(dstates_ref.dtype)
        last = cum_ref[pl.ds(n * chunk + chunk - 1, 1), :]
        return bwd.previous_dstate(dstate, q_ref[rows, :], dout_ref[rows, :], cum_ref[rows, :], last, dot)

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dfinal_ref[...].astype(dh0_ref.dtype))


def dstates(q, dout, cum, dfinal, *, config, interpret):
    """-> (gradient of the state leaving each chunk [b, h, n, dk, dv] in q's dtype, d initial_state like dfinal)."""
    b, s, h, dk = q.shape
    dv = dout.shape[-1]
    chunk, bk, bv = config.chunk_size, config.state_block_k, config.state_block_v
    n_chunks = s // chunk
    seq_k, seq_v, state, all_states = _sequential_specs(s, chunk, bk, bv, n_chunks, True)
    return pl.pallas_call(
        functools.partial(_dstates_kernel, chunk=chunk, n_chunks=n_chunks),
        grid=(b, h, dk // bk, dv // bv),
        in_specs=[seq_k, seq_v, seq_k, state],
        out_specs=[all_states, state],
        out_shape=[jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), q.dtype),
                   jax.ShapeDtypeStruct(dfinal.shape, dfinal.dtype)],
        compiler_params=_params(config, config.dstate_warps, config.dstate_stages),
        interpret=interpret,
        name="vector_gate_dstates",
    )(q, dout, cum, dfinal)


def _chunk_specs(chunk, dk, bv, seq_major):
    """Specs of the chunk-parallel passes, grid (b, h, chunk, dv block): chunk x dk, chunk x bv, state tiles."""
    tile_k = seq_spec(chunk, dk, seq_major, lambda bi, hi, n, vi: (bi, hi, n, 0))
    tile_v = seq_spec(chunk, bv, seq_major, lambda bi, hi, n, vi: (bi, hi, n, vi))
    state = pl.BlockSpec((None, None, None, dk, bv), lambda bi, hi, n, vi: (bi, hi, n, 0, vi))
    return tile_k, tile_v, state


def _dims(q, v, seq_major):
    b, s, h, dk = q.shape if seq_major else (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    return b, s, h, dk, v.shape[-1]


def scores(q, k, cum, *, config, interpret):
    """-> the intra-chunk scores A [b, s, h, C] in q's dtype, one program per (batch, head, chunk)
    (``fwd.scores_kernel``)."""
    b, s, h, dk = q.shape
    chunk = config.chunk_size
    tile_k = seq_spec(chunk, dk, True, lambda bi, hi, n: (bi, hi, n, 0))
    return pl.pallas_call(
        functools.partial(fwd.scores_kernel, sub=config.sub_chunk),
        grid=(b, h, s // chunk),
        in_specs=[tile_k, tile_k, tile_k],
        out_specs=seq_spec(chunk, chunk, True, lambda bi, hi, n: (bi, hi, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape[:-1] + (chunk,), q.dtype),
        compiler_params=_params(config, config.scores_warps),
        interpret=interpret,
        name="vector_gate_scores",
    )(q, k, cum)


def output(q, k, v, cum, all_states, *, config, interpret, scores=None, seq_major=True, compiler_params=None):
    """-> out like v in q's dtype, chunk-parallel from the states entering each chunk: from the chunk ``scores``
    of ``scores()`` where given (``config.scores_kernel``), else in one kernel."""
    b, s, h, dk, dv = _dims(q, v, seq_major)
    chunk, bv = config.chunk_size, config.block_v
    tile_k, tile_v, state = _chunk_specs(chunk, dk, bv, seq_major)
    if scores is not None:
        tile_scores = seq_spec(chunk, chunk, seq_major, lambda bi, hi, n, vi: (bi, hi, n, 0))
        kernel, name = fwd.output_from_scores_kernel, "vector_gate_output_from_scores"
        operands, in_specs = (q, v, cum, all_states, scores), [tile_k, tile_v, tile_k, state, tile_scores]
    else:
        kernel, name = functools.partial(fwd.output_kernel, sub=config.sub_chunk), "vector_gate_output"
        operands, in_specs = (q, k, v, cum, all_states), [tile_k, tile_k, tile_v, tile_k, state]
    return pl.pallas_call(
        kernel,
        grid=(b, h, s // chunk, dv // bv),
        in_specs=in_specs,
        out_specs=tile_v,
        out_shape=jax.ShapeDtypeStruct(v.shape, q.dtype),
        compiler_params=compiler_params or _params(config),
        interpret=interpret,
        name=name,
    )(*operands)


def dscores(v, dout, *, config, interpret):
    """-> (dA, dA^T), each [b, s, h, C] in the accumulation dtype: per chunk
    dout v^T kept on and below the diagonal, and its transpose (``bwd.dscores_kernel``); one program per chunk."""
    b, s, h, dv = v.shape
    chunk = config.chunk_size
    tile_v = seq_spec(chunk, dv, True, lambda bi, hi, n: (bi, hi, n, 0))
    tile_scores = seq_spec(chunk, chunk, True, lambda bi, hi, n: (bi, hi, n, 0))
    shape = jax.ShapeDtypeStruct(v.shape[:-1] + (chunk,), fwd.acc_dtype(v.dtype))
    return pl.pallas_call(
        bwd.dscores_kernel,
        grid=(b, h, s // chunk),
        in_specs=[tile_v, tile_v],
        out_specs=[tile_scores, tile_scores],
        out_shape=[shape, shape],
        compiler_params=_params(config),
        interpret=interpret,
        name="vector_gate_dscores",
    )(v, dout)


def intra_gradients(q, k, cum, dscores_pair, *, config, interpret):
    """-> (dq, dk) [b, s, h, dk] in the accumulation dtype: their terms from inside each chunk, from ``dscores()``'s
    (dA, dA^T); one program per (batch, head, chunk) (``bwd.intra_gradients_kernel``)."""
    b, s, h, dk = q.shape
    chunk = config.chunk_size
    tile_k = seq_spec(chunk, dk, True, lambda bi, hi, n: (bi, hi, n, 0))
    tile_scores = seq_spec(chunk, chunk, True, lambda bi, hi, n: (bi, hi, n, 0))
    shape = jax.ShapeDtypeStruct(q.shape, fwd.acc_dtype(q.dtype))
    return pl.pallas_call(
        functools.partial(bwd.intra_gradients_kernel, sub=config.sub_chunk),
        grid=(b, h, s // chunk),
        in_specs=[tile_k, tile_k, tile_k, tile_scores, tile_scores],
        out_specs=[tile_k, tile_k],
        out_shape=[shape, shape],
        compiler_params=_params(config),
        interpret=interpret,
        name="vector_gate_intra_gradients",
    )(q, k, cum, *dscores_pair)


def backward(q, k, v, cum, all_states, all_dstates, dout, *, config, interpret, scores=None, intra=None,
             seq_major=True, compiler_params=None):
    """-> (dq [n_v, *q.shape], dk like dq, dv like v, dcum [n_v, *q.shape] in the accumulation dtype); the [n_v]
    partials (one per dv block) are summed by the caller. dq and dk are in q's dtype when n_v is 1. With the
    forward's ``scores`` A and ``intra_gradients()``'s ``intra`` (dq, dk) (``config.scores_kernel``), whole-chunk
    matmuls add the rest (``bwd.inter_gradients_kernel``); else one kernel does it all (``bwd.backward_kernel``)."""
    b, s, h, dk, dv = _dims(q, v, seq_major)
    chunk, bv = config.chunk_size, config.block_v
    n_v = dv // bv
    tile_k, tile_v, state = _chunk_specs(chunk, dk, bv, seq_major)
    if seq_major:  # the dv block picks the partial: a leading [n_v] axis
        partial_k = pl.BlockSpec((None, None, chunk, None, dk), lambda bi, hi, n, vi: (vi, bi, n, hi, 0))
    else:
        partial_k = pl.BlockSpec((None, None, None, chunk, dk), lambda bi, hi, n, vi: (vi, bi, hi, n, 0))
    acc = fwd.acc_dtype(q.dtype)
    # Exact results (dv; dq and dk from a single dv block) are written in the caller's dtype, which it would cast
    # them to: one rounding either way, fewer bytes; partial sums and dcum stay in the accumulation dtype.
    partial_shape = jax.ShapeDtypeStruct((n_v,) + q.shape, q.dtype if n_v == 1 else acc)
    dcum_shape = jax.ShapeDtypeStruct((n_v,) + q.shape, acc)
    kernel, operands = functools.partial(bwd.backward_kernel, sub=config.sub_chunk), (q, k, v, cum, all_states,
                                                                                        all_dstates, dout)
    in_specs = [tile_k, tile_k, tile_v, tile_k, state, state, tile_v]
    if scores is not None:
        tile_scores = seq_spec(chunk, chunk, seq_major, lambda bi, hi, n, vi: (bi, hi, n, 0))
        kernel, operands = bwd.inter_gradients_kernel, operands + (scores,) + tuple(intra)
        in_specs += [tile_scores, tile_k, tile_k]
    return pl.pallas_call(
        kernel,
        grid=(b, h, s // chunk, n_v),
        in_specs=in_specs,
        out_specs=[partial_k, partial_k, tile_v, partial_k],
        out_shape=[partial_shape, partial_shape, jax.ShapeDtypeStruct(v.shape, v.dtype), dcum_shape],
        compiler_params=compiler_params or _params(config),
        interpret=interpret,
        name="vector_gate_backward",
    )(*operands)
