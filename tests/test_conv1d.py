"""conv1d, conv_transpose1d and their gradients: reference, kernels, views, validation."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
from gradcheck_util import numeric_gradient
from helpers import assert_close
from naive_family import (
    conv1d_grads_naive,
    conv1d_naive,
    conv_transpose1d_grads_naive,
    conv_transpose1d_naive,
)

import numbaconv as nc
from numbaconv import registry


@dataclass(frozen=True)
class Cfg1d:
    """A 1-D problem. ``transposed``: w is (c, k // groups, size), else (k, c // groups, size)."""

    n: int
    c: int
    length: int
    k: int
    size: int
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    output_padding: object = 0  # transposed only
    padding_mode: str = "zeros"  # ordinary only
    transposed: bool = False

    @property
    def kwargs(self):
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        kw["groups"] = self.groups
        if self.transposed:
            kw["output_padding"] = self.output_padding
        elif self.padding_mode != "zeros":
            kw["padding_mode"] = self.padding_mode
        return kw

    def functions(self):
        if self.transposed:
            return nc.conv_transpose1d, nc.conv_transpose1d_backward
        return nc.conv1d, nc.conv1d_backward

    def reference_functions(self):
        kw = {k: (v[0] if isinstance(v, tuple) else v) for k, v in self.kwargs.items()}
        if self.transposed:
            return (
                functools.partial(conv_transpose1d_naive, **kw),
                functools.partial(conv_transpose1d_grads_naive, **kw),
            )
        kw["mode"] = kw.pop("padding_mode", "zeros")
        return functools.partial(conv1d_naive, **kw), functools.partial(conv1d_grads_naive, **kw)

    def __str__(self):
        kind = "T" if self.transposed else ""
        return (
            f"{kind}N{self.n}C{self.c}L{self.length}K{self.k}k{self.size}-st{self.stride}"
            f"-pad{self.padding}-dil{self.dilation}-g{self.groups}-op{self.output_padding}"
            f"-{self.padding_mode}"
        )


GRID = [
    Cfg1d(2, 3, 9, 4, 3, padding=1),
    Cfg1d(2, 4, 11, 6, 3, stride=2, padding=2, dilation=2, groups=2),
    Cfg1d(1, 2, 8, 3, 4, padding="same", padding_mode="reflect"),
    Cfg1d(2, 3, 7, 3, 3, stride=3, padding=(3,), padding_mode="circular", groups=3),
    Cfg1d(1, 2, 6, 2, 2, stride=(2,), padding=4, padding_mode="replicate"),
    Cfg1d(1, 2, 10, 4, 5, padding="valid", dilation=(2,)),
    Cfg1d(2, 3, 5, 4, 3, transposed=True),
    Cfg1d(2, 4, 6, 6, 4, stride=2, padding=1, groups=2, transposed=True),
    Cfg1d(1, 2, 5, 3, 3, stride=3, padding=1, output_padding=2, transposed=True),
    Cfg1d(1, 2, 4, 2, 3, dilation=3, output_padding=(2,), transposed=True),  # op >= stride
]


def make_data(cfg: Cfg1d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg.n, cfg.c, cfg.length)).astype(dtype)
    if cfg.transposed:
        w = rng.standard_normal((cfg.c, cfg.k // cfg.groups, cfg.size))
    else:
        w = rng.standard_normal((cfg.k, cfg.c // cfg.groups, cfg.size))
    w = w.astype(dtype)
    b = rng.standard_normal(cfg.k).astype(dtype)
    forward, _ = cfg.reference_functions()
    gy = rng.standard_normal(forward(x, w).shape).astype(dtype)
    return x, w, b, gy


@functools.cache
def reference(cfg: Cfg1d, dtype, seed=0):
    x, w, b, gy = make_data(cfg, dtype, seed)
    forward, grads = cfg.reference_functions()
    values = (forward(x, w, b), *grads(gy, x, w))
    scales = (
        forward(np.abs(x), np.abs(w), np.abs(b)),
        *grads(np.abs(gy), np.abs(x), np.abs(w)),
    )
    names = ("y", "grad_x", "grad_w", "grad_b")
    return dict(zip(names, zip(values, scales, strict=True), strict=True))


@pytest.mark.parametrize("cfg", GRID, ids=str)
def test_against_reference(cfg, kernel, dtype):
    x, w, b, gy = make_data(cfg, dtype)
    forward, backward = cfg.functions()
    got = dict(y=forward(x, w, b, kernel=kernel, **cfg.kwargs))
    got["grad_x"], got["grad_w"], got["grad_b"] = backward(gy, x, w, kernel=kernel, **cfg.kwargs)
    for name, (value, scale) in reference(cfg, dtype).items():
        assert_close(got[name], value, scale, dtype, f"{name} [{kernel}, {cfg}]")
    assert got["grad_w"].shape == w.shape and got["grad_x"].shape == x.shape


def test_audio_layer_shape():
    """The issue's audio layer geometry (64 channels, kernel 9, padding 4), at a short length."""
    x = np.zeros((2, 64, 100), np.float32)
    w = np.zeros((64, 64, 9), np.float32)
    assert nc.conv1d(x, w, padding=4).shape == (2, 64, 100)


class _KernelSpy:
    """Stands in for a kernel family and records the arrays it receives."""

    def __init__(self, impl, seen):
        self._impl, self._seen = impl, seen

    def forward(self, x, w, b, geom):
        self._seen.append(("forward", x, w))
        return self._impl.forward(x, w, b, geom)

    def backward(self, grad_y, x, w, geom):
        self._seen.append(("backward", grad_y, x, w))
        return self._impl.backward(grad_y, x, w, geom)


@pytest.fixture
def kernel_arrays(monkeypatch):
    """The arrays that reach the kernels, in order."""
    seen = []
    original = registry.implementation
    monkeypatch.setattr(registry, "implementation", lambda name: _KernelSpy(original(name), seen))
    return seen


def test_no_copy_of_the_data(kernel_arrays):
    """The kernels receive (N, C, 1, L) views of the caller's arrays, not copies."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 16))
    w = rng.standard_normal((6, 2, 3))
    y = nc.conv1d(x, w, padding=1, groups=2, kernel="im2col")
    nc.conv1d_backward(np.ones_like(y), x, w, padding=1, groups=2, kernel="im2col")
    (_, kx, kw), (_, kgy, kx2, kw2) = kernel_arrays
    assert kx.shape == (2, 4, 1, 16) and kw.shape == (6, 2, 1, 3)
    for kernel_array, caller_array in ((kx, x), (kw, w), (kx2, x), (kw2, w)):
        assert np.shares_memory(kernel_array, caller_array)
    assert kgy.shape == (2, 6, 1, 16)

    kernel_arrays.clear()
    wt = rng.standard_normal((4, 3, 3))
    nc.conv_transpose1d(x, wt, stride=2, kernel="direct")
    # The transposed convolution is the adjoint convolution's backward pass: x is its grad_y.
    (_, kgy, _, kw) = kernel_arrays[0]
    assert np.shares_memory(kgy, x) and np.shares_memory(kw, wt)


def test_results_are_1d_and_contiguous():
    x = np.ones((2, 3, 10), np.float32)
    w = np.ones((4, 3, 3), np.float32)
    y = nc.conv1d(x, w, stride=2)
    gx, gw, gb = nc.conv1d_backward(np.ones_like(y), x, w, stride=2)
    for a in (y, gx, gw, gb):
        assert a.dtype == np.float32 and a.flags.c_contiguous
    assert y.shape == (2, 4, 4) and gx.shape == x.shape and gw.shape == w.shape
    t = nc.conv_transpose1d(x, np.ones((3, 2, 3), np.float32), stride=2, output_padding=1)
    assert t.shape == (2, 2, (10 - 1) * 2 + 3 + 1) and t.flags.c_contiguous


# --------------------------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------------------------

FD_CASES = [
    Cfg1d(1, 2, 7, 2, 3, stride=2, padding=2, padding_mode="reflect"),
    Cfg1d(2, 2, 4, 4, 3, stride=2, padding=1, output_padding=1, groups=2, transposed=True),
]


@pytest.mark.parametrize("cfg", FD_CASES, ids=str)
def test_finite_differences(cfg, kernel):
    x, w, b, gy = make_data(cfg, np.float64, seed=4)
    x, w, b = x.copy(), w.copy(), b.copy()
    forward, backward = cfg.functions()

    def loss():
        return float(np.sum(forward(x, w, b, kernel=kernel, **cfg.kwargs) * gy))

    grads = backward(gy, x, w, kernel=kernel, **cfg.kwargs)
    for name, got, arg in zip(("grad_x", "grad_w", "grad_b"), grads, (x, w, b), strict=True):
        expected = numeric_gradient(loss, arg)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=name)
    assert np.abs(grads[0]).max() > 0.1 and np.abs(grads[1]).max() > 0.1


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

X = np.zeros((2, 4, 9))
W = np.zeros((6, 4, 3))
WT = np.zeros((4, 3, 3))

BAD_CONV1D = [
    (np.zeros((4, 9)), W, {}, ValueError, r"x must be 3-D \(N, C, L\), got 2-D"),
    (X[..., None], W, {}, ValueError, r"x must be 3-D \(N, C, L\), got 4-D"),
    (X, W[..., None], {}, ValueError, r"w must be 3-D \(K, C // groups, k\), got 4-D"),
    (X, W, dict(stride=(1, 2)), ValueError, r"stride must be an int or a 1-tuple .* \(1, 2\)"),
    (X, W, dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
    (X, W, dict(dilation=(0,)), ValueError, r"dilation must be >= 1, got \(0,\)"),
    (X, W, dict(padding=-2), ValueError, r"padding must be non-negative, got -2"),
    (X, W, dict(padding=1.0), TypeError, r"padding must be an int or a 1-tuple of an int, got 1.0"),
    (X, W, dict(stride=True), TypeError, r"stride must be an int, got True"),
    (X, W, dict(dilation=("2",)), TypeError, r"dilation must be an int or a 1-tuple of an int"),
    (X, W, dict(padding="same", stride=2), ValueError, r"padding='same' is only supported with"),
    (X, W, dict(padding="full"), ValueError, r"padding must be an int, a pair, 'valid' or 'same'"),
    (X, np.zeros((6, 2, 3)), {}, ValueError, r"weight has 2 input channels per group"),
    (X, np.zeros((6, 4, 11)), {}, ValueError, r"output size would be 1x-1"),
    (X, W, dict(padding=9, padding_mode="reflect"), ValueError, r"padding 9 at the left of an "),
    (X, W, dict(padding_mode="mirror"), ValueError, r"padding_mode must be one of 'zeros', "),
    (X.astype(np.float16), W, {}, TypeError, r"x has dtype float16"),
]


@pytest.mark.parametrize(("x", "w", "kwargs", "exc", "match"), BAD_CONV1D)
def test_conv1d_validation(x, w, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nc.conv1d(x, w, **kwargs)
    with pytest.raises(exc, match=match):
        nc.conv1d_backward(np.zeros((2, 6, 7)), x, w, **kwargs)


BAD_TRANSPOSED = [
    (np.zeros((4, 9)), WT, {}, ValueError, r"x must be 3-D \(N, C_in, L\), got 2-D"),
    (X, WT[..., None], {}, ValueError, r"w must be 3-D \(C_in, C_out // groups, k\), got 4-D"),
    (X, WT, dict(output_padding=1), ValueError, r"output_padding must be smaller than either"),
    (X, WT, dict(output_padding=(0, 1)), ValueError, r"output_padding must be an int or a 1-"),
    (X, WT, dict(output_padding=-1, stride=2), ValueError, r"output_padding must be non-neg"),
    (X, WT, dict(padding="same"), ValueError, r"padding must be an int or a pair of ints for a "),
    (X, np.zeros((3, 3, 3)), {}, ValueError, r"expects 3 input channels .* the input has 4"),
    (X, WT, dict(padding=6), ValueError, r"output size would be 1x-1"),
]


@pytest.mark.parametrize(("x", "w", "kwargs", "exc", "match"), BAD_TRANSPOSED)
def test_conv_transpose1d_validation(x, w, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nc.conv_transpose1d(x, w, **kwargs)
    with pytest.raises(exc, match=match):
        nc.conv_transpose1d_backward(np.zeros((2, 3, 11)), x, w, **kwargs)


def test_grad_y_validation():
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(2, 6, 7\), got "):
        nc.conv1d_backward(np.zeros((2, 6, 1, 7)), X, W)
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(2, 6, 7\)"):
        nc.conv1d_backward(np.zeros((2, 6, 8)), X, W)
    with pytest.raises(TypeError, match=r"grad_y must have the dtype of x \(float64\)"):
        nc.conv1d_backward(np.zeros((2, 6, 7), np.float32), X, W)
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(2, 3, 11\)"):
        nc.conv_transpose1d_backward(np.zeros((2, 3, 10)), X, WT)
    with pytest.raises(TypeError, match=r"grad_y must be a numpy.ndarray, got list"):
        nc.conv_transpose1d_backward([0.0], X, WT)
