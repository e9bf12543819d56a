"""``cache=True``: a second process loads every kernel from Numba's cache and compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from threadprobe import parallel_kernels

from numbaconv import _numba_internals, cache
from numbaconv.kernels import direct, im2col, taps, winograd

# Every kernel family on both of its paths: the banded passes (BLAS inside the kernels, the
# default) and the chunked ones (NUMBACONV_BLAS_INSIDE_KERNELS=0, read at each call), forward and
# backward, both dtypes. The grouped layer is one Winograd does not cover (so im2col, direct and
# numpy); the 3x3 one is, so that Winograd's own kernels are compiled too; the strided and dilated
# one takes direct's row kernels (the others, its plane kernels; the strided one, their phases);
# one image of 16 channels takes im2col's blocked backward, four of 32 its implicit backward
# (on whole images, and on the segments of rows too wide for one band's columns).
WORKLOAD = textwrap.dedent(
    """
    import os
    import numpy as np
    import numbaconv as nc

    def workload():
        layers = [
            ((2, 4, 6, 6), (4, 2, 3, 3), dict(padding=1, groups=2)),
            ((2, 4, 7, 6), (4, 1, 3, 3), dict(stride=2, padding=1, dilation=2, groups=4)),
            ((2, 4, 7, 6), (4, 1, 3, 3), dict(stride=2, padding=1, groups=4)),
            ((2, 4, 7, 6), (4, 1, 3, 3), dict(padding=1, groups=4)),  # depthwise "same"
            ((1, 16, 5, 5), (4, 16, 3, 3), dict(padding=1)),
            ((4, 32, 10, 10), (32, 32, 3, 3), dict(padding=1)),  # im2col's implicit backward
            ((4, 32, 1, 4200), (32, 32, 1, 9), dict(padding=(0, 4))),  # ... on row segments
            ((2, 4, 5, 9), (4, 4, 1, 3), dict(padding=(0, 1))),  # taps: 1xk on swapped axes
            ((2, 4, 6, 7), (3, 4, 3, 3), dict(padding=1)),  # last: the im2col call below uses it
        ]
        saved = os.environ.get("NUMBACONV_BLAS_INSIDE_KERNELS")
        try:
            for inside in ("1", "0"):
                os.environ["NUMBACONV_BLAS_INSIDE_KERNELS"] = inside
                for dtype in (np.float32, np.float64):
                    rng = np.random.default_rng(0)
                    for x_shape, w_shape, kw in layers:
                        x = rng.standard_normal(x_shape).astype(dtype)
                        w = rng.standard_normal(w_shape).astype(dtype)
                        b = rng.standard_normal(w_shape[0]).astype(dtype)
                        for kernel in nc.KERNELS:
                            y = nc.conv2d(x, w, b, kernel=kernel, **kw)
                            nc.conv2d_backward(y, x, w, kernel=kernel, **kw)
                    cols = nc.im2col(x, 3, 3, 6, 7, 1, 1)
                    nc.col2im(cols, x.shape, 3, 3, 6, 7, 1, 1)
                    # A transposed backward pass from shared columns (16 output channels).
                    xt = rng.standard_normal((1, 2, 8, 8)).astype(dtype)
                    wt = rng.standard_normal((2, 16, 4, 4)).astype(dtype)
                    gt = rng.standard_normal((1, 16, 16, 16)).astype(dtype)
                    nc.conv_transpose2d_backward(gt, xt, wt, stride=2, padding=1, kernel="im2col")
                    # The forward pass phase by phase (subpixel.implicit_forward).
                    xt = rng.standard_normal((1, 64, 8, 16)).astype(dtype)
                    wt = rng.standard_normal((64, 32, 4, 4)).astype(dtype)
                    nc.conv_transpose2d(xt, wt, stride=2, padding=1, kernel="auto")
        finally:
            if saved is None:
                os.environ.pop("NUMBACONV_BLAS_INSIDE_KERNELS", None)
            else:
                os.environ["NUMBACONV_BLAS_INSIDE_KERNELS"] = saved
    """
)

REPORT = textwrap.dedent(
    """
    import json, sys
    from numba.core.dispatcher import Dispatcher

    workload()
    misses, loaded = {}, []
    for name, module in list(sys.modules.items()):
        if name == "numbaconv" or name.startswith("numbaconv."):
            for attr, obj in list(vars(module).items()):
                if isinstance(obj, Dispatcher):
                    if obj.stats.cache_misses:
                        misses[f"{name}.{attr}"] = [str(s) for s in obj.stats.cache_misses]
                    if obj.stats.cache_hits:
                        loaded.append(f"{name}.{attr}")
    print("REPORT=" + json.dumps({"misses": misses, "loaded": sorted(loaded)}))
    """
)


def test_second_process_compiles_nothing():
    # This process compiles (or loads) every specialisation the workload needs and so fills
    # the cache; a fresh interpreter running the same workload must then only load.
    namespace = {}
    exec(WORKLOAD, namespace)
    namespace["workload"]()
    env = dict(os.environ)
    env.pop("NUMBACONV_KERNEL", None)
    proc = subprocess.run(
        [sys.executable, "-c", WORKLOAD + REPORT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT=")][-1]
    report = json.loads(line[len("REPORT=") :])
    assert report["misses"] == {}, f"compiled again in a second process: {report['misses']}"
    assert "cannot cache" not in proc.stderr.lower(), proc.stderr
    # ... and loaded every parallel kernel of every family from the cache (a kernel the
    # workload never ran would have nothing to miss).
    loaded = set(report["loaded"])
    for module in (im2col, winograd, direct, taps):
        expected = {f"{module.__name__}.{name}" for name in parallel_kernels(module)}
        assert expected, module.__name__
        assert expected <= loaded, f"not loaded from the cache: {sorted(expected - loaded)}"
    assert {
        "numbaconv.kernels.winograd.fused_winograd_kernel",
        "numbaconv.kernels.winograd.fused_weight_gradient_kernel",
        "numbaconv.kernels.subpixel.implicit_forward_kernel",
    } <= loaded


def test_an_edited_shared_helper_clears_its_callers_cache_entries(tmp_path, monkeypatch):
    """Numba keys a cached function on its own file only; numbaconv's import guard removes the
    kernels' entries written with other versions of the helpers they inline (and nothing else),
    once, and stamps the folder."""
    folder = tmp_path / "cache"
    folder.mkdir()
    ours = ["im2col.fused_forward_kernel-245.py311.nbi", "winograd.x-1.py311.2.nbc"]
    theirs = ["mypackage.f-3.py311.nbi", "notes.txt"]
    for name in ours + theirs:
        (folder / name).write_text("x")
    monkeypatch.setattr(cache, "cache_dirs", lambda: [str(folder)])
    monkeypatch.setattr(cache, "helpers_fingerprint", lambda: "version 1\n")

    # A folder without a stamp (a cache from before the guard) is cleared of numbaconv's entries.
    assert sorted(cache.guard_shared_helpers()) == sorted(ours)
    assert sorted(os.listdir(folder)) == sorted([*theirs, cache.HELPERS_STAMP])
    assert (folder / cache.HELPERS_STAMP).read_text() == "version 1\n"

    # The same helpers: entries written since stay.
    (folder / ours[0]).write_text("x")
    assert cache.guard_shared_helpers() == []
    assert (folder / ours[0]).exists()

    # An edited helper: they go, once.
    monkeypatch.setattr(cache, "helpers_fingerprint", lambda: "version 2\n")
    assert cache.guard_shared_helpers() == [ours[0]]
    assert cache.guard_shared_helpers() == []


def test_helpers_fingerprint_follows_the_sources():
    """The fingerprint names every shared helper with its size and modification time, as
    Numba's own source stamp does, and the package's real cache folders carry it after import."""
    from numbaconv import cache

    lines = cache.helpers_fingerprint().splitlines()
    assert [line.split()[0] for line in lines] == list(cache.SHARED_HELPERS)
    kernels_dir = os.path.dirname(im2col.__file__)
    for line in lines:
        name, mtime_ns, size = line.split()
        info = os.stat(os.path.join(kernels_dir, name))
        assert (int(mtime_ns), int(size)) == (info.st_mtime_ns, info.st_size)
    for folder in cache.cache_dirs():
        stamp = os.path.join(folder, cache.HELPERS_STAMP)
        if os.access(folder, os.W_OK):
            with open(stamp) as handle:
                assert handle.read() == cache.helpers_fingerprint()


# Numba's own cache file object, its save wrapped as numbaconv wraps its kernels' (or not), and
# 200 entries written as fast as it can once the go-file appears.
CONCURRENT_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from numba.core.caching import IndexDataCacheFile
    from numbaconv import cache

    folder, tag, locked = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    files = IndexDataCacheFile(folder, "race", ("stamp", 1))
    save = cache._locked(files.save, folder, exclusive=True) if locked else files.save
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.001)
    for i in range(200):
        save(f"{tag}{i}", f"{tag}{i} data")
    """
)


