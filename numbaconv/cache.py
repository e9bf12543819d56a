"""Numba's on-disk cache of numbaconv's kernels: where it is, and filling it ahead of time.

Every kernel is ``@njit(cache=True)``: the first process that runs a kernel at a dtype compiles
it (seconds per kernel) and writes the machine code to the cache; later processes load it
(milliseconds). :func:`compile_all` (``numbaconv compile``) runs every code path of every kernel
at both dtypes on tiny inputs, in parallel worker processes, so that no user call compiles.

A compiled function is specific to its argument types (dtype, number of dimensions, layout) and
to the CPU (Numba compiles for the host). Tiny inputs give the same types as large ones: every
kernel takes C-contiguous arrays of the call's dtype (:func:`numbaconv.functional._for_kernel`)
and plain integers and booleans, whatever the sizes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pkgutil
import sys
import time
from collections.abc import Callable

import numpy as np

from ._numba_internals import cache_file, cache_stats

try:  # POSIX; without it the cache files are not locked and compile_all runs one worker
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: The GEMM kernels have two implementations (see ``NUMBACONV_BLAS_INSIDE_KERNELS`` in the
#: README): the banded passes with BLAS inside them, and the chunked passes with BLAS between.
_PATHS = {"banded": "1", "chunked": "0"}

#: (kernel, dtype, path) per task; the teaching im2col/col2im run in the chunked tasks.
TASKS: tuple[tuple[str, str, str], ...] = tuple(
    (kernel, dtype, path)
    for kernel, paths in (
        ("im2col", _PATHS),
        ("winograd", _PATHS),
        ("direct", {"banded": "1"}),
        ("taps", {"banded": "1"}),
    )
    for dtype in ("float32", "float64")
    for path in paths
)


def _layers(kernel: str) -> list[tuple[tuple[int, ...], tuple[int, ...], dict]]:
    """Small layers (x shape, w shape, options) that reach every branch of a kernel family:
    plain, 1x1 (the image is its own columns), strided, dilated, grouped; Winograd's own
    geometry and one it hands to im2col; one image of 16 channels (im2col's blocked backward);
    4 images of 32 channels (im2col's implicit backward pass); 4 long rows (its row segments);
    a 1xk layer (``taps`` on swapped axes)."""
    layers = [
        ((2, 4, 7, 6), (4, 4, 3, 3), dict(padding=1)),
        ((2, 6, 5, 5), (4, 6, 1, 1), {}),
        ((2, 4, 9, 8), (6, 2, 3, 2), dict(stride=2, padding=(1, 0), dilation=(2, 1), groups=2)),
    ]
    if kernel == "winograd":
        layers.append(((2, 4, 10, 9), (3, 4, 3, 3), dict(padding=(2, 1))))
    if kernel == "taps":  # 1xk: on the arrays transposed in their spatial axes
        layers.append(((2, 4, 5, 9), (4, 4, 1, 3), dict(padding=(0, 1))))
    if kernel == "direct":  # depthwise 3x3 at column stride 2, and "same": their own kernels
        layers.append(((2, 4, 7, 6), (4, 1, 3, 3), dict(stride=2, padding=1, groups=4)))
        layers.append(((2, 4, 7, 6), (4, 1, 3, 3), dict(padding=1, groups=4)))
    if kernel in ("im2col", "winograd"):  # a small batch of 16 channels: im2col's blocked backward
        layers.append(((1, 16, 5, 5), (4, 16, 3, 3), dict(padding=1)))
    if kernel == "im2col":  # 4 images, 288 taps: the backward pass by implicit GEMM
        layers.append(((4, 32, 10, 10), (32, 32, 3, 3), dict(padding=1)))
        # ... and rows too wide for one band's columns (a long 1-D signal): grad-w on the row
        # segments' windows (im2col.segment_weight_gradient), in both dtypes.
        layers.append(((4, 32, 1, 4200), (32, 32, 1, 9), dict(padding=(0, 4))))
    return layers


def warm(kernel: str, dtype: str, path: str) -> str:
    """Run one task's calls in this process (compiling or loading each function); its name."""
    from . import functional

    os.environ["NUMBACONV_BLAS_INSIDE_KERNELS"] = _PATHS[path]
    rng = np.random.default_rng(0)
    for x_shape, w_shape, options in _layers(kernel):
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal(w_shape).astype(dtype)
        b = rng.standard_normal(w_shape[0]).astype(dtype)
        y = functional.conv2d(x, w, b, kernel=kernel, **options)
        functional.conv2d_backward(y, x, w, kernel=kernel, **options)
        if kernel == "winograd":
            # Non-finite values: Winograd notices them and recomputes with im2col.
            x[0, 0, 0, 0] = np.nan
            y = functional.conv2d(x, w, b, kernel=kernel, **options)
            functional.conv2d_backward(y, x, w, kernel=kernel, **options)
    if kernel == "im2col":
        # The sub-pixel form of strided transposed convolutions (its weight and shuffle
        # copies; registry.transposed_via_subpixel): 32 output channels, the least it takes;
        # the forward pass of a 4x4 stride-2 filter with and without a bias, the backward pass
        # of a 2x2 one; and the 4x4 one's backward pass from shared columns
        # (registry.transposed_shares_columns).
        x = rng.standard_normal((1, 2, 8, 8)).astype(dtype)
        for r in (4, 2):
            w = rng.standard_normal((2, 32, r, r)).astype(dtype)
            b = rng.standard_normal(32).astype(dtype)
            y = functional.conv_transpose2d(x, w, b, stride=2, padding=r // 4, kernel="auto")
            functional.conv_transpose2d(x, w, stride=2, padding=r // 4, kernel="auto")
            functional.conv_transpose2d_backward(y, x, w, stride=2, padding=r // 4, kernel="auto")
        # ... and the forward pass phase by phase (subpixel.implicit_forward: 32 filters a
        # phase over 256 taps and 128 outputs, enough for subpixel.implicit_applies).
        x = rng.standard_normal((1, 64, 8, 16)).astype(dtype)
        w = rng.standard_normal((64, 32, 4, 4)).astype(dtype)
        functional.conv_transpose2d(x, w, b, stride=2, padding=1, kernel="auto")
        # ... and the 2x2 one's backward pass image by image on a batch of 4
        # (subpixel.one_tap_backward_applies).
        x = rng.standard_normal((4, 2, 4, 4)).astype(dtype)
        w = rng.standard_normal((2, 32, 2, 2)).astype(dtype)
        y = functional.conv_transpose2d(x, w, stride=2, kernel="auto")
        functional.conv_transpose2d_backward(y, x, w, stride=2, kernel="auto")
    if path == "chunked":
        x = rng.standard_normal((2, 3, 6, 5)).astype(dtype)
        cols = functional.im2col(x, 3, 3, 6, 5, 1, 1)
        functional.col2im(cols, x.shape, 3, 3, 6, 5, 1, 1)
    return f"{kernel} {dtype} ({path})"


def _warm_in_worker(task: tuple[str, str, str]) -> str:
    return warm(*task)


def compile_all(
    jobs: int | None = None, progress: Callable[[int, int, str], None] | None = None
) -> int:
    """Fill Numba's on-disk cache with every kernel at both dtypes.

    The tasks run in ``jobs`` new processes (default: one per CPU, at most one per task); then
    this process runs them all once more, which loads everything from the cache and compiles
    what the workers' cache lacks: a check, since :func:`lock_cache_files` serializes their
    writes (unlocked, two processes that update one function's cache index at the same moment
    drop entries and can file one signature's code under another's).

    Parameters
    ----------
    jobs : int, optional
    progress : callable, optional
        Called as ``progress(done, total, task_name)`` after each task.

    Returns
    -------
    int
        How many functions the final pass still had to compile (0 when the workers' cache was
        complete).
    """
    total = 2 * len(TASKS)
    done = 0
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(TASKS)))
    if fcntl is None:  # pragma: no cover - no cache locks (lock_cache_files): one writer at once
        jobs = 1
    # Imported here, not at the top: 15 ms of every ``import numbaconv`` (its import is part of
    # the start-up target) for a command run once after installing.
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    # New interpreters: the workers must compile (or load) on their own, whatever this process
    # has already run, and 'spawn' is safe with every threading layer.
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_warm_in_worker, task) for task in TASKS]):
            done += 1
            if progress is not None:
                progress(done, total, future.result())
    saved = os.environ.get("NUMBACONV_BLAS_INSIDE_KERNELS")
    before = _compiled_count()
    try:
        for task in TASKS:
            name = warm(*task)
            done += 1
            if progress is not None:
                progress(done, total, f"{name}, checked")
    finally:
        if saved is None:
            os.environ.pop("NUMBACONV_BLAS_INSIDE_KERNELS", None)
        else:
            os.environ["NUMBACONV_BLAS_INSIDE_KERNELS"] = saved
    return _compiled_count() - before


