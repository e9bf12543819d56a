"""Dilated stride-1 layers as undilated ones on polyphase sub-images
(``numbaconv.kernels.polyphase``), which is how the ``winograd`` kernel (and ``auto`` through it)
runs DeepLab's atrous layers. The decomposition alone, with NumPy's kernel on the sub-images, is
checked against the independent loops of ``tests/naive.py`` on small odd geometries; the
``winograd`` kernel on layers large enough to take it, against the same reference."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Cfg, assert_close, check_against_reference, make_data, reference, run_all
from hypothesis import given
from hypothesis import strategies as st

import numbaconv as nc
from numbaconv import functional
from numbaconv.geometry import make_geometry
from numbaconv.kernels import polyphase, winograd


@given(
    size=st.integers(1, 40),
    pad=st.integers(0, 14),
    pad_after=st.integers(0, 14),
    dilation=st.integers(1, 13),
    taps=st.integers(1, 5),
)
def test_phases_partition_the_outputs_and_read_their_own_inputs(
    size, pad, pad_after, dilation, taps
):
    out_size = size + pad + pad_after - dilation * (taps - 1)
    if out_size < 1:
        return
    axis = polyphase.axis_phases(size, pad, out_size, dilation, taps)
    covered = []
    for phi in range(dilation):
        for t in range(axis.outputs[phi]):
            o = axis.first[phi] + dilation * t
            covered.append(o)
            # Output o reads inputs o - pad + d*r: the phase's sub-image rows t - shift + r,
            # which sit at plane rows t + r (< plane), where the sub-image was copied.
            for r in range(taps):
                i = o - pad + dilation * r
                assert (i - phi) % dilation == 0
                row = t + r
                assert row < axis.plane
                inside = 0 <= i < size
                assert inside == (axis.shift[phi] <= row < axis.shift[phi] + axis.rows[phi]), (
                    "plane rows hold exactly the inputs an output reads, zeros elsewhere"
                )
                if inside:
                    assert (i - phi) // dilation == row - axis.shift[phi]
    assert sorted(covered) == list(range(out_size))
    assert axis.plane_outputs == max(axis.outputs)


SMALL = [
    Cfg(2, 3, 9, 7, 4, 3, 3, padding=1, dilation=2, name="3x3-d2"),
    Cfg(1, 2, 5, 5, 3, 3, 3, dilation=2, name="one-output"),
    Cfg(3, 4, 13, 11, 5, 3, 3, padding=(2, 3), dilation=(3, 2), name="d3x2"),
    Cfg(2, 2, 4, 4, 2, 3, 3, padding=3, dilation=3, name="padding-only-reads"),
    Cfg(1, 3, 10, 9, 2, 3, 3, padding="same", dilation=(2, 1), name="same"),
    Cfg(2, 2, 7, 8, 3, 2, 3, padding=(0, 5), dilation=(1, 4), name="2x3-d1x4"),
    Cfg(1, 2, 3, 3, 2, 3, 3, padding=12, dilation=12, name="atrous-12", bias=False),
    Cfg(2, 3, 8, 6, 4, 1, 2, padding=(1, 2), dilation=5, name="1x2"),
]


def _numpy_forward(x, w, b, geom):
    return nc.registry.implementation("numpy").forward(x, w, b, geom)


def _numpy_backward(grad_y, x, w, geom):
    return nc.registry.implementation("numpy").backward(grad_y, x, w, geom)


@pytest.mark.parametrize("cfg", SMALL, ids=str)
def test_decomposition_matches_the_reference(cfg, dtype):
    x, w, b, gy = make_data(cfg, dtype)
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    assert polyphase.applies(geom)
    phases = polyphase.plan(geom)
    ref = reference(cfg, dtype)
    y = polyphase.forward(x, w, b, phases, _numpy_forward)
    gx, gw, gb = polyphase.backward(gy, x, w, phases, _numpy_backward)
    assert_close(y, ref.y, ref.y_abs, dtype, f"forward {cfg}")
    assert_close(gx, ref.gx, ref.gx_abs, dtype, f"grad_x {cfg}")
    assert_close(gw, ref.gw, ref.gw_abs, dtype, f"grad_w {cfg}")
    assert_close(gb, ref.gb, ref.gb_abs, dtype, f"grad_b {cfg}")


#: Large enough that every phase's output is at least MIN_PHASE_OUTPUTS square: Winograd runs
#: on the sub-images.
TAKEN = [
    Cfg(2, 8, 20, 18, 8, 3, 3, padding=2, dilation=2, name="deeplab-like"),
    Cfg(1, 4, 26, 30, 6, 3, 3, padding=(3, 0), dilation=(3, 2), name="d3x2", bias=False),
    Cfg(2, 5, 17, 19, 3, 3, 3, padding="same", dilation=(2, 1), name="same-d2x1"),
]


@pytest.mark.parametrize("cfg", TAKEN, ids=str)
def test_winograd_runs_dilated_layers_on_phases(cfg, dtype, monkeypatch):
    geom = make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)
    phases = winograd._phases(geom)
    assert phases is not None and winograd.winograd_geometry(geom) == phases.sub
    assert min(phases.sub.out_height, phases.sub.out_width) >= winograd.MIN_PHASE_OUTPUTS
    planes = []
    to_planes = polyphase.to_planes
    monkeypatch.setattr(polyphase, "to_planes", lambda x, p: planes.append(p) or to_planes(x, p))
    check_against_reference(cfg, "winograd", dtype)
    assert len(planes) == 2, "the forward and the backward pass both went through the phases"


def test_small_phases_and_other_layers_stay_off_the_phases():
    make = make_geometry
    assert winograd._phases(make((4, 8, 33, 33), (8, 8, 3, 3), padding=12, dilation=12)) is None
    assert winograd._phases(make((2, 8, 20, 20), (8, 8, 3, 3), padding=1)) is None  # undilated
    strided = make((2, 8, 20, 20), (8, 8, 3, 3), padding=2, dilation=2, stride=2)
    assert winograd._phases(strided) is None
    grouped = make((2, 8, 20, 20), (8, 4, 3, 3), padding=2, dilation=2, groups=2)
    assert winograd._phases(grouped) is None
    assert winograd._phases(make((2, 8, 20, 20), (8, 8, 5, 5), padding=4, dilation=2)) is None


def test_auto_runs_deeplabs_rate_2_layer_on_winograd():
    choose = nc.registry.choose
    rate2 = make_geometry((4, 256, 28, 28), (256, 256, 3, 3), padding=2, dilation=2)
    rate12 = make_geometry((4, 256, 33, 33), (256, 256, 3, 3), padding=12, dilation=12)
    assert choose(rate2, np.float32, "forward") == "winograd"
    # Its 3x3 phases are too small for Winograd; most of its products would meet padding.
    assert choose(rate12, np.float32, "forward") == "taps"
    assert choose(rate12, np.float32, "backward") == "taps"


def test_non_finite_inputs_reach_only_the_outputs_that_read_them():
    """A NaN in x and an Inf in another image: Winograd on the phases falls back as on any layer,
    so the dilated layer's results are those of im2col's plain sums, NaN where a window reads
    the NaN and nowhere else."""
    cfg = TAKEN[0]
    x, w, b, gy = make_data(cfg, np.float64)
    x[0, 1, 6, 6] = np.nan
    x[1, 2, 3, 9] = np.inf
    got = run_all(cfg, x, w, b, gy, "winograd")
    plain = run_all(cfg, x, w, b, gy, "im2col")
    for a, e in zip(got, plain, strict=True):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e))
        np.testing.assert_array_equal(np.isinf(a), np.isinf(e))
        finite = np.isfinite(e)
        np.testing.assert_allclose(a[finite], e[finite], rtol=1e-10, atol=1e-10)


def test_conv2d_keeps_the_dilated_geometry_for_the_caller():
    """The phases are internal: conv2d's output has the dilated layer's shape."""
    cfg = TAKEN[0]
    x, w, b, _ = make_data(cfg, np.float32)
    y = functional.conv2d(x, w, b, kernel="winograd", **cfg.kwargs)
    assert y.shape == cfg.y_shape
