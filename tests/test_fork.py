"""Worker processes after the parent used numbaconv: every start method, pools, executors.

Each scenario runs in a new Python process with a timeout, so a child that Numba kills or a pool
that hangs fails the test instead of hanging the suite. The layer is large enough to run on
several threads (above ``SERIAL_FLOPS``), so the parent's thread pool has really started.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest

from numbaconv import _threading

SCENARIO = textwrap.dedent(
    """
    import json, multiprocessing as mp, sys
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np
    import numbaconv as nc

    def layer(seed, kernel=None):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((4, 16, 24, 24), dtype=np.float32)
        w = rng.standard_normal((16, 16, 3, 3), dtype=np.float32)
        y = nc.conv2d(x, w, padding=1, kernel=kernel)
        gx, gw, gb = nc.conv2d_backward(y, x, w, padding=1, kernel=kernel)
        return [a.tobytes().hex() for a in (y, gx, gw, gb)]

    def in_child(seed, kernel=None):
        try:
            return "ok", layer(seed, kernel)
        except nc.ForkedOpenMPError as exc:
            return "ForkedOpenMPError", str(exc)

    def process_target(queue, seed):
        queue.put(in_child(seed))

    if __name__ == "__main__":
        method = sys.argv[1]
        expected = [layer(seed) for seed in range(3)]  # the parent's threads start here
        ctx = mp.get_context(method)
        report = {"layer": nc._threading.active_threading_layer()}

        queue = ctx.Queue()
        proc = ctx.Process(target=process_target, args=(queue, 0))
        proc.start()
        status, result = queue.get(timeout=60)
        proc.join(timeout=60)
        report["process"] = [status, result == expected[0], proc.exitcode]

        with ctx.Pool(2) as pool:
            results = pool.map(in_child, range(3))
        report["pool"] = [[s, r == e] for (s, r), e in zip(results, expected)]

        with ProcessPoolExecutor(2, mp_context=ctx) as executor:
            results = list(executor.map(in_child, range(3)))
        report["executor"] = [[s, r == e] for (s, r), e in zip(results, expected)]

        # The teaching kernel is plain NumPy: it runs in any child.
        with ctx.Pool(1) as pool:
            status, _ = pool.apply(in_child, (0, "numpy"))
        report["numpy kernel"] = status
        print(json.dumps(report))
    """
)


def _run(tmp_path, method, layer=None):
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    env = dict(os.environ)
    if layer is None:
        env.pop("NUMBA_THREADING_LAYER", None)
    else:
        env["NUMBA_THREADING_LAYER"] = layer
    done = subprocess.run(
        [sys.executable, str(script), method],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tbb_installed() -> bool:
    try:
        importlib.metadata.version("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_children_compute_the_parents_bits(tmp_path, method):
    """With the default layer every kind of child gives the parent's results, bit for bit."""
    report = _run(tmp_path, method)
    if method == "fork" and report["layer"] == "omp":
        pytest.skip("GNU OpenMP layer (no tbb here): test_forked_openmp_child_raises covers it")
    assert report["process"] == ["ok", True, 0]
    assert report["pool"] == [["ok", True]] * 3
    assert report["executor"] == [["ok", True]] * 3
    assert report["numpy kernel"] == "ok"


@pytest.mark.skipif(not _tbb_installed(), reason="the tbb package is not installed here")
def test_default_layer_is_tbb_where_tbb_is_installed():
    """The tbb wheel's library is found in a virtual environment, so Numba's TBB layer runs."""
    code = (
        "import numpy as np, numbaconv as nc\n"
        "nc.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)))\n"
        "print(nc._threading.active_threading_layer(), nc._threading.fork_safe())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["tbb", "True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP is Linux's")
def test_forked_openmp_child_raises(tmp_path):
    """With GNU OpenMP, a forked child gets a clear exception instead of being killed."""
    report = _run(tmp_path, "fork", layer="omp")
    assert report["layer"] == "omp"
    assert report["process"][0] == "ForkedOpenMPError"
    assert report["process"][2] == 0  # the child raised, reported and exited normally
    assert [status for status, _ in report["pool"]] == ["ForkedOpenMPError"] * 3
    assert [status for status, _ in report["executor"]] == ["ForkedOpenMPError"] * 3
    assert report["numpy kernel"] == "ok"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP is Linux's")
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_openmp_with_fresh_children_works(tmp_path, method):
    report = _run(tmp_path, method, layer="omp")
    assert report["layer"] == "omp"
    assert report["process"] == ["ok", True, 0]
    assert report["pool"] == [["ok", True]] * 3
    assert report["executor"] == [["ok", True]] * 3


def test_error_message_names_the_fixes(monkeypatch):
    monkeypatch.setattr(_threading, "_forked_from_openmp", True)
    import numpy as np

    import numbaconv as nc

    x, w = np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3))
    with pytest.raises(nc.ForkedOpenMPError, match=r"'spawn' or 'forkserver'.*install the 'tbb'"):
        nc.conv2d(x, w)
    with pytest.raises(nc.ForkedOpenMPError):
        nc.conv2d_backward(np.ones((1, 1, 2, 2)), x, w)
    assert nc.conv2d(x, w, kernel="numpy")[0, 0, 0, 0] == 9.0


def _policy_after_import(layer: str | None) -> str:
    env = {
        k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY")
    }
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    code = "import os, numbaconv; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_omp_wait_policy_set_only_for_the_openmp_layer():
    """PASSIVE keeps GNU OpenMP's workers from spinning; with TBB, other libraries' OpenMP
    runtimes (PyTorch's) are left with their own default."""
    assert _policy_after_import("omp") == "PASSIVE"
    if _tbb_installed():
        assert _policy_after_import(None) == "unset"
