"""GPU check of the block-sparse kernel's fine masks (routing tags, MoBA bits) and the traced-layout overflow
error, compiled for the GPU (Triton), against the "xla" forms; neighborhood_2d (NAT / DiNAT) through its
"window2d" fine mask too.

Run on the GPU machine from the repository root: ``PYTHONPATH=. python3 benchmarks/check_block_sparse_masks.py``.
Prints, per mechanism, dtype and causal, the relative (Frobenius) errors of the output and of dq, dk, dv
against the "xla" form on the same inputs (float32 maths), and one forward+backward time of each form.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import attn  # noqa: E402
from kernels_pallas.block_sparse import block_sparse_attention  # noqa: E402


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _timed(f, *args):
    jax.block_until_ready(f(*args))
    start = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - start) / 5 * 1e3


def check(name, params, b=2, s=1024, h=4, hkv=2, d=64, dtypes=(jnp.float32, jnp.bfloat16), causals=(False, True)):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.float32)
    dout = jax.random.normal(keys[3], (b, s, h, d), jnp.float32)
    fn = attn.get(name)
    for dtype in dtypes:
        for causal in causals:
            def run(impl):
                def loss(q, k, v):
                    out = fn(q, k, v, causal=causal, implementation=impl, **params)
                    return jnp.sum(out.astype(jnp.float32) * dout), out
                return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
            args = tuple(x.astype(dtype) for x in (q, k, v))
            pallas, xla = run("pallas"), run("xla")  # jitted once: the timings reuse the compilations
            (_, out), grads = pallas(*args)
            (_, ref), ref_grads = xla(*(x.astype(jnp.float32) for x in args))
            errs = [_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
            ms = [_timed(f, *args) for f in (pallas, xla)]
            print(f"{name:8s} {jnp.dtype(dtype).name:9s} causal={causal!s:5s} rel err out/dq/dk/dv "
                  + " ".join(f"{e:.1e}" for e in errs) + f"  fwd+bwd ms pallas {ms[0]:.2f} xla {ms[1]:.2f}",
                  flush=True)


def check_overflow():
    q = jnp.zeros((1, 256, 2, 64), jnp.float32)
    run = jax.jit(lambda q, lay: block_sparse_attention(q, q, q, lay, block_size=64, max_blocks_per_row=3))
    try:
        jax.block_until_ready(run(q, jnp.ones((4, 4), bool)))
        print("overflow: NOT raised")
    except Exception as e:  # noqa: BLE001 - the runtime error type depends on the platform
        print("overflow raised:", "max_blocks_per_row=3" in str(e), type(e).__name__)


if __name__ == "__main__":
    print(jax.devices())
    centroids = jax.random.normal(jax.random.key(1), (4, 4, 64), jnp.float32)
    check("routing", {"centroids": centroids})
    check("moba", {"block_size": 64, "top_k": 3})
    # NAT / DiNAT on a 32 x 32 grid (seq 1024): 7 x 7 neighbourhoods, plain and dilated; not causal.
    for dilation in (1, 2):
        check("neighborhood_2d", {"spatial": (32, 32), "kernel_size": 7, "dilation": dilation}, causals=(False,))
    check_overflow()
