"""Public im2col / col2im: teaching layout, element-by-element reference, adjointness."""

from __future__ import annotations

import numpy as np
import pytest
from naive import col2im as textbook_col2im
from naive import col2im_naive, im2col_naive
from naive import im2col as textbook_im2col

import numbaconv as nc

# (x_shape, flt_h, flt_w, stride, pad)
CASES = [
    ((2, 3, 5, 4), 3, 3, 1, 0),
    ((2, 3, 5, 4), 3, 3, 1, 1),
    ((1, 2, 7, 6), 3, 2, 2, 1),
    ((2, 2, 6, 6), 2, 2, 2, 0),
    ((2, 1, 7, 7), 2, 2, 3, 0),
    ((1, 2, 4, 5), 1, 1, 1, 0),
    ((2, 2, 3, 3), 3, 3, 1, 2),
    ((3, 1, 4, 4), 4, 4, 1, 0),
    ((2, 2, 6, 5), 5, 3, 2, 2),
]


def _out(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


def _args(case):
    x_shape, fh, fw, stride, pad = case
    y_h = _out(x_shape[2], fh, stride, pad)
    y_w = _out(x_shape[3], fw, stride, pad)
    return x_shape, fh, fw, y_h, y_w, stride, pad


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_im2col_matches_naive_and_textbook(case, dtype):
    x_shape, fh, fw, y_h, y_w, stride, pad = _args(case)
    x = np.random.default_rng(0).standard_normal(x_shape).astype(dtype)
    cols = nc.im2col(x, fh, fw, y_h, y_w, stride, pad)
    expect = im2col_naive(x, fh, fw, y_h, y_w, stride, pad)
    assert cols.shape == (x_shape[1] * fh * fw, x_shape[0] * y_h * y_w)
    assert cols.dtype == dtype
    # A copy: exact.
    np.testing.assert_array_equal(cols, expect)
    np.testing.assert_array_equal(cols, textbook_im2col(x, fh, fw, y_h, y_w, stride, pad))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_col2im_matches_naive_and_textbook(case, dtype):
    x_shape, fh, fw, y_h, y_w, stride, pad = _args(case)
    rng = np.random.default_rng(1)
    cols = rng.standard_normal((x_shape[1] * fh * fw, x_shape[0] * y_h * y_w)).astype(dtype)
    img = nc.col2im(cols, x_shape, fh, fw, y_h, y_w, stride, pad)
    expect = col2im_naive(cols, x_shape, fh, fw, y_h, y_w, stride, pad)
    assert img.shape == x_shape
    assert img.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(img, expect, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        img, textbook_col2im(cols, x_shape, fh, fw, y_h, y_w, stride, pad), rtol=tol, atol=tol
    )


def test_col2im_sums_overlaps():
    """All-ones columns: each pixel receives the number of windows that contain it."""
    x_shape, fh, fw, stride, pad = (1, 1, 4, 4), 3, 3, 1, 0
    cols = np.ones((9, 4))
    img = nc.col2im(cols, x_shape, fh, fw, 2, 2, stride, pad)
    counts = np.array([[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]], dtype=float)
    np.testing.assert_array_equal(img[0, 0], counts)


def test_im2col_row_and_column_order():
    """Row (c, r, s), column (n, oh, ow): check a few entries by index arithmetic."""
    n_b, n_c, h, w = 2, 3, 4, 5
    x = np.arange(n_b * n_c * h * w, dtype=np.float64).reshape(n_b, n_c, h, w)
    cols = nc.im2col(x, 2, 3, 3, 3, 1, 0)
    for n, c, r, s, oh, ow in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 2, 2, 2), (1, 1, 0, 2, 1, 0)]:
        row = (c * 2 + r) * 3 + s
        col = (n * 3 + oh) * 3 + ow
        assert cols[row, col] == x[n, c, oh + r, ow + s]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adjoint_identity(case):
    x_shape, fh, fw, y_h, y_w, stride, pad = _args(case)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(x_shape)
    c = rng.standard_normal((x_shape[1] * fh * fw, x_shape[0] * y_h * y_w))
    lhs = float(np.sum(nc.im2col(x, fh, fw, y_h, y_w, stride, pad) * c))
    rhs = float(np.sum(x * nc.col2im(c, x_shape, fh, fw, y_h, y_w, stride, pad)))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


