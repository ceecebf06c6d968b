"""Backward tile algebra and kernel bodies of the chunked vector-gate (GLA) recurrence, shared by GPU and TPU.

With ``dh`` the gradient of the state leaving a chunk (from the reverse "dstate pass") and ``h`` the state entering
it (from the forward state pass), one chunk's gradients follow from the two lines in ``vector_gate_forward``:

  dq_t  = exp(cum_t) * (do_t h^T)       + sum_{s <= t} dA_ts k_s * exp(cum_t - cum_s)
  dk_s  = exp(last - cum_s) * (v_s dh^T) + sum_{t >= s} dA_ts q_t * exp(cum_t - cum_s)
  dv_s  = (k_s * exp(last - cum_s)) dh   + sum_{t >= s} A_ts do_t,          dA_ts = do_t . v_s
  dh_in = exp(last)^T * dh + (q * exp(cum))^T do

and for the gates, per key dimension, ``dcum_t = q_t * dq_t - k_t * dk_t`` (each cum_t enters with q_t as
exp(+cum_t) and with k_t as exp(-cum_t)) plus, at the chunk's last step,
``dlast = exp(last) * rowsum(h * dh) + sum_s k_s * exp(last - cum_s) * (v_s dh^T)``.
The sub-chunk split is the forward's: a bounded matmul between sub-chunks, and inside one either the same
matmul factored through the reference row (``FACTORED_SPAN``) or an elementwise loop.

``backward_kernel`` does it all in one program per chunk, forming A and dA in registers; inside a sub-chunk the
loop takes three cross-thread reductions per column. With ``VectorGateConfig.scores_kernel`` the work is split as in
fla's GLA backward: the forward's A is kept, ``dscores_kernel`` writes dA and its transpose,
``intra_gradients_kernel`` adds the terms of dq and dk from inside the chunk (two whole-chunk matmuls where the
chunk's gates allow, else per sub-chunk, reading columns of dA inside one: step j updates dq of rows t >= j and dk
of rows s <= j, elementwise), and ``inter_gradients_kernel`` adds the terms through the states and forms dv and
dcum with whole-chunk matmuls.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.linear_recurrent.vector_gate_forward import (
    FACTORED_SPAN,
    causal_product,
    earlier_keys,
    exp,
    lower_triangle,
    make_dot,
    masked_decay,
    midpoint_factors,
    pow2_at_least,
    span,
    whole_chunk_or_sub_chunks,
)


def previous_dstate(dstate, q, dout, cum, last, dot):
    """The gradient of the state entering a chunk from that of the state leaving it: dstate [bk, bv] float32."""
    q_in = (q * exp(cum)).astype(q.dtype)
    return exp(last).T * dstate + dot(q_in, dout, trans_a=True)


def diagonal_backward(q_sub, k_sub, cum_sub, dscores, k_ref, cum_ref, start):
    """Inside the sub-chunk at rows [start, start + sub): (scores A [sub, sub], dq [sub, dk], dk [sub, dk]) given
    dscores = dout_sub v_sub^T; one column s = j per loop step, exp(cum_t - cum_j) only for t >= j."""
    sub = q_sub.shape[0]
    acc = cum_sub.dtype
    q_sub = q_sub.astype(acc)
    rows = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
    cols = lax.broadcasted_iota(jnp.int32, (sub, sub), 1)

    def column(j, carry):
        scores, dq, dk = carry
        k_j = k_ref[pl.ds(start + j, 1), :].astype(acc)
        decay = masked_decay(cum_sub, cum_ref[pl.ds(start + j, 1), :], rows >= j)  # [sub, dk], rows t >= j
        scores = jnp.where(cols == j, jnp.sum(q_sub * k_j * decay, axis=1, keepdims=True), scores)
        dscore_j = jnp.sum(jnp.where(cols == j, dscores, 0.0), axis=1, keepdims=True)  # dA[:, j]
        dq = dq + dscore_j * k_j * decay
        dk = jnp.where(rows == j, jnp.sum(dscore_j * q_sub * decay, axis=0, keepdims=True), dk)
        return scores, dq, dk

    zeros = jnp.zeros(k_sub.shape, acc)
    return lax.fori_loop(0, sub, column, (jnp.zeros((sub, sub), acc), zeros, zeros))


def through_states(k_sub, v_sub, dout_sub, cum_sub, last, state, dstate, dot):
    """The sub-chunk's gradients through the states entering (``state``) and leaving (``dstate``) the chunk:
    (dq, dk, dv, the rows' share of dlast)."""
    dq = exp(cum_sub) * dot(dout_sub, state, trans_b=True)
    to_end = exp(last - cum_sub)
    dk = to_end * dot(v_sub, dstate, trans_b=True)
    dv = dot((k_sub * to_end).astype(k_sub.dtype), dstate)
    return dq, dk, dv, jnp.sum(k_sub * dk, axis=0, keepdims=True)


def write_rows(out_refs, rows, q_sub, k_sub, dq, dk, dv, dlast=None, closing=None):
    """Stores the sub-chunk's dq, dk, dv and dcum = q dq - k dk; for the chunk's last sub-chunk ``closing`` =
    (last, state, dstate) adds the gradient of ``last`` (``dlast`` summed over the chunk) to its last row."""
    dq_ref, dk_ref, dv_ref, dcum_ref = out_refs
    dcum = q_sub * dq - k_sub * dk
    if closing is not None:
        last, state, dstate = closing
        row_sums = jnp.sum(state.astype(last.dtype) * dstate.astype(last.dtype), axis=1, keepdims=True)  # [dk, 1]
        dlast += exp(last) * row_sums.T
        dcum += jnp.where(lax.broadcasted_iota(jnp.int32, (dcum.shape[0], 1), 0) == dcum.shape[0] - 1, dlast, 0.0)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    dcum_ref[rows, :] = dcum.astype(dcum_ref.dtype)


def dscores_kernel(v_ref, dout_ref, dscores_ref, dscores_t_ref):
    """One chunk's dA_ts = do_t . v_s for s <= t (zero above the diagonal) and its transpose: [C, C] each, in the
    accumulation dtype (the loops inside sub-chunks read them unrounded)."""
    dot = make_dot(v_ref.dtype)
    v, dout = v_ref[...], dout_ref[...]
    lower = lower_triangle(v.shape[0])
    dscores_ref[...] = jnp.where(lower, dot(dout, v, trans_b=True), 0.0).astype(dscores_ref.dtype)
    dscores_t_ref[...] = jnp.where(lower.T, dot(v, dout, trans_b=True), 0.0).astype(dscores_t_ref.dtype)


def diagonal_gradients(q_ref, k_ref, cum_ref, dscores_ref, dscores_t_ref, start, sub):
    """Inside the sub-chunk at rows [start, start + sub): (dq [sub, dk], dk [sub, dk]) from columns of dA and dA^T.
    Step j adds dA_tj k_j exp(cum_t - cum_j) to the rows t >= j of dq and dA_js q_j exp(cum_j - cum_s) to the rows
    s <= j of dk: elementwise, no reductions."""
    rows = pl.ds(start, sub)
    cum_sub = cum_ref[rows, :]
    acc = cum_sub.dtype
    row_ids = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)

    def step(j, carry):
        dq, dk = carry
        at_j = pl.ds(start + j, 1)
        cum_j = cum_ref[at_j, :]
        dq += dscores_ref[rows, at_j] * k_ref[at_j, :].astype(acc) * masked_decay(cum_sub, cum_j, row_ids >= j)
        dk += dscores_t_ref[rows, at_j] * q_ref[at_j, :].astype(acc) * masked_decay(cum_j, cum_sub, row_ids <= j)
        return dq, dk

    zeros = jnp.zeros(cum_sub.shape, acc)
    return lax.fori_loop(0, sub, step, (zeros, zeros))


