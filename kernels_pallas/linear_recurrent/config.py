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
        chunk-parallel gradient kernel takes whole heads.
      output_block_v: value columns per program of the chunk-parallel output kernel (GPU build; None = all of dv):
        each program recomputes the chunk's [C, C] scores, so whole heads do that once. The TPU build splits dv
        by ``block_v``.
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
      state_warps, state_stages: launch settings of the forward's sequential state pass (None: num_warps /
        num_stages); dstate_warps, dstate_stages: those of the backward's reverse pass (None: the backward's).
        The walks are latency-bound: Triton's software pipelining (stages) loads chunks ahead.
      dstate_row_split: the reverse pass carries block_k / dstate_row_split rows of the state (not below 16).
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
    output_block_v: int | None = None
    state_warps: int | None = None
    state_stages: int | None = None
    dstate_warps: int | None = None
    dstate_stages: int | None = None
    dstate_row_split: int = 1

    def validate(self, min_chunk: int) -> None:
        """Raises ValueError unless chunk_size (and the blocks) are powers of two >= ``min_chunk`` (so they tile)."""
        for name in ("chunk_size", "block_k", "block_v", "min_block_k", "output_block_v"):
            value = getattr(self, name)
            if value is None and name != "chunk_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < min_chunk or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {min_chunk}, got {value!r}")
        if self.fused_forward is not None and not isinstance(self.fused_forward, bool):
            raise ValueError(f"fused_forward must be a bool or None, got {self.fused_forward!r}")
        for name in ("num_warps", "num_stages", "num_warps_bwd", "num_stages_bwd", "state_warps", "state_stages",
                     "dstate_warps", "dstate_stages"):
            value = getattr(self, name)
            optional = name not in ("num_warps", "num_stages")
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer{' or None' * optional}, got {value!r}")
        split = self.dstate_row_split
        if isinstance(split, bool) or not isinstance(split, int) or split < 1 or split & (split - 1):
            raise ValueError(f"dstate_row_split must be a power of two >= 1, got {split!r}")

    def backward(self) -> "ChunkConfig":
        """The config the backward's kernels run with: the backward's launch settings and state rows in place of
        the forward's (``state_*`` then name the reverse pass's)."""
        warps = self.num_warps if self.num_warps_bwd is None else self.num_warps_bwd
        stages = self.num_stages if self.num_stages_bwd is None else self.num_stages_bwd
        block_k = self.block_k
        if block_k is not None:
            block_k = max(block_k // self.dstate_row_split, min(block_k, 16))
        return dataclasses.replace(self, num_warps=warps, num_stages=stages, block_k=block_k,
                                   state_warps=self.dstate_warps, state_stages=self.dstate_stages)

    def state_launch(self) -> tuple[int, int]:
        """(warps, stages) of a sequential state pass run with this config."""
        return (self.num_warps if self.state_warps is None else self.state_warps,
                self.num_stages if self.state_stages is None else self.state_stages)


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
# Each kernel timed alone under many launch settings (benchmarks/time_scalar_kernels.py, H200, simple GLA D128 bf16,
# benchmarks/results/time_scalar_kernels_h200.txt), ms at B4 S8192 H16 / B1 S32768 H16: the forward state pass
# [64, 64] / [32, 64] at 4 warps and 4 stages 0.180 / 0.309 (3 stages 0.203 / 0.370, 2 stages 0.66 at B1); the
# reverse pass on half those rows at 2 warps and 5 stages 0.226 / 0.357 (whole rows at 8 warps and 3 stages, the
# former setting, 0.342 / 0.498); the output kernel by whole heads 0.244 at B1 (by 64 columns 0.311).
GPU_DEFAULT = ChunkConfig(chunk_size=64, block_k=64, block_v=64, fused_forward=None, num_warps=4, num_stages=3,
                          num_warps_bwd=8, min_block_k=32, state_stages=4, dstate_warps=2, dstate_stages=5,
                          dstate_row_split=2)
# Programs of the fused forward (batch * heads * dv / block_v) from which fused_forward=None picks it; also those of
# the two-pass state passes below which min_block_k halves block_k.
FUSED_MIN_PROGRAMS = 128


def halved_for_programs(block, floor, programs):
    """``block`` halved, not below ``floor`` (None: kept), while ``programs(block)`` is below FUSED_MIN_PROGRAMS."""
    while floor is not None and block // 2 >= floor and programs(block) < FUSED_MIN_PROGRAMS:
        block //= 2
    return block


def more_state_programs(config, batch_heads, dk, dv):
    """``config`` (blocks filled for head dims dk, dv) with block_k halved, not below ``config.min_block_k``, while
    the state passes' batch_heads * (dk / block_k) * (dv / block_v) programs are fewer than FUSED_MIN_PROGRAMS."""
    block_k = halved_for_programs(config.block_k, config.min_block_k,
                                  lambda block: batch_heads * (dk // block) * (dv // config.block_v))
    return dataclasses.replace(config, block_k=block_k)

# TPU: the chunk axis is a lane axis of the gate row tile, so it must be a multiple of 128.
TPU_DEFAULT = ChunkConfig(chunk_size=128, block_k=None, block_v=128)

# CPU interpret mode (tests): small chunks so that short inputs still take several chunks.
INTERPRET_DEFAULT = ChunkConfig(chunk_size=16)

# What config=None picks (``_entry.choose_config``): (GPU, TPU, interpret mode).
DEFAULTS = (GPU_DEFAULT, TPU_DEFAULT, INTERPRET_DEFAULT)
