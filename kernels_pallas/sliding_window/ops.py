"""Public entry: argument checks, padding, backend dispatch and the custom VJP."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from attn import _common as c
from kernels_pallas._common import on_hopper
from kernels_pallas._common import resolve_backend as _resolve_backend
from kernels_pallas.sliding_window import config as config_lib

MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels need that is not an array (hashable: custom_vjp's non-differentiable arg)."""

    left: int
    right: int
    scale: float
    softcap: float | None
    seq_len: int
    blocks: config_lib.BlockSizes
    backend: str
    interpret: Any
    mosaic_blocks: Any = None  # mosaic_gpu_forward.MosaicBlocks, for backend "mosaic_gpu"
    mosaic_backward: Any = None  # mosaic_gpu_backward.MosaicBackwardBlocks; None: the Triton backward


def _kernels(backend):
    if backend == "triton":
        from kernels_pallas.sliding_window import gpu_backward, gpu_forward

        return gpu_forward.forward, gpu_backward.backward
    if backend == "mosaic_gpu":  # Mosaic GPU forward; the Triton backward reads its base-2 lse
        from kernels_pallas.sliding_window import gpu_backward

        return _mosaic_gpu_forward, gpu_backward.backward
    from kernels_pallas.sliding_window import tpu_backward, tpu_forward

    return tpu_forward.forward, tpu_backward.backward


def _mosaic_gpu_forward(q, k, v, segment_ids, *, left, right, scale, softcap, seq_len, blocks, interpret,
                        mosaic_blocks):
    from kernels_pallas.sliding_window import mosaic_gpu_forward

    del segment_ids, softcap, blocks  # refused by the argument checks / the backward's tiles
    if interpret is True:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        interpret = plgpu.InterpretGPUParams()
    return mosaic_gpu_forward.forward(q, k, v, left=left, right=right, scale=scale, seq_len=seq_len,
                                      blocks=mosaic_blocks, interpret=interpret or None)


def _kernel_kwargs(st: _Static) -> dict:
    return dict(left=st.left, right=st.right, scale=st.scale, softcap=st.softcap, seq_len=st.seq_len,
                blocks=st.blocks, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, st: _Static):
    return _forward(q, k, v, segment_ids, st)[0]


def _forward(q, k, v, segment_ids, st):
    forward, _ = _kernels(st.backend)
    extra = {"mosaic_blocks": st.mosaic_blocks} if st.backend == "mosaic_gpu" else {}
    out, lse = forward(q, k, v, segment_ids, **_kernel_kwargs(st), **extra)
    return out, (q, k, v, segment_ids, out, lse)


def _backward(st, residuals, dout):
    q, k, v, segment_ids, out, lse = residuals
    _, backward = _kernels(st.backend)
    # delta_i = sum_j p_ij dp_ij = out_i . dout_i: one elementwise pass, [b, s, h] -> [b, h, s].
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(lse.dtype), dout.astype(lse.dtype))
    if st.mosaic_backward is not None:  # Mosaic GPU dk/dv pass; dq from Mosaic GPU or Triton
        from kernels_pallas.sliding_window import mosaic_gpu_backward

        dq, dk, dv = mosaic_gpu_backward.backward(
            q, k, v, dout, lse, delta, left=st.left, right=st.right, scale=st.scale, seq_len=st.seq_len,
            blocks=st.blocks, mosaic_blocks=st.mosaic_backward, interpret=st.interpret)
        return dq, dk, dv, None
    dq, dk, dv = backward(q, k, v, segment_ids, dout, lse, delta, **_kernel_kwargs(st))
    return dq, dk, dv, None


_attention.defvjp(_forward, _backward)


def _check_window(window, causal):
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right) of non-negative integers, got {window!r}")
    for side, w in zip(("left", "right"), window):
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"window {side} size must be a non-negative integer, got {w!r} in {window=}")
    left, right = window
    return left, 0 if causal else right


def _check_segment_ids(segment_ids, batch, seq_len):
    if segment_ids is None:
        return None
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (batch, seq_len) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            f"segment_ids must be an integer array of shape [batch, seq] = {(batch, seq_len)}, "
            f"got {segment_ids.dtype} {segment_ids.shape}"
        )
    return segment_ids.astype(jnp.int32)


def _mosaic_gpu_fits(dtype, head_dim, softcap, segment_ids) -> bool:
    """Whether backend=None takes the Mosaic GPU forward: on a Hopper GPU, for what that kernel supports (its
    forward measured 0.96-1.03x cuDNN on an H200 where the Triton forward reached 0.68-0.79x)."""
    return (on_hopper() and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim <= 128 and softcap is None and segment_ids is None)


def _mosaic_gpu_blocks(mosaic_blocks, dtype, head_dim, softcap, segment_ids, mosaic_gpu):
    """The Mosaic GPU forward's tiles (None for the other backends), after its argument checks."""
    if not mosaic_gpu:
        if mosaic_blocks is not None:
            raise ValueError("mosaic_blocks is only used with backend='mosaic_gpu'")
        return None
    from kernels_pallas.sliding_window import mosaic_gpu_forward

    mosaic_gpu_forward.check_supported(dtype, head_dim, softcap, segment_ids)
    return mosaic_gpu_forward.resolve_blocks(mosaic_blocks, mosaic_gpu_forward.DEFAULT_BLOCKS)


