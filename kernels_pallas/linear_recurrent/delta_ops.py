"""Public entry of the chunked (gated) delta rule: checks, padding, the XLA WY preparation, the Pallas kernels and
their custom VJPs, backend dispatch.

Structure (a first version), three steps:

1. the chunk-parallel WY preparation (one triangular solve per chunk) in plain JAX (``delta_chunk.wy_prepare``,
   differentiated by JAX's autodiff);
2. the SEQUENTIAL state pass across chunks, a Pallas kernel (``delta_gpu`` for Triton, ``delta_tpu`` for Mosaic
   TPU) with a ``jax.custom_vjp`` whose backward is the reverse-time Pallas pass (``dstates``);
3. the chunk-parallel output step, a Pallas kernel (``delta_output_gpu`` / ``delta_output_tpu``) with its own
   ``jax.custom_vjp`` (a chunk-parallel gradient kernel).

Autodiff chains the XLA piece's VJP and the two kernels' custom VJPs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from attn import _common as c
from kernels_pallas._common import resolve_backend
from kernels_pallas.linear_recurrent import delta_chunk

MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
    """How the delta-rule kernels tile the work.

    Attributes:
      chunk_size: steps per chunk (one triangular solve each; states are stored once per chunk).
      block_v: value columns of the state per program of the state passes and of the output kernel (None = all of
        dv); the rows (dk) are never split, since the correction ``w S`` contracts them. Smaller blocks give more
        programs. The output's gradient kernel takes whole heads.
      num_warps, num_stages: Triton launch settings (ignored on TPU and in interpret mode).
    """

    chunk_size: int = 64
    block_v: int | None = 64
    num_warps: int = 4
    num_stages: int = 2

    def validate(self, min_tile: int) -> None:
        """Raises ValueError unless chunk_size and block_v are powers of two >= ``min_tile`` (block_v may be None)."""
        for name in ("chunk_size", "block_v"):
            value = getattr(self, name)
            if value is None and name == "block_v":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < min_tile or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {min_tile}, got {value!r}")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


# GPU (Triton): 64-step chunks, state blocks [dk, 64] in registers (fla's chunk_gated_delta_rule layout; untuned).
GPU_DEFAULT = DeltaConfig(chunk_size=64, block_v=64, num_warps=4, num_stages=2)
# TPU: chunk rows are sublanes; the state block takes all of dv (lanes).
TPU_DEFAULT = DeltaConfig(chunk_size=128, block_v=None)
# CPU interpret mode (tests): small chunks so that short inputs take several (16: the GPU build's smallest tile).
INTERPRET_DEFAULT = DeltaConfig(chunk_size=16, block_v=None)


def default_config(backend: str, interpret) -> DeltaConfig:
    if interpret:
        return INTERPRET_DEFAULT
    return TPU_DEFAULT if backend == "mosaic_tpu" else GPU_DEFAULT


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the kernels need that is not an array (hashable: custom_vjp's non-differentiable argument)."""

    config: DeltaConfig
    backend: str
    interpret: Any


def _kernels(backend):
    """The backend's (state pass, output step) kernel modules."""
    if backend == "triton":
        from kernels_pallas.linear_recurrent import delta_gpu, delta_output_gpu

        return delta_gpu, delta_output_gpu
    from kernels_pallas.linear_recurrent import delta_output_tpu, delta_tpu

    return delta_tpu, delta_output_tpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _state_pass(w, u0, k_out, cum, h0, st: _Static):
    """(states entering each chunk, corrected values U, final state) from the WY pieces: the sequential kernel."""
    outputs, _ = _state_pass_fwd(w, u0, k_out, cum, h0, st)
    return outputs


def _state_pass_fwd(w, u0, k_out, cum, h0, st):
    passes, _ = _kernels(st.backend)
    all_states, u, final = passes.states(w, u0, k_out, cum, h0, config=st.config, interpret=st.interpret)
    return (all_states, u, final), (w, k_out, cum, all_states, u)


