"""What numbaconv does on each supported combination of versions (issue 16).

CI runs the suite on every supported Python and on the oldest releases pyproject admits
(``.ci/matrix.sh``). These tests pin what differs between them: which generation of SciPy's
bundled OpenBLAS numbaconv holds to one thread (and that it is the BLAS Numba's ``np.dot``
calls), what ``numbaconv info`` says and what the kernels do where the fast paths are out of
reach (no bundled OpenBLAS, no TBB), and that the oldest environment pins pyproject's floors.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy
from helpers import make_data, run_all
from packaging.requirements import Requirement
from packaging.version import Version
from test_blas_paths import SCIPY, bundled_openblas_files
from test_parallel import BY_NAME

from numbaconv import _threading, cli

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# The oldest environment


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


def test_oldest_environment_pins_pyprojects_floors():
    """.ci/oldest.txt holds exactly the lower bounds of numbaconv's dependencies (as installed:
    the metadata pip read from pyproject.toml), and the matrix's oldest Python is
    requires-python's."""
    floors = {}
    for text in importlib.metadata.requires("numbaconv"):
        requirement = Requirement(text)
        if requirement.marker is None or "extra" not in str(requirement.marker):
            lower = [s.version for s in requirement.specifier if s.operator == ">="]
            floors[requirement.name] = Version(lower[0]) if lower else None
    pins = _pins()
    assert set(pins) == set(floors), (pins, floors)
    for name, version in pins.items():
        assert floors[name] == Version(version), f"{name}: >={floors[name]} vs pin {version}"
    requires_python = importlib.metadata.metadata("numbaconv")["Requires-Python"]
    matrix = (ROOT / ".ci" / "matrix.sh").read_text()
    oldest_python = re.search(r"^oldest_python=(\S+)$", matrix, re.MULTILINE).group(1)
    assert requires_python == f">={oldest_python}"


# ------------------------------------------------------------------------------------------------
# SciPy's bundled OpenBLAS


def test_bundled_openblas_generation_follows_the_scipy_release():
    """SciPy 1.14 and later: scipy-openblas (``scipy_``-prefixed symbols); 1.10 to 1.13:
    OpenBLAS itself, plain names. Both are held to one thread, so both take the banded path."""
    found, description = _threading._lookup_scipy_openblas()
    bundled = bundled_openblas_files()
    if not bundled:
        assert found is None and "bundles no OpenBLAS" in description, description
        return
    assert found is not None, f"{SCIPY} bundles {bundled}, not found: {description}"
    assert Path(found.path).name in bundled
    if Version(scipy.__version__) >= Version("1.14"):
        assert Path(found.path).name.startswith("libscipy_openblas")
        assert found.symbol == "scipy_openblas_set_num_threads"
    else:
        assert Path(found.path).name.startswith("libopenblas")
        assert found.symbol == "openblas_set_num_threads"
    # openblas_get_corename exists in every OpenBLAS these SciPy releases bundle.
    assert found.core, found
    assert description == f"{Path(found.path).name}, {found.symbol}, {found.core} kernels"
    assert found.get() >= 1


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def test_bundled_openblas_is_the_blas_numba_calls():
    """Numba's ``np.dot`` calls ``scipy.linalg.cython_blas``; the GEMM that module binds to must
    live in the very file whose thread count numbaconv sets (else the kernels would run a
    multi-threaded BLAS inside their parallel regions)."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"dladdr lookup written for Linux's loader; this is {sys.platform}")
    found = _threading._find_scipy_openblas()
    if found is None:
        assert not bundled_openblas_files()  # nothing to check: the chunked path (tested)
        return
    import scipy.linalg.cython_blas as cython_blas

    prefix, suffix = found.symbol.split("openblas_set_num_threads")
    blas = ctypes.CDLL(cython_blas.__file__, mode=os.RTLD_NOLOAD)
    dgemm = ctypes.cast(getattr(blas, f"{prefix}dgemm_{suffix}"), ctypes.c_void_p)
    info = _DlInfo()
    assert ctypes.CDLL(None).dladdr(dgemm, ctypes.byref(info))
    assert os.path.samefile(info.dli_fname.decode(), found.path), info.dli_fname


def test_lookup_says_why_when_scipy_bundles_no_openblas(monkeypatch, tmp_path):
    """SciPy built from source or by conda: nothing beside it; or a file by that name that
    SciPy's BLAS module did not load (so not the BLAS Numba calls): it is not opened."""
    monkeypatch.setattr(_threading, "_scipy_library_folders", lambda root: [tmp_path])
    found, description = _threading._lookup_scipy_openblas()
    assert found is None
    assert description == (
        f"SciPy {scipy.__version__} bundles no OpenBLAS numbaconv can use "
        f"(no libscipy_openblas* or libopenblas* in {tmp_path})"
    )
    (tmp_path / "libopenblasp-r0-0123abcd.3.21.so").write_bytes(b"")
    found, description = _threading._lookup_scipy_openblas()
    assert found is None
    assert "(libopenblasp-r0-0123abcd.3.21.so in " in description
    assert "not loaded by scipy.linalg, or no thread control" in description


@pytest.fixture
def no_bundled_openblas(monkeypatch):
    """As where SciPy bundles no OpenBLAS (the lookup's result replaced)."""
    why = f"SciPy {scipy.__version__} bundles no OpenBLAS numbaconv can use (none, in this test)"
    monkeypatch.setattr(_threading, "_scipy_openblas_found", (None, why))
    monkeypatch.delenv("NUMBACONV_BLAS_INSIDE_KERNELS", raising=False)
    return why


