"""``im2col``'s backward pass without columns. grad-w by implicit GEMM
(``im2col.implicit_weight_gradient``): per image, ``grad_w.T += windows @ grad_y.T`` with the
taps' windows read in place from the zero-padded planes of the forward pass's implicit GEMM.
grad-x of stride-1 layers as the forward pass of ``grad_y`` with the flipped filters
(``im2col.input_gradient_as_forward``), itself implicit. Checked against the sliding-window
reference (all three gradients), bit for bit across thread counts, and with Inf and NaN against
the columns path, which multiplies exactly the plain sum's products."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    Cfg,
    assert_close,
    assert_same_bits,
    assert_same_bits_on_1_and_2_threads,
    make_data,
    windows_reference,
)

import numbaconv as nc
from numbaconv.geometry import make_geometry
from numbaconv.kernels import im2col

#: Batches of at least 4, at least 128 taps a group: normal planes, transposed planes (1x7),
#: phase planes (stride 2), dilation, groups; filters that leave a ragged panel of the product
#: (40, 70: not multiples of 32) and taps that leave rows below the last row block (270).
CASES = [
    Cfg(4, 40, 9, 11, 64, 3, 3, padding=1, name="3x3-pad1"),
    Cfg(5, 48, 9, 9, 40, 1, 7, padding=(0, 3), bias=False, name="1x7-transposed"),
    Cfg(4, 24, 17, 15, 64, 3, 3, stride=2, padding=1, name="3x3-stride2"),
    Cfg(4, 32, 12, 12, 64, 3, 3, padding=2, dilation=2, name="dilated"),
    Cfg(4, 64, 8, 8, 128, 3, 3, padding=1, groups=2, name="groups"),
    Cfg(6, 45, 10, 7, 70, 2, 3, padding="same", name="same-even-ragged"),
    # 210 output pixels an image: grad-w alone comes here too, not from whole-batch columns.
    Cfg(4, 40, 14, 15, 64, 3, 3, padding=1, name="3x3-larger-map"),
]


def _applies(cfg, dtype):
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    return im2col.implicit_weight_gradient_applies(geom, np.dtype(dtype).itemsize)


def _grad_x_by_forward(cfg, dtype):
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    return im2col.input_gradient_as_forward(geom, np.dtype(dtype).itemsize) is not None


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_implicit_weight_gradient_matches_the_reference(request, cfg, dtype, parallel):
    if parallel:
        request.getfixturevalue("force_parallel")
    assert _applies(cfg, dtype), "the case misses the path"
    # Every stride-1 case takes grad-x by the forward pass too.
    assert _grad_x_by_forward(cfg, dtype) == (cfg.stride == 1), "grad-x misses its path"
    x, w, b, gy = make_data(cfg, dtype, seed=4)
    ref = windows_reference(cfg, x, w, b, gy)
    gx, gw, gb = nc.conv2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs)
    tag = f"[{np.dtype(dtype).name}, {cfg}]"
    assert_close(gx, ref.gx, ref.gx_abs, dtype, f"grad_x {tag}")
    assert_close(gw, ref.gw, ref.gw_abs, dtype, f"grad_w {tag}")
    assert_close(gb, ref.gb, ref.gb_abs, dtype, f"grad_b {tag}")
    # grad-w alone (Winograd's and transposed convolutions' backward passes ask for it so):
    # the same path, unless small maps' whole-batch columns take it (batch_weight_gradient).
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    alone_w, alone_b = im2col.weight_and_bias_gradients(gy, x, w, geom)
    assert_close(alone_w, ref.gw, ref.gw_abs, dtype, f"grad_w alone {tag}")
    if not im2col.batch_weight_gradient(geom, np.dtype(dtype).itemsize):
        assert_same_bits(alone_w, gw, f"grad_w alone {tag}")
        assert_same_bits(alone_b, gb, f"grad_b alone {tag}")
    # grad-x alone (a transposed convolution's forward pass): the same bits.
    assert_same_bits(im2col.input_gradient(gy, w, geom), gx, f"grad_x alone {tag}")


@pytest.mark.usefixtures("force_parallel")
@pytest.mark.parametrize("cfg", CASES[:2] + CASES[4:5], ids=str)
def test_implicit_weight_gradient_bits_do_not_depend_on_threads(cfg, dtype):
    import numba

    threads = numba.get_num_threads()
    try:
        assert_same_bits_on_1_and_2_threads(cfg, make_data(cfg, dtype, seed=6), "im2col")
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("cfg", CASES[:3], ids=str)
def test_inf_and_nan_reach_grad_w_as_through_the_columns(cfg, dtype, monkeypatch):
    """An Inf in ``x`` would meet the zeros on the padding's rows of the product (0 * Inf = NaN
    where the plain sum has none): that image goes through its columns. Inf and NaN in ``x``
    and ``grad_y`` give the NaN and Inf of the columns path, element for element, and its
    values elsewhere."""
    x, w, b, gy = make_data(cfg, dtype, seed=9)
    x[1, 2, 3, 4] = np.inf
    x[2, 0, 0, 0] = -np.inf
    x[2, 1, 5, 2] = np.nan
    gy[3, 1, 2, 2] = np.inf
    implicit = nc.conv2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs)
    monkeypatch.setattr(im2col, "IMPLICIT_GRAD_W_MIN_TAPS", 10**9)
    assert not _applies(cfg, dtype)
    with np.errstate(invalid="ignore"):  # the fused bands add lane sums of Inf and -Inf
        columns = nc.conv2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs)
    for name, got, want in zip(("grad_x", "grad_w", "grad_b"), implicit, columns, strict=True):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), f"{name}: NaN [{cfg}]")
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), f"{name}: Inf [{cfg}]")
        finite = np.isfinite(want)
        assert finite.any() and (~finite).any()
        scale = np.abs(want[finite]).max()
        tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-11
        np.testing.assert_allclose(got[finite], want[finite], rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("cfg", [CASES[0], CASES[4]], ids=str)
def test_inf_in_the_filters_keeps_grad_x_on_the_columns(cfg, dtype, monkeypatch):
    """The forward pass of grad_y would multiply an infinite tap with the zero padding (NaN)
    where col2im never adds such a product: with Inf or NaN in ``w``, grad-x comes from the
    columns, the same bits as with the forward route turned off."""
    x, w, b, gy = make_data(cfg, dtype, seed=11)
    w[1, 0, 0, 0] = np.inf
    w[2, 1, 1, 2] = np.nan
    gy[0, 3, 1, 1] = np.inf
    got = nc.conv2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs)
    assert np.isnan(got[0]).any() and np.isfinite(got[0]).any()
    monkeypatch.setattr(im2col, "input_gradient_as_forward", lambda geom, itemsize: None)
    want = nc.conv2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs)
    for name, a, b_ in zip(("grad_x", "grad_w", "grad_b"), got, want, strict=True):
        assert_same_bits(a, b_, f"{name} [{cfg}]")


def test_flipped_filters_and_the_adjoint_geometry():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 2, 3, 4))  # 6 filters, 3 groups of 2 input channels
    flipped = im2col.flipped_filters(w, 3)
    assert flipped.shape == (6, 2, 3, 4) and flipped.flags.c_contiguous
    for g in range(3):
        for kk in range(2):
            for c in range(2):
                np.testing.assert_array_equal(flipped[2 * g + c, kk], w[2 * g + kk, c, ::-1, ::-1])
    # 'same' with a 2x3 filter at dilation 2: padding (1, 1, 2, 2) of extents 2 and 4.
    geom = make_geometry((2, 4, 9, 8), (5, 4, 2, 3), padding="same", dilation=2)
    adjoint = im2col.adjoint_geometry(geom)
    assert (adjoint.pad_top, adjoint.pad_bottom, adjoint.pad_left, adjoint.pad_right) == (
        2 - geom.pad_top, 2 - geom.pad_bottom, 4 - geom.pad_left, 4 - geom.pad_right,
    )  # fmt: skip
    assert adjoint.output_shape == geom.input_shape
    assert adjoint.input_shape == geom.output_shape
    assert im2col.adjoint_geometry(make_geometry((2, 4, 9, 8), (5, 4, 3, 3), stride=2)) is None
    # Padding beyond the filter's reach: the adjoint would need negative padding.
    assert im2col.adjoint_geometry(make_geometry((2, 4, 9, 8), (5, 4, 3, 3), padding=3)) is None


def test_the_plan_says_no_where_it_does_not_apply():
    def applies(x_shape, w_shape, itemsize=4, **options):
        geom = make_geometry(x_shape, w_shape, **options)
        return im2col.implicit_weight_gradient_applies(geom, itemsize)

    assert applies((16, 128, 17, 17), (128, 128, 1, 7), padding=(0, 3))  # Inception's 1x7
    assert applies((16, 128, 17, 17), (128, 128, 1, 7), 8, padding=(0, 3))
    assert not applies((32, 3, 32, 32), (32, 3, 5, 5), padding=2)  # 75 taps: too few
    assert not applies((2, 128, 17, 17), (128, 128, 1, 7), padding=(0, 3))  # blocked_backward
    assert not applies((16, 512, 7, 7), (512, 512, 3, 3), padding=1)  # no implicit GEMM
    assert not applies((16, 64, 56, 56), (64, 64, 1, 1))  # pointwise: the image is the columns
