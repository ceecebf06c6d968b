"""The Pallas sliding-window kernels, GPU (Triton) and TPU (Mosaic) builds, run by Pallas' interpreters.

Both agree with the dense masked reference, output and all three gradients, on small random shapes: odd
lengths, GQA/MQA, segment ids, windows from one key to the whole sequence, causal and two-sided, soft-cap.
Shapes stay tiny: interpret mode is slow.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.sliding_window import BlockSizes, band, sliding_window_attention, sliding_window_reference
import _kernel_helpers as kernel_helpers

SMALL = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16)
# Unequal tiles per pass, so that the band arithmetic of each pass is exercised with its own shapes.
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32, block_k_dkv=16)
# One backward kernel whose key tiles add their dq shares into a float32 buffer (atomics on the GPU); three
# loops, so that both the masked edges and the unmasked middle of the band add to dq.
FUSED = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=32, single_loop=False, fused_bwd=True)


def _rel_err(a, b):
    """Relative error, against a floor of 1: with a one-key window dq and dk are exactly 0 (out = v)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0)


def _case(seed, b, s, h, hkv, d, segments):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, s, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.float32)
    dout = jax.random.normal(keys[3], (b, s, h, d), jnp.float32)
    seg = None
    if segments:
        seg = jnp.sort(jax.random.randint(keys[4], (b, s), 0, 3), axis=1).astype(jnp.int32)
    return q, k, v, dout, seg


def _check_against_reference(backend, seed, b, s, h, hkv, d, window, causal, segments, softcap, blocks):
    q, k, v, dout, seg = _case(seed, b, s, h, hkv, d, segments)
    kw = dict(window=window, causal=causal, segment_ids=seg, softcap=softcap)
    out, vjp = jax.vjp(lambda q, k, v: sliding_window_attention(
        q, k, v, block_sizes=blocks, backend=backend, interpret=True, **kw), q, k, v)
    f64 = lambda x: x.astype(jnp.float64)
    ref, ref_vjp = jax.vjp(lambda q, k, v: sliding_window_reference(q, k, v, **kw), f64(q), f64(k), f64(v))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_err(out, ref) < 1e-5
    for name, g, r in zip(("dq", "dk", "dv"), vjp(dout), ref_vjp(f64(dout))):
        assert g.shape == r.shape, name
        assert _rel_err(g, r) < 1e-5, name


# b, s, h, hkv, d, window, causal, segments, softcap, blocks
GPU_CASES = {
    "odd-gqa-two-sided": (2, 37, 4, 2, 16, (5, 3), False, False, None, SMALL),
    "mqa-causal-segments-softcap": (1, 45, 2, 1, 32, (9, 0), True, True, 3.0, MIXED),
    "window-one-key": (1, 33, 2, 2, 16, (0, 0), False, False, None, SMALL),
    "window-whole-sequence": (1, 29, 2, 1, 64, (40, 40), False, True, None, SMALL),
    "fused-backward-gqa-two-sided": (2, 53, 4, 2, 16, (19, 6), False, False, None, FUSED),
    "fused-backward-mqa-causal-segments-softcap": (1, 45, 4, 1, 16, (12, 0), True, True, 3.0, FUSED),
}


@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_kernel_matches_reference(case):
    _check_against_reference("triton", 0, *case)


TPU_CASES = {
    "odd-gqa-two-sided": (1, 37, 4, 2, 16, (6, 2), False, False, None, SMALL),
    "causal-segments-softcap": (1, 40, 2, 1, 16, (11, 0), True, True, 2.5, MIXED),
}


@pytest.mark.parametrize("case", TPU_CASES.values(), ids=TPU_CASES.keys())
def test_tpu_kernel_matches_reference(case):
    _check_against_reference("mosaic_tpu", 1, *case)


def test_bfloat16_keeps_dtype_and_float32_accumulation():
    q, k, v, _, _ = _case(2, 1, 48, 2, 2, 32, False)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = sliding_window_attention(q, k, v, window=(7, 0), causal=True, block_sizes=SMALL, interpret=True)
    ref = sliding_window_reference(*(x.astype(jnp.float64) for x in (q, k, v)), window=(7, 0), causal=True)
    assert out.dtype == jnp.bfloat16
    assert _rel_err(out, ref) < 1e-2


