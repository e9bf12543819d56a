"""conv_transpose2d and its gradients against the scatter-loop reference, every kernel and dtype.

Also: finite-difference checks, the adjoint relation with conv2d, validation messages, and
``ConvTransposeLayer``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
from gradcheck_util import numeric_gradient
from helpers import assert_close
from naive import as_pair
from naive_family import (
    conv_transpose2d_grads_naive,
    conv_transpose2d_naive,
    conv_transpose_out_size,
)

import numbaconv as nc
from numbaconv import registry
from numbaconv.geometry import make_transposed_geometry
from numbaconv.layer import ForwardNotCalledError


@dataclass(frozen=True)
class TCfg:
    """A transposed convolution: x (n, c_in, h, w), w (c_in, c_out // groups, r, s)."""

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    r: int
    s: int
    stride: object = 1
    padding: object = 0
    output_padding: object = 0
    dilation: object = 1
    groups: int = 1
    bias: bool = True

    @property
    def kwargs(self):
        return dict(
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            dilation=self.dilation,
            groups=self.groups,
        )

    def __str__(self):
        return (
            f"N{self.n}Ci{self.c_in}H{self.h}W{self.w}Co{self.c_out}R{self.r}S{self.s}"
            f"-st{self.stride}-pad{self.padding}-op{self.output_padding}-dil{self.dilation}"
            f"-g{self.groups}{'' if self.bias else '-nobias'}"
        )


GRID = [
    TCfg(2, 3, 4, 5, 4, 3, 3),  # stride 1: Winograd's grad-x path with padding 2
    TCfg(2, 4, 3, 4, 6, 3, 3, stride=2, padding=1, output_padding=1, groups=2),
    TCfg(1, 2, 3, 5, 3, 2, 3, stride=3, padding=(1, 0), output_padding=(2, 1)),
    TCfg(2, 4, 3, 3, 4, 3, 2, stride=(2, 1), dilation=2, output_padding=(1, 0), groups=2),
    # output_padding >= stride, allowed because it is below the dilation
    TCfg(1, 2, 4, 3, 3, 3, 3, stride=1, dilation=2, output_padding=1, bias=False),
    TCfg(2, 3, 4, 4, 2, 4, 4, stride=2, padding=1),  # the DCGAN layer's geometry
    TCfg(2, 4, 3, 4, 2, 2, 2, stride=2),  # the U-Net decoder's geometry
    TCfg(1, 3, 5, 4, 3, 3, 3, stride=2, padding=1, output_padding=1, groups=3),  # depthwise
    TCfg(2, 2, 3, 3, 2, 1, 1, stride=3, output_padding=2),  # 1x1 filter, gaps between pixels
    TCfg(1, 2, 5, 5, 4, 3, 3, padding=2, dilation=(1, 2), bias=False),  # padding cuts the edge
]


def make_data(cfg: TCfg, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg.n, cfg.c_in, cfg.h, cfg.w)).astype(dtype)
    w = rng.standard_normal((cfg.c_in, cfg.c_out // cfg.groups, cfg.r, cfg.s)).astype(dtype)
    b = rng.standard_normal(cfg.c_out).astype(dtype) if cfg.bias else None
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = map(
        as_pair, (cfg.stride, cfg.padding, cfg.output_padding, cfg.dilation)
    )
    oh = conv_transpose_out_size(cfg.h, cfg.r, sh, ph, dh, oph)
    ow = conv_transpose_out_size(cfg.w, cfg.s, sw, pw, dw, opw)
    gy = rng.standard_normal((cfg.n, cfg.c_out, oh, ow)).astype(dtype)
    return x, w, b, gy


@functools.cache
def reference(cfg: TCfg, dtype, seed=0):
    """``{name: (value, scale)}``: float64 results and the same computed from magnitudes."""
    x, w, b, gy = make_data(cfg, dtype, seed)
    y = conv_transpose2d_naive(x, w, b, **cfg.kwargs)
    grads = conv_transpose2d_grads_naive(gy, x, w, **cfg.kwargs)
    absb = None if b is None else np.abs(b)
    y_abs = conv_transpose2d_naive(np.abs(x), np.abs(w), absb, **cfg.kwargs)
    abs_grads = conv_transpose2d_grads_naive(np.abs(gy), np.abs(x), np.abs(w), **cfg.kwargs)
    names = ("y", "grad_x", "grad_w", "grad_b")
    return dict(zip(names, zip((y, *grads), (y_abs, *abs_grads), strict=True), strict=True))


def check(cfg, kernel, dtype, seed=0):
    x, w, b, gy = make_data(cfg, dtype, seed)
    got = dict(y=nc.conv_transpose2d(x, w, b, kernel=kernel, **cfg.kwargs))
    got["grad_x"], got["grad_w"], got["grad_b"] = nc.conv_transpose2d_backward(
        gy, x, w, kernel=kernel, **cfg.kwargs
    )
    for name, (value, scale) in reference(cfg, dtype, seed).items():
        assert_close(got[name], value, scale, dtype, f"{name} [{kernel}, {cfg}]")


@pytest.mark.parametrize("cfg", GRID, ids=str)
def test_against_reference(cfg, kernel, dtype):
    check(cfg, kernel, dtype)


@pytest.mark.usefixtures("force_parallel")
@pytest.mark.parametrize(
    "cfg",
    [TCfg(4, 8, 6, 6, 8, 3, 3, stride=2, padding=1, output_padding=1), TCfg(4, 8, 6, 6, 8, 3, 3)],
    ids=str,
)
def test_parallel_paths(cfg, kernel):
    """With the serial shortcut off, so that the kernels' parallel regions run."""
    check(cfg, kernel, np.float32)


#: Backward passes whose grad-x and grad-w share one set of columns of grad_y
#: (registry.transposed_shares_columns: small maps, at least 16 output channels, one group):
#: DCGAN-like, output_padding, an output_padding cropped away (>= stride, below the dilation).
SHARED_COLUMNS = [
    TCfg(3, 8, 5, 6, 20, 4, 4, stride=2, padding=1),
    TCfg(2, 6, 4, 5, 16, 3, 3, stride=2, padding=1, output_padding=1, bias=False),
    TCfg(2, 4, 4, 3, 16, 3, 3, stride=1, dilation=2, output_padding=1),
]


def _shares_columns(cfg, dtype, kernel):
    geom = make_transposed_geometry((cfg.n, cfg.c_in, cfg.h, cfg.w), _w_shape(cfg), **cfg.kwargs)
    return registry.transposed_shares_columns(geom, dtype, kernel)


def _w_shape(cfg):
    return (cfg.c_in, cfg.c_out // cfg.groups, cfg.r, cfg.s)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("kernel_name", ["im2col", "auto"])
@pytest.mark.parametrize("cfg", SHARED_COLUMNS, ids=str)
def test_backward_from_shared_columns(request, cfg, kernel_name, dtype, parallel):
    if parallel:
        request.getfixturevalue("force_parallel")
    assert _shares_columns(cfg, dtype, kernel_name), "the case misses the path"
    check(cfg, kernel_name, dtype)


@pytest.mark.parametrize("cfg", SHARED_COLUMNS[:2], ids=str)
def test_shared_columns_propagate_nan_and_inf_as_separate_passes(cfg, dtype, monkeypatch):
    """A NaN or Inf in grad_y reaches grad-x and grad-w where the two passes run apart."""
    x, w, _, gy = make_data(cfg, dtype, seed=3)
    gy[0, 1, 2, 3] = np.nan
    gy[-1, -1, -1, -1] = np.inf
    x[0, 0, 0, 1] = np.inf
    assert _shares_columns(cfg, dtype, "im2col")
    shared = nc.conv_transpose2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs)
    monkeypatch.setattr(registry, "transposed_shares_columns", lambda *args: False)
    apart = nc.conv_transpose2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs)
    for name, got, want in zip(("grad_x", "grad_w", "grad_b"), shared, apart, strict=True):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), name)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), name)
        finite = np.isfinite(want)
        assert_close(got[finite], want[finite], np.abs(want[finite]), dtype, name)
    assert np.isnan(shared[0]).any() and np.isfinite(shared[0]).any()


