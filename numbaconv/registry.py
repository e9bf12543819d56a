"""The kernel registry: kernel names, the default kernel, ``'auto'`` selection.

Every kernel family exposes ``forward(x, w, b, geom) -> y`` and
``backward(grad_y, x, w, geom) -> (grad_x, grad_w, grad_b)``. They receive validated, C-contiguous
arrays of one supported dtype and a :class:`~numbaconv.geometry.ConvGeometry`.

``'auto'`` picks a concrete kernel from the geometry with a small cost model (:func:`choose`).
It is deterministic: the same call gives the same bits in every process, whatever the load on
the machine, and choosing costs nothing. (Timing the candidates at the first call, as
``torch.backends.cudnn.benchmark`` does, was tried first and dropped: on a busy 2-core machine
the timings were dominated by scheduler noise, and the choice, hence the low bits of results,
changed from run to run.)
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

from ._threading import blas_inside_kernels
from .geometry import ConvGeometry
from .kernels import direct, im2col, subpixel, taps, teaching, winograd

ENV_VAR = "NUMBACONV_KERNEL"
BUILTIN_DEFAULT = "auto"

_IMPLEMENTATIONS: dict[str, ModuleType] = {
    "im2col": im2col,
    "winograd": winograd,
    "direct": direct,
    "taps": taps,
    "numpy": teaching,
}

#: The names accepted by ``kernel=`` and ``NUMBACONV_KERNEL``.
KERNELS: tuple[str, ...] = ("auto", *_IMPLEMENTATIONS)


def _check_name(name, origin: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r} ({origin}); valid kernels: {', '.join(KERNELS)}")
    return name


def default_kernel() -> tuple[str, str]:
    """The default kernel name and where it came from (the environment is read at each call)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"from the {ENV_VAR} environment variable"), ENV_VAR
    return BUILTIN_DEFAULT, "built-in default"


def resolve(kernel: str | None) -> str:
    """The kernel name that ``kernel=`` stands for (``None`` means the default)."""
    if kernel is None:
        return default_kernel()[0]
    return _check_name(kernel, "kernel=")


#: ``'auto'`` uses Winograd only when its GEMMs have at least this many input and output
#: channels: with fewer, its transforms cost more than the flops it saves (mnist layer, 1 input
#: channel: 13 ms against 1.7 ms for im2col).
WINOGRAD_MIN_CHANNELS = 16

#: ... and only while its transformed filters (36 * K * C values, written at every call and read
#: by every job) stay at most this many: with 512 x 512 filters (9.4 million values, 38 MB in
#: float32) streaming them cost more than Winograd saved (float32, 2 threads, forward/backward
#: ms, im2col against winograd: 16x512x7x7 14.8/34.6 against 17.1/73.3, 16x512x14x14 71/121
#: against 84/205), with 256 x 256 (2.4 million) Winograd won (16x256x14x14 forward 17.1
#: against 7.8 ms).
WINOGRAD_MAX_FILTER_VALUES = 2**22

#: ... and, for the backward pass, only if its GEMMs see at least this many tiles each
#: (:func:`numbaconv.kernels.winograd.tiles_per_gemm`): its grad-x is Winograd's forward pass,
#: but where grad-w's lanes do not fit that comes from ``im2col``, which then builds the columns
#: for grad-w alone. float32 / float64, 2 threads, backward ms, im2col against winograd:
#: 16x256x14x14 (64 / 16 tiles per GEMM) 39.4 against 30.7 / 68.0 against 90.1; 1x128x28x28 (14
#: tiles) 2.74 against 3.04 / 6.10 against 6.16; 16x128x28x28 (49) 39.5 against 19.6 / 75.0
#: against 52.6. The forward pass won with few tiles too (1x128x28x28 1.14 against 1.00 ms /
#: 2.06 against 1.60), so there this bound does not apply. It was 32 until GEMMs of 28 tiles
#: were measured (AMD EPYC Zen 4, 2 threads, one process, the two alternating, medians of 7
#: rounds of 3 calls, backward ms, im2col against winograd): float32 2x128x28x28 12.6 against
#: 8.1, 3x128x28x28 18.9 / 11.5, 2x96x28x28 7.7 / 5.1; float64 (28 tiles where float32 has 49
#: or more) 2x128x28x28 14.5 / 12.2, 3x128x28x28 23.5 / 18.9, 4x128x28x28 22.5 / 16.5,
#: 8x128x28x28 41.7 / 24.4, 16x128x28x28 93 / 64. Between 14 tiles (a draw, or a loss) and 28
#: nothing was measured. No suite or zoo layer changes kernel.
WINOGRAD_MIN_TILES = 24

