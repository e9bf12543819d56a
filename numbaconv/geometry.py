"""Convolution geometry and all input validation, in one place.

Notation used throughout numbaconv:

* input ``x``: ``(N, C, H, W)`` — batch, channels, height, width;
* weight ``w``: ``(K, C // groups, R, S)`` — filters, channels per group, filter height, width;
* output ``y``: ``(N, K, OH, OW)``.

Along one spatial axis, with padding ``pad_lo``/``pad_hi`` before/after, stride ``s`` and
dilation ``d``, the output size is::

    out = (in + pad_lo + pad_hi - d * (k - 1) - 1) // s + 1

A transposed convolution is described by the geometry of its adjoint convolution (see
:func:`make_transposed_geometry`); its output size along one axis is
:func:`transposed_output_size`. A 1-D convolution is a 2-D one of height 1 (:func:`options_1d`).
``padding_mode`` is checked against the resolved padding by :func:`check_padding_mode`.

Pure Python: no Numba here. Every public entry point calls :func:`conv_geometry` (or one of the
smaller checks) once; the kernels trust what they are given and never validate.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _int(value, name: str) -> int:
    """``value`` as a Python int; bools and non-integers are a TypeError."""
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None


def pair(value, name: str) -> tuple[int, int]:
    """Normalise an int or an ``(h, w)`` pair of ints to a pair."""
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return _int(value[0], name), _int(value[1], name)
    v = _int(value, name)
    return v, v


def output_size(size: int, filter_size: int, stride: int, pad_lo: int, pad_hi: int, dilation: int):
    """Output extent along one axis (the one place this formula lives)."""
    return (size + pad_lo + pad_hi - dilation * (filter_size - 1) - 1) // stride + 1


def resolve_padding(padding, filter_hw, stride_hw, dilation_hw) -> tuple[int, int, int, int]:
    """Padding as ``(top, bottom, left, right)``.

    ``padding`` is an int, an ``(h, w)`` pair, ``'valid'`` (no padding) or ``'same'`` (output size
    equals input size; stride 1 only). With ``'same'`` and an even total padding, the extra
    row/column goes at the bottom/right, as PyTorch does.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if stride_hw != (1, 1):
                raise ValueError("padding='same' is only supported with stride 1")
            pads = []
            for k, d in zip(filter_hw, dilation_hw, strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return ph, ph, pw, pw


def check_dtype(array: np.ndarray, name: str) -> np.dtype:
    if array.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {array.dtype}; numbaconv supports float32 and float64 only"
        )
    return array.dtype


def as_array(value, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ConvGeometry:
    """Everything a kernel needs to know about one convolution, already validated."""

    batch: int
    in_channels: int
    in_height: int
    in_width: int
    out_channels: int
    filter_height: int
    filter_width: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    dilation_h: int
    dilation_w: int
    groups: int
    out_height: int
    out_width: int

    @property
    def in_channels_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_channels_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.in_height, self.in_width)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (
            self.out_channels,
            self.in_channels_per_group,
            self.filter_height,
            self.filter_width,
        )

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    @property
    def flops(self) -> int:
        """Multiply-adds of the forward pass, counted as 2 flops each."""
        return (
            2
            * self.batch
            * self.out_channels
            * self.out_height
            * self.out_width
            * self.in_channels_per_group
            * self.filter_height
            * self.filter_width
        )


