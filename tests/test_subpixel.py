"""The sub-pixel form of strided transposed convolutions (numbaconv.kernels.subpixel), which
``auto`` runs: against the scatter-loop reference on geometries where it applies, forward and
backward with the route forced on in both directions; which geometries take it; NaN/Inf and
bitwise agreement across thread counts."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from helpers import assert_close
from naive_family import conv_transpose2d_grads_naive, conv_transpose2d_naive

import numbaconv as nc
from numbaconv import functional as F
from numbaconv import registry
from numbaconv.geometry import make_transposed_geometry
from numbaconv.kernels import microkernel as mk
from numbaconv.kernels import subpixel

# (n, c_in, h, w, c_out, r, s, stride, padding, output_padding): filter sizes multiples of the
# strides; paddings that drop whole phases at the edges, and more than the filter reaches.
CASES = [
    (2, 3, 4, 4, 2, 4, 4, (2, 2), (1, 1), (0, 0)),  # DCGAN's geometry
    (2, 4, 3, 4, 3, 2, 2, (2, 2), (0, 0), (1, 1)),  # U-Net's, with output_padding
    (1, 2, 3, 5, 3, 4, 6, (2, 3), (1, 2), (1, 2)),  # different strides and taps per axis
    (2, 3, 1, 6, 2, 1, 4, (1, 2), (0, 1), (0, 1)),  # one row: conv_transpose1d's case
    (1, 2, 4, 3, 2, 6, 3, (3, 1), (4, 2), (2, 0)),  # padding past the sub-filters' reach
    (1, 3, 2, 2, 4, 3, 3, (3, 3), (0, 0), (2, 2)),  # taps 1, output_padding: uncovered pixels
    (2, 4, 5, 6, 3, 2, 2, (2, 2), (1, 1), (0, 0)),  # taps 1, padding dropping edge phases
    (2, 3, 3, 7, 2, 1, 2, (1, 2), (0, 1), (0, 1)),  # taps 1, odd column padding at stride 2
]

# One tap per phase (filter size = stride) on batches that subpixel.one_tap_backward takes:
# stride 2 with and without padding (the paired even/odd columns of unshuffle_planes and their
# edges), another column stride, and more stacked filters than a block of the micro-kernel's K.
ONE_TAP_CASES = [
    (9, 8, 5, 6, 12, 2, 2, (2, 2), (0, 0), (1, 1)),  # 9 images on 8 lanes: one lane adds two
    (9, 8, 5, 6, 12, 2, 2, (2, 2), (1, 1), (0, 0)),
    (4, 5, 3, 7, 6, 1, 2, (1, 2), (0, 3), (0, 1)),
    (4, 6, 3, 5, 40, 2, 3, (2, 3), (1, 2), (1, 0)),  # 240 stacked filters
]


def data(case, dtype, seed=0):
    n, c_in, h, w, c_out, r, s, stride, padding, output_padding = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    wt = rng.standard_normal((c_in, c_out, r, s)).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype)
    options = dict(stride=stride, padding=padding, output_padding=output_padding)
    out = make_transposed_geometry(x.shape, wt.shape, **options).input_shape
    gy = rng.standard_normal(out).astype(dtype)
    return x, wt, b, gy, options


# Batches that give the forward pass phase by phase several images a job
# (subpixel.implicit_group), the last job short of images: images interleaved pixel by pixel
# (more than one column tap) or side by side (one column tap), padding cropping columns.
GROUP_CASES = [
    (11, 5, 5, 7, 6, 4, 4, (2, 2), (1, 2), (1, 0)),  # interleaved, 2 a job
    (17, 3, 4, 5, 4, 4, 2, (2, 2), (1, 1), (0, 1)),  # side by side, 4 a job
    (9, 4, 3, 6, 5, 2, 6, (2, 3), (0, 2), (1, 0)),  # interleaved, 3 column taps, 2 a job
]


@pytest.fixture(params=["stacked", "phases"])
def subpixel_both_ways(request, monkeypatch):
    """The sub-pixel route wherever it applies, both ways, whatever the sizes and dtype; its
    forward pass as the stacked convolution and shuffle, or phase by phase
    (``subpixel.implicit_forward``), whatever the sizes."""
    monkeypatch.setattr(
        registry, "transposed_via_subpixel", lambda geom, *_: subpixel.applies(geom)
    )
    phases = request.param == "phases"
    monkeypatch.setattr(subpixel, "implicit_applies", lambda *_: phases)


@pytest.mark.usefixtures("subpixel_both_ways")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_the_reference(case, dtype):
    x, w, b, gy, options = data(case, dtype)
    geom = make_transposed_geometry(x.shape, w.shape, **options)
    assert subpixel.applies(geom)
    got = (
        nc.conv_transpose2d(x, w, b, kernel="auto", **options),
        *nc.conv_transpose2d_backward(gy, x, w, kernel="auto", **options),
    )
    want = (
        conv_transpose2d_naive(x, w, b, **options),
        *conv_transpose2d_grads_naive(gy, x, w, **options),
    )
    scale = (
        conv_transpose2d_naive(np.abs(x), np.abs(w), np.abs(b), **options),
        *conv_transpose2d_grads_naive(np.abs(gy), np.abs(x), np.abs(w), **options),
    )
    for name, g, v, m in zip(("y", "grad_x", "grad_w", "grad_b"), got, want, scale, strict=True):
        assert g.shape == v.shape and g.dtype == dtype, name
        assert_close(g, v, m, dtype, f"{name} {case}")


def test_which_geometries_take_it():
    """The measured rule (registry.SUBPIXEL_*), on the zoo's layers and its edges."""

    def route(x_shape, c_out, r, dtype=np.float32, **options):
        w_shape = (x_shape[1], c_out // options.get("groups", 1), r, r)
        geom = make_transposed_geometry(x_shape, w_shape, **options)
        return (
            registry.transposed_via_subpixel(geom, dtype, "forward"),
            registry.transposed_via_subpixel(geom, dtype, "backward"),
        )

    dcgan, unet = (16, 256, 8, 8), (16, 128, 28, 28)
    assert route(dcgan, 128, 4, stride=2, padding=1) == (True, False)  # 2x2 taps per phase
    # One tap (a 1x1 convolution): forward phase by phase only (subpixel.implicit_applies).
    assert route(unet, 64, 2, stride=2) == (True, True)
    assert route(unet, 64, 2, np.float64, stride=2) == (True, True)
    # A phase's product rows (64x64 outputs, 32 KB in float64) past the micro-kernel's bounds.
    assert route((16, 128, 64, 64), 32, 2, np.float64, stride=2) == (False, True)
    assert route((16, 128, 64, 64), 32, 2, np.float32, stride=2) == (True, True)
    assert route(dcgan, 128, 4, np.float64, stride=2, padding=1) == (True, False)
    assert route((16, 512, 4, 4), 256, 4, stride=2, padding=1) == (False, False)  # kept 0.64
    assert route((16, 64, 32, 32), 3, 4, stride=2, padding=1) == (False, False)  # 3 channels
    assert route(dcgan, 128, 3, stride=2, padding=1) == (False, False)  # 3 % 2
    assert route(dcgan, 128, 3) == (False, False)  # stride 1
    assert route(dcgan, 128, 4, stride=2, dilation=2) == (False, False)
    assert route(dcgan, 128, 4, stride=2, groups=2) == (False, False)
    plan = subpixel.plan(make_transposed_geometry(dcgan, (256, 128, 4, 4), stride=2), dcgan)
    sub_geom = F._subpixel_geometry(plan)
    assert registry.subpixel_forward_kernel(sub_geom, np.float32) == "taps"  # 64 of 81 kept


@pytest.mark.parametrize("case", CASES, ids=str)
def test_stacked_weights_round_trip(case):
    x, w, _, _, options = data(case, np.float64)
    plan = subpixel.plan(make_transposed_geometry(x.shape, w.shape, **options), x.shape)
    stacked = subpixel.stacked_weights(w, plan)
    assert stacked.shape == (plan.stacked, w.shape[0], plan.taps_h, plan.taps_w)
    np.testing.assert_array_equal(subpixel.weights_from_stacked(stacked, plan), w)
    # packed: each phase's filters as microkernel.pack_rows lays them out
    packed = subpixel.stacked_weights(w, plan, packed=True).reshape(plan.stacked, -1)
    c_out = plan.geom.in_channels
    for p in range(plan.stacked // c_out):
        expected = np.empty((c_out, packed.shape[1]))
        mk.pack_rows(stacked.reshape(plan.stacked, -1)[p * c_out : (p + 1) * c_out], expected)
        np.testing.assert_array_equal(packed[p * c_out : (p + 1) * c_out], expected)
    # shuffle and unshuffle are adjoint: <shuffle(z), g> == <z, unshuffle(g)>
    rng = np.random.default_rng(1)
    z = rng.standard_normal((x.shape[0], plan.stacked, plan.out_h, plan.out_w))
    g = rng.standard_normal(plan.geom.input_shape)
    lhs = float(np.sum(subpixel.shuffle(z, plan) * g))
    assert lhs == pytest.approx(float(np.sum(z * subpixel.unshuffle(g, plan))), rel=1e-12)


@pytest.mark.usefixtures("subpixel_both_ways")
def test_nan_and_inf_reach_what_the_scatter_reaches(dtype):
    x, w, _, gy, options = data(CASES[0], dtype, 2)
    x[0, 1, 1, 2] = np.nan
    x[1, 0, 3, 3] = np.inf
    with np.errstate(invalid="ignore"):
        want = conv_transpose2d_naive(x, w, None, **options)
        got = nc.conv_transpose2d(x, w, kernel="auto", **options)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert np.isnan(got).any() and not np.isnan(got).all()


@pytest.mark.parametrize("products", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("case", ONE_TAP_CASES, ids=str)
def test_one_tap_backward_against_the_reference(case, products, dtype, monkeypatch):
    """The one-tap backward pass image by image (``subpixel.one_tap_backward``) with each of its
    products on the micro-kernel or on BLAS."""
    monkeypatch.setattr(
        registry, "transposed_via_subpixel", lambda geom, *_: subpixel.applies(geom)
    )
    monkeypatch.setattr(subpixel, "one_tap_products", lambda *_: products)
    x, w, _, gy, options = data(case, dtype, 3)
    plan = subpixel.plan(make_transposed_geometry(x.shape, w.shape, **options), x.shape)
    assert subpixel.one_tap_backward_applies(plan, x.itemsize)
    got = nc.conv_transpose2d_backward(gy, x, w, kernel="auto", **options)
    want = conv_transpose2d_grads_naive(gy, x, w, **options)
    scale = conv_transpose2d_grads_naive(np.abs(gy), np.abs(x), np.abs(w), **options)
    for name, g, v, m in zip(("grad_x", "grad_w", "grad_b"), got, want, scale, strict=True):
        assert g.shape == v.shape and g.dtype == dtype, name
        assert_close(g, v, m, dtype, f"{name} {case} {products}")


def test_one_tap_backward_where():
    """Batches of at least ONE_TAP_MIN_BATCH, stacked gradients within ONE_TAP_MAX_BYTES."""

    def applies(x_shape, c_out, r, itemsize=4, **options):
        geom = make_transposed_geometry(x_shape, (x_shape[1], c_out, r, r), **options)
        return subpixel.one_tap_backward_applies(subpixel.plan(geom, x_shape), itemsize)

    assert applies((16, 128, 28, 28), 64, 2, stride=2)  # U-Net: 0.8 MB an image
    assert applies((16, 128, 28, 28), 64, 2, 8, stride=2)  # 1.6 MB
    assert not applies((2, 128, 28, 28), 64, 2, stride=2)  # 2 images
    assert not applies((16, 128, 56, 56), 64, 2, stride=2)  # 3.2 MB
    assert not applies((16, 256, 8, 8), 128, 4, stride=2, padding=1)  # 4 taps


@pytest.mark.usefixtures("subpixel_both_ways", "force_parallel", "restore_num_threads")
@pytest.mark.parametrize(
    "case",
    [(3, 8, 6, 5, 6, 4, 4, (2, 2), (1, 1), (1, 0)), GROUP_CASES[0], ONE_TAP_CASES[1]],
    ids=["4x4", "4x4, images interleaved", "one tap"],
)
def test_same_bits_on_any_thread_count(case):
    x, w, b, gy, options = data(case, np.float32, 4)
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        results.append(
            (
                nc.conv_transpose2d(x, w, b, kernel="auto", **options),
                *nc.conv_transpose2d_backward(gy, x, w, kernel="auto", **options),
            )
        )
    for one, many in zip(*results, strict=True):
        np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize("options", [dict(padding=1), dict(padding=(2, 1), output_padding=1)])
def test_phase_by_phase_where_auto_runs_it(options, dtype):
    """A layer big enough that ``auto`` runs the forward pass phase by phase on its own
    (``subpixel.implicit_applies``: 48 filters a phase, 2 images side by side), against the
    reference; with padding that drops rows and columns of the phases at the edges."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 64, 8, 7)).astype(dtype)
    w = rng.standard_normal((64, 48, 4, 4)).astype(dtype)
    b = rng.standard_normal(48).astype(dtype)
    geom = make_transposed_geometry(x.shape, w.shape, stride=2, **options)
    plan = subpixel.plan(geom, x.shape)
    assert registry.transposed_via_subpixel(geom, dtype)
    assert subpixel.implicit_applies(plan, x.itemsize) and subpixel.implicit_group(plan, 4) == 2
    got = nc.conv_transpose2d(x, w, b, stride=2, kernel="auto", **options)
    want = conv_transpose2d_naive(x, w, b, stride=2, **options)
    scale = conv_transpose2d_naive(np.abs(x), np.abs(w), np.abs(b), stride=2, **options)
    assert_close(got, want, scale, dtype, "phase by phase")
    got = nc.conv_transpose2d(x, w, stride=2, kernel="auto", **options)
    want = conv_transpose2d_naive(x, w, None, stride=2, **options)
    assert_close(got, want, scale, dtype, "phase by phase, no bias")


@pytest.mark.parametrize("case", GROUP_CASES, ids=str)
def test_phase_by_phase_with_images_grouped(case, dtype, monkeypatch):
    monkeypatch.setattr(
        registry, "transposed_via_subpixel", lambda geom, *_: subpixel.applies(geom)
    )
    monkeypatch.setattr(subpixel, "implicit_applies", lambda *_: True)
    x, w, b, _, options = data(case, dtype, 5)
    plan = subpixel.plan(make_transposed_geometry(x.shape, w.shape, **options), x.shape)
    group = subpixel.implicit_group(plan, x.itemsize)
    assert group > 1 and x.shape[0] % group != 0
    got = nc.conv_transpose2d(x, w, b, kernel="auto", **options)
    want = conv_transpose2d_naive(x, w, b, **options)
    scale = conv_transpose2d_naive(np.abs(x), np.abs(w), np.abs(b), **options)
    assert got.shape == want.shape and got.dtype == dtype
    assert_close(got, want, scale, dtype, f"y {case}")
