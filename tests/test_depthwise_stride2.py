"""``direct``'s fused depthwise 3x3 column-stride-2 kernels: the forward pass
(``direct.depthwise3x3_stride2_kernel``: every tap of a row at once in the image's interior,
tap by tap at the edges), grad-x (``direct.depthwise3x3_stride2_grad_input_kernel``: pairs of
input columns per filter row, column by column at the edges) and grad-w
(``direct.depthwise3x3_stride2_grad_weight_kernel``: the nine sums of a row's interior at
once). Against the loop reference on ragged sizes, paddings past the filter's reach, channel
multipliers, row strides 1-3; NaN/Inf where a plain sum puts them; the same bits on 1 and 2
threads."""

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
    Cfg(2, 6, 9, 11, 6, 3, 3, stride=2, padding=1, groups=6, name="mobilenet-like"),
    Cfg(3, 4, 8, 10, 8, 3, 3, stride=2, padding=0, groups=4, name="multiplier-2-no-pad"),
    Cfg(1, 3, 5, 2, 3, 3, 3, stride=(1, 2), padding=(1, 1), groups=3, name="narrower-than-taps"),
    Cfg(2, 2, 7, 1, 2, 3, 3, stride=(3, 2), padding=(2, 3), groups=2, bias=False, name="width-1"),
    Cfg(1, 5, 6, 9, 5, 3, 3, stride=2, padding=(0, 3), groups=5, name="padding-past-taps"),
]


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_takes_the_kernel_and_matches_the_reference(cfg, dtype):
    assert direct._depthwise3x3_stride2(make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs))
    check_against_reference(cfg, "direct", dtype)
    check_against_reference(cfg, "auto", dtype)


def test_not_taken_elsewhere():
    def takes(x_shape, w_shape, **options):
        return direct._depthwise3x3_stride2(make_geometry(x_shape, w_shape, **options))

    assert not takes((1, 4, 9, 9), (4, 1, 3, 3), padding=1, groups=4)  # stride 1
    assert not takes((1, 4, 9, 9), (4, 1, 5, 5), stride=2, padding=1, groups=4)  # 5x5
    assert not takes((1, 4, 9, 9), (4, 2, 3, 3), stride=2, padding=1, groups=2)  # 2 per group
    assert not takes((1, 4, 9, 9), (4, 1, 3, 3), stride=2, dilation=2, groups=4)
    assert not takes((1, 4, 9, 9), (4, 1, 3, 3), stride=(2, 1), padding=1, groups=4)


def test_nan_and_inf_reach_what_a_plain_sum_reaches(dtype):
    cfg = CASES[0]
    x, w, b, _ = make_data(cfg, dtype, 5)
    x[0, 1, 0, 0] = np.nan  # a corner: the edge loop
    x[1, 2, 4, 5] = np.inf  # the interior: the fused loop
    with np.errstate(invalid="ignore"):
        want = conv2d_naive(x, w, b, stride=2, padding4=(1, 1, 1, 1), groups=6)
        got = nc.conv2d(x, w, b, kernel="direct", **cfg.kwargs)
    assert_like_plain_sum(got, want, dtype)
    assert np.isnan(got).any() and np.isinf(got).any()


@pytest.mark.parametrize("cfg", [CASES[0], CASES[1]], ids=str)
def test_nan_in_grad_y_reaches_what_a_plain_sum_reaches(cfg):
    """grad-x (pairs of columns and edges) and grad-w (the fused sums and edges)."""
    x, w, _, gy = make_data(cfg, np.float64, 6)
    _, _, oh, ow = gy.shape
    gy[0, 1, 0, 0] = np.nan  # a corner: the edge columns
    gy[1, 0, oh - 1, ow // 2] = np.inf  # the last row, the paired columns
    with np.errstate(invalid="ignore"):
        wants = conv2d_grads_naive(
            gy, x, w, stride=cfg.stride, padding4=cfg.pad4, groups=cfg.groups
        )
        gots = nc.conv2d_backward(gy, x, w, kernel="direct", **cfg.kwargs)
    for name, got, want in zip(("grad_x", "grad_w", "grad_b"), gots, wants, strict=True):
        assert_like_plain_sum(got, want, np.float64, name)
    assert np.isnan(gots[0]).any() and np.isinf(gots[0]).any()
    assert np.isnan(gots[1]).any()


@pytest.mark.usefixtures("force_parallel", "restore_num_threads")
def test_same_bits_on_one_and_two_threads():
    cfg = CASES[1]
    assert_same_bits_on_1_and_2_threads(cfg, make_data(cfg, np.float32, 2), "direct")
