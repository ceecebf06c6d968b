"""What the GPU check scripts of the linear-recurrent kernels (check_gla_kernel, check_delta_kernel) share: a log
that also goes to a file, error lines against a reference, and time-boxed forward / forward+backward timings."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def make_log(path, start):
    """A print that prefixes the seconds since ``start`` and appends each line to ``path``."""

    def log(*parts):
        line = " ".join(str(p) for p in (f"[{time.perf_counter() - start:5.1f}s]",) + parts)
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return log


def errors(name, got, want):
    """"name: max_abs .. rel .." (relative Frobenius error) or "name: NON-FINITE"."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return f"{name}: NON-FINITE"
    rel = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    return f"{name}: max_abs {np.max(np.abs(got - want)):.2e} rel {rel:.2e}"


def time_call(fn, *args, reps):
    """Median seconds of ``reps`` calls after one compile + warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_forward_and_backward(log, label, forward, args, dout, tokens, *, deadline, reps):
    """Logs ms and tokens/s of ``forward(*args)`` and of the gradient of <forward(*args), dout> in every argument.
    A mode is skipped once ``time.perf_counter()`` passes ``deadline``; a failure is logged, not raised (a config
    that does not compile must not hide the others)."""
    fwd = jax.jit(forward)

    def loss(*xs):
        return jnp.sum(fwd(*xs).astype(jnp.float32) * dout.astype(jnp.float32))

    fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        if time.perf_counter() > deadline:
            log(f"{label} {mode}: skipped (time budget)")
            continue
        try:
            sec = time_call(fn, *args, reps=reps)
            log(f"{label} {mode}: {sec * 1e3:.3f} ms, {tokens / sec / 1e6:.2f} M tokens/s")
        except Exception as e:
            log(f"{label} {mode}: FAILED {type(e).__name__}: {str(e)[:600]}")


def outputs_and_gradients(fn, args, cotangents):
    """(outputs..., gradients of every argument...) of the jitted ``fn(*args)`` for the outputs' ``cotangents``."""
    outs, vjp = jax.vjp(jax.jit(fn), *args)
    return tuple(outs) + tuple(jax.jit(vjp)(cotangents))