def dispatchers() -> list:
    """Every Numba dispatcher in numbaconv's kernel modules."""
    from numba.extending import is_jitted

    from . import kernels

    found = []
    for module_info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{module_info.name}")
        found.extend(value for value in vars(module).values() if is_jitted(value))
    return found


def _compiled_count() -> int:
    """Signatures compiled (not loaded from the cache) in this process so far."""
    return sum(sum(cache_stats(dispatcher).misses.values()) for dispatcher in dispatchers())


def cache_dirs() -> list[str]:
    """Where Numba caches numbaconv's compiled kernels.

    Asks the kernels' own dispatchers (``cache=True``) where their cache lives: ``__pycache__``
    next to each kernel module, or a folder under ``NUMBA_CACHE_DIR`` when that is set, or a
    user-wide folder when the package's folder is not writable (:func:`cache_stats`; where no
    dispatcher says, ``numba.config.CACHE_DIR`` or the package's ``__pycache__``).

    Returns
    -------
    list of str
        Each folder once, in the order found.
    """
    import numba

    folders: list[str] = []
    for dispatcher in dispatchers():
        folder = cache_stats(dispatcher).path
        if folder and folder not in folders:
            folders.append(folder)
    if folders:
        return folders
    if numba.config.CACHE_DIR:
        return [numba.config.CACHE_DIR]
    return [os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "__pycache__")]


