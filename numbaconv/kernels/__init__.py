"""Kernel families, one module each. Private: reach them through :mod:`numbaconv.registry`.

Every family exposes ``forward(x, w, b, geom) -> y`` and
``backward(grad_y, x, w, geom) -> (grad_x, grad_w, grad_b)``; they receive validated,
C-contiguous arrays of one supported dtype and never validate again.
"""
