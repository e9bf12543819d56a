"""numbaconv.dask on Dask's threaded scheduler: results against the in-memory functions.

Every Dask result is compared with ``nc.conv2d``/``nc.conv2d_backward`` on the same NumPy data
(to rounding, on the scale of ``|x| * |w|``), and where the README promises identical bits,
bit for bit. The distributed scheduler is tested in ``test_dask_distributed.py``.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

from helpers import assert_close, assert_same_bits  # noqa: E402

import numbaconv as nc  # noqa: E402
import numbaconv.dask as ncd  # noqa: E402

# Chunk layouts of a (5, 6, 19, 17) input: ragged last chunks everywhere, chunks smaller than the
# filter (halos that span several chunks), a split channel axis (rechunked to one chunk).
LAYOUTS = {
    "batch": (2, 6, 19, 17),
    "rows": (5, 6, 7, 17),
    "tiles": (3, 6, 6, 5),
    "tiny": (2, 6, 3, 4),
    "split-channels": (2, 4, 10, 9),
}

# Keyword options of conv2d, on the (5, 6, 19, 17) input: (filter height, width, options).
CONFIGS = {
    "3x3-pad1": (3, 3, dict(padding=1)),
    "stride2": (5, 3, dict(stride=2, padding=(2, 1))),
    "stride3-1x1": (1, 1, dict(stride=3)),
    "dilation2-same": (3, 3, dict(dilation=2, padding="same")),
    "same-even": (4, 2, dict(padding="same")),
    "valid-dilated-stride": (3, 2, dict(padding="valid", dilation=(2, 3), stride=(2, 1))),
    "groups3": (3, 3, dict(groups=3, padding=1)),
    "depthwise": (3, 3, dict(groups=6, padding=1, stride=2)),
    "reflect": (3, 3, dict(padding=2, padding_mode="reflect")),
    "circular-stride2": (3, 3, dict(padding=(2, 1), stride=2, padding_mode="circular")),
    "replicate-dilated": (3, 3, dict(padding=3, dilation=2, padding_mode="replicate")),
}

SHAPE = (5, 6, 19, 17)
OUT_CHANNELS = 6


def make(shape, r, s, options, dtype, seed=0):
    """Seeded ``(x, w, b)`` for a convolution of ``shape`` with ``r x s`` filters."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((OUT_CHANNELS, c // options.get("groups", 1), r, s)).astype(dtype)
    b = rng.standard_normal(OUT_CHANNELS).astype(dtype)
    return x, w, b


def check_forward(x, w, b, chunks, options, dtype, kernel=None):
    """Dask forward against the in-memory one; returns both results."""
    expected = nc.conv2d(x, w, b, kernel=kernel, **options)
    scale = nc.conv2d(
        np.abs(x).astype(np.float64),
        np.abs(w).astype(np.float64),
        None if b is None else np.abs(b).astype(np.float64),
        **options,
    )
    lazy = ncd.conv2d(da.from_array(x, chunks=chunks), w, b, kernel=kernel, **options)
    assert lazy.shape == expected.shape and lazy.dtype == expected.dtype
    got = lazy.compute(scheduler="threads")
    assert_close(got, expected.astype(np.float64), scale, dtype, f"forward {options} {chunks}")
    return got, expected, lazy


def check_backward(x, w, chunks, options, dtype, grad_chunks=None, kernel=None, seed=1):
    """Dask backward against the in-memory one; returns both results."""
    y = nc.conv2d(x, w, **options)
    grad_y = np.random.default_rng(seed).standard_normal(y.shape).astype(dtype)
    expected = nc.conv2d_backward(grad_y, x, w, kernel=kernel, **options)
    scales = nc.conv2d_backward(
        np.abs(grad_y).astype(np.float64),
        np.abs(x).astype(np.float64),
        np.abs(w).astype(np.float64),
        **options,
    )
    x_lazy = da.from_array(x, chunks=chunks)
    if grad_chunks is None:
        grad_chunks = ncd.conv2d(x_lazy, w, **options).chunks
    grads = ncd.conv2d_backward(
        da.from_array(grad_y, chunks=grad_chunks), x_lazy, w, kernel=kernel, **options
    )
    got = dask.compute(*grads, scheduler="threads")
    for name, g, e, s in zip(("grad_x", "grad_w", "grad_b"), got, expected, scales, strict=True):
        assert_close(g, e.astype(np.float64), s, dtype, f"{name} {options} {chunks}")
    return got, expected


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_forward_matches_in_memory(config, layout, dtype):
    r, s, options = CONFIGS[config]
    x, w, b = make(SHAPE, r, s, options, dtype)
    check_forward(x, w, b, LAYOUTS[layout], options, dtype)


@pytest.mark.parametrize("layout", ["batch", "tiny", "split-channels"])
@pytest.mark.parametrize("config", CONFIGS)
def test_backward_matches_in_memory(config, layout, dtype):
    r, s, options = CONFIGS[config]
    x, w, _ = make(SHAPE, r, s, options, dtype)
    check_backward(x, w, LAYOUTS[layout], options, dtype)


@pytest.mark.parametrize("grad_chunks", [(1, 6, 4, 20), (5, 3, 6, 5), (2, 6, 3, 2)])
def test_backward_with_grad_y_chunked_its_own_way(grad_chunks, dtype):
    """grad_y's blocks need not be the ones conv2d made: batch chunks are made x's, height and
    width blocks are whatever grad_y has."""
    x, w, _ = make(SHAPE, 3, 3, {}, dtype)
    check_backward(x, w, (2, 6, 7, 9), dict(padding=1), dtype, grad_chunks=grad_chunks)


def test_windows_entirely_in_the_padding(dtype):
    """Blocks whose every window lies in the padding convolve zeros (NaN weights stay NaN)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 3, 4)).astype(dtype)
    w = rng.standard_normal((3, 2, 2, 2)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    options = dict(padding=5, stride=(1, 2))
    got, expected, _ = check_forward(x, w, b, (1, 2, 1, 1), options, dtype)
    check_backward(x, w, (1, 2, 1, 1), options, dtype)
    w[0, 0, 0, 0] = np.nan
    got = ncd.conv2d(da.from_array(x, chunks=(1, 2, 1, 1)), w, b, **options).compute()
    assert_same_bits(np.isnan(got), np.isnan(nc.conv2d(x, w, b, **options)), "NaN pattern")


@pytest.mark.parametrize("kernel", nc.KERNELS)
def test_every_kernel(kernel, dtype):
    r, s, options = CONFIGS["dilation2-same"]
    x, w, b = make(SHAPE, r, s, options, dtype)
    check_forward(x, w, b, LAYOUTS["tiles"], options, dtype, kernel=kernel)
    check_backward(x, w, LAYOUTS["tiles"], options, dtype, kernel=kernel)


def test_winograd_layer_by_auto(dtype):
    """A layer auto runs with Winograd (3x3, 16+ channels): 4x4 tiles cut by the blocks."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 16, 26, 22)).astype(dtype)
    w = rng.standard_normal((16, 16, 3, 3)).astype(dtype)
    b = rng.standard_normal(16).astype(dtype)
    check_forward(x, w, b, (2, 16, 9, 10), dict(padding=1), dtype)
    check_backward(x, w, (2, 16, 9, 10), dict(padding=1), dtype)


# --------------------------------------------------------------------------------------------
# Identical bits (what the README promises)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", ["3x3-pad1", "stride2", "dilation2-same", "depthwise"])
def test_direct_forward_same_bits_on_every_layout(config, layout, dtype):
    """``direct`` sums each output pixel in the same order wherever it sits in a block."""
    r, s, options = CONFIGS[config]
    x, w, b = make(SHAPE, r, s, options, dtype)
    got, expected, _ = check_forward(x, w, b, LAYOUTS[layout], options, dtype, kernel="direct")
    assert_same_bits(got, expected, f"direct forward {config} {layout}")


