"""Numba threading-layer choice: safe with several Python threads and in forked processes.

Numba's default ``workqueue`` layer aborts the process when two Python threads run a parallel
kernel at the same time. At import, unless the user chose a layer (``NUMBA_THREADING_LAYER``) or a
parallel Numba function already ran, numbaconv asks for the ``threadsafe`` layer: TBB if it can be
loaded, else GNU OpenMP. TBB is also fork-safe, GNU OpenMP is not: Numba kills a forked child that
runs a parallel kernel after its parent used OpenMP. numbaconv depends on the ``tbb`` wheel where
one exists and loads its library before Numba looks for it (:func:`preload_tbb`), because a
virtual environment's ``lib/`` folder, where the wheel puts ``libtbb.so.12``, is not on the
loader's path. If, in the end, a layer that is not thread-safe is active, :func:`kernel_guard`
serialises numbaconv's kernel calls with a lock instead of crashing; if the process is a fork of
one that ran GNU OpenMP, it raises :class:`ForkedOpenMPError` instead of letting Numba kill it.

With the OpenMP layer only, it also sets ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set
(see :func:`configure_threading_layer`); OpenMP runtimes already running keep their policy.

It also holds SciPy's OpenBLAS (the BLAS that ``np.dot`` calls inside Numba kernels) to one
thread while a kernel calls it from inside a parallel region; see :func:`single_threaded_blas`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import importlib.util
import os
import site
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numba

from ._numba_internals import openmp_vendor

_THREAD_SAFE_LAYERS = ("tbb", "omp")
_lock = threading.Lock()

#: The file name Numba loads TBB by (``numba.np.ufunc.parallel._check_tbb_version_compatible``).
_TBB_LIBRARY = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib"}.get(sys.platform)

#: Set in a child process forked from a parent whose GNU OpenMP thread pool had started.
_forked_from_openmp = False

#: The TBB library that :func:`preload_tbb` loaded, if any.
_tbb_path: str | None = None


class ForkedOpenMPError(RuntimeError):
    """A numbaconv kernel was called in a process forked after its parent used GNU OpenMP."""


def active_threading_layer() -> str | None:
    """The layer in use, or None before the first parallel kernel has run."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _tbb_candidates() -> list[Path]:
    """Where pip puts the ``tbb`` wheel's library: the ``lib/`` of the environment or user base.

    The wheel installs it as data files (``<prefix>/lib/libtbb.so.12``), not inside a package.
    """
    prefixes = [sys.prefix, getattr(site, "USER_BASE", None) or site.getuserbase()]
    return [Path(prefix, "lib", _TBB_LIBRARY) for prefix in prefixes if prefix]


def preload_tbb() -> str | None:
    """Load the ``tbb`` wheel's library globally, so that Numba's TBB layer can find it.

    Numba opens TBB by its bare file name, which the loader looks for on its own path only; once
    a library of that name is loaded, the same open returns it. Returns the path loaded, or None
    when there is nothing to load (no ``tbb`` wheel, another platform, or TBB already loadable).
    Loading it costs about 7 ms; finding it, a few ``stat`` calls.
    """
    if _TBB_LIBRARY is None:
        return None
    for path in _tbb_candidates():
        if path.is_file():
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            return str(path)
    return None


def _numba_layer_requested() -> str:
    return str(numba.config.THREADING_LAYER).lower()


def configure_threading_layer() -> None:
    """Pick a thread-safe (and, with TBB, fork-safe) layer before Numba starts one."""
    if active_threading_layer() is not None:
        return
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "threadsafe"
    global _tbb_path
    if _numba_layer_requested() in ("threadsafe", "default", "safe", "forksafe", "tbb"):
        _tbb_path = preload_tbb()
    if _tbb_path is None and _numba_layer_requested() != "tbb":
        # Only GNU OpenMP's workers are at issue: they spin after each parallel region by
        # default, holding both cores while NumPy's BLAS threads, used between numbaconv's
        # layers, wait for one (numbaconv demo: 0.075 s per epoch passive, 0.11 spinning). Unless
        # the user chose a policy, OpenMP runtimes that start from here on sleep instead. With
        # TBB the variable would only reach other libraries' OpenMP runtimes (PyTorch's), so it
        # is left alone.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _openmp_is_gnu() -> bool:
    """Whether Numba's OpenMP layer runs on GNU OpenMP (the one that is not fork-safe)."""
    return openmp_vendor() == "GNU"