def _mosaic_backward_blocks(mosaic_backward, mosaic_gpu):
    """The Mosaic GPU backward's tiles, or None for the Triton backward. None (the default) takes the Mosaic
    backward wherever the forward is the Mosaic GPU one: on an H200 it made forward+backward 1.13x / 1.00x /
    0.95x cuDNN (S8192 W512 / S32768 W1024 / W4096) where the Triton backward gave 0.99x / 0.83x / 0.76x."""
    if mosaic_backward is False or (mosaic_backward is None and not mosaic_gpu):
        return None
    if not mosaic_gpu:
        raise ValueError("mosaic_backward needs backend='mosaic_gpu' (or None picking it on a Hopper GPU)")
    from kernels_pallas.sliding_window import mosaic_gpu_backward

    return mosaic_gpu_backward.resolve_blocks(mosaic_backward)


def sliding_window_attention(
    q,
    k,
    v,
    *,
    window,
    causal: bool = False,
    scale: float | None = None,
    segment_ids=None,
    softcap: float | None = None,
    block_sizes: config_lib.BlockSizes | None = None,
    backend: str | None = None,
    interpret=False,
    mosaic_blocks=None,
    mosaic_backward=None,
):
    """Softmax attention in which query i sees key j iff ``i - left <= j <= i + right`` (and, with
    ``segment_ids``, both lie in the same segment); ``causal=True`` sets ``right = 0``.

    Layout [batch, seq, heads, head_dim]; k/v may have fewer heads (GQA/MQA). Work and memory grow with
    ``seq * window``. ``backend``: "triton" (GPU), "mosaic_tpu" (TPU), "mosaic_gpu" (Hopper: Mosaic GPU
    forward and backward, bf16/fp16, head_dim <= 128, no segment ids or soft-cap; tiles from
    ``mosaic_blocks``, a ``mosaic_gpu_forward.MosaicBlocks``) or None (from the default device: "mosaic_gpu"
    on a Hopper GPU where it applies, else "triton" on a GPU, "mosaic_tpu" on a TPU).
    ``mosaic_backward``: with the Mosaic GPU forward, None (default) or True takes the Mosaic GPU backward
    (dk/dv and dq passes) with its default tiles, a ``mosaic_gpu_backward.MosaicBackwardBlocks`` with those;
    False: the Triton backward.
    ``interpret=True`` runs the kernel in Pallas' interpreter (on the CPU); for the TPU kernel it may also
    be a ``pltpu.InterpretParams``. Differentiable in q, k, v.

    Papers: "Longformer: The Long-Document Transformer"; "Scaling Local Self-Attention for Parameter
    Efficient Visual Backbones".
    """
    c.check_qkv(q, k, v, cross=False, gqa=True, same_v_dim=True)
    if q.dtype == jnp.float64 and not interpret:
        raise ValueError("q, k, v in float64 are only supported with interpret=True; use float32 or lower")
    batch, seq_len, _, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {head_dim}")
    left, right = _check_window(window, causal)
    # Windows longer than the sequence mean the same as the whole sequence; clamping keeps tile maths small.
    left, right = min(left, seq_len - 1), min(right, seq_len - 1)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap!r}")
    scale = float(c.default_scale(scale, head_dim))
    if not scale > 0:  # the kernels take row maxima of raw products, then scale: needs scale > 0
        raise ValueError(f"scale must be positive or None, got {scale!r}")
    segment_ids = _check_segment_ids(segment_ids, batch, seq_len)
    mosaic_gpu = backend == "mosaic_gpu" or (
        backend is None and not interpret and _mosaic_gpu_fits(q.dtype, head_dim, softcap, segment_ids))
    backend = "triton" if mosaic_gpu else _resolve_backend(backend, interpret)
    if backend == "mosaic_tpu" and interpret is True:
        from jax.experimental.pallas import tpu as pltpu

        interpret = pltpu.InterpretParams()

    min_block = 16 if backend == "triton" else 8
    blocks = block_sizes
    if blocks is None:
        blocks = config_lib.default_block_sizes(backend, interpret, head_dim, left + right + 1)
    if not isinstance(blocks, config_lib.BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes or None, got {type(blocks).__name__}")
    blocks.validate(min_block)
    blocks = blocks.shrunk_to(seq_len, min_block)

    mosaic_gpu_blocks = _mosaic_gpu_blocks(mosaic_blocks, q.dtype, head_dim, softcap, segment_ids, mosaic_gpu)
    mosaic_bwd_blocks = _mosaic_backward_blocks(mosaic_backward, mosaic_gpu)

    # Pad the sequence to a whole number of the largest tile, and (Triton) head_dim to a power of two >= 16.
    tile = blocks.max_block() if mosaic_gpu_blocks is None else math.lcm(
        blocks.max_block(), mosaic_gpu_blocks.rows_per_program, mosaic_gpu_blocks.block_k)
    if mosaic_bwd_blocks is not None:
        tile = math.lcm(tile, mosaic_bwd_blocks.rows_per_program, mosaic_bwd_blocks.keys_per_program)
    seq_pad = -(-seq_len // tile) * tile
    dim_pad = max(16, 1 << (head_dim - 1).bit_length()) if backend == "triton" else head_dim
    if mosaic_gpu_blocks is not None:
        dim_pad = max(64, dim_pad)  # the Mosaic forward's 128-byte swizzled rows: 64 or 128 columns
    pad = ((0, 0), (0, seq_pad - seq_len), (0, 0), (0, dim_pad - head_dim))
    qp, kp, vp = (jnp.pad(x, pad) if pad != ((0, 0),) * 4 else x for x in (q, k, v))
    if segment_ids is not None and seq_pad != seq_len:
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, seq_pad - seq_len)), constant_values=-1)

    st = _Static(left, right, scale, None if softcap is None else float(softcap), seq_len, blocks,
                 "mosaic_gpu" if mosaic_gpu else backend, interpret, mosaic_gpu_blocks, mosaic_bwd_blocks)
    out = _attention(qp, kp, vp, segment_ids, st)
    return out[:, :seq_len, :, :head_dim]
