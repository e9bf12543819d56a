"""Strided transposed convolutions as one stride-1 convolution and a depth-to-space shuffle.

A transposed convolution with stride ``s`` adds ``x[m] * w[r]`` onto output ``o = s*m - p + r``
(one axis; ``p`` its padding). Write ``o + p = s*q + a`` with the output's phase ``a`` in
``range(s)``: the taps that reach it are ``r = a + s*k``, from input ``m = q - k``. So when the
filter's ``R`` taps are a multiple of the stride, phase ``a`` of the output is a plain stride-1
convolution of ``x`` with the ``R // s``-tap sub-filter ``w[a::s]`` (flipped, since conv2d
correlates), padded by ``R // s - 1`` on both sides, whose output ``q`` is output row
``s*q + a - p``. The ``s_h * s_w`` phases read the same input, so their sub-filters stack into
one convolution with ``s_h * s_w * C_out`` filters (the "sub-pixel" form of ESPCN and of
upsampling layers), and its output is shuffled into the phases' rows and columns: the same
products as the scatter of :func:`numbaconv.functional.conv_transpose2d`'s adjoint kernels, summed
in another order, plus the few products of the padded edge's outputs that no output keeps (for
DCGAN's 4x4 stride-2 layer on 8x8 inputs, 9x9 per phase where 8x8 are kept).

Why: the stride-1 convolution runs on the fastest dense paths (GEMMs with ``s_h * s_w`` times
more filters, no column scatter); a 2x2 stride-2 up-convolution (U-Net) becomes a 1x1
convolution, a single GEMM. Its backward pass is the stride-1 backward pass on the phases'
gathered output gradient: grad-x directly, grad-w as the sub-filters' gradients put back.

Only ``auto`` takes this route (:func:`numbaconv.registry.transposed_route`); a named kernel
computes the transposed convolution as its own input gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..geometry import ConvGeometry


def applies(geom: ConvGeometry) -> bool:
    """``geom`` (the adjoint convolution of a transposed one) is strided, undilated, one
    group, and each filter size a multiple of its stride."""
    return (
        max(geom.stride_h, geom.stride_w) > 1
        and geom.dilation_h == geom.dilation_w == 1
        and geom.groups == 1
        and geom.filter_height % geom.stride_h == 0
        and geom.filter_width % geom.stride_w == 0
    )


@dataclass(frozen=True)
class SubPixel:
    """A transposed convolution (``geom``: its adjoint convolution; ``x_shape``: its input's
    shape) as a stride-1 convolution of ``x`` with ``stacked`` filters (``taps_h x taps_w``,
    padding ``taps - 1``) whose ``out_h x out_w`` outputs are shuffled into the result."""

    geom: ConvGeometry
    x_shape: tuple[int, int, int, int]
    taps_h: int
    taps_w: int

    @property
    def stacked(self) -> int:
        return self.geom.stride_h * self.geom.stride_w * self.geom.in_channels

    @property
    def padding(self) -> tuple[int, int]:
        return self.taps_h - 1, self.taps_w - 1

    @property
    def out_h(self) -> int:
        return self.x_shape[2] + self.taps_h - 1

    @property
    def out_w(self) -> int:
        return self.x_shape[3] + self.taps_w - 1


def plan(geom: ConvGeometry, x_shape) -> SubPixel:
    """The sub-pixel form of a transposed convolution for which :func:`applies`."""
    return SubPixel(
        geom,
        tuple(x_shape),
        geom.filter_height // geom.stride_h,
        geom.filter_width // geom.stride_w,
    )


# The copies below are plain assignments (and one addition of the bias), in parallel over whole
# planes or filters: the same bits whatever the thread count. NumPy's strided slice assignments
# did the same in one thread, and the zero-filled result cost a pass of page faults of its own:
# U-Net's 16x64x56x56 output took 1.0 ms to shuffle in a warm loop and several more when the
# memory was fresh (AMD EPYC Zen 5, 2 cores).


@njit(parallel=True, cache=True)
def stack_kernel(w, stacked, stride_h, stride_w):
    """``stacked[(a*s_w + c)*C_out + o, i, k, m] = w[i, o, a + s_h*(T_h-1-k),
    c + s_w*(T_w-1-m)]`` (``T``: the sub-filters' taps)."""
    c_in, c_out, _, _ = w.shape
    _, _, taps_h, taps_w = stacked.shape
    for f in prange(stride_h * stride_w * c_out):
        phase = f // c_out
        o = f - phase * c_out
        a = phase // stride_w
        c = phase - a * stride_w
        for i in range(c_in):
            for k in range(taps_h):
                r = a + stride_h * (taps_h - 1 - k)
                for m in range(taps_w):
                    stacked[f, i, k, m] = w[i, o, r, c + stride_w * (taps_w - 1 - m)]


@njit(parallel=True, cache=True)
def unstack_kernel(stacked, w, stride_h, stride_w):
    """The inverse of :func:`stack_kernel` (for the sub-filters' gradients)."""
    c_in, c_out, _, _ = w.shape
    _, _, taps_h, taps_w = stacked.shape
    for i in prange(c_in):
        for o in range(c_out):
            for a in range(stride_h):
                for k in range(taps_h):
                    r = a + stride_h * (taps_h - 1 - k)
                    for c in range(stride_w):
                        f = (a * stride_w + c) * c_out + o
                        for m in range(taps_w):
                            w[i, o, r, c + stride_w * (taps_w - 1 - m)] = stacked[f, i, k, m]


@njit(parallel=True, cache=True)
def shuffle_kernel(z, bias, use_bias, y, stride_h, pad_top, stride_w, column_phase, column_source):
    """``y[n, o, s_h*q + a - pad_top, ox] = z[n, (a*s_w + c)*C_out + o, q, l]`` (plus ``bias[o]``)
    with ``c = column_phase[ox]`` and ``l = column_source[ox]``; zeros (the bias) where ``q`` or
    ``l`` (-1) is past ``z``'s outputs. Every element of ``y`` is written."""
    n_batch, c_out, out_h, out_w = y.shape
    z_h = z.shape[2]
    for job in prange(n_batch * c_out):
        n = job // c_out
        o = job - n * c_out
        for oy in range(out_h):
            q = (oy + pad_top) // stride_h
            a = oy + pad_top - q * stride_h
            row = y[n, o, oy]
            first = a * stride_w * c_out + o
            if use_bias:
                b = bias[o]
                for ox in range(out_w):
                    source = column_source[ox]
                    if q < z_h and source >= 0:
                        row[ox] = z[n, first + column_phase[ox] * c_out, q, source] + b
                    else:
                        row[ox] = b
            else:
                for ox in range(out_w):
                    source = column_source[ox]
                    if q < z_h and source >= 0:
                        row[ox] = z[n, first + column_phase[ox] * c_out, q, source]
                    else:
                        row[ox] = 0


@njit(parallel=True, cache=True)
def unshuffle_kernel(grad_y, grad_z, stride_h, pad_top, stride_w, pad_left):
    """``grad_z[n, (a*s_w + c)*C_out + o, q, l] = grad_y[n, o, s_h*q + a - pad_top,
    s_w*l + c - pad_left]``, zeros where that is outside ``grad_y``. Every element is written."""
    n_batch, c_out, out_h, out_w = grad_y.shape
    _, stacked, z_h, z_w = grad_z.shape
    for job in prange(n_batch * stacked):
        n = job // stacked
        f = job - n * stacked
        phase = f // c_out
        o = f - phase * c_out
        a = phase // stride_w
        c = phase - a * stride_w
        for q in range(z_h):
            oy = stride_h * q + a - pad_top
            row = grad_z[n, f, q]
            if oy < 0 or oy >= out_h:
                for m in range(z_w):
                    row[m] = 0
                continue
            source = grad_y[n, o, oy]
            for m in range(z_w):
                ox = stride_w * m + c - pad_left
                row[m] = source[ox] if 0 <= ox < out_w else 0


def stacked_weights(w: np.ndarray, sp: SubPixel) -> np.ndarray:
    """The stride-1 convolution's filters, phase-major: filter ``(a*s_w + c)*C_out + o`` is
    ``w[:, o, a::s_h, c::s_w]`` flipped."""
    stacked = np.empty((sp.stacked, w.shape[0], sp.taps_h, sp.taps_w), dtype=w.dtype)
    stack_kernel(w, stacked, sp.geom.stride_h, sp.geom.stride_w)
    return stacked


def weights_from_stacked(grad_stacked: np.ndarray, sp: SubPixel) -> np.ndarray:
    """The inverse of :func:`stacked_weights` (for the sub-filters' gradients)."""
    w = np.empty(sp.geom.weight_shape, dtype=grad_stacked.dtype)
    unstack_kernel(grad_stacked, w, sp.geom.stride_h, sp.geom.stride_w)
    return w


def shuffle(z: np.ndarray, sp: SubPixel, bias: np.ndarray | None = None) -> np.ndarray:
    """The transposed convolution's output from the stride-1 convolution's (depth to space),
    plus ``bias``; zeros (the bias) on outputs no input reaches (``output_padding`` beyond the
    filter's reach)."""
    g = sp.geom
    columns = np.arange(g.in_width) + g.pad_left
    source = columns // g.stride_w
    source[source >= sp.out_w] = -1
    y = np.empty(g.input_shape, dtype=z.dtype)
    use_bias = bias is not None
    bias = bias if use_bias else np.zeros(1, dtype=z.dtype)
    phase = columns % g.stride_w
    shuffle_kernel(z, bias, use_bias, y, g.stride_h, g.pad_top, g.stride_w, phase, source)
    return y


def unshuffle(grad_y: np.ndarray, sp: SubPixel) -> np.ndarray:
    """The stride-1 convolution's output gradient from the result's (space to depth): zeros on
    the outputs that :func:`shuffle` drops."""
    g = sp.geom
    grad_z = np.empty((grad_y.shape[0], sp.stacked, sp.out_h, sp.out_w), dtype=grad_y.dtype)
    unshuffle_kernel(grad_y, grad_z, g.stride_h, g.pad_top, g.stride_w, g.pad_left)
    return grad_z
