"""Small @njit helpers shared by the Numba kernel families."""

from __future__ import annotations

from numba import njit


@njit(cache=True, inline="always")
def valid_range(n_out, stride, offset, size):
    """Output indices ``o`` in ``[0, n_out)`` whose input index ``o*stride + offset`` lies in
    ``[0, size)``, as a half-open range ``(lo, hi)``; the rest read zero padding.

    Hoisting this test out of the inner loop leaves a branch-free, vectorisable loop body.
    """
    lo = 0
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    hi = n_out
    last = (size - 1 - offset) // stride + 1  # Python floor division, as in Numba
    if last < hi:
        hi = last
    if hi < lo:
        hi = lo
    return lo, hi
