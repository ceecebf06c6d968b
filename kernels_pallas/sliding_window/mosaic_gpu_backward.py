"""Backward pass on Hopper GPUs (Pallas Mosaic GPU): the flash backward over the band, dk/dv and dq passes.

"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (Algorithm 2) and
"FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision", restricted to the band
``i - left <= j <= i + right``. With the forward's base-2 log-sum-exp ``lse`` and ``delta_i = out_i . dout_i``:

    p_ij  = exp2(s_ij * scale * log2(e) - lse_i),   s = q k^T (raw products)
    dv_j  = sum_i p_ij dout_i
    ds_ij = p_ij (dout_i . v_j - delta_i)
    dk_j  = scale * sum_i ds_ij q_i

dk/dv: one program per (kv head, key super-tile, batch). Its last warpgroup only moves memory: for each query head of
the kv head's group (GQA without repeated kv heads or a reduction afterwards) it streams the q, dout, lse and
delta tiles of the query tiles that meet the band of the super-tile's keys (``band.query_tiles``) into a ring of
shared-memory slots with TMA. Each of the ``compute_wgs`` compute warpgroups owns ``block_k`` keys, keeps its k
and v tiles in shared memory and its dk, dv accumulators in registers, and runs four wgmma products per step:
s^T = k q^T, dv += p^T dout, dp^T = v dout^T, dk += ds^T q. Tiles are transposed ([keys, queries]) so that dk
and dv come out of plain products. Slot protocol as in ``mosaic_gpu_forward``: a "full" barrier per slot and
buffer (the TMA completes it) and one "free" barrier per slot (each compute warpgroup arrives once after its
last read of the slot); a warpgroup waits and releases the tiles of the program's run outside its own.

dq comes from a second kernel (``dq``), shaped like the forward: one program per (head, query super-tile,
batch), the memory warpgroup streaming the k and v tiles of the band, each compute warpgroup holding ``block_q``
rows of q and dout and running s = q k^T, dp = dout v^T, dq += ds k per step:

    dq_i  = scale * sum_j ds_ij k_j

With ``MosaicBackwardBlocks(mosaic_dq=False)`` dq comes from the Triton dq pass instead (``triton_dq``). Both
passes recompute s and dp (7 tile products against 5 for a fused pass, which would need dq reduce-adds).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pl_triton

from kernels_pallas.sliding_window import band, gpu_backward
from kernels_pallas.sliding_window.mosaic_gpu_forward import (LOG2E, MEMORY_WG_REGISTERS, _add_product,
                                                              check_pipeline, program_tiles, warpgroup_tiles)


@dataclasses.dataclass(frozen=True)
class MosaicBackwardBlocks:
    """Tiling of the Mosaic GPU backward passes.

    Attributes:
      block_q: queries per pipeline step in the dk/dv pass, query rows per compute warpgroup in the dq pass
        (a multiple of 64).
      block_k: keys per compute warpgroup in the dk/dv pass (a multiple of 64: the wgmma row count of the
        transposed tiles), keys per pipeline step in the dq pass.
      compute_wgs: compute warpgroups per program, sharing the streamed tiles (1 or 2).
      num_slots: shared-memory slots in the streamed ring (>= 2).
      mosaic_dq: dq from the Mosaic GPU dq kernel; False: from the Triton dq pass.
    """

    block_q: int = 64
    block_k: int = 64
    compute_wgs: int = 2
    num_slots: int = 2
    mosaic_dq: bool = True

    def validate(self) -> None:
        check_pipeline(self)
        if not isinstance(self.mosaic_dq, bool):
            raise ValueError(f"MosaicBackwardBlocks.mosaic_dq must be a bool, got {self.mosaic_dq!r}")

    @property
    def keys_per_program(self) -> int:
        return self.block_k * self.compute_wgs

    @property
    def rows_per_program(self) -> int:
        return self.block_q * self.compute_wgs


# H200, B4 H16 D128 bf16 causal, forward+backward with the default Mosaic forward (same run, ms): 3 slots 1.818 /
# 10.236 / 31.053 at S8192 W512 / S32768 W1024 / W4096, 2 slots 1.927 / 10.154 / 30.721, one compute warpgroup
# 2.218 / 12.894 / 39.385 (benchmarks/results/sliding_window_mgpu_bwd_h200.txt).
DEFAULT_BACKWARD_BLOCKS = MosaicBackwardBlocks(num_slots=3)


def resolve_blocks(mosaic_backward, default: MosaicBackwardBlocks = DEFAULT_BACKWARD_BLOCKS) -> MosaicBackwardBlocks:
    """The ``mosaic_backward`` argument once the ops have settled that the Mosaic backward runs: True (or None,
    the default) -> ``default``, a ``MosaicBackwardBlocks`` -> itself once validated; anything else raises
    ValueError naming the argument."""
    if mosaic_backward is True or mosaic_backward is None:
        return default
    if not isinstance(mosaic_backward, MosaicBackwardBlocks):
        raise ValueError(f"mosaic_backward must be a bool or a MosaicBackwardBlocks, "
                         f"got {type(mosaic_backward).__name__}")
    mosaic_backward.validate()
    return mosaic_backward


def program_query_tiles(k_start, keys, block_q, left, right, seq_len):
    """(first, end): the query tiles that the keys [k_start, k_start + keys) of a program meet, which its
    memory warpgroup streams (per query head); ``end >= first`` (empty for keys of padding only)."""
    first, _, _, end = band.query_tiles(k_start, block_q, keys, left, right, seq_len, masked_only=True)
    return first, jnp.maximum(end, first)


def warpgroup_query_tiles(k_start, block_q, block_k, left, right, seq_len, first, end):
    """``band.query_tiles`` of one compute warpgroup's keys, clamped into the program's run ``[first, end)``
    (as ``mosaic_gpu_forward.warpgroup_tiles``): exactly ``end - first`` steps per query head."""
    lo, mid_lo, mid_hi, hi = band.query_tiles(k_start, block_q, block_k, left, right, seq_len)
    lo = jnp.minimum(jnp.maximum(lo, first), end)
    hi = jnp.minimum(jnp.maximum(hi, lo), end)
    mid_lo = jnp.minimum(jnp.maximum(mid_lo, lo), hi)
    mid_hi = jnp.minimum(jnp.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
            k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_full, q_full, do_full, lse_full,
            delta_full, free, *, blocks, left, right, scale, seq_len, groups, on_gpu):
    bq, bk, slots = blocks.block_q, blocks.block_k, blocks.num_slots
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
    super_start = lax.axis_index("k_tiles") * blocks.keys_per_program
    first, end = program_query_tiles(super_start, blocks.keys_per_program, bq, left, right, seq_len)
    steps = end - first  # per query head of the group

    def slot_of(g, qb):
        return lax.rem(g * steps + qb - first, jnp.int32(slots))

    @pl.when(wg == blocks.compute_wgs)
    def _memory_warpgroup():
        if blocks.compute_wgs > 1:
            plgpu.set_max_registers(MEMORY_WG_REGISTERS, action="decrease")
        for g in range(groups):  # static: the query heads sharing this kv head
            head = kv_head * groups + g

            @pl.loop(first, end)
            def _stream(qb):
                slot = slot_of(g, qb)

                @pl.when(g * steps + qb - first >= slots)  # the slot is reused: wait until all have read it
                def _():
                    plgpu.barrier_wait(free.at[slot])

                rows = pl.ds(qb * bq, bq)
                plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[slot], q_full.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], lse_full.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[slot], do_full.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot],
                                        delta_full.at[slot])

        # Observe the last releases too (every barrier phase seen; the interpreter checks it).
        total = steps * groups

        @pl.loop(jnp.maximum(total - slots, 0), total)
        def _drain(t):
            plgpu.barrier_wait(free.at[lax.rem(t, jnp.int32(slots))])

    @pl.when(wg < blocks.compute_wgs)
    def _compute_warpgroup():
        if blocks.compute_wgs > 1:
            budget = 65536 // 128 - MEMORY_WG_REGISTERS
            plgpu.set_max_registers(budget // blocks.compute_wgs // 8 * 8, action="increase")
        k_start = super_start + wg * bk
        keys = (batch, pl.ds(k_start, bk), kv_head)
        k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_tile, kv_full.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_tile, kv_full.at[wg + blocks.compute_wgs])
        plgpu.barrier_wait(kv_full.at[wg])
        plgpu.barrier_wait(kv_full.at[wg + blocks.compute_wgs])
        lo, mid_lo, mid_hi, hi = warpgroup_query_tiles(k_start, bq, bk, left, right, seq_len, first, end)
        factor = scale * LOG2E  # base-2 logits are raw products times factor, as in the forward

        def skip(qb, carry, g):
            # A query tile of the program's run that this warpgroup's keys never meet: keep barriers in step.
            slot = slot_of(g, qb)
            for full in (q_full, lse_full, do_full, delta_full):
                plgpu.barrier_wait(full.at[slot])
            plgpu.barrier_arrive(free.at[slot])
            return carry

        def step(qb, carry, g, masked):
            dk, dv = carry
            slot = slot_of(g, qb)
            q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
            plgpu.barrier_wait(q_full.at[slot])

            def k_qt(acc_ref):
                plgpu.wgmma(acc_ref, k_tile, q_tile.transpose((1, 0)))
                return acc_ref[...]

            st = pl.run_scoped(k_qt, plgpu.ACC((bk, bq), jnp.float32))
            if masked:
                keys_ = k_start + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0, layout=plgpu.Layout.WGMMA)
                queries = qb * bq + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 1, layout=plgpu.Layout.WGMMA)
                # -inf, not a large finite value: lse is finite (PAD_LSE on padded rows), so p is exactly 0.
                st = jnp.where(band.allowed(queries, keys_, left, right, seq_len), st, -jnp.inf)
            plgpu.barrier_wait(lse_full.at[slot])
            lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            pt = jnp.exp2(st * factor - lax.broadcast_in_dim(lse, st.shape, [1]))
            plgpu.barrier_wait(do_full.at[slot])
            dv = _add_product(dv, pt.astype(dtype), do_tile, on_gpu)

            def v_dot(acc_ref):
                plgpu.wgmma(acc_ref, v_tile, do_tile.transpose((1, 0)))
                return acc_ref[...]

            dpt = pl.run_scoped(v_dot, plgpu.ACC((bk, bq), jnp.float32))
            plgpu.barrier_wait(delta_full.at[slot])
            delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))
            dk = _add_product(dk, dst.astype(dtype), q_tile, on_gpu)
            plgpu.barrier_arrive(free.at[slot])
            return dk, dv

        zeros = plgpu.layout_cast(jnp.zeros((bk, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        carry = (zeros, zeros)
        for g in range(groups):
            carry = lax.fori_loop(first, lo, functools.partial(skip, g=g), carry)
            carry = lax.fori_loop(lo, mid_lo, functools.partial(step, g=g, masked=True), carry)
            carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(step, g=g, masked=False), carry)
            carry = lax.fori_loop(mid_hi, hi, functools.partial(step, g=g, masked=True), carry)
            carry = lax.fori_loop(hi, end, functools.partial(skip, g=g), carry)
        dk, dv = carry
        # The k and v tiles are read for the last time above: reuse them to stage the outputs.
        k_tile[...] = (dk * scale).astype(dtype)
        v_tile[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[keys])
        plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[keys])
        plgpu.wait_smem_to_gmem(0)


def dkv(q, k, v, do, lse, delta, *, left, right, scale, seq_len,
        blocks: MosaicBackwardBlocks = DEFAULT_BACKWARD_BLOCKS, interpret=None):
    """q/do [b, s_pad, h, d], k/v [b, s_pad, hkv, d], lse/delta [b, h, s_pad] float32 -> (dk, dv) like k, v.

    ``s_pad`` must be a multiple of ``blocks.block_q`` and of ``blocks.keys_per_program``; ``d`` 64 or 128;
    padded query rows must carry ``band.PAD_LSE`` (as both forwards write). ``interpret``: a
    ``plgpu.InterpretGPUParams`` runs the kernel in Pallas' GPU interpreter (on the CPU).
    """
    blocks.validate()
    b, s_pad, h, d = q.shape
    hkv = k.shape[2]
    if s_pad % blocks.block_q or s_pad % blocks.keys_per_program:
        raise ValueError(f"sequence length {s_pad} must be a multiple of block_q={blocks.block_q} and of "
                         f"{blocks.keys_per_program} (keys per program)")
    if d % 64 or d > 128:
        raise ValueError(f"head_dim must be 64 or 128 here (padded by ops), got {d}")
    # 128-byte swizzled tiles of 8 rows, the layout wgmma reads (as in the forward).
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    cw, slots = blocks.compute_wgs, blocks.num_slots
    scratch = [
        plgpu.SMEM((cw, blocks.block_k, d), k.dtype, transforms=transforms),  # k in, then dk out
        plgpu.SMEM((cw, blocks.block_k, d), v.dtype, transforms=transforms),  # v in, then dv out
        plgpu.SMEM((slots, blocks.block_q, d), q.dtype, transforms=transforms),
        plgpu.SMEM((slots, blocks.block_q, d), do.dtype, transforms=transforms),
        plgpu.SMEM((slots, blocks.block_q), jnp.float32),
        plgpu.SMEM((slots, blocks.block_q), jnp.float32),
        plgpu.Barrier(num_barriers=2 * cw),  # k, v of each compute warpgroup
        plgpu.Barrier(num_barriers=slots),  # q
        plgpu.Barrier(num_barriers=slots),  # do
        plgpu.Barrier(num_barriers=slots),  # lse
        plgpu.Barrier(num_barriers=slots),  # delta
        plgpu.Barrier(num_arrivals=cw, num_barriers=slots),  # slot free
    ]
    kernel = functools.partial(_kernel, blocks=blocks, left=left, right=right, scale=scale, seq_len=seq_len,
                               groups=h // hkv, on_gpu=interpret is None)
    return plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_types=scratch,
        grid=(hkv, s_pad // blocks.keys_per_program, b),
        grid_names=("kv_heads", "k_tiles", "batch"),
        num_threads=cw + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v, do, lse, delta)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, rows_full, k_full, v_full, free,
               *, blocks, left, right, scale, seq_len, groups, on_gpu):
    bq, bk, slots = blocks.block_q, blocks.block_k, blocks.num_slots
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    cw = blocks.compute_wgs
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    super_start = lax.axis_index("q_tiles") * blocks.rows_per_program
    first, end = program_tiles(super_start, blocks.rows_per_program, bk, left, right, seq_len)

    def slot_of(kb):
        return lax.rem(kb - first, jnp.int32(slots))

    @pl.when(wg == cw)
    def _memory_warpgroup():
        if cw > 1:
            plgpu.set_max_registers(MEMORY_WG_REGISTERS, action="decrease")
        kv_head = lax.div(head, jnp.int32(groups))

        @pl.loop(first, end)
        def _stream(kb):
            slot = slot_of(kb)

            @pl.when(kb - first >= slots)  # the slot is reused: wait until all have read it
            def _():
                plgpu.barrier_wait(free.at[slot])

            rows = (batch, pl.ds(kb * bk, bk), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])

        @pl.loop(jnp.maximum(end - slots, first), end)
        def _drain(kb):
            plgpu.barrier_wait(free.at[slot_of(kb)])

    @pl.when(wg < cw)
    def _compute_warpgroup():
        if cw > 1:
            budget = 65536 // 128 - MEMORY_WG_REGISTERS
            plgpu.set_max_registers(budget // cw // 8 * 8, action="increase")
        q_start = super_start + wg * bq
        rows = (batch, pl.ds(q_start, bq), head)
        q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
        # Four copies, four barriers: one barrier per copy (its expected bytes are per copy).
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_tile, rows_full.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_tile, rows_full.at[cw + wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, pl.ds(q_start, bq)], lse_smem.at[wg],
                                rows_full.at[2 * cw + wg])
        plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, pl.ds(q_start, bq)], delta_smem.at[wg],
                                rows_full.at[3 * cw + wg])
        for i in range(4):
            plgpu.barrier_wait(rows_full.at[i * cw + wg])
        lse = plgpu.load(lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        delta = plgpu.load(delta_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        lo, mid_lo, mid_hi, hi = warpgroup_tiles(q_start, bq, bk, left, right, seq_len, first, end)
        factor = scale * LOG2E

        def skip(kb, carry):
            slot = slot_of(kb)
            plgpu.barrier_wait(k_full.at[slot])
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_arrive(free.at[slot])
            return carry

        def step(kb, dq, masked):
            slot = slot_of(kb)
            k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
            plgpu.barrier_wait(k_full.at[slot])

            def q_kt(acc_ref):
                plgpu.wgmma(acc_ref, q_tile, k_tile.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(q_kt, plgpu.ACC((bq, bk), jnp.float32))
            if masked:
                rows_ = q_start + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
                cols = kb * bk + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(band.allowed(rows_, cols, left, right, seq_len), s, -jnp.inf)
            p = jnp.exp2(s * factor - lax.broadcast_in_dim(lse, s.shape, [0]))
            plgpu.barrier_wait(v_full.at[slot])

            def do_vt(acc_ref):
                plgpu.wgmma(acc_ref, do_tile, v_tile.transpose((1, 0)))
                return acc_ref[...]

            dp = pl.run_scoped(do_vt, plgpu.ACC((bq, bk), jnp.float32))
            ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
            dq = _add_product(dq, ds.astype(dtype), k_tile, on_gpu)
            plgpu.barrier_arrive(free.at[slot])
            return dq

        dq = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        lax.fori_loop(first, lo, skip, None)
        dq = lax.fori_loop(lo, mid_lo, functools.partial(step, masked=True), dq)
        dq = lax.fori_loop(mid_lo, mid_hi, functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(mid_hi, hi, functools.partial(step, masked=True), dq)
        lax.fori_loop(hi, end, skip, None)
        q_tile[...] = (dq * scale).astype(dtype)  # q is read for the last time above: stage dq there
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)


def dq(q, k, v, do, lse, delta, *, left, right, scale, seq_len,
       blocks: MosaicBackwardBlocks = DEFAULT_BACKWARD_BLOCKS, interpret=None):
    """The Mosaic GPU dq pass: arguments as ``dkv``; ``s_pad`` a multiple of ``blocks.rows_per_program`` and of
    ``blocks.block_k``. Returns dq like q."""
    blocks.validate()
    b, s_pad, h, d = q.shape
    if s_pad % blocks.rows_per_program or s_pad % blocks.block_k:
        raise ValueError(f"sequence length {s_pad} must be a multiple of {blocks.rows_per_program} (rows per "
                         f"program) and of block_k={blocks.block_k}")
    if d % 64 or d > 128:
        raise ValueError(f"head_dim must be 64 or 128 here (padded by ops), got {d}")
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    cw, slots = blocks.compute_wgs, blocks.num_slots
    scratch = [
        plgpu.SMEM((cw, blocks.block_q, d), q.dtype, transforms=transforms),  # q in, then dq out
        plgpu.SMEM((cw, blocks.block_q, d), do.dtype, transforms=transforms),
        plgpu.SMEM((cw, blocks.block_q), jnp.float32),
        plgpu.SMEM((cw, blocks.block_q), jnp.float32),
        plgpu.SMEM((slots, blocks.block_k, d), k.dtype, transforms=transforms),
        plgpu.SMEM((slots, blocks.block_k, d), v.dtype, transforms=transforms),
        plgpu.Barrier(num_barriers=4 * cw),  # q, do, lse, delta of each compute warpgroup
        plgpu.Barrier(num_barriers=slots),  # k
        plgpu.Barrier(num_barriers=slots),  # v
        plgpu.Barrier(num_arrivals=cw, num_barriers=slots),  # slot free
    ]
    kernel = functools.partial(_dq_kernel, blocks=blocks, left=left, right=right, scale=scale, seq_len=seq_len,
                               groups=h // k.shape[2], on_gpu=interpret is None)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=scratch,
        grid=(h, s_pad // blocks.rows_per_program, b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=cw + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v, do, lse, delta)


def triton_dq(q, k, v, do, lse, delta, *, left, right, scale, seq_len, blocks, interpret):
    """The Triton dq pass of ``gpu_backward`` alone (one program per query tile, batch and head)."""
    b, s_pad, h, d = q.shape
    groups = h // k.shape[2]
    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    tile_q = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    full_kv = pl.BlockSpec((None, s_pad, None, d), lambda i, bi, hi: (bi, 0, hi // groups, 0))
    tile_row = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    kernel = functools.partial(gpu_backward._dq_kernel, left=left, right=right, scale=scale, softcap=None,
                               seq_len=seq_len, block_k=bk, has_segments=False, single_loop=blocks.single_loop)
    return pl.pallas_call(
        kernel,
        grid=(s_pad // bq, b, h),
        in_specs=[tile_q, full_kv, full_kv, tile_q, tile_row, tile_row],
        out_specs=tile_q,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps_bwd,
                                                 num_stages=blocks.num_stages_bwd),
        interpret=interpret,
        name="sliding_window_bwd_dq",
    )(q, k, v, do, lse, delta)


def backward(q, k, v, do, lse, delta, *, left, right, scale, seq_len, blocks, mosaic_blocks, interpret):
    """(dq, dk, dv): the Mosaic GPU dk/dv pass and dq pass (``mosaic_blocks``), or with
    ``mosaic_blocks.mosaic_dq=False`` the Triton dq pass (``blocks``: BlockSizes). ``interpret=True`` runs them
    in their interpreters."""
    mosaic_interpret = plgpu.InterpretGPUParams() if interpret is True else (interpret or None)
    common = dict(left=left, right=right, scale=scale, seq_len=seq_len)
    if mosaic_blocks.mosaic_dq:
        dq_ = dq(q, k, v, do, lse, delta, blocks=mosaic_blocks, interpret=mosaic_interpret, **common)
    else:
        dq_ = triton_dq(q, k, v, do, lse, delta, blocks=blocks, interpret=bool(interpret), **common)
    dk, dv = dkv(q, k, v, do, lse, delta, blocks=mosaic_blocks, interpret=mosaic_interpret, **common)
    return dq_, dk, dv
