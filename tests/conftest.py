"""Shared fixtures. Helpers live in ``helpers.py``, the slow reference in ``naive.py``."""

from __future__ import annotations

import os

# The thread-count determinism tests compare 1 against 2 Numba threads; make 2 available even on
# a 1-core machine (on larger machines this is Numba's own default, one thread per core).
os.environ.setdefault("NUMBA_NUM_THREADS", str(max(2, os.cpu_count() or 1)))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import DTYPES, KERNELS  # noqa: E402


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