#: The backward pass of a layer whose filters exceed :data:`WINOGRAD_MAX_FILTER_VALUES` still
#: runs Winograd (grad-x; grad-w from ``im2col``) on maps of fewer than ``im2col``'s
#: :data:`~numbaconv.kernels.im2col.MIN_GEMM_COLUMNS` output pixels, whose gradient-column
#: products there are as narrow as the maps, where its GEMMs see at least this many tiles.
#: Measured after Winograd's transforms were vectorised (AMD EPYC Zen 5, 2 threads, one
#: process, the two alternating, medians of 9 rounds of 3 calls, backward ms, float32 /
#: float64, im2col -> winograd): ResNet's 16x512x7x7 (16 tiles) 40.1 -> 31.4 (42.7 -> 29.8 and
#: 48.6 -> 37.1 in two more runs) / 98.3 -> 62.8, 16x384x7x7 (16) 21.9 -> 16.7 / 48.7 -> 35.6,
#: 32x512x7x7 float32 (32) 93.5 -> 55.2, 16x512x10x10 float32 (36) 76.6 -> 54.1. Not taken:
#: 8x512x7x7 (8 tiles) 29.8 against 34.8; 32x512x7x7 and 16x512x10x10 in float64 (4 and 6
#: tiles) 204 against 244 and 180 against 268; 16x512x14x14 (196 pixels, 12 tiles) 153 against
#: 148 / 326 against 407, 4x512x14x14 34.7 against 39.9. The price is memory: the transformed
#: filters (36 x 512 x 512 values) raised the 16x512x7x7 backward pass's peak resident memory
#: from 202 to 245 MiB in float32, 252 to 333 in float64 (fresh processes, two calls).
WINOGRAD_SMALL_MAP_MIN_TILES = 16

#: The forward pass too runs Winograd with such filters on maps of at most ``im2col``'s
#: :data:`~numbaconv.kernels.im2col.MIN_GEMM_COLUMNS` output pixels, since its transformed filters
#: come from the workspace pool (no fresh pages at each call) and its deep plan
#: (``winograd._deep_plan``) reads them once per group of images rather than once per image band.
#: AMD EPYC Zen 4, AVX-512, 2 threads, one process, alternating, medians of 5 rounds of 5 calls,
#: forward ms, im2col against winograd: float32 16x512x7x7 21.2 against 14.4, 16x512x14x14 104
#: against 39; float64 16x512x7x7 45.7 against 28.1, 16x512x14x14 248 against 79.
#:
#: ... and only up to this many transformed filter values: the measured layers' 512 x 512
#: filters (9.4 million, 38 MB in float32) are within it, while 1024 x 1024 filters (38 million,
#: 151 MB, 302 in float64, allocated at every call) were not measured.
WINOGRAD_SMALL_MAP_MAX_FILTER_VALUES = 2**24


