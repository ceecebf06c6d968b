"""The sequential state passes on TPU (Pallas, Mosaic TPU backend); same contracts as ``gpu_states``.

The chunk walk is the last ("arbitrary") grid axis, reversed by the index maps for ``dstates`` (grid step j reads
chunk n_chunks - 1 - j); the float32 block [block_k, block_v] lives in VMEM scratch across the steps.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.linear_recurrent import chunk_math
from kernels_pallas.linear_recurrent.gpu_forward import acc_dtype
from kernels_pallas.linear_recurrent.tpu_forward import make_dot


def _walk(a_ref, b_ref, cum_col_ref, start_ref, stored_ref, end_ref, carry_ref, *, step, n_chunks):
    """Stores the carried block before this chunk's update (in walk order), then updates it."""
    j = pl.program_id(4)

    @pl.when(j == 0)
    def _init():
        carry_ref[...] = start_ref[...].astype(carry_ref.dtype)

    carry = carry_ref[...]
    stored_ref[...] = carry.astype(stored_ref.dtype)
    cum_col = cum_col_ref[...]
    chunk = cum_col.shape[0]
    carry = step(a_ref[...], b_ref[...], cum_col, cum_col[chunk - 1:, :], carry, make_dot(a_ref.dtype))
    carry_ref[...] = carry

    @pl.when(j == n_chunks - 1)
    def _finish():
        end_ref[...] = carry


def _pass(a, b_, cum, start, *, step, reverse, config, interpret, name):
    b, h, s, dk = a.shape
    dv = b_.shape[-1]
    chunk = config.chunk_size
    block_k = dk if config.block_k is None else min(config.block_k, dk)
    block_v = dv if config.block_v is None else min(config.block_v, dv)
    n_chunks = s // chunk
    at = (lambda j: n_chunks - 1 - j) if reverse else (lambda j: j)
    a_spec = pl.BlockSpec((None, None, chunk, block_k), lambda bi, hi, ki, vi, j: (bi, hi, at(j), ki))
    b_spec = pl.BlockSpec((None, None, chunk, block_v), lambda bi, hi, ki, vi, j: (bi, hi, at(j), vi))
    col_spec = pl.BlockSpec((None, None, chunk, 1), lambda bi, hi, ki, vi, j: (bi, hi, at(j), 0))
    block_spec = pl.BlockSpec((None, None, block_k, block_v), lambda bi, hi, ki, vi, j: (bi, hi, ki, vi))
    stored_spec = pl.BlockSpec((None, None, None, block_k, block_v),
                               lambda bi, hi, ki, vi, j: (bi, hi, at(j), ki, vi))
    acc = acc_dtype(a.dtype)
    return pl.pallas_call(
        functools.partial(_walk, step=step, n_chunks=n_chunks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, h, dk // block_k, dv // block_v, n_chunks),
            in_specs=[a_spec, b_spec, col_spec, block_spec],
            out_specs=[stored_spec, block_spec],
            scratch_shapes=[pltpu.VMEM((block_k, block_v), acc)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), a.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), acc)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 4 + ("arbitrary",)),
        interpret=interpret,
        name=name,
    )(a, b_, cum[..., None], start)


def states(k, v, cum, h0, *, config, interpret):
    """Same contract as ``gpu_states.states``."""
    return _pass(k, v, cum, h0, step=chunk_math.advance_state, reverse=False, config=config, interpret=interpret,
                 name="scalar_gate_states_tpu")


def dstates(q, dout, cum, dfinal, *, config, interpret):
    """Same contract as ``gpu_states.dstates``."""
    return _pass(q, dout, cum, dfinal, step=chunk_math.retreat_dstate, reverse=True, config=config,
                 interpret=interpret, name="scalar_gate_dstates_tpu")
