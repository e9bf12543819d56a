"""Central finite differences, shared by the gradient checks of the convolution family."""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def numeric_gradient(f, a: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Central differences of the scalar ``f()`` with respect to every element of ``a``.

    ``a`` is changed in place one element at a time (and restored), so ``f`` must read it.
    """
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + eps
        fp = f()
        a[idx] = old - eps
        fm = f()
        a[idx] = old
        grad[idx] = (fp - fm) / (2 * eps)
    return grad
