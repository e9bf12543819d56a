"""The loop reference itself, checked against SciPy and the textbook (no numbaconv involved)."""

from __future__ import annotations

import numpy as np
import pytest
from naive import (
    TextbookConvLayer,
    col2im,
    col2im_naive,
    conv2d_grads_naive,
    conv2d_grads_windows,
    conv2d_naive,
    conv2d_windows,
    im2col,
    im2col_naive,
    out_shape,
    padding4,
)
from scipy.signal import correlate2d


def _scipy_conv(x, w, b, stride, pad4, dilation, groups):
    """Full-resolution correlation by SciPy on the padded input, then subsample."""
    n_b, n_c, _, _ = x.shape
    n_k, cg, r, s = w.shape
    kg = n_k // groups
    dh, dw = dilation
    wd = np.zeros((n_k, cg, dh * (r - 1) + 1, dw * (s - 1) + 1))
    wd[:, :, ::dh, ::dw] = w
    top, bottom, left, right = pad4
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ys = []
    for n in range(n_b):
        yk = []
        for k in range(n_k):
            g = k // kg
            acc = sum(correlate2d(xp[n, g * cg + c], wd[k, c], mode="valid") for c in range(cg))
            yk.append(acc[:: stride[0], :: stride[1]] + (0 if b is None else b[k]))
        ys.append(yk)
    return np.array(ys)


CASES = [
    ((2, 3, 6, 5), (4, 3, 3, 3), (1, 1), "valid", (1, 1), 1),
    ((2, 2, 7, 6), (2, 2, 3, 2), (2, 1), (1, 2), (1, 1), 1),
    ((1, 4, 7, 7), (4, 2, 3, 3), (1, 1), "same", (2, 1), 2),
    ((1, 3, 6, 6), (3, 1, 2, 2), (1, 1), "same", (1, 1), 3),
    ((2, 2, 8, 7), (2, 2, 3, 3), (3, 2), 2, (1, 2), 1),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_naive_matches_scipy(case):
    x_shape, w_shape, stride, padding, dilation, groups = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    pad4 = padding4(padding, w_shape[2:], stride, dilation)
    y = conv2d_naive(x, w, b, stride, pad4, dilation, groups)
    assert y.shape == out_shape(x_shape, w_shape, stride, pad4, dilation)
    np.testing.assert_allclose(
        y, _scipy_conv(x, w, b, stride, pad4, dilation, groups), rtol=1e-12, atol=1e-12
    )
    if padding == "same":
        assert y.shape[2:] == x_shape[2:]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_grads_naive_are_the_adjoint(case):
    x_shape, w_shape, stride, padding, dilation, groups = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    pad4 = padding4(padding, w_shape[2:], stride, dilation)
    y = conv2d_naive(x, w, None, stride, pad4, dilation, groups)
    g = rng.standard_normal(y.shape)
    gx, gw, gb = conv2d_grads_naive(g, x, w, stride, pad4, dilation, groups)
    lhs = np.sum(y * g)
    assert lhs == pytest.approx(np.sum(x * gx), rel=1e-12)
    assert lhs == pytest.approx(np.sum(w * gw), rel=1e-12)
    np.testing.assert_allclose(gb, g.sum(axis=(0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_window_forms_match_the_loops(case):
    """The einsum forms (for layers too large for the loops) against the loops, values and
    magnitudes."""
    x_shape, w_shape, stride, padding, dilation, groups = case
    rng = np.random.default_rng(6)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    pad4 = padding4(padding, w_shape[2:], stride, dilation)
    args = (stride, pad4, dilation, groups)
    y, y_abs = conv2d_windows(x, w, b, *args)
    np.testing.assert_allclose(y, conv2d_naive(x, w, b, *args), rtol=1e-12, atol=1e-12)
    magnitudes = (np.abs(x), np.abs(w), np.abs(b))
    np.testing.assert_allclose(y_abs, conv2d_naive(*magnitudes, *args), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(y.shape)
    values, scales = conv2d_grads_windows(g, x, w, *args)
    for got, want in zip(values, conv2d_grads_naive(g, x, w, *args), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    loops = conv2d_grads_naive(np.abs(g), np.abs(x), np.abs(w), *args)
    for got, want in zip(scales, loops, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_same_padding_split_like_pytorch():
    # Odd total padding: the extra one at the bottom/right.
    assert padding4("same", (2, 4), (1, 1), (1, 1)) == (0, 1, 1, 2)
    assert padding4("same", (3, 3), (1, 1), (2, 1)) == (2, 2, 1, 1)
    assert padding4("valid", (3, 3), (2, 2), (1, 1)) == (0, 0, 0, 0)
    assert padding4((1, 2), (3, 3), (2, 2), (1, 1)) == (1, 1, 2, 2)


def test_textbook_helpers_match_naive_im2col():
    x = np.random.default_rng(2).standard_normal((2, 3, 7, 6))
    for fh, fw, stride, pad in [(3, 3, 1, 1), (2, 3, 2, 0), (3, 2, 2, 2)]:
        y_h = (7 + 2 * pad - fh) // stride + 1
        y_w = (6 + 2 * pad - fw) // stride + 1
        cols = im2col(x, fh, fw, y_h, y_w, stride, pad)
        np.testing.assert_array_equal(cols, im2col_naive(x, fh, fw, y_h, y_w, stride, pad))
        c = np.random.default_rng(3).standard_normal(cols.shape)
        np.testing.assert_allclose(
            col2im(c, x.shape, fh, fw, y_h, y_w, stride, pad),
            col2im_naive(c, x.shape, fh, fw, y_h, y_w, stride, pad),
            rtol=1e-13,
            atol=1e-13,
        )


def test_textbook_layer_matches_naive():
    np.random.seed(0)  # noqa: NPY002
    layer = TextbookConvLayer(2, 6, 5, 3, 3, 3, 2, 1, relu=False)
    x = np.random.default_rng(4).standard_normal((2, 2, 6, 5))
    layer.forward(x)
    pad4 = (1, 1, 1, 1)
    np.testing.assert_allclose(
        layer.y, conv2d_naive(x, layer.w, layer.b[0], 2, pad4), rtol=1e-12, atol=1e-12
    )
    g = np.random.default_rng(5).standard_normal(layer.y.shape)
    layer.backward(g)
    gx, gw, gb = conv2d_grads_naive(g, x, layer.w, 2, pad4)
    np.testing.assert_allclose(layer.grad_x, gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_w, gw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_b, gb, rtol=1e-12, atol=1e-12)
