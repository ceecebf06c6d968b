"""Tile algebra of the (gated) delta rule's kernels, shared by the GPU and TPU builds (pure jnp on loaded tiles).

The sequential state pass. Per chunk n, from the WY preparation of ``delta_chunk`` (w [C, dk], u0 [C, bv],
k_out [C, dk]) and the chunk's total log gate L (``last``), the state block S [dk, bv] (a block of value columns:
every line below is separable over dv, so dv blocks are independent; dk is not, since w S contracts it):

  U      = u0 - w S                        (the chunk's corrected values, emitted for the output step)
  S_next = exp(L) S + k_out^T U

Reverse, with dS_next the gradient of the state leaving the chunk and dU the output step's gradient of U:

  dU_tot  = dU + k_out dS_next             (= d u0)
  d k_out = U dS_next^T
  d w     = -dU_tot S^T
  d L     = exp(L) sum(S * dS_next)
  dS      = exp(L) dS_next - w^T dU_tot    (+ the output step's gradient of the stored S, added by the caller)

The output step (chunk-parallel), with c the chunk's inclusive cumulative log gates and D_ts = exp(c_t - c_s) for
s <= t (else 0): O = ((Q K^T) * D) U + (Q * exp(c)) S, which is the scalar-gate kernel's ``chunk_math.chunk_output``
with U for V (so the forward reuses ``gpu_forward.output`` / ``tpu_forward.output``). Its gradients:

  dP = (dO U^T) * D,  dQ = dP K + (dO * exp(c)) S^T,  dK = dP^T Q,  dU = ((Q K^T) * D)^T dO,
  dS = (Q * exp(c))^T dO,  dc_t = q_t . dq_t - k_t . dk_t

(each c enters as exp(c_t - c_s) paired with q_t and k_s, or as exp(c_t) paired with q_t).

``dot(a, b, trans_a, trans_b)`` accumulates in float32 (float64 for float64); operands are cast to the input dtype
first, so bf16 inputs run bf16 matmuls while the carried state stays float32.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas.linear_recurrent.chunk_math import acc_dtype, decayed, exp, scaled


def total(x, keepdims):
    """Sum of a 2-D tile as two one-axis reductions (what both backends lower); [1, 1] with ``keepdims``."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=keepdims), axis=0, keepdims=keepdims)


def advance(w, u0, k_out, last, state, dot):
    """-> (U [C, bv], state leaving the chunk [dk, bv]), both in the accumulation dtype; ``last`` None: no gate."""
    u = u0.astype(state.dtype) - dot(w, state.astype(w.dtype))
    return u, decay(last, state) + dot(k_out, u.astype(k_out.dtype), trans_a=True)


def decay(last, state):
    """exp(L) S, or S itself when ``last`` is None (no gate: no exp, no product)."""
    return state if last is None else exp(last) * state


def retreat(w, k_out, u, du, last, state, dstate, dot, keepdims):
    """-> (d u0 [C, bv], d w [C, dk], d k_out [C, dk], d L, dS [dk, bv] without the stored state's own gradient).

    ``state`` is the state entering the chunk, ``dstate`` the gradient of the one leaving it; ``d L`` is [1, 1]
    with ``keepdims`` (TPU), else a scalar.
    """
    du_tot, dprev = retreat_state(w, k_out, du, last, dstate, dot)
    dw, dk_out = weight_gradients(u, du_tot, state, dstate, dot, w.dtype)
    return du_tot, dw, dk_out, gate_gradient(last, state, dstate, keepdims), dprev


def retreat_state(w, k_out, du, last, dstate, dot):
    """The part of ``retreat`` on the recurrence's critical path -> (d u0, dS), as in ``retreat``."""
    acc = dstate.dtype
    dtype = w.dtype
    du_tot = du.astype(acc) + dot(k_out, dstate.astype(dtype))
    dprev = decay(last, dstate) - dot(w, du_tot.astype(dtype), trans_a=True)
    return du_tot, dprev


def gate_gradient(last, state, dstate, keepdims):
    """d L = exp(L) sum(S * dS_next), off the critical path (it needs no carried value but dS_next)."""
    acc = acc_dtype(dstate.dtype)  # the GPU build passes the stored (16-bit for bf16 inputs) dS_next
    return exp(last) * total(state.astype(acc) * dstate.astype(acc), keepdims)


def weight_gradients(u, du_tot, state, dstate, dot, dtype):
    """The part of ``retreat`` off the critical path -> (d w [C, dk], d k_out [C, dk]); the products run in
    ``dtype`` (w's). Summed over the value columns, so [C, dv] / [dk, dv] tiles give whole results."""
    dk_out = dot(u.astype(dtype), dstate.astype(dtype), trans_b=True)
    dw = -dot(du_tot.astype(dtype), state.astype(dtype), trans_b=True)
    return dw, dk_out


def output_gradients(q, k, u, dout, cum_col, cum_row, causal, state, dot, keepdims):
    """Gradients of one chunk's output: q/k [C, dk], u/dout [C, dv], cum_col [C, 1], cum_row [1, C], state
    [dk, dv] (entering the chunk) -> (dq, dk, du, dcum [C, 1] with ``keepdims`` else [C], d state). Without a
    gate (cum_col and cum_row None) no exp at all, and dcum is None."""
    scores = decayed(dot(q, k, trans_b=True), cum_col, cum_row, causal)
    dscores = decayed(dot(dout, u, trans_b=True), cum_col, cum_row, causal)
    dq = dot(dscores.astype(k.dtype), k) + dot(scaled(dout, cum_col).astype(dout.dtype), state.astype(dout.dtype),
                                               trans_b=True)
    dk = dot(dscores.astype(q.dtype), q, trans_a=True)
    du = dot(scores.astype(dout.dtype), dout, trans_a=True)
    dstate = dot(scaled(q, cum_col).astype(q.dtype), dout, trans_a=True)
    dcum = None if cum_col is None else jnp.sum(q * dq - k * dk, axis=1, keepdims=keepdims)
    return dq, dk, du, dcum, dstate
