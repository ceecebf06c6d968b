"""Forward tile algebra and kernel bodies of the chunked vector-gate (GLA) recurrence, shared by GPU and TPU.

``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` with one log gate per key dimension. Inside a chunk,
``cum`` [C, dk] is the inclusive cumulative log gate from the chunk start (<= 0, non-increasing down each column),
``last`` [1, dk] its last row and ``h`` [dk, dv] the state entering the chunk:

  o_t   = (q_t * exp(cum_t)) h  +  sum_{s <= t} A_ts v_s,   A_ts = sum_d q_td k_sd exp(cum_td - cum_sd)
  h_out = exp(last)^T * h  +  (k * exp(last - cum))^T v

Only differences ``cum_t - cum_s`` with s at or before t are exponentiated, so every exponent is <= 0. ``A`` cannot
be one matmul with a single reference row (q * exp(cum - r) and k * exp(r - cum) are both bounded only for r
between s and t), so the chunk is cut into sub-chunks: across sub-chunks the reference is the cumulative gate at
the last step before the later sub-chunk (a bounded matmul); inside the diagonal sub-chunk the loop over its
columns computes ``exp(cum_t - cum_s)`` elementwise ([sub, dk] per column), as fla's GLA kernels do.

Every kernel first tries the diagonal block as part of the matmul: ``exp(cum_t - cum_s) = exp(cum_t - r)
exp(r - cum_s)`` with r the reference row holds for every pair, and it is the bounded product above whenever r
lies between them; inside the sub-chunk one factor exceeds 1, by at most ``exp(span)``, span the largest
|cum_t - r| over the sub-chunk's rows. When span <= ``FACTORED_SPAN`` the factors stay far inside the float32 /
bfloat16 range (both reach e^88) and the sub-chunk's rows take one masked matmul (``lax.cond``, per sub-chunk);
otherwise (on average a gate below e^(-60 / sub) a step in some dimension) they take the column loop. For bf16
inputs the diagonal block's factors are then rounded to bf16 like the other blocks' operands. Before the sub-chunks,
every kernel tries the whole chunk the same way (``whole_chunk_or_sub_chunks``, ``midpoint_factors``):
referenced to the midpoint of the chunk's gates, A is one masked matmul when they span at most ``FACTORED_SPAN``
nats (both factors at most e^30), the rule for the paper's gates.

``dot(a, b, trans_a, trans_b)`` accumulates in float32 (float64 for float64); matmul operands are cast to the input
dtype first, so bf16 inputs run bf16 matmuls while the state, gates and accumulations stay float32.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.linear_recurrent.chunk_math import acc_dtype, exp, make_dot  # noqa: F401 (used by the builds)


# The largest span of the gates inside a sub-chunk for which its scores factor through one reference row.
FACTORED_SPAN = 60.0


def masked_decay(cum_rows, cum_ref_row, keep):
    """exp(cum_rows - cum_ref_row) where ``keep``, else 0; masked before the exp."""
    return jnp.where(keep, exp(jnp.where(keep, cum_rows - cum_ref_row, 0.0)), 0.0)


def next_state(state, k, v, cum, last, dot):
    """The state leaving a chunk: state [bk, bv] float32, k [C, bk], v [C, bv], cum [C, bk], last [1, bk]."""
    k_out = (k * exp(last - cum)).astype(k.dtype)
    return exp(last).T * state + dot(k_out, v, trans_a=True)


def diagonal_scores(q_sub, cum_sub, k_ref, cum_ref, start, width=None):
    """A_ts for t, s inside the sub-chunk at rows [start, start + sub): [sub, sub], zero above the diagonal; with
    ``width`` (the chunk), [sub, width] with those scores in columns [start, start + sub) and zeros elsewhere."""
    sub = q_sub.shape[0]
    q_sub = q_sub.astype(cum_sub.dtype)
    rows = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
    cols = lax.broadcasted_iota(jnp.int32, (sub, width or sub), 1) - (0 if width is None else start)

    def column(j, scores):
        k_j = k_ref[pl.ds(start + j, 1), :].astype(cum_sub.dtype)
        decay = masked_decay(cum_sub, cum_ref[pl.ds(start + j, 1), :], rows >= j)
        return jnp.where(cols == j, jnp.sum(q_sub * k_j * decay, axis=1, keepdims=True), scores)

    return lax.fori_loop(0, sub, column, jnp.zeros(cols.shape, cum_sub.dtype))


def span(cum_sub, ref_row):
    """The largest |cum_t - ref_row| over a sub-chunk's rows and dimensions (a scalar)."""
    return jnp.max(jnp.max(jnp.abs(cum_sub - ref_row), axis=1), axis=0)


