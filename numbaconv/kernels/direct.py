"""The ``direct`` kernel family: Numba-parallel loops straight over input and filters.

No workspace: each ``prange`` job owns one output plane (forward: ``y[n, k]``; grad-x:
``grad_x[n, c]``; grad-w: ``grad_w[k, c]``; grad-b: ``grad_b[k]``) and accumulates into it in a
fixed order, so results are race-free and identical for any thread count. Its cost is
``C/groups * R * S`` passes over each output row, so it pays where a layer has few channels per
group (depthwise and narrow grouped layers), which ``auto`` gives it; there a GEMM would be a
sliver of a matrix per group.

The innermost loops run along a row over the pixels whose input lies inside the image (the bounds
come from :func:`valid_range`), on 1-D slices indexed from 0: Numba checks every index that
might be negative (Python's wraparound), and such a check in the loop body kept LLVM from
vectorising it (measured: depthwise 3x3 on 16x32x112x112, forward 51 ms with ``row[ow + off]``,
4.6 ms with ``dst[i]`` on slices). Unit and stride-2 loops index with a constant stride, so that
LLVM can use contiguous or interleaved vector loads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..geometry import ConvGeometry
from ._loops import valid_range

#: Reassociation lets LLVM vectorise the dot products of grad-w and grad-b (partial sums per
#: vector lane); contraction, fused multiply-adds. Neither touches NaN/Inf semantics (DESIGN).
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _axpy_row(dst, src, weight, first, count, stride):
    """``dst[i] += weight * src[first + i*stride]`` for ``i < count``."""
    if stride == 1:
        s1 = src[first : first + count]
        for i in range(count):
            dst[i] += weight * s1[i]
    elif stride == 2:
        s2 = src[first : first + 2 * count]
        for i in range(count):
            dst[i] += weight * s2[2 * i]
    else:
        for i in range(count):
            dst[i] += weight * src[first + i * stride]


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _scatter_row(dst, src, weight, first, count, stride):
    """``dst[first + i*stride] += weight * src[i]`` for ``i < count``."""
    if stride == 1:
        d1 = dst[first : first + count]
        for i in range(count):
            d1[i] += weight * src[i]
    elif stride == 2:
        d2 = dst[first : first + 2 * count]
        for i in range(count):
            d2[2 * i] += weight * src[i]
    else:
        for i in range(count):
            dst[first + i * stride] += weight * src[i]


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _dot_row(a, b, first, count, stride):
    """``sum_i a[i] * b[first + i*stride]`` over ``i < count``, as float64."""
    total = 0.0
    if stride == 1:
        b1 = b[first : first + count]
        for i in range(count):
            total += a[i] * b1[i]
    elif stride == 2:
        b2 = b[first : first + 2 * count]
        for i in range(count):
            total += a[i] * b2[2 * i]
    else:
        for i in range(count):
            total += a[i] * b[first + i * stride]
    return total


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def forward_kernel(x, w, bias, has_bias, y, sh, sw, pad_t, pad_l, dh, dw, groups):
    """``y[n, k] = bias[k] + sum_{c, r, s} w[k, c, r, s] * x_padded[n, g*C/G + c, ...]``.

    ``y`` (N, K, OH, OW) is overwritten; ``bias`` is read only when ``has_bias``. Per output row:
    the bias, then one pass per (channel, filter tap), in that order.
    """
    n_batch, n_filters, out_h, out_w = y.shape
    _, chan_per_group, filter_h, filter_w = w.shape
    height, width = x.shape[2], x.shape[3]
    filters_per_group = n_filters // groups
    for job in prange(n_batch * n_filters):
        n = job // n_filters
        k = job - n * n_filters
        first_channel = (k // filters_per_group) * chan_per_group
        start = bias[k] if has_bias else 0
        for oh in range(out_h):
            row = y[n, k, oh]
            for ow in range(out_w):
                row[ow] = start
            for c in range(chan_per_group):
                for r in range(filter_h):
                    ih = oh * sh - pad_t + r * dh
                    if ih < 0 or ih >= height:
                        continue
                    x_row = x[n, first_channel + c, ih]
                    for s in range(filter_w):
                        col_offset = s * dw - pad_l
                        lo, hi = valid_range(out_w, sw, col_offset, width)
                        if hi > lo:
                            _axpy_row(
                                row[lo:hi], x_row, w[k, c, r, s], lo * sw + col_offset, hi - lo, sw
                            )


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def grad_input_kernel(grad_y, w, grad_x, sh, sw, pad_t, pad_l, dh, dw, groups):
    """``grad_x`` (N, C, H, W) is overwritten with the transpose-convolution of ``grad_y``."""
    n_batch, n_chan, height, width = grad_x.shape
    n_filters, out_h, out_w = grad_y.shape[1], grad_y.shape[2], grad_y.shape[3]
    _, chan_per_group, filter_h, filter_w = w.shape
    filters_per_group = n_filters // groups
    for job in prange(n_batch * n_chan):
        n = job // n_chan
        ci = job - n * n_chan
        group = ci // chan_per_group
        c = ci - group * chan_per_group
        plane = grad_x[n, ci]
        for ih in range(height):
            for iw in range(width):
                plane[ih, iw] = 0
        for kk in range(filters_per_group):
            k = group * filters_per_group + kk
            for oh in range(out_h):
                grad_row = grad_y[n, k, oh]
                for r in range(filter_h):
                    ih = oh * sh - pad_t + r * dh
                    if ih < 0 or ih >= height:
                        continue
                    x_row = plane[ih]
                    for s in range(filter_w):
                        col_offset = s * dw - pad_l
                        lo, hi = valid_range(out_w, sw, col_offset, width)
                        if hi > lo:
                            _scatter_row(
                                x_row,
                                grad_row[lo:hi],
                                w[k, c, r, s],
                                lo * sw + col_offset,
                                hi - lo,
                                sw,
                            )


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def grad_weight_kernel(grad_y, x, grad_w, sh, sw, pad_t, pad_l, dh, dw, groups):
    """``grad_w`` (K, C/G, R, S) is overwritten; rows are summed in image and row order, each
    row's dot product and the running sum in float64."""
    n_batch, n_filters, out_h, out_w = grad_y.shape
    height, width = x.shape[2], x.shape[3]
    _, chan_per_group, filter_h, filter_w = grad_w.shape
    filters_per_group = n_filters // groups
    for job in prange(n_filters * chan_per_group):
        k = job // chan_per_group
        c = job - k * chan_per_group
        ci = (k // filters_per_group) * chan_per_group + c
        for r in range(filter_h):
            for s in range(filter_w):
                col_offset = s * dw - pad_l
                lo, hi = valid_range(out_w, sw, col_offset, width)
                total = 0.0
                if hi > lo:
                    for n in range(n_batch):
                        for oh in range(out_h):
                            ih = oh * sh - pad_t + r * dh
                            if ih < 0 or ih >= height:
                                continue
                            total += _dot_row(
                                grad_y[n, k, oh, lo:hi], x[n, ci, ih], lo * sw + col_offset,
                                hi - lo, sw,
                            )  # fmt: skip
                grad_w[k, c, r, s] = total


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def grad_bias_kernel(grad_y, grad_b):
    """``grad_b[k]`` = the sum of ``grad_y[:, k]``: rows in order, in float64."""
    n_batch, n_filters, out_h, out_w = grad_y.shape
    for k in prange(n_filters):
        total = 0.0
        for n in range(n_batch):
            for oh in range(out_h):
                row = grad_y[n, k, oh]
                part = 0.0
                for i in range(out_w):
                    part += row[i]
                total += part
        grad_b[k] = total


def _args(geom: ConvGeometry) -> tuple[int, ...]:
    return (
        geom.stride_h,
        geom.stride_w,
        geom.pad_top,
        geom.pad_left,
        geom.dilation_h,
        geom.dilation_w,
        geom.groups,
    )


def forward(x, w, b, geom: ConvGeometry) -> np.ndarray:
    y = np.empty(geom.output_shape, dtype=x.dtype)
    bias = b if b is not None else np.zeros(1, dtype=x.dtype)
    forward_kernel(x, w, bias, b is not None, y, *_args(geom))
    return y


def backward(grad_y, x, w, geom: ConvGeometry):
    grad_x = np.empty_like(x)
    grad_w = np.empty_like(w)
    grad_b = np.empty(geom.out_channels, dtype=x.dtype)
    grad_input_kernel(grad_y, w, grad_x, *_args(geom))
    grad_weight_kernel(grad_y, x, grad_w, *_args(geom))
    grad_bias_kernel(grad_y, grad_b)
    return grad_x, grad_w, grad_b