def sub_chunk_intra_gradients(q_ref, k_ref, cum_ref, dscores_ref, dscores_t_ref, start, sub):
    """The terms of dq and dk from inside the chunk for the rows [start, start + sub) ([sub, dk] each): q/k/cum the
    whole chunk [C, dk], dscores/dscores_t its dA and dA^T [C, C] (zero above / below the diagonal). dq from the
    columns up to this sub-chunk's, referenced to the step before it; dk from the rows from this sub-chunk's on,
    referenced to its last step: each one masked matmul over the whole chunk that takes this sub-chunk's own block
    too when its span allows (``FACTORED_SPAN``), else stops at it and ``diagonal_gradients`` adds that block."""
    chunk = q_ref.shape[0]
    dtype = q_ref.dtype
    dot = make_dot(dtype)
    rows = pl.ds(start, sub)
    cum_sub = cum_ref[rows, :]
    # For the first sub-chunk any row at or before it is a valid reference.
    before_ref = cum_ref[pl.ds(jnp.maximum(start - 1, 0), 1), :]
    after_ref = cum_ref[pl.ds(start + sub - 1, 1), :]
    row_ids = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)

    def gradients(first_later, last_earlier):
        """dq from the keys at steps < last_earlier, dk from the queries at steps >= first_later."""
        keys = earlier_keys(k_ref[...], cum_ref[...], before_ref, last_earlier).astype(dtype)
        dq = exp(cum_sub - before_ref) * dot(dscores_ref[rows, :].astype(dtype), keys)
        later = row_ids >= first_later
        q_hat = jnp.where(later, q_ref[...] * masked_decay(cum_ref[...], after_ref, later), 0.0).astype(dtype)
        dk = exp(after_ref - cum_sub) * dot(dscores_ref[:, rows].astype(dtype), q_hat, trans_a=True)
        return dq, dk

    def looped():
        dq, dk = gradients(start + sub, start)
        dq_diag, dk_diag = diagonal_gradients(q_ref, k_ref, cum_ref, dscores_ref, dscores_t_ref, start, sub)
        return dq + dq_diag, dk + dk_diag

    widest = jnp.maximum(span(cum_sub, before_ref), span(cum_sub, after_ref))
    return lax.cond(widest <= FACTORED_SPAN, lambda: gradients(start, start + sub), looped)