def earlier_keys(k, cum, ref_row, start):
    """k_s * exp(ref_row - cum_s) for the steps s < start of the chunk, zero elsewhere: [C, dk]. The exponent is
    <= 0 for the steps up to ``ref_row``'s; those after it are the factored sub-chunk's (<= FACTORED_SPAN)."""
    before = lax.broadcasted_iota(jnp.int32, (k.shape[0], 1), 0) < start
    return jnp.where(before, k * masked_decay(ref_row, cum, before), 0.0)


def pow2_at_least(n):
    """The smallest power of two >= n (Triton's tiles are powers of two): products with the earlier or later
    sub-chunks take that many rows, masked, instead of the whole chunk."""
    return 1 << (n - 1).bit_length()


def whole_chunk_or_sub_chunks(cum_ref, whole_chunk, by_sub_chunks):
    """Runs ``whole_chunk(mid)`` when the chunk's gates span at most ``FACTORED_SPAN`` nats in every dimension, else
    ``by_sub_chunks()`` (``pl.when``, per program). mid [1, dk] is per dimension the midpoint of the chunk's
    cumulative gates, which fall from the first row to the last: exp(cum_t - mid) and exp(mid - cum_s) are then at
    most e^(FACTORED_SPAN / 2) for any t and s of the chunk."""
    first, last = cum_ref[pl.ds(0, 1), :], cum_ref[pl.ds(cum_ref.shape[0] - 1, 1), :]
    fits = span(first, last) <= FACTORED_SPAN
    pl.when(fits)(lambda: whole_chunk((first + last) / 2))
    pl.when(jnp.logical_not(fits))(by_sub_chunks)


def midpoint_factors(q, k, cum, mid):
    """(up, down, q * up, k * down) with up = exp(cum - mid), down = exp(mid - cum), the products in the inputs'
    dtypes. With ``whole_chunk_or_sub_chunks``'s mid, A_ts = (q_t * up_t) . (k_s * down_s) = sum_d q_td k_sd
    exp(cum_td - cum_sd), each factor at most e^(FACTORED_SPAN / 2)."""
    up, down = exp(cum - mid), exp(mid - cum)
    return up, down, (q * up).astype(q.dtype), (k * down).astype(k.dtype)


def causal_product(a, b, dot):
    """a b^T [C, C] on and below the diagonal (s <= t), zero above."""
    return jnp.where(lower_triangle(a.shape[0]), dot(a, b, trans_b=True), 0.0)


def lower_triangle(n):
    """[n, n] bool: True on and below the diagonal (s <= t)."""
    return lax.broadcasted_iota(jnp.int32, (n, n), 1) <= lax.broadcasted_iota(jnp.int32, (n, n), 0)


