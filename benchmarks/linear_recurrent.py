"""Chunked linear recurrences on the GPU: the Pallas kernels vs fla's Triton kernels vs XLA's chunked form.

Run on the device machine from the repository root (fla-core 0.6.0 is a pure-Python wheel; PyTorch and Triton are
already there):
    PYTHONPATH=. python3 benchmarks/linear_recurrent.py --fla-wheel path/to/fla_core-0.6.0-py3-none-any.whl [--quick]
Variants: "simple_gla" (data-dependent scalar log gate per head and step; fla's chunk_simple_gla), "linear"
(no gate; fla's chunk_linear_attn), "retention" (fixed decay per head, RetNet's 1 - 2^(-5 - h), not learned:
no gate gradient; the scalar-gate kernel; fla's chunk_retention), "gla" (data-dependent log gate per head, step
and key dimension, the vector-gate kernel; fla's chunk_gla), "delta_rule" (DeltaNet: L2-normalised q and k, beta
per head and step, the delta-rule kernel; fla's chunk_delta_rule; the "gate" slot below carries beta) and
"gated_delta_rule" (the same plus a scalar log gate per head and step; the gate slot carries (beta, log gate);
fla's chunk_gated_delta_rule). Shapes B4 S8192 H16 D128 and B1 S32768 H16 D128, bfloat16, forward and
forward+backward (gradients of q, k, v and the gates or beta, for fla too). Tokens/s = B * S / median seconds per
call, calls queued back to back in batches of 10 and waited for once per batch (``timed``; since 2026-12-03, before
that each call was waited for alone, which added the JAX calls' ~0.35 ms of host dispatch to every call: see
profile_fla.py --timeline).

Peak memory: for fla, torch.cuda.max_memory_allocated over one call after the timed ones; for the JAX paths, the
compiled executable's arguments + outputs + temporaries (XLA's memory analysis), since JAX has no per-call peak
reset. Each case also records the relative error of the outputs against XLA's chunked form (float32 maths).
Writes $OUT/linear_recurrent.json after every case and $OUT/linear_recurrent.md at the end.

``--variants`` picks a subset, ``--modes`` the modes, ``--shapes`` the shapes (indices), ``--no-xla`` skips XLA's
chunked form (its compiles cost device time); ``--merge a.json b.json ...`` runs nothing and joins several device
calls' files into one JSON + table (ratios stay within each call: fla's compile and autotuning take minutes per
variant, so one session's full run spans several calls); ``--sweep [LABEL ...]`` also times the Pallas kernels under
each tiling of SWEEP (rows "pallas[label]"; only the labels given, if any), to tune the defaults; ``--smoke`` runs
the whole script on the CPU at a tiny shape in Pallas' interpreter, without fla (a dry run of the script, not a
measurement). ``--triton-cache DIR`` makes DIR Triton's cache (``TRITON_CACHE_DIR``): its compiled kernels and the
results of fla's autotuning, which fla asks Triton to keep (``FLA_CACHE_RESULTS``, on by default;
``TRITON_CACHE_AUTOTUNING=1`` for any kernel that does not). Its ``*.autotune.json`` files, carried to a later device
call in the same DIR, make fla run the configs its autotuner chose before (same GPU kind, Triton and fla) instead of
timing every candidate again: that took up to ~300 s per variant and shape (GLA at B1). fla's timed calls are the
same either way; autotuning only picks the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import zipfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attn import _recurrent  # noqa: E402
from kernels_pallas.linear_recurrent import chunked_scalar_gate_recurrence, chunked_scalar_gate_reference  # noqa: E402
from kernels_pallas.linear_recurrent import config as scalar_config  # noqa: E402
from kernels_pallas.linear_recurrent import delta_ops  # noqa: E402
from kernels_pallas.linear_recurrent import vector_gate_ops  # noqa: E402

OUT = os.environ.get("OUT", ".")
SHAPES = [(4, 8192, 16, 128), (1, 32768, 16, 128)]
VARIANTS = ("simple_gla", "linear", "retention", "gla", "delta_rule", "gated_delta_rule")
MODES = ("forward", "forward+backward")
FIXED_GATE = ("retention",)  # the gate is a constant: no gradient
# fla 0.6.0 refuses these backwards on Triton < 3.7.1 on Hopper ("produces incorrect results for gated
# chunk_bwd_dqkwg"), after a minute of compiling: skipped unless --try-fla-refused.
FLA_REFUSES_BACKWARD = ("simple_gla", "gated_delta_rule")
START = time.perf_counter()
SMOKE = False  # set by --smoke: interpret mode, tiny shapes

_SCALAR, _VECTOR, _DELTA = scalar_config.GPU_DEFAULT, vector_gate_ops.GPU_DEFAULT, delta_ops.GPU_DEFAULT
# Tilings timed by --sweep, per kernel (the scalar gate serves simple_gla, retention and linear; the vector gate gla).
SWEEP = {
    "scalar": {  # state blocks: more programs for the sequential passes where batch * heads is small
        "rows-64": dataclasses.replace(_SCALAR, min_block_k=None),  # the default before ab97b7c
        "states-3-stages": dataclasses.replace(_SCALAR, state_stages=None, dstate_warps=None, dstate_stages=None,
                                               dstate_row_split=1),  # the state passes as before time_scalar_kernels
        "state-16x64": dataclasses.replace(_SCALAR, block_k=16),
        "state-32x32": dataclasses.replace(_SCALAR, block_k=32, block_v=32),
    },
    "vector": {
        "states-8-warps-2-stages": dataclasses.replace(_VECTOR, state_warps=None, state_stages=None, dstate_warps=None,
                                                       dstate_stages=None),  # the state passes before 26b2b87
        "sub-32": dataclasses.replace(_VECTOR, sub_chunk=32),
        "state-128x64": dataclasses.replace(_VECTOR, state_block_k=None),
        "block-v-64": dataclasses.replace(_VECTOR, block_v=64),
        "warps-8": dataclasses.replace(_VECTOR, num_warps=8),
        "stages-3": dataclasses.replace(_VECTOR, num_stages=3),
        "scores-warps-8": dataclasses.replace(_VECTOR, scores_warps=8),
    },
    "delta": {  # the walks by 64 value columns at any batch * heads (the default before min_block_v)
        "walk-block-v-64": dataclasses.replace(_DELTA, min_block_v=None),
        "walk-block-v-32": dataclasses.replace(_DELTA, min_block_v=32, walk_stages=None),  # the default before 26b2b87
        "walk-stages-3": dataclasses.replace(_DELTA, walk_stages=None),  # latency-bound walks: loads less far ahead
    },
}


def log(*parts):
    print(f"[{time.perf_counter() - START:6.1f}s]", *parts, flush=True)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def load_fla(wheel):
    """Imports fla from the wheel (unzipped onto sys.path: no pip, no network) or from the environment."""
    if wheel:
        target = tempfile.mkdtemp(prefix="fla_")
        zipfile.ZipFile(wheel).extractall(target)
        sys.path.insert(0, target)
    try:
        import torch  # noqa: F401
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.retention import chunk_retention
        from fla.ops.simple_gla import chunk_simple_gla

        return {"simple_gla": chunk_simple_gla, "linear": chunk_linear_attn, "retention": chunk_retention,
                "gla": chunk_gla, "delta_rule": chunk_delta_rule, "gated_delta_rule": chunk_gated_delta_rule}
    except Exception as e:  # the table then says fla was unavailable
        log(f"fla unavailable: {type(e).__name__}: {e}")
        return None


def inputs(key, b, s, h, d, variant):
    kq, kk, kv, kg, kd = jax.random.split(key, 5)
    q = (jax.random.normal(kq, (b, s, h, d), jnp.float32) * d**-0.5).astype(jnp.bfloat16)  # pre-scaled
    k = (jax.random.normal(kk, (b, s, h, d), jnp.float32) * d**-0.5).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (b, s, h, d), jnp.float32).astype(jnp.bfloat16)
    gate = None
    if variant == "simple_gla":
        gate = jax.nn.log_sigmoid(jax.random.normal(kg, (b, s, h), jnp.float32) + 4.0)  # mostly mild decay
    if variant == "retention":  # fla's chunk_retention's decays
        decay = jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(h, dtype=jnp.float32))))
        gate = jnp.broadcast_to(decay, (b, s, h))
    if variant == "gla":
        gate = jax.nn.log_sigmoid(jax.random.normal(kg, (b, s, h, d), jnp.float32)) / 16  # the paper's gate
    if variant in ("delta_rule", "gated_delta_rule"):  # unit q and k (q then scaled), beta in (0, 1)
        unit = lambda x: x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
        q, k = (unit(q) * d**-0.5).astype(jnp.bfloat16), unit(k).astype(jnp.bfloat16)
        kb, kl = jax.random.split(kg)
        gate = jax.nn.sigmoid(jax.random.normal(kb, (b, s, h), jnp.float32)).astype(jnp.bfloat16)
        if variant == "gated_delta_rule":
            gate = (gate, jax.nn.log_sigmoid(jax.random.normal(kl, (b, s, h), jnp.float32) + 4.0))
    dout = jax.random.normal(kd, (b, s, h, d), jnp.float32).astype(jnp.bfloat16)
    return q, k, v, gate, dout


def timed(fn, sync, min_time=1.0, max_batches=20, batch=10):
    """Median seconds per call over batches of ``batch`` calls queued back to back and waited for once (after two
    warm-up calls): the device's throughput, the host's dispatch overlapping its work as in a training loop (and
    as triton.testing.do_bench times); ``sync`` waits for a result. Each call's result is dropped when the next
    one is queued, so memory stays that of one call."""
    sync(fn())
    sync(fn())
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < max_batches):
        t0 = time.perf_counter()
        for _ in range(batch):
            result = fn()
        sync(result)
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def jax_fns(kind, variant, config=None):
    """(forward, forward+backward) jitted functions of (q, k, v, gate, dout) for one JAX implementation;
    ``config``: the Pallas kernel's tiling (None: its default)."""
    if variant in ("delta_rule", "gated_delta_rule"):
        split = (lambda g: g) if variant == "gated_delta_rule" else (lambda g: (g, None))  # (beta, log gate)
        if kind == "pallas":
            rec = lambda q, k, v, g: delta_ops.chunked_delta_recurrence(q, k, v, *split(g), config=config,
                                                                       backend="triton", interpret=SMOKE)[0]
        else:  # XLA's chunked form, float32 maths and state
            def rec(q, k, v, g):
                beta, log_gate = split(g)
                q, k, v, beta = (x.astype(jnp.float32) for x in (q, k, v, beta))
                return _recurrent.delta_recurrence(q, k, v, beta, log_gate=log_gate, implementation="chunked",
                                                   chunk_size=64)[0].astype(jnp.bfloat16)
    elif variant == "gla" and kind == "pallas":
        rec = lambda q, k, v, g: vector_gate_ops.chunked_vector_gate_recurrence(
            q, k, v, g, config=config, backend="triton", interpret=SMOKE)[0]
    elif variant == "gla":  # XLA's chunked form, float32 maths and state
        rec = lambda q, k, v, g: _recurrent.linear_recurrence(
            *(x.astype(jnp.float32) for x in (q, k, v)), log_gate=g, implementation="chunked", chunk_size=64
        )[0].astype(q.dtype)
    elif kind == "pallas":
        rec = lambda q, k, v, g: chunked_scalar_gate_recurrence(q, k, v, g, config=config, backend="triton",
                                                                interpret=SMOKE)[0]
    else:  # XLA's chunked form; bf16 in, float32 maths and state
        rec = lambda q, k, v, g: chunked_scalar_gate_reference(q, k, v, g, chunk_size=64)[0]

    def forward(q, k, v, g, dout):
        return rec(q, k, v, g)

    def forward_backward(q, k, v, g, dout):
        if g is None or variant in FIXED_GATE:
            out, vjp = jax.vjp(lambda q, k, v: rec(q, k, v, g), q, k, v)
        else:
            out, vjp = jax.vjp(rec, q, k, v, g)
        return out, vjp(dout)

    return jax.jit(forward), jax.jit(forward_backward)