def fork_safe() -> bool | None:
    """Whether forked children may run numbaconv's kernels (None before the layer is chosen).

    Numba's ``tbb`` and ``workqueue`` layers start their threads again in a forked child; GNU
    OpenMP cannot, and Numba terminates such a child at its first parallel kernel.
    """
    layer = active_threading_layer()
    if layer is None:
        return None
    return not (layer == "omp" and _openmp_is_gnu())


def threading_summary() -> str:
    """One line for ``numbaconv info``: the layer, whether it is fork-safe, and why."""
    layer = active_threading_layer()
    if layer is None:
        return "not started yet"
    if layer == "tbb":
        where = f", {_tbb_path}" if _tbb_path else ""
        return f"tbb (thread- and fork-safe{where})"
    if fork_safe():
        return f"{layer} (fork-safe)"
    return (
        f"{layer} (GNU OpenMP: not fork-safe; numbaconv calls in processes forked after this "
        "one used it raise ForkedOpenMPError; `pip install tbb` where its wheels exist)"
    )


def _after_fork_in_child() -> None:
    global _forked_from_openmp
    if fork_safe() is False:
        _forked_from_openmp = True


#: Below this many flops a call runs its Numba kernels on one thread. Waking the thread pool
#: costs more than such a call computes; on a busy machine a fork/join was measured at several
#: milliseconds (digits layer, 92 kflop: 12 ms on 2 threads, 25 us on 1).
SERIAL_FLOPS = 2**21


@contextlib.contextmanager
def kernel_guard(work: int, numba_parallel: bool = True):
    """Run numbaconv kernels safely and at the right width.

    Raises :class:`ForkedOpenMPError` if ``numba_parallel`` kernels would run in a child forked
    from a process that had started GNU OpenMP (Numba would kill the child). Takes a lock
    when the active threading layer is not thread-safe (or not known yet), and limits Numba to
    one thread (for the calling thread only) for calls whose ``work`` (flops, or elements moved)
    is under :data:`SERIAL_FLOPS`. Results never depend on it: every kernel's reduction order is
    fixed.
    """
    if numba_parallel and _forked_from_openmp:
        raise ForkedOpenMPError(
            "numbaconv cannot run its parallel kernels in this process: it was forked from one "
            "that had already used them with Numba's GNU OpenMP threading layer, which is not "
            "fork-safe (Numba would terminate the process). Start worker processes with "
            "multiprocessing's 'spawn' or 'forkserver' method, or install the 'tbb' package so "
            "that numbaconv uses Numba's fork-safe TBB layer; kernel='numpy' works here."
        )
    lock = _lock if active_threading_layer() not in _THREAD_SAFE_LAYERS else None
    previous = numba.get_num_threads()
    if work < SERIAL_FLOPS and previous > 1:
        numba.set_num_threads(1)
    try:
        if lock is None:
            yield
        else:
            with lock:
                yield
    finally:
        numba.set_num_threads(previous)


#: SciPy's bundled OpenBLAS, by wheel generation: (file name pattern, symbol prefix). SciPy 1.14
#: and later ship scipy-openblas, ``libscipy_openblas*``, whose symbols all carry a ``scipy_``
#: prefix; SciPy 1.10 to 1.13 bundle OpenBLAS itself (``libopenblasp-r0-*.so`` on Linux,
#: ``libopenblas*.dylib`` on macOS) with its plain names. Either is the library that
#: ``scipy.linalg.cython_blas`` links, so the one Numba's ``np.dot`` calls. A ``64_`` suffix
#: (an ILP64 build) is looked for too.
_BUNDLED_OPENBLAS = (
    ("libscipy_openblas*", "scipy_openblas_"),
    ("libopenblas*", "openblas_"),
)


@dataclass(frozen=True)
class BundledOpenBLAS:
    """SciPy's bundled OpenBLAS, found by :func:`_find_scipy_openblas`: its file and the two
    functions that read and set its (process-wide) thread count."""

    path: str
    get: Callable[[], int]  #: ``openblas_get_num_threads``, under the library's own name
    set: Callable[[int], None]  #: ``openblas_set_num_threads``, likewise
    symbol: str  #: the name ``set`` was found under, e.g. ``"scipy_openblas_set_num_threads"``
    #: ``openblas_get_corename()``: the kernels OpenBLAS chose for this CPU ("Haswell",
    #: "SkylakeX", ...), or None where the library does not say
    core: str | None = None


