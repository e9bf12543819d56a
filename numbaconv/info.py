"""What ``numbaconv info`` reports: versions, threading, BLAS, the Numba cache, the CPU and its
SIMD width, the kernels and the default kernel.

Machine inspection lives here, apart from the command line (:mod:`numbaconv.cli` prints
:func:`info_lines`) and from the timing harness (:mod:`numbaconv.bench`, whose JSON reports
name the CPU with :func:`cpu_model`).
"""

from __future__ import annotations

import os
import platform

import numpy as np

from . import __version__, cache, registry
from .functional import conv2d


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else ``platform.processor()``.

    Returns
    -------
    str
        For example ``"Intel(R) Xeon(R) Processor"``; ``"unknown"`` when nothing says.
    """
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or "unknown"


#: Widest first: the SIMD extension that /proc/cpuinfo (or LLVM) names, and its register width.
_SIMD = (
    ("avx512f", "AVX-512", 512),
    ("avx2", "AVX2", 256),
    ("avx", "AVX", 256),
    ("sse2", "SSE2", 128),
    ("asimd", "NEON", 128),
    ("neon", "NEON", 128),
)


def simd_width() -> tuple[str, int | None]:
    """The widest SIMD extension of this CPU and its width in bits.

    Reads the ``flags`` (x86) or ``Features`` (Arm) of ``/proc/cpuinfo``; elsewhere asks LLVM
    (through llvmlite, which Numba uses) for the host's features.

    Returns
    -------
    name : str
        For example ``"AVX-512"``; ``"unknown"`` when none is recognised.
    bits : int or None
    """
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    if not flags:
        try:
            from llvmlite import binding

            flags = {name for name, on in binding.get_host_cpu_features().items() if on}
        except Exception:  # llvmlite's host query is best effort on exotic platforms
            flags = set()
    for flag, name, bits in _SIMD:
        if flag in flags:
            return name, bits
    return "unknown", None


def threading_layer() -> str | None:
    """The Numba threading layer in use, or None before the first parallel call."""
    from ._threading import active_threading_layer

    return active_threading_layer()


def _initialise_threading() -> None:
    """Run one tiny convolution with Numba kernels, so that the threading layer is chosen."""
    x = np.ones((1, 1, 4, 4), dtype=np.float32)
    w = np.ones((1, 1, 3, 3), dtype=np.float32)
    try:
        candidates = [registry.default_kernel()[0], *registry.KERNELS]
    except ValueError:
        candidates = list(registry.KERNELS)
    for kernel in candidates:  # the numpy kernel, say, starts no Numba threads
        if threading_layer() is not None:
            return
        conv2d(x, w, kernel=kernel)


def info_lines() -> list[tuple[str, str]]:
    """The ``numbaconv info`` report as (field, value) pairs.

    Returns
    -------
    list of (str, str)
    """
    import numba
    import scipy

    from ._threading import blas_mode, threading_summary

    _initialise_threading()
    try:
        name, origin = registry.default_kernel()
        default = f"{name} ({origin})"
    except ValueError as exc:
        default = f"invalid: {exc}"
    simd_name, bits = simd_width()
    return [
        ("numbaconv", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
        ("python", platform.python_version()),
        ("numba", numba.__version__),
        ("numpy", np.__version__),
        ("scipy", scipy.__version__),
        ("threading layer", threading_summary()),
        (
            "threads",
            f"{numba.get_num_threads()} (NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS})",
        ),
        ("blas", blas_mode()),
        ("numba cache", ", ".join(cache.cache_dirs())),
        ("cpu", cpu_model()),
        ("simd", f"{simd_name}, {bits} bits" if bits else simd_name),
        ("kernels", ", ".join(registry.KERNELS)),
        ("default kernel", default),
    ]
