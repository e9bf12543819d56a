"""Convolutions over Dask arrays: :func:`conv2d` and :func:`conv2d_backward`, block by block.

The functions take the arguments of :func:`numbaconv.conv2d` and
:func:`numbaconv.conv2d_backward`, with ``x`` (and ``grad_y``) a ``dask.array.Array``, and
return Dask arrays: nothing runs until they are computed, on whatever scheduler the caller uses
(threads, processes, a ``distributed`` cluster). The weights and bias stay NumPy arrays; each
enters the task graph once, as a key of its own, so a distributed scheduler sends it to each
worker once rather than once per task.

How the work is cut (notation of :mod:`numbaconv.geometry`; ``x`` is ``(N, C, H, W)``):

* Batch: one numbaconv call per block of images. The output has ``x``'s batch chunks.
* Channels: every call needs all of an image's channels, so a split channel axis is rechunked
  to one chunk first (``x.rechunk({1: -1})``); the output has one channel chunk.
* Height and width: the output is cut where the input is: output row ``oh`` belongs to the
  input chunk that holds the centre of its (dilated) filter window, row
  ``oh * stride - pad_top + dilation * (R - 1) // 2``. With ``padding='same'`` (and an odd
  filter) the output then has exactly the input's chunks. Each output block reads the input
  rows its windows cover, its own chunk and a halo from the neighbours, and runs one
  convolution on them with the padding that falls inside the block (so padding is never
  materialised for ``padding_mode='zeros'``). Output blocks line up with the stride by
  construction: a block's first row is a whole output row.
* Backward: ``grad_y``'s blocks (its batch chunks made ``x``'s) are the unit of work. Each
  block runs one backward call on the input rows its windows cover, which gives its share of
  ``grad_w`` and ``grad_b`` (summed over all blocks as a tree, in float64, in a fixed order)
  and a ``grad_x`` for those input rows; ``grad_x`` blocks (``x``'s chunks) add up the shares
  that reach them, the halos being where neighbouring shares overlap.
* ``padding_mode`` other than ``'zeros'``: the input is padded with ``dask.array.pad`` (whose
  values are ``np.pad``'s), convolved without padding, and the backward pass folds the
  gradient of the padding back onto the pixels it copies, border strips only, as
  :func:`numbaconv.functional.fold_padding` does.

``kernel='auto'`` (and the default) is resolved once, on the whole array's geometry, so every
block runs the kernel that the in-memory call would run; ``NUMBACONV_KERNEL`` is read where the
graph is built, not on the workers.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np

try:
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "numbaconv.dask needs Dask: pip install 'numbaconv[dask]' (dask[array] and distributed)"
    ) from error

from . import registry
from .functional import (
    _NUMPY_PAD_MODE,
    _checked_mode,
    _pads,
    _run_backward,
    _run_forward,
    _source_index,
)
from .geometry import ConvGeometry, make_geometry, validate_conv, validate_grad_output

__all__ = ["conv2d", "conv2d_backward"]

#: How many blocks' weight and bias gradients each node of the tree reduction adds: a node holds
#: that many weight-sized arrays at once; 8 keeps the tree shallow (3 levels for 512 blocks).
SPLIT_EVERY = 8


# --------------------------------------------------------------------------------------------
# Cutting one spatial axis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Span:
    """One block of output rows (or columns) and the input rows its filter windows cover.

    Rows ``[out_start, out_stop)`` of the output read input rows ``[in_start, in_stop)`` (within
    the input) with ``pad_lo``/``pad_hi`` rows of zero padding before/after them. When every
    window lies in the padding, the block reads no input row: ``zeros`` is then the number of
    rows of zeros it convolves instead (and ``in_start == in_stop``, no padding).
    """

    out_start: int
    out_stop: int
    in_start: int
    in_stop: int
    pad_lo: int
    pad_hi: int
    zeros: int = 0

    @property
    def in_size(self) -> int:
        """Rows of the block's input: read from the array, or all zeros."""
        return self.zeros or self.in_stop - self.in_start


def _bounds(chunks) -> list[int]:
    """Chunk sizes as boundaries: ``(3, 4, 2)`` -> ``[0, 3, 7, 9]``."""
    return [0, *np.cumsum(chunks).tolist()]


