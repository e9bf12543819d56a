"""Finite-difference checks of conv2d_backward (float64), independent of the loop reference."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Cfg, make_data

import numbaconv as nc

CASES = [
    Cfg(2, 2, 5, 4, 3, 3, 2, padding=1, name="pad1"),
    Cfg(1, 2, 6, 5, 2, 2, 3, stride=(2, 1), padding=(1, 0), name="stride(2,1)"),
    Cfg(1, 2, 4, 5, 2, 2, 2, padding="same", name="same-even"),
    Cfg(1, 2, 6, 6, 2, 2, 2, stride=2, padding=1, dilation=2, name="dilation2-stride2"),
    Cfg(2, 4, 4, 4, 4, 3, 3, padding=1, groups=2, name="groups2"),
    Cfg(1, 3, 4, 5, 3, 3, 3, padding="same", groups=3, name="depthwise-same"),
]

EPS = 1e-6


def _loss(cfg, x, w, b, g, kernel):
    return float(np.sum(nc.conv2d(x, w, b, kernel=kernel, **cfg.kwargs) * g))


def _numeric_grad(f, a):
    """Central differences of the scalar f() with respect to every element of a (in place)."""
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + EPS
        fp = f()
        a[idx] = old - EPS
        fm = f()
        a[idx] = old
        grad[idx] = (fp - fm) / (2 * EPS)
    return grad


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_finite_differences(kernel, cfg):
    x, w, b, g = make_data(cfg, np.float64, seed=3)
    x, w, b = x.copy(), w.copy(), b.copy()

    def f():
        return _loss(cfg, x, w, b, g, kernel)

    num_x = _numeric_grad(f, x)
    num_w = _numeric_grad(f, w)
    num_b = _numeric_grad(f, b)
    gx, gw, gb = nc.conv2d_backward(g, x, w, kernel=kernel, **cfg.kwargs)
    # The loss is linear in each argument, so central differences are exact up to rounding
    # (about 1e-16 * |loss| / EPS ~ 1e-9 here).
    np.testing.assert_allclose(gx, num_x, rtol=1e-6, atol=1e-6, err_msg="grad_x")
    np.testing.assert_allclose(gw, num_w, rtol=1e-6, atol=1e-6, err_msg="grad_w")
    np.testing.assert_allclose(gb, num_b, rtol=1e-6, atol=1e-6, err_msg="grad_b")
    assert np.abs(gx).max() > 0.1 and np.abs(gw).max() > 0.1  # not a vacuous check


def test_backward_is_transpose_of_forward(kernel):
    """<conv2d(x, w), g> == <x, grad_x(g)> == <w, grad_w(g)> (bilinearity), for every kernel."""
    cfg = Cfg(
        2, 4, 7, 6, 4, 3, 2, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, bias=False
    )
    x, w, _, g = make_data(cfg, np.float64, seed=11)
    y = nc.conv2d(x, w, kernel=kernel, **cfg.kwargs)
    gx, gw, gb = nc.conv2d_backward(g, x, w, kernel=kernel, **cfg.kwargs)
    lhs = float(np.sum(y * g))
    assert lhs == pytest.approx(float(np.sum(x * gx)), rel=1e-12, abs=1e-12)
    assert lhs == pytest.approx(float(np.sum(w * gw)), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(gb, g.sum(axis=(0, 2, 3)), rtol=1e-12)
