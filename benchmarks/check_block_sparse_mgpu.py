"""GPU checks and timings of the Mosaic GPU block-sparse forward (``backend="mosaic_gpu"``) and of its opt-in
Mosaic GPU backward (``mosaic_backward=``), H100/H200, against the Triton kernels and torch flex_attention.

Run on the GPU machine from the repository root:
    PYTHONPATH=. python benchmarks/check_block_sparse_mgpu.py
Prints, and writes to $OUT/check_block_sparse_mgpu.txt and .json (OUT defaults to /tmp) after every case, in
this order (BSM_BUDGET_S, default 480 s, skips whatever is left once spent):
  1. checks against the float32 dense reference at small shapes (GQA, causal, empty rows, head_dim 64/80/128,
     bf16/fp16): the default Mosaic forward with the Triton backward (output and dq, dk, dv), the Mosaic forward
     with each Mosaic backward variant, then every forward variant (output only);
  2. the saved log-sum-exp against the Triton forward's (the Triton backward reads it);
  3. timings at B4 S8192 H16 D128 bf16, 128-blocks, the issue's layouts (``benchmarks/block_sparse.layouts``:
     random 10/25/50 % per head plus the diagonal, causal, BigBird): forward and forward+backward of the Triton
     kernel, the default Mosaic forward with the Triton backward, the Mosaic forward with the default Mosaic
     backward, and flex_attention (same block mask) if torch is importable;
  4. the other forward and backward variants on every layout, while the budget lasts; a table at the end.
Every case catches and prints its own exception (a Mosaic lowering or ptxas error is information).
BSM_SMOKE=1: control-flow smoke test on a CPU (Pallas' interpreters, tiny shapes, no flex_attention).
TFLOP/s count the visible (query, key) pairs of the kept blocks: forward 4*D*pairs, forward+backward 2.5x that.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.block_sparse import block_sparse_attention, block_sparse_reference
from kernels_pallas.sliding_window.band import PAD_LSE
from kernels_pallas.sliding_window.mosaic_gpu_backward import MosaicBackwardBlocks
from kernels_pallas.sliding_window.mosaic_gpu_forward import MosaicBlocks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _check_common as common  # noqa: E402
import block_sparse as bs  # noqa: E402  (the issue's layouts, flex_attention runner, visible pairs)

OUT = os.environ.get("OUT", "/tmp")
RUN = common.Report("check_block_sparse_mgpu", float(os.environ.get("BSM_BUDGET_S", "480")), OUT)
SMOKE = bool(os.environ.get("BSM_SMOKE"))
BUDGET_S, REPORT = RUN.budget_s, RUN.data
log, save, out_of_time, report_error = RUN.log, RUN.save, RUN.out_of_time, RUN.report_error
rel_err, inputs, fwd_bwd = common.rel_err, common.attention_inputs, common.jit_fwd_bwd

# Forward tilings; rows per program (block_q x compute_wgs) and block_k must divide the 128-blocks.
VARIANTS = {
    "2wg-k128-pingpong": MosaicBlocks(block_q=64, block_k=128, compute_wgs=2, num_slots=2, pingpong=True),
    "1wg-k128": MosaicBlocks(block_q=64, block_k=128, compute_wgs=1, num_slots=2),
    "2wg-k128": MosaicBlocks(block_q=64, block_k=128, compute_wgs=2, num_slots=2),
    "2wg-k64-3slots": MosaicBlocks(block_q=64, block_k=64, compute_wgs=2, num_slots=3),
    "2wg-k128-1loop": MosaicBlocks(block_q=64, block_k=128, compute_wgs=2, num_slots=2, split_loops=False),
}
DEFAULT_FWD = "2wg-k128-pingpong"  # block_sparse.mosaic_gpu_forward.DEFAULT_BLOCKS
# Mosaic GPU backward tilings (dq and dk/dv passes). A name "FWD+BWD" is forward FWD with backward BWD; a plain
# forward name keeps the Triton backward.
BWD_VARIANTS = {
    "bwd-2wg-3slots": MosaicBackwardBlocks(block_q=64, block_k=64, compute_wgs=2, num_slots=3),
    "bwd-2wg": MosaicBackwardBlocks(block_q=64, block_k=64, compute_wgs=2, num_slots=2),
    "bwd-1wg": MosaicBackwardBlocks(block_q=64, block_k=64, compute_wgs=1, num_slots=2),
}
DEFAULT_BWD = "bwd-2wg-3slots"  # sliding_window.mosaic_gpu_backward.DEFAULT_BACKWARD_BLOCKS


def mosaic_kwargs(name):
    """block_sparse_attention's keywords for an implementation name "triton", "FWD" or "FWD+BWD"."""
    if name == "triton":
        return dict(backend="triton")
    fwd, _, bwd = name.partition("+")
    return dict(backend="mosaic_gpu", mosaic_blocks=VARIANTS[fwd],
                mosaic_backward=BWD_VARIANTS[bwd] if bwd else False)