def _state_pass_bwd(st, residuals, cotangents):
    w, k_out, cum, all_states, u = residuals
    dall_states, du, dfinal = cotangents
    passes, _ = _kernels(st.backend)
    du0, dw, dk_out, dcum, dh0 = passes.dstates(
        w, k_out, cum, all_states, u, dall_states.astype(all_states.dtype), du.astype(u.dtype),
        dfinal.astype(cum.dtype), config=st.config, interpret=st.interpret)
    # d w, d k_out and d cum are partial sums over the dv blocks (leading axis).
    return (dw.sum(0).astype(w.dtype), du0.astype(w.dtype), dk_out.sum(0).astype(k_out.dtype),
            dcum.sum(0).astype(cum.dtype), dh0.astype(cum.dtype))


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _output(q, k, u, cum, all_states, st: _Static):
    """Every chunk's output from its entering state and corrected values: the chunk-parallel kernel."""
    return _kernels(st.backend)[1].output(q, k, u, cum, all_states, config=st.config, interpret=st.interpret)


def _output_fwd(q, k, u, cum, all_states, st):
    return _output(q, k, u, cum, all_states, st), (q, k, u, cum, all_states)


def _output_bwd(st, residuals, dout):
    q, k, u, cum, all_states = residuals
    grads = _kernels(st.backend)[1].output_gradients(q, k, u, dout.astype(q.dtype), cum, all_states,
                                                     config=st.config, interpret=st.interpret)
    return tuple(g.astype(x.dtype) for g, x in zip(grads, residuals))


_output.defvjp(_output_fwd, _output_bwd)


