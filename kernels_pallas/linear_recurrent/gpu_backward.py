"""Chunk-parallel backward on GPU (Pallas, Triton backend).

One program per (batch, head, chunk) takes the state entering the chunk and the gradient of the state leaving it
(from ``gpu_states``) and gives dq, dk, dv and the gradient of the cumulative log gates of that chunk
(``chunk_math.chunk_gradients``). Whole heads per program: dq, dk and the gate gradient contract over dv and dv
over dk, so splitting either would need partial sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.linear_recurrent import chunk_math
from kernels_pallas.linear_recurrent.gpu_forward import (acc_dtype, chunk_specs, chunk_tiles, compiler_params,
                                                          gate_tiles, make_dot)


def _gradient_kernel(q_ref, k_ref, v_ref, dout_ref, cum_ref, state_ref, dstate_ref,
                     dq_ref, dk_ref, dv_ref, dcum_ref, *, gated):
    causal, is_last = chunk_tiles(q_ref.shape[0])
    cum_col, cum_row, last = gate_tiles(cum_ref, slice(None), gated)
    dq, dk, dv, dcum, dlast = chunk_math.chunk_gradients(
        q_ref[...], k_ref[...], v_ref[...], dout_ref[...], cum_col, cum_row, last, causal,
        state_ref[...], dstate_ref[...], make_dot(q_ref.dtype), keepdims=False)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if gated:
        dcum_ref[...] = (dcum + jnp.where(is_last, dlast, 0.0)).astype(dcum_ref.dtype)
    else:  # no gate: nothing depends on the (zero) cum
        dcum_ref[...] = jnp.zeros(dcum_ref.shape, dcum_ref.dtype)


def gradients(q, k, v, dout, cum, states, dstates, *, config, interpret, gated=True):
    """states: entering each chunk, dstates: gradient of the state leaving each chunk ([b, h, n, dk, dv]) ->
    (dq, dk [b, s, h, dk], dv [b, s, h, dv] in q's dtype, dcum [b, h, s] in the accumulation dtype); q, k, v,
    dout [b, s, h, d], cum [b, h, s]."""
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    chunk = config.chunk_size
    qk_spec, v_spec, cum_spec, state_spec = chunk_specs(chunk, dk, dv)
    return pl.pallas_call(
        functools.partial(_gradient_kernel, gated=gated),
        grid=(b, h, s // chunk),
        in_specs=[qk_spec, qk_spec, v_spec, v_spec, cum_spec, state_spec, state_spec],
        out_specs=[qk_spec, qk_spec, v_spec, cum_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(cum.shape, acc_dtype(q.dtype))],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="scalar_gate_gradients",
    )(q, k, v, dout, cum, states, dstates)
