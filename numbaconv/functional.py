"""The functional API: 2-D and 1-D convolution, transposed convolution, and their gradients.

``conv2d``/``conv2d_backward``, ``conv_transpose2d``/``conv_transpose2d_backward``, their 1-D
twins, and the teaching ``im2col``/``col2im``. Each call validates and normalises once
(:mod:`numbaconv.geometry`), picks a kernel (:mod:`numbaconv.registry`) and runs it. Inputs are
never modified; any memory layout is accepted (non-contiguous, Fortran-ordered and read-only
arrays are copied to C order when needed).

Everything runs on the kernels' two operations, a convolution's forward pass and its backward
pass (gradients with respect to input, weight and bias):

* a transposed convolution is the input gradient of the convolution that has its weight and
  options and its output's shape as input (:func:`numbaconv.geometry.make_transposed_geometry`);
  its input gradient is that convolution's forward pass, its weight gradient that
  convolution's weight gradient with the roles of input and output gradient swapped;
* a 1-D convolution of ``(N, C, L)`` is the 2-D convolution of the ``(N, C, 1, L)`` view;
* a ``padding_mode`` other than ``'zeros'`` pads the input explicitly (:func:`pad_input`), runs
  an unpadded convolution, and folds the gradient of the padding back onto the pixels it was
  copied from (:func:`fold_padding`).
"""

from __future__ import annotations

import numpy as np

from . import registry
from ._threading import blas_inside_kernels, kernel_guard, single_threaded_blas
from .geometry import (
    ConvGeometry,
    as_array,
    check_dtype,
    check_padding_mode,
    make_geometry,
    options_1d,
    validate_conv,
    validate_conv_transpose,
    validate_grad_output,
    validate_grad_shape,
)
from .kernels import subpixel
from .kernels.direct import grad_bias_kernel
from .kernels.im2col import (
    col2im_kernel,
    forward_and_weight_gradient,
    geometry_args,
    im2col_kernel,
)


