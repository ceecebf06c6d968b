"""The delta rule's WY inverse kernel (``delta_inverse_gpu``, the Triton build in Pallas' interpreter): T = (I + A)^-1
per chunk against ``jnp.linalg.inv`` and XLA's triangular solve; its custom VJP against JAX's autodiff of the
triangular solve, alone and through ``delta_chunk.wy_prepare``. The end-to-end delta rule runs it in
test_kernel_delta.py through the fused variant (``fused_prepare``, ``DeltaConfig.fused_wy``, the GPU build's
default); here the fused variant (in the caller's layout) against ``wy_prepare``'s triangular solve, and end to end
against the inverse kernel applied by XLA matmuls (``fused_wy=False``); its backward kernel (``delta_wy_backward_gpu``,
``DeltaConfig.wy_backward_kernel``, the default) against its XLA backward, alone and end to end, and end to end
each of them against the unfused path.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from kernels_pallas.linear_recurrent import delta_block_inverse_gpu, delta_chunk, delta_inverse_gpu
from kernels_pallas.linear_recurrent.delta_ops import DeltaConfig, chunked_delta_recurrence
from _linear_recurrent_helpers import rel_err

SETTINGS = delta_inverse_gpu.Settings(interpret=True)
# Everything below is jitted: interpret mode run eagerly dispatches op by op (several times slower).


def _kernel_inverse(k, beta, cum):
    return delta_inverse_gpu.inverse(k, beta, cum, SETTINGS)


def _chunks(seed, n, chunk, dk, dtype):
    """n chunks of unit keys [n, C, dk], beta in (0, 1) and inclusive cumulative log gates [n, C]; the last chunk's
    gates are strong (~-30 on every other step), so an exp(c_t - c_s) with s > t left unmasked would overflow."""
    keys = jax.random.split(jax.random.key(seed), 3)
    k = jax.random.normal(keys[0], (n, chunk, dk))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(jax.random.normal(keys[1], (n, chunk)))
    gate = jax.nn.log_sigmoid(jax.random.normal(keys[2], (n, chunk)) + 2.0)
    gate = gate.at[-1, ::2].add(-30.0)
    return k.astype(dtype), beta.astype(dtype), jnp.cumsum(gate, axis=-1).astype(dtype)


def _unit_lower(k, beta, cum):
    """I + A in k's dtype, A built as the XLA path builds it."""
    gram = jnp.einsum("...td,...sd->...ts", k, k, precision=lax.Precision.HIGHEST)
    return jnp.eye(k.shape[-2], dtype=k.dtype) + delta_chunk.wy_matrix(gram, beta, cum)


def _solve_inverse(k, beta, cum):
    """T by XLA's unit lower-triangular solve against the identity (differentiated by JAX's autodiff)."""
    lower = _unit_lower(k, beta, cum)
    eye = jnp.broadcast_to(jnp.eye(k.shape[-2], dtype=k.dtype), lower.shape)
    return lax.linalg.triangular_solve(lower, eye, left_side=True, lower=True, unit_diagonal=True)


@pytest.mark.parametrize("chunk,dtype", [(16, jnp.float32), (64, jnp.float32), (64, jnp.float64)])
def test_inverse_matches_inv_and_triangular_solve(chunk, dtype):
    # 64 = four 16-row diagonal blocks: substitution inside them, three merge steps across them.
    k, beta, cum = _chunks(0, 2, chunk, 16, dtype)
    t = jax.jit(_kernel_inverse)(k, beta, cum)
    want = jnp.linalg.inv(_unit_lower(*(x.astype(jnp.float64) for x in (k, beta, cum))))
    tol = 1e-6 if dtype == jnp.float32 else 1e-13
    assert t.dtype == dtype and t.shape == (2, chunk, chunk)
    assert jnp.all(jnp.isfinite(t))
    assert rel_err(t, want) < tol
    assert rel_err(t, jax.jit(_solve_inverse)(k, beta, cum)) < tol


def test_inverse_vjp_matches_autodiff_of_triangular_solve():
    k, beta, cum = _chunks(1, 2, 32, 16, jnp.float64)
    t_bar = jax.random.normal(jax.random.key(2), (2, 32, 32), jnp.float64)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(_kernel_inverse(*a) * t_bar), argnums=(0, 1, 2)))
    want = jax.jit(jax.grad(lambda *a: jnp.sum(_solve_inverse(*a) * t_bar), argnums=(0, 1, 2)))
    for name, g, w in zip(("k", "beta", "cum"), grads(k, beta, cum), want(k, beta, cum)):
        assert rel_err(g, w) < 1e-12, name


