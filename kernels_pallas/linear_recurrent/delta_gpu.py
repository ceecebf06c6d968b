"""The (gated) delta rule's sequential state pass on GPU (Pallas, Triton backend), forward and reverse.

One program per (batch, head, dv block) carries a float32 state block [dk, block_v] in registers through a
``fori_loop`` over the chunks (all of dk: the correction ``w S`` contracts it; dv blocks are independent). The
algebra is ``delta_math``.

- ``states``: stores the state entering every chunk and the chunk's corrected values U = u0 - w S (what the output
  step needs), returns the final state.
- Both walks read the raw keys K and decay them to the chunk's end in registers, k_out = diag(exp(L - c)) K (off the
  recurrence's chain: it needs loads only), rather than a k_out array from the WY preparation (one [b, s, h, dk] write
  and its read fewer; the plain rule's k_out is K itself). The chunk's total gate L, a scalar load on the chain (the
  state's decay), is loaded a chunk ahead and carried. With both, the gated forward walk went 0.30 -> 0.25 ms (H200,
  B4 S8192 H16 D128 bf16, ``profile_delta_walk_keys_h200.txt``; the two were not timed apart).
- ``dstates``: the reverse, as two kernels. The walk (same grid as ``states``) carries the state gradient from
  the final state's cotangent and writes d u0, d initial_state and the gradient of the state leaving every
  chunk. d w, d K (through k_out: d K = diag(e) d k_out with e = exp(L - c)) and the log gate gradients (d L =
  exp(L) sum(S * dS_next) + sum_t f_t at each chunk's last row of a [s] array, to match the ``cum`` input, and
  -f_t at every row, f_t = e_t (d k_out_t . k_t)) are not on the recurrence's critical path, so a
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
from kernels_pallas.linear_recurrent.chunk_math import exp
from kernels_pallas.linear_recurrent.gpu_forward import (acc_dtype, chunk_specs, chunk_tiles, compiler_params, make_dot,
                                                          seq_spec)


def _chunk_last(cum_ref, start, chunk, gated=True):
    """The total log gate of the chunk from ``start`` (its last inclusive cumulative value) as a scalar, loaded
    alone (no reduction across the chunk's tile); None without a gate."""
    return jnp.sum(cum_ref[pl.ds(start + chunk - 1, 1)]) if gated else None


def _decay_to_end(cum, last):
    """e = exp(L - c) [C] of the chunk's cumulative log gates (every exponent <= 0)."""
    return exp(last - cum)


def _decayed_keys(keys, cum_ref, rows, last):
    """k_out = diag(exp(L - c)) K in the keys' dtype (as the WY preparation rounds it); K itself without a gate."""
    if last is None:
        return keys
    return (keys.astype(last.dtype) * _decay_to_end(cum_ref[rows], last)[:, None]).astype(keys.dtype)


def _states_kernel(w_ref, u0_ref, k_ref, cum_ref, h0_ref, states_ref, u_ref, final_ref, *, chunk, n_chunks,
                   gated):
    dot = make_dot(w_ref.dtype)

    def body(n, carry):
        state, last = carry
        rows = pl.ds(n * chunk, chunk)
        # Every load before the first store: the compiler may not move a load past a store to another buffer.
        w, u0 = w_ref[rows, :], u0_ref[rows, :]
        k_out = _decayed_keys(k_ref[rows, :], cum_ref, rows, last)
        # The next chunk's gate a step ahead, so that its load's latency is off the chain.
        next_last = _chunk_last(cum_ref, jnp.minimum(n + 1, n_chunks - 1) * chunk, chunk, gated)
        states_ref[n] = state.astype(states_ref.dtype)
        u, state = delta_math.advance(w, u0, k_out, last, state, dot)
        u_ref[rows, :] = u.astype(u_ref.dtype)
        return state, next_last

    first = (h0_ref[...].astype(final_ref.dtype), _chunk_last(cum_ref, 0, chunk, gated))
    final_ref[...] = lax.fori_loop(0, n_chunks, body, first)[0]


def _specs(s, dk, bv, n_chunks):
    """Whole-sequence tiles of one (batch, head, dv block): dk-wide, bv-wide, gates, state, all states."""
    seq_k = seq_spec(s, dk, True, lambda bi, hi, vi: (bi, hi, 0, 0))
    seq_v = seq_spec(s, bv, True, lambda bi, hi, vi: (bi, hi, 0, vi))
    gates = pl.BlockSpec((None, None, s), lambda bi, hi, vi: (bi, hi, 0))
    state = pl.BlockSpec((None, None, dk, bv), lambda bi, hi, vi: (bi, hi, 0, vi))
    all_states = pl.BlockSpec((None, None, n_chunks, dk, bv), lambda bi, hi, vi: (bi, hi, 0, 0, vi))
    return seq_k, seq_v, gates, state, all_states


def states(w, u0, k, cum, h0, *, config, interpret, gated=True):
    """w/k (the raw keys) [b, s, h, dk], u0 [b, s, h, dv], cum [b, h, s], h0 [b, h, dk, dv] (acc dtype) ->
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
        compiler_params=compiler_params(config, num_stages=config.walk_stages),
        interpret=interpret,
        name="delta_states",
    )(w, u0, k, cum, h0)


def _dstates_kernel(w_ref, k_ref, cum_ref, du_ref, dstates_ref, dfinal_ref, du0_ref, dleaving_ref, dh0_ref, *,
                    chunk, n_chunks, gated):
    dot = make_dot(w_ref.dtype)

    def body(i, carry):
        dstate, last = carry
        n = n_chunks - 1 - i
        rows = pl.ds(n * chunk, chunk)
        # Every load before the first store (as in ``states``), the output step's dS too; the gate a step ahead.
        w, du, dstate_out = w_ref[rows, :], du_ref[rows, :], dstates_ref[n]
        k_out = _decayed_keys(k_ref[rows, :], cum_ref, rows, last)
        next_last = _chunk_last(cum_ref, jnp.maximum(n - 1, 0) * chunk, chunk, gated)
        # In w's dtype like the stored states: the weights kernel's dots cast their operands to it anyway.
        dleaving_ref[n] = dstate.astype(dleaving_ref.dtype)
        du_tot, dprev = delta_math.retreat_state(w, k_out, du, last, dstate, dot)
        du0_ref[rows, :] = du_tot.astype(du0_ref.dtype)
        return dprev + dstate_out.astype(dprev.dtype), next_last

    first = (dfinal_ref[...].astype(dh0_ref.dtype), _chunk_last(cum_ref, (n_chunks - 1) * chunk, chunk, gated))
    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, first)[0]


def _weights_kernel(u_ref, du0_ref, state_ref, dleaving_ref, cum_ref, k_ref, dw_ref, dk_ref, dcum_ref, *, gated):
    state, dleaving = state_ref[...], dleaving_ref[...]
    dw, dk_out = delta_math.weight_gradients(u_ref[...], du0_ref[...], state, dleaving, make_dot(dw_ref.dtype),
                                             dw_ref.dtype)
    dw_ref[...] = dw.astype(dw_ref.dtype)
    if not gated:  # k_out = K
        dk_ref[...] = dk_out.astype(dk_ref.dtype)
        dcum_ref[...] = jnp.zeros(dcum_ref.shape, dcum_ref.dtype)
        return
    # Through k_out = diag(e) K, e = exp(L - c): d K = diag(e) d k_out, and f_t = e_t (d k_out_t . k_t) enters
    # d c_t with -1 and d L with +1; d L also gets the state decay's exp(L) sum(S * dS_next). All at the last row
    # (the layout of the cum input).
    _, is_last = chunk_tiles(dcum_ref.shape[0])
    last = _chunk_last(cum_ref, 0, dcum_ref.shape[0])
    decay = _decay_to_end(cum_ref[...], last)
    dk_ref[...] = (decay[:, None] * dk_out).astype(dk_ref.dtype)
    f = decay * jnp.sum(dk_out * k_ref[...].astype(dk_out.dtype), axis=1)
    dlast = delta_math.gate_gradient(last, state, dleaving, keepdims=False) + jnp.sum(f)
    dcum_ref[...] = (jnp.where(is_last, dlast, 0.0) - f).astype(dcum_ref.dtype)


def dstates(w, k, cum, all_states, u, dall_states, du, dfinal, *, config, interpret, gated=True):
    """Reverse of ``states`` given the cotangents of its outputs (dall_states, du, dfinal) ->
    (d u0 like u, d w [1, *w.shape] in w's dtype, d k like d w, d cum [1, b, h, s] in the accumulation
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
        compiler_params=compiler_params(config, num_stages=config.walk_stages),
        interpret=interpret,
        name="delta_dstates",
    )(w, k, cum, du, dall_states, dfinal)
    tile_k, tile_v, cum_spec, chunk_state = chunk_specs(chunk, dk, dv)
    whole_k = pl.BlockSpec((None, None, chunk, None, dk), lambda bi, hi, n: (0, bi, n, hi, 0))
    whole_cum = pl.BlockSpec((None, None, None, chunk), lambda bi, hi, n: (0, bi, hi, n))
    dw, dk, dcum = pl.pallas_call(
        functools.partial(_weights_kernel, gated=gated),
        grid=(b, h, n_chunks),
        in_specs=[tile_v, tile_v, chunk_state, chunk_state, cum_spec, tile_k],
        out_specs=[whole_k, whole_k, whole_cum],
        out_shape=[jax.ShapeDtypeStruct((1,) + w.shape, w.dtype)] * 2
        + [jax.ShapeDtypeStruct((1,) + cum.shape, acc_dtype(w.dtype))],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="delta_dstates_weights",
    )(u, du0, all_states, dleaving, cum, k)
    return du0, dw, dk, dcum, dh0