@pytest.mark.parametrize("batch_chunks", [1, 2, (4, 1)])
def test_direct_batch_chunks_same_bits(batch_chunks, dtype):
    """Chunks along the batch only: ``direct`` computes each image the same way whatever the
    other images of the call, forward and grad_x. (``im2col``'s forward mostly keeps its bits
    too, but not always: its GEMMs change shape with the block, and BLAS rounded float64 on 7x7
    maps differently.) grad_w and grad_b are sums over the blocks, which round differently
    (checked to rounding in ``check_backward``)."""
    x, w, b = make(SHAPE, 3, 3, {}, dtype)
    chunks = (batch_chunks, -1, -1, -1)
    options = dict(padding=1, stride=(1, 2))
    got, expected, _ = check_forward(x, w, b, chunks, options, dtype, kernel="direct")
    assert_same_bits(got, expected, f"direct forward, batch chunks {batch_chunks}")
    grads, expected_grads = check_backward(x, w, chunks, options, dtype, kernel="direct")
    assert_same_bits(grads[0], expected_grads[0], "direct grad_x, batch chunks")


@pytest.mark.parametrize("kernel", nc.KERNELS)
def test_one_block_same_bits(kernel, dtype):
    """A single block is exactly the in-memory call, all three gradients included."""
    x, w, b = make(SHAPE, 3, 3, {}, dtype)
    got, expected, _ = check_forward(x, w, b, -1, dict(padding=1), dtype, kernel=kernel)
    assert_same_bits(got, expected, "forward, one block")
    grads, expected_grads = check_backward(x, w, -1, dict(padding=1), dtype, kernel=kernel)
    for name, g, e in zip(("grad_x", "grad_w", "grad_b"), grads, expected_grads, strict=True):
        assert_same_bits(g, e, f"{name}, one block")


def test_repeated_compute_same_bits():
    """The tree reduction has a fixed shape and order: the same bits on every run."""
    x, w, _ = make(SHAPE, 3, 3, {}, np.float32)
    grad_y = np.ones((5, 6, 19, 17), dtype=np.float32)
    lazy = ncd.conv2d_backward(
        da.from_array(grad_y, chunks=(1, 6, 5, 5)),
        da.from_array(x, chunks=(1, 6, 5, 5)),
        w,
        padding=1,
    )
    first = dask.compute(*lazy, scheduler="threads")
    for _ in range(3):
        again = dask.compute(*lazy, scheduler="threads", num_workers=2)
        for a, b in zip(first, again, strict=True):
            assert_same_bits(a, b, "repeated compute")


# --------------------------------------------------------------------------------------------
# Chunks, graph, laziness
# --------------------------------------------------------------------------------------------


def test_output_chunks():
    """'same' keeps the input's chunks; strided outputs line up with the stride; the channel
    axis is one chunk; the batch chunks are the input's."""
    x = da.zeros((5, 6, 19, 17), chunks=(2, 4, 7, 6), dtype=np.float32)
    w = np.zeros((8, 6, 3, 3), dtype=np.float32)
    y = ncd.conv2d(x, w, padding="same")
    assert y.chunks == ((2, 2, 1), (8,), (7, 7, 5), (6, 6, 5))
    # Output row oh is in the block of input row 2 * oh - 1 + 1 (its window's centre).
    y = ncd.conv2d(x, w, stride=2, padding=1)
    assert y.chunks == ((2, 2, 1), (8,), (4, 3, 3), (3, 3, 3))
    # 'valid': the first and last blocks lose half a halo each.
    y = ncd.conv2d(x, w)
    assert y.chunks == ((2, 2, 1), (8,), (6, 7, 4), (5, 6, 4))
    # Input chunks smaller than the stride can hold no window centre: no empty output blocks.
    y = ncd.conv2d(da.zeros((1, 6, 9, 9), chunks=(1, 6, 1, 1)), w.astype(np.float64), stride=3)
    assert y.chunks[2:] == ((1, 1, 1), (1, 1, 1))


def test_weights_once_in_the_graph():
    """The weights (2 MiB here) enter the graph once, however many blocks read them."""
    w = np.random.default_rng(0).standard_normal((64, 64, 8, 8))  # 2 MiB of float64
    x = da.zeros((8, 64, 32, 32), chunks=(2, 64, 16, 16), dtype=np.float64)
    y = ncd.conv2d(x, w, padding=1)
    grads = ncd.conv2d_backward(da.ones_like(y), x, w, padding=1)
    for name, collections in (("forward", [y]), ("backward", list(grads))):
        graph = {}
        for collection in dask.optimize(*collections):
            graph.update(collection.__dask_graph__())
        size = len(pickle.dumps(graph, protocol=5))
        assert w.nbytes < size < 1.5 * w.nbytes, f"{name}: graph of {size} bytes"


