"""The delta rule's WY inverse by [16, 16] blocks in its own few-warp kernel (GPU, Pallas on Triton): T = (I + A)^-1
per chunk, written for ``delta_inverse_gpu``'s apply kernel (``FusedSettings.inverse_warps``; fla's layout of a
kkt-solve kernel, then T applied).

Per chunk of C = n B steps (B = 16, the smallest tile of Triton's dots), keys K split into row blocks K_i [B, dk],
writing strengths beta and inclusive cumulative log gates c split alike:

1. A's blocks on and below the diagonal (n (n + 1) / 2 dots of [B, dk] by [dk, B], dk a column block at a time):
   A_ij = diag(beta_i) (exp(c_i[t] - c_j[s]) (K_i K_j^T)[t, s]), strictly lower inside the diagonal blocks, the decay
   masked before the exp there (every exponent is <= 0: below the diagonal t comes after s).
2. The diagonal blocks' inverses T_ii = (I + A_ii)^-1 by forward substitution, all n blocks in the same loop of
   B - 1 steps (independent chains the compiler can interleave): row j of T_ii = e_j - sum_{s < j} A_ii[j, s] T_ii[s].
3. Block forward substitution below the diagonal, row block after row block:
   T_ij = -T_ii sum_{m = j}^{i - 1} A_im T_mj   (j < i),
   from (I + A) T = I restricted to block row i. [B, B] dots only (n (n - 1) (n + 1) / 6 + n (n - 1) / 2 of them).

Why its own kernel: the whole-tile inversion of ``invert_tile`` spends its substitution on [C, C] tiles spread over
the apply kernel's 4 warps (every step two reductions across warps). Here every tile is [B, B] and the kernel runs
at ``inverse_warps`` (1 or 2: the tiles fill a warp), while T is applied at the apply kernel's warps by whole-tile
dots. T goes through memory in the dots' operand dtype (bf16 for bf16 inputs: the apply kernel rounds it to that
anyway), a [C, C] write and read per chunk, and it is the backward's residual as before.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.linear_recurrent.chunk_math import acc_dtype, decay_matrix, exp
from kernels_pallas.linear_recurrent.delta_inverse_gpu import BLOCK, _make_dot, fused_specs
from kernels_pallas.linear_recurrent.gpu_forward import column_blocks


def gated_blocks(gram, beta, cum):
    """A's blocks (step 1 of the module docstring) from the keys' Gram blocks ``gram[i, j]`` [B, B] (j <= i) and the
    row blocks of beta and cum [B]: a dict like ``gram``."""
    t = jnp.arange(BLOCK)
    strict = t[:, None] > t[None, :]
    blocks = {}
    for (i, j), g in gram.items():
        col, row = cum[i][:, None], cum[j][None, :]
        decay = decay_matrix(col, row, strict) if i == j else exp(col - row)
        blocks[i, j] = beta[i][:, None] * decay * g
    return blocks


def invert_diagonal(blocks):
    """(I + a)^-1 of each strictly lower triangular [B, B] tile of ``blocks`` (step 2), one loop for all."""
    t = jnp.arange(BLOCK)
    eye = (t[:, None] == t[None, :]).astype(blocks[0].dtype)

    def substitute(j, inverses):
        row_j = t[:, None] == j
        new = []
        for a, inv in zip(blocks, inverses):
            a_j = jnp.sum(jnp.where(row_j, a, 0.0), axis=0)  # [B]: row j of A (zero from column j on)
            v = jnp.sum(a_j[:, None] * inv, axis=0)  # rows < j of inv are final, the others are not read
            new.append(jnp.where(row_j, inv - v[None, :], inv))  # row j still holds the identity's
        return tuple(new)

    return lax.fori_loop(1, BLOCK, substitute, (eye,) * len(blocks))


def invert_blocks(a, n, dot):
    """T's blocks {(i, j): [B, B]} for j <= i from A's (``gated_blocks``) for n row blocks (steps 2 and 3)."""
    inv = dict(zip(((i, i) for i in range(n)), invert_diagonal(tuple(a[i, i] for i in range(n)))))
    for i in range(1, n):
        for j in range(i - 1, -1, -1):
            inner = functools.reduce(operator.add, (dot(a[i, m], inv[m, j]) for m in range(j, i)))
            inv[i, j] = -dot(inv[i, i], inner)
    return inv


def _kernel(k_ref, beta_ref, cum_ref, t_ref, *, settings):
    acc = acc_dtype(k_ref.dtype)
    chunk, dk = k_ref.shape
    n = chunk // BLOCK
    rows = [pl.ds(i * BLOCK, BLOCK) for i in range(n)]
    gram_dot, dot = settings.operand_dot(acc), _make_dot(settings.kernel_precision(acc), acc)
    gram = {}
    for cols in column_blocks(dk, settings.column_block):  # fewer key registers live at a time
        keys = [k_ref[r, cols] for r in rows]
        for i in range(n):
            for j in range(i + 1):
                g = gram_dot(keys[i], keys[j], trans_b=True)
                gram[i, j] = g if (i, j) not in gram else gram[i, j] + g
    a = gated_blocks(gram, [beta_ref[r] for r in rows], [cum_ref[r] for r in rows])
    inv = invert_blocks(a, n, dot)
    zero = jnp.zeros((BLOCK, BLOCK), t_ref.dtype)
    for i in range(n):
        for j in range(n):
            t_ref[rows[i], rows[j]] = inv[i, j].astype(t_ref.dtype) if j <= i else zero


def inverse(k, beta, cum, settings):
    """T [b, h, n, C, C] (in the dots' operand dtype, else beta's) from k [b, s, h, dk] and beta, cum [b, h, n, C],
    one program per chunk at ``settings.inverse_warps`` warps. C and dk multiples of 16."""
    b, s, h, dk = k.shape
    chunk = beta.shape[-1]
    tile_k, _, gates, square = fused_specs(chunk, dk, dk)
    return pl.pallas_call(
        functools.partial(_kernel, settings=settings),
        grid=(b, h, s // chunk),
        in_specs=[tile_k, gates, gates],
        out_specs=square,
        out_shape=jax.ShapeDtypeStruct(beta.shape + (chunk,), settings.operand_dtype or beta.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=settings.inverse_warps, num_stages=settings.num_stages),
        interpret=settings.interpret,
        name="delta_wy_block_inverse",
    )(k, beta, cum)
