"""Checks shared by the kernel tests that compare a Pallas form with a reference form."""

import re

import jax
import jax.numpy as jnp
import numpy as np


def rel_err(a, b, floor=0.0):
    """Relative Frobenius error of ``a`` against ``b``; ``floor`` bounds the denominator from below."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), floor)


def assert_matches_float64(kernel, reference, q, k, v, dout, tol=1e-5):
    """``kernel(q, k, v)`` (float32) agrees with ``reference`` run in float64, in the output and dq, dk, dv."""
    out, vjp = jax.vjp(kernel, q, k, v)
    f64 = lambda x: x.astype(jnp.float64)
    ref, ref_vjp = jax.vjp(reference, f64(q), f64(k), f64(v))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref, 1.0) < tol
    for name, g, r in zip(("dq", "dk", "dv"), vjp(dout), ref_vjp(f64(dout))):
        assert g.shape == r.shape, name
        assert rel_err(g, r, 1.0) < tol, name


def qkv_dout(seed, b, s, h, hkv, d, dtype=jnp.bfloat16):
    """Standard-normal q [b, s, h, d], k and v [b, s, hkv, d] and an output cotangent like q, in ``dtype``."""
    keys = jax.random.split(jax.random.key(seed), 4)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    return normal(keys[0], (b, s, h, d)), normal(keys[1], (b, s, hkv, d)), normal(keys[2], (b, s, hkv, d)), \
        normal(keys[3], (b, s, h, d))


def triton_kernel_warps(f, *args) -> list[int]:
    """The num_warps of each Pallas Triton kernel that ``jax.jit(f)`` lowers to for an H100, in program order, on a
    machine without a GPU: Pallas' Triton lowering reads the target GPU from the abstract mesh's device (ptxas never
    runs)."""
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=gpu)):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = text.split("stablehlo.custom_call @__gpu$xla.gpu.triton")[1:]
    return [int(re.search(r"num_warps = (\d+) : i32", call).group(1)) for call in calls]


def triton_kernels_lowered(f, *args) -> int:
    """How many Pallas Triton kernels ``jax.jit(f)`` lowers to (``triton_kernel_warps``)."""
    return len(triton_kernel_warps(f, *args))


def mosaic_tpu_kernels_lowered(f, *args, device_kind="TPU v5 lite") -> int:
    """How many Pallas Mosaic TPU kernels ``jax.jit(f)`` lowers to, on a machine without a TPU: Pallas' own
    lowering to Mosaic runs (what interpret mode skips); Mosaic's compiler, part of libtpu, does not. The target
    chip (``device_kind``, v5e by default) comes from an abstract mesh's device: kernels that read the chip's
    parameters need one. With x64 off, as on TPUs (the suite turns it on for its float64 references; under it
    Pallas' Mosaic lowering mixes int64 and int32 loop indices)."""
    tpu = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    with jax.enable_x64(False), jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("x",), abstract_device=tpu)):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    return text.count("stablehlo.custom_call @tpu_custom_call")
