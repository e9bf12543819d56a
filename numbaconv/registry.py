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

from .geometry import ConvGeometry
from .kernels import direct, im2col, teaching, winograd

ENV_VAR = "NUMBACONV_KERNEL"
BUILTIN_DEFAULT = "auto"

_IMPLEMENTATIONS: dict[str, ModuleType] = {
    "im2col": im2col,
    "winograd": winograd,
    "direct": direct,
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


def choose(geom: ConvGeometry, dtype=None, direction: str = "forward") -> str:
    """The concrete kernel that ``'auto'`` runs for a geometry (and direction).

    The cost model, from interleaved measurements of the suite's layers (float32) on a 2-core
    AVX-512 machine, ``asv_benchmarks/compare_torch.py`` and ``numbaconv bench``:

    - ``im2col`` was the fastest kernel, or within noise of it, on every layer at 2 threads;
    - ``winograd`` was faster on one thread (resnet3x3 forward 36 ms against 68 ms) but slower on
      two (80-100 ms against 60-70 ms), where its 16 GEMMs per batch chunk each fork and join
      the BLAS thread pool; under load it was up to 10x slower. Choosing it by thread count would
      make results depend on the thread count, which numbaconv promises they never do;
    - ``direct`` did not beat ``im2col`` even on the digits layer.

    So today every geometry maps to ``im2col``. This function is the one place to change when a
    kernel wins somewhere. ``dtype`` and ``direction`` are accepted for that future.
    """
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    return "im2col"


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
