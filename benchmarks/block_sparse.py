"""Block-sparse attention on the GPU: checks of the Pallas kernel against the dense reference, then timings of
the kernel vs torch flex_attention (same block mask) vs dense masked attention in JAX.

Run on the device machine from the repository root:
    PYTHONPATH=. python3 benchmarks/block_sparse.py [--quick]
B4 S8192 H16 D128 bf16, blocks of 128; layouts: random 10/25/50 % per head (plus the diagonal), causal, and
BigBird-like (global + window + random per head). Forward and forward+backward of the kernel as a user calls it
("pallas default": backend=None, the Mosaic GPU build on Hopper, else Triton) and of the Triton build ("pallas
triton"); without --quick also other builds and tilings. Writes $OUT/block_sparse.json and $OUT/block_sparse.md
after each case; BS_BUDGET_S stops timing after that many seconds. Ratios are flex time / the default's time.

TFLOP/s count only the visible (query, key) pairs of the kept blocks (the causal diagonal blocks count their
lower triangle): forward 4*B*D*pairs, forward+backward 2.5x that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from attn.block_sparse import bigbird_layout, causal_layout
from kernels_pallas.block_sparse import Tiles, block_sparse_attention, block_sparse_reference
from kernels_pallas.block_sparse import ops as block_sparse_ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sliding_window import fwd_bwd, inputs, log, rel_err, timed  # noqa: E402  (shared timing helpers)

OUT = os.environ.get("OUT", ".")
B, S, H, D, BLOCK = 4, 8192, 16, 128, 128
NB = S // BLOCK


def layouts(seed=0):
    """name -> (layout [H, NB, NB] numpy bool, causal)."""
    rng = np.random.default_rng(seed)
    eye = np.eye(NB, dtype=bool)[None]
    out = {}
    for density in (0.10, 0.25, 0.50):
        out[f"random {int(density * 100)}%"] = (rng.random((H, NB, NB)) < density) | eye, False
    out["causal"] = (np.broadcast_to(causal_layout(NB), (H, NB, NB)).copy(), True)
    out["bigbird"] = (np.asarray(bigbird_layout(jax.random.key(seed), H, NB, num_global=1, window=1,
                                                num_random=3)), False)
    return out


def visible_pairs(layout, causal):
    """Visible (query, key) pairs summed over heads, for one batch element."""
    per_block = np.full((NB, NB), BLOCK * BLOCK, np.int64)
    if causal:
        np.fill_diagonal(per_block, BLOCK * (BLOCK + 1) // 2)
        per_block = np.where(causal_layout(NB), per_block, 0)
    return int((layout * per_block).sum())


_FLEX = {}


def flex_runner(layout, causal):
    """(fwd, fwd+bwd) callables of torch.compile(flex_attention) with the same block mask.

    One compiled function and one mask function per causal flag, reading the layout from a module-level
    tensor, so that a new layout of the same shape reuses the compiled kernels.
    """
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not _FLEX:
        _FLEX["attend"] = torch.compile(flex_attention)
        g = torch.Generator(device="cuda").manual_seed(0)
        _FLEX["qkv"] = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                        for _ in range(3)]
        _FLEX["dout"] = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    _FLEX["layout"] = torch.from_numpy(np.ascontiguousarray(layout)).cuda()
    block_mask = create_block_mask(_causal_mask_mod if causal else _mask_mod, None, H, S, S, BLOCK_SIZE=BLOCK)
    attend, (q, k, v), dout = _FLEX["attend"], _FLEX["qkv"], _FLEX["dout"]

    def fwd():
        import torch

        with torch.no_grad():
            return attend(q, k, v, block_mask=block_mask)

    def fwd_bwd_():
        import torch

        out = attend(q, k, v, block_mask=block_mask)
        return torch.autograd.grad(out, (q, k, v), dout)

    return fwd, fwd_bwd_


def _mask_mod(b, h, q_idx, kv_idx):
    return _FLEX["layout"][h, q_idx // BLOCK, kv_idx // BLOCK]


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return _FLEX["layout"][h, q_idx // BLOCK, kv_idx // BLOCK] & (q_idx >= kv_idx)


def time_torch(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def new_row(name, layout, causal):
    pairs = visible_pairs(layout, causal) * B
    return {"case": name, "density": float(layout.mean()), "causal": causal, "visible_pairs": pairs}


def record(row, impl, fwd_ms, fb_ms):
    flops_fwd = 4 * D * row["visible_pairs"]
    row[impl] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms,
                 "fwd_tflops": flops_fwd / fwd_ms / 1e9 if fwd_ms else None,
                 "fwd_bwd_tflops": 2.5 * flops_fwd / fb_ms / 1e9 if fb_ms else None}
    log(f"{row['case']:>12} {impl:>22}: fwd {fwd_ms} ms, fwd+bwd {fb_ms} ms "
        f"({row[impl]['fwd_tflops']}, {row[impl]['fwd_bwd_tflops']} TFLOP/s)")


def failed(row, impl):
    row[impl] = {"error": traceback.format_exc(limit=2)[-600:]}
    log(f"{row['case']} {impl} failed:", row[impl]["error"])


def time_pallas(row, layout, causal, tag, options, qkv):
    """Times block_sparse_attention with the keyword arguments ``options`` (backend, tiles, ...)."""
    q, k, v, dout = qkv
    f = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=BLOCK, causal=causal, **options)
    try:
        fwd_ms = timed(jax.jit(f), (q, k, v))[0] * 1e3
        fb_ms = timed(fwd_bwd(f), (q, k, v, dout))[0] * 1e3
        record(row, f"pallas {tag}", fwd_ms, fb_ms)
    except Exception:  # a tiling that does not fit is recorded, the others still run
        failed(row, f"pallas {tag}")


def time_flex(row, layout, causal):
    try:
        fwd, fb = flex_runner(layout, causal)
        record(row, "flex", time_torch(fwd), time_torch(fb))
    except Exception:
        failed(row, "flex")


def time_dense(row, layout, causal, qkv):
    """The dense reference holds [B, H, S, S] float32 logits (17 GB): forward only."""
    q, k, v, _ = qkv
    ref = lambda q, k, v: block_sparse_reference(q, k, v, layout, block_size=BLOCK, causal=causal)
    try:
        record(row, "dense xla", timed(jax.jit(ref), (q, k, v))[0] * 1e3, None)
    except Exception:
        failed(row, "dense xla")


def ratios(row):
    """flex time / the default's time (what a user gets), and / the best Pallas build or tiling's."""
    flex, default = row.get("flex", {}), row.get("pallas default", {})
    if "fwd_ms" not in flex or "fwd_ms" not in default:
        return
    row["ratio_fwd"] = flex["fwd_ms"] / default["fwd_ms"]
    row["ratio_fwd_bwd"] = flex["fwd_bwd_ms"] / default["fwd_bwd_ms"]
    timed_ = [r for t, r in row.items() if t.startswith("pallas") and isinstance(r, dict) and "fwd_ms" in r]
    row["best_ratio_fwd"] = flex["fwd_ms"] / min(r["fwd_ms"] for r in timed_)
    row["best_ratio_fwd_bwd"] = flex["fwd_bwd_ms"] / min(r["fwd_bwd_ms"] for r in timed_)


CHECKS = [
    # b, s, h, hkv, d, block, density, causal, segments, dtype
    (2, 1024, 4, 2, 64, 128, 0.3, False, False, jnp.bfloat16),
    (1, 2048, 4, 1, 128, 128, 0.3, True, False, jnp.bfloat16),
    (2, 512, 4, 4, 128, 64, 0.5, True, True, jnp.float16),
    (1, 512, 2, 2, 64, 64, 0.4, False, False, jnp.float32),
]


def run_checks():
    """backend=None on the GPU (on Hopper the Mosaic GPU build for the 16-bit 128-block cases without segment ids,
    else Triton) against the float32 dense reference, forward and dq/dk/dv."""
    results = []
    for b, s, h, hkv, d, block, density, causal, segments, dtype in CHECKS:
        q, k, v, dout = inputs(2, b, s, h, hkv, d, dtype)
        nb = s // block
        layout = np.random.default_rng(3).random((h, nb, nb)) < density
        layout[:, 0] = False  # an empty row
        layout[:, -1] = True  # a full row
        seg = jnp.sort(jax.random.randint(jax.random.key(4), (b, s), 0, 3), axis=1) if segments else None
        kw = dict(block_size=block, causal=causal, segment_ids=seg)
        got = fwd_bwd(lambda q, k, v: block_sparse_attention(q, k, v, layout, **kw))(q, k, v, dout)
        f32 = lambda x: x.astype(jnp.float32)
        want = fwd_bwd(lambda q, k, v: block_sparse_reference(q, k, v, layout, **kw))(f32(q), f32(k), f32(v),
                                                                                     f32(dout))
        errs = [rel_err(got[0], want[0])] + [rel_err(g, w) for g, w in zip(got[1], want[1])]
        tol = 2e-2 if dtype != jnp.float32 else 2e-3
        ok = all(e < tol for e in errs)
        results.append({"case": [b, s, h, hkv, d, block, density, causal, segments, jnp.dtype(dtype).name],
                        "rel_err_out_dq_dk_dv": errs, "ok": ok})
        log("check", results[-1])
    return results


def markdown(rows, device, checks=()):
    lines = [f"# Block-sparse attention, {device}: B{B} S{S} H{H} D{D} bf16, block {BLOCK}", "",
             "TFLOP/s on visible pairs of kept blocks; ratio = flex time / the default's time (best Pallas build or "
             "tiling in brackets).", "",
             "| case | density | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for impl, r in row.items():
            if isinstance(r, dict) and "fwd_ms" in r:
                fmt = lambda x: "–" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"
                lines.append(f"| {row['case']} | {row['density']:.3f} | {impl} | {fmt(r['fwd_ms'])} | "
                             f"{fmt(r['fwd_tflops'])} | {fmt(r['fwd_bwd_ms'])} | {fmt(r['fwd_bwd_tflops'])} |")
        if "ratio_fwd" in row:
            lines.append(f"| {row['case']} | | **ratio vs flex** | | {row['ratio_fwd']:.2f}× "
                         f"({row['best_ratio_fwd']:.2f}×) | | {row['ratio_fwd_bwd']:.2f}× "
                         f"({row['best_ratio_fwd_bwd']:.2f}×) |")
    if checks:
        lines += ["", f"GPU checks against the float32 dense reference: {sum(c['ok'] for c in checks)}/{len(checks)} "
                  "within tolerance (rel. error of out, dq, dk, dv):", ""]
        lines += [f"- {c['case']}: {', '.join(f'{e:.1e}' for e in c['rel_err_out_dq_dk_dv'])}" for c in checks]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="default tiles only, no dense reference")
    parser.add_argument("--no-checks", action="store_true")
    args = parser.parse_args()
    budget = float(os.environ.get("BS_BUDGET_S", "300"))
    start = time.time()
    device = jax.devices()[0].device_kind
    default_backend = "mosaic_gpu" if block_sparse_ops._mosaic_gpu_fits(jnp.bfloat16, D, None, None, BLOCK, BLOCK,
                                                                          S, S, 1) else "triton"
    log(f"{device}: backend=None takes {default_backend!r} at this shape")
    variants = {} if args.quick else {
        "mosaic fwd + triton bwd": dict(backend="mosaic_gpu", mosaic_backward=False),
        "triton fwd 128x64 3 stages": dict(backend="triton", tiles=Tiles(k=64, num_stages=3)),
        "triton bwd 3 stages": dict(backend="triton", tiles=Tiles(num_stages_bwd=3)),
    }
    rows, checks = [], []

    def save():
        for row in rows:
            ratios(row)
        result = {"device": device, "shape": [B, S, H, D], "block": BLOCK, "rows": rows, "checks": checks,
                  "default_backend": default_backend, "jax": jax.__version__,
                  "commit": os.environ.get("BENCH_COMMIT"),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(os.path.join(OUT, "block_sparse.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        with open(os.path.join(OUT, "block_sparse.md"), "w") as f:
            f.write(markdown(rows, device, checks))

    if not args.no_checks:  # first: timings of a kernel that computes the wrong thing would mean nothing
        checks.extend(run_checks())
        save()
    qkv = inputs(1, B, S, H, H, D, jnp.bfloat16)
    cases = layouts()
    # Pass 1: default tiles and flex on every layout; pass 2: other tilings while the budget lasts.
    for name, (layout, causal) in cases.items():
        if time.time() - start > budget:
            log("budget spent; stopping before", name)
            break
        row = new_row(name, layout, causal)
        rows.append(row)
        time_pallas(row, layout, causal, "default", {}, qkv)
        time_pallas(row, layout, causal, "triton", dict(backend="triton"), qkv)
        time_flex(row, layout, causal)
        save()
    if not args.quick and time.time() - start < budget:
        time_dense(rows[0], *cases[rows[0]["case"]], qkv)
        save()
    for row in rows:
        for tag, options in variants.items():
            if time.time() - start > budget:
                break
            time_pallas(row, *cases[row["case"]], tag, options, qkv)
            save()
    save()
    print(markdown(rows, device, checks))


if __name__ == "__main__":
    main()
