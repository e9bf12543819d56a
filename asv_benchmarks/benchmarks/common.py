"""What the benchmark modules share: the parameter grid, the timing settings, the cases' data and
calls (from numbaconv's timing harness), the checks, and compiling only what a benchmark runs.

The data and calls come from numbaconv's timing harness, ``numbaconv/bench.py`` of this checkout,
loaded by path: asv runs this checkout's suite against the numbaconv installed from each commit
of the history, so every commit is measured on the same data with the same calls (an operation a
commit doesn't have is skipped). ``numbaconv bench`` and ``compare_torch.py`` use the same
harness; asv keeps its own timer (the settings in :class:`Timed`).

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

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

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
#: only: every kernel on 27 layers would take hours per commit on 2 cores. The last three run
#: ``conv_transpose2d`` (U-Net decoder, DCGAN) and ``conv1d`` (audio): their shape types say so.
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
    "unet_up2x2",
    "dcgan_up4x4",
    "audio_conv1d",
)
ZOO_KERNEL_NAMES = ("auto", "torch")
SHAPE_NAMES = SUITE_SHAPE_NAMES + ZOO_SHAPE_NAMES
DTYPE_NAMES = ("float32", "float64")

QUICK = os.environ.get("NUMBACONV_BENCH_QUICK", "0") not in ("", "0")
#: The reduced preset, for CI's smoke run (every benchmark once, nothing saved): sized so that the
#: whole suite's dry run stays within minutes, not to measure. Its calls take microseconds, where
#: thread wake-ups dominate; the dashboard's series run at full size (run.sh history).
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


def _load_harness():
    """``numbaconv/bench.py`` of this checkout, loaded by path (see the module's docstring)."""
    name = "_numbaconv_bench"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "numbaconv" / "bench.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and NamedTuples look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


harness = _load_harness()


class Timed:
    """asv's sampling settings for the ``time_*`` benchmarks, aimed at a second run of one commit
    landing within 5 % of the first on the default ``run.sh history`` selection. README,
    "Benchmarks", has the spread measured with them: the single-threaded ConvLayer step within
    1.6 % on a loaded 2-core machine, the 2-threaded layers as noisy as the machine was.

    - ``sample_time`` 0.05 s (asv's default 0.01): a sample is at least 50 ms of calls, so that a
      150 us call (the ConvLayer step) is averaged over hundreds of calls, not over the few that
      a thread wake-up or a page fault can double;
    - ``warmup_time`` 0.5 s of untimed calls in each process (asv's default 0.1 s): numbaconv's
      OpenMP or TBB workers, OpenBLAS's threads and the cores' clocks are awake before the first
      sample, as they are in a training loop;
    - ``rounds`` 3 (default 2) processes per benchmark, interleaved with the other benchmarks' by
      asv, so that one slow moment of the machine lands in one process of many;
    - ``repeat`` (4, 10, 10.0): 4 to 10 samples per process, at most 10 s of them; the result is
      the median of all samples, and asv's confidence interval over them is what ``asv compare``
      (``run.sh compare``) tests a change against;
    - ``min_run_count`` 2 (asv's default): the warm-up aside, every process times at least two
      calls.

    ``timeout``: a benchmark's first setup compiles its own kernel (tens of seconds for ``auto``,
    which may run any family).
    """

    sample_time = 0.05
    warmup_time = 0.5
    rounds = 3
    repeat = (4, 10, 10.0)
    min_run_count = 2
    timeout = 300


def require_kernel(kernel: str) -> None:
    """Skip (``NotImplementedError``) a kernel that the commit under test doesn't have."""
    if kernel == "torch":
        if importlib.util.find_spec("torch") is None:
            raise NotImplementedError("torch is not installed in this environment")
    elif kernel not in numbaconv.KERNELS:
        raise NotImplementedError(f"kernel {kernel!r} is not in numbaconv.KERNELS at this commit")


def layer_shape(name: str):
    """The layer called ``name`` (``numbaconv/shapes.py`` of this checkout; reduced in quick
    mode)."""
    shape = harness.shapes.ALL_SHAPES[name]
    return harness.reduced(shape, QUICK_MAX_BATCH, QUICK_MAX_SIZE) if QUICK else shape


def prepare(kernel: str, shape_name: str, dtype_name: str):
    """The data of one benchmark case (a ``LayerData``), or ``NotImplementedError`` when the case
    is skipped."""
    require_kernel(kernel)
    if shape_name in ZOO_SHAPE_NAMES and kernel not in ZOO_KERNEL_NAMES:
        raise NotImplementedError(f"the zoo layers run {' and '.join(ZOO_KERNEL_NAMES)} only")
    if not QUICK and (kernel, shape_name, dtype_name) in TOO_SLOW:
        raise NotImplementedError(f"{kernel} on {shape_name} in {dtype_name}: seconds per call")
    shape = layer_shape(shape_name)
    if shape.op != "conv2d" and not hasattr(numbaconv, f"{shape.op}_backward"):
        raise NotImplementedError(f"numbaconv.{shape.op} does not exist at this commit")
    return harness.make_data(shape, dtype_name)


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


def forward_call(kernel: str, data) -> Callable:
    """A no-argument function computing the layer's op forward with ``kernel`` (or PyTorch)."""
    if kernel == "torch":
        _torch()
    return harness.calls(kernel, data, THREADS)[0]


def backward_call(kernel: str, data) -> Callable:
    """A no-argument function computing ``(grad_x, grad_w, grad_b)`` with ``kernel``."""
    if kernel == "torch":
        _torch()
    return harness.calls(kernel, data, THREADS)[1]


def _as_numpy(result) -> np.ndarray:
    return result.numpy() if hasattr(result, "numpy") else np.asarray(result)


def assert_close(actual, expected, dtype_name: str, what: str) -> None:
    """``actual`` equals ``expected`` to ``TOLERANCE`` times the larger of 1 and max |expected|."""
    expected = np.asarray(expected)
    scale = float(np.abs(expected).max(initial=1.0))
    tolerance = TOLERANCE[dtype_name] * scale
    np.testing.assert_allclose(_as_numpy(actual), expected, rtol=0, atol=tolerance, err_msg=what)


def check_forward(kernel: str, data, y, dtype_name: str) -> None:
    """Compare the first images of ``y`` (the full call's result) with the ``numpy`` kernel's."""
    if kernel == "numpy":
        return
    head = data.head(CHECK_BATCH)
    expected = harness.numbaconv_calls("numpy", head)[0]()
    assert_close(_as_numpy(y)[:CHECK_BATCH], expected, dtype_name, f"{kernel} forward")


def check_backward(kernel: str, data, dtype_name: str) -> None:
    """Compare ``kernel``'s three gradients with the ``numpy`` kernel's on the first images."""
    if kernel == "numpy":
        return
    head = data.head(CHECK_BATCH)
    actual = backward_call(kernel, head)()
    expected = harness.numbaconv_calls("numpy", head)[1]()
    for name, got, want in zip(("grad_x", "grad_w", "grad_b"), actual, expected, strict=True):
        assert_close(got, want, dtype_name, f"{kernel} {name}")


def _installed_numbaconv_key() -> str:
    """Names this install of numbaconv: its files' paths, sizes and modification times, which is
    also what Numba's cache checks before it reuses a compiled function."""
    digest = hashlib.sha256()
    folder = Path(numbaconv.__file__).parent
    for path in sorted(folder.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


_COMPILE_SCRIPT = """
import sys
sys.path.insert(0, {benchmark_root!r})
from benchmarks import common
data = common.prepare({kernel!r}, {shape!r}, {dtype!r})
common.forward_call({kernel!r}, data)()
common.backward_call({kernel!r}, data)()
"""


def compile_apart(kernel: str, shape_name: str, dtype_name: str) -> None:
    """Compile what one case runs into Numba's on-disk cache, in a process of its own, once per
    install of numbaconv.

    For the ``peakmem_*`` benchmarks: asv's peak memory is the benchmark process's, setup
    included, and compiling there would count LLVM's memory. The process runs the case itself
    (its kernel, dtype, op and code paths, nothing else); a stamp file per case and install skips
    it in asv's later processes. (Until issue 14 one ``setup_cache`` compiled every kernel, layer
    and dtype of the suite before anything was timed, whatever ``--bench`` selected: about 70 s
    per commit.) The ``time_*`` benchmarks compile in their own setup instead: asv never times
    setup.
    """
    if kernel in ("numpy", "torch"):
        return  # nothing to compile
    stamps = Path(tempfile.gettempdir()) / "numbaconv-asv-compiled" / _installed_numbaconv_key()
    stamp = stamps / f"{kernel}-{shape_name}-{dtype_name}-{'quick' if QUICK else 'full'}"
    if stamp.exists():
        return
    script = _COMPILE_SCRIPT.format(
        benchmark_root=str(Path(__file__).resolve().parents[1]),
        kernel=kernel,
        shape=shape_name,
        dtype=dtype_name,
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    stamps.mkdir(parents=True, exist_ok=True)
    stamp.touch()
