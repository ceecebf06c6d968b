"""The (gated) delta rule's sequential state pass on TPU (Pallas, Mosaic TPU backend); same contracts as
``delta_gpu``.

The chunk walk is the last ("arbitrary") grid axis, reversed by the index maps for ``dstates`` (grid step j reads
chunk n_chunks - 1 - j); the float32 state block [dk, block_v] lives in VMEM scratch across the steps, and the
pipeline fetches the next chunk's [chunk, dim] tiles while this one computes. The cumulative gates come as a
column [chunk, 1] (sublanes, like the tiles' rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.linear_recurrent import delta_math
from kernels_pallas.linear_recurrent.gpu_forward import acc_dtype
from kernels_pallas.linear_recurrent.tpu_forward import make_dot

_SEQUENTIAL = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3 + ("arbitrary",))


def _states_kernel(w_ref, u0_ref, kout_ref, cum_ref, h0_ref, states_ref, u_ref, final_ref, state_ref, *,
                   n_chunks):
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        state_ref[...] = h0_ref[...].astype(state_ref.dtype)

    state = state_ref[...]
    states_ref[...] = state.astype(states_ref.dtype)
    chunk = cum_ref.shape[0]
    last = cum_ref[pl.ds(chunk - 1, 1), :]  # [1, 1]
    u, state = delta_math.advance(w_ref[...], u0_ref[...], kout_ref[...], last, state, make_dot(w_ref.dtype))
    u_ref[...] = u.astype(u_ref.dtype)
    state_ref[...] = state

    @pl.when(j == n_chunks - 1)
    def _finish():
        final_ref[...] = state.astype(final_ref.dtype)


def _dstates_kernel(w_ref, kout_ref, cum_ref, states_ref, u_ref, dstates_ref, du_ref, dfinal_ref,
                    du0_ref, dw_ref, dkout_ref, dcum_ref, dh0_ref, dstate_ref, *, n_chunks):
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dstate_ref[...] = dfinal_ref[...].astype(dstate_ref.dtype)

    chunk = cum_ref.shape[0]
    last = cum_ref[pl.ds(chunk - 1, 1), :]  # [1, 1]
    du_tot, dw, dk_out, dlast, dprev = delta_math.retreat(
        w_ref[...], kout_ref[...], u_ref[...], du_ref[...], last, states_ref[...], dstate_ref[...],
        make_dot(w_ref.dtype), keepdims=True)
    du0_ref[...] = du_tot.astype(du0_ref.dtype)
    dw_ref[...] = dw.astype(dw_ref.dtype)
    dkout_ref[...] = dk_out.astype(dkout_ref.dtype)
    is_last = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) == chunk - 1
    dcum_ref[...] = jnp.where(is_last, dlast, 0.0).astype(dcum_ref.dtype)
    dstate = dprev + dstates_ref[...].astype(dprev.dtype)
    dstate_ref[...] = dstate

    @pl.when(j == n_chunks - 1)
    def _finish():
        dh0_ref[...] = dstate.astype(dh0_ref.dtype)


def _specs(chunk, dk, bv, n_chunks, reverse):
    """Per-chunk tiles of grid (b, h, dv block, chunk step): dk-wide, bv-wide, gate column, state, chunk state."""
    at = (lambda j: n_chunks - 1 - j) if reverse else (lambda j: j)
    tile_k = pl.BlockSpec((None, None, chunk, dk), lambda bi, hi, vi, j: (bi, hi, at(j), 0))
    tile_v = pl.BlockSpec((None, None, chunk, bv), lambda bi, hi, vi, j: (bi, hi, at(j), vi))
    gates = pl.BlockSpec((None, None, chunk, 1), lambda bi, hi, vi, j: (bi, hi, at(j), 0))
    state = pl.BlockSpec((None, None, dk, bv), lambda bi, hi, vi, j: (bi, hi, 0, vi))
    per_chunk = pl.BlockSpec((None, None, None, dk, bv), lambda bi, hi, vi, j: (bi, hi, at(j), 0, vi))
    partial_k = pl.BlockSpec((None, None, None, chunk, dk), lambda bi, hi, vi, j: (vi, bi, hi, at(j), 0))
    partial_gates = pl.BlockSpec((None, None, None, chunk, 1), lambda bi, hi, vi, j: (vi, bi, hi, at(j), 0))
    return tile_k, tile_v, gates, state, per_chunk, partial_k, partial_gates


def states(w, u0, k_out, cum, h0, *, config, interpret):
    """Same contract as ``delta_gpu.states``."""
    b, h, s, dk = w.shape
    dv = u0.shape[-1]
    chunk, bv = config.chunk_size, config.block_v
    n_chunks = s // chunk
    tile_k, tile_v, gates, state, per_chunk, _, _ = _specs(chunk, dk, bv, n_chunks, reverse=False)
    return pl.pallas_call(
        functools.partial(_states_kernel, n_chunks=n_chunks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, h, dv // bv, n_chunks),
            in_specs=[tile_k, tile_v, tile_k, gates, state],
            out_specs=[per_chunk, tile_v, state],
            scratch_shapes=[pltpu.VMEM((dk, bv), h0.dtype)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), w.dtype), jax.ShapeDtypeStruct(u0.shape, w.dtype),
                   jax.ShapeDtypeStruct(h0.shape, h0.dtype)],
        compiler_params=_SEQUENTIAL,
        interpret=interpret,
        name="delta_states_tpu",
    )(w, u0, k_out, cum[..., None], h0)


def dstates(w, k_out, cum, all_states, u, dall_states, du, dfinal, *, config, interpret):
    """Same contract as ``delta_gpu.dstates``."""
    b, h, s, dk = w.shape
    dv = u.shape[-1]
    chunk, bv = config.chunk_size, config.block_v
    n_chunks, n_v = s // chunk, dv // bv
    tile_k, tile_v, gates, state, per_chunk, partial_k, partial_gates = _specs(chunk, dk, bv, n_chunks, reverse=True)
    acc = acc_dtype(w.dtype)
    partial = w.dtype if n_v == 1 else acc  # one dv block: exact, so in the dtype the caller casts them to
    du0, dw, dk_out, dcum, dh0 = pl.pallas_call(
        functools.partial(_dstates_kernel, n_chunks=n_chunks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, h, n_v, n_chunks),
            in_specs=[tile_k, tile_k, gates, per_chunk, tile_v, per_chunk, tile_v, state],
            out_specs=[tile_v, partial_k, partial_k, partial_gates, state],
            scratch_shapes=[pltpu.VMEM((dk, bv), dfinal.dtype)],
        ),
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct((n_v,) + w.shape, partial),
                   jax.ShapeDtypeStruct((n_v,) + w.shape, partial), jax.ShapeDtypeStruct((n_v,) + cum.shape + (1,), acc),
                   jax.ShapeDtypeStruct(dfinal.shape, dfinal.dtype)],
        compiler_params=_SEQUENTIAL,
        interpret=interpret,
        name="delta_dstates_tpu",
    )(w, k_out, cum[..., None], all_states, u, dall_states, du, dfinal)
    return du0, dw, dk_out, dcum[..., 0], dh0
