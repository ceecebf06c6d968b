"""The delta rule's WY inverse on GPU (Pallas, Triton backend): T = (I + A)^-1 for every chunk, A formed in the
kernel, and its VJP in plain JAX (matmuls only). ``delta_chunk.wy_prepare`` applies T with two matmuls,
u0 = T diag(beta) V and w = T diag(beta exp(c)) K, instead of XLA's batched triangular solve (fla's layout).

Per chunk of C steps (``delta_chunk`` derives it), with keys K [C, dk], writing strengths beta and inclusive
cumulative log gates c [C]:

  A_ts = beta_t exp(c_t - c_s) (k_t . k_s)  for s < t, else 0     (strictly lower: I + A is unit lower triangular)

Forward, one program per chunk, everything in registers (A never goes through memory):

1. G = K K^T (one dot), A = ``delta_chunk.wy_matrix(G, beta, c)``: the decay is masked before the exp, so every
   exponent is <= 0.
2. The diagonal blocks of B = 16 rows (Triton's smallest dot tile): T_D = blockdiag((I + A_bb)^-1) by forward
   substitution in all blocks at once. Step j = 1 .. B-1 sets row j of every block: A_D (A's diagonal blocks) and
   T_D are block diagonal, so the column sums a_j = sum over the rows j of A_D pack every block's row j into that
   block's columns, and v = a_j^T T_D (a column sum again) holds every block's sum_s A_rs T_s,col in its columns:
   T_D[row j of block(col), col] = [r == col] - v[col]. B - 1 steps of elementwise work and two column sums.
3. The off-diagonal blocks: with A = A_D + A_O (A_O strictly block lower), I + A = (I + A_D)(I + T_D A_O), so
   T = (I + N)^-1 T_D with N = T_D A_O, the fixed point of T <- T_D - N T. N is strictly block lower (nilpotent),
   so from T = T_D block row i is exact after i steps: C/B - 1 whole-tile dots (plus one for N). This is block
   forward substitution (as LAPACK's blocked trtri inverts), done with whole [C, C] dots, zero blocks included,
   because Triton cannot slice register tiles; block rows already exact come out bitwise the same again.

Why this and not: row-by-row substitution over the whole tile (C steps, each two cross-warp reductions, no tensor
cores: 4x the serial steps at C = 64); the doubling product (I - A)(I + A^2)(I + A^4)... (all dots, but the powers
of A grow like binomial coefficients when keys are correlated and then cancel in float32; substitution never forms
them); fla's 16 -> 32 -> 64 merges of sliced blocks (needs slicing of register tiles, which Pallas' Triton lowering
lacks). Cost at C = 64: 1 + 4 dots of [64, 64] (G: [64, dk]) per chunk; it grows like C^3 per chunk (C^2 per
token), so C = 128 costs 4x C = 64 per token here.

Backward (``jax.custom_vjp``, plain JAX): T = (I + A)^-1 gives dT = -T dA T, so for a cotangent T_bar

  <T_bar, dT> = -tr(T_bar^T T dA T) = <-T^T T_bar T^T, dA>   =>   A_bar = -strict_lower(T^T T_bar T^T)

(only A's strictly lower entries are free), then the VJP of ``wy_matrix`` (recomputed in XLA) takes A_bar to k,
beta and c. Two batched [C, C] matmuls and the Gram matrix's two: no triangular solve.

Fused variant (``DeltaConfig.fused_wy``, the GPU build's default): ``fused_prepare`` forms A, inverts
it (``invert_tile``) and applies T in the same program, two more dots: it writes u0 [C, dv] and w [C, dk] (in q's
dtype when ``delta_ops`` calls it) instead of T, so T's round trip through memory and the two XLA matmuls go (the
decayed keys k_out of ``wy_prepare`` are not written: the GPU state walks decay the raw keys, ``delta_gpu``). It
reads k and v in the caller's [batch, seq, heads, dim] layout and dtype and writes its outputs in that layout (the
state and output kernels' layout): no transposes or float32 copies in XLA. Its backward is a Pallas kernel in the
GPU build (``delta_wy_backward_gpu``, ``DeltaConfig.wy_backward_kernel``) or plain JAX (``fused_prepare``'s
docstring); T is then written as the backward's residual.

Precision: true float32 (float64 in interpret mode) in Pallas' interpreter (the CPU has no TF32). On the GPU the
dots run as 3-pass TF32 (float32-accurate, tensor cores), or 1-pass TF32 with ``tf32=True``: the GPU build asks
for it when w and u0 are rounded to bf16/f16 right after (TF32 keeps 11 bits, they keep 8 or 11; bf16 keys are
exact in TF32, so G is exact then). The fused kernels' other dots (G, applying T, the whole backward) take their
operands in ``Settings.operand_dtype`` when set: bf16 for bf16 inputs in the GPU build (``DeltaConfig.
wy_operands``), as fla's WY kernels; the inversion's dots stay TF32 (T's rounding would compound through them).
H200, B4 S8192 H16 D128: WY backward 1.93 -> 1.06 ms, forward 1.05 -> 0.71, errors of the whole rule against
XLA's float32 form 3.4e-3 -> 3.7e-3 (output) (``benchmarks/results/profile_delta_warps_h200.txt``,
``check_delta_kernel_bf16_wy_h200.txt``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.linear_recurrent import delta_chunk
from kernels_pallas.linear_recurrent.chunk_math import acc_dtype, exp
from kernels_pallas.linear_recurrent.gpu_forward import column_blocks, seq_spec

BLOCK = 16  # rows of the diagonal blocks inverted by substitution (Triton's smallest dot tile)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the kernel needs that is not an array (hashable: custom_vjp's non-differentiable argument).

    interpret: run in Pallas' interpreter (CPU); tf32: 1-pass TF32 dots on the GPU (else 3-pass);
    num_warps, num_stages: Triton launch settings; operand_dtype: the dtype name the fused kernels cast the
    operands of their dots to, except the inversion's (None: the accumulation dtype, float32). ``delta_ops`` passes
    16-bit inputs' dtype (``DeltaConfig.wy_operands``): bf16 tensor-core dots, fla's choice (module docstring).
    """

    interpret: bool = False
    tf32: bool = False
    num_warps: int = 4
    num_stages: int = 2
    operand_dtype: str | None = None

    def kernel_precision(self, dtype):
        """The in-kernel dots' precision (lax.Precision or a DotAlgorithmPreset) for operands of ``dtype``."""
        if self.interpret or dtype == jnp.float64:
            return lax.Precision.HIGHEST
        if jnp.dtype(dtype).itemsize < 4:
            return None  # 16-bit operands: the tensor cores' native dot, float32 accumulation
        if self.tf32:
            return lax.DotAlgorithmPreset.TF32_TF32_F32
        return lax.DotAlgorithmPreset.TF32_TF32_F32_X3

    def operand_dot(self, acc):
        """``dot(x, y, trans_b)`` of the fused kernels' products: operands cast to ``operand_dtype`` (if set),
        accumulated in ``acc``."""
        operand = acc if self.operand_dtype is None else jnp.dtype(self.operand_dtype)
        dot = _make_dot(self.kernel_precision(operand), acc)
        return lambda x, y, trans_b=False: dot(x.astype(operand), y.astype(operand), trans_b)

    @property
    def xla_precision(self):
        """The XLA matmuls around the kernel (``wy_prepare`` applying T, the backward): DEFAULT (XLA may use TF32
        on the GPU) with ``tf32``, else HIGHEST."""
        return lax.Precision.DEFAULT if self.tf32 else lax.Precision.HIGHEST


