"""The Pallas chunked (gated) delta rule, GPU (Triton) and TPU (Mosaic) builds, run by Pallas' interpreters.

Both agree with the step-by-step float64 recurrence of ``attn._recurrent.delta_recurrence`` in the output, the final
state and the gradients of q, k, v, beta, the log gates and the initial state: lengths that are not chunk multiples,
with and without gate and initial state, several chunks, several dv blocks (summed partial gradients), strong decay.
The GPU build runs its default WY preparation (the fused Pallas kernel, ``delta_inverse_gpu.fused_prepare``, with
its backward kernel, ``delta_wy_backward_gpu``), the TPU build XLA's triangular solve.
Shapes stay tiny: interpret mode is slow.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from attn import _recurrent as r
from kernels_pallas.linear_recurrent.delta_ops import GPU_DEFAULT, DeltaConfig, chunked_delta_recurrence
import _kernel_helpers as kernel_helpers
import _linear_recurrent_helpers as helpers


def _mild_gate(key, shape):
    """Log gates of the gated delta rule's usual range: decays from ~0.5 to ~1 per step."""
    return jax.nn.log_sigmoid(jax.random.normal(key, shape) + 2.0)


def _case(seed, b, s, h, dk, dv, with_state, gate=None, dtype=jnp.float32):
    """Inputs as attn's delta rules pass them (q, k L2-normalised, q scaled) and the cotangents of (out, final)."""
    keys = jax.random.split(jax.random.key(seed), 8)
    q = (r.l2_normalize(jax.random.normal(keys[0], (b, s, h, dk))) * dk**-0.5).astype(dtype)
    k = r.l2_normalize(jax.random.normal(keys[1], (b, s, h, dk))).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, h, dv), dtype)
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (b, s, h))).astype(jnp.float32)
    log_gate = None if gate is None else gate(keys[4], (b, s, h)).astype(jnp.float32)
    h0 = jax.random.normal(keys[5], (b, h, dk, dv), jnp.float32) if with_state else None
    dout = jax.random.normal(keys[6], (b, s, h, dv), jnp.float32)
    dfinal = jax.random.normal(keys[7], (b, h, dk, dv), jnp.float32)
    return q, k, v, beta, log_gate, h0, dout, dfinal


def _reference(q, k, v, beta, log_gate, initial_state):
    return r.delta_recurrence(q, k, v, beta, log_gate=log_gate, initial_state=initial_state,
                              implementation="recurrent")


def _check_against_reference(backend, case, config, tol=1e-4):
    q, k, v, beta, gate, h0, dout, dfinal = case
    kernel = lambda *a, **kw: chunked_delta_recurrence(*a, config=config, backend=backend, interpret=True, **kw)
    args = dict(q=q, k=k, v=v, beta=beta, log_gate=gate, initial_state=h0)
    helpers.check_against_reference(kernel, _reference, args, dout, dfinal, tol)


# b, s, h, dk, dv, initial state, gate; config
GPU_CASES = {
    # Gated; dk 8 / dv 12 are padded to 16; three chunks, the last one partial.
    "gated-odd-length-initial-state": ((1, 37, 2, 8, 12, True, _mild_gate), DeltaConfig(chunk_size=16)),
    # Plain; the output kernel's and the WY kernels' 32 columns in two blocks; the walks' too (one batch * head:
    # min_block_v halves block_v for more programs).
    "plain-split-tiles": ((1, 21, 1, 32, 32, True, None),
                          DeltaConfig(chunk_size=16, block_v=None, output_block_v=16, wy_column_block=16,
                                      wy_backward_column_block=16, min_block_v=16)),
    # Gated, one chunk of 32 (the walks' gate loaded ahead stays in range), its WY inverse by two [16, 16] row
    # blocks in the inversion kernel (the GPU default's path).
    "gated-one-chunk-block-inverse": ((1, 29, 1, 16, 16, True, _mild_gate),
                                      DeltaConfig(chunk_size=32, wy_inverse_warps=1)),
}


