"""The timing harness, numbaconv.bench: its data, its calls (numbaconv's and PyTorch's agree on
every op), its flop counts, its reduced preset and its standalone loading. Nothing here asserts a
timing (timing belongs in the asv suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import numbaconv
from numbaconv import bench, shapes
from numbaconv.shapes import Conv1dLayerShape, LayerShape, TransposedLayerShape

#: One small layer per op, with every option away from its default.
SMALL = {
    "conv2d": LayerShape(2, 4, 9, 8, 6, 3, 2, 2, (1, 0), 2, 2),
    "conv_transpose2d": TransposedLayerShape(2, 4, 5, 6, 6, 3, 3, 2, 1, 1, 1, 2),
    "conv1d": Conv1dLayerShape(2, 4, 20, 6, 5, 2, 2, 2, 2),
}
ZOO_OPS = {
    "unet_up2x2": "conv_transpose2d",
    "dcgan_up4x4": "conv_transpose2d",
    "audio_conv1d": "conv1d",
}


def test_the_new_zoo_layers_and_the_old_names_and_values():
    assert {name: shapes.ZOO_SHAPES[name].op for name in ZOO_OPS} == ZOO_OPS
    assert tuple(shapes.ZOO_SHAPES["unet_up2x2"]) == (16, 128, 28, 28, 64, 2, 2, 2, 0, 0, 1, 1)
    assert tuple(shapes.ZOO_SHAPES["dcgan_up4x4"]) == (16, 256, 8, 8, 128, 4, 4, 2, 1, 0, 1, 1)
    assert tuple(shapes.ZOO_SHAPES["audio_conv1d"]) == (16, 64, 16000, 64, 9, 1, 4, 1, 1)
    assert [shapes.FAMILY[name] for name in ZOO_OPS] == ["transposed", "transposed", "1-D"]
    # The asv history is keyed on these: the suite's eight as DESIGN.md lists them.
    assert shapes.LAYER_SHAPES["stem7x7"] == (8, 3, 224, 224, 64, 7, 7, 2, 3, 1, 1)
    assert all(shape.op == "conv2d" for shape in shapes.LAYER_SHAPES.values())
    assert len(shapes.LAYER_SHAPES["digits"]) == 11  # op is a class attribute, not a field
    assert set(shapes.FAMILY) == set(shapes.ALL_SHAPES)


@pytest.mark.parametrize("op", SMALL)
def test_data_is_seeded_and_shaped_by_the_op(op):
    shape = SMALL[op]
    data = bench.make_data(shape, "float32")
    again = bench.make_data(shape, np.float32)
    for got, want in zip(data[1:5], again[1:5], strict=True):
        np.testing.assert_array_equal(got, want)
    assert data.op == op
    assert data.x.shape == shape.input_shape and data.w.shape == shape.weight_shape
    assert data.b.shape == (shape.out_channels,)
    assert all(a.dtype == np.float32 for a in data[1:5])
    expected_output = getattr(numbaconv, op)(data.x, data.w, data.b, **data.options).shape
    assert data.grad_y.shape == expected_output
    assert data.options == shape.options
    assert not np.array_equal(bench.make_data(shape, "float32", seed=1).x, data.x)
    head = data.head(1)
    assert head.x.shape[0] == head.grad_y.shape[0] == 1


def test_conv2d_data_is_the_asv_suites_old_data():
    # The asv history's conv2d series were measured on these arrays (asv_benchmarks' old
    # common.make_data): keep them, so that a new harness doesn't look like a speed change.
    shape = shapes.LAYER_SHAPES["digits"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape.input_shape, dtype=np.float64)
    w = rng.standard_normal(shape.weight_shape) / 3.0
    b = rng.standard_normal(10, dtype=np.float64)
    grad_y = rng.standard_normal((8, 10, 8, 8), dtype=np.float64)
    data = bench.make_data(shape, "float64")
    for got, want in zip(data[1:5], (x, w, b, grad_y), strict=True):
        np.testing.assert_array_equal(got, want)


def test_flops():
    conv = bench.make_data(LayerShape(2, 3, 6, 6, 4, 3, 3, 1, 1), "float32")
    assert conv.flops == 2 * 2 * 4 * 6 * 6 * 3 * 3 * 3  # 2 N K OH OW C R S
    grouped = bench.make_data(SMALL["conv2d"], "float32")  # 9x8 -> 3x4 (stride 2, dilation 2)
    assert grouped.flops == 2 * 2 * 6 * 3 * 4 * 2 * 3 * 2
    # Transposed: each input element meets C_out/groups * R * S weights.
    up = bench.make_data(TransposedLayerShape(2, 4, 5, 5, 6, 2, 2, 2), "float32")
    assert up.flops == 2 * 2 * 4 * 5 * 5 * 6 * 2 * 2
    line = bench.make_data(Conv1dLayerShape(2, 4, 20, 6, 5, 1, 2), "float32")
    assert line.flops == 2 * 2 * 6 * 20 * 4 * 5


@pytest.mark.parametrize("op", SMALL)
def test_numbaconv_calls(op):
    data = bench.make_data(SMALL[op], "float64")
    forward, backward = bench.numbaconv_calls("numpy", data)
    forward_op = getattr(numbaconv, op)
    backward_op = getattr(numbaconv, f"{op}_backward")
    np.testing.assert_array_equal(
        forward(), forward_op(data.x, data.w, data.b, kernel="numpy", **data.options)
    )
    expected = backward_op(data.grad_y, data.x, data.w, kernel="numpy", **data.options)
    for got, want in zip(backward(), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_what_numbaconv_cannot_run_is_unavailable(monkeypatch):
    data = bench.make_data(SMALL["conv1d"], "float32")
    with pytest.raises(bench.Unavailable, match="kernel 'nope' is not in numbaconv.KERNELS"):
        bench.calls("nope", data)
    monkeypatch.delattr(numbaconv, "conv1d_backward")
    with pytest.raises(NotImplementedError, match=r"numbaconv.conv1d_backward does not exist"):
        bench.numbaconv_calls("numpy", data)


@pytest.mark.parametrize("op", SMALL)
def test_torch_calls_compute_what_numbaconv_computes(op):
    torch = pytest.importorskip("torch")
    shape = SMALL[op]
    data = bench.make_data(shape, "float64")
    # The PyTorch side builds the same arrays without numbaconv's output-size formula.
    torch_data = bench.make_data(shape, "float64", output_shape=bench.torch_output_shape)
    for got, want in zip(torch_data[1:5], data[1:5], strict=True):
        np.testing.assert_array_equal(got, want)
    forward, backward = bench.calls("torch", torch_data, threads=torch.get_num_threads())
    ours_forward, ours_backward = bench.calls("numpy", data)
    np.testing.assert_allclose(forward().numpy(), ours_forward(), rtol=1e-10, atol=1e-10)
    for got, want in zip(backward(), ours_backward(), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


def test_reduced_preset():
    conv = shapes.LAYER_SHAPES["stem7x7"]
    assert bench.reduced(conv, 2, 16) == conv._replace(batch=2, height=16, width=16)
    up = shapes.ZOO_SHAPES["dcgan_up4x4"]
    assert bench.reduced(up, 2, 16) == up._replace(batch=2)  # 8x8 images stay
    line = shapes.ZOO_SHAPES["audio_conv1d"]
    assert bench.reduced(line, 2, 16) == line._replace(batch=2, length=256)
    assert type(bench.reduced(line, 2, 16)) is Conv1dLayerShape


def test_timing_helpers_call_as_asked():
    calls = []
    assert len(bench.time_calls(lambda: calls.append(1), 4)) == 4 and len(calls) == 4
    calls.clear()
    bench.warm_up(lambda: calls.append(1), 0.0)
    assert len(calls) == 1  # at least one untimed call: compilation is never timed
    calls.clear()
    assert bench.time_turn(lambda: calls.append(1), 3, warmup_seconds=0.0) >= 0
    assert len(calls) == 4


def test_bench_layer_on_every_op():
    for op, shape in SMALL.items():
        results = bench.bench_layer(op, shape, ["im2col", "numpy"], np.float32, 1)
        assert [(r.shape, r.kernel, r.op) for r in results] == [
            (op, "im2col", op),
            (op, "numpy", op),
        ]
        flops = bench.make_data(shape, "float32").flops
        for r in results:
            assert r.forward_gflops == pytest.approx(flops / r.forward_ms / 1e6)
            assert r.backward_gflops == pytest.approx(2 * flops / r.backward_ms / 1e6)
        assert results[1].forward_speedup == results[1].backward_speedup == 1.0
        assert results[0].dims == list(shape)


def test_standalone_loading_does_not_import_numbaconv():
    # How compare_torch.py's PyTorch worker and the asv suite load the harness.
    path = Path(bench.__file__)
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_numbaconv_bench", {str(path)!r})
h = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = h  # dataclasses look their module up
spec.loader.exec_module(h)
shape = h.reduced(h.shapes.ALL_SHAPES["audio_conv1d"], 1, 4)
data = h.make_data(shape, "float32", output_shape=lambda op, x, w, options: (1, 64, 16))
print(sorted(m for m in sys.modules if m.startswith("numbaconv")), data.grad_y.shape)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[] (1, 64, 16)\n"
