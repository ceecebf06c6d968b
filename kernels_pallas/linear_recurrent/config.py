"""Chunk and tile sizes of the chunked scalar-gate recurrence kernels, with defaults per device kind."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """How the sequence and the head dimensions are tiled, and which forward runs.

    Attributes:
      chunk_size: steps per chunk: the intra-chunk product is [chunk, chunk], the state is carried between chunks.
      block_k, block_v: key / value rows and columns of the state block [block_k, block_v] that one program of the
        sequential state passes carries (None = the whole head dim). Smaller blocks give more programs. The
        chunk-parallel output kernel splits dv by ``block_v``; the chunk-parallel gradient kernel takes whole heads.
      fused_forward: False: a sequential state pass then a chunk-parallel output kernel (fla's layout). True: one
        sequential kernel per (batch, head, dv block) that computes outputs and states in the same walk (no state
        round trip through memory, but only batch * heads * dv / block_v programs); ``block_k`` is then unused.
        None: fused when that gives at least ``FUSED_MIN_PROGRAMS`` programs, else the two passes.
      num_warps, num_stages: Triton launch settings (ignored on TPU and in interpret mode).
      num_warps_bwd, num_stages_bwd: those of the backward's kernels (the dS pass and the gradients); None: the
        forward's. On an H200 the forward was fastest with 4 warps and the backward with 8.
      min_block_k: None, or the floor down to which ``more_state_programs`` halves block_k while the sequential
        passes have fewer than ``FUSED_MIN_PROGRAMS`` programs (few batch * heads: a walk per program is all the
        parallelism there is, and rows of the state are independent for these gates).
    """

    chunk_size: int = 64
    block_k: int | None = None
    block_v: int | None = None
    fused_forward: bool | None = False
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None
    min_block_k: int | None = None

    def validate(self, min_chunk: int) -> None:
        """Raises ValueError unless chunk_size (and the blocks) are powers of two >= ``min_chunk`` (so they tile)."""
        for name in ("chunk_size", "block_k", "block_v", "min_block_k"):
            value = getattr(self, name)
            if value is None and name != "chunk_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < min_chunk or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {min_chunk}, got {value!r}")
        if self.fused_forward is not None and not isinstance(self.fused_forward, bool):
            raise ValueError(f"fused_forward must be a bool or None, got {self.fused_forward!r}")
        for name in ("num_warps", "num_stages", "num_warps_bwd", "num_stages_bwd"):
            value = getattr(self, name)
            if value is None and name.endswith("_bwd"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer{' or None' * name.endswith('_bwd')}, "
                                 f"got {value!r}")

    def backward(self) -> "ChunkConfig":
        """The config the backward's kernels run with: the backward launch settings in place of the forward's."""
        return dataclasses.replace(
            self, num_warps=self.num_warps if self.num_warps_bwd is None else self.num_warps_bwd,
            num_stages=self.num_stages if self.num_stages_bwd is None else self.num_stages_bwd)


# GPU (Triton): 64-step chunks as fla; the fused forward walks [dk, 64] state blocks (b * h * 2 programs at dv 128).
# H200, simple GLA B4 S8192 H16 D128 bf16, three interleaved repeats (benchmarks/results/
# check_scalar_gate_tilings_bwd_h200.txt), median M tokens/s forward / forward+backward: this (forward 4 warps and
# 3 stages, backward 8 warps) 37.3 / 10.96; 8 warps and 3 stages for both (the former default) 33.7 / 10.65; 4 warps
# and 3 stages for both 38.3 / 9.14; the two-pass forward with 4 warps and 2 stages 26.7 / 8.50.
# The fused forward only where it fills the GPU: H200, simple GLA, B1 S32768 H16 D128 bf16 (32 programs), the two
# passes 34.5 / 11.1 M tokens/s against the fused 17.5 / 8.8; at B4 S8192 (128 programs) the fused is faster, as above
# (benchmarks/results/linear_recurrent_h200_sweep_b1.json). Between 32 and 128 programs: not measured.
# Rows of the state by 32 where the passes would have fewer than 128 programs (min_block_k): H200, retention B1 S32768
# H16 D128 bf16, M tokens/s forward / forward+backward (linear_recurrent.py --sweep, ``linear_recurrent_h200_
# sweep_b1_ab97b7c.json``): [32, 64] blocks (128 programs) 46.7 / 13.5, [64, 64] 44.1 / 12.0, [16, 64] 47.3 / 12.6,
# [32, 32] 34.2 / 11.5 (fla 61.7 / 13.8).
GPU_DEFAULT = ChunkConfig(chunk_size=64, block_k=64, block_v=64, fused_forward=None, num_warps=4, num_stages=3,
                          num_warps_bwd=8, min_block_k=32)
# Programs of the fused forward (batch * heads * dv / block_v) from which fused_forward=None picks it; also those of
# the two-pass state passes below which min_block_k halves block_k.
FUSED_MIN_PROGRAMS = 128


def more_state_programs(config, batch_heads, dk, dv):
    """``config`` (blocks filled for head dims dk, dv) with block_k halved, not below ``config.min_block_k``, while
    the state passes' batch_heads * (dk / block_k) * (dv / block_v) programs are fewer than FUSED_MIN_PROGRAMS."""
    block_k = config.block_k
    while (config.min_block_k is not None and block_k // 2 >= config.min_block_k
           and batch_heads * (dk // block_k) * (dv // config.block_v) < FUSED_MIN_PROGRAMS):
        block_k //= 2
    return dataclasses.replace(config, block_k=block_k)

# TPU: the chunk axis is a lane axis of the gate row tile, so it must be a multiple of 128.
TPU_DEFAULT = ChunkConfig(chunk_size=128, block_k=None, block_v=128)

# CPU interpret mode (tests): small chunks so that short inputs still take several chunks.
INTERPRET_DEFAULT = ChunkConfig(chunk_size=16)

# What config=None picks (``_entry.choose_config``): (GPU, TPU, interpret mode).
DEFAULTS = (GPU_DEFAULT, TPU_DEFAULT, INTERPRET_DEFAULT)