def test_shared_columns_only_where_both_passes_run_im2col_on_the_whole_batch():
    # Large maps (U-Net's 28x28 input: 784 outputs of the adjoint per image): grad-w in bands.
    assert not _shares_columns(TCfg(16, 128, 28, 28, 64, 4, 4, stride=2, padding=1), "f4", "auto")
    # Another kernel, or too few output channels (the blocked pass needs 16).
    assert not _shares_columns(SHARED_COLUMNS[0], "f4", "taps")
    assert not _shares_columns(TCfg(3, 8, 5, 6, 8, 4, 4, stride=2, padding=1), "f4", "im2col")
    assert _shares_columns(TCfg(16, 256, 8, 8, 128, 4, 4, stride=2, padding=1), "f4", "auto")


def test_output_shape_formula():
    x = np.zeros((2, 4, 5, 7), np.float32)
    w = np.zeros((4, 3, 3, 4), np.float32)
    y = nc.conv_transpose2d(x, w, stride=(2, 3), padding=(1, 2), output_padding=(1, 2), groups=1)
    # (H - 1)*stride - 2*padding + dilation*(R - 1) + output_padding + 1
    assert y.shape == (2, 3, 4 * 2 - 2 + 2 + 1 + 1, 6 * 3 - 4 + 3 + 2 + 1)
    assert y.dtype == np.float32