#: Kernel modules whose ``@njit`` functions other kernel modules' kernels call (and so carry in
#: their compiled code): the row loops, numbaconv's own GEMM, the BLAS binding
#: (``gemm_nt_add``), and im2col's ``row_sum``, which Winograd calls. Numba keys a cached
#: function on the stamp of its own source file alone, so after an edit to one of these, its
#: callers' cache entries, compiled with the old code, would still be loaded (it happened while
#: tuning the GEMM: measurements of stale kernels). :func:`guard_shared_helpers` makes that
#: impossible.
SHARED_HELPERS = ("_loops.py", "microkernel.py", "_blas.py", "im2col.py")

#: The file in each cache folder that records which versions of the shared helpers the
#: numbaconv entries there were compiled with.
HELPERS_STAMP = "numbaconv-shared-helpers.stamp"


def helpers_fingerprint() -> str:
    """Modification time and size of each shared helper's source, as Numba stamps a source."""
    kernels_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
    parts = []
    for name in SHARED_HELPERS:
        info = os.stat(os.path.join(kernels_dir, name))
        parts.append(f"{name} {info.st_mtime_ns} {info.st_size}")
    return "\n".join(parts) + "\n"


def _kernel_modules() -> set[str]:
    from . import kernels

    return {info.name for info in pkgutil.iter_modules(kernels.__path__)}


