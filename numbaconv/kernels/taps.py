"""The ``taps`` kernel family: a convolution as a sum over its filter taps of 1x1 convolutions,
each over the outputs whose input lies inside the image.

Through tap ``(r, s)``, output ``(i, j)`` reads input ``(i*sh - pad_t + r*dh, j*sw - pad_l +
s*dw)``. The outputs that read inside the image form a rectangle, rows ``i0:i1`` by columns
``j0:j1`` (:func:`valid_range` along each axis), so the tap's share of the output is one GEMM on
a copy of the window it reads::

    y[n, :, i0:i1, j0:j1] += w[:, :, r, s] @ x[n, :, rows, cols]      (K x C by C x pixels)

The products with the zero padding are never computed; ``im2col`` computes them all. That pays
where they are many: large dilations on small maps, DeepLab's atrous layers (its 4x256x33x33
layer at dilation 12 has 43 % of its products with padding: float32, 2 threads, forward 23.7
ms by ``im2col``, 12.0 by taps). Elsewhere it loses (16x512x7x7 3x3: 15.8 against 21.7 ms):
each tap reads and writes the output again, and the GEMMs are a window wide, not a band of all
the taps. Where a window is whole output rows, its GEMM adds straight into them; where it also
reads whole, consecutive input rows (kx1 filters, the middle column of a 'same' layer's taps),
nothing is copied at all. A 1xk layer runs as the kx1 layer of its arrays transposed in
their two spatial axes (:func:`by_swapped_axes`): a parallel copy of the input and output
buffers against a window copied per tap and band. ``auto`` gives it the layers where most
products would meet padding (:func:`useful_fraction`) and wide kx1 and 1xk layers
(:func:`reads_whole_rows`).

The backward pass runs the same sum the other way round:

- grad-x: ``grad_x[n, :, window] += w[:, :, r, s].T @ grad_y[n, :, i0:i1, j0:j1]``, scattered
  back with the stride;
- grad-w: tap ``(r, s)`` of ``grad_w`` is the sum over images of ``grad_y[n, :, i0:i1, j0:j1]
  @ x[n, :, window].T``;
- grad-b: the sums of ``grad_y`` (:func:`.direct.grad_bias_kernel`).

Jobs and bits: the forward pass's jobs are (image, band of output rows, block of filters), grad-
x's (image, band of input rows, block of channels), grad-w's (chunk of the batch, tap, group),
the chunks' partial sums added in order at the end. Each job owns what it writes and adds its
terms in a fixed order (the taps in order; grad-w, the images and bands in order), and the jobs
are a function of the geometry alone, so the bits are the same on any number of threads.

The GEMMs run on numbaconv's micro-kernel where :func:`~.microkernel.own_gemm_pays`, else on
BLAS (held to one thread) as in ``im2col``; without BLAS inside kernels
(``NUMBACONV_BLAS_INSIDE_KERNELS=0``) all on the micro-kernel. Every operand is a strided 2-D
view (the lanes' workspaces are 3-D), so each kernel compiles one specialisation of each.

Workspace: per lane, one band's window copy and GEMM result, near :data:`BAND_BYTES`.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
from numba import njit, prange

from .._threading import blas_inside_kernels, single_threaded_blas
from .._workspace import take
from ..geometry import ConvGeometry, swap_axes
from ._blas import gemm_nn_add, gemm_nn_into, gemm_nt_add
from ._loops import gather_row, scatter_add_row, valid_range
from .direct import grad_bias_kernel
from .microkernel import gemm_nn, own_gemm_pays, own_weight_gradient

#: A band's window copy (channels x band pixels) is kept near this many bytes. Smaller bands were
#: slower: DeepLab's 4x256x33x33 dilation-12 layer (34 KB an output row in float32, so whole
#: images at this size), float32, 2 threads, forward 11.9 ms at 2 MiB, 12.4 / 13.1 / 14.1 at
#: 1 MiB / 512 KiB / 256 KiB.
BAND_BYTES = 2**21

#: Jobs per pass at least this many, where the blocks of filters (channels, for grad-x) allow:
#: a batch of one image in one band would leave one of two cores idle. A function of the
#: geometry only, like every job boundary here.
MIN_JOBS = 4

#: Blocks of filters (channels) are never narrower than this (the GEMMs' rows): two of the
#: micro-kernel's 8-row tiles, so that a one-image layer of 32 filters still makes two jobs.
MIN_BLOCK = 16

#: At most this many lanes (workspaces); jobs are dealt to lanes in turn.
MAX_LANES = 16


@njit(cache=True, inline="always")
def _product(a, b, c, use_blas):
    """``c = a @ b`` (contiguous rows), on the micro-kernel where it pays or without BLAS."""
    if not use_blas or own_gemm_pays(a.shape[0], a.shape[1], b.shape[1], c.itemsize):
        gemm_nn(a, b, c, False)
    else:
        gemm_nn_into(a, b, c)


@njit(cache=True, inline="always")
def _product_add(a, b, c, use_blas):
    """``c += a @ b`` (contiguous rows, any row strides)."""
    if not use_blas or own_gemm_pays(a.shape[0], a.shape[1], b.shape[1], c.itemsize):
        gemm_nn(a, b, c, True)
    else:
        gemm_nn_add(a, b, c)


@njit(cache=True, inline="always")
def _group_products(tap, src, dst, f0, f1, per_src, per_dst, accumulate, use_blas):
    """``dst[f - f0] (+)= tap[f] @ src[group of f's rows]`` for the rows ``f0:f1`` of ``tap``,
    group by group (``per_dst`` rows of ``tap`` per group, ``per_src`` rows of ``src``, whose
    first row is the first of ``f0``'s group); adds when ``accumulate``, else overwrites."""
    first = f0 // per_dst
    for g in range(first, (f1 - 1) // per_dst + 1):
        a0, a1 = max(f0, g * per_dst), min(f1, (g + 1) * per_dst)
        rows = src[(g - first) * per_src : (g - first + 1) * per_src]
        if accumulate:
            _product_add(tap[a0:a1, :], rows, dst[a0 - f0 : a1 - f0], use_blas)
        else:
            _product(tap[a0:a1, :], rows, dst[a0 - f0 : a1 - f0], use_blas)


@njit(cache=True, inline="always")
def _product_nt_add(a, b, c, use_blas):
    """``c += a @ b.T`` (contiguous rows): BLAS, or the micro-kernel without it or where it is
    the faster (:func:`~.microkernel.own_weight_gradient`)."""
    if use_blas:
        gemm_nt_add(a, b, c)
    else:
        gemm_nn(a, b.T, c, True)


@njit(cache=True, inline="always")
def _whole_rows(row_step, col_step, col_first, out_w, width):
    """Whether a tap's window of whole output rows reads whole, consecutive input rows."""
    return row_step == 1 and col_step == 1 and col_first == 0 and out_w == width


@njit(cache=True, inline="always")
def _gather_window(src, n, c0, c1, i0, i1, row_first, row_step, j0, j1, col_first, col_step, dst):
    """``dst[c - c0, (i - i0)*(j1 - j0) + j - j0] = src[n, c, row_first + i*row_step,
    col_first + j*col_step]`` for the window's channels, rows and columns."""
    rows, cols = i1 - i0, j1 - j0
    for c in range(c0, c1):
        out = dst[c - c0]
        for i in range(rows):
            line = src[n, c, row_first + (i0 + i) * row_step]
            gather_row(out[i * cols : (i + 1) * cols], line, col_first + j0 * col_step, col_step)


@njit(cache=True, inline="always")
def _scatter_add_window(
    src, dst, n, c0, c1, i0, i1, row_first, row_step, j0, j1, col_first, col_step
):  # fmt: skip
    """The inverse of :func:`_gather_window`, adding: ``dst[n, c, row_first + i*row_step,
    col_first + j*col_step] += src[c - c0, (i - i0)*(j1 - j0) + j - j0]``."""
    rows, cols = i1 - i0, j1 - j0
    for c in range(c0, c1):
        values = src[c - c0]
        for i in range(rows):
            line = dst[n, c, row_first + (i0 + i) * row_step]
            scatter_add_row(
                line, values[i * cols : (i + 1) * cols], col_first + j0 * col_step, col_step
            )


@njit(parallel=True, cache=True)
def taps_forward_kernel(
    x, w_taps, bias, has_bias, y, windows, results, geo, groups, band_rows, block, use_blas
):  # fmt: skip
    """``y`` (N, K, OH, OW) from ``x`` and ``w_taps`` (R*S, K, C/groups): per job (image, band of
    ``band_rows`` output rows, ``block`` filters), the bias, then each tap's GEMM over its window,
    added in tap order. ``windows``/``results`` are the lanes' workspaces."""
    filter_h, filter_w, sh, sw, pad_t, pad_l, dh, dw = geo
    n_batch, n_channels, height, width = x.shape
    n_filters, out_h, out_w = y.shape[1], y.shape[2], y.shape[3]
    c_g, k_g = n_channels // groups, n_filters // groups
    bands = (out_h + band_rows - 1) // band_rows
    blocks = (n_filters + block - 1) // block
    jobs = n_batch * bands * blocks
    lanes = windows.shape[0]
    x3 = x.reshape(n_batch, n_channels, height * width)
    y3 = y.reshape(n_batch, n_filters, out_h * out_w)
    for lane in prange(lanes):
        for job in range(lane, jobs, lanes):
            n = job // (bands * blocks)
            o0 = (job // blocks) % bands * band_rows
            o1 = min(out_h, o0 + band_rows)
            k0 = job % blocks * block
            k1 = min(n_filters, k0 + block)
            for k in range(k0, k1):
                value = bias[k] if has_bias else 0.0
                for i in range(o0, o1):
                    for j in range(out_w):
                        y[n, k, i, j] = value
            for r in range(filter_h):
                i0, i1 = valid_range(out_h, sh, r * dh - pad_t, height)
                i0, i1 = max(i0, o0), min(i1, o1)
                if i1 <= i0:
                    continue
                for s in range(filter_w):
                    j0, j1 = valid_range(out_w, sw, s * dw - pad_l, width)
                    if j1 <= j0:
                        continue
                    # The window's channels: those of the block's groups.
                    g0, g1 = k0 // k_g, (k1 - 1) // k_g + 1
                    tap = w_taps[r * filter_w + s]
                    first_row = i0 * sh + r * dh - pad_t
                    if (
                        j0 == 0
                        and j1 == out_w
                        and _whole_rows(sh, sw, s * dw - pad_l, out_w, width)
                    ):
                        # Whole rows in, whole rows out: the GEMM reads the image's rows and
                        # adds into the output's, no copies (the middle column of taps of a
                        # 'same' layer, every tap of a kx1 one).
                        rows_in = x3[n, g0 * c_g : g1 * c_g, first_row * width :]
                        _group_products(
                            tap, rows_in[:, : (i1 - i0) * width],
                            y3[n, k0:k1, i0 * out_w : i1 * out_w], k0, k1, c_g, k_g, True,
                            use_blas,
                        )  # fmt: skip
                        continue
                    pixels = (i1 - i0) * (j1 - j0)
                    window = windows[lane, : (g1 - g0) * c_g, :pixels]
                    _gather_window(
                        x, n, g0 * c_g, g1 * c_g, i0, i1, r * dh - pad_t, sh, j0, j1,
                        s * dw - pad_l, sw, window,
                    )  # fmt: skip
                    if j0 == 0 and j1 == out_w:  # whole output rows: add in place
                        _group_products(
                            tap, window, y3[n, k0:k1, i0 * out_w : i1 * out_w], k0, k1, c_g,
                            k_g, True, use_blas,
                        )  # fmt: skip
                        continue
                    result = results[lane, : k1 - k0, :pixels]
                    _group_products(tap, window, result, k0, k1, c_g, k_g, False, use_blas)
                    _scatter_add_window(result, y, n, k0, k1, i0, i1, 0, 1, j0, j1, 0, 1)


@njit(parallel=True, cache=True)
def taps_grad_input_kernel(
    grad_y, w_taps_t, grad_x, windows, results, geo, groups, band_rows, block, use_blas
):  # fmt: skip
    """``grad_x`` (N, C, H, W) from ``grad_y`` and ``w_taps_t`` (R*S, C, K/groups): per job
    (image, band of ``band_rows`` input rows, ``block`` channels), zeros, then each tap's GEMM
    over the outputs that read the band, scattered back in tap order."""
    filter_h, filter_w, sh, sw, pad_t, pad_l, dh, dw = geo
    n_batch, n_filters, out_h, out_w = grad_y.shape
    n_channels, height, width = grad_x.shape[1], grad_x.shape[2], grad_x.shape[3]
    c_g, k_g = n_channels // groups, n_filters // groups
    bands = (height + band_rows - 1) // band_rows
    blocks = (n_channels + block - 1) // block
    jobs = n_batch * bands * blocks
    lanes = windows.shape[0]
    grad_y3 = grad_y.reshape(n_batch, n_filters, out_h * out_w)
    grad_x3 = grad_x.reshape(n_batch, n_channels, height * width)
    for lane in prange(lanes):
        for job in range(lane, jobs, lanes):
            n = job // (bands * blocks)
            b0 = (job // blocks) % bands * band_rows
            b1 = min(height, b0 + band_rows)
            c0 = job % blocks * block
            c1 = min(n_channels, c0 + block)
            for c in range(c0, c1):
                for i in range(b0, b1):
                    for j in range(width):
                        grad_x[n, c, i, j] = 0.0
            for r in range(filter_h):
                # Outputs whose input row (i*sh + r*dh - pad_t) lies in the band.
                i0, i1 = valid_range(out_h, sh, r * dh - pad_t - b0, b1 - b0)
                if i1 <= i0:
                    continue
                for s in range(filter_w):
                    j0, j1 = valid_range(out_w, sw, s * dw - pad_l, width)
                    if j1 <= j0:
                        continue
                    g0, g1 = c0 // c_g, (c1 - 1) // c_g + 1
                    tap = w_taps_t[r * filter_w + s]
                    if (
                        j0 == 0
                        and j1 == out_w
                        and _whole_rows(sh, sw, s * dw - pad_l, out_w, width)
                    ):
                        # Whole rows of grad_y onto whole rows of grad_x: no copies.
                        first_row = i0 + r * dh - pad_t
                        rows_out = grad_x3[n, c0:c1, first_row * width :]
                        _group_products(
                            tap, grad_y3[n, g0 * k_g : g1 * k_g, i0 * out_w : i1 * out_w],
                            rows_out[:, : (i1 - i0) * width], c0, c1, k_g, c_g, True, use_blas,
                        )  # fmt: skip
                        continue
                    pixels = (i1 - i0) * (j1 - j0)
                    window = windows[lane, : (g1 - g0) * k_g, :pixels]
                    _gather_window(
                        grad_y, n, g0 * k_g, g1 * k_g, i0, i1, 0, 1, j0, j1, 0, 1, window
                    )
                    result = results[lane, : c1 - c0, :pixels]
                    _group_products(tap, window, result, c0, c1, k_g, c_g, False, use_blas)
                    _scatter_add_window(
                        result, grad_x, n, c0, c1, i0, i1, r * dh - pad_t, sh, j0, j1,
                        s * dw - pad_l, sw,
                    )  # fmt: skip


@njit(parallel=True, cache=True)
def taps_grad_weight_kernel(grad_y, x, parts, outs, ins, geo, groups, band_rows, use_blas):
    """``parts`` (chunks, R*S, K, C/groups): per job (chunk, tap, group), zeros, then for each
    (image, band of ``band_rows`` output rows) of the chunk's run of them, in order, ``grad_y``'s
    window times ``x``'s window transposed. The chunks are consecutive runs of the batch's
    (image, band) pairs; their sums are added in order afterwards."""
    filter_h, filter_w, sh, sw, pad_t, pad_l, dh, dw = geo
    n_batch, n_channels, height, width = x.shape
    n_filters, out_h, out_w = grad_y.shape[1], grad_y.shape[2], grad_y.shape[3]
    c_g, k_g = n_channels // groups, n_filters // groups
    bands = (out_h + band_rows - 1) // band_rows
    units = n_batch * bands
    chunks, n_taps = parts.shape[0], filter_h * filter_w
    jobs = chunks * n_taps * groups
    lanes = outs.shape[0]
    grad_y3 = grad_y.reshape(n_batch, n_filters, out_h * out_w)
    x3 = x.reshape(n_batch, n_channels, height * width)
    for lane in prange(lanes):
        for job in range(lane, jobs, lanes):
            chunk, tap, g = job // (n_taps * groups), job // groups % n_taps, job % groups
            r, s = tap // filter_w, tap % filter_w
            total = parts[chunk, tap, g * k_g : (g + 1) * k_g, :]
            total[:] = 0.0
            lo, hi = valid_range(out_h, sh, r * dh - pad_t, height)
            j0, j1 = valid_range(out_w, sw, s * dw - pad_l, width)
            if j1 <= j0:
                continue
            whole_out = j0 == 0 and j1 == out_w
            whole_in = whole_out and _whole_rows(sh, sw, s * dw - pad_l, out_w, width)
            for unit in range(units * chunk // chunks, units * (chunk + 1) // chunks):
                n, band = unit // bands, unit % bands
                i0 = max(lo, band * band_rows)
                i1 = min(hi, (band + 1) * band_rows)
                if i1 <= i0:
                    continue
                pixels = (i1 - i0) * (j1 - j0)
                if whole_out:  # whole rows of grad_y, read in place
                    grads = grad_y3[n, g * k_g : (g + 1) * k_g, i0 * out_w : i1 * out_w]
                else:
                    grads = outs[lane, :, :pixels]
                    _gather_window(
                        grad_y, n, g * k_g, (g + 1) * k_g, i0, i1, 0, 1, j0, j1, 0, 1, grads
                    )
                if whole_in:  # and of x
                    first_row = i0 + r * dh - pad_t
                    inputs = x3[n, g * c_g : (g + 1) * c_g, first_row * width :]
                    inputs = inputs[:, :pixels]
                else:
                    inputs = ins[lane, :, :pixels]
                    _gather_window(
                        x, n, g * c_g, (g + 1) * c_g, i0, i1, r * dh - pad_t, sh, j0, j1,
                        s * dw - pad_l, sw, inputs,
                    )  # fmt: skip
                _product_nt_add(grads, inputs, total, use_blas)


# ---------------------------------------------------------------------------------------------
# Plans: bands, blocks and lanes, from the geometry (and the thread count for lanes alone).
# ---------------------------------------------------------------------------------------------


def useful_fraction(geom: ConvGeometry) -> float:
    """The fraction of ``im2col``'s products that meet the image rather than its padding (the
    share of them this kernel computes)."""

    def axis(out, stride, pad, dilation, taps, size):
        inside = 0
        for t in range(taps):
            offset = t * dilation - pad
            lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
            hi = min(out, (size - 1 - offset) // stride + 1)
            inside += max(0, hi - lo)
        return inside / max(1, out * taps)

    _, _, height, width = geom.input_shape
    rows = axis(
        geom.out_height, geom.stride_h, geom.pad_top, geom.dilation_h, geom.filter_height, height
    )
    cols = axis(
        geom.out_width, geom.stride_w, geom.pad_left, geom.dilation_w, geom.filter_width, width
    )
    return rows * cols


def reads_whole_rows(geom: ConvGeometry) -> bool:
    """Whether every tap reads whole input rows into whole output rows (kx1 filters of at least
    two taps at unit column stride without column padding): no window is ever copied."""
    return (
        geom.filter_height > 1
        and geom.filter_width == 1
        and geom.stride_w == 1
        and geom.pad_left == 0
        and geom.out_width == geom.input_shape[3]
    )


def by_swapped_axes(geom: ConvGeometry) -> ConvGeometry | None:
    """The geometry with the spatial axes exchanged (:func:`~numbaconv.geometry.swap_axes`)
    where that one reads whole rows and ``geom`` does not (1xk filters), else None: the passes
    then run on the arrays transposed (:func:`swap_axes_kernel`).

    The copies are cheap next to the windows: Inception's 16x128x17x17 input (2.4 MB in
    float32) took 0.12-0.13 ms to transpose on 2 threads (AMD EPYC Zen 4), and its 1x7 layer's
    forward pass 5.77-5.89 ms transposed against 6.83-7.46 on the windows (one process,
    alternating, medians of 9 rounds of 5 calls, two runs). When ``auto`` takes this path:
    :data:`~numbaconv.registry.TAPS_SWAPPED_MIN_TAPS`. Not 1-D layers (one input row): their
    windows are pieces of one row already, and transposed they ran no faster (16x256 channels
    of 1000 samples, 5 taps, forward 56.8 ms on the windows against 59.3; 4x32x1000, 3 taps,
    0.38 against 0.42)."""
    if reads_whole_rows(geom) or geom.in_height == 1:  # a 1-D layer's windows are row pieces
        return None
    swapped = swap_axes(geom)
    return swapped if reads_whole_rows(swapped) else None


@njit(parallel=True, cache=True)
def swap_axes_kernel(src, dst):
    """``dst[n, c] = src[n, c].T`` for every image and channel, the planes in parallel."""
    n_batch, n_channels, height, width = src.shape
    for plane in prange(n_batch * n_channels):
        n, c = plane // n_channels, plane % n_channels
        for i in range(height):
            for j in range(width):
                dst[n, c, j, i] = src[n, c, i, j]


def _swapped(a: np.ndarray) -> np.ndarray:
    """``a`` transposed in its last two axes, as a new C-ordered array."""
    out = np.empty(a.shape[:2] + (a.shape[3], a.shape[2]), dtype=a.dtype)
    swap_axes_kernel(a, out)
    return out


def _geometry(geom: ConvGeometry) -> tuple[int, ...]:
    return (
        geom.filter_height, geom.filter_width, geom.stride_h, geom.stride_w, geom.pad_top,
        geom.pad_left, geom.dilation_h, geom.dilation_w,
    )  # fmt: skip


def _bands(total_rows: int, bytes_per_row: int, images: int) -> int:
    """Rows per band: the window near :data:`BAND_BYTES`; more bands where the batch's images
    alone make fewer than :data:`MIN_JOBS` jobs; bands of even size, at least one row."""
    rows = max(1, min(total_rows, BAND_BYTES // max(1, bytes_per_row)))
    bands = -(-total_rows // rows)
    if images * bands < MIN_JOBS:
        bands = min(total_rows, -(-MIN_JOBS // images))
    return -(-total_rows // bands)


def _block(width: int, groups: int, other_jobs: int) -> int:
    """Filters (channels) per block: all of them, or, for a pass with fewer than
    :data:`MIN_JOBS` jobs otherwise and one group, blocks of at least :data:`MIN_BLOCK`."""
    if groups > 1 or other_jobs >= MIN_JOBS:
        return width
    blocks = max(1, min(-(-MIN_JOBS // other_jobs), width // MIN_BLOCK))
    return -(-width // blocks)


def _lanes(jobs: int) -> int:
    return max(1, min(numba.get_num_threads(), jobs, MAX_LANES))


def _tap_matrices(w, groups: int, transpose: bool):
    """``w`` (K, C/g, R, S) as one matrix per tap: (R*S, K, C/g), or, with ``transpose``, each
    group's block transposed, (R*S, C, K/g)."""
    k, c_g, r, s = w.shape
    if not transpose:
        return np.ascontiguousarray(w.transpose(2, 3, 0, 1)).reshape(r * s, k, c_g)
    blocks = w.reshape(groups, k // groups, c_g, r, s).transpose(3, 4, 0, 2, 1)
    return np.ascontiguousarray(blocks).reshape(r * s, groups * c_g, k // groups)


def _blas_held(use_blas: bool):
    return single_threaded_blas() if use_blas else contextlib.nullcontext()


def forward(x, w, b, geom: ConvGeometry) -> np.ndarray:
    swapped = by_swapped_axes(geom)
    if swapped is not None:
        return _swapped(forward(_swapped(x), _swapped(w), b, swapped))
    n, k, oh, ow = geom.output_shape
    c = geom.in_channels
    band_rows = _bands(oh, c * ow * x.itemsize, n)
    bands = -(-oh // band_rows)
    block = _block(k, geom.groups, n * bands)
    lanes = _lanes(n * bands * -(-k // block))
    pixels = band_rows * ow
    windows = take("taps.windows", (lanes, c, pixels), x.dtype)
    results = take("taps.results", (lanes, block, pixels), x.dtype)
    y = np.empty(geom.output_shape, dtype=x.dtype)
    bias = b if b is not None else np.zeros(1, dtype=x.dtype)
    use_blas = blas_inside_kernels()
    with _blas_held(use_blas):
        taps_forward_kernel(
            x, _tap_matrices(w, geom.groups, False), bias, b is not None, y, windows, results,
            _geometry(geom), geom.groups, band_rows, block, use_blas,
        )  # fmt: skip
    return y


def input_gradient(grad_y, w, geom: ConvGeometry) -> np.ndarray:
    """grad-x alone (a transposed convolution's forward pass)."""
    swapped = by_swapped_axes(geom)
    if swapped is not None:
        return _swapped(input_gradient(_swapped(grad_y), _swapped(w), swapped))
    n, c, height, width = geom.input_shape
    k, out_w = geom.out_channels, geom.out_width
    # A band of input rows is reached by at most ceil(rows / stride) output rows per tap.
    band_rows = _bands(height, k * out_w * grad_y.itemsize // geom.stride_h, n)
    bands = -(-height // band_rows)
    block = _block(c, geom.groups, n * bands)
    lanes = _lanes(n * bands * -(-c // block))
    pixels = -(-band_rows // geom.stride_h) * out_w
    windows = take("taps.windows", (lanes, k, pixels), grad_y.dtype)
    results = take("taps.results", (lanes, block, pixels), grad_y.dtype)
    grad_x = np.empty(geom.input_shape, dtype=grad_y.dtype)
    use_blas = blas_inside_kernels()
    with _blas_held(use_blas):
        taps_grad_input_kernel(
            grad_y, _tap_matrices(w, geom.groups, True), grad_x, windows, results,
            _geometry(geom), geom.groups, band_rows, block, use_blas,
        )  # fmt: skip
    return grad_x


def weight_gradient(grad_y, x, w, geom: ConvGeometry) -> np.ndarray:
    """grad-w alone."""
    swapped = by_swapped_axes(geom)
    if swapped is not None:
        return _swapped(weight_gradient(_swapped(grad_y), _swapped(x), _swapped(w), swapped))
    k, c_g, r, s = w.shape
    k_g, out_h, out_w = k // geom.groups, geom.out_height, geom.out_width
    n_taps = r * s * geom.groups
    # Fewer (tap, group) jobs than MIN_JOBS (1x1 and 1xk filters): chunks of the batch's
    # (image, band) pairs too, each into its own partial sum.
    chunks = 1 if n_taps >= MIN_JOBS else -(-MIN_JOBS // n_taps)
    # (With one chunk, no bands beyond the workspace's: MIN_JOBS "images" ask for none.)
    images = geom.batch if chunks > 1 else MIN_JOBS
    band_rows = _bands(out_h, (k_g + c_g) * out_w * x.itemsize, images)
    chunks = min(chunks, geom.batch * -(-out_h // band_rows))
    lanes = _lanes(chunks * n_taps)
    pixels = band_rows * out_w
    outs = take("taps.windows", (lanes, k_g, pixels), x.dtype)
    ins = take("taps.results", (lanes, c_g, pixels), x.dtype)
    parts = np.empty((chunks, r * s, k, c_g), dtype=x.dtype)
    # (grad-w's only products: on BLAS unless the micro-kernel is the faster there)
    use_blas = blas_inside_kernels() and not own_weight_gradient()
    with _blas_held(use_blas):
        taps_grad_weight_kernel(
            grad_y, x, parts, outs, ins, _geometry(geom), geom.groups, band_rows, use_blas
        )
    sums = parts[0]
    for part in parts[1:]:  # in order: the bits do not depend on the threads
        sums += part
    return np.ascontiguousarray(sums.reshape(r, s, k, c_g).transpose(2, 3, 0, 1))


def backward(grad_y, x, w, geom: ConvGeometry):
    swapped = by_swapped_axes(geom)
    if swapped is not None:  # grad_y transposed once for both gradients
        grad_x, grad_w, grad_b = backward(_swapped(grad_y), _swapped(x), _swapped(w), swapped)
        return _swapped(grad_x), _swapped(grad_w), grad_b
    grad_x = input_gradient(grad_y, w, geom)
    grad_w = weight_gradient(grad_y, x, w, geom)
    grad_b = np.empty(geom.out_channels, dtype=x.dtype)
    grad_bias_kernel(grad_y, grad_b)
    return grad_x, grad_w, grad_b