def test_batch_of_zero(kernel):
    x = np.zeros((0, 2, 3, 3))
    w = np.ones((2, 3, 2, 2))
    y = nc.conv_transpose2d(x, w, np.ones(3), stride=2, kernel=kernel)
    assert y.shape == (0, 3, 6, 6)
    gx, gw, gb = nc.conv_transpose2d_backward(np.zeros(y.shape), x, w, stride=2, kernel=kernel)
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (3,)
    assert not gw.any() and not gb.any()


def test_inputs_untouched_and_any_layout(kernel):
    cfg = GRID[1]
    x, w, b, gy = make_data(cfg, np.float64)
    xf, wf = np.asfortranarray(x), w[:, :, ::-1, ::-1].copy()[:, :, ::-1, ::-1]
    xf.flags.writeable = False
    before = (xf.copy(), wf.copy(), gy.copy())
    y = nc.conv_transpose2d(xf, wf, b, kernel=kernel, **cfg.kwargs)
    nc.conv_transpose2d_backward(np.asfortranarray(gy), xf, wf, kernel=kernel, **cfg.kwargs)
    for a, a0 in zip((xf, wf, gy), before, strict=True):
        np.testing.assert_array_equal(a, a0)
    np.testing.assert_allclose(y, reference(cfg, np.float64)["y"][0], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Gradients: finite differences and the adjoint relation with conv2d
# --------------------------------------------------------------------------------------------

FD_CASES = [
    TCfg(1, 2, 3, 3, 2, 3, 3, stride=2, padding=1, output_padding=1),
    TCfg(1, 2, 3, 2, 4, 2, 3, stride=(1, 2), dilation=(2, 1), output_padding=(1, 0), groups=2),
]


@pytest.mark.parametrize("cfg", FD_CASES, ids=str)
def test_finite_differences(cfg, kernel):
    x, w, b, gy = make_data(cfg, np.float64, seed=5)
    x, w, b = x.copy(), w.copy(), b.copy()

    def loss():
        return float(np.sum(nc.conv_transpose2d(x, w, b, kernel=kernel, **cfg.kwargs) * gy))

    gx, gw, gb = nc.conv_transpose2d_backward(gy, x, w, kernel=kernel, **cfg.kwargs)
    # The loss is linear in each argument: central differences are exact up to rounding.
    for name, got, arg in (("grad_x", gx, x), ("grad_w", gw, w), ("grad_b", gb, b)):
        np.testing.assert_allclose(
            got, numeric_gradient(loss, arg), rtol=1e-6, atol=1e-6, err_msg=name
        )
    assert np.abs(gx).max() > 0.1 and np.abs(gw).max() > 0.1  # not a vacuous check


def test_is_the_adjoint_of_conv2d(kernel):
    """<conv2d(z, w), x> == <z, conv_transpose2d(x, w)> for the same options."""
    options = dict(stride=(2, 3), padding=(1, 2), dilation=(2, 1), groups=2)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 3, 3, 2))  # conv2d: 4 filters of 3 channels; transposed: C_in 4
    z = rng.standard_normal((2, 6, 9, 11))
    y = nc.conv2d(z, w, kernel=kernel, **options)
    x = rng.standard_normal(y.shape)
    # output_padding picks, among the sizes that conv2d maps to y's size, z's.
    t = nc.conv_transpose2d(x, w, output_padding=(0, 1), kernel=kernel, **options)
    assert t.shape == z.shape
    assert float(np.sum(y * x)) == pytest.approx(float(np.sum(z * t)), rel=1e-12)


