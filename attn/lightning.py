"""Lightning attention (TransNormerLLM's NormAttention with decay): normalised decayed linear attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import _common as c
from attn import _recurrent as r
from attn._registry import register


def transnormer_decay(heads: int, dtype=jnp.float32):
    """TransNormerLLM's per-head decays lambda_h = exp(-2^(-8 (h + 1) / heads)) (ALiBi slopes; first layer)."""
    return jnp.exp(-(2.0 ** (-8.0 * jnp.arange(1, heads + 1, dtype=dtype) / heads)))


def srms_norm(x, eps: float = 1e-6):
    """SRMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps)`` (no learned weight)."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    return {"decay": transnormer_decay(q_shape[2])}


@register(
    "lightning",
    family="linear_recurrent",
    complexity="O(n d^2)",
    paper="Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention; "
    "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models; "
    "The Devil in Linear Transformer; Scaling TransNormer to 175 Billion Parameters",
    causal=(True,),
    segment_ids=True,
    cross=False,
    implementations=r.MECHANISM_FORMS + ("pallas",),
    example_params=_example_params,
)
def lightning(
    q,
    k,
    v,
    *,
    causal: bool = True,
    scale: float | None = None,
    segment_ids=None,
    decay,
    eps: float = 1e-6,
    initial_state=None,
    return_state: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
):
    """NormAttention with decay: ``O = SRMSNorm((Q K^T * M) V)``, ``M_ts = lambda^(t-s)`` for ``s <= t``.

    No softmax. ``decay`` [heads]: lambda per query head in (0, 1] (TransNormerLLM: ``exp(-2^(-8 (h+1)/H))``
    scaled per layer, see ``transnormer_decay``). SRMSNorm ``x / sqrt(mean(x^2) + eps)`` is taken over each head's
    value dim without a learned weight (the weight, the q/k feature map (swish in TransNormerLLM) and the output
    gate belong to the model). ``scale`` (default 1: the paper does not scale; the norm removes it up to
    ``eps``) multiplies q. "chunked" is Lightning Attention-2's intra-block quadratic / inter-block recurrent
    split; "pallas" runs that split as the scalar-gate Pallas kernel (``kernels_pallas.linear_recurrent``,
    interpreted on the CPU; no ``segment_ids``). The state (``return_state``) is the unnormalised one,
    ``S_t = lambda S_{t-1} + k_t^T v_t``; ``initial_state``/``segment_ids`` as in ``gla``.

    Paper: "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention" (and
    "Lightning Attention-2", "The Devil in Linear Transformer", "Scaling TransNormer to 175 Billion Parameters").
    """
    form = r.mechanism_setup(q, k, v, causal, implementation, chunk_size, "lightning", kernel=True)
    b, s, h, dk = q.shape
    decay = r.check_shape(decay, (h,), "decay", "[heads]")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    initial_state = r.check_state(initial_state, q, v)
    scale = 1.0 if scale is None else scale
    k, v = c.repeat_kv(k, h), c.repeat_kv(v, h)
    dt = c.compute_dtype(q.dtype)
    log_gate = jnp.broadcast_to(r.log_decay(decay, dt), (b, s, h))
    out, state = r.gated_recurrence(q, k, v, log_gate, scale=scale, initial_state=initial_state,
                                    segment_ids=segment_ids, form=form, chunk_size=chunk_size)
    out = srms_norm(out.astype(dt), eps).astype(q.dtype)  # the norm in the compute dtype for every form
    return (out, state) if return_state else out


def lightning_step(state, q_t, k_t, v_t, *, decay, scale=None, eps: float = 1e-6):
    """One decoding step: q_t [batch, heads, dk], k_t/v_t [batch, kv_heads, dk|dv]; returns (o_t, new_state)."""
    return r.one_step(lightning, state, q_t, k_t, v_t, decay=decay, scale=scale, eps=eps)
