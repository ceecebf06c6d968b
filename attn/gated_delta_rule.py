"""Gated DeltaNet: the delta rule with a data-dependent scalar decay of the state (Mamba2-style gate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import _recurrent as r
from attn._registry import register
from attn.delta_rule import delta_attention


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    b, s, h, _ = q_shape
    kb, kg = jax.random.split(key)
    return {
        "beta": jax.nn.sigmoid(jax.random.normal(kb, (b, s, h))),
        "log_gate": jax.nn.log_sigmoid(jax.random.normal(kg, (b, s, h)) + 2.0),
    }


@register(
    "gated_delta_rule",
    family="linear_recurrent",
    complexity="O(n d^2)",
    paper="Gated Delta Networks: Improving Mamba2 with Delta Rule; "
    "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
    causal=(True,),
    segment_ids=True,
    cross=False,
    implementations=r.MECHANISM_FORMS + ("pallas",),
    example_params=_example_params,
)
def gated_delta_rule(
    q,
    k,
    v,
    *,
    causal: bool = True,
    scale: float | None = None,
    segment_ids=None,
    beta,
    log_gate,
    initial_state=None,
    return_state: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
):
    """Gated delta rule: ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = (scale q_t) S_t``.

    ``log_gate`` [batch, seq, heads] is ``log alpha_t`` (<= 0; in the paper ``-exp(A) softplus(x W + b)``),
    ``beta`` [batch, seq, heads] in (0, 1). q and k are L2-normalised here and ``scale`` multiplies q, as in
    ``delta_rule``; the chunked form is the delta rule's WY/UT transform with the gate's cumulative decays
    inside each chunk (only differences of cumulative log gates are exponentiated). Forms, GQA, state
    handling, ``segment_ids`` and the "pallas" form as in ``delta_rule``.

    Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule".
    """
    form = r.mechanism_setup(q, k, v, causal, implementation, chunk_size, "gated_delta_rule", kernel=True)
    b, s, h, _ = q.shape
    beta = r.check_shape(beta, (b, s, h), "beta", "[batch, seq, heads]")
    log_gate = r.check_shape(log_gate, (b, s, h), "log_gate", "[batch, seq, heads]")
    initial_state = r.check_state(initial_state, q, v)
    return delta_attention(q, k, v, scale=scale, beta=beta, log_gate=log_gate, initial_state=initial_state,
                           segment_ids=segment_ids, return_state=return_state, chunk_size=chunk_size, form=form)


def gated_delta_rule_step(state, q_t, k_t, v_t, beta_t, log_gate_t, *, scale=None):
    """One decoding step: q_t [batch, heads, dk], k_t/v_t [batch, kv_heads, dk|dv], beta_t/log_gate_t [batch, heads]."""
    return r.one_step(gated_delta_rule, state, q_t, k_t, v_t, beta=jnp.asarray(beta_t)[:, None],
                      log_gate=jnp.asarray(log_gate_t)[:, None], scale=scale)