def guard_shared_helpers() -> list[str]:
    """Remove the numbaconv entries of each cache folder whose stamp (:data:`HELPERS_STAMP`)
    names other versions of the shared helpers (:data:`SHARED_HELPERS`), then stamp the folder;
    return the files removed. Run at import: a folder whose stamp matches (every process after
    the first, and every install from a wheel, whose files do not change) costs a stat of three
    files and one small read. A folder that cannot be written is left as it is."""
    fingerprint = helpers_fingerprint()
    modules = _kernel_modules()
    removed: list[str] = []
    for folder in cache_dirs():
        stamp = os.path.join(folder, HELPERS_STAMP)
        try:
            with open(stamp) as handle:
                if handle.read() == fingerprint:
                    continue
        except OSError:
            pass
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        for name in names:
            if name.endswith((".nbi", ".nbc")) and name.split(".", 1)[0] in modules:
                try:
                    os.remove(os.path.join(folder, name))
                    removed.append(name)
                except OSError:
                    pass
        try:
            os.makedirs(folder, exist_ok=True)
            with open(stamp, "w") as handle:
                handle.write(fingerprint)
        except OSError:
            pass
    return removed


#: The lock file in each cache folder (:func:`lock_cache_files`).
LOCK_FILE = "numbaconv-cache.lock"


@contextlib.contextmanager
def _folder_lock(folder: str, exclusive: bool):
    """Hold ``folder``'s :data:`LOCK_FILE` (exclusive to write, shared to read) while inside; a
    folder where the lock file cannot be opened (read-only), or whose file system refuses the
    lock, is not locked: Numba's own behaviour."""
    try:
        handle = open(os.path.join(folder, LOCK_FILE), "a")
    except OSError:
        yield
        return
    with handle:  # closing the file releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:  # e.g. ENOLCK on some network file systems
            pass
        yield


def _locked(method: Callable, folder: str, exclusive: bool) -> Callable:
    @functools.wraps(method)
    def call(*args, **kwargs):
        with _folder_lock(folder, exclusive):
            return method(*args, **kwargs)

    call.numbaconv_locked = True
    return call


def lock_cache_files() -> bool:
    """Make each numbaconv kernel's cache writes exclusive and its cache reads shared, across
    processes, with a file lock in its cache folder (:data:`LOCK_FILE`); return whether locks
    are in place (they need ``fcntl``: POSIX).

    Why: Numba writes a new cache entry by reading the function's index, taking the first data
    file number the index does not use, writing the index, then the data file. Two processes
    that write entries of one function at once (``numbaconv compile``'s workers; a user's
    processes that all compile on first use) can both take the same number: the index then names,
    for one signature, a file that holds another signature's code, and every later process that
    loads it fails to type each call of the function ("Invalid use of type(CPUDispatcher(...))"),
    until the source changes. It happened in CI (``gemm_nn`` at float64; the race reproduced at
    a few wrong entries in 400 with two processes writing at once). Holding the lock for the
    whole read-index, write-index, write-data step serializes the writers; a reader holds it
    shared, so it never reads an index entry whose data file is still being written. Run once at
    import; only numbaconv's own dispatchers are wrapped, not Numba's class.
    """
    if fcntl is None:  # pragma: no cover - Windows
        return False
    for dispatcher in dispatchers():
        files = cache_file(dispatcher)
        folder = cache_stats(dispatcher).path
        if files is None or not folder or getattr(files.save, "numbaconv_locked", False):
            continue
        files.save = _locked(files.save, folder, exclusive=True)
        files.load = _locked(files.load, folder, exclusive=False)
    return True


def print_progress(done: int, total: int, name: str, stream=None) -> None:
    """A one-line progress bar on a terminal, one line per step elsewhere (logs, CI)."""
    stream = stream or sys.stderr
    width = 30
    filled = width * done // total
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name}"
    if stream.isatty():
        end = "\n" if done == total else ""
        stream.write(f"\r\x1b[2K{line}{end}")
    else:
        stream.write(line + "\n")
    stream.flush()


def run(jobs: int | None = None) -> int:
    """``numbaconv compile``: fill the cache with a progress bar, say where it is and how long it
    took; return the exit status."""
    start = time.perf_counter()
    print(
        f"numbaconv compile: compiling every kernel for both dtypes into {', '.join(cache_dirs())}"
    )
    recompiled = compile_all(jobs, print_progress)
    seconds = time.perf_counter() - start
    note = f" ({recompiled} lost cache entries written again)" if recompiled else ""
    print(f"numbaconv compile: done in {seconds:.1f} s{note}; the cache is in:")
    for folder in cache_dirs():
        print(f"  {folder}")
    return 0
