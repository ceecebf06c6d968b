"""The per-chunk algebra shared by the GPU and TPU kernels (pure jnp on loaded tiles).

Inside one chunk of C steps, with ``c_t`` the inclusive cumulative log gate from the chunk start (so ``c_t <= 0``
and non-increasing), ``L = c_{C-1}``, ``S0`` the state entering the chunk and ``S1`` the state leaving it:

  o_t  = sum_{s <= t} exp(c_t - c_s) (q_t . k_s) v_s  +  exp(c_t) q_t S0
  S1   = exp(L) S0 + sum_s exp(L - c_s) k_s^T v_s

Every exponent is <= 0 (``c_t - c_s`` only for ``s <= t``, masked before the exp), so no decay strength
overflows. Backward, with ``dS1`` the gradient of the state leaving the chunk (everything later chunks and the
final state's cotangent send back):

  dS0  = exp(L) dS1 + sum_t exp(c_t) q_t^T do_t                    (the sequential reverse pass)
  dq, dk, dv from the two lines above given S0 and dS1             (parallel over chunks)

For the gate it uses ``dc_t = q_t . dq_t - k_t . dk_t`` (+ ``dL`` at the last step), which holds because each ``c``
enters as ``exp(c_t - c_s)`` paired with q_t and k_s, or as ``exp(L - c_s)`` and ``exp(c_t)`` paired likewise.

``dot(a, b, trans_a=False, trans_b=False)`` is the backend's matmul accumulating in float32 (float64 for
float64). Products whose operands are float32 intermediates are cast to the input dtype first, as flash
kernels do, so that bf16 inputs run bf16 matmuls; accumulation and the carried state stay float32.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


LOG2_E = 1.4426950408889634


def exp(x):
    """e^x as 2^(x log2 e), the kernels' exponential. Pallas' Triton lowering sends float32 ``jnp.exp`` to
    libdevice's ``expf`` (a range reduction of about ten instructions around one MUFU.EX2) and ``jnp.exp2`` to the
    bare MUFU.EX2 that Triton's own ``exp`` emits; the GLA kernels exponentiate whole [sub, dk] tiles (a quarter to
    43 % fewer SASS instructions). Relative error ~|x| 2^-24 on top of ex2's 2 ulp; exponents are <= 0, or at most
    the GLA kernels' FACTORED_SPAN."""
    return jnp.exp2(x * LOG2_E)


def acc_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def make_dot(dtype):
    """lax.dot_general accumulating in the accumulation dtype; exact (not tf32) products for float32 inputs: the
    TPU builds' ``dot`` (the Triton builds have their own, in gpu_forward)."""
    precision = lax.Precision.HIGHEST if dtype in (jnp.float32, jnp.float64) else None
    acc = acc_dtype(dtype)

    def dot(a, b, trans_a=False, trans_b=False):
        dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
        return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=acc)

    return dot


def decay_matrix(cum_col, cum_row, causal):
    """exp(c_t - c_s) where s <= t, else 0. cum_col [C, 1], cum_row [1, C], causal [C, C] bool."""
    return jnp.where(causal, exp(jnp.where(causal, cum_col - cum_row, 0.0)), 0.0)


def decayed(x, cum_col, cum_row, causal):
    """x [C, C] times exp(c_t - c_s) where s <= t, else 0; without a gate (cum_col None) the causal mask alone."""
    if cum_col is None:
        return jnp.where(causal, x, 0.0)
    return x * decay_matrix(cum_col, cum_row, causal)


def scaled(x, exponent):
    """x * exp(exponent); x itself without a gate (exponent None)."""
    return x if exponent is None else x * exp(exponent)


def total(x, keepdims):
    """Sum of a 2-D tile as two one-axis reductions (what both backends lower); [1, 1] with ``keepdims``."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=keepdims), axis=0, keepdims=keepdims)


def chunk_output(q, k, v, cum_col, cum_row, causal, state, dot):
    """Output of one chunk [C, bv] (float32) given the state entering it [dk, bv]."""
    scores = decayed(dot(q, k, trans_b=True), cum_col, cum_row, causal)
    # exp(c_t) scales rows of the float32 product (as fla does), not q: fewer elements at dk > bv, no rounding
    return dot(scores.astype(v.dtype), v) + scaled(dot(q, state.astype(q.dtype)), cum_col)


def _to_end(cum_col, last):
    return None if cum_col is None else last - cum_col


def advance_state(k, v, cum_col, last, state, dot):
    """State leaving the chunk (float32) from the state entering it; k [C, bk], v [C, bv], state [bk, bv]."""
    k_out = scaled(k, _to_end(cum_col, last)).astype(k.dtype)
    return scaled(state, last) + dot(k_out, v, trans_a=True)


def retreat_dstate(q, dout, cum_col, last, dstate, dot):
    """Gradient of the state entering the chunk from that of the state leaving it; q [C, bk], dout [C, bv]."""
    q_in = scaled(q, cum_col).astype(q.dtype)
    return scaled(dstate, last) + dot(q_in, dout, trans_a=True)


def chunk_gradients(q, k, v, dout, cum_col, cum_row, last, causal, state, dstate, dot, keepdims):
    """Gradients of one chunk given the state entering it and the gradient of the state leaving it.

    Returns (dq [C, dk], dk [C, dk], dv [C, dv], dcum [C, 1] with ``keepdims`` else [C], dlast): ``dcum`` is
    ``q_t . dq_t - k_t . dk_t``; the caller adds ``dlast`` ([1, 1] with ``keepdims``, else a scalar) to the
    chunk's last step. Without a gate (cum_col, cum_row and last None) dcum and dlast are None.
    """
    scores = decayed(dot(q, k, trans_b=True), cum_col, cum_row, causal)
    dscores = decayed(dot(dout, v, trans_b=True), cum_col, cum_row, causal)
    to_end = _to_end(cum_col, last)  # decay from step s to the chunk end (cum_col: from the chunk start to t)
    dstate_in = dstate.astype(v.dtype)
    # The per-step decays scale rows of the products with the states, as in chunk_output.
    dq = dot(dscores.astype(k.dtype), k) + scaled(dot(dout, state.astype(dout.dtype), trans_b=True), cum_col)
    dk_state = scaled(dot(v, dstate_in, trans_b=True), to_end)
    dk = dot(dscores.astype(q.dtype), q, trans_a=True) + dk_state
    dv = dot(scores.astype(dout.dtype), dout, trans_a=True) + scaled(dot(k, dstate_in), to_end)
    if cum_col is None:
        return dq, dk, dv, None, None
    dcum = jnp.sum(q * dq - k * dk, axis=1, keepdims=keepdims)
    state_term = total(state.astype(dk_state.dtype) * dstate.astype(dk_state.dtype), keepdims)
    dlast = exp(last) * state_term + total(k * dk_state, keepdims)
    return dq, dk, dv, dcum, dlast
