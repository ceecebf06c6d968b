"""GPU checks and timings of the Mosaic GPU sliding-window forward (``backend="mosaic_gpu"``) and of its
opt-in Mosaic GPU dk/dv backward (``mosaic_backward=``), H100/H200.

Run on the GPU machine from the repository root:
    PYTHONPATH=. python benchmarks/check_sliding_window_mgpu.py
Prints, and writes to $OUT/check_sliding_window_mgpu.txt and .json (OUT defaults to /tmp), in this order
(the most needed first, since MGPU_BUDGET_S, default 70 s, stops whatever is left):
  0. the Mosaic GPU backward (Mosaic dq and dk/dv passes, or Triton dq + Mosaic dk/dv, behind the default
     Mosaic forward; mosaic_gpu_backward.MosaicBackwardBlocks variants): gradient checks of
     each backward variant, then forward+backward timings at the three cases beside cuDNN, the Triton kernel
     and the Mosaic forward with the Triton backward; then the gradient checks of the other cases;
  1. forward checks of every tiling variant against the float32 dense reference (odd length, GQA, causal);
  2. the saved log-sum-exp against the Triton forward's on the same padded inputs (the backward reads it);
  3. forward timings at B4 S8192 H16 D128 bf16 causal W512: cuDNN, the Triton kernel, each variant;
  4. gradients (Mosaic forward + Triton backward through the custom VJP) against the reference;
  5. forward timings at S32768 W1024 and W4096; 6. forward+backward timings; 7. the remaining checks.
Every case catches and prints its own exception (a Mosaic lowering or ptxas error is information).
MGPU_SMOKE=1: control-flow smoke test on a CPU (Pallas' interpreters, tiny shapes, no cuDNN).
TFLOP/s count the work inside the window: forward 4*B*H*S*W*D, forward+backward 2.5x that.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _check_common as common
from kernels_pallas.sliding_window import band, sliding_window_attention, sliding_window_reference
from kernels_pallas.sliding_window.mosaic_gpu_backward import MosaicBackwardBlocks
from kernels_pallas.sliding_window.mosaic_gpu_forward import MosaicBlocks

OUT = os.environ.get("OUT", "/tmp")
RUN = common.Report("check_sliding_window_mgpu", float(os.environ.get("MGPU_BUDGET_S", "70")), OUT)
SMOKE = bool(os.environ.get("MGPU_SMOKE"))
BUDGET_S, REPORT = RUN.budget_s, RUN.data
log, save, out_of_time, report_error = RUN.log, RUN.save, RUN.out_of_time, RUN.report_error
rel_err, inputs, fwd_bwd = common.rel_err, common.attention_inputs, common.jit_fwd_bwd

# Simplest first: one compute warpgroup, 64-key steps, every tile masked (one loop).
VARIANTS = {
    "1wg-k64-1loop": MosaicBlocks(block_q=64, block_k=64, compute_wgs=1, num_slots=2, split_loops=False),
    "1wg-k128": MosaicBlocks(block_q=64, block_k=128, compute_wgs=1, num_slots=2),
    "2wg-k128": MosaicBlocks(block_q=64, block_k=128, compute_wgs=2, num_slots=2),
    "2wg-k64-3slots": MosaicBlocks(block_q=64, block_k=64, compute_wgs=2, num_slots=3),
    "2wg-k128-pingpong": MosaicBlocks(block_q=64, block_k=128, compute_wgs=2, num_slots=2, pingpong=True),
}
# The Mosaic GPU dk/dv pass (mosaic_gpu_backward.MosaicBackwardBlocks). A variant name "FWD+BWD" means the
# forward variant FWD with the backward variant BWD; a plain forward variant name keeps the Triton backward.
# "triton-dq": the Triton dq pass with the Mosaic dk/dv pass (isolates the two Mosaic kernels).
BWD_VARIANTS = {
    "bwd-2wg": MosaicBackwardBlocks(block_q=64, block_k=64, compute_wgs=2, num_slots=2),
    "bwd-2wg-triton-dq": MosaicBackwardBlocks(block_q=64, block_k=64, compute_wgs=2, num_slots=2,
                                              mosaic_dq=False),
    "bwd-1wg": MosaicBackwardBlocks(block_q=64, block_k=64, compute_wgs=1, num_slots=2),
    "bwd-2wg-3slots": MosaicBackwardBlocks(block_q=64, block_k=64, compute_wgs=2, num_slots=3),
}
FWD_FOR_BWD = "2wg-k128-pingpong"  # the default forward (mosaic_gpu_forward.DEFAULT_BLOCKS)


def mosaic_kwargs(variant):
    """sliding_window_attention's keywords for a variant name "FWD" or "FWD+BWD"."""
    fwd, _, bwd = variant.partition("+")
    return dict(backend="mosaic_gpu", mosaic_blocks=VARIANTS[fwd], mosaic_backward=BWD_VARIANTS[bwd] if bwd
                else False)


