"""Backward tile algebra and kernel bodies of the chunked vector-gate (GLA) recurrence, shared by GPU and TPU.

With ``dh`` the gradient of the state leaving a chunk (from the reverse "dstate pass") and ``h`` the state entering
it (from the forward state pass), one chunk's gradients follow from the two lines in ``vector_gate_forward``:

  dq_t  = exp(cum_t) * (do_t h^T)       + sum_{s <= t} dA_ts k_s * exp(cum_t - cum_s)
  dk_s  = exp(last - cum_s) * (v_s dh^T) + sum_{t >= s} dA_ts q_t * exp(cum_t - cum_s)
  dv_s  = (k_s * exp(last - cum_s)) dh   + sum_{t >= s} A_ts do_t,          dA_ts = do_t . v_s
  dh_in = exp(last)^T * dh + (q * exp(cum))^T do

and for the gates, per key dimension, ``dcum_t = q_t * dq_t - k_t * dk_t`` (each cum_t enters with q_t as
exp(+cum_t) and with k_t as exp(-cum_t)) plus, at the chunk's last step,
``dlast = exp(last) * rowsum(h * dh) + sum_s k_s * exp(last - cum_s) * (v_s dh^T)``.
The sub-chunk split is the forward's: a bounded matmul between sub-chunks, an elementwise loop inside one.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.linear_recurrent.vector_gate_forward import earlier_keys, make_dot, masked_decay, pow2_at_least


def previous_dstate(dstate, q, dout, cum, last, dot):
    """The gradient of the state entering a chunk from that of the state leaving it: dstate [bk, bv] float32."""
    q_in = (q * jnp.exp(cum)).astype(q.dtype)
    return jnp.exp(last).T * dstate + dot(q_in, dout, trans_a=True)


def diagonal_backward(q_sub, k_sub, cum_sub, dscores, k_ref, cum_ref, start):
    """Inside the sub-chunk at rows [start, start + sub): (scores A [sub, sub], dq [sub, dk], dk [sub, dk]) given
    dscores = dout_sub v_sub^T; one column s = j per loop step, exp(cum_t - cum_j) only for t >= j."""
    sub = q_sub.shape[0]
    acc = cum_sub.dtype
    q_sub = q_sub.astype(acc)
    rows = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
    cols = lax.broadcasted_iota(jnp.int32, (sub, sub), 1)

    def column(j, carry):
        scores, dq, dk = carry
        k_j = k_ref[pl.ds(start + j, 1), :].astype(acc)
        decay = masked_decay(cum_sub, cum_ref[pl.ds(start + j, 1), :], rows >= j)  # [sub, dk], rows t >= j
        scores = jnp.where(cols == j, jnp.sum(q_sub * k_j * decay, axis=1, keepdims=True), scores)
        dscore_j = jnp.sum(jnp.where(cols == j, dscores, 0.0), axis=1, keepdims=True)  # dA[:, j]
        dq = dq + dscore_j * k_j * decay
        dk = jnp.where(rows == j, jnp.sum(dscore_j * q_sub * decay, axis=0, keepdims=True), dk)
        return scores, dq, dk

    zeros = jnp.zeros(k_sub.shape, acc)
    return lax.fori_loop(0, sub, column, (jnp.zeros((sub, sub), acc), zeros, zeros))


def backward_kernel(q_ref, k_ref, v_ref, cum_ref, state_ref, dstate_ref, dout_ref,
                    dq_ref, dk_ref, dv_ref, dcum_ref, *, sub):
    """One chunk, one dv block: dq, dk and dcum are this block's partials (summed over dv blocks by the caller),
    dv is exact. q/k/cum/dq/dk/dcum [C, dk], v/dout/dv [C, bv], state/dstate [dk, bv]."""
    chunk = q_ref.shape[0]
    dtype = q_ref.dtype
    dot = make_dot(dtype)
    last = cum_ref[pl.ds(chunk - 1, 1), :]
    acc = last.dtype
    dlast = jnp.zeros(last.shape, acc)
    n_sub = chunk // sub
    state, dstate = state_ref[...].astype(dtype), dstate_ref[...].astype(dtype)
    # Tiles are read from their refs where they are used (no whole-chunk tile stays live across sub-chunks), and
    # the products with earlier / later sub-chunks take only the rows those need, rounded up to a power of two.
    for m in range(n_sub):
        start = m * sub
        rows = pl.ds(start, sub)
        q_sub, k_sub, v_sub, dout_sub, cum_sub = (r[rows, :] for r in (q_ref, k_ref, v_ref, dout_ref, cum_ref))
        # Through the states entering and leaving the chunk.
        dq = jnp.exp(cum_sub) * dot(dout_sub, state, trans_b=True)
        to_end = jnp.exp(last - cum_sub)
        dk = to_end * dot(v_sub, dstate, trans_b=True)
        dlast += jnp.sum(k_sub * dk, axis=0, keepdims=True)
        dv = dot((k_sub * to_end).astype(dtype), dstate)
        if m:  # earlier sub-chunks (columns) -> these rows: dq
            earlier = pl.ds(0, pow2_at_least(start))
            ref_row = cum_ref[pl.ds(start - 1, 1), :]
            dscores = dot(dout_sub, v_ref[earlier, :], trans_b=True)  # columns from `start` on meet zero keys
            keys = earlier_keys(k_ref[earlier, :], cum_ref[earlier, :], ref_row, start).astype(dtype)
            dq += jnp.exp(cum_sub - ref_row) * dot(dscores.astype(dtype), keys)
        if m < n_sub - 1:  # these columns -> later sub-chunks' rows: dk, dv
            first = chunk - pow2_at_least(chunk - start - sub)
            later = pl.ds(first, chunk - first)
            ref_row = cum_ref[pl.ds(start + sub - 1, 1), :]
            after = first + lax.broadcasted_iota(jnp.int32, (chunk - first, 1), 0) >= start + sub
            q_hat = jnp.where(after, q_ref[later, :] * masked_decay(cum_ref[later, :], ref_row, after), 0.0)
            q_hat = q_hat.astype(dtype)
            from_ref = jnp.exp(ref_row - cum_sub)
            dout_later = dout_ref[later, :]
            dscores = dot(dout_later, v_sub, trans_b=True)  # rows before `start + sub` meet zero queries
            dk += from_ref * dot(dscores.astype(dtype), q_hat, trans_a=True)
            scores = dot(q_hat, (k_sub * from_ref).astype(dtype), trans_b=True)
            dv += dot(scores.astype(dtype), dout_later, trans_a=True)
        scores, dq_diag, dk_diag = diagonal_backward(q_sub, k_sub, cum_sub, dot(dout_sub, v_sub, trans_b=True),
                                                     k_ref, cum_ref, start)
        dq += dq_diag
        dk += dk_diag
        dv += dot(scores.astype(dtype), dout_sub, trans_a=True)
        dcum = q_sub * dq - k_sub * dk
        if m == n_sub - 1:
            row_sums = jnp.sum(state.astype(acc) * dstate.astype(acc), axis=1, keepdims=True)  # [dk, 1]
            dlast += jnp.exp(last) * row_sums.T
            dcum += jnp.where(lax.broadcasted_iota(jnp.int32, (sub, 1), 0) == sub - 1, dlast, 0.0)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        dcum_ref[rows, :] = dcum.astype(dcum_ref.dtype)
