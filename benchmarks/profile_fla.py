"""Kernel by kernel: fla's chunk kernels beside ours, one forward+backward each, on the GPU machine.

    PYTHONPATH=. python benchmarks/profile_fla.py --fla-wheel path/to/fla_core-0.6.0-py3-none-any.whl \
        [--variants gla delta_rule] [--mode forward] [--pallas-only] [--tilings] [--timeline] [--shape 1]

For each variant (``benchmarks/linear_recurrent.py``'s inputs at B4 S8192 H16 D128 bf16, or ``--shape 1``: its
SHAPES[1], B1 S32768 H16 D128): fla's call three times
(Triton's compile and fla's autotuning happen there), then once under ``torch.profiler`` (CUPTI); the same for the
Pallas kernels' jitted call in the same profiler session (CUPTI sees every kernel of the process, XLA's too, where
the driver allows). Prints and writes $OUT/profile_fla.txt: per kernel, calls and device time in ms, largest
first, per implementation. fla refuses gated backwards on Triton 3.6 on Hopper: use ``--mode forward`` there.
``--timeline``: also each profiled call's device span (first kernel start to last kernel end) and copies, and its
wall time per call waited for alone and queued (``linear_recurrent.timed``): the difference between the span and
the time alone is host dispatch that the device does not overlap.
Nothing is asserted; Nsight Compute's view of our kernels is ``benchmarks/profile_linear_recurrent.sh``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch

import jax  # noqa: E402

from benchmarks import linear_recurrent as lr  # noqa: E402

OUT = os.environ.get("OUT", ".")


def device_ms(event):
    """An averaged profiler event's own device time in ms (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name) / 1e3
    return 0.0


def device_activity(prof):
    """(span, kernels, copies and sets) in ms of one profiled call from its Chrome trace: the span from the first
    device activity's start to the last one's end, the kernels' and the memcpy/memset activities' summed time."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not device:
        return 0.0, 0.0, 0.0
    span = max(e["ts"] + e["dur"] for e in device) - min(e["ts"] for e in device)
    kernels = sum(e["dur"] for e in device if e["cat"] == "kernel")
    return span / 1e3, kernels / 1e3, (sum(e["dur"] for e in device) - kernels) / 1e3


def wall_ms(run, sync, calls=20):
    """(median ms of a call waited for alone; ms per call queued back to back and waited for once, where the
    host's dispatch overlaps the device's work: ``linear_recurrent.timed``)."""
    import statistics
    import time

    alone = []
    for _ in range(calls):
        start = time.perf_counter()
        sync(run())
        alone.append(time.perf_counter() - start)
    return statistics.median(alone) * 1e3, lr.timed(run, sync) * 1e3


def profile(label, run, sync, log, timeline=False):
    """Runs ``run`` three times, then once under the profiler; logs its kernels, largest first; with ``timeline``
    also the device span and copies of that call and its wall times (``wall_ms``)."""
    import torch

    for _ in range(3):
        sync(run())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sync(run())
    rows = sorted(((device_ms(e), e.count, e.key) for e in prof.key_averages() if device_ms(e) > 0), reverse=True)
    log(f"## {label}: {sum(ms for ms, _, _ in rows):.3f} ms of kernels")
    if timeline:
        try:
            span, kernels, copies = device_activity(prof)
        except Exception as e:  # the trace's format is the profiler's: report and go on
            log(f"   no device span: {type(e).__name__}: {str(e)[:200]}")
            span = kernels = copies = float("nan")
        alone, queued = wall_ms(run, sync)
        log(f"   device span {span:.3f} ms (kernels {kernels:.3f}, copies and sets {copies:.3f}); wall per call "
            f"{alone:.3f} ms waited alone, {queued:.3f} ms queued")
    for ms, count, name in rows:
        log(f"{ms:9.3f} ms {count:4d}x  {name[:110]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fla-wheel", default=None)
    parser.add_argument("--variants", nargs="+", default=["gla", "delta_rule"], choices=lr.VARIANTS)
    parser.add_argument("--mode", default="forward+backward", choices=["forward", "forward+backward"])
    parser.add_argument("--pallas-only", action="store_true", help="skip fla (its compile and autotuning)")
    parser.add_argument("--timeline", action="store_true",
                        help="also each call's device span, copies and wall time (waited alone and queued)")
    parser.add_argument("--shape", type=int, default=0, help="index into linear_recurrent.SHAPES")
    parser.add_argument("--tilings", action="store_true",
                        help="delta variants: profile every check_scalar_gate_tilings.DELTA_TILINGS config")
    args = parser.parse_args()
    shape = lr.SHAPES[args.shape]
    import torch

    lines = []

    def log(*parts):
        lines.append(" ".join(str(p) for p in parts))
        print(*parts, flush=True)

    log(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__}, commit "
        f"{os.environ.get('BENCH_COMMIT')}, {args.mode}, B{shape[0]} S{shape[1]} H{shape[2]} D{shape[3]} bf16")
    fla = None if args.pallas_only else lr.load_fla(args.fla_wheel)
    for variant in args.variants:
        q, k, v, gate, dout = lr.inputs(jax.random.key(0), *shape, variant)
        try:
            if fla is None:
                raise RuntimeError("not run (--pallas-only)")
            run = lr.fla_call(fla, variant, args.mode, q, k, v, gate, dout)
            profile(f"fla {variant}", run, lambda _: torch.cuda.synchronize(), log, args.timeline)
        except Exception as e:  # fla refuses some backwards: report and go on
            log(f"## fla {variant}: FAILED {type(e).__name__}: {str(e)[:300]}")
        configs = {"": None}
        if args.tilings and "delta" in variant:
            from benchmarks.check_scalar_gate_tilings import DELTA_TILINGS

            configs = {f" ({name})": config for name, config in DELTA_TILINGS.items()}
        for name, config in configs.items():
            forward, forward_backward = lr.jax_fns("pallas", variant, config)
            fn = forward if args.mode == "forward" else forward_backward
            try:
                profile(f"pallas {variant}{name}", lambda: fn(q, k, v, gate, dout), jax.block_until_ready, log,
                        args.timeline)
            except Exception as e:
                log(f"## pallas {variant}{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
        with open(os.path.join(OUT, "profile_fla.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