# ------------------------------------------------------------------------------------------------ checks
# b, s, h, hkv, d, density, causal, dtype (128-blocks; the first block row empty, the last full, per head).
CHECKS = {
    "A s1024 d128 gqa4:2 causal bf16": (2, 1024, 4, 2, 128, 0.3, True, jnp.bfloat16),
    "B s1024 d64 gqa4:1 fp16": (1, 1024, 4, 1, 64, 0.4, False, jnp.float16),
    "C s512 d80 mha causal bf16": (1, 512, 2, 2, 80, 0.5, True, jnp.bfloat16),
}
if SMOKE:
    CHECKS = {name: (1, 256, 2, 1, 48 if c[4] == 80 else 64, *c[5:]) for name, c in CHECKS.items()}
_REFS = {}


def layout_of_check(name):
    _, s, h, *_ = CHECKS[name]
    nb = s // 128
    layout = np.random.default_rng(3).random((h, nb, nb)) < CHECKS[name][5]
    layout[:, 0] = False  # an empty row: zeros out, PAD_LSE
    layout[:, -1] = True
    return layout


def _reference(name):
    if name not in _REFS:
        b, s, h, hkv, d, _, causal, dtype = CHECKS[name]
        q, k, v, dout = inputs(11, b, s, h, hkv, d, dtype)
        f32 = lambda x: x.astype(jnp.float32)
        layout = layout_of_check(name)
        ref = lambda q, k, v: block_sparse_reference(q, k, v, layout, block_size=128, causal=causal)
        _REFS[name] = (q, k, v, dout), fwd_bwd(ref)(f32(q), f32(k), f32(v), f32(dout))
    return _REFS[name]


def check(name, variant, grads):
    what = f"check {name} [{variant}] {'fwd+grads' if grads else 'fwd'}"
    if out_of_time(what):
        return
    row = dict(check=name, variant=variant, grads=grads)
    try:
        (q, k, v, dout), (ref_out, ref_grads) = _reference(name)
        layout, causal = layout_of_check(name), CHECKS[name][6]
        ours = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=128, causal=causal,
                                                      interpret=SMOKE, **mosaic_kwargs(variant))
        t0 = time.perf_counter()
        if grads:
            out, g = fwd_bwd(ours)(q, k, v, dout)
            errs = [rel_err(out, ref_out)] + [rel_err(a, r) for a, r in zip(g, ref_grads)]
        else:
            out = jax.jit(ours)(q, k, v)
            errs = [rel_err(out, ref_out)]
        empty_rows_zero = not np.any(np.asarray(out[:, :128], np.float32))
        errors = dict(zip(("out", "dq", "dk", "dv"), errs))
        row.update(errors=errors, empty_rows_zero=empty_rows_zero, seconds=time.perf_counter() - t0,
                   ok=all(e < 2e-2 for e in errs) and empty_rows_zero)
        log(f"{'OK  ' if row['ok'] else 'FAIL'} {what}: " + " ".join(f"{n} {e:.2e}" for n, e in errors.items())
            + f", empty rows {'zero' if empty_rows_zero else 'NOT ZERO'} ({row['seconds']:.1f} s)")
    except Exception as e:  # one broken variant must not hide the others
        row.update(ok=False, error=report_error(what, e))
    REPORT["checks"].append(row)
    save()


