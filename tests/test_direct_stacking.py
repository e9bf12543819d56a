"""``direct``'s plane kernel stacks the padded planes of several images (one output channel) into
a job when the planes are small (``direct.images_per_job``, ``STACK_ELEMENTS``): every output
gets the same arithmetic, so the results are the same bits as with one plane a job, for the
forward pass, grad-x (transposed) and grad-b, whatever the last block's size. grad-w sums each
tap over a whole block at once (one dot product per block, in vector lanes), so its bits
depend on the blocks (a function of the geometry, never of the threads) and it agrees with
the one-plane sums to rounding. Everything agrees with the loop reference."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Cfg, assert_same_bits, check_against_reference, make_data, run_all

from numbaconv.geometry import make_geometry
from numbaconv.kernels import direct

CASES = [
    Cfg(17, 6, 5, 7, 6, 3, 3, padding=1, groups=6, name="depthwise-17-images"),
    Cfg(5, 8, 9, 6, 4, 3, 2, stride=2, padding=(1, 0), groups=4, name="strided-phases"),
    Cfg(9, 4, 4, 4, 8, 5, 5, padding=2, groups=4, name="5x5-multiplier-2"),
    Cfg(3, 6, 11, 10, 6, 3, 3, padding=2, dilation=2, groups=6, name="dilated"),
    Cfg(33, 3, 3, 3, 3, 3, 3, padding=1, groups=3, bias=False, name="3x3-maps"),
]


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_stacked_planes_give_the_same_results_as_one_plane_a_job(cfg, dtype, monkeypatch):
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    n, _, oh, ow = geom.output_shape
    stacked = direct.images_per_job(n, oh, ow, geom)
    assert 1 < stacked < n or stacked == n > 1, "several images a job, blocks of the batch"
    data = make_data(cfg, dtype)
    got = run_all(cfg, *data, "direct")
    monkeypatch.setattr(direct, "STACK_ELEMENTS", 0)
    assert direct.images_per_job(n, oh, ow, geom) == 1
    one = run_all(cfg, *data, "direct")
    same = ("y", 0), ("grad_x", 1), ("grad_b", 3)
    for name, i in same:
        assert_same_bits(got[i], one[i], f"{name} {cfg}")
    tol = 1e-5 if dtype == np.float32 else 1e-12
    scale = np.abs(one[2]).max()
    np.testing.assert_allclose(got[2], one[2], rtol=tol, atol=tol * scale, err_msg=f"{cfg}")


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_stacked_planes_match_the_reference(cfg, dtype):
    check_against_reference(cfg, "direct", dtype)


def test_stacking_is_bounded_by_the_plane_size():
    small = make_geometry((64, 8, 14, 14), (8, 1, 3, 3), padding=1, groups=8)
    large = make_geometry((16, 8, 112, 112), (8, 1, 3, 3), padding=1, groups=8)
    assert direct.images_per_job(64, 14, 14, small) == direct.STACK_ELEMENTS // (16 * 16)
    assert direct.images_per_job(16, 112, 112, large) == 1


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_grad_w_of_a_plane_with_a_non_finite_pixel_is_the_plain_one(dtype, value):
    """grad-w's long dot products run over the padded grid, whose columns past OW meet pixels
    no output reads (times a zero gradient): a plane holding an Inf or a NaN takes the row path,
    so an Inf in the last column leaves the taps that never read it finite, as in NumPy's
    kernel."""
    cfg = Cfg(3, 4, 6, 7, 4, 3, 3, padding=1, groups=4, name="depthwise")
    x, w, b, gy = make_data(cfg, dtype)
    x[1, 2, 3, -1] = value
    got = run_all(cfg, x, w, b, gy, "direct")[2]
    plain = run_all(cfg, x, w, b, gy, "numpy")[2]
    assert np.isfinite(got[2, 0, :, 0]).all(), "tap column 0 never reads the last column"
    np.testing.assert_array_equal(np.isnan(got), np.isnan(plain))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(plain))
    finite = np.isfinite(plain)
    np.testing.assert_allclose(got[finite], plain[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        Cfg(5, 4, 6, 7, 4, 3, 3, groups=4, name="valid-depthwise"),
        Cfg(5, 4, 6, 7, 8, 3, 2, padding=(0, 1), groups=2, name="valid-rows-grouped"),
        Cfg(7, 2, 5, 5, 2, 3, 3, stride=2, padding=1, groups=2, name="strided"),
    ],
    ids=str,
)
def test_lanes_zero_their_grids_once(cfg, dtype, monkeypatch, force_parallel):
    """At stride 1 a lane zeroes its grids once and each job writes only the pixels: blocks of
    2 images, the last one short (its planes' tail zeroed over pixels of the next plane), no
    padding rows (the planes are all pixels), several jobs per lane, with NaN-free data and the
    reference's results."""
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    _, _, oh, ow = geom.output_shape
    padded_h, padded_w, _ = direct._plane_shape(oh, ow, geom)
    monkeypatch.setattr(direct, "STACK_ELEMENTS", 2 * padded_h * padded_w)
    assert direct.images_per_job(cfg.x_shape[0], oh, ow, geom) == 2
    check_against_reference(cfg, "direct", dtype)