def _for_kernel(a: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous, writeable array (a copy only when needed).

    Kernels never write their inputs, but Numba compiles a separate version for read-only arrays;
    copying those keeps one compiled version per dtype (and the cold start short).
    """
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


# --------------------------------------------------------------------------------------------
# Running the kernels
# --------------------------------------------------------------------------------------------


def _run_forward(x, w, b, geom: ConvGeometry, name: str) -> np.ndarray:
    """The convolution of validated arrays with kernel ``name``."""
    if geom.batch == 0:
        return np.zeros(geom.output_shape, dtype=x.dtype)
    x, w = _for_kernel(x), _for_kernel(w)
    b = None if b is None else _for_kernel(b)
    with kernel_guard(geom.flops, numba_parallel=name != "numpy"):
        return registry.implementation(name).forward(x, w, b, geom)


def _run_backward(grad_y, x, w, geom: ConvGeometry, name: str):
    """``(grad_x, grad_w, grad_b)`` of the convolution of validated arrays with kernel ``name``."""
    if geom.batch == 0:
        return (
            np.zeros(geom.input_shape, dtype=x.dtype),
            np.zeros(geom.weight_shape, dtype=x.dtype),
            np.zeros(geom.out_channels, dtype=x.dtype),
        )
    grad_y, x, w = _for_kernel(grad_y), _for_kernel(x), _for_kernel(w)
    with kernel_guard(2 * geom.flops, numba_parallel=name != "numpy"):
        return registry.implementation(name).backward(grad_y, x, w, geom)


def _run_input_gradient(grad_y, w, geom: ConvGeometry, name: str) -> np.ndarray:
    """The input gradient alone of the convolution described by ``geom``.

    Families that can compute it alone say so with an ``input_gradient(grad_y, w, geom)``
    function (``im2col``, ``winograd``, ``direct`` and ``taps`` have one); for the others this
    runs the full backward pass with an all-zero input and drops its weight and bias gradients
    (about twice the work; the zeros keep the wasted weight gradient finite whatever
    ``grad_y`` holds). ``'auto'`` is resolved first, with the registry's own choice for a
    backward pass.
    """
    if geom.batch == 0:
        return np.zeros(geom.input_shape, dtype=grad_y.dtype)
    concrete = registry.choose(geom, grad_y.dtype, "backward") if name == "auto" else name
    alone = getattr(registry.implementation(concrete), "input_gradient", None)
    if alone is None:
        dummy_input = np.zeros(geom.input_shape, dtype=grad_y.dtype)
        return _run_backward(grad_y, dummy_input, w, geom, name)[0]
    grad_y, w = _for_kernel(grad_y), _for_kernel(w)
    with kernel_guard(geom.flops, numba_parallel=name != "numpy"):
        return alone(grad_y, w, geom)


def _run_weight_gradient(grad_y, x, w, geom: ConvGeometry, name: str) -> np.ndarray:
    """The weight gradient alone of the convolution described by ``geom``.

    Families that can skip the input gradient say so with a ``weight_and_bias_gradients(grad_y,
    x, w, geom)`` function (``im2col`` has one); the others run their full backward pass.
    ``'auto'`` is resolved first, with the registry's own choice for a backward pass.
    """
    if geom.batch == 0:
        return np.zeros(geom.weight_shape, dtype=x.dtype)
    concrete = registry.choose(geom, x.dtype, "backward") if name == "auto" else name
    family = registry.implementation(concrete)
    weight_only = getattr(family, "weight_and_bias_gradients", None)
    grad_y, x, w = _for_kernel(grad_y), _for_kernel(x), _for_kernel(w)
    with kernel_guard(geom.flops, numba_parallel=name != "numpy"):
        if weight_only is not None:
            return weight_only(grad_y, x, w, geom)[0]
        return family.backward(grad_y, x, w, geom)[1]


# --------------------------------------------------------------------------------------------
# Padding modes
# --------------------------------------------------------------------------------------------

#: ``np.pad``'s name for each non-zero ``padding_mode`` (``torch.nn.Conv2d``'s names).
_NUMPY_PAD_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def pad_input(x: np.ndarray, pads: tuple[int, int, int, int], mode: str) -> np.ndarray:
    """``x`` (N, C, H, W) padded by ``(top, bottom, left, right)`` in ``padding_mode`` ``mode``.

    ``'reflect'`` mirrors without repeating the edge pixel, ``'replicate'`` repeats the edge
    pixel, ``'circular'`` wraps around; within the limits that
    :func:`numbaconv.geometry.check_padding_mode` enforces these are ``np.pad``'s ``'reflect'``,
    ``'edge'`` and ``'wrap'``, and PyTorch's modes of the same names.
    """
    top, bottom, left, right = pads
    widths = [(0, 0), (0, 0), (top, bottom), (left, right)]
    if mode == "zeros":
        return np.pad(x, widths)
    return np.pad(x, widths, mode=_NUMPY_PAD_MODE[mode])


def _source_index(index: int, size: int, before: int, mode: str) -> int:
    """The input index that padded index ``index`` was copied from, along one axis."""
    i = index - before
    if mode == "reflect":
        # One reflection is enough: the padding is smaller than the size.
        return -i if i < 0 else (2 * (size - 1) - i if i >= size else i)
    if mode == "replicate":
        return min(max(i, 0), size - 1)
    return i % size  # circular; wraps at most once, but the modulo does not need to know


def _fold_axis(grad: np.ndarray, axis: int, before: int, after: int, mode: str) -> np.ndarray:
    """Fold the padding of one axis of ``grad`` back onto its source entries (a new array)."""
    size = grad.shape[axis] - before - after
    index = [slice(None)] * grad.ndim

    def at(i):
        index[axis] = i
        return tuple(index)

    folded = grad[at(slice(before, before + size))].copy()
    # Padded rows (columns) in increasing order, each added onto the row it copies: O(border)
    # whole-row operations, and a fixed order, so the same bits on every call.
    for i in [*range(before), *range(before + size, before + size + after)]:
        folded[at(_source_index(i, size, before, mode))] += grad[at(i)]
    return folded


def fold_padding(grad_padded: np.ndarray, pads: tuple[int, int, int, int], mode: str):
    """The gradient with respect to ``x`` of ``pad_input(x, pads, mode)``.

    ``grad_padded`` is the gradient with respect to the padded array, (N, C, H + top + bottom,
    W + left + right); the result, (N, C, H, W), adds the gradient of every padded pixel onto
    the input pixel it is a copy of (``'zeros'`` padding reads no pixel: its gradient is
    dropped). The padding of each axis copies whole rows (columns) of the other, so the two
    axes fold one after the other, the corners with them.
    """
    top, bottom, left, right = pads
    if mode == "zeros":
        h, w = grad_padded.shape[2:]
        return np.ascontiguousarray(grad_padded[:, :, top : h - bottom, left : w - right])
    grad = _fold_axis(grad_padded, 2, top, bottom, mode)
    return _fold_axis(grad, 3, left, right, mode)


def _pads(geom: ConvGeometry) -> tuple[int, int, int, int]:
    return geom.pad_top, geom.pad_bottom, geom.pad_left, geom.pad_right


def _checked_mode(padding_mode, geom: ConvGeometry) -> str:
    return check_padding_mode(padding_mode, _pads(geom), (geom.in_height, geom.in_width))


def _explicitly_padded(x, geom: ConvGeometry, mode: str):
    """``(x, geom)`` to run for the (checked) padding mode: ``x`` padded and an unpadded
    geometry, or both unchanged for ``'zeros'`` (the kernels pad with zeros themselves) and for
    no padding."""
    if mode == "zeros" or not any(_pads(geom)):
        return x, geom
    padded = pad_input(x, _pads(geom), mode)
    unpadded = make_geometry(
        padded.shape,
        geom.weight_shape,
        stride=(geom.stride_h, geom.stride_w),
        padding=0,
        dilation=(geom.dilation_h, geom.dilation_w),
        groups=geom.groups,
    )
    return padded, unpadded


# --------------------------------------------------------------------------------------------
# 2-D convolution
# --------------------------------------------------------------------------------------------


def conv2d(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
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
        Padding on both sides of each axis. ``'same'`` (stride 1 only) keeps the input size;
        when the total padding is odd, the extra row/column goes at the bottom/right.
    groups : int
        Input and output channels are split into ``groups`` independent convolutions.
    padding_mode : ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``
        What the padding holds, as in ``torch.nn.Conv2d``: zeros, the input mirrored at its edge
        (padding smaller than the input), the edge pixel repeated, or the input wrapped around
        (padding at most the input's size).
    kernel : str, optional
        One of :data:`numbaconv.KERNELS`; default: ``$NUMBACONV_KERNEL``, else the built-in default.

    Returns
    -------
    y : ndarray, shape (N, K, OH, OW), dtype of ``x``
        ``OH = (H + pad_top + pad_bottom - dilation_h * (R - 1) - 1) // stride_h + 1``, likewise OW.
    """
    geom, _ = validate_conv(
        x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    x, geom = _explicitly_padded(x, geom, _checked_mode(padding_mode, geom))
    return _run_forward(x, w, b, geom, registry.resolve(kernel))


def conv2d_backward(
    grad_y: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    kernel: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`conv2d` with respect to ``x``, ``w`` and the bias.

    Parameters are those of :func:`conv2d`; ``grad_y`` is the gradient of the loss with respect
    to its output, shape (N, K, OH, OW), same dtype. With a ``padding_mode`` other than
    ``'zeros'``, the gradient that reaches the padding is added onto the input pixels the
    padding copies.

    Returns
    -------
    grad_x : ndarray, shape of ``x``
    grad_w : ndarray, shape of ``w``
    grad_b : ndarray, shape (K,)
    """
    geom, dtype = validate_conv(
        x, w, None, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    mode = _checked_mode(padding_mode, geom)
    validate_grad_output(grad_y, geom, dtype)
    return _conv2d_backward(grad_y, x, w, geom, mode, registry.resolve(kernel))


def _conv2d_backward(grad_y, x, w, geom: ConvGeometry, mode: str, name: str):
    """:func:`conv2d_backward` once the arrays and the padding mode are validated."""
    padded, run_geom = _explicitly_padded(x, geom, mode)
    grad_x, grad_w, grad_b = _run_backward(grad_y, padded, w, run_geom, name)
    if run_geom is not geom:
        grad_x = fold_padding(grad_x, _pads(geom), mode)
    return grad_x, grad_w, grad_b


# --------------------------------------------------------------------------------------------
# 2-D transposed convolution
# --------------------------------------------------------------------------------------------


def _as_adjoint_output(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """``x`` as the output (gradient) of the adjoint convolution ``geom``.

    The same array, except when ``output_padding >= stride`` (with a larger dilation): then the
    convolution has more output rows/columns than ``x``, and the extra ones, which no input
    pixel of the transposed convolution feeds, are zeros.
    """
    extra_h = geom.out_height - x.shape[2]
    extra_w = geom.out_width - x.shape[3]
    if extra_h or extra_w:
        return np.pad(x, [(0, 0), (0, 0), (0, extra_h), (0, extra_w)])
    return x


def conv_transpose2d(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    output_padding: int | tuple[int, int] = 0,
    groups: int = 1,
    dilation: int | tuple[int, int] = 1,
    kernel: str | None = None,
) -> np.ndarray:
    """2-D transposed convolution with the semantics of ``torch.nn.functional.conv_transpose2d``.

    Each input pixel ``x[n, i, h, w]`` adds ``x[n, i, h, w] * w[i, o]`` onto the output window
    whose top-left corner is ``(h * stride_h - padding_h, w * stride_w - padding_w)``, with taps
    ``dilation`` apart (entries that fall outside the output are dropped): the gradient of
    :func:`conv2d` with respect to its input, so it runs on the same kernels.

    Parameters
    ----------
    x : ndarray, shape (N, C_in, H, W), float32 or float64
    w : ndarray, shape (C_in, C_out // groups, R, S), same dtype as ``x``
    b : ndarray, shape (C_out,), optional
    stride, dilation : int or (int, int)
    padding : int or (int, int)
        Rows/columns removed from each side of the full output (``dilation * (R - 1) - padding``
        of zero padding on the input, in the language of the equivalent convolution).
    output_padding : int or (int, int)
        Rows/columns added at the bottom/right of the output, which selects among the output
        sizes that a strided :func:`conv2d` maps to the same input size. Each must be smaller
        than the stride or the dilation along its axis.
    groups : int
        Input and output channels are split into ``groups`` independent convolutions.
    kernel : str, optional
        One of :data:`numbaconv.KERNELS`; ``'auto'`` picks what it picks for the backward pass of
        the equivalent convolution.

    Returns
    -------
    y : ndarray, shape (N, C_out, OH, OW), dtype of ``x``
        ``OH = (H - 1) * stride_h - 2 * padding_h + dilation_h * (R - 1) + output_padding_h + 1``,
        likewise OW.

    Notes
    -----
    ``im2col``, ``winograd`` and ``direct`` compute it as the input gradient alone (no columns
    of an input, no weight gradient); ``numpy`` runs a whole backward pass and discards its
    weight and bias gradients, about twice the arithmetic of the result.
    """
    geom, _ = validate_conv_transpose(
        x,
        w,
        b,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
    )
    name = registry.resolve(kernel)
    if name == "auto" and geom.batch and registry.transposed_via_subpixel(geom, x.dtype):
        plan = subpixel.plan(geom, x.shape)
        implicit = subpixel.implicit_applies(plan, x.itemsize)
        with kernel_guard(w.size):
            stacked = subpixel.stacked_weights(_for_kernel(w), plan, packed=implicit)
        if implicit:
            bias = None if b is None else _for_kernel(b)
            with kernel_guard(geom.flops):
                return subpixel.implicit_forward(_for_kernel(x), stacked, bias, plan)
        sub_geom = _subpixel_geometry(plan)
        inner = registry.subpixel_forward_kernel(sub_geom, x.dtype)
        z = _run_forward(x, stacked, None, sub_geom, inner)
        with kernel_guard(z.size):
            return subpixel.shuffle(z, plan, None if b is None else _for_kernel(b))
    y = _run_input_gradient(_as_adjoint_output(x, geom), w, geom, name)
    if b is not None:
        y += np.reshape(b, (1, -1, 1, 1))
    return y


def _subpixel_geometry(plan: subpixel.SubPixel) -> ConvGeometry:
    """The stride-1 convolution of a transposed one's sub-pixel form."""
    return make_geometry(
        plan.x_shape,
        (plan.stacked, plan.x_shape[1], plan.taps_h, plan.taps_w),
        padding=plan.padding,
    )


def conv_transpose2d_backward(
    grad_y: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    output_padding: int | tuple[int, int] = 0,
    groups: int = 1,
    dilation: int | tuple[int, int] = 1,
    kernel: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`conv_transpose2d` with respect to ``x``, ``w`` and the bias.

    Parameters are those of :func:`conv_transpose2d`; ``grad_y`` is the gradient of the loss
    with respect to its output, shape (N, C_out, OH, OW), same dtype.

    Returns
    -------
    grad_x : ndarray, shape of ``x``
        The :func:`conv2d` of ``grad_y`` with ``w`` and the same options.
    grad_w : ndarray, shape of ``w``
        The weight gradient of that convolution for output gradient ``x``.
    grad_b : ndarray, shape (C_out,)
        ``grad_y`` summed over batch, height and width.
    """
    geom, dtype = validate_conv_transpose(
        x,
        w,
        None,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
    )
    validate_grad_shape(grad_y, geom.input_shape, dtype)
    return _conv_transpose2d_backward(grad_y, x, w, geom, registry.resolve(kernel))


def _conv_transpose2d_backward(grad_y, x, w, geom: ConvGeometry, name: str):
    """:func:`conv_transpose2d_backward` once the arrays are validated."""
    if (
        name == "auto"
        and geom.batch
        and registry.transposed_via_subpixel(geom, x.dtype, "backward")
    ):
        plan = subpixel.plan(geom, x.shape)
        with kernel_guard(grad_y.size):
            stacked = subpixel.stacked_weights(_for_kernel(w), plan)
        if blas_inside_kernels() and subpixel.one_tap_backward_applies(plan, x.itemsize):
            with kernel_guard(2 * geom.flops), single_threaded_blas():
                grad_x, grad_stacked = subpixel.one_tap_backward(
                    _for_kernel(grad_y), _for_kernel(x), stacked, plan
                )
        else:
            with kernel_guard(grad_y.size):
                grad_z = subpixel.unshuffle(_for_kernel(grad_y), plan)
            sub_geom = _subpixel_geometry(plan)
            grad_x, grad_stacked, _ = _run_backward(grad_z, x, stacked, sub_geom, "auto")
        with kernel_guard(w.size):
            grad_w = subpixel.weights_from_stacked(grad_stacked, plan)
        return grad_x, grad_w, _transposed_bias_gradient(grad_y, name)
    if geom.batch and registry.transposed_shares_columns(geom, x.dtype, name):
        # grad-x and grad-w read the same columns of grad_y: built once.
        adjoint_output = _for_kernel(_as_adjoint_output(x, geom))
        with kernel_guard(2 * geom.flops):
            grad_x, grad_w = forward_and_weight_gradient(
                _for_kernel(grad_y), _for_kernel(w), adjoint_output, geom
            )
    else:
        grad_x = _run_forward(grad_y, w, None, geom, name)
        grad_w = _run_weight_gradient(_as_adjoint_output(x, geom), grad_y, w, geom, name)
    if grad_x.shape != x.shape:  # output_padding >= stride: drop the rows x does not have
        grad_x = np.ascontiguousarray(grad_x[:, :, : x.shape[2], : x.shape[3]])
    return grad_x, grad_w, _transposed_bias_gradient(grad_y, name)


def _transposed_bias_gradient(grad_y: np.ndarray, name: str) -> np.ndarray:
    """``grad_y`` summed over batch, height and width, in its dtype."""
    # Summed in float64 for both dtypes, like the kernels' own bias gradients; in parallel,
    # rows in order, except for the plain-NumPy kernel (np.sum took 1.35 ms of U-Net's
    # 16x64x56x56 grad_y, a tenth of the backward pass, on 2 cores).
    if name == "numpy":
        grad_b = np.sum(grad_y, axis=(0, 2, 3), dtype=np.float64)
    else:
        grad_b = np.empty(grad_y.shape[1], np.float64)
        with kernel_guard(grad_y.size):
            grad_bias_kernel(_for_kernel(grad_y), grad_b)
    return grad_b.astype(grad_y.dtype)


# --------------------------------------------------------------------------------------------
# 1-D convolution: the 2-D functions on (N, C, 1, L) views
# --------------------------------------------------------------------------------------------


def _as_2d(a: np.ndarray, name: str, layout: str) -> np.ndarray:
    """A 3-D array ``(A, B, L)`` as the 4-D view ``(A, B, 1, L)`` (never a copy)."""
    a = as_array(a, name)
    if a.ndim != 3:
        raise ValueError(f"{name} must be 3-D {layout}, got {a.ndim}-D with shape {a.shape}")
    return a[:, :, np.newaxis, :]


def _shape_1d(shape_2d: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """``(A, B, 1, L)`` as ``(A, B, L)``."""
    return shape_2d[0], shape_2d[1], shape_2d[3]


def _as_1d(a: np.ndarray) -> np.ndarray:
    """A 4-D result ``(A, B, 1, L)`` as ``(A, B, L)`` (a view)."""
    return a[:, :, 0, :]


def conv1d(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    stride: int | tuple[int] = 1,
    padding: int | tuple[int] | str = 0,
    dilation: int | tuple[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    kernel: str | None = None,
) -> np.ndarray:
    """1-D convolution with the semantics of ``torch.nn.functional.conv1d``.

    Runs :func:`conv2d` on ``(N, C, 1, L)`` views of the arrays (no copy).

    Parameters
    ----------
    x : ndarray, shape (N, C, L), float32 or float64
    w : ndarray, shape (K, C // groups, k), same dtype as ``x``
    b : ndarray, shape (K,), optional
    stride, dilation : int or (int,)
    padding : int, (int,), ``'valid'`` or ``'same'``
    groups, padding_mode, kernel
        As for :func:`conv2d`.

    Returns
    -------
    y : ndarray, shape (N, K, OL), dtype of ``x``
        ``OL = (L + 2 * padding - dilation * (k - 1) - 1) // stride + 1``.
    """
    y = conv2d(
        _as_2d(x, "x", "(N, C, L)"),
        _as_2d(w, "w", "(K, C // groups, k)"),
        b,
        groups=groups,
        padding_mode=padding_mode,
        kernel=kernel,
        **options_1d(stride, padding, dilation),
    )
    return _as_1d(y)


def conv1d_backward(
    grad_y: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    *,
    stride: int | tuple[int] = 1,
    padding: int | tuple[int] | str = 0,
    dilation: int | tuple[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    kernel: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`conv1d` with respect to ``x``, ``w`` and the bias.

    Parameters are those of :func:`conv1d`; ``grad_y`` has the output's shape (N, K, OL).

    Returns
    -------
    grad_x : ndarray, shape of ``x``
    grad_w : ndarray, shape of ``w``
    grad_b : ndarray, shape (K,)
    """
    x4, w4 = _as_2d(x, "x", "(N, C, L)"), _as_2d(w, "w", "(K, C // groups, k)")
    options = options_1d(stride, padding, dilation)
    geom, dtype = validate_conv(x4, w4, None, groups=groups, **options)
    mode = _checked_mode(padding_mode, geom)
    # Checked against the 1-D shape, so that the message names the shape the caller knows.
    validate_grad_shape(grad_y, _shape_1d(geom.output_shape), dtype)
    grad_x, grad_w, grad_b = _conv2d_backward(
        grad_y[:, :, np.newaxis, :], x4, w4, geom, mode, registry.resolve(kernel)
    )
    return _as_1d(grad_x), _as_1d(grad_w), grad_b


def conv_transpose1d(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    stride: int | tuple[int] = 1,
    padding: int | tuple[int] = 0,
    output_padding: int | tuple[int] = 0,
    groups: int = 1,
    dilation: int | tuple[int] = 1,
    kernel: str | None = None,
) -> np.ndarray:
    """1-D transposed convolution with the semantics of ``torch.nn.functional.conv_transpose1d``.

    Runs :func:`conv_transpose2d` on ``(N, C, 1, L)`` views of the arrays (no copy).

    Parameters
    ----------
    x : ndarray, shape (N, C_in, L), float32 or float64
    w : ndarray, shape (C_in, C_out // groups, k), same dtype as ``x``
    b : ndarray, shape (C_out,), optional
    stride, padding, output_padding, dilation : int or (int,)
    groups, kernel
        As for :func:`conv_transpose2d`.

    Returns
    -------
    y : ndarray, shape (N, C_out, OL), dtype of ``x``
        ``OL = (L - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1``.
    """
    y = conv_transpose2d(
        _as_2d(x, "x", "(N, C_in, L)"),
        _as_2d(w, "w", "(C_in, C_out // groups, k)"),
        b,
        groups=groups,
        kernel=kernel,
        **options_1d(stride, padding, dilation, output_padding),
    )
    return _as_1d(y)


def conv_transpose1d_backward(
    grad_y: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    *,
    stride: int | tuple[int] = 1,
    padding: int | tuple[int] = 0,
    output_padding: int | tuple[int] = 0,
    groups: int = 1,
    dilation: int | tuple[int] = 1,
    kernel: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`conv_transpose1d` with respect to ``x``, ``w`` and the bias.

    Parameters are those of :func:`conv_transpose1d`; ``grad_y`` has the output's shape
    (N, C_out, OL).

    Returns
    -------
    grad_x : ndarray, shape of ``x``
    grad_w : ndarray, shape of ``w``
    grad_b : ndarray, shape (C_out,)
    """
    x4, w4 = _as_2d(x, "x", "(N, C_in, L)"), _as_2d(w, "w", "(C_in, C_out // groups, k)")
    options = options_1d(stride, padding, dilation, output_padding)
    geom, dtype = validate_conv_transpose(x4, w4, None, groups=groups, **options)
    validate_grad_shape(grad_y, _shape_1d(geom.input_shape), dtype)
    grad_x, grad_w, grad_b = _conv_transpose2d_backward(
        grad_y[:, :, np.newaxis, :], x4, w4, geom, registry.resolve(kernel)
    )
    return _as_1d(grad_x), _as_1d(grad_w), grad_b


# --------------------------------------------------------------------------------------------
# The teaching im2col / col2im
# --------------------------------------------------------------------------------------------


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


__all__ = [
    "conv1d",
    "conv1d_backward",
    "conv2d",
    "conv2d_backward",
    "conv_transpose1d",
    "conv_transpose1d_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "col2im",
    "fold_padding",
    "im2col",
    "pad_input",
]
