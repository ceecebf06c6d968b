"""2D neighborhood attention (NAT / DiNAT): each pixel attends to its kernel x kernel neighbours."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attn import _common as c
from attn._block_layouts import attend_with_pattern
from attn._registry import register


def _pair(x, name: str) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} must be an int or a pair (height, width), got {x!r}")
        return c.positive_int(x[0], name), c.positive_int(x[1], name)
    x = c.positive_int(x, name)
    return x, x


def axis_window_starts(length: int, kernel: int, dilation: int) -> np.ndarray:
    """[length] first lattice index of each position's window along one axis (see ``axis_neighbours``):
    ``start(x) = min(max(x // d - kernel // 2, 0), lattice_len(x % d) - kernel)``."""
    x = np.arange(length)
    lattice_len = -(-(length - x % dilation) // dilation)
    return np.minimum(np.maximum(x // dilation - kernel // 2, 0), lattice_len - kernel)


def axis_neighbours(length: int, kernel: int, dilation: int) -> np.ndarray:
    """[length, kernel] indices of the neighbours of each position along one axis, NAT style.

    Position x lives on the dilation lattice {x % dilation + m * dilation}; on that lattice its window of
    ``kernel`` points is centred on it and shifted (clamped) inside the lattice at the borders, so every
    position has exactly ``kernel`` neighbours.
    """
    x = np.arange(length)
    start = axis_window_starts(length, kernel, dilation)
    return (x % dilation + dilation * start)[:, None] + dilation * np.arange(kernel)[None, :]


def neighborhood_pattern(spatial, kernel_size, dilation) -> np.ndarray:
    """[seq, seq] boolean: row-major pixel p sees pixel p' when p' is in p's window along both axes."""
    (hgt, wid), (kh, kw), (dh, dw) = spatial, kernel_size, dilation
    rows = np.zeros((hgt, hgt), bool)
    rows[np.arange(hgt)[:, None], axis_neighbours(hgt, kh, dh)] = True
    cols = np.zeros((wid, wid), bool)
    cols[np.arange(wid)[:, None], axis_neighbours(wid, kw, dw)] = True
    return np.kron(rows, cols).astype(bool)  # index (y * W + x, y' * W + x')


def neighborhood_windows(spatial, kernel_size, dilation):
    """The block-sparse kernel's ``window2d`` arrays, O(n) (the rule of ``neighborhood_pattern``):
    q_window int32 [seq, 4] = (y % dh, start_y, x % dw, start_x) of each pixel, k_pos int32 [seq, 2] = (y, x)."""
    (hgt, wid), (kh, kw), (dh, dw) = spatial, kernel_size, dilation
    y, x = np.divmod(np.arange(hgt * wid), wid)
    start_y, start_x = axis_window_starts(hgt, kh, dh), axis_window_starts(wid, kw, dw)
    q_window = np.stack([y % dh, start_y[y], x % dw, start_x[x]], axis=1).astype(np.int32)
    return q_window, np.stack([y, x], axis=1).astype(np.int32)


def neighborhood_block_layout(spatial, kernel_size, dilation, block: int) -> np.ndarray:
    """[seq // block, seq // block] boolean: blocks of ``block`` pixels (row-major) holding a visible pair,
    i.e. the block-any of ``neighborhood_pattern``, built from each pixel's kh * kw neighbours in
    O(n * kh * kw) rather than from the [n, n] pattern."""
    (hgt, wid), (kh, kw), (dh, dw) = spatial, kernel_size, dilation
    rows, cols = axis_neighbours(hgt, kh, dh), axis_neighbours(wid, kw, dw)
    # neighbours[y, x, a, b] = rows[y, a] * W + cols[x, b]: pixel (y, x)'s keys.
    neighbours = rows[:, None, :, None] * wid + cols[None, :, None, :]
    blocks = hgt * wid // block
    layout = np.zeros((blocks, blocks), bool)
    query_block = np.arange(hgt * wid).reshape(hgt, wid, 1, 1) // block
    layout[np.broadcast_to(query_block, neighbours.shape), neighbours // block] = True
    return layout


def check_neighborhood(seq: int, spatial, kernel_size, dilation):
    """Validates and normalises (spatial, kernel_size, dilation) to int pairs; raises ValueError naming them."""
    if not (isinstance(spatial, (tuple, list)) and len(spatial) == 2):
        raise ValueError(f"spatial must be a pair (height, width), got {spatial!r}")
    spatial = (c.positive_int(spatial[0], "spatial"), c.positive_int(spatial[1], "spatial"))
    if spatial[0] * spatial[1] != seq:
        raise ValueError(f"spatial {spatial} must satisfy height * width == seq ({seq})")
    kernel_size, dilation = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
    for side, kern, dil, axis in zip(spatial, kernel_size, dilation, ("height", "width")):
        if kern % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if kern * dil > side:
            raise ValueError(
                f"kernel_size * dilation must be <= the {axis} ({side}), got kernel_size {kern} and dilation {dil}"
            )
    return spatial, kernel_size, dilation


def _example_params(key, q_shape, kv_shape, v_head_dim, causal):
    height, width = 4, q_shape[1] // 4
    # The widest odd kernel up to 3 that fits each side (seq 8 is a 4 x 2 image: kernel 3 x 1).
    kernel = tuple(min(3, s if s % 2 else s - 1) for s in (height, width))
    return {"spatial": (height, width), "kernel_size": kernel, "dilation": 1}


@register(
    "neighborhood_2d",
    family="local",
    complexity="O(n k^2 d)",
    paper=(
        "Neighborhood Attention Transformer; Dilated Neighborhood Attention Transformer; "
        "Faster Neighborhood Attention"
    ),
    causal=(False,),
    mask=True,
    segment_ids=False,
    cross=False,
    gqa=True,
    implementations=("xla", "pallas"),
    example_params=_example_params,
    seq_multiple=4,
    exact=True,
)
def neighborhood_2d_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask=None,
    spatial=None,
    kernel_size=7,
    dilation=1,
    implementation: str | None = None,
):
    """Softmax attention of each pixel over its ``kernel_size`` x ``kernel_size`` neighbourhood.

    Tokens are a row-major ``spatial = (height, width)`` grid. Along each axis the neighbours of x are
    ``kernel_size`` points of x's dilation lattice ``{x % dilation + m * dilation}``, centred on x and shifted
    inside the image at the borders (so every query sees exactly kernel_size^2 keys, as in NAT / DiNAT rather
    than zero padding). ``kernel_size`` and ``dilation`` may be ints or (height, width) pairs; kernel sizes odd
    and ``kernel_size * dilation <= side``. The "xla" form is the reference (dense [n, n] mask); "pallas"
    is the block-sparse kernel with the windows as its ``window2d`` fine mask (``neighborhood_pallas``), exact.

    Paper: "Neighborhood Attention Transformer"; "Dilated Neighborhood Attention Transformer"; "Faster
    Neighborhood Attention".
    """
    c.check_qkv(q, k, v, cross=False)
    implementation = c.check_implementation(implementation, ("xla", "pallas"), "neighborhood_2d")
    c.check_causal(causal, (False,), "neighborhood_2d")
    if implementation == "pallas":
        if mask is not None:
            raise ValueError("mask is not supported by implementation='pallas' for neighborhood_2d")
        return neighborhood_pallas(q, k, v, spatial=spatial, kernel_size=kernel_size, dilation=dilation,
                                   scale=scale)
    if spatial is None:
        raise ValueError("spatial=(height, width) is required for neighborhood_2d")
    spatial, kernel_size, dilation = check_neighborhood(q.shape[1], spatial, kernel_size, dilation)
    pattern = jnp.asarray(neighborhood_pattern(spatial, kernel_size, dilation))
    return attend_with_pattern(q, k, v, pattern, scale=scale, mask=mask)


def _default_block(seq: int, spatial, interpret) -> int:
    """The largest power of two <= 64 dividing ``seq``; compiled kernels need >= 16 (GPU tiles are powers of
    two >= 16, TPU tiles multiples of 8), the interpreters take any."""
    block = 64
    while seq % block:
        block //= 2
    if block < 16 and not interpret:
        raise ValueError(f"spatial {tuple(spatial)}: seq = {seq} has no power-of-two divisor in [16, 64] to use "
                         f"as the block-sparse kernel's block; pass block_size, pick a size whose height * width "
                         f"is a multiple of 16, or use implementation='xla'")
    return block


def neighborhood_pallas(q, k, v, *, spatial, kernel_size=7, dilation=1, scale=None, block_size=None, tiles=None,
                        backend=None, interpret=None):
    """2D neighbourhood attention through the block-sparse Pallas kernel (``implementation="pallas"``), exact.

    The kernel's layout keeps the (query block, key block) pairs of row-major pixels holding a neighbour pair
    (``neighborhood_block_layout``, a numpy constant); inside a kept block the ``window2d`` fine mask applies
    the NAT / DiNAT rule per element from O(n) arrays (``neighborhood_windows``): on both axes, key y' sits
    on the query's dilation lattice (y' % d == y % d) inside its clamped window (start <= y' // d < start + k).
    ``block_size``: None picks the largest power of two <= 64 dividing the sequence (ValueError naming
    ``spatial`` when it is below 16 and the kernel is compiled). ``tiles`` / ``backend`` / ``interpret``: as
    in ``kernels_pallas.block_sparse.block_sparse_attention`` (interpret None: on when the default device is
    the CPU).

    Paper: "Neighborhood Attention Transformer"; "Dilated Neighborhood Attention Transformer".
    """
    from kernels_pallas.block_sparse import block_sparse_attention  # late: the kernels import attn

    c.check_qkv(q, k, v, cross=False)
    if spatial is None:
        raise ValueError("spatial=(height, width) is required for neighborhood_2d")
    seq = q.shape[1]
    spatial, kernel_size, dilation = check_neighborhood(seq, spatial, kernel_size, dilation)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if block_size is None:
        block_size = _default_block(seq, spatial, interpret)
    block_size = c.positive_int(block_size, "block_size")
    c.divides(block_size, seq, "block_size", f"seq = height * width of spatial {spatial}")
    layout = neighborhood_block_layout(spatial, kernel_size, dilation, block_size)
    q_window, k_pos = neighborhood_windows(spatial, kernel_size, dilation)
    window = (*kernel_size, *dilation)
    return block_sparse_attention(q, k, v, layout, block_size=block_size, scale=scale,
                                  window2d=(q_window, k_pos, window), tiles=tiles, backend=backend,
                                  interpret=interpret)