#: ``'auto'`` runs ``direct`` on depthwise layers (one input channel per group, channel
#: multiplier or not), whatever the stride: there im2col's GEMMs are one row of taps per group.
#: At stride 1 (``direct``'s plane kernels) also on layers with up to this many input channels
#: per group. float32, 2 threads, ``numbaconv bench``, forward/backward ms, im2col -> direct:
#: MobileNetV2's 16x32x112x112 depthwise 3x3 17.9/46.0 -> 3.9/11.5, its stride-2 144-channel layer
#: 9.2/21.7 -> 4.6/11.7 (row kernels), EfficientNet's 5x5 46.2/87.2 -> 2.7/9.0; 2 channels per
#: group at 28x28 4.1/7.9 -> 1.5/4.4, ResNeXt's 4 per group 14.8/28.2 -> 9.0/27.9; at 8 per
#: group im2col won again (2.3/4.1 against 2.6/8.3).
DIRECT_MAX_CHANNELS_PER_GROUP = 4


#: ``'auto'`` runs ``taps`` where at most this fraction of ``im2col``'s products meet the image
#: rather than its padding (:func:`~numbaconv.kernels.taps.useful_fraction`), on layers with at
#: least :data:`TAPS_MIN_CHANNELS` input and output channels per group and
#: :data:`TAPS_MIN_PIXELS` output pixels per image (narrower GEMMs lost). float32, 2 threads,
#: ``numbaconv bench``, forward/backward ms, im2col -> taps: DeepLab's 4x256x33x33 at dilation
#: 6 (0.77 of the products) 23.6/40.4 -> 15.3/35.7, at 12 (0.57) 24/43.6 -> 12/25, at 18
#: (0.40) 23.7/56.7 -> 9.2/19.9; 4x256x65x65 at dilation 12 (0.77) 115/175 -> 64/133;
#: 8x512x14x14 at dilation 2 (0.82) 35.7/52.2 -> 25.4/57.7 (backward lost); Inception's
#: 16x128x17x17 1x7 (0.90) 5.0/9.8 -> 4.8/9.9; 16x512x7x7 3x3 (0.82, 49 pixels) 15.8/30.0 ->
#: 21.7/45.0.
TAPS_MAX_USEFUL = 0.8
TAPS_MIN_CHANNELS = 32
TAPS_MIN_PIXELS = 196

#: ... and on kx1 filters (one column, unit column stride, no column padding) with at least this
#: many input and output channels per group: there every tap's GEMM reads whole input rows in
#: place and adds into whole output rows, no copies. float32, 2 threads, forward/backward ms,
#: im2col -> taps: Inception's 16x128x17x17 7x1 3.6/9.2 -> 3.4/7.5, 16x192x17x17 7x1 9.3/19.5
#: -> 7.4/15.3, 8x256x14x14 3x1 2.2/5.2 -> 2.1/4.5; with fewer channels the GEMMs were too thin
#: (16x64x28x28 3x1 1.2/3.1 -> 1.5/3.1, 4x32x64x64 5x1 1.0/2.1 -> 1.2/2.6).
TAPS_WHOLE_ROWS_MIN_CHANNELS = 128

#: ... and so does the forward pass of such 1xk layers (the kx1 layer of the arrays transposed,
#: :func:`~numbaconv.kernels.taps.by_swapped_axes`) with at least this many taps, where the
#: transposes cost less than the taps save. AMD EPYC Zen 4 (AVX-512), 2 threads, one process,
#: the two alternating, medians of 9 rounds of 5 calls, forward / backward ms, im2col -> taps:
#: float32 Inception's 16x128x17x17 1x7 7.33 -> 6.55 / 14.95 -> 15.02, 7.10 -> 6.25 / 14.79 ->
#: 14.60, 16x192x17x17 1x7 15.15 -> 13.78 / 30.7 -> 31.1, 16x128x17x17 1x5 6.91 -> 6.40 / 14.65
#: -> 13.16, 1x3 3.62 -> 3.54 / 7.91 -> 8.05, 8x256x14x14 1x3 4.34 -> 4.92 / 9.10 -> 11.43;
#: float64 the 1x7 13.15 -> 11.86 / 27.2 -> 28.4. Backward passes stay on ``im2col`` (no gain
#: beyond the noise, and 1x3 lost).
TAPS_SWAPPED_MIN_TAPS = 5


