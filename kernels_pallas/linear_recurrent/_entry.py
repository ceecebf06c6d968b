"""What the three public entries (``ops``: scalar gate, ``vector_gate_ops``: GLA, ``delta_ops``: delta rules) do
alike before their kernels run: argument checks, backend and config choice, head-dim and initial-state padding."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kernels_pallas._common import resolve_backend

MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class Static:
    """What the kernels need that is not an array (hashable: custom_vjp's non-differentiable argument)."""

    config: Any
    backend: str
    interpret: Any
    gated: bool = True  # False: no gate at all (the GPU kernels then skip every exp)

    def gate_option(self) -> dict:
        """The GPU kernels' ``gated`` keyword (False: no exps, no gate gradient); the TPU kernels apply the zero
        gates instead and take no such keyword."""
        return dict(gated=self.gated) if self.backend == "triton" else {}


def check_inputs(q, k, v, initial_state, per_step=()):
    """Raises ValueError unless q, k [batch, seq, heads, head_dim] and v [batch, seq, heads, v_head_dim] share a
    floating dtype, both head dims are at most MAX_HEAD_DIM and initial_state is None or
    [batch, heads, head_dim, v_head_dim].

    per_step: ``(name, array, axes, meaning)`` for each gate-like input given (an absent optional one is left out
    by the caller): ``axes`` names its dims from "batch", "seq", "heads", "head_dim"; ``meaning`` (may be "")
    follows the expected shape in the message. Such an input must have that shape and a floating dtype; one named
    "log_gate" must also be <= 0 where its values are known (``check_log_gate``).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, dim], got {getattr(x, 'shape', x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [batch, seq, heads, head_dim], got {q.shape} and {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [batch, seq, heads, v_head_dim] with q's {q.shape[:3]}, got {v.shape}")
    b, s, h, dk = q.shape
    dv = v.shape[3]
    for name, dim in (("head_dim", dk), ("v_head_dim", dv)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{name} must be at most {MAX_HEAD_DIM} (state blocks live in fast memory), got {dim}")
    sizes = {"batch": b, "seq": s, "heads": h, "head_dim": dk}
    for name, x, axes, meaning in per_step:
        want = tuple(sizes[a] for a in axes)
        if getattr(x, "shape", None) is None or tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape [{', '.join(axes)}] = {want}{meaning}, "
                             f"got {getattr(x, 'shape', x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        if name == "log_gate":
            check_log_gate(x)
    if initial_state is not None and tuple(initial_state.shape) != (b, h, dk, dv):
        raise ValueError(f"initial_state must have shape [batch, heads, head_dim, v_head_dim] = {(b, h, dk, dv)}, "
                         f"got {tuple(initial_state.shape)}")


def check_log_gate(log_gate):
    """Raises ValueError if ``log_gate`` holds a positive entry (a decay above 1), where its values are known: not
    under jit (a traced value), where checking would need a host round trip. The kernels take the cumulative log
    gates to never rise (exp(c_t - c_s) for s < t and exp(c) at most 1), and overflow to inf where they rise far."""
    if isinstance(log_gate, jax.core.Tracer):
        return
    largest = float(jnp.max(log_gate))
    if largest > 0:
        raise ValueError(f"log_gate must be <= 0 (the log of a decay in (0, 1]), got a maximum of {largest:g}")


def resolve(dtype, backend, interpret):
    """(backend, interpret) to run with; the TPU build's interpreter wants ``pltpu.InterpretParams``."""
    if dtype == jnp.float64 and not interpret:
        raise ValueError("q, k, v in float64 are only supported with interpret=True; use float32 or lower")
    backend = resolve_backend(backend, interpret)
    if backend == "mosaic_tpu" and interpret is True:
        from jax.experimental.pallas import tpu as pltpu

        interpret = pltpu.InterpretParams()
    return backend, interpret


def choose_config(config, cls, defaults, backend, interpret):
    """``config``, checked to be a ``cls``, or when None the default of ``defaults = (GPU, TPU, interpret)``."""
    if config is None:
        gpu, tpu, interpreted = defaults
        return interpreted if interpret else tpu if backend == "mosaic_tpu" else gpu
    if not isinstance(config, cls):
        raise ValueError(f"config must be a {cls.__name__} or None, got {type(config).__name__}")
    return config


def min_tile(backend):
    """Smallest chunk / block size: Triton's dot wants dims >= 16, a TPU tile has 8 sublanes."""
    return 16 if backend == "triton" else 8


def padded_head_dims(dk, dv, backend):
    """Triton's dot wants power-of-two dims >= 16: zero columns of q, k, v and the state change nothing."""
    if backend != "triton":
        return dk, dv
    return tuple(max(16, 1 << max(0, (d - 1).bit_length())) for d in (dk, dv))


def fill_blocks(config, dims):
    """``config`` with each block named in ``dims`` (name -> padded head dim) set to the whole dim when None, else
    capped at it; raises ValueError unless it divides the dim."""
    blocks = {}
    for name, dim in dims.items():
        block = dim if getattr(config, name) is None else min(getattr(config, name), dim)
        if dim % block:
            raise ValueError(f"{name} ({block}) must divide the head dim ({dim})")
        blocks[name] = block
    return dataclasses.replace(config, **blocks)


def padded_length(s, chunk):
    """The sequence length rounded up to a whole number of chunks (at least one)."""
    return -(-max(s, 1) // chunk) * chunk


def initial_state(h0, shape, dk_pad, dv_pad, acc):
    """h0 (None: zeros) of ``shape`` [b, h, dk, dv] in ``acc``, zero-padded to [b, h, dk_pad, dv_pad]."""
    h0 = jnp.zeros(shape, acc) if h0 is None else h0.astype(acc)
    return jnp.pad(h0, ((0, 0), (0, 0), (0, dk_pad - shape[2]), (0, dv_pad - shape[3])))


def refuse_segment_ids(segment_ids):
    """The kernels carry one state through the whole sequence: no resets at segment starts."""
    if segment_ids is not None:
        raise ValueError("segment_ids are not supported by implementation='pallas'; use 'chunked'")