def test_wy_prepare_with_the_kernel_matches_the_triangular_solve_path():
    # [b, h, n, C, d] chunks as delta_ops passes them; values and the gradients of k, v, beta, cum.
    k, beta, cum = (x.reshape((1, 1) + x.shape) for x in _chunks(3, 2, 64, 16, jnp.float64))
    keys = jax.random.split(jax.random.key(4), 4)
    v = jax.random.normal(keys[0], k.shape[:-1] + (32,), jnp.float64)

    def explicit(*args):
        return delta_chunk.wy_prepare(*args, inverse=_kernel_inverse, precision=lax.Precision.HIGHEST)

    def values_and_gradients(fn, cotangents):
        outs, vjp = jax.vjp(fn, k, v, beta, cum)
        return outs, vjp(cotangents)

    shapes = (k.shape[:-1] + (32,), k.shape, k.shape)  # u0, w, k_out
    cotangents = tuple(jax.random.normal(key, shape, k.dtype) for key, shape in zip(keys[1:], shapes))
    outs, grads = jax.jit(lambda c: values_and_gradients(explicit, c))(cotangents)
    want, want_grads = jax.jit(lambda c: values_and_gradients(delta_chunk.wy_prepare, c))(cotangents)
    for name, got, ref in zip(("u0", "w", "k_out", "dk", "dv", "dbeta", "dcum"), outs + grads, want + want_grads):
        assert rel_err(got, ref) < 1e-12, name


def _kernel_fused(k, v, beta, cum, kernel_backward=False, column_block=64, backward_column_block=None,
                  inverse_warps=None):
    settings = delta_inverse_gpu.FusedSettings(interpret=True, kernel_backward=kernel_backward,
                                               column_block=column_block, backward_column_block=backward_column_block,
                                               inverse_warps=inverse_warps)
    return delta_inverse_gpu.fused_prepare(k, v, beta, cum, settings)


def _heads_first_chunks(seed, chunk, dk, dv):
    """Two heads of two chunks each: k [1, 2, 2, C, dk], v [.., C, dv], beta, cum [1, 2, 2, C] (float64)."""
    k, beta, cum = (x.reshape((1, 2, 2) + x.shape[1:]) for x in _chunks(seed, 4, chunk, dk, jnp.float64))
    v = jax.random.normal(jax.random.key(seed + 100), k.shape[:-1] + (dv,), jnp.float64)
    return k, v, beta, cum


@pytest.mark.parametrize("column_block,inverse_warps", [(64, None), (16, None), (16, 1)])
def test_fused_prepare_matches_the_triangular_solve_path(column_block, inverse_warps):
    # The fused kernel (A, T and T applied in one kernel, DeltaConfig.fused_wy), k and v in the caller's
    # [b, s, h, d] layout: u0, w and the gradients of k, v, beta, cum (its custom VJP) against autodiff of
    # wy_prepare's triangular solve on heads-first chunks (its k_out, which the GPU walks form themselves, given a
    # zero cotangent), float64, C = 32, two heads. Column blocks of 16: v's 32 columns in two. inverse_warps: T
    # from delta_block_inverse_gpu's kernel, applied by the fused kernel.
    k, v, beta, cum = _heads_first_chunks(5, 32, 16, 32)
    keys = jax.random.split(jax.random.key(6), 2)
    cotangents = tuple(jax.random.normal(key, x.shape, k.dtype) for key, x in zip(keys, (v, k)))  # u0, w
    seq = delta_chunk.from_chunks

    def reference():
        outs, vjp = jax.vjp(delta_chunk.wy_prepare, k, v, beta, cum)
        dk, dv, dbeta, dcum = vjp(cotangents + (jnp.zeros_like(k),))
        return tuple(map(seq, outs[:2])), (seq(dk), seq(dv), dbeta, dcum)

    def fused():
        fused = functools.partial(_kernel_fused, column_block=column_block, inverse_warps=inverse_warps)
        outs, vjp = jax.vjp(fused, seq(k), seq(v), beta, cum)
        return outs, vjp(tuple(map(seq, cotangents)))

    outs, grads = jax.jit(fused)()
    want, want_grads = jax.jit(reference)()
    for name, got, ref in zip(("u0", "w", "dk", "dv", "dbeta", "dcum"), outs + grads, want + want_grads):
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert rel_err(got, ref) < 1e-12, name


