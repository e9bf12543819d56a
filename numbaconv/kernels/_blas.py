"""``c += a @ b.T`` and ``c += a @ b`` on BLAS from inside Numba kernels: what ``np.dot``
cannot do.

Numba binds ``np.dot`` to SciPy's BLAS through ``numba_xxgemm``, a function of Numba's helper
library that calls ``sgemm``/``dgemm``, always with ``beta = 0``: the product overwrites its
output. grad-w sums one product per band of output rows, so with ``np.dot`` each band's product
went to a scratch matrix that a loop then added to the sums: a pass over K x C*R*S values per
band, more memory traffic than the product's own on narrow bands (DeepLab's 4x256x33x33 layer:
11 bands an image, 2.4 MB of filters each). :func:`gemm_nt_add` calls the same
``numba_xxgemm`` with ``beta = 1``, so BLAS adds the product into the sums as it computes it.
:func:`gemm_nn_add` does the same for ``c += a @ b`` (the ``taps`` kernel adds each tap's
product straight into the output's rows).

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


def gemm_nn_add(a, b, c):
    """``c += a @ b`` for 2-D arrays of one float dtype whose rows are contiguous (``a``
    (M, K), ``b`` (K, N), ``c`` (M, N)). In Numba code it is one BLAS call; from Python, NumPy."""
    c += a @ b


def gemm_nn_into(a, b, c):
    """``c[...] = a @ b``, as :func:`gemm_nn_add` but overwriting ``c`` (``np.dot`` with an
    output, for operands whose rows are strided)."""
    c[...] = a @ b


def _gemm_add(a, b, c, b_transposed, beta=1.0):
    """The implementation of all three: ``b`` is (N, K) when ``b_transposed``, else (K, N);
    ``c`` is scaled by ``beta`` (1: add, 0: overwrite) before the product is added."""
    if not all(isinstance(t, types.Array) and t.ndim == 2 for t in (a, b, c)):
        return None
    dtype = a.dtype
    if dtype not in (types.float32, types.float64) or b.dtype != dtype or c.dtype != dtype:
        return None
    gemm = _xxgemm(dtype)
    kind = ord("s" if dtype == types.float32 else "d")
    np_dtype = np.float32 if dtype == types.float32 else np.float64
    # Column-major BLAS sees the row-major c as c.T = b' @ a.T, b' being b (as it lies in
    # memory, (K, N) row-major is b.T column-major: no transpose) or b.T (read transposed).
    trans = ord("t" if b_transposed else "n")
    name = "gemm_nt_add" if b_transposed else ("gemm_nn_add" if beta else "gemm_nn_into")

    def impl(a, b, c):
        m, k = a.shape
        n = b.shape[0] if b_transposed else b.shape[1]
        if (b.shape[1] if b_transposed else b.shape[0]) != k or c.shape[0] != m or c.shape[1] != n:
            raise ValueError(name + ": shapes do not match")
        if m == 0 or n == 0:
            return
        if k == 0:  # an empty product: c stays, or is zeros when overwritten
            if beta == 0.0:
                c[:, :] = 0.0
            return
        size = a.itemsize
        if a.strides[1] != size or b.strides[1] != size or c.strides[1] != size:
            raise ValueError(name + ": rows must be contiguous")
        one = np.ones(1, dtype=np_dtype)
        scale = np.full(1, beta, dtype=np_dtype)
        status = gemm(
            kind, trans, ord("n"), n, m, k, one.ctypes, b.ctypes, b.strides[0] // size,
            a.ctypes, a.strides[0] // size, scale.ctypes, c.ctypes, c.strides[0] // size,
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(name + ": BLAS is not available to Numba")

    return impl


@overload(gemm_nt_add, jit_options={"cache": True})
def _gemm_nt_add(a, b, c):
    return _gemm_add(a, b, c, True)


@overload(gemm_nn_add, jit_options={"cache": True})
def _gemm_nn_add(a, b, c):
    return _gemm_add(a, b, c, False)


@overload(gemm_nn_into, jit_options={"cache": True})
def _gemm_nn_into(a, b, c):
    return _gemm_add(a, b, c, False, beta=0.0)
