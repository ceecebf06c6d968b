"""Gated linear attention (GLA): linear attention with a data-dependent forget gate per key dimension."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import _common as c
from attn import _recurrent as r
from attn._registry import register


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    b, s, h, dk = q_shape
    # The paper's gate: alpha = sigmoid(x W)^(1/16), i.e. log alpha = logsigmoid(.) / 16.
    return {"log_gate": jax.nn.log_sigmoid(jax.random.normal(key, (b, s, h, dk))) / 16}


@register(
    "gla",
    family="linear_recurrent",
    complexity="O(n d^2)",
    paper="Gated Linear Attention Transformers with Hardware-Efficient Training; "
    "A Unified Implicit Attention Formulation for Gated-Linear Recurrent Sequence Models",
    causal=(True,),
    segment_ids=True,
    cross=False,
    implementations=r.MECHANISM_FORMS + ("pallas",),
    example_params=_example_params,
)
def gla(
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
    """Gated linear attention: ``S_t = diag(alpha_t) S_{t-1} + k_t^T v_t``, ``o_t = (scale q_t) S_t``.

    ``log_gate`` [batch, seq, heads, dk] is ``log alpha_t`` (<= 0), one gate per query head and key dimension
    (data dependent; computed by the model, e.g. ``logsigmoid(x W) / 16`` as in the paper). GQA: k/v heads are
    repeated to the query heads. Forms: "xla" (parallel, quadratic), "recurrent" (scan), "chunked" (default;
    chunks of ``chunk_size``), "pallas" (the chunked Pallas kernel of ``kernels_pallas.linear_recurrent``,
    interpreted on the CPU; no ``segment_ids``). ``initial_state`` [batch, heads, dk, dv] continues from a previous
    segment; ``return_state=True`` returns ``(out, final_state)`` (state in float32, float64 for float64 inputs).
    ``segment_ids`` [batch, seq] (packed sequences): the state restarts from zero wherever the id changes, so
    segments are contiguous runs (the initial state belongs to the first one).
    No normalisation: the paper's output norm and gating belong to the model.

    Paper: "Gated Linear Attention Transformers with Hardware-Efficient Training".
    """
    form = r.mechanism_setup(q, k, v, causal, implementation, chunk_size, "gla", kernel=True)
    b, s, h, dk = q.shape
    log_gate = r.check_shape(log_gate, (b, s, h, dk), "log_gate", "[batch, seq, heads, dk]")
    initial_state = r.check_state(initial_state, q, v)
    scale = c.default_scale(scale, dk)
    k, v = c.repeat_kv(k, h), c.repeat_kv(v, h)
    out, state = r.gated_recurrence(q, k, v, log_gate, scale=scale, initial_state=initial_state,
                                    segment_ids=segment_ids, form=form, chunk_size=chunk_size)
    out = out.astype(q.dtype)
    return (out, state) if return_state else out


def gla_step(state, q_t, k_t, v_t, log_gate_t, *, scale=None):
    """One decoding step: q_t [batch, heads, dk], k_t/v_t [batch, kv_heads, dk|dv], log_gate_t [batch, heads, dk].

    Returns ``(o_t [batch, heads, dv], new_state)``; start from ``attn._recurrent.init_state``.
    """
    return r.one_step(gla, state, q_t, k_t, v_t, log_gate=jnp.asarray(log_gate_t)[:, None], scale=scale)
