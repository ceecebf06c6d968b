"""Measurement pieces of the benchmark suite: timing, memory, agreement with the reference, complexity scan."""

from __future__ import annotations

import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import attn


def median_seconds(call, sync, *, min_calls: int, min_time: float, max_calls: int = 1000,
                   max_time: float = 3.0) -> tuple[float, int]:
    """Median seconds of ``call()`` after two warm-up calls; every call is ended by ``sync`` on its result so
    that asynchronous dispatch cannot hide device time. Calls continue until both ``min_calls`` and
    ``min_time`` are reached, except that slow calls (a scan over 32k steps) stop after ``max_time`` seconds
    with at least three timed calls."""
    sync(call())
    sync(call())
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if len(times) >= max_calls or (len(times) >= 3 and elapsed >= max_time):
            break
        if len(times) >= min_calls and elapsed >= min_time:
            break
    return statistics.median(times), len(times)


def compiled_peak_bytes(compiled) -> int | None:
    """XLA's buffer-assignment estimate of the peak memory of one call: arguments + outputs + temporaries.

    Available on every backend (unlike ``Device.memory_stats``, which a CPU lacks and which cannot be reset
    between implementations), and known before anything runs, so it also decides what would not fit.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def device_memory_bytes() -> int:
    """Memory one device can use: the allocator's limit on GPU/TPU, physical memory on a CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel_err(results, references) -> float:
    """Largest relative error over matching arrays (output, then gradients)."""
    return max(rel_err(r, ref) for r, ref in zip(results, references))


# ------------------------------------------------------------------------------------------- complexity scan
RELIABLE_SECONDS = 1e-3


def log_log_slope(sizes, values) -> float | None:
    """Least-squares slope of log(value) against log(size); None with fewer than two positive points."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if v is not None and v > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def growth_label(slope: float | None) -> str:
    """Names a log-log slope: ~1 linear, ~2 quadratic (fixed costs pull small-size slopes down, never up)."""
    if slope is None:
        return "unknown"
    if slope < 1.35:
        return "linear"
    if slope > 1.65:
        return "quadratic"
    return "between"


def scan_forms(spec, smoke: bool) -> list[str | None]:
    """Which implementations of a mechanism the scan measures: all plain-JAX forms (kernels are timed by the
    family benchmarks); in smoke mode only the default one (None), to stay within the time budget."""
    if smoke:
        return [None]
    return [impl for impl in spec.implementations if impl != "pallas"]


def complexity_scan(*, seqs, batch, heads, head_dim, dtype, smoke, min_time, log, names=None, stop_at=None):
    """Time and peak memory of each registered mechanism's plain-JAX forms against sequence length.

    Each row names the mechanism, the form (None = the mechanism's default), its declared complexity, the
    measured points, the log-log slopes of time and of memory, and a label from the larger slope (the time
    slope only where every time is at least RELIABLE_SECONDS): a form can trade memory for time (chunked
    softmax) or time for memory, and either growth is what a user pays.
    Sizes whose compiled peak memory would not fit the device are skipped and listed, and so is every size
    left when ``time.perf_counter()`` passes ``stop_at`` (a machine's time limit).
    """
    limit = 0.8 * device_memory_bytes()
    rows = []
    for name in names or attn.names():
        spec = attn.spec(name)
        causal = spec.causal[0]
        for impl in scan_forms(spec, smoke):
            row = dict(mechanism=name, family=spec.family, implementation=impl or "default",
                       declared=spec.complexity, causal=causal, seqs=[], seconds=[], peak_bytes=[], skipped=[])
            for seq in seqs:
                s = -(-seq // spec.seq_multiple) * spec.seq_multiple
                if stop_at is not None and time.perf_counter() > stop_at:
                    row["skipped"].append(dict(seq=s, reason="time budget spent"))
                    continue
                try:
                    keys = jax.random.split(jax.random.key(seq), 4)
                    q, k, v = (jax.random.normal(kk, (batch, s, heads, head_dim), jnp.float32).astype(dtype)
                               for kk in keys[:3])
                    params = spec.params(keys[3], q.shape, k.shape, head_dim, causal)
                    # Arrays as arguments (not baked-in constants); ints and tuples (windows, sizes) static.
                    arrays = {n: p for n, p in params.items() if isinstance(p, jax.Array)}
                    static = {n: p for n, p in params.items() if n not in arrays}
                    fn = jax.jit(lambda q, k, v, p, impl=impl, static=static: spec.fn(
                        q, k, v, causal=causal, implementation=impl, **p, **static))
                    compiled = fn.lower(q, k, v, arrays).compile()
                    peak = compiled_peak_bytes(compiled)
                    if peak is not None and peak > limit:
                        row["skipped"].append(dict(seq=s, reason=f"needs {peak / 2**30:.1f} GiB, "
                                                                 f"limit {limit / 2**30:.1f} GiB"))
                        continue
                    sec, _ = median_seconds(lambda: compiled(q, k, v, arrays), jax.block_until_ready,
                                            min_calls=3, min_time=min_time)
                except Exception as e:  # one mechanism failing at one size must not end the scan
                    row["skipped"].append(dict(seq=s, reason=f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                row["seqs"].append(s)
                row["seconds"].append(sec)
                row["peak_bytes"].append(peak)
            row["time_slope"] = log_log_slope(row["seqs"], row["seconds"])
            row["memory_slope"] = log_log_slope(row["seqs"], row["peak_bytes"])
            # Below a millisecond, dispatch and fixed costs dominate and other processes' noise shows: such
            # times say little about growth, so only the (deterministic) memory slope labels those rows.
            row["time_reliable"] = bool(row["seconds"]) and min(row["seconds"]) >= RELIABLE_SECONDS
            slopes = [x for x in (row["time_slope"] if row["time_reliable"] else None, row["memory_slope"])
                      if x is not None]
            row["label"] = growth_label(max(slopes) if slopes else None)
            log(f"scan {name:>18} {row['implementation']:>9}: time slope {_fmt(row['time_slope'])}, memory slope "
                f"{_fmt(row['memory_slope'])} -> {row['label']} (declared {spec.complexity})")
            rows.append(row)
    return rows


def _fmt(x):
    return "n/a" if x is None else f"{x:.2f}"
