"""Sliding-window attention on the GPU: timings of the Pallas kernel vs cuDNN and XLA, then GPU checks.

Run on the device machine from the repository root:
    PYTHONPATH=. python3 benchmarks/sliding_window.py [--commit SHA] [--defaults-only] [--quick] [--fused]
Times, per case, cuDNN, the kernel with its default tiles and a few tile variations, and the dense XLA
reference (skipped where its logits cannot fit); then checks the default tiles on the GPU against a float32
dense reference, forward and dq/dk/dv, over GQA/MQA, segment ids, soft-cap, head_dim 64/128/256, odd lengths
and float32/float16/bfloat16. Writes $OUT/sliding_window.json (or ./sliding_window.json) after each case
and prints the table (then the checks) last. SW_BUDGET_S stops timing and checks after that many seconds.
--fused times the one-pass backward (``fused_bwd``) in a few tilings against the default two-pass one,
compares every kernel's output and gradients with cuDNN's on the timed inputs, and runs the checks on it.

TFLOP/s count only the work inside the window: forward 4*B*H*S*W*D (two products of W keys per query,
2 flops per multiply-add), forward+backward 2.5x that (the backward does five products to the forward's
two). W is the number of keys a query sees: a causal window W is window=(W-1, 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _check_common as common
from kernels_pallas.sliding_window import sliding_window_attention, sliding_window_reference
from kernels_pallas.sliding_window.config import default_block_sizes

OUT = os.environ.get("OUT", ".")
LOG = []


def log(*parts):
    line = f"[{time.perf_counter() - START:6.1f}s] " + " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.append(line)


# The check scripts' helpers (one home: benchmarks/_check_common.py); block_sparse.py imports them from here.
rel_err, inputs, fwd_bwd = common.rel_err, common.attention_inputs, common.jit_fwd_bwd


# ---------------------------------------------------------------------------------------------- checks
CHECKS = [
    # b, s, h, hkv, d, window, causal, segments, softcap, dtype
    (2, 1000, 4, 2, 64, (100, 37), False, False, None, jnp.bfloat16),
    (1, 2048, 4, 1, 128, (511, 0), True, False, None, jnp.bfloat16),
    (2, 777, 4, 4, 128, (64, 0), True, True, None, jnp.float16),
    (1, 600, 4, 2, 256, (300, 300), False, False, 30.0, jnp.bfloat16),
    (1, 513, 2, 2, 64, (3, 1), False, True, None, jnp.float32),
    (1, 300, 2, 1, 64, (299, 299), False, False, None, jnp.float32),
]


def run_checks(blocks_list):
    results = []
    for i, (b, s, h, hkv, d, window, causal, segments, softcap, dtype) in enumerate(CHECKS):
        q, k, v, dout = inputs(100 + i, b, s, h, hkv, d, dtype)
        seg = None
        if segments:
            seg = jnp.asarray(np.sort(np.random.RandomState(i).randint(0, 4, (b, s)), axis=1), jnp.int32)
        kw = dict(window=window, causal=causal, segment_ids=seg, softcap=softcap)
        f32 = lambda x: x.astype(jnp.float32)
        ref_out, ref_grads = fwd_bwd(lambda q, k, v: sliding_window_reference(q, k, v, **kw))(
            f32(q), f32(k), f32(v), f32(dout))
        for blocks in blocks_list:
            if time.perf_counter() - START > BUDGET_S:
                log("checks stopped: out of time")
                return results
            if blocks == "fused":  # the default tiles of this shape, with the one-pass backward
                left, right = window[0], 0 if causal else window[1]
                blocks = dataclasses.replace(default_block_sizes("triton", False, d, left + right + 1),
                                             fused_bwd=True)
            name = (f"check{i} s{s} d{d} w{window} {'causal' if causal else 'two-sided'}"
                    f"{' seg' if segments else ''}{' cap' if softcap else ''} {jnp.dtype(dtype).name}"
                    f" {_blocks_tag(blocks)}")
            try:
                ours = lambda q, k, v: sliding_window_attention(q, k, v, block_sizes=blocks, **kw)
                out, grads = fwd_bwd(ours)(q, k, v, dout)
                errs = [rel_err(out, ref_out)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
                tol = 2e-3 if dtype == jnp.float32 else 2e-2
                ok = all(e < tol for e in errs)
                errors = dict(zip(("out", "dq", "dk", "dv"), errs))
                results.append(dict(name=name, errors=errors, tol=tol, ok=ok))
                log(f"{'OK  ' if ok else 'FAIL'} {name}: " + " ".join(f"{n} {e:.2e}" for n, e in errors.items()))
            except Exception as e:  # report and go on: one broken variant must not hide the others
                results.append(dict(name=name, ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}"))
                log(f"ERROR {name}: {type(e).__name__}: {str(e)[:600]}")
                traceback.print_exc()
    return results


# ---------------------------------------------------------------------------------------------- timing
def timed(fn, args, min_time=0.6, max_iters=200):
    """(median seconds per call, calls, last result) of a jitted fn after two warm-up calls, each call
    ended by block_until_ready."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < max_iters):
        t0 = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times), result


