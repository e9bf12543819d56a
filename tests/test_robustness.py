"""Inputs untouched, any memory layout, empty batch, NaN/Inf propagation, dtype preservation."""

from __future__ import annotations

import importlib
import tracemalloc

import numpy as np
import pytest
from helpers import KERNELS, Cfg, assert_close, make_data, naive_reference, reference, run_all

import numbaconv as nc
from numbaconv import registry

CFG = Cfg(2, 4, 7, 6, 4, 3, 2, stride=(2, 1), padding=1, groups=2, name="robust")
CFG_SAME = Cfg(2, 2, 5, 6, 3, 2, 3, padding="same", dilation=(2, 1), name="robust-same")
# 3x3, stride 1, padding 1: the geometry fast 3x3 algorithms (Winograd tiles) take.
CFG_3X3 = Cfg(2, 3, 7, 6, 4, 3, 3, padding=1, name="robust-3x3")


def _check_all(cfg, got, ref, dtype, tag):
    y, gx, gw, gb = got
    assert_close(y, ref.y, ref.y_abs, dtype, f"forward {tag}")
    assert_close(gx, ref.gx, ref.gx_abs, dtype, f"grad_x {tag}")
    assert_close(gw, ref.gw, ref.gw_abs, dtype, f"grad_w {tag}")
    assert_close(gb, ref.gb, ref.gb_abs, dtype, f"grad_b {tag}")


@pytest.mark.parametrize("cfg", [CFG, CFG_SAME, CFG_3X3], ids=str)
def test_inputs_not_modified(kernel, dtype, cfg):
    x, w, b, gy = make_data(cfg, dtype)
    copies = [a.copy() for a in (x, w, b, gy)]
    got = run_all(cfg, x, w, b, gy, kernel)
    for a, c, name in zip((x, w, b, gy), copies, "x w b grad_y".split(), strict=True):
        np.testing.assert_array_equal(a, c, err_msg=f"{name} was modified")
    # Outputs are fresh arrays, not views of the inputs.
    for out in got:
        for a in (x, w, b, gy):
            assert not np.shares_memory(out, a)
    _check_all(cfg, got, reference(cfg, dtype), dtype, kernel)


def _layouts(a, how):
    """The same values as ``a`` in another memory layout."""
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "readonly":
        r = a.copy()
        r.setflags(write=False)
        return r
    if how == "strided":  # every other element of a twice-as-large buffer
        big = np.zeros(tuple(2 * s for s in a.shape), dtype=a.dtype)
        big[tuple(slice(None, None, 2) for _ in a.shape)] = a
        return big[tuple(slice(None, None, 2) for _ in a.shape)]
    if how == "reversed":  # negative strides
        r = np.ascontiguousarray(a[..., ::-1])
        return r[..., ::-1]
    if how == "transposed":  # C-contiguous in another axis order, viewed back
        axes = tuple(reversed(range(a.ndim)))
        return np.ascontiguousarray(a.transpose(axes)).transpose(axes)
    if how == "readonly-strided":
        r = _layouts(a, "strided")
        r.setflags(write=False)
        return r
    raise AssertionError(how)


LAYOUTS = ["fortran", "readonly", "strided", "reversed", "transposed", "readonly-strided"]


@pytest.mark.parametrize("how", LAYOUTS)
def test_any_memory_layout(kernel, dtype, how):
    x, w, b, gy = make_data(CFG, dtype)
    xs, ws, bs, gys = (_layouts(a, how) for a in (x, w, b, gy))
    if how != "readonly":
        assert not xs.flags.c_contiguous
    for a, a0 in zip((xs, ws, bs, gys), (x, w, b, gy), strict=True):
        np.testing.assert_array_equal(a, a0)
    got = run_all(CFG, xs, ws, bs, gys, kernel)
    _check_all(CFG, got, reference(CFG, dtype), dtype, f"{kernel} {how}")
    for a, a0 in zip((xs, ws, bs, gys), (x, w, b, gy), strict=True):
        np.testing.assert_array_equal(a, a0)


@pytest.mark.parametrize("cfg", [CFG, CFG_SAME], ids=str)
def test_batch_zero(kernel, dtype, cfg):
    x = np.zeros((0, cfg.c, cfg.h, cfg.w), dtype=dtype)
    _, w, b, _ = make_data(cfg, dtype)
    y = nc.conv2d(x, w, b, kernel=kernel, **cfg.kwargs)
    _, k, oh, ow = cfg.y_shape
    assert y.shape == (0, k, oh, ow) and y.dtype == dtype
    gy = np.zeros((0, k, oh, ow), dtype=dtype)
    gx, gw, gb = nc.conv2d_backward(gy, x, w, kernel=kernel, **cfg.kwargs)
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gw.shape == w.shape and gw.dtype == dtype
    assert gb.shape == (k,) and gb.dtype == dtype
    np.testing.assert_array_equal(gw, 0)
    np.testing.assert_array_equal(gb, 0)