def _write_concurrently(folder, locked: bool) -> dict:
    writers = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(folder), tag, locked])
        for tag in ("a", "b")
    ]
    time.sleep(3)  # both interpreters started and waiting (an import of numbaconv: ~1 s)
    (folder / "go").touch()
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    from numba.core.caching import IndexDataCacheFile

    files = IndexDataCacheFile(str(folder), "race", ("stamp", 1))
    return {key: files.load(key) for key in files._load_index()}


def test_locked_cache_writes_from_two_processes_keep_every_entry_right(tmp_path):
    """Two processes writing one function's cache entries at once: with the lock
    (:func:`numbaconv.cache.lock_cache_files`) every entry is in the index and its data file
    holds its own data. Unlocked, Numba's save lost about 170 of the 400 entries and filed a few
    under another key's data file (the CI failure of a parallel ``numbaconv compile``)."""
    entries = _write_concurrently(tmp_path, "1")
    expected = {f"{tag}{i}": f"{tag}{i} data" for tag in "ab" for i in range(200)}
    assert entries == expected


def test_every_kernel_locks_its_cache_files():
    """``import numbaconv`` wrapped every kernel's cache reads and writes."""
    assert cache.fcntl is not None  # Linux, where CI runs
    for dispatcher in cache.dispatchers():
        files = _numba_internals.cache_file(dispatcher)
        assert files.save.numbaconv_locked and files.load.numbaconv_locked, dispatcher


def test_cache_lock_falls_back_where_it_cannot_lock(tmp_path, monkeypatch):
    """A folder where the lock file cannot be opened (read-only) or where ``flock`` fails still
    reads and writes its entries, unlocked, as Numba does."""
    calls = []
    save = cache._locked(lambda *args: calls.append(args) or "saved", str(tmp_path), True)
    assert save(1, 2) == "saved" and (tmp_path / cache.LOCK_FILE).exists()
    missing = cache._locked(lambda: "read", str(tmp_path / "no such folder"), False)
    assert missing() == "read"

    def refuse(handle, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(cache.fcntl, "flock", refuse)
    assert save(3) == "saved" and calls == [(1, 2), (3,)]
