"""The Numba behaviour numbaconv relies on beyond Numba's reference documentation.

``numbaconv._numba_internals`` is the one place that reads what Numba has no public API for;
these tests check each of those reads, and the documented behaviour numbaconv builds on, against
the installed Numba, so a Numba release that changes them fails here, by name, instead of
sending numbaconv down a silent fallback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
from numba import njit, prange

from numbaconv import _numba_internals, _threading, cache
from numbaconv.kernels._blas import gemm_nn_add, gemm_nn_into, gemm_nt_add

IN_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numba

    try:
        numba.threading_layer()
        before = "no ValueError"
    except ValueError:
        before = "ValueError"
    sys.path.insert(0, sys.argv[1])
    import cached_module
    from numbaconv._numba_internals import cache_stats

    assert cached_module.twice(21) == 42
    path, hits, misses = cache_stats(cached_module.twice)
    print(json.dumps([before, path, sum(hits.values()), sum(misses.values())]))
    """
)


def _fresh_process(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run(
        [sys.executable, "-c", IN_FRESH_PROCESS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_threading_layer_raises_until_a_parallel_kernel_ran(tmp_path):
    """Documented: ``numba.threading_layer()`` raises ValueError before any layer is chosen;
    numbaconv reads that as 'not started yet' (and picks the layer only then)."""
    (tmp_path / "cached_module.py").write_text(
        "from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2 * x\n"
    )
    assert _fresh_process(tmp_path)[0] == "ValueError"


def test_cache_stats_report_the_cache_folder_misses_and_hits(tmp_path):
    """``Dispatcher.stats``: the cache folder (under NUMBA_CACHE_DIR when set), one miss in the
    process that compiled, one hit in the next one."""
    (tmp_path / "cached_module.py").write_text(
        "from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2 * x\n"
    )
    _, path, hits, misses = _fresh_process(tmp_path)
    assert path.startswith(str(tmp_path / "cache")) and (hits, misses) == (0, 1)
    _, path_again, hits, misses = _fresh_process(tmp_path)
    assert path_again == path and (hits, misses) == (1, 0)


def test_cache_stats_of_numbaconvs_kernels():
    kernels = cache.dispatchers()
    assert len(kernels) >= 10  # every kernel module's @njit functions, found by is_jitted
    for dispatcher in kernels:
        stats = _numba_internals.cache_stats(dispatcher)
        assert stats.path and os.path.isabs(stats.path), dispatcher  # all are cache=True
        assert isinstance(stats.hits, Counter) and isinstance(stats.misses, Counter)
    paths = [_numba_internals.cache_stats(dispatcher).path for dispatcher in kernels]
    assert cache.cache_dirs() == list(dict.fromkeys(paths))


def test_cache_file_reads_and_writes_a_dispatchers_entries(tmp_path):
    """``dispatcher._cache._cache_file``: Numba's ``IndexDataCacheFile`` of a ``cache=True``
    dispatcher, whose ``save``/``load`` numbaconv locks (:func:`numbaconv.cache.lock_cache_files`);
    None without ``cache=True``."""
    from numba.core.caching import IndexDataCacheFile

    for dispatcher in cache.dispatchers():
        assert isinstance(_numba_internals.cache_file(dispatcher), IndexDataCacheFile)
    assert _numba_internals.cache_file(njit(lambda x: x)) is None
    files = _numba_internals.cache_file(cache.dispatchers()[0])
    # The methods the lock wraps, called as Numba's Cache calls them, on a copy in tmp_path.
    copy = IndexDataCacheFile(str(tmp_path), "copy", ("stamp", 1))
    copy.save(("sig", "magic"), ("data",))
    assert copy.load(("sig", "magic")) == ("data",) and copy.load(("other", "magic")) is None
    assert callable(files.save) and callable(files.load)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checked where it matters: Linux")
def test_openmp_vendor_is_readable():
    """Numba's Linux wheels build the ``omp`` layer on GNU OpenMP, the one that is not
    fork-safe; numbaconv reads that from ``numba.np.ufunc.omppool.openmp_vendor``."""
    from numba.np.ufunc import omppool

    assert omppool.openmp_vendor == _numba_internals.openmp_vendor() == "GNU"
    assert _threading._openmp_is_gnu()


@njit(parallel=True)
def _two_lanes_of_gemm_nt_add(a, b, c):
    """Each of two lanes adds its half of ``a``'s rows times ``b[:, 1:].T`` into the columns
    ``2:2 + N`` of its half of ``c``: strided views, from inside a parallel region."""
    half = a.shape[0] // 2
    for lane in prange(2):
        rows = slice(lane * half, (lane + 1) * half)
        gemm_nt_add(a[rows], b[:, 1:], c[rows, 2 : 2 + b.shape[0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_xxgemm_adds_the_product_with_beta_one(dtype):
    """``numba_xxgemm`` (:data:`numbaconv._numba_internals.XXGEMM_SYMBOL`), called as Numba's own
    ``np.linalg`` code calls it but with ``beta = 1``, adds ``a @ b.T`` into ``c`` and leaves
    ``c``'s other columns alone."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((10, 13)).astype(dtype)
    b = rng.standard_normal((7, 14)).astype(dtype)
    c = rng.standard_normal((10, 12)).astype(dtype)
    expected = c.astype(np.float64)
    expected[:, 2:9] += a.astype(np.float64) @ b[:, 1:].T.astype(np.float64)
    _two_lanes_of_gemm_nt_add(a, b, c)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(c, expected, rtol=tol, atol=tol)
    np.testing.assert_array_equal(c[:, :2], expected[:, :2].astype(dtype))
    np.testing.assert_array_equal(c[:, 9:], expected[:, 9:].astype(dtype))


def test_gemm_nt_add_checks_its_operands():
    @njit
    def call(a, b, c):
        gemm_nt_add(a, b, c)

    a, b = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match="shapes"):
        call(a, b, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        call(a, np.ones((5, 8), np.float32)[:, ::2], np.zeros((3, 5), np.float32))


@njit(parallel=True)
def _two_lanes_of_gemm_nn_add(a, b, c):
    """As above for ``c[rows, 2:2 + N] += a[rows] @ b[:, 1:]`` (``b`` (K, N + 1))."""
    half = a.shape[0] // 2
    for lane in prange(2):
        rows = slice(lane * half, (lane + 1) * half)
        gemm_nn_add(a[rows], b[:, 1:], c[rows, 2 : 1 + b.shape[1]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_nn_add_adds_the_product(dtype):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((10, 13)).astype(dtype)
    b = rng.standard_normal((13, 8)).astype(dtype)
    c = rng.standard_normal((10, 12)).astype(dtype)
    expected = c.astype(np.float64)
    expected[:, 2:9] += a.astype(np.float64) @ b[:, 1:].astype(np.float64)
    _two_lanes_of_gemm_nn_add(a, b, c)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(c, expected, rtol=tol, atol=tol)
    np.testing.assert_array_equal(c[:, :2], expected[:, :2].astype(dtype))
    np.testing.assert_array_equal(c[:, 9:], expected[:, 9:].astype(dtype))


def test_gemm_nn_add_checks_its_operands():
    @njit
    def call(a, b, c):
        gemm_nn_add(a, b, c)

    a, b = np.ones((3, 4), np.float32), np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match="gemm_nn_add: shapes"):
        call(a, b, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="gemm_nn_add: rows must be contiguous"):
        call(a, np.ones((4, 10), np.float32)[:, ::2], np.zeros((3, 5), np.float32))


@pytest.mark.parametrize("depth", [13, 0])
def test_gemm_nn_into_overwrites(depth):
    """``beta = 0``: ``c`` (NaN here) is replaced by the product, zeros for an empty one."""

    @njit
    def call(a, b, c):
        gemm_nn_into(a, b, c)

    rng = np.random.default_rng(5)
    a = rng.standard_normal((6, depth))
    b = rng.standard_normal((depth, 9))
    c = np.full((6, 12), np.nan)
    call(a, b[:, :], c[:, 1:10])
    np.testing.assert_allclose(c[:, 1:10], a @ b, rtol=1e-13, atol=1e-13)
    assert np.isnan(c[:, 0]).all() and np.isnan(c[:, 10:]).all()
