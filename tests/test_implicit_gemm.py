"""``im2col``'s forward pass by implicit GEMM (``im2col.implicit_plan``): whole images whose
product numbaconv's own GEMM runs read the taps' rows straight from zero-padded planes instead of
building columns (strided layers: one plane per channel and phase). Checked against the
sliding-window reference, and bit for bit against the columns path (the same products in the same
order)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from helpers import Cfg, assert_close, assert_same_bits, make_data
from naive import conv2d_windows, padding4

import numbaconv as nc
from numbaconv.geometry import make_geometry
from numbaconv.kernels import im2col

CASES = [
    Cfg(2, 40, 9, 11, 64, 3, 3, padding=1, name="3x3-pad1"),
    Cfg(1, 32, 12, 12, 64, 3, 3, padding=2, dilation=2, name="dilated"),
    Cfg(2, 64, 8, 8, 128, 3, 3, padding=1, groups=2, name="groups"),
    Cfg(3, 48, 9, 9, 64, 7, 1, padding=(3, 0), bias=False, name="7x1"),
    Cfg(2, 40, 10, 7, 72, 2, 3, padding="same", name="same-even"),
    # A thin product (32 filters x 75 taps) whose bands the plan would cut for BLAS, were the
    # whole images not implicit (forward_plan).
    Cfg(4, 3, 32, 32, 32, 5, 5, padding=2, name="thin-whole-images"),
    # Columns that the plan would cut into bands (BAND_BYTES); planes and product that fit
    # IMPLICIT_IMAGE_BYTES, so whole images.
    Cfg(4, 64, 24, 24, 64, 3, 3, padding=1, name="banded-columns-whole-images"),
]

#: Strided layers: phase planes (im2col.padded_planes); odd and even sizes, strides that differ
#: by axis, a stride larger than the filter (phases that no tap reads are not built), padding
#: that only some phases see.
STRIDED_CASES = [
    Cfg(2, 40, 17, 15, 64, 3, 3, stride=2, padding=1, name="3x3-stride2"),
    Cfg(3, 32, 18, 18, 64, 4, 4, stride=2, padding=1, bias=False, name="4x4-stride2"),
    Cfg(2, 24, 21, 19, 64, 5, 4, stride=(2, 3), padding=(2, 1), name="5x4-stride2x3"),
    Cfg(2, 40, 38, 35, 64, 2, 2, stride=3, padding=(1, 0), name="2x2-stride3"),
]

#: Transposed planes (implicit_transposed): filters wider than tall, and a map taller than wide;
#: padding above and below that is not the filter's, dilation along the width.
TRANSPOSED_CASES = [
    Cfg(3, 48, 9, 9, 64, 1, 7, padding=(0, 3), name="1x7-transposed"),
    Cfg(2, 40, 11, 9, 64, 3, 3, padding=1, bias=False, name="tall-transposed"),
    Cfg(2, 32, 10, 12, 64, 1, 5, padding=(1, 4), dilation=2, name="1x5-dilated-transposed"),
]


#: Batches of fewer than 4 images: bands of rows (im2col.implicit_band_rows), each with its own
#: planes; a last band shorter than the others, at stride 1, 2 and with dilation.
BAND_CASES = [
    Cfg(1, 24, 37, 21, 64, 3, 3, padding=1, name="one-image-bands"),
    Cfg(2, 16, 42, 33, 64, 5, 5, stride=2, padding=2, name="strided-bands"),
    Cfg(3, 32, 29, 26, 64, 3, 3, padding=2, dilation=2, bias=False, name="dilated-bands"),
]


def _plan(cfg, dtype):
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    band_rows, group = im2col.forward_plan(geom, np.dtype(dtype).itemsize)
    segment = im2col.row_segment(geom, np.dtype(dtype).itemsize, band_rows, group)
    return im2col.implicit_plan(geom, band_rows, group, segment, np.dtype(dtype).itemsize)


def _columns_on_the_micro_kernel(cfg, dtype) -> bool:
    """Whether every product of the columns path (``forward_plan``'s bands, segments or groups
    of images, the last ones shorter) runs on the micro-kernel: ``own_gemm_pays`` as the
    kernels were compiled (its gates unpatched), for each width the plan gives."""
    from numbaconv.kernels import microkernel as mk

    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    itemsize = np.dtype(dtype).itemsize
    band_rows, group = im2col.forward_plan(geom, itemsize)
    segment = im2col.row_segment(geom, itemsize, band_rows, group)
    oh, ow = geom.out_height, geom.out_width
    if segment < ow:
        widths = {segment, ow % segment}
    elif band_rows >= oh:
        widths = {oh * ow * group, oh * ow * (geom.batch % group or group)}
    else:
        widths = {band_rows * ow, oh % band_rows * ow}
    k_g = geom.out_channels // geom.groups
    taps_g = geom.in_channels // geom.groups * geom.filter_height * geom.filter_width
    pays = mk.own_gemm_pays.py_func
    return all(pays(k_g, taps_g, width, itemsize) for width in widths - {0})


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("cfg", CASES + TRANSPOSED_CASES + STRIDED_CASES + BAND_CASES, ids=str)
def test_implicit_gemm_matches_the_reference(request, cfg, dtype, parallel):
    if parallel:
        request.getfixturevalue("force_parallel")
    assert _plan(cfg, dtype).shape[0] == cfg.c * cfg.r * cfg.s, "the case misses the path"
    x, w, b, _ = make_data(cfg, dtype, seed=8)
    y = nc.conv2d(x, w, b, kernel="im2col", **cfg.kwargs)
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    pad4 = (geom.pad_top, geom.pad_bottom, geom.pad_left, geom.pad_right)
    ref, ref_abs = conv2d_windows(x, w, b, cfg.stride, pad4, cfg.dilation, cfg.groups)
    assert_close(y, ref, ref_abs, dtype, f"forward [{cfg}]")


# (Not the strided bands: the columns' plan cuts a last band of 2 rows, whose float64 product goes
# to BLAS.)
@pytest.mark.parametrize(
    "cfg", CASES[:3] + CASES[5:6] + TRANSPOSED_CASES + STRIDED_CASES + BAND_CASES[::2], ids=str
)
def test_implicit_gemm_gives_the_columns_bits(cfg, dtype, monkeypatch):
    """NaN and Inf included: they reach the same outputs (the extra columns on the padded width,
    which may hold them too, are never in y). The same bits where every product of the columns
    path runs on the micro-kernel too (:func:`_columns_on_the_micro_kernel`); where one runs on
    BLAS (a small band's product, or a target where ``own_gemm_pays`` is False), the two agree
    to rounding, NaN for NaN."""
    x, w, b, _ = make_data(cfg, dtype, seed=9)
    x[0, 1, 2, 3] = np.nan
    x[-1, 0, -1, -1] = np.inf
    assert _plan(cfg, dtype).shape[0] > 0
    implicit = nc.conv2d(x, w, b, kernel="im2col", **cfg.kwargs)
    monkeypatch.setattr(im2col, "IMPLICIT_MAX_WASTE", -1.0)
    assert _plan(cfg, dtype).shape[0] == 0
    own_gemm = _columns_on_the_micro_kernel(cfg, dtype)
    columns = nc.conv2d(x, w, b, kernel="im2col", **cfg.kwargs)
    if own_gemm:
        np.testing.assert_array_equal(implicit, columns)
    else:
        np.testing.assert_array_equal(np.isnan(implicit), np.isnan(columns))
        finite = np.isfinite(columns)
        tol = (1e-4 if dtype == np.float32 else 1e-12) * float(np.abs(columns[finite]).max())
        np.testing.assert_allclose(implicit[finite], columns[finite], rtol=0, atol=tol)
    assert np.isnan(implicit).any() and np.isfinite(implicit).any()


def test_the_plan_says_no_where_it_does_not_apply():
    def plan(x_shape, w_shape, **options):
        geom = make_geometry(x_shape, w_shape, **options)
        band_rows, group = im2col.forward_plan(geom, 4)
        return im2col.implicit_plan(geom, band_rows, group, geom.out_width, 4).shape[0]

    assert plan((2, 40, 9, 11), (64, 40, 3, 3), padding=1) == 360
    assert plan((2, 40, 17, 15), (64, 40, 3, 3), padding=1, stride=2) == 360
    # Strided and dilated: a tap's row would not be a window of one phase plane.
    assert plan((2, 40, 17, 15), (64, 40, 3, 3), padding=1, stride=2, dilation=2) == 0
    assert plan((2, 64, 17, 15), (64, 64, 1, 1), stride=2) == 0  # strided 1x1: no reuse
    assert plan((2, 40, 9, 11), (16, 40, 3, 3), padding=1) == 0  # too few filters: BLAS
    # 1x7: 6 of 15 columns wasted on the padded width, none on transposed planes.
    assert plan((2, 48, 9, 9), (64, 48, 1, 7), padding=(0, 3)) == 336
    assert plan((2, 40, 5, 5), (64, 40, 3, 3), padding=1) == 0  # 2 of 7 either way
    assert plan((2, 64, 9, 9), (64, 64, 1, 1)) == 0  # pointwise: the image is the columns
    assert padding4 is not None


def test_transposed_planes_where_the_padded_height_wastes_less():
    def orientation(x_shape, w_shape, **options):
        return im2col.implicit_transposed(make_geometry(x_shape, w_shape, **options))

    assert orientation((2, 48, 9, 9), (64, 48, 1, 7), padding=(0, 3))  # 1x7: 6 of 15 wasted
    assert not orientation((2, 48, 9, 9), (64, 48, 7, 1), padding=(3, 0))  # 7x1: none wasted
    assert not orientation((2, 40, 9, 9), (64, 40, 3, 3), padding=1)  # square: a tie
    assert orientation((2, 40, 11, 9), (64, 40, 3, 3), padding=1)  # taller than wide
    assert not orientation((2, 40, 9, 11), (64, 40, 3, 3), padding=1)  # wider than tall
    # Transposed planes hold each channel's Wp rows of Hp: tap (c, r, s) starts at
    # c*Hp*Wp + s*dw*Hp + r*dh. 1x5, dilation 2, on a 10x12 map padded (1, 4): Hp 12, Wp 20.
    geom = make_geometry((2, 32, 10, 12), (64, 32, 1, 5), padding=(1, 4), dilation=2)
    band_rows, group = im2col.forward_plan(geom, 4)
    rows = im2col.implicit_plan(geom, band_rows, group, geom.out_width, 4)
    np.testing.assert_array_equal(rows[:5], [0, 24, 48, 72, 96])
    assert rows[5] == 12 * 20


def test_whole_images_run_implicit_where_thin_products_would_be_cut_for_blas():
    # first5x5: 32 filters x 75 taps is thin, so columns come in 13-row bands, under
    # SMALL_GEMM_SIZE for BLAS; implicit GEMM builds no columns and takes the whole image.
    geom = make_geometry((32, 3, 32, 32), (32, 3, 5, 5), padding=2)
    assert im2col._band_rows(geom, 4, im2col.PLAN_LANES, 0) == 13
    for itemsize in (4, 8):
        assert im2col.forward_plan(geom, itemsize) == (32, 1)
        assert im2col.implicit_plan(geom, 32, 1, 32, itemsize).shape[0] == 75
    # Likewise at stride 2, on phase planes.
    strided = make_geometry((32, 3, 64, 64), (32, 3, 5, 5), padding=2, stride=2)
    assert im2col.forward_plan(strided, 4) == (32, 1)
    assert im2col.implicit_plan(strided, 32, 1, 32, 4).shape[0] == 75


def test_phase_planes_and_tap_rows():
    # 5x4 filters at stride (2, 3), padding (2, 1), on 21x19: 11x6 outputs; 3 tap rows per
    # plane down (ceil(5/2)) and 2 across (ceil(4/3)), so planes of 13 x 7, phases 2 x 3.
    geom = make_geometry((1, 24, 21, 19), (64, 24, 5, 4), stride=(2, 3), padding=(2, 1))
    assert im2col._padded_extent(geom) == (13, 7)
    assert im2col.plane_phases(geom) == (2, 3)
    rows = im2col.implicit_plan(geom, 11, 1, 6, 4)
    plane = 13 * 7
    # Tap (c, r, s) reads phase (r % 2, s % 3) of channel c from row r // 2, column s // 3.
    for c in range(24):
        for r in range(5):
            for s in range(4):
                phase = (c * 2 + r % 2) * 3 + s % 3
                assert rows[(c * 5 + r) * 4 + s] == phase * plane + (r // 2) * 7 + s // 3
    # Element (m, q) of phase (a, b) is the padded image's (2m + a, 3q + b).
    x = np.arange(24 * 21 * 19, dtype=np.float64).reshape(1, 24, 21, 19) + 1
    room, _ = im2col.implicit_workspace(geom)
    planes = np.full(room, np.nan)
    geo = im2col.geometry_args(geom)
    im2col.padded_planes.py_func(x, 0, planes, geo, 13, 7, 0)
    padded = np.zeros((24, 21 + 2 + 13 * 2, 19 + 1 + 7 * 3))
    padded[:, 2 : 2 + 21, 1 : 1 + 19] = x[0]
    for c in range(24):
        for a in range(2):
            for b in range(3):
                start = ((c * 2 + a) * 3 + b) * plane
                got = planes[start : start + plane].reshape(13, 7)
                np.testing.assert_array_equal(got, padded[c, a : a + 26 : 2, b : b + 21 : 3])
    assert not planes[24 * 6 * plane :].any()  # the room past the planes: zeros


@pytest.mark.parametrize(
    "height, width, filter_hw, stride, padding",
    [
        (9, 12, (3, 3), 2, (1, 1)),  # even width, odd left padding: even columns to phase 1
        (9, 13, (3, 3), 2, (1, 2)),  # odd width, even padding: the last even column alone
        (8, 11, (3, 4), 2, (0, 0)),  # no padding; the planes end before the row does
        (7, 10, (5, 5), (1, 2), (2, 3)),  # stride 1 down; padding wider than a phase's column
        (6, 1, (3, 2), 2, (1, 1)),  # a one-column image
    ],
)
def test_phase_planes_of_stride_two_columns(height, width, filter_hw, stride, padding):
    # At a column stride of 2 both column phases come from one pass over each input row
    # (_loops.deinterleave_row): plane (a, b)'s element (m, q) is the padded image's
    # (sh*m + a, 2q + b), and every element of the planes not in the image is zero.
    geom = make_geometry((1, 5, height, width), (8, 5, *filter_hw), stride=stride, padding=padding)
    sh, sw = geom.stride_h, geom.stride_w
    padded_h, padded_w = im2col._padded_extent(geom)
    phases_h, phases_w = im2col.plane_phases(geom)
    assert sw == 2 and phases_w == 2
    x = np.arange(5 * height * width, dtype=np.float32).reshape(1, 5, height, width) + 1
    room, _ = im2col.implicit_workspace(geom)
    planes = np.full(room, np.nan, dtype=np.float32)
    im2col.padded_planes(x, 0, planes, im2col.geometry_args(geom), padded_h, padded_w, 0)
    pad_t, pad_l = geom.pad_top, geom.pad_left
    padded = np.zeros((5, pad_t + sh * padded_h + 2, pad_l + sw * padded_w + 2), np.float32)
    padded[:, pad_t : pad_t + height, pad_l : pad_l + width] = x[0]
    plane = padded_h * padded_w
    for c in range(5):
        for a in range(phases_h):
            for b in range(phases_w):
                start = ((c * phases_h + a) * phases_w + b) * plane
                got = planes[start : start + plane].reshape(padded_h, padded_w)
                want = padded[c, a::sh][:padded_h, b::sw][:, :padded_w]
                np.testing.assert_array_equal(got, want)
    assert not planes[5 * phases_h * phases_w * plane :].any()


def test_whole_images_run_implicit_where_their_planes_fit():
    # ResNet's 16x64x56x56 3x3: columns in 8-row bands; planes and product 1.7 MB in float32.
    geom = make_geometry((16, 64, 56, 56), (64, 64, 3, 3), padding=1)
    assert im2col._band_rows(geom, 4, im2col.PLAN_LANES, 0) < 56
    # Planes (plus the last tap's 2 elements past them) and the product on the padded width.
    assert im2col.implicit_image_bytes(geom, 4) == (64 * 58 * 58 + 2 + 64 * 56 * 58) * 4
    assert im2col.forward_plan(geom, 4) == (56, 1)
    # float64: 3.4 MB, over IMPLICIT_IMAGE_BYTES: bands of columns.
    assert im2col.forward_plan(geom, 8)[0] < 56
    # Fewer than 4 images: whole images would leave cores idle, so bands.
    few = make_geometry((3, 64, 56, 56), (64, 64, 3, 3), padding=1)
    assert im2col.forward_plan(few, 4)[0] < 56
    # Transposed planes count the product on the padded height: Inception's 1x7 in float64.
    inception = make_geometry((16, 128, 17, 17), (128, 128, 1, 7), padding=(0, 3))
    assert im2col.implicit_image_bytes(inception, 8) == (128 * 17 * 23 + 128 * 17 * 17) * 8
    assert im2col.forward_plan(inception, 8) == (17, 1)


def _forward_on_1_and_2_threads(x, w, b, geom):
    """``im2col.forward`` on 1 thread, then on 2."""
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = im2col.forward(x, w, b, geom)
        numba.set_num_threads(2)
        return one, im2col.forward(x, w, b, geom)
    finally:
        numba.set_num_threads(threads)


def _check_forward_on_1_and_2_threads(cfg, dtype, geom, seed):
    """``im2col.forward`` on ``cfg``'s data: right against the reference on 2 threads, and the
    same bits on 1."""
    x, w, b, _ = make_data(cfg, dtype, seed=seed)
    pad4 = (geom.pad_top, geom.pad_bottom, geom.pad_left, geom.pad_right)
    ref, ref_abs = conv2d_windows(x, w, b, cfg.stride, pad4, cfg.dilation, cfg.groups)
    one, two = _forward_on_1_and_2_threads(x, w, b, geom)
    assert_close(two, ref, ref_abs, dtype, f"forward [{cfg}]")
    assert_same_bits(one, two, f"[{cfg}] 1 vs 2 threads")


@pytest.mark.parametrize("cfg", BAND_CASES, ids=str)
def test_small_batches_run_bands_of_rows(cfg, dtype):
    """At least IMPLICIT_BAND_JOBS jobs, the last band shorter; the bits on 1 and 2 threads."""
    itemsize = np.dtype(dtype).itemsize
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    rows = im2col.implicit_band_rows(geom, itemsize)
    assert 0 < rows < geom.out_height and geom.out_height % rows
    assert cfg.n * -(-geom.out_height // rows) >= im2col.IMPLICIT_BAND_JOBS
    assert im2col.forward_plan(geom, itemsize) == (rows, 1)
    x, w, b, _ = make_data(cfg, dtype, seed=3)
    one, two = _forward_on_1_and_2_threads(x, w, b, geom)
    assert_same_bits(one, two, f"[{cfg}] 1 vs 2 threads")


def test_bands_of_rows_for_small_batches_and_for_images_too_large_to_be_whole():
    one = make_geometry((1, 32, 256, 256), (32, 32, 3, 3), padding=1)  # U-Net's large image
    # 8 bands of 32 rows would make product rows of 33 KB: halved to 8 rows.
    assert im2col.implicit_band_rows(one, 4) == 8
    # Whole images where they fit, from 4 images on.
    assert im2col.implicit_band_rows(make_geometry((4, 32, 64, 64), (32, 32, 3, 3)), 4) == 0
    # A 7x7 stride-2 stem on 224x224 images: 3.9 MB a whole image (planes and product) in
    # float32, over IMPLICIT_IMAGE_BYTES; bands of 28 of its 112 output rows fit.
    stem = make_geometry((8, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3)
    assert im2col.implicit_image_bytes(stem, 4) > im2col.IMPLICIT_IMAGE_BYTES
    assert im2col.implicit_band_rows(stem, 4) == 28
    assert im2col.forward_plan(stem, 4) == (28, 1)
    assert im2col.implicit_band_rows(stem, 8) == 14
    # No implicit GEMM at all: pointwise, or strided 1x1.
    assert im2col.implicit_band_rows(make_geometry((1, 64, 32, 32), (64, 64, 1, 1)), 4) == 0
    strided_1x1 = make_geometry((1, 64, 32, 32), (64, 64, 1, 1), stride=2)
    assert im2col.implicit_band_rows(strided_1x1, 4) == 0


def test_small_maps_group_whole_images_even_when_one_image_exceeds_a_band(dtype, monkeypatch):
    """Maps under MIN_GEMM_COLUMNS pixels whose one image's columns exceed BAND_BYTES run whole
    images side by side (within GROUP_BYTES), not bands of a few rows: ResNet's 16x512x7x7 3x3
    in float64 (1.8 MB of columns an image, 4-row bands of 28 columns before). Here the band
    bound is set just under one image's columns: right against the reference, 9 images in jobs
    of 2 (the last one image), the same bits on 1 and 2 threads."""
    deep = make_geometry((16, 512, 7, 7), (512, 512, 3, 3), padding=1)
    assert im2col._band_rows(deep, 8, im2col.PLAN_LANES, 0) < 7
    assert im2col.forward_plan(deep, 8) == (7, 2)
    assert im2col.forward_plan(deep, 4) == (7, 4)
    cfg = Cfg(9, 16, 6, 7, 32, 3, 3, padding=1, name="small-map")
    itemsize = np.dtype(dtype).itemsize
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    columns = cfg.c * cfg.r * cfg.s * geom.out_height * geom.out_width * itemsize
    monkeypatch.setattr(im2col, "BAND_BYTES", columns - 1)
    assert im2col._band_rows(geom, itemsize, im2col.PLAN_LANES, 0) < geom.out_height
    assert im2col.forward_plan(geom, itemsize) == (geom.out_height, 2)
    _check_forward_on_1_and_2_threads(cfg, dtype, geom, seed=13)


@pytest.mark.parametrize("cfg", [
    Cfg(4, 8, 30, 27, 64, 5, 5, stride=2, padding=2, name="strided-5x5"),
    Cfg(5, 16, 23, 19, 64, 3, 3, padding=1, bias=False, name="3x3"),
    # Output rows 32 wide, a whole number of the tiles' panels: computed straight into y.
    Cfg(4, 8, 21, 32, 64, 3, 3, padding=1, name="32-wide"),
], ids=str)  # fmt: skip
def test_images_too_large_to_be_whole_run_bands_of_rows(cfg, dtype, monkeypatch):
    """From 4 images on, images whose planes and product exceed IMPLICIT_IMAGE_BYTES run in the
    largest bands of rows that fit (here the bound is set just under a whole image): right
    against the reference, with a last band shorter than the others, and the same bits on 1
    and 2 threads."""
    itemsize = np.dtype(dtype).itemsize
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    monkeypatch.setattr(
        im2col, "IMPLICIT_IMAGE_BYTES", im2col.implicit_image_bytes(geom, itemsize) - 1
    )
    rows = im2col.implicit_band_rows(geom, itemsize)
    assert 0 < rows < geom.out_height and geom.out_height % rows
    assert im2col.forward_plan(geom, itemsize) == (rows, 1)
    assert _plan(cfg, dtype).shape[0] == cfg.c * cfg.r * cfg.s
    _check_forward_on_1_and_2_threads(cfg, dtype, geom, seed=12)
