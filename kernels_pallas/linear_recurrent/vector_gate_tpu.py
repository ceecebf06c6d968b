"""The vector-gate (GLA) kernels on TPU (Pallas, Mosaic TPU backend).

The chunk-parallel passes are the GPU build's kernel bodies and block specs with TPU compiler parameters (one
[chunk, dim] tile per grid step is what both backends load), on heads-first copies of the inputs. The two
sequential passes put the chunk walk in the grid instead of a loop: the last ("arbitrary") axis counts chunks
(reversed by the index maps for the state gradient) and the float32 state block lives in VMEM scratch across
its steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.linear_recurrent import vector_gate_backward as bwd
from kernels_pallas.linear_recurrent import vector_gate_forward as fwd
from kernels_pallas.linear_recurrent import vector_gate_gpu

_PARALLEL = pltpu.CompilerParams(dimension_semantics=("parallel",) * 4)
_SEQUENTIAL = pltpu.CompilerParams(dimension_semantics=("parallel",) * 4 + ("arbitrary",))


def _states_kernel(k_ref, v_ref, cum_ref, h0_ref, states_ref, final_ref, state_ref, *, n_chunks):
    n = pl.program_id(4)

    @pl.when(n == 0)
    def _init():
        state_ref[...] = h0_ref[...].astype(state_ref.dtype)

    state = state_ref[...]
    states_ref[...] = state.astype(states_ref.dtype)
    last = cum_ref[pl.ds(cum_ref.shape[0] - 1, 1), :]
    state = fwd.next_state(state, k_ref[...], v_ref[...], cum_ref[...], last, fwd.make_dot(k_ref.dtype))
    state_ref[...] = state

    @pl.when(n == n_chunks - 1)
    def _finish():
        final_ref[...] = state.astype(final_ref.dtype)


def _dstates_kernel(q_ref, dout_ref, cum_ref, dfinal_ref, dstates_ref, dh0_ref, dstate_ref, *, n_chunks):
    j = pl.program_id(4)

    @pl.when(j == 0)
    def _init():
        dstate_ref[...] = dfinal_ref[...].astype(dstate_ref.dtype)

    dstate = dstate_ref[...]
    dstates_ref[...] = dstate.astype(dstates_ref.dtype)
    last = cum_ref[pl.ds(cum_ref.shape[0] - 1, 1), :]
    dstate = bwd.previous_dstate(dstate, q_ref[...], dout_ref[...], cum_ref[...], last, fwd.make_dot(q_ref.dtype))
    dstate_ref[...] = dstate

    @pl.when(j == n_chunks - 1)
    def _finish():
        dh0_ref[...] = dstate.astype(dh0_ref.dtype)


def _sequential_call(kernel, name, x_k, x_v, cum, start_state, *, config, interpret, reverse):
    """Shared set-up of the two state passes: x_k [b, h, s, dk] (k or q), x_v [b, h, s, dv] (v or dout)."""
    b, h, s, dk = x_k.shape
    dv = x_v.shape[-1]
    chunk, bk, bv = config.chunk_size, config.state_block_k, config.state_block_v
    n_chunks = s // chunk
    at = (lambda n: n_chunks - 1 - n) if reverse else (lambda n: n)
    tile_k = pl.BlockSpec((None, None, chunk, bk), lambda bi, hi, ki, vi, n: (bi, hi, at(n), ki))
    tile_v = pl.BlockSpec((None, None, chunk, bv), lambda bi, hi, ki, vi, n: (bi, hi, at(n), vi))
    state = pl.BlockSpec((None, None, bk, bv), lambda bi, hi, ki, vi, n: (bi, hi, ki, vi))
    per_chunk = pl.BlockSpec((None, None, None, bk, bv), lambda bi, hi, ki, vi, n: (bi, hi, at(n), ki, vi))
    return pl.pallas_call(
        functools.partial(kernel, n_chunks=n_chunks),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, h, dk // bk, dv // bv, n_chunks),
            in_specs=[tile_k, tile_v, tile_k, state],
            out_specs=[per_chunk, state],
            scratch_shapes=[pltpu.VMEM((bk, bv), start_state.dtype)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), x_k.dtype),
                   jax.ShapeDtypeStruct(start_state.shape, start_state.dtype)],
        compiler_params=_SEQUENTIAL,
        interpret=interpret,
        name=name,
    )(x_k, x_v, cum, start_state)


def _heads_first(x):
    """[..., seq, heads, dim] <-> [..., heads, seq, dim]: Mosaic wants [chunk, dim] tiles in the two minor axes."""
    return jnp.swapaxes(x, -3, -2)


def states(k, v, cum, h0, *, config, interpret):
    """Same contract as ``vector_gate_gpu.states``."""
    k, v, cum = (_heads_first(x) for x in (k, v, cum))
    return _sequential_call(_states_kernel, "vector_gate_states_tpu", k, v, cum, h0, config=config,
                            interpret=interpret, reverse=False)


def dstates(q, dout, cum, dfinal, *, config, interpret):
    """Same contract as ``vector_gate_gpu.dstates``."""
    q, dout, cum = (_heads_first(x) for x in (q, dout, cum))
    return _sequential_call(_dstates_kernel, "vector_gate_dstates_tpu", q, dout, cum, dfinal, config=config,
                            interpret=interpret, reverse=True)


def output(q, k, v, cum, all_states, *, config, interpret, scores=None):
    """Same contract as ``vector_gate_gpu.output``, without ``scores`` (``scores_kernel`` is GPU only)."""
    assert scores is None
    q, k, v, cum = (_heads_first(x) for x in (q, k, v, cum))
    out = vector_gate_gpu.output(q, k, v, cum, all_states, config=config, interpret=interpret, seq_major=False,
                                 compiler_params=_PARALLEL)
    return _heads_first(out)


def backward(q, k, v, cum, all_states, all_dstates, dout, *, config, interpret, scores=None, intra=None):
    """Same contract as ``vector_gate_gpu.backward``, without ``scores`` and ``intra``."""
    assert scores is None and intra is None
    q, k, v, cum, dout = (_heads_first(x) for x in (q, k, v, cum, dout))
    grads = vector_gate_gpu.backward(q, k, v, cum, all_states, all_dstates, dout, config=config,
                                     interpret=interpret, seq_major=False, compiler_params=_PARALLEL)
    return tuple(_heads_first(g) for g in grads)