def intra_gradients_kernel(q_ref, k_ref, cum_ref, dscores_ref, dscores_t_ref, dq_ref, dk_ref, *, sub):
    """The terms of dq and dk from inside one chunk ([C, dk] each; inputs as ``sub_chunk_intra_gradients``). Where
    the chunk's gates span at most ``FACTORED_SPAN`` nats, two matmuls referenced to their midpoint mid
    (``whole_chunk_or_sub_chunks``): dq = exp(cum - mid) * (dA (k exp(mid - cum))) and
    dk = exp(mid - cum) * (dA^T (q exp(cum - mid))); otherwise sub-chunk by sub-chunk."""
    chunk = q_ref.shape[0]
    dtype = q_ref.dtype

    def whole_chunk(mid):
        dot = make_dot(dtype)
        cum = cum_ref[...]
        # midpoint_factors' factors, each product formed where it is used: Triton then stages one operand at a
        # time (32 KB of shared memory against 48).
        up, down = exp(cum - mid), exp(mid - cum)
        dq_ref[...] = (up * dot(dscores_ref[...].astype(dtype), (k_ref[...] * down).astype(dtype))).astype(
            dq_ref.dtype)
        dk_ref[...] = (down * dot(dscores_t_ref[...].astype(dtype), (q_ref[...] * up).astype(dtype))).astype(
            dk_ref.dtype)

    def by_sub_chunks():
        @pl.loop(0, chunk, step=sub)
        def _(start):
            dq, dk = sub_chunk_intra_gradients(q_ref, k_ref, cum_ref, dscores_ref, dscores_t_ref, start, sub)
            dq_ref[pl.ds(start, sub), :] = dq.astype(dq_ref.dtype)
            dk_ref[pl.ds(start, sub), :] = dk.astype(dk_ref.dtype)

    whole_chunk_or_sub_chunks(cum_ref, whole_chunk, by_sub_chunks)


