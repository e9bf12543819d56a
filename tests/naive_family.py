"""Slow references for the rest of the convolution family, written independently of numbaconv.

Like ``naive.py`` (whose 2-D convolution they build on for the 1-D and padded cases), these are
plain loops over float64 arrays, straight from the definitions:

* transposed convolution, as PyTorch defines it: every input pixel, times the filter, is
  scattered onto the output window that starts at ``(h*stride - padding, w*stride - padding)``,
  taps ``dilation`` apart; entries outside the output (cut by ``padding``) are dropped.
  Its gradients are the same loops, reading instead of writing. Nothing here is defined
  through a convolution or through numbaconv;
* 1-D convolutions: ``naive.py``'s 2-D loops on ``(N, C, 1, L)`` arrays;
* padding modes: ``np.pad`` with ``'reflect'``, ``'edge'`` and ``'wrap'`` (PyTorch's
  ``reflect``, ``replicate`` and ``circular``), then the unpadded 2-D loops; the gradient of the
  padding is ``np.pad`` applied to an array of pixel *indices*, which says for every padded
  pixel which input pixel it copies, and a ``bincount`` over them (the adjoint of a gather).
"""

from __future__ import annotations

import numpy as np
from naive import as_pair, conv2d_grads_naive, conv2d_naive, padding4

# --------------------------------------------------------------------------------------------
# Transposed convolution
# --------------------------------------------------------------------------------------------


def conv_transpose_out_size(size, k, stride, pad, dil, out_pad):
    # The extent of the last scattered tap plus one, minus what padding cuts from both sides.
    full = (size - 1) * stride + dil * (k - 1) + 1
    return full - 2 * pad + out_pad


def conv_transpose2d_naive(
    x, w, b=None, stride=1, padding=0, output_padding=0, dilation=1, groups=1
):
    """Transposed convolution by scattering, in float64.

    ``x`` (N, C_in, H, W), ``w`` (C_in, C_out // groups, R, S):
    ``y[n, g*Cog + o, h*sh - ph + r*dh, v*sw - pw + s*dw] += x[n, i, h, v] * w[i, o, r, s]``
    for input channel ``i`` of group ``g = i // (C_in // groups)``.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n_b, c_in, h, wd = x.shape
    c_in_w, cog, r_, s_ = w.shape
    assert c_in_w == c_in and c_in % groups == 0
    cig = c_in // groups
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = map(
        as_pair, (stride, padding, output_padding, dilation)
    )
    oh_ = conv_transpose_out_size(h, r_, sh, ph, dh, oph)
    ow_ = conv_transpose_out_size(wd, s_, sw, pw, dw, opw)
    y = np.zeros((n_b, cog * groups, oh_, ow_))
    for n in range(n_b):
        for i in range(c_in):
            g = i // cig
            for ih in range(h):
                for iw in range(wd):
                    v = x[n, i, ih, iw]
                    for o in range(cog):
                        for r in range(r_):
                            oh = ih * sh - ph + r * dh
                            if oh < 0 or oh >= oh_:
                                continue
                            for s in range(s_):
                                ow = iw * sw - pw + s * dw
                                if ow < 0 or ow >= ow_:
                                    continue
                                y[n, g * cog + o, oh, ow] += v * w[i, o, r, s]
    if b is not None:
        y += np.asarray(b, dtype=np.float64)[None, :, None, None]
    return y


def conv_transpose2d_grads_naive(
    grad_y, x, w, stride=1, padding=0, output_padding=0, dilation=1, groups=1
):
    """``(grad_x, grad_w, grad_b)`` of ``sum(grad_y * conv_transpose2d(x, w, b))`` by loops.

    The scatter loop of :func:`conv_transpose2d_naive`, where each ``y[...] += x * w`` becomes
    ``grad_x += grad_y[...] * w`` and ``grad_w += grad_y[...] * x``.
    """
    grad_y = np.asarray(grad_y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n_b, c_in, h, wd = x.shape
    _, cog, r_, s_ = w.shape
    cig = c_in // groups
    (sh, sw), (ph, pw), (dh, dw) = map(as_pair, (stride, padding, dilation))
    _, _, oh_, ow_ = grad_y.shape
    grad_x = np.zeros(x.shape)
    grad_w = np.zeros(w.shape)
    for n in range(n_b):
        for i in range(c_in):
            g = i // cig
            for ih in range(h):
                for iw in range(wd):
                    for o in range(cog):
                        for r in range(r_):
                            oh = ih * sh - ph + r * dh
                            if oh < 0 or oh >= oh_:
                                continue
                            for s in range(s_):
                                ow = iw * sw - pw + s * dw
                                if ow < 0 or ow >= ow_:
                                    continue
                                gy = grad_y[n, g * cog + o, oh, ow]
                                grad_x[n, i, ih, iw] += gy * w[i, o, r, s]
                                grad_w[i, o, r, s] += gy * x[n, i, ih, iw]
    grad_b = grad_y.sum(axis=(0, 2, 3))
    return grad_x, grad_w, grad_b


# --------------------------------------------------------------------------------------------
# Padding modes
# --------------------------------------------------------------------------------------------

NUMPY_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def pad_naive(x, pad4, mode):
    top, bottom, left, right = pad4
    widths = [(0, 0), (0, 0), (top, bottom), (left, right)]
    return np.pad(np.asarray(x, dtype=np.float64), widths, mode=NUMPY_MODE[mode])


def unpad_grad_naive(grad_padded, x_shape, pad4, mode):
    """The adjoint of :func:`pad_naive`: each padded pixel's gradient onto its source pixel."""
    n_b, n_c, h, wd = x_shape
    top, bottom, left, right = pad4
    if mode == "zeros":
        return np.asarray(grad_padded)[:, :, top : top + h, left : left + wd].astype(np.float64)
    # Which input pixel (flat index) each padded pixel holds, as np.pad itself decides it.
    source = np.pad(
        np.arange(h * wd).reshape(h, wd), [(top, bottom), (left, right)], mode=NUMPY_MODE[mode]
    )
    grad_x = np.zeros(x_shape)
    for n in range(n_b):
        for c in range(n_c):
            grad_x[n, c] = np.bincount(
                source.ravel(), weights=grad_padded[n, c].ravel(), minlength=h * wd
            ).reshape(h, wd)
    return grad_x


