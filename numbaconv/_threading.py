"""Numba threading-layer choice, so that kernels may be called from several Python threads.

Numba's default ``workqueue`` layer aborts the process when two Python threads run a parallel
kernel at the same time. At import, unless the user chose a layer (``NUMBA_THREADING_LAYER``) or a
parallel Numba function already ran, numbaconv asks for the ``threadsafe`` layer: TBB if the
``tbb`` package is installed, else OpenMP. If, in the end, a layer that is not thread-safe is
active, :func:`kernel_guard` serialises numbaconv's kernel calls with a lock instead of crashing.

It also sets ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set (see
:func:`configure_threading_layer`); OpenMP runtimes already running keep their policy.

It also holds SciPy's OpenBLAS (the BLAS that ``np.dot`` calls inside Numba kernels) to one
thread while a kernel calls it from inside a parallel region; see :func:`single_threaded_blas`.

Caveat: GNU OpenMP is not fork-safe; a program that forks worker processes after running
numbaconv kernels should use the ``spawn`` start method (or install ``tbb``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path

import numba
from numba.np.ufunc import parallel as _numba_parallel

_THREAD_SAFE_LAYERS = ("tbb", "omp")
_lock = threading.Lock()


def configure_threading_layer() -> None:
    if _numba_parallel._is_initialized:
        return
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "threadsafe"
    # numbaconv alternates Numba passes with multi-threaded BLAS calls. GNU OpenMP's workers spin
    # after each parallel region by default, holding both cores while BLAS's threads wait for
    # one: measured 1.5-6x slower calls (a 1x1 layer: 8.0 ms spinning, 1.3 ms passive). Unless
    # the user chose a policy, OpenMP runtimes that start from here on sleep instead.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def active_threading_layer() -> str | None:
    """The layer in use, or None before the first parallel kernel has run."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


#: Below this many flops a call runs its Numba kernels on one thread. Waking the thread pool
#: costs more than such a call computes; on a busy machine a fork/join was measured at several
#: milliseconds (digits layer, 92 kflop: 12 ms on 2 threads, 25 us on 1).
SERIAL_FLOPS = 2**21


@contextlib.contextmanager
def kernel_guard(work: int):
    """Run numbaconv kernels safely and at the right width.

    Takes a lock when the active threading layer is not thread-safe (or not known yet), and
    limits Numba to one thread (for the calling thread only) for calls whose ``work`` (flops, or
    elements moved) is under
    :data:`SERIAL_FLOPS`. Results never depend on it: every kernel's reduction order is fixed.
    """
    lock = _lock if active_threading_layer() not in _THREAD_SAFE_LAYERS else None
    previous = numba.get_num_threads()
    if work < SERIAL_FLOPS and previous > 1:
        numba.set_num_threads(1)
    try:
        if lock is None:
            yield
        else:
            with lock:
                yield
    finally:
        numba.set_num_threads(previous)


def _find_scipy_openblas():
    """SciPy's bundled OpenBLAS (what ``np.dot`` in Numba code calls), or None if not found.

    SciPy wheels ship it as ``libscipy_openblas*`` next to the package; its thread count is
    process-wide state we can set. Other BLAS builds (MKL, a system OpenBLAS) are not touched, and
    the kernels then use their BLAS-outside-Numba paths.
    """
    try:
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library Numba binds to)
    except ImportError:
        return None
    root = Path(scipy.__file__).parent
    candidates = [
        *sorted((root.parent / "scipy.libs").glob("libscipy_openblas*")),
        *sorted((root / ".dylibs").glob("libscipy_openblas*")),
    ]
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
            get, set_ = lib.scipy_openblas_get_num_threads, lib.scipy_openblas_set_num_threads
        except (OSError, AttributeError):
            continue
        get.restype, get.argtypes = ctypes.c_int, []
        set_.restype, set_.argtypes = None, [ctypes.c_int]
        return get, set_
    return None


_scipy_openblas = _find_scipy_openblas()
_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved_threads = 1


def blas_inside_kernels() -> bool:
    """Whether kernels may call BLAS from inside their parallel regions.

    That needs BLAS held to one thread per caller (else each of Numba's threads would start
    BLAS's own threads and they would fight over the cores), which numbaconv can do for SciPy's
    bundled OpenBLAS. Set ``NUMBACONV_BLAS_INSIDE_KERNELS=0`` to use the other paths.
    """
    if os.environ.get("NUMBACONV_BLAS_INSIDE_KERNELS", "1") == "0":
        return False
    return _scipy_openblas is not None


def blas_mode() -> str:
    """One line for ``numbaconv info``: where the GEMM kernels call BLAS, and why."""
    if blas_inside_kernels():
        return "SciPy's OpenBLAS, called inside the parallel kernels (1 thread per caller)"
    if _scipy_openblas is None:
        return "NumPy's, between kernels (SciPy's bundled OpenBLAS was not found)"
    return "NumPy's, between kernels (NUMBACONV_BLAS_INSIDE_KERNELS=0)"


@contextlib.contextmanager
def single_threaded_blas():
    """Hold SciPy's OpenBLAS to one thread while any numbaconv kernel that calls it runs.

    OpenBLAS's thread count is one process-wide setting (``openblas_set_num_threads_local`` is
    global too in its pthreads build), so concurrent numbaconv calls share one reference count:
    the first sets 1 thread, the last restores the previous value. Other SciPy BLAS calls made by
    other Python threads meanwhile run single-threaded: slower, never wrong.
    """
    global _blas_users, _blas_saved_threads
    get, set_ = _scipy_openblas
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved_threads = get()
            if _blas_saved_threads != 1:
                set_(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_saved_threads != 1:
                set_(_blas_saved_threads)
