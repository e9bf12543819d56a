"""``cache=True``: a second process loads every kernel from Numba's cache and compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

WORKLOAD = textwrap.dedent(
    """
    import numpy as np
    import numbaconv as nc

    def workload():
        for dtype in (np.float32, np.float64):
            rng = np.random.default_rng(0)
            x = rng.standard_normal((2, 4, 6, 6)).astype(dtype)
            w = rng.standard_normal((4, 2, 3, 3)).astype(dtype)
            b = rng.standard_normal(4).astype(dtype)
            for kernel in nc.KERNELS:
                y = nc.conv2d(x, w, b, kernel=kernel, padding=1, groups=2)
                nc.conv2d_backward(y, x, w, kernel=kernel, padding=1, groups=2)
            cols = nc.im2col(x, 3, 3, 6, 6, 1, 1)
            nc.col2im(cols, x.shape, 3, 3, 6, 6, 1, 1)
    """
)

REPORT = textwrap.dedent(
    """
    import json, sys
    from numba.core.dispatcher import Dispatcher

    workload()
    misses = {}
    for name, module in list(sys.modules.items()):
        if name == "numbaconv" or name.startswith("numbaconv."):
            for attr, obj in list(vars(module).items()):
                if isinstance(obj, Dispatcher) and obj.stats.cache_misses:
                    misses[f"{name}.{attr}"] = [str(s) for s in obj.stats.cache_misses]
    print("MISSES=" + json.dumps(misses))
    """
)


def test_second_process_compiles_nothing():
    # This process compiles (or loads) every specialisation the workload needs and so fills
    # the cache; a fresh interpreter running the same workload must then only load.
    namespace = {}
    exec(WORKLOAD, namespace)
    namespace["workload"]()
    env = dict(os.environ)
    env.pop("NUMBACONV_KERNEL", None)
    proc = subprocess.run(
        [sys.executable, "-c", WORKLOAD + REPORT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MISSES=")][-1]
    misses = json.loads(line[len("MISSES=") :])
    assert misses == {}, f"compiled again in a second process (not cached): {misses}"
    assert "cannot cache" not in proc.stderr.lower(), proc.stderr