def jax_memory(fn, args):
    m = fn.lower(*args).compile().memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def run_jax(kind, variant, mode, q, k, v, gate, dout, config=None):
    fwd, fwd_bwd = jax_fns(kind, variant, config)
    fn = fwd if mode == "forward" else fwd_bwd
    args = (q, k, v, gate, dout)
    seconds = timed(lambda: fn(*args), jax.block_until_ready)
    out = fn(*args)
    return seconds, jax_memory(fn, args), (out if mode == "forward" else out[0])


def fla_call(fla, variant, mode, q, k, v, gate, dout):
    """A no-argument function running fla's kernel once on these (JAX) inputs: the forward, or forward and
    backward (the gates are leaves too, so that fla computes their gradients as the JAX paths do)."""
    import torch

    to_torch = lambda x: torch.from_dlpack(x) if x is not None else None
    gates = () if gate is None or variant in FIXED_GATE else gate if isinstance(gate, tuple) else (gate,)
    tq, tk, tv, tdo, *tg = (to_torch(x) for x in (q, k, v, dout, *gates))
    fn = fla[variant]

    def call(q, k, v, *g):
        if variant in ("simple_gla", "gla"):
            return fn(q, k, v, g=g[0], scale=1.0)[0]
        if variant == "delta_rule":
            return fn(q, k, v, g[0], scale=1.0)[0]  # g carries beta
        if variant == "gated_delta_rule":
            return fn(q, k, v, g[1], g[0], scale=1.0)[0]  # (log gate, beta)
        if variant == "retention":
            return fn(q, k, v, scale=1.0)[0]  # its fixed decays are the inputs' (``inputs``)
        return fn(q, k, v, scale=1.0, normalize=False)[0]

    if mode == "forward":
        def run():
            with torch.no_grad():
                return call(tq, tk, tv, *tg)

        return run
    leaves = [x.detach().clone().requires_grad_(True) for x in (tq, tk, tv, *tg)]

    def run():
        out = call(*leaves)
        out.backward(tdo)
        return out

    return run


