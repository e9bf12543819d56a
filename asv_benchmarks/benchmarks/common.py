"""What the benchmark modules share: the parameter grid, seeded data, each kernel's calls, checks.

The parameter grid is hard-coded, not read from the package: asv keys a dashboard series on the
parameter values, so they must be the same at every commit. A combination that a commit cannot
run (a kernel it doesn't have, PyTorch not installed) or that the suite leaves out on purpose
raises ``NotImplementedError`` in ``setup``, which asv records as skipped.

``NUMBACONV_BENCH_QUICK=1`` selects the reduced preset: every layer shape keeps its channels,
filter, stride and padding but gets at most ``QUICK_MAX_BATCH`` images of at most
``QUICK_MAX_SIZE`` pixels a side, so a dry run of the whole suite takes a couple of minutes.
Its numbers are not comparable with full-size ones (``run.sh`` files them under a separate asv
machine name).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

import numbaconv

from . import THREADS, USER_OMP_WAIT_POLICY

#: Kernels benchmarked: numbaconv's kernel names, plus "torch" for PyTorch's conv2d (the
#: reference series). Add a name here when a kernel family lands.
KERNEL_NAMES = ("im2col", "direct", "numpy", "winograd", "auto", "torch")
#: The numbaconv kernels alone (benchmarks of numbaconv's own API).
NUMBACONV_KERNEL_NAMES = tuple(name for name in KERNEL_NAMES if name != "torch")
#: The layer shapes of ``numbaconv.shapes.LAYER_SHAPES`` that the suite measures.
SUITE_SHAPE_NAMES = (
    "digits",
    "mnist",
    "cifar",
    "resnet3x3",
    "strided",
    "pointwise",
    "first5x5",
    "stem7x7",
)
#: The model zoo's layers (``numbaconv.shapes.ZOO_SHAPES``), measured for ``auto`` and ``torch``
#: only: every kernel on 24 layers would take hours per commit on 2 cores.
ZOO_SHAPE_NAMES = (
    "resnet_shortcut",
    "resnet_3x3_14",
    "resnet_3x3_7",
    "resnet_reduce",
    "resnet_expand",
    "resnet_batch1",
    "dw3x3_112",
    "dw3x3_s2",
    "dw3x3_14",
    "dw5x5_28",
    "resnext_grouped",
    "dilated_2",
    "dilated_12",
    "inception_1x7",
    "inception_7x1",
    "unet_large",
)
ZOO_KERNEL_NAMES = ("auto", "torch")
SHAPE_NAMES = SUITE_SHAPE_NAMES + ZOO_SHAPE_NAMES
DTYPE_NAMES = ("float32", "float64")

QUICK = os.environ.get("NUMBACONV_BENCH_QUICK", "0") not in ("", "0")
QUICK_MAX_BATCH = 2
QUICK_MAX_SIZE = 16

#: Combinations left out at full size: the naive direct loops in float64 on the two largest
#: layers, where one backward call took 3.8 s (strided) and 4.9 s (resnet3x3) on 2 threads
#: (commit 0e08e86). The float32 direct series covers every layer; float64 adds nothing there
#: but minutes.
TOO_SLOW = {
    ("direct", "resnet3x3", "float64"),
    ("direct", "strided", "float64"),
}

#: Images of each layer compared with the ``numpy`` kernel in ``setup`` (a cheap check).
CHECK_BATCH = 2
#: Largest difference from the ``numpy`` kernel allowed, relative to the largest magnitude of its
#: result: float32 accumulation order differs between kernels (GEMM blocking, Winograd
#: transforms); float64 leaves room for nothing but rounding.
TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


class ConvData(NamedTuple):
    """One layer's seeded inputs: x (N, C, H, W), w (K, C // groups, R, S), b (K,), grad_y
    (N, K, OH, OW), and conv2d's keyword options (stride, padding, dilation, groups)."""

    x: np.ndarray
    w: np.ndarray
    b: np.ndarray
    grad_y: np.ndarray
    options: dict

    def head(self, count: int) -> ConvData:
        """The same layer on the first ``count`` images."""
        return self._replace(x=self.x[:count], grad_y=self.grad_y[:count])