def test_block_inverse_matches_inv():
    # delta_block_inverse_gpu: T by [16, 16] blocks at C = 64 (four row blocks: every merge of the block
    # substitution) against jnp.linalg.inv, float64, keys read in the caller's layout; column blocks of 16 of dk 32
    # (the Gram blocks summed over two). The last chunk's gates are strong (exponents down to ~-900).
    k, beta, cum = (x.reshape((1, 2, 2) + x.shape[1:]) for x in _chunks(11, 4, 64, 32, jnp.float64))
    settings = delta_inverse_gpu.FusedSettings(interpret=True, column_block=16, inverse_warps=1)
    got = jax.jit(lambda: delta_block_inverse_gpu.inverse(delta_chunk.from_chunks(k), beta, cum, settings))()
    want = jnp.linalg.inv(_unit_lower(k, beta, cum))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("column_block,dk,dv", [(None, 16, 32), (16, 32, 16)])
def test_wy_backward_kernel_matches_the_xla_backward(column_block, dk, dv):
    # delta_wy_backward_gpu (FusedSettings.kernel_backward) against _fused_bwd's XLA code on the same residuals and
    # cotangents, float64: two heads of two chunks of 32, dk != dv, beta in (0, 2), the last chunk's gates ~-30
    # every other step (exponents down to ~-500: exp(c_t - c_s) with s > t would overflow). Whole tiles, or
    # column blocks of 16 (the wider of k and v in two).
    k, v, beta, cum = _heads_first_chunks(8, 32, dk, dv)
    k, v, beta = delta_chunk.from_chunks(k), delta_chunk.from_chunks(v), 2.0 * beta
    keys = jax.random.split(jax.random.key(9), 2)
    cotangents = tuple(jax.random.normal(key, x.shape, jnp.float64) for key, x in zip(keys, (v, k)))

    def gradients(kernel_backward):
        fused = functools.partial(_kernel_fused, kernel_backward=kernel_backward, backward_column_block=column_block)
        return jax.vjp(fused, k, v, beta, cum)[1](cotangents)

    got = jax.jit(lambda: gradients(True))()
    want = jax.jit(lambda: gradients(False))()
    for name, g, w, x in zip(("dk", "dv", "dbeta", "dcum"), got, want, (k, v, beta, cum)):
        assert g.dtype == w.dtype == x.dtype and g.shape == w.shape == x.shape, name
        assert jnp.all(jnp.isfinite(g)), name
        assert rel_err(g, w) < 1e-12, name


@pytest.mark.parametrize("wy_backward_kernel", [False, True])
def test_fused_wy_end_to_end_matches_the_unfused_gpu_build(wy_backward_kernel):
    # chunked_delta_recurrence with DeltaConfig(fused_wy=True) against fused_wy=False (inverse kernel + XLA
    # matmuls), float64: output, final state and every gradient. Gated, dk 8 / dv 12 padded to 16, 3 chunks.
    # The fused path's backward in XLA and as a kernel (wy_backward_kernel).
    keys = jax.random.split(jax.random.key(7), 8)
    b, s, h, dk, dv = 1, 37, 2, 8, 12
    q = jax.random.normal(keys[0], (b, s, h, dk), jnp.float64) * dk**-0.5
    k = jax.random.normal(keys[1], (b, s, h, dk), jnp.float64)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(keys[2], (b, s, h, dv), jnp.float64)
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (b, s, h), jnp.float64))
    gate = jax.nn.log_sigmoid(jax.random.normal(keys[4], (b, s, h), jnp.float64) + 2.0)
    h0 = jax.random.normal(keys[5], (b, h, dk, dv), jnp.float64)
    dout = jax.random.normal(keys[6], (b, s, h, dv), jnp.float64)
    dfinal = jax.random.normal(keys[7], (b, h, dk, dv), jnp.float64)

    def values_and_gradients(fused_wy):
        config = DeltaConfig(chunk_size=16, block_v=None, fused_wy=fused_wy,
                             wy_backward_kernel=fused_wy and wy_backward_kernel)

        def fn(q, k, v, beta, gate, h0):
            return chunked_delta_recurrence(q, k, v, beta, gate, initial_state=h0, backend="triton", interpret=True,
                                            config=config)

        outs, vjp = jax.vjp(fn, q, k, v, beta, gate, h0)
        return outs, vjp((dout, dfinal))

    outs, grads = jax.jit(lambda: values_and_gradients(True))()
    want, want_grads = jax.jit(lambda: values_and_gradients(False))()
    names = ("out", "final", "dq", "dk", "dv", "dbeta", "dlog_gate", "dh0")
    for name, got, ref in zip(names, outs + grads, want + want_grads):
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert rel_err(got, ref) < 1e-10, name
