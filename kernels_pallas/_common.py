"""Pieces shared by the Pallas kernels: backend choice."""

from __future__ import annotations

import jax

BACKENDS = ("triton", "mosaic_tpu")


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x), where the Mosaic GPU builds run."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def resolve_backend(backend, interpret):
    if backend is None:
        platform = jax.default_backend()
        if platform == "tpu":
            return "mosaic_tpu"
        if platform == "gpu" or interpret:
            return "triton"
        raise ValueError(
            f"backend=None picks the kernel from the default device, which is {platform!r}; pass "
            "interpret=True to run a kernel on the CPU"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend
