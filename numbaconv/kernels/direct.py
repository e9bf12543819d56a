"""The ``direct`` kernel family: Numba-parallel loops straight over input and filters.

Each ``prange`` job owns one output plane (forward: ``y[n, k]``; grad-x: ``grad_x[n, c]``;
grad-w: ``grad_w[k, c]``; grad-b: ``grad_b[k]``) and accumulates into it in a fixed order, so
results are race-free and identical for any thread count. Its cost is ``C/groups * R * S``
passes over each output plane, so it pays where a layer has few channels per group (depthwise
and narrow grouped layers), which ``auto`` gives it; there a GEMM would be a sliver of a matrix
per group.

Three ways through a plane:

- *planes* (:func:`flat_kernel`, :func:`flat_grad_input_kernel`,
  :func:`flat_grad_weight_kernel`; any stride without dilation on a strided axis, by the
  stride's phases): the input plane is copied into a
  zero-padded plane (one per thread, the only workspace), and each filter tap is one long loop
  over the flattened output grid;
- *shifted planes* (:func:`depthwise_same_kernel`: depthwise forward passes and grad-x at
  stride 1 with "same" padding): k copies of the flattened input plane, each with the columns
  that its shift would wrap zeroed, and each output plane one loop over its pixels, in place;
- *rows* (the other kernels; the rest of the geometries): loops along each output row over the
  pixels whose input lies inside the image (bounds from :func:`valid_range`), no workspace.

Every inner loop runs on 1-D slices indexed from 0: Numba checks every index that might be
negative (Python's wraparound), and such a check in the loop body kept LLVM from vectorising it
(measured: depthwise 3x3 on 16x32x112x112, forward 51 ms with ``row[ow + off]``, 4.6 ms with
``dst[i]`` on slices). Unit and stride-2 loops index with a constant stride, so that LLVM can use
contiguous or interleaved vector loads.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .._workspace import take
from ..geometry import ConvGeometry
from ._loops import gather_row, scatter_row, valid_range, zero_row

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
def depthwise3x3_stride2_kernel(x, w, bias, y, sh, pad_t, pad_l, filters_per_group):
    """Depthwise 3x3 filters (one input channel per group), column stride 2, no dilation:
    ``y[n, k] = bias[k] + conv(x[n, k // filters_per_group], w[k, 0])``, overwritten.

    One pass per output row, all nine taps at once: where the three input rows and the three
    columns lie inside the image, ``bias + row 0's taps + row 1's + row 2's`` (a vector loop
    with stride-2 loads); elsewhere (the edges) the taps that lie inside, one by one after the
    bias. A job is one output plane.
    """
    n_batch, n_filters, out_h, out_w = y.shape
    height, width = x.shape[2], x.shape[3]
    # The output columns whose three input columns 2*ow - pad_l + (0, 1, 2) are inside.
    lo = min(out_w, (pad_l + 1) // 2)
    hi = max(lo, min(out_w, (width - 3 + pad_l) // 2 + 1))
    for job in prange(n_batch * n_filters):
        n = job // n_filters
        k = job - n * n_filters
        plane = x[n, k // filters_per_group]
        w00, w01, w02 = w[k, 0, 0, 0], w[k, 0, 0, 1], w[k, 0, 0, 2]
        w10, w11, w12 = w[k, 0, 1, 0], w[k, 0, 1, 1], w[k, 0, 1, 2]
        w20, w21, w22 = w[k, 0, 2, 0], w[k, 0, 2, 1], w[k, 0, 2, 2]
        b = bias[k]
        for oh in range(out_h):
            row = y[n, k, oh]
            ih = oh * sh - pad_t
            edge_lo, edge_hi = out_w, out_w  # the columns the edge loop computes
            if ih >= 0 and ih + 2 < height and hi > lo:
                first = 2 * lo - pad_l
                r0 = plane[ih, first:]
                r1 = plane[ih + 1, first:]
                r2 = plane[ih + 2, first:]
                d = row[lo:hi]
                for i in range(hi - lo):
                    j = 2 * i
                    d[i] = (
                        b
                        + (w00 * r0[j] + w01 * r0[j + 1] + w02 * r0[j + 2])
                        + (w10 * r1[j] + w11 * r1[j + 1] + w12 * r1[j + 2])
                        + (w20 * r2[j] + w21 * r2[j + 1] + w22 * r2[j + 2])
                    )
                edge_lo, edge_hi = lo, hi
            for t in range(edge_lo + out_w - edge_hi):
                ow = t if t < edge_lo else edge_hi + t - edge_lo
                total = b
                for r in range(3):
                    if 0 <= ih + r < height:
                        for s in range(3):
                            iw = 2 * ow - pad_l + s
                            if 0 <= iw < width:
                                total += w[k, 0, r, s] * plane[ih + r, iw]
                row[ow] = total


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _stride2_column(g, w, k, r, iw, pad_l, out_w):
    """``sum_s w[k, 0, r, s] * g[ow]`` over the filter columns ``s`` whose output column
    ``ow = (iw + pad_l - s) / 2`` is whole and inside ``g``: one input column's share of a
    grad-y row at column stride 2."""
    total = 0.0
    for s in range(3):
        t = iw + pad_l - s
        if t >= 0 and t % 2 == 0 and t // 2 < out_w:
            total += w[k, 0, r, s] * g[t // 2]
    return total


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def depthwise3x3_stride2_grad_input_kernel(grad_y, w, grad_x, sh, pad_t, pad_l, filters_per_group):
    """grad-x of :func:`depthwise3x3_stride2_kernel`'s convolution, overwritten: input pixel
    (ih, iw) gathers ``w[k, 0, r, s] * grad_y[n, k, oh, ow]`` over ``oh*sh - pad_t + r == ih``
    and ``2*ow - pad_l + s == iw``, for its channel's ``filters_per_group`` filters ``k``.

    Per input row, one pass per (filter, filter row) that reaches it, over pairs of columns
    (2i, 2i + 1) of the row: one column of a pair reads filter column 1 of grad-y column i + h,
    the other filter columns 0 and 2 of grad-y columns i + h (+ 1) and i + h (- 1), h being
    ``pad_l // 2`` (which of the two, by ``pad_l``'s parity), so the pass is a vector loop with
    unit-stride loads and interleaved stores. The pairs whose grad-y columns are not all inside
    (the edges) take :func:`_stride2_column`. A job is one input plane.
    """
    n_batch, n_chan, height, width = grad_x.shape
    out_h, out_w = grad_y.shape[2], grad_y.shape[3]
    h = pad_l // 2
    odd = pad_l % 2 == 1
    # grad-y column offsets (from i) that a pair reads: h - 1 .. h (even pad_l), h .. h + 1.
    lo_off = h if odd else h - 1
    hi_off = h + 1 if odd else h
    i_lo = min(max(0, -lo_off), width // 2)
    i_hi = max(i_lo, min(width // 2, out_w - hi_off))
    for job in prange(n_batch * n_chan):
        n = job // n_chan
        c = job - n * n_chan
        plane = grad_x[n, c]
        for ih in range(height):
            row = plane[ih]
            first = True
            for m in range(filters_per_group):
                k = c * filters_per_group + m
                for r in range(3):
                    t = ih + pad_t - r
                    if t < 0 or t % sh != 0 or t // sh >= out_h:
                        continue
                    g = grad_y[n, k, t // sh]
                    w0, w1, w2 = w[k, 0, r, 0], w[k, 0, r, 1], w[k, 0, r, 2]
                    d = row[2 * i_lo : 2 * i_hi]
                    ga = g[i_lo + h :]  # column i + h
                    if odd:  # even columns: filter column 1; odd ones: 0 and 2
                        gb = g[i_lo + h + 1 :]
                        if first:
                            for i in range(i_hi - i_lo):
                                d[2 * i] = w1 * ga[i]
                                d[2 * i + 1] = w0 * gb[i] + w2 * ga[i]
                        else:
                            for i in range(i_hi - i_lo):
                                d[2 * i] += w1 * ga[i]
                                d[2 * i + 1] += w0 * gb[i] + w2 * ga[i]
                    else:  # even columns: 0 and 2; odd ones: 1
                        gb = g[i_lo + h - 1 :]
                        if first:
                            for i in range(i_hi - i_lo):
                                d[2 * i] = w0 * ga[i] + w2 * gb[i]
                                d[2 * i + 1] = w1 * ga[i]
                        else:
                            for i in range(i_hi - i_lo):
                                d[2 * i] += w0 * ga[i] + w2 * gb[i]
                                d[2 * i + 1] += w1 * ga[i]
                    for iw in range(2 * i_lo):
                        part = _stride2_column(g, w, k, r, iw, pad_l, out_w)
                        row[iw] = part if first else row[iw] + part
                    for iw in range(2 * i_hi, width):
                        part = _stride2_column(g, w, k, r, iw, pad_l, out_w)
                        row[iw] = part if first else row[iw] + part
                    first = False
            if first:  # no filter row reaches this input row
                zero_row(row)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def depthwise3x3_stride2_grad_weight_kernel(
    grad_y, x, grad_w, sh, pad_t, pad_l, filters_per_group, totals
):  # fmt: skip
    """grad-w of :func:`depthwise3x3_stride2_kernel`'s convolution, overwritten: ``grad_w[k, 0,
    r, s]`` sums ``grad_y[n, k, oh, ow] * x[n, c, oh*sh - pad_t + r, 2*ow - pad_l + s]`` over the
    pixels inside the image, ``c`` being ``k // filters_per_group``.

    A job is one filter: per output row whose three input rows are inside, the nine sums over
    the row's interior columns (those :func:`depthwise3x3_stride2_kernel` fuses) in one vector
    loop with stride-2 loads, each a float64 reduction added to the filter's float64 total in
    ``totals[k]``; the rest tap by tap. Rows, images and columns in a fixed order: the same bits
    on any number of threads."""
    n_batch, n_filters, out_h, out_w = grad_y.shape
    height, width = x.shape[2], x.shape[3]
    lo = min(out_w, (pad_l + 1) // 2)
    hi = max(lo, min(out_w, (width - 3 + pad_l) // 2 + 1))
    for k in prange(n_filters):
        c = k // filters_per_group
        tot = totals[k]
        for t in range(9):
            tot[t] = 0.0
        for n in range(n_batch):
            plane = x[n, c]
            for oh in range(out_h):
                g = grad_y[n, k, oh]
                ih = oh * sh - pad_t
                edge_lo, edge_hi = out_w, out_w  # the columns the edge loop takes
                if ih >= 0 and ih + 2 < height and hi > lo:
                    first = 2 * lo - pad_l
                    r0 = plane[ih, first:]
                    r1 = plane[ih + 1, first:]
                    r2 = plane[ih + 2, first:]
                    gg = g[lo:hi]
                    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = 0.0
                    for i in range(hi - lo):
                        j = 2 * i
                        v = gg[i]
                        s0 += v * r0[j]
                        s1 += v * r0[j + 1]
                        s2 += v * r0[j + 2]
                        s3 += v * r1[j]
                        s4 += v * r1[j + 1]
                        s5 += v * r1[j + 2]
                        s6 += v * r2[j]
                        s7 += v * r2[j + 1]
                        s8 += v * r2[j + 2]
                    tot[0] += s0
                    tot[1] += s1
                    tot[2] += s2
                    tot[3] += s3
                    tot[4] += s4
                    tot[5] += s5
                    tot[6] += s6
                    tot[7] += s7
                    tot[8] += s8
                    edge_lo, edge_hi = lo, hi
                for e in range(edge_lo + out_w - edge_hi):
                    ow = e if e < edge_lo else edge_hi + e - edge_lo
                    v = g[ow]
                    for r in range(3):
                        if 0 <= ih + r < height:
                            for s in range(3):
                                iw = 2 * ow - pad_l + s
                                if 0 <= iw < width:
                                    tot[r * 3 + s] += v * plane[ih + r, iw]
        for r in range(3):
            for s in range(3):
                grad_w[k, 0, r, s] = tot[r * 3 + s]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def depthwise_same_kernel(x, w, bias, y, filters_per_group, workspace):
    """Depthwise k x k filters (odd k, one input channel per group), stride 1, no dilation,
    padding ``k // 2`` on every side ("same"): ``y[n, o] = bias[o] + conv(x[n, o //
    filters_per_group], w[o, 0])``, overwritten.

    Each output plane is one pass of :func:`_taps` over its flattened pixels, written straight
    into ``y``: no row loops, whose short trip counts on small maps (14 columns) ran LLVM's
    scalar remainder. Column ``s`` of the filter reads the flattened input shifted by ``s - k//2``,
    so a shifted read at a row's end lands on the next row's start; each column gets its own
    copy of the plane, with the columns that a shift would wrap onto zeroed, between ``k//2``
    zero rows and ``k//2`` zero elements at each end. In ``workspace[lane]`` those copies lie
    ``stride`` elements apart, so tap (r, s) of output q reads ``q + r*W + s*(stride + 1)``:
    :func:`_taps` with a "dilation" of ``stride + 1`` along the filter's row. A job is one input
    plane and its ``filters_per_group`` outputs.
    """
    n_batch, n_chan, height, width = x.shape
    k = w.shape[2]
    p = k // 2
    plane = height * width
    stride = (height + 2 * p) * width + 2 * p
    lanes = workspace.shape[0]
    jobs = n_batch * n_chan
    for lane in prange(lanes):
        buf = workspace[lane]
        taps = buf[k * stride : k * stride + k * k]
        zero_row(buf[: k * stride])  # the zero rows and ends are never written after this
        for job in range(jobs * lane // lanes, jobs * (lane + 1) // lanes):
            n = job // n_chan
            c = job - n * n_chan
            src = x[n, c].reshape(plane)
            for s in range(k):
                first = s * stride + p + p * width
                dst = buf[first : first + plane]
                for q in range(plane):  # one flat loop: row loops of 14 pixels cost 3x more
                    dst[q] = src[q]
                shift = s - p
                # Reads to the left: a row's first pixels would wrap onto the row above's last
                # columns; to the right, its last ones onto the next row's first.
                lo, hi = (max(0, width + shift), width) if shift < 0 else (0, min(width, shift))
                for j in range(lo, hi):
                    for i in range(height):
                        dst[i * width + j] = 0
            for m in range(filters_per_group):
                o = c * filters_per_group + m
                out = y[n, o].reshape(plane)
                for r in range(k):
                    for s in range(k):
                        taps[r * k + s] = w[o, 0, r, s]
                if k == 3:  # the bias and all nine taps in one pass, one store per pixel
                    _nine_taps(out, buf, width, taps, 1, stride + 1, bias[o], False)
                    continue
                start = bias[o]
                for q in range(plane):
                    out[q] = start
                _taps(out, buf, width, taps, k, k, 1, stride + 1)


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


# ---------------------------------------------------------------------------------------------
# Planes. A job copies its input plane into a zero-padded plane of the
# output's width plus the filter's reach (``padded_w``), and every filter tap is then one long
# loop over the flattened plane, ``acc[q] += w * padded[q + tap_offset]``: the output is computed
# on an OH x padded_w grid and its first OW columns kept. On small maps the row loops above spend
# more time starting rows than computing them (EfficientNet's 16x240x28x28 depthwise 5x5, float32,
# 2 threads: forward 16.4 ms by rows, 2.7 ms by planes; backward 33.7 and 9.0 ms).
# ---------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _place(src, padded, padded_w, padded_h, row0, col0, sh, sw):
    """``padded[i*padded_w + j] = src[row0 + sh*i, col0 + sw*j]``, zero outside ``src``, for
    the ``padded_h`` x ``padded_w`` grid (negative ``row0``/``col0``: zero padding first)."""
    height, width = src.shape
    lo, hi = valid_range(padded_w, sw, col0, width)
    for i in range(padded_h):
        dst = padded[i * padded_w : (i + 1) * padded_w]
        row = row0 + sh * i
        if row < 0 or row >= height:
            zero_row(dst)
            continue
        zero_row(dst[:lo])
        gather_row(dst[lo:hi], src[row], lo * sw + col0, sw)
        zero_row(dst[hi:])


@njit(cache=True, inline="always")
def _grid_shape(out_h, out_w, filter_h, filter_w, sh, sw, dh, dw):
    """``(padded_h, padded_w, tail)`` of the padded grid of an ``out_h`` x ``out_w`` output for
    the largest sub-filter of a stride's phases; ``tail`` elements past the last grid are read
    by the last rows' taps. :func:`_plane_shape` calls it from Python."""
    phase_h = (filter_h + sh - 1) // sh
    phase_w = (filter_w + sw - 1) // sw
    return out_h + (phase_h - 1) * dh, out_w + (phase_w - 1) * dw, (phase_w - 1) * dw


