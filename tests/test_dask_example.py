"""examples/dask_zarr.py runs, at a small size, and its result passes its own check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dask.array")
pytest.importorskip("distributed")
pytest.importorskip("zarr")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dask_zarr.py"


def test_dask_zarr_example(tmp_path):
    # 1536 x 1536 pixels in 512 x 512 chunks: nine chunks, so the checked window, where four
    # chunks meet, reads halos from its neighbours.
    command = [sys.executable, str(EXAMPLE), "--size", "1536", "--chunk", "512"]
    command += ["--memory-limit", "1GiB", "--dir", str(tmp_path), "--timeout", "120"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    # "ok": the window matches the in-memory conv2d to 1e-5, every worker stayed under its limit.
    assert "window check: max |difference|" in done.stdout
    assert done.stdout.rstrip().endswith("ok"), done.stdout
    assert (tmp_path / "filtered.zarr").is_dir()
