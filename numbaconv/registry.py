"""The kernel registry: kernel names, the default kernel, ``'auto'`` selection.

Every kernel family exposes ``forward(x, w, b, geom) -> y`` and
``backward(grad_y, x, w, geom) -> (grad_x, grad_w, grad_b)``. They receive validated, C-contiguous
arrays of one supported dtype and a :class:`~numbaconv.geometry.ConvGeometry`.

``'auto'`` picks, separately for forward and backward, the fastest concrete kernel for a
configuration (geometry and dtype): the first call with a configuration runs every candidate
once to warm it up and once more timed, keeps the fastest, and remembers the choice for the rest
of the process (like ``torch.backends.cudnn.benchmark``). The thread count in effect at that first
call is the one measured; the choice is not re-made when it changes, so ``'auto'`` stays bitwise
reproducible within a process, across thread counts too.
"""

from __future__ import annotations

import os
import threading
import time
from types import ModuleType

import numpy as np

from .geometry import ConvGeometry
from .kernels import direct, im2col, teaching, winograd

ENV_VAR = "NUMBACONV_KERNEL"
BUILTIN_DEFAULT = "im2col"

_IMPLEMENTATIONS: dict[str, ModuleType] = {
    "im2col": im2col,
    "winograd": winograd,
    "direct": direct,
    "numpy": teaching,
}

#: The names accepted by ``kernel=`` and ``NUMBACONV_KERNEL``.
KERNELS: tuple[str, ...] = ("auto", *_IMPLEMENTATIONS)

#: The kernels ``'auto'`` chooses from, the usually fastest first (see ``_AutoSelector``).
AUTO_CANDIDATES: tuple[str, ...] = ("winograd", "im2col", "direct", "numpy")


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


class _AutoSelector:
    """The ``'auto'`` kernel: times the candidates once per configuration, then remembers."""

    def __init__(self):
        self._choices: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def _select(self, direction: str, geom: ConvGeometry, dtype, run) -> tuple[str, object]:
        """Return ``(name, result)``: the chosen kernel and, when it was chosen just now, its
        timed result (so selection never computes the answer one time too many)."""
        key = (direction, geom, np.dtype(dtype).str)
        with self._lock:
            name = self._choices.get(key)
            if name is not None:
                return name, None
            best = None
            for candidate in AUTO_CANDIDATES:
                run(candidate)  # compile / load from cache, warm caches
                # The best of up to 3 timed runs, stopping once 50 ms are spent: quick calls are
                # noisy, slow ones are not worth repeating.
                elapsed, spent = float("inf"), 0.0
                for _ in range(3):
                    start = time.perf_counter()
                    result = run(candidate)
                    took = time.perf_counter() - start
                    elapsed, spent = min(elapsed, took), spent + took
                    if spent > 0.05:
                        break
                if best is None or elapsed < best[0]:
                    best = (elapsed, candidate, result)
            self._choices[key] = best[1]
            return best[1], best[2]

    def forward(self, x, w, b, geom: ConvGeometry):
        def run(name):
            return _IMPLEMENTATIONS[name].forward(x, w, b, geom)

        name, result = self._select("forward", geom, x.dtype, run)
        return run(name) if result is None else result

    def backward(self, grad_y, x, w, geom: ConvGeometry):
        def run(name):
            return _IMPLEMENTATIONS[name].backward(grad_y, x, w, geom)

        name, result = self._select("backward", geom, x.dtype, run)
        return run(name) if result is None else result

    def choose(self, geom: ConvGeometry, dtype, direction: str = "forward") -> str:
        """The kernel ``'auto'`` uses for a configuration, timing seeded data if not known yet."""
        key = (direction, geom, np.dtype(dtype).str)
        if key not in self._choices:
            rng = np.random.default_rng(0)
            x = rng.standard_normal(geom.input_shape).astype(dtype)
            w = rng.standard_normal(geom.weight_shape).astype(dtype)
            if direction == "forward":
                self.forward(x, w, None, geom)
            else:
                grad_y = rng.standard_normal(geom.output_shape).astype(dtype)
                self.backward(grad_y, x, w, geom)
        return self._choices[key]

    def clear(self) -> None:
        with self._lock:
            self._choices.clear()


_auto = _AutoSelector()


def choose(geom: ConvGeometry, dtype, direction: str = "forward") -> str:
    """The concrete kernel that ``'auto'`` runs for this geometry, dtype and direction."""
    return _auto.choose(geom, dtype, direction)


def implementation(name: str):
    """The object with ``forward``/``backward`` for a resolved kernel name."""
    return _auto if name == "auto" else _IMPLEMENTATIONS[name]
