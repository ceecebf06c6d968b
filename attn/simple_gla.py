"""Simple GLA: gated linear attention with one data-dependent scalar forget gate per head and step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import _common as c
from attn import _recurrent as r
from attn._registry import register


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    b, s, h, _ = q_shape
    return {"log_gate": jax.nn.log_sigmoid(jax.random.normal(key, (b, s, h))) / 16}


@register(
    "simple_gla",
    family="linear_recurrent",
    complexity="O(n d^2)",
    paper="Gated Linear Attention Transformers with Hardware-Efficient Training; "
    "Retentive Network: A Successor to Transformer for Large Language Models",
    causal=(True,),
    segment_ids=True,
    cross=False,
    implementations=r.MECHANISM_FORMS + ("pallas",),
    example_params=_example_params,
)
def simple_gla(
    q,
    k,
    v,
    *,
    causal: bool = True,
    scale: float | None = None,
    segment_ids=None,
    log_gate,
    initial_state=None,
    return_state: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
):
    """Scalar-gated linear attention: ``S_t = alpha_t S_{t-1} + k_t^T v_t``, ``o_t = (scale q_t) S_t``.

    ``log_gate`` [batch, seq, heads] is ``log alpha_t`` (<= 0), one data-dependent gate per query head and step:
    the scalar-gate special case of GLA, i.e. RetNet's decay made data dependent. Same forms, state handling,
    ``segment_ids`` and GQA as ``gla``.

    Paper: "Gated Linear Attention Transformers with Hardware-Efficient Training" (with "Retentive Network:
    A Successor to Transformer for Large Language Models" for the decayed form).
    """
    form = r.mechanism_setup(q, k, v, causal, implementation, chunk_size, "simple_gla", kernel=True)
    b, s, h, dk = q.shape
    log_gate = r.check_shape(log_gate, (b, s, h), "log_gate", "[batch, seq, heads]")
    initial_state = r.check_state(initial_state, q, v)
    scale = c.default_scale(scale, dk)
    k, v = c.repeat_kv(k, h), c.repeat_kv(v, h)
    out, state = r.gated_recurrence(q, k, v, log_gate, scale=scale, initial_state=initial_state,
                                    segment_ids=segment_ids, form=form, chunk_size=chunk_size)
    out = out.astype(q.dtype)
    return (out, state) if return_state else out


def simple_gla_step(state, q_t, k_t, v_t, log_gate_t, *, scale=None):
    """One decoding step: q_t [batch, heads, dk], k_t/v_t [batch, kv_heads, dk|dv], log_gate_t [batch, heads].

    Returns ``(o_t [batch, heads, dv], new_state)``.
    """
    return r.one_step(simple_gla, state, q_t, k_t, v_t, log_gate=jnp.asarray(log_gate_t)[:, None], scale=scale)