def check_lse_matches_triton(variant):
    """The Triton backward reads the forward's lse: both forwards must save the same one (PAD_LSE on empty rows)."""
    what = f"lse vs Triton forward [{variant}]"
    if out_of_time(what):
        return
    from kernels_pallas.block_sparse import gpu_forward, mosaic_gpu_forward, ops

    row = dict(check="lse", variant=variant)
    try:
        name = next(iter(CHECKS))
        b, s, h, hkv, d, _, causal, dtype = CHECKS[name]
        q, k, v, _ = inputs(5, b, s, h, hkv, d, dtype)
        layout, offset, scale = layout_of_check(name), 0 if causal else None, d ** -0.5
        blocks = VARIANTS[variant]

        def rows(q_tile, k_tile):
            return ops.block_tables(layout, q_tile=q_tile, kv_tile=k_tile, repeat_q=128 // q_tile,
                                    repeat_kv=128 // k_tile, causal_offset=offset, element_mask=False, heads=h,
                                    max_row=layout.shape[-1], columns=False)[0]

        interpret = None
        if SMOKE:
            from jax.experimental.pallas import mosaic_gpu as plgpu

            interpret = plgpu.InterpretGPUParams()
        _, lse_m = jax.jit(lambda q, k, v: mosaic_gpu_forward.forward(
            q, k, v, rows(blocks.rows_per_program, blocks.block_k), scale=scale, causal_offset=offset, blocks=blocks,
            interpret=interpret))(q, k, v)
        st = ops._Static(scale, offset, 128, 128, "triton", SMOKE, layout.shape[-1], 0, 8, 2)
        _, lse_t = jax.jit(lambda q, k, v: gpu_forward.forward(q, k, v, None, None, None, None, rows(128, 128),
                                                               st=st))(q, k, v)
        lse_m, lse_t = np.asarray(lse_m), np.asarray(lse_t)
        real = float(np.abs(lse_m[..., 128:] - lse_t[..., 128:]).max())
        pad_ok = bool(np.all(lse_m[..., :128] == PAD_LSE))
        row.update(max_abs_diff_real_rows=real, empty_rows_pad_lse=pad_ok, ok=real < 2e-2 and pad_ok)
        log(f"{'OK  ' if row['ok'] else 'FAIL'} {what}: max |diff| {real:.2e} on rows with keys, empty rows "
            f"{'PAD_LSE' if pad_ok else 'WRONG'}")
    except Exception as e:
        row.update(ok=False, error=report_error(what, e))
    REPORT["checks"].append(row)
    save()


# ------------------------------------------------------------------------------------------------ timing
if SMOKE:  # the layouts at a tiny size: block_sparse.layouts() reads these module constants
    bs.B, bs.S, bs.H, bs.D, bs.NB = 1, 512, 2, 64, 512 // bs.BLOCK
LAYOUTS = bs.layouts()
# The smoke test times two layouts (each interpreted call takes seconds); the GPU run times them all.
TIMED = ["random 25%", "causal"] if SMOKE else list(LAYOUTS)
HAS_TORCH = importlib.util.find_spec("torch") is not None and not SMOKE
_INPUTS = {}


def timed(fn, args):
    return common.timed(fn, args, smoke=SMOKE)


def fwd_flops(case):
    layout, causal = LAYOUTS[case]
    return 4.0 * bs.D * bs.visible_pairs(layout, causal) * bs.B


def time_one(case, name, mode):
    what = f"{case:>11} {name:>32} {mode:>7}"
    if out_of_time(what):
        return None
    layout, causal = LAYOUTS[case]
    row = dict(case=case, impl=name, mode=mode)
    try:
        if not _INPUTS:
            _INPUTS["qkv"] = inputs(7, bs.B, bs.S, bs.H, bs.H, bs.D, jnp.bfloat16)
        q, k, v, dout = _INPUTS["qkv"]
        f = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=bs.BLOCK, causal=causal,
                                                   interpret=SMOKE, **mosaic_kwargs(name))
        flops = fwd_flops(case)
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


