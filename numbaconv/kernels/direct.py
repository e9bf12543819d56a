"""The ``direct`` kernel family: Numba-parallel loops straight over input and filters.

No im2col workspace: each ``prange`` job owns one output plane (forward: ``y[n, k]``; grad-x:
``grad_x[n, c]``; grad-w: ``grad_w[k, c]``; grad-b: ``grad_b[k]``) and accumulates into it in a
fixed order, so results are race-free and identical for any thread count. The innermost loop runs
along an output row over the pixels whose input lies inside the image (the bounds come from
:func:`valid_range`), so it has no branches and LLVM can vectorise it when the stride is 1.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..geometry import ConvGeometry
from ._loops import valid_range


@njit(parallel=True, cache=True)
def forward_kernel(x, w, bias, has_bias, y, sh, sw, pad_t, pad_l, dh, dw, groups):
    """``y[n, k] = bias[k] + sum_{c, r, s} w[k, c, r, s] * x_padded[n, g*C/G + c, ...]``.

    ``y`` (N, K, OH, OW) is overwritten; ``bias`` is read only when ``has_bias``.
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
            for ow in range(out_w):
                y[n, k, oh, ow] = start
        for c in range(chan_per_group):
            ci = first_channel + c
            for r in range(filter_h):
                for oh in range(out_h):
                    ih = oh * sh - pad_t + r * dh
                    if ih < 0 or ih >= height:
                        continue
                    for s in range(filter_w):
                        weight = w[k, c, r, s]
                        col_offset = s * dw - pad_l
                        lo, hi = valid_range(out_w, sw, col_offset, width)
                        if sw == 1:  # unit stride: vectorisable
                            for ow in range(lo, hi):
                                y[n, k, oh, ow] += weight * x[n, ci, ih, ow + col_offset]
                        else:
                            for ow in range(lo, hi):
                                y[n, k, oh, ow] += weight * x[n, ci, ih, ow * sw + col_offset]


@njit(parallel=True, cache=True)
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
        for ih in range(height):
            for iw in range(width):
                grad_x[n, ci, ih, iw] = 0
        for kk in range(filters_per_group):
            k = group * filters_per_group + kk
            for r in range(filter_h):
                for oh in range(out_h):
                    ih = oh * sh - pad_t + r * dh
                    if ih < 0 or ih >= height:
                        continue
                    for s in range(filter_w):
                        weight = w[k, c, r, s]
                        col_offset = s * dw - pad_l
                        lo, hi = valid_range(out_w, sw, col_offset, width)
                        if sw == 1:  # unit stride: vectorisable
                            for ow in range(lo, hi):
                                grad_x[n, ci, ih, ow + col_offset] += weight * grad_y[n, k, oh, ow]
                        else:
                            for ow in range(lo, hi):
                                grad_x[n, ci, ih, ow * sw + col_offset] += (
                                    weight * grad_y[n, k, oh, ow]
                                )


@njit(parallel=True, cache=True)
def grad_weight_kernel(grad_y, x, grad_w, sh, sw, pad_t, pad_l, dh, dw, groups):
    """``grad_w`` (K, C/G, R, S) is overwritten; the batch is summed in image order."""
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
                grad_w[k, c, r, s] = 0
        for n in range(n_batch):
            for r in range(filter_h):
                for s in range(filter_w):
                    col_offset = s * dw - pad_l
                    lo, hi = valid_range(out_w, sw, col_offset, width)
                    total = grad_w[k, c, r, s]
                    for oh in range(out_h):
                        ih = oh * sh - pad_t + r * dh
                        if ih < 0 or ih >= height:
                            continue
                        for ow in range(lo, hi):
                            total += grad_y[n, k, oh, ow] * x[n, ci, ih, ow * sw + col_offset]
                    grad_w[k, c, r, s] = total


@njit(parallel=True, cache=True)
def grad_bias_kernel(grad_y, grad_b):
    """``grad_b[k]`` += sum of ``grad_y[:, k]``, in a fixed order (pass ``grad_b`` zeroed)."""
    n_batch, n_filters, out_h, out_w = grad_y.shape
    for k in prange(n_filters):
        total = grad_b[k]
        for n in range(n_batch):
            for oh in range(out_h):
                for ow in range(out_w):
                    total += grad_y[n, k, oh, ow]
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
    grad_b = np.zeros(geom.out_channels, dtype=x.dtype)
    grad_input_kernel(grad_y, w, grad_x, *_args(geom))
    grad_weight_kernel(grad_y, x, grad_w, *_args(geom))
    grad_bias_kernel(grad_y, grad_b)
    return grad_x, grad_w, grad_b
