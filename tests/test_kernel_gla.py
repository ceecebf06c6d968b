"""The Pallas chunked vector-gate (GLA) recurrence, GPU (Triton) and TPU (Mosaic) builds, run by Pallas' interpreters.

Both agree with the step-by-step float64 recurrence of ``attn._recurrent`` in the output, the final state and the
gradients of q, k, v, the log gates and the initial state: lengths that are not chunk multiples, with and without
initial state, several chunks and sub-chunks, several dk / dv blocks (summed partial gradients), strong decay.
Shapes stay tiny: interpret mode is slow.
"""

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.linear_recurrent.reference import chunked_vector_gate_reference
from kernels_pallas.linear_recurrent.vector_gate_ops import VectorGateConfig, chunked_vector_gate_recurrence
import _kernel_helpers as kernel_helpers
import _linear_recurrent_helpers as helpers


def _case(seed, b, s, h, dk, dv, with_state, gate, dtype=jnp.float32):
    """Inputs and the cotangents of (out, final_state). ``gate(key, shape)`` makes the log gates."""
    q, k, v, gate_key, h0, dout, dfinal = helpers.random_case(seed, b, s, h, dk, dv, with_state, dtype)
    return q, k, v, gate(gate_key, (b, s, h, dk)).astype(jnp.float32), h0, dout, dfinal


def _mixed_gate(key, shape):
    """Log gates from a log-sigmoid: per-dimension decay rates from ~0 to ~-5 per step."""
    return jax.nn.log_sigmoid(2.0 * jax.random.normal(key, shape))


def _check_against_reference(backend, case, config, tol=1e-5):
    q, k, v, gate, h0, dout, dfinal = case
    kernel = lambda *a, **kw: chunked_vector_gate_recurrence(*a, config=config, backend=backend, interpret=True, **kw)
    reference = lambda *a, **kw: chunked_vector_gate_reference(*a, implementation="recurrent", **kw)
    args = dict(q=q, k=k, v=v, log_gate=gate, initial_state=h0)
    helpers.check_against_reference(kernel, reference, args, dout, dfinal, tol)


# b, s, h, dk, dv, initial state; config
GPU_CASES = {
    # dk 8 / dv 12 are padded to 16; two chunks of two sub-chunks, the second chunk partial.
    "odd-length-initial-state": ((1, 37, 2, 8, 12, True), VectorGateConfig(chunk_size=32, sub_chunk=16)),
    # The scores in their own kernels (A forward, dA backward): four sub-chunks (first, middle, last), two dv
    # blocks (dA's terms go to one block's partials).
    "scores-kernel": ((1, 70, 1, 16, 32, True),
                      VectorGateConfig(chunk_size=64, sub_chunk=16, block_v=16, scores_kernel=True)),
}


