"""The parallel paths: every kernel, dtype and pass against the loop reference on layers whose
Numba regions are asserted to have split their work over several threads and lanes.

Calls under ``SERIAL_FLOPS`` run on one thread, and nearly every layer of the rest of the suite
is that small, so these tests turn the shortcut off (``force_parallel``) and check with
``thread_probe`` (``threadprobe.py``) that the work really was split. The layers are chosen for
what the banded passes plan on them: ``auto`` picking each concrete kernel, bands and image
groups that lane boundaries cut through, odd sizes; ``test_plans_split_the_batch`` asserts the
plans, so each layer says why it splits.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
from helpers import (
    Cfg,
    assert_close,
    assert_same_bits,
    check_against_reference,
    make_data,
    reference,
    run_all,
)
from test_conv_grid import GRID
from threadprobe import KERNEL_MODULES, LANE_ARGUMENTS, parallel_kernels

import numbaconv as nc
from numbaconv import _threading
from numbaconv.geometry import make_geometry
from numbaconv.kernels import im2col, winograd

SEED = 31

LAYERS = [
    # auto picks winograd: 16 input and output channels, and 1x32 tiles of 4x4 per image give its
    # GEMMs 32 tiles, at least WINOGRAD_MIN_TILES (a cheap such layer: the loop reference costs
    # about a second per million multiply-adds). Partial tiles both ways (2 of 4 rows, 1 of 4
    # columns at the right edge); 2.3 MFLOP, above SERIAL_FLOPS even without forcing.
    Cfg(2, 16, 2, 125, 16, 3, 3, padding=1, name="auto-winograd"),
    # auto picks im2col (one filter). Its 144 taps x 30 columns make bands of 60 rows in float32,
    # 30 in float64, so 61 rows are 2 or 3 bands, the last of one row; lanes cut images in two.
    Cfg(3, 16, 61, 30, 1, 3, 3, padding=1, name="bands-split-images"),
    # 17 images of 4 Winograd tiles: Winograd's forward pass groups 4 images per job for wider
    # GEMMs (5 jobs, the last with one image); its grad-w runs 8 lanes of 2 or 3 images in
    # groups of 3; im2col's backward runs 8 lanes of 2 or 3 images.
    Cfg(17, 2, 6, 7, 3, 3, 3, padding=1, name="17-images"),
    # Odd sizes, strides, dilation, asymmetric padding: im2col's general path (not Winograd's).
    Cfg(5, 3, 11, 9, 4, 3, 3, stride=2, padding=(2, 1), dilation=(1, 2), name="odd-strided"),
    Cfg(4, 6, 9, 7, 6, 3, 2, stride=(1, 2), padding=1, groups=3, name="grouped"),
    # Pointwise: the banded passes read each image as its own columns matrix.
    Cfg(6, 8, 7, 5, 4, 1, 1, name="pointwise"),
    # Winograd with padding 2 (its grad-x then has padding 0), odd output, no bias.
    Cfg(3, 4, 10, 13, 5, 3, 3, padding=2, bias=False, name="winograd-pad2-no-bias"),
    # One image: Winograd's grad-w cuts its 5 tile rows into 3 bands of 2, 2 and 1 (3 lanes).
    Cfg(1, 16, 18, 30, 16, 3, 3, padding=1, name="winograd-batch1"),
    # Depthwise (auto picks direct): a channel multiplier of 2 and strides 1 and 2, whose rows
    # direct reads with constant-stride vector loops; then stride 3, dilation and a 5x3 filter,
    # its generic loops.
    Cfg(3, 6, 9, 11, 12, 3, 3, stride=(1, 2), padding=1, groups=6, name="depthwise-multiplier"),
    Cfg(2, 4, 13, 14, 4, 5, 3, stride=3, padding=2, dilation=(2, 1), groups=4, name="dw-stride3"),
    # Stride 1: direct's plane kernels (dilated, padding up to the filter's reach).
    Cfg(3, 4, 11, 9, 8, 3, 3, padding=(2, 1), dilation=(2, 1), groups=4, name="dw-planes"),
    # auto picks taps: 32 channels, 14x14 outputs, dilation 6 (half the products would meet
    # padding); two images, fewer than taps.MIN_JOBS, so its jobs are also blocks of filters
    # (channels for grad-x).
    Cfg(2, 32, 14, 14, 32, 3, 3, padding=6, dilation=6, name="auto-taps"),
]
BY_NAME = {cfg.name: cfg for cfg in LAYERS}

# One image of 72 filters: Winograd's forward pass cuts them into blocks of 40 and 32, then its 3
# tile rows into bands of 2 and 1 (4 jobs); partial tiles at the bottom and right. (Not among
# LAYERS: with 8 channels, auto and im2col run its forward pass on one lane.)
FILTER_BLOCKS = Cfg(1, 8, 10, 13, 72, 3, 3, padding=1, name="winograd-filter-blocks")
# Five images of 5x9 (2 x 3 tiles), 72 filters: Winograd's deep plan when forced.
DEEP = Cfg(5, 8, 5, 9, 72, 3, 3, padding=1, name="winograd-deep")


def geometry(cfg: Cfg):
    return nc.geometry.make_geometry(cfg.x_shape, cfg.w_shape, **cfg.kwargs)


def layer_data(cfg: Cfg, dtype):
    """``(x, w, b, grad_y)`` in ``dtype`` holding float32 values, so that the one float64 loop
    reference of the float32 data (:func:`layer_reference`) is exact for both dtypes: the
    reference of these layers is the slow part."""
    return tuple(None if a is None else a.astype(dtype) for a in make_data(cfg, np.float32, SEED))


def layer_reference(cfg: Cfg):
    return reference(cfg, np.float32, SEED)


def check_layer(cfg: Cfg, kernel, dtype):
    x, w, b, gy = layer_data(cfg, dtype)
    ref = layer_reference(cfg)
    y, gx, gw, gb = run_all(cfg, x, w, b, gy, kernel)
    tag = f"[{kernel}, {np.dtype(dtype).name}, {cfg}]"
    assert_close(y, ref.y, ref.y_abs, dtype, f"forward {tag}")
    assert_close(gx, ref.gx, ref.gx_abs, dtype, f"grad_x {tag}")
    assert_close(gw, ref.gw, ref.gw_abs, dtype, f"grad_w {tag}")
    assert_close(gb, ref.gb, ref.gb_abs, dtype, f"grad_b {tag}")


# -------------------------------------------------------------------------------------------
# The means: the serial shortcut can be turned off, and the probe tells serial from parallel
# -------------------------------------------------------------------------------------------


def test_serial_shortcut_is_read_at_each_call(monkeypatch, restore_num_threads, thread_probe):
    """``force_parallel`` works by setting ``SERIAL_FLOPS``: that only works if ``kernel_guard``
    reads it at each call, from every Python thread, and the probe must see the difference."""
    cfg = Cfg(2, 2, 5, 5, 2, 3, 3, name="tiny")  # a few kflop: far under the threshold
    x, w, b, _ = make_data(cfg, np.float64)
    numba.set_num_threads(2)
    nc.conv2d(x, w, b, kernel="direct")
    assert [r.threads for r in thread_probe.regions] == [1]

    monkeypatch.setattr(_threading, "SERIAL_FLOPS", 0)
    thread_probe.clear()
    nc.conv2d(x, w, b, kernel="direct")
    thread_probe.assert_every_region_parallel("main thread, shortcut off")

    def other_thread():
        numba.set_num_threads(2)  # per Python thread
        nc.conv2d(x, w, b, kernel="direct")

    thread_probe.clear()
    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    thread_probe.assert_every_region_parallel("another Python thread, shortcut off")


def test_probe_knows_every_banded_kernel():
    """Each kernel named in ``LANE_ARGUMENTS`` exists and takes that per-lane argument, so the
    probe records the lanes of every banded pass (a rename would otherwise hide them)."""
    kernels = {}
    for module in KERNEL_MODULES:
        kernels.update(parallel_kernels(module))
    for name, argument in LANE_ARGUMENTS.items():
        assert name in kernels, f"{name} is no longer a parallel kernel: update threadprobe.py"
        params = kernels[name].py_func.__code__.co_varnames
        assert argument in params, f"{name} has no argument {argument!r}: update threadprobe.py"
    fused = {name for name in kernels if name.startswith("fused_")}
    assert fused <= set(LANE_ARGUMENTS), f"banded kernels the probe does not know: {fused}"


# -------------------------------------------------------------------------------------------
# The layers: what the planners and auto do on them
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype_", [np.float32, np.float64], ids=["float32", "float64"])
def test_auto_picks_each_concrete_kernel_among_the_layers(dtype_, direction):
    chosen = {cfg.name: nc.registry.choose(geometry(cfg), dtype_, direction) for cfg in LAYERS}
    assert chosen["auto-winograd"] == "winograd"
    assert chosen["bands-split-images"] == "im2col"
    assert chosen["depthwise-multiplier"] == chosen["dw-stride3"] == chosen["dw-planes"] == "direct"
    assert chosen["auto-taps"] == "taps"
    # auto never picks numpy (README): these four are what it can run.
    assert set(chosen.values()) == {"winograd", "im2col", "direct", "taps"}
    # And the winograd layer is in parallel by itself, not only when forced.
    assert geometry(BY_NAME["auto-winograd"]).flops >= _threading.SERIAL_FLOPS


def _runs(jobs: int, lanes: int) -> list[range]:
    """The jobs each lane takes: contiguous runs, as the banded kernels split them."""
    return [range(jobs * lane // lanes, jobs * (lane + 1) // lanes) for lane in range(lanes)]


@pytest.mark.parametrize("dtype_", [np.float32, np.float64], ids=["float32", "float64"])
def test_plans_split_the_batch(
    dtype_, force_parallel, thread_probe, restore_num_threads
):  # fmt: skip
    """The plans of the banded passes on the split layers (2 threads), and the lanes the passes
    then really ran."""
    itemsize = np.dtype(dtype_).itemsize
    threads = 2
    numba.set_num_threads(threads)

    # im2col forward: several bands per image, and the boundary between the two lanes' runs of
    # (image, band) jobs falls inside an image.
    cfg = BY_NAME["bands-split-images"]
    geom = geometry(cfg)
    band_rows = im2col._band_rows(geom, itemsize, im2col.PLAN_LANES, 0)
    bands = -(-geom.out_height // band_rows)
    assert (band_rows, bands) == ((60, 2) if itemsize == 4 else (30, 3))
    runs = _runs(cfg.n * bands, min(threads, cfg.n * bands))
    assert len(runs) == 2 and runs[1].start % bands != 0, "a lane boundary inside an image"
    # im2col backward: 3 images for SMALL_BATCH_LANES = 4 lanes, so bands of at most
    # ceil(61 / 2) = 31 rows (2 or 3 per image), shared by the lanes in 2 phases (a band of
    # 30 or 31 rows reaches 2 rows further than its own, into the next band but not beyond).
    assert im2col.SMALL_BATCH_LANES == 4
    assert im2col._backward_lanes(geom, itemsize) == 4
    backward_rows = min(band_rows, 31)
    assert im2col._band_phases(geom, backward_rows) == 2
    # That is the fused pass's plan for batches the blocked pass does not take; by default the
    # blocked pass takes these 3 images of 16 channels (grad-w, then grad-x, in blocks of 4
    # channels).
    assert im2col.blocked_fits(geom, itemsize)
    thread_probe.clear()
    run_all(cfg, *layer_data(cfg, dtype_), "im2col")
    assert [(r.name, r.lanes) for r in thread_probe.regions] == [
        ("im2col.fused_forward_kernel", 2),
        ("im2col.blocked_weight_gradient_kernel", None),
        ("im2col.blocked_input_gradient_kernel", None),
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(im2col, "BLOCKED_MIN_CHANNELS", cfg.c + 1)
        thread_probe.clear()
        check_layer(cfg, "im2col", dtype_)
        lanes = [(r.name, r.lanes) for r in thread_probe.regions]
    assert lanes == [("im2col.fused_forward_kernel", 2)] + [("im2col.fused_backward_kernel", 4)] * 2

    # im2col forward on 6x7 maps: 42 columns per image, so images go side by side, 4 per GEMM
    # (17 // 4: enough jobs left), in 5 jobs, the last one image.
    cfg = BY_NAME["17-images"]
    geom = geometry(cfg)
    assert im2col.forward_plan(geom, itemsize) == (6, 4)
    thread_probe.clear()
    nc.conv2d(*layer_data(cfg, dtype_)[:3], kernel="im2col", **cfg.kwargs)
    assert [(r.name, r.lanes) for r in thread_probe.regions] == [("im2col.fused_forward_kernel", 2)]

    # Winograd forward (and grad-x, the same pass on grad_y): 4 tiles an image, so images are
    # grouped for wider GEMMs (MIN_GEMM_TILES) while 4 jobs remain: 17 images in groups of 4
    # (the byte budget alone gave 2), so 5 jobs; the two lanes take 2 and 3 of them, the last
    # job one image.
    tiles_h = winograd._tiles(geom)[0]
    assert winograd._image_group(geom, itemsize, im2col.PLAN_LANES, tiles_h) == 2
    assert winograd._forward_plan(geom, itemsize) == (tiles_h, 4, cfg.k)
    assert [len(r) for r in _runs(5, threads)] == [2, 3] and cfg.n % 4 == 1
    # Winograd grad-w: whole images in groups of 3 (planned for 8 lanes), so 6 jobs, the last a
    # group of 2, one per lane.
    assert winograd.weight_gradient_plan(geom, itemsize) == (6, tiles_h, 3)
    assert winograd._image_group(geom, itemsize, 8, tiles_h) == 3
    thread_probe.clear()
    run_all(cfg, *layer_data(cfg, dtype_), "winograd")
    lanes = [(r.name, r.lanes) for r in thread_probe.regions]
    lanes = [(name, lanes) for name, lanes in lanes if "filter_" not in name]
    assert lanes == [
        ("winograd.fused_winograd_kernel", 2),  # forward
        ("winograd.fused_weight_gradient_kernel", 6),
        ("winograd.fused_winograd_kernel", 2),  # grad-x
    ]


def test_winograd_weight_gradient_sums_may_take_the_whole_workspace_bound():
    """Two lanes of 256 x 256 filters' sums (36 x 256 x 256 float32 values, 9.4 MB each) fit
    in WEIGHT_GRADIENT_SUMS_BYTES, so Winograd computes that layer's grad-w; in float64 one
    lane would not leave room for a second, and im2col computes it (lanes 0)."""
    geom = make_geometry((16, 256, 14, 14), (256, 256, 3, 3), padding=1)
    lanes, band_tiles, group = winograd.weight_gradient_plan(geom, 4)
    assert lanes == 2 and lanes * 36 * 256 * 256 * 4 <= winograd.WEIGHT_GRADIENT_SUMS_BYTES
    assert winograd.weight_gradient_plan(geom, 8) == (0, 0, 0)


def test_batch_of_one_splits_winograd_weight_gradient(force_parallel, thread_probe):
    cfg = BY_NAME["winograd-batch1"]
    assert winograd.weight_gradient_plan(geometry(cfg), 4) == (3, 2, 1)
    thread_probe.clear()
    run_all(cfg, *layer_data(cfg, np.float32), "winograd")
    lanes = {r.name: r.lanes for r in thread_probe.regions}
    assert lanes["winograd.fused_weight_gradient_kernel"] == 3


# -------------------------------------------------------------------------------------------
# Every kernel x dtype x pass against the reference, in parallel
# -------------------------------------------------------------------------------------------


def _winograd_forward_in_lanes(cfg: Cfg, dtype, threads: int, lanes: int, thread_probe):
    """``(x, w, b, ref, y)``: Winograd's forward pass of ``cfg`` on ``threads`` threads, asserted
    to run ``lanes`` lanes, right against the reference and the same bits on 1 thread. Leaves
    ``threads`` threads set."""
    x, w, b, _ = layer_data(cfg, dtype)
    ref = layer_reference(cfg)
    numba.set_num_threads(threads)
    thread_probe.clear()
    y = nc.conv2d(x, w, b, kernel="winograd", **cfg.kwargs)
    assert [(r.name, r.lanes) for r in thread_probe.regions if "filter_" not in r.name] == [
        ("winograd.fused_winograd_kernel", lanes)
    ]
    assert_close(y, ref.y, ref.y_abs, dtype, f"forward [{cfg}]")
    numba.set_num_threads(1)
    one = nc.conv2d(x, w, b, kernel="winograd", **cfg.kwargs)
    assert_same_bits(one, y, f"[{cfg}] 1 vs {threads} threads")
    numba.set_num_threads(threads)
    return x, w, b, ref, y


def test_winograd_forward_cuts_a_small_batchs_filters_into_blocks(
    dtype, force_parallel, thread_probe, restore_num_threads
):
    """One image gives Winograd's forward pass one (image, band) job: its filters are cut into
    blocks (MIN_FILTER_BLOCK, whole tiles of 8), then its bands only as far as MIN_JOBS jobs
    still ask. Right against the reference, two lanes, the same bits on 1 and 2 threads, and a
    NaN in one filter of the last block still sends the call to the plain path."""
    cfg = FILTER_BLOCKS
    geom = geometry(cfg)
    itemsize = np.dtype(dtype).itemsize
    assert winograd._tiles(geom)[0] == 3
    assert winograd._forward_plan(geom, itemsize) == (2, 1, 40)
    # auto's backward rule reads the tiles of the plan without blocks, whose bands are single
    # tile rows (3 jobs, still fewer than MIN_JOBS): 4 tiles.
    assert winograd.tiles_per_gemm(geom, itemsize) == 4
    x, w, b, ref, _ = _winograd_forward_in_lanes(cfg, dtype, 2, 2, thread_probe)
    w_nan = w.copy()
    w_nan[70, 3, 1, 1] = np.nan
    y = nc.conv2d(x, w_nan, b, kernel="winograd", **cfg.kwargs)
    plain = nc.conv2d(x, w_nan, b, kernel="im2col", **cfg.kwargs)
    assert np.isnan(y[:, 70]).all() and not np.isnan(np.delete(y, 70, axis=1)).any()
    assert_close(np.delete(y, 70, axis=1), np.delete(ref.y, 70, axis=1),
                 np.delete(ref.y_abs, 70, axis=1), dtype, "the other filters")  # fmt: skip
    assert_same_bits(y, plain, "NaN filter: the plain path's result")


def test_winograd_deep_plan_groups_images_and_blocks_filters(
    dtype, force_parallel, thread_probe, restore_num_threads, monkeypatch
):
    """Winograd's deep plan (here for a small layer, DEEP_FILTER_BYTES set to 0): whole images
    in groups of 3, at most half the batch (5 images: groups of 3 and 2), filters in blocks of
    40 and 32 for 4 jobs; the lanes capped at WORKSPACE_BYTES // their workspace (3 of 4
    threads). Right against the reference, the same bits on 1 and 4 threads."""
    cfg = DEEP
    geom = geometry(cfg)
    itemsize = np.dtype(dtype).itemsize
    monkeypatch.setattr(winograd, "DEEP_FILTER_BYTES", 0)
    per_image = winograd._deep_lane_bytes(geom, itemsize, 1)
    monkeypatch.setattr(winograd, "WORKSPACE_BYTES", 3 * 3 * per_image)
    assert winograd._tiles(geom) == (2, 3)
    assert winograd._forward_plan(geom, itemsize) == (2, 3, 40)
    _winograd_forward_in_lanes(cfg, dtype, 4, 3, thread_probe)


@pytest.mark.parametrize("cfg", LAYERS, ids=str)
def test_parallel_matches_reference(kernel, dtype, cfg, force_parallel, thread_probe):
    check_layer(cfg, kernel, dtype)
    if kernel == "numpy":  # plain NumPy: no Numba region to split (its BLAS has its own threads)
        assert not thread_probe.regions
        return
    thread_probe.assert_every_region_parallel(f"{kernel} {cfg}")
    passes = [call for call in thread_probe.calls if call.regions]
    assert len(passes) == 2, f"forward and backward each run parallel regions: {passes}"


def test_auto_winograd_layer_is_parallel_without_forcing(dtype, thread_probe):
    """The auto-winograd layer runs Winograd's banded passes in parallel by itself, as users get
    it: no threshold forced."""
    cfg = BY_NAME["auto-winograd"]
    check_layer(cfg, "auto", dtype)
    thread_probe.assert_every_region_parallel(f"auto {cfg}")
    assert [r.name for r in thread_probe.regions] == [
        "winograd.filter_transform_kernel",  # forward
        "winograd.fused_winograd_kernel",
        "winograd.fused_weight_gradient_kernel",  # grad-w
        "winograd.filter_gradient_kernel",
        "winograd.filter_transform_kernel",  # grad-x
        "winograd.fused_winograd_kernel",
    ]


@pytest.mark.parametrize("cfg", GRID, ids=str)
def test_grid_in_parallel(kernel, dtype, cfg, force_parallel, thread_probe):
    """The grid's geometries (strides, dilations, groups, partial tiles) on the parallel paths.
    Some have one image, one filter or one output row, so not every region gets two lanes; every
    one gets all the threads (the width the kernels plan their lanes with)."""
    check_against_reference(cfg, kernel, dtype)
    assert all(call.threads >= 2 for call in thread_probe.calls), thread_probe.calls
    assert all(region.threads >= 2 for region in thread_probe.regions), thread_probe.regions
