"""The ``numbaconv`` command line, run in-process through ``numbaconv.cli.main(argv)``.

Sizes are tiny so that the whole file runs in seconds; timings are printed by ``bench`` but never
asserted (timing belongs in the asv suite).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numba
import pytest

import numbaconv
from numbaconv import _threading, bench, cli, info, registry
from numbaconv.shapes import ALL_SHAPES, LAYER_SHAPES

EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+)  loss (\S+)  train acc (\S+)  test acc (\S+)  (\S+) s$", re.MULTILINE
)


def run(capsys, *argv):
    """``(status, stdout, stderr)`` of ``numbaconv *argv``."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def epochs(out: str) -> list[tuple[float, float, float]]:
    """(loss, train accuracy, test accuracy) of each epoch line of ``numbaconv demo``."""
    return [(float(m[3]), float(m[4]), float(m[5])) for m in EPOCH_LINE.finditer(out)]


# ------------------------------------------------------------------------------------------------
# Bad arguments: one line, "numbaconv: error: ...", status 2, no traceback.

BAD_ARGUMENTS = [
    (["bench", "--kernels", "im2col,nope"], "argument --kernels: unknown kernel 'nope'"),
    (["demo", "--kernel", "nope"], "argument --kernel: unknown kernel 'nope'; valid kernels: "),
    (
        ["bench", "--shape", "1,2,3"],
        "expected N,C,H,W,K,R,S[,stride[,pad[,dilation[,groups]]]] (7 to 11 integers) or a layer",
    ),
    (["bench", "--shape", "resnet9x9"], "or a layer name, got 'resnet9x9'"),
    (["bench", "--shape", "2,6,8,8,4,3,3,1,1,1,4"], "divisible by groups"),
    (["bench", "--shape", "1,1,8,8,4,3,x"], "as integers, or a layer name, got '1,1,8,8,4,3,x'"),
    (["bench", "--shape", "1,1,4,4,2,5,5"], "output size would be 0x0"),
    (["bench", "--shape", "1,1,4,4,2,3,3,0"], "stride must be >= 1, got 0"),
    (["bench", "--shape", "1,1,4,4,2,3,3,1,-1"], "padding must be non-negative"),
    (["bench", "--shape", "0,1,4,4,2,3,3"], "the batch N must be >= 1"),
    (["bench", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["bench", "--repeat", "0"], "argument --repeat: expected a positive integer, got '0'"),
    (["demo", "--epochs", "two"], "argument --epochs: expected a positive integer, got 'two'"),
    (["demo", "--seed", "-1"], "argument --seed: expected an integer in [0, 2**32)"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS, ids=lambda v: " ".join(v))
def test_bad_arguments(capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err.startswith("numbaconv: error: ")
    assert err.count("\n") == 1, err
    assert message in err


def test_bad_default_kernel_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("NUMBACONV_KERNEL", "nope")
    status, _, err = run(capsys, "demo", "--epochs", "1")
    assert status == 2
    assert err == (
        "numbaconv: error: unknown kernel 'nope' (from the NUMBACONV_KERNEL environment "
        f"variable); valid kernels: {', '.join(registry.KERNELS)}\n"
    )


def test_too_many_threads(capsys):
    status, _, err = run(capsys, "bench", "--threads", str(numba.config.NUMBA_NUM_THREADS + 1))
    assert status == 2
    assert f"at most NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} threads" in err


def test_missing_folder_for_outputs(capsys, tmp_path):
    status, _, err = run(capsys, "bench", "--json", str(tmp_path / "no" / "such.json"))
    assert status == 2
    assert err.startswith("numbaconv: error: --json: folder ") and "does not exist" in err


def test_demo_without_its_packages(capsys, monkeypatch):
    # A None entry in sys.modules makes ``import sklearn`` raise ImportError.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    status, out, err = run(capsys, "demo", "--plot", "curves.png")
    assert status == 2
    assert out == ""
    assert err == (
        'numbaconv: error: the demo needs scikit-learn, matplotlib: pip install "numbaconv[demo]"\n'
    )


def test_help_and_version(capsys):
    status, out, _ = run(capsys, "--version")
    assert (status, out) == (0, f"numbaconv {numbaconv.__version__}\n")
    status, out, _ = run(capsys, "bench", "--help")
    assert status == 0
    assert "--shape N,C,H,W,K,R,S[,stride[,pad[,dilation[,groups]]]]" in out
    assert "--limit" not in run(capsys, "demo", "--help")[1]


# ------------------------------------------------------------------------------------------------
# Shapes


def test_parse_shape_defaults_and_suite_shapes():
    assert cli.parse_shape("2,3,8,8,4,3,3") == (2, 3, 8, 8, 4, 3, 3, 1, 0, 1, 1)
    assert cli.parse_shape(" 2, 3,8,8,4,3,3,2,1") == (2, 3, 8, 8, 4, 3, 3, 2, 1, 1, 1)
    assert cli.parse_shape("2,4,9,9,4,3,3,1,2,2,2") == (2, 4, 9, 9, 4, 3, 3, 1, 2, 2, 2)
    for shape in LAYER_SHAPES.values():  # every suite shape is valid as written
        assert cli.parse_shape(",".join(map(str, shape))) == shape
    for name, shape in ALL_SHAPES.items():  # ... and every benchmark layer by its name
        assert cli.parse_shape(name) == shape
        assert cli._shape_text(shape) == name


# ------------------------------------------------------------------------------------------------
# bench

TINY = "2,3,6,6,4,3,3,1,1"


def test_bench_json(capsys, tmp_path, restore_num_threads):
    report_path = tmp_path / "bench.json"
    argv = ["bench", "--shape", TINY, "--shape", "1,2,5,5,3,1,1,2,0", "--kernels", "im2col,numpy"]
    argv += ["--repeat", "1", "--threads", "1", "--dtype", "float64", "--json", str(report_path)]
    status, out, _ = run(capsys, *argv)
    assert status == 0
    report = json.loads(report_path.read_text())
    assert report["numbaconv"] == numbaconv.__version__
    assert report["numba"] == numba.__version__
    assert (report["dtype"], report["threads"], report["repeat"]) == ("float64", 1, 1)
    results = report["results"]
    assert [(r["shape"], r["kernel"]) for r in results] == [
        (TINY, "im2col"),
        (TINY, "numpy"),
        ("1,2,5,5,3,1,1,2,0", "im2col"),
        ("1,2,5,5,3,1,1,2,0", "numpy"),
    ]
    assert results[0]["dims"] == [2, 3, 6, 6, 4, 3, 3, 1, 1, 1, 1]
    # 2 flops per multiply-add: N*K*OH*OW * C*R*S; the strided 1x1 layer has a 3x3 output.
    flops = {TINY: 2 * 2 * 4 * 6 * 6 * 3 * 3 * 3, "1,2,5,5,3,1,1,2,0": 2 * 1 * 3 * 3 * 3 * 2}
    for r in results:
        assert r["forward_ms"] > 0 and r["backward_ms"] > 0
        f = flops[r["shape"]]
        assert r["forward_gflops"] == pytest.approx(f / r["forward_ms"] / 1e6)
        assert r["backward_gflops"] == pytest.approx(2 * f / r["backward_ms"] / 1e6)
        baseline = next(b for b in results if b["shape"] == r["shape"] and b["kernel"] == "numpy")
        assert r["forward_speedup"] == pytest.approx(baseline["forward_ms"] / r["forward_ms"])
        assert r["backward_speedup"] == pytest.approx(baseline["backward_ms"] / r["backward_ms"])
        if r["kernel"] == "numpy":
            assert r["forward_speedup"] == r["backward_speedup"] == 1.0
        if hasattr(registry, "choose"):
            assert r["auto_forward"] in registry.KERNELS and r["auto_forward"] != "auto"
            assert r["auto_backward"] in registry.KERNELS and r["auto_backward"] != "auto"
        else:
            assert r["auto_forward"] is None and r["auto_backward"] is None

    # The table shows the same figures, one row per (shape, kernel).
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("shape"))
    assert header.split()[:6] == ["shape", "kernel", "fwd", "ms", "bwd", "ms"]
    assert "fwd vs numpy" in header
    assert ("auto picks" in header) == hasattr(registry, "choose")
    rows = lines[lines.index(header) + 2 : lines.index(header) + 6]
    assert rows[0].split()[:2] == [TINY, "im2col"]
    assert rows[1].split()[0] == "numpy"  # the shape is written on its first row only
    assert rows[1].split()[5:7] == ["1.00x", "1.00x"]
    assert float(rows[0].split()[2]) == pytest.approx(results[0]["forward_ms"], rel=0.01)
    assert f"results written to {report_path}" in out


def test_bench_without_numpy_has_no_speedup(capsys):
    status, out, _ = run(capsys, "bench", "--shape", TINY, "--kernels", "im2col", "--repeat", "1")
    assert status == 0
    assert "vs numpy" not in out
    assert re.search(rf"^{TINY}\s+im2col\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+", out, re.MULTILINE)


def test_bench_defaults_to_the_suite_shapes_and_all_kernels(monkeypatch):
    seen = []

    def fake_bench_layer(name, shape, kernels, dtype, repeat, progress):
        seen.append((name, shape, tuple(kernels), dtype.name, repeat))
        return []

    monkeypatch.setattr(bench, "bench_layer", fake_bench_layer)
    assert cli.main(["bench"]) == 0
    assert seen == [
        (name, shape, registry.KERNELS, "float32", cli.DEFAULT_REPEAT)
        for name, shape in LAYER_SHAPES.items()
    ]


def test_auto_column_follows_the_registry(monkeypatch):
    shape = cli.parse_shape(TINY)
    monkeypatch.delattr(registry, "choose", raising=False)
    assert bench.auto_picks(shape, "float32") == (None, None)
    monkeypatch.setattr(registry, "choose", lambda geom, dtype: "direct", raising=False)
    assert bench.auto_picks(shape, "float32") == ("direct", "direct")
    # The other ops' forward pass is another pass of a convolution: auto decides inside it.
    assert bench.auto_picks(ALL_SHAPES["unet_up2x2"], "float32") == (None, None)
    result = cli.BenchResult(TINY, [2, 3, 6, 6, 4, 3, 3, 1, 1], "im2col", 1.5, 3.0, 1, 2)
    assert "auto picks" not in cli.format_table([result])
    result.auto_forward, result.auto_backward = "winograd", "im2col"
    table = cli.format_table([result])
    assert "auto picks (fwd/bwd)" in table
    assert table.splitlines()[2].split()[-1] == "winograd/im2col"
    # A transposed layer beside it: auto's pick is decided inside conv_transpose2d.
    other = cli.BenchResult("unet_up2x2", [], "im2col", 1.5, 3.0, 1, 2, op="conv_transpose2d")
    assert cli.format_table([result, other]).splitlines()[3].split()[-1] == "-"


def test_bench_runs_the_zoos_transposed_and_1d_layers(capsys, monkeypatch):
    # At full size they take seconds with the numpy kernel: the same layers, 1 image, smaller.
    small = {
        "unet_up2x2": ALL_SHAPES["unet_up2x2"]._replace(batch=1, height=6, width=6),
        "audio_conv1d": ALL_SHAPES["audio_conv1d"]._replace(batch=1, length=50),
    }
    monkeypatch.setitem(cli.ALL_SHAPES, "unet_up2x2", small["unet_up2x2"])
    monkeypatch.setitem(cli.ALL_SHAPES, "audio_conv1d", small["audio_conv1d"])
    argv = ["bench", "--shape", "unet_up2x2", "--shape", "audio_conv1d", "--kernels", "numpy"]
    status, out, _ = run(capsys, *argv, "--repeat", "1")
    assert status == 0
    rows = [
        line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["unet_up2x2"], ["audio_conv1d"])
    ]
    assert [row[:2] for row in rows] == [["unet_up2x2", "numpy"], ["audio_conv1d", "numpy"]]


# ------------------------------------------------------------------------------------------------
# info


def test_info(capsys):
    status, out, _ = run(capsys, "info")
    assert status == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {key: value.strip() for key, value in fields.items()}
    assert fields["numbaconv"].startswith(numbaconv.__version__)
    assert fields["numba"] == numba.__version__
    assert fields["numpy"] == __import__("numpy").__version__
    assert fields["scipy"] == __import__("scipy").__version__
    # The tiny convolution ran, so the threading layer is known.
    layer = numba.threading_layer()
    assert fields["threading layer"].split()[0] == layer
    # ... and whether forked children may use it.
    assert ("not fork-safe" in fields["threading layer"]) == (layer == "omp")
    assert fields["threads"].startswith(f"{numba.get_num_threads()} ")
    assert fields["blas"] == _threading.blas_mode()
    cache_folders = fields["numba cache"].split(", ")
    assert cache_folders and all(os.path.isabs(folder) for folder in cache_folders)
    assert fields["cpu"] not in ("", "unknown")
    assert re.fullmatch(r"(AVX-512|AVX2|AVX|SSE2|NEON), (512|256|128) bits|unknown", fields["simd"])
    assert fields["kernels"] == ", ".join(registry.KERNELS)
    assert fields["default kernel"] == f"{registry.BUILTIN_DEFAULT} (built-in default)"


def test_info_reports_where_blas_runs(capsys, monkeypatch):
    monkeypatch.setenv("NUMBACONV_BLAS_INSIDE_KERNELS", "0")
    assert "blas:            NumPy's, between kernels" in run(capsys, "info")[1]


def test_info_reports_the_environment_default(capsys, monkeypatch):
    monkeypatch.setenv("NUMBACONV_KERNEL", "numpy")
    assert "default kernel:  numpy (NUMBACONV_KERNEL)" in run(capsys, "info")[1]


def test_simd_width_from_cpu_flags(monkeypatch):
    monkeypatch.setattr(info, "_cpuinfo", lambda: {"flags": "fpu sse2 avx avx2 fma"})
    assert info.simd_width() == ("AVX2", 256)
    monkeypatch.setattr(info, "_cpuinfo", lambda: {"flags": "sse2 avx2 avx512f avx512bw"})
    assert info.simd_width() == ("AVX-512", 512)
    monkeypatch.setattr(info, "_cpuinfo", lambda: {"Features": "fp asimd evtstrm"})
    assert info.simd_width() == ("NEON", 128)


def test_python_dash_m_info_in_a_fresh_process():
    done = subprocess.run(
        [sys.executable, "-m", "numbaconv", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"numbaconv:       {numbaconv.__version__} ")
    assert "threading layer: None" not in done.stdout
    # The optional packages are imported lazily: the CLI itself does not need them.
    check = "import sys, numbaconv.cli, numbaconv.demo; print(sorted({'sklearn', 'tqdm', "
    check += "'matplotlib'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"


# ------------------------------------------------------------------------------------------------
# demo


def test_demo_learns_and_is_reproducible(capsys, tmp_path):
    argv = ["demo", "--epochs", "1", "--limit", "800", "--seed", "3", "--kernel", "im2col"]
    status, out, _ = run(capsys, *argv, "--plot", str(tmp_path / "curves.png"))
    assert status == 0
    assert out.startswith(
        "numbaconv demo: 800 training and 360 test digits (8x8), kernel im2col, 1 epochs, "
        "batch size 16, seed 3\n"
    )
    (first,) = epochs(out)
    loss, train_accuracy, test_accuracy = first
    # Chance level: a loss of ln(10) = 2.3 and an accuracy of 0.1. One epoch on 800 images
    # reaches about 0.8 for seeds 3-6.
    assert loss < 1.8
    assert train_accuracy > 0.6
    assert test_accuracy > 0.6
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

    status, again, _ = run(capsys, *argv)
    assert status == 0
    assert epochs(again) == [first]
    status, other_seed, _ = run(capsys, "demo", "--epochs", "1", "--limit", "800", "--seed", "4")
    assert epochs(other_seed) != [first]


def test_demo_every_kernel_gives_the_same_training(capsys):
    # Every kernel computes the same convolution, so up to float32 rounding the runs agree.
    results = {}
    for kernel in registry.KERNELS:
        argv = ["demo", "--epochs", "2", "--limit", "160", "--batch-size", "32"]
        status, out, _ = run(capsys, *argv, "--kernel", kernel)
        assert status == 0
        results[kernel] = epochs(out)
    reference = results["numpy"]
    for kernel, history in results.items():
        assert len(history) == 2
        for got, expected in zip(history, reference, strict=True):
            assert got == pytest.approx(expected, abs=0.01), kernel