def choose(geom: ConvGeometry, dtype=None, direction: str = "forward") -> str:
    """The concrete kernel that ``'auto'`` runs for a geometry (and direction).

    The cost model, from the suite's layers (float32, 2 threads, quiet 2-core AVX-512 machine;
    asv ``time_forward``/``time_backward`` and ``asv_benchmarks/compare_torch.py``):

    - 3x3 stride-1 layers with at least :data:`WINOGRAD_MIN_CHANNELS` input and output channels
      and at most :data:`WINOGRAD_MAX_FILTER_VALUES` transformed filter values use ``winograd``
      for the forward pass, and for the backward pass too where its GEMMs see at least
      :data:`WINOGRAD_MIN_TILES` tiles each (resnet3x3 float32: 8.4 ms forward and 22.3 ms
      backward, against 18.5 and 38.1 ms for ``im2col``); larger filters (up to
      :data:`WINOGRAD_SMALL_MAP_MAX_FILTER_VALUES`) on small maps, for the forward pass where
      Winograd's deep plan applies and for the backward pass where its GEMMs see at least
      :data:`WINOGRAD_SMALL_MAP_MIN_TILES` tiles;
    - depthwise layers, and stride-1 layers with at most
      :data:`DIRECT_MAX_CHANNELS_PER_GROUP` input channels per group, use ``direct``;
    - layers where most of ``im2col``'s products would meet padding (large dilations on small
      maps) use ``taps``, within the bounds of :data:`TAPS_MAX_USEFUL`, and so do wide kx1
      layers (:data:`TAPS_WHOLE_ROWS_MIN_CHANNELS`) and the forward pass of wide 1xk ones
      (:data:`TAPS_SWAPPED_MIN_TAPS`);
    - everything else uses ``im2col``, which was the fastest kernel, or within noise of it, on
      every other layer (``direct`` did not win even on the digits layer).

    The choice depends on the geometry and dtype only: never on timings (noisy on a busy
    machine) nor on the thread count (results must not depend on it). ``direction`` is
    ``'forward'`` or ``'backward'``: a layer's two passes may run different kernels.
    """
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    itemsize = np.dtype(dtype).itemsize if dtype is not None else 4
    if geom.groups > 1:
        per_group = geom.in_channels // geom.groups
        stride_1 = geom.stride_h == geom.stride_w == 1
        if per_group == 1 or (stride_1 and per_group <= DIRECT_MAX_CHANNELS_PER_GROUP):
            return "direct"
    channels = min(geom.in_channels, geom.out_channels) // geom.groups
    if (
        channels >= TAPS_MIN_CHANNELS
        and geom.out_height * geom.out_width >= TAPS_MIN_PIXELS
        and taps.useful_fraction(geom) <= TAPS_MAX_USEFUL
    ) or (channels >= TAPS_WHOLE_ROWS_MIN_CHANNELS and taps.reads_whole_rows(geom)):
        return "taps"
    if (
        direction == "forward"
        and channels >= TAPS_WHOLE_ROWS_MIN_CHANNELS
        and geom.filter_width >= TAPS_SWAPPED_MIN_TAPS
        and taps.by_swapped_axes(geom) is not None
    ):
        return "taps"
    runs = winograd.winograd_geometry(geom)  # dilated layers: on polyphase sub-images
    if runs is None or min(geom.in_channels, geom.out_channels) < WINOGRAD_MIN_CHANNELS:
        return "im2col"
    filter_values = 36 * geom.in_channels * geom.out_channels
    filters_fit = filter_values <= WINOGRAD_MAX_FILTER_VALUES
    if direction == "forward":
        deep_small_map = (
            filter_values <= WINOGRAD_SMALL_MAP_MAX_FILTER_VALUES
            and geom.out_height * geom.out_width <= im2col.MIN_GEMM_COLUMNS
            and winograd.deep_plan_applies(runs, itemsize)
        )
        return "winograd" if filters_fit or deep_small_map else "im2col"
    tiles = winograd.tiles_per_gemm(runs, itemsize)
    if filters_fit and tiles >= WINOGRAD_MIN_TILES:
        return "winograd"
    if (
        not filters_fit
        and filter_values <= WINOGRAD_SMALL_MAP_MAX_FILTER_VALUES
        and geom.out_height * geom.out_width < im2col.MIN_GEMM_COLUMNS
        and tiles >= WINOGRAD_SMALL_MAP_MIN_TILES
    ):
        return "winograd"
    return "im2col"