def require_kernel(kernel: str) -> None:
    """Skip (``NotImplementedError``) a kernel that the commit under test doesn't have."""
    if kernel == "torch":
        if importlib.util.find_spec("torch") is None:
            raise NotImplementedError("torch is not installed in this environment")
    elif kernel not in numbaconv.KERNELS:
        raise NotImplementedError(f"kernel {kernel!r} is not in numbaconv.KERNELS at this commit")


def shrink(shape, max_batch: int, max_size: int):
    """``shape`` with at most ``max_batch`` images of at most ``max_size`` pixels a side."""
    return shape._replace(
        batch=min(shape.batch, max_batch),
        height=min(shape.height, max_size),
        width=min(shape.width, max_size),
    )


def layer_shape(name: str):
    """The ``LayerShape`` called ``name`` at the commit under test (reduced in quick mode)."""
    try:
        from numbaconv import shapes
    except ImportError as error:
        raise NotImplementedError("numbaconv.shapes does not exist at this commit") from error
    known = getattr(shapes, "ALL_SHAPES", shapes.LAYER_SHAPES)
    if name not in known:
        raise NotImplementedError(f"layer shape {name!r} is not in numbaconv.shapes at this commit")
    shape = known[name]
    return shrink(shape, QUICK_MAX_BATCH, QUICK_MAX_SIZE) if QUICK else shape


