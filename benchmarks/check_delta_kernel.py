"""GPU check of the Pallas (gated) delta-rule kernel: errors against XLA's chunked form, then a few timings.

Run on the GPU machine from the repository root: ``PYTHONPATH=. python benchmarks/check_delta_kernel.py``.
1. Triton build, B2 S1024 H4 D128: the gated delta rule in bf16 and float32 and the plain one in bf16: output,
   final state and the gradients of q, k, v, beta, log_gate and the initial state against
   ``attn._recurrent.delta_recurrence`` (chunked, float32 maths on the same inputs); prints max abs and relative
   (Frobenius) errors.
2. Where the WY preparation's time goes, at B4 S8192 H16 D128 bf16 (forward and forward+backward, median ms and
   tokens/s): the whole kernel with the fused preparation (``DeltaConfig.fused_wy``, the GPU default: A, T and T
   applied in one kernel, ``delta_inverse_gpu.fused_prepare``, its backward a kernel too,
   ``DeltaConfig.wy_backward_kernel``, ``delta_wy_backward_gpu``), then with that backward in XLA
   (``wy_backward_kernel=False``) and that preparation alone, then with the explicit inverse kernel
   (``delta_inverse_gpu``) + XLA matmuls; the preparation alone (``delta_chunk.wy_prepare``) fused, with the inverse
   kernel, and with XLA's triangular solve; the inverse kernel alone (forward); the whole kernel with the triangular
   solve.
3. Forward and forward+backward of the gated delta rule at that shape for a few configs, and XLA's chunked form
   for comparison.
Everything printed also goes to $OUT/check_delta_kernel.txt ($OUT defaults to /tmp). Time-boxed to
DELTA_BUDGET_S (default 150 s): the bf16 check, then 2., then the other checks, then 3., as far as it reaches.
``--smoke``: tiny shapes in Pallas' interpreter (a CPU dry run of the script itself). ``--checks-only``: the bf16
checks of 1. alone, gated and plain; ``--inverse-warps N`` runs those checks with ``DeltaConfig.wy_inverse_warps`` N
too (the WY inversion in its own kernel).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attn import _recurrent as r  # noqa: E402
from benchmarks import _check_common as common  # noqa: E402
from kernels_pallas.linear_recurrent import delta_chunk, delta_inverse_gpu, delta_ops  # noqa: E402
from kernels_pallas.linear_recurrent.delta_ops import GPU_DEFAULT, chunked_delta_recurrence, wy_options  # noqa: E402

START = time.perf_counter()
BUDGET_S = float(os.environ.get("DELTA_BUDGET_S", "150"))
LOG_PATH = os.path.join(os.environ.get("OUT", "/tmp"), "check_delta_kernel.txt")
SMOKE = "--smoke" in sys.argv
CHECK_SHAPE = (1, 40, 2, 32) if SMOKE else (2, 1024, 4, 128)  # batch, seq, heads, head_dim
BENCH_SHAPE = (1, 64, 2, 32) if SMOKE else (4, 8192, 16, 128)
REPS = 2 if SMOKE else 10
log = common.make_log(LOG_PATH, START)


def inputs(key, b, s, h, d, dtype):
    """q, k as attn's delta rules pass them (L2-normalised, q scaled), beta in (0, 1), the gate of the paper's
    range, an initial state and cotangents."""
    keys = jax.random.split(key, 8)
    q = (r.l2_normalize(jax.random.normal(keys[0], (b, s, h, d))) * d**-0.5).astype(dtype)
    k = r.l2_normalize(jax.random.normal(keys[1], (b, s, h, d))).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, h, d)).astype(dtype)
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (b, s, h)))
    gate = jax.nn.log_sigmoid(jax.random.normal(keys[4], (b, s, h)) + 2.0)
    h0 = jax.random.normal(keys[5], (b, h, d, d))
    dout = jax.random.normal(keys[6], (b, s, h, d)).astype(dtype)
    dfinal = jax.random.normal(keys[7], (b, h, d, d))
    return q, k, v, beta, gate, h0, dout, dfinal


def check(dtype, gated, config=None):
    q, k, v, beta, gate, h0, dout, dfinal = inputs(jax.random.key(1), *CHECK_SHAPE, dtype)
    if not gated:
        gate = jnp.zeros_like(gate)  # passed as None below; kept so that both runs take the same arguments

    def kernel(q, k, v, beta, g, h0):
        return chunked_delta_recurrence(q, k, v, beta, g if gated else None, initial_state=h0, backend="triton",
                                        interpret=SMOKE, config=config)

    def reference(q, k, v, beta, g, h0):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        out, final = r.delta_recurrence(q, k, v, beta, log_gate=g if gated else None, initial_state=h0,
                                        implementation="chunked", chunk_size=64)
        return out.astype(dtype), final

    got, want = (common.outputs_and_gradients(fn, (q, k, v, beta, gate, h0), (dout, dfinal))
                 for fn in (kernel, reference))
    names = ("out", "final", "dq", "dk", "dv", "dbeta", "dlog_gate", "dh0")
    if not gated:
        names = names[:6] + ("(no gate)", "dh0")
    label = f"{'gated' if gated else 'plain'} D{CHECK_SHAPE[3]} {jnp.dtype(dtype).name}"
    label += f" wy_inverse_warps={config.wy_inverse_warps}:" if config else ":"
    log(label, "; ".join(common.errors(n, a, b) for n, a, b in zip(names, got, want) if n != "(no gate)"))


def bench(forward, label):
    b, s, h, d = BENCH_SHAPE
    q, k, v, beta, gate, _, dout, _ = inputs(jax.random.key(0), b, s, h, d, jnp.bfloat16)
    common.time_forward_and_backward(log, label, forward, (q, k, v, beta, gate), dout, b * s,
                                     deadline=START + BUDGET_S, reps=REPS)


def kernel_forward(config):
    def forward(q, k, v, beta, g):
        return chunked_delta_recurrence(q, k, v, beta, g, config=config, backend="triton", interpret=SMOKE)[0]

    return forward


def prepare_inputs(chunk, fused):
    """The bench inputs as ``delta_ops`` hands them to the WY preparation: k and v in bf16 [b, s, h, d] for the fused
    kernel, else float32 heads-first chunks [b, h, n, C, d]; beta and the inclusive cumulative log gates
    [b, h, n, C]."""
    b, s, h, d = BENCH_SHAPE
    _, k, v, beta, gate, _, _, _ = inputs(jax.random.key(0), b, s, h, d, jnp.bfloat16)
    beta, cum = delta_chunk.to_chunks(beta, chunk), jnp.cumsum(delta_chunk.to_chunks(gate, chunk), axis=-1)
    if not fused:
        k, v = (delta_chunk.to_chunks(x.astype(jnp.float32), chunk) for x in (k, v))
    return k, v, beta, cum


def bench_prepare(config, label):
    """Forward and forward+backward (gradients of k, v, beta, cum) of the WY preparation alone with ``config``'s
    choice (triangular solve, inverse kernel, fused kernel), as the bf16 kernel runs it."""
    options = wy_options(config, "triton", SMOKE, jnp.bfloat16)
    fused = options.get("fused")
    args = prepare_inputs(config.chunk_size, fused is not None)

    def prepare(*xs):
        return fused(*xs) if fused is not None else delta_chunk.wy_prepare(*xs, **options)

    def gradients(cotangents, *xs):
        return jax.vjp(prepare, *xs)[1](cotangents)

    # Cotangents passed as arguments, not closed over (a closed-over array would be baked into the executable).
    cotangents = tuple(jnp.ones(o.shape, o.dtype) for o in jax.eval_shape(prepare, *args))
    modes = (("fwd", jax.jit(prepare), args), ("fwd+bwd", jax.jit(gradients), (cotangents,) + args))
    tokens = BENCH_SHAPE[0] * BENCH_SHAPE[1]
    for mode, fn, fn_args in modes:
        if time.perf_counter() > START + BUDGET_S:
            log(f"{label} {mode}: skipped (time budget)")
            continue
        try:
            sec = common.time_call(fn, *fn_args, reps=REPS)
            log(f"{label} {mode}: {sec * 1e3:.3f} ms, {tokens / sec / 1e6:.2f} M tokens/s")
        except Exception as e:
            log(f"{label} {mode}: FAILED {type(e).__name__}: {str(e)[:600]}")


def bench_inverse(config, label):
    """The inverse kernel alone (forward): T [b, h, n, C, C] from k, beta, cum."""
    k, _, beta, cum = prepare_inputs(config.chunk_size, fused=False)
    settings = delta_inverse_gpu.Settings(interpret=SMOKE, tf32=True, num_warps=config.num_warps,
                                          num_stages=config.num_stages)
    if time.perf_counter() > START + BUDGET_S:
        log(f"{label} fwd: skipped (time budget)")
        return
    try:
        sec = common.time_call(jax.jit(lambda *xs: delta_inverse_gpu.inverse(*xs, settings)), k, beta, cum,
                               reps=REPS)
        log(f"{label} fwd: {sec * 1e3:.3f} ms")
    except Exception as e:
        log(f"{label} fwd: FAILED {type(e).__name__}: {str(e)[:600]}")


def bench_passes(config):
    """The two kernels after the WY preparation alone, forward and forward+backward (their custom VJPs), on
    operands shaped as ``chunked_delta_recurrence`` passes them: the state pass (``_state_pass``) and the output
    step (``_output``)."""
    b, s, h, d = BENCH_SHAPE
    q, k, v, beta, gate, _, dout, _ = inputs(jax.random.key(0), b, s, h, d, jnp.bfloat16)
    config = dataclasses.replace(config, block_v=min(config.block_v or d, d))
    st = delta_ops._entry.Static(config, "triton", SMOKE)
    cum = jnp.cumsum(delta_chunk.to_chunks(gate, config.chunk_size), axis=-1).reshape(b, h, s)  # heads-first
    h0 = jnp.zeros((b, h, d, d), jnp.float32)
    states = jax.jit(lambda *a: delta_ops._state_pass(*a, st))(k, v, k, cum, h0)[0]
    pieces = {  # q, k, v in the caller's [b, s, h, d] layout, as the GPU kernels take them
        "state pass alone": (lambda w, u0, k_out, cum: delta_ops._state_pass(w, u0, k_out, cum, h0, st)[1],
                             (k, v, k, cum)),
        "output alone": (lambda q, k, u, cum, states: delta_ops._output(q, k, u, cum, states, st),
                         (q, k, v, cum, states)),
    }
    for label, (fn, args) in pieces.items():
        out_shape = jax.eval_shape(fn, *args)
        common.time_forward_and_backward(log, label, fn, args, jnp.ones(out_shape.shape, out_shape.dtype), b * s,
                                         deadline=START + BUDGET_S, reps=REPS)


def xla_forward(q, k, v, beta, g):
    out, _ = r.delta_recurrence(q, k, v, beta, log_gate=g, implementation="chunked", chunk_size=64)
    return out.astype(q.dtype)


def run_checks(cases, config=None):
    """``check`` of each (dtype, gated) while the budget lasts; a failure is logged, not raised."""
    for dtype, gated in cases:
        label = f"{'gated' if gated else 'plain'} {jnp.dtype(dtype).name}"
        common.guarded_check(log, label, check, dtype, gated, config, deadline=START + BUDGET_S)


def main():
    log("devices:", jax.devices(), "jax", jax.__version__)
    if "--checks-only" in sys.argv:  # the bf16 checks alone, gated and plain (float32's compile takes minutes)
        run_checks(((jnp.bfloat16, True), (jnp.bfloat16, False)))
        if "--inverse-warps" in sys.argv:
            warps = int(sys.argv[sys.argv.index("--inverse-warps") + 1])
            config = dataclasses.replace(GPU_DEFAULT, chunk_size=16 if SMOKE else GPU_DEFAULT.chunk_size,
                                         wy_inverse_warps=warps)
            run_checks(((jnp.bfloat16, True), (jnp.bfloat16, False)), config)
        return
    # The bf16 check, the timings of the preparation, then the other checks: the budget stops what is left.
    run_checks(((jnp.bfloat16, True),))
    chunk = 16 if SMOKE else GPU_DEFAULT.chunk_size  # the interpreter's smallest tile keeps --smoke quick
    default = dataclasses.replace(GPU_DEFAULT, chunk_size=chunk)
    fused = dataclasses.replace(default, fused_wy=True)
    new = dataclasses.replace(default, explicit_inverse=True, fused_wy=False)
    old = dataclasses.replace(default, explicit_inverse=False)
    # Where the WY preparation's time goes (first: the budget stops what is left).
    log(f"config fused WY + kernel backward (the default): {fused}")
    bench(kernel_forward(fused), "whole kernel, fused WY")
    xla_backward = dataclasses.replace(fused, wy_backward_kernel=False)
    log(f"config fused WY + XLA backward: {xla_backward}")
    bench(kernel_forward(xla_backward), "whole kernel, fused WY + XLA backward")
    bench_prepare(xla_backward, "prep alone, fused WY + XLA backward")
    log(f"config new prep (explicit inverse + matmuls): {new}")
    bench(kernel_forward(new), "whole kernel, new prep")
    bench_prepare(fused, "prep alone, fused WY")
    bench_prepare(new, "prep alone, new (inverse kernel + matmuls)")
    bench_prepare(old, "prep alone, old (triangular solve)")
    bench_inverse(new, "inverse kernel alone (tf32)")
    bench_passes(default)
    bench(kernel_forward(old), "whole kernel, old prep")
    run_checks(((jnp.float32, True), (jnp.bfloat16, False)))
    variants = [  # the default itself ran above ("whole kernel, fused WY")
        ("block_v32", dataclasses.replace(default, block_v=32)),
        ("block_v128", dataclasses.replace(default, block_v=128)),
        ("warps8", dataclasses.replace(default, num_warps=8)),
        ("stages1", dataclasses.replace(default, num_stages=1)),
    ]
    for label, config in variants:
        log(f"config {label}: {config}")
        bench(kernel_forward(config), label)
    bench(xla_forward, "xla chunked (attn._recurrent)")
    log("done")


if __name__ == "__main__":
    main()