#: ``'auto'`` computes a strided transposed convolution whose filter sizes are multiples of its
#: strides in sub-pixel form (:mod:`numbaconv.kernels.subpixel`: one stride-1 convolution with
#: ``s_h * s_w`` times the filters and ``T = R / s`` taps per axis, then a depth-to-space copy)
#: where that measured faster than the adjoint kernels' input gradient: with at least this many
#: output channels ...
SUBPIXEL_MIN_CHANNELS = 32
#: ... where at least this fraction of the stride-1 convolution's outputs are kept (its padding
#: of ``T - 1`` computes ``(H + T - 1) * (W + T - 1)`` outputs per phase for ``H * W``); the
#: forward pass with more than one tap per phase (where the adjoint scatter's taps overlap), the
#: backward pass with one (``R == s``: a 1x1 convolution's backward pass on the gathered
#: gradient). float32 / float64, 2 threads, AMD EPYC Zen 5 (AVX-512), medians of 9 / 7
#: interleaved rounds, ms, adjoint ``im2col`` -> sub-pixel, forward | backward: DCGAN's
#: 16x256x8x8 -> 128 4x4 (kept 0.79, ``taps`` inside) 6.58 -> 3.95 / 11.9 -> 7.86 | 11.7 ->
#: 11.2 / 19.7 -> 19.2 (noise: not taken); 16x128x16x16 -> 64 4x4 (0.89) 6.58 -> 3.66 / 10.8 ->
#: 7.0; U-Net's 16x128x28x28 -> 64 2x2 | 11.9 -> 7.31 / 20.1 -> 13.8. Not taken: U-Net's
#: forward pass, 3.73 -> 3.27 in a loop of single calls but 4.1-4.9 -> 5.3-10 in 200 ms bursts
#: (``bench.time_turn``: its 13 MB stride-1 product is a second fresh allocation per call, and
#: the bursts paid its page faults; float64 lost in the loop too, 6.43 -> 8.94);
#: 16x512x4x4 -> 256 4x4 (kept 0.64) 6.20 -> 9.37; 16x64x32x32 -> 3 4x4 (12 stacked filters)
#: 1.03 -> 1.83.
#:
#: The forward pass now runs phase by phase where
#: :func:`~numbaconv.kernels.subpixel.implicit_applies` (no stacked output, no shuffle; measured
#: there, float32 / float64, 2 threads, AMD EPYC Zen 5, medians of 7 alternating rounds, ms,
#: stacked convolution and shuffle -> phase by phase): DCGAN 3.95 -> 3.21 / 7.30 -> 6.74,
#: 16x128x16x16 -> 64 4x4 3.77 -> 3.11 / 7.77 -> 7.47, 8x256x8x8 -> 128 4x4 2.15 -> 1.93 / 4.21
#: -> 4.43, 2x256x8x8 -> 128 4x4 1.10 -> 0.87 / 1.56 -> 1.35; and so does U-Net's one-tap
#: forward pass, adjoint ``im2col`` 3.91 -> 3.37 / 7.45 -> 6.12. Not taken: 16x512x4x4 -> 256
#: 4x4 (kept 0.64) phase by phase, 3.61 -> 4.43.
SUBPIXEL_MIN_KEPT = 0.75


