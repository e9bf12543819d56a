"""The benchmark workflow's own tools: asv_benchmarks/local_assets.py (the dashboard's scripts
and styles served from its html folder) and the asv suite's use of the timing harness.

The page check itself (asv_benchmarks/check_page.py) needs published results, npm and a
Chromium; it runs by hand (README, "Benchmarks"), not here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

ASV_BENCHMARKS = Path(__file__).resolve().parents[1] / "asv_benchmarks"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


local_assets = _load(ASV_BENCHMARKS / "local_assets.py", "_local_assets")


@pytest.fixture
def asv_index_page() -> str:
    asv = pytest.importorskip("asv")
    return (Path(asv.__file__).parent / "www" / "index.html").read_text()


def test_every_cdn_tag_of_asvs_page_points_at_the_html_folder(asv_index_page):
    local = {
        url: local_assets.vendor_path(package, member)
        for url, package, member in local_assets.ASSETS
    }
    page = local_assets.rewrite(asv_index_page, local)
    assert not re.search(r"<(script|link)\b[^>]*(src|href)=\"https?://", page)
    assert '<script src="vendor/jquery/dist/jquery.min.js" onerror="js_load_failure()">' in page
    assert '<link rel="stylesheet" href="vendor/bootstrap/dist/css/bootstrap.min.css">' in page
    assert "integrity=" not in page
    # Ten tags, each rewritten once; the page's own scripts and links are left alone.
    assert page.count('src="vendor/') == 9 and page.count('href="vendor/') == 1
    assert '<script src="asv.js"' in page or "asv.js" in page
    assert page.count("\n") == asv_index_page.count("\n")


def test_a_page_with_other_dependencies_is_refused(asv_index_page):
    local = {url: "vendor/x.js" for url, _, _ in local_assets.ASSETS}
    page = asv_index_page.replace(
        "https://code.jquery.com/jquery-3.3.1.min.js", "https://code.jquery.com/jquery-9.9.9.js"
    )
    message = "the page loads addresses this script doesn't know: ['https://code.jquery.com/jq"
    with pytest.raises(local_assets.AssetError, match=re.escape(message)):
        local_assets.rewrite(page, local)
    local["https://example.org/gone.js"] = "vendor/gone.js"
    message = "the page no longer loads ['https://example.org/gone.js']: check ASSETS"
    with pytest.raises(local_assets.AssetError, match=re.escape(message)):
        local_assets.rewrite(asv_index_page, local)


def test_missing_npm_and_missing_page_are_reported(tmp_path):
    with pytest.raises(local_assets.AssetError, match="'no-such-npm' was not found"):
        local_assets.fetch("jquery@3.3.1", tmp_path, npm="no-such-npm")
    with pytest.raises(local_assets.AssetError, match="run asv publish"):
        local_assets.make_local(tmp_path, tmp_path)
    assert local_assets.main(["--html", str(tmp_path), "--cache", str(tmp_path)]) == 1


def test_cached_tarball_is_used_without_npm(tmp_path):
    tarball = tmp_path / "flot-orderbars-1.0.0.tgz"
    tarball.write_bytes(b"")
    assert local_assets.fetch("flot-orderbars@1.0.0", tmp_path, npm="no-such-npm") == tarball


@pytest.fixture
def asv_common(monkeypatch):
    """The suite's common module, as asv imports it (benchmarks/ on sys.path), in quick mode."""
    monkeypatch.syspath_prepend(str(ASV_BENCHMARKS))
    monkeypatch.setenv("NUMBACONV_BENCH_QUICK", "1")
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    # The suite's __init__ sets thread counts (NUMBA_NUM_THREADS=2 among them) for its own
    # processes. Put them back at once: Numba rereads its environment at every compilation and
    # raises once its threads run with another count (CI's cold cache compiled in this test).
    saved = os.environ.copy()
    try:
        from benchmarks import common
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield common
    finally:
        for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[name]


def test_the_asv_suite_takes_its_data_and_calls_from_the_harness(asv_common):
    common = asv_common

    from numbaconv import bench, shapes

    assert common.harness.__file__ == bench.__file__  # this checkout's harness, by path
    assert set(common.SHAPE_NAMES) == set(shapes.ALL_SHAPES)
    data = common.prepare("auto", "audio_conv1d", "float32")
    assert data.op == "conv1d" and data.x.shape == (2, 64, 256)
    with pytest.raises(NotImplementedError, match="the zoo layers run auto and torch only"):
        common.prepare("im2col", "dcgan_up4x4", "float32")
    forward = common.forward_call("auto", data)
    assert forward().shape == (2, 64, 256)


def test_peakmem_cases_compile_apart_once_per_case_and_install(asv_common, monkeypatch, tmp_path):
    runs = []
    monkeypatch.setattr(asv_common.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(asv_common.subprocess, "run", lambda argv, check: runs.append(argv[2]))
    for _ in range(2):
        asv_common.compile_apart("im2col", "digits", "float32")
        asv_common.compile_apart("numpy", "digits", "float32")  # nothing to compile
        asv_common.compile_apart("torch", "digits", "float32")
    asv_common.compile_apart("im2col", "digits", "float64")
    assert len(runs) == 2
    # The process runs the case itself: its kernel, layer and dtype, nothing else.
    assert "common.prepare('im2col', 'digits', 'float32')" in runs[0]
    assert "common.prepare('im2col', 'digits', 'float64')" in runs[1]
    (install,) = (tmp_path / "numbaconv-asv-compiled").iterdir()
    stamps = sorted(path.name for path in install.iterdir())
    assert stamps == ["im2col-digits-float32-quick", "im2col-digits-float64-quick"]
