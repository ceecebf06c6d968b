"""The Pallas chunked scalar-gate recurrence, GPU (Triton) and TPU (Mosaic) builds, run by Pallas' interpreters.

Both agree with the step-by-step float64 recurrence of ``attn._recurrent`` in the output, the final state and the
gradients of q, k, v, the log gates and the initial state: odd lengths (not multiples of the chunk), with and
without initial state and gate, several dv blocks (summed partial gradients), several chunk sizes. Strong decay
stays finite. Shapes stay tiny: interpret mode is slow.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.linear_recurrent import ChunkConfig, chunked_scalar_gate_recurrence, chunked_scalar_gate_reference
import _linear_recurrent_helpers as helpers
import _kernel_helpers as kernel_helpers


def _case(seed, b, s, h, dk, dv, with_state, gate_scale, dtype=jnp.float32):
    """Inputs and the cotangents of (out, final_state). gate_scale None = no gate; else log gates in
    [-gate_scale * ~5, 0] from a log-sigmoid."""
    q, k, v, gate_key, h0, dout, dfinal = helpers.random_case(seed, b, s, h, dk, dv, with_state, dtype)
    gate = None
    if gate_scale is not None:
        gate = gate_scale * jax.nn.log_sigmoid(2.0 * jax.random.normal(gate_key, (b, s, h), jnp.float32))
    return q, k, v, gate, h0, dout, dfinal


def _reference(*args, **kwargs):
    return chunked_scalar_gate_reference(*args, implementation="recurrent", **kwargs)


def _check_against_reference(backend, seed, b, s, h, dk, dv, with_state, gate_scale, config, tol=1e-5):
    q, k, v, gate, h0, dout, dfinal = _case(seed, b, s, h, dk, dv, with_state, gate_scale)
    kernel = lambda *a, **kw: chunked_scalar_gate_recurrence(*a, config=config, backend=backend, interpret=True, **kw)
    args = dict(q=q, k=k, v=v, log_gate=gate, initial_state=h0)
    helpers.check_against_reference(kernel, _reference, args, dout, dfinal, tol)


# b, s, h, dk, dv, initial state, gate scale (None = no gate), config
GPU_CASES = {
    "odd-length-initial-state": (1, 37, 2, 8, 12, True, 1.0, ChunkConfig(chunk_size=16)),
    "no-gate-no-state-two-v-blocks": (2, 21, 1, 16, 32, False, None, ChunkConfig(chunk_size=16, block_v=16,
                                                                                     output_block_v=16)),
    # The reverse state pass on half the forward's rows (dstate_row_split): dk 32 by one block forward, two back.
    "chunk-32-three-chunks-reverse-rows-split": (1, 70, 1, 32, 16, True, 0.5, ChunkConfig(chunk_size=32,
                                                                                          dstate_row_split=2)),
    # The GPU default's forward: one sequential kernel writing outputs and states.
    "fused-forward-initial-state-two-v-blocks": (1, 37, 2, 8, 32, True, 1.0,
                                                 ChunkConfig(chunk_size=16, block_v=16, fused_forward=True)),
    # Plain linear attention through the GPU default's forward: the kernels' no-gate specialisation (no exps).
    "no-gate-fused-forward-initial-state": (1, 37, 2, 8, 16, True, None, ChunkConfig(chunk_size=16,
                                                                                      fused_forward=True)),
    # One (batch, head): min_block_k halves the state's rows (dk 32 in two blocks of 16) for more programs.
    "state-rows-halved-two-k-blocks": (1, 37, 1, 32, 16, True, 1.0, ChunkConfig(chunk_size=16, block_k=32,
                                                                                min_block_k=16)),
}


@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_kernel_matches_recurrent_reference(case):
    _check_against_reference("triton", 0, *case)


def test_gpu_default_lowers_to_triton_kernels_on_a_cpu_only_machine():
    """The GPU default (config=None, backend="triton") at B1 S256 H2 D128 bf16 lowers through Pallas' Triton
    lowering, forward and backward, with its launch settings (no GPU needed; ptxas is not run)."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    gate = jax.ShapeDtypeStruct((1, 256, 2), jnp.float32)
    attend = lambda q, k, v, g: chunked_scalar_gate_recurrence(q, k, v, log_gate=g, backend="triton")[0]
    f = jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))
    # Two-pass forward (4 programs: too few for the fused walk) with 4 warps; the reverse dS pass with 2
    # (dstate_warps), the gradients with 8 (the backward's).
    assert kernel_helpers.triton_kernel_warps(f, q, q, q, gate) == [4, 4, 2, 8]


