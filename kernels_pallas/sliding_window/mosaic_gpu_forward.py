"""Forward pass on Hopper GPUs (Pallas Mosaic GPU): warp-specialised flash attention over the band.

One program per (head, query super-tile, batch). Its last warpgroup only moves memory: it streams the key and
value tiles that meet the band of the whole super-tile into a ring of shared-memory slots with TMA copies.
The other ``compute_wgs`` warpgroups own ``block_q`` query rows each and run the online softmax with wgmma
products. Each slot has a "full" barrier (the TMA completes it) and a "free" barrier (every compute warpgroup
arrives once it has read the slot), so the copies of the next tiles overlap the math on the current one.

Band arithmetic is ``band.key_tiles``: a compute warpgroup masks only the edge tiles of its own run and, for
the tiles of the super-tile's run outside its own, waits and releases the slot without computing, which keeps
every barrier's phase in step between the warpgroups. Inputs arrive padded by ``ops`` (sequence to a tile
multiple, head_dim to 64 or 128); the log-sum-exp is base 2, like the Triton kernels', so their backward
can take it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.sliding_window import band

LOG2E = math.log2(math.e)
# Registers per thread are shared by the warpgroups of a block (65536 per SM, 128 threads per warpgroup):
# the memory warpgroup needs few, so the compute warpgroups may take the rest, rounded down to 8.
MEMORY_WG_REGISTERS = 40


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tiling of the Mosaic GPU forward.

    Attributes:
      block_q: query rows per compute warpgroup (a multiple of 64: the wgmma row count).
      block_k: keys per pipeline step (a multiple of 64).
      compute_wgs: compute warpgroups per program, sharing the key/value stream (1 or 2).
      num_slots: shared-memory slots in the key/value ring (>= 2: copies in flight while computing).
      split_loops: mask only the edge tiles of the band (three loops) instead of every tile (one loop).
      pingpong: with two compute warpgroups, take turns on the tensor cores (FlashAttention-3's schedule):
        one warpgroup's softmax runs while the other's products do.
    """

    block_q: int = 64
    block_k: int = 128
    compute_wgs: int = 1
    num_slots: int = 2
    split_loops: bool = True
    pingpong: bool = False

    def validate(self) -> None:
        check_pipeline(self)
        if self.pingpong and self.compute_wgs != 2:
            raise ValueError(f"MosaicBlocks.pingpong needs compute_wgs=2, got {self.compute_wgs!r}")

    @property
    def rows_per_program(self) -> int:
        return self.block_q * self.compute_wgs


# Two compute warpgroups taking turns on the tensor cores: the fastest variant of benchmarks/
# check_sliding_window_mgpu.py at S32768 (W1024, W4096) and within 1% of the fastest at S8192 W512 (H200).
def check_pipeline(blocks) -> None:
    """Raises ValueError unless a Mosaic tiling's shared fields hold: block_q and block_k multiples of 64 (the
    wgmma row count), compute_wgs 1 or 2, num_slots an integer >= 2."""
    name = type(blocks).__name__
    for field in ("block_q", "block_k"):
        size = getattr(blocks, field)
        if isinstance(size, bool) or not isinstance(size, int) or size < 64 or size % 64:
            raise ValueError(f"{name}.{field} must be a positive multiple of 64, got {size!r}")
    if blocks.compute_wgs not in (1, 2):
        raise ValueError(f"{name}.compute_wgs must be 1 or 2, got {blocks.compute_wgs!r}")
    if isinstance(blocks.num_slots, bool) or not isinstance(blocks.num_slots, int) or blocks.num_slots < 2:
        raise ValueError(f"{name}.num_slots must be an integer >= 2, got {blocks.num_slots!r}")


DEFAULT_BLOCKS = MosaicBlocks(compute_wgs=2, pingpong=True)


def resolve_blocks(mosaic_blocks, default: MosaicBlocks) -> MosaicBlocks:
    """The ``mosaic_blocks`` argument of the ops that take this kernel's tiling: None -> ``default``, a
    ``MosaicBlocks`` -> itself once validated; anything else raises ValueError naming the argument."""
    if mosaic_blocks is None:
        return default
    if not isinstance(mosaic_blocks, MosaicBlocks):
        raise ValueError(f"mosaic_blocks must be a MosaicBlocks or None, got {type(mosaic_blocks).__name__}")
    mosaic_blocks.validate()
    return mosaic_blocks