def is_mosaic(name):
    return name.partition("+")[0] in VARIANTS


# ------------------------------------------------------------------------------------------------ checks
# b, s, h, hkv, d, window, causal, dtype: lengths off and on the tile multiple, GQA, causal and two-sided.
CHECKS = {
    "A s1000 d128 gqa4:2 causal w(299,0) bf16": (2, 1000, 4, 2, 128, (299, 0), True, jnp.bfloat16),
    "B s512 d64 gqa2:1 two-sided w(100,37) fp16": (1, 512, 2, 1, 64, (100, 37), False, jnp.float16),
    "C s333 d128 mha two-sided w(5,200) bf16": (1, 333, 2, 2, 128, (5, 200), False, jnp.bfloat16),
}
_REFS = {}


def _reference(name):
    if name not in _REFS:
        b, s, h, hkv, d, window, causal, dtype = CHECKS[name]
        q, k, v, dout = inputs(11, b, s, h, hkv, d, dtype)
        f32 = lambda x: x.astype(jnp.float32)
        ref = lambda q, k, v: sliding_window_reference(q, k, v, window=window, causal=causal)
        _REFS[name] = (q, k, v, dout), fwd_bwd(ref)(f32(q), f32(k), f32(v), f32(dout))
    return _REFS[name]


def check(name, variant, grads):
    what = f"check {name} [{variant}] {'fwd+grads' if grads else 'fwd'}"
    if out_of_time(what):
        return
    row = dict(check=name, variant=variant, grads=grads)
    try:
        (q, k, v, dout), (ref_out, ref_grads) = _reference(name)
        _, _, _, _, _, window, causal, _ = CHECKS[name]
        ours = lambda q, k, v: sliding_window_attention(q, k, v, window=window, causal=causal,
                                                        interpret=SMOKE, **mosaic_kwargs(variant))
        t0 = time.perf_counter()
        if grads:
            out, g = fwd_bwd(ours)(q, k, v, dout)
            errs = [rel_err(out, ref_out)] + [rel_err(a, r) for a, r in zip(g, ref_grads)]
        else:
            errs = [rel_err(jax.jit(ours)(q, k, v), ref_out)]
        errors = dict(zip(("out", "dq", "dk", "dv"), errs))
        row.update(errors=errors, ok=all(e < 2e-2 for e in errs), seconds=time.perf_counter() - t0)
        log(f"{'OK  ' if row['ok'] else 'FAIL'} {what}: " + " ".join(f"{n} {e:.2e}" for n, e in errors.items())
            + f" ({row['seconds']:.1f} s)")
    except Exception as e:  # one broken variant must not hide the others
        row.update(ok=False, error=report_error(what, e))
    REPORT["checks"].append(row)
    save()


