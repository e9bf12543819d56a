"""Every validation error, by type and message, for conv2d and conv2d_backward."""

from __future__ import annotations

import re

import numpy as np
import pytest

import numbaconv as nc

X = np.zeros((2, 4, 6, 6))
W = np.zeros((6, 4, 3, 3))
B = np.zeros(6)
GY = np.zeros((2, 6, 4, 4))


def _forward(x, w, **kw):
    return nc.conv2d(x, w, **kw)


def _backward(x, w, **kw):
    # The geometry is validated before grad_y, whose shape depends on it.
    dtype = x.dtype if isinstance(x, np.ndarray) else np.float64
    return nc.conv2d_backward(np.zeros((1, 1, 1, 1), dtype=dtype), x, w, **kw)


ENTRY_POINTS = pytest.mark.parametrize("call", [_forward, _backward], ids=["conv2d", "backward"])

# (x, w, kwargs, exception, message regex)
BAD_GEOMETRY = [
    (np.zeros((4, 6, 6)), W, {}, ValueError, r"x must be 4-D \(N, C, H, W\), got 3-D"),
    (np.zeros((1, 2, 4, 6, 6)), W, {}, ValueError, r"x must be 4-D .* got 5-D"),
    (X, np.zeros((4, 3, 3)), {}, ValueError, r"w must be 4-D \(K, C // groups, R, S\), got 3-D"),
    (
        X,
        np.zeros((6, 3, 3, 3)),
        {},
        ValueError,
        r"weight has 3 input channels per group but the input has 4 channels and groups=1 "
        r"\(expected weight.shape\[1\] == 4\)",
    ),
    (
        X,
        np.zeros((6, 4, 3, 3)),
        dict(groups=2),
        ValueError,
        r"weight has 4 input channels per group .* groups=2 \(expected weight.shape\[1\] == 2\)",
    ),
    (
        X,
        np.zeros((6, 1, 3, 3)),
        dict(groups=3),
        ValueError,
        r"in_channels \(4\) must be divisible by groups \(3\)",
    ),
    (
        X,
        np.zeros((5, 2, 3, 3)),
        dict(groups=2),
        ValueError,
        r"out_channels \(5\) must be divisible by groups \(2\)",
    ),
    (X, W, dict(groups=0), ValueError, r"groups must be >= 1, got 0"),
    (X, W, dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
    (X, W, dict(stride=(1, 0)), ValueError, r"stride must be >= 1, got \(1, 0\)"),
    (X, W, dict(stride=-2), ValueError, r"stride must be >= 1"),
    (X, W, dict(dilation=0), ValueError, r"dilation must be >= 1, got 0"),
    (X, W, dict(dilation=(0, 2)), ValueError, r"dilation must be >= 1, got \(0, 2\)"),
    (X, W, dict(padding=-1), ValueError, r"padding must be non-negative, got -1"),
    (X, W, dict(padding=(0, -2)), ValueError, r"padding must be non-negative, got \(0, -2\)"),
    (
        X,
        W,
        dict(padding="same", stride=2),
        ValueError,
        r"padding='same' is only supported with stride 1",
    ),
    (
        X,
        W,
        dict(padding="same", stride=(1, 2)),
        ValueError,
        r"padding='same' is only supported with stride 1",
    ),
    (
        X,
        W,
        dict(padding="full"),
        ValueError,
        r"padding must be an int, a pair, 'valid' or 'same', got 'full'",
    ),
    (X, W, dict(stride=(1, 1, 1)), ValueError, r"stride must be an int or a pair of ints"),
    (X, W, dict(padding=(1, 1, 1, 1)), ValueError, r"padding must be an int or a pair of ints"),
    (X, W, dict(stride=1.5), TypeError, r"stride must be an int or a pair of ints, got 1.5"),
    (X, W, dict(dilation=True), TypeError, r"dilation must be an int, got True"),
    (X, W, dict(groups=1.0), TypeError, r"groups must be an int"),
    (
        X,
        np.zeros((6, 4, 7, 3)),
        {},
        ValueError,
        r"output size would be 0x4: the \(dilated\) filter 7x3 is larger than the padded input 6x6",
    ),
    (
        X,
        W,
        dict(dilation=3),
        ValueError,
        r"output size would be 0x0: the \(dilated\) filter 7x7 is larger than the padded input 6x6",
    ),
    (
        X,
        np.zeros((6, 4, 9, 3)),
        dict(padding=1),
        ValueError,
        r"output size would be 0x6: .* filter 9x3 .* padded input 8x8",
    ),
    (X, np.zeros((0, 4, 3, 3)), {}, ValueError, r"weight must have non-zero dimensions"),
    (X, np.zeros((6, 4, 0, 3)), {}, ValueError, r"weight must have non-zero dimensions"),
    (
        np.zeros((2, 4, 0, 6)),
        W,
        {},
        ValueError,
        r"input must have non-zero channels, height and width",
    ),
    ([[[[0.0]]]], W, {}, TypeError, r"x must be a numpy.ndarray, got list"),
    (X, 1.0, {}, TypeError, r"w must be a numpy.ndarray, got float"),
]


@ENTRY_POINTS
@pytest.mark.parametrize(
    "x, w, kw, exc, msg", BAD_GEOMETRY, ids=[str(i) for i in range(len(BAD_GEOMETRY))]
)
def test_bad_geometry(call, x, w, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        call(x, w, **kw)


BAD_DTYPES = [
    np.int64,
    np.int32,
    np.float16,
    np.complex128,
    np.bool_,
    np.uint8,
]


@ENTRY_POINTS
@pytest.mark.parametrize("bad", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_unsupported_dtype_x(call, bad):
    with pytest.raises(TypeError, match=r"x has dtype .*; numbaconv supports float32 and float64"):
        call(X.astype(bad), W.astype(bad))


@pytest.mark.parametrize("bad", [np.int64, np.float16, np.longdouble], ids=str)
def test_unsupported_dtype_w(bad):
    with pytest.raises(TypeError, match=r"w has dtype .* supports float32 and float64"):
        nc.conv2d(X, W.astype(bad))


@ENTRY_POINTS
@pytest.mark.parametrize("xd, wd", [(np.float32, np.float64), (np.float64, np.float32)])
def test_mixed_dtypes(call, xd, wd):
    with pytest.raises(TypeError, match=r"x and w must have the same dtype"):
        call(X.astype(xd), W.astype(wd))


def test_bias_errors():
    with pytest.raises(
        ValueError, match=re.escape("b must have shape (6,) to match w, got (1, 6)")
    ):
        nc.conv2d(X, W, np.zeros((1, 6)))
    with pytest.raises(ValueError, match=re.escape("b must have shape (6,) to match w, got (5,)")):
        nc.conv2d(X, W, np.zeros(5))
    with pytest.raises(ValueError, match=re.escape("b must have shape (6,) to match w, got ()")):
        nc.conv2d(X, W, np.zeros(()))
    with pytest.raises(TypeError, match=r"b must have the dtype of x \(float64\), got float32"):
        nc.conv2d(X, W, B.astype(np.float32))
    with pytest.raises(
        TypeError, match=r"b has dtype int64; numbaconv supports float32 and float64"
    ):
        nc.conv2d(X, W, B.astype(np.int64))
    with pytest.raises(TypeError, match=r"b must be a numpy.ndarray, got list"):
        nc.conv2d(X, W, [0.0] * 6)


def test_grad_y_errors():
    with pytest.raises(
        ValueError,
        match=re.escape("grad_y must have the output's shape (2, 6, 4, 4), got (2, 6, 4, 5)"),
    ):
        nc.conv2d_backward(np.zeros((2, 6, 4, 5)), X, W)
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(2, 6, 6, 6\)"):
        nc.conv2d_backward(GY, X, W, padding=1)
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape"):
        nc.conv2d_backward(GY[0], X, W)
    with pytest.raises(
        TypeError, match=r"grad_y must have the dtype of x \(float64\), got float32"
    ):
        nc.conv2d_backward(GY.astype(np.float32), X, W)
    with pytest.raises(TypeError, match=r"grad_y has dtype int64; .* float32 and float64"):
        nc.conv2d_backward(GY.astype(np.int64), X, W)
    with pytest.raises(TypeError, match=r"grad_y must be a numpy.ndarray"):
        nc.conv2d_backward(GY.tolist(), X, W)


@pytest.mark.parametrize("name", ["nope", "IM2COL", "numpy "])
def test_unknown_kernel_name(name):
    listing = r".*".join(re.escape(k) for k in nc.KERNELS)
    with pytest.raises(ValueError, match=rf"unknown kernel {re.escape(repr(name))}.*{listing}"):
        nc.conv2d(X, W, kernel=name)
    with pytest.raises(ValueError, match=rf"unknown kernel {re.escape(repr(name))}.*{listing}"):
        nc.conv2d_backward(GY, X, W, kernel=name)


def test_kernels_tuple():
    assert isinstance(nc.KERNELS, tuple)
    assert {"im2col", "direct", "numpy"} <= set(nc.KERNELS)
    assert all(isinstance(k, str) for k in nc.KERNELS)
    assert len(set(nc.KERNELS)) == len(nc.KERNELS)
