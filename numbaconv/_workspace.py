"""Scratch memory that the kernels reuse from one call to the next, per Python thread.

A fresh ``np.empty`` of several MiB is a fresh ``mmap`` of pages that the kernel then faults in
one by one, and glibc gives such blocks back to the system when they are freed (until its
mmap threshold has grown, after a few calls). Kernels that take their workspace from here find
the pages of the previous call instead, so the first calls at a shape cost what later ones do.

- Each Python thread has its own pool (concurrent callers never share a buffer), holding one
  buffer per workspace name, grown when a call needs more; a name is used at one place only, so
  two live arrays never share memory.
- Only scratch space comes from here: nothing that a call returns, and kernels overwrite it
  before reading it (the tests fill it with NaN between calls to prove that).
- Bounded: a pool keeps at most :data:`POOL_BYTES`, dropping the least recently used buffers;
  a request larger than that is allocated afresh and not kept. :func:`free_workspace` drops
  every thread's buffers; a thread's pool goes with the thread.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict

import numpy as np

#: Bytes one thread's pool may keep. One call's workspace is kept under 32 MiB by the kernels
#: (``WORKSPACE_BYTES`` in :mod:`numbaconv.kernels.im2col` and ``.winograd``); Winograd's backward
#: pass holds a grad-w and a grad-x workspace one after the other, so twice that keeps both.
#: Winograd's transformed filters come from here too (37.7 MB for 512 x 512 in float32; float64's
#: 75 MB are over the bound, so allocated afresh): with them, the band workspace of its forward
#: pass (at most 32 MiB) may push older buffers out.
POOL_BYTES = 64 * 2**20

#: Buffers start on a cache line (the kernels' vector loads and BLAS prefer aligned rows).
_ALIGN = 64

_local = threading.local()
_pools_lock = threading.Lock()
_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()


class _Pool:
    """One thread's buffers, by name, least recently used first."""

    __slots__ = ("buffers", "lock", "__weakref__")

    def __init__(self):
        self.buffers: OrderedDict[str, np.ndarray] = OrderedDict()
        # Taken by the owning thread and by free_workspace() (uncontended otherwise).
        self.lock = threading.Lock()

    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers.values())


def _pool() -> _Pool:
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = _Pool()
        with _pools_lock:
            _pools.add(pool)
    return pool


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    offset = -raw.ctypes.data % _ALIGN
    return raw[offset : offset + nbytes]


def take(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, like ``np.empty(shape, dtype)``, that may share
    memory with the array returned by the previous ``take(name, ...)`` in this thread.

    Parameters
    ----------
    name : str
        The workspace's name; use one name per allocation site, so that no two arrays that are
        alive at once come from the same buffer.
    shape : tuple of int
    dtype : numpy dtype
    """
    dtype = np.dtype(dtype)
    # math.prod, not np.prod: 0.2 against 3.5 us, three times per call of a small layer.
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > POOL_BYTES:
        return np.empty(shape, dtype=dtype)
    pool = _pool()
    with pool.lock:
        buffer = pool.buffers.pop(name, None)
        if buffer is None or buffer.nbytes < nbytes:
            buffer = None  # free the old buffer before the new one is allocated
            while pool.buffers and pool.nbytes() + nbytes > POOL_BYTES:
                pool.buffers.popitem(last=False)
            buffer = _aligned(nbytes)
        pool.buffers[name] = buffer
    return buffer[:nbytes].view(dtype).reshape(shape)


def free_workspace() -> None:
    """Release the scratch memory that numbaconv keeps between calls, in every thread.

    Arrays that a running call still uses stay valid; their memory goes when that call ends.
    """
    with _pools_lock:
        pools = list(_pools)
    for pool in pools:
        with pool.lock:
            pool.buffers.clear()


def pooled_bytes() -> int:
    """Bytes kept by all threads' pools (for tests and memory reports)."""
    with _pools_lock:
        pools = list(_pools)
    total = 0
    for pool in pools:
        with pool.lock:
            total += pool.nbytes()
    return total
