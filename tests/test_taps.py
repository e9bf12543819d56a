"""The ``taps`` kernel's own seams: the windows each tap reads, its bands and blocks of jobs, and
what ``auto`` gives it. (Every kernel, ``taps`` included, also runs the whole grid of the
other test files against the reference.)"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    Cfg,
    assert_same_bits_on_1_and_2_threads,
    check_against_reference,
    make_data,
)

import numbaconv as nc
from numbaconv import _threading, registry
from numbaconv.geometry import make_geometry, swap_axes
from numbaconv.kernels import taps

CFGS = [
    # Taps wholly in the padding (dilation 5 on 4 rows), ragged bands and blocks.
    Cfg(2, 3, 4, 9, 5, 3, 3, padding=5, dilation=5, name="taps-outside-the-image"),
    Cfg(1, 4, 11, 10, 7, 3, 2, stride=2, padding=(3, 2), dilation=(3, 2), name="strided-dilated"),
    Cfg(3, 6, 9, 7, 4, 3, 3, stride=(1, 3), padding=4, dilation=4, groups=2, name="groups-2"),
    Cfg(2, 4, 8, 8, 4, 5, 1, padding=(2, 0), groups=4, bias=False, name="depthwise-5x1"),
    Cfg(1, 3, 6, 7, 2, 1, 1, stride=2, name="1x1-stride-2"),
    Cfg(2, 5, 13, 12, 9, 3, 3, padding=6, dilation=6, name="deeplab-like"),
    # 1xk: every pass on the arrays transposed in their spatial axes (taps.by_swapped_axes).
    Cfg(2, 4, 7, 9, 5, 1, 5, stride=(1, 2), padding=(0, 3), dilation=(1, 2), name="1x5-swapped"),
    Cfg(1, 4, 5, 8, 6, 1, 3, padding=(0, 1), groups=2, bias=False, name="1x3-swapped-groups"),
]


def geometry(cfg: Cfg):
    return make_geometry(cfg.x_shape, (cfg.k, cfg.c // cfg.groups, cfg.r, cfg.s), **cfg.kwargs)


def counted_fraction(cfg: Cfg) -> float:
    """The share of (output, tap) pairs whose input lies inside the image, counted one by one."""
    geom = geometry(cfg)
    inside = total = 0
    for i in range(geom.out_height):
        for j in range(geom.out_width):
            for r in range(cfg.r):
                for s in range(cfg.s):
                    row = i * geom.stride_h - geom.pad_top + r * geom.dilation_h
                    col = j * geom.stride_w - geom.pad_left + s * geom.dilation_w
                    inside += 0 <= row < cfg.h and 0 <= col < cfg.w
                    total += 1
    return inside / total


@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_useful_fraction_counts_the_products_inside_the_image(cfg):
    assert taps.useful_fraction(geometry(cfg)) == pytest.approx(counted_fraction(cfg), abs=1e-12)


@pytest.fixture(params=["whole", "one-row-bands-and-blocks"])
def plan(request, monkeypatch):
    """The default plan, or one output (input) row per band and 8 jobs' worth of blocks."""
    if request.param != "whole":
        monkeypatch.setattr(taps, "BAND_BYTES", 1)
        monkeypatch.setattr(taps, "MIN_JOBS", 64)
        monkeypatch.setattr(taps, "MIN_BLOCK", 1)
    return request.param


@pytest.mark.parametrize("blas_inside", ["1", "0"], ids=["blas", "own-gemm"])
@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_bands_blocks_and_gemms_against_the_reference(
    cfg, dtype, plan, blas_inside, monkeypatch, force_parallel
):  # fmt: skip
    monkeypatch.setenv("NUMBACONV_BLAS_INSIDE_KERNELS", blas_inside)
    check_against_reference(cfg, "taps", dtype, seed=31)


@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_bits_do_not_depend_on_the_thread_count(cfg, dtype, plan, restore_num_threads, monkeypatch):
    monkeypatch.setattr(_threading, "SERIAL_FLOPS", 0)
    data = make_data(cfg, dtype, seed=32)
    assert_same_bits_on_1_and_2_threads(cfg, data, "taps", f", {plan}")


def test_the_jobs_split_a_single_image(monkeypatch):
    """A batch of one image in one band still makes several jobs (blocks of filters and of
    channels), so that both cores work; and they run in several lanes."""
    cfg = Cfg(1, 128, 16, 16, 128, 3, 3, padding=8, dilation=8)
    geom = geometry(cfg)
    assert taps._block(geom.out_channels, 1, 1) < geom.out_channels
    assert taps._block(geom.in_channels, 1, 1) < geom.in_channels
    assert taps._block(geom.out_channels, 2, 1) == geom.out_channels  # groups: whole
    assert taps._block(geom.out_channels, 1, taps.MIN_JOBS) == geom.out_channels