def conv2d_mode_naive(x, w, b, stride, padding, dilation, groups, mode):
    """Forward convolution with ``padding_mode``: pad as np.pad does, then no padding."""
    pad4 = padding4(padding, w.shape[2:], as_pair(stride), as_pair(dilation))
    xp = pad_naive(x, pad4, mode)
    return conv2d_naive(xp, w, b, stride=stride, dilation=dilation, groups=groups)


def conv2d_mode_grads_naive(grad_y, x, w, stride, padding, dilation, groups, mode):
    pad4 = padding4(padding, w.shape[2:], as_pair(stride), as_pair(dilation))
    xp = pad_naive(x, pad4, mode)
    gxp, gw, gb = conv2d_grads_naive(grad_y, xp, w, stride=stride, dilation=dilation, groups=groups)
    return unpad_grad_naive(gxp, np.shape(x), pad4, mode), gw, gb


# --------------------------------------------------------------------------------------------
# 1-D: the 2-D references on height-1 arrays
# --------------------------------------------------------------------------------------------


def to4(a):
    return np.asarray(a, dtype=np.float64)[:, :, None, :]


def conv1d_naive(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, mode="zeros"):
    pad2 = padding if isinstance(padding, str) else (0, padding)
    y = conv2d_mode_naive(to4(x), to4(w), b, (1, stride), pad2, (1, dilation), groups, mode)
    return y[:, :, 0, :]


def conv1d_grads_naive(grad_y, x, w, stride=1, padding=0, dilation=1, groups=1, mode="zeros"):
    pad2 = padding if isinstance(padding, str) else (0, padding)
    gx, gw, gb = conv2d_mode_grads_naive(
        to4(grad_y), to4(x), to4(w), (1, stride), pad2, (1, dilation), groups, mode
    )
    return gx[:, :, 0, :], gw[:, :, 0, :], gb


def conv_transpose1d_naive(
    x, w, b=None, stride=1, padding=0, output_padding=0, dilation=1, groups=1
):
    y = conv_transpose2d_naive(
        to4(x), to4(w), b, (1, stride), (0, padding), (0, output_padding), (1, dilation), groups
    )
    return y[:, :, 0, :]


def conv_transpose1d_grads_naive(
    grad_y, x, w, stride=1, padding=0, output_padding=0, dilation=1, groups=1
):
    gx, gw, gb = conv_transpose2d_grads_naive(
        to4(grad_y), to4(x), to4(w), (1, stride), (0, padding), (0, output_padding),
        (1, dilation), groups,
    )  # fmt: skip
    return gx[:, :, 0, :], gw[:, :, 0, :], gb
