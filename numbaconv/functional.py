"""The functional API: ``conv2d``, ``conv2d_backward`` and the teaching ``im2col``/``col2im``.

Each call validates and normalises once (:mod:`numbaconv.geometry`), picks a kernel
(:mod:`numbaconv.registry`) and runs it. Inputs are never modified; any memory layout is accepted
(non-contiguous, Fortran-ordered and read-only arrays are copied to C order when needed).
"""

from __future__ import annotations

import numpy as np

from . import registry
from ._threading import kernel_guard
from .geometry import (
    as_array,
    check_dtype,
    make_geometry,
    validate_conv,
    validate_grad_output,
)
from .kernels.im2col import col2im_kernel, geometry_args, im2col_kernel


def _for_kernel(a: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous, writeable array (a copy only when needed).

    Kernels never write their inputs, but Numba compiles a separate version for read-only arrays;
    copying those keeps one compiled version per dtype (and the cold start short).
    """
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def conv2d(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    kernel: str | None = None,
) -> np.ndarray:
    """2-D convolution (cross-correlation) with the semantics of ``torch.nn.functional.conv2d``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    w : ndarray, shape (K, C // groups, R, S), same dtype as ``x``
    b : ndarray, shape (K,), optional
    stride, dilation : int or (int, int)
    padding : int, (int, int), ``'valid'`` or ``'same'``
        Zero padding on both sides of each axis. ``'same'`` (stride 1 only) keeps the input size;
        when the total padding is odd, the extra row/column goes at the bottom/right.
    groups : int
        Input and output channels are split into ``groups`` independent convolutions.
    kernel : str, optional
        One of :data:`numbaconv.KERNELS`; default: ``$NUMBACONV_KERNEL``, else the built-in default.

    Returns
    -------
    y : ndarray, shape (N, K, OH, OW), dtype of ``x``
        ``OH = (H + pad_top + pad_bottom - dilation_h * (R - 1) - 1) // stride_h + 1``, likewise OW.
    """
    geom, dtype = validate_conv(
        x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    name = registry.resolve(kernel)
    if geom.batch == 0:
        return np.zeros(geom.output_shape, dtype=dtype)
    x, w = _for_kernel(x), _for_kernel(w)
    b = None if b is None else _for_kernel(b)
    with kernel_guard(geom.flops, numba_parallel=name != "numpy"):
        return registry.implementation(name).forward(x, w, b, geom)


def conv2d_backward(
    grad_y: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    kernel: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`conv2d` with respect to ``x``, ``w`` and the bias.

    Parameters are those of :func:`conv2d`; ``grad_y`` is the gradient of the loss with respect
    to its output, shape (N, K, OH, OW), same dtype.

    Returns
    -------
    grad_x : ndarray, shape of ``x``
    grad_w : ndarray, shape of ``w``
    grad_b : ndarray, shape (K,)
    """
    geom, dtype = validate_conv(
        x, w, None, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    validate_grad_output(grad_y, geom, dtype)
    name = registry.resolve(kernel)
    if geom.batch == 0:
        return (
            np.zeros(geom.input_shape, dtype=dtype),
            np.zeros(geom.weight_shape, dtype=dtype),
            np.zeros(geom.out_channels, dtype=dtype),
        )
    grad_y, x, w = _for_kernel(grad_y), _for_kernel(x), _for_kernel(w)
    with kernel_guard(2 * geom.flops, numba_parallel=name != "numpy"):
        return registry.implementation(name).backward(grad_y, x, w, geom)


def _teaching_geometry(x_shape, flt_h, flt_w, y_h, y_w, stride, pad, dilation):
    """Geometry of the teaching ``im2col(x, flt_h, flt_w, y_h, y_w, stride, pad)`` call."""
    n, c, h, w = x_shape
    geom = make_geometry(
        (n, c, h, w), (1, c, flt_h, flt_w), stride=stride, padding=pad, dilation=dilation
    )
    if (y_h, y_w) != (geom.out_height, geom.out_width):
        raise ValueError(
            f"y_h, y_w = ({y_h}, {y_w}) do not match the output size "
            f"({geom.out_height}, {geom.out_width}) of this filter, stride and padding"
        )
    return geom


def im2col(x, flt_h, flt_w, y_h, y_w, stride=1, pad=0, *, dilation=1) -> np.ndarray:
    """Unfold ``x`` (N, C, H, W) into columns ``(C*flt_h*flt_w, N*y_h*y_w)``.

    Rows are ordered (c, r, s), columns (n, oh, ow), as in the teaching implementation; entry
    ``[(c*flt_h + r)*flt_w + s, (n*y_h + oh)*y_w + ow]`` is the zero-padded input at
    ``(n, c, oh*stride + r*dilation - pad, ow*stride + s*dilation - pad)``.
    ``stride``, ``pad`` and ``dilation`` may be ints or (h, w) pairs.
    """
    x = as_array(x, "x")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got {x.ndim}-D with shape {x.shape}")
    check_dtype(x, "x")
    geom = _teaching_geometry(x.shape, flt_h, flt_w, y_h, y_w, stride, pad, dilation)
    rows = geom.in_channels * flt_h * flt_w
    cols = np.empty((rows, geom.batch * geom.out_height * geom.out_width), dtype=x.dtype)
    if geom.batch:
        with kernel_guard(cols.size):
            im2col_kernel(_for_kernel(x), cols, *geometry_args(geom))
    return cols


def col2im(cols, x_shape, flt_h, flt_w, y_h, y_w, stride=1, pad=0, *, dilation=1) -> np.ndarray:
    """Fold columns back into an image of shape ``x_shape``, summing overlapping entries.

    The adjoint of :func:`im2col`: ``<im2col(x), c> == <x, col2im(c)>``.
    """
    cols = as_array(cols, "cols")
    check_dtype(cols, "cols")
    if len(x_shape) != 4:
        raise ValueError(f"x_shape must be (N, C, H, W), got {tuple(x_shape)}")
    geom = _teaching_geometry(tuple(x_shape), flt_h, flt_w, y_h, y_w, stride, pad, dilation)
    rows = geom.in_channels * flt_h * flt_w
    pixels = geom.out_height * geom.out_width
    if cols.shape != (rows, geom.batch * pixels):
        raise ValueError(
            f"cols must have shape ({rows}, {geom.batch * pixels}) for x_shape {tuple(x_shape)}, "
            f"got {cols.shape}"
        )
    img = np.empty(geom.input_shape, dtype=cols.dtype)
    if geom.batch:
        with kernel_guard(cols.size):
            col2im_kernel(_for_kernel(cols), img, *geometry_args(geom))
    return img


__all__ = ["conv2d", "conv2d_backward", "im2col", "col2im"]
