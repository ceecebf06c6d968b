"""The Pallas chunked vector-gate (GLA) recurrence, GPU (Triton) and TPU (Mosaic) builds, run by Pallas' interpreters.

Both agree with the step-by-step float64 recurrence of ``attn._recurrent`` in the output, the final state and the
gradients of q, k, v, the log gates and the initial state: lengths that are not chunk multiples, with and without
initial state, several chunks and sub-chunks, several dk / dv blocks (summed partial gradients), strong decay.
Shapes stay tiny: interpret mode is slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.linear_recurrent.reference import chunked_vector_gate_reference
from kernels_pallas.linear_recurrent.vector_gate_ops import VectorGateConfig, chunked_vector_gate_recurrence


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _f64(x):
    return None if x is None else x.astype(jnp.float64)


def _case(seed, b, s, h, dk, dv, with_state, gate, dtype=jnp.float32):
    """Inputs and the cotangents of (out, final_state). ``gate(key, shape)`` makes the log gates."""
    keys = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(keys[0], (b, s, h, dk), dtype)
    k = jax.random.normal(keys[1], (b, s, h, dk), dtype) * dk**-0.5
    v = jax.random.normal(keys[2], (b, s, h, dv), dtype)
    log_gate = gate(keys[3], (b, s, h, dk)).astype(jnp.float32)
    h0 = jax.random.normal(keys[4], (b, h, dk, dv), jnp.float32) if with_state else None
    dout = jax.random.normal(keys[5], (b, s, h, dv), jnp.float32)
    dfinal = jax.random.normal(keys[6], (b, h, dk, dv), jnp.float32)
    return q, k, v, log_gate, h0, dout, dfinal


def _mixed_gate(key, shape):
    """Log gates from a log-sigmoid: per-dimension decay rates from ~0 to ~-5 per step."""
    return jax.nn.log_sigmoid(2.0 * jax.random.normal(key, shape))


def _run(fn, q, k, v, gate, h0):
    """Output, final state and a vjp function over the differentiable inputs that are not None."""
    args = {"q": q, "k": k, "v": v, "log_gate": gate, "initial_state": h0}
    names = [n for n, x in args.items() if x is not None]

    def f(*xs):
        kw = {**args, **dict(zip(names, xs))}
        return fn(kw["q"], kw["k"], kw["v"], kw["log_gate"], initial_state=kw["initial_state"])

    (out, final), vjp = jax.vjp(f, *(args[n] for n in names))
    return out, final, names, vjp


def _check_against_reference(backend, case, config, tol=1e-5):
    q, k, v, gate, h0, dout, dfinal = case
    kernel = lambda *a, **kw: chunked_vector_gate_recurrence(*a, config=config, backend=backend, interpret=True, **kw)
    out, final, names, vjp = _run(kernel, q, k, v, gate, h0)
    reference = lambda *a, **kw: chunked_vector_gate_reference(*a, implementation="recurrent", **kw)
    ref_out, ref_final, _, ref_vjp = _run(reference, _f64(q), _f64(k), _f64(v), _f64(gate), _f64(h0))
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert final.shape == ref_final.shape and final.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(final)).all()
    assert _rel_err(out, ref_out) < tol
    assert _rel_err(final, ref_final) < tol
    grads = vjp((dout, dfinal))
    ref_grads = ref_vjp((_f64(dout), _f64(dfinal)))
    for name, g, r in zip(names, grads, ref_grads):
        assert g.shape == r.shape, name
        assert np.isfinite(np.asarray(g)).all(), name
        assert _rel_err(g, r) < tol, name


# b, s, h, dk, dv, initial state; config
GPU_CASES = {
    # dk 8 / dv 12 are padded to 16; two chunks of two sub-chunks, the second chunk partial.
    "odd-length-initial-state": ((1, 37, 2, 8, 12, True), VectorGateConfig(chunk_size=32, sub_chunk=16)),
    # Two dk and two dv blocks in the state passes, two dv blocks (partial dq, dk, dgate) in the chunk passes.
    "no-state-split-blocks": ((1, 45, 1, 32, 32, False),
                              VectorGateConfig(chunk_size=16, sub_chunk=16, state_block_k=16, state_block_v=16,
                                               block_v=16)),
}


@pytest.mark.parametrize("shape,config", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_kernel_matches_recurrent_reference(shape, config):
    _check_against_reference("triton", _case(0, *shape, _mixed_gate), config)


TPU_CASES = {
    "odd-length-initial-state": ((1, 29, 2, 8, 12, True), VectorGateConfig(chunk_size=16, sub_chunk=8)),
    "no-state-split-blocks": ((1, 19, 1, 16, 32, False),
                              VectorGateConfig(chunk_size=8, sub_chunk=8, state_block_k=8, state_block_v=16,
                                               block_v=16)),
}


@pytest.mark.parametrize("shape,config", TPU_CASES.values(), ids=TPU_CASES.keys())
def test_tpu_kernel_matches_recurrent_reference(shape, config):
    _check_against_reference("mosaic_tpu", _case(1, *shape, _mixed_gate), config)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_strong_decay_stays_finite_and_exact(backend):
    # Half the key dimensions forget with log gates ~ -30 per step (cumulative sums reach ~-1000 in a chunk, so
    # exp of any positive difference would overflow), the other half barely decay.
    def gate(key, shape):
        strong = -30.0 + jax.random.uniform(key, shape, minval=-5.0, maxval=5.0)
        mild = jax.nn.log_sigmoid(jax.random.normal(key, shape) + 4.0)
        return jnp.where(jnp.arange(shape[-1]) % 2 == 0, strong, mild)

    config = VectorGateConfig(chunk_size=32, sub_chunk=16) if backend == "triton" else VectorGateConfig(chunk_size=16, sub_chunk=8)
    _check_against_reference(backend, _case(2, 1, 40, 1, 16, 16, True, gate), config)


def test_two_segments_with_carried_state_equal_one_pass():
    q, k, v, gate, h0, _, _ = _case(3, 1, 40, 2, 16, 16, True, _mixed_gate)
    run = lambda sl, state: chunked_vector_gate_recurrence(q[:, sl], k[:, sl], v[:, sl], gate[:, sl],
                                                           initial_state=state, interpret=True)
    whole, whole_final = run(slice(None), h0)
    first, mid_state = run(slice(0, 23), h0)
    second, final = run(slice(23, None), mid_state)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, whole_final, rtol=1e-5, atol=1e-5)


def test_bfloat16_keeps_dtype_and_float32_state():
    q, k, v, gate, h0, _, _ = _case(4, 1, 33, 2, 16, 16, True, _mixed_gate)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out, final = chunked_vector_gate_recurrence(qb, kb, vb, gate, initial_state=h0, interpret=True)
    ref_out, ref_final = chunked_vector_gate_reference(_f64(qb), _f64(kb), _f64(vb), _f64(gate),
                                                       initial_state=_f64(h0))
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert _rel_err(out, ref_out) < 2e-2
    assert _rel_err(final, ref_final) < 2e-2


BAD_ARGUMENTS = {
    "scalar gate instead of one per key dim": (dict(log_gate=jnp.zeros((1, 16, 2))), "log_gate"),
    "gate of the wrong width": (dict(log_gate=jnp.zeros((1, 16, 2, 8))), "log_gate"),
    "chunk not a power of two": (dict(chunk_size=24), "chunk_size"),
    "chunk too small to tile on GPU": (dict(chunk_size=8, backend="triton"), "chunk_size"),
    "sub-chunk not dividing the chunk": (dict(config=VectorGateConfig(chunk_size=16, sub_chunk=32)), "sub_chunk"),
    "initial state of the wrong shape": (dict(initial_state=jnp.zeros((1, 2, 16, 8))), "initial_state"),
    "unknown backend": (dict(backend="cuda"), "backend"),
}


@pytest.mark.parametrize("kwargs,name", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    kwargs = {"log_gate": q, "interpret": True, **kwargs}
    with pytest.raises(ValueError, match=name):
        chunked_vector_gate_recurrence(q, q, q, kwargs.pop("log_gate"), **kwargs)


def test_unsupported_head_dims_raise_value_error():
    q = jnp.zeros((1, 16, 2, 512), jnp.float32)
    with pytest.raises(ValueError, match="head_dim"):
        chunked_vector_gate_recurrence(q, q, q[..., :16], q, interpret=True)
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="v_head_dim"):
        chunked_vector_gate_recurrence(q, q, jnp.zeros((1, 16, 2, 300), q.dtype), q, interpret=True)


def test_gla_pallas_implementation_matches_chunked_with_gqa():
    import attn

    spec = attn.spec("gla")
    keys = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(keys[0], (1, 21, 4, 16), jnp.float32)
    k = jax.random.normal(keys[1], (1, 21, 2, 16), jnp.float32)
    v = jax.random.normal(keys[2], (1, 21, 2, 16), jnp.float32)
    params = spec.params(jax.random.key(6), q.shape, k.shape, 16, True)
    f = lambda impl: lambda q, k, v: spec.fn(q, k, v, causal=True, chunk_size=16, implementation=impl, **params)
    out, vjp = jax.vjp(f("pallas"), q, k, v)
    ref, ref_vjp = jax.vjp(f("chunked"), q, k, v)
    assert _rel_err(out, ref) < 1e-5
    for g, r in zip(vjp(out), ref_vjp(out)):
        assert _rel_err(g, r) < 1e-5
    with pytest.raises(ValueError, match="segment_ids"):
        spec.fn(q, k, v, causal=True, implementation="pallas", segment_ids=jnp.zeros((1, 21), jnp.int32), **params)