@njit(cache=True, inline="always")
def _place_interior(src, padded, padded_w, padded_h, row0, col0):
    """:func:`_place` at stride 1 on a grid whose other elements are already zero: only the
    pixels of ``src`` are written (they land on the same elements whatever the plane, so a
    lane zeroes its grids once and every job fills them)."""
    height, width = src.shape
    lo, hi = valid_range(padded_w, 1, col0, width)
    first = max(0, -row0)
    last = min(padded_h, height - row0)
    for i in range(first, last):
        gather_row(padded[i * padded_w + lo : i * padded_w + hi], src[row0 + i], lo + col0, 1)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _nine_taps(acc, padded, padded_w, taps, dh, dw, start, accumulate):
    """A 3x3 filter's :func:`_taps` in one pass: ``acc[q] += sum`` when ``accumulate``, else
    ``acc[q] = start + sum``, the sum being the three filter rows' partial sums added in order."""
    size = acc.shape[0]
    row = dh * padded_w
    a0, a1, a2 = padded[0:size], padded[dw : dw + size], padded[2 * dw : 2 * dw + size]
    b0 = padded[row : row + size]
    b1 = padded[row + dw : row + dw + size]
    b2 = padded[row + 2 * dw : row + 2 * dw + size]
    c0 = padded[2 * row : 2 * row + size]
    c1 = padded[2 * row + dw : 2 * row + dw + size]
    c2 = padded[2 * row + 2 * dw : 2 * row + 2 * dw + size]
    t0, t1, t2, t3, t4 = taps[0], taps[1], taps[2], taps[3], taps[4]
    t5, t6, t7, t8 = taps[5], taps[6], taps[7], taps[8]
    if accumulate:
        for q in range(size):
            acc[q] += (
                (t0 * a0[q] + t1 * a1[q] + t2 * a2[q])
                + (t3 * b0[q] + t4 * b1[q] + t5 * b2[q])
                + (t6 * c0[q] + t7 * c1[q] + t8 * c2[q])
            )
    else:
        for q in range(size):
            acc[q] = start + (
                (t0 * a0[q] + t1 * a1[q] + t2 * a2[q])
                + (t3 * b0[q] + t4 * b1[q] + t5 * b2[q])
                + (t6 * c0[q] + t7 * c1[q] + t8 * c2[q])
            )


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _taps(acc, padded, padded_w, taps, taps_h, taps_w, dh, dw):
    """``acc[q] += sum_{r, s} taps[r*taps_w + s] * padded[q + r*dh*padded_w + s*dw]``, up to
    three taps of a filter row per pass over ``acc`` (fewer loads and stores of ``acc``)."""
    size = acc.shape[0]
    if taps_h == 3 and taps_w == 3:
        # All nine in one pass: one load and store of ``acc`` instead of three.
        _nine_taps(acc, padded, padded_w, taps, dh, dw, 0.0, True)
        return
    for r in range(taps_h):
        s = 0
        while s < taps_w:
            o = r * dh * padded_w + s * dw
            t = r * taps_w + s
            if s + 2 < taps_w:
                w0, w1, w2 = taps[t], taps[t + 1], taps[t + 2]
                a = padded[o : o + size]
                b = padded[o + dw : o + dw + size]
                c = padded[o + 2 * dw : o + 2 * dw + size]
                for q in range(size):
                    acc[q] += w0 * a[q] + w1 * b[q] + w2 * c[q]
                s += 3
            elif s + 1 < taps_w:
                w0, w1 = taps[t], taps[t + 1]
                a = padded[o : o + size]
                b = padded[o + dw : o + dw + size]
                for q in range(size):
                    acc[q] += w0 * a[q] + w1 * b[q]
                s += 2
            else:
                w0 = taps[t]
                a = padded[o : o + size]
                for q in range(size):
                    acc[q] += w0 * a[q]
                s += 1


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def flat_kernel(
    src, w, bias, has_bias, out, top, left, sh, sw, dh, dw, groups, workspace, taps_ws, images,
):  # fmt: skip
    """A convolution by planes: ``out`` = conv2d(``src``, w) + bias, ``src`` being x and
    ``top``/``left`` its padding. A stride (``sh``, ``sw``) is split into its phases: output
    (oh, ow) reads rows ``oh*sh + r`` of the padded input, so the filter rows ``r = a + sh*i``
    read phase ``a``'s plane ``x_padded[a::sh]`` at ``oh + i``: a stride-1 convolution of each
    phase plane (taken with a stride, once per job) with its sub-filter ``w[a::sh, b::sw]``,
    summed over the phases. Dilation is for stride 1 only (the caller makes sure).

    A job is one output channel of ``images`` consecutive images: their padded planes stacked
    one under the other, so that each tap is one loop over all of them (small planes made short
    loops); the rows that straddle two planes are computed and dropped. Every output gets the
    same arithmetic whatever ``images`` is.

    ``workspace`` (lanes, padded planes + accumulator) and ``taps_ws`` (lanes, R*S) are scratch;
    lane ``l`` takes a contiguous run of the (image block, output channel) jobs.
    """
    n_batch, n_out, out_h, out_w = out.shape
    n_filters, chan_per_group, filter_h, filter_w = w.shape
    filters_per_group = n_filters // groups
    padded_h, padded_w, tail = _grid_shape(out_h, out_w, filter_h, filter_w, sh, sw, dh, dw)
    plane_size = padded_h * padded_w
    padded_size = images * plane_size + tail  # the tail is kept zero
    lanes = workspace.shape[0]
    blocks = (n_batch + images - 1) // images
    jobs = blocks * n_out
    # Stride 1: the padding is the same elements of every job's grids; zeroed once per lane.
    unit = sh == 1 and sw == 1
    for lane in prange(lanes):
        padded = workspace[lane, :padded_size]
        taps = taps_ws[lane]
        if unit:
            zero_row(padded)
        for job in range(jobs * lane // lanes, jobs * (lane + 1) // lanes):
            block = job // n_out
            o = job - block * n_out
            n0 = block * images
            count = min(n_batch, n0 + images) - n0
            acc_size = ((count - 1) * padded_h + out_h) * padded_w
            acc = workspace[lane, padded_size : padded_size + acc_size]
            padded[count * plane_size : count * plane_size + tail] = 0
            start = bias[o] if has_bias else 0
            for q in range(acc_size):
                acc[q] = start
            for j in range(chan_per_group):  # the filter's group's input channels
                channel = (o // filters_per_group) * chan_per_group + j
                for a in range(sh):
                    rows = (filter_h - a + sh - 1) // sh
                    for b in range(sw):
                        cols = (filter_w - b + sw - 1) // sw
                        if rows == 0 or cols == 0:
                            continue
                        for r in range(rows):
                            for s in range(cols):
                                taps[r * cols + s] = w[o, j, a + sh * r, b + sw * s]
                        for i in range(count):
                            grid = padded[i * plane_size : (i + 1) * plane_size]
                            plane = src[n0 + i, channel]
                            if unit:
                                _place_interior(plane, grid, padded_w, padded_h, -top, -left)
                            else:
                                _place(plane, grid, padded_w, padded_h, a - top, b - left, sh, sw)
                        _taps(acc, padded, padded_w, taps, rows, cols, dh, dw)
            for i in range(count):
                target = out[n0 + i, o]
                for oh in range(out_h):
                    first = (i * padded_h + oh) * padded_w
                    row = acc[first : first + out_w]
                    line = target[oh]
                    for ow in range(out_w):
                        line[ow] = row[ow]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def flat_grad_input_kernel(
    grad_y, w, grad_x, sh, sw, pad_t, pad_l, dh, dw, groups, workspace, taps_ws, images,
    phase_out_h, phase_out_w,
):  # fmt: skip
    """grad-x by planes (each axis strided or dilated, not both): ``grad_x`` (N, C, H, W) is
    overwritten.

    The padded input's rows ``a + sh*i`` (phase ``a``) are reached only by the filter rows
    ``a + sh*t``, from output row ``i - t``: each phase of grad-x is the full correlation of
    ``grad_y`` with that flipped sub-filter, a stride-1 transposed convolution. Per job (block
    of ``images`` images, input channel) and phase ``(a, b)``: ``grad_y``'s planes placed on
    the padded grid (``phase_out_h`` x ``phase_out_w`` outputs, the most any phase has), one
    loop per tap over them all (:func:`_taps`), then the phase's rows and columns scattered
    into ``grad_x`` with the stride; the phases write disjoint pixels. At stride 1 there is one
    phase: the full correlation with the flipped filters, whose padding a lane zeroes once (as
    in :func:`flat_kernel`). ``workspace`` and ``taps_ws`` as in :func:`flat_kernel`.
    """
    n_batch, n_chan, height, width = grad_x.shape
    n_filters, chan_per_group, filter_h, filter_w = w.shape
    filters_per_group = n_filters // groups
    padded_h, padded_w, tail = _grid_shape(
        phase_out_h, phase_out_w, filter_h, filter_w, sh, sw, dh, dw
    )
    plane_size = padded_h * padded_w
    padded_size = images * plane_size + tail
    lanes = workspace.shape[0]
    blocks = (n_batch + images - 1) // images
    jobs = blocks * n_chan
    unit = sh == 1 and sw == 1
    for lane in prange(lanes):
        padded = workspace[lane, :padded_size]
        taps = taps_ws[lane]
        if unit:
            zero_row(padded)
        for job in range(jobs * lane // lanes, jobs * (lane + 1) // lanes):
            block = job // n_chan
            ci = job - block * n_chan
            group = ci // chan_per_group
            c = ci - group * chan_per_group
            n0 = block * images
            count = min(n_batch, n0 + images) - n0
            acc_size = ((count - 1) * padded_h + phase_out_h) * padded_w
            acc = workspace[lane, padded_size : padded_size + acc_size]
            padded[count * plane_size : count * plane_size + tail] = 0
            for a in range(sh):
                rows = (filter_h - a + sh - 1) // sh
                i0 = -((a - pad_t) // sh)  # the phase's first row reaching the image
                out_rows = (height - 1 + pad_t - a) // sh - i0 + 1
                if out_rows <= 0:
                    continue
                for b in range(sw):
                    cols = (filter_w - b + sw - 1) // sw
                    j0 = -((b - pad_l) // sw)
                    out_cols = (width - 1 + pad_l - b) // sw - j0 + 1
                    if out_cols <= 0:
                        continue
                    zero_row(acc)  # stays zero for a phase no filter tap reaches (stride > R)
                    for kk in range(filters_per_group if rows > 0 and cols > 0 else 0):
                        k = group * filters_per_group + kk
                        for r in range(rows):
                            for s in range(cols):
                                tap = w[k, c, a + sh * (rows - 1 - r), b + sw * (cols - 1 - s)]
                                taps[r * cols + s] = tap
                        row0, col0 = i0 - (rows - 1) * dh, j0 - (cols - 1) * dw
                        for i in range(count):
                            grid = padded[i * plane_size : (i + 1) * plane_size]
                            if unit:
                                _place_interior(
                                    grad_y[n0 + i, k], grid, padded_w, padded_h, row0, col0
                                )
                            else:
                                _place(
                                    grad_y[n0 + i, k], grid, padded_w, padded_h, row0, col0, 1, 1
                                )
                        _taps(acc, padded, padded_w, taps, rows, cols, dh, dw)
                    first_col = b + sw * j0 - pad_l
                    for i in range(count):
                        target = grad_x[n0 + i, ci]
                        for row in range(out_rows):
                            start = (i * padded_h + row) * padded_w
                            line = target[a + sh * (i0 + row) - pad_t]
                            scatter_row(line, acc[start : start + out_cols], first_col, sw)


@njit(cache=True)
def _all_finite(values):
    """Whether ``values`` holds no NaN and no Inf (``v - v`` is 0 only for a finite ``v``).
    Compiled apart, without the kernels' fast-math flags: with reassociation LLVM cancels
    ``v - v`` to zero. An AND of comparisons, not a sum: it vectorises without them."""
    finite = True
    for q in range(values.shape[0]):
        v = values[q]
        finite &= v - v == 0
    return finite


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _tap_dots(sums, grad, padded, padded_w, rows, cols, dh, dw, a, b, sh, sw):
    """``sums[a + sh*i, b + sw*j] += sum_q grad[q] * padded[q + i*dh*padded_w + j*dw]`` for the
    ``rows`` x ``cols`` taps of a phase, up to three taps of a filter row per pass over ``grad``
    (one load of ``grad`` for three products). Each pass sums in the arrays' dtype, in vector
    lanes (reassociation), and adds its totals to the float64 ``sums``."""
    size = grad.shape[0]
    for i in range(rows):
        j = 0
        while j < cols:
            o = i * dh * padded_w + j * dw
            p0 = padded[o : o + size]
            t0 = grad.dtype.type(0)
            if j + 2 < cols:
                p1 = padded[o + dw : o + dw + size]
                p2 = padded[o + 2 * dw : o + 2 * dw + size]
                t1 = grad.dtype.type(0)
                t2 = grad.dtype.type(0)
                for q in range(size):
                    g = grad[q]
                    t0 += g * p0[q]
                    t1 += g * p1[q]
                    t2 += g * p2[q]
                sums[a + sh * i, b + sw * (j + 1)] += t1
                sums[a + sh * i, b + sw * (j + 2)] += t2
                step = 3
            elif j + 1 < cols:
                p1 = padded[o + dw : o + dw + size]
                t1 = grad.dtype.type(0)
                for q in range(size):
                    g = grad[q]
                    t0 += g * p0[q]
                    t1 += g * p1[q]
                sums[a + sh * i, b + sw * (j + 1)] += t1
                step = 2
            else:
                for q in range(size):
                    t0 += grad[q] * p0[q]
                step = 1
            sums[a + sh * i, b + sw * j] += t0
            j += step


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def flat_grad_weight_kernel(
    grad_y, x, grad_w, pad_t, pad_l, sh, sw, dh, dw, groups, images, workspace, sums_ws
):  # fmt: skip
    """grad-w by planes: per (filter, channel) job, block of ``images`` images and phase of the
    stride (as in :func:`flat_kernel`), the images' phase planes of ``x``, zero-padded and
    stacked one under the other, then per tap of the phase's sub-filter the dot product of
    ``grad_y``'s planes with the stacked planes at the tap's offset, added to ``sums_ws``
    (lanes, R, S, float64) block after block.

    ``grad_y``'s planes are copied onto the padded grid (zeros in the columns past OW and the
    rows past OH), so that each tap is one long dot product over the block (short rows of small
    maps made short loops). Those zeros meet pixels that no output reads; a block holding a NaN
    or an Inf would turn them into NaN, so such a block takes the dot products image by image
    and row by row over the OW columns alone, as a plain computation. ``workspace`` is (lanes,
    stacked padded planes + tail + grad grid); lanes take contiguous runs of jobs, and each job
    sums its blocks in order: the bits depend on the geometry only.
    """
    n_batch, n_filters, out_h, out_w = grad_y.shape
    _, chan_per_group, filter_h, filter_w = grad_w.shape
    filters_per_group = n_filters // groups
    padded_h, padded_w, tail = _grid_shape(out_h, out_w, filter_h, filter_w, sh, sw, dh, dw)
    plane_size = padded_h * padded_w
    padded_size = images * plane_size + tail
    grid_size = ((images - 1) * padded_h + out_h) * padded_w
    lanes = workspace.shape[0]
    jobs = n_filters * chan_per_group
    unit = sh == 1 and sw == 1
    for lane in prange(lanes):
        padded = workspace[lane, :padded_size]
        grad_grid = workspace[lane, padded_size : padded_size + grid_size]
        sums = sums_ws[lane]
        # The zeros of the grad grid (past OW, between images) and, at stride 1, the padding of
        # the planes are the same elements in every job: zeroed once per lane.
        zero_row(grad_grid)
        if unit:
            zero_row(padded)
        for job in range(jobs * lane // lanes, jobs * (lane + 1) // lanes):
            k = job // chan_per_group
            c = job - k * chan_per_group
            channel = (k // filters_per_group) * chan_per_group + c
            sums[:] = 0
            for n0 in range(0, n_batch, images):
                count = min(n_batch - n0, images)
                length = ((count - 1) * padded_h + out_h) * padded_w
                # read past the last plane by the last rows' taps
                padded[count * plane_size : count * plane_size + tail] = 0
                for i in range(count):
                    grad_plane = grad_y[n0 + i, k]
                    base = i * plane_size
                    for oh in range(out_h):
                        line = grad_grid[base + oh * padded_w : base + oh * padded_w + out_w]
                        g = grad_plane[oh]
                        for q in range(out_w):
                            line[q] = g[q]
                for a in range(sh):
                    for b in range(sw):
                        rows = (filter_h - a + sh - 1) // sh
                        cols = (filter_w - b + sw - 1) // sw
                        if rows == 0 or cols == 0:
                            continue
                        for i in range(count):
                            grid = padded[i * plane_size : (i + 1) * plane_size]
                            if unit:
                                _place_interior(
                                    x[n0 + i, channel], grid, padded_w, padded_h, -pad_t, -pad_l
                                )
                            else:
                                _place(
                                    x[n0 + i, channel], grid, padded_w, padded_h, a - pad_t,
                                    b - pad_l, sh, sw,
                                )  # fmt: skip
                        if _all_finite(padded[: count * plane_size]):
                            _tap_dots(
                                sums, grad_grid[:length], padded, padded_w, rows, cols, dh, dw,
                                a, b, sh, sw,
                            )  # fmt: skip
                            continue
                        for i in range(count):
                            grad_plane = grad_y[n0 + i, k]
                            for r in range(rows):
                                for s in range(cols):
                                    o = i * plane_size + r * dh * padded_w + s * dw
                                    total = 0.0
                                    for oh in range(out_h):
                                        first = o + oh * padded_w
                                        row = padded[first : first + out_w]
                                        g = grad_plane[oh]
                                        part = 0.0
                                        for q in range(out_w):
                                            part += g[q] * row[q]
                                        total += part
                                    sums[a + sh * r, b + sw * s] += total
            for r in range(filter_h):
                for s in range(filter_w):
                    grad_w[k, c, r, s] = sums[r, s]


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


def _flat_forward(geom: ConvGeometry) -> bool:
    """The plane kernels apply (forward, grad-x and grad-w): any padding; a stride only without
    dilation on that axis (its phases are then plain stride-1 convolutions)."""
    return (geom.stride_h == 1 or geom.dilation_h == 1) and (
        geom.stride_w == 1 or geom.dilation_w == 1
    )


#: :func:`flat_kernel` stacks the padded planes of consecutive images (one output channel) into
#: a job until they hold about this many elements: each filter tap is then one loop over them
#: all. float32, 2 threads, forward ms, one plane a job -> stacked (2048 / 4096 / 8192):
#: MobileNet's 16x384x14x14 depthwise 3x3 1.9 -> 1.25 / 1.23 / 1.21, EfficientNet's 16x240x28x28
#: 5x5 3.8 -> 3.3 / 3.2 / 4.3, the 144-channel stride-2 layer 3.8 -> 3.6 / 3.4 / 4.1; 112x112
#: planes are past the bound and stay one a job. grad-w (:func:`flat_grad_weight_kernel`) stacks
#: its blocks by the same bound; its dot products by block and three taps a pass, against one
#: plane and one tap a pass summed in float64 (backward ms): 16x384x14x14 3.85 -> 2.66,
#: 16x32x112x112 9.0 -> 6.8, 5x5 9.4 -> 6.2.
STACK_ELEMENTS = 4096


def _plane_shape(out_h: int, out_w: int, geom: ConvGeometry) -> tuple[int, int, int]:
    """``(padded_h, padded_w, tail)`` of the plane kernels' padded grid for an ``out_h`` x
    ``out_w`` output (of the largest phase of a strided filter)."""
    return _grid_shape.py_func(
        out_h, out_w, geom.filter_height, geom.filter_width, geom.stride_h, geom.stride_w,
        geom.dilation_h, geom.dilation_w,
    )  # fmt: skip


def images_per_job(batch: int, out_h: int, out_w: int, geom: ConvGeometry) -> int:
    """How many images' planes :func:`flat_kernel` stacks in a job (:data:`STACK_ELEMENTS`)."""
    padded_h, padded_w, _ = _plane_shape(out_h, out_w, geom)
    return max(1, min(batch, STACK_ELEMENTS // (padded_h * padded_w)))


def _flat_workspace(
    name: str, jobs: int, out_h: int, out_w: int, geom: ConvGeometry, dtype, images: int = 1
):  # fmt: skip
    """Per lane: ``images`` stacked padded planes for an ``out_h`` x ``out_w`` output, and an
    accumulator grid as large."""
    padded_h, padded_w, tail = _plane_shape(out_h, out_w, geom)
    size = images * padded_h * padded_w + tail + ((images - 1) * padded_h + out_h) * padded_w
    # Results do not depend on the lanes (each job is one lane's alone), only the speed does.
    lanes = max(1, min(numba.get_num_threads(), jobs))
    return take(name, (lanes, size), dtype)


def _taps_workspace(workspace, geom: ConvGeometry, dtype):
    taps = geom.filter_height * geom.filter_width
    return take("direct.flat_taps", (workspace.shape[0], taps), dtype)


def _depthwise3x3_stride2(geom: ConvGeometry) -> bool:
    """:func:`depthwise3x3_stride2_kernel` runs the forward pass (and its siblings grad-x and
    grad-w): depthwise (channel multiplier or not) 3x3, column stride 2, no dilation (any row
    stride, any padding). float32 / float64, 2 threads, AMD EPYC Zen 5, forward ms, plane kernel
    -> it, medians of 3 turns: MobileNetV2's 16x144x56x56 5.2-10.8 -> 1.4-1.6 / 8.5-12.5 ->
    1.8-3.2; 16x96x57x31 2.19 -> 0.86 / 3.24 -> 0.95. At stride 1 the plane kernel won on small
    maps (16x384x14x14 0.56 against 1.39). grad-x (:func:`depthwise3x3_stride2_grad_input_kernel`)
    likewise, by phases -> it, medians of 3 x 15 calls: 16x144x56x56 5.40 -> 2.24 / 9.55 -> 4.73,
    16x96x57x31 1.87 -> 1.32 / 3.42 -> 1.45."""
    return (
        geom.in_channels == geom.groups
        and geom.filter_height == geom.filter_width == 3
        and geom.stride_w == 2
        and geom.dilation_h == geom.dilation_w == 1
    )


def _depthwise_same(geom: ConvGeometry) -> bool:
    """:func:`depthwise_same_kernel` runs the forward pass (and, without a channel multiplier,
    grad-x): depthwise (channel multiplier or not) k x k filters, k odd, stride 1, no dilation,
    padding k // 2 on every side. Against the
    plane kernel (:func:`flat_kernel`, stacked padded planes and a copy out per row), forward
    ms, medians of 3 x 30 calls, 2 threads, AMD EPYC Zen 5, float32 / float64: MobileNet's
    16x384x14x14 3x3 0.53 -> 0.29 / 0.76 -> 0.45, EfficientNet's 16x240x28x28 5x5 1.88 -> 1.55 /
    4.29 -> 3.82, 16x32x112x112 3x3 1.86 -> 1.73 / 5.39 -> 5.49 (a draw); the same bits."""
    k = geom.filter_height
    p = k // 2
    return (
        geom.in_channels == geom.groups
        and k % 2 == 1
        and geom.filter_width == k
        and geom.stride_h == geom.stride_w == 1
        and geom.dilation_h == geom.dilation_w == 1
        and geom.pad_top == geom.pad_bottom == geom.pad_left == geom.pad_right == p
    )


def depthwise_same_workspace(geom: ConvGeometry, dtype) -> np.ndarray:
    """Per lane: :func:`depthwise_same_kernel`'s k shifted copies of a plane, and k*k taps."""
    k = geom.filter_height
    stride = (geom.in_height + 2 * (k // 2)) * geom.in_width + 2 * (k // 2)
    jobs = geom.batch * geom.in_channels
    lanes = max(1, min(numba.get_num_threads(), jobs))
    return take("direct.depthwise_same", (lanes, k * stride + k * k), dtype)


def forward(x, w, b, geom: ConvGeometry) -> np.ndarray:
    y = np.empty(geom.output_shape, dtype=x.dtype)
    if _depthwise_same(geom):
        bias = b if b is not None else np.zeros(geom.out_channels, dtype=x.dtype)
        depthwise_same_kernel(
            x, w, bias, y, geom.out_channels // geom.groups, depthwise_same_workspace(geom, x.dtype)
        )
        return y
    if _depthwise3x3_stride2(geom):
        bias = b if b is not None else np.zeros(geom.out_channels, dtype=x.dtype)
        depthwise3x3_stride2_kernel(
            x, w, bias, y, geom.stride_h, geom.pad_top, geom.pad_left,
            geom.out_channels // geom.groups,
        )  # fmt: skip
        return y
    bias = b if b is not None else np.zeros(1, dtype=x.dtype)
    if _flat_forward(geom):
        n, k, oh, ow = geom.output_shape
        images = images_per_job(n, oh, ow, geom)
        workspace = _flat_workspace(
            "direct.flat", -(-n // images) * k, oh, ow, geom, x.dtype, images
        )
        flat_kernel(
            x, w, bias, b is not None, y, geom.pad_top, geom.pad_left, geom.stride_h,
            geom.stride_w, geom.dilation_h, geom.dilation_w, geom.groups, workspace,
            _taps_workspace(workspace, geom, x.dtype), images,
        )  # fmt: skip
    else:
        forward_kernel(x, w, bias, b is not None, y, *_args(geom))
    return y


def input_gradient(grad_y, w, geom: ConvGeometry):
    """grad-x alone (a transposed convolution's forward pass)."""
    grad_x = np.empty(geom.input_shape, dtype=w.dtype)
    n, c, h, width = geom.input_shape
    if _depthwise_same(geom) and geom.out_channels == geom.in_channels:
        # The same convolution of grad_y with the filters flipped: ms, as in _depthwise_same,
        # plane kernel -> this: 16x384x14x14 3x3 0.70 -> 0.34 / 0.96 -> 0.55, 16x240x28x28
        # 5x5 2.43 -> 1.78 / 5.35 -> 4.88, 16x32x112x112 3x3 2.43 -> 1.84 / 6.14 -> 5.56.
        flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1])
        zeros = np.zeros(c, dtype=w.dtype)
        workspace = depthwise_same_workspace(geom, w.dtype)
        depthwise_same_kernel(grad_y, flipped, zeros, grad_x, 1, workspace)
    elif _depthwise3x3_stride2(geom):
        depthwise3x3_stride2_grad_input_kernel(
            grad_y, w, grad_x, geom.stride_h, geom.pad_top, geom.pad_left,
            geom.out_channels // geom.groups,
        )  # fmt: skip
    elif _flat_forward(geom):
        # By the phases of the stride (one at stride 1). float32, 2 threads, MobileNetV2's
        # 16x144x56x56 depthwise stride 2: 5.9 ms by rows, 5.1 by phases.
        phase_h, phase_w = -(-h // geom.stride_h), -(-width // geom.stride_w)
        images = images_per_job(n, phase_h, phase_w, geom)
        workspace = _flat_workspace(
            "direct.flat", -(-n // images) * c, phase_h, phase_w, geom, w.dtype, images
        )
        flat_grad_input_kernel(
            grad_y, w, grad_x, geom.stride_h, geom.stride_w, geom.pad_top, geom.pad_left,
            geom.dilation_h, geom.dilation_w, geom.groups, workspace,
            _taps_workspace(workspace, geom, w.dtype), images, phase_h, phase_w,
        )  # fmt: skip
    else:
        grad_input_kernel(grad_y, w, grad_x, *_args(geom))
    return grad_x


def backward(grad_y, x, w, geom: ConvGeometry):
    grad_x = input_gradient(grad_y, w, geom)
    grad_w = np.empty_like(w)
    grad_b = np.empty(geom.out_channels, dtype=x.dtype)
    c = geom.input_shape[1]
    if _depthwise3x3_stride2(geom):
        # ms, as for grad-x (see _depthwise3x3_stride2), the plane kernel -> this: 16x144x56x56
        # grad-w 6.8 -> 3.2 / 9.7 -> 4.6 (the stride-2 loads vectorise the sums: a version
        # summing into per-column arrays instead ran float32 at 4.9).
        totals = take("direct.stride2_sums", (geom.out_channels, 9), np.float64)
        depthwise3x3_stride2_grad_weight_kernel(
            grad_y, x, grad_w, geom.stride_h, geom.pad_top, geom.pad_left,
            geom.out_channels // geom.groups, totals,
        )  # fmt: skip
    elif _flat_forward(geom):  # the same phases as the forward pass
        _, k, oh, ow = geom.output_shape
        images = images_per_job(geom.batch, oh, ow, geom)
        workspace = _flat_workspace(
            "direct.flat_grad_w", k * c // geom.groups, oh, ow, geom, x.dtype, images
        )
        flat_grad_weight_kernel(
            grad_y, x, grad_w, geom.pad_top, geom.pad_left, geom.stride_h, geom.stride_w,
            geom.dilation_h, geom.dilation_w, geom.groups, images, workspace,
            take("direct.flat_sums", (workspace.shape[0], *geom.weight_shape[2:]), np.float64),
        )  # fmt: skip
    else:
        grad_weight_kernel(grad_y, x, grad_w, *_args(geom))
    grad_bias_kernel(grad_y, grad_b)
    return grad_x, grad_w, grad_b
