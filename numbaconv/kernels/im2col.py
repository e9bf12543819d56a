"""The ``im2col`` kernel family: Numba-parallel im2col, one BLAS GEMM per chunk, Numba col2im.

The batch is processed in chunks of images. For a chunk, the columns are built in the teaching
layout ``(C*R*S, n*OH*OW)`` (rows ordered c, r, s; columns n, oh, ow), one GEMM per group turns
them into ``(K, n*OH*OW)``, and a parallel pass scatters that into ``y`` ``(N, K, OH, OW)`` while
adding the bias. Backward gathers ``grad_y`` into the same layout and runs two GEMMs (grad-w and
the gradient columns) and a parallel col2im.

Why this shape: every parallel region and every multi-threaded BLAS call is a fork/join of the
thread pool, and on a busy 2-core machine each join can cost a scheduler time slice. One GEMM per
chunk (not one per image) keeps the joins to a handful per call; it also keeps the GEMMs large
enough to run near BLAS peak. GEMMs run through NumPy (OpenBLAS, with its own threads) between the
Numba passes, so Numba's and BLAS's threads never compute at the same time.

Workspace: the columns and the GEMM result of one chunk, at most :data:`WORKSPACE_BYTES` (or what
one image needs, if that is more), whatever the batch size.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..geometry import ConvGeometry
from ._loops import valid_range

#: Upper bound, in bytes, for the per-chunk workspace (columns + GEMM result); one image's
#: workspace is always allowed. Chunks larger than L2 (2 MiB per core here) cost little, while
#: every chunk adds fork/joins of Numba's and BLAS's thread pools, which on a busy machine can
#: take a scheduler time slice each: 32 MiB keeps them to a handful per call on the suite's layers.
WORKSPACE_BYTES = 32 * 2**20


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
    n_batch, n_chan, height, width = x.shape
    taps = filter_h * filter_w
    rows = n_chan * taps
    pixels = out_h * out_w
    for job in prange(rows * n_batch):
        row = job // n_batch
        n = job - row * n_batch
        c = row // taps
        r = (row // filter_w) % filter_h
        s = row % filter_w
        col_offset = s * dw - pad_l
        lo, hi = valid_range(out_w, sw, col_offset, width)
        for oh in range(out_h):
            ih = oh * sh - pad_t + r * dh
            base = n * pixels + oh * out_w
            if ih < 0 or ih >= height:
                for ow in range(out_w):
                    cols[row, base + ow] = 0
                continue
            for ow in range(lo):
                cols[row, base + ow] = 0
            if sw == 1:  # unit stride: a plain copy LLVM vectorises
                for ow in range(lo, hi):
                    cols[row, base + ow] = x[n, c, ih, ow + col_offset]
            else:
                for ow in range(lo, hi):
                    cols[row, base + ow] = x[n, c, ih, ow * sw + col_offset]
            for ow in range(hi, out_w):
                cols[row, base + ow] = 0


@njit(parallel=True, cache=True)
def col2im_kernel(cols, img, filter_h, filter_w, out_h, out_w, sh, sw, pad_t, pad_l, dh, dw):
    """Adjoint of :func:`im2col_kernel`: overwrite ``img`` (N, C, H, W) with the sum of the
    columns entries that read each pixel.

    Each ``prange`` job owns one ``(n, c)`` plane of ``img`` and adds its contributions in a fixed
    order, so the result is race-free and deterministic.
    """
    n_batch, n_chan, height, width = img.shape
    pixels = out_h * out_w
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
                    base = n * pixels + oh * out_w
                    if sw == 1:  # unit stride: vectorisable
                        for ow in range(lo, hi):
                            img[n, c, ih, ow + col_offset] += cols[row, base + ow]
                    else:
                        for ow in range(lo, hi):
                            img[n, c, ih, ow * sw + col_offset] += cols[row, base + ow]


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
        self.cols = np.empty((taps, columns), dtype=w.dtype)
        self.u = np.empty((geom.out_channels, columns), dtype=w.dtype)
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


def forward(x, w, b, geom: ConvGeometry) -> np.ndarray:
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
    partial = np.empty_like(ws.w_mat)
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


def backward(grad_y, x, w, geom: ConvGeometry):
    return _backward(grad_y, x, w, geom, input_gradient=True)


def weight_and_bias_gradients(grad_y, x, w, geom: ConvGeometry):
    """``(grad_w, grad_b)`` alone, for families that compute grad-x another way."""
    _, grad_w, grad_b = _backward(grad_y, x, w, geom, input_gradient=False)
    return grad_w, grad_b
