"""Shared fixtures. Helpers live in ``helpers.py``, the slow reference in ``naive.py``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib

# The thread-count determinism tests compare 1 against 2 and 4 Numba threads; make 4 available
# even on the 2-core CI machines (on larger machines this is Numba's own default, one thread per
# core). Oversubscribing 2 cores with 4 threads cost nothing measurable (the parallel tests took
# 22.3 s with 4 threads, 22.6 s with 2, TBB layer): their calls are short. Numba reads the
# variable when it is first imported; a plugin that imports it earlier leaves 2.
os.environ.setdefault("NUMBA_NUM_THREADS", str(max(4, os.cpu_count() or 1)))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import DTYPES, GEMM_GATES, KERNELS  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from threadprobe import ThreadProbe  # noqa: E402

from numbaconv import _threading, cache  # noqa: E402
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


# Compiling, not computing, is most of the suite's time: on a 2-core AMD EPYC (Zen 3) the suite
# took 24 min, of which `numbaconv compile` in test_compile.py took 4.6 min and the first test
# of each kernel up to 1.5 min. So when this session's Numba cache has not had it yet (a fresh
# clone, a new environment: CI), the session starts with one cold `numbaconv compile`
# into an empty folder, on both cores at once, and copies what it wrote into this session's
# cache: the tests then load those kernels instead of compiling them one by one, and
# test_compile.py checks that cold compile instead of running a second one. What the tests
# compute is unchanged; kernels the compile does not cover (other types, other CPUs) still
# compile where a test first calls them. NUMBACONV_TESTS_COMPILE_FIRST=0 turns it off.
COMPILE_JOBS = 2


def compile_timeout_s() -> float:
    """A hang guard, not a budget: the compile took 4.6 min on the machine above alone, but
    over 30 min for Numba 0.59 beside CI's other environments (stop 27's CI, where a fixed
    1800 s limit failed a run that had time left). Under CI's matrix, the time until its
    MATRIX_DEADLINE (which stops pytest anyway); else an hour."""
    deadline = os.environ.get("MATRIX_DEADLINE")
    if deadline:
        return max(60.0, float(deadline) - time.time())
    return 3600.0


class ColdCompile:
    """One ``numbaconv compile --jobs 2`` into an empty ``NUMBA_CACHE_DIR``: its result and
    the folder it filled (left as the compile wrote it)."""

    def __init__(self, root: str):
        self.cache_dir = os.path.join(root, "cache")
        env = dict(os.environ, NUMBA_CACHE_DIR=self.cache_dir)
        env.pop("NUMBACONV_BLAS_INSIDE_KERNELS", None)
        command = [sys.executable, "-m", "numbaconv", "compile", "--jobs", str(COMPILE_JOBS)]
        started = time.perf_counter()
        limit = compile_timeout_s()
        # Its own process group, so that a timeout stops its compile workers too (killing the
        # parent alone left them compiling on the cores the tests then needed).
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=limit)
            self.done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
            self.error = None
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            self.done, self.error = None, f"{command} ran past {limit:.0f} s and was stopped"
        self.seconds = time.perf_counter() - started

    @property
    def ok(self) -> bool:
        return self.done is not None and self.done.returncode == 0

    def entries(self) -> list[str]:
        """The cache files (index and code) the compile wrote."""
        return [
            os.path.join(folder, name)
            for folder, _, names in os.walk(self.cache_dir)
            for name in names
            if name.endswith((".nbi", ".nbc"))
        ]


#: The session's cold compile, when it ran one (see above); test_compile.py reads it.
SESSION_COLD_COMPILE: ColdCompile | None = None


#: Written into the session's cache folder once a cold compile's files are in it. It holds the
#: shared helpers' fingerprint: an edit to one of them empties the folder of numbaconv entries
#: (``cache.guard_shared_helpers``), and the next session compiles first again.
COMPILED_FIRST_MARK = "numbaconv-tests-compiled-first.stamp"


def pytest_sessionstart(session):
    global SESSION_COLD_COMPILE
    if os.environ.get("NUMBACONV_TESTS_COMPILE_FIRST", "1") == "0":
        return
    folders = cache.cache_dirs()
    if len(folders) != 1:
        return
    # Not "the folder is empty": `numbaconv info`, which CI's matrix runs before the tests,
    # compiles a few kernels for its one small convolution.
    mark = os.path.join(folders[0], COMPILED_FIRST_MARK)
    fingerprint = cache.helpers_fingerprint()
    try:
        with open(mark) as handle:
            if handle.read() == fingerprint:
                return
    except OSError:
        pass
    compiled = ColdCompile(tempfile.mkdtemp(prefix="numbaconv-tests-cold-compile-"))
    SESSION_COLD_COMPILE = compiled
    if compiled.ok:
        # Every numbaconv kernel lives in numbaconv/kernels/, so the compile fills one folder.
        # A function's index (.nbi) and code files (.nbc) are copied together and replace the
        # folder's own, so each index names code files that came with it.
        os.makedirs(folders[0], exist_ok=True)
        for entry in compiled.entries():
            shutil.copy2(entry, folders[0])
        with open(mark, "w") as handle:
            handle.write(fingerprint)


def pytest_sessionfinish(session):
    # The compile's own folder (14 MB) served test_compile.py; its files were copied.
    if SESSION_COLD_COMPILE is not None:
        shutil.rmtree(os.path.dirname(SESSION_COLD_COMPILE.cache_dir), ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    compiled = SESSION_COLD_COMPILE
    if compiled is not None:
        outcome = "" if compiled.ok else " and FAILED (test_compile.py says why)"
        terminalreporter.write_line(
            f"numbaconv: the kernels were compiled ahead of the tests in {compiled.seconds:.0f} s"
            f"{outcome} (once per Numba cache folder; NUMBACONV_TESTS_COMPILE_FIRST=0 turns it off)"
        )


#: Test files that every shard runs (``NUMBACONV_TESTS_SHARD``, below): what depends on the
#: versions installed rather than on the arithmetic (the floors, Numba's internals, the BLAS
#: binding, the threading layer under fork, the cache and the cold compile of every kernel).
EVERY_SHARD = frozenset(
    {
        "test_supported_versions.py",
        "test_numba_internals.py",
        "test_fork.py",
        "test_cache.py",
        "test_compile.py",
    }
)


def file_of_test(nodeid: str) -> str:
    """The file name of a test's node id (``tests/test_x.py::test_y[a]`` -> ``test_x.py``)."""
    return nodeid.split("::")[0].rsplit("/", 1)[-1]