def _row_vector(value, n):
    return plgpu.layout_cast(jnp.full((n,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))


def _add_product(acc, a, b_smem, on_gpu):
    """acc + a @ b_smem, with ``a`` in registers: on the GPU wgmma accumulates into acc's registers. Pallas'
    GPU interpreter runs neither ``pl.run_state`` nor wgmma from registers, so there (CPU tests only) the
    product is a plain dot of the loaded tile."""
    if not on_gpu:
        return acc + jnp.dot(a, b_smem[...], preferred_element_type=jnp.float32)

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a, b_smem)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def online_softmax(s, acc, m, l, factor, dtype):
    """One key tile of the online softmax for a warpgroup's rows: raw products ``s`` [rows, keys] (masked entries
    -inf), base-2 logits ``s * factor`` -> (p in ``dtype`` for the p v product, acc rescaled, new m, new l)."""
    m_new = jnp.maximum(m, s.max(axis=1) * factor)
    # -inf masks, not a large finite value: s * factor - m fused into one FMA differs from the rounded product
    # by far more than exp2's range at that size (inf, then NaN). A row that has seen no key yet (the band's
    # edge tiles, a table's masked diagonal) subtracts 0 instead of -inf, so its p and alpha are 0 and l stays 0.
    m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_sub)
    p = jnp.exp2(s * factor - lax.broadcast_in_dim(m_sub, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    return p.astype(dtype), acc, m_new, l


def program_tiles(start, rows, block_k, left, right, seq_len):
    """(first, end): the key tiles that the rows [start, start + rows) of a program meet, which its memory
    warpgroup streams; ``end >= first`` (empty for a program of padding only)."""
    first, _, _, end = band.key_tiles(start, rows, block_k, left, right, seq_len, masked_only=True)
    return first, jnp.maximum(end, first)


def warpgroup_tiles(q_start, block_q, block_k, left, right, seq_len, first, end, masked_only=False):
    """``band.key_tiles`` of one compute warpgroup, inside the program's run ``[first, end)``.

    A warpgroup skips ``[first, lo)`` and ``[hi, end)`` and computes ``[lo, hi)``: exactly ``end - first``
    steps, as many as the memory warpgroup streams, even for rows that are all padding (whose own run may
    be empty or lie past ``end``). Clamping changes no non-empty run: those lie inside the program's.
    """
    lo, mid_lo, mid_hi, hi = band.key_tiles(q_start, block_q, block_k, left, right, seq_len, masked_only)
    lo = jnp.minimum(jnp.maximum(lo, first), end)
    hi = jnp.minimum(jnp.maximum(hi, lo), end)
    mid_lo = jnp.minimum(jnp.maximum(mid_lo, lo), hi)
    mid_hi = jnp.minimum(jnp.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


def _kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, lse_smem, k_smem, v_smem, q_full, k_full, v_full,
            k_free, v_free, turn, *, blocks, left, right, scale, seq_len, groups, on_gpu):
    bq, bk, slots = blocks.block_q, blocks.block_k, blocks.num_slots
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    super_start = lax.axis_index("q_tiles") * blocks.rows_per_program
    first, end = program_tiles(super_start, blocks.rows_per_program, bk, left, right, seq_len)

    def slot_of(kb):
        return lax.rem(kb - first, jnp.int32(slots))

    @pl.when(wg == blocks.compute_wgs)
    def _memory_warpgroup():
        if blocks.compute_wgs > 1:
            plgpu.set_max_registers(MEMORY_WG_REGISTERS, action="decrease")
        kv_head = lax.div(head, jnp.int32(groups))

        @pl.loop(first, end)
        def _stream(kb):
            slot = slot_of(kb)
            rows = (batch, pl.ds(kb * bk, bk), kv_head)
            refill = kb - first >= slots  # the slot held tile kb - slots: wait until all have read it

            @pl.when(refill)
            def _():
                plgpu.barrier_wait(k_free.at[slot])

            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])

            @pl.when(refill)
            def _():
                plgpu.barrier_wait(v_free.at[slot])

            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])

        # Observe the last releases too, so that every barrier ends with all its phases seen (free on the
        # GPU: this warpgroup has nothing left to do; Pallas' GPU interpreter checks it).
        @pl.loop(jnp.maximum(end - slots, first), end)
        def _drain(kb):
            plgpu.barrier_wait(k_free.at[slot_of(kb)])
            plgpu.barrier_wait(v_free.at[slot_of(kb)])

    @pl.when(wg < blocks.compute_wgs)
    def _compute_warpgroup():
        if blocks.compute_wgs > 1:
            budget = 65536 // 128 - MEMORY_WG_REGISTERS
            plgpu.set_max_registers(budget // blocks.compute_wgs // 8 * 8, action="increase")
        q_start = super_start + wg * bq
        lo, mid_lo, mid_hi, hi = warpgroup_tiles(q_start, bq, bk, left, right, seq_len, first, end,
                                                 masked_only=not blocks.split_loops)
        q_smem = qo_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, bq), head], q_smem, q_full.at[wg])
        plgpu.barrier_wait(q_full.at[wg])
        factor = scale * LOG2E  # base-2 logits are raw products times factor: one FMA inside exp2

        def take_turns():
            # Both compute warpgroups meet here (a two-arrival barrier). Warpgroup 1 meets once more
            # before its loop and warpgroup 0 once more after, so each one's products line up with the
            # other's softmax. Every step meets twice, skipped ones too, to keep the counts equal.
            if blocks.pingpong:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        def skip(kb, carry):
            # A tile of the program's run that this warpgroup's rows never see: keep the barriers in step.
            slot = slot_of(kb)
            plgpu.barrier_wait(k_full.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turns()
            take_turns()
            return carry

        def step(kb, carry, masked):
            acc, m, l = carry
            slot = slot_of(kb)
            plgpu.barrier_wait(k_full.at[slot])

            def q_kt(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                take_turns()
                return acc_ref[...]

            s = pl.run_scoped(q_kt, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                rows = q_start + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
                cols = kb * bk + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(band.allowed(rows, cols, left, right, seq_len), s, -jnp.inf)
            p, acc, m_new, l = online_softmax(s, acc, m, l, factor, dtype)
            take_turns()
            plgpu.barrier_wait(v_full.at[slot])

            acc = _add_product(acc, p, v_smem.at[slot], on_gpu)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        acc = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        carry = (acc, _row_vector(-jnp.inf, bq), _row_vector(0.0, bq))
        pl.when(wg == 1)(take_turns)
        carry = lax.fori_loop(first, lo, skip, carry)
        carry = lax.fori_loop(lo, mid_lo, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(step, masked=False), carry)
        acc, m, l = lax.fori_loop(mid_hi, hi, functools.partial(step, masked=True), carry)
        lax.fori_loop(hi, end, skip, None)
        pl.when(wg == 0)(take_turns)

        # l >= 1 on every row that saw a key (its largest term is exp2(0)); rows of a tile that saw none
        # (padding only) must still write zeros, not NaN, since the backward reads the output.
        l = jnp.maximum(l, 1e-30)
        q_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
        lse_smem.at[wg][...] = m + jnp.log(l) * LOG2E
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(q_start, bq), head])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(q_start, bq)])
        plgpu.wait_smem_to_gmem(0)


