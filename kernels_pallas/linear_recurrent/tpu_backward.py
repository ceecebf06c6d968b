"""Chunk-parallel backward on TPU (Pallas, Mosaic TPU backend); same contract as ``gpu_backward``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.linear_recurrent import chunk_math
from kernels_pallas.linear_recurrent.gpu_forward import acc_dtype
from kernels_pallas.linear_recurrent.tpu_forward import chunk_specs, chunk_tiles, gate_inputs, make_dot


def _gradient_kernel(q_ref, k_ref, v_ref, dout_ref, cum_col_ref, cum_row_ref, state_ref, dstate_ref,
                     dq_ref, dk_ref, dv_ref, dcum_ref):
    chunk = q_ref.shape[0]
    causal, is_last = chunk_tiles(chunk)
    cum_row = cum_row_ref[...]
    dq, dk, dv, dcum, dlast = chunk_math.chunk_gradients(
        q_ref[...], k_ref[...], v_ref[...], dout_ref[...], cum_col_ref[...], cum_row, cum_row[:, chunk - 1:],
        causal, state_ref[...], dstate_ref[...], make_dot(q_ref.dtype), keepdims=True)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dcum_ref[...] = (dcum + jnp.where(is_last, dlast, 0.0)).astype(dcum_ref.dtype)


def gradients(q, k, v, dout, cum, states, dstates, *, config, interpret):
    """Same contract as ``gpu_backward.gradients``."""
    b, h, s, dk = q.shape
    dv = v.shape[-1]
    chunk = config.chunk_size
    qk_spec, v_spec, col_spec, row_spec, state_spec = chunk_specs(chunk, dk, dv)
    dq, dk_, dv_, dcum = pl.pallas_call(
        _gradient_kernel,
        grid=(b, h, s // chunk),
        in_specs=[qk_spec, qk_spec, v_spec, v_spec, col_spec, row_spec, state_spec, state_spec],
        out_specs=[qk_spec, qk_spec, v_spec, col_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b, h, s, 1), acc_dtype(q.dtype))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        interpret=interpret,
        name="scalar_gate_gradients_tpu",
    )(q, k, v, dout, *gate_inputs(cum), states, dstates)
    return dq, dk_, dv_, dcum[..., 0]
