"""The Pallas block-sparse kernels, GPU (Triton) and TPU (Mosaic) builds, run by Pallas' interpreters.

Both agree with the dense reference (block_sparse, implementation "xla"), output and all three gradients, on
small random layouts: empty and full rows, per-head and per-batch layouts, causal diagonal, GQA/MQA, segment
ids, cross attention with rectangular blocks, and a traced layout under jit. Shapes stay tiny: interpret mode
is slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn
from kernels_pallas.block_sparse import Tiles, block_sparse_attention, block_sparse_reference, tables
import _kernel_helpers as kernel_helpers


def _rel_err(a, b):
    """Relative error, against a floor of 1 (gradients of empty rows and columns are exactly 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0)


def _inputs(seed, b, sq, sk, h, hkv, d, segments):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, sq, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, sk, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, sk, hkv, d), jnp.float32)
    dout = jax.random.normal(keys[3], (b, sq, h, d), jnp.float32)
    seg = None
    if segments:  # sq == sk here
        seg = jnp.sort(jax.random.randint(keys[4], (b, sq), 0, 3), axis=1).astype(jnp.int32)
    return q, k, v, dout, seg


def _layout(seed, shape, density):
    """Random layout with, in every [qb, kb] slice, the first row empty and the last row full."""
    layout = np.random.default_rng(seed).random(shape) < density
    layout[..., 0, :] = False
    layout[..., -1, :] = True
    return layout


def _check(backend, seed, b, sq, sk, h, hkv, d, block, layout_shape, causal, segments, jit_layout=False,
           tiles=None):
    q, k, v, dout, seg = _inputs(seed, b, sq, sk, h, hkv, d, segments)
    layout = _layout(seed, layout_shape, 0.4)
    kw = dict(block_size=block, causal=causal, segment_ids=seg)
    tile_kw = {} if tiles is None else {"tiles": tiles}

    if jit_layout:  # the layout traced, as for data-dependent sparsity, with a static bound per row
        bound = int(layout.sum(-1).max())
        run = jax.jit(lambda q, k, v, lay: block_sparse_attention(
            q, k, v, lay, max_blocks_per_row=bound, backend=backend, interpret=True, **kw, **tile_kw))
        f = lambda q, k, v: run(q, k, v, jnp.asarray(layout))
    else:
        f = lambda q, k, v: block_sparse_attention(q, k, v, layout, backend=backend, interpret=True, **kw, **tile_kw)
    out, vjp = jax.vjp(f, q, k, v)
    f64 = lambda x: x.astype(jnp.float64)
    ref, ref_vjp = jax.vjp(lambda q, k, v: block_sparse_reference(q, k, v, layout, **kw), f64(q), f64(k), f64(v))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_err(out, ref) < 1e-5
    # The empty first query block gives exact zeros (q_block rows of every head).
    q_block = block if isinstance(block, int) else block[0]
    assert not np.any(np.asarray(out[:, :q_block]))
    for name, g, r in zip(("dq", "dk", "dv"), vjp(dout), ref_vjp(f64(dout))):
        assert g.shape == r.shape, name
        assert _rel_err(g, r) < 1e-5, name


# seed, b, sq, sk, h, hkv, d, block, layout shape, causal, segments
GPU_CASES = {
    "per-head-gqa": (0, 2, 32, 32, 4, 2, 16, 8, (4, 4, 4), False, False),
    "causal-diagonal-segments-mqa": (1, 1, 40, 40, 2, 1, 32, 8, (5, 5), True, True),
    "cross-per-batch-rect-blocks-causal": (2, 2, 16, 48, 2, 2, 16, (8, 16), (2, 2, 2, 3), True, False),
}


@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_kernel_matches_reference(case):
    _check("triton", *case)


def test_gpu_kernel_with_traced_layout_under_jit():
    _check("triton", 3, 1, 32, 32, 4, 1, 16, 8, (4, 4, 4), True, False, jit_layout=True)


def test_gpu_kernel_with_tiles_smaller_than_the_blocks():
    # Each 16-block split into tiles of other shapes per pass: the tables are rebuilt over tiles.
    _check("triton", 8, 1, 48, 48, 2, 1, 16, 16, (2, 3, 3), True, False, jit_layout=True,
           tiles=Tiles(q=16, k=8, q_bwd=8, k_bwd=16))


TPU_CASES = {
    "per-head-gqa-traced": (4, 1, 32, 32, 4, 2, 16, 8, (4, 4, 4), False, False, True),
    "causal-diagonal-segments": (5, 1, 24, 24, 2, 1, 16, 8, (3, 3), True, True, False),
}


@pytest.mark.parametrize("case", TPU_CASES.values(), ids=TPU_CASES.keys())
def test_tpu_kernel_matches_reference(case):
    _check("mosaic_tpu", *case)


def test_bfloat16_keeps_dtype():
    q, k, v, _, _ = _inputs(6, 1, 32, 32, 2, 2, 16, False)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    layout = _layout(6, (4, 4), 0.5)
    out = block_sparse_attention(q, k, v, layout, block_size=8, causal=True, interpret=True)
    ref = block_sparse_reference(*(x.astype(jnp.float64) for x in (q, k, v)), layout, block_size=8, causal=True)
    assert out.dtype == jnp.bfloat16
    assert _rel_err(out, ref) < 1e-2