def test_batch_zero_errors_still_raised():
    x = np.zeros((0, 3, 5, 5))
    with pytest.raises(ValueError, match=r"weight has 2 input channels per group"):
        nc.conv2d(x, np.zeros((2, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"unknown kernel"):
        nc.conv2d(x, np.zeros((2, 3, 3, 3)), kernel="nope")
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(0, 2, 3, 3\)"):
        nc.conv2d_backward(np.zeros((0, 2, 3, 4)), x, np.zeros((2, 3, 3, 3)))


# BLAS may raise the "invalid" flag on Inf inputs (e.g. in padded lanes it discards).
NONFINITE_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@NONFINITE_WARNINGS
@pytest.mark.parametrize("cfg", [CFG, CFG_SAME, CFG_3X3], ids=str)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_in_x(kernel, dtype, cfg, bad):
    """A NaN/Inf in x reaches exactly the outputs (and weight gradients) that read it."""
    x, w, b, gy = make_data(cfg, dtype, seed=1)
    x = x.copy()
    x[1, 1, 2, 3] = bad
    x[0, 0, 0, 0] = bad  # a corner: read through padding by few windows
    ref = naive_reference(cfg, x, w, b, gy)
    y, gx, gw, gb = run_all(cfg, x, w, b, gy, kernel)
    _check_nonfinite(y, ref.y, "forward")
    _check_nonfinite(gw, ref.gw, "grad_w")
    # Neither grad_x nor grad_b depends on x.
    assert np.isfinite(gx).all() and np.isfinite(gb).all()
    ref_clean = naive_reference(cfg, *make_data(cfg, dtype, seed=1))
    assert_close(gx, ref_clean.gx, ref_clean.gx_abs, dtype, "grad_x")
    assert_close(gb, ref_clean.gb, ref_clean.gb_abs, dtype, "grad_b")


GY_NAN_CFGS = [
    Cfg(2, 4, 7, 6, 4, 3, 2, stride=(2, 1), dilation=(1, 2), groups=2, name="gy-nan"),
    Cfg(2, 3, 8, 7, 4, 3, 3, name="gy-nan-3x3"),
]


@NONFINITE_WARNINGS
@pytest.mark.parametrize("cfg", GY_NAN_CFGS, ids=str)
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_nonfinite_in_grad_y(kernel, dtype, cfg, bad):
    """A NaN/Inf in grad_y reaches exactly the gradients that read it.

    padding=0, so that no weight gradient pairs the NaN with a padding zero (whether 0 * NaN
    is computed there or skipped is not specified).
    """
    x, w, b, gy = make_data(cfg, dtype, seed=2)
    gy = gy.copy()
    gy[1, 2, 1, 1] = bad
    ref = naive_reference(cfg, x, w, b, gy)
    gx, gw, gb = nc.conv2d_backward(gy, x, w, kernel=kernel, **cfg.kwargs)
    _check_nonfinite(gx, ref.gx, "grad_x")
    _check_nonfinite(gw, ref.gw, "grad_w")
    _check_nonfinite(gb, ref.gb, "grad_b")


def _check_nonfinite(got, ref, what):
    """Same NaN / +Inf / -Inf masks as the reference, and the reference's finite part."""
    assert got.shape == ref.shape, what
    for name, mask in [("nan", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)]:
        bad = mask(got) != mask(ref)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise AssertionError(
                f"{what}: {name} mask differs from the reference at {int(bad.sum())} places, "
                f"first {idx}: got {got[idx]!r}, expected {ref[idx]!r}"
            )
    finite = np.isfinite(ref)
    assert finite.any(), f"{what}: vacuous check, no finite outputs"
    assert (~finite).any(), f"{what}: vacuous check, nothing non-finite"
    tol = 1e-4 if got.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(got[finite], ref[finite], rtol=tol, atol=tol, err_msg=what)


def test_float32_stays_float32_for_every_output(kernel):
    x, w, b, gy = make_data(CFG, np.float32)
    for out in run_all(CFG, x, w, b, gy, kernel):
        assert out.dtype == np.float32


def test_results_are_writable_arrays(kernel):
    x, w, b, gy = make_data(CFG, np.float64)
    y, gx, gw, gb = run_all(CFG, x, w, b, gy, kernel)
    for out in (y, gx, gw, gb):
        assert isinstance(out, np.ndarray) and out.flags.writeable
    y[...] = 0  # must not raise, must not affect a second call
    y2 = nc.conv2d(x, w, b, kernel=kernel, **CFG.kwargs)
    assert np.abs(y2).max() > 0


# -------------------------------------------------------------------------------------------
# The im2col kernel works in batch chunks: correct for any chunking, bounded workspace
# -------------------------------------------------------------------------------------------


def _workspace_modules():
    """Kernel modules with a ``WORKSPACE_BYTES`` batch-chunking budget."""
    mods = []
    for name in KERNELS:
        impl = registry.implementation(name)
        mod = importlib.import_module(impl.__module__) if not hasattr(impl, "__file__") else impl
        if hasattr(mod, "WORKSPACE_BYTES"):
            mods.append(mod)
    return mods


@pytest.mark.parametrize("budget_images", [1, 2, 3], ids=lambda b: f"{b}-images-per-chunk")
@pytest.mark.parametrize("cfg", [CFG, CFG_3X3], ids=str)
def test_batch_chunks(monkeypatch, kernel, dtype, cfg, budget_images):
    """Kernels that split the batch into chunks are right for any chunk size (5 images)."""
    cfg = Cfg(5, cfg.c, cfg.h, cfg.w, cfg.k, cfg.r, cfg.s, **cfg.kwargs)
    _, _, oh, ow = cfg.y_shape
    # About budget_images images' worth of columns (or of a transformed input) per chunk.
    per_image = cfg.c * max(cfg.r * cfg.s, 16) * oh * ow * np.dtype(dtype).itemsize
    assert _workspace_modules(), "expected at least the im2col kernel to chunk its batch"
    for mod in _workspace_modules():
        monkeypatch.setattr(mod, "WORKSPACE_BYTES", budget_images * per_image)
    x, w, b, gy = make_data(cfg, dtype, seed=8)
    got = run_all(cfg, x, w, b, gy, kernel)
    _check_all(cfg, got, reference(cfg, dtype, 8), dtype, f"{kernel} chunks")


@pytest.mark.parametrize("name", [k for k in KERNELS if k not in ("numpy", "auto")])
def test_workspace_stays_bounded_as_the_batch_grows(monkeypatch, name):
    """Peak NumPy memory of forward+backward is about the outputs, not the full im2col matrix.

    Every kernel but the teaching baseline ('numpy', a full im2col by design) and 'auto'
    (which may pick it).
    """
    budget = 256 * 1024
    for mod in _workspace_modules():
        monkeypatch.setattr(mod, "WORKSPACE_BYTES", budget)
    cfg = Cfg(64, 8, 16, 16, 8, 3, 3, padding=1, name="big-batch")
    x, w, b, gy = make_data(cfg, np.float64)
    full_cols = cfg.c * 9 * 16 * 16 * 64 * 8  # 9.4 MB: what an unchunked im2col would take
    out_bytes = x.nbytes  # y and grad_x are each this large
    run_all(cfg, x, w, b, gy, name)  # compile outside the measurement
    tracemalloc.start()
    try:
        nc.conv2d(x, w, b, kernel=name, **cfg.kwargs)
        _, peak_fwd = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        nc.conv2d_backward(gy, x, w, kernel=name, **cfg.kwargs)
        _, peak_bwd = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    limit = out_bytes + 2 * budget + 256 * 1024
    assert peak_fwd < limit < full_cols, (peak_fwd, limit)
    assert peak_bwd < limit < full_cols, (peak_bwd, limit)


def test_broadcast_and_numpy_integer_arguments(kernel, dtype):
    """Zero-stride (broadcast) inputs and NumPy integer hyper-parameters."""
    cfg = Cfg(3, 2, 6, 5, 3, 3, 2, stride=(2, 1), padding=(1, 0), name="broadcast")
    x, w, b, gy = make_data(cfg, dtype, seed=12)
    xb = np.broadcast_to(x[:1], x.shape)  # read-only, stride 0 along the batch
    gyb = np.broadcast_to(gy[:, :, :1, :], gy.shape)
    kw = dict(stride=(np.int64(2), np.int32(1)), padding=(np.int64(1), 0), dilation=np.int8(1))
    y = nc.conv2d(xb, w, b, kernel=kernel, **kw)
    gx, gw, gb = nc.conv2d_backward(gyb, xb, w, kernel=kernel, **kw)
    ref = naive_reference(cfg, np.array(xb), w, b, np.array(gyb))
    _check_all(cfg, (y, gx, gw, gb), ref, dtype, "broadcast")
