"""The two ways the GEMM kernels call BLAS, each checked against the loop reference.

- Inside the kernels' parallel regions (the default where SciPy's OpenBLAS can be held to one
  thread): banded passes, one band of output rows at a time, several lanes.
- Outside them (``NUMBACONV_BLAS_INSIDE_KERNELS=0``, or another BLAS): batch chunks, NumPy GEMMs.

The band and lane boundaries are the new places for off-by-one errors, so the banded path also
runs with one-row bands and with more images than backward lanes, with the serial shortcut off
(these layers are far under ``SERIAL_FLOPS``): the jobs are split between lanes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numba
import numpy as np
import pytest
import scipy
from helpers import Cfg, assert_same_bits, check_against_reference, make_data, run_all
from test_conv_grid import GRID
from test_parallel import BY_NAME

import numbaconv as nc
from numbaconv import _threading
from numbaconv.kernels import im2col, winograd

GEMM_KERNELS = ["im2col", "winograd"]
AUTO_WINOGRAD = BY_NAME["auto-winograd"]

# Winograd-covered configs (3x3, stride 1) with odd output sizes and more images than lanes.
EXTRA = [
    Cfg(11, 3, 7, 9, 4, 3, 3, padding=1, name="11-images-odd-3x3"),
    Cfg(9, 2, 5, 6, 3, 3, 3, padding=2, name="9-images-pad2"),
    Cfg(3, 4, 9, 5, 5, 3, 3, padding=(0, 1), name="3-images-pad(0,1)"),
    # Pointwise layers use the image itself as the columns matrix.
    Cfg(10, 4, 5, 6, 6, 1, 1, groups=2, name="pointwise-groups2"),
    Cfg(3, 5, 4, 3, 2, 1, 1, bias=False, name="pointwise-no-bias"),
    Cfg(3, 5, 4, 3, 2, 1, 1, padding=1, name="1x1-padded-is-not-pointwise"),
]

SCIPY = f"SciPy {scipy.__version__} ({Path(scipy.__file__).parent})"


def bundled_openblas_files() -> list[str]:
    """The OpenBLAS files that SciPy's PyPI wheels put beside it: ``libscipy_openblas*`` from
    SciPy 1.14, ``libopenblas*`` in 1.10 to 1.13. None where SciPy was built otherwise (from
    source, conda's MKL builds): numbaconv cannot hold such a BLAS to one thread."""
    root = Path(scipy.__file__).parent
    folders = [root.parent / "scipy.libs", root / ".dylibs"]
    files = [path.name for folder in folders if folder.is_dir() for path in folder.iterdir()]
    return sorted(name for name in files if "openblas" in name)


requires_inside = pytest.mark.skipif(
    _threading._scipy_openblas is None,
    reason=f"{SCIPY} bundles no OpenBLAS that numbaconv can hold to one thread, so the GEMM "
    "kernels have no banded path here (test_default_path_calls_blas_inside_kernels pins that)",
)


@pytest.fixture
def blas_calls(monkeypatch):
    """Counts how often a kernel entered :func:`single_threaded_blas` (the inside path)."""
    calls = []
    real = _threading.single_threaded_blas

    @contextlib.contextmanager
    def counting():
        calls.append(1)
        with real():
            yield

    for module in (im2col, winograd):
        monkeypatch.setattr(module, "single_threaded_blas", counting)
    return calls


@requires_inside
@pytest.mark.parametrize("band", ["one-row-bands", "default-bands"])
@pytest.mark.parametrize("cfg", GRID + EXTRA, ids=str)
@pytest.mark.parametrize("name", GEMM_KERNELS)
def test_blas_inside_kernels(
    monkeypatch, blas_calls, force_parallel, thread_probe, name, dtype, cfg, band
):  # fmt: skip
    monkeypatch.delenv("NUMBACONV_BLAS_INSIDE_KERNELS", raising=False)
    if band == "one-row-bands":
        monkeypatch.setattr(im2col, "BAND_BYTES", 1)
        monkeypatch.setattr(winograd, "BAND_BYTES", 1)
    check_against_reference(cfg, name, dtype, seed=21)
    assert blas_calls, "the banded path was not taken"
    assert all(r.threads >= 2 for r in thread_probe.regions), thread_probe.regions
    if band == "one-row-bands" and cfg.y_shape[0] * cfg.y_shape[2] >= 2:
        # One job per output row: with 2 rows or more in the batch, the forward pass splits
        # them between lanes (and, on most layers, an image between two lanes).
        forward = [r for r in thread_probe.regions if r.name == "im2col.fused_forward_kernel"]
        assert all(r.lanes >= 2 for r in forward), forward


# Enough channels that the forward plan (bands, image groups) has room to vary.
THREAD_CFGS = [
    Cfg(2, 64, 4, 4, 64, 3, 3, padding=1, name="64-channels-4x4"),
    Cfg(16, 32, 8, 8, 32, 3, 3, padding=1, name="16-images-32-channels"),
    Cfg(5, 8, 23, 17, 6, 3, 3, padding=1, name="5-images-odd"),
    Cfg(6, 16, 9, 7, 8, 1, 1, name="pointwise"),
    # Winograd's forward pass cuts one image's 72 filters into blocks of 40 and 32.
    Cfg(1, 8, 10, 13, 72, 3, 3, padding=1, name="1-image-72-filters"),
]


@requires_inside
@pytest.mark.parametrize("cfg", THREAD_CFGS, ids=str)
@pytest.mark.parametrize("name", GEMM_KERNELS)
def test_banded_bits_do_not_depend_on_the_thread_count(
    monkeypatch, restore_num_threads, name, dtype, cfg
):
    """1 and 2 threads run 1 and 2 lanes (the serial shortcut for small calls is off here), and
    the results must be the same bits: the bands and image groups, which set each GEMM's width
    and so BLAS's rounding, must not depend on the thread count."""
    monkeypatch.setattr(_threading, "SERIAL_FLOPS", 0)
    x, w, b, gy = make_data(cfg, dtype, seed=25)
    numba.set_num_threads(1)
    one = run_all(cfg, x, w, b, gy, name)
    numba.set_num_threads(2)
    two = run_all(cfg, x, w, b, gy, name)
    for what, a, c in zip(("y", "grad_x", "grad_w", "grad_b"), one, two, strict=True):
        assert_same_bits(a, c, f"{what} [{name}, {cfg}], 1 vs 2 threads")


@requires_inside
def test_winograd_float32_accuracy_with_many_channels():
    """F(4x4, 3x3) rounds about 10x more than F(2x2, 3x3); with 64 channels, float32 results
    stay within the suite's tolerance (1e-4 of the |x|.|w| scale) in every output."""
    cfg = Cfg(2, 64, 10, 10, 8, 3, 3, padding=1, name="64-channels")
    check_against_reference(cfg, "winograd", np.float32, seed=24)


@pytest.mark.parametrize("cfg", GRID + EXTRA, ids=str)
@pytest.mark.parametrize("name", GEMM_KERNELS)
def test_blas_outside_kernels(monkeypatch, blas_calls, force_parallel, name, dtype, cfg):
    monkeypatch.setenv("NUMBACONV_BLAS_INSIDE_KERNELS", "0")
    check_against_reference(cfg, name, dtype, seed=22)
    assert not blas_calls, "NUMBACONV_BLAS_INSIDE_KERNELS=0 still called BLAS inside a kernel"


@requires_inside
def test_backward_lanes_fall_back_when_their_sums_do_not_fit(monkeypatch, blas_calls):
    """Lane sums over budget: the backward pass takes the chunked path, with the same results."""
    cfg = Cfg(4, 3, 6, 5, 4, 3, 3, padding=1, name="tiny-budget")
    geom = nc.geometry.make_geometry(cfg.x_shape, cfg.w_shape, padding=1)
    monkeypatch.setattr(im2col, "WORKSPACE_BYTES", 64)
    assert im2col._backward_lanes(geom, 8) == 0
    check_against_reference(cfg, "im2col", np.float64, seed=23)


@requires_inside
def test_backward_lanes_take_the_whole_budget_before_falling_back(monkeypatch, thread_probe):
    """Where half of WORKSPACE_BYTES holds one lane's sum and all of it two, two lanes run (the
    chunked path would take as much), with the reference's results."""
    cfg = Cfg(4, 3, 6, 5, 4, 3, 3, padding=1, name="two-lanes-in-the-whole-budget")
    geom = nc.geometry.make_geometry(cfg.x_shape, cfg.w_shape, padding=1)
    per_lane = 4 * 27 * 8  # K x C*R*S float64 values
    monkeypatch.setattr(im2col, "WORKSPACE_BYTES", 2 * per_lane + 8)
    assert im2col.lanes_that_fit(4, per_lane) == 0
    assert im2col._backward_lanes(geom, 8) == 2
    thread_probe.clear()
    check_against_reference(cfg, "im2col", np.float64, seed=24)
    assert "im2col.fused_backward_kernel" in thread_probe.region_names()


@requires_inside
def test_backward_bands_are_widened_to_the_minimum_pixels(monkeypatch, dtype):
    """Bands that BAND_BYTES makes one row deep are widened to MIN_BACKWARD_BAND_PIXELS (here
    3 rows of 9), as far as WORKSPACE_BYTES allows, with the reference's results."""
    cfg = Cfg(3, 5, 11, 9, 6, 3, 3, padding=2, dilation=2, name="widened-bands")
    geom = nc.geometry.make_geometry(cfg.x_shape, cfg.w_shape, padding=2, dilation=2)
    itemsize = np.dtype(dtype).itemsize
    monkeypatch.setattr(im2col, "BAND_BYTES", 45 * 9 * itemsize)  # one row of columns
    monkeypatch.setattr(im2col, "MIN_BACKWARD_BAND_PIXELS", 27)
    lanes = im2col._backward_lanes(geom, itemsize)
    sums = 6 * 45 * itemsize
    assert im2col._band_rows(geom, itemsize, lanes, sums) == 1
    assert im2col._backward_band_rows(geom, itemsize, lanes) == 3
    check_against_reference(cfg, "im2col", dtype, seed=25)
    # Room for two rows only: the workspace bound wins.
    per_row = (45 + 6) * 9 * itemsize
    monkeypatch.setattr(im2col, "WORKSPACE_BYTES", lanes * (sums + 2 * per_row))
    assert im2col._backward_band_rows(geom, itemsize, lanes) == 2
    check_against_reference(cfg, "im2col", dtype, seed=25)


@pytest.mark.skipif(
    os.environ.get("NUMBACONV_BLAS_INSIDE_KERNELS") == "0",
    reason="NUMBACONV_BLAS_INSIDE_KERNELS=0 chooses the fallback path explicitly",
)
def test_default_path_calls_blas_inside_kernels(thread_probe, blas_calls):
    """Where SciPy's wheel bundles its OpenBLAS (every PyPI wheel of the SciPy releases numbaconv
    supports, so every CI environment), the default path is the banded one. Fails, instead of
    letting the requires_inside tests skip and the rest run the fallback with CI green, if that
    library stops being found. Where SciPy bundles none, the documented fallback: the chunked
    path, and ``numbaconv info`` says why."""
    bundled = bundled_openblas_files()
    inside = _threading.blas_inside_kernels()
    mode = _threading.blas_mode()
    if bundled:
        assert inside, f"{SCIPY} bundles {bundled}, yet the GEMM kernels fell back: {mode}"
    else:
        assert not inside and mode.startswith("NumPy's, between kernels (the slower path: ")
        assert "bundles no OpenBLAS" in mode, mode
    # One layer on which auto picks each of the two GEMM families.
    for cfg, family in [(BY_NAME["bands-split-images"], "im2col"), (AUTO_WINOGRAD, "winograd")]:
        x, w, b, gy = make_data(cfg, np.float32)
        thread_probe.clear()
        blas_calls.clear()
        run_all(cfg, x, w, b, gy, None)  # the default kernel
        # Winograd's filter transforms (no GEMM) serve both paths.
        transforms = ("winograd.filter_transform_kernel", "winograd.filter_gradient_kernel")
        names = thread_probe.region_names() - set(transforms)
        gemm_regions = [r for r in thread_probe.regions if r.name not in transforms]
        if inside:
            # Only the banded passes (fused_*; im2col's blocked backward for small batches),
            # none of the chunked path's kernels.
            own = (f"{family}.fused_", f"{family}.blocked_")
            assert names and all(n.startswith(own) for n in names), names
            assert len(blas_calls) == len(gemm_regions)  # each one held BLAS to one thread
        else:
            assert not any(n.startswith((f"{family}.fused_", "im2col.blocked_")) for n in names)
            assert not blas_calls


def test_lanes_that_fit_round_down_to_a_power_of_two(monkeypatch):
    monkeypatch.setattr(im2col, "WORKSPACE_BYTES", 2 * 1000)  # half of it: 1000 bytes for lanes
    fit = im2col.lanes_that_fit
    assert fit(16, 100) == 8  # 10 fit: capped at BACKWARD_LANES
    assert fit(5, 100) == 5  # the batch caps it
    assert fit(16, 300) == 2  # 3 fit: 2, so that 2 or 4 threads share them evenly
    assert fit(16, 600) == 0  # 1 fits: the chunked path
    assert fit(1, 600) == 1  # a single image needs one lane only
    assert fit(16, 2000) == 0


def test_auto_winograd_rule_on_the_measured_layers():
    """``auto``'s Winograd rule on the layers its constants were measured on (registry): wide
    layers on small maps group images for GEMMs of 64 tiles and run Winograd; 512 x 512 filters
    (9.4 million transformed values) only for the backward pass on small maps; few tiles per
    GEMM keep only the backward pass on im2col."""
    make = nc.geometry.make_geometry
    choose = nc.registry.choose
    resnet = make((16, 64, 56, 56), (64, 64, 3, 3), padding=1)
    wide_small = make((16, 256, 14, 14), (256, 256, 3, 3), padding=1)
    deep = make((16, 512, 7, 7), (512, 512, 3, 3), padding=1)
    batch1 = make((1, 128, 28, 28), (128, 128, 3, 3), padding=1)
    assert winograd.tiles_per_gemm(resnet, 4) >= nc.registry.WINOGRAD_MIN_TILES
    assert winograd.tiles_per_gemm(wide_small, 4) == winograd.MIN_GEMM_TILES  # 4 images of 16
    assert winograd.tiles_per_gemm(wide_small, 8) < nc.registry.WINOGRAD_MIN_TILES
    assert winograd.tiles_per_gemm(batch1, 4) < nc.registry.WINOGRAD_MIN_TILES
    assert 36 * 512 * 512 > nc.registry.WINOGRAD_MAX_FILTER_VALUES >= 36 * 256 * 256
    for direction in ("forward", "backward"):
        assert choose(resnet, np.float32, direction) == "winograd"
        assert choose(wide_small, np.float32, direction) == "winograd"
    # 512 x 512 filters: the forward pass on Winograd's deep plan on maps of at most
    # im2col.MIN_GEMM_COLUMNS pixels; the backward pass on Winograd on maps under that with at
    # least WINOGRAD_SMALL_MAP_MIN_TILES tiles.
    assert winograd._forward_plan(deep, 4) == winograd._forward_plan(deep, 8) == (2, 8, 256)
    assert choose(deep, np.float32, "forward") == choose(deep, np.float64, "forward") == "winograd"
    for dtype in (np.float32, np.float64):
        assert choose(deep, dtype, "backward") == "winograd"
    assert winograd.tiles_per_gemm(deep, 4) == nc.registry.WINOGRAD_SMALL_MAP_MIN_TILES
    assert choose(make((8, 512, 7, 7), (512, 512, 3, 3), padding=1), np.float32, "backward") == (
        "im2col"
    )  # 8 tiles
    bigger = make((32, 512, 7, 7), (512, 512, 3, 3), padding=1)
    assert choose(bigger, np.float32, "backward") == "winograd"  # 32 tiles
    assert choose(bigger, np.float64, "backward") == "im2col"  # 4 tiles
    wide_deep = make((16, 512, 14, 14), (512, 512, 3, 3), padding=1)
    assert choose(wide_deep, np.float32, "backward") == "im2col"  # 196 pixels
    assert winograd._forward_plan(wide_deep, 4) == (4, 4, 512)
    assert choose(wide_deep, np.float32, "forward") == "winograd"
    wider_deep = make((16, 512, 15, 15), (512, 512, 3, 3), padding=1)
    assert choose(wider_deep, np.float32, "forward") == "im2col"  # 225 pixels
    widest = make((16, 1024, 7, 7), (1024, 1024, 3, 3), padding=1)
    assert winograd.tiles_per_gemm(widest, 4) == nc.registry.WINOGRAD_SMALL_MAP_MIN_TILES
    assert 36 * 1024 * 1024 > nc.registry.WINOGRAD_SMALL_MAP_MAX_FILTER_VALUES
    assert choose(widest, np.float32, "backward") == "im2col"  # 151 MB of transformed filters
    assert choose(widest, np.float32, "forward") == "im2col"
    assert choose(wide_small, np.float64, "forward") == "winograd"
    assert choose(wide_small, np.float64, "backward") == "im2col"
    assert choose(batch1, np.float32, "forward") == "winograd"
    assert choose(batch1, np.float32, "backward") == "im2col"
    # Two images of the same layer: GEMMs of 28 tiles in both dtypes, which Winograd's backward
    # pass won (registry.WINOGRAD_MIN_TILES), and in float64 16 images too.
    two = make((2, 128, 28, 28), (128, 128, 3, 3), padding=1)
    batch16 = make((16, 128, 28, 28), (128, 128, 3, 3), padding=1)
    for dtype in (np.float32, np.float64):
        assert winograd.tiles_per_gemm(two, np.dtype(dtype).itemsize) == 28
        assert choose(two, dtype, "backward") == "winograd"
    assert winograd.tiles_per_gemm(batch16, 8) == 28
    assert choose(batch16, np.float64, "backward") == "winograd"


@requires_inside
def test_backward_lanes_depend_on_the_geometry_only(restore_num_threads):
    geom = nc.geometry.make_geometry((20, 3, 8, 8), (4, 3, 3, 3), padding=1)
    numba.set_num_threads(1)
    one = im2col._backward_lanes(geom, 4)
    numba.set_num_threads(2)
    assert im2col._backward_lanes(geom, 4) == one == im2col.BACKWARD_LANES


@requires_inside
def test_blas_thread_count_is_held_at_one_and_restored():
    get, set_ = _threading._scipy_openblas.get, _threading._scipy_openblas.set
    before = get()
    try:
        set_(2)
        with _threading.single_threaded_blas():
            assert get() == 1
            with _threading.single_threaded_blas():  # nested and concurrent users share a count
                assert get() == 1
            assert get() == 1
        assert get() == 2
        x = np.ones((2, 3, 8, 8), np.float32)
        nc.conv2d(x, np.ones((4, 3, 3, 3), np.float32), kernel="im2col")
        assert get() == 2
    finally:
        set_(before)


@requires_inside
def test_blas_thread_count_restored_after_concurrent_calls():
    """Python threads calling numbaconv at once: the last one out restores the setting."""
    get, set_ = _threading._scipy_openblas.get, _threading._scipy_openblas.set
    before = get()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 4, 12, 12))
    w = rng.standard_normal((6, 4, 3, 3))
    expected = nc.conv2d(x, w, padding=1, kernel="winograd")
    results, barrier = [], threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(5):
            results.append(nc.conv2d(x, w, padding=1, kernel="winograd"))

    try:
        set_(2)
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert get() == 2
    finally:
        set_(before)
    assert len(results) == 20
    for y in results:
        np.testing.assert_array_equal(y, expected)