@pytest.mark.parametrize("shape,config", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_kernel_matches_recurrent_reference(shape, config):
    _check_against_reference("triton", _case(0, *shape, _mixed_gate), config)


# One case per build (CI time): the other build's case covers the other features.
TPU_CASES = {
    # Two dk and two dv blocks in the state passes, two dv blocks (partial dq, dk, dgate) in the chunk passes.
    "no-state-split-blocks": ((1, 19, 1, 16, 32, False),
                              VectorGateConfig(chunk_size=8, sub_chunk=8, state_block_k=8, state_block_v=16,
                                               block_v=16)),
}


@pytest.mark.parametrize("shape,config", TPU_CASES.values(), ids=TPU_CASES.keys())
def test_tpu_kernel_matches_recurrent_reference(shape, config):
    _check_against_reference("mosaic_tpu", _case(1, *shape, _mixed_gate), config)


STRONG_DECAY_CONFIGS = {
    "triton": ("triton", VectorGateConfig(chunk_size=32, sub_chunk=16)),
    "triton-scores-kernel": ("triton", VectorGateConfig(chunk_size=32, sub_chunk=16, scores_kernel=True)),
    "mosaic_tpu": ("mosaic_tpu", VectorGateConfig(chunk_size=16, sub_chunk=8)),
}


@pytest.mark.parametrize("backend,config", STRONG_DECAY_CONFIGS.values(), ids=STRONG_DECAY_CONFIGS.keys())
def test_strong_decay_stays_finite_and_exact(backend, config):
    # From step 52 on, half the key dimensions forget with log gates ~ -30 per step (cumulative sums reach ~-1000
    # in a chunk, so exp of any positive difference would overflow), the other half barely decay. With the GPU's
    # 32-step chunks the first chunk factors whole (the scores kernel's chunk-wide matmuls), the second chunk's first
    # sub-chunk through one reference row (span <= FACTORED_SPAN) and its last sub-chunk takes the column loop.
    def gate(key, shape):
        strong = -30.0 + jax.random.uniform(key, shape, minval=-5.0, maxval=5.0)
        mild = jax.nn.log_sigmoid(jax.random.normal(key, shape) + 4.0)
        strong_here = (jnp.arange(shape[-1]) % 2 == 0) & (jnp.arange(shape[1]) >= 52)[:, None, None]
        return jnp.where(strong_here, strong, mild)

    _check_against_reference(backend, _case(2, 1, 56, 1, 16, 16, True, gate), config)


def test_two_segments_with_carried_state_equal_one_pass():
    q, k, v, gate, h0, _, _ = _case(3, 1, 40, 2, 16, 16, True, _mixed_gate)
    run = lambda sl, state: chunked_vector_gate_recurrence(q[:, sl], k[:, sl], v[:, sl], gate[:, sl],
                                                           initial_state=state, interpret=True)
    helpers.check_two_segments_equal_one_pass(run, h0, split=23)


def test_bfloat16_keeps_dtype_and_float32_state():
    q, k, v, gate, h0, _, _ = _case(4, 1, 33, 2, 16, 16, True, _mixed_gate)
    kernel = lambda *a, **kw: chunked_vector_gate_recurrence(*a, interpret=True, **kw)
    helpers.check_bfloat16_forward(kernel, chunked_vector_gate_reference,
                                   dict(q=q, k=k, v=v, log_gate=gate, initial_state=h0))


BAD_ARGUMENTS = {
    "scalar gate instead of one per key dim": (dict(log_gate=jnp.zeros((1, 16, 2))), "log_gate"),
    "gate of the wrong width": (dict(log_gate=jnp.zeros((1, 16, 2, 8))), "log_gate"),
    "positive log gate": (dict(log_gate=jnp.zeros((1, 16, 2, 16)).at[0, 0, 0, 5].set(1e-3)), "log_gate must be <= 0"),
    "sub-chunk not dividing the chunk": (dict(config=VectorGateConfig(chunk_size=16, sub_chunk=32)), "sub_chunk"),
    "scores kernel on TPU": (dict(config=VectorGateConfig(scores_kernel=True), backend="mosaic_tpu"),
                             "scores_kernel"),
    "reverse state pass stages not positive": (dict(config=VectorGateConfig(dstate_stages=0)), "dstate_stages"),
    **helpers.COMMON_BAD_ARGUMENTS,
}


@pytest.mark.parametrize("kwargs,name", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    kwargs = {"log_gate": q, "interpret": True, **kwargs}
    with pytest.raises(ValueError, match=name):
        chunked_vector_gate_recurrence(q, q, q, kwargs.pop("log_gate"), **kwargs)


def test_unsupported_head_dims_raise_value_error():
    helpers.check_head_dim_limits(lambda q, k, v: chunked_vector_gate_recurrence(q, k, v, q, interpret=True))


def test_gla_pallas_implementation_matches_chunked_with_gqa():
    helpers.check_mechanism_pallas_matches_chunked("gla")


@pytest.mark.parametrize("config,warps", [(None, [4, 4, 8, 4, 8, 8, 8]), (VectorGateConfig(num_warps=8), [8] * 4)],
                         ids=["default", "one-kernel"])
def test_gpu_build_lowers_to_triton_kernels_on_a_cpu_only_machine(config, warps):
    """The GPU default (config=None, backend="triton": ``scores_kernel``, its data-dependent choice between the
    factored diagonal blocks and the column loop) and the one-kernel output and gradients at B1 S256 H2 D128 bf16,
    forward (its value too) and backward, lower through Pallas' Triton lowering (no GPU needed; ptxas is not run),
    each kernel with its warps: state pass, scores + output (or output), dstate pass, dscores + intra-chunk
    gradients + gradients (or gradients)."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    gate = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.float32)
    attend = lambda q, k, v, g: chunked_vector_gate_recurrence(q, k, v, g, backend="triton", config=config)[0]
    f = jax.value_and_grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))
    assert kernel_helpers.triton_kernel_warps(f, q, q, q, gate) == warps


def test_tpu_build_lowers_to_mosaic_kernels_on_a_cpu_only_machine():
    """The TPU default at B1 S256 H2 D128 bf16, forward and backward, through Pallas' Mosaic lowering (the
    interpreter skips it): state pass, output, dstate pass, gradients, each sub-chunk's factored / looped choice
    included."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    gate = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.float32)
    attend = lambda q, k, v, g: chunked_vector_gate_recurrence(q, k, v, g, backend="mosaic_tpu")[0]
    f = jax.value_and_grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))
    assert kernel_helpers.mosaic_tpu_kernels_lowered(f, q, q, q, gate) == 4