def test_im2col_inputs_not_modified_and_layouts():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2, 3, 10, 12))
    x = base[:, :, ::2, ::2]  # non-contiguous view (2, 3, 5, 6)
    x_copy = x.copy()
    expect = im2col_naive(x_copy, 3, 3, 3, 4, 1, 0)
    np.testing.assert_array_equal(nc.im2col(x, 3, 3, 3, 4, 1, 0), expect)
    np.testing.assert_array_equal(x, x_copy)
    f = np.asfortranarray(x_copy)
    f.setflags(write=False)
    np.testing.assert_array_equal(nc.im2col(f, 3, 3, 3, 4, 1, 0), expect)
    cols = rng.standard_normal((27, 2 * 3 * 4))
    cols_f = np.asfortranarray(cols)
    cols_f.setflags(write=False)
    expect_img = col2im_naive(cols, (2, 3, 5, 6), 3, 3, 3, 4, 1, 0)
    np.testing.assert_allclose(
        nc.col2im(cols_f, (2, 3, 5, 6), 3, 3, 3, 4, 1, 0), expect_img, rtol=1e-13, atol=1e-13
    )
    np.testing.assert_array_equal(cols_f, cols)


def test_im2col_batch_zero():
    cols = nc.im2col(np.zeros((0, 2, 4, 4)), 3, 3, 2, 2, 1, 0)
    assert cols.shape == (18, 0)
    img = nc.col2im(np.zeros((18, 0)), (0, 2, 4, 4), 3, 3, 2, 2, 1, 0)
    assert img.shape == (0, 2, 4, 4)


