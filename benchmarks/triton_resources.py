"""Registers, spills and shared memory of the linear-recurrent Triton kernels, on a machine without a GPU.

    PYTHONPATH=. python benchmarks/triton_resources.py --triton-python /path/to/venv/bin/python [--out DIR]

1. In this interpreter (JAX): the GPU default of each family (scalar gate, GLA, gated delta rule), forward and
   backward at B1 S256 H2 D128 bf16, is lowered for an abstract H100 (sm_90, as the H200), keeping the Triton IR of
   every Pallas kernel (Pallas' ``lower_jaxpr_to_triton_module``, wrapped) and its launch settings.
2. In ``--triton-python`` (a Python with the ``triton`` wheel of the GPU machine, 3.6.0; not a project dependency):
   each kernel's IR is compiled for sm_90a with those settings and ptxas reports what it uses.
Prints a table (kernel, warps, stages, registers per thread, spill stores / loads in bytes, shared memory, static
SASS instructions from cuobjdump: a size, not a count of what runs, since loops run many times) and
writes ``triton_resources.json`` to --out (``benchmarks/results/triton_resources_sm90.{txt,json}``: the defaults of
2026-12-03, commit 2c2221f). At 255 registers a program of 8 warps takes the whole register file of an SM (one
program per SM); spills go to local memory. The sizes are those of a short sequence: the kernels' tiles do not
depend on its length. A proxy, not a timing: XLA compiles these kernels with its own Triton build, whose passes may
allocate otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering as triton_lowering
from jax._src.pallas.triton import pallas_call_registration

from kernels_pallas.linear_recurrent import chunked_scalar_gate_recurrence
from kernels_pallas.linear_recurrent.delta_ops import chunked_delta_recurrence
from kernels_pallas.linear_recurrent.vector_gate_ops import chunked_vector_gate_recurrence

# Runs in --triton-python: compile one IR file for sm_90a, print ptxas' report.
_COMPILE = r"""
import os, re, subprocess, sys, triton
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
open(path + ".ptx", "w").write(kernel.asm["ptx"])
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
report = subprocess.run([ptxas, "--gpu-name", "sm_90a", "-v", path + ".ptx", "-o", path + ".cubin"],
                        capture_output=True, text=True)
print(report.stdout + report.stderr)
print("shared", kernel.metadata.shared)
sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "cuobjdump"), "-sass", path + ".cubin"],
                      capture_output=True, text=True).stdout
print("sass", len(re.findall(r"/[*][0-9a-f]+[*]/\s+[A-Z@]", sass)))
"""


def _families():
    b, s, h, d = 1, 256, 2, 128
    x = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16)
    per_step = jax.ShapeDtypeStruct((b, s, h), jnp.float32)
    per_dim = jax.ShapeDtypeStruct((b, s, h, d), jnp.float32)
    scalar = lambda q, k, v, g: chunked_scalar_gate_recurrence(q, k, v, g, backend="triton")[0]
    gla = lambda q, k, v, g: chunked_vector_gate_recurrence(q, k, v, g, backend="triton")[0]
    delta = lambda q, k, v, beta, g: chunked_delta_recurrence(q, k, v, beta, g, backend="triton")[0]
    return {"scalar gate": (scalar, (x, x, x, per_step)), "GLA": (gla, (x, x, x, per_dim)),
            "gated delta rule": (delta, (x, x, x, per_step, per_step))}


def lower(fn, args):
    """{kernel name: (Triton IR text, num_warps, num_stages)} of the forward and backward of ``fn``."""
    irs = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def keep_ir(*a, **kw):
        result = original(*a, **kw)
        irs.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    # value_and_grad: with the gradient alone, the forward's output kernel is dead code.
    grad = jax.value_and_grad(lambda *xs: fn(*xs).astype(jnp.float32).sum(), argnums=tuple(range(len(args))))
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = keep_ir
    try:
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=gpu)):
            hlo = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = original
    kernels = {}
    for ir in irs:
        name = re.match(r"module @(\w+)", ir).group(1)
        attributes = hlo[hlo.index(f'name = "{name}"'):]  # the custom call's attributes follow its name
        warps = int(re.search(r"num_warps = (\d+) : i32", attributes).group(1))
        stages = int(re.search(r"num_stages = (\d+) : i32", attributes).group(1))
        kernels[name] = (ir, warps, stages)
    return kernels


def compile_report(triton_python, ir, warps, stages, workdir, name):
    path = os.path.join(workdir, name + ".ttir")
    with open(path, "w") as f:
        f.write(ir)
    run = subprocess.run([triton_python, "-c", _COMPILE, path, str(warps), str(stages)], capture_output=True,
                         text=True)
    if run.returncode:
        raise SystemExit(f"compiling {name} with {triton_python} failed (is the triton wheel installed there?):\n"
                         f"{run.stderr[-2000:]}")
    out = run.stdout
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(re.search(r"Used (\d+) registers", out).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            "shared_bytes": int(re.search(r"shared (\d+)", out).group(1)),
            "sass_instructions": int(re.search(r"sass (\d+)", out).group(1))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--triton-python", required=True, help="a Python with the triton 3.6.0 wheel installed")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for family, (fn, fn_args) in _families().items():
            for name, (ir, warps, stages) in lower(fn, fn_args).items():
                report = compile_report(args.triton_python, ir, warps, stages, workdir, name)
                rows.append(dict(family=family, kernel=name, num_warps=warps, num_stages=stages, **report))
                print(f"{family:17s} {name:28s} warps {warps} stages {stages}: {report['registers']:3d} registers, "
                      f"spills {report['spill_stores']} / {report['spill_loads']} B, "
                      f"shared {report['shared_bytes']} B, {report['sass_instructions']} SASS instructions", flush=True)
    with open(os.path.join(args.out, "triton_resources.json"), "w") as f:
        json.dump({"jax": jax.__version__, "target": "sm_90a", "commit": os.environ.get("BENCH_COMMIT"),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "kernels": rows}, f, indent=1)


if __name__ == "__main__":
    main()