@pytest.mark.parametrize(
    "cfg",
    [
        TCfg(4, 8, 6, 6, 8, 3, 3, stride=2, padding=1, output_padding=1),
        TCfg(3, 16, 9, 7, 16, 3, 3, padding=1),  # winograd applies
        TCfg(2, 6, 5, 5, 6, 1, 1),  # pointwise
        TCfg(1, 4, 8, 8, 4, 3, 3, groups=4),  # depthwise: direct's plane kernel
    ],
    ids=str,
)
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_forward_is_the_input_gradient_alone(request, cfg, kernel, dtype, parallel):
    """The forward pass runs the kernels' input-gradient-only entry where they have one: the
    same bits as the input gradient of a whole conv2d backward pass, NaN and Inf included."""
    if parallel:
        request.getfixturevalue("force_parallel")
    x, w, _, _ = make_data(cfg, dtype, 3)
    x[0, 0, 1, 1] = np.nan
    x[-1, -1, -1, -1] = np.inf
    options = {k: v for k, v in cfg.kwargs.items() if k != "output_padding"}
    with np.errstate(invalid="ignore"):  # the numpy kernel's NumPy warns of the NaN
        y = nc.conv_transpose2d(x, w, kernel=kernel, **cfg.kwargs)
        # conv_transpose2d(x, w) is conv2d's input gradient for grad_y = x.
        grad_x, _, _ = nc.conv2d_backward(x, np.zeros(y.shape, dtype), w, kernel=kernel, **options)
    np.testing.assert_array_equal(y, grad_x)
    assert np.isnan(y).any() and not np.isnan(y).all()


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

X = np.zeros((2, 4, 5, 5))
W = np.zeros((4, 3, 3, 3))

