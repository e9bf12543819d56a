"""The ``winograd`` kernel family: Winograd convolution for 3x3, stride-1, undilated filters.

An ``m x m`` output tile is computed from an ``(m+2) x (m+2)`` input tile: the input tiles and
the filters are transformed (``V = B^T d B``, ``U = G g G^T``), one GEMM per tile element ``e``,
``M[e] = U[e] @ V[e]`` (``(K, C) @ (C, tiles)``), does the channel sums, and ``Y = A^T M A``
gives the outputs.

- Banded passes (the default, as in :mod:`numbaconv.kernels.im2col`: one parallel region, lanes
  of (image group, band of tile rows) jobs, single-threaded GEMMs called inside the region):
  F(4x4, 3x3), 36 GEMMs per band, 4x fewer multiplies than the direct sum. Its transforms hold
  1/6 and 1/24 (filters) and 4, 5, 8 (input, output), so it rounds about 10x more than
  F(2x2, 3x3): in float32 about 1e-6 of the ``|x|.|w|`` scale with 64 channels, still below the
  bound of a direct float32 sum. grad-x is the forward pass on ``grad_y`` with the flipped
  filters; grad-w is the transposed algorithm F(3x3, 4x4) (same matrices), summed per lane in
  the Winograd domain.
- Transforms: each pass down the columns is a loop along the row that LLVM vectorises; each
  pass along the row reads every tile's elements 4 apart, which LLVM left scalar, so it runs a
  vector's worth of tiles at a time through an intrinsic (:func:`bt6_tiles`, :func:`a6_tiles`:
  whole-vector loads deinterleaved by shuffles, the arithmetic of :func:`_bt6_ops` on vectors,
  so the same bits as the scalar code). U-Net's 1x32x256x256 layer (float32, 2 threads, AMD
  EPYC Zen 5, ms, medians of 7 alternating rounds): forward 3.77 -> 2.03, backward 10.3 ->
  6.7; with the output transform's change, ResNet's 16x64x56x56 forward 7.9 -> 6.9, CIFAR's
  7.2 -> 6.5; float64 U-Net 5.5 -> 4.7 / 12.0 -> 9.0, ResNet 16.0 -> 11.6 / 29.5 -> 24.9.
- Batch-chunked passes (the fallback where BLAS cannot be held to one thread): F(2x2, 3x3),
  16 NumPy GEMMs per chunk; grad-w from the ``im2col`` family.

Dilated 3x3 stride-1 layers run as undilated ones on polyphase sub-images
(:mod:`numbaconv.kernels.polyphase`) where every phase has at least :data:`MIN_PHASE_OUTPUTS`
outputs a side. Geometries Winograd does not cover (other filter sizes, strides, groups, padding
above 2, small phases) run the ``im2col`` kernel, and so do inputs holding NaN or Inf: Winograd
mixes the pixels of a tile, and would spread them to outputs that never read them. Any NaN or Inf
input makes some Winograd result non-finite, so the banded passes look at their results (the
forward kernel flags them as it writes them; grad-w and grad-b are small) and recompute with
``im2col`` when needed; the chunked passes check the inputs first.

Workspace: per lane, a band's transformed input and GEMM results (grad-w: plus the lane's sums)
under :data:`WORKSPACE_BYTES` (or one tile row's, if that is more), plus the transformed filters
(36*K*C values); chunked, one chunk's under the same bound. Neither grows with the batch.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .._threading import blas_inside_kernels, single_threaded_blas
from .._workspace import take
from ..geometry import ConvGeometry
from . import im2col, polyphase
from ._blas import gemm_nt_add
from .microkernel import (
    VECTOR_BITS,
    _as_i64,
    _data_pointer,
    _float_ir,
    gemm_nn,
    own_gemm_size_pays,
)

#: Upper bound, in bytes, for the per-chunk workspace (padded and transformed input + GEMM
#: results); as in :mod:`numbaconv.kernels.im2col`, large enough to keep the fork/joins (3 Numba
#: passes and 16 GEMMs per chunk) few.
WORKSPACE_BYTES = 32 * 2**20

#: Target size of one band's transformed input in the fused pass (as
#: :data:`numbaconv.kernels.im2col.BAND_BYTES`): cache-sized, yet enough tiles for each GEMM.
BAND_BYTES = 2**20


def supports(geom: ConvGeometry) -> bool:
    """Whether Winograd F(2x2, 3x3) covers this forward geometry."""
    return (
        geom.filter_height == geom.filter_width == 3
        and geom.stride_h == geom.stride_w == 1
        and geom.dilation_h == geom.dilation_w == 1
        and geom.groups == 1
        and max(geom.pad_top, geom.pad_bottom, geom.pad_left, geom.pad_right) <= 2
    )


#: F(2x2, 3x3)'s filter transform matrix G (4 x 3).
G2 = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


@njit(parallel=True, cache=True)
def filter_transform_kernel(w, g, u):
    """``u[i*m + j, k, c] = (g w[k, c] g^T)[i, j]`` for the ``m x 3`` matrix ``g``, in float64:
    ``g w`` first, then ``(g w) g^T``, each sum in index order; one job per filter ``k``, the
    inner loops along the channels (vectors).

    NumPy's ``einsum`` took 113 ms for 512 x 512 filters (27 ms for 256 x 256), more than the
    whole convolution it prepares. Each value is computed on its own, so the bits do not depend
    on the thread count.
    """
    n_filters, n_chan = w.shape[0], w.shape[1]
    m = g.shape[0]
    for k in prange(n_filters):
        taps = np.empty((3, 3, n_chan))  # w[k] with the channels innermost, in float64
        for c in range(n_chan):
            for r in range(3):
                for s in range(3):
                    taps[r, s, c] = w[k, c, r, s]
        gw = np.empty((3, n_chan))  # row i of g w, for each channel
        for i in range(m):
            g0, g1, g2 = g[i, 0], g[i, 1], g[i, 2]
            for s in range(3):
                for c in range(n_chan):
                    gw[s, c] = g0 * taps[0, s, c] + g1 * taps[1, s, c] + g2 * taps[2, s, c]
            for j in range(m):
                h0, h1, h2 = g[j, 0], g[j, 1], g[j, 2]
                out = u[i * m + j, k]
                for c in range(n_chan):
                    out[c] = gw[0, c] * h0 + gw[1, c] * h1 + gw[2, c] * h2


@njit(parallel=True, cache=True)
def filter_gradient_kernel(sums, g, grad_w):
    """The adjoint of :func:`filter_transform_kernel`: ``grad_w[k, c] = g^T M g`` with
    ``M[i, j] = sums[i*m + j, k, c]``, in float64 (``g^T M`` first, each sum in index order),
    stored in ``grad_w``'s dtype; one job per filter ``k``, vectors along the channels."""
    n_filters, n_chan = grad_w.shape[0], grad_w.shape[1]
    m = g.shape[0]
    for k in prange(n_filters):
        gtm = np.zeros((3, m, n_chan))  # (g^T M)[r, j] for each channel
        for r in range(3):
            for j in range(m):
                row = gtm[r, j]
                for i in range(m):
                    coefficient = g[i, r]
                    plane = sums[i * m + j, k]
                    for c in range(n_chan):
                        row[c] += coefficient * plane[c]
        result = np.zeros((3, 3, n_chan))
        for r in range(3):
            for s in range(3):
                row = result[r, s]
                for j in range(m):
                    coefficient = g[j, s]
                    products = gtm[r, j]
                    for c in range(n_chan):
                        row[c] += products[c] * coefficient
        for c in range(n_chan):
            for r in range(3):
                for s in range(3):
                    grad_w[k, c, r, s] = result[r, s, c]


