"""Forward kernels on TPU (Pallas, Mosaic TPU backend); same contracts as ``gpu_forward``.

TPU kernels see one tile per grid step. ``output`` is chunk-parallel (grid (batch, head, chunk, dv block)).
``fused`` walks the chunks on the last ("arbitrary") grid axis with the float32 state block in VMEM scratch, and
the pipeline fetches the next chunk's tiles while this one computes. Tiles are [chunk, dim] (sublane, lane); the
cumulative gates come both as a column [chunk, 1] and as a row [1, chunk] so that the decay matrix needs no
transpose in the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.linear_recurrent import chunk_math
from kernels_pallas.linear_recurrent.chunk_math import acc_dtype, make_dot  # noqa: F401 (the TPU builds' dot)


def chunk_tiles(chunk):
    """(causal [C, C] bool, is_last [C, 1] bool) from 2-D iotas (what Mosaic lowers)."""
    rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    return rows >= cols, lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) == chunk - 1


def gate_inputs(cum):
    """cum [b, h, s] -> (column form [b, h, s, 1], row form [b, h, 1, s])."""
    return cum[..., None], cum[:, :, None, :]


def chunk_specs(chunk, dk, dv):
    """Block specs of one chunk of whole heads on the grid (batch, head, chunk): (q/k [C, dk], v [C, dv],
    cum column [C, 1], cum row [1, C], state [dk, dv]) (``gate_inputs`` gives the two cum forms)."""
    return (pl.BlockSpec((None, None, chunk, dk), lambda bi, hi, n: (bi, hi, n, 0)),
            pl.BlockSpec((None, None, chunk, dv), lambda bi, hi, n: (bi, hi, n, 0)),
            pl.BlockSpec((None, None, chunk, 1), lambda bi, hi, n: (bi, hi, n, 0)),
            pl.BlockSpec((None, None, 1, chunk), lambda bi, hi, n: (bi, hi, 0, n)),
            pl.BlockSpec((None, None, None, dk, dv), lambda bi, hi, n: (bi, hi, n, 0, 0)))


def _output_kernel(q_ref, k_ref, v_ref, cum_col_ref, cum_row_ref, state_ref, out_ref):
    causal, _ = chunk_tiles(q_ref.shape[0])
    out = chunk_math.chunk_output(q_ref[...], k_ref[...], v_ref[...], cum_col_ref[...], cum_row_ref[...], causal,
                                  state_ref[...], make_dot(q_ref.dtype))
    out_ref[...] = out.astype(out_ref.dtype)


def output(q, k, v, cum, states, *, config, interpret):
    """Same contract as ``gpu_forward.output``."""
    b, h, s, dk = q.shape
    dv = v.shape[-1]
    chunk, block_v = config.chunk_size, config.block_v
    qk_spec = pl.BlockSpec((None, None, chunk, dk), lambda bi, hi, n, vi: (bi, hi, n, 0))
    v_spec = pl.BlockSpec((None, None, chunk, block_v), lambda bi, hi, n, vi: (bi, hi, n, vi))
    col_spec = pl.BlockSpec((None, None, chunk, 1), lambda bi, hi, n, vi: (bi, hi, n, 0))
    row_spec = pl.BlockSpec((None, None, 1, chunk), lambda bi, hi, n, vi: (bi, hi, 0, n))
    state_spec = pl.BlockSpec((None, None, None, dk, block_v), lambda bi, hi, n, vi: (bi, hi, n, 0, vi))
    return pl.pallas_call(
        _output_kernel,
        grid=(b, h, s // chunk, dv // block_v),
        in_specs=[qk_spec, qk_spec, v_spec, col_spec, row_spec, state_spec],
        out_specs=v_spec,
        out_shape=jax.ShapeDtypeStruct(v.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 4),
        interpret=interpret,
        name="scalar_gate_output_tpu",
    )(q, k, v, *gate_inputs(cum), states)


def _fused_kernel(q_ref, k_ref, v_ref, cum_col_ref, cum_row_ref, h0_ref, out_ref, final_ref, *rest, n_chunks):
    states_ref, state_ref = rest if len(rest) == 2 else (None, rest[0])
    n = pl.program_id(3)
    chunk = q_ref.shape[0]
    causal, _ = chunk_tiles(chunk)
    dot = make_dot(q_ref.dtype)

    @pl.when(n == 0)
    def _init():
        state_ref[...] = h0_ref[...].astype(state_ref.dtype)

    state = state_ref[...]
    if states_ref is not None:  # the backward reads the state entering every chunk
        states_ref[...] = state.astype(states_ref.dtype)
    q, k, v, cum_col = q_ref[...], k_ref[...], v_ref[...], cum_col_ref[...]
    out_ref[...] = chunk_math.chunk_output(q, k, v, cum_col, cum_row_ref[...], causal, state,
                                           dot).astype(out_ref.dtype)
    state = chunk_math.advance_state(k, v, cum_col, cum_col[chunk - 1:, :], state, dot)
    state_ref[...] = state

    @pl.when(n == n_chunks - 1)
    def _finish():
        final_ref[...] = state


def fused(q, k, v, cum, h0, *, config, save_states, interpret):
    """Same contract as ``gpu_forward.fused``."""
    b, h, s, dk = q.shape
    dv = v.shape[-1]
    chunk, block_v = config.chunk_size, config.block_v
    n_chunks, n_v = s // chunk, dv // block_v
    acc = acc_dtype(q.dtype)
    qk_spec = pl.BlockSpec((None, None, chunk, dk), lambda bi, hi, vi, n: (bi, hi, n, 0))
    v_spec = pl.BlockSpec((None, None, chunk, block_v), lambda bi, hi, vi, n: (bi, hi, n, vi))
    col_spec = pl.BlockSpec((None, None, chunk, 1), lambda bi, hi, vi, n: (bi, hi, n, 0))
    row_spec = pl.BlockSpec((None, None, 1, chunk), lambda bi, hi, vi, n: (bi, hi, 0, n))
    state_spec = pl.BlockSpec((None, None, dk, block_v), lambda bi, hi, vi, n: (bi, hi, 0, vi))
    out_specs = [v_spec, state_spec]
    out_shape = [jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), acc)]
    if save_states:
        out_specs.append(pl.BlockSpec((None, None, None, dk, block_v), lambda bi, hi, vi, n: (bi, hi, n, 0, vi)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), q.dtype))
    results = pl.pallas_call(
        functools.partial(_fused_kernel, n_chunks=n_chunks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, h, n_v, n_chunks),
            in_specs=[qk_spec, qk_spec, v_spec, col_spec, row_spec, state_spec],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((dk, block_v), acc)],
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="scalar_gate_fused_fwd_tpu",
    )(q, k, v, *gate_inputs(cum), h0)
    return results[0], results[1], (results[2] if save_states else None)
