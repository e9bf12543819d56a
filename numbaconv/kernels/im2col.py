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


def forward(x, w, b, geom: ConvGeometry) -> np.ndarray:
    n, k, oh, ow = geom.output_shape
    g, pixels = geom.groups, oh * ow
    y = np.empty((n, k, oh, ow), dtype=x.dtype)
    chunk = images_per_chunk(geom, x.itemsize)
    cols = np.empty(
        (chunk, geom.in_channels * geom.filter_height * geom.filter_width, pixels), dtype=x.dtype
    )
    w_groups = _grouped_weight(w, geom)
    args = geometry_args(geom)
    for n0 in range(0, n, chunk):
        nb = min(chunk, n - n0)
        im2col_kernel(x[n0 : n0 + nb], cols[:nb], *args)
        # (G, K/G, taps) @ (nb, G, taps, P) -> (nb, G, K/G, P), which is y's memory layout.
        np.matmul(
            w_groups,
            cols[:nb].reshape(nb, g, -1, pixels),
            out=y[n0 : n0 + nb].reshape(nb, g, -1, pixels),
        )
    if b is not None:
        y += b.reshape(1, k, 1, 1)
    return y


def backward(grad_y, x, w, geom: ConvGeometry):
    n, k, oh, ow = geom.output_shape
    g, pixels = geom.groups, oh * ow
    chunk = images_per_chunk(geom, x.itemsize)
    cols = np.empty(
        (chunk, geom.in_channels * geom.filter_height * geom.filter_width, pixels), dtype=x.dtype
    )
    w_groups = _grouped_weight(w, geom)
    w_groups_t = np.ascontiguousarray(w_groups.transpose(0, 2, 1))
    grad_x = np.empty_like(x)
    grad_w = np.zeros_like(w_groups)
    args = geometry_args(geom)
    for n0 in range(0, n, chunk):
        nb = min(chunk, n - n0)
        cols_chunk = cols[:nb].reshape(nb, g, -1, pixels)
        grad_chunk = grad_y[n0 : n0 + nb].reshape(nb, g, -1, pixels)
        im2col_kernel(x[n0 : n0 + nb], cols[:nb], *args)
        # Per-image products summed in image order: a fixed reduction order, whatever the
        # thread count.
        grad_w += np.matmul(grad_chunk, cols_chunk.transpose(0, 1, 3, 2)).sum(axis=0)
        # The columns are no longer needed: reuse their memory for the gradient columns.
        np.matmul(w_groups_t, grad_chunk, out=cols_chunk)
        col2im_kernel(cols[:nb], grad_x[n0 : n0 + nb], *args)
    grad_b = grad_y.sum(axis=(0, 2, 3))
    return grad_x, grad_w.reshape(w.shape), grad_b
