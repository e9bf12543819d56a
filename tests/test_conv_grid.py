"""Every kernel x dtype x {forward, grad_x, grad_w, grad_b} against the loop reference."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Cfg, assert_close, check_against_reference, make_data, reference

import numbaconv as nc

GRID = [
    Cfg(2, 3, 6, 5, 4, 3, 3, name="basic-3x3"),
    Cfg(2, 3, 6, 5, 4, 3, 3, padding=1, name="pad1"),
    Cfg(2, 2, 7, 6, 3, 3, 3, stride=2, padding=1, name="stride2-pad1"),
    Cfg(2, 2, 7, 6, 3, 3, 3, stride=(2, 1), padding=(1, 0), name="stride(2,1)-pad(1,0)"),
    Cfg(1, 2, 5, 6, 3, 2, 3, stride=(1, 3), padding=(0, 2), name="stride(1,3)-pad(0,2)"),
    Cfg(2, 2, 8, 8, 3, 3, 3, stride=2, name="stride2-unread-last-row"),
    Cfg(2, 2, 7, 7, 2, 2, 2, stride=3, name="stride-larger-than-filter"),
    Cfg(2, 2, 6, 5, 3, 3, 3, padding="same", name="same-odd"),
    Cfg(2, 2, 6, 5, 3, 2, 2, padding="same", name="same-even-asym"),
    Cfg(1, 2, 5, 7, 2, 2, 4, padding="same", name="same-2x4-asym"),
    Cfg(1, 2, 6, 7, 2, 2, 3, padding="same", dilation=(1, 2), name="same-dil(1,2)"),
    Cfg(2, 2, 6, 5, 3, 3, 2, padding="valid", name="valid"),
    Cfg(2, 2, 7, 7, 3, 3, 3, dilation=2, name="dilation2"),
    Cfg(2, 2, 9, 8, 3, 3, 2, stride=2, padding=2, dilation=(2, 1), name="dil(2,1)-st2-pad2"),
    Cfg(2, 4, 5, 5, 6, 3, 3, padding=1, groups=2, name="groups2"),
    Cfg(2, 6, 5, 4, 3, 2, 3, groups=3, name="groups3-K-per-group1"),
    Cfg(2, 3, 6, 6, 3, 3, 3, padding=1, groups=3, name="depthwise"),
    Cfg(2, 2, 7, 6, 4, 3, 3, stride=2, padding=1, groups=2, name="depthwise-mult2-st2"),
    Cfg(2, 3, 5, 5, 3, 3, 3, padding="same", dilation=2, groups=3, name="depthwise-same-dil2"),
    Cfg(2, 5, 4, 3, 3, 1, 1, name="1x1"),
    Cfg(2, 4, 5, 6, 3, 1, 1, stride=2, name="1x1-stride2"),
    Cfg(2, 2, 4, 6, 3, 1, 3, padding=(0, 1), name="1x3"),
    Cfg(2, 2, 6, 4, 3, 3, 1, stride=(2, 1), name="3x1"),
    Cfg(1, 2, 6, 7, 2, 2, 5, padding=1, name="2x5"),
    Cfg(2, 3, 4, 4, 2, 4, 4, name="filter-equals-input"),
    Cfg(2, 2, 3, 5, 2, 3, 5, padding=1, name="filter-equals-input-pad1"),
    Cfg(1, 3, 6, 6, 4, 3, 3, padding=1, name="batch1"),
    Cfg(1, 1, 1, 1, 1, 1, 1, name="all-ones"),
    Cfg(3, 2, 5, 5, 2, 3, 3, padding=1, bias=False, name="no-bias"),
    Cfg(2, 1, 9, 7, 2, 3, 3, stride=(3, 2), padding=(2, 1), name="1-channel-st(3,2)"),
    Cfg(2, 3, 5, 5, 4, 5, 5, padding=2, name="5x5-pad2"),
    Cfg(1, 1, 1, 3, 2, 1, 3, padding=(0, 1), name="height1"),
    # 3x3, stride 1, undilated, one group: what fast 3x3 algorithms (Winograd) take, with odd
    # and even output sizes (partial tiles), every padding they accept, 1x1 outputs, 1x1 inputs.
    Cfg(2, 3, 8, 8, 4, 3, 3, padding=1, name="3x3-even-out"),
    Cfg(2, 3, 7, 9, 5, 3, 3, padding=2, name="3x3-pad2-odd-out"),
    Cfg(1, 2, 6, 7, 3, 3, 3, padding=(2, 0), name="3x3-pad(2,0)"),
    Cfg(2, 2, 3, 3, 3, 3, 3, name="3x3-1x1-out"),
    Cfg(2, 2, 1, 1, 3, 3, 3, padding=1, name="3x3-1x1-input-pad1"),
    Cfg(1, 2, 2, 5, 2, 3, 3, padding=2, name="3x3-tiny-pad2"),
    Cfg(3, 5, 10, 6, 7, 3, 3, padding="same", name="3x3-same-odd-channels"),
    Cfg(2, 3, 7, 7, 4, 3, 3, padding=3, name="3x3-pad3"),
]


@pytest.mark.parametrize("cfg", GRID, ids=str)
def test_matches_reference(kernel, dtype, cfg):
    check_against_reference(cfg, kernel, dtype)


@pytest.mark.parametrize("cfg", GRID[:8], ids=str)
def test_forward_with_list_arguments(kernel, cfg):
    """Pairs may be given as lists too."""
    x, w, b, _ = make_data(cfg, np.float64)
    ref = reference(cfg, np.float64)
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.kwargs.items()}
    y = nc.conv2d(x, w, b, kernel=kernel, **kw)
    assert_close(y, ref.y, ref.y_abs, np.float64, f"forward {cfg}")


def test_default_kernel_matches_reference(dtype):
    cfg = GRID[2]
    x, w, b, gy = make_data(cfg, dtype)
    ref = reference(cfg, dtype)
    y = nc.conv2d(x, w, b, **cfg.kwargs)
    gx, gw, gb = nc.conv2d_backward(gy, x, w, **cfg.kwargs)
    assert_close(y, ref.y, ref.y_abs, dtype, "forward")
    assert_close(gx, ref.gx, ref.gx_abs, dtype, "grad_x")
    assert_close(gw, ref.gw, ref.gw_abs, dtype, "grad_w")
    assert_close(gb, ref.gb, ref.gb_abs, dtype, "grad_b")


def test_output_shapes_follow_the_formula(kernel):
    """Spot checks of OH/OW against hand-computed values (PyTorch's numbers)."""
    cases = [
        # (H, W, R, S, kwargs, (OH, OW))
        (7, 7, 3, 3, dict(stride=2, padding=1), (4, 4)),
        (8, 8, 3, 3, dict(stride=2), (3, 3)),
        (6, 5, 2, 2, dict(padding="same"), (6, 5)),
        (7, 7, 3, 3, dict(dilation=2), (3, 3)),
        (9, 8, 3, 2, dict(stride=2, padding=2, dilation=(2, 1)), (5, 6)),
        (5, 6, 2, 3, dict(stride=(1, 3), padding=(0, 2)), (4, 3)),
    ]
    for h, w_, r, s, kw, expect in cases:
        x = np.ones((1, 1, h, w_))
        w = np.ones((1, 1, r, s))
        y = nc.conv2d(x, w, kernel=kernel, **kw)
        assert y.shape == (1, 1, *expect), (h, w_, r, s, kw)


def test_same_padding_puts_extra_at_bottom_right(kernel):
    """A 2x2 filter of ones with 'same' sums x[i:i+2, j:j+2] (extra row/col at the end)."""
    x = np.arange(12, dtype=np.float64).reshape(1, 1, 3, 4)
    w = np.ones((1, 1, 2, 2))
    y = nc.conv2d(x, w, padding="same", kernel=kernel)
    xp = np.pad(x[0, 0], ((0, 1), (0, 1)))
    expect = xp[:-1, :-1] + xp[1:, :-1] + xp[:-1, 1:] + xp[1:, 1:]
    np.testing.assert_array_equal(y[0, 0], expect)


def test_cross_correlation_not_convolution(kernel):
    """The filter is not flipped: a single 1 at tap (0, 0) copies the top-left of each window."""
    x = np.arange(20, dtype=np.float64).reshape(1, 1, 4, 5)
    w = np.zeros((1, 1, 2, 3))
    w[0, 0, 0, 0] = 1.0
    y = nc.conv2d(x, w, kernel=kernel)
    np.testing.assert_array_equal(y[0, 0], x[0, 0, :3, :3])