def shard_of(nodeid: str, shards: int) -> int:
    """The shard of a test: a hash of its node id, so it does not move when tests are added."""
    return zlib.crc32(nodeid.encode()) % shards


def pytest_collection_modifyitems(config, items):
    """``NUMBACONV_TESTS_SHARD=i/n`` runs the i-th of n parts of the suite (0 <= i < n), and the
    files in :data:`EVERY_SHARD` whole. CI's version matrix (.ci/matrix.sh) gives each of its
    environments one part, so that, with the main job's whole suite, every test runs twice per CI
    run, once under an older or newer Python, within CI's time on a 2-core machine."""
    spec = os.environ.get("NUMBACONV_TESTS_SHARD", "")
    if not spec:
        return
    try:
        index, shards = (int(part) for part in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"NUMBACONV_TESTS_SHARD={spec!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < shards:
        raise pytest.UsageError(f"NUMBACONV_TESTS_SHARD={spec!r}: needs 0 <= i < n")
    keep, drop = [], []
    for item in items:
        if file_of_test(item.nodeid) in EVERY_SHARD or shard_of(item.nodeid, shards) == index:
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_collectionfinish(config, items):
    spec = os.environ.get("NUMBACONV_TESTS_SHARD", "")
    if spec:
        return f"NUMBACONV_TESTS_SHARD={spec}: {len(items)} tests of this part of the suite"
    return None


@pytest.fixture(scope="session")
def cold_compile(tmp_path_factory) -> ColdCompile:
    """A cold ``numbaconv compile``: the session's own when it began with one, else a new one
    into an empty folder."""
    if SESSION_COLD_COMPILE is not None:
        return SESSION_COLD_COMPILE
    return ColdCompile(str(tmp_path_factory.mktemp("cold-compile")))


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
    """``microkernel.own_gemm_pays`` and ``own_gemm_pays_transposed`` as on AVX-512, whatever
    this machine (on narrower targets some are False: ``OWN_GEMM_ON_THIS_TARGET``,
    ``OWN_GEMM_FLOAT64_ON_THIS_TARGET``, ``OWN_TRANSPOSED_GEMM_ON_THIS_TARGET``, where BLAS
    measured faster). Their Python functions read the module globals at each call, so tests of
    their size bounds hold on every machine; compiled kernels keep the values they were built
    with."""
    for gate in GEMM_GATES:
        monkeypatch.setattr(microkernel, gate, True)


@pytest.fixture
def thread_probe(monkeypatch):
    """Records every parallel region the test's numbaconv calls run: on how many threads, in how
    many lanes (see ``threadprobe.py``), so that tests assert they ran in parallel."""
    return ThreadProbe().install(monkeypatch)