def test_info_says_the_kernels_take_the_slower_path_without_bundled_openblas(
    no_bundled_openblas, capsys
):
    assert not _threading.blas_inside_kernels()
    expected = f"NumPy's, between kernels (the slower path: {no_bundled_openblas})"
    assert _threading.blas_mode() == expected
    assert cli.main(["info"]) == 0
    assert f"blas:            {expected}\n" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["im2col", "winograd"])
def test_without_bundled_openblas_the_kernels_take_the_chunked_path(
    no_bundled_openblas, monkeypatch, thread_probe, family
):
    """Same bits as the explicit fallback (``NUMBACONV_BLAS_INSIDE_KERNELS=0``), no banded pass."""
    cfg = BY_NAME["bands-split-images"] if family == "im2col" else BY_NAME["auto-winograd"]
    x, w, b, gy = make_data(cfg, np.float32)
    thread_probe.clear()
    results = run_all(cfg, x, w, b, gy, family)
    names = thread_probe.region_names()
    assert names and not any(".fused_" in name for name in names), names
    monkeypatch.setenv("NUMBACONV_BLAS_INSIDE_KERNELS", "0")
    for got, expected in zip(results, run_all(cfg, x, w, b, gy, family), strict=True):
        np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------------------------
# No TBB (no tbb wheel for the platform, or its library not found)

NO_TBB = """
import ctypes

class NoTBB(ctypes.CDLL):
    def __init__(self, name, *args, **kwargs):
        if "libtbb" in str(name):
            raise OSError(f"{name}: hidden by the test")
        super().__init__(name, *args, **kwargs)

ctypes.CDLL = NoTBB
import numbaconv.cli
numbaconv.cli.main(["info"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP is Linux's")
def test_info_without_tbb_says_forked_children_cannot_run_kernels():
    """Without TBB numbaconv falls back to GNU OpenMP, and ``numbaconv info`` says what that
    costs (test_fork.py pins the behaviour itself: forked children raise ForkedOpenMPError)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    done = subprocess.run(
        [sys.executable, "-c", NO_TBB], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("threading layer:"))
    assert line == (
        "threading layer: omp (GNU OpenMP: not fork-safe; numbaconv calls in processes forked "
        "after this one used it raise ForkedOpenMPError; `pip install tbb` where its wheels exist)"
    )


SMALL_LAYER_THEN_SCIPY = """
import sys
import numpy as np
import numbaconv as nc
from numbaconv import _threading

x = np.random.default_rng(0).standard_normal((4, 3, 9, 9)).astype(np.float32)
w = np.random.default_rng(1).standard_normal((5, 3, 3, 3)).astype(np.float32)
y = nc.conv2d(x, w, padding=1, kernel="im2col")
print("blas", _threading._openblas() is not None)
print("cython_blas", "scipy.linalg.cython_blas" in sys.modules)
print("linalg", "scipy.linalg" in sys.modules)
import scipy.linalg
import scipy.linalg.cython_blas
a = np.arange(6.0).reshape(2, 3)
again = nc.conv2d(x, w, padding=1, kernel="im2col")
print("later", np.isclose(scipy.linalg.norm(a) ** 2, 55.0), np.array_equal(y, again))
print("capi", len(sys.modules["scipy.linalg.cython_blas"].__pyx_capi__) > 0)
"""


def test_first_gemm_loads_scipys_blas_module_alone():
    """The first GEMM loads ``scipy.linalg.cython_blas`` (what Numba's ``np.dot`` calls) without
    ``scipy.linalg``'s package ``__init__`` (85-90 ms of start-up); a later
    ``import scipy.linalg`` and the next call both work."""
    done = subprocess.run(
        [sys.executable, "-c", SMALL_LAYER_THEN_SCIPY], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    if lines["blas"] == "True":  # a bundled OpenBLAS: the lookup loaded the module
        assert lines["cython_blas"] == "True"
        assert lines["linalg"] == "False"
    assert lines["later"] == "True True"
    assert lines["capi"] == "True"


# ------------------------------------------------------------------------------------------------
# The matrix's parts of the suite (NUMBACONV_TESTS_SHARD, conftest.py)


def _collected(shard: str | None) -> set[str]:
    env = dict(os.environ, NUMBACONV_TESTS_COMPILE_FIRST="0")
    env.pop("NUMBACONV_TESTS_SHARD", None)
    if shard is not None:
        env["NUMBACONV_TESTS_SHARD"] = shard
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_the_matrix_parts_cover_the_suite_once_and_the_version_files_in_each():
    from conftest import EVERY_SHARD, file_of_test

    whole = _collected(None)
    parts = [_collected(f"{i}/2") for i in range(2)]
    in_every = {t for t in whole if file_of_test(t) in EVERY_SHARD}
    assert len(in_every) > 20  # every file of EVERY_SHARD exists and has tests
    assert {file_of_test(t) for t in in_every} == set(EVERY_SHARD)
    assert parts[0] | parts[1] == whole
    assert parts[0] & parts[1] == in_every
    # Both parts hold a fair share of the rest.
    rest = len(whole) - len(in_every)
    assert all(0.4 * rest < len(part - in_every) < 0.6 * rest for part in parts)