def _brute_force_tiles(start, rows_block, cols_block, left, right, seq_len, rows_are_queries):
    """Column tiles meeting the band for rows [start, start + rows_block), and those needing no mask."""
    rows = np.arange(start, start + rows_block)[:, None]
    meets, inside = [], []
    for t in range(-(-seq_len // cols_block) + 1):
        cols = np.arange(t * cols_block, (t + 1) * cols_block)[None, :]
        i, j = (rows, cols) if rows_are_queries else (cols, rows)
        allowed = (j >= i - left) & (j <= i + right) & (j < seq_len)
        if (allowed & (i < seq_len)).any():
            meets.append(t)
            # A tile may skip the mask when all its pairs are allowed, except pairs that cannot matter:
            # padded queries (their stored logsumexp zeroes their probabilities) and, in the dk/dv pass,
            # padded keys (whose gradients are dropped).
            dont_care = (i >= seq_len) if rows_are_queries else (i >= seq_len) | (j >= seq_len)
            if (allowed | dont_care).all():
                inside.append(t)
    return meets, inside


@pytest.mark.parametrize("rows_are_queries", [True, False], ids=["key-tiles", "query-tiles"])
def test_band_tiles_are_exactly_those_meeting_the_window(rows_are_queries):
    rng = np.random.default_rng(0)
    for _ in range(300):
        seq_len = int(rng.integers(1, 200))
        rows_block, cols_block = (int(x) for x in 2 ** rng.integers(3, 7, size=2))
        left, right = (int(x) for x in rng.integers(0, seq_len, size=2))
        start = int(rng.integers(0, -(-seq_len // rows_block))) * rows_block
        fn = band.key_tiles if rows_are_queries else band.query_tiles
        args = (rows_block, cols_block) if rows_are_queries else (cols_block, rows_block)
        lo, mid_lo, mid_hi, hi = (int(x) for x in fn(start, *args, left, right, seq_len))
        meets, inside = _brute_force_tiles(start, rows_block, cols_block, left, right, seq_len,
                                           rows_are_queries)
        assert list(range(lo, hi)) == meets, (seq_len, rows_block, cols_block, left, right, start)
        # The unmasked middle holds only tiles that need no mask (it may leave some of them to the edges).
        assert lo <= mid_lo <= mid_hi <= hi
        assert set(range(mid_lo, mid_hi)) <= set(inside)
        # Work grows with the window, not the sequence: at most (rows + left + right) / cols + 2 tiles.
        assert hi - lo <= (rows_block + left + right) // cols_block + 2


BAD_ARGUMENTS = {
    "window negative": (dict(window=(-1, 2)), "window"),
    "window not a pair": (dict(window=5), "window"),
    "window float": (dict(window=(2.0, 1)), "window"),
    "block not a power of two": (dict(window=(2, 2), block_sizes=BlockSizes(block_q=48)), "block_q"),
    "block too small to tile": (dict(window=(2, 2), block_sizes=BlockSizes(block_k_dkv=4)), "block_k_dkv"),
    "unknown backend": (dict(window=(2, 2), backend="cuda"), "backend"),
    "softcap not positive": (dict(window=(2, 2), softcap=0.0), "softcap"),
    "scale not positive": (dict(window=(2, 2), scale=-0.5), "scale"),
    "segment ids of the wrong shape": (dict(window=(2, 2), segment_ids=jnp.zeros((1, 5), jnp.int32)),
                                       "segment_ids"),
}


@pytest.mark.parametrize("kwargs,name", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match=name):
        sliding_window_attention(q, q, q, interpret=True, **kwargs)


def test_unsupported_head_dim_and_shapes_raise_value_error():
    q = jnp.zeros((1, 16, 2, 512), jnp.float32)
    with pytest.raises(ValueError, match="head_dim"):
        sliding_window_attention(q, q, q, window=(2, 2), interpret=True)
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="sequence length"):
        sliding_window_attention(q, q[:, :8], q[:, :8], window=(2, 2), interpret=True)
    three_heads = jnp.zeros((1, 16, 3, 16), q.dtype)
    with pytest.raises(ValueError, match="heads"):
        sliding_window_attention(q, three_heads, three_heads, window=(2, 2), interpret=True)


def test_padding_and_block_choice_do_not_change_the_result():
    q, k, v, _, _ = _case(3, 1, 50, 2, 1, 16, False)
    outs = [sliding_window_attention(q, k, v, window=(6, 4), block_sizes=blocks, interpret=True)
            for blocks in (SMALL, MIXED)]
    for a, b in itertools.combinations(outs, 2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


LOWERINGS = {"triton": kernel_helpers.triton_kernels_lowered, "mosaic_tpu": kernel_helpers.mosaic_tpu_kernels_lowered}


@pytest.mark.parametrize("backend", LOWERINGS)
def test_build_lowers_on_a_cpu_only_machine(backend):
    """Each build's default blocks at B1 S1024 D128 bf16, causal window 256, GQA 4:2: forward and backward kernels
    lower through Pallas' Triton lowering (ptxas is not run) or its Mosaic TPU lowering for a v5e (libtpu's
    compiler is not run)."""
    q = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    attend = lambda q, k, v: sliding_window_attention(q, k, v, window=(256, 0), causal=True, backend=backend)
    f = jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    assert LOWERINGS[backend](f, q, kv, kv) == 3