def _blocks_tag(blocks):
    if blocks is None:
        return "default"
    return (f"f{blocks.block_q}x{blocks.block_k}w{blocks.num_warps}s{blocks.num_stages}"
            f"-dq{blocks.block_q_dq}x{blocks.block_k_dq}-dkv{blocks.block_q_dkv}x{blocks.block_k_dkv}"
            f"w{blocks.num_warps_bwd}s{blocks.num_stages_bwd}{'-1loop' if blocks.single_loop else ''}"
            f"{'-fused' if blocks.fused_bwd else ''}")


START = time.perf_counter()
BUDGET_S = float(os.environ.get("SW_BUDGET_S", "1e9"))


def time_case(case, variants, rows, compare=False):
    """Times each (name, f, modes); with ``compare``, the fwd+bwd results of each kernel are checked
    against cuDNN's (the first variant) on the same inputs: relative errors of out, dq, dk, dv."""
    b, s, h, d, w = case["b"], case["s"], case["h"], case["d"], case["w"]
    q, k, v, dout = inputs(7, b, s, h, h, d, jnp.bfloat16)
    flops_fwd = 4.0 * b * h * s * w * d
    first = None
    for name, f, modes in variants:
        for mode in modes:
            row = dict(case=case["name"], impl=name, mode=mode)
            if time.perf_counter() - START > BUDGET_S:
                log(f"{case['name']:>22} {name:>40} {mode:>7} skipped: out of time")
                continue
            try:
                if mode == "fwd":
                    fn, args, flops = jax.jit(f), (q, k, v), flops_fwd
                else:
                    fn, args, flops = fwd_bwd(f), (q, k, v, dout), 2.5 * flops_fwd
                sec, n, result = timed(fn, args)
                row.update(ms=sec * 1e3, tflops=flops / sec / 1e12, calls=n)
                log(f"{case['name']:>22} {name:>40} {mode:>7} {sec * 1e3:9.3f} ms {row['tflops']:7.1f} TFLOP/s")
                if compare and mode == "fwd+bwd":
                    flat = [result[0], *result[1]]
                    if first is None:
                        first = flat
                    else:
                        row["rel_err_vs_first"] = dict(zip(("out", "dq", "dk", "dv"),
                                                           (rel_err(a, r) for a, r in zip(flat, first))))
                        log(f"{'':>22} errors vs {variants[0][0]}: "
                            + " ".join(f"{n} {e:.2e}" for n, e in row["rel_err_vs_first"].items()))
                del result
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
                log(f"{case['name']:>22} {name:>40} {mode:>7} failed: {row['error'][:200]}")
            rows.append(row)
    return rows