def _scipy_library_folders(scipy_root: Path) -> list[Path]:
    """Where SciPy wheels put their bundled libraries: ``scipy.libs`` beside the package
    (Linux, Windows), ``scipy/.dylibs`` (macOS)."""
    return [scipy_root.parent / "scipy.libs", scipy_root / ".dylibs"]


def _already_loaded(path: Path):
    """The library at ``path`` if this process has already loaded it, else None.

    ``RTLD_NOLOAD`` opens nothing new: a file that SciPy's BLAS module did not load is not the
    BLAS that Numba calls, whatever its name (where the flag does not exist, it is opened).
    """
    mode = getattr(os, "RTLD_NOLOAD", None)
    try:
        return ctypes.CDLL(str(path)) if mode is None else ctypes.CDLL(str(path), mode=mode)
    except OSError:
        return None


_CYTHON_BLAS = "scipy.linalg.cython_blas"


def _import_cython_blas():
    """``scipy.linalg.cython_blas``, the module whose GEMMs Numba's ``np.dot`` calls (Numba's
    helper library imports it by name at its first BLAS call), without ``scipy.linalg``'s
    package ``__init__``.

    That ``__init__`` imports all of ``scipy.linalg`` and SciPy's array-API layer: 85-90 ms of a
    small layer's 0.6 s start-up here, for nothing a kernel uses. The module itself is one
    extension module that needs only ``scipy`` (20 ms), so it is loaded from its file and put in
    ``sys.modules`` under its own name, where both Numba's import and any later
    ``import scipy.linalg.cython_blas`` find it. Anything unexpected (another layout, a build
    without the file) falls back to the ordinary import.
    """
    if _CYTHON_BLAS in sys.modules:
        return sys.modules[_CYTHON_BLAS]
    try:
        spec = importlib.util.find_spec("scipy")
        folder = Path(spec.origin).parent / "linalg"
        files = [
            path
            for path in folder.glob("cython_blas.*")
            if path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        ]
        if len(files) != 1:
            raise ImportError(f"{len(files)} candidate files for {_CYTHON_BLAS} in {folder}")
        module_spec = importlib.util.spec_from_file_location(_CYTHON_BLAS, files[0])
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, "__pyx_capi__"):
            raise ImportError(f"{files[0]} exports no C functions")
    except Exception:  # noqa: BLE001  (any surprise: the ordinary import decides)
        import scipy.linalg.cython_blas as module

        return module
    sys.modules[_CYTHON_BLAS] = module
    return module


def _corename(lib, prefix: str) -> str | None:
    """``openblas_get_corename()`` of ``lib`` under its ``prefix``, or None."""
    for suffix in ("", "64_"):
        try:
            function = getattr(lib, f"{prefix}get_corename{suffix}")
        except AttributeError:
            continue
        function.restype, function.argtypes = ctypes.c_char_p, []
        name = function()
        return name.decode("ascii", "replace").strip() or None if name else None
    return None


#: OpenBLAS's cores (``openblas_get_corename``, lower case) whose GEMM kernels use AVX-512.
#: OpenBLAS 0.3.30-31 picks ``SkylakeX`` on AMD's Zen 5 and Intel's Sapphire Rapids; an AVX-512
#: CPU it does not know, or ``OPENBLAS_CORETYPE=Haswell`` (set on this project's development
#: machines), gives its AVX2 ``Haswell`` kernels (see
#: :func:`numbaconv.kernels.microkernel.own_weight_gradient`).
_AVX512_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


def blas_runs_avx512() -> bool:
    """Whether SciPy's bundled OpenBLAS runs AVX-512 GEMM kernels on this CPU (False where it
    is not found or does not say)."""
    found = _openblas()
    return found is not None and (found.core or "").lower() in _AVX512_CORES


