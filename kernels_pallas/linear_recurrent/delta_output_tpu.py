"""The (gated) delta rule's chunk-parallel output step on TPU (Pallas, Mosaic TPU backend); same contracts as
``delta_output_gpu``. The cumulative gates come as a column [chunk, 1] and a row [1, chunk], so that the decay
matrix needs no transpose in the kernel (the row's lane axis is the chunk: a multiple of 128 on a real TPU).
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.linear_recurrent import delta_math, tpu_forward
from kernels_pallas.linear_recurrent.gpu_forward import acc_dtype
from kernels_pallas.linear_recurrent.tpu_forward import chunk_specs, chunk_tiles, gate_inputs, make_dot


def output(q, k, u, cum, all_states, *, config, interpret):
    """Same contract as ``delta_output_gpu.output``."""
    return tpu_forward.output(q, k, u, cum, all_states, config=config, interpret=interpret)


def _gradient_kernel(q_ref, k_ref, u_ref, dout_ref, cum_col_ref, cum_row_ref, state_ref, *grad_refs):
    """grad_refs: dq, dk, du, dcum [chunk, 1], dstate."""
    causal, _ = chunk_tiles(q_ref.shape[0])
    grads = delta_math.output_gradients(
        q_ref[...], k_ref[...], u_ref[...], dout_ref[...], cum_col_ref[...], cum_row_ref[...], causal,
        state_ref[...], make_dot(q_ref.dtype), keepdims=True)
    for ref, grad in zip(grad_refs, grads):
        ref[...] = grad.astype(ref.dtype)


def output_gradients(q, k, u, dout, cum, all_states, *, config, interpret):
    """Same contract as ``delta_output_gpu.output_gradients``."""
    b, h, s, dk = q.shape
    dv = u.shape[-1]
    chunk = config.chunk_size
    qk_spec, v_spec, col_spec, row_spec, state_spec = chunk_specs(chunk, dk, dv)
    acc = acc_dtype(q.dtype)
    dq, dk_, du, dcum, dstates = pl.pallas_call(
        _gradient_kernel,
        grid=(b, h, s // chunk),
        in_specs=[qk_spec, qk_spec, v_spec, v_spec, col_spec, row_spec, state_spec],
        out_specs=[qk_spec, qk_spec, v_spec, col_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct((b, h, s, 1), acc),
                   jax.ShapeDtypeStruct(all_states.shape, all_states.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        interpret=interpret,
        name="delta_output_gradients_tpu",
    )(q, k, u, dout, *gate_inputs(cum), all_states)
    return dq, dk_, du, dcum[..., 0], dstates
