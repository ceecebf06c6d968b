"""The backward of the fused WY preparation (``delta_inverse_gpu.fused_prepare``) as one Pallas kernel (Triton
backend, one program per chunk, everything in registers): ``FusedSettings.kernel_backward`` /
``DeltaConfig.wy_backward_kernel``, the GPU build's default. The same gradients as ``_fused_bwd``'s XLA code, in one
pass over memory: H200, B4 S8192 H16 D128 bf16, the preparation's forward+backward 3.99 ms against 6.08 with XLA's
(``benchmarks/results/check_delta_kernel_wy_backward_h200.txt``).

Per chunk, from k [C, dk], v [C, dv], beta, c [C], the forward's residual T = (I + A)^-1 [C, C] and the cotangents
u0_bar [C, dv], w_bar [C, dk] (forward: x_v = diag(beta) V, x_k = diag(beta exp(c)) K, u0 = T x_v, w = T x_k;
A_ts = beta_t D_ts G_ts with G = K K^T and D_ts = exp(c_t - c_s) for s < t, else 0):

  T_bar = u0_bar x_v^T + w_bar x_k^T,   x_v_bar = T^T u0_bar,   x_k_bar = T^T w_bar,
  A_bar = -strict_lower(T^T T_bar T^T)                               (dT = -T dA T)
  G_bar = beta_t D_ts A_bar_ts,   E = G_bar * G = A_bar * A          (both zero unless s < t)
  k_bar = (G_bar + G_bar^T) K + diag(beta exp(c)) x_k_bar,   v_bar = diag(beta) x_v_bar
  beta_bar_t = sum_s D_ts A_bar_ts G_ts + x_v_bar_t . v_t + exp(c_t) (x_k_bar_t . k_t)
  c_bar_t = sum_s E_ts - sum_s E_st + beta_t exp(c_t) (x_k_bar_t . k_t)

(A_ts depends on c_t through exp(c_t - c_s) (+A_ts) and on c_s (-A_ts); x_k_t through exp(c_t).) D is masked
before the exp (``delta_chunk.decay_matrix``): every exponent is <= 0. Cost per chunk: 8 whole-tile dots (two
[C, C] x [C, C], the Gram matrix and five against [C, dk] / [C, dv]). k, v, the cotangents and k_bar, v_bar are in
the caller's [batch, seq, heads, dim] layout and dtype (``fused_prepare``'s), converted to float32 in registers.
Every dot takes its operands in ``Settings.operand_dtype`` (bf16 for bf16 inputs by default, as fla's WY backward;
T is stored in it) and accumulates in float32; the elementwise algebra is float32.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.linear_recurrent import delta_chunk
from kernels_pallas.linear_recurrent.chunk_math import acc_dtype, exp
from kernels_pallas.linear_recurrent.delta_inverse_gpu import fused_specs
from kernels_pallas.linear_recurrent.gpu_forward import column_blocks


def _backward_kernel(k_ref, v_ref, beta_ref, cum_ref, t_ref, u0_bar_ref, w_bar_ref, k_bar_ref, v_bar_ref,
                     beta_bar_ref, cum_bar_ref, *, settings):
    acc = acc_dtype(k_ref.dtype)  # float32 (float64 in interpret mode); inputs and cotangents may be 16-bit
    beta, cum = beta_ref[...], cum_ref[...]
    t = t_ref[...]
    t_transposed = t.T  # once, for the three products with T^T
    dot = settings.operand_dot(acc)  # casts its operands: 16-bit refs are read as they are
    k_scale = beta * exp(cum)  # cum <= 0: exp(cum) <= 1
    value_blocks = column_blocks(v_ref.shape[1], settings.backward_column_block)
    key_blocks = column_blocks(k_ref.shape[1], settings.backward_column_block)

    # The [C, C] pieces; their products sum over the column blocks.
    t_bar = functools.reduce(operator.add, [
        *(dot(u0_bar_ref[:, cols], beta[:, None] * v_ref[:, cols].astype(acc), trans_b=True) for cols in value_blocks),
        *(dot(w_bar_ref[:, cols], k_scale[:, None] * k_ref[:, cols].astype(acc), trans_b=True) for cols in key_blocks)])
    gram = functools.reduce(operator.add, [dot(k_ref[:, cols], k_ref[:, cols], trans_b=True) for cols in key_blocks])
    steps = jnp.arange(t_transposed.shape[0])
    a_bar = jnp.where(steps[:, None] > steps[None, :], -dot(dot(t_transposed, t_bar), t, trans_b=True), 0.0)
    decayed_a_bar = delta_chunk.decay_matrix(cum, inclusive=False) * a_bar  # that of beta_t G_ts
    g_bar = beta[:, None] * decayed_a_bar
    a_times_a_bar = g_bar * gram  # A * A_bar: A_ts's part of c_bar_t (+) and of c_bar_s (-)
    g_sym = g_bar + g_bar.T
    beta_bar = jnp.sum(decayed_a_bar * gram, axis=1)

    # The [C, d] pieces, a column block at a time.
    for cols in value_blocks:
        x_v_bar = dot(t_transposed, u0_bar_ref[:, cols])
        v_bar_ref[:, cols] = (beta[:, None] * x_v_bar).astype(v_bar_ref.dtype)
        beta_bar += jnp.sum(v_ref[:, cols].astype(acc) * x_v_bar, axis=1)
    k_dot_x_k_bar = jnp.zeros(cum.shape, acc)
    for cols in key_blocks:
        k = k_ref[:, cols].astype(acc)
        x_k_bar = dot(t_transposed, w_bar_ref[:, cols])
        k_bar_ref[:, cols] = (dot(g_sym, k) + k_scale[:, None] * x_k_bar).astype(k_bar_ref.dtype)
        k_dot_x_k_bar += jnp.sum(k * x_k_bar, axis=1)

    beta_bar_ref[...] = (beta_bar + exp(cum) * k_dot_x_k_bar).astype(beta_bar_ref.dtype)
    cum_bar = jnp.sum(a_times_a_bar, axis=1) - jnp.sum(a_times_a_bar, axis=0) + k_scale * k_dot_x_k_bar
    cum_bar_ref[...] = cum_bar.astype(cum_bar_ref.dtype)


def wy_backward(k, v, beta, cum, t, u0_bar, w_bar, settings):
    """(k_bar, v_bar, beta_bar, cum_bar) of ``fused_prepare`` (module docstring), in k's, v's, beta's and cum's
    dtypes and layouts: k [b, s, h, dk], v [b, s, h, dv], beta and cum [b, h, n, C], T [b, h, n, C, C] (beta's
    dtype or ``settings.operand_dtype``), u0_bar like v, w_bar like k (any float dtype). ``settings``:
    ``delta_inverse_gpu.FusedSettings`` (precision, launch, column blocks, interpret)."""
    b, s, h, dk = k.shape
    chunk = beta.shape[-1]
    tile_k, tile_v, gates, square = fused_specs(chunk, dk, v.shape[-1])
    return pl.pallas_call(
        functools.partial(_backward_kernel, settings=settings),
        grid=(b, h, s // chunk),
        in_specs=[tile_k, tile_v, gates, gates, square, tile_v, tile_k],
        out_specs=[tile_k, tile_v, gates, gates],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k, v, beta, cum)],
        compiler_params=plgpu.CompilerParams(num_warps=settings.num_warps,
                                             num_stages=settings.num_stages),
        interpret=settings.interpret,
        name="delta_wy_backward",
    )(k, v, beta, cum, t, u0_bar, w_bar)