def time_flex(case):
    """flex_attention with the same block mask (block_sparse.time_flex: torch.compile, triton do_bench)."""
    what = f"{case:>11} {'flex':>32}"
    if not HAS_TORCH or out_of_time(what):
        return
    layout, causal = LAYOUTS[case]
    row = bs.new_row(case, layout, causal)
    bs.time_flex(row, layout, causal)  # catches its own exceptions into row["flex"]["error"]
    flex = row.get("flex", {})
    for mode, key in (("fwd", "fwd_ms"), ("fwd+bwd", "fwd_bwd_ms")):
        entry = dict(case=case, impl="flex", mode=mode)
        if flex.get(key):
            ms = flex[key]
            entry.update(ms=ms, tflops=fwd_flops(case) * (2.5 if mode == "fwd+bwd" else 1.0) / ms / 1e9)
            log(f"{what} {mode:>7} {ms:9.3f} ms {entry['tflops']:6.1f} TFLOP/s")
        else:
            entry.update(error=flex.get("error", "no result"))
            log(f"ERROR {what} {mode}: {entry['error'][-300:]}")
        REPORT["timings"].append(entry)
    save()


def table():
    log("")
    log("| layout | mode | flex ms | Triton ms (flex / ours) | Mosaic fwd + Triton bwd ms (flex / ours) | "
        "Mosaic fwd + Mosaic bwd ms (flex / ours) | other variants ms |")
    log("|---|---|---|---|---|---|---|")
    default_fb = f"{DEFAULT_FWD}+{DEFAULT_BWD}"
    for case in LAYOUTS:
        for mode in ("fwd", "fwd+bwd"):
            rows = {r["impl"]: r for r in REPORT["timings"] if r["case"] == case and r["mode"] == mode and "ms" in r}
            if not rows:
                continue
            flex = rows.get("flex")
            cell = lambda r: "n/a" if r is None else (
                f"{r['ms']:.3f}" + (f" ({flex['ms'] / r['ms']:.2f}x)" if flex and r is not flex else ""))
            shown = {"flex", "triton", DEFAULT_FWD, default_fb}
            others = ", ".join(f"{n} {r['ms']:.3f}" for n, r in rows.items() if n not in shown)
            log(f"| {case} | {mode} | {cell(flex)} | {cell(rows.get('triton'))} | {cell(rows.get(DEFAULT_FWD))} | "
                f"{cell(rows.get(default_fb)) if mode == 'fwd+bwd' else 'n/a'} | {others} |")


def main():
    dev = jax.devices()[0]
    REPORT["meta"] = dict(device=str(dev.device_kind), jax=jax.__version__, smoke=SMOKE,
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          shape=dict(B=bs.B, S=bs.S, H=bs.H, D=bs.D, block=bs.BLOCK),
                          variants={n: str(b) for n, b in VARIANTS.items()},
                          bwd_variants={n: str(b) for n, b in BWD_VARIANTS.items()}, budget_s=BUDGET_S,
                          flex=HAS_TORCH, commit=os.environ.get("BENCH_COMMIT"))  # the commit the caller exported
    log("meta", json.dumps(REPORT["meta"]))
    default_fb = f"{DEFAULT_FWD}+{DEFAULT_BWD}"
    # 1. Checks first: timings of a kernel that computes the wrong thing would mean nothing.
    for name in CHECKS:
        check(name, DEFAULT_FWD, grads=True)
        check(name, default_fb, grads=True)
    first = next(iter(CHECKS))
    for bwd in BWD_VARIANTS:
        if bwd != DEFAULT_BWD:
            check(first, f"{DEFAULT_FWD}+{bwd}", grads=True)
    for variant in VARIANTS:
        if variant != DEFAULT_FWD:
            check(first, variant, grads=False)
    check_lse_matches_triton(DEFAULT_FWD)  # 2.
    for case in TIMED:  # 3. the headline: every layout, the defaults against flex
        for name, modes in (("triton", ("fwd", "fwd+bwd")), (DEFAULT_FWD, ("fwd", "fwd+bwd")),
                            (default_fb, ("fwd+bwd",))):
            for mode in modes:
                time_one(case, name, mode)
        time_flex(case)
    for case in TIMED:  # 4. the other variants
        for variant in VARIANTS:
            if variant != DEFAULT_FWD:
                time_one(case, variant, "fwd")
        for bwd in BWD_VARIANTS:
            if bwd != DEFAULT_BWD:
                time_one(case, f"{DEFAULT_FWD}+{bwd}", "fwd+bwd")
    table()
    save()
    log(f"done; written to {OUT}/check_block_sparse_mgpu.txt and .json")


if __name__ == "__main__":
    main()