def ceilings():
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    sec, _, _ = timed(mm, (a, a), min_time=0.5)
    x = jnp.ones((256 * 1024 * 1024,), jnp.float32) * 1.5  # 1 GiB
    cp = jax.jit(lambda x: x * 2.0)
    sec_cp, _, _ = timed(cp, (x,), min_time=0.5)
    return dict(bf16_matmul_tflops=2 * 8192 ** 3 / sec / 1e12, copy_gbps=2 * x.nbytes / sec_cp / 1e9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--quick", action="store_true", help="default blocks only, 8192 case only")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--defaults-only", action="store_true", help="time only the default tiles (all cases)")
    ap.add_argument("--fused", action="store_true",
                    help="fused one-pass backward against the default; no XLA reference; checks on fused")
    args = ap.parse_args()

    dev = jax.devices()[0]
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        driver = f"unavailable ({e})"
    meta = dict(device=str(dev.device_kind), driver=driver, jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=args.commit)
    log("meta", json.dumps(meta))
    report = dict(meta=meta, convention="TFLOP/s on in-window work: fwd 4*B*H*S*W*D, fwd+bwd 2.5x fwd")

    def save():
        report["log"] = LOG
        with open(os.path.join(OUT, "sliding_window.json"), "w") as fh:
            json.dump(report, fh, indent=1)

    report["ceilings"] = ceilings()
    log("ceilings", report["ceilings"])
    save()

    # Per case: cuDNN, our kernel with its default tiles (block_sizes=None), a few variations of those tiles
    # (forward ones timed forward, backward ones forward+backward), and the dense XLA reference.
    # Runs 2-3 (NOTES.md) chose the defaults; these variations are what might still beat them.
    fwd_variations = [dict(block_k=128), dict(num_stages=4)]
    bwd_variations = [dict(num_warps_bwd=8), dict(block_q_dkv=128, num_warps_bwd=8), dict(block_k_dq=128,
                                                                                         num_warps_bwd=8)]
    if args.quick or args.defaults_only:
        fwd_variations, bwd_variations = [], []
    if args.fused:
        # The default tiles, and a wider key tile: half the atomic traffic per key (each key tile adds one
        # [block_q, d] dq share per query tile), with 4 or 8 warps.
        fwd_variations = []
        bwd_variations = [dict(fused_bwd=True), dict(fused_bwd=True, block_q_dkv=32, block_k_dkv=128),
                          dict(fused_bwd=True, block_q_dkv=64, block_k_dkv=128, num_warps_bwd=8)]

    cases = [dict(name="B4 S8192 W512 causal", b=4, s=8192, h=16, d=128, w=512),
             dict(name="B4 S32768 W1024 causal", b=4, s=32768, h=16, d=128, w=1024),
             dict(name="B4 S32768 W4096 causal", b=4, s=32768, h=16, d=128, w=4096)]
    if args.quick:
        cases = cases[:1]
    if os.environ.get("SW_SMOKE"):  # control-flow smoke test on a CPU: tiny shapes, every variant may fail
        cases = [dict(c, b=1, s=256, h=2, w=c["w"] // 16) for c in cases]
    rows = []
    report["timings"] = rows
    report["default_blocks"] = {}
    variants_used = []
    for case in cases:
        w = case["w"]
        ours = lambda blocks, w=w: (lambda q, k, v: sliding_window_attention(
            q, k, v, window=(w - 1, 0), causal=True, block_sizes=blocks))
        cudnn = lambda q, k, v, w=w: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(w - 1, 0), implementation="cudnn")
        xla = lambda q, k, v, w=w: sliding_window_reference(q, k, v, window=(w - 1, 0), causal=True)
        default = default_block_sizes("triton", False, case["d"], w)
        report["default_blocks"][case["name"]] = dataclasses.asdict(default)
        both = ("fwd", "fwd+bwd")
        variants = [("cudnn", cudnn, both), ("pallas default " + _blocks_tag(default), ours(None), both)]
        for change in fwd_variations:
            blocks = dataclasses.replace(default, **change)
            variants.append((f"pallas {_blocks_tag(blocks)}", ours(blocks), ("fwd",)))
            variants_used.append(blocks)
        for change in bwd_variations:
            blocks = dataclasses.replace(default, **change)
            variants.append((f"pallas {_blocks_tag(blocks)}", ours(blocks), ("fwd+bwd",)))
            variants_used.append(blocks)
        time_case(case, variants, rows, compare=args.fused)
        if args.fused:
            save()
            continue
        # The dense reference needs the [b, h, s, s] float32 logits: skip where that cannot fit.
        logits_gib = case["b"] * case["h"] * case["s"] ** 2 * 4 / 2 ** 30
        if logits_gib < 40:
            time_case(case, [("xla reference", xla, both)], rows)
        else:
            for mode in both:
                rows.append(dict(case=case["name"], impl="xla reference", mode=mode,
                                 error=f"skipped: dense logits alone need {logits_gib:.0f} GiB (80 GiB GPU)"))
            log(f"{case['name']:>22} xla reference skipped: {logits_gib:.0f} GiB of logits")
        save()

    # Table: per case and mode, cuDNN, our default, our best variation, XLA, and speed ratios to cuDNN.
    log("")
    log("| case | mode | cuDNN ms (TFLOP/s) | pallas default ms (TFLOP/s) | vs cuDNN | best tiles tried ms (TFLOP/s)"
        " | vs cuDNN | XLA ms |")
    log("|---|---|---|---|---|---|---|---|")
    summary = []
    fmt = lambda r: f"{r['ms']:.3f} ({r['tflops']:.0f})" if r else "n/a"
    ratio = lambda cu, r: f"{cu['ms'] / r['ms']:.2f}x" if cu and r else "n/a"
    for case in cases:
        for mode in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r["case"] == case["name"] and r["mode"] == mode]
            ok = [r for r in sel if "ms" in r]
            cu = next((r for r in ok if r["impl"] == "cudnn"), None)
            xl = next((r for r in sel if r["impl"] == "xla reference"), None)
            de = next((r for r in ok if r["impl"].startswith("pallas default")), None)
            best = min((r for r in ok if r["impl"].startswith("pallas")), key=lambda r: r["ms"], default=None)
            xla_cell = f"{xl['ms']:.2f}" if xl and "ms" in xl else ("OOM" if xl and "RESOURCE" in xl.get("error", "")
                                                                    else "skipped (256 GiB logits)" if xl else "n/a")
            log(f"| {case['name']} | {mode} | {fmt(cu)} | {fmt(de)} | {ratio(cu, de)} | {fmt(best)} "
                f"| {ratio(cu, best)} | {xla_cell} |")
            summary.append(dict(case=case["name"], mode=mode, cudnn=cu, pallas_default=de, pallas_best=best, xla=xl))
    report["summary"] = summary
    save()
    if not args.skip_checks:
        # After the timings (compiles are slow: one GQA variant took 3 minutes): default tiles on every check.
        report["checks"] = run_checks(["fused"] if args.fused else [None])
        save()
        log(f"checks: {sum(r['ok'] for r in report['checks'])}/{len(report['checks'])} ok")


if __name__ == "__main__":
    sys.exit(main())