def transposed_via_subpixel(geom: ConvGeometry, dtype=None, direction: str = "forward") -> bool:
    """Whether ``'auto'`` runs the transposed convolution whose adjoint convolution is ``geom``
    in sub-pixel form (see :data:`SUBPIXEL_MIN_CHANNELS`); a function of the geometry and dtype
    (the forward pass of one-tap layers where :func:`~numbaconv.kernels.subpixel.implicit_applies`,
    which depends on the dtype)."""
    if not subpixel.applies(geom) or geom.in_channels < SUBPIXEL_MIN_CHANNELS:
        return False
    taps_h = geom.filter_height // geom.stride_h
    taps_w = geom.filter_width // geom.stride_w
    kept = (geom.out_height * geom.out_width) / (
        (geom.out_height + taps_h - 1) * (geom.out_width + taps_w - 1)
    )
    if kept < SUBPIXEL_MIN_KEPT:
        return False
    one_tap = taps_h == taps_w == 1
    if direction == "backward":
        return one_tap
    # One tap: only phase by phase (no stacked output to allocate; see SUBPIXEL_MIN_KEPT).
    itemsize = np.dtype(dtype).itemsize if dtype is not None else 4
    plan = subpixel.plan(geom, geom.output_shape)
    return not one_tap or subpixel.implicit_applies(plan, itemsize)


def transposed_shares_columns(geom: ConvGeometry, dtype, name: str) -> bool:
    """Whether the backward pass of a transposed convolution whose adjoint convolution is
    ``geom`` computes grad-x and grad-w from one set of columns of its ``grad_y``
    (:func:`numbaconv.kernels.im2col.forward_and_weight_gradient`): where both would run
    ``im2col`` (kernel ``name``, resolved; for ``'auto'``, its choice for the adjoint's forward
    and backward passes) with grad-w on the whole batch's columns
    (:func:`~numbaconv.kernels.im2col.batch_weight_gradient`, which runs with BLAS inside the
    kernels). Measured, float32 / float64, 2 threads, AMD EPYC Zen 5, ms, separate -> shared:
    DCGAN's 16x256x8x8 -> 128 4x4 stride 2 8.83 -> 6.74 / 15.24 -> 15.17, 16x128x8x8 -> 64 4x4
    2.63 -> 2.17 / 4.47 -> 3.91."""
    if name == "auto":
        runs_im2col = choose(geom, dtype, "forward") == choose(geom, dtype, "backward") == "im2col"
    else:
        runs_im2col = name == "im2col"
    itemsize = np.dtype(dtype).itemsize
    return runs_im2col and blas_inside_kernels() and im2col.batch_weight_gradient(geom, itemsize)


def subpixel_forward_kernel(sub_geom: ConvGeometry, dtype) -> str:
    """The kernel of a sub-pixel form's stride-1 convolution: ``taps`` where at most
    :data:`TAPS_MAX_USEFUL` of ``im2col``'s products would meet the image (its padding of
    ``T - 1`` on small maps; DCGAN's 8x8: 3.95 against 4.94 ms float32, 7.86 against 11.0
    float64, the measurements above), else what :func:`choose` picks."""
    if taps.useful_fraction(sub_geom) <= TAPS_MAX_USEFUL:
        return "taps"
    return choose(sub_geom, dtype, "forward")


class _Auto:
    """The ``'auto'`` kernel: delegates each call to the kernel :func:`choose` names."""

    @staticmethod
    def forward(x, w, b, geom: ConvGeometry):
        return _IMPLEMENTATIONS[choose(geom, x.dtype, "forward")].forward(x, w, b, geom)

    @staticmethod
    def backward(grad_y, x, w, geom: ConvGeometry):
        name = choose(geom, x.dtype, "backward")
        return _IMPLEMENTATIONS[name].backward(grad_y, x, w, geom)


def implementation(name: str):
    """The object with ``forward``/``backward`` for a resolved kernel name."""
    return _Auto if name == "auto" else _IMPLEMENTATIONS[name]