def run_fla(fla, variant, mode, q, k, v, gate, dout):
    import torch

    run = fla_call(fla, variant, mode, q, k, v, gate, dout)
    seconds = timed(run, lambda _: torch.cuda.synchronize())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # the peak of one call
    out = run()
    torch.cuda.synchronize()
    return seconds, int(torch.cuda.max_memory_allocated()), jnp.asarray(np.asarray(out.detach().float().cpu()))


def write(results, final=False, header=None):
    """$OUT/linear_recurrent.json (``header`` or this run's device, versions, commit and date, and ``results``);
    with ``final`` also the markdown table $OUT/linear_recurrent.md."""
    os.makedirs(OUT, exist_ok=True)
    header = header or {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                        "commit": os.environ.get("BENCH_COMMIT"), "xla_flags": os.environ.get("XLA_FLAGS"),
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(os.path.join(OUT, "linear_recurrent.json"), "w") as f:
        json.dump({**header, "results": results}, f, indent=1)
    if not final:
        return
    lines = ["| variant | shape | mode | impl | tokens/s (M) | vs fla | peak MiB | rel err vs XLA |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        fla_tps = next((x.get("tokens_per_s") for x in results if x["impl"] == "fla" and x["variant"] == r["variant"]
                        and x["shape"] == r["shape"] and x["mode"] == r["mode"] and x.get("run") == r.get("run")),
                       None)
        tps = r.get("tokens_per_s")
        ratio = f"{tps / fla_tps:.2f}x" if tps and fla_tps else "-"
        cell = f"{tps / 1e6:.2f}" if tps else r.get("error", "-")[:60].replace("|", "/")
        mem = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "-"
        err = f"{r['rel_err_vs_xla']:.1e}" if r.get("rel_err_vs_xla") is not None else "-"
        cells = (r["variant"], r["shape"], r["mode"], r["impl"], cell, ratio, mem, err)
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    with open(os.path.join(OUT, "linear_recurrent.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def merge(paths):
    """One JSON + table from several runs' files. Ratios stay within a run: each fla row is matched to the rows of
    its own file (a "run" field records which). Refuses files from different devices, jax versions or commits."""
    runs = [json.load(open(path)) for path in paths]
    keys = ("device", "jax", "commit", "xla_flags")
    for run, path in zip(runs[1:], paths[1:]):
        if any(run.get(key) != runs[0].get(key) for key in keys):
            raise SystemExit(f"{path}: {[run.get(key) for key in keys]} differs from {paths[0]}'s "
                             f"{[runs[0].get(key) for key in keys]}")
    results = [{**row, "run": i} for i, run in enumerate(runs) for row in run["results"]]
    header = {key: runs[0].get(key) for key in keys} | {"date": [run.get("date") for run in runs]}
    write(results, final=True, header=header)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fla-wheel", default=None, help="path of the fla-core 0.6.0 wheel to import fla from")
    parser.add_argument("--triton-cache", default=None, metavar="DIR",
                        help="keep Triton's kernels and fla's autotuning choices in DIR, to carry to later calls")
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--shapes", nargs="+", type=int, default=None,
                        help="indices into SHAPES (0: B4 S8192, 1: B1 S32768); default both, or 0 with --quick")
    parser.add_argument("--no-xla", action="store_true",
                        help="skip XLA's chunked form (then no relative errors): its compiles take device time")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="no run: merge these result files (device calls of one session) into one JSON + table")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--sweep", nargs="*", default=None, metavar="LABEL",
                        help="also time the Pallas kernels under SWEEP's tilings (those labels only, if given)")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: tiny shape, interpret mode, no fla")
    parser.add_argument("--try-fla-refused", action="store_true",
                        help="also run fla's backwards in FLA_REFUSES_BACKWARD (it refuses them on Triton 3.6)")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge)
        return
    global SMOKE
    SMOKE = args.smoke
    if args.triton_cache:  # read by Triton when fla's kernels are defined: before fla is imported
        os.environ["TRITON_CACHE_DIR"] = os.path.abspath(args.triton_cache)
        os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    fla = None if args.smoke else load_fla(args.fla_wheel)
    indices = args.shapes if args.shapes is not None else [0] if args.quick else range(len(SHAPES))
    shapes = [(1, 64, 2, 64)] if args.smoke else [SHAPES[i] for i in indices]
    results = []
    for b, s, h, d in shapes:
        for variant in args.variants:
            kernel = {"gla": "vector", "delta_rule": "delta", "gated_delta_rule": "delta"}.get(variant, "scalar")
            tilings = {} if args.sweep is None else {label: tiling for label, tiling in SWEEP[kernel].items()
                                                      if not args.sweep or label in args.sweep}
            impls = ([] if args.no_xla else ["xla_chunked"]) + ["pallas"] + [f"pallas[{label}]" for label in tilings]
            impls.append("fla")
            q, k, v, gate, dout = inputs(jax.random.key(0), b, s, h, d, variant)
            shape = f"B{b} S{s} H{h} D{d}"
            for mode in args.modes:
                reference_out = None
                for impl in impls:
                    row = dict(variant=variant, shape=shape, mode=mode, impl=impl)
                    try:
                        if impl == "fla":
                            if fla is None:
                                raise RuntimeError("fla unavailable")
                            if (mode != "forward" and variant in FLA_REFUSES_BACKWARD
                                    and not args.try_fla_refused):
                                raise RuntimeError("not run: fla refuses this backward on Triton < 3.7.1 on Hopper")
                            seconds, peak, out = run_fla(fla, variant, mode, q, k, v, gate, dout)
                        else:
                            kind, _, label = impl.partition("[")
                            seconds, peak, out = run_jax(kind.split("_")[0], variant, mode, q, k, v, gate, dout,
                                                         tilings.get(label.rstrip("]")))
                        if impl == "xla_chunked":
                            reference_out = out
                        row.update(seconds=seconds, tokens_per_s=b * s / seconds, peak_bytes=peak)
                        if reference_out is not None:
                            row["rel_err_vs_xla"] = rel_err(out, reference_out)
                        log(f"{variant} {shape} {mode} {impl}: {b * s / seconds / 1e6:.2f} M tokens/s")
                    except Exception as e:  # report and go on (fla refuses some backwards; XLA may run out of memory)
                        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                        log(f"ERROR {variant} {shape} {mode} {impl}: {row['error']}")
                        traceback.print_exc()
                    results.append(row)
                    write(results)
    write(results, final=True)


if __name__ == "__main__":
    main()
