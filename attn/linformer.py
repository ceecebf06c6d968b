"""Linformer: softmax attention over keys and values projected along the sequence to k rows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attn import _common as c
from attn._registry import register


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    n = kv_shape[1]
    rank = max(1, min(n // 2, 64))  # a fixed k past short inputs: the cost stays O(n k d) as n grows
    ke, kf = jax.random.split(key)
    # Paper initialisation: entries N(0, 1/k).
    std = 1.0 / math.sqrt(rank)
    return {
        "e_proj": std * jax.random.normal(ke, (rank, n), jnp.float32),
        "f_proj": std * jax.random.normal(kf, (rank, n), jnp.float32),
    }


def _check_proj(proj, name, heads, kv_len):
    proj = jnp.asarray(proj)
    if proj.ndim not in (2, 3) or proj.shape[-1] != kv_len or (proj.ndim == 3 and proj.shape[0] != heads):
        raise ValueError(
            f"{name} must have shape [k, kv_seq] or [heads, k, kv_seq] with kv_seq = {kv_len} and "
            f"heads = {heads}, got {proj.shape}"
        )
    return proj


def _project(proj, x):
    """proj [k, n] or [h, k, n], x [b, n, h, d] -> [b, k, h, d]."""
    if proj.ndim == 2:
        return jnp.einsum("rn,bnhd->brhd", proj, x)
    return jnp.einsum("hrn,bnhd->brhd", proj, x)


@register(
    "linformer",
    family="low_rank",
    complexity="O(n k d)",
    paper="Linformer: Self-Attention with Linear Complexity",
    causal=(False,),
    cross=True,
    example_params=_example_params,
)
def linformer_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale: float | None = None,
    e_proj=None,
    f_proj=None,
    key_padding_mask=None,
    implementation: str | None = None,
):
    """Linformer attention: ``softmax(s * Q (E K)^T) (F V)`` with E, F in R^{k x n} projecting the kv
    sequence (length n) down to k rows, so the cost is O(n k d).

    ``e_proj`` / ``f_proj``: [k, kv_seq] shared by all heads (the paper's headwise/key-value sharing) or
    [heads, k, kv_seq] per query head. ``f_proj=None`` reuses ``e_proj`` (the paper's key-value sharing).
    Per-query masks cannot be expressed after the projection mixes keys, so there is no ``mask``; the
    optional ``key_padding_mask`` [batch, kv_seq] (True = real token) zeroes padded keys and values
    before the projection so that they have no influence. Non-causal only: E mixes all positions.

    Paper: "Linformer: Self-Attention with Linear Complexity" (Wang et al., 2020).
    """
    c.check_causal(causal, (False,), "linformer")
    c.check_qkv(q, k, v)
    c.check_implementation(implementation, ("xla",), "linformer")
    scale = c.default_scale(scale, q.shape[-1])
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    if e_proj is None:
        raise ValueError("e_proj is required: the [k, kv_seq] (or [heads, k, kv_seq]) key projection")
    e_proj = _check_proj(e_proj, "e_proj", h, sk)
    f_proj = e_proj if f_proj is None else _check_proj(f_proj, "f_proj", h, sk)
    if key_padding_mask is not None:
        key_padding_mask = jnp.asarray(key_padding_mask)
        if key_padding_mask.dtype != jnp.bool_ or key_padding_mask.shape != (b, sk):
            raise ValueError(
                f"key_padding_mask must be boolean of shape [batch, kv_seq] = {(b, sk)}, "
                f"got {key_padding_mask.dtype} {key_padding_mask.shape}"
            )

    qf, kf, vf = c.upcast(q, k, v)
    kf, vf = c.repeat_kv(kf, h), c.repeat_kv(vf, h)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, :, None, None]
        kf, vf = jnp.where(keep, kf, 0.0), jnp.where(keep, vf, 0.0)
    e_proj, f_proj = e_proj.astype(qf.dtype), f_proj.astype(qf.dtype)
    k_low, v_low = _project(e_proj, kf), _project(f_proj, vf)  # [b, k, h, d]
    logits = jnp.einsum("bqhd,brhd->bhqr", qf, k_low) * scale
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqr,brhd->bqhd", p, v_low).astype(q.dtype)
