"""Public entry: argument checks, padding, backend dispatch and the custom VJP."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attn import _common as c
from kernels_pallas.linear_recurrent import _entry
from kernels_pallas.linear_recurrent import config as config_lib


def _kernels(backend):
    """The backend's kernels: the state passes, the output and gradient kernels and the fused forward."""
    if backend == "triton":
        from kernels_pallas.linear_recurrent import gpu_backward as backward
        from kernels_pallas.linear_recurrent import gpu_forward as forward
        from kernels_pallas.linear_recurrent import gpu_states as states
    else:
        from kernels_pallas.linear_recurrent import tpu_backward as backward
        from kernels_pallas.linear_recurrent import tpu_forward as forward
        from kernels_pallas.linear_recurrent import tpu_states as states
    return forward, states, backward


def _forward(q, k, v, cum, h0, st, save_states):
    """(out, final state, states entering each chunk or None)."""
    forward, states, _ = _kernels(st.backend)
    options = dict(config=st.config, interpret=st.interpret, **st.gate_option())
    if st.config.fused_forward:
        return forward.fused(q, k, v, cum, h0, save_states=save_states, **options)
    entering, final = states.states(k, v, cum, h0, **options)
    out = forward.output(q, k, v, cum, entering, **options)
    return out, final, entering


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _recurrence(q, k, v, cum, h0, st: _entry.Static):
    out, final, _ = _forward(q, k, v, cum, h0, st, save_states=False)
    return out, final


def _recurrence_fwd(q, k, v, cum, h0, st):
    out, final, entering = _forward(q, k, v, cum, h0, st, save_states=True)
    return (out, final), (q, k, v, cum, entering)


