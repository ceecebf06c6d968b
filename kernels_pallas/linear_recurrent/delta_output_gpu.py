"""The (gated) delta rule's chunk-parallel output step on GPU (Pallas, Triton backend), forward and backward.

Forward: O = ((Q K^T) * D) U + (Q * exp(c)) S per chunk is the scalar-gate output with the corrected values U in
place of V, so ``output`` is ``gpu_forward.output``. Backward: one program per (batch, head, chunk) takes the
chunk's state S and gives dq, dk, dU, the cumulative log gates' gradient and dS (``delta_math.output_gradients``);
whole heads per program (dq, dk and the gate gradient contract over dv, dU over dk).
Inputs are in the caller's [batch, seq, heads, dim] layout, cum heads-first [batch, heads, seq], padded by
``delta_ops``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.linear_recurrent import delta_math, gpu_forward
from kernels_pallas.linear_recurrent.gpu_forward import acc_dtype, chunk_specs, chunk_tiles, make_dot


def output(q, k, u, cum, all_states, *, config, interpret, gated=True):
    """q/k [b, s, h, dk], u [b, s, h, dv], cum [b, h, s], all_states [b, h, n, dk, dv] -> out like u in q's dtype.
    ``gated=False``: the plain delta rule (cum is zeros and not read: no exp at all). Programs take
    ``config.output_block_v`` value columns (None: all)."""
    return gpu_forward.output(q, k, u, cum, all_states, config=config, interpret=interpret, gated=gated)


def _gradient_kernel(q_ref, k_ref, u_ref, dout_ref, cum_ref, state_ref, *grad_refs, gated):
    """grad_refs: dq, dk, du, dcum, dstate."""
    causal, _ = chunk_tiles(q_ref.shape[0])
    cum_col, cum_row, _ = gpu_forward.gate_tiles(cum_ref, slice(None), gated)
    grads = delta_math.output_gradients(q_ref[...], k_ref[...], u_ref[...], dout_ref[...], cum_col, cum_row, causal,
                                        state_ref[...], make_dot(q_ref.dtype), keepdims=False)
    for ref, grad in zip(grad_refs, grads):
        ref[...] = (jnp.zeros(ref.shape) if grad is None else grad).astype(ref.dtype)  # no gate: dcum zeros


def output_gradients(q, k, u, dout, cum, all_states, *, config, interpret, gated=True):
    """-> (dq like q, dk like k, du like u, d all_states like all_states, each in its input's dtype (what the
    caller casts them to: one rounding either way, half the bytes written), and dcum like cum; zeros with
    ``gated=False``)."""
    b, s, h, dk = q.shape
    dv = u.shape[-1]
    chunk = config.chunk_size
    qk_spec, v_spec, cum_spec, state_spec = chunk_specs(chunk, dk, dv)
    acc = acc_dtype(q.dtype)
    return pl.pallas_call(
        functools.partial(_gradient_kernel, gated=gated),
        grid=(b, h, s // chunk),
        in_specs=[qk_spec, qk_spec, v_spec, v_spec, cum_spec, state_spec],
        out_specs=[qk_spec, qk_spec, v_spec, cum_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(cum.shape, acc),
                   jax.ShapeDtypeStruct(all_states.shape, all_states.dtype)],
        # Without a gate (no exps, no gate gradient) the kernel holds fewer tiles: faster at num_warps (DeltaConfig).
        compiler_params=plgpu.CompilerParams(num_warps=config.warps(gradients=gated), num_stages=config.num_stages),
        interpret=interpret,
        name="delta_output_gradients",
    )(q, k, u, dout, cum, all_states)
