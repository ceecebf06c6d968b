"""The (gated) delta rule's sequential state pass on GPU (Pallas, Triton backend), forward and reverse.

One program per (batch, head, dv block) carries a float32 state block [dk, block_v] in registers through a
``fori_loop`` over the chunks (all of dk: the correction ``w S`` contracts it; dv blocks are independent). The
algebra is ``delta_math``.

- ``states``: stores the state entering every chunk and the chunk's corrected values U = u0 - w S (what the output
  step needs), returns the final state.
- ``dstates``: the reverse, as two kernels. The walk (same grid as ``states``) carries the state gradient from
  the final state's cotangent and writes d u0, d initial_state and the gradient of the state leaving every
  chunk. d w, d k_out and the chunks' total log gate gradients (d L = exp(L) sum(S * dS_next), at each chunk's
  last row of a [s] array, to match the ``cum`` input) are not on the recurrence's critical path, so a
  chunk-parallel kernel (one program per (batch, head, chunk), whole dv) computes them from the stored states and
  state gradients afterwards: this takes two of the walk's four dots per chunk, its read of the stored state and
  its whole-tile reduction out of the sequential loop, and covering all of dv at once writes the results whole
  instead of as partial sums over dv blocks.

Inputs are in the caller's [batch, seq, heads, dim] layout (the BlockSpecs pick one head's rows), cum heads-first
[batch, heads, seq], padded by ``delta_ops``: sequence to a chunk multiple, head dims to powers of two >= 16
(Triton's dot needs them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.linear_recurrent import delta_math
from kernels_pallas.linear_recurrent.gpu_forward import (acc_dtype, chunk_specs, chunk_tiles, compiler_params, make_dot,
                                                          seq_spec)


def _chunk_last(cum_ref, start, chunk, gated=True):
    """The total log gate of the chunk from ``start`` (its last inclusive cumulative value) as a scalar, loaded
    alone (no reduction across the chunk's tile); None without a gate."""
    return jnp.sum(cum_ref[pl.ds(start + chunk - 1, 1)]) if gated else None


def _states_kernel(w_ref, u0_ref, kout_ref, cum_ref, h0_ref, states_ref, u_ref, final_ref, *, chunk, n_chunks,
                   gated):
    dot = make_dot(w_ref.dtype)

    def body(n, state):
        rows = pl.ds(n * chunk, chunk)
        # Every load before the first store: the compiler may not move a load past a store to another buffer.
        w, u0, k_out = w_ref[rows, :], u0_ref[rows, :], kout_ref[rows, :]
        last = _chunk_last(cum_ref, n * chunk, chunk, gated)
        states_ref[n] = state.astype(states_ref.dtype)
        u, state = delta_math.advance(w, u0, k_out, last, state, dot)
        u_ref[rows, :] = u.astype(u_ref.dtype)
        return state

    final_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(final_ref.dtype))


def _specs(s, dk, bv, n_chunks):
    """Whole-sequence tiles of one (batch, head, dv block): dk-wide, bv-wide, gates, state, all states."""
    seq_k = seq_spec(s, dk, True, lambda bi, hi, vi: (bi, hi, 0, 0))
    seq_v = seq_spec(s, bv, True, lambda bi, hi, vi: (bi, hi, 0, vi))
    gates = pl.BlockSpec((None, None, s), lambda bi, hi, vi: (bi, hi, 0))
    state = pl.BlockSpec((None, None, dk, bv), lambda bi, hi, vi: (bi, hi, 0, vi))
    all_states = pl.BlockSpec((None, None, n_chunks, dk, bv), lambda bi, hi, vi: (bi, hi, 0, 0, vi))
    return seq_k, seq_v, gates, state, all_states


def states(w, u0, k_out, cum, h0, *, config, interpret, gated=True):
    """w/k_out [b, s, h, dk], u0 [b, s, h, dv], cum [b, h, s], h0 [b, h, dk, dv] (acc dtype) ->
    (states entering each chunk [b, h, n, dk, dv] and U like u0, both in w's dtype; final state like h0).
    ``gated=False``: no gate (cum is not read)."""
    b, s, h, dk = w.shape
    dv = u0.shape[-1]
    chunk, bv = config.chunk_size, config.block_v
    n_chunks = s // chunk
    seq_k, seq_v, gates, state, all_states = _specs(s, dk, bv, n_chunks)
    return pl.pallas_call(
        functools.partial(_states_kernel, chunk=chunk, n_chunks=n_chunks, gated=gated),
        grid=(b, h, dv // bv),
        in_specs=[seq_k, seq_v, seq_k, gates, state],
        out_specs=[all_states, seq_v, state],
        out_shape=[jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), w.dtype), jax.ShapeDtypeStruct(u0.shape, w.dtype),
                   jax.ShapeDtypeStruct(h0.shape, h0.dtype)],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="delta_states",
    )(w, u0, k_out, cum, h0)


