"""numbaconv's timing harness: seeded layer data, each operation's calls, warm-up, timing, medians.

One place for what every benchmark of numbaconv does, so that its three users measure the same
thing the same way:

- ``numbaconv bench`` (:mod:`numbaconv.cli`): every kernel on each layer, one after the other
  (:func:`bench_layer`);
- ``asv_benchmarks/compare_torch.py``: numbaconv against PyTorch, each in its own process, turns
  interleaved (:func:`make_data`, :func:`calls`, :func:`time_turn`);
- the asv suite (``asv_benchmarks/benchmarks``): asv keeps its own timer, the data and the calls
  come from here (:func:`make_data`, :func:`calls`, :func:`reduced`).

The layers are :mod:`numbaconv.shapes`' (``conv2d``, ``conv_transpose2d`` and ``conv1d`` layers,
each shape type naming its ``op``). For each op, "forward" is the op itself and "backward" is all
three gradients at once (``<op>_backward``; PyTorch's ``aten.convolution_backward``, no autograd
graph).

This module imports neither numbaconv nor PyTorch at import time. ``compare_torch.py`` and the asv
suite load it by its path (``importlib.util.spec_from_file_location``, registered in
``sys.modules`` under a name of their own), so that:

- a PyTorch worker process never imports numbaconv (which sets ``OMP_WAIT_POLICY`` and picks a
  threading layer on import);
- asv, which runs one checkout's benchmarks against the numbaconv installed from each commit of
  the history, measures every commit with the same data and calls: those of the checkout, not of
  the commit. An operation the commit doesn't have raises :class:`Unavailable`, which asv records
  as skipped.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

if __package__:
    from . import shapes
else:  # loaded by path (load_standalone): its sibling module, by path too

    def _sibling(name: str):
        module_name = f"_numbaconv_{name}"
        if module_name not in sys.modules:
            path = Path(__file__).with_name(f"{name}.py")
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # NamedTuple looks its module up while it builds
            spec.loader.exec_module(module)
        return sys.modules[module_name]

    shapes = _sibling("shapes")

#: Seconds of untimed calls before a kernel's timed calls (at least one call: compilation or
#: Numba's cache load is never timed). 0.2 s: after the ``numpy`` kernel's multi-threaded GEMMs,
#: OpenBLAS's threads spin for about 0.1 s and slowed whichever kernel came next by up to 2x, and
#: OpenMP workers asleep since the previous turn take a few calls to be back at speed.
WARMUP_SECONDS = 0.2
#: The kernel every other kernel's speed is compared with in ``numbaconv bench``.
BASELINE_KERNEL = "numpy"
#: The two timed passes of every layer.
PASSES = ("forward", "backward")


class Unavailable(NotImplementedError):
    """The numbaconv under test cannot run this case (an operation or kernel it doesn't have).

    A ``NotImplementedError``, so that asv records the case as skipped.
    """


# --------------------------------------------------------------------------------------------
# Data


class LayerData(NamedTuple):
    """One layer's seeded arrays and the keyword options of its op.

    ``x`` is the op's input, ``w`` its weight (in the op's layout), ``b`` the bias, ``grad_y`` a
    gradient of the op's output (its shape).
    """

    op: str
    x: np.ndarray
    w: np.ndarray
    b: np.ndarray
    grad_y: np.ndarray
    options: dict

    def head(self, count: int) -> LayerData:
        """The same layer on the first ``count`` images."""
        return self._replace(x=self.x[:count], grad_y=self.grad_y[:count])

    @property
    def flops(self) -> int:
        """Flops of the forward pass, 2 per multiply-add; the backward pass does twice as many.

        Every output element of a convolution is a dot product over ``w.shape[1:]`` (its
        channels of one group and the filter taps): 2·N·K·OH·OW·(C/groups)·R·S. A transposed
        convolution is a convolution's input gradient: each of its *input* elements meets
        ``w.shape[1:]`` weights, 2·N·C_in·H·W·(C_out/groups)·R·S.
        """
        counted = self.x if self.op.startswith("conv_transpose") else self.grad_y
        return 2 * counted.size * math.prod(self.w.shape[1:])


def reduced(shape, max_batch: int, max_size: int):
    """``shape`` with at most ``max_batch`` images of at most ``max_size`` pixels a side (1-D:
    ``max_size**2`` samples, about as much work per channel); channels, filters, stride and
    padding unchanged. The asv suite's reduced preset (``NUMBACONV_BENCH_QUICK=1``)."""
    sizes = {"batch": min(shape.batch, max_batch)}
    if shape.op == "conv1d":
        sizes["length"] = min(shape.length, max_size * max_size)
    else:
        sizes["height"] = min(shape.height, max_size)
        sizes["width"] = min(shape.width, max_size)
    return shape._replace(**sizes)


