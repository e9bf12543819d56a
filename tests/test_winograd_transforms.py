"""Winograd's filter transforms (``numbaconv.kernels.winograd``): ``U = G g G^T`` and its
adjoint ``g = G^T M G`` for grad-w, for F(2x2, 3x3)'s G (4 x 3) and F(4x4, 3x3)'s (6 x 3),
against the same products written as ``einsum`` in float64."""

from __future__ import annotations

import textwrap

import numba
import numpy as np
import pytest
from helpers import OTHER_CPUS, run_for_cpu

from numbaconv.kernels import winograd


@pytest.fixture
def restore_threads():
    saved = numba.get_num_threads()
    yield
    numba.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("g", [winograd.G2, winograd.G4], ids=["G2", "G4"])
@pytest.mark.parametrize("filters, channels", [(1, 1), (5, 3), (17, 40)])
def test_filter_transforms_match_einsum(dtype, g, filters, channels):
    m = g.shape[0]
    rng = np.random.default_rng(filters * 100 + channels)
    w = rng.standard_normal((filters, channels, 3, 3)).astype(dtype)
    expected = np.einsum("ir,kcrs,js->ijkc", g, w.astype(np.float64), g)
    u = winograd._filter_transform(w, g)
    assert u.dtype == dtype and u.shape == (m * m, filters, channels)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(u, expected.reshape(m * m, filters, channels), rtol=tol, atol=tol)

    sums = rng.standard_normal((m * m, filters, channels)).astype(dtype)
    expected = np.einsum(
        "ir,ijkc,js->kcrs", g, sums.astype(np.float64).reshape(m, m, -1, channels), g
    )
    grad_w = np.full((filters, channels, 3, 3), np.nan, dtype=dtype)
    winograd.filter_gradient_kernel(sums, g, grad_w)
    np.testing.assert_allclose(grad_w, expected, rtol=tol, atol=tol)


def test_filter_transforms_are_the_same_bits_on_any_thread_count(restore_threads):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((9, 6, 3, 3)).astype(np.float32)
    sums = rng.standard_normal((36, 9, 6)).astype(np.float32)
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        grad_w = np.empty((9, 6, 3, 3), dtype=np.float32)
        winograd.filter_gradient_kernel(sums, winograd.G4, grad_w)
        results.append((winograd._filter_transform(w, winograd.G4), grad_w))
    for one, two in zip(*results, strict=True):
        assert np.array_equal(one, two)


def test_filter_transform_keeps_nan_and_inf_where_they_land():
    w = np.zeros((2, 2, 3, 3), dtype=np.float32)
    w[1, 0, 1, 1] = np.nan
    w[0, 1, 0, 0] = np.inf
    u = winograd._filter_transform(w, winograd.G4)
    assert np.isnan(u[:, 1, 0]).any() and np.isfinite(u[:, 1, 1]).all()
    assert np.isinf(u[:, 0, 1]).any() and np.isfinite(u[:, 0, 0]).all()


#: F(4x4, 3x3)'s input transform B^T (6 x 6) and grad_y transform A (6 x 4), as published
#: (Lavin and Gray, 2016), to check the add/subtract forms in the kernel against.
BT6 = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=np.float64,
)
A6 = np.array(
    [[1, 0, 0, 0], [1, 1, 1, 1], [1, -1, 1, -1], [1, 2, 4, 8], [1, -2, 4, -8], [0, 0, 0, 1]],
    dtype=np.float64,
)


@pytest.mark.parametrize("ops, matrix", [(winograd._bt6_ops, BT6), (winograd._a6_ops, A6)])
def test_add_subtract_forms_are_the_transform_matrices(ops, matrix):
    taps = matrix.shape[1]
    d = np.random.default_rng(taps).integers(-1000, 1000, size=(taps, 50)).astype(np.float64)
    np.testing.assert_array_equal(np.array(ops(*d)), matrix @ d)  # exact on small integers


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("taps", [6, 4])
@pytest.mark.parametrize("tiles_w", [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 20, 31, 33, 64])
def test_row_transform_by_vectors_is_the_scalar_arithmetic(dtype, taps, tiles_w):
    """``_transform_row`` (whole vectors of tiles by the ``bt6_tiles`` / ``a6_tiles`` intrinsics,
    a ragged end by an overlapping vector, narrow rows by a partial vector or tile by tile, as
    the width asks) gives the bits of the scalar transform applied tile by tile, NaN and Inf
    included, and writes nothing outside its tiles."""
    ops = winograd._bt6_ops if taps == 6 else winograd._a6_ops
    rng = np.random.default_rng(tiles_w * 10 + taps)
    width = 4 * tiles_w + winograd.ROW_SLACK
    rows = rng.standard_normal((3, width)).astype(dtype)
    rows[1, 4 * tiles_w + 2 :] = np.nan  # the slack: loaded, never stored
    rows[1, rng.integers(0, 4 * tiles_w, size=3)] = [np.inf, -np.inf, np.nan]
    first, plane = 5, 2 * tiles_w + 16
    v = np.full((8, plane), -7.0, dtype=dtype)
    lanes = winograd.VECTOR_FLOATS * 4 // np.dtype(dtype).itemsize
    winograd._transform_row(rows, 1, v, 1, first, tiles_w, lanes, taps)

    # NumPy's float32 and float64 + and - round as the kernel's do: the same bits are expected.
    tile_taps = [rows[1, k : k + 4 * tiles_w : 4] for k in range(taps)]
    expected = np.full_like(v, -7.0)
    with np.errstate(invalid="ignore"):  # Inf - Inf
        expected[1:7, first : first + tiles_w] = np.array(ops(*tile_taps))
    np.testing.assert_array_equal(v, expected)


_OTHER_CPU = textwrap.dedent(
    """
    import json
    import numpy as np
    import numbaconv
    from numbaconv.kernels import winograd

    mismatches = []
    for dtype in (np.float32, np.float64):
        lanes = winograd.VECTOR_FLOATS * 4 // np.dtype(dtype).itemsize
        for taps, ops in ((6, winograd._bt6_ops), (4, winograd._a6_ops)):
            for tiles_w in (1, 2, 3, 5, 8, 9, 17, 33):
                rng = np.random.default_rng(tiles_w)
                rows = rng.standard_normal((2, 4 * tiles_w + winograd.ROW_SLACK)).astype(dtype)
                v = np.zeros((6, tiles_w), dtype)
                winograd._transform_row(rows, 0, v, 0, 0, tiles_w, lanes, taps)
                expected = np.array(ops(*[rows[0, k : k + 4 * tiles_w : 4] for k in range(taps)]))
                if not np.array_equal(v, expected):
                    mismatches.append([np.dtype(dtype).name, taps, tiles_w])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 23, 37)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    y = numbaconv.conv2d(x, w, padding=1, kernel="winograd")
    ref = numbaconv.conv2d(x, w, padding=1, kernel="im2col")
    print(json.dumps({"bits": winograd.VECTOR_BITS, "mismatches": mismatches,
                      "conv_error": float(np.abs(y - ref).max())}))
    """
)


@pytest.mark.parametrize(("cpu", "features", "bits"), OTHER_CPUS)
def test_vector_transforms_on_other_vector_widths(tmp_path, cpu, features, bits):
    """The row transforms' intrinsics compiled for AVX2 and for a 128-bit target (fresh cache),
    run here: the scalar bits at every width, and a Winograd layer that agrees with im2col."""
    report = run_for_cpu(_OTHER_CPU, cpu, features, tmp_path)
    assert report["bits"] == bits
    assert report["mismatches"] == []
    assert report["conv_error"] < 1e-3
