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
DCGAN's 4x4 stride-2 layer on 8x8 inputs, 9x9 per phase where 8x8 are kept; phase by phase,
:func:`implicit_forward` computes only the kept ones).

Why: the stride-1 convolution runs on the fastest dense paths (GEMMs with ``s_h * s_w`` times
more filters, no column scatter); a 2x2 stride-2 up-convolution (U-Net) becomes a 1x1
convolution, a single GEMM. Its backward pass is the stride-1 backward pass on the phases'
gathered output gradient: grad-x directly, grad-w as the sub-filters' gradients put back; with
one tap per phase, image by image (:func:`one_tap_backward`: each image's gathered gradient stays
in the core's cache for both products, no whole gathered gradient).

Only ``auto`` takes this route (:func:`numbaconv.registry.transposed_via_subpixel`); a named
kernel computes the transposed convolution as its own input gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from .._workspace import take
from ..geometry import ConvGeometry
from ._blas import gemm_nn_into, gemm_nt_add
from ._loops import zero_row
from .im2col import BACKWARD_LANES
from .microkernel import (
    gemm_nn,
    gemm_nn_rows,
    own_gemm_pays,
    own_gemm_size_pays,
    own_weight_gradient,
    row_blocks,
)


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


#: Stacked filters per job of :func:`stack_kernel`.
STACK_BLOCK = 16


@njit(parallel=True, cache=True)
def stack_kernel(w, stacked, stride_h, stride_w, starts, packed):
    """``stacked[(a*s_w + c)*C_out + o, i, k, m] = w[i, o, a + s_h*(T_h-1-k),
    c + s_w*(T_w-1-m)]`` (``T``: the sub-filters' taps). A job is the stacked filters from
    ``starts[job]`` to ``starts[job + 1]``, input channel by input channel: it reads a run of
    ``w[i]`` and writes one run per filter. (A stacked filter per job, reading ``w`` at a stride
    of C_out*R*S for each ``i``, took 0.27 ms on DCGAN's 256x128x4x4 filters; an input channel
    per job, writing to 512 filters' pages at each, 0.60 ms; 2 threads, AMD EPYC Zen 5.)

    ``packed``: each job's filters are a block of a tile's rows, laid out as
    :func:`~.microkernel.pack_rows` lays them out (column by column), one run for the job."""
    c_in, c_out, _, _ = w.shape
    filters, _, taps_h, taps_w = stacked.shape
    _, _, filter_h, filter_w = w.shape
    taps = taps_h * taps_w
    depth = c_in * taps
    w_flat = w.reshape(-1)
    out = stacked.reshape(-1)
    for block in prange(starts.shape[0] - 1):
        f0 = starts[block]
        count = starts[block + 1] - f0
        # Element (filter f0 + j, column k) of the block, k = i*taps + t, at j*j_step + k*k_step.
        j_step, k_step = (1, count) if packed else (depth, 1)
        # Per filter and tap, the offset of its source in w[i] (integer divisions and array
        # views in the channel loop cost more than the copies).
        source = np.empty((count, taps), dtype=np.int64)
        for j in range(count):
            phase = (f0 + j) // c_out
            o = f0 + j - phase * c_out
            a = phase // stride_w
            c = phase - a * stride_w
            for k in range(taps_h):
                r = a + stride_h * (taps_h - 1 - k)
                for m in range(taps_w):
                    column = c + stride_w * (taps_w - 1 - m)
                    source[j, k * taps_w + m] = (o * filter_h + r) * filter_w + column
        per_input = c_out * filter_h * filter_w
        for i in range(c_in):
            base = i * per_input
            for t in range(taps):
                dst = f0 * depth + (i * taps + t) * k_step
                for j in range(count):
                    out[dst + j * j_step] = w_flat[base + source[j, t]]


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


@njit(cache=True, inline="always")
def _unshuffle_column(src, m, stride_w, shift, out_w):
    """``src[s_w*m + shift]``, or 0 outside ``src`` (``out_w`` long)."""
    ox = stride_w * m + shift
    return src[ox] if 0 <= ox < out_w else 0


@njit(cache=True, inline="always")
def unshuffle_planes(source, grad_z, o, a, c_out, stride_h, pad_top, stride_w, pad_left):
    """``grad_z[(a*s_w + c)*C_out + o, q, m] = source[s_h*q + a - pad_top, s_w*m + c -
    pad_left]`` for every column phase ``c``, zeros where that is outside ``source`` (output
    channel ``o``'s plane of ``grad_y``): row phase ``a``'s planes of the stacked convolution's
    output gradient from one plane of ``grad_y``. Every element of those planes is written.

    At column stride 2 both phases come from one pass over each source row, its even and odd
    elements, which LLVM vectorises as one interleaved load (a phase at a time, each read every
    other element, 4x slower: U-Net's 16x64x56x56 gradient, 2 threads, 1.0 -> 0.26 ms)."""
    out_h, out_w = source.shape
    z_h, z_w = grad_z.shape[1], grad_z.shape[2]
    f0 = a * stride_w * c_out + o
    if stride_w == 2:
        # Columns m where both phases read inside the row: 0 <= 2m - pad_left, 2m + 1 - pad_left
        # < out_w.
        lo = min(z_w, max(0, -((-pad_left) // 2)))
        hi = max(lo, min(z_w, (out_w - 2 + pad_left) // 2 + 1))
        for q in range(z_h):
            oy = stride_h * q + a - pad_top
            even = grad_z[f0, q]
            odd = grad_z[f0 + c_out, q]
            if oy < 0 or oy >= out_h:
                even[:] = 0
                odd[:] = 0
                continue
            src = source[oy]
            for m in range(lo):
                even[m] = _unshuffle_column(src, m, 2, -pad_left, out_w)
                odd[m] = _unshuffle_column(src, m, 2, 1 - pad_left, out_w)
            for m in range(lo, hi):
                even[m] = src[2 * m - pad_left]
                odd[m] = src[2 * m + 1 - pad_left]
            for m in range(hi, z_w):
                even[m] = _unshuffle_column(src, m, 2, -pad_left, out_w)
                odd[m] = _unshuffle_column(src, m, 2, 1 - pad_left, out_w)
        return
    for c in range(stride_w):
        plane = grad_z[f0 + c * c_out]
        for q in range(z_h):
            oy = stride_h * q + a - pad_top
            row = plane[q]
            if oy < 0 or oy >= out_h:
                row[:] = 0
                continue
            src = source[oy]
            for m in range(z_w):
                row[m] = _unshuffle_column(src, m, stride_w, c - pad_left, out_w)


@njit(parallel=True, cache=True)
def unshuffle_kernel(grad_y, grad_z, stride_h, pad_top, stride_w, pad_left):
    """``grad_z[n, (a*s_w + c)*C_out + o, q, l] = grad_y[n, o, s_h*q + a - pad_top,
    s_w*l + c - pad_left]``, zeros where that is outside ``grad_y`` (:func:`unshuffle_planes`,
    a job per image, row phase and output channel). Every element is written."""
    n_batch, c_out = grad_y.shape[0], grad_y.shape[1]
    per_image = stride_h * c_out
    for job in prange(n_batch * per_image):
        n = job // per_image
        a = (job - n * per_image) // c_out
        o = job - n * per_image - a * c_out
        unshuffle_planes(
            grad_y[n, o], grad_z[n], o, a, c_out, stride_h, pad_top, stride_w, pad_left
        )  # fmt: skip


def stacked_weights(w: np.ndarray, sp: SubPixel, packed: bool = False) -> np.ndarray:
    """The stride-1 convolution's filters, phase-major: filter ``(a*s_w + c)*C_out + o`` is
    ``w[:, o, a::s_h, c::s_w]`` flipped. ``packed``: each phase's filters, as the rows of a
    (C_out, C*T_h*T_w) matrix, laid out for the tiles (:func:`~.microkernel.pack_rows`), which
    :func:`implicit_forward` reads."""
    stacked = np.empty((sp.stacked, w.shape[0], sp.taps_h, sp.taps_w), dtype=w.dtype)
    if packed:
        c_out = sp.geom.in_channels
        starts = [p * c_out + i0 for p in range(sp.stacked // c_out) for i0, _ in row_blocks(c_out)]
    else:
        starts = list(range(0, sp.stacked, STACK_BLOCK))
    starts = np.array(starts + [sp.stacked], dtype=np.int64)
    stack_kernel(w, stacked, sp.geom.stride_h, sp.geom.stride_w, starts, packed)
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


# ---------------------------------------------------------------------------------------------
# The forward pass by implicit GEMM, one phase at a time


#: Images in one job of :func:`implicit_forward_kernel`, at most: DCGAN's 16x256x8x8 -> 128 4x4
#: forward, float32, one core, GFLOP/s of one phase's product (128 x 1024 @ 1024 x 72 G, when
#: the images lay side by side along the planes' rows): 164 (G = 1), 208 (2), 240 (4), 233 (8)
#: (AMD EPYC Zen 5); and so that a batch gives at least 4 jobs.
IMPLICIT_MAX_GROUP = 4

#: ... and within this many bytes of planes per lane (they stay in L2 while the phases read
#: them).
IMPLICIT_PLANES_BYTES = 2**20


@njit(parallel=True, cache=True)
def implicit_forward_kernel(
    x, w_mat, bias, y, planes_ws, ext_ws, group, taps_h, taps_w, stride_h, stride_w,
    pad_top, pad_left, tap_rows,
):  # fmt: skip
    """The transposed convolution's output, phase by phase, without the stacked convolution's
    output or the shuffle: per job (``group`` images, one phase ``(a, c)``), phase ``(a, c)``'s
    filters (rows ``(a*s_w + c)*C_out`` on of ``w_mat``, (s_h*s_w*C_out, C*T_h*T_w), each phase's
    rows packed for the tiles: ``stacked_weights(..., packed=True)``) times
    windows of the images' padded planes, read in place (:func:`~.microkernel.gemm_nn_rows`), for
    the rows ``q`` and columns ``l`` of the stacked convolution that phase keeps; each product
    element goes straight to ``y[n, o, s_h*q + a - pad_top, s_w*l + c - pad_left]``, plus
    ``bias[o]``.

    The planes interleave the images pixel by pixel where the sub-filters have more than one
    column tap: per channel ``H + 2(T_h - 1)`` rows of ``W + 2(T_w - 1)`` pixels (the image and
    its padding of ``T_w - 1`` columns each side) of ``group`` elements, image ``i``'s at
    element ``i``; zeros outside the images. So the columns that a phase keeps in an output row
    are one run of ``kept * group`` elements, a window of :func:`~.microkernel.gemm_nn_rows`
    (``row_w`` apart from row to row), and the product computes no output that the phase drops.
    (Images side by side along a row, each with its own ``T_w - 1`` zero columns, computed
    ``W + T_w - 1`` outputs an image where a phase keeps ``W``: DCGAN's 4x4 stride-2 layer on
    8x8 inputs, 9 columns for 8.) With one column tap there are no padding columns, and the
    images lie side by side, ``W`` each, copied row by row: the product computes whole rows,
    all kept but for the columns that the padding crops. (Interleaved, U-Net's 2x2 stride-2
    layer ran 0.89x as fast: strided copies in and out, for nothing saved.)
    ``tap_rows[(ch*T_h + k)*T_w + m]`` is tap ``(ch, k, m)``'s offset from a window's start.

    A lane's jobs run image block by image block, so it builds each block's planes once for
    its phases. Each output element comes from one product element: the same bits whatever the
    split into lanes."""
    n_batch, channels, height, width = x.shape
    c_out, out_h, out_w = y.shape[1], y.shape[2], y.shape[3]
    phases = stride_h * stride_w
    z_h, z_w = height + taps_h - 1, width + taps_w - 1
    row_w = group * (width + 2 * (taps_w - 1))
    plane = (height + 2 * (taps_h - 1)) * row_w
    interleave = taps_w > 1
    blocks = (n_batch + group - 1) // group
    jobs = blocks * phases
    lanes = planes_ws.shape[0]
    y_flat = y.reshape(-1)
    for lane in prange(lanes):
        planes = planes_ws[lane]
        product = ext_ws[lane]
        built = -1
        for job in range(jobs * lane // lanes, jobs * (lane + 1) // lanes):
            block = job // phases
            phase = job - block * phases
            n0 = block * group
            images = min(group, n_batch - n0)
            if block != built:
                zero_row(planes)
                for ch in range(channels):
                    for h in range(height):
                        start = ch * plane + (h + taps_h - 1) * row_w + (taps_w - 1) * group
                        for i in range(images):
                            src = x[n0 + i, ch, h]
                            if interleave:
                                dst = planes[start + i : start + width * group]
                                for u in range(width):
                                    dst[u * group] = src[u]
                            else:
                                dst = planes[start + i * width : start + (i + 1) * width]
                                for u in range(width):
                                    dst[u] = src[u]
                built = block
            a = phase // stride_w
            c = phase - a * stride_w
            # The stacked rows (columns) of this phase that land in y: s*q + a - pad in [0, OH).
            q0 = max(0, -((a - pad_top) // stride_h))
            q_end = max(q0, (out_h - 1 + pad_top - a) // stride_h + 1)
            q1 = max(q0, min(q_end, z_h))
            l0 = max(0, -((c - pad_left) // stride_w))
            l_end = max(l0, (out_w - 1 + pad_left - c) // stride_w + 1)
            l1 = max(l0, min(l_end, z_w))
            rows = q1 - q0
            # Interleaved, a window per output row: its kept columns, all images. Side by side,
            # whole rows.
            first = l0 if interleave else 0
            kept = (l1 - l0) * group if interleave else row_w
            wide = rows * kept
            if wide > 0:
                # Windows that tile whole rows run as one: only the product's last panel is
                # ragged, not each window's.
                window = kept if kept < row_w else 0
                gemm_nn_rows(
                    w_mat[phase * c_out : (phase + 1) * c_out],
                    planes[q0 * row_w + first * group :], tap_rows,
                    product[: c_out * wide].reshape(c_out, wide), False, window, row_w, True,
                )  # fmt: skip
            # Into y by flat offsets.
            for o in range(c_out):
                shift = bias[o]
                for i in range(images):
                    y_row = ((n0 + i) * c_out + o) * out_h * out_w + c - pad_left
                    for q in range(q0, q_end):
                        at = y_row + (stride_h * q + a - pad_top) * out_w
                        rest = l0
                        if q < q1:
                            src = o * wide + (q - q0) * kept
                            if interleave:
                                src += i - first * group
                                for col in range(l0, l1):
                                    value = product[src + col * group]
                                    y_flat[at + stride_w * col] = value + shift
                            else:  # unit steps, which LLVM vectorises
                                src += i * width
                                for col in range(l0, l1):
                                    y_flat[at + stride_w * col] = product[src + col] + shift
                            rest = l1
                        for col in range(rest, l_end):  # beyond the filter's reach
                            y_flat[at + stride_w * col] = shift


def implicit_group(sp: SubPixel, itemsize: int) -> int:
    """Images per job of :func:`implicit_forward_kernel` (see :data:`IMPLICIT_MAX_GROUP`)."""
    n, c, h, w = sp.x_shape
    per_image = c * (h + 2 * (sp.taps_h - 1)) * (w + 2 * (sp.taps_w - 1)) * itemsize
    return int(max(1, min(IMPLICIT_MAX_GROUP, n // 4, IMPLICIT_PLANES_BYTES // per_image)))


def implicit_applies(sp: SubPixel, itemsize: int) -> bool:
    """Whether :func:`implicit_forward` runs: a phase's product is one numbaconv's own GEMM runs
    (``own_gemm_size_pays``: on every target, as im2col's implicit GEMM)."""
    group = implicit_group(sp, itemsize)
    wide = sp.x_shape[2] * group * sp.x_shape[3]
    taps = sp.x_shape[1] * sp.taps_h * sp.taps_w
    return bool(own_gemm_size_pays.py_func(sp.geom.in_channels, taps, wide, itemsize))


def implicit_forward(x: np.ndarray, stacked: np.ndarray, b, sp: SubPixel) -> np.ndarray:
    """The transposed convolution's output from :func:`stacked_weights`' filters, ``packed``,
    by :func:`implicit_forward_kernel` (``b``: the bias or None)."""
    g = sp.geom
    n, c, h, w = sp.x_shape
    group = implicit_group(sp, x.itemsize)
    row_w = group * (w + 2 * (sp.taps_w - 1))
    plane = (h + 2 * (sp.taps_h - 1)) * row_w
    jobs = -(-n // group) * g.stride_h * g.stride_w
    lanes = max(1, min(numba.get_num_threads(), jobs))
    planes = take("subpixel.planes", (lanes, c * plane), x.dtype)
    ext = take("subpixel.product", (lanes, g.in_channels * sp.out_h * sp.out_w * group), x.dtype)
    ch, k, m = np.meshgrid(np.arange(c), np.arange(sp.taps_h), np.arange(sp.taps_w), indexing="ij")
    # (Images interleaved where there are column taps: see implicit_forward_kernel.)
    tap_rows = (ch * plane + k * row_w + m * group).reshape(-1).astype(np.int64)
    y = np.empty(g.input_shape, dtype=x.dtype)
    bias = b if b is not None else np.zeros(g.in_channels, dtype=x.dtype)
    implicit_forward_kernel(
        x, stacked.reshape(stacked.shape[0], -1), bias, y, planes, ext, group, sp.taps_h,
        sp.taps_w, g.stride_h, g.stride_w, g.pad_top, g.pad_left, tap_rows,
    )  # fmt: skip
    return y


# ---------------------------------------------------------------------------------------------
# The backward pass of one-tap layers (filter size = stride: U-Net's 2x2 stride-2), image by image


@njit(parallel=True, cache=True)
def one_tap_backward_kernel(
    grad_y, x, w_t, grad_x, sums, grad_z_ws, stride_h, pad_top, stride_w, pad_left, own_gx,
    own_gw,
):  # fmt: skip
    """grad-x and the stacked filters' gradient of a one-tap sub-pixel form (its stride-1
    convolution is 1x1: ``z[n] = stacked @ x[n]``, ``stacked`` (S_h*S_w*C_out, C)): per image,
    its stacked output gradient ``grad_z`` (:func:`unshuffle_planes`, into the lane's
    ``grad_z_ws``, which stays in the core's cache), then ``grad_x[n] = w_t @ grad_z`` (``w_t``:
    ``stacked.T``, contiguous) and ``sums[lane] (+)= grad_z @ x[n].T``. Lane ``l`` of
    ``sums.shape[0]`` takes a fixed, contiguous run of images; the caller adds the lanes in
    order, so the bits do not depend on the thread count. The products run on the micro-kernel
    where ``own_gx`` / ``own_gw`` say so, else on BLAS (held to one thread by the caller)."""
    n_batch, channels, height, width = x.shape
    c_out = grad_y.shape[1]
    lanes, stacked, _ = sums.shape
    pixels = height * width
    for lane in prange(lanes):
        grad_z = grad_z_ws[lane]
        acc = sums[lane]
        first = n_batch * lane // lanes
        last = n_batch * (lane + 1) // lanes
        if first == last:
            acc[:] = 0
        for n in range(first, last):
            planes = grad_z.reshape(stacked, height, width)
            for a in range(stride_h):
                for o in range(c_out):
                    unshuffle_planes(
                        grad_y[n, o], planes, o, a, c_out, stride_h, pad_top, stride_w, pad_left
                    )  # fmt: skip
            image = x[n].reshape(channels, pixels)
            grad_image = grad_x[n].reshape(channels, pixels)
            if own_gx:
                gemm_nn(w_t, grad_z, grad_image, False)
            else:
                gemm_nn_into(w_t, grad_z, grad_image)
            if own_gw:
                gemm_nn(grad_z, image.T, acc, n > first)
            else:
                if n == first:
                    acc[:] = 0
                gemm_nt_add(grad_z, image, acc)


#: :func:`one_tap_backward` runs on batches of at least this many images (``im2col``'s
#: ``SMALL_BATCH_LANES``: its lanes are images, and fewer leave cores idle; smaller batches
#: take the stacked gradient and the 1x1 convolution's backward pass, which cuts images into
#: bands) ...
ONE_TAP_MIN_BATCH = 4

#: ... whose stacked gradient per image (S_h*S_w*C_out x H*W) takes at most this many bytes:
#: one per lane, in the core's L2 cache while the two products read it (U-Net's 16x128x28x28:
#: 0.8 MB in float32, 1.6 MB in float64). Larger images take the other route.
ONE_TAP_MAX_BYTES = 2 * 2**20


def one_tap_backward_applies(sp: SubPixel, itemsize: int) -> bool:
    """Whether :func:`one_tap_backward` runs: one tap per phase (filter size = stride), at least
    :data:`ONE_TAP_MIN_BATCH` images, at most :data:`ONE_TAP_MAX_BYTES` of stacked gradient
    an image."""
    n, _, h, w = sp.x_shape
    return (
        sp.taps_h == sp.taps_w == 1
        and n >= ONE_TAP_MIN_BATCH
        and sp.stacked * h * w * itemsize <= ONE_TAP_MAX_BYTES
    )


def one_tap_products(channels: int, filters: int, pixels: int, itemsize: int) -> tuple[bool, bool]:
    """Whether :func:`one_tap_backward_kernel`'s grad-x product (``channels x filters`` by
    ``filters x pixels``) and its grad-w product (``filters x pixels`` by ``pixels x channels``)
    run on the micro-kernel: as ``im2col``'s (``own_gemm_pays``; ``own_weight_gradient`` for
    grad-w, a fact of the BLAS loaded)."""
    own_gx = bool(own_gemm_pays.py_func(channels, filters, pixels, itemsize))
    own_gw = own_weight_gradient() and bool(
        own_gemm_size_pays.py_func(filters, pixels, channels, itemsize)
    )
    return own_gx, own_gw


def one_tap_backward(grad_y, x, stacked, sp: SubPixel) -> tuple[np.ndarray, np.ndarray]:
    """``(grad_x, grad_stacked)`` of a one-tap sub-pixel form (``sp.taps_h == sp.taps_w ==
    1``) by :func:`one_tap_backward_kernel`, on ``min(BACKWARD_LANES, N)`` lanes (the geometry's
    alone). Needs BLAS inside the kernels (``blas_inside_kernels``); the caller holds it to one
    thread.

    Against the whole stacked gradient (``unshuffle``) and the 1x1 convolution's backward pass,
    whose two products each read it from memory: U-Net's 16x128x28x28 -> 64 2x2 stride 2,
    backward ms (``conv_transpose2d_backward`` with the bias), AMD EPYC Zen 5, 2 threads,
    medians of 7, three alternated runs: float32 7.50-7.55 -> 6.46-6.70, float64 12.7-13.0 ->
    11.2-11.8. Of the 6.5 ms, the gather takes 0.26 and the two products 2.1 and 2.25 alone."""
    n, channels, height, width = x.shape
    filters = stacked.shape[0]
    pixels = height * width
    lanes = min(BACKWARD_LANES, n)
    sums = take("subpixel.grad_w_lanes", (lanes, filters, channels), x.dtype)
    grad_z = take("subpixel.grad_z", (lanes, filters, pixels), x.dtype)
    w_t = np.ascontiguousarray(stacked.reshape(filters, channels).T)
    grad_x = np.empty(x.shape, dtype=x.dtype)
    own_gx, own_gw = one_tap_products(channels, filters, pixels, x.itemsize)
    g = sp.geom
    one_tap_backward_kernel(
        grad_y, x, w_t, grad_x, sums, grad_z, g.stride_h, g.pad_top, g.stride_w, g.pad_left,
        own_gx, own_gw,
    )  # fmt: skip
    grad_stacked = sums[0].copy()
    for lane in range(1, lanes):  # in lane order: the same bits on any number of threads
        grad_stacked += sums[lane]
    return grad_x, grad_stacked.reshape(stacked.shape)
