"""The two things numbaconv asks Numba that Numba's public API does not answer, in one place.

Everything else goes through documented API: ``numba.threading_layer()`` (which raises
``ValueError`` until a parallel kernel has run), ``numba.get_num_threads``/``set_num_threads``,
``numba.config.THREADING_LAYER``/``NUMBA_NUM_THREADS``/``CACHE_DIR`` and
``numba.extending.is_jitted``. What is left:

- :func:`openmp_vendor`: which OpenMP runtime Numba's ``omp`` threading layer was built with (GNU
  OpenMP is not fork-safe). Only the private ``numba.np.ufunc.omppool.openmp_vendor`` says so;
  ``numba -s`` reads the same attribute.
- :data:`XXGEMM_SYMBOL`: ``numba_xxgemm``, the function of Numba's helper library that its
  ``np.dot`` calls for a matrix product (SciPy's ``sgemm``/``dgemm`` with a kind character
  first). :mod:`numbaconv.kernels._blas` calls it with ``beta = 1``, which ``np.dot`` never
  passes; its arguments are those Numba's own ``np.linalg`` code passes.
- :func:`cache_stats`: where a ``cache=True`` dispatcher caches and how many of its signatures
  were compiled or loaded in this process. The ``Dispatcher.stats`` property says so (no
  underscore, but not in Numba's reference documentation; Numba's own cache tests read it); it
  replaces the private ``dispatcher._cache._cache_path`` numbaconv read before.
- :func:`cache_file`: the object that reads and writes a ``cache=True`` dispatcher's index and
  data files (``dispatcher._cache._cache_file``, a ``numba.core.caching.IndexDataCacheFile``).
  Two processes that write new entries of one function at once can leave its index naming a
  data file that holds another signature's code (each picks the first free file number from the
  index it read), and the next process that loads that entry fails to type every call of it:
  :func:`numbaconv.cache.lock_cache_files` puts a file lock around its ``save`` and ``load``.

``tests/test_numba_internals.py`` checks each against the installed Numba, so a release that
renames or drops one fails the suite loudly instead of sending numbaconv down a fallback.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple


def openmp_vendor() -> str | None:
    """The OpenMP runtime of Numba's ``omp`` layer (``"GNU"``, ``"Intel"``, ``"MS"``, ...), or None
    when this Numba has no OpenMP layer (its extension cannot be imported here)."""
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        return None
    # Should the attribute ever go away, assume the runtime that is not fork-safe.
    return getattr(omppool, "openmp_vendor", "GNU")


#: The symbol of Numba's matrix-product helper (``numba/_helperlib.c``).
XXGEMM_SYMBOL = "numba_xxgemm"


class CacheStats(NamedTuple):
    """What a dispatcher knows of its on-disk cache."""

    path: str | None  #: the folder of its cache files; None for a dispatcher without ``cache=True``
    hits: Counter  #: signature -> times loaded from the cache in this process
    misses: Counter  #: signature -> times compiled in this process


def cache_file(dispatcher):
    """The ``IndexDataCacheFile`` of a ``cache=True`` dispatcher (its ``save(key, data)`` and
    ``load(key)`` read and write the index and data files), or None without ``cache=True``."""
    return getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)


def cache_stats(dispatcher) -> CacheStats:
    """The cache folder and the cache hits and misses of a Numba dispatcher."""
    stats = dispatcher.stats
    return CacheStats(stats.cache_path, stats.cache_hits, stats.cache_misses)
