"""The ``im2col`` kernel family: columns of the input, BLAS GEMMs, col2im.

Columns are in the teaching layout ``(C*R*S, pixels)`` (rows ordered c, r, s; pixels oh, ow).

Banded passes (the default; :func:`fused_forward_kernel`, :func:`fused_backward_kernel`): each pass
is one Numba parallel region. Its lanes take fixed runs of jobs (image, band of output rows); per
band they build the band's columns in a cache-sized workspace, call one single-threaded GEMM per
group from inside the region and write the band of ``y``. Backward: per image and band, the
grad-w GEMM, which adds the band's product into its lane's sum (lanes are a function of the
geometry, so the bits never depend on the thread count), the gradient-column GEMM and a col2im.

The GEMMs: the forward and gradient-column products run on numbaconv's own micro-kernel
(:mod:`.microkernel`) where :func:`~.microkernel.own_gemm_pays` says it beats BLAS, else on
``np.dot``, which Numba binds to SciPy's BLAS, held to one thread by
:func:`numbaconv._threading.single_threaded_blas`. The grad-w product (``grad_y @ columns.T``)
runs on the micro-kernel only where OpenBLAS does not run its AVX-512 kernels on an AVX-512 host
(:func:`~.microkernel.own_weight_gradient`: its AVX2 ones ran at about half the micro-kernel's
speed); elsewhere on BLAS, where OpenBLAS's AVX-512 kernels ran it at 150-200 GFLOP/s per core
and the micro-kernel, packing the transposed columns, at 110-150 (Sapphire Rapids), and the two
drew on AMD's Zen 5. Either way it adds into the lane's sum: on BLAS through
:func:`._blas.gemm_nt_add` with ``beta = 1`` (``np.dot`` overwrites its output, and adding each
band's product to the sum afterwards cost 8-18 % of the backward pass: float32, 2 threads,
DeepLab's 4x256x33x33 dilation-12 layer 56.7 -> 51.9 ms, 4x256x28x28 dilation 2 34.7 -> 29.0,
ResNet's 16x256x14x14 grad-w with Winograd's grad-x 29.5 -> 24.3).
1x1 stride-1 unpadded layers use the image itself as the columns. A row whose columns alone exceed
:data:`BAND_BYTES` (long 1-D signals) is cut into segments in the forward pass
(:func:`row_segment`).

Implicit GEMM (:func:`implicit_plan`): where whole small images (or bands of rows, for batches of
fewer than 4 and for images too large to be whole: :func:`implicit_band_rows`) fit, the forward
product reads the taps' windows of zero-padded planes in place, no columns; output rows a whole
number of the micro-kernel's panels wide go straight into ``y``. The backward pass follows it
there: grad-w by :func:`implicit_weight_gradient` (the windows as the rows of the left operand),
and grad-x of stride-1 layers as the forward pass of ``grad_y`` with the flipped filters
(:func:`input_gradient_as_forward`).

Batch-chunked passes (the fallback where SciPy's OpenBLAS cannot be held to one thread, or with
``NUMBACONV_BLAS_INSIDE_KERNELS=0``): per chunk of images, a Numba-parallel im2col, one NumPy
GEMM per group with BLAS's own threads, and a parallel scatter into ``y``; backward gathers
``grad_y`` the same way and runs a parallel col2im.

Why: every parallel region and every multi-threaded BLAS call is a fork/join of a thread pool.
The chunked design has 5-20 per call, alternating two pools, and on a 2-core machine their
wake-ups cost more than the arithmetic; the banded design has one, and keeps each band's data in
the core's L2 cache.

Workspace: banded, per lane a band's columns and GEMM result (backward: plus the lane's grad-w
sum), all under :data:`WORKSPACE_BYTES` (or one band of one output row, if that is more);
chunked, the columns and GEMM result of one chunk under the same bound. Neither grows with the
batch.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange

from .._threading import blas_inside_kernels, single_threaded_blas
from .._workspace import take
from ..geometry import ConvGeometry
from ._blas import gemm_nn_into, gemm_nt_add
from ._loops import deinterleave_row, gather_row, scatter_add_row, valid_range, zero_row
from .microkernel import (
    NN_VECTORS,
    VECTOR_BYTES,
    gemm_nn,
    gemm_nn_rows,
    gemm_rows_nn,
    own_gemm_pays,
    own_gemm_pays_transposed,
    own_gemm_size_pays,
    own_weight_gradient,
    pack_rows,
)

#: Upper bound, in bytes, for the per-chunk workspace (columns + GEMM result); one image's
#: workspace is always allowed. Chunks larger than L2 (2 MiB per core here) cost little, while
#: every chunk adds fork/joins of Numba's and BLAS's thread pools, which on a busy machine can
#: take a scheduler time slice each: 32 MiB keeps them to a handful per call on the suite's layers.
WORKSPACE_BYTES = 32 * 2**20

#: Target size of one band's columns in the fused passes: enough pixels for a single-threaded
#: GEMM to run near its peak, small enough to stay in a core's L2 cache (2 MiB here) beside the
#: filters and the GEMM result.
BAND_BYTES = 2**20

#: OpenBLAS's AVX-512 builds multiply matrices with M*N*K up to about 1e6 with kernels that skip
#: packing the operands. For thin layers (few filters times few taps) those ran about 1.6x faster
#: (first5x5's GEMM, 32 filters x 75 taps, single-threaded: 150-180 GFLOP/s at 224-416 pixels,
#: 95 at 448 and more), so bands are cut to stay under the bound when that still leaves at least
#: SMALL_GEMM_MIN_PIXELS pixels per GEMM (fewer made each call's overhead show).
SMALL_GEMM_SIZE = 1_000_000
SMALL_GEMM_MIN_PIXELS = 224

#: Lanes the fused forward passes plan their bands for, and the most that run at once. The band
#: size sets each GEMM's width, and BLAS may round an output differently in a GEMM of another
#: width, so the plan must not depend on the thread count (it did, and 1 and 2 threads gave
#: different bits): bands are sized as if PLAN_LANES lanes shared :data:`WORKSPACE_BYTES`, and
#: min(threads, jobs, PLAN_LANES) lanes run.
PLAN_LANES = 16

#: Lanes of the fused backward pass (each sums its own grad-w). A constant, not the
#: thread count, so that results are bitwise identical on any number of threads; 8 keeps
#: machines with up to 8 cores busy.
BACKWARD_LANES = 8

#: Lanes of the fused backward pass for batches smaller than this: the images are cut into bands
#: that the lanes share (in phases, :func:`fused_backward_kernel`), so that a batch of one still
#: runs on several cores. 4 keeps 2-4 cores busy with bands wide enough for BLAS; float32,
#: 2 threads, backward: ResNet's 1x128x28x28 3x3 4.33 -> 2.77 ms (8 lanes: 3.50), 1x64x56x56
#: stride 2 2.19 -> 1.45 ms, 3x128x28x28 8.0-8.6 -> 6.6-7.0 ms, batches of 2 unchanged.
SMALL_BATCH_LANES = 4


@njit(parallel=True, cache=True)
def im2col_kernel(x, cols, filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw):
    """Fill the teaching columns ``cols[(c*R + r)*S + s, (n*OH + oh)*OW + ow]`` with the
    zero-padded input at ``(n, c, oh*sh + r*dh - pad_t, ow*sw + s*dw - pad_l)``.

    Parameters
    ----------
    x : (N, C, H, W) array
    cols : (C*R*S, N*OH*OW) C-contiguous array; overwritten.
    filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw : int
        Filter and output sizes, strides, top/left padding and dilations.
    """
    n_batch, n_chan = x.shape[0], x.shape[1]
    geo = (filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw)
    for job in prange(n_batch * n_chan):
        n = job // n_chan
        c = job - n * n_chan
        channel_columns(x, n, c, 0, out_h, 0, out_w, cols, n * out_h * out_w, geo)


@njit(parallel=True, cache=True)
def col2im_kernel(cols, img, filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw):
    """Adjoint of :func:`im2col_kernel`: overwrite ``img`` (N, C, H, W) with the sum of the
    columns entries that read each pixel.

    Each ``prange`` job owns one ``(n, c)`` plane of ``img`` and adds its contributions in a fixed
    order, so the result is race-free and deterministic.
    """
    n_batch, n_chan = img.shape[0], img.shape[1]
    geo = (filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw)
    for job in prange(n_batch * n_chan):
        n = job // n_chan
        c = job - n * n_chan
        img[n, c] = 0
        channel_col2im_add(cols, img, n, c, 0, out_h, n * out_h * out_w, geo)


@njit(parallel=True, cache=True)
def scatter_output_kernel(u, bias, has_bias, y):
    """``y[n, k, p] = u[k, n*P + p] (+ bias[k])``: the chunk's GEMM result into NCHW order."""
    n_batch, n_filters, pixels = y.shape
    for job in prange(n_batch * n_filters):
        n = job // n_filters
        k = job - n * n_filters
        base = n * pixels
        if has_bias:
            for p in range(pixels):
                y[n, k, p] = u[k, base + p] + bias[k]
        else:
            for p in range(pixels):
                y[n, k, p] = u[k, base + p]


@njit(parallel=True, cache=True)
def gather_grad_kernel(grad_y, out):
    """``out[k, n*P + p] = grad_y[n, k, p]``: a chunk of ``grad_y`` in the columns' order."""
    n_batch, n_filters, pixels = grad_y.shape
    for job in prange(n_batch * n_filters):
        n = job // n_filters
        k = job - n * n_filters
        base = n * pixels
        for p in range(pixels):
            out[k, base + p] = grad_y[n, k, p]


@njit(cache=True)
def channel_columns(x, n, c, oh0, oh1, ow0, ow1, cols, col0, geo):
    """The teaching columns of channel ``c`` of image ``n`` for output rows ``oh0:oh1`` and
    output columns ``ow0:ow1`` (all of them: ``0, OW``): with ``w = ow1 - ow0``,
    ``cols[(c*R + r)*S + s, col0 + (oh - oh0)*w + ow - ow0]`` = the zero-padded input at
    ``(n, c, oh*sh + r*dh - pad_t, ow*sw + s*dw - pad_l)``; ``geo`` is :func:`geometry_args`.

    The one im2col loop nest: the full-batch :func:`im2col_kernel`, the banded passes
    (:func:`band_columns`) and the row segments of :func:`fused_forward_kernel` call it.
    """
    filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw = geo
    height, width = x.shape[2], x.shape[3]
    span = ow1 - ow0
    for r in range(filter_h):
        for s in range(filter_w):
            row = (c * filter_h + r) * filter_w + s
            col_offset = s * dw - pad_l
            lo, hi = valid_range(out_w, sw, col_offset, width)
            lo = min(max(lo, ow0), ow1) - ow0  # as offsets into the span
            hi = max(min(hi, ow1), ow0) - ow0
            hi = max(hi, lo)
            for oh in range(oh0, oh1):
                ih = oh * sh - pad_t + r * dh
                base = col0 + (oh - oh0) * span
                dst = cols[row, base : base + span]
                if ih < 0 or ih >= height:
                    zero_row(dst)
                    continue
                zero_row(dst[:lo])
                gather_row(dst[lo:hi], x[n, c, ih], (ow0 + lo) * sw + col_offset, sw)
                zero_row(dst[hi:])


@njit(cache=True)
def band_columns(x, n, oh0, oh1, cols, geo):
    """The columns of output rows ``oh0:oh1`` of image ``n``, all channels: ``cols`` is
    (C*R*S, (oh1 - oh0)*OW)."""
    for c in range(x.shape[1]):
        channel_columns(x, n, c, oh0, oh1, 0, geo[3], cols, 0, geo)


@njit(cache=True)
def image_columns(x, n, c, cols, col0, geo, plane, index):
    """:func:`channel_columns` of a whole image (all output rows and columns), by another route:
    channel ``c`` of image ``n`` is copied, zero-padded, into ``plane`` (the ``Hp x Wp`` window
    the filter reaches, :func:`column_table`), and each tap's row of the columns is one gather,
    ``cols[row, col0 + p] = plane[tap offset + index[p]]``, instead of a copy per output row.
    The same values; for small or strided maps, whose rows are shorter than a vector or strided."""
    filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw = geo
    plane_h = (out_h - 1) * sh + (filter_h - 1) * dh + 1
    plane_w = (out_w - 1) * sw + (filter_w - 1) * dw + 1
    flat = plane[: plane_h * plane_w]
    zero_row(flat)
    channel_planes(x, n, c, flat, 1, 1, 1, 1, pad_t, pad_l, plane_h, plane_w)
    pixels = index.shape[0]
    for r in range(filter_h):
        for s in range(filter_w):
            dst = cols[(c * filter_h + r) * filter_w + s, col0 : col0 + pixels]
            tap = flat[r * dh * plane_w + s * dw :]
            for p in range(pixels):
                dst[p] = tap[index[p]]


