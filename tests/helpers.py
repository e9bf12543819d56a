"""Shared helpers: convolution configs, seeded data, cached references, tolerant comparisons."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numba
import numpy as np
from naive import (
    conv2d_grads_naive,
    conv2d_grads_windows,
    conv2d_naive,
    conv2d_windows,
    out_shape,
    padding4,
)

import numbaconv as nc

KERNELS = tuple(nc.KERNELS)
DTYPES = (np.float32, np.float64)

# Elementwise tolerance, relative to the convolution of the magnitudes (|x| * |w| + |b|): that is
# the natural scale of the rounding error of a sum, so the check stays tight even where the
# result itself cancels to nearly zero. float32 accumulation over a few hundred terms stays well
# inside 1e-4; float64 inside 1e-10.
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
ATOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-13}


@dataclass(frozen=True)
class Cfg:
    """One convolution problem: shapes plus the keyword arguments of ``nc.conv2d``."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    bias: bool = True
    name: str = field(default="", compare=False)

    @property
    def kwargs(self):
        return dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups
        )

    @property
    def pad4(self):
        return padding4(
            self.padding,
            (self.r, self.s),
            _pair(self.stride),
            _pair(self.dilation),
        )

    @property
    def x_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def w_shape(self):
        return (self.k, self.c // self.groups, self.r, self.s)

    @property
    def y_shape(self):
        return out_shape(self.x_shape, self.w_shape, self.stride, self.pad4, self.dilation)

    def __str__(self):
        return self.name or (
            f"N{self.n}C{self.c}H{self.h}W{self.w}K{self.k}R{self.r}S{self.s}"
            f"-st{self.stride}-pad{self.padding}-dil{self.dilation}-g{self.groups}"
            f"{'' if self.bias else '-nobias'}"
        )


def _pair(v):
    return tuple(v) if isinstance(v, tuple | list) else (v, v)


def make_data(cfg: Cfg, dtype, seed=0):
    """``(x, w, b, grad_y)`` in ``dtype`` (b is None when ``cfg.bias`` is False)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(cfg.x_shape).astype(dtype)
    w = rng.standard_normal(cfg.w_shape).astype(dtype)
    b = rng.standard_normal(cfg.k).astype(dtype) if cfg.bias else None
    gy = rng.standard_normal(cfg.y_shape).astype(dtype)
    return x, w, b, gy


@dataclass
class Reference:
    y: np.ndarray
    gx: np.ndarray
    gw: np.ndarray
    gb: np.ndarray
    # The same quantities computed from |x|, |w|, |b|, |grad_y|: the scale of rounding errors.
    y_abs: np.ndarray
    gx_abs: np.ndarray
    gw_abs: np.ndarray
    gb_abs: np.ndarray


def naive_reference(cfg: Cfg, x, w, b, gy) -> Reference:
    kw = dict(stride=cfg.stride, padding4=cfg.pad4, dilation=cfg.dilation, groups=cfg.groups)
    y = conv2d_naive(x, w, b, **kw)
    gx, gw, gb = conv2d_grads_naive(gy, x, w, **kw)
    absb = None if b is None else np.abs(b)
    y_abs = conv2d_naive(np.abs(x), np.abs(w), absb, **kw)
    gx_abs, gw_abs, gb_abs = conv2d_grads_naive(np.abs(gy), np.abs(x), np.abs(w), **kw)
    return Reference(y, gx, gw, gb, y_abs, gx_abs, gw_abs, gb_abs)


def windows_reference(cfg: Cfg, x, w, b, gy) -> Reference:
    """:func:`naive_reference` by sliding windows and einsum (``naive.conv2d_windows``,
    ``naive.conv2d_grads_windows``): for layers where the loops take minutes.
    ``tests/test_reference.py`` checks it against the loops."""
    args = (cfg.stride, cfg.pad4, cfg.dilation, cfg.groups)
    y, y_abs = conv2d_windows(x, w, b, *args)
    (gx, gw, gb), (gx_abs, gw_abs, gb_abs) = conv2d_grads_windows(gy, x, w, *args)
    return Reference(y, gx, gw, gb, y_abs, gx_abs, gw_abs, gb_abs)


@functools.cache
def reference(cfg: Cfg, dtype, seed=0) -> Reference:
    """Reference results (float64) for the data ``make_data(cfg, dtype, seed)``, cached."""
    return naive_reference(cfg, *make_data(cfg, dtype, seed))


def assert_close(got, ref, ref_abs, dtype, what=""):
    """``got`` has ``ref``'s shape, the dtype ``dtype`` and agrees with ``ref`` elementwise."""
    dtype = np.dtype(dtype)
    assert isinstance(got, np.ndarray), f"{what}: expected an ndarray, got {type(got)}"
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    if ref.size == 0:
        return
    got64 = got.astype(np.float64)
    scale = max(float(np.max(ref_abs)), 1.0)
    tol = RTOL[dtype] * ref_abs + ATOL[dtype] * scale
    err = np.abs(got64 - ref)
    bad = ~(err <= tol)  # also catches NaN
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {ref.size} elements differ; first at {idx}: "
            f"got {got64[idx]!r}, expected {ref[idx]!r} (tol {tol[idx]:.3g}); "
            f"max abs err {np.nanmax(err) if np.isfinite(err).any() else err.max()!r}"
        )


