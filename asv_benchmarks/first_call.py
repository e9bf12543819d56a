"""Start-up cost of a new process: ``import numbaconv``, then one float32 forward and backward.

Run it with an empty Numba cache to see compilation, and again to see the cache load::

    d=$(mktemp -d)
    for i in 1 2 3; do NUMBA_CACHE_DIR=$d python asv_benchmarks/first_call.py 8; done

The argument is the channel count C of the layer (16 x C x 24 x 24 input, C 3x3 filters, padding
1): with the default kernel, 8 runs ``im2col`` and 32 runs ``winograd``.
"""

import sys
import time

start = time.perf_counter()
import numpy as np  # noqa: E402

import numbaconv as nc  # noqa: E402

imported = time.perf_counter()
channels = int(sys.argv[1]) if len(sys.argv) > 1 else 8
rng = np.random.default_rng(0)
x = rng.standard_normal((16, channels, 24, 24)).astype(np.float32)
w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)
y = nc.conv2d(x, w, padding=1)
forward = time.perf_counter()
nc.conv2d_backward(y, x, w, padding=1)
backward = time.perf_counter()
kernel = nc.registry.choose(nc.geometry.make_geometry(x.shape, w.shape, padding=1))
print(
    f"C={channels} ({kernel}): import {imported - start:.2f} s, first forward "
    f"{forward - imported:.2f} s, first backward {backward - forward:.2f} s, "
    f"total {backward - start:.2f} s"
)
