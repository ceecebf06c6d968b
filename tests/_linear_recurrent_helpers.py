"""Checks shared by the tests of the chunked linear-recurrent Pallas kernels (scalar gate, vector gate, delta rule).

Every kernel here maps (q, k, v, per-step inputs..., initial_state=) to (out, final_state); its reference is the
step-by-step recurrence run in float64 on the same values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


# Bad arguments every entry refuses with a ValueError naming them, for q = k = v = zeros([1, 16, 2, 16]):
# {description: (keyword arguments, name the message must contain)}.
COMMON_BAD_ARGUMENTS = {
    "chunk not a power of two": (dict(chunk_size=24), "chunk_size"),
    "chunk too small to tile on GPU": (dict(chunk_size=8, backend="triton"), "chunk_size"),
    "initial state of the wrong shape": (dict(initial_state=jnp.zeros((1, 2, 16, 8))), "initial_state"),
    "unknown backend": (dict(backend="cuda"), "backend"),
}


def rel_err(a, b):
    """Relative Frobenius error of a against b, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def f64(x):
    return None if x is None else x.astype(jnp.float64)


def random_case(seed, b, s, h, dk, dv, with_state, dtype=jnp.float32):
    """(q, k, v, a key for the gates, h0 or None, dout, dfinal): q, v standard normal, k scaled by dk^-1/2; the
    state and the cotangents of (out, final_state) in float32."""
    keys = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(keys[0], (b, s, h, dk), dtype)
    k = jax.random.normal(keys[1], (b, s, h, dk), dtype) * dk**-0.5
    v = jax.random.normal(keys[2], (b, s, h, dv), dtype)
    h0 = jax.random.normal(keys[4], (b, h, dk, dv), jnp.float32) if with_state else None
    dout = jax.random.normal(keys[5], (b, s, h, dv), jnp.float32)
    dfinal = jax.random.normal(keys[6], (b, h, dk, dv), jnp.float32)
    return q, k, v, keys[3], h0, dout, dfinal


def call(fn, args):
    """``fn(*args before initial_state, initial_state=...)``: ``args`` in fn's order, ``initial_state`` last."""
    args = dict(args)
    initial_state = args.pop("initial_state")
    return fn(*args.values(), initial_state=initial_state)


def run(fn, **args):
    """(out, final, names of the args that are not None, a vjp function over those args) of ``call(fn, args)``."""
    names = [n for n, x in args.items() if x is not None]
    (out, final), vjp = jax.vjp(lambda *xs: call(fn, {**args, **dict(zip(names, xs))}), *(args[n] for n in names))
    return out, final, names, vjp


def check_against_reference(kernel, reference, args, dout, dfinal, tol):
    """The kernel on ``args`` (float32) and the reference on them in float64 agree within ``tol`` (relative) in the
    output, the final state and the gradients of every argument given; dtypes and shapes kept, all finite."""
    out, final, names, vjp = run(kernel, **args)
    ref_out, ref_final, _, ref_vjp = run(reference, **{n: f64(x) for n, x in args.items()})
    assert out.shape == ref_out.shape and out.dtype == args["q"].dtype
    assert final.shape == ref_final.shape and final.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(final)).all()
    assert rel_err(out, ref_out) < tol
    assert rel_err(final, ref_final) < tol
    grads = vjp((dout.astype(out.dtype), dfinal))
    ref_grads = ref_vjp((f64(dout), f64(dfinal)))
    for name, g, want in zip(names, grads, ref_grads):
        assert g.shape == want.shape, name
        assert np.isfinite(np.asarray(g)).all(), name
        assert rel_err(g, want) < tol, name


def check_bfloat16_forward(kernel, reference, args):
    """With q, k, v of ``args`` rounded to bfloat16, the kernel's output stays bfloat16 and its final state float32,
    both within 2e-2 of the float64 reference on the rounded values."""
    args = {n: x.astype(jnp.bfloat16) if n in ("q", "k", "v") else x for n, x in args.items()}
    out, final = call(kernel, args)
    ref_out, ref_final = call(reference, {n: f64(x) for n, x in args.items()})
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert rel_err(out, ref_out) < 2e-2
    assert rel_err(final, ref_final) < 2e-2


def check_two_segments_equal_one_pass(run_segment, h0, split):
    """``run_segment(steps slice, initial_state) -> (out, final)``: running [:split] then [split:] from the carried
    state gives the one-pass output and final state."""
    whole, whole_final = run_segment(slice(None), h0)
    first, mid_state = run_segment(slice(0, split), h0)
    second, final = run_segment(slice(split, None), mid_state)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, whole_final, rtol=1e-5, atol=1e-5)


def check_head_dim_limits(call):
    """``call(q, k, v)`` raises ValueError naming head_dim for dk = 512 and v_head_dim for dv = 300."""
    q = jnp.zeros((1, 16, 2, 512), jnp.float32)
    with pytest.raises(ValueError, match="head_dim"):
        call(q, q, q[..., :16])
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="v_head_dim"):
        call(q, q, jnp.zeros((1, 16, 2, 300), q.dtype))


def check_mechanism_pallas_matches_chunked(name):
    """attn's ``name`` with implementation="pallas" matches "chunked" with GQA (4 query heads on 2 kv heads), an
    initial state and the final state returned, in the output, the state and all gradients; segment_ids are
    refused."""
    import attn

    spec = attn.spec(name)
    keys = jax.random.split(jax.random.key(5), 6)
    q = jax.random.normal(keys[0], (1, 21, 4, 16), jnp.float32)
    k = jax.random.normal(keys[1], (1, 21, 2, 16), jnp.float32)
    v = jax.random.normal(keys[2], (1, 21, 2, 16), jnp.float32)
    h0 = jax.random.normal(keys[3], (1, 4, 16, 16), jnp.float32)
    params = spec.params(jax.random.key(6), q.shape, k.shape, 16, True)

    def f(impl):
        return lambda q, k, v, h0: spec.fn(q, k, v, causal=True, chunk_size=16, implementation=impl,
                                           initial_state=h0, return_state=True, **params)

    (out, state), vjp = jax.vjp(f("pallas"), q, k, v, h0)
    (ref, ref_state), ref_vjp = jax.vjp(f("chunked"), q, k, v, h0)
    assert out.dtype == q.dtype
    assert rel_err(out, ref) < 1e-5 and rel_err(state, ref_state) < 1e-5
    # Random cotangents: lightning's output is RMS-normalised, so (out, state) itself would give dq = 0 up to
    # rounding (the norm's Jacobian is orthogonal to its output) and compare noise with noise.
    cotangents = (jax.random.normal(keys[4], out.shape, out.dtype),
                  jax.random.normal(keys[5], state.shape, state.dtype))
    for g, want in zip(vjp(cotangents), ref_vjp(cotangents)):
        assert rel_err(g, want) < 1e-5
    with pytest.raises(ValueError, match="segment_ids"):
        spec.fn(q, k, v, causal=True, implementation="pallas", segment_ids=jnp.zeros((1, 21), jnp.int32), **params)
