"""Shared fixtures. Helpers live in ``helpers.py``, the slow reference in ``naive.py``."""

from __future__ import annotations

import os

# The thread-count determinism tests compare 1 against 2 and 4 Numba threads; make 4 available
# even on the 2-core CI machines (on larger machines this is Numba's own default, one thread per
# core). Oversubscribing 2 cores with 4 threads cost nothing measurable (the parallel tests took
# 22.3 s with 4 threads, 22.6 s with 2, TBB layer): their calls are short. Numba reads the
# variable when it is first imported; a plugin that imports it earlier leaves 2.
os.environ.setdefault("NUMBA_NUM_THREADS", str(max(4, os.cpu_count() or 1)))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import DTYPES, KERNELS  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from threadprobe import ThreadProbe  # noqa: E402

from numbaconv import _threading  # noqa: E402
from numbaconv.kernels import microkernel  # noqa: E402

# CI (which sets CI=true) runs hypothesis derandomised: the examples are a function of the test
# alone, so a failure replays on the next run and on any machine instead of surfacing once on an
# unrelated commit; print_blob prints the @reproduce_failure line of a failing example; no example
# database, so what CI runs never depends on earlier runs. Recent hypothesis versions load such a
# "ci" profile by themselves when CI is set; pyproject allows versions from before that, so it is
# spelled out here. Locally hypothesis stays random (it finds new examples that way);
# `CI=true python -m pytest` runs exactly CI's examples.
settings.register_profile(
    "ci",
    derandomize=True,
    print_blob=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_report_header(config):
    return f"numbaconv kernels under test: {', '.join(KERNELS)}"


@pytest.fixture(scope="session", params=KERNELS)
def kernel(request):
    """Every kernel name in ``nc.KERNELS`` (new kernels are picked up automatically)."""
    return request.param


@pytest.fixture(scope="session", params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return request.param


@pytest.fixture
def restore_num_threads():
    """Put Numba's thread count back after a test that changes it."""
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_default_kernel_from_outside(monkeypatch):
    """Tests choose the default kernel themselves; an exported NUMBACONV_KERNEL must not leak in."""
    monkeypatch.delenv("NUMBACONV_KERNEL", raising=False)


@pytest.fixture
def force_parallel(monkeypatch):
    """The serial shortcut off (``SERIAL_FLOPS`` = 0): every call, however small, runs its Numba
    kernels on all the threads the calling Python thread has (Numba's default: 4 here, see
    above). ``kernel_guard`` reads the module global at each call, from any Python thread."""
    monkeypatch.setattr(_threading, "SERIAL_FLOPS", 0)


@pytest.fixture
def own_gemm_everywhere(monkeypatch):
    """``microkernel.own_gemm_pays`` as on AVX-512, whatever this machine (on narrower targets
    it is False: ``OWN_GEMM_ON_THIS_TARGET``, where BLAS measured faster). Its Python function
    reads the module global at each call, so tests of its size bounds hold on every machine;
    compiled kernels keep the value they were built with."""
    monkeypatch.setattr(microkernel, "OWN_GEMM_ON_THIS_TARGET", True)


@pytest.fixture
def thread_probe(monkeypatch):
    """Records every parallel region the test's numbaconv calls run: on how many threads, in how
    many lanes (see ``threadprobe.py``), so that tests assert they ran in parallel."""
    return ThreadProbe().install(monkeypatch)
