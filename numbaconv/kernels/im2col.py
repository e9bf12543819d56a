"""The ``im2col`` kernel family: Numba-parallel im2col, a BLAS GEMM, Numba-parallel col2im.

The batch is processed in chunks so that the columns workspace stays under
:data:`WORKSPACE_BYTES` (or one image's columns, if that is larger) however large the batch is.
Columns are laid out per image, ``(n, c*R*S + r*S + s, oh*OW + ow)``, so that the GEMM of a chunk
writes straight into the ``(N, K, OH*OW)`` output with no transpose. GEMMs run through NumPy's
``matmul`` (OpenBLAS, with its own threads) between the parallel Numba passes, so Numba's and
BLAS's threads never run at the same time.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..geometry import ConvGeometry
from ._loops import valid_range

#: Upper bound for the columns workspace of one chunk of images, in bytes. 16 MiB keeps the
#: chunk's columns within a few times the L2+L3 of these 2-core machines while leaving each GEMM
#: large enough to run near BLAS peak; one image's columns are always allowed.
WORKSPACE_BYTES = 16 * 2**20


@njit(parallel=True, cache=True)
def im2col_kernel(x, cols, filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw):
    """Fill ``cols[n, (c*R + r)*S + s, oh*OW + ow] = x_padded[n, c, oh*sh + r*dh, ow*sw + s*dw]``.

    Parameters
    ----------
    x : (N, C, H, W) array
    cols : (N, C*R*S, OH*OW) array, any layout; overwritten.
    filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw : int
        Filter and output sizes, strides, top/left padding and dilations.
    """
    n_batch, n_chan, height, width = x.shape
    taps = filter_h * filter_w
    rows = n_chan * taps
    for job in prange(n_batch * rows):
        n = job // rows
        row = job - n * rows
        c = row // taps
        r = (row // filter_w) % filter_h
        s = row % filter_w
        col_offset = s * dw - pad_l
        lo, hi = valid_range(out_w, sw, col_offset, width)
        for oh in range(out_h):
            ih = oh * sh - pad_t + r * dh
            base = oh * out_w
            if ih < 0 or ih >= height:
                for ow in range(out_w):
                    cols[n, row, base + ow] = 0
                continue
            for ow in range(lo):
                cols[n, row, base + ow] = 0
            for ow in range(lo, hi):
                cols[n, row, base + ow] = x[n, c, ih, ow * sw + col_offset]
            for ow in range(hi, out_w):
                cols[n, row, base + ow] = 0


@njit(parallel=True, cache=True)
def col2im_kernel(cols, img, filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw):
    """Adjoint of :func:`im2col_kernel`: ``img`` (N, C, H, W) is overwritten with the sum of the
    columns that read each pixel. Each ``prange`` job owns one ``(n, c)`` plane of ``img`` and
    adds its contributions in a fixed order, so the result is race-free and deterministic.
    """
    n_batch, n_chan, height, width = img.shape
    for job in prange(n_batch * n_chan):
        n = job // n_chan
        c = job - n * n_chan
        for ih in range(height):
            for iw in range(width):
                img[n, c, ih, iw] = 0
        for r in range(filter_h):
            for s in range(filter_w):
                row = (c * filter_h + r) * filter_w + s
                col_offset = s * dw - pad_l
                lo, hi = valid_range(out_w, sw, col_offset, width)
                for oh in range(out_h):
                    ih = oh * sh - pad_t + r * dh
                    if ih < 0 or ih >= height:
                        continue
                    base = oh * out_w
                    for ow in range(lo, hi):
                        img[n, c, ih, ow * sw + col_offset] += cols[n, row, base + ow]


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
    """Images per chunk so the columns workspace stays under :data:`WORKSPACE_BYTES`."""
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    per_image = taps * geom.out_height * geom.out_width * itemsize
    return int(max(1, min(geom.batch, WORKSPACE_BYTES // per_image)))


def _grouped_weight(w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``w`` as ``(G, K/G, C/G*R*S)``: one GEMM left operand per group."""
    return w.reshape(geom.groups, geom.out_channels_per_group, -1)


def _is_pointwise(geom: ConvGeometry) -> bool:
    """A 1x1, stride-1, unpadded convolution: each image's columns are the image itself."""
    return (
        geom.filter_height == geom.filter_width == 1
        and geom.stride_h == geom.stride_w == 1
        and geom.pad_top == geom.pad_bottom == geom.pad_left == geom.pad_right == 0
    )


def _columns(x: np.ndarray, geom: ConvGeometry):
    """Yield ``(first, count, cols)`` over batch chunks; ``cols`` is ``(count, G, taps/G, P)``.

    The buffer is reused from chunk to chunk (the caller may overwrite it before the next one).
    For a pointwise convolution the columns are views of ``x``: no copy at all.
    """
    n, g, pixels = geom.batch, geom.groups, geom.out_height * geom.out_width
    if _is_pointwise(geom):
        yield 0, n, x.reshape(n, g, -1, pixels)
        return
    chunk = images_per_chunk(geom, x.itemsize)
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    cols = np.empty((chunk, taps, pixels), dtype=x.dtype)
    args = geometry_args(geom)
    for first in range(0, n, chunk):
        count = min(chunk, n - first)
        im2col_kernel(x[first : first + count], cols[:count], *args)
        yield first, count, cols[:count].reshape(count, g, -1, pixels)


def forward(x, w, b, geom: ConvGeometry) -> np.ndarray:
    n, k, oh, ow = geom.output_shape
    y = np.empty((n, geom.groups, geom.out_channels_per_group, oh * ow), dtype=x.dtype)
    w_groups = _grouped_weight(w, geom)
    for first, count, cols in _columns(x, geom):
        # One 2-D GEMM per image and group: NumPy's stacked matmul with a broadcast operand was
        # measured 6x slower than this loop (it does not reach BLAS's full speed).
        for i in range(count):
            for g in range(geom.groups):
                np.matmul(w_groups[g], cols[i, g], out=y[first + i, g])
            if b is not None:
                y[first + i] += b.reshape(geom.groups, -1, 1)
    return y.reshape(n, k, oh, ow)


def backward(grad_y, x, w, geom: ConvGeometry):
    n, k, oh, ow = geom.output_shape
    groups, pixels = geom.groups, oh * ow
    w_groups = _grouped_weight(w, geom)
    w_groups_t = np.ascontiguousarray(w_groups.transpose(0, 2, 1))
    grad_groups = grad_y.reshape(n, groups, -1, pixels)
    grad_x = np.empty_like(x)
    grad_w = np.zeros_like(w_groups)
    partial = np.empty_like(w_groups[0])
    pointwise = _is_pointwise(geom)
    for first, count, cols in _columns(x, geom):
        for i in range(count):
            for g in range(groups):
                # Image by image, in order: the reduction order never depends on threads.
                np.matmul(grad_groups[first + i, g], cols[i, g].T, out=partial)
                grad_w[g] += partial
                if pointwise:
                    grad_x_view = grad_x[first + i].reshape(groups, -1, pixels)[g]
                    np.matmul(w_groups_t[g], grad_groups[first + i, g], out=grad_x_view)
                else:
                    # The columns are no longer needed: reuse them for the gradient columns.
                    np.matmul(w_groups_t[g], grad_groups[first + i, g], out=cols[i, g])
        if not pointwise:
            col2im_kernel(
                cols.reshape(count, -1, pixels),
                grad_x[first : first + count],
                *geometry_args(geom),
            )
    grad_b = grad_y.sum(axis=(0, 2, 3))
    return grad_x, grad_w.reshape(w.shape), grad_b