@njit(cache=True)
def row_sum(values):
    """Sum of a 1-D array in float64, in a fixed order: eight interleaved partial sums (one SIMD
    register of float64; a single running sum would wait on each addition), then pairwise."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    size = values.shape[0]
    full = size - size % 8
    for q in range(0, full, 8):
        s0 += values[q]
        s1 += values[q + 1]
        s2 += values[q + 2]
        s3 += values[q + 3]
        s4 += values[q + 4]
        s5 += values[q + 5]
        s6 += values[q + 6]
        s7 += values[q + 7]
    for q in range(full, size):
        s0 += values[q]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, inline="always")
def band_or_image_columns(x, n, oh0, oh1, workspace, pointwise, geo):
    """The columns of output rows ``oh0:oh1`` of image ``n``: for a ``pointwise`` layer (1x1,
    stride 1, no padding) the image itself, no copy; else built in ``workspace`` (1-D)."""
    taps = x.shape[1] * geo[0] * geo[1]
    width = (oh1 - oh0) * geo[3]
    if pointwise:
        return x[n].reshape(taps, width)
    cols = workspace[: taps * width].reshape(taps, width)
    band_columns(x, n, oh0, oh1, cols, geo)
    return cols


@njit(cache=True)
def channel_col2im_add(cols, img, n, c, oh0, oh1, col0, geo):
    """Adjoint of :func:`channel_columns`: add the columns of channel ``c``, output rows
    ``oh0:oh1``, into ``img[n, c]``; shared by :func:`col2im_kernel` and the banded backward."""
    filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw = geo
    height, width = img.shape[2], img.shape[3]
    for r in range(filter_h):
        for s in range(filter_w):
            row = (c * filter_h + r) * filter_w + s
            col_offset = s * dw - pad_l
            lo, hi = valid_range(out_w, sw, col_offset, width)
            if hi <= lo:
                continue
            for oh in range(oh0, oh1):
                ih = oh * sh - pad_t + r * dh
                if ih < 0 or ih >= height:
                    continue
                base = col0 + (oh - oh0) * out_w
                scatter_add_row(
                    img[n, c, ih], cols[row, base + lo : base + hi], lo * sw + col_offset, sw
                )


@njit(cache=True, inline="always")
def _group_products(w_mat, cols, out, groups):
    """``out[group's filters] = w_mat[group's filters] @ cols[group's taps]`` for every group, on
    numbaconv's own GEMM where it pays, else BLAS."""
    n_filters, taps_g = w_mat.shape
    k_g = n_filters // groups
    for g in range(groups):
        filters = w_mat[g * k_g : (g + 1) * k_g]
        taps_cols = cols[g * taps_g : (g + 1) * taps_g]
        if own_gemm_pays(k_g, taps_g, cols.shape[1], out.itemsize):
            gemm_nn(filters, taps_cols, out[g * k_g : (g + 1) * k_g], False)
        else:
            np.dot(filters, taps_cols, out[g * k_g : (g + 1) * k_g])


@njit(cache=True)
def padded_planes(x, n, planes, geo, padded_h, padded_w, row0):
    """Image ``n``'s channels, zero-padded (``pad_t`` rows above, ``pad_l`` columns to the
    left), each in ``padded_h x padded_w`` planes one after the other in ``planes`` (1-D); the
    rest of ``planes`` zero. The planes start at the padded row that output row ``row0``'s
    first tap reads (0: the whole image; else a band's). At stride 1 a channel has one plane,
    its padded image. At stride ``(sh, sw)`` (undilated) it has one per phase ``(a, b)`` in
    ``range(min(sh, R))`` x ``range(min(sw, S))``, in that order: element ``(m, q)`` of that
    plane is the padded image's ``(sh*m + a, sw*q + b)``, so that each tap ``(r, s)`` of a
    strided filter reads consecutive elements of one plane, phase ``(r % sh, s % sw)`` from
    ``(r // sh, s // sw)`` on, as at stride 1."""
    filter_h, filter_w, _, _, sh, sw, pad_t, pad_l, _, _ = geo
    phases_h, phases_w = min(sh, filter_h), min(sw, filter_w)
    zero_row(planes)
    size = phases_h * phases_w * padded_h * padded_w
    for c in range(x.shape[1]):
        dst = planes[c * size : (c + 1) * size]
        channel_planes(
            x, n, c, dst, sh, sw, phases_h, phases_w, pad_t - row0 * sh, pad_l, padded_h, padded_w
        )


@njit(cache=True, inline="always")
def channel_planes(x, n, c, dst, sh, sw, phases_h, phases_w, pad_t, pad_l, padded_h, padded_w):
    """Channel ``c`` of image ``n`` into its ``phases_h * phases_w`` zeroed planes of
    ``padded_h x padded_w`` in ``dst`` (see :func:`padded_planes`; at stride 1, one plane: the
    padded image); the input rows and columns that fall outside the planes are not copied."""
    height, width = x.shape[2], x.shape[3]
    plane = padded_h * padded_w
    for a in range(phases_h):
        m0, m1 = valid_range(padded_h, sh, a - pad_t, height)
        if sw == 2 and phases_w == 2:
            # Both column phases from one pass over each input row: its even and odd elements
            # (an interleaved load that LLVM vectorises), where a pass per phase read each row
            # twice, with a stride of 2, in short loops. AMD EPYC Zen 3, one core, float32,
            # ResNet's 16x64x56x56 stride-2 planes (841 KB an image), all 16 images, the two
            # alternating in one process, ms, three runs: 3.69 -> 2.65, 2.82 -> 2.15, 3.29 ->
            # 2.58 (the whole layer: 1.00-1.04x, within the machine's noise).
            row0 = a * phases_w * plane
            for m in range(m0, m1):
                deinterleave_row(
                    dst[row0 + m * padded_w : row0 + (m + 1) * padded_w],
                    dst[row0 + plane + m * padded_w : row0 + plane + (m + 1) * padded_w],
                    x[n, c, m * sh + a - pad_t], pad_l,
                )  # fmt: skip
            continue
        for b in range(phases_w):
            q0, q1 = valid_range(padded_w, sw, b - pad_l, width)
            base = (a * phases_w + b) * plane
            for m in range(m0, m1):
                start = base + m * padded_w
                gather_row(
                    dst[start + q0 : start + q1], x[n, c, m * sh + a - pad_t],
                    q0 * sw + b - pad_l, sw,
                )  # fmt: skip


@njit(cache=True)
def segment_planes(x, n, oh, ow0, planes, geo, length):
    """The windows that output columns ``ow0:`` of output row ``oh`` of image ``n`` read
    (stride 1 along the row): per channel ``c`` and filter row ``r``, ``length`` elements of
    the zero-padded input row ``oh*sh + r*dh - pad_t`` from column ``ow0 - pad_l`` on, at
    ``planes[(c*R + r)*length:]``. Tap ``(c, r, s)``'s row of the segment's columns is then the
    window ``s*dw`` further on (:func:`segment_tap_rows`)."""
    filter_h, _, _, _, sh, _, pad_t, pad_l, dh, _ = geo
    height, width = x.shape[2], x.shape[3]
    first = ow0 - pad_l
    lo, hi = valid_range(length, 1, first, width)
    for c in range(x.shape[1]):
        for r in range(filter_h):
            dst = planes[(c * filter_h + r) * length : (c * filter_h + r + 1) * length]
            ih = oh * sh + r * dh - pad_t
            if ih < 0 or ih >= height:
                zero_row(dst)
                continue
            zero_row(dst[:lo])
            gather_row(dst[lo:hi], x[n, c, ih], first + lo, 1)
            zero_row(dst[hi:])


@njit(cache=True)
def padded_planes_transposed(x, n, planes, pad_t, pad_l, padded_h, padded_w):
    """:func:`padded_planes` with each plane transposed: ``padded_w`` rows of ``padded_h``,
    element (h, w) of the padded plane at ``w * padded_h + h``."""
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    zero_row(planes)
    plane = padded_h * padded_w
    for c in range(channels):
        base = c * plane + pad_l * padded_h + pad_t
        for h in range(height):
            src = x[n, c, h]
            for q in range(width):
                planes[base + q * padded_h + h] = src[q]


@njit(cache=True, inline="always")
def implicit_image(
    x, w_mat, bias, y, planes_ws, out_ws, groups, n, oh0, oh1, band_rows, geo, tap_rows, transposed
):  # fmt: skip
    """One job of :func:`fused_forward_kernel`'s implicit GEMM: output rows ``oh0:oh1`` of image
    ``n`` (the whole image, or a band of :func:`implicit_band_rows`; planes sized for
    ``band_rows``). With ``transposed`` (whole images only), the planes and the product's output
    are transposed (OW rows on the padded height; see :func:`implicit_transposed`)."""
    filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw = geo
    # As _padded_extent: at stride 1 or without dilation, (R - 1)*dh // sh + 1 tap rows.
    padded_h = min(band_rows, out_h) + (filter_h - 1) * dh // sh
    padded_w = out_w + (filter_w - 1) * dw // sw
    n_filters, taps_g = w_mat.shape
    k_g = n_filters // groups
    rows = oh1 - oh0
    if transposed:
        padded_planes_transposed(x, n, planes_ws, pad_t, pad_l, padded_h, padded_w)
        wide = out_w * padded_h
    else:
        padded_planes(x, n, planes_ws, geo, padded_h, padded_w, oh0)
        wide = rows * padded_w
    if not transposed and out_w % (NN_VECTORS * VECTOR_BYTES // y.itemsize) == 0:
        # Output rows a whole number of the tiles' panels wide: the product computes each row's
        # OW outputs straight into y (its B rows' windows Wp apart in the planes), none of the
        # padded width's extra columns and no copy from a product on the padded width. AMD EPYC
        # Zen 3, float32, 2 threads, auto forward ms, medians of 9 alternating rounds:
        # first5x5 (32 wide) 1.48 -> 1.21, the 7x7 stride-2 stem (112 wide) 14.0 -> 13.4.
        p0, p1 = oh0 * out_w, oh1 * out_w
        for g in range(groups):
            gemm_nn_rows(
                w_mat[g * k_g : (g + 1) * k_g], planes_ws,
                tap_rows[g * taps_g : (g + 1) * taps_g], y[n, g * k_g : (g + 1) * k_g, p0:p1],
                False, out_w, padded_w, True,
            )  # fmt: skip
        for k in range(n_filters):
            shift = bias[k]
            dst = y[n, k, p0:p1]
            for q in range(p1 - p0):
                dst[q] += shift
        return
    ext = out_ws[: n_filters * wide].reshape(n_filters, wide)
    for g in range(groups):
        gemm_nn_rows(
            w_mat[g * k_g : (g + 1) * k_g], planes_ws, tap_rows[g * taps_g : (g + 1) * taps_g],
            ext[g * k_g : (g + 1) * k_g], False, 0, 0, True,
        )  # fmt: skip
    for k in range(n_filters):
        shift = bias[k]
        if transposed:
            dst = y[n, k]
            for ow in range(out_w):
                src = ext[k, ow * padded_h : ow * padded_h + out_h]
                for oh in range(out_h):
                    dst[oh * out_w + ow] = src[oh] + shift
            continue
        for i in range(rows):
            src = ext[k, i * padded_w : i * padded_w + out_w]
            dst = y[n, k, (oh0 + i) * out_w : (oh0 + i + 1) * out_w]
            for q in range(out_w):
                dst[q] = src[q] + shift


@njit(parallel=True, cache=True)
def fused_forward_kernel(
    x, w_mat, bias, has_bias, y, cols_ws, out_ws, groups, band_rows, pointwise, group, geo, segment,
    tap_rows, transposed, planes, index, segment_rows,
):  # fmt: skip
    """The whole forward pass in one parallel region: per band of output rows, the band's
    columns, one single-threaded GEMM per group and the bias, with no pass over the whole batch.

    When a band is the whole image, ``group`` images share a job: their columns side by side,
    so that small maps still give the GEMMs enough columns; a single image's GEMMs write ``y[n]``
    directly. When the layer is ``pointwise`` (1x1, stride 1, no padding), the image itself is
    the columns matrix, with no copy. The jobs (images, band) are split into
    ``cols_ws.shape[0]`` contiguous runs, one per lane, each with its own workspace rows; every
    output element comes from the same GEMM whatever the split, so the result does not depend on
    the number of lanes or threads.

    ``segment`` < OW (only with one-row bands of single images, see :func:`row_segment`): a job
    is a segment of ``segment`` output columns of a row, so that very wide rows (long 1-D
    signals) still get columns that fit in the cache. With ``segment_rows`` non-empty
    (:func:`segment_tap_rows`; ``w_mat`` packed), a segment builds no columns: the windows its
    taps read are copied into the lane's ``cols_ws`` row (:func:`segment_planes`) and the
    product reads its B rows from them in place, straight into ``y``.

    ``tap_rows`` non-empty (implicit GEMM, see :func:`implicit_plan`; a job is one image; the
    filters ``w_mat`` packed for the tiles, :func:`_packed_filters`): no columns. The image is
    copied into zero-padded planes in the lane's ``cols_ws`` row (:func:`padded_planes`;
    strided layers: one per channel and phase), and the output on the
    padded width, OH x Wp, is the product of the filters with rows that are windows of those
    planes, starting at ``tap_rows[(c*R + r)*S + s]`` (:func:`~.microkernel.gemm_nn_rows`); its
    first OW columns of each row are ``y``'s. With ``transposed``, the planes are stored
    transposed and the tap rows run down the columns (:func:`implicit_transposed`).

    ``index`` non-empty (:func:`column_table`): whole images' columns come from
    :func:`image_columns`, through the lane's row of ``planes``.
    """
    n_batch = x.shape[0]
    out_h, out_w = geo[2], geo[3]
    n_filters, taps_g = w_mat.shape
    taps = taps_g * groups
    bands = (out_h + band_rows - 1) // band_rows
    whole = bands == 1
    per_image = out_h * out_w
    blocks = (n_batch + group - 1) // group
    segments = (out_w + segment - 1) // segment
    jobs = blocks * bands * segments
    lanes = cols_ws.shape[0]
    for lane in prange(lanes):
        for job in range(jobs * lane // lanes, jobs * (lane + 1) // lanes):
            row_job = job // segments
            block = row_job // bands
            n = block * group
            images = min(group, n_batch - n)
            oh0 = (row_job - block * bands) * band_rows
            oh1 = min(out_h, oh0 + band_rows)
            width = (oh1 - oh0) * out_w
            if tap_rows.shape[0] > 0:
                implicit_image(x, w_mat, bias, y, cols_ws[lane], out_ws[lane], groups, n, oh0, oh1,
                               band_rows, geo, tap_rows, transposed)  # fmt: skip
                continue
            if segments > 1 and segment_rows.shape[0] > 0:
                ow0 = (job - row_job * segments) * segment
                width = min(out_w, ow0 + segment) - ow0
                length = segment + (geo[1] - 1) * geo[9]
                segment_planes(x, n, oh0, ow0, cols_ws[lane], geo, length)
                p0 = oh0 * out_w + ow0
                k_g = n_filters // groups
                for g in range(groups):
                    gemm_nn_rows(
                        w_mat[g * k_g : (g + 1) * k_g], cols_ws[lane],
                        segment_rows[g * taps_g : (g + 1) * taps_g],
                        y[n, g * k_g : (g + 1) * k_g, p0 : p0 + width], False, 0, 0, True,
                    )  # fmt: skip
                for k in range(n_filters):
                    shift = bias[k]
                    dst = y[n, k, p0 : p0 + width]
                    for q in range(width):
                        dst[q] += shift
                continue
            if segments > 1:
                ow0 = (job - row_job * segments) * segment
                width = min(out_w, ow0 + segment) - ow0
                cols = cols_ws[lane, : taps * width].reshape(taps, width)
                for c in range(x.shape[1]):
                    channel_columns(x, n, c, oh0, oh0 + 1, ow0, ow0 + width, cols, 0, geo)
                out = out_ws[lane, : n_filters * width].reshape(n_filters, width)
                _group_products(w_mat, cols, out, groups)
                p0 = oh0 * out_w + ow0
                for k in range(n_filters):
                    shift = bias[k]
                    for q in range(width):
                        y[n, k, p0 + q] = out[k, q] + shift
                continue
            if images > 1:
                columns = images * per_image
                cols = cols_ws[lane, : taps * columns].reshape(taps, columns)
                for i in range(images):
                    col0 = i * per_image
                    for c in range(x.shape[1]):
                        if index.shape[0] > 0:
                            image_columns(x, n + i, c, cols, col0, geo, planes[lane], index)
                        else:
                            channel_columns(x, n + i, c, 0, out_h, 0, out_w, cols, col0, geo)
                out = out_ws[lane, : n_filters * columns].reshape(n_filters, columns)
            else:
                if whole and index.shape[0] > 0 and not pointwise:
                    cols = cols_ws[lane, : taps * width].reshape(taps, width)
                    for c in range(x.shape[1]):
                        image_columns(x, n, c, cols, 0, geo, planes[lane], index)
                else:
                    cols = band_or_image_columns(x, n, oh0, oh1, cols_ws[lane], pointwise, geo)
                if whole:
                    out = y[n]
                else:
                    out = out_ws[lane, : n_filters * width].reshape(n_filters, width)
            _group_products(w_mat, cols, out, groups)
            p0 = oh0 * out_w
            for k in range(n_filters):
                shift = bias[k]  # zeros without a bias: `else 0` would promote float32
                if images > 1:
                    for i in range(images):
                        src = out[k, i * per_image : (i + 1) * per_image]
                        dst = y[n + i, k]
                        for q in range(per_image):
                            dst[q] = src[q] + shift
                elif whole:
                    if has_bias:
                        for q in range(width):
                            out[k, q] += shift
                else:
                    for q in range(width):
                        y[n, k, p0 + q] = out[k, q] + shift


@njit(cache=True, inline="always")
def _backward_band(
    grad_y, x, w_mat, grad_x, input_gradient, weight_gradient, acc, bias_acc, cols_ws, grad_ws,
    n, band, images, groups, band_rows, pointwise, whole, geo, own,
):  # fmt: skip
    """One band of :func:`fused_backward_kernel`: the band's columns and ``grad_y`` rows, one
    GEMM per group adding the band's grad-w into ``acc``, one for the gradient columns, then
    col2im into the image. A band that is the whole image uses ``grad_y[n]`` in place; a
    ``pointwise`` layer (1x1, stride 1, no padding) uses ``x[n]`` as its columns and writes its
    gradient columns straight into ``grad_x[n]``. With ``images`` > 1 (whole-image bands of
    small maps), images ``n``, ``n + 1``, ... share the GEMMs, side by side. Without
    ``weight_gradient`` (the input gradient alone, e.g. a transposed convolution's forward
    pass) neither the columns of ``x`` nor the grad-w and grad-b sums are computed, and ``x``
    is never read."""
    out_h, out_w = geo[2], geo[3]
    n_filters, taps_g = w_mat.shape
    taps = taps_g * groups
    k_g = n_filters // groups
    oh0 = band * band_rows
    oh1 = min(out_h, oh0 + band_rows)
    width = (oh1 - oh0) * out_w
    if images > 1:
        width = images * out_h * out_w
        cols = cols_ws[: taps * width].reshape(taps, width)
        grad = grad_ws[: n_filters * width].reshape(n_filters, width)
        per_image = out_h * out_w
        for i in range(images):
            if weight_gradient:
                for c in range(x.shape[1]):
                    channel_columns(x, n + i, c, 0, out_h, 0, out_w, cols, i * per_image, geo)
            for k in range(n_filters):
                src = grad_y[n + i, k]
                dst = grad[k, i * per_image : (i + 1) * per_image]
                for q in range(per_image):
                    dst[q] = src[q]
    else:
        if weight_gradient:
            cols = band_or_image_columns(x, n, oh0, oh1, cols_ws, pointwise, geo)
        elif pointwise:  # never read: the gradient columns go to grad_x[n]
            cols = grad_x[n].reshape(taps, width)
        else:  # room for the gradient columns
            cols = cols_ws[: taps * width].reshape(taps, width)
        if whole:
            grad = grad_y[n]
        else:
            grad = grad_ws[: n_filters * width].reshape(n_filters, width)
            p0 = oh0 * out_w
            for k in range(n_filters):
                for q in range(width):
                    grad[k, q] = grad_y[n, k, p0 + q]
    if weight_gradient:
        for k in range(n_filters):
            bias_acc[k] += row_sum(grad[k])
    if pointwise and input_gradient:
        grad_cols = grad_x[n].reshape(taps, width)
    else:
        # The columns are no longer needed once the grad-w product has them.
        grad_cols = cols
    for g in range(groups):
        filters = slice(g * k_g, (g + 1) * k_g)
        rows = slice(g * taps_g, (g + 1) * taps_g)
        if weight_gradient:
            if own:
                gemm_nn(grad[filters], cols[rows].T, acc[filters], True)
            else:
                gemm_nt_add(grad[filters], cols[rows], acc[filters])
        if input_gradient:
            if own_gemm_pays_transposed(taps_g, k_g, grad.shape[1], grad.itemsize):
                gemm_nn(w_mat[filters].T, grad[filters], grad_cols[rows], False)
            else:
                np.dot(w_mat[filters].T, grad[filters], grad_cols[rows])
    if input_gradient and not pointwise:
        for i in range(images):
            for c in range(grad_x.shape[1]):
                channel_col2im_add(cols, grad_x, n + i, c, oh0, oh1, i * out_h * out_w, geo)


@njit(parallel=True, cache=True)
def fused_backward_kernel(
    grad_y, x, w_mat, grad_x, input_gradient, weight_gradient, grad_w_lanes, grad_b_lanes, cols_ws,
    grad_ws, groups, band_rows, pointwise, geo, phases, phase, group, own,
):  # fmt: skip
    """grad-w and grad-b (per lane, in ``grad_w_lanes`` and the float64 ``grad_b_lanes``) and, if
    ``input_gradient``, grad-x in one parallel region, band by band (:func:`_backward_band`).

    ``phases == 0``: lane ``l`` of ``grad_w_lanes.shape[0]`` takes a fixed, contiguous run of
    images, zeroes its sums and its images' grad-x, and does all their bands, ``group`` images
    at a time when a band is a whole image; an image belongs to one lane, so its grad-x is
    race-free.

    ``phases > 0`` (for batches smaller than the lanes): the caller zeroes the sums and grad-x
    and calls once per ``phase`` in ``range(phases)``; a call does the bands ``b`` with
    ``b % phases == phase`` of every image, and lane ``l`` a contiguous run of those (image,
    band) jobs. Bands ``phases`` apart never reach the same rows of grad-x (the caller picks
    ``phases`` so), so the lanes of one call never write the same grad-x element.

    Either way the lane sums are added in lane order by the caller, and lanes, bands and phases
    depend on the geometry only, so the bits never depend on the number of threads.
    """
    n_batch = x.shape[0]
    out_h = geo[2]
    n_filters, taps_g = w_mat.shape
    bands = (out_h + band_rows - 1) // band_rows
    whole = bands == 1
    lanes = grad_w_lanes.shape[0]
    per_image = (bands - phase + phases - 1) // phases if phases > 0 else bands
    for lane in prange(lanes):
        acc = grad_w_lanes[lane]
        bias_acc = grad_b_lanes[lane]
        if phases == 0 and weight_gradient:
            for k in range(n_filters):
                bias_acc[k] = 0
                for t in range(taps_g):
                    acc[k, t] = 0
        if phases == 0:
            last = n_batch * (lane + 1) // lanes
            for n in range(n_batch * lane // lanes, last, group):
                images = min(group, last - n)
                if input_gradient and not pointwise:
                    grad_x[n : n + images] = 0
                for band in range(bands):
                    _backward_band(
                        grad_y, x, w_mat, grad_x, input_gradient, weight_gradient, acc,
                        bias_acc, cols_ws[lane],
                        grad_ws[lane], n, band, images, groups, band_rows, pointwise, whole,
                        geo, own,
                    )  # fmt: skip
        else:
            jobs = n_batch * per_image
            for job in range(jobs * lane // lanes, jobs * (lane + 1) // lanes):
                n = job // per_image
                band = phase + (job - n * per_image) * phases
                _backward_band(
                    grad_y, x, w_mat, grad_x, input_gradient, weight_gradient, acc, bias_acc,
                    cols_ws[lane],
                    grad_ws[lane], n, band, 1, groups, band_rows, pointwise, whole, geo, own,
                )  # fmt: skip


def geometry_args(geom: ConvGeometry) -> tuple[int, ...]:
    """The integer arguments of :func:`im2col_kernel` / :func:`col2im_kernel`."""
    return (
        geom.filter_height,
        geom.filter_width,
        geom.out_height,
        geom.out_width,
        geom.stride_h,
        geom.stride_w,
        geom.pad_top,
        geom.pad_left,
        geom.dilation_h,
        geom.dilation_w,
    )


def images_per_chunk(geom: ConvGeometry, itemsize: int) -> int:
    """Images per chunk so that one chunk's workspace stays under :data:`WORKSPACE_BYTES`."""
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    per_image = (taps + geom.out_channels) * geom.out_height * geom.out_width * itemsize
    return int(max(1, min(geom.batch, WORKSPACE_BYTES // per_image)))


class _Chunks:
    """Workspace and GEMM operands shared by forward and backward."""

    def __init__(self, w: np.ndarray, geom: ConvGeometry):
        self.geom = geom
        self.size = images_per_chunk(geom, w.itemsize)
        self.pixels = geom.out_height * geom.out_width
        taps = geom.in_channels * geom.filter_height * geom.filter_width
        columns = self.size * self.pixels
        self.cols = take("im2col.chunk_columns", (taps, columns), w.dtype)
        self.u = take("im2col.chunk_gemm", (geom.out_channels, columns), w.dtype)
        self.w_mat = w.reshape(geom.out_channels, -1)  # (K, C/G*R*S), rows grouped by group
        self.args = geometry_args(geom)

    def group_blocks(self):
        """Per group: (rows of the columns, rows of K) as slices."""
        taps_g = self.cols.shape[0] // self.geom.groups
        k_g = self.geom.out_channels_per_group
        for g in range(self.geom.groups):
            yield slice(g * taps_g, (g + 1) * taps_g), slice(g * k_g, (g + 1) * k_g)

    def ranges(self):
        for first in range(0, self.geom.batch, self.size):
            yield first, min(self.size, self.geom.batch - first)


def _chunked_forward(x, w, b, geom: ConvGeometry) -> np.ndarray:
    n, k, oh, ow = geom.output_shape
    ws = _Chunks(w, geom)
    y = np.empty((n, k, oh * ow), dtype=x.dtype)
    bias = b if b is not None else np.zeros(1, dtype=x.dtype)
    for first, count in ws.ranges():
        columns = count * ws.pixels
        cols, u = ws.cols[:, :columns], ws.u[:, :columns]
        im2col_kernel(x[first : first + count], cols, *ws.args)
        for taps, filters in ws.group_blocks():
            np.matmul(ws.w_mat[filters], cols[taps], out=u[filters])
        scatter_output_kernel(u, bias, b is not None, y[first : first + count])
    return y.reshape(n, k, oh, ow)


def _backward(grad_y, x, w, geom: ConvGeometry, input_gradient: bool):
    n, k, oh, ow = geom.output_shape
    ws = _Chunks(w, geom)
    grad_x = np.empty_like(x) if input_gradient else None
    grad_w = np.zeros_like(ws.w_mat)
    partial = take("im2col.chunk_grad_w_partial", ws.w_mat.shape, w.dtype)
    grad_flat = grad_y.reshape(n, k, oh * ow)
    for first, count in ws.ranges():
        columns = count * ws.pixels
        cols, grad_u = ws.cols[:, :columns], ws.u[:, :columns]
        im2col_kernel(x[first : first + count], cols, *ws.args)
        gather_grad_kernel(grad_flat[first : first + count], grad_u)
        for taps, filters in ws.group_blocks():
            # Chunk partials added in chunk order: the reduction never depends on threads.
            np.matmul(grad_u[filters], cols[taps].T, out=partial[filters])
            grad_w[filters] += partial[filters]
            if input_gradient:
                # The columns are no longer needed: overwrite them with the gradient columns.
                np.matmul(ws.w_mat[filters].T, grad_u[filters], out=cols[taps])
        if input_gradient:
            col2im_kernel(cols, grad_x[first : first + count], *ws.args)
    grad_b = grad_y.sum(axis=(0, 2, 3))
    return grad_x, grad_w.reshape(w.shape), grad_b


def _band_rows(geom: ConvGeometry, itemsize: int, lanes: int, per_lane_fixed: int) -> int:
    """Output rows per band: the band's columns near :data:`BAND_BYTES`, and all lanes'
    workspace (columns, GEMM result, plus ``per_lane_fixed`` bytes each) under
    :data:`WORKSPACE_BYTES`; at least one row."""
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    per_row = (taps + geom.out_channels) * geom.out_width * itemsize
    room = (WORKSPACE_BYTES // lanes - per_lane_fixed) // per_row
    rows = min(BAND_BYTES // (taps * geom.out_width * itemsize), room)
    # Thin GEMMs (few filters x few taps): bands small enough for BLAS's small-matrix kernels.
    gemm_size = geom.out_channels_per_group * taps // geom.groups
    small = SMALL_GEMM_SIZE // (gemm_size * geom.out_width)
    if small * geom.out_width >= SMALL_GEMM_MIN_PIXELS:
        rows = min(rows, small)
    return int(max(1, min(geom.out_height, rows)))


def _band_workspace(
    geom: ConvGeometry, dtype, lanes: int, band_rows: int, pointwise: bool, group: int = 1
):  # fmt: skip
    """Per lane: a band's columns (none for a pointwise layer, which reads the image itself) and
    a band's GEMM result (none when a band is one whole image: the GEMM writes the output);
    with ``group`` > 1 (whole images side by side, :func:`small_map_group`), both for the
    group's images."""
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    width = band_rows * geom.out_width * group
    cols = take("im2col.band_columns", (lanes, 0 if pointwise else taps * width), dtype)
    whole = band_rows >= geom.out_height and group == 1
    out = take("im2col.band_gemm", (lanes, 0 if whole else geom.out_channels * width), dtype)
    return cols, out


def _backward_lanes(geom: ConvGeometry, itemsize: int) -> int:
    """Lanes of the fused backward pass: up to :data:`BACKWARD_LANES`, fewer for large filters
    (each lane holds a grad-w sum, all within half of :data:`WORKSPACE_BYTES`, or, where that
    leaves fewer than two, within all of it: the chunked path that would run instead takes as
    much for its columns alone); 0 when not even two fit for a batch of several images (the
    chunked path runs then). ResNet's 16x512x7x7 3x3 (9.4 MB of float32 filters a lane), float32,
    2 threads: backward 35.4 ms chunked, 30.9 with two lanes.

    A function of the geometry only (never of the thread count), so the grad-w reduction order,
    and with it every bit of the result, is the same on any number of threads.
    """
    taps_g = geom.in_channels // geom.groups * geom.filter_height * geom.filter_width
    # Fewer images than lanes still get all the lanes: they split images into bands (phases in
    # fused_backward_kernel); a pointwise layer's band is its whole image.
    jobs = geom.batch if is_pointwise(geom) else max(geom.batch, SMALL_BATCH_LANES)
    per_lane = geom.out_channels * taps_g * itemsize
    lanes = lanes_that_fit(jobs, per_lane) or lanes_that_fit(jobs, per_lane, WORKSPACE_BYTES)
    if lanes == 0 and geom.batch == 1:
        lanes = lanes_that_fit(1, per_lane)
    return lanes


def lanes_that_fit(batch: int, per_lane_bytes: int, budget: int | None = None) -> int:
    """``min(BACKWARD_LANES, batch)`` lanes, or, when fewer fit in ``budget`` bytes (default:
    half of :data:`WORKSPACE_BYTES`) at ``per_lane_bytes`` each, the largest power of two that
    fits (so that 2 or 4 threads share them evenly); 0 (the chunked path) when that is 1 and
    the batch has more than one image."""
    lanes = min(BACKWARD_LANES, batch)
    budget = WORKSPACE_BYTES // 2 if budget is None else budget
    fit = budget // max(1, per_lane_bytes)
    if fit < lanes:
        lanes = 1 << (fit.bit_length() - 1) if fit > 0 else 0
        if lanes < 2:
            return 0
    return lanes


def is_pointwise(geom: ConvGeometry) -> bool:
    """1x1 filters, stride 1, no padding: each image is its own columns matrix."""
    return (
        geom.filter_height == geom.filter_width == 1
        and geom.stride_h == geom.stride_w == 1
        and geom.pad_top == geom.pad_bottom == geom.pad_left == geom.pad_right == 0
    )


#: Columns that a forward GEMM should get at least, where small maps allow it by putting
#: several images side by side: single-threaded sgemm of 512 filters x 4608 taps ran at 113
#: GFLOP/s on one 7x7 image (49 columns) and 153-163 on 196-392 columns.
MIN_GEMM_COLUMNS = 196

#: ... within this much workspace per lane for the grouped columns and GEMM result (grouping is
#: worth more than the L2 residency that BAND_BYTES keeps).
GROUP_BYTES = 4 * 2**20


def small_map_group(geom: ConvGeometry, itemsize: int, band_rows: int, jobs_per_image: int) -> int:
    """Images per GEMM: 1, unless a band is a whole image whose GEMMs would get fewer than
    :data:`MIN_GEMM_COLUMNS` columns; then enough images for that, within :data:`GROUP_BYTES`
    and at most ``jobs_per_image`` images (so that enough jobs remain)."""
    oh, ow = geom.out_height, geom.out_width
    if is_pointwise(geom) or band_rows < oh or oh * ow >= MIN_GEMM_COLUMNS:
        return 1
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    per_image = (taps + geom.out_channels) * oh * ow * itemsize
    group = min(-(-MIN_GEMM_COLUMNS // (oh * ow)), GROUP_BYTES // per_image, jobs_per_image)
    return int(max(1, group))


def forward_plan(geom: ConvGeometry, itemsize: int) -> tuple[int, int]:
    """``(band_rows, group)`` of :func:`fused_forward_kernel`: a function of the geometry only
    (see :data:`PLAN_LANES`). ``group`` > 1 only when a band is a whole image whose GEMMs would
    get fewer than :data:`MIN_GEMM_COLUMNS` columns, and only as far as the batch still gives at
    least 4 jobs."""
    if is_pointwise(geom):
        return geom.out_height, 1
    implicit_rows = implicit_band_rows(geom, itemsize)
    if implicit_rows:
        return implicit_rows, 1
    band_rows = _band_rows(geom, itemsize, PLAN_LANES, 0)
    # At least 4 jobs remain, so that 2-4 cores stay busy.
    group = small_map_group(geom, itemsize, band_rows, geom.batch // 4)
    oh = geom.out_height
    whole_group = small_map_group(geom, itemsize, oh, geom.batch // 4)
    if band_rows < oh and whole_group > 1:
        # A small map whose one image's columns exceed BAND_BYTES: whole images side by side
        # all the same (within GROUP_BYTES), not bands of a few rows, whose GEMMs got a few
        # dozen columns. ResNet's 16x512x7x7 3x3, float64 (1.8 MB of columns an image), 2
        # threads, AMD EPYC Zen 3: bands of 4 rows (28 columns) 72 ms, 2 images (98) 46 ms.
        return oh, whole_group
    if (
        band_rows < oh
        and geom.batch >= 4
        and implicit_image_bytes(geom, itemsize) <= IMPLICIT_IMAGE_BYTES
        and whole_group == 1
        and implicit_applies(geom, oh, 1, geom.out_width, itemsize)
    ):
        # Bands are sized for their columns; implicit GEMM builds none (see
        # IMPLICIT_IMAGE_BYTES).
        return oh, 1
    return band_rows, group


#: The fewest output columns :func:`row_segment` cuts a row into: narrower products would
#: spend more on each GEMM's edges and calls than they gain in cache.
MIN_SEGMENT = 256


def row_segment(geom: ConvGeometry, itemsize: int, band_rows: int, group: int) -> int:
    """Output columns per job of :func:`fused_forward_kernel`: OW (whole rows), unless a band is
    one row of one image whose columns alone exceed :data:`BAND_BYTES` (long 1-D signals:
    16x64x16000 with kernel 9 has 37 MB of columns per row); then segments whose columns fit
    in it, at least :data:`MIN_SEGMENT` wide. A function of the geometry only."""
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    out_w = geom.out_width
    if is_pointwise(geom) or band_rows > 1 or group > 1 or taps * out_w * itemsize <= BAND_BYTES:
        return out_w
    return int(min(out_w, max(MIN_SEGMENT, BAND_BYTES // (taps * itemsize))))


def segment_tap_rows(geom: ConvGeometry, segment: int, itemsize: int) -> np.ndarray:
    """Where tap ``(c*R + r)*S + s``'s row of a row segment's columns starts in the windows of
    :func:`segment_planes` (``(c*R + r)*L + s*dw``, ``L`` = ``segment + (S - 1)*dw``), when
    :func:`fused_forward_kernel` runs segments by implicit GEMM: rows cut into segments
    (:func:`row_segment`), stride 1 along them, a product that numbaconv's own GEMM runs (as
    for :func:`implicit_plan`). Else empty."""
    if not SEGMENT_PLANES or segment >= geom.out_width or geom.stride_w != 1:
        return np.empty(0, dtype=np.int64)
    taps_g = geom.in_channels // geom.groups * geom.filter_height * geom.filter_width
    if not own_gemm_size_pays.py_func(geom.out_channels_per_group, taps_g, segment, itemsize):
        return np.empty(0, dtype=np.int64)
    length = segment_window(geom, segment)
    planes = np.arange(geom.in_channels * geom.filter_height, dtype=np.int64) * length
    offsets = np.arange(geom.filter_width, dtype=np.int64) * geom.dilation_w
    return (planes[:, None] + offsets[None, :]).reshape(-1)


def segment_window(geom: ConvGeometry, segment: int) -> int:
    """Elements per channel and filter row in :func:`segment_planes`: a segment of ``segment``
    outputs plus the dilated filter's reach along the row."""
    return segment + (geom.filter_width - 1) * geom.dilation_w


#: Segments of rows run implicit GEMM (:func:`segment_tap_rows`); False builds their columns, as
#: before (for side-by-side timing). The audio layer (16x64x16000 -> 64, kernel 9), AMD EPYC Zen
#: 4, 2 threads, forward ms, alternating in one process, medians of 5: columns -> windows float32
#: 121 -> 103, float64 237 -> 197; segments of 256 to 2000 columns all 98-103 (4000: 109), so
#: :func:`row_segment` stays sized for the columns.
SEGMENT_PLANES = True


#: Implicit GEMM computes OH x Wp outputs for OH x OW (OW x Hp for OW x OH on transposed
#: planes): at most this share of them may be the padding's (see :func:`implicit_plan`).
IMPLICIT_MAX_WASTE = 0.25


#: Whole images run implicit GEMM, rather than the bands :func:`_band_rows` sizes for their
#: columns, where their padded planes and product take at most this many bytes per lane (and
#: the batch gives at least 4 jobs): im2col, float32, 2 threads, forward ms, bands of columns
#: against whole images: first5x5 (32x3x32x32, 32 5x5 filters; 13-row bands cut for BLAS's
#: small-matrix kernels) 1.22-1.36 against 0.88-0.89, cifar (64x32x32x32 -> 64) 13.5-13.8
#: against 10.0-10.4, resnet3x3 (16x64x56x56, 1.7 MB) 18.0-18.4 against 14.8-15.2,
#: 16x256x14x14 17.1-17.4 against 13.3-13.7, DeepLab's 4x256x28x28 dilation 2 (1.9 MB)
#: 15.8-16.1 against 13.9; float64: Inception's 16x128x17x17 1x7 9.5-9.7 against 7.9-8.2,
#: 16x256x14x14 33.2-33.4 against 27.2-27.9.
IMPLICIT_IMAGE_BYTES = 2 * 2**20


def _padded_extent(geom: ConvGeometry, band_rows: int = 0) -> tuple[int, int]:
    """Height and width of a padded plane of implicit GEMM: the output's (or a band's
    ``band_rows``) plus the rows (columns) of a filter's taps in one plane less one: at stride 1
    the dilated filter's extent, at stride ``s`` (undilated, see :func:`padded_planes`)
    ``ceil(R / s)``."""
    return (
        (band_rows or geom.out_height)
        + (geom.filter_height - 1) * geom.dilation_h // geom.stride_h,
        geom.out_width + (geom.filter_width - 1) * geom.dilation_w // geom.stride_w,
    )


def plane_phases(geom: ConvGeometry) -> tuple[int, int]:
    """Phases per axis of a channel's planes in implicit GEMM (:func:`padded_planes`): 1 at
    stride 1; at stride ``s`` those that some tap reads, ``min(s, R)``."""
    return min(geom.stride_h, geom.filter_height), min(geom.stride_w, geom.filter_width)


def implicit_transposed(geom: ConvGeometry) -> bool:
    """Whether implicit GEMM runs on transposed planes (rows along the height): when fewer of the
    outputs computed on the padded height than on the padded width would be the padding's. On
    the normal planes the padded width's extra columns are computed and thrown away, the padded
    height costs only plane rows; transposed, the other way round. Inception's 1x7 on 17x17 maps:
    6 of every 23 computed outputs wasted on the normal planes, none on the transposed ones.
    Stride 1 only (strided layers' phase planes are never transposed)."""
    if geom.stride_h != 1 or geom.stride_w != 1:
        return False
    padded_h, padded_w = _padded_extent(geom)
    return (padded_h - geom.out_height) * padded_w < (padded_w - geom.out_width) * padded_h


def _transposed_planes(geom: ConvGeometry, band_rows: int) -> bool:
    """:func:`implicit_transposed`, for whole images only (bands of rows keep normal planes)."""
    return band_rows >= geom.out_height and implicit_transposed(geom)


def implicit_workspace(geom: ConvGeometry, band_rows: int = 0) -> tuple[int, int]:
    """Elements of one lane's workspace for implicit GEMM on whole images: the padded planes
    (with room for the last tap's row, which reaches ``(S - 1)*dw`` past them, ``(R - 1)*dh``
    when transposed: zeros, never in y), and the width of the product (per filter: OH x Wp, or
    OW x Hp transposed); for bands of ``band_rows`` output rows (0: whole images), a band's."""
    rows = band_rows or geom.out_height
    padded_h, padded_w = _padded_extent(geom, band_rows)
    phases_h, phases_w = plane_phases(geom)
    planes = geom.in_channels * phases_h * phases_w * padded_h * padded_w
    if _transposed_planes(geom, rows):
        return planes + padded_h - geom.out_height, geom.out_width * padded_h
    return planes + padded_w - geom.out_width, rows * padded_w


def implicit_image_bytes(geom: ConvGeometry, itemsize: int, band_rows: int = 0) -> int:
    """Bytes of :func:`implicit_workspace`: the planes and all filters' product."""
    planes, wide = implicit_workspace(geom, band_rows)
    return (planes + geom.out_channels * wide) * itemsize


#: Jobs (image, band of rows) that implicit GEMM cuts a batch of fewer than
#: :data:`SMALL_BATCH_LANES` images into (:func:`implicit_band_rows`): enough for 2-4 cores and
#: a function of the geometry only.
IMPLICIT_BAND_JOBS = 8


def implicit_band_rows(geom: ConvGeometry, itemsize: int) -> int:
    """Output rows per band where implicit GEMM runs bands of rows, else 0: in the images of a
    small batch (fewer than :data:`SMALL_BATCH_LANES` images, where whole images would leave
    cores idle), at least :data:`IMPLICIT_BAND_JOBS` jobs; in larger batches, only where a
    whole image's planes and product exceed :data:`IMPLICIT_IMAGE_BYTES`, the largest bands
    (halving) that fit. Each band's planes and product within :data:`IMPLICIT_IMAGE_BYTES`, and
    a band as :func:`_implicit_feasible` asks.

    Larger batches (AMD EPYC Zen 3, AVX2, 2 threads, ``auto``, forward ms, medians of 7
    alternating rounds in long-lived processes, bands of columns on BLAS -> implicit bands):
    float32 8x3x224x224 7x7 stride-2 stem 19.2 -> 14.4 (bands of 28 rows), float64 34.4 ->
    29.3 (14 rows); float64 ResNet's 16x64x56x56 3x3 stride 2 (14 rows) 28.0 -> 28.9 with the
    panels copied by slices, 34.0 -> 32.0 with :func:`~.microkernel.copy_panel_rows` (the
    machine slower by then); float64 DeepLab's 4x256x28x28 dilation 2, whose grad-x runs as
    this forward pass (:func:`input_gradient_as_forward`), backward 169.6 -> 173.4.

    Measured (AMD EPYC Zen 5, 2 threads, one process, the two alternating, medians of 7
    rounds, forward ms, bands of columns -> implicit bands): float32 U-Net's 1x32x256x256 3x3
    5.35 -> 4.28, a 1x3x224x224 7x7 stride-2 stem 1.06-1.11 -> 0.73-0.76, 1x64x128x128 3x3
    3.93 -> 3.35, 1x256x14x14 3x3 0.83 -> 0.76, 2x128x28x28 3x3 1.36 -> 1.30, 1x128x28x28 3x3
    0.77 -> 0.77; float64 8.84 -> 7.30, 1.64 -> 1.43, 6.96 -> 6.18, 1.43 -> 1.33, 1x128x28x28
    1.30 -> 1.33. (``auto`` runs Winograd on such 3x3 layers: still faster, or a draw.)"""
    oh = geom.out_height
    if geom.batch >= SMALL_BATCH_LANES:
        # Larger batches: whole images where they fit (forward_plan), else the largest bands
        # that do (a 7x7 stride-2 stem's 224x224 images).
        if implicit_image_bytes(geom, itemsize) <= IMPLICIT_IMAGE_BYTES:
            return 0
        rows = oh
    else:
        bands = -(-IMPLICIT_BAND_JOBS // geom.batch)
        rows = -(-oh // bands)
    # Halved until they fit, and until the product's rows are short enough for the micro-kernel
    # (own_gemm_size_pays: a 256-wide map gives 8 bands of 32 rows, 33 KB a row in float32).
    while rows > 1 and (
        implicit_image_bytes(geom, itemsize, rows) > IMPLICIT_IMAGE_BYTES
        or not _implicit_feasible(geom, rows, itemsize)
    ):
        rows = -(-rows // 2)
    fits = implicit_image_bytes(geom, itemsize, rows) <= IMPLICIT_IMAGE_BYTES
    return rows if fits and _implicit_feasible(geom, rows, itemsize) else 0


def _implicit_feasible(geom: ConvGeometry, band_rows: int, itemsize: int) -> bool:
    """Whether bands of ``band_rows`` output rows (whole images: OH) can run implicit GEMM:
    each tap's window a run of one plane (see :func:`implicit_plan`), a product that
    numbaconv's own GEMM runs, at most :data:`IMPLICIT_MAX_WASTE` of it on the padding."""
    oh, ow = geom.out_height, geom.out_width
    strided = geom.stride_h != 1 or geom.stride_w != 1
    # A strided 1x1 filter's one plane would be its columns: nothing to gain.
    filter_1x1 = geom.filter_height == geom.filter_width == 1
    if (strided and (geom.dilation_h != 1 or geom.dilation_w != 1 or filter_1x1)) or is_pointwise(
        geom
    ):
        return False
    padded_h, padded_w = _padded_extent(geom, band_rows)
    # The product's rows (the output's on the padded width, or its columns on the padded height)
    # and the share of their length that is the padding's.
    row, useful = (padded_h, oh) if _transposed_planes(geom, band_rows) else (padded_w, ow)
    taps_g = geom.in_channels // geom.groups * geom.filter_height * geom.filter_width
    _, wide = implicit_workspace(geom, band_rows)
    pays = own_gemm_size_pays.py_func(geom.out_channels_per_group, taps_g, wide, itemsize)
    return bool(pays) and (row - useful) <= IMPLICIT_MAX_WASTE * row


def implicit_applies(
    geom: ConvGeometry, band_rows: int, group: int, segment: int, itemsize: int
) -> bool:
    """Whether :func:`fused_forward_kernel` runs implicit GEMM (see :func:`implicit_plan`): on
    whole images, or on the bands of :func:`implicit_band_rows`."""
    oh, ow = geom.out_height, geom.out_width
    if group != 1 or segment < ow:
        return False
    if band_rows < oh and band_rows != implicit_band_rows(geom, itemsize):
        return False
    return _implicit_feasible(geom, band_rows, itemsize)


def implicit_plan(
    geom: ConvGeometry, band_rows: int, group: int, segment: int, itemsize: int
) -> np.ndarray:
    """The start of each tap's row in the padded planes (int64, one per row of the columns,
    ``(c*R + r)*S + s``), when :func:`fused_forward_kernel` runs implicit GEMM; else empty.

    Implicit GEMM replaces the columns of small maps (whole-image bands of single images),
    whose rows are shorter than a vector and cost as much to build as a third of the GEMM
    (16x256x14x14 3x3: 9.2 ms of columns against 24.7 ms of GEMM on one core). Each tap's
    window of a padded plane must be a run of consecutive elements on the padded width (or
    height on transposed planes: :func:`implicit_transposed`): so stride 1, or a strided
    undilated filter on phase planes (:func:`padded_planes`), not 1x1 (its one plane would be
    its columns). It needs too a product that numbaconv's own GEMM runs (``own_gemm_size_pays``,
    on every target), and at most :data:`IMPLICIT_MAX_WASTE` of the computed outputs on the
    padding.

    Strided layers, measured (AMD EPYC Zen 5, 2 threads, OpenBLAS's own kernel choice, one
    process, columns and implicit alternating, medians of 5 rounds of 9 calls, forward ms,
    columns -> implicit): float32 ResNet's 16x64x56x56 3x3 stride 2 7.94 -> 7.17 (7.36 -> 6.25
    in another run), 16x128x28x28 3x3 6.33 -> 6.35, 32x3x64x64 5x5 1.26 -> 0.69, 16x64x32x32
    4x4 3.98 -> 3.66, 8x64x64x64 5x5 8.88 -> 6.01; float64 16x128x28x28 3x3 11.48 -> 10.90,
    32x3x64x64 5x5 1.56 -> 1.20, 16x64x32x32 4x4 6.98 -> 6.11. Not taken: DCGAN's grad-x
    (16x128x16x16 4x4 stride 2, 64 outputs an image: images grouped per GEMM instead), 4.10
    against 4.63 implicit; a 1x1 stride-2 layer drew (0.88 / 0.94)."""
    if not implicit_applies(geom, band_rows, group, segment, itemsize):
        return np.empty(0, dtype=np.int64)
    band_rows = min(band_rows, geom.out_height)
    padded_h, padded_w = _padded_extent(geom, band_rows)
    dh, dw = geom.dilation_h, geom.dilation_w
    c, r, s = np.meshgrid(
        np.arange(geom.in_channels), np.arange(geom.filter_height), np.arange(geom.filter_width),
        indexing="ij",
    )  # fmt: skip
    if _transposed_planes(geom, band_rows):
        rows = c * (padded_h * padded_w) + s * dw * padded_h + r * dh
    else:
        # At stride 1 (phases 1 x 1): row r*dh, column s*dw of channel c's plane; at stride s
        # (undilated): row r // sh, column s // sw of phase (r % sh, s % sw)'s plane.
        sh, sw = geom.stride_h, geom.stride_w
        phases_h, phases_w = plane_phases(geom)
        plane = ((c * phases_h + (r * dh) % sh) * phases_w + (s * dw) % sw) * padded_h * padded_w
        rows = plane + (r * dh) // sh * padded_w + (s * dw) // sw
    return rows.reshape(-1).astype(np.int64)


#: Whole images' columns come from :func:`image_columns` (a padded plane and an index table, one
#: gather per tap) where output rows are narrower than this or strided; else from row copies
#: (:func:`channel_columns`), whose unit-stride copies of wide rows are vector loops. Whole
#: layers, float32, ms, row copies -> table (same machine, quiet): ResNet's 16x512x7x7 3x3
#: forward 12.8 -> 10.8, DCGAN's transposed backward 8.0 -> 6.9, 2x512x7x7 backward 7.9 -> 7.2,
#: 1x128x28x28 backward and the mnist layer unchanged; float64 within 3 % both ways. Measured,
#: the whole batch's columns, float32, 2 threads (AMD EPYC Zen 5, alongside another job), ms,
#: row copies -> table: 16x512x7x7 3x3 13.2 -> 1.9 (2.2 -> 1.5 on a quiet machine),
#: 16x128x16x16 4x4 stride 2 6.6 -> 0.8, 16x64x56x56 3x3 stride 2 15.6 -> 8.3, 16x64x28x28 3x3
#: 8.6 -> 7.5, 1x128x28x28 0.29 -> 0.30; 16x64x56x56 3x3 26.1 -> 28.0 (lost).
#: A 1x1 filter reads its window once, so copying the window into a plane first only adds a pass:
#: never the table there. ResNet's 16x64x56x56 1x1 stride-2 shortcut, forward, 2 threads, AMD EPYC
#: Zen 4, table -> row copies (with :data:`~._loops.STRIDE2_BLOCK`): float32 2.09 -> 1.69 ms,
#: float64 3.89 -> 3.25 (before those blocks, row copies lost: 2.19 -> 2.84).
TABLE_MAX_WIDTH = 16


@functools.lru_cache(maxsize=64)
def column_table(geom: ConvGeometry) -> np.ndarray:
    """The index table of :func:`image_columns` (int64, one entry per output pixel: its offset
    in the padded window, ``(p // OW)*sh*Wp + (p % OW)*sw``), or an empty array where whole
    images' columns come from row copies (:data:`TABLE_MAX_WIDTH`). Cached per geometry (4.5 us
    of a 33 us call of a small layer; the kernels only read it)."""
    one_tap = geom.filter_height == geom.filter_width == 1
    if one_tap or (geom.out_width >= TABLE_MAX_WIDTH and geom.stride_w == 1):
        return np.empty(0, dtype=np.int64)
    _, plane_w = _table_plane(geom)
    p = np.arange(geom.out_height * geom.out_width, dtype=np.int64)
    return (p // geom.out_width) * geom.stride_h * plane_w + (p % geom.out_width) * geom.stride_w


def _table_plane(geom: ConvGeometry) -> tuple[int, int]:
    """Height and width of the padded window that :func:`image_columns` copies a channel into."""
    return (
        (geom.out_height - 1) * geom.stride_h + (geom.filter_height - 1) * geom.dilation_h + 1,
        (geom.out_width - 1) * geom.stride_w + (geom.filter_width - 1) * geom.dilation_w + 1,
    )


def _table_workspace(
    name: str, geom: ConvGeometry, jobs: int, dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``(planes, index)`` for kernels that build whole images' columns: a plane per job (the
    workspace ``name``) and :func:`column_table`'s index (planes of one element where the index
    is empty)."""
    index = column_table(geom)
    plane_h, plane_w = _table_plane(geom)
    size = plane_h * plane_w if index.shape[0] else 1
    return take(name, (jobs, size), dtype), index


def _packed_filters(w_mat: np.ndarray, groups: int) -> np.ndarray:
    """The filters laid out for the tiles (:func:`~.microkernel.pack_rows`, group by group),
    for implicit GEMM, whose every job's products read all of them again."""
    packed = np.empty(w_mat.shape, dtype=w_mat.dtype)
    pack_rows(w_mat, packed, groups)
    return packed


def forward(x, w, b, geom: ConvGeometry) -> np.ndarray:
    if not blas_inside_kernels() or geom.batch == 0:
        return _chunked_forward(x, w, b, geom)
    n, k, oh, ow = geom.output_shape
    pointwise = is_pointwise(geom)
    # The bands depend on the geometry only (see PLAN_LANES); the thread count only on how many
    # lanes run them.
    band_rows, group = forward_plan(geom, x.itemsize)
    segment = row_segment(geom, x.itemsize, band_rows, group)
    jobs = -(-n // group) * -(-oh // band_rows) * -(-ow // segment)
    lanes = max(1, min(numba.get_num_threads(), jobs, PLAN_LANES))
    tap_rows = implicit_plan(geom, band_rows, group, segment, x.itemsize)
    transposed = _transposed_planes(geom, band_rows)
    segment_rows = segment_tap_rows(geom, segment, x.itemsize)
    if tap_rows.shape[0]:
        plane_room, wide = implicit_workspace(geom, min(band_rows, oh))
        cols = take("im2col.band_columns", (lanes, plane_room), x.dtype)
        out = take("im2col.band_gemm", (lanes, k * wide), x.dtype)
    elif segment < ow:
        taps = geom.in_channels * geom.filter_height * geom.filter_width
        room = taps * segment
        if segment_rows.shape[0]:  # the windows, no columns
            room = geom.in_channels * geom.filter_height * segment_window(geom, segment)
        cols = take("im2col.band_columns", (lanes, room), x.dtype)
        out = take("im2col.band_gemm", (lanes, k * segment), x.dtype)
    else:
        cols, out = _band_workspace(geom, x.dtype, lanes, band_rows, pointwise, group)
    y = np.empty((n, k, oh * ow), dtype=x.dtype)
    bias = b if b is not None else np.zeros(k, dtype=x.dtype)
    w_mat = w.reshape(k, -1)
    if tap_rows.shape[0] or segment_rows.shape[0]:
        w_mat = _packed_filters(w_mat, geom.groups)
    with single_threaded_blas():
        fused_forward_kernel(
            x, w_mat, bias, b is not None, y, cols, out, geom.groups, band_rows, pointwise,
            group, geometry_args(geom), segment, tap_rows, transposed,
            *_table_workspace("im2col.forward_planes", geom, lanes, x.dtype), segment_rows,
        )  # fmt: skip
    return y.reshape(n, k, oh, ow)


#: The backward pass's bands have at least this many output pixels (where the workspace allows;
#: :func:`_backward_band_rows`): each band's grad-w GEMM reads and writes all of its lane's
#: K x C*R*S sum for a product only a band deep, so narrow bands made it memory-bound. DeepLab's
#: 4x256x33x33 dilation-12 layer had bands of 3 rows (99 pixels, BAND_BYTES), 11 an image, each
#: passing over 2.4 MB of sums. float32, 2 threads, backward ms by BAND_BYTES 1 / 2 / 4 / 8 MiB:
#: 59.8 / 47.5 / 45.6 / 44.6; ResNet's 16x64x56x56 stride 2 (448-pixel bands) 18.9 / 18.2 / 18.1
#: / 18.2, Inception's 16x128x17x17 1x7 (whole images) 10.5 / 10.6 / 10.5 / 10.1.
MIN_BACKWARD_BAND_PIXELS = 256


def _backward_band_rows(geom: ConvGeometry, itemsize: int, lanes: int) -> int:
    """Output rows per band of the fused backward pass: :func:`_band_rows`, or more, up to
    :data:`MIN_BACKWARD_BAND_PIXELS` pixels, while all lanes' columns, GEMM results and sums
    stay under :data:`WORKSPACE_BYTES`."""
    sums = geom.out_channels * geom.in_channels // geom.groups * itemsize
    sums *= geom.filter_height * geom.filter_width
    rows = _band_rows(geom, itemsize, lanes, sums)
    wanted = min(geom.out_height, -(-MIN_BACKWARD_BAND_PIXELS // geom.out_width))
    if rows >= wanted:
        return rows
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    per_row = (taps + geom.out_channels) * geom.out_width * itemsize
    room = (WORKSPACE_BYTES // lanes - sums) // per_row
    return int(max(rows, min(wanted, room)))


def _band_phases(geom: ConvGeometry, band_rows: int) -> int:
    """The fewest phases such that bands that many apart never reach the same input row:
    band ``b`` reaches ``(band_rows - 1)*sh + (R - 1)*dh + 1`` rows from its first."""
    span = (band_rows - 1) * geom.stride_h + (geom.filter_height - 1) * geom.dilation_h + 1
    return -(-span // (band_rows * geom.stride_h))


def _fused_backward(
    grad_y, x, w, geom: ConvGeometry, lanes: int, input_gradient: bool, weight_gradient: bool = True
):  # fmt: skip
    """Without ``weight_gradient``, ``x`` may be None (it is never read) and the grad-w and
    grad-b returned are None."""
    n, k, oh, ow = geom.output_shape
    if x is None:
        # A stand-in: the kernel reads only its batch size, so it holds no elements. (A
        # full-size np.empty, never touched, still changed the allocator's pattern: called
        # directly, U-Net's 2x2 up-convolution grad-x took 6.1 ms against 4.3 with no such
        # allocation, from fresh pages faulted on each call. Through conv_transpose2d, which
        # allocates more, it made no difference measurable here.)
        x = np.empty((geom.batch, 0, 0, 0), dtype=w.dtype)
    w_mat = w.reshape(k, -1)
    # (No sums for grad-x alone: the kernel neither zeroes nor reads them.)
    sums_shape = (lanes, *w_mat.shape) if weight_gradient else (lanes, 0, 0)
    sums = take("im2col.grad_w_lanes", sums_shape, x.dtype)
    # float64 for every dtype: sums of up to N*OH*OW values
    bias_sums = take("im2col.grad_b_lanes", (lanes, k), np.float64)
    pointwise = is_pointwise(geom)
    band_rows = oh if pointwise else _backward_band_rows(geom, x.itemsize, lanes)
    # A batch smaller than the lanes: lanes share out (image, band) jobs, in phases.
    phases = 0
    if n < lanes and not pointwise:
        band_rows = min(band_rows, -(-oh // -(-lanes // n)))  # at least `lanes` jobs
        phases = _band_phases(geom, band_rows)
    # Small maps: a lane's images side by side in the GEMMs, as in the forward pass.
    group = 1 if phases else small_map_group(geom, x.itemsize, band_rows, n // lanes)
    cols, grads = _band_workspace(geom, x.dtype, lanes, band_rows, pointwise, group)
    if phases:
        sums[:] = 0
        bias_sums[:] = 0
        grad_x = (
            np.zeros(geom.input_shape, x.dtype)
            if input_gradient
            else np.empty((1, 1, 1, 1), x.dtype)
        )
    else:
        grad_x = (
            np.empty(geom.input_shape, x.dtype)
            if input_gradient
            else np.empty((1, 1, 1, 1), x.dtype)
        )
    for phase in range(max(1, phases)):
        with single_threaded_blas():
            fused_backward_kernel(
                grad_y.reshape(n, k, oh * ow), x, w_mat, grad_x, input_gradient, weight_gradient,
                sums, bias_sums, cols, grads, geom.groups, band_rows, pointwise,
                geometry_args(geom), phases, phase, group, own_weight_gradient(),
            )  # fmt: skip
    if not weight_gradient:
        return grad_x, None, None
    grad_w = sums[0].copy()
    grad_b = bias_sums[0].copy()
    for lane in range(1, lanes):  # in lane order: the same bits on any number of threads
        grad_w += sums[lane]
        grad_b += bias_sums[lane]
    grad_b = grad_b.astype(x.dtype)
    return (grad_x if input_gradient else None), grad_w.reshape(w.shape), grad_b


#: Blocks of input channels (their taps in grad-w, their planes in grad-x) in the blocked
#: backward pass for small batches (:func:`blocked_backward`): a fixed number, so the bits never
#: depend on the thread count, and enough for 2-4 cores.
BLOCKED_JOBS = 4

#: Filters per tile of :func:`blocked_input_gradient_kernel`'s transposition: the tile reads one
#: cache line from each of its filters' rows while it writes whole lines of the transpose, and
#: those lines stay in L1 as the taps advance.
TRANSPOSE_TILE = 16


@njit(parallel=True, cache=True)
def blocked_weight_gradient_kernel(
    grad_y, x, grad_t, cols, grad_w, grad_b, block, bias_block, geo, own, planes, index
):  # fmt: skip
    """grad-w by blocks of ``block`` input channels over the whole batch at once: a job builds
    its channels' rows of the columns of every image, then one product over all the batch's
    pixels, ``grad_w[:, taps] = grad_t @ cols[taps].T``, ``grad_t`` being ``grad_y`` as
    (K, N*P) (gathered here when N > 1; with one image the caller passes ``grad_y[0]``); and
    ``grad_b`` (float64) for a block of ``bias_block`` filters. Each job owns its elements, so
    nothing is reduced across lanes. The product runs on the micro-kernel when ``own``
    (:func:`~.microkernel.own_weight_gradient`), else on BLAS. (Blocks of filters instead gave
    BLAS products of 32 rows, single-threaded 1.8x slower than blocks of taps on ResNet's
    1x128x28x28 layer.)"""
    n_batch, n_filters, pixels = grad_y.shape
    if n_batch > 1:
        for k in prange(n_filters):
            for n in range(n_batch):
                dst = grad_t[k, n * pixels : (n + 1) * pixels]
                src = grad_y[n, k]
                for q in range(pixels):
                    dst[q] = src[q]
    n_chan = x.shape[1]
    taps_c = geo[0] * geo[1]
    for job in prange(-(-n_chan // block)):
        c0 = job * block
        c1 = min(n_chan, c0 + block)
        t0, t1 = c0 * taps_c, c1 * taps_c
        for n in range(n_batch):
            for c in range(c0, c1):
                if index.shape[0] > 0:  # column_table
                    image_columns(x, n, c, cols, n * pixels, geo, planes[job], index)
                else:
                    channel_columns(x, n, c, 0, geo[2], 0, geo[3], cols, n * pixels, geo)
        if own:
            gemm_nn(grad_t, cols[t0:t1].T, grad_w[:, t0:t1], False)
        else:
            grad_w[:, t0:t1] = 0
            gemm_nt_add(grad_t, cols[t0:t1], grad_w[:, t0:t1])
        for k in range(job * bias_block, min(n_filters, (job + 1) * bias_block)):
            total = 0.0
            for n in range(n_batch):
                total += row_sum(grad_y[n, k])
            grad_b[k] = total


@njit(parallel=True, cache=True)
def blocked_input_gradient_kernel(grad_y, w_mat, w_t, cols, grad_x, block, geo):
    """grad-x by (image, block of ``block`` input channels): the block's gradient columns,
    ``w_t[block's taps] @ grad_y[n]`` (``w_t`` the filters (K, C*R*S) ``w_mat`` transposed,
    (C*R*S, K), which each block writes first, in a parallel region of its own), overwrite its
    rows of ``cols``, then col2im into its channels of ``grad_x[n]``: no two jobs write the
    same element.

    The transposition is here, by blocks, because NumPy's (``w_t[...] = w_mat.T``) ran on one
    core with a stride of a whole row between reads: 5.9 ms for ResNet's 512 x 4608 float32
    filters (AMD EPYC Zen 4), more than the 1x512x7x7 layer's grad-w (1.8 ms). Backward ms,
    2 threads, separate processes, the two trees alternating, 3 rounds, medians of 7 x 5 calls,
    numpy's transposition -> by blocks: 1x512x7x7 3x3 float32 9.9-10.4 -> 6.0-7.3, float64
    14.2-15.1 -> 11.6-11.9; 1x256x14x14 float64 7.2-7.7 -> 6.6-6.7; 1x128x28x28 and 3x64x28x28
    within noise (float32 2.7-3.5 either way)."""
    n_batch, n_filters, pixels = grad_y.shape
    n_chan = grad_x.shape[1]
    taps_c = geo[0] * geo[1]
    per_image = -(-n_chan // block)
    for b in prange(per_image):
        t0 = b * block * taps_c
        t1 = min(n_chan, (b + 1) * block) * taps_c
        # Tiles of TRANSPOSE_TILE filters: their rows' cache lines stay in L1 across the taps.
        for f0 in range(0, n_filters, TRANSPOSE_TILE):
            f1 = min(n_filters, f0 + TRANSPOSE_TILE)
            for t in range(t0, t1):
                for f in range(f0, f1):
                    w_t[t, f] = w_mat[f, t]
    for job in prange(n_batch * per_image):
        n = job // per_image
        c0 = (job - n * per_image) * block
        c1 = min(n_chan, c0 + block)
        a = w_t[c0 * taps_c : c1 * taps_c]
        out = cols[c0 * taps_c : c1 * taps_c, n * pixels : (n + 1) * pixels]
        if own_gemm_pays(a.shape[0], n_filters, pixels, out.itemsize):
            gemm_nn(a, grad_y[n], out, False)
        else:
            gemm_nn_into(a, grad_y[n], out)
        for c in range(c0, c1):
            grad_x[n, c] = 0
            channel_col2im_add(cols, grad_x, n, c, 0, geo[2], n * pixels, geo)


@njit(parallel=True, cache=True)
def batch_forward_kernel(w_mat, cols, out, y, images_per_job):
    """``y[n, k] = (w_mat @ cols)[k, n*P : (n+1)*P]``: the forward pass from the whole batch's
    columns ``cols`` (C*R*S, N*P), by blocks of ``images_per_job`` images, each one product of
    all the filters over its images' pixels into its columns of ``out`` (K, N*P), then copied
    into ``y`` (N, K, P). (Blocks of filters instead, each streaming all the columns, took 2.76
    ms against 2.56 on DCGAN's 256 x 2048 @ 2048 x 1024, float32, 2 threads, AMD EPYC Zen 5;
    the same bits.)"""
    n_batch, n_filters, pixels = y.shape
    for job in prange(-(-n_batch // images_per_job)):
        n0 = job * images_per_job
        n1 = min(n_batch, n0 + images_per_job)
        product = out[:, n0 * pixels : n1 * pixels]
        block = cols[:, n0 * pixels : n1 * pixels]
        if own_gemm_pays(n_filters, cols.shape[0], block.shape[1], product.itemsize):
            gemm_nn(w_mat, block, product, False)
        else:
            gemm_nn_into(w_mat, block, product)
        for n in range(n0, n1):
            for k in range(n_filters):
                dst = y[n, k]
                src = product[k, (n - n0) * pixels : (n - n0 + 1) * pixels]
                for q in range(pixels):
                    dst[q] = src[q]


#: ... and only with at least this many input channels (4 per block): ResNet's stem,
#: 1x3x224x224 7x7 stride 2, ran 5.1-5.3 ms blocked (3 uneven blocks, 7 MB of columns) against
#: 3.6-3.8 in fused bands.
BLOCKED_MIN_CHANNELS = 16


def batch_columns_fit(geom: ConvGeometry, itemsize: int) -> bool:
    """Whether :func:`blocked_backward` can run: one group with at least
    :data:`BLOCKED_MIN_CHANNELS` input channels, whose columns for the whole batch fit in
    :data:`WORKSPACE_BYTES`."""
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    pixels = geom.batch * geom.out_height * geom.out_width
    return (
        geom.groups == 1
        and geom.in_channels >= BLOCKED_MIN_CHANNELS
        and taps * pixels * itemsize <= WORKSPACE_BYTES
    )


def batch_weight_gradient(geom: ConvGeometry, itemsize: int) -> bool:
    """Whether grad-w alone (a transposed convolution's backward pass, Winograd's) runs in
    :func:`blocked_backward`, one product over the whole batch's pixels per block of channels,
    rather than in the fused bands, a product per image summed per lane: for small maps (fewer
    than :data:`MIN_GEMM_COLUMNS` output pixels an image, whose products are short) whose
    columns fit (:func:`batch_columns_fit`).

    Measured (grad-w alone, medians of 3 rounds of 15 calls, AMD EPYC Zen 5, 2 threads, ms, fused
    -> whole batch; OpenBLAS's AVX-512 kernels / with ``OPENBLAS_CORETYPE=Haswell``, where both
    paths run the micro-kernel, :func:`~.microkernel.own_weight_gradient`): DCGAN's 16x256x8x8 4x4
    stride-2 layer, 64 pixels, float32 4.57 -> 4.16 / 4.56 -> 3.86, float64 8.49 -> 8.04 / 8.67
    -> 6.96; 16x128x8x8 <- 16x64x16x16 4x4, float32 1.47 -> 1.46 / 1.49 -> 1.38, float64 2.52 ->
    2.22 / 2.38 -> 1.96. Larger maps lost: U-Net's 2x2 stride-2 layer, 784 pixels, float32 4.92
    -> 5.53 / 4.69 -> 5.60; ResNet's 16x256x14x14 3x3, 196 pixels, 11.3 -> 12.2 / 11.7 -> 13.1."""
    small = geom.out_height * geom.out_width < MIN_GEMM_COLUMNS
    return small and batch_columns_fit(geom, itemsize)


def blocked_fits(geom: ConvGeometry, itemsize: int) -> bool:
    """Whether :func:`blocked_backward` runs for a full backward pass: batches smaller than
    :data:`SMALL_BATCH_LANES` (where the fused pass splits images into narrow bands, each lane
    summing its own grad-w) whose columns fit (:func:`batch_columns_fit`)."""
    return 0 < geom.batch < SMALL_BATCH_LANES and batch_columns_fit(geom, itemsize)


def blocked_backward(grad_y, x, w, geom: ConvGeometry, input_gradient: bool, weight_gradient: bool):
    """The backward pass for small batches in two parallel regions, by blocks of input channels:
    grad-w and grad-b (each block builds its rows of the columns of the whole batch, then one
    GEMM per image over all its pixels: no per-lane sums), then grad-x (each block's gradient
    columns overwrite its rows of the columns, then col2im). :data:`BLOCKED_JOBS` blocks, a
    function of the geometry. float32, 2 threads, backward ms, fused bands -> blocked, two
    alternating runs: ResNet's 1x128x28x28 3x3 2.85-2.95 -> 2.46-2.49, 2x128x28x28 4.9 -> 4.6,
    3x128x28x28 8.3-8.4 -> 6.6, 1x256x14x14 4.3 -> 3.1, 1x512x7x7 9.2-9.4 -> 5.7-5.9,
    1x64x56x56 stride 2 1.7 -> 1.4-1.6; 1x64x56x56 1x1 and 1x16x64x64 3x3 drew (0.6-0.7).

    Without ``weight_gradient``, ``x`` may be None and grad-w and grad-b are None; without
    ``input_gradient``, grad-x is None."""
    n, k, oh, ow = geom.output_shape
    dtype = w.dtype
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    cols = take("im2col.blocked_columns", (taps, n * oh * ow), dtype)
    geo = geometry_args(geom)
    grad_flat = grad_y.reshape(n, k, oh * ow)
    grad_w = grad_b = grad_x = None
    block = -(-geom.in_channels // BLOCKED_JOBS)
    if weight_gradient:
        grad_w, grad_b = _blocked_weight_gradient(grad_flat, x, w, geom, cols)
    if input_gradient:
        w_t = take("im2col.blocked_filters_t", (taps, k), dtype)
        grad_x = np.empty(geom.input_shape, dtype)
        with single_threaded_blas():
            blocked_input_gradient_kernel(
                grad_flat, w.reshape(k, taps), w_t, cols, grad_x, block, geo
            )
    return grad_x, grad_w, grad_b


def _blocked_weight_gradient(grad_flat, x, w, geom: ConvGeometry, cols):
    """``(grad_w, grad_b)`` of :func:`blocked_backward`; leaves the whole batch's columns of
    ``x`` in ``cols``."""
    n, k, pixels = grad_flat.shape
    taps = cols.shape[0]
    grad_w = np.empty((k, taps), w.dtype)
    grad_b = np.empty(k, np.float64)
    block = -(-geom.in_channels // BLOCKED_JOBS)
    jobs = -(-geom.in_channels // block)
    bias_block = -(-k // jobs)
    grad_t = grad_flat[0] if n == 1 else take("im2col.blocked_grad_t", (k, n * pixels), w.dtype)
    planes, index = _table_workspace("im2col.blocked_planes", geom, jobs, w.dtype)
    with single_threaded_blas():
        blocked_weight_gradient_kernel(
            grad_flat, x, grad_t, cols, grad_w, grad_b, block, bias_block, geometry_args(geom),
            own_weight_gradient(), planes, index,
        )  # fmt: skip
    return grad_w.reshape(w.shape), grad_b.astype(w.dtype)


def forward_and_weight_gradient(x, w, grad_y, geom: ConvGeometry):
    """``(y, grad_w)``: the forward pass of ``x`` (no bias) and the weight gradient for the
    output gradient ``grad_y``, from one set of the whole batch's columns of ``x``, where
    :func:`batch_weight_gradient` holds (blocked_backward builds them for grad-w; the forward
    product then reads them too). A transposed convolution's backward pass is exactly this pair
    for its adjoint convolution (grad-x the adjoint's forward pass of its ``grad_y``, grad-w the
    adjoint's weight gradient with its ``x`` as the output gradient): both read the same columns.

    Measured, DCGAN's 16x256x8x8 -> 128 4x4 stride-2 transposed layer (AMD EPYC Zen 5, 2
    threads, float32): its columns, 2048 x 1024, took 1.3 ms to build, once per pass before."""
    n, k, oh, ow = geom.output_shape
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    cols = take("im2col.blocked_columns", (taps, n * oh * ow), w.dtype)
    grad_w, _ = _blocked_weight_gradient(grad_y.reshape(n, k, oh * ow), x, w, geom, cols)
    y = np.empty((n, k, oh * ow), w.dtype)
    out = take("im2col.batch_forward", (k, n * oh * ow), w.dtype)
    with single_threaded_blas():
        batch_forward_kernel(w.reshape(k, taps), cols, out, y, -(-n // BLOCKED_JOBS))
    return y.reshape(n, k, oh, ow), grad_w


@njit(parallel=True, cache=True)
def implicit_weight_gradient_kernel(
    grad_y, x, sums, bias_sums, planes_ws, grad_ws, tap_rows, groups, geo, transposed
):  # fmt: skip
    """grad-w (transposed, per lane: ``sums[lane]`` is (C/g*R*S, K)) and grad-b (float64, per
    lane) by implicit GEMM, no columns: lane ``l`` of ``sums.shape[0]`` takes a fixed,
    contiguous run of images; per image, its channels go into zero-padded planes as in the
    forward pass (:func:`padded_planes`, or transposed: :func:`implicit_image`), ``grad_y[n]``
    is laid out transposed on the same padded grid (``grad_ws``: (Wide, K), zeros where the
    forward pass's product is the padding's), and ``sums[lane] += windows @ grad_t``, the rows
    of ``windows`` being the taps' windows of the planes (``tap_rows``: :func:`implicit_plan`),
    read in place (:func:`~.microkernel.gemm_rows_nn`). An image holding Inf or NaN goes
    through its columns instead (see the kernel). The caller adds the lanes in order."""
    filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw = geo
    padded_h = out_h + (filter_h - 1) * dh // sh
    padded_w = out_w + (filter_w - 1) * dw // sw
    n_batch = x.shape[0]
    n_filters = grad_y.shape[1]
    k_g = n_filters // groups
    taps_g = sums.shape[1]
    wide = out_w * padded_h if transposed else out_h * padded_w
    lanes = sums.shape[0]
    for lane in prange(lanes):
        acc = sums[lane]
        bias_acc = bias_sums[lane]
        bias_acc[:] = 0
        planes = planes_ws[lane]
        grad_t = grad_ws[lane, : wide * n_filters].reshape(wide, n_filters)
        first = n_batch * lane // lanes
        last = n_batch * (lane + 1) // lanes
        if first == last:
            acc[:] = 0
        for n in range(first, last):
            for k in range(n_filters):
                bias_acc[k] += row_sum(grad_y[n, k])
            if not np.isfinite(row_sum(x[n].reshape(-1))):
                # An Inf or NaN in the image: the product's padding rows (zeros in grad_t)
                # would meet it (0 * Inf = NaN) where the columns never do; this image's share
                # from its columns, as the fused bands compute it. (A finite image whose sum
                # overflows comes here too, harmlessly.)
                cols = np.empty((taps_g * groups, out_h * out_w), x.dtype)
                band_columns(x, n, 0, out_h, cols, geo)
                for g in range(groups):
                    gemm_nn(
                        cols[g * taps_g : (g + 1) * taps_g], grad_y[n, g * k_g : (g + 1) * k_g].T,
                        acc[:, g * k_g : (g + 1) * k_g], n > first,
                    )  # fmt: skip
                continue
            if transposed:
                padded_planes_transposed(x, n, planes, pad_t, pad_l, padded_h, padded_w)
                grid_w, valid = padded_h, out_h  # row ow*Hp + oh of grad_t is y's (oh, ow)
            else:
                padded_planes(x, n, planes, geo, padded_h, padded_w, 0)
                grid_w, valid = padded_w, out_w
            for q in range(wide):
                if q % grid_w >= valid:
                    grad_t[q] = 0
            # Transposed 16 filters at a time: each row of grad_t gets a run of 16 (one filter
            # at a time, scattering with a stride of K, took 2.7-3.8x as long).
            for k0 in range(0, n_filters, 16):
                k1 = min(n_filters, k0 + 16)
                for oh in range(out_h):
                    for ow in range(out_w):
                        dst = grad_t[ow * padded_h + oh if transposed else oh * padded_w + ow]
                        p = oh * out_w + ow
                        for k in range(k0, k1):
                            dst[k] = grad_y[n, k, p]
            for g in range(groups):
                gemm_rows_nn(
                    planes, tap_rows[g * taps_g : (g + 1) * taps_g],
                    grad_t[:, g * k_g : (g + 1) * k_g], acc[:, g * k_g : (g + 1) * k_g],
                    n > first,
                )  # fmt: skip


@njit(parallel=True, cache=True)
def sum_lanes_transposed(sums, out):
    """``out[k, t] = sums[0, t, k] + sums[1, t, k] + ...``, in lane order (the same bits on any
    number of threads), by blocks of 64 rows of the sums."""
    lanes, rows, cols = sums.shape
    for block in prange((rows + 63) // 64):
        t0 = block * 64
        t1 = min(rows, t0 + 64)
        total = sums[0, t0:t1].copy()
        for lane in range(1, lanes):
            total += sums[lane, t0:t1]
        for k in range(cols):
            dst = out[k, t0:t1]
            for t in range(t1 - t0):
                dst[t] = total[t, k]


def _lane_sums(sums, bias_sums, w_shape):
    """``(grad_w, grad_b)`` from the lanes' transposed grad-w sums (lanes, taps, K) and float64
    grad-b sums (lanes, K), added in lane order: the same bits on any number of threads."""
    grad_w = np.empty((sums.shape[2], sums.shape[1]), sums.dtype)
    sum_lanes_transposed(sums, grad_w)
    grad_b = bias_sums[0].copy()
    for lane in range(1, sums.shape[0]):
        grad_b += bias_sums[lane]
    return grad_w.reshape(w_shape), grad_b.astype(sums.dtype)


def implicit_weight_gradient(grad_y, x, w, geom: ConvGeometry, lanes: int):
    """``(grad_w, grad_b)`` by :func:`implicit_weight_gradient_kernel` on ``lanes`` lanes."""
    n, k, oh, ow = geom.output_shape
    tap_rows = implicit_plan(geom, oh, 1, ow, x.itemsize)
    plane_room, wide = implicit_workspace(geom)
    taps_g = tap_rows.shape[0] // geom.groups
    sums = take("im2col.grad_w_lanes", (lanes, taps_g, k), x.dtype)
    bias_sums = take("im2col.grad_b_lanes", (lanes, k), np.float64)
    planes = take("im2col.band_columns", (lanes, plane_room), x.dtype)
    grad_t = take("im2col.band_gemm", (lanes, wide * k), x.dtype)
    implicit_weight_gradient_kernel(
        grad_y.reshape(n, k, oh * ow), x, sums, bias_sums, planes, grad_t, tap_rows, geom.groups,
        geometry_args(geom), implicit_transposed(geom),
    )  # fmt: skip
    return _lane_sums(sums, bias_sums, w.shape)


@njit(parallel=True, cache=True)
def segment_weight_gradient_kernel(
    grad_y, x, sums, bias_sums, windows_ws, segment_rows, groups, geo, segment
):  # fmt: skip
    """grad-w (transposed, per lane: ``sums[lane]`` is (C/g*R*S, K)) and grad-b (float64, per
    lane) of rows cut into segments (:func:`weight_gradient_segment`), no columns: the jobs
    (image, output row, segment of ``segment`` output columns), in that order, are shared out
    to the lanes in fixed, contiguous runs; a job copies the windows its taps read into the
    lane's ``windows_ws`` row (:func:`segment_planes`) and adds ``windows @ grad_y.T`` into the
    lane's sum, the rows of ``windows`` being the taps' (``segment_rows``:
    :func:`segment_tap_rows`), read in place (:func:`~.microkernel.gemm_rows_nn`), ``grad_y``'s
    segment read through a transposed view (packed per panel). A tap's row is exactly its
    segment of the columns, so nothing but the columns' products is computed: an Inf or NaN
    reaches the sums as it would from the columns. The caller adds the lanes in order."""
    out_h, out_w = geo[2], geo[3]
    n_filters = grad_y.shape[1]
    k_g = n_filters // groups
    taps_g = sums.shape[1]
    segments = (out_w + segment - 1) // segment
    per_image = out_h * segments
    jobs = x.shape[0] * per_image
    length = segment + (geo[1] - 1) * geo[9]  # segment_window
    lanes = sums.shape[0]
    for lane in prange(lanes):
        acc = sums[lane]
        bias_acc = bias_sums[lane]
        bias_acc[:] = 0
        windows = windows_ws[lane]
        first = jobs * lane // lanes
        last = jobs * (lane + 1) // lanes
        if first == last:
            acc[:] = 0
        for job in range(first, last):
            n = job // per_image
            oh = (job - n * per_image) // segments
            ow0 = (job - n * per_image - oh * segments) * segment
            width = min(out_w, ow0 + segment) - ow0
            segment_planes(x, n, oh, ow0, windows, geo, length)
            p0 = oh * out_w + ow0
            for k in range(n_filters):
                bias_acc[k] += row_sum(grad_y[n, k, p0 : p0 + width])
            for g in range(groups):
                gemm_rows_nn(
                    windows, segment_rows[g * taps_g : (g + 1) * taps_g],
                    grad_y[n, g * k_g : (g + 1) * k_g, p0 : p0 + width].T,
                    acc[:, g * k_g : (g + 1) * k_g], job > first,
                )  # fmt: skip


def weight_gradient_segment(geom: ConvGeometry, itemsize: int) -> int:
    """Output columns per job where grad-w runs on row segments by implicit GEMM
    (:func:`segment_weight_gradient`): as the forward pass cuts them (:func:`row_segment`,
    rows whose columns exceed :data:`BAND_BYTES`, so that the backward pass's bands are single
    rows too) and reads their windows (:func:`segment_tap_rows`: stride 1 along the row); else
    0. The fused bands' columns of such a layer are a whole row, streamed from memory: 37 MB of
    them for the audio layer (16x64x16000 -> 64, kernel 9). Measured there (AMD EPYC Zen 4, 2
    threads, one process, alternating, medians of 5, ms, fused bands -> segments): grad-w alone
    float32 150 -> 96, float64 304 -> 182; with 16 input channels (grad-x then from the fused
    bands alone) float32 41 -> 29, backward 77 -> 71. Segments of 1024 and 2048 columns (float64
    910) gave the same as :func:`row_segment`'s 455 (256), so the forward pass's cut serves."""
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    if geom.stride_w != 1 or taps * geom.out_width * itemsize <= BAND_BYTES:
        return 0
    segment = row_segment(geom, itemsize, 1, 1)
    if segment_tap_rows(geom, segment, itemsize).shape[0] == 0:
        return 0
    return segment


def segment_weight_gradient(grad_y, x, w, geom: ConvGeometry, lanes: int, segment: int):
    """``(grad_w, grad_b)`` by :func:`segment_weight_gradient_kernel` on ``lanes`` lanes."""
    n, k, oh, ow = geom.output_shape
    taps_g = w[0].size
    segment_rows = segment_tap_rows(geom, segment, x.itemsize)
    room = geom.in_channels * geom.filter_height * segment_window(geom, segment)
    sums = take("im2col.grad_w_lanes", (lanes, taps_g, k), x.dtype)
    bias_sums = take("im2col.grad_b_lanes", (lanes, k), np.float64)
    windows = take("im2col.band_columns", (lanes, room), x.dtype)
    segment_weight_gradient_kernel(
        grad_y.reshape(n, k, oh * ow), x, sums, bias_sums, windows, segment_rows, geom.groups,
        geometry_args(geom), segment,
    )  # fmt: skip
    return _lane_sums(sums, bias_sums, w.shape)


def flipped_filters(w: np.ndarray, groups: int) -> np.ndarray:
    """The filters of the adjoint convolution: ``w`` (K, C/g, R, S) flipped in space, input and
    output channels swapped within each group: (C, K/g, R, S), C-contiguous."""
    k, c_g, r, s = w.shape
    k_g = k // groups
    per_group = w.reshape(groups, k_g, c_g, r, s)[:, :, :, ::-1, ::-1]
    return np.ascontiguousarray(per_group.transpose(0, 2, 1, 3, 4)).reshape(groups * c_g, k_g, r, s)


def adjoint_geometry(geom: ConvGeometry) -> ConvGeometry | None:
    """The stride-1 convolution whose forward pass of ``grad_y`` with :func:`flipped_filters`
    is grad-x: padding ``dh*(R - 1) - pad`` on each side; None where a layer is strided or
    padded beyond its dilated filter (that padding would be negative)."""
    if geom.stride_h != 1 or geom.stride_w != 1:
        return None
    extent_h = geom.dilation_h * (geom.filter_height - 1)
    extent_w = geom.dilation_w * (geom.filter_width - 1)
    pads = (
        extent_h - geom.pad_top, extent_h - geom.pad_bottom,
        extent_w - geom.pad_left, extent_w - geom.pad_right,
    )  # fmt: skip
    if min(pads) < 0:
        return None
    return ConvGeometry(
        geom.batch, geom.out_channels, geom.out_height, geom.out_width, geom.in_channels,
        geom.filter_height, geom.filter_width, 1, 1, *pads, geom.dilation_h, geom.dilation_w,
        geom.groups, geom.in_height, geom.in_width,
    )  # fmt: skip


def input_gradient_as_forward(geom: ConvGeometry, itemsize: int) -> ConvGeometry | None:
    """The adjoint geometry (:func:`adjoint_geometry`) where grad-x runs as its forward pass, by
    implicit GEMM on whole images or on row segments (the adjoint's own :func:`forward_plan`,
    :func:`implicit_plan` and :func:`segment_tap_rows` say so), rather than by gradient columns
    and col2im; else None.

    Measured (AMD EPYC Zen 5, 2 threads, one process, the two alternating, medians of 7 rounds
    of 20 calls, grad-x ms, float32, columns and col2im -> forward of the flipped filters):
    Inception's 16x128x17x17 1x7 3.41 -> 2.93, ResNet's 16x256x14x14 3x3 10.64 -> 9.72,
    16x64x56x56 3x3 11.61 -> 9.74, cifar (64x32x32x32 -> 64) 8.80 -> 7.73, DeepLab's
    4x256x28x28 dilation 2 10.17 -> 9.50."""
    adjoint = adjoint_geometry(geom)
    if adjoint is None:
        return None
    band_rows, group = forward_plan(adjoint, itemsize)
    segment = row_segment(adjoint, itemsize, band_rows, group)
    if implicit_plan(adjoint, band_rows, group, segment, itemsize).shape[0] == 0:
        if segment_tap_rows(adjoint, segment, itemsize).shape[0] == 0:
            return None
    return adjoint


def _input_gradient_by_forward(grad_y, w, geom: ConvGeometry):
    """grad-x as the adjoint's forward pass (:func:`input_gradient_as_forward`), or None where
    that does not run, or where the filters hold Inf or NaN: the forward pass multiplies every
    tap with the zero padding of ``grad_y`` (0 * Inf = NaN) where col2im never adds such a
    product."""
    adjoint = input_gradient_as_forward(geom, w.itemsize)
    if adjoint is None or not np.isfinite(w).all():
        return None
    return forward(grad_y, flipped_filters(w, geom.groups), None, adjoint)


#: Implicit grad-w (:func:`implicit_weight_gradient_applies`) needs at least this many taps per
#: group (rows of its product): with first5x5's 3 channels of 5x5 (75 taps, 32 filters) it lost
#: (float32 / float64 backward ms, 2 threads, fused bands -> implicit: 2.34 -> 2.54, 3.21 ->
#: 3.36), while Inception's 1x7 on 128 channels (896) gained (7.63 -> 6.96, 15.00 -> 13.33).
IMPLICIT_GRAD_W_MIN_TAPS = 128


def implicit_weight_gradient_applies(geom: ConvGeometry, itemsize: int) -> bool:
    """Whether grad-w runs by implicit GEMM (:func:`implicit_weight_gradient`) rather than from
    columns in the fused bands: where the forward pass would run whole images by implicit GEMM
    (:func:`implicit_applies`, with its planes and a product within
    :data:`IMPLICIT_IMAGE_BYTES`), on batches of at least :data:`SMALL_BATCH_LANES` images
    (smaller ones run :func:`blocked_backward`), with at least
    :data:`IMPLICIT_GRAD_W_MIN_TAPS` taps per group and lanes whose sums fit
    (:func:`_backward_lanes`).

    Measured (AMD EPYC Zen 5, 2 threads, one process, the two alternating, medians of 7 rounds,
    backward ms with grad-x from the fused bands either way, columns -> implicit): float32
    Inception's 16x128x17x17 1x7 7.63 -> 6.96 and 7x1 7.18 -> 6.37, ResNet's 16x256x14x14 3x3
    22.0 -> 21.3, 16x64x56x56 3x3 27.8 -> 24.9 and stride 2 (to 128 filters) 17.9 -> 16.8,
    DeepLab's 4x256x28x28 dilation 2 20.9 -> 20.2, cifar (64x32x32x32 -> 64) 20.7 -> 18.2;
    float64 1x7 15.0 -> 13.3, 16x256x14x14 46.1 -> 43.8, cifar 33.7 -> 29.3, the stride-2
    layer 29.4 -> 26.4."""
    oh, ow = geom.out_height, geom.out_width
    taps_g = geom.in_channels // geom.groups * geom.filter_height * geom.filter_width
    return (
        geom.batch >= SMALL_BATCH_LANES
        and taps_g >= IMPLICIT_GRAD_W_MIN_TAPS
        and implicit_image_bytes(geom, itemsize) <= IMPLICIT_IMAGE_BYTES
        and implicit_applies(geom, oh, 1, ow, itemsize)
        and _backward_lanes(geom, itemsize) > 0
    )


def _gradients(grad_y, x, w, geom: ConvGeometry, input_gradient: bool):
    weight_alone = not input_gradient and batch_weight_gradient(geom, x.itemsize)
    if blas_inside_kernels() and (blocked_fits(geom, x.itemsize) or weight_alone):
        return blocked_backward(grad_y, x, w, geom, input_gradient, True)
    lanes = _backward_lanes(geom, x.itemsize) if blas_inside_kernels() else 0
    if lanes == 0:
        return _backward(grad_y, x, w, geom, input_gradient)
    # grad-w without columns where implicit GEMM runs it (whole images, or row segments), then
    # grad-x apart; else both from the fused bands' columns.
    segment = 0
    if not implicit_weight_gradient_applies(geom, x.itemsize):
        segment = weight_gradient_segment(geom, x.itemsize)
        if not segment:
            return _fused_backward(grad_y, x, w, geom, lanes, input_gradient)
    if segment:
        grad_w, grad_b = segment_weight_gradient(grad_y, x, w, geom, lanes, segment)
    else:
        grad_w, grad_b = implicit_weight_gradient(grad_y, x, w, geom, lanes)
    if not input_gradient:
        return None, grad_w, grad_b
    grad_x = _input_gradient_by_forward(grad_y, w, geom)
    if grad_x is None:
        grad_x = _fused_backward(grad_y, None, w, geom, lanes, True, weight_gradient=False)[0]
    return grad_x, grad_w, grad_b


def input_gradient(grad_y, w, geom: ConvGeometry):
    """grad-x alone (a transposed convolution's forward pass): the gradient-column GEMMs and
    col2im of the backward pass, without the columns of the input or the grad-w GEMMs."""
    if blas_inside_kernels() and blocked_fits(geom, w.itemsize):
        return blocked_backward(grad_y, None, w, geom, True, False)[0]
    by_forward = _input_gradient_by_forward(grad_y, w, geom) if blas_inside_kernels() else None
    if by_forward is not None:
        return by_forward
    lanes = _backward_lanes(geom, w.itemsize) if blas_inside_kernels() else 0
    if lanes == 0 or geom.batch == 0:
        # The chunked path has no grad-x-only mode: a full pass on an all-zero input.
        return _backward(grad_y, np.zeros(geom.input_shape, w.dtype), w, geom, True)[0]
    return _fused_backward(grad_y, None, w, geom, lanes, True, weight_gradient=False)[0]


def backward(grad_y, x, w, geom: ConvGeometry):
    return _gradients(grad_y, x, w, geom, input_gradient=True)


def weight_and_bias_gradients(grad_y, x, w, geom: ConvGeometry):
    """``(grad_w, grad_b)`` alone, for families that compute grad-x another way."""
    _, grad_w, grad_b = _gradients(grad_y, x, w, geom, input_gradient=False)
    return grad_w, grad_b
