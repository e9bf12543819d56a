"""``c += a @ b.T`` on BLAS from inside Numba kernels: what ``np.dot`` cannot do.

Numba binds ``np.dot`` to SciPy's BLAS through ``numba_xxgemm``, a function of Numba's helper
library that calls ``sgemm``/``dgemm``, always with ``beta = 0``: the product overwrites its
output. grad-w sums one product per band of output rows, so with ``np.dot`` each band's product
went to a scratch matrix that a loop then added to the sums: a pass over K x C*R*S values per
band, more memory traffic than the product's own on narrow bands (DeepLab's 4x256x33x33 layer:
11 bands an image, 2.4 MB of filters each). :func:`gemm_nt_add` calls the same
``numba_xxgemm`` with ``beta = 1``, so BLAS adds the product into the sums as it computes it.

``numba_xxgemm`` is not in Numba's documented API; :mod:`numbaconv._numba_internals` names it
with the other internals numbaconv relies on, and ``tests/test_numba_internals.py`` checks it.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from .._numba_internals import XXGEMM_SYMBOL


def _xxgemm(dtype) -> types.ExternalFunction:
    """Numba's ``numba_xxgemm`` (Fortran BLAS ``xgemm`` arguments after a kind character) for
    arrays of ``dtype``."""
    pointer = types.CPointer(dtype)
    signature = types.intc(
        types.char, types.char, types.char,  # kind ('s' or 'd'), transa, transb
        types.intp, types.intp, types.intp,  # m, n, k
        pointer, pointer, types.intp,  # alpha, a, lda
        pointer, types.intp,  # b, ldb
        pointer, pointer, types.intp,  # beta, c, ldc
    )  # fmt: skip
    return types.ExternalFunction(XXGEMM_SYMBOL, signature)


def gemm_nt_add(a, b, c):
    """``c += a @ b.T`` for 2-D arrays of one float dtype whose rows are contiguous (``a``
    (M, K), ``b`` (N, K), ``c`` (M, N)). In Numba code it is one BLAS call; from Python, NumPy."""
    c += a @ b.T


@overload(gemm_nt_add, jit_options={"cache": True})
def _gemm_nt_add(a, b, c):
    if not all(isinstance(t, types.Array) and t.ndim == 2 for t in (a, b, c)):
        return None
    dtype = a.dtype
    if dtype not in (types.float32, types.float64) or b.dtype != dtype or c.dtype != dtype:
        return None
    gemm = _xxgemm(dtype)
    kind = ord("s" if dtype == types.float32 else "d")
    np_dtype = np.float32 if dtype == types.float32 else np.float64

    def impl(a, b, c):
        m, k = a.shape
        n = b.shape[0]
        if b.shape[1] != k or c.shape[0] != m or c.shape[1] != n:
            raise ValueError("gemm_nt_add: shapes do not match")
        if m == 0 or n == 0 or k == 0:
            return
        size = a.itemsize
        if a.strides[1] != size or b.strides[1] != size or c.strides[1] != size:
            raise ValueError("gemm_nt_add: rows must be contiguous")
        one = np.ones(1, dtype=np_dtype)
        # Column-major BLAS sees the row-major c as c.T = b @ a.T: op(A) = b.T read
        # transposed, op(B) = a.T as it lies in memory.
        status = gemm(
            kind, ord("t"), ord("n"), n, m, k, one.ctypes, b.ctypes, b.strides[0] // size,
            a.ctypes, a.strides[0] // size, one.ctypes, c.ctypes, c.strides[0] // size,
        )  # fmt: skip
        if status != 0:
            raise RuntimeError("gemm_nt_add: BLAS is not available to Numba")

    return impl