@pytest.mark.parametrize("shape,config", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_kernel_matches_recurrent_reference(shape, config):
    _check_against_reference("triton", _case(0, *shape), config)


# One case per build (CI time): the other build's case covers the other features.
TPU_CASES = {
    # The plain delta rule; two dv blocks (partial d w, d keys, d gates summed), the last chunk partial.
    "plain-no-state-two-dv-blocks": ((1, 19, 1, 16, 32, False, None), DeltaConfig(chunk_size=8, block_v=16)),
}


@pytest.mark.parametrize("shape,config", TPU_CASES.values(), ids=TPU_CASES.keys())
def test_tpu_kernel_matches_recurrent_reference(shape, config):
    _check_against_reference("mosaic_tpu", _case(1, *shape), config)


def test_strong_decay_stays_finite_and_exact():
    # Log gates ~ -30 per step: cumulative sums reach ~-500 in a chunk, so exp of any positive difference would
    # overflow; every second step barely decays.
    def gate(key, shape):
        strong = -30.0 + jax.random.uniform(key, shape, minval=-5.0, maxval=5.0)
        return jnp.where(jnp.arange(shape[1])[:, None] % 2 == 0, strong, -0.01)

    _check_against_reference("triton", _case(2, 1, 40, 1, 16, 16, True, gate), DeltaConfig(chunk_size=32))


@pytest.mark.parametrize("wy_operands", ["input", "float32"])
def test_bfloat16_keeps_dtype_and_float32_state(wy_operands):
    # The GPU build in the interpreter; "input": the fused WY kernels' dots on bf16 operands (the GPU default).
    q, k, v, beta, gate, h0, dout, dfinal = _case(4, 1, 33, 2, 16, 16, True, _mild_gate, dtype=jnp.bfloat16)
    config = DeltaConfig(chunk_size=16, block_v=None, wy_operands=wy_operands)
    kernel = lambda *a, **kw: chunked_delta_recurrence(*a, interpret=True, backend="triton", config=config, **kw)
    args = dict(q=q, k=k, v=v, beta=beta, log_gate=gate, initial_state=h0)
    out, final, names, vjp = helpers.run(kernel, **args)
    ref_out, ref_final, _, ref_vjp = helpers.run(_reference, **{n: helpers.f64(x) for n, x in args.items()})
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert helpers.rel_err(out, ref_out) < 2e-2
    assert helpers.rel_err(final, ref_final) < 2e-2
    grads = vjp((dout.astype(jnp.bfloat16), dfinal))
    ref_grads = ref_vjp((helpers.f64(dout.astype(jnp.bfloat16)), helpers.f64(dfinal)))
    for name, g, want in zip(names, grads, ref_grads):
        assert g.dtype == args[name].dtype, name
        assert helpers.rel_err(g, want) < 5e-2, name


@pytest.mark.parametrize("name", ["delta_rule", "gated_delta_rule"])
def test_attn_pallas_implementation_matches_chunked_with_gqa(name):
    helpers.check_mechanism_pallas_matches_chunked(name)


BAD_ARGUMENTS = {
    "beta of the wrong shape": (dict(beta=jnp.zeros((1, 16, 1))), "beta"),
    "log gate per key dim": (dict(log_gate=jnp.zeros((1, 16, 2, 16))), "log_gate"),
    "positive log gate": (dict(log_gate=jnp.full((1, 16, 2), 0.1)), "log_gate must be <= 0"),
    "value block not a power of two": (dict(config=DeltaConfig(chunk_size=16, block_v=12)), "block_v"),
    "walk stages not positive": (dict(config=DeltaConfig(chunk_size=16, walk_stages=0)), "walk_stages"),
    "value block floor not a power of two": (dict(config=DeltaConfig(chunk_size=16, min_block_v=24)), "min_block_v"),
    "explicit WY inverse on TPU": (dict(config=DeltaConfig(chunk_size=16, explicit_inverse=True), backend="mosaic_tpu"),
                                   "explicit_inverse"),
    "fused WY preparation on TPU": (dict(config=DeltaConfig(chunk_size=16, fused_wy=True), backend="mosaic_tpu"),
                                    "fused_wy"),
    "WY backward kernel without the fused WY": (
        dict(config=DeltaConfig(chunk_size=16, fused_wy=False, wy_backward_kernel=True), backend="triton"),
        "wy_backward_kernel"),
    "WY backward kernel not a bool": (dict(config=DeltaConfig(chunk_size=16, wy_backward_kernel=1)),
                                      "wy_backward_kernel"),
    "WY operands neither input nor float32": (dict(config=DeltaConfig(chunk_size=16, wy_operands="bf16")),
                                              "wy_operands"),
    "gradient warps not positive": (dict(config=DeltaConfig(chunk_size=16, gradient_warps=0)), "gradient_warps"),
    "WY inverse warps not positive": (dict(config=DeltaConfig(chunk_size=16, wy_inverse_warps=0)),
                                      "wy_inverse_warps"),
    "WY column block not a power of two": (dict(config=DeltaConfig(chunk_size=16, wy_column_block=48)),
                                           "wy_column_block"),
    "output block not a power of two": (dict(config=DeltaConfig(chunk_size=16, output_block_v=24)), "output_block_v"),
    **helpers.COMMON_BAD_ARGUMENTS,
}


@pytest.mark.parametrize("kwargs,name", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    kwargs = {"beta": q[..., 0], "log_gate": None, "interpret": True, **kwargs}
    with pytest.raises(ValueError, match=name):
        chunked_delta_recurrence(q, q, q, kwargs.pop("beta"), kwargs.pop("log_gate"), **kwargs)


def test_unsupported_head_dims_raise_value_error():
    helpers.check_head_dim_limits(lambda q, k, v: chunked_delta_recurrence(q, k, v, q[..., 0], interpret=True))


def test_gpu_default_and_xla_wy_backward_lower_to_triton_on_a_cpu_only_machine():
    """The GPU default (fused WY preparation with its backward kernel, C = 64) at B1 S256 H2 D128 bf16, forward and
    backward, lowers through Pallas' Triton lowering (no GPU needed; ptxas is not run); the preparation's XLA
    backward (wy_backward_kernel=False) has one kernel fewer, and so has the inversion inside the kernel that
    applies T (wy_inverse_warps=None)."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    per_step = jax.ShapeDtypeStruct((1, 256, 2), jnp.float32)

    def kernels(config):
        attend = lambda q, k, v, b, g: chunked_delta_recurrence(q, k, v, b, g, backend="triton", config=config)[0]
        f = jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4))
        return kernel_helpers.triton_kernels_lowered(f, q, q, q, per_step, per_step)

    default = kernels(None)
    assert default >= 6
    assert kernels(dataclasses.replace(GPU_DEFAULT, wy_backward_kernel=True)) == default
    assert kernels(dataclasses.replace(GPU_DEFAULT, wy_backward_kernel=False)) == default - 1
    assert kernels(dataclasses.replace(GPU_DEFAULT, wy_inverse_warps=None)) == default - 1


def test_tpu_default_lowers_to_mosaic_kernels_on_a_cpu_only_machine():
    """The TPU default (the WY preparation in XLA) at B1 S256 H2 D128 bf16, value and gradients, through Pallas'
    Mosaic lowering (which the interpreter skips; libtpu's compiler does not run here)."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    per_step = jax.ShapeDtypeStruct((1, 256, 2), jnp.float32)
    attend = lambda q, k, v, b, g: chunked_delta_recurrence(q, k, v, b, g, backend="mosaic_tpu")[0]
    f = jax.value_and_grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4))
    assert kernel_helpers.mosaic_tpu_kernels_lowered(f, q, q, q, per_step, per_step) == 4


def test_delta_gpu_default_halves_the_walks_value_block_only_where_few_programs():
    # The delta rule's walks carry [dk, block_v]: batch * heads * dv / block_v programs, block_v halved below
    # FUSED_MIN_PROGRAMS, not below min_block_v (GPU default 16).
    from kernels_pallas.linear_recurrent import config as config_lib
    from kernels_pallas.linear_recurrent.delta_ops import GPU_DEFAULT

    halved = {bh: config_lib.halved_for_programs(GPU_DEFAULT.block_v, GPU_DEFAULT.min_block_v,
                                                 lambda block: bh * (128 // block)) for bh in (1, 16, 64)}
    assert halved == {1: 16, 16: 16, 64: 64}
    assert config_lib.halved_for_programs(64, None, lambda block: 1) == 64