BAD = [
    (np.zeros((4, 5, 5)), W, {}, ValueError, r"x must be 4-D \(N, C_in, H, W\), got 3-D"),
    (X, np.zeros((4, 3, 3)), {}, ValueError, r"w must be 4-D \(C_in, C_out // groups, R, S\)"),
    (
        X,
        np.zeros((3, 3, 3, 3)),
        {},
        ValueError,
        r"weight of shape \(3, 3, 3, 3\) expects 3 input channels .* but the input has 4",
    ),
    (X, W, dict(groups=3), ValueError, r"in_channels \(4\) must be divisible by groups \(3\)"),
    (X, W, dict(groups=0), ValueError, r"groups must be >= 1, got 0"),
    (
        X,
        W,
        dict(stride=2, output_padding=2),
        ValueError,
        r"output_padding must be smaller than either stride or dilation \(as in PyTorch\), "
        r"got output_padding=\(2, 2\) with stride=\(2, 2\) and dilation=\(1, 1\)",
    ),
    (
        X,
        W,
        dict(output_padding=(0, 1)),
        ValueError,
        r"output_padding must be smaller than either stride or dilation",
    ),
    (X, W, dict(output_padding=-1), ValueError, r"output_padding must be non-negative, got -1"),
    (X, W, dict(padding="same"), ValueError, r"padding must be an int or a pair of ints for a "),
    (X, W, dict(padding=-1), ValueError, r"padding must be non-negative, got -1"),
    (X, W, dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
    (X, W, dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1, got \(1, 0\)"),
    (X, W, dict(padding=4), ValueError, r"output size would be -1x-1: the padding \(4, 4\)"),
    (X, W, dict(output_padding=1.5, stride=2), TypeError, r"output_padding must be an int"),
    (X.astype(np.int32), W, {}, TypeError, r"x has dtype int32; numbaconv supports float32"),
    (X, W.astype(np.float32), {}, TypeError, r"x and w must have the same dtype"),
    (X, W, dict(kernel="fast"), ValueError, r"unknown kernel 'fast'"),
]


@pytest.mark.parametrize(("x", "w", "kwargs", "exc", "match"), BAD)
def test_validation(x, w, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nc.conv_transpose2d(x, w, **kwargs)
    with pytest.raises(exc, match=match):
        nc.conv_transpose2d_backward(np.zeros((2, 3, 7, 7)), x, w, **kwargs)


def test_validation_of_bias_and_grad_y():
    with pytest.raises(ValueError, match=r"b must have shape \(3,\) \(C_out = w.shape\[1\] \* "):
        nc.conv_transpose2d(X, W, np.zeros(4))
    with pytest.raises(TypeError, match=r"b must have the dtype of x \(float64\), got float32"):
        nc.conv_transpose2d(X, W, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(2, 3, 7, 7\)"):
        nc.conv_transpose2d_backward(np.zeros((2, 3, 5, 5)), X, W)
    with pytest.raises(TypeError, match=r"grad_y must have the dtype of x \(float64\)"):
        nc.conv_transpose2d_backward(np.zeros((2, 3, 7, 7), np.float32), X, W)


# --------------------------------------------------------------------------------------------
# ConvTransposeLayer
# --------------------------------------------------------------------------------------------


def test_layer_attributes_and_init():
    np.random.seed(3)  # noqa: NPY002 (the teaching layer's way)
    w0 = 0.1 * np.random.randn(4, 3, 4, 4)  # noqa: NPY002
    b0 = 0.1 * np.random.randn(1, 6)  # noqa: NPY002
    np.random.seed(3)  # noqa: NPY002
    layer = nc.ConvTransposeLayer(4, 5, 6, 6, 4, 4, 2, 1, 1, groups=2)
    np.testing.assert_array_equal(layer.w, w0)
    np.testing.assert_array_equal(layer.b, b0)
    assert layer.params == (4, 5, 6, 6, 4, 4, 2, 1)
    assert (layer.output_padding, layer.groups, layer.dilation) == (1, 2, 1)
    assert (layer.y_ch, layer.y_h, layer.y_w) == (6, 11, 13)
    assert layer.h_w.shape == w0.shape and layer.h_b.shape == (1, 6)
    assert layer.x is None and layer.y is None
    with pytest.raises(ForwardNotCalledError, match=r"ConvTransposeLayer.u read before forward"):
        _ = layer.u
    with pytest.raises(RuntimeError, match=r"ConvTransposeLayer.backward\(\) called before"):
        layer.backward(np.zeros((1, 6, 11, 13)))
    assert repr(layer).startswith("ConvTransposeLayer(4, 5, 6, 6, 4, 4, stride=2, pad=1, ")


@pytest.mark.parametrize("activation", ["relu", None])
def test_layer_forward_backward_update(kernel, activation):
    rng = np.random.default_rng(0)
    layer = nc.ConvTransposeLayer(
        3, 4, 3, 4, 3, 3, 2, 1, (1, 0), kernel=kernel, activation=activation, rng=rng
    )
    opts = dict(stride=2, padding=1, output_padding=(1, 0))
    x = rng.standard_normal((2, 3, 4, 3))
    y = layer.forward(x)
    u = conv_transpose2d_naive(x, layer.w, layer.b[0], **opts)
    assert y.shape == (2, 4, layer.y_h, layer.y_w) == u.shape
    np.testing.assert_allclose(layer.u, u, rtol=1e-12, atol=1e-12)
    expected_y = np.maximum(u, 0) if activation == "relu" else u
    np.testing.assert_allclose(y, expected_y, rtol=1e-12, atol=1e-12)
    assert (layer.u is layer.y) == (activation is None)

    grad_y = rng.standard_normal(y.shape)
    grad_u = grad_y * (u > 0) if activation == "relu" else grad_y
    gx, gw, gb = conv_transpose2d_grads_naive(grad_u, x, layer.w, **opts)
    got = layer.backward(grad_y)
    assert got is layer.grad_x
    np.testing.assert_allclose(layer.grad_x, gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_w, gw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_b, gb, rtol=1e-12, atol=1e-12)

    w_before = layer.w.copy()
    layer.update(0.01)
    expected = w_before - 0.01 / np.sqrt(1e-8 + gw * gw) * gw
    np.testing.assert_allclose(layer.w, expected, rtol=1e-12)
    layer.w = np.zeros_like(layer.w)  # the next forward uses the new w: only the bias is left
    layer.forward(x)
    np.testing.assert_array_equal(layer.u, np.broadcast_to(layer.b[:, :, None, None], u.shape))


def test_layer_float32_and_validation():
    layer = nc.ConvTransposeLayer(
        2, 3, 3, 2, 2, 2, 2, dtype=np.float32, rng=np.random.default_rng()
    )
    assert layer.w.dtype == layer.b.dtype == np.float32
    y = layer.forward(np.ones((1, 2, 3, 3), np.float32))
    assert y.dtype == np.float32 and y.shape == (1, 2, 6, 6)
    with pytest.raises(ValueError, match=r"ConvTransposeLayer expects input of shape \(N, 2, 3, 3"):
        layer.forward(np.ones((1, 2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"out_channels \(5\) must be divisible by groups \(2\)"):
        nc.ConvTransposeLayer(4, 3, 3, 5, 2, 2, groups=2)
    with pytest.raises(ValueError, match=r"output_padding must be smaller than either stride"):
        nc.ConvTransposeLayer(2, 3, 3, 2, 2, 2, 2, 0, 2)
    with pytest.raises(TypeError, match=r"dtype int64 is not supported"):
        nc.ConvTransposeLayer(2, 3, 3, 2, 2, 2, dtype=np.int64)
    with pytest.raises(ValueError, match=r"activation must be 'relu' or None"):
        nc.ConvTransposeLayer(2, 3, 3, 2, 2, 2, activation="tanh")
    with pytest.raises(ValueError, match=r"unknown kernel 'nope'"):
        nc.ConvTransposeLayer(2, 3, 3, 2, 2, 2, kernel="nope")
