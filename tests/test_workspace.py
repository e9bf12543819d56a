"""Scratch memory reused between calls (``numbaconv._workspace``): bounded, per thread, freed on
request, and never able to change a result."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import Cfg, assert_same_bits, check_against_reference, make_data, run_all

import numbaconv as nc
from numbaconv import _threading, _workspace


@pytest.fixture(autouse=True)
def _empty_pools():
    nc.free_workspace()
    yield
    nc.free_workspace()


def _poison():
    """Fill every pooled buffer with 0xFF bytes: NaN in float32 and float64."""
    with _workspace._pools_lock:
        pools = list(_workspace._pools)
    for pool in pools:
        with pool.lock:
            for buffer in pool.buffers.values():
                buffer[...] = 0xFF


def test_take_reuses_memory_by_name():
    a = _workspace.take("test.a", (3, 5), np.float32)
    assert a.shape == (3, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    assert a.ctypes.data % 64 == 0
    again = _workspace.take("test.a", (2, 3), np.float64)  # smaller: the same memory
    assert again.ctypes.data == a.ctypes.data
    other = _workspace.take("test.b", (3, 5), np.float32)
    assert not np.shares_memory(other, again)
    assert _workspace.pooled_bytes() == a.nbytes + other.nbytes
    bigger = _workspace.take("test.a", (100, 100), np.float64)  # grows
    assert bigger.nbytes == 80_000
    assert _workspace.pooled_bytes() == bigger.nbytes + other.nbytes


def test_pool_is_bounded(monkeypatch):
    monkeypatch.setattr(_workspace, "POOL_BYTES", 1000)
    _workspace.take("test.a", (100,), np.float32)  # 400 bytes
    _workspace.take("test.b", (100,), np.float32)  # 800
    _workspace.take("test.c", (100,), np.float32)  # over: the least recently used one goes
    assert _workspace.pooled_bytes() == 800
    assert list(_workspace._pool().buffers) == ["test.b", "test.c"]
    huge = _workspace.take("test.d", (1000,), np.float32)  # larger than the pool: not kept
    assert huge.shape == (1000,)
    assert "test.d" not in _workspace._pool().buffers


def test_threads_have_their_own_pools_and_free_reaches_them():
    mine = _workspace.take("test.a", (64,), np.float64)
    theirs = {}
    taken, release = threading.Event(), threading.Event()

    def worker():
        theirs["a"] = _workspace.take("test.a", (64,), np.float64)
        taken.set()
        release.wait(timeout=30)

    thread = threading.Thread(target=worker)
    thread.start()
    assert taken.wait(timeout=30)
    assert not np.shares_memory(mine, theirs["a"])
    assert _workspace.pooled_bytes() == 2 * 64 * 8
    nc.free_workspace()
    assert _workspace.pooled_bytes() == 0
    release.set()
    thread.join(timeout=30)


# Each path that takes workspace: im2col's bands, its blocked backward and the 1x1 path,
# Winograd's forward and grad-w (>= 16 channels); run on several threads (the serial shortcut is
# turned off below).
LAYERS = [
    Cfg(4, 6, 15, 13, 8, 3, 3, stride=(2, 1), padding=1, name="im2col-bands"),
    Cfg(4, 16, 12, 12, 16, 3, 3, padding=1, name="winograd"),
    Cfg(3, 24, 9, 9, 16, 1, 1, name="pointwise"),
    # im2col's blocked backward (two images, 16 channels): the whole batch's columns.
    Cfg(2, 16, 9, 9, 8, 3, 3, padding=1, name="im2col-blocked"),
]


# direct takes workspace at stride 1 only (its plane kernels).
CASES = [
    (kernel, cfg)
    for kernel in ("im2col", "winograd", "direct", "taps")
    for cfg in LAYERS
    if kernel != "direct" or cfg.stride == 1
]


@pytest.mark.parametrize("blas_inside", ["1", "0"], ids=["banded", "chunked"])
@pytest.mark.parametrize(("kernel", "cfg"), CASES, ids=lambda v: str(v))
def test_poisoned_workspace_changes_nothing(kernel, cfg, dtype, blas_inside, monkeypatch):
    """Buffers left full of NaN by the previous call: the same bits as from fresh memory."""
    monkeypatch.setenv("NUMBACONV_BLAS_INSIDE_KERNELS", blas_inside)
    monkeypatch.setattr(_threading, "SERIAL_FLOPS", 0)
    data = make_data(cfg, dtype, seed=3)
    first = run_all(cfg, *data, kernel)
    assert _workspace.pooled_bytes() > 0
    for _ in range(2):
        _poison()
        again = run_all(cfg, *data, kernel)
        for name, a, b in zip(("y", "grad_x", "grad_w", "grad_b"), first, again, strict=True):
            assert_same_bits(a, b, f"{name} after poisoning")
    nc.free_workspace()
    check_against_reference(cfg, kernel, dtype, seed=3)


def test_results_do_not_alias_the_workspace():
    cfg = LAYERS[1]
    data = make_data(cfg, np.float32)
    results = run_all(cfg, *data, "winograd")
    copies = [r.copy() for r in results]
    run_all(cfg, *make_data(cfg, np.float32, seed=9), "winograd")
    _poison()
    for name, a, b in zip(("y", "grad_x", "grad_w", "grad_b"), results, copies, strict=True):
        assert_same_bits(a, b, f"{name} kept by the caller")