def inter_gradients_kernel(q_ref, k_ref, v_ref, cum_ref, state_ref, dstate_ref, dout_ref, scores_ref,
                           dq_intra_ref, dk_intra_ref, dq_ref, dk_ref, dv_ref, dcum_ref):
    """``backward_kernel``'s results from the forward's scores A [C, C] and ``intra_gradients_kernel``'s terms,
    whole-chunk matmuls only: dq, dk through the states (plus the intra terms, which span all of dv, in the first
    dv block's partials), dv = (k exp(last - cum)) dh + A^T dO, dcum."""
    chunk = q_ref.shape[0]
    dtype = q_ref.dtype
    dot = make_dot(dtype)
    last = cum_ref[pl.ds(chunk - 1, 1), :]
    state, dstate = state_ref[...].astype(dtype), dstate_ref[...].astype(dtype)
    dq, dk, dv, dlast = through_states(k_ref[...], v_ref[...], dout_ref[...], cum_ref[...], last, state, dstate,
                                       dot)
    dv += dot(scores_ref[...].astype(dtype), dout_ref[...], trans_a=True)
    first_block = pl.program_id(3) == 0
    dq += jnp.where(first_block, dq_intra_ref[...], 0.0)
    dk += jnp.where(first_block, dk_intra_ref[...], 0.0)
    write_rows((dq_ref, dk_ref, dv_ref, dcum_ref), pl.ds(0, chunk), q_ref[...], k_ref[...], dq, dk, dv, dlast,
               (last, state, dstate))