def _filter_transform(w: np.ndarray, g: np.ndarray, workspace: str | None = None) -> np.ndarray:
    """``U[e, k, c]`` with ``U = G g G^T`` per (k, c), e = m*i + j, for the ``m x 3`` matrix
    ``g`` (computed in float64): a new array, or with ``workspace`` the scratch buffer of that
    name (:func:`~numbaconv._workspace.take`), valid until its next use.

    The passes take the workspace: 36 x 512 x 512 float32 values are 37.7 MB, whose fresh pages
    the system faulted in and zeroed on every call. The F(4x4, 3x3) transform of 512 x 512 filters,
    float32, 2 threads, AMD EPYC Zen 4, medians of 7 calls: 12.5 ms into a new array, 4.1 into
    one used before (256 x 256: 0.59 and 0.41 ms)."""
    shape = (g.shape[0] ** 2, w.shape[0], w.shape[1])
    u = np.empty(shape, dtype=w.dtype) if workspace is None else take(workspace, shape, w.dtype)
    filter_transform_kernel(np.ascontiguousarray(w), g, u)
    return u


@njit(parallel=True, cache=True)
def pad_kernel(x, padded, pad_t, pad_l):
    """Copy ``x`` into ``padded`` at offset (pad_t, pad_l), zeros around; one job per (n, c).

    The input transform then reads whole rows of tiles with no bounds checks.
    """
    n_batch, n_chan, height, width = x.shape
    padded_h, padded_w = padded.shape[2], padded.shape[3]
    for job in prange(n_batch * n_chan):
        n = job // n_chan
        c = job - n * n_chan
        for i in range(padded_h):
            ih = i - pad_t
            if ih < 0 or ih >= height:
                for j in range(padded_w):
                    padded[n, c, i, j] = 0
                continue
            for j in range(pad_l):
                padded[n, c, i, j] = 0
            for j in range(width):
                padded[n, c, i, pad_l + j] = x[n, c, ih, j]
            for j in range(pad_l + width, padded_w):
                padded[n, c, i, j] = 0


@njit(parallel=True, cache=True)
def input_transform_kernel(padded, v, tiles_h, tiles_w, scratch):
    """``v[e, c, t] = (B^T d B)[e]`` for the 4x4 input tile ``d`` of tile ``t``.

    ``padded`` is the zero-padded input (N, C, >= 2*tiles_h + 2, >= 2*tiles_w + 2) from
    :func:`pad_kernel`; tile ``t = (n*tiles_h + th)*tiles_w + tw`` starts at row ``2*th`` and
    column ``2*tw``. ``v`` is (16, C, N*tiles_h*tiles_w), overwritten; one job per (c, n), each
    with its own ``scratch[job]`` (C*N, 4, padded width).

    Per row of tiles, ``B^T d`` is first computed for the whole width (unit stride, vectorised),
    then ``(B^T d) B`` tile by tile: 7-9x faster than transforming each tile from scratch.
    """
    n_batch, n_chan, _, width = padded.shape
    tiles = tiles_h * tiles_w
    for job in prange(n_chan * n_batch):
        c = job // n_batch
        n = job - c * n_batch
        for th in range(tiles_h):
            r = 2 * th
            for q in range(width):
                d0 = padded[n, c, r, q]
                d1 = padded[n, c, r + 1, q]
                d2 = padded[n, c, r + 2, q]
                d3 = padded[n, c, r + 3, q]
                scratch[job, 0, q] = d0 - d2
                scratch[job, 1, q] = d1 + d2
                scratch[job, 2, q] = d2 - d1
                scratch[job, 3, q] = d1 - d3
            first = n * tiles + th * tiles_w
            for i in range(4):
                for tw in range(tiles_w):
                    a = scratch[job, i, 2 * tw]
                    b = scratch[job, i, 2 * tw + 1]
                    e = scratch[job, i, 2 * tw + 2]
                    f = scratch[job, i, 2 * tw + 3]
                    v[4 * i, c, first + tw] = a - e
                    v[4 * i + 1, c, first + tw] = b + e
                    v[4 * i + 2, c, first + tw] = e - b
                    v[4 * i + 3, c, first + tw] = b - f


@njit(parallel=True, cache=True)
def output_transform_kernel(m, bias, has_bias, y, tiles_h, tiles_w):
    """``y[n, k]`` tiles = ``A^T M A`` (+ bias), cropped to the output size; one job per (n, k)."""
    n_batch, n_filters, out_h, out_w = y.shape
    tiles = tiles_h * tiles_w
    for job in prange(n_batch * n_filters):
        n = job // n_filters
        k = job - n * n_filters
        start = bias[k] if has_bias else 0
        for th in range(tiles_h):
            for tw in range(tiles_w):
                t = n * tiles + th * tiles_w + tw
                # A^T M: rows (m0 + m1 + m2, m1 - m2 - m3), per column j.
                r00 = m[0, k, t] + m[4, k, t] + m[8, k, t]
                r01 = m[1, k, t] + m[5, k, t] + m[9, k, t]
                r02 = m[2, k, t] + m[6, k, t] + m[10, k, t]
                r03 = m[3, k, t] + m[7, k, t] + m[11, k, t]
                r10 = m[4, k, t] - m[8, k, t] - m[12, k, t]
                r11 = m[5, k, t] - m[9, k, t] - m[13, k, t]
                r12 = m[6, k, t] - m[10, k, t] - m[14, k, t]
                r13 = m[7, k, t] - m[11, k, t] - m[15, k, t]
                oh = 2 * th
                ow = 2 * tw
                y[n, k, oh, ow] = start + (r00 + r01 + r02)
                if ow + 1 < out_w:
                    y[n, k, oh, ow + 1] = start + (r01 - r02 - r03)
                if oh + 1 < out_h:
                    y[n, k, oh + 1, ow] = start + (r10 + r11 + r12)
                    if ow + 1 < out_w:
                        y[n, k, oh + 1, ow + 1] = start + (r11 - r12 - r13)


