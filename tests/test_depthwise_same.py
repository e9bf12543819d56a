"""``direct``'s depthwise "same" forward kernel (``direct.depthwise_same_kernel``): odd k x k
depthwise filters at stride 1 with padding k // 2, each output plane one pass over its flattened
pixels, reading k shifted copies of the input plane whose wrapped columns are zeroed. Against the
loop reference on ragged sizes (planes narrower and shorter than the filter, one pixel),
channel multipliers, 3x3 (its fused pass) and 5x5 / 7x7 (through ``_taps``); NaN/Inf in the
columns that a shift wraps, forward and in grad-x (the same loop on grad_y with the filters
flipped, without a channel multiplier), and NaN/Inf in x reaching grad-w; the same bits on 1
and 2 threads."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    Cfg,
    assert_like_plain_sum,
    assert_same_bits_on_1_and_2_threads,
    check_against_reference,
    make_data,
)
from naive import conv2d_grads_naive, conv2d_naive

import numbaconv as nc
from numbaconv.geometry import make_geometry
from numbaconv.kernels import direct

CASES = [
    Cfg(2, 6, 9, 11, 6, 3, 3, padding=1, groups=6, name="mobilenet-like"),
    Cfg(3, 4, 5, 7, 8, 3, 3, padding=1, groups=4, bias=False, name="multiplier-2"),
    Cfg(1, 3, 1, 1, 3, 3, 3, padding=1, groups=3, name="one-pixel"),
    Cfg(2, 2, 2, 13, 2, 3, 3, padding=1, groups=2, name="two-rows"),
    Cfg(2, 5, 8, 6, 5, 5, 5, padding=2, groups=5, name="5x5"),
    Cfg(1, 3, 3, 1, 6, 5, 5, padding=2, groups=3, name="5x5-width-1-multiplier-2"),
    Cfg(1, 2, 9, 4, 2, 7, 7, padding=3, groups=2, name="7x7-narrower-than-filter"),
]


def _takes(cfg: Cfg) -> bool:
    return direct._depthwise_same(make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs))


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_takes_the_kernel_and_matches_the_reference(cfg, dtype):
    assert _takes(cfg)
    check_against_reference(cfg, "direct", dtype, seed=7)
    check_against_reference(cfg, "auto", dtype, seed=7)


def test_not_taken_elsewhere():
    def takes(x_shape, w_shape, **options):
        return direct._depthwise_same(make_geometry(x_shape, w_shape, **options))

    assert takes((1, 4, 9, 9), (4, 1, 3, 3), padding=1, groups=4)
    assert not takes((1, 4, 9, 9), (4, 1, 3, 3), padding=0, groups=4)  # not "same"
    assert not takes((1, 4, 9, 9), (4, 1, 3, 3), padding=(1, 0), groups=4)
    assert not takes((1, 4, 9, 9), (4, 1, 3, 3), padding=2, groups=4)
    assert not takes((1, 4, 9, 9), (4, 1, 4, 4), padding=2, groups=4)  # even
    assert not takes((1, 4, 9, 9), (4, 1, 3, 5), padding=(1, 2), groups=4)  # not square
    assert not takes((1, 4, 9, 9), (4, 1, 3, 3), stride=2, padding=1, groups=4)
    assert not takes((1, 4, 9, 9), (4, 1, 3, 3), dilation=2, padding=2, groups=4)
    assert not takes((1, 4, 9, 9), (4, 2, 3, 3), padding=1, groups=2)  # 2 channels per group


@pytest.mark.parametrize("cfg", [CASES[0], CASES[4]], ids=str)
def test_nan_and_inf_reach_what_a_plain_sum_reaches(cfg, dtype):
    x, w, b, _ = make_data(cfg, dtype, 5)
    _, c, h, wd = x.shape
    x[0, 1, 2, wd - 1] = np.nan  # a last column: zeroed in the copies that would wrap it
    x[1, 2, 3, 0] = np.inf  # a first column, likewise
    x[1, 3, h - 1, 2] = np.nan  # the last row, above the zero rows
    pad = cfg.r // 2
    with np.errstate(invalid="ignore"):
        want = conv2d_naive(x, w, b, padding4=(pad,) * 4, groups=c)
        got = nc.conv2d(x, w, b, kernel="direct", **cfg.kwargs)
    assert_like_plain_sum(got, want, dtype)
    assert np.isnan(got).any() and np.isinf(got).any()


@pytest.mark.parametrize("cfg", [CASES[0], CASES[4]], ids=str)
def test_nan_in_grad_y_reaches_what_a_plain_sum_reaches(cfg):
    """grad-x: the forward loop on grad_y with the filters flipped, the same wrapped columns."""
    x, w, _, gy = make_data(cfg, np.float64, 6)
    _, c, h, wd = x.shape
    gy[0, 1, 2, wd - 1] = np.nan
    gy[1, 2, 3, 0] = np.inf
    pad = cfg.r // 2
    with np.errstate(invalid="ignore"):
        want = conv2d_grads_naive(gy, x, w, padding4=(pad,) * 4, groups=c)[0]
        got = nc.conv2d_backward(gy, x, w, kernel="direct", **cfg.kwargs)[0]
    assert_like_plain_sum(got, want, np.float64)
    assert np.isnan(got).any() and np.isinf(got).any()


@pytest.mark.parametrize("cfg", [CASES[1], CASES[4]], ids=str)
def test_nan_in_x_reaches_grad_w_as_a_plain_sum(cfg):
    """grad-w (the plane kernel's) of the layers whose forward pass and grad-x take the kernel."""
    x, w, _, gy = make_data(cfg, np.float64, 8)
    _, c, h, wd = x.shape
    x[0, 1, 2, wd - 1] = np.nan
    x[1, 2, h - 1, 0] = np.inf
    pad = cfg.r // 2
    with np.errstate(invalid="ignore"):
        wants = conv2d_grads_naive(gy, x, w, padding4=(pad,) * 4, groups=c)
        gots = nc.conv2d_backward(gy, x, w, kernel="direct", **cfg.kwargs)
    for name, got, want in zip(("grad_x", "grad_w", "grad_b"), gots, wants, strict=True):
        assert_like_plain_sum(got, want, np.float64, name)
    assert np.isnan(gots[1]).any() and np.isfinite(gots[0]).all()


@pytest.mark.usefixtures("force_parallel", "restore_num_threads")
@pytest.mark.parametrize("cfg", [CASES[1], CASES[4]], ids=str)
def test_same_bits_on_one_and_two_threads(cfg):
    assert_same_bits_on_1_and_2_threads(cfg, make_data(cfg, np.float32, 2), "direct")