def output_kernel(q_ref, k_ref, v_ref, cum_ref, state_ref, out_ref, *, sub):
    """One chunk's output for one dv block: q/k/cum [C, dk], v/out [C, bv], state [dk, bv] (entering the chunk).
    When the chunk's gates span at most ``FACTORED_SPAN`` nats, (q exp(cum)) S + A V with A one matmul
    (``midpoint_factors``); otherwise per sub-chunk, referenced to the step before it: one masked matmul over the
    steps up to its end when its span allows, else over the earlier sub-chunks plus ``diagonal_scores``."""
    chunk = q_ref.shape[0]
    dtype = q_ref.dtype
    dot = make_dot(dtype)

    def whole_chunk(mid):
        q, cum = q_ref[...], cum_ref[...]
        _, _, q_up, k_down = midpoint_factors(q, k_ref[...], cum, mid)
        scores = causal_product(q_up, k_down, dot)
        out = dot((q * exp(cum)).astype(dtype), state_ref[...].astype(dtype))
        out_ref[...] = (out + dot(scores.astype(dtype), v_ref[...])).astype(out_ref.dtype)

    def by_sub_chunks():
        # k, v and cum are read where used, only the rows that the earlier sub-chunks need: whole-chunk tiles held
        # across the sub-chunks spilled registers (benchmarks/triton_resources.py).
        state = state_ref[...].astype(dtype)
        for m in range(chunk // sub):
            start = m * sub
            rows = pl.ds(start, sub)
            q_sub, cum_sub = q_ref[rows, :], cum_ref[rows, :]
            out = dot((q_sub * exp(cum_sub)).astype(dtype), state)
            # For the first sub-chunk any row at or before it is a valid reference.
            ref_row = cum_ref[pl.ds(max(start - 1, 0), 1), :]
            q_hat = (q_sub * exp(cum_sub - ref_row)).astype(dtype)

            def factored():  # traced by lax.cond below, in this iteration
                upto = pl.ds(0, pow2_at_least(start + sub))  # rows past start + sub meet zero keys
                keys = earlier_keys(k_ref[upto, :], cum_ref[upto, :], ref_row, start + sub).astype(dtype)
                scores = dot(q_hat, keys, trans_b=True)
                causal = (lax.broadcasted_iota(jnp.int32, scores.shape, 1)
                          <= start + lax.broadcasted_iota(jnp.int32, scores.shape, 0))
                return dot(jnp.where(causal, scores, 0.0).astype(dtype), v_ref[upto, :])

            def looped():
                scores = diagonal_scores(q_sub, cum_sub, k_ref, cum_ref, start)
                out = dot(scores.astype(dtype), v_ref[rows, :])
                if start:  # earlier sub-chunks
                    earlier = pl.ds(0, pow2_at_least(start))
                    keys = earlier_keys(k_ref[earlier, :], cum_ref[earlier, :], ref_row, start).astype(dtype)
                    scores = dot(q_hat, keys, trans_b=True)  # [sub, rows before start and masked ones]
                    out += dot(scores.astype(dtype), v_ref[earlier, :])
                return out

            out += lax.cond(span(cum_sub, ref_row) <= FACTORED_SPAN, factored, looped)
            out_ref[rows, :] = out.astype(out_ref.dtype)

    whole_chunk_or_sub_chunks(cum_ref, whole_chunk, by_sub_chunks)


def sub_chunk_scores(q_ref, k_ref, cum_ref, start, sub):
    """The scores A [sub, C] of the rows [start, start + sub), q/k/cum the whole chunk [C, dk]: one masked matmul
    referenced to the step before the sub-chunk, over the earlier sub-chunks and, when the sub-chunk's span allows
    (``FACTORED_SPAN``), its own causal block too; otherwise that block by ``diagonal_scores``."""
    chunk = k_ref.shape[0]
    dtype = q_ref.dtype
    dot = make_dot(dtype)
    q_sub, cum_sub = q_ref[pl.ds(start, sub), :], cum_ref[pl.ds(start, sub), :]
    # For the first sub-chunk any row at or before it is a valid reference.
    ref_row = cum_ref[pl.ds(jnp.maximum(start - 1, 0), 1), :]
    q_hat = (q_sub * exp(cum_sub - ref_row)).astype(dtype)

    def factored():
        keys = earlier_keys(k_ref[...], cum_ref[...], ref_row, start + sub).astype(dtype)
        rows = lax.broadcasted_iota(jnp.int32, (sub, chunk), 0)
        cols = lax.broadcasted_iota(jnp.int32, (sub, chunk), 1)
        return jnp.where(cols <= start + rows, dot(q_hat, keys, trans_b=True), 0.0)

    def looped():
        keys = earlier_keys(k_ref[...], cum_ref[...], ref_row, start).astype(dtype)
        return dot(q_hat, keys, trans_b=True) + diagonal_scores(q_sub, cum_sub, k_ref, cum_ref, start, width=chunk)

    return lax.cond(span(cum_sub, ref_row) <= FACTORED_SPAN, factored, looped)


def scores_kernel(q_ref, k_ref, cum_ref, scores_ref, *, sub):
    """The intra-chunk scores A [C, C] of one chunk (``VectorGateConfig.scores_kernel``, GPU), q/k/cum [C, dk].
    Where the chunk's gates span at most ``FACTORED_SPAN`` nats in every dimension (gates above ~e^(-60 / C) a
    step on average), one masked matmul referenced to their midpoint (``midpoint_factors``; the masked products
    above the diagonal at most e^FACTORED_SPAN, as in a factored sub-chunk); otherwise sub-chunk by sub-chunk
    (``sub_chunk_scores``)."""
    chunk = q_ref.shape[0]
    dtype = q_ref.dtype

    def whole_chunk(mid):
        _, _, q_up, k_down = midpoint_factors(q_ref[...], k_ref[...], cum_ref[...], mid)
        scores_ref[...] = causal_product(q_up, k_down, make_dot(dtype)).astype(scores_ref.dtype)

    def by_sub_chunks():
        @pl.loop(0, chunk, step=sub)
        def _(start):
            scores_ref[pl.ds(start, sub), :] = sub_chunk_scores(q_ref, k_ref, cum_ref, start, sub).astype(
                scores_ref.dtype)

    whole_chunk_or_sub_chunks(cum_ref, whole_chunk, by_sub_chunks)


def output_from_scores_kernel(q_ref, v_ref, cum_ref, state_ref, scores_ref, out_ref):
    """``output_kernel``'s result from the chunk's scores A (``scores_kernel``): (q * exp(cum)) S + A V."""
    dtype = q_ref.dtype
    dot = make_dot(dtype)
    out = dot((q_ref[...] * exp(cum_ref[...])).astype(dtype), state_ref[...].astype(dtype))
    out += dot(scores_ref[...].astype(dtype), v_ref[...])
    out_ref[...] = out.astype(out_ref.dtype)
