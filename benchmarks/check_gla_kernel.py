"""GPU check of the Pallas vector-gate (GLA) kernel: errors against XLA's chunked form, then a few timings.

Run on the GPU machine from the repository root: ``PYTHONPATH=. python benchmarks/check_gla_kernel.py``.
1. Triton build, bf16 and float32, B2 S1024 H4 at D128 and D64: output, final state and the gradients of q, k, v,
   log_gate and the initial state against ``attn._recurrent.linear_recurrence`` (chunked, float32 maths on the same
   inputs); prints max abs and relative (Frobenius) errors.
2. Forward and forward+backward at B4 S8192 H16 D128 bf16 for a few configs, and the default with gates a
   hundred times stronger (the column loop in nearly every sub-chunk): median ms and tokens/s.
3. Where the time goes at that shape: each kernel alone (state pass, output, dstate pass, backward; with
   ``scores_kernel``, the default, also scores, dscores and intra-chunk gradients), median ms, for the default
   and with the one-kernel output and gradients.
Everything printed also goes to $OUT/check_gla_kernel.txt ($OUT defaults to /tmp). Time-boxed to GLA_BUDGET_S
(default 70 s); GLA_CHECKS=0 skips 1.
``--smoke``: tiny shapes in Pallas' interpreter (a CPU dry run of the script itself).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attn import _recurrent as r  # noqa: E402
from benchmarks import _check_common as common  # noqa: E402
from kernels_pallas.linear_recurrent import vector_gate_gpu  # noqa: E402
from kernels_pallas.linear_recurrent.vector_gate_ops import (  # noqa: E402
    GPU_DEFAULT,
    chunked_vector_gate_recurrence,
)

START = time.perf_counter()
BUDGET_S = float(os.environ.get("GLA_BUDGET_S", "70"))
LOG_PATH = os.path.join(os.environ.get("OUT", "/tmp"), "check_gla_kernel.txt")
SMOKE = "--smoke" in sys.argv
CHECK_SHAPE = (1, 40, 2) if SMOKE else (2, 1024, 4)  # batch, seq, heads
BENCH_SHAPE = (1, 64, 2, 32) if SMOKE else (4, 8192, 16, 128)  # batch, seq, heads, head_dim
REPS = 2 if SMOKE else 10
log = common.make_log(LOG_PATH, START)


def inputs(key, b, s, h, d, dtype):
    keys = jax.random.split(key, 7)
    q = (jax.random.normal(keys[0], (b, s, h, d)) * d**-0.5).astype(dtype)
    k = (jax.random.normal(keys[1], (b, s, h, d)) * d**-0.5).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, h, d)).astype(dtype)
    gate = jax.nn.log_sigmoid(jax.random.normal(keys[3], (b, s, h, d))) / 16  # the paper's gate
    h0 = jax.random.normal(keys[4], (b, h, d, d))
    dout = jax.random.normal(keys[5], (b, s, h, d)).astype(dtype)
    dfinal = jax.random.normal(keys[6], (b, h, d, d))
    return q, k, v, gate, h0, dout, dfinal


def check(d, dtype):
    q, k, v, gate, h0, dout, dfinal = inputs(jax.random.key(d), *CHECK_SHAPE, d, dtype)

    def kernel(q, k, v, g, h0):
        return chunked_vector_gate_recurrence(q, k, v, g, initial_state=h0, backend="triton", interpret=SMOKE)

    def reference(q, k, v, g, h0):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        out, final = r.linear_recurrence(q, k, v, log_gate=g, initial_state=h0, implementation="chunked",
                                         chunk_size=64)
        return out.astype(dtype), final

    got, want = (common.outputs_and_gradients(fn, (q, k, v, gate, h0), (dout, dfinal)) for fn in (kernel, reference))
    names = ("out", "final", "dq", "dk", "dv", "dlog_gate", "dh0")
    log(f"D{d} {jnp.dtype(dtype).name}:", "; ".join(common.errors(n, a, b) for n, a, b in zip(names, got, want)))


def bench(config, label, gate_scale=1.0):
    """``gate_scale`` 100: the gates span more than ``FACTORED_SPAN`` in (nearly) every sub-chunk."""
    b, s, h, d = BENCH_SHAPE
    q, k, v, gate, _, dout, _ = inputs(jax.random.key(0), b, s, h, d, jnp.bfloat16)
    gate = gate * gate_scale
    forward = lambda q, k, v, g: chunked_vector_gate_recurrence(q, k, v, g, config=config, backend="triton",
                                                                interpret=SMOKE)[0]
    common.time_forward_and_backward(log, label, forward, (q, k, v, gate), dout, b * s, deadline=START + BUDGET_S,
                                     reps=REPS)


def passes(config, label):
    """Each kernel of the Triton build alone on the benchmark's inputs (already chunk multiples and powers of two)."""
    b, s, h, d = BENCH_SHAPE
    q, k, v, gate, h0, dout, dfinal = inputs(jax.random.key(0), b, s, h, d, jnp.bfloat16)
    config = dataclasses.replace(config, **{name: min(getattr(config, name) or d, d)
                                            for name in ("state_block_k", "state_block_v", "block_v")})
    chunk = config.chunk_size
    cum = jnp.cumsum(gate.reshape(b, s // chunk, chunk, h, d), axis=2).reshape(b, s, h, d)
    kw = dict(config=config, interpret=SMOKE)
    states_fn = jax.jit(lambda k, v, cum, h0: vector_gate_gpu.states(k, v, cum, h0, **kw))
    states, _ = states_fn(k, v, cum, h0)
    dstates_fn = jax.jit(lambda q, dout, cum, dfinal: vector_gate_gpu.dstates(q, dout, cum, dfinal, **kw))
    dstates, _ = dstates_fn(q, dout, cum, dfinal)
    pieces = {"state pass": (states_fn, (k, v, cum, h0))}
    output_extra, backward_extra = {}, {}  # scores_kernel's inputs to the output and gradients kernels
    if config.scores_kernel:
        scores_fn = jax.jit(lambda q, k, cum: vector_gate_gpu.scores(q, k, cum, **kw))
        dscores_fn = jax.jit(lambda v, dout: vector_gate_gpu.dscores(v, dout, **kw))
        intra_fn = jax.jit(lambda q, k, cum, pair: vector_gate_gpu.intra_gradients(q, k, cum, pair, **kw))
        pair = dscores_fn(v, dout)
        output_extra = {"scores": scores_fn(q, k, cum)}
        backward_extra = {**output_extra, "intra": intra_fn(q, k, cum, pair)}
        pieces["scores"] = (scores_fn, (q, k, cum))
    output_fn = jax.jit(lambda *a, **extra: vector_gate_gpu.output(*a, **extra, **kw))
    pieces["output"] = (functools.partial(output_fn, **output_extra), (q, k, v, cum, states))
    pieces["dstate pass"] = (dstates_fn, (q, dout, cum, dfinal))
    if config.scores_kernel:
        pieces["dscores"] = (dscores_fn, (v, dout))
        pieces["intra-chunk gradients"] = (intra_fn, (q, k, cum, pair))
    backward_fn = jax.jit(lambda *a, **extra: vector_gate_gpu.backward(*a, **extra, **kw))
    pieces["backward"] = (functools.partial(backward_fn, **backward_extra), (q, k, v, cum, states, dstates, dout))
    for name, (fn, args) in pieces.items():
        if time.perf_counter() > START + BUDGET_S:
            log(f"{label} {name}: skipped (time budget)")
            continue
        try:
            log(f"{label} {name} alone: {common.time_call(fn, *args, reps=REPS) * 1e3:.3f} ms")
        except Exception as e:
            log(f"{label} {name}: FAILED {type(e).__name__}: {str(e)[:600]}")


def main():
    log("devices:", jax.devices(), "jax", jax.__version__)
    wide, narrow = (32, 16) if SMOKE else (128, 64)
    checks = [(wide, jnp.bfloat16), (narrow, jnp.float32), (wide, jnp.float32), (narrow, jnp.bfloat16)]
    for d, dtype in checks if os.environ.get("GLA_CHECKS", "1") != "0" else ():
        # Leave the timings most of the budget.
        common.guarded_check(log, f"D{d} {jnp.dtype(dtype).name}", check, d, dtype, deadline=START + 0.4 * BUDGET_S)
    one_kernel = dataclasses.replace(GPU_DEFAULT, scores_kernel=False)
    variants = [("default", GPU_DEFAULT), ("one-kernel output and gradients", one_kernel)] + [
        (f"scores warps {w}", dataclasses.replace(GPU_DEFAULT, scores_warps=w)) for w in (2, 8)]
    for label, config in variants:
        log(f"config {label}: {config}")
        bench(config, label)
    bench(GPU_DEFAULT, "default, strong gates (column loop)", gate_scale=100.0)
    passes(GPU_DEFAULT, "default")
    passes(one_kernel, "one-kernel")
    log("done")


if __name__ == "__main__":
    main()
