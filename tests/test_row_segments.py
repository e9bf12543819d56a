"""``im2col``'s forward pass on rows too wide for one band's columns (long 1-D signals): jobs are
segments of a row (``im2col.row_segment``), checked against the independent reference, across
segment boundaries, ragged last segments, padding, stride and dilation, and bit for bit against
the same call without segments. Stride-1 segments read their taps' windows in place
(``im2col.segment_tap_rows``), in the forward pass and in grad-w
(``im2col.segment_weight_gradient``), and grad-x runs as such a forward pass where the adjoint
has enough filters; the others build columns."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from helpers import (
    Cfg,
    assert_close,
    assert_like_plain_sum,
    assert_same_bits_on_1_and_2_threads,
    check_against_reference,
    make_data,
    windows_reference,
)
from naive import conv2d_grads_windows, conv2d_windows, padding4

import numbaconv as nc
from numbaconv.geometry import make_geometry
from numbaconv.kernels import im2col
from numbaconv.kernels import microkernel as mk

# Height-1 images (a conv1d's view): 16 channels x 9 taps = 144 rows of columns, so float32
# rows wider than about 1800 output columns exceed BAND_BYTES (float64: 900). The stride-1 cases
# have 4 images, so that their backward passes run the fused or segmented routes rather than
# blocked_backward (batches of fewer than im2col.SMALL_BATCH_LANES).
CASES = [
    Cfg(4, 16, 1, 2500, 32, 1, 9, padding=(0, 4), bias=True, name="same-9"),
    Cfg(1, 16, 1, 4101, 32, 1, 9, stride=2, padding=(0, 3), name="stride-2"),
    Cfg(4, 16, 1, 4300, 32, 1, 9, dilation=(1, 3), padding=(0, 5), name="dilated"),
    Cfg(1, 16, 2, 2100, 40, 2, 9, padding=(1, 0), groups=2, name="two-rows-groups"),
    Cfg(4, 32, 1, 4200, 32, 1, 9, padding=(0, 4), bias=True, name="32-to-32"),
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


#: The route each case takes: windows read in place (stride 1 along the row, 32 filters a group:
#: a product numbaconv's own GEMM runs) or columns (stride 2; 20 filters a group).
WINDOWS = {
    "same-9": True,
    "stride-2": False,
    "dilated": True,
    "two-rows-groups": False,
    "32-to-32": True,
}
#: grad-x as the adjoint's forward pass on windows: the adjoint needs 32 filters too (16
#: channels give it 16).
GRAD_X_WINDOWS = {"32-to-32"}
#: grad-w on the segments' windows in both dtypes (in "same-9", float32 runs whole images by
#: implicit GEMM).
GRAD_W_SEGMENTS = {"dilated", "32-to-32"}


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_stride_1_segments_read_their_taps_windows(cfg, dtype):
    """segment_tap_rows: tap ``(c*R + r)*S + s`` at ``(c*R + r)*L + s*dw`` of the windows
    (``L``: the segment plus the dilated filter's reach), for the cases that take that route."""
    itemsize = np.dtype(dtype).itemsize
    geom, segment = _segment(cfg, dtype)
    rows = im2col.segment_tap_rows(geom, segment, itemsize)
    assert (rows.shape[0] > 0) == WINDOWS[cfg.name]
    # grad-w on the same segments' windows (segment_weight_gradient), wherever they run and
    # whole images' implicit GEMM does not (rows of over 4096 float32 columns: too long for it).
    assert not im2col.blocked_fits(geom, itemsize) or not WINDOWS[cfg.name]
    if cfg.name in GRAD_W_SEGMENTS:
        assert not im2col.implicit_weight_gradient_applies(geom, itemsize)
    assert im2col.weight_gradient_segment(geom, itemsize) == (segment if WINDOWS[cfg.name] else 0)
    adjoint = im2col.input_gradient_as_forward(geom, itemsize)
    assert (adjoint is not None) == (cfg.name in GRAD_X_WINDOWS)
    if rows.shape[0]:
        r_taps, s_taps = geom.filter_height, geom.filter_width
        length = segment + (s_taps - 1) * geom.dilation_w
        want = [
            (c * r_taps + r) * length + s * geom.dilation_w
            for c in range(geom.in_channels)
            for r in range(r_taps)
            for s in range(s_taps)
        ]
        np.testing.assert_array_equal(rows, want)


WINDOW_CASES = [c for c in CASES if WINDOWS[c.name]]


@pytest.mark.parametrize("cfg", WINDOW_CASES, ids=str)
def test_segments_by_windows_forward_and_gradients(cfg, dtype, force_parallel):
    """Forward, grad-x (the adjoint's forward pass on windows) and grad-w against the reference;
    every bit the same on 1 and 2 threads."""
    x, w, b, gy = make_data(cfg, dtype, seed=7)
    check_against_reference(cfg, "im2col", dtype, seed=7, ref=windows_reference(cfg, x, w, b, gy))
    threads = numba.get_num_threads()
    try:
        assert_same_bits_on_1_and_2_threads(cfg, (x, w, b, gy), "im2col")
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("cfg", [c for c in CASES if c.name in GRAD_X_WINDOWS], ids=str)
def test_segments_by_windows_carry_nan_and_inf(cfg, dtype, force_parallel):
    """A NaN and an Inf in the input reach exactly the outputs whose windows hold them; an Inf
    in a filter sends grad-x back to gradient columns (the adjoint's forward pass would multiply
    it by grad_y's zero padding), so grad-x is NaN or Inf exactly where the loops make it."""
    x, w, b, gy = make_data(cfg, dtype, seed=8)
    x[0, 3, 0, 1] = np.nan  # inside the first segment's padded reach
    x[1, 5, 0, 1900] = np.inf  # past a segment boundary
    y = nc.conv2d(x, w, b, kernel="im2col", **cfg.kwargs)
    pad4 = padding4(cfg.padding, (cfg.r, cfg.s), cfg.stride, cfg.dilation)
    want, _ = conv2d_windows(
        x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
        cfg.stride, pad4, cfg.dilation, cfg.groups,
    )  # fmt: skip
    assert np.isnan(want).any() and np.isinf(want).any()
    assert_like_plain_sum(y, want, dtype, "forward")
    w_inf = w.copy()
    w_inf[2, 4, 0, 3] = np.inf
    gx = nc.conv2d_backward(gy, np.ones_like(x), w_inf, kernel="im2col", **cfg.kwargs)[0]
    (want_gx, _, _), _ = conv2d_grads_windows(
        gy.astype(np.float64), np.ones(x.shape), w_inf.astype(np.float64),
        cfg.stride, pad4, cfg.dilation, cfg.groups,
    )  # fmt: skip
    assert np.isinf(want_gx).any()
    assert_like_plain_sum(gx, want_gx, dtype, "grad_x")


@pytest.mark.parametrize("cfg", WINDOW_CASES, ids=str)
def test_segment_weight_gradient_carries_nan_and_inf(cfg, dtype, force_parallel):
    """grad-w and grad-b on the segments' windows: a NaN and an Inf in the input reach exactly
    the filter taps whose windows hold them (each tap's row is its segment of the columns, and
    nothing else is multiplied), NaN in grad_y every tap of its filter."""
    x, w, b, gy = make_data(cfg, dtype, seed=9)
    x[0, 3, 0, 1] = np.nan  # in the first segment's padded reach
    x[-1, 5, 0, 1900] = np.inf  # past a segment boundary
    gy[-1, 7, -1, 1000] = np.nan
    _, gw, gb = nc.conv2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs)
    pad4 = padding4(cfg.padding, (cfg.r, cfg.s), cfg.stride, cfg.dilation)
    (_, want_gw, want_gb), _ = conv2d_grads_windows(
        gy.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
        cfg.stride, pad4, cfg.dilation, cfg.groups,
    )  # fmt: skip
    assert np.isnan(want_gw).any() and np.isinf(want_gw).any()
    assert_like_plain_sum(gw, want_gw, dtype, "grad_w")
    assert_like_plain_sum(gb, want_gb, dtype, "grad_b")
