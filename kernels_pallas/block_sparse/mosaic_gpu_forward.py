"""Forward pass on Hopper GPUs (Pallas Mosaic GPU): warp-specialised flash attention over the kept key tiles.

The sliding-window kernel (``kernels_pallas/sliding_window/mosaic_gpu_forward.py``) with another walk: one
program per (head, query super-tile, batch) visits the key tiles listed in its row of the block table
(``tables``: ``[count, unmasked_lo, unmasked_hi, kept tiles ascending..., padding]``, built over tiles of
``rows_per_program`` queries by ``block_k`` keys) instead of a contiguous band. Its last warpgroup only moves
memory: it copies the table row into shared memory once, then streams the k and v tiles of the row's entries
into a ring of shared-memory slots with TMA. The other ``compute_wgs`` warpgroups own ``block_q`` query rows
each and run the online softmax with wgmma products over the same entries, in the same order:

    s = q k_t^T,  m' = max(m, rowmax(s) * c),  l' = l * 2^(m - m') + rowsum(2^(s c - m')),
    acc' = acc * 2^(m - m') + 2^(s c - m') v_t,      c = scale * log2(e),
    out = acc / l,  lse = m + log2(l)  (base 2, as the Triton backward reads it).

Every warpgroup reads the count and the entries from the one shared copy of the row, so all of them take
exactly ``count`` steps and every slot barrier's phases stay in step. Entries outside ``[unmasked_lo,
unmasked_hi)`` (the causal diagonal) are masked element by element; a warpgroup computes every entry of the
row, also a tile its own rows see none of (the mask zeroes it), which keeps the protocol one loop long. A
row with no kept tile (or whose every key is masked) writes zeros and ``PAD_LSE``, as the Triton forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.block_sparse import tables
from kernels_pallas.sliding_window.band import PAD_LSE
from kernels_pallas.sliding_window.mosaic_gpu_forward import (LOG2E, MEMORY_WG_REGISTERS, MosaicBlocks,
                                                              _add_product, _row_vector, online_softmax)

# Two compute warpgroups of 64 rows taking turns, 128-key steps; its 128-row super-tile and 128-key steps divide
# the 128-blocks. H200, B4 S8192 H16 D128 bf16 (same run, ms): 0.712 / 1.247 / 2.157 / 2.224 / 0.761 at
# random 10 / 25 / 50 %, causal, BigBird; without the turns 0.773 / 1.324 / 2.274 / 2.303 / 0.732, one loop
# 0.814 / 1.371 / 2.202 / 2.532 / 0.723, one compute warpgroup 0.943 / 1.692 / 3.015 / 2.960 / 0.948
# (benchmarks/results/check_block_sparse_mgpu_h200.txt).
DEFAULT_BLOCKS = MosaicBlocks(block_q=64, block_k=128, compute_wgs=2, pingpong=True)


def _kernel(table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, row_smem, qo_smem, lse_smem, k_smem, v_smem,
            row_full, q_full, k_full, v_full, k_free, v_free, turn, *, blocks, scale, causal_offset,
            per_batch, groups, on_gpu):
    bq, bk, slots, cw = blocks.block_q, blocks.block_k, blocks.num_slots, blocks.compute_wgs
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    q_tile = lax.axis_index("q_tiles")

    def slot_of(j):  # entries fill the ring in order: entry j lives in slot j mod slots
        return lax.rem(j, jnp.int32(slots))

    @pl.when(wg == cw)
    def _memory_warpgroup():
        if cw > 1:
            plgpu.set_max_registers(MEMORY_WG_REGISTERS, action="decrease")
        # The row is contiguous int32 (width a power of two >= 4: whole 16-byte units), so a plain bulk copy
        # takes it, whatever its width (the tiled TMA path stops at 256 elements a dimension).
        plgpu.copy_gmem_to_smem(table_ref.at[batch if per_batch else 0, head, q_tile], row_smem, row_full,
                                oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
        plgpu.barrier_wait(row_full)
        count = row_smem[0]
        kv_head = lax.div(head, jnp.int32(groups))

        @pl.loop(0, count)
        def _stream(j):
            slot = slot_of(j)
            kb = row_smem[tables.HEADER + j]
            rows = (batch, pl.ds(kb * bk, bk), kv_head)
            refill = j >= slots  # the slot held entry j - slots: wait until every compute warpgroup read it

            @pl.when(refill)
            def _():
                plgpu.barrier_wait(k_free.at[slot])

            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])

            @pl.when(refill)
            def _():
                plgpu.barrier_wait(v_free.at[slot])

            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])

        # Observe the last releases too, so that every barrier ends with all its phases seen (free on the
        # GPU; Pallas' GPU interpreter checks it).
        @pl.loop(jnp.maximum(count - slots, 0), count)
        def _drain(j):
            plgpu.barrier_wait(k_free.at[slot_of(j)])
            plgpu.barrier_wait(v_free.at[slot_of(j)])

    @pl.when(wg < cw)
    def _compute_warpgroup():
        if cw > 1:
            budget = 65536 // 128 - MEMORY_WG_REGISTERS
            plgpu.set_max_registers(budget // cw // 8 * 8, action="increase")
        q_start = q_tile * blocks.rows_per_program + wg * bq
        q_smem = qo_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, bq), head], q_smem, q_full.at[wg])
        plgpu.barrier_wait(row_full)  # every warpgroup reads the same row: same count, same slots
        count, lo, hi = row_smem[0], row_smem[1], row_smem[2]
        plgpu.barrier_wait(q_full.at[wg])
        factor = scale * LOG2E  # base-2 logits are raw products times factor: one FMA inside exp2

        def take_turns():
            # FlashAttention-3's ping-pong, as in the sliding-window kernel: both compute warpgroups meet here
            # twice a step; warpgroup 1 once more before its loop and warpgroup 0 once more after.
            if blocks.pingpong:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        def step(j, carry, masked):
            acc, m, l = carry
            slot = slot_of(j)
            plgpu.barrier_wait(k_full.at[slot])

            def q_kt(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                take_turns()
                return acc_ref[...]

            s = pl.run_scoped(q_kt, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:  # the causal rule j <= i + offset inside a diagonal tile
                kb = row_smem[tables.HEADER + j]
                rows = q_start + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
                cols = kb * bk + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(cols <= rows + causal_offset, s, -jnp.inf)
            p, acc, m_new, l = online_softmax(s, acc, m, l, factor, dtype)
            take_turns()
            plgpu.barrier_wait(v_full.at[slot])
            acc = _add_product(acc, p, v_smem.at[slot], on_gpu)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        acc = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        carry = (acc, _row_vector(-jnp.inf, bq), _row_vector(0.0, bq))
        pl.when(wg == 1)(take_turns)
        if causal_offset is None:  # no element mask anywhere
            acc, m, l = lax.fori_loop(0, count, functools.partial(step, masked=False), carry)
        elif not blocks.split_loops:  # mask every entry: one loop body
            acc, m, l = lax.fori_loop(0, count, functools.partial(step, masked=True), carry)
        else:
            carry = lax.fori_loop(0, lo, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(lo, hi, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(hi, count, functools.partial(step, masked=True), carry)
        pl.when(wg == 0)(take_turns)

        # l >= 1 on every row that saw a key (its largest term is exp2(0)); l == 0: no key seen.
        empty = l == 0.0
        l_div = jnp.where(empty, 1.0, l)
        q_smem[...] = (acc / lax.broadcast_in_dim(l_div, acc.shape, [0])).astype(dtype)
        lse_smem.at[wg][...] = jnp.where(empty, PAD_LSE, m + jnp.log(l_div) * LOG2E)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(q_start, bq), head])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(q_start, bq)])
        plgpu.wait_smem_to_gmem(0)


def check_supported(q_dtype, head_dim: int, segment_ids, fine) -> None:
    """Raises ValueError for what this kernel does not do (backend="triton" does)."""
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"backend='mosaic_gpu' needs q, k, v in bfloat16 or float16, got {jnp.dtype(q_dtype)}")
    if head_dim > 128:
        raise ValueError(f"backend='mosaic_gpu' supports head_dim up to 128, got {head_dim}")
    if segment_ids is not None:
        raise ValueError("backend='mosaic_gpu' does not support segment_ids; use backend='triton'")
    if fine is not None:
        name = {"bits": "key_block_bits"}.get(fine, fine)
        raise ValueError(f"backend='mosaic_gpu' does not support {name}; use backend='triton'")


def check_row_pass(q, k, row_tables, blocks) -> None:
    """Raises ValueError unless q [b, sq, h, d], k [b, sk, hkv, d] and row_tables fit a pass over the row tables
    (this forward, the dq pass) with ``blocks``' tiles."""
    blocks.validate()
    _, sq, h, d = q.shape
    sk = k.shape[1]
    if sq % blocks.rows_per_program or sk % blocks.block_k:
        raise ValueError(f"q length {sq} must be a multiple of {blocks.rows_per_program} (rows per program) and "
                         f"kv length {sk} of block_k={blocks.block_k}")
    if d not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128 here (padded by ops), got {d}")
    if row_tables.shape[1:3] != (h, sq // blocks.rows_per_program) or row_tables.dtype != jnp.int32:
        raise ValueError(f"row_tables must be int32 [b|1, {h}, {sq // blocks.rows_per_program}, width], got "
                         f"{row_tables.dtype} {row_tables.shape}")


def forward(q, k, v, row_tables, *, scale, causal_offset, blocks: MosaicBlocks = DEFAULT_BLOCKS, interpret=None):
    """q [b, sq, h, d], k/v [b, sk, hkv, d], row_tables [b|1, h, sq / rows_per_program, width] int32 over tiles
    of ``blocks.rows_per_program`` queries by ``blocks.block_k`` keys -> (out like q, lse [b, h, sq] float32,
    base 2).

    ``sq`` a multiple of ``rows_per_program``, ``sk`` of ``block_k``, ``d`` 64 or 128 (ops pads it).
    ``causal_offset``: key j visible from query i iff j <= i + offset, on the entries outside the table's
    unmasked run; None: no element mask. ``interpret``: a ``plgpu.InterpretGPUParams`` runs the kernel in
    Pallas' GPU interpreter (on the CPU).
    """
    check_row_pass(q, k, row_tables, blocks)
    b, sq, h, d = q.shape
    width = row_tables.shape[-1]
    # 128-byte swizzled tiles of 8 rows: the layout wgmma reads; 64 columns of 2 bytes per swizzle row.
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    cw, slots = blocks.compute_wgs, blocks.num_slots
    scratch = [
        plgpu.SMEM((width,), jnp.int32),  # the program's table row
        plgpu.SMEM((cw, blocks.block_q, d), q.dtype, transforms=transforms),  # q in, then out
        plgpu.SMEM((cw, blocks.block_q), jnp.float32),
        plgpu.SMEM((slots, blocks.block_k, d), k.dtype, transforms=transforms),
        plgpu.SMEM((slots, blocks.block_k, d), v.dtype, transforms=transforms),
        plgpu.Barrier(),  # the table row (every warpgroup waits on it)
        plgpu.Barrier(num_barriers=cw),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=cw, num_barriers=slots),
        plgpu.Barrier(num_arrivals=cw, num_barriers=slots),
        plgpu.Barrier(num_arrivals=cw),  # the ping-pong turns (unused without pingpong)
    ]
    kernel = functools.partial(_kernel, blocks=blocks, scale=scale, causal_offset=causal_offset,
                               per_batch=row_tables.shape[0] > 1, groups=h // k.shape[2],
                               on_gpu=interpret is None)
    return plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
        scratch_types=scratch,
        grid=(h, sq // blocks.rows_per_program, b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=cw + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(row_tables, q, k, v)