def make_data(shape, dtype, seed: int = 0) -> ConvData:
    """Seeded standard-normal data for ``shape``; weights scaled so that outputs are O(1)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    # Older commits' LayerShape has no dilation or groups (nor the properties that use them).
    groups = getattr(shape, "groups", 1)
    options = dict(
        stride=shape.stride,
        padding=shape.pad,
        dilation=getattr(shape, "dilation", 1),
        groups=groups,
    )
    c, k, r, s = shape.in_channels, shape.out_channels, shape.filter_height, shape.filter_width
    x = rng.standard_normal((shape.batch, c, shape.height, shape.width), dtype=dtype)
    fan_in = c // groups * r * s
    weight = (rng.standard_normal((k, c // groups, r, s)) / math.sqrt(fan_in)).astype(dtype)
    bias = rng.standard_normal(k, dtype=dtype)
    # numbaconv computes the output shape of an empty batch without running a kernel, so the
    # output-size formula stays in one place (numbaconv.geometry).
    out_shape = numbaconv.conv2d(x[:0], weight, **options).shape
    grad_y = rng.standard_normal((shape.batch, *out_shape[1:]), dtype=dtype)
    return ConvData(x, weight, bias, grad_y, options)


def prepare(kernel: str, shape_name: str, dtype_name: str) -> ConvData:
    """The data of one benchmark case, or ``NotImplementedError`` when the case is skipped."""
    require_kernel(kernel)
    if shape_name in ZOO_SHAPE_NAMES and kernel not in ZOO_KERNEL_NAMES:
        raise NotImplementedError(f"the zoo layers run {' and '.join(ZOO_KERNEL_NAMES)} only")
    if not QUICK and (kernel, shape_name, dtype_name) in TOO_SLOW:
        raise NotImplementedError(f"{kernel} on {shape_name} in {dtype_name}: seconds per call")
    return make_data(layer_shape(shape_name), dtype_name)


def _torch():
    # PyTorch's OpenMP runtime reads OMP_WAIT_POLICY when it loads: show it the user's setting,
    # not the PASSIVE default numbaconv set on import (a slower policy for PyTorch).
    numbaconv_policy = os.environ.pop("OMP_WAIT_POLICY", None)
    if USER_OMP_WAIT_POLICY is not None:
        os.environ["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
    try:
        import torch
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)
        if numbaconv_policy is not None:
            os.environ["OMP_WAIT_POLICY"] = numbaconv_policy

    torch.set_num_threads(THREADS)
    return torch


def forward_call(kernel: str, data: ConvData) -> Callable[[], np.ndarray]:
    """A no-argument function computing ``conv2d(x, w, b)`` with ``kernel``."""
    x, w, b, _, options = data
    if kernel == "torch":
        torch = _torch()
        tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))

        def torch_forward():
            with torch.no_grad():
                return torch.nn.functional.conv2d(tx, tw, tb, **options)

        return torch_forward

    def forward():
        return numbaconv.conv2d(x, w, b, kernel=kernel, **options)

    return forward


def backward_call(kernel: str, data: ConvData) -> Callable[[], tuple]:
    """A no-argument function computing ``(grad_x, grad_w, grad_b)`` with ``kernel``."""
    x, w, _, grad_y, options = data
    if kernel == "torch":
        torch = _torch()
        tx, tw, tgy = (torch.from_numpy(a) for a in (x, w, grad_y))
        convolution_backward = torch.ops.aten.convolution_backward
        bias_sizes = [w.shape[0]]

        def torch_backward():
            # The three gradients at once, no autograd graph: what conv2d_backward computes.
            return convolution_backward(
                tgy,
                tx,
                tw,
                bias_sizes,
                _pair(options["stride"]),
                _pair(options["padding"]),
                _pair(options["dilation"]),
                False,
                [0, 0],
                options["groups"],
                [True, True, True],
            )

        return torch_backward

    def backward():
        return numbaconv.conv2d_backward(grad_y, x, w, kernel=kernel, **options)

    return backward


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, tuple | list) else [value, value]


def _as_numpy(result) -> np.ndarray:
    return result.numpy() if hasattr(result, "numpy") else np.asarray(result)


def assert_close(actual, expected, dtype_name: str, what: str) -> None:
    """``actual`` equals ``expected`` to ``TOLERANCE`` times the larger of 1 and max |expected|."""
    expected = np.asarray(expected)
    scale = float(np.abs(expected).max(initial=1.0))
    tolerance = TOLERANCE[dtype_name] * scale
    np.testing.assert_allclose(_as_numpy(actual), expected, rtol=0, atol=tolerance, err_msg=what)


def check_forward(kernel: str, data: ConvData, y, dtype_name: str) -> None:
    """Compare the first images of ``y`` (the full call's result) with the ``numpy`` kernel's."""
    if kernel == "numpy":
        return
    head = data.head(CHECK_BATCH)
    expected = forward_call("numpy", head)()
    assert_close(_as_numpy(y)[:CHECK_BATCH], expected, dtype_name, f"{kernel} forward")


def check_backward(kernel: str, data: ConvData, dtype_name: str) -> None:
    """Compare ``kernel``'s three gradients with the ``numpy`` kernel's on the first images."""
    if kernel == "numpy":
        return
    head = data.head(CHECK_BATCH)
    actual = backward_call(kernel, head)()
    expected = backward_call("numpy", head)()
    for name, got, want in zip(("grad_x", "grad_w", "grad_b"), actual, expected, strict=True):
        assert_close(got, want, dtype_name, f"{kernel} {name}")


def warm_numba_cache() -> None:
    """Run every kernel of the commit under test once per layer shape and dtype, on tiny data.

    Numba compiles on first call and keeps the machine code on disk (``cache=True``). Doing this
    once, in asv's ``setup_cache`` process, means no measured process compiles: ``peakmem_*``
    doesn't count LLVM's memory and ``timeraw_*`` times a cache load.
    """
    for shape_name in SHAPE_NAMES:
        try:
            shape = layer_shape(shape_name)
        except NotImplementedError:
            continue
        kernels = ["auto"] if shape_name in ZOO_SHAPE_NAMES else numbaconv.KERNELS
        for dtype_name in DTYPE_NAMES:
            data = make_data(shrink(shape, 1, QUICK_MAX_SIZE), dtype_name)
            for kernel in kernels:
                forward_call(kernel, data)()
                backward_call(kernel, data)()


class WarmCache:
    """Base of every benchmark class: one ``setup_cache`` (one key, so asv runs it once per
    commit and environment) that warms Numba's on-disk cache before anything is measured."""

    timeout = 300

    def setup_cache(self):
        warm_numba_cache()

    setup_cache.timeout = 1200
