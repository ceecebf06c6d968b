"""DeltaNet: linear attention whose state is updated by the delta rule (online regression of values on keys)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import _common as c
from attn import _recurrent as r
from attn._registry import register


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    b, s, h, _ = q_shape
    return {"beta": jax.nn.sigmoid(jax.random.normal(key, (b, s, h)))}


def delta_attention(
    q, k, v, *, scale, beta, log_gate, initial_state, segment_ids, return_state, chunk_size, form
):
    """Shared body of delta_rule and gated_delta_rule (arguments already checked)."""
    h, dk = q.shape[2], q.shape[3]
    scale = c.default_scale(scale, dk)
    dt = c.compute_dtype(q.dtype)
    k, v = c.repeat_kv(k, h), c.repeat_kv(v, h)
    qn = r.l2_normalize(q.astype(dt)) * scale
    kn = r.l2_normalize(k.astype(dt))
    log_gate = None if log_gate is None else log_gate.astype(dt)
    if form == "pallas":  # the Pallas kernel keeps the input dtype (float32 state and WY maths inside)
        from kernels_pallas.linear_recurrent import delta_ops

        out, state = delta_ops.mechanism_recurrence(
            qn.astype(q.dtype), kn.astype(q.dtype), v, beta.astype(dt), log_gate, initial_state=initial_state,
            segment_ids=segment_ids, chunk_size=chunk_size,
        )
    else:
        out, state = r.delta_recurrence(
            qn, kn, v, beta.astype(dt), log_gate=log_gate, initial_state=initial_state, segment_ids=segment_ids,
            implementation=form, chunk_size=chunk_size,
        )
    out = out.astype(q.dtype)
    return (out, state) if return_state else out


@register(
    "delta_rule",
    family="linear_recurrent",
    complexity="O(n d^2)",
    paper="Parallelizing Linear Transformers with the Delta Rule over Sequence Length; "
    "Linear Transformers Are Secretly Fast Weight Programmers",
    causal=(True,),
    segment_ids=True,
    cross=False,
    implementations=r.MECHANISM_FORMS + ("pallas",),
    example_params=_example_params,
)
def delta_rule(
    q,
    k,
    v,
    *,
    causal: bool = True,
    scale: float | None = None,
    segment_ids=None,
    beta,
    initial_state=None,
    return_state: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
):
    """Delta rule: ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = (scale q_t) S_t``.

    (State [dk, dv], the transpose of the paper's ``S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T``.)
    q and k are L2-normalised over head_dim here (eps 1e-6), as in the paper's DeltaNet (which normalises after
    its SiLU feature map, left to the model), so the transition is a contraction for ``beta`` in (0, 1);
    ``scale`` (default 1/sqrt(head_dim)) then multiplies q. ``beta`` [batch, seq, heads]: writing strength per
    query head and step (the model's ``sigmoid(x W)``). Forms: "recurrent" (scan), "chunked" (default;
    WY/UT transform: per chunk a unit lower-triangular solve, then a scan over chunks), "xla" (the chunked
    form with one chunk covering the sequence: quadratic) and "pallas" (``kernels_pallas.linear_recurrent.
    delta_ops``: the chunked form with the sequential state pass as a Pallas kernel, interpreted on the CPU; no
    ``segment_ids``). ``initial_state``/``return_state``/``segment_ids`` as in ``gla``.

    Paper: "Parallelizing Linear Transformers with the Delta Rule over Sequence Length".
    """
    form = r.mechanism_setup(q, k, v, causal, implementation, chunk_size, "delta_rule", kernel=True)
    b, s, h, _ = q.shape
    beta = r.check_shape(beta, (b, s, h), "beta", "[batch, seq, heads]")
    initial_state = r.check_state(initial_state, q, v)
    return delta_attention(q, k, v, scale=scale, beta=beta, log_gate=None, initial_state=initial_state,
                           segment_ids=segment_ids, return_state=return_state, chunk_size=chunk_size, form=form)


def delta_rule_step(state, q_t, k_t, v_t, beta_t, *, scale=None):
    """One decoding step: q_t [batch, heads, dk], k_t/v_t [batch, kv_heads, dk|dv], beta_t [batch, heads]."""
    return r.one_step(delta_rule, state, q_t, k_t, v_t, beta=jnp.asarray(beta_t)[:, None], scale=scale)
