"""Bitwise determinism (repeats, thread counts), concurrent callers, the default-kernel env var."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest
from helpers import Cfg, assert_close, assert_same_bits, make_data, reference, run_all
from test_parallel import BY_NAME

import numbaconv as nc

# Large enough in batch and channels that reductions (grad_w over the batch, grad_b) are split
# into several chunks by any sensible kernel, still tiny in time.
DET_CFGS = [
    Cfg(9, 4, 9, 8, 6, 3, 3, stride=1, padding=1, name="det-3x3"),
    Cfg(
        7,
        6,
        8,
        7,
        6,
        2,
        3,
        stride=(2, 1),
        padding=(1, 0),
        dilation=(1, 2),
        groups=3,
        name="det-grouped",
    ),
]

# These layers are far under SERIAL_FLOPS: the tests that compare thread counts or run
# concurrent callers take `force_parallel`, else every side would run on one thread and the
# comparison could not fail; `thread_probe` checks that the work really was split.

# Layers whose banded passes cut images between lanes and group images (see test_parallel.py);
# compared across thread counts with DET_CFGS.
SPLIT_CFGS = [BY_NAME["bands-split-images"], BY_NAME["17-images"]]

MAX_THREADS = numba.config.NUMBA_NUM_THREADS  # 4 or more, unless NUMBA_NUM_THREADS was set lower

#: How long a barrier waits for the other threads: a thread that fails or hangs before it
#: breaks the barrier (BrokenBarrierError in the others) instead of hanging CI.
BARRIER_TIMEOUT_S = 120


def _outputs(cfg, data, kernel):
    return run_all(cfg, *data, kernel)


def _assert_all_same_bits(a, b, what):
    for name, u, v in zip(("y", "grad_x", "grad_w", "grad_b"), a, b, strict=True):
        assert_same_bits(u, v, f"{name} {what}")


@pytest.mark.parametrize("cfg", DET_CFGS, ids=str)
def test_repeated_calls_bitwise_identical(kernel, dtype, cfg, force_parallel):
    data = make_data(cfg, dtype, seed=4)
    first = _outputs(cfg, data, kernel)
    for i in range(3):
        _assert_all_same_bits(first, _outputs(cfg, data, kernel), f"repeat {i}")
    # Copies of the inputs (other addresses, so other alignment) give the same bits too.
    copies = tuple(np.array(a, copy=True) for a in data)
    _assert_all_same_bits(first, _outputs(cfg, copies, kernel), "copied inputs")


FOUR_THREADS = pytest.mark.skipif(
    MAX_THREADS < 4, reason=f"Numba has {MAX_THREADS} threads (NUMBA_NUM_THREADS, conftest.py)"
)


@pytest.mark.parametrize("threads", [2, pytest.param(4, marks=FOUR_THREADS)])
@pytest.mark.parametrize("cfg", DET_CFGS + SPLIT_CFGS, ids=str)
def test_thread_count_does_not_change_bits(
    kernel, dtype, cfg, threads, force_parallel, thread_probe, restore_num_threads
):  # fmt: skip
    data = make_data(cfg, dtype, seed=5)
    numba.set_num_threads(1)
    one = _outputs(cfg, data, kernel)
    assert all(r.threads == 1 for r in thread_probe.regions)
    thread_probe.clear()
    numba.set_num_threads(threads)
    many = _outputs(cfg, data, kernel)
    if kernel != "numpy":  # plain NumPy has no Numba region
        thread_probe.assert_every_region_parallel(f"{kernel} {cfg}", min_threads=threads)
    _assert_all_same_bits(one, many, f"1 vs {threads} threads")
    if cfg in DET_CFGS:  # and they are right (the split layers are checked in test_parallel.py)
        ref = reference(cfg, dtype, 5)
        assert_close(one[0], ref.y, ref.y_abs, dtype, "forward")
        assert_close(one[2], ref.gw, ref.gw_abs, dtype, "grad_w")


def test_concurrent_calls_from_python_threads(kernel, dtype, force_parallel, thread_probe):
    """Four Python threads calling every entry point at once get exactly the serial results,
    with the serial shortcut off so that their calls really run parallel regions at once."""
    cfgs = DET_CFGS + [Cfg(3, 2, 6, 6, 3, 3, 3, padding="same", name="small-same")]
    jobs = [(cfg, make_data(cfg, dtype, seed=s)) for s in range(4) for cfg in cfgs]
    serial = [_outputs(cfg, data, kernel) for cfg, data in jobs]
    im2col_x = make_data(cfgs[0], dtype, seed=9)[0]
    serial_cols = nc.im2col(im2col_x, 3, 3, 9, 8, 1, 1)
    serial_img = nc.col2im(serial_cols, im2col_x.shape, 3, 3, 9, 8, 1, 1)

    barrier = threading.Barrier(4, timeout=BARRIER_TIMEOUT_S)
    # Numba's thread count is per Python thread: mix 1-, 2- and (where available) 4-thread callers.
    widths = [1, 2, min(4, MAX_THREADS), 2]

    def work(t):
        numba.set_num_threads(widths[t])
        barrier.wait()
        out = []
        for rep in range(3):
            for i in range(len(jobs)):
                j = (i + t + rep) % len(jobs)  # threads run different problems at once
                cfg, data = jobs[j]
                out.append((j, _outputs(cfg, data, kernel)))
            cols = nc.im2col(im2col_x, 3, 3, 9, 8, 1, 1)
            out.append(("cols", (cols, nc.col2im(cols, im2col_x.shape, 3, 3, 9, 8, 1, 1))))
        return out

    thread_probe.clear()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(4)))
    # The callers ran parallel regions at their own widths, not all on one thread.
    assert {r.threads for r in thread_probe.regions} == set(widths), thread_probe.regions
    for t, out in enumerate(results):
        for j, got in out:
            if j == "cols":
                assert_same_bits(got[0], serial_cols, f"im2col thread {t}")
                assert_same_bits(got[1], serial_img, f"col2im thread {t}")
            else:
                _assert_all_same_bits(serial[j], got, f"thread {t}, job {j}")


def test_concurrent_layers(kernel, force_parallel):
    """Independent ConvLayers trained in parallel threads match the same work done serially."""
    barrier = threading.Barrier(4, timeout=BARRIER_TIMEOUT_S)

    def train(seed, wait=False):
        if wait:
            barrier.wait()
        layer = nc.ConvLayer(2, 6, 6, 3, 3, 3, 1, 1, kernel=kernel, rng=np.random.default_rng(seed))
        rng = np.random.default_rng(100 + seed)
        for _ in range(4):
            x = rng.standard_normal((3, 2, 6, 6))
            y = layer.forward(x)
            layer.backward(y - 0.5)
            layer.update(0.01)
        return layer.w.copy(), layer.b.copy(), layer.grad_x.copy()

    serial = [train(s) for s in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda seed: train(seed, wait=True), range(4)))
    for s, (a, b) in enumerate(zip(serial, parallel, strict=True)):
        for u, v, name in zip(a, b, ("w", "b", "grad_x"), strict=True):
            assert_same_bits(u, v, f"layer {s} {name}")


# -------------------------------------------------------------------------------------------
# The default kernel: NUMBACONV_KERNEL, read at call time
# -------------------------------------------------------------------------------------------


def test_env_var_is_read_at_call_time(monkeypatch):
    x, w, b, gy = make_data(DET_CFGS[0], np.float64)
    kw = DET_CFGS[0].kwargs
    monkeypatch.setenv("NUMBACONV_KERNEL", "no-such-kernel")
    with pytest.raises(ValueError, match=r"unknown kernel 'no-such-kernel'.*NUMBACONV_KERNEL"):
        nc.conv2d(x, w, b, **kw)
    with pytest.raises(ValueError, match=r"unknown kernel 'no-such-kernel'"):
        nc.conv2d_backward(gy, x, w, **kw)
    # An explicit kernel= wins over the environment.
    nc.conv2d(x, w, b, kernel=nc.KERNELS[0], **kw)
    monkeypatch.delenv("NUMBACONV_KERNEL")
    nc.conv2d(x, w, b, **kw)  # built-in default again


def test_unknown_env_kernel_lists_valid_names(monkeypatch):
    monkeypatch.setenv("NUMBACONV_KERNEL", "bogus")
    with pytest.raises(ValueError) as info:
        nc.conv2d(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 1, 1)))
    for k in nc.KERNELS:
        assert k in str(info.value)


def test_env_var_selects_the_kernel(monkeypatch, kernel, dtype):
    """With NUMBACONV_KERNEL=name, kernel=None gives exactly what kernel=name gives."""
    cfg = DET_CFGS[1]
    data = make_data(cfg, dtype, seed=6)
    explicit = _outputs(cfg, data, kernel)
    monkeypatch.setenv("NUMBACONV_KERNEL", kernel)
    _assert_all_same_bits(explicit, _outputs(cfg, data, None), f"env {kernel}")
    layer = nc.ConvLayer(
        6, 8, 7, 6, 2, 3, (2, 1), (1, 0), dilation=(1, 2), groups=3, dtype=dtype, activation=None
    )
    layer.w[...] = data[1]
    layer.b[...] = data[2]
    assert_same_bits(layer.forward(data[0]), explicit[0], f"ConvLayer env {kernel}")


def test_env_var_selection_is_observable(monkeypatch):
    """The env var really switches implementations: spy on which kernel module runs."""
    from numbaconv import registry

    calls = []
    for name in nc.KERNELS:
        impl = registry.implementation(name)
        orig = impl.forward

        def spy(*a, _name=name, _orig=orig, **k):
            calls.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(impl, "forward", spy)
    x, w, b, _ = make_data(DET_CFGS[0], np.float64)
    for name in nc.KERNELS:
        monkeypatch.setenv("NUMBACONV_KERNEL", name)
        calls.clear()
        nc.conv2d(x, w, b, **DET_CFGS[0].kwargs)
        assert calls and calls[0] == name, (name, calls)