def make_geometry(
    input_shape, weight_shape, *, stride=1, padding=0, dilation=1, groups=1
) -> ConvGeometry:
    """Validate shapes and hyper-parameters and return the normalised geometry."""
    n, c, h, w = input_shape
    k, c_per_group, r, s = weight_shape
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1, got {stride!r}")
    if dh < 1 or dw < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    groups = _int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if c % groups:
        raise ValueError(f"in_channels ({c}) must be divisible by groups ({groups})")
    if k % groups:
        raise ValueError(f"out_channels ({k}) must be divisible by groups ({groups})")
    if c_per_group != c // groups:
        raise ValueError(
            f"weight has {c_per_group} input channels per group but the input has {c} channels "
            f"and groups={groups} (expected weight.shape[1] == {c // groups})"
        )
    if min(k, r, s) < 1:
        raise ValueError(f"weight must have non-zero dimensions, got shape {tuple(weight_shape)}")
    if min(c, h, w) < 1:
        raise ValueError(
            f"input must have non-zero channels, height and width, got shape {tuple(input_shape)}"
        )
    top, bottom, left, right = resolve_padding(padding, (r, s), (sh, sw), (dh, dw))
    oh = output_size(h, r, sh, top, bottom, dh)
    ow = output_size(w, s, sw, left, right, dw)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"output size would be {oh}x{ow}: the (dilated) filter "
            f"{dh * (r - 1) + 1}x{dw * (s - 1) + 1} is larger than the padded input "
            f"{h + top + bottom}x{w + left + right}"
        )
    return ConvGeometry(
        n, c, h, w, k, r, s, sh, sw, top, bottom, left, right, dh, dw, groups, oh, ow
    )


def validate_conv(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1):
    """Check the arrays of a convolution; return ``(geometry, dtype)``."""
    x = as_array(x, "x")
    weight = as_array(weight, "w")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got {x.ndim}-D with shape {x.shape}")
    if weight.ndim != 4:
        raise ValueError(
            f"w must be 4-D (K, C // groups, R, S), got {weight.ndim}-D with shape {weight.shape}"
        )
    dtype = check_dtype(x, "x")
    if check_dtype(weight, "w") != dtype:
        raise TypeError(f"x and w must have the same dtype, got {x.dtype} and {weight.dtype}")
    geom = make_geometry(
        x.shape, weight.shape, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    if bias is not None:
        bias = as_array(bias, "b")
        if bias.shape != (geom.out_channels,):
            raise ValueError(
                f"b must have shape ({geom.out_channels},) to match w, got {bias.shape}"
            )
        if check_dtype(bias, "b") != dtype:
            raise TypeError(f"b must have the dtype of x ({dtype}), got {bias.dtype}")
    return geom, dtype


def validate_grad_output(grad_y, geom: ConvGeometry, dtype: np.dtype) -> None:
    validate_grad_shape(grad_y, geom.output_shape, dtype)


def validate_grad_shape(grad_y, expected_shape: tuple[int, ...], dtype: np.dtype) -> None:
    """``grad_y`` has the shape of the output it is the gradient of, and the dtype of ``x``."""
    grad_y = as_array(grad_y, "grad_y")
    if grad_y.shape != tuple(expected_shape):
        raise ValueError(
            f"grad_y must have the output's shape {tuple(expected_shape)}, got {grad_y.shape}"
        )
    if check_dtype(grad_y, "grad_y") != dtype:
        raise TypeError(f"grad_y must have the dtype of x ({dtype}), got {grad_y.dtype}")


# --------------------------------------------------------------------------------------------
# Padding modes
# --------------------------------------------------------------------------------------------

#: The values of ``padding_mode``, as ``torch.nn.Conv2d`` names them.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def check_padding_mode(mode, pads: tuple[int, int, int, int], input_hw: tuple[int, int]) -> str:
    """Validate ``padding_mode`` against the resolved ``(top, bottom, left, right)`` padding.

    As in PyTorch: ``'reflect'`` mirrors the input without repeating its edge, so each padding
    must be smaller than the input along its axis; ``'circular'`` may wrap around at most once,
    so each padding must be at most the input's size; ``'replicate'`` and ``'zeros'`` take any
    padding.
    """
    if not isinstance(mode, str) or mode not in PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {', '.join(map(repr, PADDING_MODES))}, got {mode!r}"
        )
    if mode in ("reflect", "circular"):
        sides = (("top", "height"), ("bottom", "height"), ("left", "width"), ("right", "width"))
        for pad, (side, axis) in zip(pads, sides, strict=True):
            size = input_hw[0] if axis == "height" else input_hw[1]
            if mode == "reflect" and pad >= size:
                raise ValueError(
                    f"padding_mode='reflect' needs each padding smaller than the input: "
                    f"padding {pad} at the {side} of an input of {axis} {size}"
                )
            if mode == "circular" and pad > size:
                raise ValueError(
                    f"padding_mode='circular' needs each padding at most the input's size "
                    f"(it wraps around once at most): padding {pad} at the {side} of an input "
                    f"of {axis} {size}"
                )
    return mode