def test_registered_mechanism_dispatches_to_the_kernel():
    q, k, v, _, _ = _inputs(7, 1, 16, 16, 2, 1, 16, False)
    layout = _layout(7, (2, 4, 4), 0.5)
    fn = attn.get("block_sparse")
    kw = dict(layout=layout, block_size=4, causal=True)
    np.testing.assert_allclose(fn(q, k, v, implementation="pallas", **kw), fn(q, k, v, implementation="xla", **kw),
                               rtol=1e-5, atol=1e-5)


def test_tables_list_kept_blocks_in_order_and_the_unmasked_run():
    rng = np.random.default_rng(0)
    layout = rng.random((3, 6, 7)) < 0.5
    unmasked = rng.random((6, 7)) < 0.5
    for prefix in (True, False):
        table = np.asarray(tables.compress(jnp.asarray(layout), unmasked, 7, prefix_unmasked=prefix))
        assert table.shape[-1] & (table.shape[-1] - 1) == 0  # power of two, for Triton
        for h in range(3):
            for r in range(6):
                kept = np.flatnonzero(layout[h, r])
                count, lo, hi = table[h, r, :3]
                assert count == len(kept)
                np.testing.assert_array_equal(table[h, r, 3:3 + count], kept)
                if count:  # padding repeats the last kept block: no new fetch on TPU
                    assert np.all(table[h, r, 3 + count:] == kept[-1])
                n_free = int(np.sum(unmasked[r, kept]))
                assert (lo, hi) == ((0, n_free) if prefix else (count - n_free, count))


BAD_LAYOUTS = {
    "wrong shape": (dict(layout=np.ones((3, 4), bool)), "layout"),
    "wrong heads": (dict(layout=np.ones((3, 4, 4), bool)), "layout"),
    "not boolean": (dict(layout=np.ones((4, 4), np.int32)), "layout"),
    "block size not dividing": (dict(layout=np.ones((3, 3), bool), block_size=5), "block_size"),
    "more kept blocks than the maximum": (dict(layout=np.ones((4, 4), bool), max_blocks_per_row=3),
                                          "max_blocks_per_row"),
    "maximum not positive": (dict(layout=np.ones((4, 4), bool), max_blocks_per_row=0), "max_blocks_per_row"),
    "unknown backend": (dict(layout=np.ones((4, 4), bool), backend="cuda"), "backend"),
    "segment ids of the wrong shape": (dict(layout=np.ones((4, 4), bool), segment_ids=jnp.zeros((1, 5), jnp.int32)),
                                       "segment_ids"),
    "tags of the wrong shape": (dict(layout=np.ones((4, 4), bool), tags=(jnp.zeros((1, 2, 16), jnp.int32),
                                                                         jnp.zeros((1, 1, 16), jnp.int32))), "k_tags"),
    "tags not a pair": (dict(layout=np.ones((4, 4), bool), tags=jnp.zeros((1, 2, 16), jnp.int32)), "tags"),
    "key block bits not int32": (dict(layout=np.ones((4, 4), bool), key_block_bits=np.zeros((1, 2, 16, 1), bool)),
                                 "key_block_bits"),
    "two fine masks": (dict(layout=np.ones((4, 4), bool), key_block_bits=jnp.zeros((1, 2, 16, 1), jnp.int32),
                            tags=(jnp.zeros((1, 2, 16), jnp.int32),) * 2), "tags and key_block_bits"),
}


@pytest.mark.parametrize("kwargs,name", BAD_LAYOUTS.values(), ids=BAD_LAYOUTS.keys())
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    kwargs = {"block_size": 4, **kwargs}
    layout = kwargs.pop("layout")
    with pytest.raises(ValueError, match=name):
        block_sparse_attention(q, q, q, layout, interpret=True, **kwargs)


def test_concrete_layout_over_the_bound_raises_under_jit_too():
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    layout = np.ones((4, 4), bool)
    run = jax.jit(lambda q: block_sparse_attention(q, q, q, layout, block_size=4, max_blocks_per_row=3,
                                                   interpret=True))
    with pytest.raises(ValueError, match="max_blocks_per_row"):
        run(q)


def test_traced_layout_over_the_bound_fails_at_run_time():
    # Under jit the layout is only known when the program runs: a row over the bound must fail, not be cut.
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    run = jax.jit(lambda q, lay: block_sparse_attention(q, q, q, lay, block_size=4, max_blocks_per_row=3,
                                                        interpret=True))
    within = np.tril(np.ones((4, 4), bool), 0) & ~np.eye(4, k=-3, dtype=bool)  # at most 3 per row
    assert run(q, jnp.asarray(within)).shape == q.shape
    with pytest.raises(Exception, match="keeps up to 4 blocks in a row, more than max_blocks_per_row=3"):
        run(q, jnp.ones((4, 4), bool)).block_until_ready()


LOWERINGS = {"triton": kernel_helpers.triton_kernels_lowered, "mosaic_tpu": kernel_helpers.mosaic_tpu_kernels_lowered}


@pytest.mark.parametrize("backend", LOWERINGS)
def test_build_lowers_on_a_cpu_only_machine(backend):
    """Each build's default tiles at B1 S1024 D128 bf16, causal, GQA 4:2, a traced layout (its tables built in the
    program): forward, dq and dk/dv kernels lower through Pallas' Triton lowering (ptxas is not run) or its Mosaic
    TPU lowering for a v5e (libtpu's compiler is not run)."""
    q = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    layout = jax.ShapeDtypeStruct((4, 8, 8), jnp.bool_)
    attend = lambda q, k, v, layout: block_sparse_attention(q, k, v, layout, block_size=128, causal=True,
                                                            backend=backend)
    f = jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    assert LOWERINGS[backend](f, q, kv, kv, layout) == 3
