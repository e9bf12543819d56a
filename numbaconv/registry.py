"""The kernel registry: kernel names, the default kernel and how a name becomes an implementation.

Every kernel module exposes ``forward(x, w, b, geom) -> y`` and
``backward(grad_y, x, w, geom) -> (grad_x, grad_w, grad_b)``. They receive validated, C-contiguous
arrays of one supported dtype and a :class:`~numbaconv.geometry.ConvGeometry`.
"""

from __future__ import annotations

import os
from types import ModuleType

from .kernels import direct, im2col, teaching

ENV_VAR = "NUMBACONV_KERNEL"
BUILTIN_DEFAULT = "im2col"

_IMPLEMENTATIONS: dict[str, ModuleType] = {
    "im2col": im2col,
    "direct": direct,
    "numpy": teaching,
}

#: The names accepted by ``kernel=`` and ``NUMBACONV_KERNEL``.
KERNELS: tuple[str, ...] = tuple(_IMPLEMENTATIONS)


def _check_name(name, origin: str) -> str:
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel {name!r} ({origin}); valid kernels: {', '.join(KERNELS)}")
    return name


def default_kernel() -> tuple[str, str]:
    """The default kernel name and where it came from (read at call time)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"from the {ENV_VAR} environment variable"), f"{ENV_VAR}"
    return BUILTIN_DEFAULT, "built-in default"


def resolve(kernel: str | None) -> str:
    """The kernel name that ``kernel=`` stands for (``None`` means the default)."""
    if kernel is None:
        return default_kernel()[0]
    return _check_name(kernel, "kernel=")


def implementation(name: str) -> ModuleType:
    return _IMPLEMENTATIONS[name]
