"""The ``numpy`` kernel: the teaching algorithm in plain NumPy, the baseline for other kernels.

im2col by strided slices of the padded input (one slice per filter tap), one GEMM, and col2im by
strided ``+=`` of the same slices. Generalised from the textbook to rectangular strides,
asymmetric padding, dilation and groups; dtypes are preserved. With groups=1 it performs the same
operations as the teaching ``ConvLayer``, so it reproduces its numbers.
"""

from __future__ import annotations

import numpy as np

from ..geometry import ConvGeometry


def _tap_slices(geom: ConvGeometry, r: int, s: int) -> tuple[slice, slice]:
    """Rows and columns of the padded input that filter tap (r, s) reads, one per output pixel."""
    h0 = r * geom.dilation_h
    w0 = s * geom.dilation_w
    rows = slice(h0, h0 + geom.stride_h * (geom.out_height - 1) + 1, geom.stride_h)
    cols = slice(w0, w0 + geom.stride_w * (geom.out_width - 1) + 1, geom.stride_w)
    return rows, cols


def im2col(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Columns ``(C*R*S, N*OH*OW)``: rows ordered (c, r, s), columns ordered (n, oh, ow)."""
    n, c, _, _ = x.shape
    r_, s_, oh, ow = geom.filter_height, geom.filter_width, geom.out_height, geom.out_width
    x_pad = np.pad(
        x, [(0, 0), (0, 0), (geom.pad_top, geom.pad_bottom), (geom.pad_left, geom.pad_right)]
    )
    cols = np.empty((n, c, r_, s_, oh, ow), dtype=x.dtype)
    for r in range(r_):
        for s in range(s_):
            rows, columns = _tap_slices(geom, r, s)
            cols[:, :, r, s, :, :] = x_pad[:, :, rows, columns]
    return cols.transpose(1, 2, 3, 0, 4, 5).reshape(c * r_ * s_, n * oh * ow)


def col2im(cols: np.ndarray, geom: ConvGeometry, n_channels: int | None = None) -> np.ndarray:
    """Adjoint of :func:`im2col`: scatter-add columns back into an ``(N, C, H, W)`` image."""
    n = geom.batch
    c = geom.in_channels if n_channels is None else n_channels
    r_, s_, oh, ow = geom.filter_height, geom.filter_width, geom.out_height, geom.out_width
    cols = cols.reshape(c, r_, s_, n, oh, ow).transpose(3, 0, 1, 2, 4, 5)
    padded_h = geom.in_height + geom.pad_top + geom.pad_bottom
    padded_w = geom.in_width + geom.pad_left + geom.pad_right
    x_pad = np.zeros((n, c, padded_h, padded_w), dtype=cols.dtype)
    for r in range(r_):
        for s in range(s_):
            rows, columns = _tap_slices(geom, r, s)
            x_pad[:, :, rows, columns] += cols[:, :, r, s, :, :]
    top, left = geom.pad_top, geom.pad_left
    return np.ascontiguousarray(
        x_pad[:, :, top : top + geom.in_height, left : left + geom.in_width]
    )


def _group_rows(geom: ConvGeometry, g: int) -> tuple[slice, slice]:
    """Rows of the columns matrix and of the weight matrix that belong to group ``g``."""
    taps = geom.in_channels_per_group * geom.filter_height * geom.filter_width
    kg = geom.out_channels_per_group
    return slice(g * taps, (g + 1) * taps), slice(g * kg, (g + 1) * kg)


def forward(x, w, b, geom: ConvGeometry) -> np.ndarray:
    n, k, oh, ow = geom.output_shape
    cols = im2col(x, geom)
    w_col = w.reshape(k, -1)
    if geom.groups == 1:
        u = np.dot(w_col, cols)
    else:
        u = np.empty((k, cols.shape[1]), dtype=x.dtype)
        for g in range(geom.groups):
            col_rows, filters = _group_rows(geom, g)
            u[filters] = np.dot(w_col[filters], cols[col_rows])
    if b is not None:
        u += b[:, None]
    return np.ascontiguousarray(u.reshape(k, n, oh, ow).transpose(1, 0, 2, 3))


def backward(grad_y, x, w, geom: ConvGeometry):
    n, k, oh, ow = geom.output_shape
    cols = im2col(x, geom)
    w_col = w.reshape(k, -1)
    # (N*OH*OW, K), the textbook's ``delta`` layout.
    delta = grad_y.transpose(0, 2, 3, 1).reshape(n * oh * ow, k)
    grad_w = np.empty_like(w_col)
    grad_cols = np.empty((n * oh * ow, cols.shape[0]), dtype=x.dtype)
    for g in range(geom.groups):
        col_rows, filters = _group_rows(geom, g)
        grad_w[filters] = np.dot(cols[col_rows], delta[:, filters]).T
        grad_cols[:, col_rows] = np.dot(delta[:, filters], w_col[filters])
    grad_b = np.sum(delta, axis=0)
    grad_x = col2im(grad_cols.T, geom)
    return grad_x, grad_w.reshape(w.shape), grad_b