def check_lse_matches_triton(variant):
    """The Triton backward reads the forward's lse: both forwards must save the same one (padded rows too)."""
    what = f"lse vs Triton forward [{variant}]"
    if out_of_time(what):
        return
    from kernels_pallas.sliding_window import config, gpu_forward, mosaic_gpu_forward

    row = dict(check="lse", variant=variant)
    try:
        b, s_pad, seq_len, h, hkv, d, left, right = 1, 1024, 1000, 4, 2, 128, 299, 0
        q, k, v, _ = inputs(5, b, s_pad, h, hkv, d, jnp.bfloat16)
        common = dict(left=left, right=right, scale=d ** -0.5, seq_len=seq_len)
        if SMOKE:
            from jax.experimental.pallas import mosaic_gpu as plgpu

            b, s_pad, seq_len, d, left = 1, 256, 200, 64, 70
            q, k, v, _ = inputs(5, b, s_pad, h, hkv, d, jnp.bfloat16)
            common = dict(left=left, right=right, scale=d ** -0.5, seq_len=seq_len)
        mosaic_interpret = plgpu.InterpretGPUParams() if SMOKE else None
        _, lse_m = jax.jit(lambda q, k, v: mosaic_gpu_forward.forward(
            q, k, v, blocks=VARIANTS[variant], interpret=mosaic_interpret, **common))(q, k, v)
        _, lse_t = jax.jit(lambda q, k, v: gpu_forward.forward(
            q, k, v, None, softcap=None, blocks=config.GPU_DEFAULT, interpret=SMOKE, **common))(q, k, v)
        lse_m, lse_t = np.asarray(lse_m), np.asarray(lse_t)
        real = float(np.abs(lse_m[..., :seq_len] - lse_t[..., :seq_len]).max())
        pad_ok = bool(np.all(lse_m[..., seq_len:] == band.PAD_LSE))
        row.update(max_abs_diff_real_rows=real, padded_rows_pad_lse=pad_ok, ok=real < 2e-2 and pad_ok)
        log(f"{'OK  ' if row['ok'] else 'FAIL'} {what}: max |diff| {real:.2e} on real rows, padded rows "
            f"{'PAD_LSE' if pad_ok else 'WRONG'}")
    except Exception as e:
        row.update(ok=False, error=report_error(what, e))
    REPORT["checks"].append(row)
    save()


# ------------------------------------------------------------------------------------------------ timing
def timed(fn, args):
    return common.timed(fn, args, smoke=SMOKE)


