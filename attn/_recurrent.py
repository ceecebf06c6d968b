"""Linear recurrences shared by the linear-recurrent (and kernelized) mechanisms.

Two recurrences over a state ``S`` of shape [batch, heads, dk, dv] (kept in float32, float64 for float64 inputs):

* ``linear_recurrence``: ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` (gated linear attention;
  no gate = plain causal linear attention, a constant gate = RetNet-style decay).
* ``delta_recurrence``: ``S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``, ``o_t = q_t S_t`` (the
  (gated) delta rule). This is the transpose of the papers' ``[dv, dk]`` orientation, so that both recurrences
  share the [dk, dv] state layout.

Each has three forms that compute the same thing:

* "parallel": quadratic, from the decay matrix of cumulative log gates (one chunk covering the sequence);
* "recurrent": a ``lax.scan`` over time steps (the definition);
* "chunked": chunkwise parallel, quadratic inside chunks of ``chunk_size`` and a scan carrying the state between
  chunks. Any sequence length works (padded internally with identity steps).

Packed sequences: ``segment_ids`` [batch, seq] (integers; a change of id between consecutive steps starts a new
segment, so segments are contiguous runs) reset the state to zero at each segment start. The initial state
belongs to the first segment. The masks below are exact (no "-inf" gates), so resets cost no precision.

Numerical safety: gates are used in log space and only differences ``G_t - G_s`` with ``s <= t`` of cumulative
log gates are exponentiated, so every exponential is of a number <= 0 (no overflow for any decay strength).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attn import _common as c

Array = jax.Array

FORMS = ("parallel", "recurrent", "chunked")


def init_state(batch: int, heads: int, dk: int, dv: int, dtype=jnp.float32) -> Array:
    """Zero state [batch, heads, dk, dv] in the accumulation dtype of ``dtype`` (float32 or float64)."""
    return jnp.zeros((batch, heads, dk, dv), c.compute_dtype(jnp.dtype(dtype)))


# ----------------------------------------------------------------------------------------------------------
# Input checks


def _check_form(implementation) -> str:
    if implementation == "xla":  # the mechanisms call the parallel form "xla"
        return "parallel"
    if implementation not in FORMS:
        raise ValueError(f"implementation must be one of {FORMS}, got {implementation!r}")
    return implementation


def _check_common(q, k, v, initial_state, chunk_size):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, dim], got shape {tuple(x.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [batch, seq, heads, dk], got {q.shape} and {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [batch, seq, heads, dv] with q's {q.shape[:3]}, got {v.shape}")
    c.positive_int(chunk_size, "chunk_size")
    b, _, h, dk = q.shape
    want = (b, h, dk, v.shape[3])
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise ValueError(f"initial_state must have shape [batch, heads, dk, dv] = {want}, got {initial_state.shape}")


def _check_gate(log_gate, q, vector_ok: bool, name: str = "log_gate"):
    if log_gate is None:
        return
    b, s, h, dk = q.shape
    shapes = [(b, s, h)] + ([(b, s, h, dk)] if vector_ok else [])
    if tuple(log_gate.shape) not in shapes:
        want = " or ".join(str(list(x)) for x in shapes)
        raise ValueError(f"{name} must have shape {want} ([batch, seq, heads(, dk)]), got {tuple(log_gate.shape)}")


def _segment_counts(segment_ids, b, s):
    """[batch, seq] int32: how many segment starts precede each step (0 in the first segment)."""
    if segment_ids is None:
        return jnp.zeros((b, s), jnp.int32)
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (b, s) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            f"segment_ids must be an integer array of shape [batch, seq] = {(b, s)}, "
            f"got {segment_ids.dtype} {tuple(segment_ids.shape)}"
        )
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(starts, axis=1, dtype=jnp.int32)], axis=1)


def _segment_masks(count, chunk, dtype):
    """Masks of the chunked forms from segment counts [b, s_padded] (1 = connected, 0 = a reset in between).

    Returns (same [b, 1, n, C, C]: steps t, s in the same segment; from_prev [b, 1, n, C]: step t still in the
    segment of the state entering its chunk; to_last [b, 1, n, C]: step s in the segment of the chunk's last step;
    carry [b, 1, n]: the entering state survives the chunk).
    """
    b, s = count.shape
    cnt = count.reshape(b, 1, s // chunk, chunk)
    last = cnt[..., -1]  # [b, 1, n]
    prev = jnp.concatenate([jnp.zeros_like(last[..., :1]), last[..., :-1]], axis=-1)  # before each chunk
    same = (cnt[..., :, None] == cnt[..., None, :]).astype(dtype)
    from_prev = (cnt == prev[..., None]).astype(dtype)
    to_last = (cnt == last[..., None]).astype(dtype)
    carry = (last == prev).astype(dtype)
    return same, from_prev, to_last, carry


def _resets(count):
    """[b, s] bool: True at the first step of every segment but the first."""
    return jnp.concatenate([jnp.zeros_like(count[:, :1], bool), count[:, 1:] != count[:, :-1]], axis=1)


def _initial(initial_state, b, h, dk, dv, dt):
    if initial_state is None:
        return jnp.zeros((b, h, dk, dv), dt)
    return initial_state.astype(dt)


def _to_chunks(x, chunk):
    """[b, s, h, ...] -> [b, h, n_chunks, chunk, ...] (seq already a multiple of chunk)."""
    b, s, h = x.shape[:3]
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape((b, h, s // chunk, chunk) + x.shape[3:])


def _from_chunks(x):
    """[b, h, n, chunk, d] -> [b, n * chunk, h, d]."""
    b, h, n, ch, d = x.shape
    return jnp.swapaxes(x.reshape(b, h, n * ch, d), 1, 2)


def _pad_seq(x, pad):
    if pad == 0 or x is None:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)  # zeros: k = v = 0, beta = 0 and log gate 0 leave the state unchanged


def _decay_matrix(cum, inclusive: bool):
    """exp(cum_t - cum_s) for s <= t (s < t when not inclusive), else 0; cum [..., C, G] -> [..., C, C, G].

    The subtraction is masked before the exp so that exp never sees the (positive) s > t differences, and the
    double where keeps their gradients exactly zero.
    """
    ch = cum.shape[-2]
    t = jnp.arange(ch)
    keep = (t[:, None] >= t[None, :]) if inclusive else (t[:, None] > t[None, :])
    keep = keep[:, :, None]
    diff = cum[..., :, None, :] - cum[..., None, :, :]
    return jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)


# ----------------------------------------------------------------------------------------------------------
# Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t


def linear_recurrence(
    q, k, v, *, log_gate=None, initial_state=None, segment_ids=None, implementation="chunked", chunk_size=64
):
    """Gated linear recurrence ``S_t = diag(exp(log_gate_t)) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    Args:
      q, k: [batch, seq, heads, dk]; v: [batch, seq, heads, dv] (same heads: repeat GQA heads before).
      log_gate: None (no decay), [batch, seq, heads] (scalar gate per head) or [batch, seq, heads, dk] (gate per
        key dimension); the log of the forget gate, <= 0.
      initial_state: None (zeros) or [batch, heads, dk, dv].
      segment_ids: None or [batch, seq] integers: the state restarts from zero where the id changes.
      implementation: "parallel" (alias "xla"), "recurrent" or "chunked".
      chunk_size: chunk length of the chunked form (positive int; any seq length works).

    No scale is applied here. Returns ``(out, final_state)``: out [batch, seq, heads, dv] and the state, both
    in the accumulation dtype (float32 for half/float32 inputs, float64 for float64): cast ``out`` yourself.
    """
    form = _check_form(implementation)
    _check_common(q, k, v, initial_state, chunk_size)
    _check_gate(log_gate, q, vector_ok=True)
    b, s, h, dk = q.shape
    count = _segment_counts(segment_ids, b, s)
    dv = v.shape[3]
    dt = c.compute_dtype(q.dtype)
    q, k, v = (x.astype(dt) for x in (q, k, v))
    if log_gate is None:
        log_gate = jnp.zeros((b, s, h, 1), dt)
    elif log_gate.ndim == 3:
        log_gate = log_gate[..., None]
    log_gate = log_gate.astype(dt)  # [b, s, h, G] with G = 1 (scalar gate) or dk
    state = _initial(initial_state, b, h, dk, dv, dt)
    if s == 0:
        return jnp.zeros((b, 0, h, dv), dt), state
    if form == "recurrent":
        return _linear_scan(q, k, v, log_gate, state, _resets(count))
    chunk = s if form == "parallel" else min(chunk_size, s)
    return _linear_chunked(q, k, v, log_gate, state, count, chunk)


@jax.jit
def _linear_scan(q, k, v, log_gate, state, resets):
    def step(S, x):
        q_t, k_t, v_t, g_t, reset_t = x  # [b, h, dk], [b, h, dk], [b, h, dv], [b, h, G], [b]
        S = jnp.where(reset_t[:, None, None, None], 0.0, jnp.exp(g_t)[..., None] * S)
        S = S + k_t[..., :, None] * v_t[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_gate, resets))
    state, out = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(out, 0, 1), state


@functools.partial(jax.jit, static_argnames="chunk")
def _linear_chunked(q, k, v, log_gate, state, count, chunk):
    s = q.shape[1]
    pad = -s % chunk
    q, k, v, log_gate = (_to_chunks(_pad_seq(x, pad), chunk) for x in (q, k, v, log_gate))
    same, from_prev, to_last, carry = _segment_masks(jnp.pad(count, ((0, 0), (0, pad)), mode="edge"), chunk, q.dtype)
    # Cumulative log gate inside each chunk (inclusive): the decay from the chunk start to step t.
    cum = jnp.cumsum(log_gate, axis=3)  # [b, h, n, C, G]
    last = cum[..., -1:, :]  # [b, h, n, 1, G]

    # Intra-chunk: o_t += sum_{s<=t} (q_t * exp(cum_t - cum_s)) . k_s  v_s
    decay = _decay_matrix(cum, inclusive=True) * same[..., None]  # [b, h, n, C, C, G]
    if log_gate.shape[-1] == 1:
        scores = jnp.einsum("bhntd,bhnsd->bhnts", q, k) * decay[..., 0]
    else:
        scores = jnp.einsum("bhntd,bhnsd,bhntsd->bhnts", q, k, decay)
    intra = jnp.einsum("bhnts,bhnsv->bhntv", scores, v)

    # Inter-chunk: the state entering a chunk, decayed to each step; keys decayed to the chunk end.
    q_in = q * jnp.exp(cum) * from_prev[..., None]
    k_out = k * jnp.exp(last - cum) * to_last[..., None]
    chunk_decay = jnp.exp(last[..., 0, :]) * carry[..., None]  # [b, h, n, G]
    chunk_kv = jnp.einsum("bhnsk,bhnsv->bhnkv", k_out, v)

    def step(S, x):
        decay_n, kv_n = x
        return decay_n[..., None] * S + kv_n, S  # emit the state entering the chunk

    state, entering = jax.lax.scan(step, state, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(chunk_kv, 2, 0)))
    entering = jnp.moveaxis(entering, 0, 2)  # [b, h, n, dk, dv]
    inter = jnp.einsum("bhntk,bhnkv->bhntv", q_in, entering)
    out = _from_chunks(intra + inter)[:, :s]
    return out, state


# ----------------------------------------------------------------------------------------------------------
# (Gated) delta rule: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T


def delta_recurrence(
    q, k, v, beta, *, log_gate=None, initial_state=None, segment_ids=None, implementation="chunked", chunk_size=64
):
    """(Gated) delta rule ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = q_t S_t``.

    State [batch, heads, dk, dv] (the papers' ``S`` transposed). Equivalently, with the decayed state
    ``S' = exp(g_t) S_{t-1}``: ``u_t = beta_t (v_t - S'^T k_t)`` and ``S_t = S' + k_t u_t^T``.

    Args:
      q, k: [batch, seq, heads, dk] (normalise k yourself: the delta rule is stable for ||k|| = 1, beta in (0, 1));
      v: [batch, seq, heads, dv]; beta: [batch, seq, heads] writing strengths.
      log_gate: None or [batch, seq, heads] (scalar decay per head, <= 0).
      initial_state: None or [batch, heads, dk, dv].
      segment_ids: None or [batch, seq] integers: the state restarts from zero where the id changes.
      implementation: "parallel" (alias "xla"; the chunked form with one chunk), "recurrent" or "chunked".
      chunk_size: chunk length for "chunked". Chunks use the WY/UT representation: inside a chunk the updates
        solve a unit lower-triangular system ("Parallelizing Linear Transformers with the Delta Rule over
        Sequence Length").

    No scale is applied here. Returns ``(out, final_state)`` in the accumulation dtype (see linear_recurrence).
    """
    form = _check_form(implementation)
    _check_common(q, k, v, initial_state, chunk_size)
    _check_gate(log_gate, q, vector_ok=False)
    b, s, h, dk = q.shape
    count = _segment_counts(segment_ids, b, s)
    if tuple(beta.shape) != (b, s, h):
        raise ValueError(f"beta must have shape [batch, seq, heads] = {(b, s, h)}, got {tuple(beta.shape)}")
    dv = v.shape[3]
    dt = c.compute_dtype(q.dtype)
    q, k, v, beta = (x.astype(dt) for x in (q, k, v, beta))
    log_gate = jnp.zeros((b, s, h), dt) if log_gate is None else log_gate.astype(dt)
    state = _initial(initial_state, b, h, dk, dv, dt)
    if s == 0:
        return jnp.zeros((b, 0, h, dv), dt), state
    if form == "recurrent":
        return _delta_scan(q, k, v, beta, log_gate, state, _resets(count))
    chunk = s if form == "parallel" else min(chunk_size, s)
    return _delta_chunked(q, k, v, beta, log_gate, state, count, chunk)


@jax.jit
def _delta_scan(q, k, v, beta, log_gate, state, resets):
    def step(S, x):
        q_t, k_t, v_t, b_t, g_t, reset_t = x  # [b, h, dk], [b, h, dk], [b, h, dv], [b, h], [b, h], [b]
        S = jnp.where(reset_t[:, None, None, None], 0.0, jnp.exp(g_t)[..., None, None] * S)
        u = b_t[..., None] * (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., :, None] * u[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, log_gate, resets))
    state, out = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(out, 0, 1), state


@functools.partial(jax.jit, static_argnames="chunk")
def _delta_chunked(q, k, v, beta, log_gate, state, count, chunk):
    """Chunkwise delta rule.

    Inside a chunk, with cum_t the inclusive cumulative log gate from the chunk start, G_t = exp(cum_t) and S0
    the entering state, unrolling the recurrence gives ``u_t = beta_t v_t - beta_t G_t S0^T k_t
    - sum_{s<t} beta_t exp(cum_t - cum_s) (k_t . k_s) u_s``, i.e. ``(I + A) U = beta V - (beta G K) S0`` with A
    strictly lower triangular. Solving once per chunk (UT transform) gives ``U = U0 - W S0`` with
    ``U0 = (I + A)^-1 beta V`` and ``W = (I + A)^-1 beta G K``, independent of S0, so all chunks solve in
    parallel and only the cheap state update is sequential. With segments, A, the S0 terms and the carried state
    are masked to the steps connected without a reset.
    """
    s = q.shape[1]
    pad = -s % chunk
    q, k, v = (_to_chunks(_pad_seq(x, pad), chunk) for x in (q, k, v))  # [b, h, n, C, d]
    beta, log_gate = (_to_chunks(_pad_seq(x, pad)[..., None], chunk) for x in (beta, log_gate))  # [b, h, n, C, 1]
    same, from_prev, to_last, carry = _segment_masks(jnp.pad(count, ((0, 0), (0, pad)), mode="edge"), chunk, q.dtype)
    from_prev, to_last = from_prev[..., None], to_last[..., None]
    cum = jnp.cumsum(log_gate, axis=3)  # [b, h, n, C, 1]
    last = cum[..., -1:, :]
    strict = _decay_matrix(cum, inclusive=False)[..., 0] * same  # [b, h, n, C, C]
    incl = _decay_matrix(cum, inclusive=True)[..., 0] * same
    kk = jnp.einsum("bhntd,bhnsd->bhnts", k, k)
    eye = jnp.eye(chunk, dtype=q.dtype)
    lower = eye + beta * strict * kk  # I + A, row t scaled by beta_t
    rhs = jnp.concatenate([beta * v, beta * jnp.exp(cum) * from_prev * k], axis=-1)
    sol = jax.lax.linalg.triangular_solve(lower, rhs, left_side=True, lower=True, unit_diagonal=True)
    dv = v.shape[-1]
    u0, w = sol[..., :dv], sol[..., dv:]  # [b, h, n, C, dv], [b, h, n, C, dk]
    qk = jnp.einsum("bhntd,bhnsd->bhnts", q, k) * incl
    q_in = q * jnp.exp(cum) * from_prev
    k_out = k * jnp.exp(last - cum) * to_last
    chunk_decay = jnp.exp(last[..., 0, 0]) * carry  # [b, h, n]

    def step(S, x):
        u0_n, w_n, qk_n, q_in_n, k_out_n, decay_n = x
        u = u0_n - jnp.einsum("bhtk,bhkv->bhtv", w_n, S)
        out = jnp.einsum("bhtk,bhkv->bhtv", q_in_n, S) + jnp.einsum("bhts,bhsv->bhtv", qk_n, u)
        S = decay_n[..., None, None] * S + jnp.einsum("bhtk,bhtv->bhkv", k_out_n, u)
        return S, out

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u0, w, qk, q_in, k_out, chunk_decay))
    state, out = jax.lax.scan(step, state, xs)
    out = _from_chunks(jnp.moveaxis(out, 0, 2))[:, :s]
    return out, state


# ----------------------------------------------------------------------------------------------------------
# Shared pieces of the linear-recurrent mechanisms (lightning, retention, gla, simple_gla, delta rules)

MECHANISM_FORMS = ("xla", "recurrent", "chunked")


def mechanism_setup(q, k, v, causal, implementation, chunk_size, name: str, kernel: bool = False) -> str:
    """Checks the shared arguments of a causal recurrent mechanism; returns the form for the helpers above.

    The mechanisms' "xla" is the parallel form; None picks "chunked"; ``kernel``: "pallas" is accepted too.
    """
    c.check_qkv(q, k, v, cross=False)
    forms = MECHANISM_FORMS + ("pallas",) if kernel else MECHANISM_FORMS
    form = "chunked" if implementation is None else c.check_implementation(implementation, forms, name)
    c.check_causal(causal, (True,), name)
    c.positive_int(chunk_size, "chunk_size")
    return "parallel" if form == "xla" else form


def gated_recurrence(q, k, v, log_gate, *, scale, initial_state, segment_ids, form, chunk_size):
    """The recurrence of the gated mechanisms (simple_gla, gla, retention, lightning): q unscaled, k and v with
    q's heads, ``log_gate`` [b, s, h] (scalar gate) or [b, s, h, dk] (vector gate). Form "pallas" runs the
    kernels of ``kernels_pallas.linear_recurrent`` (on the CPU in Pallas' interpreter), which keep q's dtype
    with a float32 state inside; the other forms run ``linear_recurrence`` in the compute dtype."""
    dt = c.compute_dtype(q.dtype)
    log_gate = log_gate.astype(dt)
    if form == "pallas":
        if log_gate.ndim == 4:
            from kernels_pallas.linear_recurrent.vector_gate_ops import mechanism_recurrence
        else:
            from kernels_pallas.linear_recurrent.ops import mechanism_recurrence
        return mechanism_recurrence((q * scale).astype(q.dtype), k, v, log_gate, initial_state=initial_state,
                                    segment_ids=segment_ids, chunk_size=chunk_size)
    return linear_recurrence(q.astype(dt) * scale, k, v, log_gate=log_gate, initial_state=initial_state,
                             segment_ids=segment_ids, implementation=form, chunk_size=chunk_size)


def check_shape(x, shape, name: str, layout: str):
    """Raises ValueError naming ``name`` when ``x`` is not an array of exactly ``shape``."""
    got = getattr(x, "shape", None)
    if got is None or tuple(got) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {None if got is None else tuple(got)}")
    return jnp.asarray(x)


def check_state(initial_state, q, v):
    if initial_state is None:
        return None
    b, _, h, dk = q.shape
    return check_shape(initial_state, (b, h, dk, v.shape[3]), "initial_state", "[batch, heads, dk, dv]")


def log_decay(decay, dtype):
    """log of a per-head decay in (0, 1]; clamped away from 0 so that log stays finite."""
    decay = decay.astype(dtype)
    return jnp.log(jnp.clip(decay, jnp.finfo(dtype).tiny, 1.0))


def l2_normalize(x, eps=1e-6):
    """x / sqrt(||x||^2 + eps) over the last axis (eps keeps zero vectors and their gradients finite)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def one_step(fn, state, q_t, k_t, v_t, **kwargs):
    """Decoding: runs mechanism ``fn`` on one token ([batch, heads, dim] inputs) from ``state``.

    Returns ``(o_t [batch, heads, dv], new_state)``.
    """
    q_t, k_t, v_t = (x[:, None] for x in (q_t, k_t, v_t))
    out, state = fn(q_t, k_t, v_t, initial_state=state, return_state=True, implementation="recurrent", **kwargs)
    return out[:, 0], state
