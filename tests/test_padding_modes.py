"""padding_mode ('zeros', 'reflect', 'replicate', 'circular') on conv2d, its gradients and
ConvLayer: against np.pad plus the loop reference, every kernel and dtype; the fold-back of the
padding's gradient as the adjoint of the padding; validation messages."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from gradcheck_util import numeric_gradient
from helpers import Cfg, assert_close, make_data
from naive import padding4
from naive_family import (
    conv2d_mode_grads_naive,
    conv2d_mode_naive,
    pad_naive,
    unpad_grad_naive,
)

import numbaconv as nc
from numbaconv.functional import fold_padding, pad_input

MODES = ("zeros", "reflect", "replicate", "circular")

GRID = [
    Cfg(2, 3, 5, 6, 4, 3, 3, padding=1),
    Cfg(1, 4, 6, 5, 4, 3, 2, stride=2, padding=(2, 1), groups=2),
    Cfg(2, 2, 4, 7, 3, 2, 4, padding="same"),  # asymmetric: one more at the bottom/right
    Cfg(1, 2, 5, 5, 2, 3, 3, stride=3, padding=4, dilation=2),  # padding near the input size
    Cfg(1, 3, 4, 4, 3, 3, 3, padding=(0, 3), groups=3, bias=False),  # width only, depthwise
]


def _valid_for(cfg: Cfg, mode: str) -> bool:
    top, bottom, left, right = cfg.pad4
    if mode == "reflect":
        return max(top, bottom) < cfg.h and max(left, right) < cfg.w
    if mode == "circular":
        return max(top, bottom) <= cfg.h and max(left, right) <= cfg.w
    return True


CASES = [(cfg, mode) for cfg in GRID for mode in MODES if _valid_for(cfg, mode)]


@functools.cache
def reference(cfg: Cfg, mode: str, dtype):
    x, w, b, gy = make_data(cfg, dtype)
    kw = dict(stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation, groups=cfg.groups)
    values = (conv2d_mode_naive(x, w, b, mode=mode, **kw), *conv2d_mode_grads_naive(
        gy, x, w, mode=mode, **kw
    ))  # fmt: skip
    absb = None if b is None else np.abs(b)
    ax, aw, agy = np.abs(x), np.abs(w), np.abs(gy)
    scales = (conv2d_mode_naive(ax, aw, absb, mode=mode, **kw), *conv2d_mode_grads_naive(
        agy, ax, aw, mode=mode, **kw
    ))  # fmt: skip
    names = ("y", "grad_x", "grad_w", "grad_b")
    return dict(zip(names, zip(values, scales, strict=True), strict=True))


@pytest.mark.parametrize(("cfg", "mode"), CASES, ids=str)
def test_against_reference(cfg, mode, kernel, dtype):
    x, w, b, gy = make_data(cfg, dtype)
    got = dict(y=nc.conv2d(x, w, b, padding_mode=mode, kernel=kernel, **cfg.kwargs))
    got["grad_x"], got["grad_w"], got["grad_b"] = nc.conv2d_backward(
        gy, x, w, padding_mode=mode, kernel=kernel, **cfg.kwargs
    )
    for name, (value, scale) in reference(cfg, mode, dtype).items():
        assert_close(got[name], value, scale, dtype, f"{name} [{kernel}, {mode}, {cfg}]")


def test_modes_differ():
    """The modes are not all zero padding in disguise: each gives its own result."""
    cfg = GRID[0]
    x, w, b, _ = make_data(cfg, np.float64)
    ys = [nc.conv2d(x, w, b, padding=1, padding_mode=mode) for mode in MODES]
    for i in range(len(ys)):
        for j in range(i):
            assert not np.allclose(ys[i], ys[j]), (MODES[i], MODES[j])
        # ... and agree inside, where no window reads the padding
        np.testing.assert_allclose(ys[i][:, :, 1:-1, 1:-1], ys[0][:, :, 1:-1, 1:-1], rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
# (3, 3, 4, 4): the largest padding that every mode accepts for a 4x5 input
@pytest.mark.parametrize("pads", [(1, 2, 0, 3), (3, 3, 4, 4), (0, 0, 0, 0)], ids=str)
def test_pad_and_fold_are_adjoint(mode, pads):
    """``pad_input`` is np.pad, and ``<pad(x), g> == <x, fold(g)>`` (fold is pad's adjoint)."""
    shape = (2, 3, 4, 5)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    padded = pad_input(x, pads, mode)
    np.testing.assert_array_equal(padded, pad_naive(x, pads, mode))
    g = rng.standard_normal(padded.shape)
    folded = fold_padding(g, pads, mode)
    assert folded.shape == shape and folded.flags.c_contiguous
    np.testing.assert_allclose(folded, unpad_grad_naive(g, shape, pads, mode), rtol=1e-13)
    assert float(np.sum(padded * g)) == pytest.approx(float(np.sum(x * folded)), rel=1e-12)


def test_circular_padding_of_the_whole_input():
    """Circular padding may be as large as the input: a wrap-around of exactly one period."""
    x = np.arange(6.0).reshape(1, 1, 2, 3)
    w = np.ones((1, 1, 1, 1))
    y = nc.conv2d(x, w, padding=(2, 3), padding_mode="circular")
    np.testing.assert_array_equal(y[0, 0], np.tile(x[0, 0], (3, 3)))
    gx, _, _ = nc.conv2d_backward(np.ones_like(y), x, w, padding=(2, 3), padding_mode="circular")
    np.testing.assert_array_equal(gx, np.full(x.shape, 9.0))  # each pixel appears 9 times


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_finite_differences(mode, kernel):
    cfg = Cfg(1, 2, 4, 5, 2, 3, 2, stride=(1, 2), padding=(2, 1))
    x, w, b, gy = make_data(cfg, np.float64, seed=8)
    x, w, b = x.copy(), w.copy(), b.copy()
    opts = dict(padding_mode=mode, kernel=kernel, **cfg.kwargs)

    def loss():
        return float(np.sum(nc.conv2d(x, w, b, **opts) * gy))

    grads = nc.conv2d_backward(gy, x, w, **opts)
    for name, got, arg in zip(("grad_x", "grad_w", "grad_b"), grads, (x, w, b), strict=True):
        expected = numeric_gradient(loss, arg)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------------------------
# ConvLayer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_conv_layer(mode, kernel):
    rng = np.random.default_rng(4)
    layer = nc.ConvLayer(3, 5, 4, 4, 3, 3, 1, (2, 1), padding_mode=mode, kernel=kernel, rng=rng)
    assert layer.padding_mode == mode and f"padding_mode={mode!r}" in repr(layer)
    x = rng.standard_normal((2, 3, 5, 4))
    y = layer.forward(x)
    u = conv2d_mode_naive(x, layer.w, layer.b[0], 1, (2, 1), 1, 1, mode)
    np.testing.assert_allclose(layer.u, u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, np.maximum(u, 0), rtol=1e-12, atol=1e-12)
    # The teaching identity holds with the mode's padding in the columns.
    n, k, oh, ow = u.shape
    from_cols = ((layer.w_col @ layer.cols).T + layer.b).reshape(n, oh, ow, k).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(from_cols, u, rtol=1e-12, atol=1e-12)

    grad_y = rng.standard_normal(y.shape)
    gx, gw, gb = conv2d_mode_grads_naive(grad_y * (u > 0), x, layer.w, 1, (2, 1), 1, 1, mode)
    np.testing.assert_allclose(layer.backward(grad_y), gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_w, gw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_b, gb, rtol=1e-12, atol=1e-12)


def test_conv_layer_validation():
    with pytest.raises(ValueError, match=r"padding_mode must be one of 'zeros', 'reflect'"):
        nc.ConvLayer(1, 4, 4, 2, 3, 3, 1, 1, padding_mode="constant")
    with pytest.raises(ValueError, match=r"padding 4 at the top of an input of height 4"):
        nc.ConvLayer(1, 4, 6, 2, 3, 3, 1, 4, padding_mode="reflect")
    assert repr(nc.ConvLayer(1, 4, 4, 2, 3, 3)).count("padding_mode") == 0


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

X = np.zeros((1, 2, 4, 5))
W = np.zeros((3, 2, 3, 3))

BAD = [
    (dict(padding_mode="zero"), r"padding_mode must be one of 'zeros', 'reflect', 'replicate', "),
    (dict(padding_mode=None), r"padding_mode must be one of .* got None"),
    (
        dict(padding=(4, 1), padding_mode="reflect"),
        r"padding_mode='reflect' needs each padding smaller than the input: padding 4 at the "
        r"top of an input of height 4",
    ),
    (
        dict(padding=(1, 5), padding_mode="reflect"),
        r"padding 5 at the left of an input of width 5",
    ),
    (
        dict(padding=(5, 1), padding_mode="circular"),
        r"padding_mode='circular' needs each padding at most the input's size \(it wraps around "
        r"once at most\): padding 5 at the top of an input of height 4",
    ),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nc.conv2d(X, W, **kwargs)
    # The mode is checked before grad_y (whose shape would be wrong here too).
    with pytest.raises(ValueError, match=match):
        nc.conv2d_backward(np.zeros((1, 3, 1, 1)), X, W, **kwargs)


def test_allowed_limits():
    """PyTorch's limits exactly: reflect up to size - 1, circular up to size, replicate any."""
    for mode, pad in (("reflect", (3, 4)), ("circular", (4, 5)), ("replicate", (9, 9))):
        y = nc.conv2d(X, W, padding=pad, padding_mode=mode)
        top, _, left, _ = padding4(pad, (3, 3), (1, 1), (1, 1))
        assert y.shape == (1, 3, 4 + 2 * top - 2, 5 + 2 * left - 2)
    # 'same' with a non-zero mode, as torch.nn.Conv2d allows; 'valid' pads nothing
    y = nc.conv2d(X, np.ones((3, 2, 2, 4)), padding="same", padding_mode="reflect")
    assert y.shape == (1, 3, 4, 5)
    assert nc.conv2d(X, W, padding="valid", padding_mode="circular").shape == (1, 3, 2, 3)