CASES = {
    "B4 S8192 W512": dict(b=4, s=8192, h=16, d=128, w=512),
    "B4 S32768 W1024": dict(b=4, s=32768, h=16, d=128, w=1024),
    "B4 S32768 W4096": dict(b=4, s=32768, h=16, d=128, w=4096),
}
if SMOKE:
    CASES = {name: dict(b=1, s=256, h=2, d=64, w=c["w"] // 16) for name, c in CASES.items()}
    CHECKS = {name: (1, min(c[1], 200), *c[2:]) for name, c in CHECKS.items()}
_INPUTS = {}


def impl(name, w):
    window = (w - 1, 0)
    if name == "cudnn":
        if SMOKE:
            raise ValueError("no cuDNN in the CPU smoke test")
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                                            implementation="cudnn")
    if name == "triton":
        return lambda q, k, v: sliding_window_attention(q, k, v, window=window, causal=True, backend="triton",
                                                        interpret=SMOKE)
    return lambda q, k, v: sliding_window_attention(q, k, v, window=window, causal=True, interpret=SMOKE,
                                                    **mosaic_kwargs(name))


def time_one(case, name, mode):
    what = f"{case:>16} {name:>15} {mode:>7}"
    done = [r for r in REPORT["timings"] if (r["case"], r["impl"], r["mode"]) == (case, name, mode) and "ms" in r]
    if done:  # timed already (section 0 times what section 6 would again)
        return done[0]["ms"]
    if out_of_time(what):
        return None
    c = CASES[case]
    row = dict(case=case, impl=name, mode=mode)
    try:
        if case not in _INPUTS:
            _INPUTS.clear()  # one case's inputs at a time (S32768: 0.5 GB each)
            _INPUTS[case] = inputs(7, c["b"], c["s"], c["h"], c["h"], c["d"], jnp.bfloat16)
        q, k, v, dout = _INPUTS[case]
        flops = 4.0 * c["b"] * c["h"] * c["s"] * c["w"] * c["d"]
        f = impl(name, c["w"])
        if mode == "fwd":
            first, sec, n = timed(jax.jit(f), (q, k, v))
        else:
            first, sec, n = timed(fwd_bwd(f), (q, k, v, dout))
            flops *= 2.5
        row.update(ms=sec * 1e3, tflops=flops / sec / 1e12, calls=n, first_call_s=first)
        log(f"{what} {sec * 1e3:9.3f} ms {row['tflops']:6.1f} TFLOP/s (first call {first:.1f} s, {n} calls)")
    except Exception as e:
        row.update(error=report_error(what, e))
    REPORT["timings"].append(row)
    save()
    return row.get("ms")


def best_variant(case):
    rows = [r for r in REPORT["timings"] if r["case"] == case and r["mode"] == "fwd" and r["impl"] in VARIANTS
            and "ms" in r]
    ok = {r["variant"] for r in REPORT["checks"] if r.get("ok") and "variant" in r}
    rows = [r for r in rows if r["impl"] in ok] or rows
    return min(rows, key=lambda r: r["ms"])["impl"] if rows else "1wg-k128"


def table():
    log("")
    log("| case | mode | cuDNN ms | Triton ms (vs cuDNN) | best Mosaic fwd + Triton bwd ms (vs cuDNN) | "
        "Mosaic variants ms | best Mosaic fwd + Mosaic bwd ms (vs cuDNN) | Mosaic bwd variants ms |")
    log("|---|---|---|---|---|---|---|---|")
    for case in CASES:
        for mode in ("fwd", "fwd+bwd"):
            rows = {r["impl"]: r for r in REPORT["timings"] if r["case"] == case and r["mode"] == mode and "ms" in r}
            if not rows:
                continue
            cu, tr = rows.get("cudnn"), rows.get("triton")
            mosaic = {n: r for n, r in rows.items() if n in VARIANTS}
            best = min(mosaic.values(), key=lambda r: r["ms"], default=None)
            cell = lambda r: "n/a" if r is None else (
                f"{r['ms']:.3f}" + (f" ({cu['ms'] / r['ms']:.2f}x)" if cu and r is not cu else ""))
            variants = ", ".join(f"{n} {r['ms']:.3f}" for n, r in mosaic.items())
            mosaic_bwd = {n: r for n, r in rows.items() if "+" in n and is_mosaic(n)}
            best_bwd = min(mosaic_bwd.values(), key=lambda r: r["ms"], default=None)
            variants_bwd = ", ".join(f"{n} {r['ms']:.3f}" for n, r in mosaic_bwd.items())
            log(f"| {case} | {mode} | {cell(cu)} | {cell(tr)} | "
                f"{cell(best)}{' ' + best['impl'] if best else ''} | {variants} | "
                f"{cell(best_bwd)}{' ' + best_bwd['impl'] if best_bwd else ''} | {variants_bwd} |")


def main():
    dev = jax.devices()[0]
    REPORT["meta"] = dict(device=str(dev.device_kind), jax=jax.__version__,
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          variants={n: str(b) for n, b in VARIANTS.items()},
                          bwd_variants={n: str(b) for n, b in BWD_VARIANTS.items()}, budget_s=BUDGET_S,
                          commit=os.environ.get("BENCH_COMMIT"))  # the caller names the commit it exported
    log("meta", json.dumps(REPORT["meta"]))
    first_check = next(iter(CHECKS))
    for bwd in BWD_VARIANTS:  # 0. the Mosaic GPU backward: checks, timings, the other checks
        check(first_check, f"{FWD_FOR_BWD}+{bwd}", grads=True)
    for case in CASES:
        for name in ("cudnn", "triton", FWD_FOR_BWD, *(f"{FWD_FOR_BWD}+{bwd}" for bwd in BWD_VARIANTS)):
            time_one(case, name, "fwd+bwd")
    for name in list(CHECKS)[1:]:
        check(name, f"{FWD_FOR_BWD}+bwd-2wg", grads=True)
    for variant in VARIANTS:  # 1. does each variant lower, compile and agree, forward only
        check(first_check, variant, grads=False)
    check_lse_matches_triton("1wg-k128")  # 2.
    case = "B4 S8192 W512"  # 3.
    for name in ("cudnn", "triton", *VARIANTS):
        time_one(case, name, "fwd")
    check(first_check, best_variant(case), grads=True)  # 4.
    for case in ("B4 S32768 W1024", "B4 S32768 W4096"):  # 5.
        for name in ("cudnn", "triton", "1wg-k128", "2wg-k128", "2wg-k128-pingpong"):
            time_one(case, name, "fwd")
    for case in CASES:  # 6.
        for name in ("cudnn", "triton", best_variant(case)):
            time_one(case, name, "fwd+bwd")
    for name in list(CHECKS)[1:]:  # 7.
        for variant in VARIANTS:
            check(name, variant, grads=variant == "1wg-k128")
    table()
    save()
    log(f"done; written to {OUT}/check_sliding_window_mgpu.txt and .json")


if __name__ == "__main__":
    main()