def _dstates_kernel(w_ref, kout_ref, cum_ref, du_ref, dstates_ref, dfinal_ref, du0_ref, dleaving_ref, dh0_ref, *,
                    chunk, n_chunks, gated):
    dot = make_dot(w_ref.dtype)

    def body(i, dstate):
        n = n_chunks - 1 - i
        rows = pl.ds(n * chunk, chunk)
        # Every load before the first store (as in ``states``), the output step's dS too.
        w, k_out, du, dstate_out = w_ref[rows, :], kout_ref[rows, :], du_ref[rows, :], dstates_ref[n]
        last = _chunk_last(cum_ref, n * chunk, chunk, gated)
        # In w's dtype like the stored states: the weights kernel's dots cast their operands to it anyway.
        dleaving_ref[n] = dstate.astype(dleaving_ref.dtype)
        du_tot, dprev = delta_math.retreat_state(w, k_out, du, last, dstate, dot)
        du0_ref[rows, :] = du_tot.astype(du0_ref.dtype)
        return dprev + dstate_out.astype(dprev.dtype)

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dfinal_ref[...].astype(dh0_ref.dtype))


def _weights_kernel(u_ref, du0_ref, state_ref, dleaving_ref, cum_ref, dw_ref, dkout_ref, dcum_ref, *, gated):
    state, dleaving = state_ref[...], dleaving_ref[...]
    dw, dk_out = delta_math.weight_gradients(u_ref[...], du0_ref[...], state, dleaving, make_dot(dw_ref.dtype),
                                             dw_ref.dtype)
    dw_ref[...] = dw.astype(dw_ref.dtype)
    dkout_ref[...] = dk_out.astype(dkout_ref.dtype)
    if gated:  # the chunk's total log gate's gradient, at its last row (the layout of the cum input)
        _, is_last = chunk_tiles(dcum_ref.shape[0])
        last = _chunk_last(cum_ref, 0, dcum_ref.shape[0])
        dlast = delta_math.gate_gradient(last, state, dleaving, keepdims=False)
        dcum_ref[...] = jnp.where(is_last, dlast, 0.0).astype(dcum_ref.dtype)
    else:
        dcum_ref[...] = jnp.zeros(dcum_ref.shape, dcum_ref.dtype)


def dstates(w, k_out, cum, all_states, u, dall_states, du, dfinal, *, config, interpret, gated=True):
    """Reverse of ``states`` given the cotangents of its outputs (dall_states, du, dfinal) ->
    (d u0 like u, d w [1, *w.shape] in w's dtype, d k_out like d w, d cum [1, b, h, s] in the accumulation
    dtype, d h0 like dfinal). The leading axes of size 1 keep the partial-sum contract of ``delta_tpu.dstates``
    (sums over dv blocks), which the caller sums: here the weights kernel covers all of dv. ``gated=False``: d cum
    is zeros (no gate)."""
    b, s, h, dk = w.shape
    dv = u.shape[-1]
    chunk, bv = config.chunk_size, config.block_v
    n_chunks, n_v = s // chunk, dv // bv
    seq_k, seq_v, gates, state, all_states_spec = _specs(s, dk, bv, n_chunks)
    du0, dleaving, dh0 = pl.pallas_call(
        functools.partial(_dstates_kernel, chunk=chunk, n_chunks=n_chunks, gated=gated),
        grid=(b, h, n_v),
        in_specs=[seq_k, seq_k, gates, seq_v, all_states_spec, state],
        out_specs=[seq_v, all_states_spec, state],
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(all_states.shape, w.dtype),
                   jax.ShapeDtypeStruct(dfinal.shape, dfinal.dtype)],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="delta_dstates",
    )(w, k_out, cum, du, dall_states, dfinal)
    _, tile_v, cum_spec, chunk_state = chunk_specs(chunk, dk, dv)
    whole_k = pl.BlockSpec((None, None, chunk, None, dk), lambda bi, hi, n: (0, bi, n, hi, 0))
    whole_cum = pl.BlockSpec((None, None, None, chunk), lambda bi, hi, n: (0, bi, hi, n))
    dw, dk_out, dcum = pl.pallas_call(
        functools.partial(_weights_kernel, gated=gated),
        grid=(b, h, n_chunks),
        in_specs=[tile_v, tile_v, chunk_state, chunk_state, cum_spec],
        out_specs=[whole_k, whole_k, whole_cum],
        out_shape=[jax.ShapeDtypeStruct((1,) + w.shape, w.dtype)] * 2
        + [jax.ShapeDtypeStruct((1,) + cum.shape, acc_dtype(w.dtype))],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="delta_dstates_weights",
    )(u, du0, all_states, dleaving, cum)
    return du0, dw, dk_out, dcum, dh0
