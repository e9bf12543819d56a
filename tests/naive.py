"""Slow, obviously-correct references, written independently of numbaconv's kernels.

Everything here is plain nested Python loops over float64 NumPy arrays: no im2col trick, no
vectorised gathers, no BLAS. The definitions follow ``torch.nn.functional.conv2d`` literally:

    y[n, k, oh, ow] = b[k] + sum_{c, r, s} w[k, c, r, s]
                      * x[n, g*Cg + c, oh*sh - top + r*dh, ow*sw - left + s*dw]

where ``g = k // Kg`` is the group of filter ``k`` and reads outside the image are zero.

The file also holds the well-known teaching implementation (``TextbookConvLayer`` with its
``im2col``/``col2im`` helpers), transcribed in the textbook's own style, so that numbaconv's
``ConvLayer`` can be checked to be a drop-in replacement.
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------------------------
# Geometry (written here again on purpose, not imported from numbaconv)
# --------------------------------------------------------------------------------------------


def as_pair(v):
    if isinstance(v, tuple | list):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def padding4(padding, filter_hw, stride_hw, dilation_hw):
    """``(top, bottom, left, right)`` for an int, a pair, ``'valid'`` or ``'same'``."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        assert stride_hw == (1, 1)
        (r, s), (dh, dw) = filter_hw, dilation_hw
        th, tw = dh * (r - 1), dw * (s - 1)
        # PyTorch: the extra row/column of an odd total goes at the bottom/right.
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = as_pair(padding)
    return ph, ph, pw, pw


def out_size(size, k, stride, lo, hi, dil):
    # Count the valid window positions one by one rather than using the closed formula.
    n = 0
    start = -lo
    while start + dil * (k - 1) <= size - 1 + hi:
        n += 1
        start += stride
    return n


def out_shape(x_shape, w_shape, stride, pad4, dilation):
    n, _, h, w_ = x_shape
    k, _, r, s = w_shape
    (sh, sw), (dh, dw) = as_pair(stride), as_pair(dilation)
    top, bottom, left, right = pad4
    return n, k, out_size(h, r, sh, top, bottom, dh), out_size(w_, s, sw, left, right, dw)


# --------------------------------------------------------------------------------------------
# Convolution and its gradients, loop by loop
# --------------------------------------------------------------------------------------------