def _winograd_conv(x, w, bias, geom: ConvGeometry) -> np.ndarray | None:
    """The Winograd forward pass for a supported geometry, or None if an input holds NaN or Inf
    (then the caller runs the plain way). F(4x4, 3x3) in one parallel region where BLAS can be
    called inside kernels (non-finite values are found in its outputs), else F(2x2, 3x3) in
    batch chunks (they are looked for in the inputs first)."""
    if blas_inside_kernels():
        y, finite = _fused_winograd_conv(x, w, bias, geom)
        return y if finite else None
    if not _all_finite(x, w) or (bias is not None and not _all_finite(bias)):
        return None
    u = _filter_transform(w, G2, "winograd.chunk_filters")
    n, k, oh, ow = geom.output_shape
    c = geom.in_channels
    tiles_h, tiles_w = (oh + 1) // 2, (ow + 1) // 2
    tiles = tiles_h * tiles_w
    padded_h, padded_w = 2 * tiles_h + 2, 2 * tiles_w + 2
    per_image = (16 * (c + k) * tiles + c * (padded_h + 4) * padded_w) * x.itemsize
    chunk = int(max(1, min(n, WORKSPACE_BYTES // per_image)))
    padded = take("winograd.chunk_padded", (chunk, c, padded_h, padded_w), x.dtype)
    scratch = take("winograd.chunk_rows", (chunk * c, 4, padded_w), x.dtype)
    v = take("winograd.chunk_input", (16, c, chunk * tiles), x.dtype)
    m = take("winograd.chunk_gemm", (16, k, chunk * tiles), x.dtype)
    y = np.empty((n, k, oh, ow), dtype=x.dtype)
    has_bias = bias is not None
    bias = bias if has_bias else np.zeros(1, dtype=x.dtype)
    for first in range(0, n, chunk):
        count = min(chunk, n - first)
        columns = count * tiles
        v_chunk, m_chunk = v[:, :, :columns], m[:, :, :columns]
        pad_kernel(x[first : first + count], padded[:count], geom.pad_top, geom.pad_left)
        input_transform_kernel(padded[:count], v_chunk, tiles_h, tiles_w, scratch)
        for e in range(16):
            np.matmul(u[e], v_chunk[e], out=m_chunk[e])
        output_transform_kernel(m_chunk, bias, has_bias, y[first : first + count], tiles_h, tiles_w)
    return y


# F(4x4, 3x3) for the banded passes (Lavin & Gray, points 0, +-1, +-2, infinity): a 6x6 input
# tile gives a 4x4 output tile with 36 multiplies per channel pair instead of 144. Its rounding
# error is about 10x that of F(2x2, 3x3) but, at ~1e-6 of the |x|.|w| scale in float32
# (measured over random 64-channel tiles), still below the bound of a direct float32 sum.
G4 = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ]
)


# The transforms multiply only by 2, 4 and 8, written as additions: an integer literal would
# promote float32 arithmetic to float64 in Numba (slower, and a different rounding).
@njit(cache=True, inline="always")
def _x2(a):
    return a + a


@njit(cache=True, inline="always")
def _x4(a):
    b = a + a
    return b + b


def _bt6_ops(d0, d1, d2, d3, d4, d5):
    """``B^T d`` for F(4x4, 3x3): rows (4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1).

    Plain Python with ``+`` and ``-`` only (``4a`` as ``(a + a) + (a + a)``, as :func:`_x4`), so
    that the one definition gives both the scalar code (:func:`_bt6`) and the vector IR of
    :func:`bt6_tiles` (on :class:`_Vector` values): the same operations, so the same bits."""
    p = d0 - d2
    q = d1 + d2
    r = d1 - d2
    s = d1 - d3
    t = d3 - d1
    return (
        ((p + p) + (p + p)) + (d4 - d2),
        (d3 + d4) - ((q + q) + (q + q)),
        ((r + r) + (r + r)) + (d4 - d3),
        (t + t) + (d4 - d2),
        (s + s) + (d4 - d2),
        ((s + s) + (s + s)) + (d5 - d3),
    )


_bt6 = njit(cache=True, inline="always")(_bt6_ops)


# ``A^T m`` for F(4x4, 3x3), one row each: (1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0),
# (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1). One function per row, so that each output row is its
# own loop: a loop storing one row from at most five vectorises (see output_transform_band).
@njit(cache=True, inline="always")
def _at_0(m0, m1, m2, m3, m4):
    return m0 + m1 + m2 + m3 + m4


@njit(cache=True, inline="always")
def _at_1(m1, m2, m3, m4):
    return (m1 - m2) + _x2(m3 - m4)


@njit(cache=True, inline="always")
def _at_2(m1, m2, m3, m4):
    return (m1 + m2) + _x4(m3 + m4)


@njit(cache=True, inline="always")
def _at_3(m1, m2, m3, m4, m5):
    return (m1 - m2) + _x4(_x2(m3 - m4)) + m5


def _a6_ops(g0, g1, g2, g3):
    """``A g`` (A = (A^T)^T, 6x4) for F(4x4, 3x3): the grad_y tile transform of grad-w. Plain
    Python with ``+`` and ``-`` only, as :func:`_bt6_ops` (``2a`` as ``a + a``)."""
    h = g3 + g3
    p = g2 + h
    q = g1 + (p + p)
    r = g2 - h
    s = g1 - (r + r)
    return (
        g0,
        g0 + g1 + g2 + g3,
        g0 - g1 + g2 - g3,
        g0 + (q + q),
        g0 - (s + s),
        g3,
    )


_a6 = njit(cache=True, inline="always")(_a6_ops)


class _Vector:
    """An LLVM vector value under ``+`` and ``-`` (``fadd``, ``fsub``): the transforms above,
    called on these, emit their vector IR."""

    __slots__ = ("builder", "value")

    def __init__(self, builder, value):
        self.builder = builder
        self.value = value

    def __add__(self, other):
        return _Vector(self.builder, self.builder.fadd(self.value, other.value))

    def __sub__(self, other):
        return _Vector(self.builder, self.builder.fsub(self.value, other.value))


#: Elements of a vector register (float32; float64 holds half as many): the tiles that
#: :func:`bt6_tiles` and :func:`a6_tiles` transform per call. From the target's vector width,
#: so from Numba's cache key (see :mod:`numbaconv.kernels.microkernel` on intrinsics' IR).
VECTOR_FLOATS = VECTOR_BITS // 32

#: Elements past ``4 * tiles_w`` that a row of the transforms' scratch holds: the reach of the
#: vector loads of a row's last group of tiles, ragged or not (it starts at most at column
#: ``4 * (tiles_w - 1)`` and :func:`bt6_tiles` loads ``5 * lanes`` from there). Never read into
#: a stored result.
ROW_SLACK = 5 * VECTOR_FLOATS


def _tile_transform_codegen(transform, taps, partial):
    """The codegen of an intrinsic ``(src, src_off, dst, dst_off, dst_row[, count])`` that
    transforms ``lanes`` tiles (a vector's worth) of one row: tile ``t`` reads the ``taps``
    elements ``src[src_off + 4*t + k]``, and output ``j`` of ``transform`` goes to
    ``dst[dst_off + j*dst_row + t]``; with ``partial``, only tiles ``t < count`` are stored (a
    row with fewer tiles than a vector, element by element). The loads
    are whole vectors (enough to cover ``4*(lanes - 1) + taps`` elements), deinterleaved by
    shuffles: as scalar code, the stride-4 reads and six output rows kept LLVM from vectorising
    the loop."""

    def codegen(context, builder, signature, args):
        tys = signature.args
        src_, dst_ = args[0], args[2]
        src_off_, dst_off_, dst_row_, *count_ = _as_i64(
            context, builder, args[1:2] + args[3:], tys[1:2] + tys[3:]
        )
        elem, _, itemsize = _float_ir(tys[0].dtype)
        lanes = VECTOR_BITS // (8 * itemsize)
        vec_ptr = ir.VectorType(elem, lanes).as_pointer()
        i32, i64 = ir.IntType(32), ir.IntType(64)
        ps = builder.gep(_data_pointer(context, builder, tys[0], src_), [src_off_])
        loads = -(-(4 * (lanes - 1) + taps) // lanes)
        chunks = [
            builder.load(
                builder.bitcast(builder.gep(ps, [ir.Constant(i64, lanes * j)]), vec_ptr),
                align=itemsize,
            )
            for j in range(loads)
        ]
        # Concatenated pairwise into one vector of a power of two of them (the last repeated:
        # its lanes past the loads are never selected), then one shuffle per tap.
        while len(chunks) & (len(chunks) - 1):
            chunks.append(chunks[-1])
        while len(chunks) > 1:
            width = 2 * chunks[0].type.count
            mask = ir.Constant(ir.VectorType(i32, width), list(range(width)))
            chunks = [
                builder.shuffle_vector(chunks[j], chunks[j + 1], mask)
                for j in range(0, len(chunks), 2)
            ]
        row = chunks[0]
        taps_ = []
        for k in range(taps):
            mask = ir.Constant(ir.VectorType(i32, lanes), [4 * t + k for t in range(lanes)])
            taps_.append(_Vector(builder, builder.shuffle_vector(row, row, mask)))
        pd = builder.gep(_data_pointer(context, builder, tys[2], dst_), [dst_off_])
        outputs = [out.value for out in transform(*taps_)]
        rows = [builder.gep(pd, [builder.mul(dst_row_, ir.Constant(i64, j))]) for j in range(6)]
        if not partial:
            for at, out in zip(rows, outputs, strict=True):
                builder.store(out, builder.bitcast(at, vec_ptr), align=itemsize)
            return context.get_dummy_value()
        # Tiles t < count, one element of each output at a time.
        entry = builder.block
        loop = builder.append_basic_block("tiles.store")
        done = builder.append_basic_block("tiles.done")
        builder.cbranch(builder.icmp_signed(">", count_[0], ir.Constant(i64, 0)), loop, done)
        builder.position_at_end(loop)
        t = builder.phi(i64)
        t.add_incoming(ir.Constant(i64, 0), entry)
        for at, out in zip(rows, outputs, strict=True):
            builder.store(builder.extract_element(out, t), builder.gep(at, [t]), align=itemsize)
        t_next = builder.add(t, ir.Constant(i64, 1))
        t.add_incoming(t_next, builder.block)
        builder.cbranch(builder.icmp_signed("<", t_next, count_[0]), loop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return codegen


def _tile_transforms(transform, taps, name):
    """The two intrinsics of ``transform`` (see :func:`_tile_transform_codegen`): on a whole
    vector's worth of tiles, and on its first ``count`` (< lanes) tiles."""

    def whole(typingctx, src, src_off, dst, dst_off, dst_row):
        if src.dtype != dst.dtype:
            return None
        sig = types.void(src, src_off, dst, dst_off, dst_row)
        return sig, _tile_transform_codegen(transform, taps, False)

    def partial(typingctx, src, src_off, dst, dst_off, dst_row, count):
        if src.dtype != dst.dtype:
            return None
        sig = types.void(src, src_off, dst, dst_off, dst_row, count)
        return sig, _tile_transform_codegen(transform, taps, True)

    whole.__name__, partial.__name__ = name, f"{name}_partial"
    return intrinsic(whole), intrinsic(partial)


#: ``bt6_tiles(src, src_off, dst, dst_off, dst_row)``: :func:`_bt6_ops` on a vector's worth of
#: tiles of one row, ``dst[dst_off + j*dst_row + t] = _bt6(src[src_off + 4*t + k], k < 6)[j]``;
#: ``bt6_tiles_partial(..., count)`` stores tiles ``t < count`` only. No bounds checks: they read
#: ``src[src_off : src_off + 5*lanes]`` (the caller's rows leave :data:`ROW_SLACK`).
bt6_tiles, bt6_tiles_partial = _tile_transforms(_bt6_ops, 6, "bt6_tiles")
#: ``a6_tiles`` and ``a6_tiles_partial``: :func:`_a6_ops` on 4-wide tiles, likewise (reading
#: ``src[src_off : src_off + 4*lanes]``).
a6_tiles, a6_tiles_partial = _tile_transforms(_a6_ops, 4, "a6_tiles")


@njit(cache=True, inline="always")
def _transform_row(rows, r, v, e0, first, tiles_w, lanes, taps):
    """Tile ``t < tiles_w`` of ``rows[r]`` (its ``taps`` elements from column ``4*t``) through
    :func:`_bt6_ops` (``taps`` 6) or :func:`_a6_ops` (4), output ``j`` to ``v[e0 + j, first +
    t]`` (both arrays C-contiguous). Whole vectors of tiles; a ragged end as one more vector over
    the last ``lanes`` tiles (some computed twice, the same values); a row narrower than a
    vector as a partial vector where it fills more than half of one, else tile by tile (on
    ResNet's 14x14 maps, 4 tiles a row, the partial vector lost 4 % of the forward pass)."""
    src, plane = r * rows.shape[1], v.shape[1]
    dst = e0 * plane + first
    full = tiles_w - tiles_w % lanes
    if full > 0 or 2 * tiles_w > lanes:
        for tw in range(0, full, lanes):
            if taps == 6:
                bt6_tiles(rows, src + 4 * tw, v, dst + tw, plane)
            else:
                a6_tiles(rows, src + 4 * tw, v, dst + tw, plane)
        if full == tiles_w:
            return
        if full > 0:
            last = tiles_w - lanes
            if taps == 6:
                bt6_tiles(rows, src + 4 * last, v, dst + last, plane)
            else:
                a6_tiles(rows, src + 4 * last, v, dst + last, plane)
        elif taps == 6:
            bt6_tiles_partial(rows, src, v, dst, plane, tiles_w)
        else:
            a6_tiles_partial(rows, src, v, dst, plane, tiles_w)
        return
    for tw in range(tiles_w):
        q = 4 * tw
        if taps == 6:
            t0, t1, t2, t3, t4, t5 = _bt6(
                rows[r, q], rows[r, q + 1], rows[r, q + 2], rows[r, q + 3], rows[r, q + 4],
                rows[r, q + 5],
            )  # fmt: skip
        else:
            t0, t1, t2, t3, t4, t5 = _a6(rows[r, q], rows[r, q + 1], rows[r, q + 2], rows[r, q + 3])
        v[e0, first + tw] = t0
        v[e0 + 1, first + tw] = t1
        v[e0 + 2, first + tw] = t2
        v[e0 + 3, first + tw] = t3
        v[e0 + 4, first + tw] = t4
        v[e0 + 5, first + tw] = t5


@njit(cache=True)
def input_transform_band(x, n, th0, th1, v, first_tile, count, rows, tiles_w, pad_t, pad_l):
    """``v[e, c*count + first_tile + t] = (B^T d B)[e]`` for the 6x6 tiles of tile rows
    ``th0:th1`` of image ``n`` (``t`` counted from the band's first tile; tile ``(th, tw)`` starts
    at padded row ``4*th`` and column ``4*tw``), from zero-padded copies of the six input rows a
    tile row reads. ``rows`` is (12, >= 4*tiles_w + ROW_SLACK) C-contiguous scratch; ``v`` is (36,
    plane), C-contiguous, with plane >= C*count, so each ``v[e, :C*count]`` is one GEMM operand
    of ``count`` tiles.
    """
    n_chan, height, width = x.shape[1], x.shape[2], x.shape[3]
    padded_w = 4 * tiles_w + 2
    lanes = VECTOR_FLOATS * 4 // x.itemsize
    for c in range(n_chan):
        for th in range(th0, th1):
            for i in range(6):
                ih = 4 * th + i - pad_t
                if ih < 0 or ih >= height:
                    for q in range(padded_w):
                        rows[i, q] = 0
                    continue
                for q in range(pad_l):
                    rows[i, q] = 0
                for q in range(width):
                    rows[i, pad_l + q] = x[n, c, ih, q]
                for q in range(pad_l + width, padded_w):
                    rows[i, q] = 0
            for q in range(padded_w):  # B^T d down the columns, vectorised along the row
                t0, t1, t2, t3, t4, t5 = _bt6(
                    rows[0, q], rows[1, q], rows[2, q], rows[3, q], rows[4, q], rows[5, q]
                )
                rows[6, q] = t0
                rows[7, q] = t1
                rows[8, q] = t2
                rows[9, q] = t3
                rows[10, q] = t4
                rows[11, q] = t5
            first = c * count + first_tile + (th - th0) * tiles_w
            for i in range(6):  # (B^T d) B along the rows
                _transform_row(rows, 6 + i, v, 6 * i, first, tiles_w, lanes, 6)


@njit(cache=True)
def output_transform_band(m, bias, y, rows, n, th0, th1, tiles_w, count, tile0, k0, k1):
    """``y[n, k]``'s 4x4 tiles of tile rows ``th0:th1`` = ``A^T M A`` + ``bias[k]``, cropped at
    the edges, for every filter ``k``, from the band's GEMM results ``m[e, k*count + tile0 + t]``;
    whether any value computed was NaN or Inf. ``rows`` is (40, >= per-image tiles) scratch.

    Each stage is one loop per output row, storing one row from at most six. Written as one loop
    per stage storing four rows from six, LLVM left it scalar (its runtime alias checks grow with
    the streams): same bits, and the whole forward pass (float32, 2 threads, AMD EPYC Zen 5,
    medians of 7 alternating rounds, ms) 4.59 -> 3.95 on U-Net's 1x32x256x256, 8.52 -> 7.77 on
    ResNet's 16x64x56x56, 7.09 -> 5.83 on CIFAR's 64x32x32x32, 9.52 -> 8.15 on 16x256x14x14,
    8.93 -> 7.62 on DeepLab's dilation 2; 1x128x28x28 0.63 -> 0.66 (0.58 -> 0.59 in a second
    run). float64 within 5 % both ways (CIFAR 10.5 -> 9.8, 16x256x14x14 13.9 -> 14.6).
    """
    out_h, out_w = y.shape[2], y.shape[3]
    per_image = (th1 - th0) * tiles_w
    full = out_w // 4  # tiles whose four columns are all inside the output
    bad = False
    for k in range(k0, k1):
        start = bias[k]
        base = k * count + tile0
        # A^T M down the columns: rows[6*a + j, t] = (A^T M)[a, j] of tile t ...
        for j in range(6):
            m0 = m[j, base : base + per_image]
            m1 = m[6 + j, base : base + per_image]
            m2 = m[12 + j, base : base + per_image]
            m3 = m[18 + j, base : base + per_image]
            m4 = m[24 + j, base : base + per_image]
            m5 = m[30 + j, base : base + per_image]
            out = rows[j]
            for t in range(per_image):
                out[t] = _at_0(m0[t], m1[t], m2[t], m3[t], m4[t])
            out = rows[6 + j]
            for t in range(per_image):
                out[t] = _at_1(m1[t], m2[t], m3[t], m4[t])
            out = rows[12 + j]
            for t in range(per_image):
                out[t] = _at_2(m1[t], m2[t], m3[t], m4[t])
            out = rows[18 + j]
            for t in range(per_image):
                out[t] = _at_3(m1[t], m2[t], m3[t], m4[t], m5[t])
        # ... then (A^T M) A along the rows, + bias: rows[24 + 4*a + b, t] = Y[a, b] of tile t ...
        for a in range(4):
            q0 = rows[6 * a, :per_image]
            q1 = rows[6 * a + 1, :per_image]
            q2 = rows[6 * a + 2, :per_image]
            q3 = rows[6 * a + 3, :per_image]
            q4 = rows[6 * a + 4, :per_image]
            q5 = rows[6 * a + 5, :per_image]
            out = rows[24 + 4 * a]
            for t in range(per_image):
                out[t] = _at_0(q0[t], q1[t], q2[t], q3[t], q4[t]) + start
            out = rows[25 + 4 * a]
            for t in range(per_image):
                out[t] = _at_1(q1[t], q2[t], q3[t], q4[t]) + start
            out = rows[26 + 4 * a]
            for t in range(per_image):
                out[t] = _at_2(q1[t], q2[t], q3[t], q4[t]) + start
            out = rows[27 + 4 * a]
            for t in range(per_image):
                out[t] = _at_3(q1[t], q2[t], q3[t], q4[t], q5[t]) + start
        for r in range(24, 40):
            out = rows[r, :per_image]
            for t in range(per_image):
                check = out[t] - out[t]  # 0 for a finite value, NaN for NaN and +-Inf
                bad |= check != check
        # ... and the 4x4 tiles into the output rows, cropped at the edges.
        for th in range(th0, th1):
            t0 = (th - th0) * tiles_w
            for a in range(4):
                oh = 4 * th + a
                if oh >= out_h:
                    break
                o = 24 + 4 * a
                dst = y[n, k, oh]
                p0 = rows[o, t0 : t0 + tiles_w]
                p1 = rows[o + 1, t0 : t0 + tiles_w]
                p2 = rows[o + 2, t0 : t0 + tiles_w]
                p3 = rows[o + 3, t0 : t0 + tiles_w]
                for tw in range(full):
                    dst[4 * tw] = p0[tw]
                    dst[4 * tw + 1] = p1[tw]
                    dst[4 * tw + 2] = p2[tw]
                    dst[4 * tw + 3] = p3[tw]
                for ow in range(4 * full, out_w):
                    dst[ow] = rows[o + ow - 4 * full, t0 + full]
    return bad


@njit(parallel=True, cache=True)
def fused_winograd_kernel(
    x, u, bias, y, nonfinite, v_ws, m_ws, row_ws, tiles_h, tiles_w, band_tiles, group,
    filter_block, pad_t, pad_l,
):  # fmt: skip
    """The whole Winograd F(4x4, 3x3) forward pass in one parallel region, one band of tile rows
    of ``group`` images at a time (``group`` > 1 only when a band is a whole image, so that
    small images still give the GEMMs enough tiles).

    Per band: the input transform of its tiles (:func:`input_transform_band`), the 36
    single-threaded GEMMs ``M[e] = U[e] @ V[e]`` and the output transform ``A^T M A`` (+ bias)
    into ``y``, cropped at the edges. The jobs (image group, band) are split into
    ``v_ws.shape[0]`` contiguous runs, one per lane with its own workspace; each output comes
    from the same arithmetic whatever the split. ``nonfinite[lane]`` is set when the lane wrote a
    NaN or Inf: a non-finite input, weight or bias always leads to one (Winograd then spreads it,
    and the caller recomputes the plain way), so the inputs need no separate check.
    """
    n_batch, n_chan = x.shape[0], x.shape[1]
    n_filters = u.shape[1]
    bands = (tiles_h + band_tiles - 1) // band_tiles
    blocks = (n_filters + filter_block - 1) // filter_block
    jobs = (n_batch + group - 1) // group * bands * blocks
    lanes = v_ws.shape[0]
    for lane in prange(lanes):
        rows = row_ws[lane]
        bad = False
        done = -1  # the (image group, band) whose input transform v holds
        for job in range(jobs * lane // lanes, jobs * (lane + 1) // lanes):
            band_job = job // blocks
            k0 = (job - band_job * blocks) * filter_block
            k1 = min(n_filters, k0 + filter_block)
            n0 = band_job // bands * group
            n1 = min(n_batch, n0 + group)
            th0 = (band_job % bands) * band_tiles
            th1 = min(tiles_h, th0 + band_tiles)
            per_image = (th1 - th0) * tiles_w
            count = (n1 - n0) * per_image
            v = v_ws[lane]
            m = m_ws[lane]
            if band_job != done:
                for n in range(n0, n1):
                    first = (n - n0) * per_image
                    input_transform_band(
                        x, n, th0, th1, v, first, count, rows, tiles_w, pad_t, pad_l
                    )
                done = band_job
            for e in range(36):
                v_e = v[e, : n_chan * count].reshape(n_chan, count)
                m_e = m[e, : n_filters * count].reshape(n_filters, count)[k0:k1]
                if own_gemm_size_pays(k1 - k0, n_chan, count, m_e.itemsize):
                    gemm_nn(u[e, k0:k1], v_e, m_e, False)
                else:
                    np.dot(u[e, k0:k1], v_e, m_e)
            for n in range(n0, n1):
                tile0 = (n - n0) * per_image
                bad |= output_transform_band(
                    m, bias, y, rows, n, th0, th1, tiles_w, count, tile0, k0, k1
                )
        nonfinite[lane] = bad


def _plane(size: int) -> int:
    """Stride between the planes of a workspace holding ``size`` elements each: a multiple of 16
    elements plus 16, never a power of two. The transforms touch every plane per tile; planes a
    power of two apart (e.g. 64 KiB for CIFAR-sized layers) map to the same cache sets and made
    the grad_y transform 8x slower."""
    return -(-size // 16) * 16 + 16


def _tiles(geom: ConvGeometry) -> tuple[int, int]:
    n, k, oh, ow = geom.output_shape
    return (oh + 3) // 4, (ow + 3) // 4


def _band_tiles(geom: ConvGeometry, itemsize: int, lanes: int, per_lane_fixed: int) -> int:
    """Tile rows per band: the band's transformed input near :data:`BAND_BYTES`, and all lanes'
    workspace under :data:`WORKSPACE_BYTES`; at least one tile row."""
    tiles_h, tiles_w = _tiles(geom)
    c, k = geom.in_channels, geom.out_channels
    per_tile_row = 36 * (c + k) * tiles_w * itemsize
    room = max(0, WORKSPACE_BYTES // lanes - per_lane_fixed) // per_tile_row
    return int(max(1, min(tiles_h, BAND_BYTES // (36 * c * tiles_w * itemsize), room)))


def _image_group(geom: ConvGeometry, itemsize: int, lanes: int, band_tiles: int) -> int:
    """Images per job: 1 unless a band is a whole image; then as many as keep the group's
    transformed input near :data:`BAND_BYTES` (``lanes`` groups under :data:`WORKSPACE_BYTES`),
    but never so many that one of ``lanes`` lanes would get no job. ``lanes`` must not depend on
    the thread count (the group sets the GEMMs' width, and with it the rounding)."""
    tiles_h, tiles_w = _tiles(geom)
    if band_tiles < tiles_h:
        return 1
    c, k = geom.in_channels, geom.out_channels
    per_image = 36 * tiles_h * tiles_w * itemsize
    group = min(BAND_BYTES // (c * per_image), WORKSPACE_BYTES // lanes // ((c + k) * per_image))
    return int(max(1, min(group, -(-geom.batch // lanes))))


def _split_for_jobs(tiles_h: int, band_tiles: int, blocks: int, wanted: int) -> int:
    """``band_tiles``, or fewer tile rows per band if ``blocks`` image groups would otherwise
    give fewer than ``wanted`` jobs."""
    if blocks * -(-tiles_h // band_tiles) >= wanted:
        return band_tiles
    return -(-tiles_h // -(-wanted // blocks))  # ceil(tiles_h / bands wanted per group)


def _band_plan(geom: ConvGeometry, itemsize: int, filter_blocks: int = 1) -> tuple[int, int]:
    """``(band_tiles, group)`` of the banded forward pass, with the filters cut into
    ``filter_blocks`` blocks. Like ``im2col.forward``'s bands, a function of the geometry only:
    planned for ``im2col.PLAN_LANES`` lanes, whatever the thread count (the GEMMs' width, and
    with it the rounding, must not depend on it), and cut into at least :data:`MIN_JOBS` jobs
    where the image allows."""
    band_tiles = _band_tiles(geom, itemsize, im2col.PLAN_LANES, 0)
    group = _image_group(geom, itemsize, im2col.PLAN_LANES, band_tiles)
    tiles_h = _tiles(geom)[0]
    band_tiles = _split_for_jobs(
        tiles_h, band_tiles, -(-geom.batch // group) * filter_blocks, MIN_JOBS
    )
    group = _image_group(geom, itemsize, im2col.PLAN_LANES, band_tiles)
    return band_tiles, _wide_group(geom, itemsize, band_tiles, group)


def _forward_plan(geom: ConvGeometry, itemsize: int) -> tuple[int, int, int]:
    """``(band_tiles, group, filter_block)`` of the banded forward pass: :func:`_deep_plan` for
    deep layers, else :func:`_band_plan`, except that a small batch whose (image group, band)
    jobs would be fewer than :data:`MIN_JOBS` first cuts its filters into blocks
    (:func:`_filter_block`), then its bands only as far as the jobs are still too few."""
    deep = _deep_plan(geom, itemsize)
    if deep is not None:
        return deep
    # The (image group, band) jobs before _split_for_jobs cuts the bands for MIN_JOBS.
    band_tiles = _band_tiles(geom, itemsize, im2col.PLAN_LANES, 0)
    group = _image_group(geom, itemsize, im2col.PLAN_LANES, band_tiles)
    band_jobs = -(-geom.batch // group) * -(-_tiles(geom)[0] // band_tiles)
    filter_block = _filter_block(geom.out_channels, band_jobs)
    blocks = -(-geom.out_channels // filter_block)
    return (*_band_plan(geom, itemsize, blocks), filter_block)


#: Transformed filters (36 x K x C values) above this many bytes make a layer "deep" for the
#: forward pass (:func:`_deep_plan`): 512 x 512 in float32 (37.7 MB), 256 x 256 in float64.
DEEP_FILTER_BYTES = 16 * 2**20

#: A lane of the deep plan holds at most this share of :data:`WORKSPACE_BYTES` (its group's
#: transformed input and GEMM results), so that at least 3 lanes fit in it.
DEEP_LANE_SHARE = 3


def _deep_lane_bytes(geom: ConvGeometry, itemsize: int, group: int) -> int:
    """Bytes of one lane's transformed input and GEMM results for ``group`` whole images."""
    tiles_h, tiles_w = _tiles(geom)
    return 36 * (geom.in_channels + geom.out_channels) * group * tiles_h * tiles_w * itemsize


def _deep_plan(geom: ConvGeometry, itemsize: int) -> tuple[int, int, int] | None:
    """``(band_tiles, group, filter_block)`` for a deep layer (:data:`DEEP_FILTER_BYTES`), or
    None: whole images, as many per job as a lane's share of the workspace holds
    (:data:`DEEP_LANE_SHARE`) and at most half the batch, then the filters cut into blocks for
    :data:`MIN_JOBS` jobs (:func:`_filter_block`).

    Every job reads all of its block's transformed filters, so they are read (band jobs) times
    in all; the byte budget of :func:`_band_tiles` cut ResNet's 16x512x14x14 into 32 jobs of
    half an image, each reading 37.7 MB. Measured (AMD EPYC Zen 4, AVX-512, 2 threads, one
    process, alternating, medians of 5 rounds of 5 calls, ``winograd`` forward ms, plan ->
    this plan): float32 16x512x7x7 18.5 (4 jobs of 4 images) -> 14.9 (2 groups of 8 x 2
    blocks of 256), 16x512x14x14 101 (32 half images) -> 38.8 (4 groups of 4); float64
    16x512x7x7 30.2 -> 28.1. ``im2col`` took 22.4, 104 and 45.7 ms."""
    k, c = geom.out_channels, geom.in_channels
    if 36 * k * c * itemsize <= DEEP_FILTER_BYTES or geom.batch < 2:
        return None
    budget = WORKSPACE_BYTES // DEEP_LANE_SHARE
    group = min(budget // _deep_lane_bytes(geom, itemsize, 1), -(-geom.batch // 2))
    if group < 1:
        return None
    return _tiles(geom)[0], group, _filter_block(k, -(-geom.batch // group))


def deep_plan_applies(geom: ConvGeometry, itemsize: int) -> bool:
    """Whether the forward pass runs :func:`_deep_plan` on ``geom``."""
    return _deep_plan(geom, itemsize) is not None


#: The fewest filters in a block where the forward pass cuts a small batch's filters among its
#: jobs (:func:`_forward_plan`). Cutting the bands instead made each job's 36 GEMMs narrow and
#: had every job read all the transformed filters (2.4 MB for 128 x 128, from L3); blocks of
#: filters keep whole images, each job reading its block's filters once. Measured (AMD EPYC
#: Zen 4, AVX-512, 2 threads, one process, the two plans alternating, medians of 7 rounds of 9
#: calls, ``winograd`` forward ms, bands -> blocks): float32 ResNet's 1x128x28x28 1.73 -> 1.28
#: (0.88 -> 0.80 in a quieter hour), 2x128x28x28 1.30 -> 1.21, 1x256x14x14 1.43 -> 1.18,
#: 1x64x56x56 0.80 -> 0.77; float64 1.43 -> 1.45, 2.10 -> 2.10, 4.54 -> 3.87, 1.21 -> 1.21.
MIN_FILTER_BLOCK = 32


def _filter_block(n_filters: int, band_jobs: int) -> int:
    """Filters per job of the forward pass: all of them, unless ``band_jobs`` (image group, band)
    jobs are fewer than :data:`MIN_JOBS`; then blocks of at least :data:`MIN_FILTER_BLOCK`
    filters, a multiple of 8 (whole tiles of the micro-kernel), as many as give MIN_JOBS jobs."""
    if band_jobs >= MIN_JOBS or n_filters < 2 * MIN_FILTER_BLOCK:
        return n_filters
    blocks = min(-(-MIN_JOBS // band_jobs), n_filters // MIN_FILTER_BLOCK)
    per_block = -(-n_filters // blocks)
    return -(-per_block // 8) * 8


#: On small maps the forward pass groups images until each GEMM has about this many tiles (its
#: columns; two of the own GEMM's 32-wide panels), where :func:`_image_group`'s budget (a
#: group's transformed input near :data:`BAND_BYTES`, planned for 16 lanes) would leave fewer.
#: float32, 2 threads, 16x256x14x14 (16 tiles an image): 1 image a job 12.5 ms, 4 images 7.4 ms.
MIN_GEMM_TILES = 64


def _wide_group(geom: ConvGeometry, itemsize: int, band_tiles: int, group: int) -> int:
    """``group``, or more images per job where a band is a whole image and the GEMMs would have
    fewer than :data:`MIN_GEMM_TILES` tiles: while at least :data:`MIN_JOBS` jobs remain and
    the lanes' workspace (as many lanes as jobs, up to ``im2col.PLAN_LANES``) stays under
    :data:`WORKSPACE_BYTES`. A function of the geometry only, as every plan."""
    tiles_h, tiles_w = _tiles(geom)
    per_image = tiles_h * tiles_w
    if band_tiles < tiles_h or group * per_image >= MIN_GEMM_TILES:
        return group
    wide = min(-(-MIN_GEMM_TILES // per_image), max(1, geom.batch // MIN_JOBS))
    per_lane_image = 36 * (geom.in_channels + geom.out_channels) * per_image * itemsize
    while wide > group:
        lanes = min(-(-geom.batch // wide), im2col.PLAN_LANES)
        if lanes * wide * per_lane_image <= WORKSPACE_BYTES:
            break
        wide -= 1
    return max(group, wide)


def tiles_per_gemm(geom: ConvGeometry, itemsize: int) -> int:
    """How many tiles each of the forward pass's GEMMs would cover (at most; the last band of an
    image may have fewer) without the filter blocks of a small batch (:func:`_forward_plan`): a
    band of tile rows, times the images grouped per job. ``auto``'s backward rule
    (``registry.WINOGRAD_MIN_TILES``) was measured on this count, and the filter blocks do not
    change the weight gradient that decides it: ResNet's 1x128x28x28 backward, float32, AMD EPYC
    Zen 4, with the blocks in grad-x, im2col 4.6 ms against Winograd's 5.7."""
    band_tiles, group = _band_plan(geom, itemsize)
    return group * band_tiles * _tiles(geom)[1]


def _fused_winograd_conv(x, w, bias, geom: ConvGeometry) -> tuple[np.ndarray, bool]:
    """The banded F(4x4, 3x3) pass: ``(y, whether every output is finite)``."""
    n, k, oh, ow = geom.output_shape
    c = geom.in_channels
    tiles_h, tiles_w = _tiles(geom)
    band_tiles, group, filter_block = _forward_plan(geom, x.itemsize)
    # The thread count only sets how many lanes run the jobs.
    jobs = -(-n // group) * -(-tiles_h // band_tiles) * -(-k // filter_block)
    count = group * band_tiles * tiles_w
    # Lanes within WORKSPACE_BYTES (the deep plan's may hold a third of it each); their number
    # does not change the results.
    per_lane = 36 * (c + k) * count * x.itemsize
    lanes = max(
        1, min(numba.get_num_threads(), jobs, im2col.PLAN_LANES, WORKSPACE_BYTES // per_lane)
    )
    v_ws = take("winograd.band_input", (lanes, 36, _plane(c * count)), x.dtype)
    m_ws = take("winograd.band_gemm", (lanes, 36, _plane(k * count)), x.dtype)
    # Rows 0-11: the input transform's; 0-23 and 24-39: the output transform's two stages.
    row_ws = take(
        "winograd.band_rows",
        (lanes, 40, max(4 * tiles_w + ROW_SLACK, band_tiles * tiles_w)),
        x.dtype,
    )
    y = np.empty((n, k, oh, ow), dtype=x.dtype)
    bias = bias if bias is not None else np.zeros(k, dtype=x.dtype)
    nonfinite = np.zeros(lanes, dtype=np.bool_)
    with single_threaded_blas():
        fused_winograd_kernel(
            x, _filter_transform(w, G4, "winograd.filters"), bias, y, nonfinite, v_ws, m_ws,
            row_ws, tiles_h, tiles_w,
            band_tiles, group, filter_block, geom.pad_top, geom.pad_left,
        )  # fmt: skip
    return y, not nonfinite.any()


@njit(parallel=True, cache=True)
def fused_weight_gradient_kernel(
    x, grad_y, sums, bias_sums, v_ws, g_ws, row_ws, tiles_h, tiles_w, band_tiles, group,
    pad_t, pad_l,
):  # fmt: skip
    """grad-w of a 3x3 stride-1 convolution by Winograd F(3x3, 4x4), in the Winograd domain.

    ``grad_w[k, c] = sum over tiles of G^T [(B^T X B) * (A Gy A^T)] G``, with ``X`` the 6x6 input
    tile and ``Gy`` the 4x4 ``grad_y`` tile of each output tile: the transpose of the forward
    F(4x4, 3x3) algorithm, same matrices. Per band: the input transform (as forward), the
    ``grad_y`` transform, and 36 single-threaded GEMMs ``(K, tiles) @ (tiles, C)`` added to the
    lane's ``sums[lane]`` (36, K, C); the caller adds the lanes in order and applies ``G^T . G``.
    grad-b is summed on the way, per lane, in the float64 ``bias_sums[lane]``.
    Jobs are (group of ``group`` images, band of ``band_tiles`` tile rows) pairs, in image-then-band
    order; lane ``l`` of ``sums.shape[0]`` takes a fixed, contiguous run of them (all sizes depend
    on the geometry only: the same bits on any number of threads).
    """
    n_batch = x.shape[0]
    n_filters, out_h, out_w = grad_y.shape[1], grad_y.shape[2], grad_y.shape[3]
    n_chan = x.shape[1]
    bands = (tiles_h + band_tiles - 1) // band_tiles
    lanes = sums.shape[0]
    grid_w = 4 * tiles_w
    vector_lanes = VECTOR_FLOATS * 4 // x.itemsize
    for lane in prange(lanes):
        rows = row_ws[lane]
        acc = sums[lane]
        bias_acc = bias_sums[lane]
        acc[:] = 0
        bias_acc[:] = 0
        # Lane ``lane`` takes a contiguous run of the (image group, band) jobs, so that a batch
        # of one image still spreads over the lanes, band by band.
        blocks = (n_batch + group - 1) // group
        jobs = blocks * bands
        for job in range(jobs * lane // lanes, jobs * (lane + 1) // lanes):
            block = job // bands
            band = job - block * bands
            n0 = block * group
            n1 = min(n_batch, n0 + group)
            th0 = band * band_tiles
            th1 = min(tiles_h, th0 + band_tiles)
            per_image = (th1 - th0) * tiles_w
            count = (n1 - n0) * per_image
            v = v_ws[lane]
            g = g_ws[lane]
            for n in range(n0, n1):
                first_tile = (n - n0) * per_image
                input_transform_band(
                    x, n, th0, th1, v, first_tile, count, rows, tiles_w, pad_t, pad_l
                )
                for k in range(n_filters):
                    for th in range(th0, th1):
                        # The tile row's four grad_y rows, zero past the output's edges...
                        for a in range(4):
                            oh = 4 * th + a
                            if oh >= out_h:
                                for q in range(grid_w):
                                    rows[a, q] = 0
                                continue
                            for q in range(out_w):
                                rows[a, q] = grad_y[n, k, oh, q]
                            for q in range(out_w, grid_w):
                                rows[a, q] = 0
                            bias_acc[k] += im2col.row_sum(grad_y[n, k, oh])
                        # ... A Gy down the columns, then (A Gy) A^T by vectors of tiles.
                        for q in range(grid_w):
                            g0, g1, g2, g3 = rows[0, q], rows[1, q], rows[2, q], rows[3, q]
                            t0, t1, t2, t3, t4, t5 = _a6(g0, g1, g2, g3)
                            rows[4, q] = t0
                            rows[5, q] = t1
                            rows[6, q] = t2
                            rows[7, q] = t3
                            rows[8, q] = t4
                            rows[9, q] = t5
                        first = k * count + first_tile + (th - th0) * tiles_w
                        for i in range(6):
                            _transform_row(rows, 4 + i, g, 6 * i, first, tiles_w, vector_lanes, 4)
            for e in range(36):
                gemm_nt_add(
                    g[e, : n_filters * count].reshape(n_filters, count),
                    v[e, : n_chan * count].reshape(n_chan, count),
                    acc[e],
                )


#: Both passes cut images into bands until they have at least this many (image group, band)
#: jobs, so that small batches (a batch of one) still run on several cores; more, narrower bands
#: would make the GEMMs narrower than BLAS runs well. A constant: plans must not depend on the
#: thread count. 4 keeps 2-4 cores busy. float32, 2 threads: U-Net's 1x32x256x256 backward
#: 16.4 -> 11.3 ms (its grad-w had run on one lane). ResNet's 1x128x28x28 stays at 6.0 / 22.5 ms
#: (two jobs of 14-28 tiles per GEMM), and with that plan ``auto`` sends it to im2col
#: (``WINOGRAD_MIN_TILES``), which takes 2.3 / 4.3 ms.
MIN_JOBS = 4


#: The lanes' grad-w sums (36 x K x C values each) may take up to this many bytes: all of
#: :data:`WORKSPACE_BYTES`, where im2col gives its sums half (Winograd's band workspace is
#: small next to them). Two lanes of 256 x 256 filters (9.4 MB each in float32) fit, where
#: otherwise im2col computes grad-w: float32, 2 threads, backward ms, half against all of it:
#: ResNet's 16x256x14x14 24.8-25.8 -> 20.2-20.9, DeepLab's 4x256x28x28 at dilation 2 (its
#: polyphase planes) 28.1-29.0 -> 23.0-24.1.
WEIGHT_GRADIENT_SUMS_BYTES = WORKSPACE_BYTES


def weight_gradient_plan(geom: ConvGeometry, itemsize: int) -> tuple[int, int, int]:
    """``(lanes, band_tiles, group)`` of :func:`fused_weight_gradient_kernel`; ``lanes`` is 0
    when not even two lanes' sums fit (then im2col computes grad-w). As
    :func:`numbaconv.kernels.im2col._backward_lanes`, a function of the geometry only."""
    per_lane = 36 * geom.out_channels * geom.in_channels * itemsize  # the lane's sums
    budget = WEIGHT_GRADIENT_SUMS_BYTES
    fit = im2col.lanes_that_fit(im2col.BACKWARD_LANES, per_lane, budget)
    if fit == 0 and geom.batch == 1:
        fit = im2col.lanes_that_fit(1, per_lane, budget)  # one lane: no sums to add up
    if fit == 0:
        return 0, 0, 0
    tiles_h = _tiles(geom)[0]
    band_tiles = _band_tiles(geom, itemsize, fit, per_lane)
    group = _image_group(geom, itemsize, fit, band_tiles)
    blocks = -(-geom.batch // group)
    band_tiles = _split_for_jobs(tiles_h, band_tiles, blocks, min(fit, MIN_JOBS))
    jobs = blocks * -(-tiles_h // band_tiles)
    return min(fit, jobs), band_tiles, group


def _winograd_weight_gradient(grad_y, x, geom: ConvGeometry, plan: tuple[int, int, int]):
    """``(grad_w, grad_b)`` by :func:`fused_weight_gradient_kernel` on ``plan``
    (:func:`weight_gradient_plan`)."""
    n, k, oh, ow = geom.output_shape
    c = geom.in_channels
    tiles_h, tiles_w = _tiles(geom)
    lanes, band_tiles, group = plan
    sums = take("winograd.grad_w_lanes", (lanes, 36, k, c), x.dtype)
    bias_sums = take("winograd.grad_b_lanes", (lanes, k), np.float64)  # float64 for every dtype
    count = group * band_tiles * tiles_w
    v_ws = take("winograd.grad_w_input", (lanes, 36, _plane(c * count)), x.dtype)
    g_ws = take("winograd.grad_w_grad_y", (lanes, 36, _plane(k * count)), x.dtype)
    row_ws = take("winograd.grad_w_rows", (lanes, 12, 4 * tiles_w + ROW_SLACK), x.dtype)
    with single_threaded_blas():
        fused_weight_gradient_kernel(
            x, grad_y, sums, bias_sums, v_ws, g_ws, row_ws, tiles_h, tiles_w, band_tiles,
            group, geom.pad_top, geom.pad_left,
        )  # fmt: skip
    total = sums[0].copy()
    grad_b = bias_sums[0].copy()
    for lane in range(1, lanes):  # in lane order: the same bits on any number of threads
        total += sums[lane]
        grad_b += bias_sums[lane]
    # grad_w[k, c] = G^T M G per (k, c), in float64 like the filter transform.
    grad_w = np.empty((k, c, 3, 3), dtype=x.dtype)
    filter_gradient_kernel(total, G4, grad_w)
    return grad_w, grad_b.astype(x.dtype)


def _all_finite(*arrays) -> bool:
    """Whether the arrays hold only finite values (a sum is finite only then, or on overflow,
    which errs on the safe side)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return all(np.isfinite(a.sum()) for a in arrays)


#: A dilated layer runs Winograd on polyphase sub-images only if each sub-image's output is at
#: least this many pixels along both axes: smaller ones make tiny images of one tile each.
#: float32, 2 threads, forward ms, im2col against winograd: DeepLab's 4x256x28x28 at dilation 2
#: (14x14 per phase) 15.6 against 9.5-11.0; at dilation 12 on 33x33 (3x3 per phase) 24.5
#: against 38.9.
MIN_PHASE_OUTPUTS = 8


def _phases(geom: ConvGeometry) -> polyphase.Phases | None:
    """A dilated 3x3 stride-1 layer as Winograd's undilated layer on polyphase sub-images
    (:mod:`numbaconv.kernels.polyphase`), or None."""
    if supports(geom) or not polyphase.applies(geom):
        return None
    if not geom.filter_height == geom.filter_width == 3:
        return None
    phases = polyphase.plan(geom)
    sub = phases.sub
    if min(sub.out_height, sub.out_width) < MIN_PHASE_OUTPUTS or not supports(sub):
        return None
    return phases


def winograd_geometry(geom: ConvGeometry) -> ConvGeometry | None:
    """The geometry Winograd's passes run for ``geom``: itself, the undilated one on polyphase
    sub-images of a dilated layer, or None where Winograd does not apply."""
    if supports(geom):
        return geom
    phases = _phases(geom)
    return None if phases is None else phases.sub


def forward(x, w, b, geom: ConvGeometry) -> np.ndarray:
    phases = _phases(geom)
    if phases is not None:
        return polyphase.forward(x, w, b, phases, forward)
    # Winograd mixes the pixels of a tile, so a NaN or Inf would reach outputs that never read
    # it; such inputs take the im2col path, which propagates them as a plain computation does.
    y = _winograd_conv(x, w, b, geom) if supports(geom) else None
    return y if y is not None else im2col.forward(x, w, b, geom)


def input_gradient(grad_y, w, geom: ConvGeometry):
    """grad-x alone (a transposed convolution's forward pass): Winograd on the flipped filters,
    or ``im2col``'s where Winograd does not apply or met a NaN, an Inf or an overflow."""
    transposed = im2col.adjoint_geometry(geom) if supports(geom) else None
    if transposed is not None and supports(transposed) and _all_finite(w):
        grad_x = _winograd_conv(grad_y, im2col.flipped_filters(w, 1), None, transposed)
        if grad_x is not None:
            return grad_x
    return im2col.input_gradient(grad_y, w, geom)


def backward(grad_y, x, w, geom: ConvGeometry):
    phases = _phases(geom)
    if phases is not None:
        return polyphase.backward(grad_y, x, w, phases, backward)
    transposed = im2col.adjoint_geometry(geom) if supports(geom) else None
    if transposed is None or not supports(transposed) or not _all_finite(w):
        return im2col.backward(grad_y, x, w, geom)
    plan = weight_gradient_plan(geom, x.itemsize) if blas_inside_kernels() else (0, 0, 0)
    if plan[0]:
        grad_w, grad_b = _winograd_weight_gradient(grad_y, x, geom, plan)
    else:
        grad_w, grad_b = im2col.weight_and_bias_gradients(grad_y, x, w, geom)
    # grad_x = grad_y correlated with the filters flipped in space, input/output swapped.
    grad_x = _winograd_conv(grad_y, im2col.flipped_filters(w, 1), None, transposed)
    # A NaN or Inf in grad_y always reaches grad_b, one in x grad_w (stride 1: every pixel is
    # read, and 0 * Inf is NaN); Winograd would have spread it. So a non-finite result (or a
    # Winograd overflow) means: recompute the plain way. grad_x is checked inside its kernel.
    if grad_x is None or not _all_finite(grad_w, grad_b):
        return im2col.backward(grad_y, x, w, geom)
    return grad_x, grad_w, grad_b