def _lookup_scipy_openblas() -> tuple[BundledOpenBLAS | None, str]:
    """SciPy's bundled OpenBLAS and a description, or None and why it cannot be used."""
    try:
        _import_cython_blas()  # loads the library Numba binds to
        import scipy
    except ImportError as exc:
        return None, f"SciPy's BLAS could not be imported ({exc})"
    root = Path(scipy.__file__).parent
    folders = _scipy_library_folders(root)
    seen = []
    for pattern, prefix in _BUNDLED_OPENBLAS:
        for folder in folders:
            for path in sorted(folder.glob(pattern)):
                if prefix == "openblas_" and path.name.startswith("libscipy_openblas"):
                    continue  # the newer generation, looked at first
                seen.append(path.name)
                lib = _already_loaded(path)
                if lib is None:
                    continue
                for suffix in ("", "64_"):
                    try:
                        get = getattr(lib, f"{prefix}get_num_threads{suffix}")
                        set_ = getattr(lib, f"{prefix}set_num_threads{suffix}")
                    except AttributeError:
                        continue
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    symbol = f"{prefix}set_num_threads{suffix}"
                    found = BundledOpenBLAS(str(path), get, set_, symbol, _corename(lib, prefix))
                    core = f", {found.core} kernels" if found.core else ""
                    return found, f"{path.name}, {symbol}{core}"
    where = " or ".join(str(folder) for folder in folders)
    if seen:
        why = f"{', '.join(seen)} in {where}: not loaded by scipy.linalg, or no thread control"
    else:
        why = f"no libscipy_openblas* or libopenblas* in {where}"
    return None, f"SciPy {scipy.__version__} bundles no OpenBLAS numbaconv can use ({why})"


def _find_scipy_openblas() -> BundledOpenBLAS | None:
    """SciPy's bundled OpenBLAS (what ``np.dot`` in Numba code calls), or None if not found.

    SciPy's PyPI wheels ship one next to the package (see :data:`_BUNDLED_OPENBLAS`); its thread
    count is process-wide state we can set. Other BLAS builds (MKL, a system OpenBLAS, SciPy
    built from source or by conda) are not touched, and the kernels then use their
    BLAS-outside-Numba paths; ``numbaconv info`` says which and why.
    """
    return _lookup_scipy_openblas()[0]


_UNSET = object()
_scipy_openblas_found = _UNSET


def _openblas_lookup() -> tuple[BundledOpenBLAS | None, str]:
    """:func:`_lookup_scipy_openblas`, looked up at the first call that needs it: importing
    SciPy's BLAS module takes 20 ms, which ``import numbaconv`` and the kernels that call no
    BLAS (``direct``, ``numpy``) need not pay."""
    global _scipy_openblas_found
    if _scipy_openblas_found is _UNSET:
        _scipy_openblas_found = _lookup_scipy_openblas()
    return _scipy_openblas_found


def _openblas() -> BundledOpenBLAS | None:
    return _openblas_lookup()[0]


def __getattr__(name):
    if name == "_scipy_openblas":  # the module attribute that tests and older code read
        return _openblas()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved_threads = 1


def blas_inside_kernels() -> bool:
    """Whether kernels may call BLAS from inside their parallel regions.

    That needs BLAS held to one thread per caller (else each of Numba's threads would start
    BLAS's own threads and they would fight over the cores), which numbaconv can do for SciPy's
    bundled OpenBLAS. Set ``NUMBACONV_BLAS_INSIDE_KERNELS=0`` to use the other paths.
    """
    if os.environ.get("NUMBACONV_BLAS_INSIDE_KERNELS", "1") == "0":
        return False
    return _openblas() is not None


def blas_mode() -> str:
    """One line for ``numbaconv info``: where the GEMM kernels call BLAS, and why."""
    found, description = _openblas_lookup()
    if blas_inside_kernels():
        return (
            f"SciPy's OpenBLAS ({description}), called inside the parallel kernels "
            "(1 thread per caller)"
        )
    if found is None:
        return f"NumPy's, between kernels (the slower path: {description})"
    return "NumPy's, between kernels (NUMBACONV_BLAS_INSIDE_KERNELS=0)"


@contextlib.contextmanager
def single_threaded_blas():
    """Hold SciPy's OpenBLAS to one thread while any numbaconv kernel that calls it runs.

    OpenBLAS's thread count is one process-wide setting (``openblas_set_num_threads_local`` is
    global too in its pthreads build), so concurrent numbaconv calls share one reference count:
    the first sets 1 thread, the last restores the previous value. Other SciPy BLAS calls made by
    other Python threads meanwhile run single-threaded: slower, never wrong.
    """
    global _blas_users, _blas_saved_threads
    openblas = _openblas()
    get, set_ = openblas.get, openblas.set
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved_threads = get()
            if _blas_saved_threads != 1:
                set_(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_saved_threads != 1:
                set_(_blas_saved_threads)
