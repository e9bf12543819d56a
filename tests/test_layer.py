"""ConvLayer: drop-in equality with the teaching layer, textbook usage, options, errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Cfg, assert_close, make_data, naive_reference
from naive import TextbookConvLayer

import numbaconv as nc

# (x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad)
TEXTBOOK_SHAPES = [
    (1, 8, 8, 4, 3, 3, 1, 1),  # the textbook's digits example, smaller
    (3, 7, 6, 5, 3, 2, 2, 1),
    (2, 6, 6, 3, 2, 2, 2, 0),
    (2, 5, 5, 3, 5, 5, 1, 0),
]

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _pair_of_layers(params, kernel, relu=True, seed=0):
    np.random.seed(seed)  # noqa: NPY002 (the textbook's way)
    tb = TextbookConvLayer(*params, relu=relu)
    np.random.seed(seed)  # noqa: NPY002
    layer = nc.ConvLayer(*params, kernel=kernel, activation="relu" if relu else None)
    return tb, layer


@pytest.mark.parametrize("params", TEXTBOOK_SHAPES, ids=str)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
def test_drop_in_equal_to_textbook(kernel, params, relu):
    tb, layer = _pair_of_layers(params, kernel, relu)
    # Same initial weights, bit for bit, from the same global seed.
    np.testing.assert_array_equal(layer.w, tb.w)
    np.testing.assert_array_equal(layer.b, tb.b)
    assert layer.w.shape == tb.w.shape and layer.b.shape == (1, params[3])
    assert layer.params == tb.params
    assert (layer.y_ch, layer.y_h, layer.y_w) == (tb.y_ch, tb.y_h, tb.y_w)
    assert layer.kernel == kernel

    rng = np.random.default_rng(5)
    eta = 0.05
    for step in range(3):
        x = rng.standard_normal((3, *params[:3]))
        y = layer.forward(x)
        tb.forward(x)
        assert y is layer.y or np.array_equal(y, layer.y)
        np.testing.assert_allclose(y, tb.y, **TIGHT, err_msg=f"y, step {step}")
        if relu:
            assert (y >= 0).all() and (y == 0).any()
        else:
            assert (y < 0).any()
        grad_y = rng.standard_normal(y.shape)
        gx = layer.backward(grad_y)
        tb.backward(grad_y)
        assert gx is layer.grad_x or np.array_equal(gx, layer.grad_x)
        np.testing.assert_allclose(layer.grad_x, tb.grad_x, **TIGHT, err_msg=f"grad_x {step}")
        np.testing.assert_allclose(layer.grad_w, tb.grad_w, **TIGHT, err_msg=f"grad_w {step}")
        assert layer.grad_b.shape == (params[3],)
        np.testing.assert_allclose(layer.grad_b, tb.grad_b, **TIGHT, err_msg=f"grad_b {step}")
        # The three ways the teaching code and its readers update parameters.
        if step == 0:
            layer.update(eta)
            tb.update(eta)
        elif step == 1:
            layer.w -= eta * layer.grad_w
            layer.b -= eta * layer.grad_b
            tb.w -= eta * tb.grad_w
            tb.b -= eta * tb.grad_b
        else:
            layer.w = layer.w - eta * layer.grad_w
            layer.b = layer.b - eta * layer.grad_b
            tb.w = tb.w - eta * tb.grad_w
            tb.b = tb.b - eta * tb.grad_b
        np.testing.assert_allclose(layer.w, tb.w, **TIGHT, err_msg=f"w after update {step}")
        np.testing.assert_allclose(layer.b, tb.b, **TIGHT, err_msg=f"b after update {step}")
    # And the last update is seen by the next forward.
    x = rng.standard_normal((2, *params[:3]))
    tb.forward(x)
    np.testing.assert_allclose(layer.forward(x), tb.y, **TIGHT)


def test_update_in_place_takes_effect(kernel):
    """Zeroing w in place (and b by assignment) must change the next forward to relu(b)."""
    layer = nc.ConvLayer(2, 5, 5, 3, 3, 3, 1, 1, kernel=kernel, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((2, 2, 5, 5))
    y0 = layer.forward(x).copy()
    layer.w *= 0
    layer.b = np.array([[1.0, -1.0, 2.0]])
    y1 = layer.forward(x)
    assert not np.array_equal(y0, y1)
    expect = np.broadcast_to(np.array([1.0, 0.0, 2.0])[None, :, None, None], y1.shape)
    np.testing.assert_array_equal(y1, expect)
    # In-place update of b too.
    layer.b[0, 1] = 5.0
    np.testing.assert_array_equal(layer.forward(x)[:, 1], 5.0)
    # Assignment of w with a fresh array.
    w = np.zeros_like(layer.w)
    w[:, :, 1, 1] = 1.0  # identity-ish center tap: y[k] = sum_c x[c] + b[k]
    layer.w = w
    layer.b = np.zeros((1, 3))
    y = layer.forward(x)
    # Rounding-level tolerance for O(1) values: Winograd's transforms round at ~1e-15.
    np.testing.assert_allclose(y[:, 0], np.maximum(x.sum(axis=1), 0), rtol=1e-14, atol=1e-14)


def test_textbook_training_loop_against_textbook(kernel):
    """A few textbook-style epochs (forward, backward, update) stay equal to the teaching layer."""
    params = (1, 6, 6, 3, 3, 3, 1, 1)
    tb, layer = _pair_of_layers(params, kernel, seed=7)
    np.random.seed(8)  # noqa: NPY002
    x = np.random.rand(4, 1, 6, 6)  # noqa: NPY002
    target = np.random.rand(4, 3, 6, 6)  # noqa: NPY002
    for _ in range(5):
        tb.forward(x)
        layer.forward(x)
        tb.backward(tb.y - target)
        layer.backward(layer.y - target)
        tb.update(0.01)
        layer.update(0.01)
    np.testing.assert_allclose(layer.w, tb.w, **TIGHT)
    np.testing.assert_allclose(layer.b, tb.b, **TIGHT)
    np.testing.assert_allclose(layer.grad_x, tb.grad_x, **TIGHT)


@pytest.mark.parametrize("groups_dil", [(1, 2), (2, 1), (4, 1)], ids=["dil2", "g2", "depthwise"])
def test_layer_options_against_reference(kernel, dtype, groups_dil):
    groups, dilation = groups_dil
    layer = nc.ConvLayer(
        4,
        7,
        6,
        4,
        3,
        3,
        2,
        1,
        dilation=dilation,
        groups=groups,
        kernel=kernel,
        activation=None,
        dtype=dtype,
        rng=np.random.default_rng(3),
    )
    assert layer.w.shape == (4, 4 // groups, 3, 3)
    assert layer.w.dtype == dtype and layer.b.dtype == dtype and layer.b.shape == (1, 4)
    cfg = Cfg(2, 4, 7, 6, 4, 3, 3, stride=2, padding=1, dilation=dilation, groups=groups)
    x, _, _, gy = make_data(cfg, dtype, seed=4)
    ref = naive_reference(cfg, x, layer.w, layer.b[0], gy)
    y = layer.forward(x)
    assert (layer.y_h, layer.y_w) == y.shape[2:] == cfg.y_shape[2:]
    assert_close(y, ref.y, ref.y_abs, dtype, "forward")
    gx = layer.backward(gy)
    assert_close(gx, ref.gx, ref.gx_abs, dtype, "grad_x")
    assert_close(layer.grad_w, ref.gw, ref.gw_abs, dtype, "grad_w")
    assert_close(layer.grad_b, ref.gb, ref.gb_abs, dtype, "grad_b")
    layer.update(0.1)
    assert layer.w.dtype == dtype and layer.b.dtype == dtype


def test_relu_matches_definition(kernel, dtype):
    layer = nc.ConvLayer(
        2, 5, 5, 3, 2, 2, 1, 0, kernel=kernel, dtype=dtype, rng=np.random.default_rng(9)
    )
    lin = nc.ConvLayer(
        2,
        5,
        5,
        3,
        2,
        2,
        1,
        0,
        kernel=kernel,
        dtype=dtype,
        activation=None,
        rng=np.random.default_rng(9),
    )
    np.testing.assert_array_equal(layer.w, lin.w)
    x = np.random.default_rng(10).standard_normal((2, 2, 5, 5)).astype(dtype)
    u = lin.forward(x)
    y = layer.forward(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, np.where(u <= 0, 0, u))
    gy = np.random.default_rng(11).standard_normal(y.shape).astype(dtype)
    gx = layer.backward(gy)
    lin_gx = lin.backward(gy * np.where(u <= 0, 0, 1).astype(dtype))
    assert gx.dtype == dtype and layer.grad_w.dtype == dtype and layer.grad_b.dtype == dtype
    np.testing.assert_array_equal(gx, lin_gx)
    np.testing.assert_array_equal(layer.grad_w, lin.grad_w)
    np.testing.assert_array_equal(layer.grad_b, lin.grad_b)


def test_rng_and_wb_width():
    a = nc.ConvLayer(2, 5, 5, 3, 3, 3, rng=np.random.default_rng(42), wb_width=0.5)
    b = nc.ConvLayer(2, 5, 5, 3, 3, 3, rng=np.random.default_rng(42), wb_width=0.5)
    np.testing.assert_array_equal(a.w, b.w)
    np.testing.assert_array_equal(a.b, b.b)
    g = np.random.default_rng(42)
    np.testing.assert_allclose(a.w, 0.5 * g.standard_normal((3, 2, 3, 3)), rtol=1e-15)
    # The textbook's global-generator draw: w first, then b.
    np.random.seed(3)  # noqa: NPY002
    c = nc.ConvLayer(2, 5, 5, 3, 3, 3)
    np.random.seed(3)  # noqa: NPY002
    w = 0.1 * np.random.randn(3, 2, 3, 3)  # noqa: NPY002
    bb = 0.1 * np.random.randn(1, 3)  # noqa: NPY002
    np.testing.assert_array_equal(c.w, w)
    np.testing.assert_array_equal(c.b, bb)
    assert c.params == (2, 5, 5, 3, 3, 3, 1, 0)
    assert (c.y_ch, c.y_h, c.y_w) == (3, 3, 3)


def test_float32_layer_close_to_textbook(kernel):
    params = (2, 6, 6, 3, 3, 3, 1, 1)
    tb, _ = _pair_of_layers(params, kernel)
    np.random.seed(0)  # noqa: NPY002
    layer = nc.ConvLayer(*params, kernel=kernel, dtype=np.float32)
    np.testing.assert_array_equal(layer.w, tb.w.astype(np.float32))
    x = np.random.default_rng(2).standard_normal((2, *params[:3]))
    tb.w = layer.w.astype(np.float64)
    tb.b = layer.b.astype(np.float64)
    tb.forward(x.astype(np.float32).astype(np.float64))
    y = layer.forward(x.astype(np.float32))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, tb.y, rtol=1e-5, atol=1e-5)
    gy = np.random.default_rng(3).standard_normal(y.shape)
    tb.backward(gy.astype(np.float32).astype(np.float64))
    gx = layer.backward(gy.astype(np.float32))
    assert gx.dtype == np.float32 and layer.grad_w.dtype == np.float32
    np.testing.assert_allclose(gx, tb.grad_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.grad_w, tb.grad_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.grad_b, tb.grad_b, rtol=1e-4, atol=1e-4)


def test_default_kernel_layer_equals_textbook():
    params = (2, 5, 5, 3, 3, 3, 1, 1)
    np.random.seed(1)  # noqa: NPY002
    tb = TextbookConvLayer(*params)
    np.random.seed(1)  # noqa: NPY002
    layer = nc.ConvLayer(*params)
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5))
    tb.forward(x)
    np.testing.assert_allclose(layer.forward(x), tb.y, **TIGHT)


def test_layer_errors():
    layer = nc.ConvLayer(3, 6, 6, 4, 3, 3, 1, 1, rng=np.random.default_rng(0))
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        layer.backward(np.zeros((2, 4, 6, 6)))
    with pytest.raises(
        ValueError,
        match=r"ConvLayer expects input of shape \(N, 3, 6, 6\), got "
        r"\(2, 2, 6, 6\)",
    ):
        layer.forward(np.zeros((2, 2, 6, 6)))
    with pytest.raises(
        ValueError, match=r"expects input of shape \(N, 3, 6, 6\), got \(2, 3, 7, 6\)"
    ):
        layer.forward(np.zeros((2, 3, 7, 6)))
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3, 6, 6\), got \(3, 6, 6\)"):
        layer.forward(np.zeros((3, 6, 6)))
    layer.forward(np.zeros((2, 3, 6, 6)))
    with pytest.raises(ValueError, match=r"grad_y must have the shape of the last output"):
        layer.backward(np.zeros((2, 4, 5, 6)))
    with pytest.raises(ValueError, match=r"unknown kernel 'bogus'.*valid kernels"):
        nc.ConvLayer(3, 6, 6, 4, 3, 3, kernel="bogus")
    with pytest.raises(ValueError, match=r"unknown kernel 'bogus'"):
        layer.kernel = "bogus"
    with pytest.raises(TypeError, match=r"float32 (and|or) float64"):
        nc.ConvLayer(3, 6, 6, 4, 3, 3, dtype=np.float16)
    with pytest.raises(ValueError, match=r"activation must be 'relu' or None"):
        nc.ConvLayer(3, 6, 6, 4, 3, 3, activation="tanh")
    with pytest.raises(ValueError, match=r"in_channels \(3\) must be divisible by groups \(2\)"):
        nc.ConvLayer(3, 6, 6, 4, 3, 3, groups=2)
    with pytest.raises(ValueError, match=r"output size would be"):
        nc.ConvLayer(3, 2, 2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"padding='same' is only supported with stride 1"):
        nc.ConvLayer(3, 6, 6, 4, 3, 3, 2, "same")


def test_kernel_can_be_switched(dtype):
    """Switching layer.kernel between calls gives the same numbers (to tolerance)."""
    layer = nc.ConvLayer(2, 6, 5, 3, 3, 3, 1, 1, dtype=dtype, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((2, 2, 6, 5)).astype(dtype)
    outs = []
    for k in nc.KERNELS:
        layer.kernel = k
        assert layer.kernel == k
        outs.append(layer.forward(x).copy())
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for k, o in zip(nc.KERNELS, outs, strict=True):
        np.testing.assert_allclose(o, outs[0], rtol=tol, atol=tol, err_msg=k)
