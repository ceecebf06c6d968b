"""Retention (RetNet): linear attention with a fixed exponential decay per head."""

from __future__ import annotations

import jax.numpy as jnp

from attn import _common as c
from attn import _recurrent as r
from attn._registry import register


def retnet_decay(heads: int, dtype=jnp.float32):
    """RetNet's per-head decays gamma_h = 1 - 2^(-5 - h)."""
    return 1.0 - 2.0 ** (-5.0 - jnp.arange(heads, dtype=dtype))


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    return {"decay": retnet_decay(q_shape[2])}


@register(
    "retention",
    family="linear_recurrent",
    complexity="O(n d^2)",
    paper="Retentive Network: A Successor to Transformer for Large Language Models",
    causal=(True,),
    segment_ids=True,
    cross=False,
    implementations=r.MECHANISM_FORMS + ("pallas",),
    example_params=_example_params,
)
def retention(
    q,
    k,
    v,
    *,
    causal: bool = True,
    scale: float | None = None,
    segment_ids=None,
    decay,
    initial_state=None,
    return_state: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
):
    """Retention: ``S_t = gamma S_{t-1} + k_t^T v_t``, ``o_t = (scale q_t) S_t``, i.e. ``(Q K^T * D) V`` with
    ``D_ts = gamma^(t-s)`` for ``s <= t``.

    ``decay`` [heads]: gamma per query head in (0, 1] (RetNet: ``1 - 2^(-5 - h)``, see ``retnet_decay``).
    The three RetNet forms map to "xla" (parallel), "recurrent" and "chunked" (chunkwise recurrent, default).
    RetNet's xPos rotation of q/k, its group norm of the output and the swish output gate belong to the model,
    not to this function. ``initial_state``/``return_state``/``segment_ids`` as in ``gla``.

    Paper: "Retentive Network: A Successor to Transformer for Large Language Models".
    """
    form = r.mechanism_setup(q, k, v, causal, implementation, chunk_size, "retention", kernel=True)
    b, s, h, dk = q.shape
    decay = r.check_shape(decay, (h,), "decay", "[heads]")
    initial_state = r.check_state(initial_state, q, v)
    scale = c.default_scale(scale, dk)
    k, v = c.repeat_kv(k, h), c.repeat_kv(v, h)
    log_gate = jnp.broadcast_to(r.log_decay(decay, c.compute_dtype(q.dtype)), (b, s, h))
    out, state = r.gated_recurrence(q, k, v, log_gate, scale=scale, initial_state=initial_state,
                                    segment_ids=segment_ids, form=form, chunk_size=chunk_size)
    out = out.astype(q.dtype)
    return (out, state) if return_state else out


def retention_step(state, q_t, k_t, v_t, *, decay, scale=None):
    """One decoding step: q_t [batch, heads, dk], k_t/v_t [batch, kv_heads, dk|dv]; returns (o_t, new_state)."""
    return r.one_step(retention, state, q_t, k_t, v_t, decay=decay, scale=scale)