def test_tpu_default_lowers_to_mosaic_kernels_on_a_cpu_only_machine():
    """The TPU default at B1 S256 H2 D128 bf16, value and gradients, through Pallas' Mosaic lowering (which the
    interpreter skips; libtpu's compiler does not run here): forward state pass, output, dS pass, gradients."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    gate = jax.ShapeDtypeStruct((1, 256, 2), jnp.float32)
    attend = lambda q, k, v, g: chunked_scalar_gate_recurrence(q, k, v, log_gate=g, backend="mosaic_tpu")[0]
    f = jax.value_and_grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))
    assert kernel_helpers.mosaic_tpu_kernels_lowered(f, q, q, q, gate) == 4


def test_backward_launch_settings_reach_only_the_backward_kernels():
    config = ChunkConfig(chunk_size=64, block_k=64, block_v=64, fused_forward=True, num_warps=4, num_warps_bwd=8)
    assert config.backward() == dataclasses.replace(config, num_warps=8)
    assert ChunkConfig(num_stages=3).backward() == ChunkConfig(num_stages=3)  # None: the forward's settings
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    gate = jax.ShapeDtypeStruct((1, 256, 2), jnp.float32)
    attend = lambda q, k, v, g: chunked_scalar_gate_recurrence(q, k, v, log_gate=g, backend="triton",
                                                               config=config)[0]
    f = jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))
    assert kernel_helpers.triton_kernel_warps(f, q, q, q, gate) == [4, 8, 8]


TPU_CASES = {
    "odd-length-initial-state": (1, 29, 2, 8, 12, True, 1.0, ChunkConfig(chunk_size=8)),
    "no-state-two-v-blocks": (1, 19, 1, 16, 32, False, 0.5, ChunkConfig(chunk_size=8, block_v=16)),
}


@pytest.mark.parametrize("case", TPU_CASES.values(), ids=TPU_CASES.keys())
def test_tpu_kernel_matches_recurrent_reference(case):
    _check_against_reference("mosaic_tpu", 1, *case)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_strong_decay_stays_finite_and_exact(backend):
    # Log gates down to -1e4 per step: exp of any positive cumulative difference would overflow float32.
    q, k, v, _, h0, dout, dfinal = _case(2, 1, 24, 1, 8, 8, True, None)
    gate = -jnp.logspace(-2, 4, 24, dtype=jnp.float32)[None, :, None][:, ::-1]
    kernel = lambda *a, **kw: chunked_scalar_gate_recurrence(*a, chunk_size=16 if backend == "triton" else 8,
                                                             backend=backend, interpret=True, **kw)
    # Looser than elsewhere: after gates of -1e4 the float32 cumulative gates are ~-1e4, so the differences of
    # the small gates that follow lose ~1e4 * 2^-24 in absolute terms (the XLA chunked form shares this).
    args = dict(q=q, k=k, v=v, log_gate=gate, initial_state=h0)
    helpers.check_against_reference(kernel, _reference, args, dout, dfinal, tol=1e-4)


def test_two_segments_with_carried_state_equal_one_pass():
    q, k, v, gate, h0, _, _ = _case(3, 1, 40, 2, 16, 16, True, 1.0)
    run = lambda sl, state: chunked_scalar_gate_recurrence(q[:, sl], k[:, sl], v[:, sl], gate[:, sl],
                                                           initial_state=state, interpret=True)
    helpers.check_two_segments_equal_one_pass(run, h0, split=23)


def test_bfloat16_keeps_dtype_and_float32_state():
    q, k, v, gate, h0, _, _ = _case(4, 1, 33, 2, 16, 16, True, 1.0)
    kernel = lambda *a, **kw: chunked_scalar_gate_recurrence(*a, interpret=True, **kw)
    helpers.check_bfloat16_forward(kernel, chunked_scalar_gate_reference,
                                   dict(q=q, k=k, v=v, log_gate=gate, initial_state=h0))


BAD_ARGUMENTS = {
    "gate shape mismatch": (dict(log_gate=jnp.zeros((1, 16, 2, 16))), "log_gate"),
    "gate of the wrong length": (dict(log_gate=jnp.zeros((1, 15, 2))), "log_gate"),
    "positive log gate": (dict(log_gate=jnp.zeros((1, 16, 2)).at[0, 3, 1].set(0.5)), "log_gate must be <= 0"),
    "block_v not a power of two": (dict(config=ChunkConfig(chunk_size=16, block_v=12)), "block_v"),
    "output block_v not a power of two": (dict(config=ChunkConfig(chunk_size=16, output_block_v=48)),
                                          "output_block_v"),
    "reverse rows split by 3": (dict(config=ChunkConfig(chunk_size=16, dstate_row_split=3)), "dstate_row_split"),
    "state pass stages not positive": (dict(config=ChunkConfig(chunk_size=16, state_stages=0)), "state_stages"),
    "backward warps not positive": (dict(config=ChunkConfig(chunk_size=16, num_warps_bwd=0)), "num_warps_bwd"),
    **helpers.COMMON_BAD_ARGUMENTS,
}


@pytest.mark.parametrize("kwargs,name", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match=name):
        chunked_scalar_gate_recurrence(q, q, q, **{"interpret": True, **kwargs})


def test_unsupported_head_dims_and_shapes_raise_value_error():
    helpers.check_head_dim_limits(lambda q, k, v: chunked_scalar_gate_recurrence(q, k, v, interpret=True))
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="same shape"):
        chunked_scalar_gate_recurrence(q, q[:, :8], q, interpret=True)
    with pytest.raises(ValueError, match="float64"):
        chunked_scalar_gate_recurrence(*(q.astype(jnp.float64),) * 3, backend="triton")


@pytest.mark.parametrize("name", ["simple_gla", "retention", "lightning"])
def test_mechanism_pallas_implementation_matches_chunked_with_gqa(name):
    helpers.check_mechanism_pallas_matches_chunked(name)


def test_gpu_default_halves_the_state_rows_only_where_the_passes_have_few_programs():
    # more_state_programs: [64, 64] state blocks at dk = dv = 128 give batch * heads * 4 programs; below
    # FUSED_MIN_PROGRAMS block_k halves, not below min_block_k (32), so B1 H16 gets [32, 64] blocks (128 programs).
    from kernels_pallas.linear_recurrent import config as config_lib

    config = config_lib.GPU_DEFAULT
    block_k = {bh: config_lib.more_state_programs(config, bh, 128, 128).block_k for bh in (1, 16, 32, 64)}
    assert block_k == {1: 32, 16: 32, 32: 64, 64: 64}
    no_floor = dataclasses.replace(config, min_block_k=None)
    assert config_lib.more_state_programs(no_floor, 1, 128, 128).block_k == 64


def test_backward_config_takes_the_reverse_pass_settings_and_rows():
    # ChunkConfig.backward(): the reverse state pass's launch settings and block_k / dstate_row_split (not below
    # 16); the chunk-parallel gradients the backward's warps.
    config = ChunkConfig(block_k=64, num_warps=4, num_stages=3, num_warps_bwd=8, state_stages=4, dstate_warps=2,
                         dstate_stages=5, dstate_row_split=2)
    assert config.state_launch() == (4, 4)
    backward = config.backward()
    assert (backward.block_k, backward.num_warps, backward.num_stages, backward.state_launch()) == (32, 8, 3, (2, 5))
    assert dataclasses.replace(config, block_k=16).backward().block_k == 16
    assert ChunkConfig(num_warps=4, num_stages=2).backward().state_launch() == (4, 2)


def test_gpu_default_fuses_the_forward_only_where_it_has_enough_programs():
    # fused_forward=None: one sequential kernel when batch * heads * dv / block_v >= FUSED_MIN_PROGRAMS, else the
    # state pass and the chunk-parallel output (two kernels). Lowered for an H100, nothing runs.
    from kernels_pallas.linear_recurrent import config as config_lib

    assert config_lib.GPU_DEFAULT.fused_forward is None
    attend = lambda q, k, v, g: chunked_scalar_gate_recurrence(q, k, v, log_gate=g, backend="triton")[0]
    kernels = {}
    for batch in (1, config_lib.FUSED_MIN_PROGRAMS // 4):  # 2 heads, dv 128 = two blocks of 64: 4 programs a batch
        q = jax.ShapeDtypeStruct((batch, 128, 2, 128), jnp.bfloat16)
        gate = jax.ShapeDtypeStruct((batch, 128, 2), jnp.float32)
        kernels[batch] = kernel_helpers.triton_kernels_lowered(attend, q, q, q, gate)
    assert kernels == {1: 2, config_lib.FUSED_MIN_PROGRAMS // 4: 1}
