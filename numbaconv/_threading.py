"""Numba threading-layer choice, so that kernels may be called from several Python threads.

Numba's default ``workqueue`` layer aborts the process when two Python threads run a parallel
kernel at the same time. At import, unless the user chose a layer (``NUMBA_THREADING_LAYER``) or a
parallel Numba function already ran, numbaconv asks for the ``threadsafe`` layer: TBB if the
``tbb`` package is installed, else OpenMP. If, in the end, a layer that is not thread-safe is
active, :func:`kernel_guard` serialises numbaconv's kernel calls with a lock instead of crashing.

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
    if "NUMBA_THREADING_LAYER" in os.environ or _numba_parallel._is_initialized:
        return
    numba.config.THREADING_LAYER = "threadsafe"


def active_threading_layer() -> str | None:
    """The layer in use, or None before the first parallel kernel has run."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def kernel_guard():
    """A lock when the active layer is not thread-safe (or not known yet), else nothing."""
    if active_threading_layer() in _THREAD_SAFE_LAYERS:
        return contextlib.nullcontext()
    return _lock
