"""``im2col``'s forward pass on rows too wide for one band's columns (long 1-D signals): jobs are
segments of a row (``im2col.row_segment``), checked against the independent reference, across
segment boundaries, ragged last segments, padding, stride and dilation, and bit for bit against
the same call without segments."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Cfg, assert_close, make_data
from naive import conv2d_windows, padding4

import numbaconv as nc
from numbaconv.geometry import make_geometry
from numbaconv.kernels import im2col
from numbaconv.kernels import microkernel as mk

# Height-1 images (a conv1d's view): 16 channels x 9 taps = 144 rows of columns, so float32
# rows wider than about 1800 output columns exceed BAND_BYTES (float64: 900).
CASES = [
    Cfg(2, 16, 1, 2500, 32, 1, 9, padding=(0, 4), bias=True, name="same-9"),
    Cfg(1, 16, 1, 4101, 32, 1, 9, stride=2, padding=(0, 3), name="stride-2"),
    Cfg(2, 16, 1, 2300, 32, 1, 9, dilation=(1, 3), padding=(0, 5), name="dilated"),
    Cfg(1, 16, 2, 2100, 40, 2, 9, padding=(1, 0), groups=2, name="two-rows-groups"),
]


def _segment(cfg, dtype):
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    band_rows, group = im2col.forward_plan(geom, np.dtype(dtype).itemsize)
    return geom, im2col.row_segment(geom, np.dtype(dtype).itemsize, band_rows, group)


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_segmented_rows_match_the_reference(cfg, dtype, force_parallel):
    geom, segment = _segment(cfg, dtype)
    assert im2col.MIN_SEGMENT <= segment < geom.out_width, "the case does not reach segments"
    assert geom.out_width % segment != 0, "the case has no ragged last segment"
    x, w, b, _ = make_data(cfg, dtype, seed=4)
    y = nc.conv2d(x, w, b, kernel="im2col", **cfg.kwargs)
    pad4 = padding4(cfg.padding, (cfg.r, cfg.s), cfg.stride, cfg.dilation)
    ref, ref_abs = conv2d_windows(x, w, b, cfg.stride, pad4, cfg.dilation, cfg.groups)
    assert_close(y, ref, ref_abs, dtype, f"forward [{cfg}]")


# Rows of 2044 output columns: still segmented in float32 (above about 1820 columns) and whole,
# short enough for numbaconv's own GEMM in float64 too (microkernel.OWN_GEMM_MAX_ROW_BYTES:
# 2048 float64 columns; wider whole rows go to BLAS, which rounds otherwise), with a last segment
# of 224 columns in both dtypes, above the 1e6 M*K*N bound below which BLAS runs.
BITS_CASES = [
    Cfg(2, 16, 1, 2044, 32, 1, 9, padding=(0, 4), bias=True, name="same-9"),
    Cfg(1, 16, 1, 4089, 32, 1, 9, stride=2, padding=(0, 3), name="stride-2"),
]


@pytest.mark.parametrize("cfg", BITS_CASES, ids=str)
def test_segments_do_not_change_the_bits(cfg, dtype, monkeypatch):
    """numbaconv's own GEMM rounds each column the same whatever columns share its product
    (32 filters x 144 taps: it runs these, the last, ragged segments too, being above its
    1e6 M*K*N bound), so cutting rows into segments changes no bit. Where it does not run
    (targets narrower than AVX2, and float64 on AVX2: ``microkernel.OWN_GEMM_ON_THIS_TARGET``
    and ``OWN_GEMM_FLOAT64_ON_THIS_TARGET``), BLAS's products may round by their width, and
    the two agree to rounding."""
    itemsize = np.dtype(dtype).itemsize
    geom, segment = _segment(cfg, dtype)
    assert segment < geom.out_width and geom.out_width % segment != 0
    size_pays = mk.own_gemm_size_pays.py_func
    assert size_pays(32, 144, geom.out_width, itemsize)
    assert size_pays(32, 144, geom.out_width % segment, itemsize)
    # The gate as the kernels were compiled (nothing patched yet), for this dtype.
    own_gemm = mk.own_gemm_pays.py_func(32, 144, geom.out_width % segment, itemsize)
    x, w, b, _ = make_data(cfg, dtype, seed=5)
    segmented = nc.conv2d(x, w, b, kernel="im2col", **cfg.kwargs)
    monkeypatch.setattr(im2col, "BAND_BYTES", 2**30)
    assert _segment(cfg, dtype)[1] == _segment(cfg, dtype)[0].out_width
    whole_rows = nc.conv2d(x, w, b, kernel="im2col", **cfg.kwargs)
    if own_gemm:
        np.testing.assert_array_equal(segmented, whole_rows)
    else:
        scale = float(np.abs(whole_rows).max())
        tol = (1e-5 if dtype == np.float32 else 1e-12) * scale
        np.testing.assert_allclose(segmented, whole_rows, rtol=0, atol=tol)


def test_conv1d_of_a_long_signal(dtype):
    """The public 1-D function on a signal long enough for segments, against conv2d's reference
    on the height-1 view."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 8, 6000)).astype(dtype)
    w = rng.standard_normal((32, 8, 9)).astype(dtype)
    y = nc.conv1d(x, w, padding=4, kernel="im2col")
    ref, ref_abs = conv2d_windows(x[:, :, None], w[:, :, None], None, 1, (0, 0, 4, 4), 1, 1)
    assert_close(y, ref[:, :, 0], ref_abs[:, :, 0], dtype, "conv1d")
