"""The benchmark suite: our attention implementations against the peers on this machine, plus a complexity scan.

    python -m benchmarks.suite [--smoke] [--out DIR] [--families dense sliding_window ...] [--seqs 1024 8192]
                               [--head-dims 128] [--tokens 32768] [--no-scan] [--min-time SECONDS]

Per case of the shape grid (``benchmarks/_suite_impls.py``: seq 1k-32k, head_dim 64/128, causal and full,
windows, block densities, the gated linear recurrences) and per implementation (ours: every form of the
mechanism, Pallas kernels included; peers: jax.nn cuDNN/XLA, tokamax, PyTorch SDPA flash/cuDNN, flex_attention,
fla, each where it is importable and has its device), forward and forward+backward:

1. check the implementation against our float32 plain-JAX reference in the same run (at the timed shape, or at
   the largest batch/seq whose reference fits memory, recorded as ``checked_at``); one that disagrees is
   reported "wrong" and not timed;
2. skip it if its compiled peak memory would not fit the device (said in ``reason``);
3. time the median of many calls after two warm-up calls, each call synchronised with the device;
4. report ms, TFLOP/s on the required work (visible pairs only; fwd+bwd = 3x fwd), tokens/s and peak memory
   (XLA's buffer assignment for JAX, torch's allocator peak for PyTorch).

Then a complexity scan times every registered mechanism's plain-JAX forms against sequence length and labels
each linear or quadratic from the log-log slopes. Writes under --out (default benchmarks/results):
suite.json (metadata: device, driver, library versions, date, commit), suite.md, suite_<family>.png and
headline.json (per family with a measured peer: ours vs the best peer). ``--smoke``: tiny float32 shapes on the
CPU, no peers, well under a minute: CI runs it (tests/test_benchmarks.py) so that the harness cannot rot.
The full grid is 204 cases (block_sparse alone 72); --families, --seqs and --head-dims cut it to fit a session.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, no peers (CI)")
    ap.add_argument("--out", default=None, help="output folder (default: benchmarks/results; with --smoke a "
                                                 "temporary folder, so that a smoke run never replaces results)")
    ap.add_argument("--families", nargs="+", default=None,
                    help="subset of: dense sliding_window block_sparse linear_recurrent; none = only the scan")
    ap.add_argument("--seqs", nargs="+", type=int, default=None, help="sequence lengths (default: the grid's)")
    ap.add_argument("--head-dims", nargs="+", type=int, default=None, help="head dims (default: 64 128)")
    ap.add_argument("--causal", choices=("both", "causal", "full"), default="both",
                    help="masking of the attention cases (linear recurrences are always causal)")
    ap.add_argument("--windows", nargs="+", type=int, default=None, help="sliding windows in keys (512 2048)")
    ap.add_argument("--densities", nargs="+", type=float, default=None, help="block densities (0.1 0.25 0.5)")
    ap.add_argument("--mechanisms", nargs="+", default=None, help="linear-recurrent mechanisms (default: all)")
    ap.add_argument("--forms", nargs="+", default=None,
                    help="time only these of our implementations (e.g. pallas chunked; default: all); the check "
                         "against the float32 'xla' reference runs all the same")
    ap.add_argument("--merge", nargs="+", default=None, metavar="SUITE_JSON",
                    help="runs nothing: combines the rows of earlier runs' suite.json files (each row keeps its "
                         "run's device, date and commit) and writes the tables, plots and headline under --out")
    ap.add_argument("--tokens", type=int, default=32768, help="batch * seq per case (full mode)")
    ap.add_argument("--no-scan", action="store_true", help="skip the complexity scan")
    ap.add_argument("--scan-seqs", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384],
                    help="sequence lengths of the complexity scan (full mode)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per measurement")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new case nor scan point starts (the outputs are still written): "
                         "keeps a run inside a machine's time limit; what is left out is listed")
    return ap.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
if ARGS.smoke and __name__ == "__main__":
    # Before jax is imported: the smoke run must not need an accelerator, and it compiles ~100 tiny programs
    # whose speed does not matter, so LLVM's optimisations are turned off (compiles about twice as fast).
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
elif __name__ == "__main__":
    # JAX and PyTorch share the GPU in one process: JAX must not preallocate most of it, and half of it is
    # left to PyTorch's peers (the flash-style kernels timed here need far less than either half).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _suite_impls as impls  # noqa: E402
from benchmarks import _suite_measure as measure  # noqa: E402

LOG: list[str] = []


_T0 = time.perf_counter()


def log(*parts):
    line = f"[{time.perf_counter() - _T0:6.0f} s] " + " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.append(line)


# ------------------------------------------------------------------------------------------- metadata
def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(smoke: bool) -> dict:
    dev = jax.devices()[0]
    # The caller may run an export of a commit inside another checkout (the GPU machine's copy of the working
    # tree): BENCH_COMMIT names what runs, and wins over what git finds around it.
    commit = os.environ.get("BENCH_COMMIT")
    dirty = None if commit else _run(["git", "status", "--porcelain", "--untracked-files=no"])
    commit = commit or _run(["git", "rev-parse", "HEAD"])
    libs = {d: _version(d) for d in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
                                     "nvidia-cudnn-cu13", "nvidia-cudnn-cu12", "flax", "numpy", "torch", "triton",
                                     "tokamax", "fla-core", "matplotlib")}
    return dict(
        device=dev.device_kind, platform=dev.platform, device_count=jax.device_count(),
        driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "none",
        libraries={d: v for d, v in libs.items() if v is not None},
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=commit or "unknown", commit_dirty=bool(dirty), smoke=smoke, python=sys.version.split()[0],
        env={k: os.environ[k] for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                         "XLA_PYTHON_CLIENT_MEM_FRACTION", "PYTHONPATH") if k in os.environ},
        conventions=dict(
            time="median seconds per call after two warm-up calls, each call synchronised with the device",
            tflops="on the required work: 4*D flops per visible (query, key) pair forward (linear recurrences "
                   f"4*D^2 per token); forward+backward = {impls.FWD_BWD_FLOP_FACTOR:g}x forward",
            tokens_per_s="batch*seq / seconds",
            peak_memory="XLA buffer assignment (arguments + outputs + temporaries) for JAX; "
                        "torch.cuda.max_memory_allocated for PyTorch",
            check="relative Frobenius error of the output (and dq, dk, dv for fwd+bwd) against our float32 "
                  "'xla' reference on the same inputs"),
    )


# ------------------------------------------------------------------------------------------- one case
def _tolerance(dtype: str) -> float:
    return 1e-3 if dtype in ("float32", "float64") else 3e-2


def _out_of_memory(e: Exception) -> bool:
    # XLA's estimate can pass while its autotuner or allocator still runs out: both say RESOURCE_EXHAUSTED.
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e)


def check_case(case: impls.Case, memory_limit: float) -> tuple[impls.Case, dict, dict]:
    """The case the check runs at (the timed one, or smaller where the reference would not fit), its inputs
    and the reference results per mode (None for a mode whose reference could not run)."""
    candidates = [case]
    if case.batch > 1:
        candidates.append(dataclasses.replace(case, batch=1))
    seq = case.seq
    while seq > 256:
        seq //= 2
        if case.family != "block_sparse" or seq % case.block == 0:
            candidates.append(dataclasses.replace(case, batch=1, seq=seq))
    for cand in candidates:
        inputs = impls.make_inputs(cand)
        runner = impls.reference(cand, inputs)
        refs = {}
        try:
            for mode in ("fwd", "fwd_bwd"):
                call, peak, _ = runner.prepare(mode)
                if peak is not None and peak > memory_limit:
                    raise MemoryError(f"reference needs {peak / 2**30:.1f} GiB")
                refs[mode] = runner.to_numpy(runner.sync(call()))
        except Exception as e:  # noqa: BLE001 -- too big for the reference: try the next, smaller shape
            if not _out_of_memory(e):
                raise
            runner = refs = None
            impls.release_memory()
            continue
        return cand, inputs, refs
    raise RuntimeError(f"no reference fits memory for {case.name}")


def run_case(case, impl_list, args, memory_limit, min_time) -> list[dict]:
    rows = []
    check_at, check_inputs, refs = check_case(case, memory_limit)
    inputs = impls.make_inputs(case) if check_at != case else check_inputs
    flops_fwd = impls.forward_flops(case)
    tokens = case.batch * case.seq
    for impl in impl_list:
        for mode in ("fwd", "fwd_bwd"):
            row = dict(family=case.family, case=case.name, mechanism=case.mechanism, impl=impl.name,
                       kind=impl.kind, mode=mode, batch=case.batch, seq=case.seq, heads=case.heads,
                       head_dim=case.head_dim, causal=case.causal, dtype=case.dtype, window=case.window,
                       density=case.density, block=case.block,
                       checked_at=dict(batch=check_at.batch, seq=check_at.seq))
            try:
                # 1. agreement with the reference, at the check shape
                runner = impl.build(check_at, check_inputs)
                call, peak, peak_source = runner.prepare(mode)
                if peak is not None and peak > memory_limit:
                    raise MemoryError(f"needs {peak / 2**30:.1f} GiB at the check shape")
                err = measure.max_rel_err(runner.to_numpy(runner.sync(call())), refs[mode])
                row.update(max_rel_err=err, tol=_tolerance(case.dtype))
                if not err <= row["tol"]:
                    row.update(status="wrong")
                    log(f"{case.name:>52} {impl.name:>34} {mode:>7} WRONG: rel err {err:.2e}")
                    rows.append(row)
                    continue
                # 2. memory, 3. timing, at the timed shape
                if check_at != case:
                    runner = impl.build(case, inputs)
                    call, peak, peak_source = runner.prepare(mode)
                if peak is not None and peak > memory_limit:
                    row.update(status="skipped", peak_bytes=peak,
                               reason=f"needs {peak / 2**30:.1f} GiB, limit {memory_limit / 2**30:.1f} GiB")
                    log(f"{case.name:>52} {impl.name:>34} {mode:>7} skipped: {row['reason']}")
                    rows.append(row)
                    continue
                sec, calls = measure.median_seconds(call, runner.sync, min_calls=3 if args.smoke else 10,
                                                    min_time=min_time)
                flops = flops_fwd * (1.0 if mode == "fwd" else impls.FWD_BWD_FLOP_FACTOR)
                row.update(status="ok", ms=sec * 1e3, calls=calls, tflops=flops / sec / 1e12,
                           tokens_per_s=tokens / sec, peak_bytes=peak, peak_source=peak_source)
                log(f"{case.name:>52} {impl.name:>34} {mode:>7} {sec * 1e3:10.3f} ms {row['tflops']:8.3f} TFLOP/s "
                    f"{tokens / sec / 1e6:9.3f} Mtok/s  err {err:.1e}")
            except Exception as e:  # noqa: BLE001 -- one failing implementation must not end the run
                row.update(status="skipped" if _out_of_memory(e) else "error",
                           reason=f"{type(e).__name__}: {str(e)[:300]}")
                log(f"{case.name:>52} {impl.name:>34} {mode:>7} {row['status']}: {row['reason'][:160]}")
            rows.append(row)
            runner = call = None  # drop this implementation's device buffers before the next one
        impls.release_memory()
    return rows


# ------------------------------------------------------------------------------------------- outputs
HEADLINE_PREFERENCE = dict(seq=8192, head_dim=128, causal=True, window=(511, 0), density=0.25,
                           mechanism="simple_gla")


def _best(rows, kind, mode, case):
    ok = [r for r in rows if r["kind"] == kind and r["mode"] == mode and r["case"] == case and r["status"] == "ok"]
    return max(ok, key=lambda r: r["tokens_per_s"], default=None)


def headline(rows, runs) -> list[dict]:
    """One entry per family that has a case where both one of ours and a peer were measured forward: ours vs
    the best peer of that case (ratios of throughput, above 1 = ours faster). Prefers a case measured in both
    modes, then the one closest to HEADLINE_PREFERENCE, then the longest sequence. Families without a measured
    peer get no entry."""
    entries = []
    for family in impls.FAMILIES:
        fam = [r for r in rows if r["family"] == family]
        cases = {r["case"]: r for r in fam}
        candidates = [c for c in cases if _best(fam, "ours", "fwd", c) and _best(fam, "peer", "fwd", c)]
        if not candidates:
            continue

        def score(c):
            r = cases[c]
            complete = bool(_best(fam, "ours", "fwd_bwd", c) and _best(fam, "peer", "fwd_bwd", c))
            hits = sum(r.get(k) == v for k, v in HEADLINE_PREFERENCE.items())
            return complete, hits, r["seq"], r["head_dim"]

        case = max(candidates, key=score)
        r = cases[case]
        ours_f, peer_f = _best(fam, "ours", "fwd", case), _best(fam, "peer", "fwd", case)
        ours_b, peer_b = _best(fam, "ours", "fwd_bwd", case), _best(fam, "peer", "fwd_bwd", case)
        entries.append(dict(
            family=family, ours=ours_f["impl"], best_peer=peer_f["impl"],
            shape=dict(case=case, mechanism=r["mechanism"], batch=r["batch"], seq=r["seq"], heads=r["heads"],
                       head_dim=r["head_dim"], causal=r["causal"], dtype=r["dtype"], window=r["window"],
                       density=r["density"], block=r["block"]),
            fwd_ratio=ours_f["tokens_per_s"] / peer_f["tokens_per_s"],
            fwd_bwd_ratio=(ours_b["tokens_per_s"] / peer_b["tokens_per_s"]) if ours_b and peer_b else None,
            ours_fwd_bwd=ours_b["impl"] if ours_b else None, best_peer_fwd_bwd=peer_b["impl"] if peer_b else None,
            ours_tflops=dict(fwd=ours_f["tflops"], fwd_bwd=ours_b["tflops"] if ours_b else None),
            best_peer_tflops=dict(fwd=peer_f["tflops"], fwd_bwd=peer_b["tflops"] if peer_b else None),
            device=runs[ours_f["run"]]["device"], date=runs[ours_f["run"]]["date"],
            commit=runs[ours_f["run"]]["commit"]))
    return entries


def markdown(runs, rows, scan, unavailable, scan_run=0) -> str:
    meta = runs[0]
    lines = [f"# Attention benchmark suite{' (smoke)' if meta['smoke'] else ''}", ""]
    for i, run in enumerate(runs):
        lines += [f"Run {i}: device {run['device']} ({run['platform']}), driver {run['driver']}, {run['date']}, "
                  f"commit {run['commit'][:12]}{' (dirty)' if run['commit_dirty'] else ''}"
                  + (f" ({run['commit_note']})" if run.get("commit_note") else "")
                  + (f", XLA_FLAGS {run['env']['XLA_FLAGS']}" if run.get("env", {}).get("XLA_FLAGS") else "")
                  + ". Libraries: "
                  + ", ".join(f"{k} {v}" for k, v in run["libraries"].items()) + ".", ""]
    lines += [f"Times: {meta['conventions']['time']}. TFLOP/s: {meta['conventions']['tflops']}.", ""]
    for family in impls.FAMILIES:
        fam = [r for r in rows if r["family"] == family]
        if not fam:
            continue
        lines += [f"## {family}", "", "| case | implementation | fwd ms | fwd TFLOP/s | fwd Mtok/s | fwd+bwd ms "
                  "| fwd+bwd TFLOP/s | fwd+bwd Mtok/s | peak MiB (fwd+bwd) | check rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        keys = list(dict.fromkeys((r["case"], r["impl"]) for r in fam))
        for case, impl in keys:
            cells = []
            errs = []
            peak = None
            for mode in ("fwd", "fwd_bwd"):
                r = next((x for x in fam if x["case"] == case and x["impl"] == impl and x["mode"] == mode), None)
                if r is None:
                    cells += ["", "", ""]
                    continue
                if "max_rel_err" in r:
                    errs.append(r["max_rel_err"])
                if r["status"] == "ok":
                    cells += [f"{r['ms']:.3f}", f"{r['tflops']:.3g}", f"{r['tokens_per_s'] / 1e6:.3g}"]
                    peak = r.get("peak_bytes") if mode == "fwd_bwd" or peak is None else peak
                else:
                    cells += [r["status"], "", ""]
            peak_cell = f"{peak / 2**20:.1f}" if peak else ""
            err_cell = f"{max(errs):.1e}" if errs else ""
            lines.append(f"| {case} | {impl} | " + " | ".join(cells) + f" | {peak_cell} | {err_cell} |")
        lines.append("")
    not_timed = [r for r in rows if r["status"] in ("skipped", "error")]
    if not_timed:
        lines += ["## Not timed", "", "| case | implementation | mode | status | reason |", "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['impl']} | {r['mode']} | {r['status']} | "
                  f"{' '.join(r.get('reason', '').replace('|', '/').split())[:160]} |" for r in not_timed]
        lines.append("")
    if unavailable:
        lines += ["## Peers not available on this machine", ""]
        lines += [f"- {name}: {why}" for name, why in sorted(unavailable.items())] + [""]
    if scan:
        lines += [f"## Complexity scan (plain-JAX forms; run {scan_run}: {runs[scan_run]['device']})", "",
                  "| mechanism | form | declared | seqs | ms | peak MiB | time slope | memory slope | label |",
                  "|---|---|---|---|---|---|---|---|---|"]
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
        for s in scan:
            ms = ", ".join(f"{t * 1e3:.3g}" for t in s["seconds"])
            mib = ", ".join("?" if b is None else f"{b / 2**20:.3g}" for b in s["peak_bytes"])
            lines.append(f"| {s['mechanism']} | {s['implementation']} | {s['declared']} | "
                         f"{', '.join(map(str, s['seqs']))} | {ms} | {mib} | {fmt(s['time_slope'])} | "
                         f"{fmt(s['memory_slope'])} | {s['label']} |")
        lines.append("")
    return "\n".join(lines)


def _shape_label(r) -> str:
    return (f"{r['mechanism']} D{r['head_dim']} {'causal' if r['causal'] else 'full'}"
            + (f" W{sum(r['window']) + 1}" if r["window"] else "")
            + (f" density {r['density']:g}" if r["density"] is not None else ""))


def plots(rows, out_dir, runs) -> list[str]:
    """One PNG per family: tokens/s against sequence length, a line per implementation; a row of panels
    (forward, forward+backward) per shape variant (mechanism, head_dim, causal, window, density). The title
    names the device, date and commit of the run(s) that measured the family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for family in impls.FAMILIES:
        fam = [r for r in rows if r["family"] == family and r["status"] == "ok"]
        if not fam:
            continue
        shapes = sorted({_shape_label(r) for r in fam})
        names = sorted({r["impl"] for r in fam}, key=lambda n: (not n.startswith("ours"), n))
        colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
        markers = {n: "osD^v"[i // 10 % 5] for i, n in enumerate(names)}
        fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 1.5 + 3.2 * len(shapes)), squeeze=False,
                                 layout="constrained")
        for row_axes, shape in zip(axes, shapes):
            for ax, mode in zip(row_axes, ("fwd", "fwd_bwd")):
                for name in names:
                    pts = sorted((r["seq"], r["tokens_per_s"]) for r in fam
                                 if r["impl"] == name and r["mode"] == mode and _shape_label(r) == shape)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[name], color=colors[name],
                                linestyle="-" if name.startswith("ours") else "--")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length")
                ax.set_ylabel("tokens / s")
                ax.set_title(f"{shape}: {mode.replace('_', '+')}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
        handles = [plt.Line2D([], [], color=colors[n], marker=markers[n],
                              linestyle="-" if n.startswith("ours") else "--") for n in names]
        fig.legend(handles, names, loc="outside lower center", ncol=4, fontsize=8)
        metas = [runs[i] for i in sorted({r.get("run", 0) for r in fam})]
        where = "; ".join(f"{m['device']}, {m['date'][:10]}, commit {m['commit'][:8]}" for m in metas)
        fig.suptitle(f"{family}: throughput vs sequence length ({where}); solid = ours, dashed = peers",
                     fontsize=10)
        path = os.path.join(out_dir, f"suite_{family}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------- main
def write_outputs(report: dict, out_dir: str) -> None:
    """suite.json, suite.md, the plots and headline.json from a report's runs, rows and scan."""
    runs, rows = report["runs"], report["rows"]
    report["headline"] = headline(rows, runs)
    with open(os.path.join(out_dir, "suite.md"), "w") as fh:
        fh.write(markdown(runs, rows, report.get("complexity_scan"), report["peers_unavailable"],
                          report.get("complexity_scan_run", 0)))
    report["plots"] = [os.path.relpath(p, out_dir) for p in plots(rows, out_dir, runs)]
    with open(os.path.join(out_dir, "headline.json"), "w") as fh:
        json.dump(report["headline"], fh, indent=1)
    with open(os.path.join(out_dir, "suite.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=str)


def merge(paths: list[str]) -> dict:
    """One report from several runs' suite.json: rows keep the index of their run in ``runs`` (a later run's
    row replaces an earlier one of the same case, implementation and mode); the complexity scan is the last
    run's that has one; a peer counts as unavailable only if no run measured it."""
    merged = dict(runs=[], rows=[], peers_unavailable={}, merged_from=[os.path.basename(p) for p in paths])
    for path in paths:
        with open(path) as fh:
            part = json.load(fh)
        offset = len(merged["runs"])
        merged["runs"] += part["runs"]
        merged["rows"] += [dict(r, run=r["run"] + offset) for r in part["rows"]]
        merged["peers_unavailable"].update(part["peers_unavailable"])
        if part.get("complexity_scan"):
            merged["complexity_scan"] = part["complexity_scan"]
            merged["complexity_scan_shape"] = part.get("complexity_scan_shape")
            merged["complexity_scan_run"] = part.get("complexity_scan_run", 0) + offset
        merged.setdefault("cases_not_run", []).extend(part.get("cases_not_run", []))
    # A (case, implementation, mode) measured again by a later run: the later row replaces the earlier one.
    latest = {(r["case"], r["impl"], r["mode"]): r for r in merged["rows"]}
    merged["rows"] = [r for r in merged["rows"] if latest[(r["case"], r["impl"], r["mode"])] is r]
    measured = {r["impl"] for r in merged["rows"] if r["status"] == "ok"}
    merged["peers_unavailable"] = {n: w for n, w in merged["peers_unavailable"].items() if n not in measured}
    return merged


def main(args) -> int:
    start = time.perf_counter()
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), "attn_suite_smoke") if args.smoke
                    else os.path.join(REPO, "benchmarks", "results"))
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        report = merge(args.merge)
        write_outputs(report, args.out)
        log(f"merged {len(args.merge)} runs ({len(report['rows'])} rows) into {args.out}")
        return 0
    families = args.families or list(impls.FAMILIES)
    for f in families:
        if f not in impls.FAMILIES + ("none",):
            raise SystemExit(f"--families: unknown family {f!r}; known: {' '.join(impls.FAMILIES)} (or none)")
    meta = metadata(args.smoke)
    log("meta", json.dumps(meta))
    memory_limit = 0.85 * measure.device_memory_bytes()
    min_time = args.min_time if args.min_time is not None else (0.02 if args.smoke else 0.5)
    rows, unavailable = [], {}
    report = dict(runs=[meta], families=families, memory_limit_bytes=memory_limit, rows=rows,
                  peers_unavailable=unavailable)

    def save():
        report["log"] = LOG
        report["seconds"] = time.perf_counter() - start
        with open(os.path.join(args.out, "suite.json"), "w") as fh:
            json.dump(report, fh, indent=1, default=str)

    causal = {"both": (True, False), "causal": (True,), "full": (False,)}[args.causal]
    for case in impls.grid(args.smoke, families, args.seqs, args.head_dims, args.tokens, causal, args.windows,
                           args.densities, args.mechanisms):
        if args.budget is not None and time.perf_counter() - start > args.budget:
            log(f"{case.name}: not run: --budget of {args.budget:g} s spent")
            report.setdefault("cases_not_run", []).append(dict(case=case.name, reason="time budget spent"))
            continue
        impl_list = [i for i in impls.ours(case) if args.forms is None or i.name.split("/")[-1] in args.forms]
        if args.smoke:
            unavailable.setdefault("all peers", "not run in --smoke mode")
        else:
            impl_list += impls.peers(case, unavailable)
        try:
            rows += [dict(r, run=0) for r in run_case(case, impl_list, args, memory_limit, min_time)]
        except Exception as e:  # noqa: BLE001 -- e.g. no reference fits: say so, go on with the next case
            log(f"{case.name}: not run: {type(e).__name__}: {str(e)[:300]}")
            report.setdefault("cases_not_run", []).append(dict(case=case.name, reason=f"{type(e).__name__}: {e}"))
        save()

    report["seconds_cases"] = time.perf_counter() - start
    if not args.no_scan:
        if args.smoke:
            scan_shape = dict(seqs=(128, 512), batch=1, heads=2, head_dim=16, dtype="float32")
        else:
            scan_shape = dict(seqs=tuple(args.scan_seqs), batch=1, heads=8, head_dim=64, dtype="float32")
        report["complexity_scan_shape"] = scan_shape
        stop_at = None if args.budget is None else start + args.budget
        report["complexity_scan"] = measure.complexity_scan(smoke=args.smoke, min_time=min_time / 2, log=log,
                                                            stop_at=stop_at, **scan_shape)
        report["seconds_scan"] = time.perf_counter() - start - report["seconds_cases"]
    report["log"] = LOG
    report["seconds"] = time.perf_counter() - start
    write_outputs(report, args.out)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "wrong", "skipped", "error")}
    log(f"done in {time.perf_counter() - start:.1f} s: {counts}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