def invert_tile(a, dot, block=BLOCK):
    """(I + a)^-1 of one strictly lower triangular tile a [C, C] (C a multiple of ``block``): steps 2 and 3 of the
    module docstring. ``dot(x, y)`` is the backend's matmul; pure jnp otherwise (runs in and out of kernels)."""
    chunk = a.shape[0]
    shift = block.bit_length() - 1  # block is a power of two: shifts and masks (what Triton lowers plainly)
    t = jnp.arange(chunk)
    row, col = t[:, None], t[None, :]
    same_block = (row >> shift) == (col >> shift)
    eye = (row == col).astype(a.dtype)
    a_diag = jnp.where(same_block, a, 0.0)

    def substitute(j, t_diag):
        rows_j = (row & (block - 1)) == j
        a_j = jnp.sum(jnp.where(rows_j, a_diag, 0.0), axis=0)  # [C]: each column's block's row j of A
        v = jnp.sum(a_j[:, None] * t_diag, axis=0)  # [C]: rows j of A_D T_D, packed by columns
        return jnp.where(rows_j & same_block, t_diag - v[None, :], t_diag)  # those rows still hold the identity

    # Row 0 of every block is the identity's: steps 1 .. block - 1. (Unrolled in Python the fused forward took 0.74
    # ms against 0.64, H200, B4 S8192 H16 D128 bf16: profile_delta_tilings_h200.txt.)
    t_diag = lax.fori_loop(1, min(block, chunk), substitute, eye)
    if chunk <= block:
        return t_diag
    n = dot(t_diag, jnp.where(same_block, 0.0, a))  # T_D A_O: strictly block lower
    inv = t_diag
    for _ in range(chunk // block - 1):  # block row i is exact after i steps
        inv = t_diag - dot(n, inv)
    return inv


def _make_dot(precision, acc):
    def dot(x, y, trans_b=False):
        dims = (((1,), (1 if trans_b else 0,)), ((), ()))
        return lax.dot_general(x, y, dims, precision=precision, preferred_element_type=acc)

    return dot


def _inverse_kernel(k_ref, beta_ref, cum_ref, t_ref, *, settings):
    k = k_ref[...]
    dot = _make_dot(settings.kernel_precision(k.dtype), t_ref.dtype)
    a = delta_chunk.wy_matrix(dot(k, k, trans_b=True), beta_ref[...], cum_ref[...])
    t_ref[...] = invert_tile(a, dot).astype(t_ref.dtype)


def _inverse_call(k, beta, cum, settings):
    """The Pallas call: one program per chunk over the flattened leading axes."""
    lead, (chunk, dk) = k.shape[:-2], k.shape[-2:]
    n = math.prod(lead)
    t = pl.pallas_call(
        functools.partial(_inverse_kernel, settings=settings),
        grid=(n,),
        in_specs=[pl.BlockSpec((None, chunk, dk), lambda i: (i, 0, 0)),
                  pl.BlockSpec((None, chunk), lambda i: (i, 0)),
                  pl.BlockSpec((None, chunk), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((None, chunk, chunk), lambda i: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((n, chunk, chunk), k.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=settings.num_warps, num_stages=settings.num_stages),
        interpret=settings.interpret,
        name="delta_wy_inverse",
    )(k.reshape(n, chunk, dk), beta.reshape(n, chunk), cum.reshape(n, chunk))
    return t.reshape(lead + (chunk, chunk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def inverse(k, beta, cum, settings: Settings):
    """T = (I + A)^-1 per chunk: k [..., C, dk], beta and cum [..., C] (float32; float64 in interpret mode) ->
    T [..., C, C] in k's dtype. C a power of two >= 16, dk a power of two >= 16 (Triton's dot tiles).
    Differentiable in k, beta and cum (custom VJP, module docstring)."""
    return _inverse_call(k, beta, cum, settings)


def _inverse_fwd(k, beta, cum, settings):
    t = _inverse_call(k, beta, cum, settings)
    return t, (k, beta, cum, t)


def inverse_cotangent(t, t_bar, precision=None):
    """A_bar = -strict_lower(T^T T_bar T^T) for T = (I + A)^-1, batched over leading axes."""
    prod = jnp.einsum("...st,...su->...tu", t, t_bar, precision=precision)  # T^T T_bar
    prod = jnp.einsum("...tu,...vu->...tv", prod, t, precision=precision)  # (T^T T_bar) T^T
    i = jnp.arange(t.shape[-1])
    return jnp.where(i[:, None] > i[None, :], -prod, 0.0)


def _inverse_bwd(settings, residuals, t_bar):
    k, beta, cum, t = residuals
    a_bar = inverse_cotangent(t, t_bar.astype(t.dtype), settings.xla_precision)

    def build_a(k, beta, cum):
        gram = jnp.einsum("...td,...sd->...ts", k, k, precision=settings.xla_precision)
        return delta_chunk.wy_matrix(gram, beta, cum)

    _, vjp = jax.vjp(build_a, k, beta, cum)
    return vjp(a_bar)


inverse.defvjp(_inverse_fwd, _inverse_bwd)


# The fused variant (``DeltaConfig.fused_wy``, the GPU default): T applied in the kernel.


@dataclasses.dataclass(frozen=True)
class FusedSettings(Settings):
    """``Settings`` plus out_dtype: the dtype name of u0 and w (None: k's). ``delta_ops`` passes q's dtype,
    what the state and output kernels take. kernel_backward: the custom VJP's backward as a Pallas kernel
    (``delta_wy_backward_gpu``; ``delta_ops`` asks for it by default), else plain JAX. column_block: the columns
    of a [C, d] tile that the forward kernel loads, multiplies by T and stores at a time (``column_blocks``), so
    that no whole [C, d] float32 tile is live at once (fewer registers); backward_column_block: the same for the
    backward kernel (None: whole tiles). inverse_warps: None inverts in the same kernel (``invert_tile``, at
    num_warps); a number of warps runs the inversion in its own kernel by [16, 16] blocks at that many warps
    (``delta_block_inverse_gpu``), T through memory, then a kernel at num_warps applies it."""

    out_dtype: str | None = None
    kernel_backward: bool = False
    column_block: int = 64
    backward_column_block: int | None = None
    inverse_warps: int | None = None


def _fused_kernel(k_ref, v_ref, beta_ref, cum_ref, *refs, settings, t_given):
    acc = acc_dtype(k_ref.dtype)  # the WY algebra runs in float32 whatever the inputs' dtype
    beta, cum = beta_ref[...], cum_ref[...]
    operand_dot = settings.operand_dot(acc)
    if t_given:  # T from ``delta_block_inverse_gpu``
        t_in, u0_ref, w_ref = refs
        t, t_ref = t_in[...], ()
    else:
        u0_ref, w_ref, *t_ref = refs
        dot = _make_dot(settings.kernel_precision(acc), acc)
        t = invert_tile(delta_chunk.wy_matrix(operand_dot(k_ref[...], k_ref[...], trans_b=True), beta, cum), dot)
    for cols in column_blocks(v_ref.shape[1], settings.column_block):
        u0_ref[:, cols] = operand_dot(t, beta[:, None] * v_ref[:, cols].astype(acc)).astype(u0_ref.dtype)
    k_scale = beta * exp(cum)  # cum <= 0: exp(cum) <= 1
    for cols in column_blocks(k_ref.shape[1], settings.column_block):
        w_ref[:, cols] = operand_dot(t, k_scale[:, None] * k_ref[:, cols].astype(acc)).astype(w_ref.dtype)
    if t_ref:  # only under differentiation: T is the backward's residual
        t_ref[0][...] = t.astype(t_ref[0].dtype)


def fused_specs(chunk, dk, dv):
    """Block specs on the grid (batch, head, chunk): [C, dk] and [C, dv] tiles of [b, s, h, d] arrays, one chunk's
    [C] of [b, h, n, C] and [C, C] of [b, h, n, C, C]."""
    return (seq_spec(chunk, dk, True, lambda bi, hi, n: (bi, hi, n, 0)),
            seq_spec(chunk, dv, True, lambda bi, hi, n: (bi, hi, n, 0)),
            pl.BlockSpec((None, None, None, chunk), lambda bi, hi, n: (bi, hi, n, 0)),
            pl.BlockSpec((None, None, None, chunk, chunk), lambda bi, hi, n: (bi, hi, n, 0, 0)))


def _fused_call(k, v, beta, cum, settings, with_t):
    """The Pallas call(s): one program per chunk; (u0, w) or (u0, w, T)."""
    (b, s, h, dk), dv = k.shape, v.shape[-1]
    chunk = beta.shape[-1]
    out_dtype = k.dtype if settings.out_dtype is None else jnp.dtype(settings.out_dtype)
    tile_k, tile_v, gates, square = fused_specs(chunk, dk, dv)
    in_specs, inputs = [tile_k, tile_v, gates, gates], [k, v, beta, cum]
    out_specs = [tile_v, tile_k]
    out_shape = [jax.ShapeDtypeStruct(v.shape, out_dtype), jax.ShapeDtypeStruct(k.shape, out_dtype)]
    t_given = settings.inverse_warps is not None
    if t_given:
        from kernels_pallas.linear_recurrent import delta_block_inverse_gpu  # imports this module: not at the top

        in_specs.append(square)
        inputs.append(delta_block_inverse_gpu.inverse(k, beta, cum, settings))
    elif with_t:  # T in the dots' operand dtype: what the backward kernel's dots read
        out_specs.append(square)
        out_shape.append(jax.ShapeDtypeStruct(beta.shape + (chunk,), settings.operand_dtype or beta.dtype))
    outputs = pl.pallas_call(
        functools.partial(_fused_kernel, settings=settings, t_given=t_given),
        grid=(b, h, s // chunk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=settings.num_warps, num_stages=settings.num_stages),
        interpret=settings.interpret,
        name="delta_wy_apply" if t_given else "delta_wy_fused",
    )(*inputs)
    return list(outputs) + [inputs[-1]] if t_given and with_t else list(outputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_prepare(k, v, beta, cum, settings: FusedSettings):
    """``delta_chunk.wy_prepare``'s u0 and w in Pallas kernels, in the caller's layout: u0 = T diag(beta) V and
    w = T diag(beta exp(c)) K per chunk, T = (I + A)^-1 formed, inverted and applied in registers (T never goes
    through memory in the forward alone), or with ``settings.inverse_warps`` inverted by a kernel of its own.

    k [b, s, h, dk], v [b, s, h, dv] (any float dtype: the kernel computes in its accumulation dtype, float32 for
    16-bit inputs), beta and cum [b, h, n, C] in that accumulation dtype (heads-first chunks; n C = s) -> u0 like
    v, w like k, in ``settings.out_dtype``. C, dk and dv powers of two >= 16 (Triton's dot tiles).

    Backward (custom VJP; a Pallas kernel with ``settings.kernel_backward``, else plain JAX, matmuls only, as
    follows): with x_v = diag(beta) V, x_k = diag(beta exp(c)) K,
    u0 = T x_v and w = T x_k give

      T_bar = u0_bar x_v^T + w_bar x_k^T,   [x_v_bar | x_k_bar] = T^T [u0_bar | w_bar],
      A_bar = -strict_lower(T^T T_bar T^T)  (``inverse_cotangent``),

    then the VJP of (A, x_v, x_k)'s formulas (``delta_chunk.wy_matrix``, recomputed in XLA) takes them to k, v,
    beta and cum. T is stored by the forward under differentiation (one [C, C] write per chunk)
    rather than recomputed in the backward: recomputing would re-read k and redo the Gram dot and the inversion's
    C/16 + 1 dots per chunk, for a write a quarter of u0's and w's at C = 64, dk = dv = 128.
    """
    return tuple(_fused_call(k, v, beta, cum, settings, with_t=False))


def _fused_fwd(k, v, beta, cum, settings):
    u0, w, t = _fused_call(k, v, beta, cum, settings, with_t=True)
    return (u0, w), (k, v, beta, cum, t)


def _fused_bwd(settings, residuals, cotangents):
    if settings.kernel_backward:
        from kernels_pallas.linear_recurrent import delta_wy_backward_gpu  # imports this module: not at the top

        return delta_wy_backward_gpu.wy_backward(*residuals, *cotangents, settings)
    k, v, beta, cum, t = residuals
    chunk, t = beta.shape[-1], t.astype(beta.dtype)
    u0_bar, w_bar = (delta_chunk.to_chunks(x, chunk).astype(t.dtype) for x in cotangents)
    precision = settings.xla_precision

    def build(k, v, beta, cum):  # (A, x_v, x_k) as the kernel forms them, in heads-first chunks
        k, v = (delta_chunk.to_chunks(x, chunk).astype(t.dtype) for x in (k, v))
        gram = jnp.einsum("...td,...sd->...ts", k, k, precision=precision)
        return delta_chunk.wy_matrix(gram, beta, cum), beta[..., None] * v, (beta * exp(cum))[..., None] * k

    (_, x_v, x_k), vjp = jax.vjp(build, k, v, beta, cum)
    t_bar = (jnp.einsum("...td,...sd->...ts", u0_bar, x_v, precision=precision)
             + jnp.einsum("...td,...sd->...ts", w_bar, x_k, precision=precision))
    x_v_bar, x_k_bar = (jnp.einsum("...st,...sd->...td", t, x, precision=precision) for x in (u0_bar, w_bar))
    return vjp((inverse_cotangent(t, t_bar, precision), x_v_bar, x_k_bar))


fused_prepare.defvjp(_fused_fwd, _fused_bwd)