def check_supported(q_dtype, head_dim: int, softcap, segment_ids) -> None:
    """Raises ValueError for what this kernel does not do (the Triton backend does)."""
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"backend='mosaic_gpu' needs q, k, v in bfloat16 or float16, got {jnp.dtype(q_dtype)}")
    if head_dim > 128:
        raise ValueError(f"backend='mosaic_gpu' supports head_dim up to 128, got {head_dim}")
    if softcap is not None:
        raise ValueError("backend='mosaic_gpu' does not support softcap; use backend='triton'")
    if segment_ids is not None:
        raise ValueError("backend='mosaic_gpu' does not support segment_ids; use backend='triton'")


def forward(q, k, v, *, left, right, scale, seq_len, blocks: MosaicBlocks = DEFAULT_BLOCKS, interpret=None):
    """q [b, s_pad, h, d], k/v [b, s_pad, hkv, d] -> (out like q, lse [b, h, s_pad] float32, base 2).

    ``s_pad`` must be a multiple of ``blocks.rows_per_program`` and of ``blocks.block_k``; ``d`` 64 or 128.
    Padded query rows get ``band.PAD_LSE``, as from the Triton forward. ``interpret``: a
    ``plgpu.InterpretGPUParams`` runs the kernel in Pallas' GPU interpreter (on the CPU).
    """
    blocks.validate()
    b, s_pad, h, d = q.shape
    if s_pad % blocks.rows_per_program or s_pad % blocks.block_k:
        raise ValueError(f"sequence length {s_pad} must be a multiple of {blocks.rows_per_program} (rows per "
                         f"program) and of block_k={blocks.block_k}")
    if d % 64:
        raise ValueError(f"head_dim must be a multiple of 64 here (padded by ops), got {d}")
    # 128-byte swizzled tiles of 8 rows: the layout wgmma reads; 64 columns of 2 bytes per swizzle row.
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    cw, slots = blocks.compute_wgs, blocks.num_slots
    scratch = [
        plgpu.SMEM((cw, blocks.block_q, d), q.dtype, transforms=transforms),  # q in, then out
        plgpu.SMEM((cw, blocks.block_q), jnp.float32),
        plgpu.SMEM((slots, blocks.block_k, d), k.dtype, transforms=transforms),
        plgpu.SMEM((slots, blocks.block_k, d), v.dtype, transforms=transforms),
        plgpu.Barrier(num_barriers=cw),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=cw, num_barriers=slots),
        plgpu.Barrier(num_arrivals=cw, num_barriers=slots),
        plgpu.Barrier(num_arrivals=cw),  # the ping-pong turns (unused without pingpong)
    ]
    kernel = functools.partial(_kernel, blocks=blocks, left=left, right=right, scale=scale, seq_len=seq_len,
                               groups=h // k.shape[2], on_gpu=interpret is None)
    out, lse = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s_pad), jnp.float32)],
        scratch_types=scratch,
        grid=(h, s_pad // blocks.rows_per_program, b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=cw + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v)
    # Padded rows: a log-sum-exp that makes their probabilities exactly 0 in the backward passes.
    lse = jnp.where(jnp.arange(s_pad) < seq_len, lse, band.PAD_LSE)
    return out, lse
