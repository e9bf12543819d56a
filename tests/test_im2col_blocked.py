"""im2col's blocked backward pass for small batches (``im2col.blocked_backward``): the columns
of the whole batch, grad-w by blocks of taps, grad-x by blocks of channels. The layers of the
other test files run it wherever a batch of one to three images has 16 input channels or more;
these pin its seams."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    Cfg,
    assert_same_bits,
    assert_same_bits_on_1_and_2_threads,
    check_against_reference,
    make_data,
)

import numbaconv as nc
from numbaconv import _threading
from numbaconv.geometry import make_geometry
from numbaconv.kernels import im2col

CFGS = [
    # One image, 17 channels: 4 blocks of 5, 5, 5 and 2 channels (ragged last block); odd
    # sizes, stride, dilation and asymmetric padding.
    Cfg(1, 17, 11, 9, 6, 3, 2, stride=(2, 1), padding=(2, 1), dilation=(1, 2), name="ragged"),
    # Three images (each job sums them in order), more filters than taps per block.
    Cfg(3, 16, 7, 8, 40, 3, 3, padding=1, bias=False, name="3-images"),
    # Pointwise (the columns are a copy of the image) and a 5x5 filter larger than the image.
    Cfg(2, 16, 5, 6, 8, 1, 1, name="pointwise"),
    Cfg(1, 20, 3, 4, 5, 5, 5, padding=2, name="filter-larger-than-image"),
]


def geometry(cfg: Cfg):
    return make_geometry(cfg.x_shape, (cfg.k, cfg.c // cfg.groups, cfg.r, cfg.s), **cfg.kwargs)


@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_blocked_backward_runs_and_matches_the_reference(cfg, dtype, force_parallel, thread_probe):
    geom = geometry(cfg)
    assert im2col.blocked_fits(geom, np.dtype(dtype).itemsize)
    check_against_reference(cfg, "im2col", dtype, seed=41)
    names = [r.name for r in thread_probe.regions]
    assert "im2col.blocked_weight_gradient_kernel" in names
    assert "im2col.blocked_input_gradient_kernel" in names
    assert "im2col.fused_backward_kernel" not in names
    blocked = [r for r in thread_probe.regions if r.name.startswith("im2col.blocked_")]
    assert all(r.threads >= 2 for r in blocked), blocked


@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_input_gradient_alone_matches_the_full_pass(cfg, dtype, force_parallel):
    """A transposed convolution's forward pass: grad-x without the columns of an input."""
    x, w, _, gy = make_data(cfg, dtype, seed=42)
    geom = geometry(cfg)
    full = im2col.backward(gy, x, w, geom)[0]
    alone = im2col.input_gradient(gy, w, geom)
    assert_same_bits(alone, full, f"grad_x alone [{cfg}]")


@pytest.mark.parametrize("cfg", CFGS, ids=str)
def test_bits_do_not_depend_on_the_thread_count(cfg, dtype, restore_num_threads, monkeypatch):
    monkeypatch.setattr(_threading, "SERIAL_FLOPS", 0)
    assert_same_bits_on_1_and_2_threads(cfg, make_data(cfg, dtype, seed=43), "im2col")


def test_which_layers_run_blocked():
    fits = im2col.blocked_fits
    assert fits(make_geometry((1, 128, 28, 28), (128, 128, 3, 3), padding=1), 4)
    assert fits(make_geometry((3, 16, 8, 8), (4, 16, 3, 3)), 8)
    # Four images or more: the fused pass's lanes take whole images.
    assert not fits(make_geometry((4, 128, 28, 28), (128, 128, 3, 3), padding=1), 4)
    # Fewer than BLOCKED_MIN_CHANNELS input channels (the 7x7 stem), groups.
    assert not fits(make_geometry((1, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3), 4)
    assert not fits(make_geometry((1, 32, 28, 28), (32, 16, 3, 3), groups=2), 4)
    # Columns of the batch over WORKSPACE_BYTES: 1152 taps x 2 x 3136 pixels x 8 bytes; one
    # image fits.
    assert im2col.WORKSPACE_BYTES == 32 * 2**20
    assert not fits(make_geometry((2, 128, 58, 58), (16, 128, 3, 3)), 8)
    assert fits(make_geometry((1, 128, 58, 58), (16, 128, 3, 3)), 8)


def test_the_chunked_path_still_runs_without_blas_inside(monkeypatch, force_parallel):
    monkeypatch.setenv("NUMBACONV_BLAS_INSIDE_KERNELS", "0")
    check_against_reference(CFGS[0], "im2col", np.float64, seed=44)


def test_a_nan_in_the_input_spreads_as_in_a_plain_computation():
    """im2col multiplies the padding too, so a NaN pixel reaches grad-w of every tap that reads
    it and nothing of grad-x, whose products do not involve x."""
    cfg = CFGS[1]
    x, w, _, gy = make_data(cfg, np.float64, seed=45)
    x[1, 3, 4, 5] = np.nan
    gx, gw, gb = nc.conv2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs)
    assert np.isnan(gw[:, 3]).all() and not np.isnan(gw[:, :3]).any()
    assert not np.isnan(gx).any() and not np.isnan(gb).any()