def conv2d_naive(x, w, b=None, stride=1, padding4=(0, 0, 0, 0), dilation=1, groups=1):
    """Forward convolution by explicit loops, in float64."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n_b, n_c, h, wd = x.shape
    n_k, cg, r_, s_ = w.shape
    assert n_c == cg * groups and n_k % groups == 0
    kg = n_k // groups
    (sh, sw), (dh, dw) = as_pair(stride), as_pair(dilation)
    top, _, left, _ = padding4
    _, _, oh_, ow_ = out_shape(x.shape, w.shape, stride, padding4, dilation)
    y = np.zeros((n_b, n_k, oh_, ow_))
    for n in range(n_b):
        for k in range(n_k):
            g = k // kg
            for oh in range(oh_):
                for ow in range(ow_):
                    acc = 0.0 if b is None else float(b[k])
                    for c in range(cg):
                        for r in range(r_):
                            ih = oh * sh - top + r * dh
                            if ih < 0 or ih >= h:
                                continue
                            for s in range(s_):
                                iw = ow * sw - left + s * dw
                                if iw < 0 or iw >= wd:
                                    continue
                                acc += w[k, c, r, s] * x[n, g * cg + c, ih, iw]
                    y[n, k, oh, ow] = acc
    return y


def conv2d_grads_naive(grad_y, x, w, stride=1, padding4=(0, 0, 0, 0), dilation=1, groups=1):
    """``(grad_x, grad_w, grad_b)`` of ``sum(grad_y * conv2d(x, w, b))`` by explicit loops.

    grad_x is built by scattering every output's gradient back onto the inputs it read.
    """
    grad_y = np.asarray(grad_y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n_b, n_c, h, wd = x.shape
    n_k, cg, r_, s_ = w.shape
    kg = n_k // groups
    (sh, sw), (dh, dw) = as_pair(stride), as_pair(dilation)
    top, _, left, _ = padding4
    _, _, oh_, ow_ = grad_y.shape
    assert grad_y.shape == out_shape(x.shape, w.shape, stride, padding4, dilation)
    grad_x = np.zeros(x.shape)
    grad_w = np.zeros(w.shape)
    grad_b = np.zeros(n_k)
    for n in range(n_b):
        for k in range(n_k):
            g = k // kg
            for oh in range(oh_):
                for ow in range(ow_):
                    gy = grad_y[n, k, oh, ow]
                    grad_b[k] += gy
                    for c in range(cg):
                        for r in range(r_):
                            ih = oh * sh - top + r * dh
                            if ih < 0 or ih >= h:
                                continue
                            for s in range(s_):
                                iw = ow * sw - left + s * dw
                                if iw < 0 or iw >= wd:
                                    continue
                                grad_x[n, g * cg + c, ih, iw] += gy * w[k, c, r, s]
                                grad_w[k, c, r, s] += gy * x[n, g * cg + c, ih, iw]
    return grad_x, grad_w, grad_b


# --------------------------------------------------------------------------------------------
# im2col / col2im with the teaching layout, element by element
# --------------------------------------------------------------------------------------------


def im2col_naive(x, flt_h, flt_w, y_h, y_w, stride, pad):
    """cols[(c, r, s), (n, oh, ow)] = x_padded[n, c, oh*stride + r, ow*stride + s]."""
    x = np.asarray(x, dtype=np.float64)
    n_b, n_c, h, wd = x.shape
    cols = np.zeros((n_c * flt_h * flt_w, n_b * y_h * y_w))
    for c in range(n_c):
        for r in range(flt_h):
            for s in range(flt_w):
                row = (c * flt_h + r) * flt_w + s
                for n in range(n_b):
                    for oh in range(y_h):
                        for ow in range(y_w):
                            col = (n * y_h + oh) * y_w + ow
                            ih = oh * stride + r - pad
                            iw = ow * stride + s - pad
                            if 0 <= ih < h and 0 <= iw < wd:
                                cols[row, col] = x[n, c, ih, iw]
    return cols


def col2im_naive(cols, x_shape, flt_h, flt_w, y_h, y_w, stride, pad):
    """Sum every column entry back onto the image pixel it came from (padding dropped)."""
    cols = np.asarray(cols, dtype=np.float64)
    n_b, n_c, h, wd = x_shape
    img = np.zeros(x_shape)
    for c in range(n_c):
        for r in range(flt_h):
            for s in range(flt_w):
                row = (c * flt_h + r) * flt_w + s
                for n in range(n_b):
                    for oh in range(y_h):
                        for ow in range(y_w):
                            col = (n * y_h + oh) * y_w + ow
                            ih = oh * stride + r - pad
                            iw = ow * stride + s - pad
                            if 0 <= ih < h and 0 <= iw < wd:
                                img[n, c, ih, iw] += cols[row, col]
    return img


# --------------------------------------------------------------------------------------------
# The teaching implementation, in its own style ("im2col/col2im + ReLU" ConvLayer)
# --------------------------------------------------------------------------------------------

wb_width = 0.1  # the textbook's module-level init scale


def im2col(images, flt_h, flt_w, out_h, out_w, stride, pad):
    n_bt, n_ch, img_h, img_w = images.shape

    img_pad = np.pad(images, [(0, 0), (0, 0), (pad, pad), (pad, pad)], "constant")
    cols = np.zeros((n_bt, n_ch, flt_h, flt_w, out_h, out_w))

    for h in range(flt_h):
        h_lim = h + stride * out_h
        for w in range(flt_w):
            w_lim = w + stride * out_w
            cols[:, :, h, w, :, :] = img_pad[:, :, h:h_lim:stride, w:w_lim:stride]

    cols = cols.transpose(1, 2, 3, 0, 4, 5).reshape(n_ch * flt_h * flt_w, n_bt * out_h * out_w)
    return cols


def col2im(cols, img_shape, flt_h, flt_w, out_h, out_w, stride, pad):
    n_bt, n_ch, img_h, img_w = img_shape

    cols = cols.reshape(n_ch, flt_h, flt_w, n_bt, out_h, out_w).transpose(3, 0, 1, 2, 4, 5)
    images = np.zeros((n_bt, n_ch, img_h + 2 * pad + stride - 1, img_w + 2 * pad + stride - 1))

    for h in range(flt_h):
        h_lim = h + stride * out_h
        for w in range(flt_w):
            w_lim = w + stride * out_w
            images[:, :, h:h_lim:stride, w:w_lim:stride] += cols[:, :, h, w, :, :]

    return images[:, :, pad : img_h + pad, pad : img_w + pad]


class TextbookConvLayer:
    """The teaching layer. ``relu=False`` drops the activation (for the activation=None check)."""

    # n_bt: batch size, x_ch: input channels, x_h: input height, x_w: input width
    # n_flt: number of filters, flt_h: filter height, flt_w: filter width
    # stride: stride, pad: padding width
    # y_ch: output channels, y_h: output height, y_w: output width

    def __init__(self, x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad, relu=True):
        # Parameters, all together
        self.params = (x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad)
        self.relu = relu

        # Initial filters and biases
        self.w = wb_width * np.random.randn(n_flt, x_ch, flt_h, flt_w)  # noqa: NPY002
        self.b = wb_width * np.random.randn(1, n_flt)  # noqa: NPY002

        # Output size
        self.y_ch = n_flt
        self.y_h = (x_h - flt_h + 2 * pad) // stride + 1
        self.y_w = (x_w - flt_w + 2 * pad) // stride + 1

        # For AdaGrad
        self.h_w = np.zeros((n_flt, x_ch, flt_h, flt_w)) + 1e-8
        self.h_b = np.zeros((1, n_flt)) + 1e-8

    def forward(self, x):
        n_bt = x.shape[0]
        x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad = self.params
        y_ch, y_h, y_w = self.y_ch, self.y_h, self.y_w

        # Input images and filters as matrices
        self.cols = im2col(x, flt_h, flt_w, y_h, y_w, stride, pad)
        self.w_col = self.w.reshape(n_flt, x_ch * flt_h * flt_w)

        # Output: matrix product, bias, activation
        u = np.dot(self.w_col, self.cols).T + self.b
        self.u = u.reshape(n_bt, y_h, y_w, y_ch).transpose(0, 3, 1, 2)
        if self.relu:
            self.y = np.where(self.u <= 0, 0, self.u)
        else:
            self.y = self.u

    def backward(self, grad_y):
        n_bt = grad_y.shape[0]
        x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad = self.params
        y_ch, y_h, y_w = self.y_ch, self.y_h, self.y_w

        # delta
        if self.relu:
            delta = grad_y * np.where(self.u <= 0, 0, 1)
        else:
            delta = grad_y
        delta = delta.transpose(0, 2, 3, 1).reshape(n_bt * y_h * y_w, y_ch)

        # Filter and bias gradients
        grad_w = np.dot(self.cols, delta)
        self.grad_w = grad_w.T.reshape(n_flt, x_ch, flt_h, flt_w)
        self.grad_b = np.sum(delta, axis=0)

        # Input gradient
        grad_cols = np.dot(delta, self.w_col)
        x_shape = (n_bt, x_ch, x_h, x_w)
        self.grad_x = col2im(grad_cols.T, x_shape, flt_h, flt_w, y_h, y_w, stride, pad)

    def update(self, eta):
        self.h_w += self.grad_w * self.grad_w
        self.w -= eta / np.sqrt(self.h_w) * self.grad_w

        self.h_b += self.grad_b * self.grad_b
        self.b -= eta / np.sqrt(self.h_b) * self.grad_b


def conv2d_windows(x, w, b, stride, pad4, dilation, groups):
    """conv2d in float64 by sliding windows and einsum, for sizes where :func:`conv2d_naive`'s
    loops take seconds; returns the result and the same of absolute values (the rounding
    scale)."""
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    dh, dw = (dilation, dilation) if np.isscalar(dilation) else dilation
    top, bottom, left, right = pad4
    k, cg, r, s = w.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    span = (dh * (r - 1) + 1, dw * (s - 1) + 1)
    win = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # (n, c, oh, ow, r, s)
    results = []
    for xs, ws, bs in ((win, w, b), (np.abs(win), np.abs(w), None if b is None else np.abs(b))):
        kg = k // groups
        parts = [
            np.einsum("nchwrs,kcrs->nkhw", xs[:, g * cg : (g + 1) * cg], ws[g * kg : (g + 1) * kg])
            for g in range(groups)
        ]
        y = np.concatenate(parts, axis=1)
        if bs is not None:
            y = y + bs.astype(np.float64)[None, :, None, None]
        results.append(y)
    return results


def conv2d_grads_windows(grad_y, x, w, stride, pad4, dilation, groups):
    """:func:`conv2d_grads_naive` by sliding windows and einsum, for sizes where its loops take
    minutes (each of its passes is one Python step per multiply-add); returns ``(grad_x,
    grad_w, grad_b)`` and the same computed from the absolute values (the rounding scale).

    grad_w correlates ``grad_y`` with the input's windows; grad_x adds, for each filter tap
    ``(r, s)``, ``grad_y`` times that tap's weights onto the padded input rows and columns the
    tap read (``r * dh + sh * oh``, ``s * dw + sw * ow``), then drops the padding."""
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    dh, dw = (dilation, dilation) if np.isscalar(dilation) else dilation
    top, bottom, left, right = pad4
    n, c, h, wd = x.shape
    k, cg, r_, s_ = w.shape
    kg = k // groups
    _, _, oh_, ow_ = grad_y.shape
    results = []
    for gys, xs, ws in ((grad_y, x, w), (np.abs(grad_y), np.abs(x), np.abs(w))):
        gys, ws = gys.astype(np.float64), ws.astype(np.float64)
        padded = np.pad(xs.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
        span = (dh * (r_ - 1) + 1, dw * (s_ - 1) + 1)
        win = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
        win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :oh_, :ow_]  # (n, c, oh, ow, r, s)
        grad_w = np.concatenate(
            [
                np.einsum(
                    "nkhw,nchwrs->kcrs",
                    gys[:, g * kg : (g + 1) * kg],
                    win[:, g * cg : (g + 1) * cg],
                )
                for g in range(groups)
            ]
        )
        grad_padded = np.zeros(padded.shape)
        for r in range(r_):
            for s in range(s_):
                for g in range(groups):
                    grad_padded[
                        :,
                        g * cg : (g + 1) * cg,
                        r * dh : r * dh + sh * (oh_ - 1) + 1 : sh,
                        s * dw : s * dw + sw * (ow_ - 1) + 1 : sw,
                    ] += np.einsum(
                        "nkhw,kc->nchw",
                        gys[:, g * kg : (g + 1) * kg],
                        ws[g * kg : (g + 1) * kg, :, r, s],
                    )
        grad_x = grad_padded[:, :, top : top + h, left : left + wd]
        results.append((grad_x, grad_w, gys.sum(axis=(0, 2, 3))))
    return results