def _recurrence_bwd(st, residuals, cotangents):
    q, k, v, cum, entering = residuals  # h0 has cum's dtype (the accumulation dtype)
    dout, dfinal = cotangents
    _, states, backward = _kernels(st.backend)
    options = dict(config=st.config.backward(), interpret=st.interpret, **st.gate_option())
    dleaving, dh0 = states.dstates(q, dout.astype(q.dtype), cum, dfinal.astype(cum.dtype), **options)
    dq, dk, dv, dcum = backward.gradients(q, k, v, dout.astype(q.dtype), cum, entering, dleaving, **options)
    return dq, dk, dv, dcum.astype(cum.dtype), dh0.astype(cum.dtype)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def chunked_scalar_gate_recurrence(
    q,
    k,
    v,
    log_gate=None,
    *,
    initial_state=None,
    chunk_size: int | None = None,
    config: config_lib.ChunkConfig | None = None,
    backend: str | None = None,
    interpret=False,
):
    """Chunked linear recurrence with a scalar gate: ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    Args:
      q, k: [batch, seq, heads, head_dim]; v: [batch, seq, heads, v_head_dim] (repeat GQA kv heads before; no
        scale is applied).
      log_gate: None (no decay: plain causal linear attention) or [batch, seq, heads], the log forget gate g_t <= 0.
      initial_state: None (zeros) or [batch, heads, head_dim, v_head_dim].
      chunk_size: steps per chunk, a power of two (>= 16 on GPU, >= 8 on TPU); overrides ``config.chunk_size``.
        Any sequence length works (padded with identity steps).
      config: ``ChunkConfig`` (chunk size, state blocks, fused forward, Triton launch settings); None = per-device
        default.
      backend: "triton" (GPU), "mosaic_tpu" (TPU) or None (from the default device).
      interpret: run in Pallas' interpreter (CPU tests); for the TPU kernel also a ``pltpu.InterpretParams``.

    Returns ``(out [batch, seq, heads, v_head_dim] in q's dtype, final_state [batch, heads, head_dim, v_head_dim]
    float32)`` (float64 for float64 inputs, interpret mode only). Differentiable in q, k, v, log_gate and
    initial_state (``jax.custom_vjp``). Forward: a sequential pass storing the state entering each chunk, then a
    chunk-parallel output kernel (or one fused sequential kernel: ``config.fused_forward``). Backward: a
    sequential reverse pass storing the gradient of the state leaving each chunk, then a chunk-parallel kernel
    for dq, dk, dv and the gate gradient.

    Papers: "Gated Linear Attention Transformers with Hardware-Efficient Training"; "Retentive Network: A
    Successor to Transformer for Large Language Models".
    """
    per_step = [] if log_gate is None else [("log_gate", log_gate, ("batch", "seq", "heads"),
                                             " (one scalar gate per head and step)")]
    _entry.check_inputs(q, k, v, initial_state, per_step)
    backend, interpret = _entry.resolve(q.dtype, backend, interpret)
    config = _entry.choose_config(config, config_lib.ChunkConfig, config_lib.DEFAULTS, backend, interpret)
    if chunk_size is not None:
        config = dataclasses.replace(config, chunk_size=chunk_size)
    config.validate(_entry.min_tile(backend))
    if backend == "mosaic_tpu" and not interpret and config.chunk_size % 128:
        # The gates enter the TPU kernel as a [1, chunk] row tile, whose lane axis must be a multiple of 128.
        raise ValueError(f"chunk_size must be a multiple of 128 on TPU, got {config.chunk_size}")

    b, s, h, dk = q.shape
    dv = v.shape[3]
    acc = c.compute_dtype(q.dtype)
    dk_pad, dv_pad = _entry.padded_head_dims(dk, dv, backend)
    config = _entry.fill_blocks(config, {"block_k": dk_pad, "block_v": dv_pad, "output_block_v": dv_pad})
    config = config_lib.more_state_programs(config, b * h, dk_pad, dv_pad)
    if config.fused_forward is None:  # by parallelism: the fused walk has one program per (batch, head, dv block)
        fused = b * h * (dv_pad // config.block_v) >= config_lib.FUSED_MIN_PROGRAMS
        config = dataclasses.replace(config, fused_forward=fused)
    chunk = config.chunk_size
    s_pad = _entry.padded_length(s, chunk)

    # The GPU kernels read the caller's [b, s, h, d] layout; the TPU kernels' tiles want [b, h, s, d] (a block's
    # last two dims must be whole (8, 128) tiles, which one head's row is not).
    heads_first = backend == "mosaic_tpu"

    # Padded steps have k = v = 0 and gate 0 (identity): the state passes through them unchanged.
    def prepare(x, d_pad):
        x = jnp.pad(x, ((0, 0), (0, s_pad - s), (0, 0), (0, d_pad - x.shape[3])))
        return jnp.swapaxes(x, 1, 2) if heads_first else x

    qp, kp, vp = prepare(q, dk_pad), prepare(k, dk_pad), prepare(v, dv_pad)
    if log_gate is None:  # zeros, not a cumsum of zeros (XLA would spend seconds constant-folding that)
        cum = jnp.zeros((b, h, s_pad), acc)
    else:  # inclusive cumulative log gate inside each chunk (its gradient, a reverse cumsum, from autodiff)
        gate = jnp.swapaxes(jnp.pad(log_gate.astype(acc), ((0, 0), (0, s_pad - s), (0, 0))), 1, 2)  # [b, h, s]
        cum = jnp.cumsum(gate.reshape(b, h, s_pad // chunk, chunk), axis=-1).reshape(b, h, s_pad)
    h0 = _entry.initial_state(initial_state, (b, h, dk, dv), dk_pad, dv_pad, acc)

    out, final = _recurrence(qp, kp, vp, cum, h0, _entry.Static(config, backend, interpret, log_gate is not None))
    out = jnp.swapaxes(out, 1, 2) if heads_first else out
    return out[:, :s, :, :dv], final[:, :, :dk, :dv]


def mechanism_recurrence(q, k, v, log_gate, *, initial_state, segment_ids, chunk_size):
    """``implementation="pallas"`` of attn's scalar-gate mechanisms (simple_gla, retention, lightning): the kernel
    for the default device, in Pallas' interpreter on the CPU. Inputs already scaled and GQA heads repeated."""
    _entry.refuse_segment_ids(segment_ids)
    return chunked_scalar_gate_recurrence(q, k, v, log_gate, initial_state=initial_state, chunk_size=chunk_size,
                                          interpret=jax.default_backend() == "cpu")
