"""What the benchmark suite times: the cases (shape grid per family) and the implementations, ours and peers.

Every implementation is built for one case as a ``Runner`` that can compile/prepare the forward or the
forward+backward call, run it, and hand back [out] or [out, dq, dk, dv] as float32 numpy arrays for the
check against our plain-JAX reference. Peers are import-guarded: a peer that is not installed, or needs a
GPU the run does not have, is listed with the reason instead of timed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import attn

from benchmarks._suite_measure import compiled_peak_bytes

FAMILIES = ("dense", "sliding_window", "block_sparse", "linear_recurrent")
LINEAR_MECHANISMS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule", "retention")


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    mechanism: str  # registry name whose "xla" form is the reference
    batch: int
    seq: int
    heads: int
    head_dim: int
    causal: bool
    dtype: str
    window: tuple[int, int] | None = None  # (left, right) keys around each query
    density: float | None = None  # fraction of (q-block, k-block) pairs kept
    block: int | None = None

    @property
    def name(self) -> str:
        extra = ""
        if self.window is not None:
            extra = f" W{self.window[0] + self.window[1] + 1}"
        if self.density is not None:
            extra = f" rho{self.density:g} blk{self.block}"
        return (f"{self.mechanism} B{self.batch} S{self.seq} H{self.heads} D{self.head_dim}"
                f"{extra} {'causal' if self.causal else 'full'} {self.dtype}")


def grid(smoke: bool, families, seqs=None, head_dims=None, tokens: int = 32768, causal=(True, False),
         windows=None, densities=None, mechanisms=None) -> list[Case]:
    """The shape grid. Full: seq 1k-32k at a constant token count per batch, head_dim 64/128, causal and full,
    windows of 512 and 2048 keys, block densities 10/25/50 % (128-blocks), the gated linear recurrences in
    bf16. Smoke: the same structure at tiny shapes in float32. Every argument left None takes the grid's
    default; the others cut the grid (a run must fit a machine's time limit)."""
    if smoke:
        seqs, head_dims, heads, dtype = seqs or (64, 128), head_dims or (16,), 2, "float32"
        windows, densities, block = windows or (16,), densities or (0.5,), 16
        mechanisms = mechanisms or ("simple_gla",)
    else:
        seqs = seqs or (1024, 2048, 4096, 8192, 16384, 32768)
        head_dims, heads, dtype = head_dims or (64, 128), 16, "bfloat16"
        windows, densities, block = windows or (512, 2048), densities or (0.1, 0.25, 0.5), 128
        mechanisms = mechanisms or LINEAR_MECHANISMS
    cases = []
    for seq in seqs:
        batch = 1 if smoke else max(1, tokens // seq)
        for d in head_dims:
            base = dict(batch=batch, seq=seq, heads=heads, head_dim=d, dtype=dtype)
            for is_causal in causal:
                if "dense" in families:
                    cases.append(Case("dense", "softmax", causal=is_causal, **base))
                if smoke and not is_causal:
                    continue  # the smoke run covers the non-causal path with the dense family only
                if "sliding_window" in families:
                    for w in windows:
                        # w keys per query: the w - 1 before it (causal) or about w / 2 on each side.
                        window = (w - 1, 0) if is_causal else (w // 2, w - 1 - w // 2)
                        cases.append(Case("sliding_window", "sliding_window", causal=is_causal, window=window,
                                          **base))
                if "block_sparse" in families and seq % block == 0:
                    for rho in densities:
                        cases.append(Case("block_sparse", "block_sparse", causal=is_causal, density=rho,
                                          block=block, **base))
            if "linear_recurrent" in families:
                for mech in mechanisms:
                    cases.append(Case("linear_recurrent", mech, causal=True, **base))
    return cases


def block_layout(case: Case) -> np.ndarray:
    """[heads, nb, nb] random block layout of the case's density (a pattern per head), diagonal always kept."""
    nb = case.seq // case.block
    rng = np.random.RandomState(case.seq + 7 * case.head_dim)
    layout = rng.random_sample((case.heads, nb, nb)) < case.density
    return layout | np.eye(nb, dtype=bool)[None]


def attended_pairs(case: Case) -> float:
    """(query, key) pairs the case requires, summed over heads (for TFLOP/s on the required work)."""
    s, h = case.seq, case.heads
    if case.family == "dense":
        return h * (s * (s + 1) / 2 if case.causal else s * s)
    if case.family == "sliding_window":
        left, right = case.window
        i = np.arange(s)
        return h * float(np.sum(np.minimum(i + right, s - 1) - np.maximum(i - left, 0) + 1))
    if case.family == "block_sparse":
        layout = block_layout(case)
        b = case.block
        if not case.causal:
            return float(layout.sum()) * b * b
        below = np.tril(np.ones(layout.shape[1:], bool), -1)
        diag = np.eye(layout.shape[1], dtype=bool)
        return float((layout & below).sum()) * b * b + float((layout & diag).sum()) * b * (b + 1) / 2
    raise ValueError(case.family)


def forward_flops(case: Case) -> float:
    """Forward work required: attention 2 products per visible pair (4 D flops); linear recurrences the state
    write k^T v and read q S per token (4 D^2 flops)."""
    if case.family == "linear_recurrent":
        return 4.0 * case.batch * case.seq * case.heads * case.head_dim ** 2
    return 4.0 * case.batch * case.head_dim * attended_pairs(case)


# The backward of either kind needs twice the forward's products (attention: dV, dP, dQ, dK; recurrences:
# dq from the state, dk and dv from its gradient, and the gradient's accumulation); FlashAttention-style
# counts add the recomputed logits (3.5x), we count only the required work.
FWD_BWD_FLOP_FACTOR = 3.0


def make_inputs(case: Case) -> dict[str, Any]:
    """q, k, v, the output cotangent and the mechanism's parameters, deterministic per case."""
    dtype = jnp.dtype(case.dtype)
    shape = (case.batch, case.seq, case.heads, case.head_dim)
    kq, kk, kv, kd, kp = jax.random.split(jax.random.key(case.seq * 131 + case.head_dim), 5)
    q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in (kq, kk, kv, kd))
    spec = attn.spec(case.mechanism)
    if case.family == "sliding_window":
        params = {"window": case.window}
    elif case.family == "block_sparse":
        params = {"layout": jnp.asarray(block_layout(case)), "block_size": case.block}
    else:
        params = spec.params(kp, shape, shape, case.head_dim, case.causal)
    return dict(q=q, k=k, v=v, dout=dout, params=params)


# ------------------------------------------------------------------------------------------- runners
class JaxRunner:
    """A JAX callable ``f(q, k, v, arrays)`` for one case: compiled per mode, with XLA's peak-memory estimate.

    The mechanism's array parameters (gates, layouts) travel as arguments: closed over, they would be baked
    into the program as constants (hundreds of MB at the large shapes).
    """

    backend = "jax"

    def __init__(self, f: Callable, inputs: dict, arrays: dict | None = None):
        self.f, self.inputs, self.arrays = f, inputs, arrays or {}

    def prepare(self, mode: str):
        q, k, v, dout = (self.inputs[n] for n in ("q", "k", "v", "dout"))
        arrays = self.arrays
        if mode == "fwd":
            compiled = jax.jit(self.f).lower(q, k, v, arrays).compile()
            call = lambda: compiled(q, k, v, arrays)
        else:
            def fwd_bwd(q, k, v, dout, arrays):
                out, vjp = jax.vjp(lambda q, k, v: self.f(q, k, v, arrays), q, k, v)
                return (out,) + vjp(dout)

            compiled = jax.jit(fwd_bwd).lower(q, k, v, dout, arrays).compile()
            call = lambda: compiled(q, k, v, dout, arrays)
        return call, compiled_peak_bytes(compiled), "xla_memory_analysis"

    @staticmethod
    def sync(result):
        return jax.block_until_ready(result)

    @staticmethod
    def to_numpy(result) -> list[np.ndarray]:
        parts = result if isinstance(result, tuple) else (result,)
        return [np.asarray(p.astype(jnp.float32)) for p in parts]


class TorchRunner:
    """A PyTorch callable on CUDA tensors. ``heads_first`` peers take [batch, heads, seq, dim]."""

    backend = "torch"

    def __init__(self, f: Callable, inputs: dict, heads_first: bool):
        import torch

        self.torch, self.f, self.heads_first = torch, f, heads_first
        dtype = getattr(torch, str(inputs["q"].dtype))

        def convert(x):
            t = torch.from_numpy(np.asarray(jnp.asarray(x, jnp.float32))).to("cuda", dtype)
            return t.transpose(1, 2).contiguous() if heads_first else t

        self.q, self.k, self.v, self.dout = (convert(inputs[n]) for n in ("q", "k", "v", "dout"))

    def prepare(self, mode: str):
        torch = self.torch
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return (self.f(self.q, self.k, self.v),)
        else:
            q, k, v = (x.detach().requires_grad_(True) for x in (self.q, self.k, self.v))

            def call():
                out = self.f(q, k, v)
                return (out,) + torch.autograd.grad(out, (q, k, v), self.dout)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = call()  # one call to learn the peak; also the first warm-up (and compile for flex)
        torch.cuda.synchronize()
        peak = int(torch.cuda.max_memory_allocated())
        del result
        return call, peak, "torch.cuda.max_memory_allocated"

    def sync(self, result):
        self.torch.cuda.synchronize()
        return result

    def to_numpy(self, result) -> list[np.ndarray]:
        out = []
        for t in result:
            t = t.detach().float()
            if self.heads_first:
                t = t.transpose(1, 2)
            out.append(t.cpu().numpy())
        return out


def release_memory():
    """Hands PyTorch's cached blocks back to the device so that JAX can grow into them (and vice versa)."""
    torch = sys.modules.get("torch")  # only if a peer imported it: importing torch costs seconds
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "ours" or "peer"
    build: Callable[[Case, dict], Any]  # (case, inputs) -> runner


def split_params(params: dict) -> tuple[dict, dict]:
    """(array parameters, static ones such as windows and block sizes)."""
    arrays = {n: p for n, p in params.items() if isinstance(p, jax.Array)}
    return arrays, {n: p for n, p in params.items() if n not in arrays}


def _mechanism_runner(case: Case, inputs: dict, implementation: str, dtype=None) -> JaxRunner:
    spec = attn.spec(case.mechanism)
    arrays, static = split_params(inputs["params"])
    if dtype is not None:
        inputs = dict(inputs, **{n: inputs[n].astype(dtype) for n in ("q", "k", "v", "dout")})
    f = lambda q, k, v, arrays: spec.fn(q, k, v, causal=case.causal, implementation=implementation, **arrays,
                                        **static)
    return JaxRunner(f, inputs, arrays)


def reference(case: Case, inputs: dict) -> JaxRunner:
    """Our mechanism's "xla" form in float32 on the same (rounded) inputs: the check's ground truth."""
    return _mechanism_runner(case, inputs, "xla", jnp.float32)


def ours(case: Case) -> list[Impl]:
    """Every implementation of the case's mechanism: the plain-JAX forms and the Pallas kernels."""
    spec = attn.spec(case.mechanism)

    def build(impl):
        return lambda case, inputs: _mechanism_runner(case, inputs, impl)

    return [Impl(f"ours {case.mechanism}/{impl}", "ours", build(impl)) for impl in spec.implementations]


# ------------------------------------------------------------------------------------------- peers
def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _torch_cuda() -> bool:
    if not _have("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _jax_window(case: Case):
    return None if case.window is None else tuple(case.window)


def _jax_nn(implementation):
    def build(case, inputs):
        return JaxRunner(lambda q, k, v, _: jax.nn.dot_product_attention(
            q, k, v, is_causal=case.causal, local_window_size=_jax_window(case), implementation=implementation),
            inputs)

    return build


def _tokamax(implementation):
    def build(case, inputs):
        import tokamax

        return JaxRunner(lambda q, k, v, _: tokamax.dot_product_attention(
            q, k, v, is_causal=case.causal, local_window_size=_jax_window(case), implementation=implementation),
            inputs)

    return build


def _torch_sdpa(backend_name):
    def build(case, inputs):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def f(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)

        return TorchRunner(f, inputs, heads_first=True)

    return build


_FLEX = {}


def _flex(case, inputs):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:  # one compiled wrapper per process; it recompiles per shape itself
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    causal, s = case.causal, case.seq
    if case.family == "block_sparse":
        layout = torch.from_numpy(block_layout(case)).cuda()
        blk = case.block

        def mask_mod(b, h, qi, ki):
            keep = layout[h, qi // blk, ki // blk]
            return keep & (qi >= ki) if causal else keep
        heads = case.heads
    elif case.family == "sliding_window":
        left, right = case.window

        def mask_mod(b, h, qi, ki):
            return (ki >= qi - left) & (ki <= qi + right)
        heads = None
    else:
        def mask_mod(b, h, qi, ki):
            return qi >= ki
        heads = None
    block_mask = None
    if case.family != "dense" or causal:
        block_mask = create_block_mask(mask_mod, None, heads, s, s, device="cuda")
    flex = _FLEX["fn"]
    return TorchRunner(lambda q, k, v: flex(q, k, v, block_mask=block_mask), inputs, heads_first=True)


def _fla(case, inputs):
    import torch
    import torch.nn.functional as F

    p = inputs["params"]
    to_t = lambda x: torch.from_numpy(np.asarray(jnp.asarray(x, jnp.float32))).cuda()
    if case.mechanism == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        g = to_t(p["log_gate"])
        f = lambda q, k, v: chunk_simple_gla(q, k, v, g=g)[0]
    elif case.mechanism == "gla":
        from fla.ops.gla import chunk_gla

        g = to_t(p["log_gate"])
        f = lambda q, k, v: chunk_gla(q, k, v, g=g)[0]
    elif case.mechanism == "delta_rule":
        from fla.ops.delta_rule import chunk_delta_rule

        beta = to_t(p["beta"]).to(torch.bfloat16 if case.dtype == "bfloat16" else torch.float32)
        # Ours L2-normalises q and k inside the call; so does the peer's call here.
        f = lambda q, k, v: chunk_delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta)[0]
    elif case.mechanism == "gated_delta_rule":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        beta = to_t(p["beta"]).to(torch.bfloat16 if case.dtype == "bfloat16" else torch.float32)
        g = to_t(p["log_gate"])
        f = lambda q, k, v: chunk_gated_delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, g, beta)[0]
    elif case.mechanism == "retention":
        from fla.ops.retention import chunk_retention

        # fla fixes RetNet's decays 1 - 2^(-5 - h), which are also our example parameters (checked below).
        f = lambda q, k, v: chunk_retention(q, k, v)[0]
    else:
        raise ValueError(f"no fla peer for {case.mechanism}")
    return TorchRunner(f, inputs, heads_first=False)


def peers(case: Case, unavailable: dict[str, str]) -> list[Impl]:
    """The peers that can run this case on this machine; the others go into ``unavailable`` with a reason."""
    found = []

    def offer(name, needs_ok, reason, build):
        if needs_ok:
            found.append(Impl(name, "peer", build))
        else:
            unavailable.setdefault(name, reason)

    gpu, torch_cuda = _on_gpu(), _torch_cuda()
    tokamax = _have("tokamax")
    if case.family in ("dense", "sliding_window"):
        offer("jax.nn cudnn", gpu, "needs a GPU", _jax_nn("cudnn"))
        offer("jax.nn xla", True, "", _jax_nn("xla"))
        for impl in ("mosaic", "triton", "cudnn", "xla_chunked"):
            offer(f"tokamax {impl}", tokamax and gpu, "tokamax not importable or no GPU", _tokamax(impl))
    if case.family == "dense":
        offer("torch sdpa flash", torch_cuda, "torch with CUDA not available", _torch_sdpa("FLASH_ATTENTION"))
        offer("torch sdpa cudnn", torch_cuda, "torch with CUDA not available", _torch_sdpa("CUDNN_ATTENTION"))
    if case.family in ("dense", "sliding_window", "block_sparse"):
        offer("torch flex_attention", torch_cuda, "torch with CUDA not available", _flex)
    if case.family == "linear_recurrent":
        offer(f"fla chunk_{case.mechanism}", torch_cuda and _have("fla"), "fla (fla-core) or CUDA torch missing",
              _fla)
    return found