def _check_inputs(q, k, v, beta, log_gate, initial_state):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, dim], got {getattr(x, 'shape', x)}")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k and v must share a floating-point dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [batch, seq, heads, head_dim], got {q.shape} and {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [batch, seq, heads, v_head_dim] with q's {q.shape[:3]}, got {v.shape}")
    b, s, h, dk = q.shape
    dv = v.shape[3]
    for name, dim in (("head_dim", dk), ("v_head_dim", dv)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{name} must be at most {MAX_HEAD_DIM} (state blocks live in fast memory), got {dim}")
    for name, x in (("beta", beta), ("log_gate", log_gate)):
        if x is None and name == "log_gate":
            continue
        if getattr(x, "shape", None) is None or tuple(x.shape) != (b, s, h):
            raise ValueError(f"{name} must have shape [batch, seq, heads] = {(b, s, h)}, "
                             f"got {getattr(x, 'shape', x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, dk, dv):
        raise ValueError(f"initial_state must have shape [batch, heads, head_dim, v_head_dim] = {(b, h, dk, dv)}, "
                         f"got {tuple(initial_state.shape)}")


def _pow2_at_least(n, floor):
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def _resolve_config(config, chunk_size, backend, interpret, dv):
    """The config with block_v filled from the (padded) value dim, validated for the backend."""
    if config is None:
        config = default_config(backend, interpret)
    if not isinstance(config, DeltaConfig):
        raise ValueError(f"config must be a DeltaConfig or None, got {type(config).__name__}")
    if chunk_size is not None:
        config = dataclasses.replace(config, chunk_size=chunk_size)
    config.validate(16 if backend == "triton" else 8)
    block_v = dv if config.block_v is None else min(config.block_v, dv)
    if dv % block_v:
        raise ValueError(f"block_v ({block_v}) must divide the value head dim ({dv})")
    return dataclasses.replace(config, block_v=block_v)


def _to_chunks(x, s_pad, d_pad, chunk, dtype):
    """[b, s, h, d] -> zero-padded heads-first chunks [b, h, n, chunk, d_pad] in ``dtype``; [b, s, h] ->
    [b, h, n, chunk]."""
    x = x.astype(dtype)
    widths = [(0, 0), (0, s_pad - x.shape[1]), (0, 0)] + ([(0, d_pad - x.shape[3])] if x.ndim == 4 else [])
    x = jnp.swapaxes(jnp.pad(x, widths), 1, 2)
    return x.reshape(x.shape[:2] + (s_pad // chunk, chunk) + x.shape[3:])


def chunked_delta_recurrence(
    q,
    k,
    v,
    beta,
    log_gate=None,
    *,
    initial_state=None,
    chunk_size: int | None = None,
    config: DeltaConfig | None = None,
    backend: str | None = None,
    interpret=False,
):
    """Chunked (gated) delta rule: ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T q_t`` (state [head_dim, v_head_dim], the papers' transpose, as in ``attn._recurrent``).

    Args:
      q, k: [batch, seq, heads, head_dim], already as the recurrence uses them (attn's delta rules L2-normalise
        q and k and scale q; repeat GQA kv heads before); v: [batch, seq, heads, v_head_dim].
      beta: [batch, seq, heads] writing strengths (in (0, 1) for a contraction).
      log_gate: None (the plain delta rule) or [batch, seq, heads], log of the decay g_t <= 0 (gated delta rule).
      initial_state: None (zeros) or [batch, heads, head_dim, v_head_dim].
      chunk_size: steps per chunk, a power of two (>= 16 on GPU, >= 8 on TPU); overrides ``config.chunk_size``.
        Any sequence length works (padded with identity steps: k = v = beta = 0, gate 0).
      config: ``DeltaConfig``; None = per-device default.
      backend: "triton" (GPU), "mosaic_tpu" (TPU) or None (from the default device).
      interpret: run in Pallas' interpreter (CPU tests); for the TPU kernel also a ``pltpu.InterpretParams``.

    Returns ``(out [batch, seq, heads, v_head_dim] in q's dtype, final_state [batch, heads, head_dim, v_head_dim]
    float32)`` (float64 for float64 inputs, interpret mode only). Differentiable in q, k, v, beta, log_gate and
    initial_state. The WY preparation runs in float32 (XLA); the kernels' matmul operands are in q's dtype,
    accumulated in float32 with a float32 carried state (states stored per chunk in q's dtype).

    Papers: "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"; "Gated Delta Networks:
    Improving Mamba2 with Delta Rule".
    """
    _check_inputs(q, k, v, beta, log_gate, initial_state)
    if q.dtype == jnp.float64 and not interpret:
        raise ValueError("q, k, v in float64 are only supported with interpret=True; use float32 or lower")
    backend = resolve_backend(backend, interpret)
    if backend == "mosaic_tpu" and interpret is True:
        from jax.experimental.pallas import tpu as pltpu

        interpret = pltpu.InterpretParams()
    b, s, h, dk = q.shape
    dv = v.shape[3]
    # Triton's dot wants power-of-two dims >= 16: zero columns of q, k, v and the state change nothing.
    dk_pad = _pow2_at_least(dk, 16) if backend == "triton" else dk
    dv_pad = _pow2_at_least(dv, 16) if backend == "triton" else dv
    config = _resolve_config(config, chunk_size, backend, interpret, dv_pad)
    chunk = config.chunk_size
    n_chunks = -(-max(s, 1) // chunk)
    s_pad = n_chunks * chunk
    acc = c.compute_dtype(q.dtype)

    qc, kc = (_to_chunks(x, s_pad, dk_pad, chunk, acc) for x in (q, k))  # [b, h, n, C, dk]
    vc = _to_chunks(v, s_pad, dv_pad, chunk, acc)
    beta_c = _to_chunks(beta, s_pad, None, chunk, acc)  # [b, h, n, C]
    gate = jnp.zeros((b, s, h), acc) if log_gate is None else log_gate
    cum = jnp.cumsum(_to_chunks(gate, s_pad, None, chunk, acc), axis=-1)  # inclusive, inside each chunk
    u0, w, k_out = delta_chunk.wy_prepare(kc, vc, beta_c, cum)

    def flat(x):  # [b, h, n, C, d] -> [b, h, s_pad, d] in the kernels' operand dtype
        return x.reshape(b, h, s_pad, x.shape[-1]).astype(q.dtype)

    h0 = jnp.zeros((b, h, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
    h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, dk_pad - dk), (0, dv_pad - dv)))
    st = _Static(config, backend, interpret)
    cum = cum.reshape(b, h, s_pad)
    all_states, u, final = _state_pass(flat(w), flat(u0), flat(k_out), cum, h0, st)
    out = _output(flat(qc), flat(kc), u, cum, all_states, st)  # [b, h, s_pad, dv_pad] in q's dtype
    return jnp.swapaxes(out, 1, 2)[:, :s, :, :dv], final[:, :, :dk, :dv]


def mechanism_recurrence(q, k, v, beta, log_gate, *, initial_state, segment_ids, chunk_size):
    """``implementation="pallas"`` of attn's ``delta_rule`` / ``gated_delta_rule``: the kernel for the default
    device, in Pallas' interpreter on the CPU. q, k already normalised (q scaled), GQA heads repeated."""
    if segment_ids is not None:
        raise ValueError("segment_ids are not supported by implementation='pallas'; use 'chunked'")
    return chunked_delta_recurrence(q, k, v, beta, log_gate, initial_state=initial_state, chunk_size=chunk_size,
                                    interpret=jax.default_backend() == "cpu")
