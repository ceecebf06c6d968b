"""Public entry of the chunked vector-gate (GLA) recurrence: checks, padding, backend dispatch, custom VJP."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attn import _common as c
from kernels_pallas.linear_recurrent import _entry


@dataclasses.dataclass(frozen=True)
class VectorGateConfig:
    """How the vector-gate kernels tile the work.

    Attributes:
      chunk_size: steps per chunk (the chunk-parallel passes' tile; states are stored once per chunk).
      sub_chunk: steps per sub-chunk inside a chunk: products between sub-chunks are matmuls, and inside one
        too where its gates span at most ``FACTORED_SPAN`` nats (gates above ~e^(-60 / sub_chunk) a step on
        average), else an elementwise loop (see vector_gate_forward; for bf16 the factored block adds rounding:
        relative error 3.6e-3 against 3.2e-3 for the output at D128 on the H200); must divide chunk_size.
      state_block_k, state_block_v: the state block of one program of the sequential state passes (None = all of
        dk / dv). Smaller blocks give more programs.
      block_v: value columns per program of the chunk-parallel passes (None = all of dv). Splitting dv gives more
        programs at the price of recomputing the chunk's gate products and summing partial dq, dk, dgate.
      num_warps, num_stages: Triton launch settings (ignored on TPU and in interpret mode).
      scores_kernel: GPU only. The intra-chunk work in its own kernels, as fla lays it out: the forward writes
        A (q's dtype), then the output (q * exp(cum)) S + A V; A is kept for the backward, which writes dA = dO V^T
        (and its transpose), then the terms of dq and dk from inside the chunk, then the rest with whole-chunk
        matmuls. One program per chunk each; A and the intra-chunk terms take whole-chunk matmuls referenced to
        the midpoint of the chunk's gates where those span at most ``FACTORED_SPAN`` nats (gates above
        ~e^(-60 / chunk_size) a step on average), else sub-chunk by sub-chunk as above. Costs C / dk of q's size
        in saved A, two float32 [C, C] tiles per chunk and two float32 copies of q's size in the backward.
      scores_warps: num_warps of the forward's scores kernel of ``scores_kernel`` (None = num_warps).
      state_warps, state_stages: GPU launch settings of the forward's sequential state pass; dstate_warps,
        dstate_stages: those of the backward's reverse pass (None: num_warps / num_stages). The walks are
        latency-bound: Triton's software pipelining (stages) loads chunks ahead. H200, D128 bf16, ms at B4 S8192
        H16 / B1 S32768 H16 (``benchmarks/time_scalar_kernels.py``, ``time_scalar_kernels_gla_delta_h200.txt``):
        forward pass [64, 64] at 4 warps and 4 stages 0.342 / 0.821, at 8 warps and 2 stages (num_warps /
        num_stages, the setting before) - / 1.247; reverse pass likewise 0.306 / 0.678 against - / 1.304 (B4 at 8
        warps and 2 stages: 0.71 / 0.69 in ``check_gla_kernel_passes_h200.txt``, an earlier build). At B1 [16, 64]
        blocks at 2 warps and 3 stages were fastest (0.710 / 0.686; untimed at B4). GLA at B1, same call as fla
        (``linear_recurrent_h200_b1_a872a32.md``): forward 13.9 M tokens/s / forward+backward 4.99 M against 11.8
        / 4.32 with the state passes at 8 warps and 2 stages (fla 19.5 / 4.57).
    """

    chunk_size: int = 64
    sub_chunk: int = 16
    state_block_k: int | None = 64
    state_block_v: int | None = 64
    block_v: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    scores_kernel: bool = False
    scores_warps: int | None = None
    state_warps: int | None = None
    state_stages: int | None = None
    dstate_warps: int | None = None
    dstate_stages: int | None = None

    def validate(self, min_tile: int) -> None:
        """Raises ValueError unless the sizes are powers of two >= ``min_tile`` and sub_chunk divides chunk_size."""
        for name in ("chunk_size", "sub_chunk", "state_block_k", "state_block_v", "block_v"):
            value = getattr(self, name)
            if value is None and name != "chunk_size" and name != "sub_chunk":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < min_tile or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {min_tile}, got {value!r}")
        if self.chunk_size % self.sub_chunk:
            raise ValueError(f"sub_chunk ({self.sub_chunk}) must divide chunk_size ({self.chunk_size})")
        for name in ("num_warps", "num_stages", "scores_warps", "state_warps", "state_stages", "dstate_warps",
                     "dstate_stages"):
            value = getattr(self, name)
            if value is None and name not in ("num_warps", "num_stages"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.scores_kernel, bool):
            raise ValueError(f"scores_kernel must be a bool, got {self.scores_kernel!r}")


# GPU (Triton): 64-step chunks of 16-step sub-chunks, as fla's chunk_gla, the intra-chunk work in its own kernels
# (scores_kernel), 8 warps but 4 for the scores. H200, B4 S8192 H16 D128 bf16, forward / forward+backward
# (benchmarks/results/check_gla_kernel_whole_chunk_h200.txt, d67b2f0): 1.73 / 4.49 ms; scores at 2 warps 2.33 /
# 4.96, at 8 1.87 / 4.53; the one-kernel output and gradients 1.67 / 5.80; gates ~100x stronger (sub-chunk by
# sub-chunk, mostly the column loop) 4.34 / 10.63.
GPU_DEFAULT = VectorGateConfig(chunk_size=64, sub_chunk=16, state_block_k=64, state_block_v=64, block_v=None,
                               num_warps=8, num_stages=2, scores_kernel=True, scores_warps=4, state_warps=4,
                               state_stages=4, dstate_warps=4, dstate_stages=4)
# TPU: chunk rows are sublanes (multiples of 8); the chunk-parallel tiles take all of dk and dv.
TPU_DEFAULT = VectorGateConfig(chunk_size=128, sub_chunk=32, state_block_k=None, state_block_v=None)
# CPU interpret mode (tests): small chunks so that short inputs take several chunks and sub-chunks (16 is the
# smallest tile the GPU build accepts).
INTERPRET_DEFAULT = VectorGateConfig(chunk_size=32, sub_chunk=16, state_block_k=None, state_block_v=None)
# What config=None picks (``_entry.choose_config``): (GPU, TPU, interpret mode).
DEFAULTS = (GPU_DEFAULT, TPU_DEFAULT, INTERPRET_DEFAULT)


def _kernels(backend):
    if backend == "triton":
        from kernels_pallas.linear_recurrent import vector_gate_gpu

        return vector_gate_gpu
    from kernels_pallas.linear_recurrent import vector_gate_tpu

    return vector_gate_tpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _recurrence(q, k, v, cum, h0, st: _entry.Static):
    (out, final), _ = _recurrence_fwd(q, k, v, cum, h0, st)
    return out, final


def _recurrence_fwd(q, k, v, cum, h0, st):
    kernels, kw = _kernels(st.backend), dict(config=st.config, interpret=st.interpret)
    states, final = kernels.states(k, v, cum, h0, **kw)
    scores = kernels.scores(q, k, cum, **kw) if st.config.scores_kernel else None
    out = kernels.output(q, k, v, cum, states, scores=scores, **kw)
    return (out, final), (q, k, v, cum, states, scores)


def _recurrence_bwd(st, residuals, cotangents):
    q, k, v, cum, states, scores = residuals
    dout, dfinal = cotangents
    kernels, kw = _kernels(st.backend), dict(config=st.config, interpret=st.interpret)
    acc = cum.dtype
    dout = dout.astype(q.dtype)
    dstates, dh0 = kernels.dstates(q, dout, cum, dfinal.astype(acc), **kw)
    intra = None
    if scores is not None:  # the forward's A is kept (q's dtype, [b, s, h, C]: C / dk of q's size)
        intra = kernels.intra_gradients(q, k, cum, kernels.dscores(v, dout, **kw), **kw)
    dq, dk, dv, dcum = kernels.backward(q, k, v, cum, states, dstates, dout, scores=scores, intra=intra, **kw)
    return (dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv.astype(v.dtype), dcum.sum(0).astype(acc),
            dh0.astype(acc))


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def chunked_vector_gate_recurrence(
    q,
    k,
    v,
    log_gate,
    *,
    initial_state=None,
    chunk_size: int | None = None,
    config: VectorGateConfig | None = None,
    backend: str | None = None,
    interpret=False,
):
    """Chunked gated linear attention (GLA): ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    Args:
      q, k: [batch, seq, heads, head_dim]; v: [batch, seq, heads, v_head_dim] (repeat GQA kv heads before; no
        scale is applied).
      log_gate: [batch, seq, heads, head_dim], the log forget gate g_t <= 0, one per key dimension.
      initial_state: None (zeros) or [batch, heads, head_dim, v_head_dim].
      chunk_size: steps per chunk, a power of two (>= 16 on GPU, >= 8 on TPU); overrides ``config.chunk_size``
        (the sub-chunk shrinks to it if larger). Any sequence length works (padded with identity steps).
      config: ``VectorGateConfig``; None = per-device default.
      backend: "triton" (GPU), "mosaic_tpu" (TPU) or None (from the default device).
      interpret: run in Pallas' interpreter (CPU tests); for the TPU kernel also a ``pltpu.InterpretParams``.

    Returns ``(out [batch, seq, heads, v_head_dim] in q's dtype, final_state [batch, heads, head_dim, v_head_dim]
    float32)`` (float64 for float64 inputs, interpret mode only). Differentiable in q, k, v, log_gate and
    initial_state (``jax.custom_vjp``).

    Paper: "Gated Linear Attention Transformers with Hardware-Efficient Training".
    """
    _entry.check_inputs(q, k, v, initial_state, [("log_gate", log_gate, ("batch", "seq", "heads", "head_dim"),
                                                    " (one gate per key dimension)")])
    backend, interpret = _entry.resolve(q.dtype, backend, interpret)
    config = _entry.choose_config(config, VectorGateConfig, DEFAULTS, backend, interpret)
    if chunk_size is not None:
        config = dataclasses.replace(config, chunk_size=chunk_size, sub_chunk=min(config.sub_chunk, chunk_size))
    config.validate(_entry.min_tile(backend))
    if config.scores_kernel and backend != "triton":
        raise ValueError(f"scores_kernel is a GPU (Triton) option; backend {backend!r} takes scores_kernel=False")
    b, s, h, dk = q.shape
    dv = v.shape[3]
    dk_pad, dv_pad = _entry.padded_head_dims(dk, dv, backend)
    config = _entry.fill_blocks(config, {"state_block_k": dk_pad, "state_block_v": dv_pad, "block_v": dv_pad})
    chunk = config.chunk_size
    s_pad = _entry.padded_length(s, chunk)
    acc = c.compute_dtype(q.dtype)

    # Padded steps have k = v = 0 and gate 0 (identity): the state passes through them unchanged.
    def prepare(x, d_pad):  # stays [b, s, h, d]: the kernels' block specs pick one head's rows
        return jnp.pad(x, ((0, 0), (0, s_pad - s), (0, 0), (0, d_pad - x.shape[3])))

    qp, kp, vp = prepare(q, dk_pad), prepare(k, dk_pad), prepare(v, dv_pad)
    gate = prepare(log_gate.astype(acc), dk_pad)
    # Inclusive cumulative log gate inside each chunk (its gradient, a reverse cumsum, comes from autodiff).
    cum = jnp.cumsum(gate.reshape(b, s_pad // chunk, chunk, h, dk_pad), axis=2).reshape(b, s_pad, h, dk_pad)
    h0 = _entry.initial_state(initial_state, (b, h, dk, dv), dk_pad, dv_pad, acc)

    out, final = _recurrence(qp, kp, vp, cum, h0, _entry.Static(config, backend, interpret))
    return out[:, :s, :, :dv], final[:, :, :dk, :dv]


def mechanism_recurrence(q, k, v, log_gate, *, initial_state, segment_ids, chunk_size):
    """``implementation="pallas"`` of attn's ``gla``: the kernel for the default device, in Pallas' interpreter on
    the CPU. Inputs already scaled and with GQA heads repeated."""
    _entry.refuse_segment_ids(segment_ids)
    return chunked_vector_gate_recurrence(q, k, v, log_gate, initial_state=initial_state, chunk_size=chunk_size,
                                          interpret=jax.default_backend() == "cpu")
