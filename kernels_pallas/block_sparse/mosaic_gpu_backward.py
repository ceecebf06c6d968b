"""Backward pass on Hopper GPUs (Pallas Mosaic GPU): the flash backward over the kept tiles, dk/dv and dq passes.

The sliding-window kernels (``kernels_pallas/sliding_window/mosaic_gpu_backward.py``) with table walks instead
of band runs. With the forward's base-2 log-sum-exp ``lse`` and ``delta_i = out_i . dout_i``:

    p_ij  = exp2(s_ij * scale * log2(e) - lse_i),   s = q k^T (raw products)
    dv_j  = sum_i p_ij dout_i,   ds_ij = p_ij (dout_i . v_j - delta_i)
    dk_j  = scale * sum_i ds_ij q_i,   dq_i = scale * sum_j ds_ij k_j

dk/dv (``dkv``): one program per (kv head, key super-tile, batch). Its memory warpgroup copies the column-table
rows of the super-tile for every query head of the GQA group (``[count, unmasked_lo, unmasked_hi, kept query
tiles ascending..., padding]`` each, over tiles of ``block_q`` queries by ``keys_per_program`` keys) into
shared memory once, then streams the q, dout, lse and delta tiles of head 0's entries, then head 1's, ..., into
a ring of slots with TMA. Each compute warpgroup owns ``block_k`` keys (k, v in shared memory, dk, dv in
registers), reads the same rows, and takes the same steps: s^T = k q^T, dv += p^T dout, dp^T = v dout^T,
dk += ds^T q. Entry n of the whole walk (heads in order) lives in slot n mod num_slots.

dq (``dq``): shaped like the forward (``mosaic_gpu_forward``): one program per (head, query super-tile, batch),
row tables over tiles of ``rows_per_program`` queries by ``block_k`` keys, the memory warpgroup streams k and v,
each compute warpgroup holds ``block_q`` rows of q and dout: s = q k^T, dp = dout v^T, dq += ds k.

Entries outside a row's ``[unmasked_lo, unmasked_hi)`` run (the causal diagonal) are masked element by element
with -inf; lse is finite everywhere (PAD_LSE on rows that saw no key), so p there is exactly 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.block_sparse import mosaic_gpu_forward, tables
from kernels_pallas.sliding_window.mosaic_gpu_backward import MosaicBackwardBlocks
from kernels_pallas.sliding_window.mosaic_gpu_forward import LOG2E, MEMORY_WG_REGISTERS, _add_product

# H200, B4 S8192 H16 D128 bf16, 128-blocks, forward+backward with the default Mosaic forward (same run, ms):
# 2 slots 2.430 / 4.723 / 8.589 / 8.637 / 2.725 at random 10 / 25 / 50 %, causal, BigBird; 3 slots (the sliding
# window's default) 2.542 / 4.817 / 8.870 / 8.638 / 2.824; one compute warpgroup 3.027 / 5.818 / 10.661 / 10.661 /
# 3.223 (benchmarks/results/check_block_sparse_mgpu_h200.txt).
DEFAULT_BACKWARD_BLOCKS = MosaicBackwardBlocks(num_slots=2)

# 128-byte swizzled tiles of 8 rows, the layout wgmma reads (as in the forward).
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _copy_table_rows(src, dst, barrier):
    """Bulk copy of contiguous int32 table rows (widths are powers of two >= 4: whole 16-byte units), which
    takes any width (the tiled TMA path stops at 256 elements a dimension)."""
    plgpu.copy_gmem_to_smem(src, dst, barrier, oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)


def _compute_registers(blocks):
    if blocks.compute_wgs > 1:
        budget = 65536 // 128 - MEMORY_WG_REGISTERS
        plgpu.set_max_registers(budget // blocks.compute_wgs // 8 * 8, action="increase")


def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                row_smem, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, row_full, kv_full, q_full,
                do_full, lse_full, delta_full, free, *, blocks, scale, causal_offset, per_batch, groups, width,
                on_gpu):
    bq, bk, slots, cw = blocks.block_q, blocks.block_k, blocks.num_slots, blocks.compute_wgs
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("wg")
    k_tile = lax.axis_index("k_tiles")

    def walk():
        """(count, unmasked_lo, unmasked_hi, first entry n) of each query head of the group, from the rows."""
        out, base = [], jnp.int32(0)
        for g in range(groups):
            count = row_smem[g * width]
            out.append((count, row_smem[g * width + 1], row_smem[g * width + 2], base))
            base = base + count
        return out, base

    def slot_of(n):
        return lax.rem(n, jnp.int32(slots))

    @pl.when(wg == cw)
    def _memory_warpgroup():
        if cw > 1:
            plgpu.set_max_registers(MEMORY_WG_REGISTERS, action="decrease")
        _copy_table_rows(table_ref.at[batch if per_batch else 0, kv_head, k_tile], row_smem, row_full)
        plgpu.barrier_wait(row_full)
        heads, total = walk()
        for g, (count, _, _, base) in enumerate(heads):  # static: the query heads sharing this kv head
            head = kv_head * groups + g

            @pl.loop(0, count)
            def _stream(t):
                n = base + t
                slot = slot_of(n)

                @pl.when(n >= slots)  # the slot held entry n - slots: wait until every compute warpgroup read it
                def _():
                    plgpu.barrier_wait(free.at[slot])

                qb = row_smem[g * width + tables.HEADER + t]
                rows = pl.ds(qb * bq, bq)
                plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[slot], q_full.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], lse_full.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[slot], do_full.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot],
                                        delta_full.at[slot])

        # Observe the last releases too (every barrier phase seen; the interpreter checks it).
        @pl.loop(jnp.maximum(total - slots, 0), total)
        def _drain(n):
            plgpu.barrier_wait(free.at[slot_of(n)])

    @pl.when(wg < cw)
    def _compute_warpgroup():
        _compute_registers(blocks)
        k_start = k_tile * blocks.keys_per_program + wg * bk
        keys = (batch, pl.ds(k_start, bk), kv_head)
        k_own, v_own = k_smem.at[wg], v_smem.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_own, kv_full.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_own, kv_full.at[wg + cw])
        plgpu.barrier_wait(row_full)  # every warpgroup reads the same rows: same counts, same slots
        heads, _ = walk()
        plgpu.barrier_wait(kv_full.at[wg])
        plgpu.barrier_wait(kv_full.at[wg + cw])
        factor = scale * LOG2E  # base-2 logits are raw products times factor, as in the forward

        def step(t, carry, g, base, masked):
            dk, dv = carry
            slot = slot_of(base + t)
            q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
            plgpu.barrier_wait(q_full.at[slot])

            def k_qt(acc_ref):
                plgpu.wgmma(acc_ref, k_own, q_tile.transpose((1, 0)))
                return acc_ref[...]

            st = pl.run_scoped(k_qt, plgpu.ACC((bk, bq), jnp.float32))
            if masked:  # the causal rule key <= query + offset, tiles transposed [keys, queries]
                qb = row_smem[g * width + tables.HEADER + t]
                keys_ = k_start + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0, layout=plgpu.Layout.WGMMA)
                queries = qb * bq + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 1, layout=plgpu.Layout.WGMMA)
                st = jnp.where(keys_ <= queries + causal_offset, st, -jnp.inf)
            plgpu.barrier_wait(lse_full.at[slot])
            lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            pt = jnp.exp2(st * factor - lax.broadcast_in_dim(lse, st.shape, [1]))
            plgpu.barrier_wait(do_full.at[slot])
            dv = _add_product(dv, pt.astype(dtype), do_tile, on_gpu)

            def v_dot(acc_ref):
                plgpu.wgmma(acc_ref, v_own, do_tile.transpose((1, 0)))
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
        for g, (count, lo, hi, base) in enumerate(heads):
            walk_step = functools.partial(step, g=g, base=base)
            if causal_offset is None:
                carry = lax.fori_loop(0, count, functools.partial(walk_step, masked=False), carry)
            else:  # the column tables' unmasked run is a suffix: masked entries come first
                carry = lax.fori_loop(0, lo, functools.partial(walk_step, masked=True), carry)
                carry = lax.fori_loop(lo, hi, functools.partial(walk_step, masked=False), carry)
                carry = lax.fori_loop(hi, count, functools.partial(walk_step, masked=True), carry)
        dk, dv = carry
        # The k and v tiles are read for the last time above: reuse them to stage the outputs.
        k_own[...] = (dk * scale).astype(dtype)
        v_own[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_own, dk_ref.at[keys])
        plgpu.copy_smem_to_gmem(v_own, dv_ref.at[keys])
        plgpu.wait_smem_to_gmem(0)


def group_columns(col_tables, kv_heads):
    """Column tables [b|1, h, k_tiles, width] -> [b|1, hkv, k_tiles, groups * width]: the rows of the query heads
    sharing a kv head side by side, so that one contiguous copy brings a dk/dv program all of its rows."""
    b, h, kt, width = col_tables.shape
    grouped = col_tables.reshape(b, kv_heads, h // kv_heads, kt, width).transpose(0, 1, 3, 2, 4)
    return grouped.reshape(b, kv_heads, kt, h // kv_heads * width)


def dkv(q, k, v, do, lse, delta, col_tables, *, scale, causal_offset,
        blocks: MosaicBackwardBlocks = DEFAULT_BACKWARD_BLOCKS, interpret=None):
    """q/do [b, sq, h, d], k/v [b, sk, hkv, d], lse/delta [b, h, sq] float32, col_tables [b|1, h, sk /
    keys_per_program, width] int32 over tiles of ``blocks.block_q`` queries by ``blocks.keys_per_program`` keys
    -> (dk, dv) like k, v. ``d`` 64 or 128; rows that saw no key must carry PAD_LSE (as the forwards write)."""
    blocks.validate()
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if sq % blocks.block_q or sk % blocks.keys_per_program:
        raise ValueError(f"q length {sq} must be a multiple of block_q={blocks.block_q} and kv length {sk} of "
                         f"{blocks.keys_per_program} (keys per program)")
    if d not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128 here (padded by ops), got {d}")
    width = col_tables.shape[-1]
    grouped = group_columns(col_tables, hkv)
    cw, slots = blocks.compute_wgs, blocks.num_slots
    scratch = [
        plgpu.SMEM((grouped.shape[-1],), jnp.int32),  # the column rows of the group's query heads
        plgpu.SMEM((cw, blocks.block_k, d), k.dtype, transforms=_TRANSFORMS),  # k in, then dk out
        plgpu.SMEM((cw, blocks.block_k, d), v.dtype, transforms=_TRANSFORMS),  # v in, then dv out
        plgpu.SMEM((slots, blocks.block_q, d), q.dtype, transforms=_TRANSFORMS),
        plgpu.SMEM((slots, blocks.block_q, d), do.dtype, transforms=_TRANSFORMS),
        plgpu.SMEM((slots, blocks.block_q), jnp.float32),
        plgpu.SMEM((slots, blocks.block_q), jnp.float32),
        plgpu.Barrier(),  # the table rows (every warpgroup waits on it)
        plgpu.Barrier(num_barriers=2 * cw),  # k, v of each compute warpgroup
        plgpu.Barrier(num_barriers=slots),  # q
        plgpu.Barrier(num_barriers=slots),  # do
        plgpu.Barrier(num_barriers=slots),  # lse
        plgpu.Barrier(num_barriers=slots),  # delta
        plgpu.Barrier(num_arrivals=cw, num_barriers=slots),  # slot free
    ]
    kernel = functools.partial(_dkv_kernel, blocks=blocks, scale=scale, causal_offset=causal_offset,
                               per_batch=col_tables.shape[0] > 1, groups=h // hkv, width=width,
                               on_gpu=interpret is None)
    return plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_types=scratch,
        grid=(hkv, sk // blocks.keys_per_program, b),
        grid_names=("kv_heads", "k_tiles", "batch"),
        num_threads=cw + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(grouped, q, k, v, do, lse, delta)


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               row_smem, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, row_full, rows_full, k_full,
               v_full, free, *, blocks, scale, causal_offset, per_batch, groups, on_gpu):
    bq, bk, slots, cw = blocks.block_q, blocks.block_k, blocks.num_slots, blocks.compute_wgs
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    q_tile = lax.axis_index("q_tiles")

    def slot_of(j):
        return lax.rem(j, jnp.int32(slots))

    @pl.when(wg == cw)
    def _memory_warpgroup():
        if cw > 1:
            plgpu.set_max_registers(MEMORY_WG_REGISTERS, action="decrease")
        _copy_table_rows(table_ref.at[batch if per_batch else 0, head, q_tile], row_smem, row_full)
        plgpu.barrier_wait(row_full)
        count = row_smem[0]
        kv_head = lax.div(head, jnp.int32(groups))

        @pl.loop(0, count)
        def _stream(j):
            slot = slot_of(j)

            @pl.when(j >= slots)  # the slot is reused: wait until every compute warpgroup read it
            def _():
                plgpu.barrier_wait(free.at[slot])

            kb = row_smem[tables.HEADER + j]
            rows = (batch, pl.ds(kb * bk, bk), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])

        @pl.loop(jnp.maximum(count - slots, 0), count)
        def _drain(j):
            plgpu.barrier_wait(free.at[slot_of(j)])

    @pl.when(wg < cw)
    def _compute_warpgroup():
        _compute_registers(blocks)
        q_start = q_tile * blocks.rows_per_program + wg * bq
        rows = (batch, pl.ds(q_start, bq), head)
        q_own, do_own = q_smem.at[wg], do_smem.at[wg]
        # Four copies, four barriers: one barrier per copy (its expected bytes are per copy).
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_own, rows_full.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_own, rows_full.at[cw + wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, pl.ds(q_start, bq)], lse_smem.at[wg],
                                rows_full.at[2 * cw + wg])
        plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, pl.ds(q_start, bq)], delta_smem.at[wg],
                                rows_full.at[3 * cw + wg])
        plgpu.barrier_wait(row_full)  # every warpgroup reads the same row: same count, same slots
        count, lo, hi = row_smem[0], row_smem[1], row_smem[2]
        for i in range(4):
            plgpu.barrier_wait(rows_full.at[i * cw + wg])
        lse = plgpu.load(lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        delta = plgpu.load(delta_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        factor = scale * LOG2E

        def step(j, dq, masked):
            slot = slot_of(j)
            k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
            plgpu.barrier_wait(k_full.at[slot])

            def q_kt(acc_ref):
                plgpu.wgmma(acc_ref, q_own, k_tile.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(q_kt, plgpu.ACC((bq, bk), jnp.float32))
            if masked:  # the causal rule key <= query + offset
                kb = row_smem[tables.HEADER + j]
                rows_ = q_start + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
                cols = kb * bk + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(cols <= rows_ + causal_offset, s, -jnp.inf)
            p = jnp.exp2(s * factor - lax.broadcast_in_dim(lse, s.shape, [0]))
            plgpu.barrier_wait(v_full.at[slot])

            def do_vt(acc_ref):
                plgpu.wgmma(acc_ref, do_own, v_tile.transpose((1, 0)))
                return acc_ref[...]

            dp = pl.run_scoped(do_vt, plgpu.ACC((bq, bk), jnp.float32))
            ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
            dq = _add_product(dq, ds.astype(dtype), k_tile, on_gpu)
            plgpu.barrier_arrive(free.at[slot])
            return dq

        dq = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        if causal_offset is None:
            dq = lax.fori_loop(0, count, functools.partial(step, masked=False), dq)
        else:  # the row tables' unmasked run is a prefix: masked entries come last
            dq = lax.fori_loop(0, lo, functools.partial(step, masked=True), dq)
            dq = lax.fori_loop(lo, hi, functools.partial(step, masked=False), dq)
            dq = lax.fori_loop(hi, count, functools.partial(step, masked=True), dq)
        q_own[...] = (dq * scale).astype(dtype)  # q is read for the last time above: stage dq there
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_own, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)


def dq(q, k, v, do, lse, delta, row_tables, *, scale, causal_offset,
       blocks: MosaicBackwardBlocks = DEFAULT_BACKWARD_BLOCKS, interpret=None):
    """The dq pass: arguments as ``dkv``, with row_tables [b|1, h, sq / rows_per_program, width] over tiles of
    ``blocks.rows_per_program`` queries by ``blocks.block_k`` keys. Returns dq like q."""
    mosaic_gpu_forward.check_row_pass(q, k, row_tables, blocks)
    b, sq, h, d = q.shape
    cw, slots = blocks.compute_wgs, blocks.num_slots
    scratch = [
        plgpu.SMEM((row_tables.shape[-1],), jnp.int32),  # the program's table row
        plgpu.SMEM((cw, blocks.block_q, d), q.dtype, transforms=_TRANSFORMS),  # q in, then dq out
        plgpu.SMEM((cw, blocks.block_q, d), do.dtype, transforms=_TRANSFORMS),
        plgpu.SMEM((cw, blocks.block_q), jnp.float32),
        plgpu.SMEM((cw, blocks.block_q), jnp.float32),
        plgpu.SMEM((slots, blocks.block_k, d), k.dtype, transforms=_TRANSFORMS),
        plgpu.SMEM((slots, blocks.block_k, d), v.dtype, transforms=_TRANSFORMS),
        plgpu.Barrier(),  # the table row (every warpgroup waits on it)
        plgpu.Barrier(num_barriers=4 * cw),  # q, do, lse, delta of each compute warpgroup
        plgpu.Barrier(num_barriers=slots),  # k
        plgpu.Barrier(num_barriers=slots),  # v
        plgpu.Barrier(num_arrivals=cw, num_barriers=slots),  # slot free
    ]
    kernel = functools.partial(_dq_kernel, blocks=blocks, scale=scale, causal_offset=causal_offset,
                               per_batch=row_tables.shape[0] > 1, groups=h // k.shape[2],
                               on_gpu=interpret is None)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=scratch,
        grid=(h, sq // blocks.rows_per_program, b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=cw + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(row_tables, q, k, v, do, lse, delta)


def backward(q, k, v, do, lse, delta, row_tables, col_tables, *, scale, causal_offset, blocks, interpret):
    """(dq, dk, dv) from the two Mosaic GPU passes; ``interpret=True`` runs them in Pallas' GPU interpreter."""
    mosaic_interpret = plgpu.InterpretGPUParams() if interpret is True else (interpret or None)
    common = dict(scale=scale, causal_offset=causal_offset, blocks=blocks, interpret=mosaic_interpret)
    dq_ = dq(q, k, v, do, lse, delta, row_tables, **common)
    dk, dv = dkv(q, k, v, do, lse, delta, col_tables, **common)
    return dq_, dk, dv
