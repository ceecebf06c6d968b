"""The XLA reference: ``attn._recurrent.linear_recurrence``, for tests and benchmarks."""

from __future__ import annotations

from attn import _recurrent as r


def chunked_scalar_gate_reference(q, k, v, log_gate=None, *, initial_state=None, chunk_size=64,
                                  implementation="chunked"):
    """Same contract as ``ops.chunked_scalar_gate_recurrence``: ``(out [b, s, h, dv], final_state)``.

    ``out`` comes back in q's dtype (the recurrence itself returns the accumulation dtype), the state in float32
    (float64 for float64 inputs). ``implementation``: "chunked", "recurrent" or "parallel".
    """
    out, state = r.linear_recurrence(q, k, v, log_gate=log_gate, initial_state=initial_state,
                                     implementation=implementation, chunk_size=chunk_size)
    return out.astype(q.dtype), state


def chunked_vector_gate_reference(q, k, v, log_gate, *, initial_state=None, chunk_size=64, implementation="chunked"):
    """Same contract as ``vector_gate_ops.chunked_vector_gate_recurrence`` (log_gate [b, s, h, dk], one gate per
    key dimension): ``(out [b, s, h, dv] in q's dtype, final_state)``, through ``attn._recurrent``."""
    b, s, h, dk = q.shape
    if tuple(log_gate.shape) != (b, s, h, dk):
        raise ValueError(f"log_gate must have shape [batch, seq, heads, head_dim] = {(b, s, h, dk)}, "
                         f"got {tuple(log_gate.shape)}")
    out, state = r.linear_recurrence(q, k, v, log_gate=log_gate, initial_state=initial_state,
                                     implementation=implementation, chunk_size=chunk_size)
    return out.astype(q.dtype), state
