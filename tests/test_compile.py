"""``numbaconv compile``: after it, no call compiles anything, in any process."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

from numbaconv import cache
from numbaconv.cli import main

# Calls unlike the ones ``compile`` makes (other sizes, no bias, 'same' padding, a layer,
# thread counts, the environment's path choice), every kernel and dtype.
WORKLOAD = textwrap.dedent(
    """
    import json, os
    import numba
    import numpy as np
    import numbaconv as nc
    from numbaconv import cache

    rng = np.random.default_rng(1)
    layers = [
        ((3, 16, 12, 11), (16, 16, 3, 3), dict(padding="same")),
        ((2, 8, 20, 20), (8, 8, 1, 1), {}),
        ((2, 6, 9, 10), (6, 1, 3, 3), dict(stride=2, padding=1, groups=6)),
        ((2, 5, 8, 7), (5, 1, 3, 3), dict(padding=1, groups=5)),
        # Last: the teaching im2col below takes this x.
        ((1, 6, 13, 9), (12, 3, 5, 3), dict(stride=(2, 3), padding=2, dilation=2, groups=2)),
    ]
    for path in ("1", "0"):
        os.environ["NUMBACONV_BLAS_INSIDE_KERNELS"] = path
        for threads in (1, 2):
            numba.set_num_threads(threads)
            for dtype in (np.float32, np.float64):
                for kernel in nc.KERNELS:
                    for x_shape, w_shape, options in layers:
                        x = rng.standard_normal(x_shape).astype(dtype)
                        w = rng.standard_normal(w_shape).astype(dtype)
                        y = nc.conv2d(x, w, kernel=kernel, **options)
                        nc.conv2d_backward(y, x, w, kernel=kernel, **options)
                    # Transposed: each kernel's input gradient alone, and auto's sub-pixel
                    # form both ways (registry.transposed_via_subpixel).
                    xt = rng.standard_normal((2, 3, 7, 7)).astype(dtype)
                    for r in (4, 2):
                        wt = rng.standard_normal((3, 32, r, r)).astype(dtype)
                        options = dict(stride=2, padding=r // 4)
                        yt = nc.conv_transpose2d(xt, wt, kernel=kernel, **options)
                        nc.conv_transpose2d_backward(yt, xt, wt, kernel=kernel, **options)
                # The transposed forward pass phase by phase (subpixel.implicit_forward).
                xt = rng.standard_normal((1, 64, 9, 14)).astype(dtype)
                wt = rng.standard_normal((64, 33, 4, 4)).astype(dtype)
                nc.conv_transpose2d(xt, wt, stride=2, padding=1, kernel="auto")
                layer = nc.ConvLayer(3, 9, 9, 4, 3, 3, 1, 1, dtype=dtype)
                layer.backward(layer.forward(rng.standard_normal((5, 3, 9, 9)).astype(dtype)))
                cols = nc.im2col(x, 5, 3, 7, 4, (2, 3), 2)
                nc.col2im(cols, x.shape, 5, 3, 7, 4, (2, 3), 2)
    loaded = sum(sum(d.stats.cache_hits.values()) for d in cache.dispatchers())
    print(json.dumps({"compiled": cache._compiled_count(), "loaded": loaded}))
    """
)


def test_compile_fills_the_cache_for_every_call(cold_compile, tmp_path):
    done = cold_compile.done
    assert done is not None, cold_compile.error
    assert done.returncode == 0, done.stderr[-3000:]
    assert cold_compile.cache_dir in done.stdout
    assert "the cache is in:" in done.stdout
    assert f"{2 * len(cache.TASKS)}/{2 * len(cache.TASKS)}" in done.stderr  # the progress bar
    assert "lost cache entries" not in done.stdout or "written again" in done.stdout

    # A copy: what the compile wrote and nothing else, whatever the session did with its own.
    cache_dir = shutil.copytree(cold_compile.cache_dir, tmp_path / "cache")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    env.pop("NUMBACONV_BLAS_INSIDE_KERNELS", None)
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    assert counts["compiled"] == 0, counts
    assert counts["loaded"] >= 20, counts  # the workload really ran the cached kernels


def test_progress_lines_when_not_a_terminal():
    stream = io.StringIO()
    cache.print_progress(1, 4, "im2col float32 (banded)", stream)
    cache.print_progress(4, 4, "direct float64 (banded)", stream)
    assert stream.getvalue().splitlines() == [
        "[#######.......................] 1/4 im2col float32 (banded)",
        "[##############################] 4/4 direct float64 (banded)",
    ]


def test_tasks_cover_every_compiled_kernel_and_dtype():
    kernels = {kernel for kernel, _, _ in cache.TASKS}
    assert kernels == {
        "im2col",
        "winograd",
        "direct",
        "taps",
    }  # numpy is plain NumPy; auto picks these
    assert {(k, d) for k, d, _ in cache.TASKS} == {
        (k, d) for k in kernels for d in ("float32", "float64")
    }


def test_compile_rejects_bad_jobs(capsys):
    assert main(["compile", "--jobs", "0"]) == 2
    assert "error" in capsys.readouterr().err
