"""Which of numbaconv's Numba parallel regions ran, on how many threads and lanes.

Calls under ``numbaconv._threading.SERIAL_FLOPS`` run on one thread, and a banded pass with one
job runs one lane even on many threads; a test of a parallel path that only *assumes* it ran in
parallel can pass while testing serial code. :class:`ThreadProbe` records, per public call (per
``kernel_guard``), the thread count the guard left and every parallel region the call ran, so
tests can assert it.

What is recorded is the split of the work: ``numba.get_num_threads()`` when each region starts
and, for the banded passes, the number of lanes their jobs were divided into. That split is what
a lane-boundary or reduction-order bug depends on; which OS thread then runs which lane is the
threading layer's business (TBB may even run both lanes of a short region on one thread).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass, field

import numba
from numba.core.registry import CPUDispatcher

from numbaconv import _threading, functional
from numbaconv.kernels import direct, im2col, taps, winograd

#: Modules whose module-level parallel kernels are called from Python: replacing the module
#: attribute reaches every call (``functional`` imports ``im2col_kernel``/``col2im_kernel`` by
#: name, so its copies are replaced too).
KERNEL_MODULES = (functional, im2col, winograd, direct, taps)

#: The banded passes split their jobs into lanes; the lane count is the first axis of this
#: per-lane argument (a workspace or the per-lane sums). Checked by ``test_parallel.py`` against
#: the kernels' signatures, so a renamed argument fails loudly instead of going unrecorded.
LANE_ARGUMENTS = {
    "fused_forward_kernel": "cols_ws",
    "fused_backward_kernel": "grad_w_lanes",
    "fused_winograd_kernel": "v_ws",
    "fused_weight_gradient_kernel": "sums",
    "flat_kernel": "workspace",
    "flat_grad_input_kernel": "workspace",
    "flat_grad_weight_kernel": "workspace",
    "taps_forward_kernel": "windows",
    "taps_grad_input_kernel": "windows",
    "taps_grad_weight_kernel": "outs",
}


def parallel_kernels(module) -> dict[str, CPUDispatcher]:
    """The module's ``@njit(parallel=True)`` functions, by attribute name."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, CPUDispatcher) and obj.targetoptions.get("parallel")
    }


@dataclass
class Region:
    """One run of a parallel kernel."""

    name: str  # "<module>.<function>"
    threads: int  # numba.get_num_threads() of the calling thread as it started
    lanes: int | None  # banded passes: how many runs of jobs; None for the other kernels


@dataclass
class Call:
    """One public call (one ``kernel_guard``) and the regions it ran."""

    work: int
    threads: int  # the width kernel_guard left for the call's kernels
    regions: list[Region] = field(default_factory=list)


class ThreadProbe:
    """Records calls and regions while installed (see the ``thread_probe`` fixture)."""

    def __init__(self):
        self.calls: list[Call] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def install(self, monkeypatch) -> ThreadProbe:
        real_guard = functional.kernel_guard

        @contextlib.contextmanager
        def guard(work, *args, **kwargs):
            with real_guard(work, *args, **kwargs):
                call = Call(work, numba.get_num_threads())
                with self._lock:
                    self.calls.append(call)
                outer = getattr(self._local, "call", None)
                self._local.call = call
                try:
                    yield
                finally:
                    self._local.call = outer

        monkeypatch.setattr(functional, "kernel_guard", guard)
        for module in KERNEL_MODULES:
            short = module.__name__.rsplit(".", 1)[-1]
            for name, dispatcher in parallel_kernels(module).items():
                monkeypatch.setattr(module, name, self._recording(f"{short}.{name}", dispatcher))
        return self

    def _recording(self, qualname, dispatcher):
        lane_arg = LANE_ARGUMENTS.get(qualname.rsplit(".", 1)[-1])
        index = None
        if lane_arg is not None:
            index = list(inspect.signature(dispatcher.py_func).parameters).index(lane_arg)

        def run(*args):
            lanes = None if index is None else args[index].shape[0]
            region = Region(qualname, numba.get_num_threads(), lanes)
            call = getattr(self._local, "call", None)
            if call is None:  # a kernel called directly, not through the public API
                call = Call(0, region.threads)
                with self._lock:
                    self.calls.append(call)
            call.regions.append(region)
            return dispatcher(*args)

        return run

    # ---------------------------------------------------------------------------------------

    @property
    def regions(self) -> list[Region]:
        return [region for call in self.calls for region in call.regions]

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()

    def region_names(self) -> set[str]:
        return {region.name for region in self.regions}

    def assert_every_region_parallel(self, what: str = "", min_threads: int = 2) -> None:
        """At least one parallel region ran, and every one of them with ``min_threads`` threads
        or more and, if banded, at least two lanes: the work really was split."""
        regions = self.regions
        assert regions, f"{what}: no Numba parallel region ran ({len(self.calls)} calls)"
        serial = [
            r for r in regions if r.threads < min_threads or (r.lanes is not None and r.lanes < 2)
        ]
        assert not serial, (
            f"{what}: {len(serial)} of {len(regions)} parallel regions did not split their work "
            f"over >= {min_threads} threads and >= 2 lanes: {serial}"
        )


@contextlib.contextmanager
def forced_parallel():
    """The serial shortcut off: every call runs its kernels on all of Numba's threads.

    ``kernel_guard`` compares with the module global ``SERIAL_FLOPS`` at each call, so setting
    it takes effect for calls from every Python thread (checked in ``test_parallel.py``).
    """
    saved = _threading.SERIAL_FLOPS
    _threading.SERIAL_FLOPS = 0
    try:
        yield
    finally:
        _threading.SERIAL_FLOPS = saved