def test_im2col_errors():
    x = np.zeros((1, 2, 4, 4))
    with pytest.raises(ValueError, match="x must be 4-D"):
        nc.im2col(np.zeros((2, 4, 4)), 3, 3, 2, 2, 1, 0)
    with pytest.raises(TypeError, match="float32 and float64"):
        nc.im2col(x.astype(np.int64), 3, 3, 2, 2, 1, 0)
    with pytest.raises(ValueError, match=r"y_h, y_w = \(3, 2\) do not match"):
        nc.im2col(x, 3, 3, 3, 2, 1, 0)
    with pytest.raises(TypeError, match="float32 and float64"):
        nc.col2im(np.zeros((18, 4), dtype=np.float16), (1, 2, 4, 4), 3, 3, 2, 2, 1, 0)
    with pytest.raises(ValueError, match=r"cols must have shape \(18, 4\)"):
        nc.col2im(np.zeros((18, 5)), (1, 2, 4, 4), 3, 3, 2, 2, 1, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_deep_input_gradient_products_on_blas_match_the_reference(dtype, own_gemm_everywhere):
    """A layer whose grad-x products (288 taps x 128 filters, the filters transposed) go to BLAS
    by ``own_gemm_pays_transposed``, and one (32 channels of 3x3 taps x 64 filters) that stays
    on the micro-kernel (on AVX-512; elsewhere both run on BLAS): both against the reference."""
    from helpers import Cfg, check_against_reference, make_data, windows_reference

    from numbaconv.kernels import microkernel as mk

    deep = Cfg(4, 32, 10, 9, 128, 3, 3, padding=1, name="deep")
    shallow = Cfg(4, 32, 10, 9, 64, 3, 3, padding=1, name="shallow")
    pixels = 10 * 9
    assert not mk.own_gemm_pays_transposed.py_func(288, 128, pixels, 4)
    assert mk.own_gemm_pays.py_func(288, 128, pixels, 4)
    assert mk.own_gemm_pays_transposed.py_func(288, 64, pixels, 4)
    for cfg in (deep, shallow):
        # The einsum reference: the loops took 90 s per dtype here on a 2-core AMD EPYC.
        reference = windows_reference(cfg, *make_data(cfg, dtype))
        check_against_reference(cfg, "im2col", dtype, ref=reference)


@pytest.mark.parametrize(
    "x_shape, w_shape, options",
    [
        ((2, 3, 7, 7), (4, 3, 3, 3), dict(padding=1)),
        ((2, 2, 16, 16), (4, 2, 4, 4), dict(stride=2, padding=1)),
        ((1, 2, 9, 11), (4, 2, 3, 2), dict(stride=(2, 3), padding=(2, 0), dilation=(1, 2))),
        ((2, 2, 6, 5), (4, 2, 5, 3), dict(padding=(3, 1))),  # padding past the filter's reach
        ((1, 2, 13, 12), (4, 2, 2, 2), dict(stride=3)),  # input rows and columns never read
    ],
)
def test_image_columns_from_a_padded_plane_match_the_row_copies(x_shape, w_shape, options, dtype):
    """im2col.image_columns (a padded copy and a table of offsets) builds the same columns as the
    row copies of channel_columns, NaN and Inf included."""
    from numbaconv.geometry import make_geometry
    from numbaconv.kernels import im2col as kernels

    geom = make_geometry(x_shape, w_shape, **options)
    x = np.random.default_rng(4).standard_normal(x_shape).astype(dtype)
    x[0, 0, 0, 0] = np.nan  # the first pixel: read by every case's first output
    x[-1, -1, 0, 0] = np.inf
    geo = kernels.geometry_args(geom)
    index = kernels.column_table(geom)
    assert index.shape[0] == geom.out_height * geom.out_width  # all narrow or strided
    plane_h, plane_w = kernels._table_plane(geom)
    taps = geom.in_channels * geom.filter_height * geom.filter_width
    pixels = geom.out_height * geom.out_width
    rows = np.full((taps, geom.batch * pixels), 7.0, dtype)
    table = np.full((taps, geom.batch * pixels), 7.0, dtype)
    plane = np.full(plane_h * plane_w + 3, np.nan, dtype)
    for n in range(geom.batch):
        for c in range(geom.in_channels):
            oh, ow = geom.out_height, geom.out_width
            kernels.channel_columns(x, n, c, 0, oh, 0, ow, rows, n * pixels, geo)
            kernels.image_columns(x, n, c, table, n * pixels, geo, plane, index)
    np.testing.assert_array_equal(table, rows)
    assert np.isnan(table).any() and np.isinf(table).any()


def test_strided_row_loops_match_numpy_on_every_count(dtype):
    """The row helpers of the kernels (``_loops``: gather, scatter, scatter-add) at strides 1, 2
    and 3 against NumPy's strided slices, for counts around the stride-2 loops' blocks
    (STRIDE2_BLOCK: full blocks, ragged tails, none), and offsets; NaN and Inf carried as
    values; nothing outside the strided elements touched."""
    from numba import njit

    from numbaconv.kernels import _loops

    @njit
    def gather(dst, src, first, stride):
        _loops.gather_row(dst, src, first, stride)

    @njit
    def scatter(dst, src, first, stride):
        _loops.scatter_row(dst, src, first, stride)

    @njit
    def scatter_add(dst, src, first, stride):
        _loops.scatter_add_row(dst, src, first, stride)

    rng = np.random.default_rng(11)
    block = _loops.STRIDE2_BLOCK
    for stride in (1, 2, 3):
        for count in (0, 1, block - 1, block, block + 3, 2 * block, 3 * block + 5):
            for first in (0, 1, 3):
                size = first + stride * count + 2
                src = rng.standard_normal(size).astype(dtype)
                src[first] = np.nan
                src[-1] = np.inf
                dst = np.full(count, 7.0, dtype)
                gather(dst, src, first, stride)
                np.testing.assert_array_equal(dst, src[first : first + stride * count : stride])

                values = rng.standard_normal(count).astype(dtype)
                if count:
                    values[-1] = np.nan
                base = rng.standard_normal(size).astype(dtype)
                out = base.copy()
                scatter(out, values, first, stride)
                expect = base.copy()
                expect[first : first + stride * count : stride] = values
                np.testing.assert_array_equal(out, expect)

                out = base.copy()
                scatter_add(out, values, first, stride)
                expect = base.copy()
                expect[first : first + stride * count : stride] += values
                np.testing.assert_array_equal(out, expect)