def test_importing_numbaconv_does_not_import_dask():
    code = "import sys, numbaconv; assert 'dask' not in sys.modules, 'dask imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_dask_names_the_extra():
    code = (
        "import sys; sys.modules['dask'] = None\n"
        "try:\n    import numbaconv.dask\n"
        "except ImportError as error:\n    print(error)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "numbaconv.dask needs Dask: pip install 'numbaconv[dask]'" in done.stdout


def test_lazy_until_computed():
    """Building the graphs runs no numbaconv call (an input that fails would fail here)."""

    def fail(block):
        raise RuntimeError("computed too early")

    x = da.zeros((2, 3, 8, 8), chunks=(1, 3, 4, 4), dtype=np.float32)
    x = x.map_blocks(fail, dtype=np.float32, meta=np.empty((0,) * 4, np.float32))
    w = np.ones((2, 3, 3, 3), dtype=np.float32)
    y = ncd.conv2d(x, w, padding=1)
    ncd.conv2d_backward(y, x, w, padding=1)
    with pytest.raises(RuntimeError, match="computed too early"):
        y.compute(scheduler="sync")


def test_empty_batch(dtype):
    x = np.zeros((0, 3, 8, 8), dtype=dtype)
    w = np.ones((2, 3, 3, 3), dtype=dtype)
    y = ncd.conv2d(da.from_array(x), w, padding=1).compute()
    assert y.shape == (0, 2, 8, 8) and y.dtype == dtype
    grads = dask.compute(*ncd.conv2d_backward(da.from_array(np.zeros_like(y)), x, w, padding=1))
    assert [g.shape for g in grads] == [x.shape, w.shape, (2,)]
    assert not grads[1].any() and not grads[2].any()


def test_numpy_input_is_wrapped():
    x, w, b = make(SHAPE, 3, 3, {}, np.float64)
    got = ncd.conv2d(x, w, b, padding=1)
    assert isinstance(got, da.Array)
    np.testing.assert_array_equal(got.compute(), nc.conv2d(x, w, b, padding=1))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors():
    x = da.zeros((2, 4, 8, 8), chunks=(1, 4, 4, 4), dtype=np.float32)
    w = np.zeros((2, 4, 3, 3), dtype=np.float32)
    with pytest.raises(TypeError, match=r"w must be a numpy.ndarray \(call .compute\(\) on it"):
        ncd.conv2d(x, da.from_array(w))
    with pytest.raises(TypeError, match="b must be a numpy.ndarray"):
        ncd.conv2d(x, w, [0.0, 0.0])
    with pytest.raises(TypeError, match="x has dtype int32; numbaconv supports float32"):
        ncd.conv2d(x.astype(np.int32), w)
    with pytest.raises(TypeError, match="x and w must have the same dtype"):
        ncd.conv2d(x, w.astype(np.float64))
    with pytest.raises(ValueError, match="x must be 4-D"):
        ncd.conv2d(x[0], w)
    with pytest.raises(ValueError, match="in_channels .4. must be divisible by groups .3."):
        ncd.conv2d(x, w, groups=3)
    with pytest.raises(ValueError, match="padding='same' is only supported with stride 1"):
        ncd.conv2d(x, w, padding="same", stride=2)
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        ncd.conv2d(x, w, kernel="fast")
    with pytest.raises(ValueError, match="padding_mode='reflect' needs each padding smaller"):
        ncd.conv2d(x, w, padding=8, padding_mode="reflect")
    unknown = x[x[:, 0, 0, 0] > 0]
    with pytest.raises(ValueError, match=r"x has unknown chunk sizes; call x.compute_chunk_sizes"):
        ncd.conv2d(unknown, w)
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(2, 2, 8, 8\)"):
        ncd.conv2d_backward(da.zeros((2, 2, 6, 6), dtype=np.float32), x, w, padding=1)
    with pytest.raises(TypeError, match="grad_y must have the dtype of x"):
        ncd.conv2d_backward(da.zeros((2, 2, 8, 8)), x, w, padding=1)
    with pytest.raises(TypeError, match="w must be a numpy.ndarray"):
        ncd.conv2d_backward(da.zeros((2, 2, 6, 6), dtype=np.float32), x, list(w))