def _output_bounds(
    in_bounds, filter_size: int, stride: int, pad_lo: int, dilation: int, out_size: int
):
    """Output boundaries along one axis for input boundaries ``in_bounds``.

    Output row ``oh`` belongs to the input chunk that holds the centre of its window, input row
    ``oh * stride - pad_lo + dilation * (filter_size - 1) // 2``; the first output row of the
    chunk starting at input row ``b`` is the smallest ``oh`` whose centre is at ``b`` or after.
    Chunks that no centre falls into (smaller than the stride) give no output block.
    """
    centre = dilation * (filter_size - 1) // 2
    cuts = {min(max(-((centre - pad_lo - b) // stride), 0), out_size) for b in in_bounds[1:-1]}
    return sorted(cuts | {0, out_size})


def _spans(out_bounds, size: int, filter_size: int, stride: int, pad_lo: int, dilation: int):
    """The :class:`_Span` of each output block ``[out_bounds[i], out_bounds[i + 1])``."""
    spans = []
    for start, stop in pairwise(out_bounds):
        lo = start * stride - pad_lo  # first row of the first window, padding counted
        hi = (stop - 1) * stride - pad_lo + dilation * (filter_size - 1) + 1
        first, last = max(lo, 0), min(hi, size)
        if last <= first:
            spans.append(_Span(start, stop, 0, 0, 0, 0, zeros=hi - lo))
        else:
            spans.append(_Span(start, stop, first, last, first - lo, hi - last))
    return spans


def _pieces(chunk_bounds, start: int, stop: int):
    """The chunks that rows ``[start, stop)`` lie in: ``[(chunk, first, stop), ...]``, local."""
    pieces = []
    for index, (lo, hi) in enumerate(pairwise(chunk_bounds)):
        if lo < stop and start < hi:
            pieces.append((index, max(start, lo) - lo, min(stop, hi) - lo))
    return pieces


def _block_geometry(geom: ConvGeometry, batch: int, rows: _Span, cols: _Span) -> ConvGeometry:
    """The geometry of one block's convolution: ``geom`` restricted to ``rows`` x ``cols``.

    The spans are built so that the output size formula gives back their output extents
    (``(in + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1 == out_stop - out_start``).
    """
    return ConvGeometry(
        batch,
        geom.in_channels,
        rows.in_size,
        cols.in_size,
        geom.out_channels,
        geom.filter_height,
        geom.filter_width,
        geom.stride_h,
        geom.stride_w,
        rows.pad_lo,
        rows.pad_hi,
        cols.pad_lo,
        cols.pad_hi,
        geom.dilation_h,
        geom.dilation_w,
        geom.groups,
        rows.out_stop - rows.out_start,
        cols.out_stop - cols.out_start,
    )


# --------------------------------------------------------------------------------------------
# What the tasks run
# --------------------------------------------------------------------------------------------


def _cut_block(array, r0: int, r1: int, c0: int, c1: int):
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of a 4-D block (a task; a view).

    A block's halo is cut from its neighbour's chunk by a task of its own, which the scheduler
    runs where that chunk is: only the halo then travels to the block's worker, not the chunk.
    """
    return array[:, :, r0:r1, c0:c1]


def _assemble(pieces, shape, dtype, border=(0, 0, 0, 0)) -> np.ndarray:
    """A block's input: ``pieces``, a grid of the input pieces it reads, in one array.

    ``pieces[i][j]`` is the ``i``-th piece down and ``j``-th across (cut from the input chunks
    by :func:`_cut_block` tasks where they are not whole chunks). One piece is returned as it is
    (the kernel call makes it contiguous if it must); several are copied into one array of
    ``shape``; none (every window in the padding) gives zeros. ``border`` (top, bottom, left,
    right) adds rows and columns of zeros around the result.
    """
    top, bottom, left, right = border
    n, c, height, width = shape
    padded_shape = (n, c, height + top + bottom, width + left + right)
    if not pieces:
        return np.zeros(padded_shape, dtype=dtype)
    if len(pieces) == 1 and len(pieces[0]) == 1 and not any(border):
        return pieces[0][0]
    out = np.empty(padded_shape, dtype=dtype)
    if any(border):  # only the border is zeroed: the pieces fill the rest
        out[:, :, :top] = 0
        out[:, :, top + height :] = 0
        out[:, :, :, :left] = 0
        out[:, :, :, left + width :] = 0
    row = top
    for row_pieces in pieces:
        col = left
        for piece in row_pieces:
            out[:, :, row : row + piece.shape[2], col : col + piece.shape[3]] = piece
            col += piece.shape[3]
        row += row_pieces[0].shape[2]
    return out


def _forward_block(pieces, w, b, geom: ConvGeometry, name: str):
    """The convolution of one output block (a task)."""
    x = _assemble(pieces, geom.input_shape, w.dtype)
    return _run_forward(x, w, b, geom, name)


def _backward_block(grad_y, pieces, w, geom: ConvGeometry, name: str):
    """``(grad_x, grad_w, grad_b)`` of one output block's convolution (a task).

    ``grad_x`` covers the input rows and columns the block reads; ``grad_w`` and ``grad_b``
    are the block's shares of the whole gradients.
    """
    if name != "winograd":
        x = _assemble(pieces, geom.input_shape, w.dtype)
        return _run_backward(grad_y, x, w, geom, name)
    # Winograd's backward pass needs the same padding on both sides of an axis (else it runs
    # im2col: 4 tiles of a 64-channel 448x448 image took 1.7x the in-memory time, against 1.3x
    # this way); a block at the image's edge has padding on one side only, so the difference
    # is made rows (columns) of real zeros around the block's input.
    border, padded_geom = _symmetric_padding(geom)
    x = _assemble(pieces, geom.input_shape, w.dtype, border)
    grad_x, grad_w, grad_b = _run_backward(grad_y, x, w, padded_geom, name)
    top, _, left, _ = border
    return grad_x[:, :, top : top + geom.in_height, left : left + geom.in_width], grad_w, grad_b


def _symmetric_padding(geom: ConvGeometry):
    """The zeros to add around a block's input, ``(top, bottom, left, right)``, so that the
    padding left to the kernel is the same on both sides of each axis; and that geometry."""
    top = geom.pad_top - min(geom.pad_top, geom.pad_bottom)
    bottom = geom.pad_bottom - min(geom.pad_top, geom.pad_bottom)
    left = geom.pad_left - min(geom.pad_left, geom.pad_right)
    right = geom.pad_right - min(geom.pad_left, geom.pad_right)
    padded_geom = replace(
        geom,
        in_height=geom.in_height + top + bottom,
        in_width=geom.in_width + left + right,
        pad_top=geom.pad_top - top,
        pad_bottom=geom.pad_bottom - bottom,
        pad_left=geom.pad_left - left,
        pad_right=geom.pad_right - right,
    )
    return (top, bottom, left, right), padded_geom


def _weight_and_bias_shares(part):
    """``(grad_w, grad_b)`` of one block's ``(grad_x, grad_w, grad_b)`` (a task)."""
    return part[1], part[2]


def _add_shares(shares):
    """The sum of ``(grad_w, grad_b)`` pairs, in float64, in the order given (a task)."""
    grad_w = shares[0][0].astype(np.float64)
    grad_b = shares[0][1].astype(np.float64)
    for share_w, share_b in shares[1:]:
        grad_w += share_w
        grad_b += share_b
    return grad_w, grad_b


def _take_gradient(total, index: int, dtype):
    """Item ``index`` of the tree's root, cast to the input's dtype (a task)."""
    return total[index].astype(dtype)


def _sum_tree(leaves, name: str, split_every: int):
    """Tasks that add up the ``(grad_w, grad_b)`` shares ``leaves`` (keys) as a tree.

    Each node adds up to ``split_every`` keys of the level below, in their order; the shape of
    the tree depends only on the number of leaves, so the sums round the same way on every
    run, whichever worker computes which node. Returns ``(layer, root key)``.
    """
    layer, nodes, level = {}, list(leaves), 0
    while True:
        groups = [nodes[i : i + split_every] for i in range(0, len(nodes), split_every)]
        nodes = []
        for index, group in enumerate(groups):
            key = (name, level, index)
            layer[key] = (_add_shares, group)
            nodes.append(key)
        if len(nodes) == 1:
            return layer, nodes[0]
        level += 1


def _overlap_add(shares, destinations, shape, dtype) -> np.ndarray:
    """One ``grad_x`` chunk: the sum of the blocks' shares that reach it (a task).

    ``shares[i]`` (the part of a block's share that lands in this chunk, cut by a :func:`_cut_block`
    task where it is not the whole share) lands on ``out[destinations[i]]``, a pair of row and
    column slices. The first share to reach a pixel is copied there, later ones are added in
    the order given (blocks in row-major order), so a pixel that one block reaches keeps that
    block's bits, and the sums are the same on every run. The chunk is cut into the rectangles
    that the shares' edges make, so every step is a plain copy or add of a slab (a per-pixel
    mask over the whole chunk made the backward pass of 4 tiles of 64x224x224 about 30% slower).
    """
    if not shares:  # no window reads these pixels
        return np.zeros(shape, dtype=dtype)
    if len(shares) == 1 and destinations[0] == (slice(0, shape[2]), slice(0, shape[3])):
        return np.ascontiguousarray(shares[0])
    row_cuts = sorted({0, shape[2], *(c for r, _ in destinations for c in (r.start, r.stop))})
    col_cuts = sorted({0, shape[3], *(c for _, k in destinations for c in (k.start, k.stop))})
    out = np.empty(shape, dtype=dtype)
    for top, bottom in pairwise(row_cuts):
        for left, right in pairwise(col_cuts):
            target = out[:, :, top:bottom, left:right]
            reached = False
            for share, (dst_rows, dst_cols) in zip(shares, destinations, strict=True):
                if not (dst_rows.start <= top and bottom <= dst_rows.stop):
                    continue
                if not (dst_cols.start <= left and right <= dst_cols.stop):
                    continue
                r0, c0 = top - dst_rows.start, left - dst_cols.start
                source = share[:, :, r0 : r0 + bottom - top, c0 : c0 + right - left]
                if reached:
                    target += source
                else:
                    target[...] = source
                    reached = True
            if not reached:  # rows (columns) that no window reads: zero gradient
                target[...] = 0
    return out


def _fold_block(grad, lo_strip, hi_strip, offset, axis: int, before: int, size: int, mode: str):
    """One chunk of the gradient folded along ``axis`` (a task; see :func:`_fold`).

    ``grad`` holds rows ``[offset, offset + grad.shape[axis])`` of the input's gradient before
    the fold; ``lo_strip``/``hi_strip`` are the gradients of the padding before/after the input
    along ``axis``. Padded rows are added onto their source rows in increasing order, as
    :func:`numbaconv.functional.fold_padding` adds them, so the bits are the in-memory ones.
    """
    start = int(np.asarray(offset).ravel()[0])
    length = grad.shape[axis]
    folded = grad.copy()
    index = [slice(None)] * grad.ndim

    def at(i):
        index[axis] = i
        return tuple(index)

    padded_rows = [(i, lo_strip, i) for i in range(lo_strip.shape[axis])]
    padded_rows += [(before + size + i, hi_strip, i) for i in range(hi_strip.shape[axis])]
    for padded_index, strip, strip_index in padded_rows:
        source = _source_index(padded_index, size, before, mode) - start
        if 0 <= source < length:
            folded[at(source)] += strip[at(strip_index)]
    return folded


# --------------------------------------------------------------------------------------------
# Building the graphs
# --------------------------------------------------------------------------------------------


def _as_dask(array, name: str):
    """``array`` as a Dask array with known chunk sizes."""
    array = da.asarray(array)
    if any(math.isnan(size) for size in array.shape):
        raise ValueError(
            f"{name} has unknown chunk sizes; call {name}.compute_chunk_sizes() first "
            "(numbaconv.dask needs them to place the halos)"
        )
    return array


def _stand_in(array) -> np.ndarray:
    """A NumPy array of ``array``'s shape and dtype that holds no memory, for validation."""
    return np.broadcast_to(np.zeros((), dtype=array.dtype), array.shape)


def _check_numpy(value, name: str) -> None:
    """Weights and bias must be NumPy arrays: they are sent to every worker whole."""
    if value is not None and not isinstance(value, np.ndarray):
        hint = " (call .compute() on it first)" if hasattr(value, "__dask_graph__") else ""
        raise TypeError(
            f"{name} must be a numpy.ndarray{hint}: numbaconv.dask sends the weights and bias to "
            f"every worker whole, got {type(value).__name__}"
        )


def _constants(token: str, **arrays):
    """One graph layer holding each NumPy array once, and the key of each (None stays None)."""
    layer, keys = {}, {}
    for name, value in arrays.items():
        if value is None:
            keys[name] = None
        else:
            keys[name] = f"numbaconv-{name}-{token}"
            layer[keys[name]] = value
    return f"numbaconv-constants-{token}", layer, keys


def _prepare(x, geom: ConvGeometry, mode: str):
    """The array to read (padded for non-zero ``padding_mode``), its geometry, and the input
    boundaries that decide where the output is cut (``x``'s, shifted by the padding)."""
    x = x.rechunk({1: -1}) if x.numblocks[1] > 1 else x
    bounds_h, bounds_w = _bounds(x.chunks[2]), _bounds(x.chunks[3])
    if mode == "zeros" or not any(_pads(geom)):
        return x, geom, bounds_h, bounds_w
    top, bottom, left, right = _pads(geom)
    x = da.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), mode=_NUMPY_PAD_MODE[mode])
    run_geom = make_geometry(
        x.shape,
        geom.weight_shape,
        stride=(geom.stride_h, geom.stride_w),
        padding=0,
        dilation=(geom.dilation_h, geom.dilation_w),
        groups=geom.groups,
    )
    bounds_h = [0, *(top + b for b in bounds_h[1:-1]), x.shape[2]]
    bounds_w = [0, *(left + b for b in bounds_w[1:-1]), x.shape[3]]
    return x, run_geom, bounds_h, bounds_w


def _axis_spans(geom: ConvGeometry, out_bounds_h, out_bounds_w):
    """The :class:`_Span` of each output block along the height and along the width."""
    rows = _spans(
        out_bounds_h, geom.in_height, geom.filter_height, geom.stride_h, geom.pad_top,
        geom.dilation_h,
    )  # fmt: skip
    cols = _spans(
        out_bounds_w, geom.in_width, geom.filter_width, geom.stride_w, geom.pad_left,
        geom.dilation_w,
    )  # fmt: skip
    return rows, cols


def _reads(x, bn: int, rows: _Span, cols: _Span, cuts: dict, cut_name: str):
    """The keys of the input pieces a block reads, as a grid (rows of pieces, top to bottom).

    Whole chunks are read by their own keys; parts of chunks (halos, or a chunk the block reads
    only partly) by the keys of :func:`_cut_block` tasks, added to ``cuts`` (blocks that read
    the same part share its task).
    """
    if rows.zeros or cols.zeros:
        return []
    row_pieces = _pieces(_bounds(x.chunks[2]), rows.in_start, rows.in_stop)
    col_pieces = _pieces(_bounds(x.chunks[3]), cols.in_start, cols.in_stop)
    grid = []
    for i, r0, r1 in row_pieces:
        grid.append([])
        for j, c0, c1 in col_pieces:
            key = (x.name, bn, 0, i, j)
            if (r0, r1, c0, c1) != (0, x.chunks[2][i], 0, x.chunks[3][j]):
                cut = (cut_name, bn, i, j, r0, r1, c0, c1)
                cuts[cut] = (_cut_block, key, r0, r1, c0, c1)
                key = cut
            grid[-1].append(key)
    return grid


def _graph(name: str, layers: dict, dependencies: dict, *collections):
    """A HighLevelGraph of ``collections``' layers plus ``layers`` (name -> dict)."""
    all_layers, all_deps = {}, {}
    for collection in collections:
        graph = collection.__dask_graph__()
        all_layers.update(graph.layers)
        all_deps.update(graph.dependencies)
    all_layers.update(layers)
    all_deps.update(dependencies)
    return HighLevelGraph(all_layers, all_deps)


def conv2d(
    x,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    kernel: str | None = None,
):
    """:func:`numbaconv.conv2d` of a Dask array, one numbaconv call per output block.

    Parameters
    ----------
    x : dask.array.Array, shape (N, C, H, W), float32 or float64
        Any chunks (known sizes); a split channel axis is rechunked to one chunk. Other arrays
        are wrapped with ``dask.array.asarray``.
    w : ndarray, shape (K, C // groups, R, S), same dtype as ``x``
        A NumPy array: it enters the graph once and reaches each worker once.
    b : ndarray, shape (K,), optional
    stride, padding, dilation, groups, padding_mode, kernel
        As for :func:`numbaconv.conv2d`. ``kernel='auto'`` (and the default) is resolved on the
        whole array, so all blocks run the kernel the in-memory call runs.

    Returns
    -------
    y : dask.array.Array, shape (N, K, OH, OW), dtype of ``x``
        Batch chunks of ``x``, one channel chunk, height and width cut where ``x`` is (see the
        module's docstring): with ``padding='same'`` and odd filters, ``x``'s chunks.
    """
    x = _as_dask(x, "x")
    _check_numpy(w, "w")
    _check_numpy(b, "b")
    geom, dtype = validate_conv(
        _stand_in(x), w, b, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    mode = _checked_mode(padding_mode, geom)
    name = registry.resolve(kernel)
    x, run_geom, in_bounds_h, in_bounds_w = _prepare(x, geom, mode)
    if name == "auto":
        name = registry.choose(run_geom, dtype, "forward")

    out_bounds_h = _output_bounds(
        in_bounds_h,
        run_geom.filter_height,
        run_geom.stride_h,
        run_geom.pad_top,
        run_geom.dilation_h,
        run_geom.out_height,
    )
    out_bounds_w = _output_bounds(
        in_bounds_w,
        run_geom.filter_width,
        run_geom.stride_w,
        run_geom.pad_left,
        run_geom.dilation_w,
        run_geom.out_width,
    )
    rows, cols = _axis_spans(run_geom, out_bounds_h, out_bounds_w)

    token = tokenize(x.name, w, b, run_geom, name)
    const_name, const_layer, keys = _constants(token, weight=w, bias=b)
    out_name = f"numbaconv-conv2d-{token}"
    cut_name = f"numbaconv-input-cut-{token}"
    layer, cuts = {}, {}
    for bn, batch in enumerate(x.chunks[0]):
        for i, row_span in enumerate(rows):
            for j, col_span in enumerate(cols):
                layer[(out_name, bn, 0, i, j)] = (
                    _forward_block,
                    _reads(x, bn, row_span, col_span, cuts, cut_name),
                    keys["weight"],
                    keys["bias"],
                    _block_geometry(run_geom, batch, row_span, col_span),
                    name,
                )
    graph = _graph(
        out_name,
        {const_name: const_layer, cut_name: cuts, out_name: layer},
        {const_name: set(), cut_name: {x.name}, out_name: {const_name, cut_name, x.name}},
        x,
    )
    chunks = (
        x.chunks[0],
        (run_geom.out_channels,),
        tuple(np.diff(out_bounds_h).tolist()),
        tuple(np.diff(out_bounds_w).tolist()),
    )
    return da.Array(graph, out_name, chunks, meta=np.empty((0, 0, 0, 0), dtype=dtype))


def conv2d_backward(
    grad_y,
    x,
    w: np.ndarray,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    kernel: str | None = None,
):
    """:func:`numbaconv.conv2d_backward` of Dask arrays: gradients of :func:`conv2d`.

    Parameters
    ----------
    grad_y : dask.array.Array, shape (N, K, OH, OW)
        The gradient of the loss with respect to the output; its batch chunks are made those of
        ``x``, its height and width blocks are the units of work (any chunks).
    x : dask.array.Array, shape (N, C, H, W), float32 or float64
    w : ndarray, shape (K, C // groups, R, S), same dtype as ``x``
    stride, padding, dilation, groups, padding_mode, kernel
        As for :func:`numbaconv.conv2d`.

    Returns
    -------
    grad_x : dask.array.Array, shape of ``x``
        ``x``'s chunks (one channel chunk). Each chunk adds the shares of the ``grad_y`` blocks
        whose windows reach it.
    grad_w : dask.array.Array, shape of ``w``
        The blocks' shares summed as a tree (:data:`SPLIT_EVERY` at a time) in float64, then
        cast to the dtype of ``x``.
    grad_b : dask.array.Array, shape (K,)
        Likewise.

    Notes
    -----
    Compute the three together (``dask.compute(grad_x, grad_w, grad_b)``): they share one
    backward call per block.
    """
    x = _as_dask(x, "x")
    grad_y = _as_dask(grad_y, "grad_y")
    _check_numpy(w, "w")
    geom, dtype = validate_conv(
        _stand_in(x), w, None, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    mode = _checked_mode(padding_mode, geom)
    validate_grad_output(_stand_in(grad_y), geom, dtype)
    name = registry.resolve(kernel)
    x, run_geom, _, _ = _prepare(x, geom, mode)
    if name == "auto":
        name = registry.choose(run_geom, dtype, "backward")
    grad_y = grad_y.rechunk({0: x.chunks[0], 1: -1})

    rows, cols = _axis_spans(run_geom, _bounds(grad_y.chunks[2]), _bounds(grad_y.chunks[3]))
    token = tokenize(x.name, grad_y.name, w, run_geom, name)
    const_name, const_layer, keys = _constants(token, weight=w)
    part_name = f"numbaconv-conv2d-backward-{token}"
    share_names = {
        "x": f"numbaconv-grad-x-share-{token}",
        "wb": f"numbaconv-grad-wb-share-{token}",
    }
    cut_name = f"numbaconv-input-cut-{token}"
    parts, shares, cuts = {}, {key: {} for key in share_names}, {}
    for bn, batch in enumerate(x.chunks[0]):
        for i, row_span in enumerate(rows):
            for j, col_span in enumerate(cols):
                part = (part_name, bn, i, j)
                parts[part] = (
                    _backward_block,
                    (grad_y.name, bn, 0, i, j),
                    _reads(x, bn, row_span, col_span, cuts, cut_name),
                    keys["weight"],
                    _block_geometry(run_geom, batch, row_span, col_span),
                    name,
                )
                # Separate keys for the two kinds of share, so that a worker that needs one
                # fetches only that, never the other along with it.
                shares["x"][(share_names["x"], bn, i, j)] = (operator.getitem, part, 0)
                shares["wb"][(share_names["wb"], bn, i, j)] = (_weight_and_bias_shares, part)

    # grad_x chunk by chunk: the shares of the blocks whose input rows and columns reach it.
    grad_x_name = f"numbaconv-grad-x-{token}"
    share_cut_name = f"numbaconv-grad-x-share-cut-{token}"
    grad_x_layer, share_cuts = {}, {}
    row_bounds, col_bounds = _bounds(x.chunks[2]), _bounds(x.chunks[3])
    for bn, batch in enumerate(x.chunks[0]):
        for ci, (r0, r1) in enumerate(pairwise(row_bounds)):
            for cj, (c0, c1) in enumerate(pairwise(col_bounds)):
                share_keys, slices = [], []
                for i, row_span in enumerate(rows):
                    row_cut = _overlap(row_span, r0, r1)
                    if row_cut is None:
                        continue
                    for j, col_span in enumerate(cols):
                        col_cut = _overlap(col_span, c0, c1)
                        if col_cut is None:
                            continue
                        share = (share_names["x"], bn, i, j)
                        (src_rows, dst_rows), (src_cols, dst_cols) = row_cut, col_cut
                        whole = (0, row_span.in_stop - row_span.in_start)
                        whole += (0, col_span.in_stop - col_span.in_start)
                        cut = (src_rows.start, src_rows.stop, src_cols.start, src_cols.stop)
                        if cut != whole:  # only the part that lands here travels
                            share_cuts[(share_cut_name, bn, i, j, *cut)] = (_cut_block, share, *cut)
                            share = (share_cut_name, bn, i, j, *cut)
                        share_keys.append(share)
                        slices.append((dst_rows, dst_cols))
                shape = (batch, run_geom.in_channels, r1 - r0, c1 - c0)
                grad_x_layer[(grad_x_name, bn, 0, ci, cj)] = (
                    _overlap_add,
                    share_keys,
                    slices,
                    shape,
                    np.dtype(dtype).str,
                )

    # grad_w and grad_b: one tree over the blocks' shares, then the root cast to the dtype.
    tree_name = f"numbaconv-grad-wb-sum-{token}"
    tree_layer, root = _sum_tree(list(shares["wb"]), tree_name, SPLIT_EVERY)
    grad_w_name, grad_b_name = f"numbaconv-grad-w-{token}", f"numbaconv-grad-b-{token}"
    dtype_str = np.dtype(dtype).str
    layers = {
        const_name: const_layer,
        part_name: parts,
        **{share_names[key]: shares[key] for key in share_names},
        cut_name: cuts,
        share_cut_name: share_cuts,
        grad_x_name: grad_x_layer,
        tree_name: tree_layer,
        grad_w_name: {(grad_w_name, 0, 0, 0, 0): (_take_gradient, root, 0, dtype_str)},
        grad_b_name: {(grad_b_name, 0): (_take_gradient, root, 1, dtype_str)},
    }
    dependencies = {
        const_name: set(),
        part_name: {const_name, cut_name, x.name, grad_y.name},
        **{share_names[key]: {part_name} for key in share_names},
        cut_name: {x.name},
        share_cut_name: {share_names["x"]},
        grad_x_name: {share_names["x"], share_cut_name},
        tree_name: {share_names["wb"]},
        grad_w_name: {tree_name},
        grad_b_name: {tree_name},
    }
    graph = _graph(part_name, layers, dependencies, x, grad_y)
    grad_x = da.Array(graph, grad_x_name, x.chunks, meta=np.empty((0,) * 4, dtype=dtype))
    grad_w = da.Array(
        graph,
        grad_w_name,
        tuple((size,) for size in w.shape),
        meta=np.empty((0,) * 4, dtype=dtype),
    )
    grad_b = da.Array(
        graph, grad_b_name, ((run_geom.out_channels,),), meta=np.empty((0,), dtype=dtype)
    )
    if run_geom is not geom:
        grad_x = _fold(grad_x, _pads(geom), mode)
    return grad_x, grad_w, grad_b


def _overlap(span: _Span, start: int, stop: int):
    """Where a block's ``grad_x`` share meets input rows ``[start, stop)``: the slice of the
    share and the slice of the chunk, or None if they do not meet."""
    if span.zeros:
        return None
    first, last = max(span.in_start, start), min(span.in_stop, stop)
    if last <= first:
        return None
    return (
        slice(first - span.in_start, last - span.in_start),
        slice(first - start, last - start),
    )


def _cut_axis(array, axis: int, start: int, stop: int):
    """``array[..., start:stop, ...]`` along ``axis``."""
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def _fold(grad_padded, pads, mode: str):
    """The gradient with respect to ``x`` of ``dask.array.pad(x, pads, mode)``, given the
    gradient with respect to the padded array (a Dask :func:`numbaconv.functional.fold_padding`).

    Height first, then width, as in memory; each chunk of the result receives the border strips
    of the gradient and adds the padded rows whose source it holds (:func:`_fold_block`).
    """
    top, bottom, left, right = pads
    for axis, before, after in ((2, top, bottom), (3, left, right)):
        if not before and not after:
            continue
        total = grad_padded.shape[axis]
        size = total - before - after
        interior = _cut_axis(grad_padded, axis, before, before + size)
        lo_strip = _cut_axis(grad_padded, axis, 0, before)
        hi_strip = _cut_axis(grad_padded, axis, before + size, total)
        starts = da.from_array(np.array(_bounds(interior.chunks[axis])[:-1]), chunks=1)
        # The strips' own axis gets index "j", which is not in the output: blockwise hands each
        # block the whole strip (one chunk along that axis, concatenated if it had more).
        strip_index = "ncjw" if axis == 2 else "nchj"
        grad_padded = da.blockwise(
            _fold_block,
            "nchw",
            interior,
            "nchw",
            lo_strip,
            strip_index,
            hi_strip,
            strip_index,
            starts,
            "h" if axis == 2 else "w",
            axis=axis,
            before=before,
            size=size,
            mode=mode,
            concatenate=True,
            # Only the number of blocks along "h" (or "w") must match: the offsets have one
            # element per block of the interior, not its chunk sizes.
            align_arrays=False,
            dtype=interior.dtype,
            meta=np.empty((0, 0, 0, 0), dtype=interior.dtype),
        )
    return grad_padded
