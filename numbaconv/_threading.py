"""Numba threading-layer choice, so that kernels may be called from several Python threads.

Numba's default ``workqueue`` layer aborts the process when two Python threads run a parallel
kernel at the same time. At import, unless the user chose a layer (``NUMBA_THREADING_LAYER``) or a
parallel Numba function already ran, numbaconv asks for the ``threadsafe`` layer: TBB if the
``tbb`` package is installed, else OpenMP. If, in the end, a layer that is not thread-safe is
active, :func:`kernel_guard` serialises numbaconv's kernel calls with a lock instead of crashing.

It also sets ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set (see
:func:`configure_threading_layer`); OpenMP runtimes already running keep their policy.

Caveat: GNU OpenMP is not fork-safe; a program that forks worker processes after running
numbaconv kernels should use the ``spawn`` start method (or install ``tbb``).
"""

from __future__ import annotations

import contextlib
import os
import threading

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