def backward_kernel(q_ref, k_ref, v_ref, cum_ref, state_ref, dstate_ref, dout_ref,
                    dq_ref, dk_ref, dv_ref, dcum_ref, *, sub):
    """One chunk, one dv block: dq, dk and dcum are this block's partials (summed over dv blocks by the caller),
    dv is exact. q/k/cum/dq/dk/dcum [C, dk], v/dout/dv [C, bv], state/dstate [dk, bv]. The terms through the
    states, then those from inside the chunk: when the chunk's gates span at most ``FACTORED_SPAN`` nats,
    whole-chunk matmuls referenced to their midpoint (``midpoint_factors``, as ``intra_gradients_kernel``);
    otherwise per sub-chunk, factored as in ``sub_chunk_intra_gradients`` when the sub-chunk's span allows, else
    from the earlier and later sub-chunks plus ``diagonal_backward``."""
    chunk = q_ref.shape[0]
    dtype = q_ref.dtype
    dot = make_dot(dtype)
    last = cum_ref[pl.ds(chunk - 1, 1), :]
    state, dstate = state_ref[...].astype(dtype), dstate_ref[...].astype(dtype)

    def whole_chunk(mid):
        q, k, v, dout, cum = (r[...] for r in (q_ref, k_ref, v_ref, dout_ref, cum_ref))
        dq, dk, dv, dlast = through_states(k, v, dout, cum, last, state, dstate, dot)
        up, down, q_up, k_down = midpoint_factors(q, k, cum, mid)
        dscores = causal_product(dout, v, dot).astype(dtype)
        dq += up * dot(dscores, k_down)
        dk += down * dot(dscores, q_up, trans_a=True)
        dv += dot(causal_product(q_up, k_down, dot).astype(dtype), dout, trans_a=True)
        write_rows((dq_ref, dk_ref, dv_ref, dcum_ref), pl.ds(0, chunk), q, k, dq, dk, dv, dlast, (last, state, dstate))

    def by_sub_chunks():
        dlast = jnp.zeros_like(last)
        n_sub = chunk // sub
        # Tiles are read from their refs where they are used (no whole-chunk tile stays live across sub-chunks), and
        # the products with earlier / later sub-chunks take only the rows those need, rounded up to a power of two.
        for m in range(n_sub):
            start = m * sub
            rows = pl.ds(start, sub)
            q_sub, k_sub, v_sub, dout_sub, cum_sub = (r[rows, :] for r in (q_ref, k_ref, v_ref, dout_ref, cum_ref))
            dq, dk, dv, dlast_rows = through_states(k_sub, v_sub, dout_sub, cum_sub, last, state, dstate, dot)
            dlast += dlast_rows
            # For the first sub-chunk any row at or before it is a valid reference.
            before_ref = cum_ref[pl.ds(max(start - 1, 0), 1), :]
            after_ref = cum_ref[pl.ds(start + sub - 1, 1), :]

            def factored():  # traced by lax.cond below, in this iteration
                # dq: the columns up to this sub-chunk's end (dA masked to s <= t), referenced to the step before it.
                upto = pl.ds(0, pow2_at_least(start + sub))
                dscores = dot(dout_sub, v_ref[upto, :], trans_b=True)
                causal = (lax.broadcasted_iota(jnp.int32, dscores.shape, 1)
                          <= start + lax.broadcasted_iota(jnp.int32, dscores.shape, 0))
                keys = earlier_keys(k_ref[upto, :], cum_ref[upto, :], before_ref, start + sub).astype(dtype)
                dq = exp(cum_sub - before_ref) * dot(jnp.where(causal, dscores, 0.0).astype(dtype), keys)
                # dk, dv: the rows from this sub-chunk's start on (t >= s), referenced to its last step.
                first = chunk - pow2_at_least(chunk - start)
                later = pl.ds(first, chunk - first)
                row_ids = first + lax.broadcasted_iota(jnp.int32, (chunk - first, 1), 0)
                keep = row_ids >= start
                q_hat = jnp.where(keep, q_ref[later, :] * masked_decay(cum_ref[later, :], after_ref, keep), 0.0)
                q_hat = q_hat.astype(dtype)
                from_ref = exp(after_ref - cum_sub)
                causal = row_ids >= start + lax.broadcasted_iota(jnp.int32, (1, sub), 1)  # [later rows, sub]
                dout_later = dout_ref[later, :]
                dscores = jnp.where(causal, dot(dout_later, v_sub, trans_b=True), 0.0)
                dk = from_ref * dot(dscores.astype(dtype), q_hat, trans_a=True)
                scores = jnp.where(causal, dot(q_hat, (k_sub * from_ref).astype(dtype), trans_b=True), 0.0)
                return dq, dk, dot(scores.astype(dtype), dout_later, trans_a=True)

            def looped():
                scores, dq, dk = diagonal_backward(q_sub, k_sub, cum_sub, dot(dout_sub, v_sub, trans_b=True),
                                                   k_ref, cum_ref, start)
                dv = dot(scores.astype(dtype), dout_sub, trans_a=True)
                if start:  # earlier sub-chunks (columns) -> these rows: dq
                    earlier = pl.ds(0, pow2_at_least(start))
                    dscores = dot(dout_sub, v_ref[earlier, :], trans_b=True)  # columns from `start` on meet zero keys
                    keys = earlier_keys(k_ref[earlier, :], cum_ref[earlier, :], before_ref, start).astype(dtype)
                    dq += exp(cum_sub - before_ref) * dot(dscores.astype(dtype), keys)
                if start + sub < chunk:  # these columns -> later sub-chunks' rows: dk, dv
                    first = chunk - pow2_at_least(chunk - start - sub)
                    later = pl.ds(first, chunk - first)
                    after = first + lax.broadcasted_iota(jnp.int32, (chunk - first, 1), 0) >= start + sub
                    q_hat = jnp.where(after, q_ref[later, :] * masked_decay(cum_ref[later, :], after_ref, after), 0.0)
                    q_hat = q_hat.astype(dtype)
                    from_ref = exp(after_ref - cum_sub)
                    dout_later = dout_ref[later, :]
                    dscores = dot(dout_later, v_sub, trans_b=True)  # rows before `start + sub` meet zero queries
                    dk += from_ref * dot(dscores.astype(dtype), q_hat, trans_a=True)
                    scores = dot(q_hat, (k_sub * from_ref).astype(dtype), trans_b=True)
                    dv += dot(scores.astype(dtype), dout_later, trans_a=True)
                return dq, dk, dv

            widest = jnp.maximum(span(cum_sub, before_ref), span(cum_sub, after_ref))
            dq_intra, dk_intra, dv_intra = lax.cond(widest <= FACTORED_SPAN, factored, looped)
            write_rows((dq_ref, dk_ref, dv_ref, dcum_ref), rows, q_sub, k_sub, dq + dq_intra, dk + dk_intra,
                       dv + dv_intra, dlast, (last, state, dstate) if m == n_sub - 1 else None)

    whole_chunk_or_sub_chunks(cum_ref, whole_chunk, by_sub_chunks)
