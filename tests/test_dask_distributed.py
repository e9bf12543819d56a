"""numbaconv.dask on a ``distributed.LocalCluster`` of two worker processes.

The cluster (spawned worker processes, random ports, no dashboard, 1 GiB per worker) is started
once for the module and closed at its end. Every call that waits on it has a timeout, and a
watchdog (``faulthandler``) ends the test process with a traceback if the module as a whole hangs.
"""

from __future__ import annotations

import faulthandler
import os
import signal

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from helpers import assert_close  # noqa: E402
from test_dask import CONFIGS, LAYOUTS, SHAPE, make  # noqa: E402

import numbaconv as nc  # noqa: E402
import numbaconv.dask as ncd  # noqa: E402

#: Seconds any one wait on the cluster may take (the computations take well under a second).
TIMEOUT = 60
#: Seconds the whole module may take before the watchdog ends the process.
WATCHDOG = 300


@pytest.fixture(scope="module")
def client():
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit="1GiB",
        dashboard_address=None,
    )
    client = distributed.Client(cluster, timeout=TIMEOUT)
    try:
        client.wait_for_workers(2, timeout=TIMEOUT)
        yield client
    finally:
        client.close(timeout=TIMEOUT)
        cluster.close(timeout=TIMEOUT)
        faulthandler.cancel_dump_traceback_later()


def compute(client, *collections):
    """The collections computed on the cluster, each within :data:`TIMEOUT` seconds."""
    futures = client.compute(list(collections))
    return [future.result(timeout=TIMEOUT) for future in futures]


def expected_and_scales(x, w, b, grad_y, options):
    """In-memory results and the ``|x| * |w|`` scales of their rounding errors."""
    results = [nc.conv2d(x, w, b, **options), *nc.conv2d_backward(grad_y, x, w, **options)]
    absolute = [np.abs(a).astype(np.float64) for a in (x, w, b, grad_y)]
    scales = [
        nc.conv2d(*absolute[:3], **options),
        *nc.conv2d_backward(absolute[3], absolute[0], absolute[1], **options),
    ]
    return results, scales


@pytest.mark.parametrize(
    "config, layout, dtype",
    [
        ("stride2", "tiles", np.float32),
        ("dilation2-same", "tiny", np.float64),
        ("groups3", "split-channels", np.float32),
        ("same-even", "rows", np.float64),
        ("reflect", "batch", np.float32),
        ("depthwise", "tiny", np.float64),
    ],
    ids=lambda v: np.dtype(v).name if isinstance(v, type) else v,
)
def test_matches_in_memory(client, config, layout, dtype):
    r, s, options = CONFIGS[config]
    x, w, b = make(SHAPE, r, s, options, dtype)
    grad_y = np.random.default_rng(1).standard_normal(nc.conv2d(x, w, **options).shape)
    grad_y = grad_y.astype(dtype)
    x_lazy = da.from_array(x, chunks=LAYOUTS[layout])
    y_lazy = ncd.conv2d(x_lazy, w, b, **options)
    grads_lazy = ncd.conv2d_backward(
        da.from_array(grad_y, chunks=y_lazy.chunks), x_lazy, w, **options
    )
    got = compute(client, y_lazy, *grads_lazy)
    expected, scales = expected_and_scales(x, w, b, grad_y, options)
    names = ("y", "grad_x", "grad_w", "grad_b")
    for name, g, e, scale in zip(names, got, expected, scales, strict=True):
        assert_close(g, e.astype(np.float64), scale, dtype, f"{name} {config} {layout}")


def test_worker_killed_mid_computation_is_retried(client, tmp_path):
    """A worker process dies (SIGKILL) while the graph runs, after other blocks were computed and
    held on it; its nanny starts a new one, the scheduler recomputes what was lost, and the
    result is still the in-memory one."""
    marker = str(tmp_path / "killed")
    pids_before = set(client.run(os.getpid).values())

    # Nested, so that cloudpickle sends the function itself (the workers cannot import tests).
    def die_once(block, block_info=None):
        # The last input block kills its worker the first time any worker runs it: O_EXCL lets
        # exactly one process create the marker, so the retry (and the other worker) go on.
        if block_info[0]["chunk-location"] == (2, 0, 1, 1):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return block
            os.kill(os.getpid(), signal.SIGKILL)
        return block

    x, w, b = make(SHAPE, 3, 3, {}, np.float32)
    x_lazy = da.from_array(x, chunks=(2, 6, 10, 9)).map_blocks(die_once, dtype=x.dtype)
    options = dict(padding=2, dilation=2)
    (got,) = compute(client, ncd.conv2d(x_lazy, w, b, **options))
    assert os.path.exists(marker), "no worker was killed"
    expected, scales = expected_and_scales(x, w, b, np.zeros((5, 6, 19, 17), x.dtype), options)
    assert_close(got, expected[0].astype(np.float64), scales[0], np.float32, "after a kill")
    client.wait_for_workers(2, timeout=TIMEOUT)
    pids_after = set(client.run(os.getpid).values())
    assert len(pids_after) == 2 and len(pids_after & pids_before) == 1, (
        f"expected one worker replaced: pids {pids_before} before, {pids_after} after"
    )