# --------------------------------------------------------------------------------------------
# Transposed convolution
# --------------------------------------------------------------------------------------------


def transposed_output_size(
    size: int, filter_size: int, stride: int, padding: int, dilation: int, output_padding: int
) -> int:
    """Output extent of a transposed convolution along one axis (the one place it lives).

    ``(size - 1) * stride - 2 * padding + dilation * (filter_size - 1) + output_padding + 1``,
    the input size of the convolution whose gradient the transposed convolution is.
    """
    return (size - 1) * stride - 2 * padding + dilation * (filter_size - 1) + output_padding + 1


def make_transposed_geometry(
    input_shape, weight_shape, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1
) -> ConvGeometry:
    """Validate a transposed convolution and return the geometry of its adjoint convolution.

    A transposed convolution of ``x`` ``(N, C_in, H, W)`` with ``w`` ``(C_in, C_out // groups,
    R, S)`` is the gradient with respect to the input of the ordinary convolution that has
    weight ``w`` (``C_in`` filters of ``C_out // groups`` channels), the same stride, padding,
    dilation and groups, and an input of the transposed convolution's output shape
    ``(N, C_out, OH, OW)``. The returned :class:`ConvGeometry` describes that convolution: its
    ``input_shape`` is the transposed output, its ``weight_shape`` is ``w``'s, and its
    ``output_shape`` is ``x``'s, except when ``output_padding >= stride`` (allowed when it is
    below the dilation): then the convolution has ``output_padding // stride`` more output
    rows (columns) than ``x``, which the caller treats as zeros.
    """
    n, c_in, h, w = input_shape
    weight_in, c_out_per_group, r, s = weight_shape
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    if isinstance(padding, str):
        raise ValueError(
            f"padding must be an int or a pair of ints for a transposed convolution, "
            f"got {padding!r} ('same' and 'valid' are for conv2d)"
        )
    ph, pw = pair(padding, "padding")
    oph, opw = pair(output_padding, "output_padding")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1, got {stride!r}")
    if dh < 1 or dw < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    if oph < 0 or opw < 0:
        raise ValueError(f"output_padding must be non-negative, got {output_padding!r}")
    if not ((oph < sh or oph < dh) and (opw < sw or opw < dw)):
        raise ValueError(
            f"output_padding must be smaller than either stride or dilation (as in PyTorch), "
            f"got output_padding={(oph, opw)} with stride={(sh, sw)} and dilation={(dh, dw)}"
        )
    groups = _int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if c_in % groups:
        raise ValueError(f"in_channels ({c_in}) must be divisible by groups ({groups})")
    if weight_in != c_in:
        raise ValueError(
            f"weight of shape {tuple(weight_shape)} expects {weight_in} input channels "
            f"(a transposed convolution's weight is (C_in, C_out // groups, R, S)), "
            f"but the input has {c_in}"
        )
    if min(c_out_per_group, r, s) < 1:
        raise ValueError(f"weight must have non-zero dimensions, got shape {tuple(weight_shape)}")
    if min(h, w) < 1:
        raise ValueError(
            f"input must have non-zero channels, height and width, got shape {tuple(input_shape)}"
        )
    out_h = transposed_output_size(h, r, sh, ph, dh, oph)
    out_w = transposed_output_size(w, s, sw, pw, dw, opw)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"output size would be {out_h}x{out_w}: the padding {(ph, pw)} removes more than "
            f"the transposed convolution of a {h}x{w} input produces"
        )
    return make_geometry(
        (n, c_out_per_group * groups, out_h, out_w),
        weight_shape,
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        groups=groups,
    )