def test_a_nan_reaches_only_the_outputs_that_read_it():
    """Padding is never multiplied: a NaN in the filter's corner tap reaches only the outputs
    whose corner tap reads the image (im2col's 0 * NaN would reach them all)."""
    cfg = Cfg(1, 2, 6, 6, 1, 3, 3, padding=3, dilation=3)
    x, w, b, _ = make_data(cfg, np.float64, seed=33)
    w[0, 0, 0, 0] = np.nan
    y = nc.conv2d(x, w, b, kernel="taps", **cfg.kwargs)
    # Tap (0, 0) reads input (i - 3, j - 3): inside the image for i, j >= 3.
    reads = np.zeros((6, 6), bool)
    reads[3:, 3:] = True
    np.testing.assert_array_equal(np.isnan(y[0, 0]), reads)


@pytest.mark.parametrize(
    ("cfg", "chosen"),
    [
        (Cfg(4, 256, 33, 33, 256, 3, 3, padding=12, dilation=12), True),  # DeepLab, 0.57
        (Cfg(4, 256, 33, 33, 256, 3, 3, padding=6, dilation=6), True),  # 0.77
        (Cfg(2, 64, 32, 32, 64, 3, 3, padding=12, dilation=12, groups=2), True),  # 32 per group
        (Cfg(8, 512, 14, 14, 512, 3, 3, padding=2, dilation=2), False),  # 0.82
        (Cfg(16, 512, 7, 7, 512, 3, 3, padding=12, dilation=12), False),  # 49 pixels
        (Cfg(4, 16, 33, 33, 256, 3, 3, padding=12, dilation=12), False),  # 16 channels
        (Cfg(2, 64, 32, 32, 64, 3, 3, padding=12, dilation=12, groups=4), False),  # 16 per group
        (Cfg(16, 128, 17, 17, 128, 7, 1, padding=(3, 0)), True),  # Inception's 7x1: whole rows
        (Cfg(16, 128, 17, 17, 128, 1, 7, padding=(0, 3)), (True, False)),  # its 1x7, transposed
        (Cfg(16, 128, 17, 17, 128, 1, 5, padding=(0, 2)), (True, False)),
        (Cfg(16, 128, 17, 17, 128, 1, 3, padding=(0, 1)), False),  # 1x3: the copies cost more
        (Cfg(16, 64, 17, 17, 64, 1, 7, padding=(0, 3)), False),  # 1x7, 64 channels
        (Cfg(16, 64, 28, 28, 64, 3, 1, padding=(1, 0)), False),  # 3x1, 64 channels
    ],
    ids=str,
)
def test_auto_gives_taps_the_layers_mostly_in_padding(cfg, chosen):
    forward, backward = chosen if isinstance(chosen, tuple) else (chosen, chosen)
    for dtype in (np.float32, np.float64):
        assert (registry.choose(geometry(cfg), dtype, "forward") == "taps") == forward
        assert (registry.choose(geometry(cfg), dtype, "backward") == "taps") == backward


def test_1xk_layers_run_as_kx1_layers_on_swapped_axes():
    cfg = Cfg(2, 4, 7, 9, 5, 1, 5, stride=(1, 2), padding=(0, 3), dilation=(1, 2))
    geom = geometry(cfg)
    swapped = taps.by_swapped_axes(geom)
    transposed = dict(stride=(2, 1), padding=(3, 0), dilation=(2, 1))
    assert swapped == make_geometry((2, 4, 9, 7), (5, 4, 5, 1), **transposed)
    assert taps.reads_whole_rows(swapped) and not taps.reads_whole_rows(geom)
    assert swap_axes(swapped) == geom
    # kx1 layers read whole rows as they are; padded or strided rows cannot.
    assert taps.by_swapped_axes(swapped) is None
    assert taps.by_swapped_axes(geometry(Cfg(2, 4, 7, 9, 5, 1, 5, padding=(1, 2)))) is None
    assert taps.by_swapped_axes(geometry(Cfg(2, 4, 7, 9, 5, 1, 5, stride=2))) is None
    assert taps.by_swapped_axes(geometry(Cfg(2, 4, 7, 9, 5, 3, 3))) is None
    assert taps.by_swapped_axes(geometry(Cfg(2, 4, 1, 9, 5, 1, 5, padding=(0, 2)))) is None  # 1-D


def test_the_swap_kernel_transposes_every_plane():
    x = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7)
    np.testing.assert_array_equal(taps._swapped(x), x.transpose(0, 1, 3, 2))


def test_whole_rows_are_kx1_filters_without_column_padding():
    assert taps.reads_whole_rows(geometry(Cfg(2, 4, 9, 6, 4, 3, 1, padding=(1, 0), dilation=2)))
    assert taps.reads_whole_rows(geometry(Cfg(2, 4, 9, 6, 4, 3, 1, stride=(2, 1))))
    assert not taps.reads_whole_rows(geometry(Cfg(2, 4, 9, 6, 4, 3, 1, padding=1)))
    assert not taps.reads_whole_rows(geometry(Cfg(2, 4, 9, 6, 4, 3, 1, stride=2)))
    assert not taps.reads_whole_rows(geometry(Cfg(2, 4, 9, 6, 4, 1, 1)))  # 1x1: one tap
    assert not taps.reads_whole_rows(geometry(Cfg(2, 4, 9, 6, 4, 1, 3)))
