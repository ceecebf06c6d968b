"""What the GPU check scripts share. Linear-recurrent kernels (check_gla_kernel, check_delta_kernel): a log that
also goes to a file, error lines against a reference, time-boxed forward / forward+backward timings. Mosaic GPU
attention kernels (check_sliding_window_mgpu, check_block_sparse_mgpu): ``Report`` (log, JSON report, budget),
``rel_err``, ``attention_inputs``, ``jit_fwd_bwd``."""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback

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


def guarded_check(log, label, check, *args, deadline):
    """``check(*args)`` unless ``time.perf_counter()`` has passed ``deadline``; a failure is logged with its
    traceback's tail, not raised (one failing check must not hide the others)."""
    if time.perf_counter() > deadline:
        log(f"{label}: check skipped (time budget)")
        return
    try:
        check(*args)
    except Exception as e:
        log(f"{label}: FAILED {type(e).__name__}: {str(e)[:1500]}")
        log(traceback.format_exc()[-1500:])


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


class Report:
    """A check script's log lines and JSON report (``data``: checks, timings, meta), written to
    ``out/name.txt`` and ``out/name.json`` by ``save``, and its time budget from ``start``."""

    def __init__(self, name, budget_s, out):
        self.name, self.budget_s, self.out = name, budget_s, out
        self.start = time.perf_counter()
        self.lines: list[str] = []
        self.data: dict = dict(checks=[], timings=[])

    def log(self, *parts):
        line = f"[{time.perf_counter() - self.start:5.1f}s] " + " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)

    def save(self):
        os.makedirs(self.out, exist_ok=True)
        self.data["log"] = self.lines
        with open(os.path.join(self.out, f"{self.name}.json"), "w") as fh:
            json.dump(self.data, fh, indent=1, default=str)
        with open(os.path.join(self.out, f"{self.name}.txt"), "w") as fh:
            fh.write("\n".join(self.lines) + "\n")

    def out_of_time(self, what):
        """True (and says so) once the budget is spent: the caller skips ``what``."""
        if time.perf_counter() - self.start > self.budget_s:
            self.log(f"skipped (budget {self.budget_s:.0f} s): {what}")
            return True
        return False

    def report_error(self, what, e):
        """Logs an exception with the end of its traceback (a lowering or ptxas error is information); returns
        the message for the report."""
        text = "".join(traceback.format_exception(e))
        self.log(f"ERROR {what}: {type(e).__name__}: {str(e)[:1500]}")
        print(text[-4000:], flush=True)
        self.lines.append(text[-4000:])
        return f"{type(e).__name__}: {str(e)[:3000]}"


def rel_err(a, b):
    """Relative Frobenius error of a against b (inf when a has a non-finite entry)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attention_inputs(seed, b, s, h, hkv, d, dtype):
    """q [b, s, h, d], k and v [b, s, hkv, d], dout like q: standard normal in ``dtype`` (from the int ``seed``)."""
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    return normal(kq, (b, s, h, d)), normal(kk, (b, s, hkv, d)), normal(kv, (b, s, hkv, d)), normal(kd, (b, s, h, d))


def jit_fwd_bwd(f):
    """jit of (q, k, v, dout) -> (f(q, k, v), its VJP of dout)."""
    def run(q, k, v, dout):
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(dout)

    return jax.jit(run)


def timed(fn, args, smoke=False):
    """(first-call seconds incl. compile, median seconds per call after two warm-up calls, calls): at least 5 calls
    and 0.25 s, at most 100; ``smoke``: one call after the first (a dry run, not a measurement)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    if not smoke:
        jax.block_until_ready(fn(*args))
    times, start = [], time.perf_counter()
    min_calls, min_time, max_iters = (1, 0.0, 1) if smoke else (5, 0.25, 100)
    while len(times) < min_calls or (time.perf_counter() - start < min_time and len(times) < max_iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), len(times)