def validate_conv_transpose(
    x, weight, bias=None, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1
):
    """Check the arrays of a transposed convolution; return ``(adjoint geometry, dtype)``.

    See :func:`make_transposed_geometry` for the geometry.
    """
    x = as_array(x, "x")
    weight = as_array(weight, "w")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (N, C_in, H, W), got {x.ndim}-D with shape {x.shape}")
    if weight.ndim != 4:
        raise ValueError(
            f"w must be 4-D (C_in, C_out // groups, R, S), got {weight.ndim}-D with shape "
            f"{weight.shape}"
        )
    dtype = check_dtype(x, "x")
    if check_dtype(weight, "w") != dtype:
        raise TypeError(f"x and w must have the same dtype, got {x.dtype} and {weight.dtype}")
    geom = make_transposed_geometry(
        x.shape,
        weight.shape,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
    )
    if bias is not None:
        bias = as_array(bias, "b")
        if bias.shape != (geom.in_channels,):
            raise ValueError(
                f"b must have shape ({geom.in_channels},) (C_out = w.shape[1] * groups), "
                f"got {bias.shape}"
            )
        if check_dtype(bias, "b") != dtype:
            raise TypeError(f"b must have the dtype of x ({dtype}), got {bias.dtype}")
    return geom, dtype


# --------------------------------------------------------------------------------------------
# 1-D convolution, as 2-D convolution of height-1 images
# --------------------------------------------------------------------------------------------


def single(value, name: str) -> int:
    """Normalise an int or a one-element tuple/list of an int (PyTorch's 1-D options) to an int."""
    if isinstance(value, tuple | list):
        if len(value) != 1:
            raise ValueError(
                f"{name} must be an int or a 1-tuple for 1-D convolution, got {value!r}"
            )
        (value,) = value
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a 1-tuple of an int, got {value!r}") from None


def swap_axes(geom: ConvGeometry) -> ConvGeometry:
    """The same convolution with its two spatial axes exchanged: the geometry of the input,
    filters and output transposed in their last two axes (``x.transpose(0, 1, 3, 2)``)."""
    g = geom
    return ConvGeometry(
        g.batch, g.in_channels, g.in_width, g.in_height, g.out_channels, g.filter_width,
        g.filter_height, g.stride_w, g.stride_h, g.pad_left, g.pad_right, g.pad_top,
        g.pad_bottom, g.dilation_w, g.dilation_h, g.groups, g.out_width, g.out_height,
    )  # fmt: skip


def options_1d(stride=1, padding=0, dilation=1, output_padding=None) -> dict:
    """The 2-D keyword options of a 1-D convolution on ``(N, C, 1, L)`` views.

    The length axis becomes the width; the height axis has stride 1, dilation 1, no padding (and
    no output padding). Ranges are checked here so that errors name the 1-D values the caller
    gave, not their 2-D pairs. ``'same'`` and ``'valid'`` padding pass through unchanged.
    """
    s = single(stride, "stride")
    d = single(dilation, "dilation")
    if s < 1:
        raise ValueError(f"stride must be >= 1, got {stride!r}")
    if d < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    if isinstance(padding, str):
        pad2 = padding
    else:
        p = single(padding, "padding")
        if p < 0:
            raise ValueError(f"padding must be non-negative, got {padding!r}")
        pad2 = (0, p)
    options = dict(stride=(1, s), padding=pad2, dilation=(1, d))
    if output_padding is not None:
        op = single(output_padding, "output_padding")
        if op < 0:
            raise ValueError(f"output_padding must be non-negative, got {output_padding!r}")
        options["output_padding"] = (0, op)
    return options