def make_data(shape, dtype, output_shape: Callable | None = None, seed: int = 0) -> LayerData:
    """Seeded standard-normal data for ``shape``; weights scaled so that outputs are O(1).

    The same ``shape``, ``dtype`` and ``seed`` give the same arrays in every process and with
    every library: x, w, b and grad_y are drawn in that order from one generator.

    Parameters
    ----------
    shape : LayerShape, TransposedLayerShape or Conv1dLayerShape
    dtype : numpy dtype or its name
    output_shape : callable, optional
        ``output_shape(op, x, w, options)`` -> the op's output shape. Default: numbaconv's own
        op on an empty batch (no kernel runs; the output-size formulas stay in
        ``numbaconv.geometry``). The PyTorch side passes :func:`torch_output_shape`.
    seed : int

    Returns
    -------
    LayerData
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape.input_shape, dtype=dtype)
    w_shape = shape.weight_shape
    # Fan-in of one output element: the input channels of its group times the filter taps.
    if shape.op.startswith("conv_transpose"):
        fan_in = shape.in_channels // shape.groups * math.prod(w_shape[2:])
    else:
        fan_in = math.prod(w_shape[1:])
    w = (rng.standard_normal(w_shape) / math.sqrt(fan_in)).astype(dtype)
    b = rng.standard_normal(shape.out_channels, dtype=dtype)
    options = dict(shape.options)
    out_shape = (output_shape or numbaconv_output_shape)(shape.op, x, w, options)
    grad_y = rng.standard_normal((shape.batch, *out_shape[1:]), dtype=dtype)
    return LayerData(shape.op, x, w, b, grad_y, options)


def numbaconv_output_shape(op: str, x, w, options) -> tuple[int, ...]:
    """The output shape of numbaconv's ``op`` on ``x``, from a call on an empty batch."""
    return _numbaconv_function(op)(x[:0], w, **options).shape


def torch_output_shape(op: str, x, w, options) -> tuple[int, ...]:
    """The output shape of PyTorch's ``op`` on ``x``, from a call on its first image."""
    torch = _import_torch()
    with torch.no_grad():
        y = getattr(torch.nn.functional, op)(
            torch.from_numpy(x[:1]), torch.from_numpy(w), **options
        )
    return tuple(y.shape)


# --------------------------------------------------------------------------------------------
# Calls


def _numbaconv_function(op: str) -> Callable:
    import numbaconv

    function = getattr(numbaconv, op, None)
    if function is None:
        raise Unavailable(f"numbaconv.{op} does not exist in this numbaconv")
    return function


def numbaconv_calls(kernel: str, data: LayerData) -> tuple[Callable, Callable]:
    """``(forward, backward)``: no-argument functions running numbaconv's op with ``kernel``.

    ``backward`` returns ``(grad_x, grad_w, grad_b)``.

    Raises
    ------
    Unavailable
        When numbaconv has no such op or kernel.
    """
    import numbaconv

    if kernel not in numbaconv.KERNELS:
        raise Unavailable(f"kernel {kernel!r} is not in numbaconv.KERNELS here")
    forward_op = _numbaconv_function(data.op)
    backward_op = _numbaconv_function(f"{data.op}_backward")
    x, w, b, grad_y, options = data.x, data.w, data.b, data.grad_y, data.options

    def forward():
        return forward_op(x, w, b, kernel=kernel, **options)

    def backward():
        return backward_op(grad_y, x, w, kernel=kernel, **options)

    return forward, backward


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise Unavailable("torch is not installed in this environment") from error
    return torch


def torch_calls(data: LayerData, threads: int | None = None) -> tuple[Callable, Callable]:
    """``(forward, backward)``: PyTorch's CPU op on the same data (``torch.nn.functional``'s op
    under ``no_grad``; ``aten.convolution_backward`` for all three gradients at once).

    Parameters
    ----------
    data : LayerData
    threads : int, optional
        ``torch.set_num_threads`` when given.
    """
    torch = _import_torch()
    if threads is not None:
        torch.set_num_threads(threads)
    tx, tw, tb, tgy = (torch.from_numpy(a) for a in (data.x, data.w, data.b, data.grad_y))
    options = data.options
    forward_op = getattr(torch.nn.functional, data.op)
    dims = data.x.ndim - 2

    def as_list(value):
        return list(value) if isinstance(value, tuple | list) else [value] * dims

    transposed = data.op.startswith("conv_transpose")
    stride, padding = as_list(options["stride"]), as_list(options["padding"])
    dilation = as_list(options["dilation"])
    output_padding = as_list(options.get("output_padding", 0))
    out_channels = data.b.shape[0]
    convolution_backward = torch.ops.aten.convolution_backward

    def forward():
        with torch.no_grad():
            return forward_op(tx, tw, tb, **options)

    def backward():
        return convolution_backward(
            tgy, tx, tw, [out_channels], stride, padding, dilation, transposed, output_padding,
            options["groups"], [True, True, True],
        )  # fmt: skip

    return forward, backward


