"""Public entry of the chunked (gated) delta rule: checks, padding, the XLA WY preparation, the Pallas kernels and
their custom VJPs, backend dispatch.

Structure (a first version), three steps:

1. the chunk-parallel WY preparation in plain JAX (``delta_chunk.wy_prepare``, differentiated by JAX's autodiff):
   on the GPU build T = (I + A)^-1 per chunk from a Pallas kernel with a custom VJP (``delta_inverse_gpu``) then two
   matmuls; on the TPU build one XLA triangular solve per chunk (``DeltaConfig.explicit_inverse`` switches);
   on the GPU by default (``DeltaConfig.fused_wy``) Pallas kernels writing u0 and w: T = (I + A)^-1 by a 1-warp
   kernel (``DeltaConfig.wy_inverse_warps``, ``delta_block_inverse_gpu``) then applied by a second (or A, T and T
   applied in one kernel), the backward a Pallas kernel too (``DeltaConfig.wy_backward_kernel``);
2. the SEQUENTIAL state pass across chunks, a Pallas kernel (``delta_gpu`` for Triton, ``delta_tpu`` for Mosaic
   TPU) with a ``jax.custom_vjp`` whose backward is the reverse-time Pallas pass (``dstates``);
3. the chunk-parallel output step, a Pallas kernel (``delta_output_gpu`` / ``delta_output_tpu``) with its own
   ``jax.custom_vjp`` (a chunk-parallel gradient kernel).

Autodiff chains the XLA piece's VJP and the two kernels' custom VJPs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attn import _common as c
from kernels_pallas.linear_recurrent import _entry, delta_chunk
from kernels_pallas.linear_recurrent import config as config_lib


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
    """How the delta-rule kernels tile the work.

    Attributes:
      chunk_size: steps per chunk (one triangular solve each; states are stored once per chunk).
      block_v: value columns of the state per program of the state passes and of the output kernel (None = all of
        dv); the rows (dk) are never split, since the correction ``w S`` contracts them. Smaller blocks give more
        programs. The output's gradient kernel takes whole heads.
      num_warps, num_stages: Triton launch settings (ignored on TPU and in interpret mode).
      gradient_warps: Triton warps of the gated rule's output-step gradients, which hold many [C, C] and [C, d]
        float32 tiles at once; None = num_warps. H200, B4 S8192 H16 D128 bf16, kernel ms at 4 / 8 warps
        (``benchmarks/results/profile_delta_warps_h200.txt``): 1.074 / 0.860, but the plain rule's (no exps)
        0.565 / 0.622 and the WY forward 0.705 / 1.340 (those stay at num_warps), the sequential passes slower at
        8 too (below). The WY backward runs at num_warps: by column blocks of 64 (the default since 2026-12-03)
        0.52 ms at 4 warps against 0.89 at 8; whole tiles 0.74 at 4, 0.87 at 8 (``profile_delta_tilings_h200.txt``).
      explicit_inverse: the WY preparation's T = (I + A)^-1 from the Pallas kernel ``delta_inverse_gpu`` (Triton
        only) and two matmuls (True), or XLA's batched triangular solve (False); None = by backend (Triton: True).
      fused_wy: the whole WY preparation (A, T and T applied: u0, w) in one Pallas kernel,
        ``delta_inverse_gpu.fused_prepare`` (True; Triton only, explicit_inverse must not be False), or T from the
        inverse kernel applied by two XLA matmuls (False); None = by backend (Triton: True unless explicit_inverse
        is False). H200, B4 S8192 H16 D128 bf16 gated: whole kernel 2.68 ms forward / 11.0 ms forward+backward
        fused against 3.37 / 11.6 unfused (``benchmarks/results/check_delta_kernel_fused_h200.txt``).
      wy_backward_kernel: the fused preparation's backward as a Pallas kernel (``delta_wy_backward_gpu``, True)
        or XLA's batched matmuls (False); None = True wherever the fused path runs. True needs the fused path
        (fused_wy True, or None on Triton). H200, B4 S8192 H16 D128 bf16 gated: whole kernel 2.60 / 9.30 ms
        forward / forward+backward against 2.61 / 11.40 with the XLA backward; the preparation alone 1.54 / 3.99
        against 1.50 / 6.08 (``benchmarks/results/check_delta_kernel_wy_backward_h200.txt``).
      wy_operands: the dtype of the fused WY kernels' dot operands (forward and backward; the inversion's own dots
        are float32): "input" (q's dtype: bf16 tensor-core dots for bf16 inputs, fla's choice; the products are
        rounded to bf16 soon after anyway) or "float32" (TF32 dots on float32 operands: 1-pass for 16-bit inputs,
        3-pass for float32). The same for float32 inputs.
      output_block_v: value columns per program of the GPU build's output kernel (None = all of dv), apart from
        the state passes' block_v. Same shape: 0.22 ms whole (128) against 0.29 by 64 (plain rule; gated 0.26 /
        0.33).
      wy_column_block: the columns of a [C, d] tile that the fused WY forward kernel loads, multiplies by T and
        stores at a time (``gpu_forward.column_blocks``; >= d: whole tiles). H200, B4 S8192 H16 D128 bf16: 0.64 ms
        at 64 against 0.71 whole (``benchmarks/results/profile_delta_tilings_h200.txt``).
      wy_backward_column_block: the same for the WY backward kernel (its [C, C] products summed over the blocks);
        None = whole tiles. Same shape: 0.52 ms by 64 columns against 0.74 whole (4 warps); 32 columns 1.38 at 8
        warps.
      wy_inverse_warps: None: the fused WY forward inverts (I + A) in the kernel that applies T (whole [C, C]
        tiles at num_warps); a number of warps: the inversion runs in its own kernel by [16, 16] blocks at that many
        warps (``delta_block_inverse_gpu``, fla's kkt-solve layout), T through memory in the dots' operand dtype.
        H200, B4 S8192 H16 D128 bf16 gated, kernel ms (``profile_delta_inverse_h200.txt``): inversion 0.137 at 1
        warp with whole key rows (wy_column_block 128), 0.171 by 64 columns, 0.302 at 2 warps, 0.661 at 4; T
        applied 0.21 (0.16 once it no longer wrote k_out, ``profile_delta_walk_keys_h200.txt``); the fused kernel
        0.62.
      min_block_v: None, or the floor down to which block_v halves while the state walks would have fewer than
        ``config.FUSED_MIN_PROGRAMS`` programs (batch * heads * dv / block_v: few batch * heads).
      walk_stages: Triton's pipeline stages for the GPU build's two state walks (None: num_stages). H200, gated,
        D128 bf16, ms at B4 S8192 H16 [dk, 64] / B1 S32768 H16 [dk, 32], 4 warps (``time_scalar_kernels.py``,
        ``time_scalar_kernels_gla_delta_h200.txt``): forward walk 0.269 / 0.725 at 4 stages, 0.278 / 0.731 at 3,
        0.285 / 0.721 at 5; reverse walk with its weights kernel 0.839 / 1.514 at 4, 0.841 / 1.525 at 3.
    """

    chunk_size: int = 64
    block_v: int | None = 64
    num_warps: int = 4
    num_stages: int = 2
    explicit_inverse: bool | None = None
    fused_wy: bool | None = None
    wy_backward_kernel: bool | None = None
    gradient_warps: int | None = None
    wy_operands: str = "input"
    wy_column_block: int = 64
    wy_backward_column_block: int | None = None
    output_block_v: int | None = None
    wy_inverse_warps: int | None = None
    min_block_v: int | None = None
    walk_stages: int | None = None

    def validate(self, min_tile: int) -> None:
        """Raises ValueError unless chunk_size and the blocks are powers of two >= ``min_tile`` (or None where
        allowed) and the launch settings positive integers."""
        for name in ("chunk_size", "block_v", "output_block_v", "wy_column_block", "wy_backward_column_block",
                     "min_block_v"):
            value = getattr(self, name)
            if value is None and name not in ("chunk_size", "wy_column_block"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < min_tile or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {min_tile}, got {value!r}")
        for name in ("num_warps", "num_stages", "gradient_warps", "wy_inverse_warps", "walk_stages"):
            value = getattr(self, name)
            if value is None and name in ("gradient_warps", "wy_inverse_warps", "walk_stages"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.explicit_inverse is not None and not isinstance(self.explicit_inverse, bool):
            raise ValueError(f"explicit_inverse must be a bool or None, got {self.explicit_inverse!r}")
        if self.fused_wy is not None and not isinstance(self.fused_wy, bool):
            raise ValueError(f"fused_wy must be a bool or None, got {self.fused_wy!r}")
        if self.wy_backward_kernel is not None and not isinstance(self.wy_backward_kernel, bool):
            raise ValueError(f"wy_backward_kernel must be a bool or None, got {self.wy_backward_kernel!r}")
        if self.wy_operands not in ("input", "float32"):
            raise ValueError(f"wy_operands must be 'input' or 'float32', got {self.wy_operands!r}")
        if self.fused_wy and self.explicit_inverse is False:
            raise ValueError("fused_wy=True applies the explicit inverse in the kernel: explicit_inverse must be "
                             "True or None, got False")

    def warps(self, gradients: bool) -> int:
        """Triton warps of the gated output-step gradients (gradients=True) or of every other kernel."""
        return self.gradient_warps if gradients and self.gradient_warps is not None else self.num_warps


# GPU (Triton): 64-step chunks, state blocks [dk, 64] in registers (fla's chunk_gated_delta_rule layout). H200, B4
# S8192 H16 D128 bf16 gated (benchmarks/results/check_delta_kernel_passes_h200.txt), ms forward / forward+backward:
# this (3 stages) 2.59 / 7.65; 2 stages 2.64 / 8.02; 8 warps 3.49 / 8.99; block_v 128 2.71 / 9.03; block_v 32
# 2.83 / 8.07.
# The chunk-parallel kernels at 8 warps, the WY forward included, measured slower: 12.3 / 4.77 M tokens/s forward /
# forward+backward against 16.5 / 5.29 with 4 (check_delta_tilings_h200.txt); only the gradients' gain
# (gradient_warps). The WY kernels by column blocks of 64 (wy_column_block, wy_backward_column_block), the output
# by whole heads (output_block_v None): H200, B4 S8192 H16 D128 bf16, kernel ms (profile_delta_tilings_h200.txt):
# WY forward 0.64 against 0.71 whole, WY backward 0.52 against 0.87, output 0.22 against 0.29 by 64 columns.
# Since 2026-12-03 the WY forward's inversion runs in its own 1-warp kernel (wy_inverse_warps) with whole key rows
# (wy_column_block 128, which also has T applied by whole tiles): 0.137 + 0.21 ms against the fused 0.62 (0.16 for
# applying T since the walks decay the raw keys themselves).
# The walks by 32 value columns where batch * heads is small (min_block_v): H200, gated, B1 S32768 H16 D128 bf16
# (linear_recurrent.py --sweep "walk-block-v-32", fla in the same call, linear_recurrent_h200_sweep_b1_be370aa.json),
# M tokens/s forward / forward+backward 24.5 / 7.78 against 20.6 / 6.94 by 64 (32 programs); fla's forward 25.3.
# Each walk alone (time_scalar_kernels.py) at B1 took 0.72 ms by 32 columns (64 programs) against 0.27 at B4 by 64
# (128 programs) for the same work: the walks are latency chains, so 16 columns (128 programs at B1) is the floor.
# Same call as fla (linear_recurrent_h200_b1_a872a32.md), gated B1: forward 26.6 M tokens/s by 16 columns and 4 walk
# stages against 25.2 M by 32 and 3 (fla 25.1); forward+backward 8.43 against 7.88.
GPU_DEFAULT = DeltaConfig(chunk_size=64, block_v=64, num_warps=4, num_stages=3, gradient_warps=8,
                          wy_backward_column_block=64, wy_inverse_warps=1, wy_column_block=128, min_block_v=16,
                          walk_stages=4)
# TPU: chunk rows are sublanes; the state block takes all of dv (lanes).
TPU_DEFAULT = DeltaConfig(chunk_size=128, block_v=None)
# CPU interpret mode (tests): small chunks so that short inputs take several (16: the GPU build's smallest tile);
# the GPU default's WY path (the inversion in its own kernel; warps mean nothing to the interpreter).
INTERPRET_DEFAULT = DeltaConfig(chunk_size=16, block_v=None, wy_inverse_warps=1)
# What config=None picks (``_entry.choose_config``): (GPU, TPU, interpret mode).
DEFAULTS = (GPU_DEFAULT, TPU_DEFAULT, INTERPRET_DEFAULT)


def _kernels(backend):
    """The backend's (state pass, output step) kernel modules."""
    if backend == "triton":
        from kernels_pallas.linear_recurrent import delta_gpu, delta_output_gpu

        return delta_gpu, delta_output_gpu
    from kernels_pallas.linear_recurrent import delta_output_tpu, delta_tpu

    return delta_tpu, delta_output_tpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _state_pass(w, u0, keys, cum, h0, st: _entry.Static):
    """(states entering each chunk, corrected values U, final state) from the WY pieces: the sequential kernel.
    ``keys``: the raw keys on GPU (its walks decay them, ``delta_gpu``), the decayed k_out on TPU."""
    outputs, _ = _state_pass_fwd(w, u0, keys, cum, h0, st)
    return outputs


def _state_pass_fwd(w, u0, keys, cum, h0, st):
    passes, _ = _kernels(st.backend)
    all_states, u, final = passes.states(w, u0, keys, cum, h0, config=st.config, interpret=st.interpret,
                                         **st.gate_option())
    return (all_states, u, final), (w, keys, cum, all_states, u)


def _state_pass_bwd(st, residuals, cotangents):
    w, keys, cum, all_states, u = residuals
    dall_states, du, dfinal = cotangents
    passes, _ = _kernels(st.backend)
    du0, dw, dkeys, dcum, dh0 = passes.dstates(
        w, keys, cum, all_states, u, dall_states.astype(all_states.dtype), du.astype(u.dtype),
        dfinal.astype(cum.dtype), config=st.config, interpret=st.interpret, **st.gate_option())
    # d w, d keys and d cum are partial sums over the dv blocks (leading axis).
    return (dw.sum(0).astype(w.dtype), du0.astype(w.dtype), dkeys.sum(0).astype(keys.dtype),
            dcum.sum(0).astype(cum.dtype), dh0.astype(cum.dtype))


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _output(q, k, u, cum, all_states, st: _entry.Static):
    """Every chunk's output from its entering state and corrected values: the chunk-parallel kernel."""
    return _kernels(st.backend)[1].output(q, k, u, cum, all_states, config=st.config, interpret=st.interpret,
                                          **st.gate_option())


def _output_fwd(q, k, u, cum, all_states, st):
    return _output(q, k, u, cum, all_states, st), (q, k, u, cum, all_states)


def _output_bwd(st, residuals, dout):
    q, k, u, cum, all_states = residuals
    grads = _kernels(st.backend)[1].output_gradients(q, k, u, dout.astype(q.dtype), cum, all_states,
                                                     config=st.config, interpret=st.interpret, **st.gate_option())
    return tuple(g.astype(x.dtype) for g, x in zip(grads, residuals))


_output.defvjp(_output_fwd, _output_bwd)


def _gpu_settings(settings_type, config, interpret, dtype, **extra):
    """The GPU WY kernels' settings (``delta_inverse_gpu.Settings`` or ``FusedSettings``): 1-pass TF32 dots for
    bf16/f16 inputs, whose w and u0 are rounded to 16 bits right after (TF32 keeps 11); 3-pass for float32. (The
    fused kernels' dots outside the inversion: ``DeltaConfig.wy_operands``.)"""
    return settings_type(interpret=bool(interpret), tf32=jnp.dtype(dtype).itemsize < 4,
                         num_warps=config.num_warps, num_stages=config.num_stages, **extra)


def wy_inverse(config, backend, interpret, dtype):
    """(inverse, precision) arguments of ``delta_chunk.wy_prepare``: (None, None) for XLA's triangular solve, else
    the GPU inverse kernel and the precision of the matmuls applying T. For bf16/f16 inputs w and u0 are rounded to
    16 bits right after, so TF32 (11 bits) suffices there; float32 inputs get float32-accurate products."""
    explicit = backend == "triton" if config.explicit_inverse is None else config.explicit_inverse
    if not explicit:
        return None, None
    if backend != "triton":
        raise ValueError(f"explicit_inverse=True needs the Triton backend (a Pallas GPU kernel), got {backend!r}")
    from kernels_pallas.linear_recurrent import delta_inverse_gpu

    settings = _gpu_settings(delta_inverse_gpu.Settings, config, interpret, dtype)

    def inverse(k, beta, cum):
        return delta_inverse_gpu.inverse(k, beta, cum, settings)

    return inverse, settings.xla_precision


def wy_options(config, backend, interpret, dtype):
    """How to run the WY preparation for ``config``: ``dict(fused=f)`` with f(k, v, beta, cum) -> (u0, w, k_out)
    the fused GPU kernel (``delta_inverse_gpu.fused_prepare``, in the caller's layout, outputs in ``dtype``, what
    the kernels take right after) when ``config.fused_wy`` (None: on Triton unless ``explicit_inverse`` is False;
    its backward a kernel too unless ``config.wy_backward_kernel`` is False), else ``inverse`` and ``precision``
    for ``delta_chunk.wy_prepare`` from ``wy_inverse``."""
    fused = config.fused_wy
    if fused is None:
        fused = backend == "triton" and config.explicit_inverse is not False
    if not fused:
        if config.wy_backward_kernel:
            raise ValueError("wy_backward_kernel=True is the fused WY preparation's backward: it needs fused_wy "
                             f"True (or None on Triton), got fused_wy={config.fused_wy!r} on {backend!r}")
        inverse, precision = wy_inverse(config, backend, interpret, dtype)
        return dict(inverse=inverse, precision=precision)
    if backend != "triton":
        raise ValueError(f"fused_wy=True needs the Triton backend (a Pallas GPU kernel), got {backend!r}")
    from kernels_pallas.linear_recurrent import delta_inverse_gpu

    narrow = config.wy_operands == "input" and jnp.dtype(dtype).itemsize < 4
    settings = _gpu_settings(delta_inverse_gpu.FusedSettings, config, interpret, dtype,
                             out_dtype=jnp.dtype(dtype).name, kernel_backward=config.wy_backward_kernel is not False,
                             column_block=config.wy_column_block,
                             backward_column_block=config.wy_backward_column_block,
                             inverse_warps=config.wy_inverse_warps,
                             operand_dtype=jnp.dtype(dtype).name if narrow else None)

    def fused(k, v, beta, cum):
        return delta_inverse_gpu.fused_prepare(k, v, beta, cum, settings)

    return dict(fused=fused)


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
    initial_state. The WY preparation runs in float32 (on the GPU by default in Pallas kernels, forward and
    backward; on the TPU in XLA); the kernels' matmul operands are in q's dtype, accumulated in float32 with a
    float32 carried state (states stored per chunk in q's dtype).

    Papers: "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"; "Gated Delta Networks:
    Improving Mamba2 with Delta Rule".
    """
    per_step = [("beta", beta, ("batch", "seq", "heads"), "")]
    if log_gate is not None:
        per_step.append(("log_gate", log_gate, ("batch", "seq", "heads"), ""))
    _entry.check_inputs(q, k, v, initial_state, per_step)
    backend, interpret = _entry.resolve(q.dtype, backend, interpret)
    config = _entry.choose_config(config, DeltaConfig, DEFAULTS, backend, interpret)
    if chunk_size is not None:
        config = dataclasses.replace(config, chunk_size=chunk_size)
    config.validate(_entry.min_tile(backend))
    b, s, h, dk = q.shape
    dv = v.shape[3]
    # dk is never split (the correction w S contracts it): only block_v tiles the state.
    dk_pad, dv_pad = _entry.padded_head_dims(dk, dv, backend)
    config = _entry.fill_blocks(config, {"block_v": dv_pad, "output_block_v": dv_pad})
    config = dataclasses.replace(config, block_v=config_lib.halved_for_programs(
        config.block_v, config.min_block_v, lambda block: b * h * (dv_pad // block)))
    chunk = config.chunk_size
    s_pad = _entry.padded_length(s, chunk)
    acc = c.compute_dtype(q.dtype)

    # The GPU kernels read the caller's [b, s, h, d] layout; the TPU kernels' tiles want [b, h, s, d] (a block's
    # last two dims must be whole (8, 128) tiles, which one head's row is not).
    heads_first = backend == "mosaic_tpu"

    def pad(x, d_pad=None):  # padded steps: k = v = beta = 0, gate 0 (identity steps)
        widths = [(0, 0), (0, s_pad - s), (0, 0)] + ([(0, d_pad - x.shape[3])] if x.ndim == 4 else [])
        return jnp.pad(x, widths)

    def layout(x):  # [b, s_pad, h, d] -> the kernels' layout
        return jnp.swapaxes(x, 1, 2) if heads_first else x

    qp, kp = pad(q, dk_pad), pad(k, dk_pad)
    vp = pad(v, dv_pad)
    beta_c = delta_chunk.to_chunks(pad(beta.astype(acc)), chunk)  # [b, h, n, C]
    if log_gate is None:  # zeros, not a cumsum of zeros (XLA would spend seconds constant-folding that)
        cum = jnp.zeros(beta_c.shape, acc)
    else:  # inclusive, inside each chunk
        cum = jnp.cumsum(delta_chunk.to_chunks(pad(log_gate.astype(acc)), chunk), axis=-1)
    options = wy_options(config, backend, interpret, q.dtype)
    if "fused" in options:  # the GPU default: Pallas kernels, in the caller's layout, u0 and w in q's dtype
        u0, w = options["fused"](kp, vp, beta_c, cum)
    else:  # XLA on heads-first float32 chunks
        kc, vc = (delta_chunk.to_chunks(x.astype(acc), chunk) for x in (kp, vp))
        prepared = delta_chunk.wy_prepare(kc, vc, beta_c, cum, **options)
        u0, w, k_out = (layout(delta_chunk.from_chunks(x).astype(q.dtype)) for x in prepared)
    # The GPU walks decay the raw keys themselves (delta_gpu); the TPU's take k_out.
    keys = kp if backend == "triton" else k_out

    h0 = _entry.initial_state(initial_state, (b, h, dk, dv), dk_pad, dv_pad, acc)
    st = _entry.Static(config, backend, interpret, log_gate is not None)
    cum = cum.reshape(b, h, s_pad)
    all_states, u, final = _state_pass(w, u0, keys, cum, h0, st)
    out = _output(layout(qp), layout(kp), u, cum, all_states, st)  # the kernels' layout, q's dtype
    out = jnp.swapaxes(out, 1, 2) if heads_first else out
    return out[:, :s, :, :dv], final[:, :, :dk, :dv]


def mechanism_recurrence(q, k, v, beta, log_gate, *, initial_state, segment_ids, chunk_size):
    """``implementation="pallas"`` of attn's ``delta_rule`` / ``gated_delta_rule``: the kernel for the default
    device, in Pallas' interpreter on the CPU. q, k already normalised (q scaled), GQA heads repeated."""
    _entry.refuse_segment_ids(segment_ids)
    return chunked_delta_recurrence(q, k, v, beta, log_gate, initial_state=initial_state, chunk_size=chunk_size,
                                    interpret=jax.default_backend() == "cpu")
