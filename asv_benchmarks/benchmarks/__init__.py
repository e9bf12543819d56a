"""numbaconv's airspeed-velocity (asv) benchmark suite.

asv imports this package before any benchmark module, in the process that later forks the
benchmark runs, so the settings below are in place before NumPy, Numba or PyTorch read them:

- Thread count, fixed at ``THREADS = 2`` for every pool a convolution may use: Numba's
  (``NUMBA_NUM_THREADS``), OpenMP's, OpenBLAS's and MKL's; the torch series also calls
  ``torch.set_num_threads(THREADS)``. Results from machines with more cores stay comparable, and a
  change of thread count is a change of this file, not of the machine's mood.
- ``USER_OMP_WAIT_POLICY`` keeps ``OMP_WAIT_POLICY`` as it was before numbaconv was imported
  (numbaconv sets ``PASSIVE`` for its own OpenMP pool unless the user chose): the torch series
  runs with PyTorch's own defaults, as PyTorch users run it.
- ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` are removed: users don't set them, and a forced
  core type halves OpenBLAS's GEMM speed on the AVX-512 machines numbaconv is developed on.
"""

import os

THREADS = 2
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")

for _name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = str(THREADS)
for _name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(_name, None)
