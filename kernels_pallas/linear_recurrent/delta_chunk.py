"""The WY preparation of the chunked (gated) delta rule, in plain JAX (XLA, differentiated by JAX's autodiff): the
state-independent part of every chunk, computed in parallel before the sequential state pass. On the GPU build the
triangular solve is replaced by an explicit inverse T from a Pallas kernel (``delta_inverse_gpu``) and two matmuls,
or by default by one kernel doing all of it (``delta_inverse_gpu.fused_prepare``).

Recurrence ("Parallelizing Linear Transformers with the Delta Rule over Sequence Length"; gated: "Gated Delta
Networks: Improving Mamba2 with Delta Rule"), state S [dk, dv] (the papers' transpose):

  S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t,   a_t = exp(g_t)

Inside a chunk of C steps let c_t = g_1 + ... + g_t (inclusive, from the chunk start; c_t <= 0), L = c_C, S0 the
state entering the chunk. Writing S_t = exp(c_t) S0 + sum_{s<=t} exp(c_t - c_s) k_s u_s^T, the new value
u_t = beta_t (v_t - (a_t S_{t-1})^T k_t) unrolls to

  u_t + sum_{s<t} beta_t exp(c_t - c_s) (k_t . k_s) u_s = beta_t v_t - beta_t exp(c_t) S0^T k_t

i.e. (I + A) U = diag(beta) V - diag(beta exp(c)) K S0 with A strictly lower triangular. With
T = (I + A)^-1 (the UT transform) this is U = U0 - W S0, U0 = T diag(beta) V, W = T diag(beta exp(c)) K, both
independent of S0, so every chunk solves its triangular system in parallel. Then

  S1  = exp(L) S0 + (K * exp(L - c))^T U                    (the sequential pass: ``delta_gpu`` / ``delta_tpu``)
  O   = (Q * exp(c)) S0 + ((Q K^T) * exp(c_t - c_s) [s <= t]) U   (``delta_output_gpu`` / ``delta_output_tpu``)

Only differences c_t - c_s with s <= t (and L - c_s, c_t) are exponentiated: every exponent is <= 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.linear_recurrent.chunk_math import exp


def decay_matrix(cum, inclusive: bool):
    """exp(c_t - c_s) for s <= t (s < t when not inclusive), else 0: cum [..., C] -> [..., C, C].

    Masked before the exp (the s > t differences are positive and could overflow), and masked again so that their
    gradients are exactly zero.
    """
    t = jnp.arange(cum.shape[-1])
    keep = (t[:, None] >= t[None, :]) if inclusive else (t[:, None] > t[None, :])
    diff = cum[..., :, None] - cum[..., None, :]
    return jnp.where(keep, exp(jnp.where(keep, diff, 0.0)), 0.0)


def wy_matrix(gram, beta, cum):
    """The strictly lower triangular A of one chunk (or a batch of them) from the keys' Gram matrix
    ``gram`` = K K^T [..., C, C], beta and cum [..., C]: A_ts = beta_t exp(c_t - c_s) (k_t . k_s) for s < t, else 0.

    Plain jnp on whole tiles, so that the XLA path, the GPU inverse kernel and its custom VJP build A alike.
    """
    return beta[..., :, None] * decay_matrix(cum, inclusive=False) * gram


def to_chunks(x, chunk):
    """[b, s, h, d] -> heads-first chunks [b, h, n, C, d] (s = n C); [b, s, h] -> [b, h, n, C]."""
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape(x.shape[:2] + (x.shape[2] // chunk, chunk) + x.shape[3:])


def from_chunks(x):
    """Heads-first chunks [b, h, n, C, d] -> [b, s, h, d] (``to_chunks``' inverse)."""
    return jnp.swapaxes(x.reshape(x.shape[:2] + (-1,) + x.shape[4:]), 1, 2)


def wy_prepare(k, v, beta, cum, inverse=None, precision=None):
    """The state-independent parts of every chunk.

    k [b, h, n, C, dk], v [b, h, n, C, dv], beta and cum [b, h, n, C] (all in the accumulation dtype) ->
    (u0 [.., C, dv], w [.., C, dk], k_out [.., C, dk]) with U = u0 - w S0 the chunk's new values and
    k_out = K * exp(L - c) the keys decayed to the chunk end.

    ``inverse``: None: one unit lower-triangular solve per chunk in XLA (``jax.lax.linalg.triangular_solve``, and
    JAX's autodiff of it), what the TPU build runs. Else a function (k, beta, cum) -> T = (I + A)^-1 [.., C, C]
    with its own VJP (``delta_inverse_gpu.inverse``), applied with two batched matmuls at ``precision``:
    u0 = T diag(beta) V, w = T diag(beta exp(c)) K (fla's layout). The GPU build's default does all of this in
    one kernel instead (``delta_inverse_gpu.fused_prepare``).
    """
    k_out = k * exp(cum[..., -1:] - cum)[..., None]
    v_in = beta[..., None] * v
    k_in = (beta * exp(cum))[..., None] * k
    if inverse is not None:
        t = inverse(k, beta, cum)
        u0, w = (jnp.einsum("...ts,...sd->...td", t, x, precision=precision) for x in (v_in, k_in))
        return u0, w, k_out
    chunk = k.shape[-2]
    gram = jnp.einsum("...td,...sd->...ts", k, k)
    lower = jnp.eye(chunk, dtype=k.dtype) + wy_matrix(gram, beta, cum)
    # One unit lower-triangular solve per chunk for both right-hand sides (T applied without forming it).
    sol = jax.lax.linalg.triangular_solve(lower, jnp.concatenate([v_in, k_in], axis=-1), left_side=True,
                                          lower=True, unit_diagonal=True)
    dv = v.shape[-1]
    return sol[..., :dv], sol[..., dv:], k_out