def assert_like_plain_sum(got, want, dtype, what=""):
    """``got`` agrees with the float64 loop result ``want`` where that is finite, and has its NaN
    and Inf exactly where ``want`` has them (inputs holding NaN or Inf)."""
    finite = np.isfinite(want)
    assert_close(got[finite], want[finite], np.abs(want[finite]), dtype, what)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), f"{what}: NaN")
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want), f"{what}: Inf")


def assert_same_bits(a, b, what=""):
    """Bitwise equality (dtype, shape and every byte; NaNs compare by their bits)."""
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    ua = a.view(f"u{a.dtype.itemsize}")
    ub = b.view(f"u{b.dtype.itemsize}")
    diff = np.argwhere(ua != ub)
    if len(diff):
        idx = tuple(int(i) for i in diff[0])
        raise AssertionError(
            f"{what}: results are not bitwise identical; {len(diff)} elements differ, "
            f"first at {idx}: {a[idx]!r} vs {b[idx]!r}"
        )


def run_all(cfg: Cfg, x, w, b, gy, kernel):
    """``(y, grad_x, grad_w, grad_b)`` from numbaconv."""
    y = nc.conv2d(x, w, b, kernel=kernel, **cfg.kwargs)
    gx, gw, gb = nc.conv2d_backward(gy, x, w, kernel=kernel, **cfg.kwargs)
    return y, gx, gw, gb


def assert_same_bits_on_1_and_2_threads(cfg: Cfg, data, kernel, what=""):
    """``run_all`` on one Numba thread, then on two: every result bit for bit the same. The
    caller turns the serial shortcut off and restores the thread count."""
    numba.set_num_threads(1)
    one = run_all(cfg, *data, kernel)
    numba.set_num_threads(2)
    two = run_all(cfg, *data, kernel)
    for name, a, b in zip(("y", "grad_x", "grad_w", "grad_b"), one, two, strict=True):
        assert_same_bits(a, b, f"{name} [{cfg}{what}], 1 vs 2 threads")


def check_against_reference(cfg: Cfg, kernel, dtype, seed=0, ref=None):
    x, w, b, gy = make_data(cfg, dtype, seed)
    if ref is None:
        ref = reference(cfg, dtype, seed)
    y, gx, gw, gb = run_all(cfg, x, w, b, gy, kernel)
    tag = f"[{kernel}, {np.dtype(dtype).name}, {cfg}]"
    assert_close(y, ref.y, ref.y_abs, dtype, f"forward {tag}")
    assert_close(gx, ref.gx, ref.gx_abs, dtype, f"grad_x {tag}")
    assert_close(gw, ref.gw, ref.gw_abs, dtype, f"grad_w {tag}")
    assert_close(gb, ref.gb, ref.gb_abs, dtype, f"grad_b {tag}")


#: microkernel's gates: float32 and float64 products, products with a transposed operand.
GEMM_GATES = (
    "OWN_GEMM_ON_THIS_TARGET",
    "OWN_GEMM_FLOAT64_ON_THIS_TARGET",
    "OWN_TRANSPOSED_GEMM_ON_THIS_TARGET",
)


#: Targets other than the host's (``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``, the vector bits
#: numbaconv's intrinsics take for them): AVX2 and a 128-bit CPU, whose instructions any
#: AVX-512 or AVX2 host runs.
OTHER_CPUS = [
    ("haswell", "+64bit,+avx,+avx2,+fma,+sse4.2,+popcnt,+cx16,+f16c", 256),
    ("generic", "", 128),
]


def run_for_cpu(script: str, cpu: str, features: str, cache_dir, timeout: int = 900) -> dict:
    """Run ``script`` in a new process that compiles for ``cpu`` (with ``features``, or the
    CPU's own) into the fresh Numba cache ``cache_dir``; the JSON of its last line of output."""
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CACHE_DIR=str(cache_dir))
    if features:
        env["NUMBA_CPU_FEATURES"] = features
    else:
        env.pop("NUMBA_CPU_FEATURES", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