def calls(kernel: str, data: LayerData, threads: int | None = None) -> tuple[Callable, Callable]:
    """``(forward, backward)`` of ``kernel``: a numbaconv kernel's name, or ``"torch"``."""
    if kernel == "torch":
        return torch_calls(data, threads)
    return numbaconv_calls(kernel, data)


# --------------------------------------------------------------------------------------------
# Timing


def warm_up(call: Callable, seconds: float) -> None:
    """Call ``call`` for ``seconds`` (at least once), untimed."""
    started = time.perf_counter()
    call()
    while time.perf_counter() - started < seconds:
        call()


def time_calls(call: Callable, count: int) -> list[float]:
    """Seconds of ``count`` calls of ``call``, back to back."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def time_turn(call: Callable, count: int, warmup_seconds: float = WARMUP_SECONDS) -> float:
    """One turn: untimed calls for ``warmup_seconds``, then the median of ``count`` timed ones."""
    warm_up(call, warmup_seconds)
    return statistics.median(time_calls(call, count))


@dataclass
class BenchResult:
    """The figures of one (layer, kernel) pair; times are medians in milliseconds."""

    shape: str
    #: The shape's values (conv2d: N, C, H, W, K, R, S, stride, pad, dilation, groups).
    dims: list
    kernel: str
    forward_ms: float
    backward_ms: float
    forward_gflops: float  #: LayerData.flops / forward time
    backward_gflops: float  #: 2 * LayerData.flops / backward time (grad-x and grad-w)
    forward_speedup: float | None = None  #: over the numpy kernel; None when it was not timed
    backward_speedup: float | None = None
    #: The kernels ``auto`` runs forward and backward, when the registry can say (``choose``).
    auto_forward: str | None = None
    auto_backward: str | None = None
    op: str = "conv2d"


def bench_layer(
    name: str,
    shape,
    kernels: list[str],
    dtype,
    repeat: int,
    progress=None,
    warmup_seconds: float = WARMUP_SECONDS,
) -> list[BenchResult]:
    """Time forward and backward of ``kernels`` on one layer (``numbaconv bench``).

    Per kernel and pass: :func:`time_turn` with ``repeat`` timed calls. Kernels are timed one
    after the other, not interleaved call by call (see :data:`WARMUP_SECONDS`).

    Parameters
    ----------
    name : str
        Label of the layer in the results.
    shape : LayerShape, TransposedLayerShape or Conv1dLayerShape
    kernels : list of str
    dtype : numpy dtype
    repeat : int
    progress : tqdm-like, optional
        Advanced by ``repeat + 1`` per kernel (warm-up included).

    Returns
    -------
    list of BenchResult
        One per kernel, in the order of ``kernels``.
    """
    data = make_data(shape, dtype)
    medians = {}
    for kernel in kernels:
        if progress is not None:
            progress.set_postfix_str(f"{name} {kernel}")
        forward, backward = numbaconv_calls(kernel, data)
        medians[kernel] = tuple(
            time_turn(call, repeat, warmup_seconds) for call in (forward, backward)
        )
        if progress is not None:
            progress.update(repeat + 1)

    auto_forward, auto_backward = auto_picks(shape, dtype)
    baseline = medians.get(BASELINE_KERNEL)
    results = []
    for kernel, (forward_s, backward_s) in medians.items():
        results.append(
            BenchResult(
                shape=name,
                dims=list(shape),
                kernel=kernel,
                forward_ms=forward_s * 1e3,
                backward_ms=backward_s * 1e3,
                forward_gflops=data.flops / forward_s / 1e9,
                backward_gflops=2 * data.flops / backward_s / 1e9,
                forward_speedup=None if baseline is None else baseline[0] / forward_s,
                backward_speedup=None if baseline is None else baseline[1] / backward_s,
                auto_forward=auto_forward,
                auto_backward=auto_backward,
                op=shape.op,
            )
        )
    return results


def auto_picks(shape, dtype) -> tuple[str | None, str | None]:
    """The kernels that ``'auto'`` runs forward and backward on a ``conv2d`` layer.

    Uses ``registry.choose(geom, dtype[, direction])`` when the registry has it (a registry whose
    ``choose`` takes no direction gets the same answer for both).

    Returns
    -------
    forward, backward : str or None
        None when the registry has no ``choose``, and for the other ops (whose forward pass is
        another pass of a convolution: ``auto`` decides inside them).
    """
    import inspect

    from numbaconv import registry
    from numbaconv.geometry import make_geometry

    choose = getattr(registry, "choose", None)
    if choose is None or shape.op != "conv2d":
        return None, None
    geom = make_geometry(shape.input_shape, shape.weight_shape, **shape.options)
    dtype = np.dtype(dtype)
    if "direction" not in inspect.signature(choose).parameters:
        pick = choose(geom, dtype)
        return pick, pick
    return choose(geom, dtype, direction="forward"), choose(geom, dtype, direction="backward")
