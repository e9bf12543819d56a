"""ConvLayer: every attribute the teaching layer sets (``u``, ``cols``, ``w_col`` included).

The teaching layer is the transcription in ``naive.py`` (``TextbookConvLayer``); each test
compares numbaconv's layer with it attribute by attribute, at each stage of its life.
"""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
from naive import TextbookConvLayer, as_pair, im2col_naive, padding4

import numbaconv as nc
from numbaconv.layer import ForwardNotCalledError

# (x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad)
GEOMETRIES = [
    (1, 8, 8, 4, 3, 3, 1, 1),  # the textbook's digits layer, smaller
    (3, 7, 6, 5, 3, 2, 2, 1),  # stride 2, padding, rectangular filter, 3 channels
    (2, 9, 7, 3, 2, 4, 2, 2),  # wide filter, padding 2
    (3, 10, 8, 2, 3, 3, 3, 1),  # stride 3 that does not divide the padded input
    (4, 6, 6, 6, 1, 1, 1, 0),  # pointwise
    (2, 5, 5, 3, 5, 5, 1, 0),  # the filter covers the whole image
]

TIGHT = dict(rtol=1e-12, atol=1e-12)

# What the teaching layer sets at each stage, by name (its transcription's ``relu`` flag aside):
# if the transcription gains an attribute, these tests must learn about it.
SET_BY_INIT = {"params", "w", "b", "y_ch", "y_h", "y_w", "h_w", "h_b"}
SET_BY_FORWARD = {"cols", "w_col", "u", "y"}
SET_BY_BACKWARD = {"grad_w", "grad_b", "grad_x"}


def _pair_of_layers(params, kernel=None, relu=True, seed=0, **options):
    np.random.seed(seed)  # noqa: NPY002 (the textbook's way)
    tb = TextbookConvLayer(*params, relu=relu)
    np.random.seed(seed)  # noqa: NPY002
    layer = nc.ConvLayer(*params, kernel=kernel, activation="relu" if relu else None, **options)
    return tb, layer


def _teaching_attributes(tb) -> set[str]:
    return set(vars(tb)) - {"relu"}


def _assert_same_attributes(layer, tb, where: str) -> None:
    """Every attribute of ``tb`` on ``layer``: same type, shape, dtype and values (to rounding)."""
    for name in sorted(_teaching_attributes(tb)):
        expected = getattr(tb, name)
        actual = getattr(layer, name)
        if isinstance(expected, np.ndarray):
            assert isinstance(actual, np.ndarray), f"{name} {where}"
            assert actual.shape == expected.shape, f"{name} {where}"
            assert actual.dtype == expected.dtype == np.float64, f"{name} {where}"
            np.testing.assert_allclose(actual, expected, **TIGHT, err_msg=f"{name} {where}")
        else:
            assert actual == expected, f"{name} {where}"


@pytest.mark.parametrize("params", GEOMETRIES, ids=str)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
def test_every_teaching_attribute(kernel, params, relu):
    tb, layer = _pair_of_layers(params, kernel, relu)
    assert _teaching_attributes(tb) == SET_BY_INIT
    _assert_same_attributes(layer, tb, "after __init__")

    rng = np.random.default_rng(1)
    for step in range(2):
        x = rng.standard_normal((3 + step, *params[:3]))
        tb.forward(x)
        layer.forward(x)
        assert _teaching_attributes(tb) == SET_BY_INIT | SET_BY_FORWARD | (
            SET_BY_BACKWARD if step else set()
        )
        _assert_same_attributes(layer, tb, f"after forward {step}")
        # The im2col columns are copies of input values and zeros: exactly equal. w_col is w
        # reshaped (w itself equals the teaching w to rounding after an update).
        np.testing.assert_array_equal(layer.cols, tb.cols)
        np.testing.assert_array_equal(layer.w_col, layer.w.reshape(params[3], -1))
        # The stored input (numbaconv's own; the teaching layer keeps only its columns).
        np.testing.assert_array_equal(layer.x, x)
        assert not np.shares_memory(layer.x, x)
        if relu:
            assert layer.u is not layer.y and (layer.u < 0).any()
            np.testing.assert_array_equal(layer.y, np.where(layer.u <= 0, 0, layer.u))
        else:
            assert layer.u is layer.y

        grad_y = rng.standard_normal(tb.y.shape)
        tb.backward(grad_y)
        layer.backward(grad_y)
        assert _teaching_attributes(tb) == SET_BY_INIT | SET_BY_FORWARD | SET_BY_BACKWARD
        _assert_same_attributes(layer, tb, f"after backward {step}")

        tb.update(0.05)
        layer.update(0.05)
        # h_w, h_b, w and b changed; the teaching w_col is a view of w, so it did too.
        _assert_same_attributes(layer, tb, f"after update {step}")


@pytest.mark.parametrize("params", GEOMETRIES[:3], ids=str)
def test_u_is_the_teaching_product(params):
    """The docstring's identity: u == ((w_col @ cols).T + b).reshape(...).transpose(...)."""
    _, layer = _pair_of_layers(params)
    x = np.random.default_rng(2).standard_normal((2, *params[:3]))
    layer.forward(x)
    u = ((layer.w_col @ layer.cols).T + layer.b).reshape(2, layer.y_h, layer.y_w, layer.y_ch)
    np.testing.assert_allclose(layer.u, u.transpose(0, 3, 1, 2), **TIGHT)


def test_float32_layer():
    """A float32 layer's u, cols and w_col are float32 and equal the teaching ones to float32."""
    params = GEOMETRIES[1]
    tb, _ = _pair_of_layers(params)
    np.random.seed(0)  # noqa: NPY002
    layer = nc.ConvLayer(*params, dtype=np.float32)
    tb.w = layer.w.astype(np.float64)
    tb.b = layer.b.astype(np.float64)
    x = np.random.default_rng(3).standard_normal((2, *params[:3])).astype(np.float32)
    layer.forward(x)
    tb.forward(x.astype(np.float64))
    for name in ("u", "cols", "w_col", "y", "x"):
        assert getattr(layer, name).dtype == np.float32, name
    assert layer.h_w.dtype == layer.h_b.dtype == np.float32
    np.testing.assert_array_equal(layer.cols, tb.cols)  # float32 values, copied exactly
    np.testing.assert_array_equal(layer.w_col, tb.w_col)
    np.testing.assert_allclose(layer.u, tb.u, rtol=1e-5, atol=1e-6)
    gy = np.random.default_rng(4).standard_normal(layer.y.shape).astype(np.float32)
    layer.backward(gy)
    tb.backward(gy.astype(np.float64))
    layer.update(0.05)
    tb.update(0.05)
    for name in ("w", "b", "h_w", "h_b", "w_col"):
        assert getattr(layer, name).dtype == np.float32, name
        np.testing.assert_allclose(getattr(layer, name), getattr(tb, name), rtol=1e-4, atol=1e-5)


def test_reading_before_forward_is_an_error():
    layer = nc.ConvLayer(3, 6, 6, 4, 3, 3, 1, 1, rng=np.random.default_rng(0))
    for name in ("u", "cols", "w_col"):
        # A RuntimeError, like backward() before forward() ...
        with pytest.raises(RuntimeError, match=rf"ConvLayer\.{name} read before forward\(\)"):
            getattr(layer, name)
        # ... and an AttributeError, as reading it from the teaching layer is.
        with pytest.raises(AttributeError, match=r"forward\(\) sets u, cols and w_col"):
            getattr(layer, name)
        assert not hasattr(layer, name)
        assert getattr(layer, name, "absent") == "absent"
    assert issubclass(ForwardNotCalledError, RuntimeError)
    with pytest.raises(RuntimeError, match=r"ConvLayer\.backward\(\) called before forward\(\)"):
        layer.backward(np.zeros((2, 4, 6, 6)))
    # A forward that fails validation does not count.
    with pytest.raises(ValueError, match=r"expects input of shape"):
        layer.forward(np.zeros((2, 2, 6, 6)))
    with pytest.raises(ForwardNotCalledError, match=r"ConvLayer\.cols read before forward\(\)"):
        layer.cols  # noqa: B018
    # The teaching layer too has none of them before forward.
    tb = TextbookConvLayer(3, 6, 6, 4, 3, 3, 1, 1)
    assert not any(hasattr(tb, name) for name in ("u", "cols", "w_col"))


def test_u_cols_w_col_are_read_only_attributes():
    layer = nc.ConvLayer(2, 5, 5, 3, 3, 3, 1, 1, rng=np.random.default_rng(0))
    layer.forward(np.ones((1, 2, 5, 5)))
    for name in ("u", "cols", "w_col"):
        with pytest.raises(AttributeError, match=rf"'{name}'"):
            setattr(layer, name, np.zeros(1))


def test_cols_follow_the_last_forward():
    params = GEOMETRIES[1]
    tb, layer = _pair_of_layers(params, seed=3)
    rng = np.random.default_rng(5)
    x1 = rng.standard_normal((2, *params[:3]))
    layer.forward(x1)
    cols1 = layer.cols
    assert layer.cols is cols1  # built once per forward
    x2 = rng.standard_normal((4, *params[:3]))
    layer.forward(x2)
    tb.forward(x2)
    cols2 = layer.cols
    assert cols2 is not cols1 and cols2.shape == tb.cols.shape
    np.testing.assert_array_equal(cols2, tb.cols)
    # The same batch shape again: new values, not the cached ones.
    x3 = rng.standard_normal(x2.shape)
    layer.forward(x3)
    tb.forward(x3)
    np.testing.assert_array_equal(layer.cols, tb.cols)
    # Changing the caller's array after forward changes neither x nor cols.
    x3[...] = 0
    np.testing.assert_array_equal(layer.cols, tb.cols)
    # Assigning layer.x by hand gives the columns of the new x.
    layer.x = x2.copy()
    flt_h, flt_w, stride, pad = params[4:]
    expected = im2col_naive(x2, flt_h, flt_w, layer.y_h, layer.y_w, stride, pad)
    np.testing.assert_array_equal(layer.cols, expected)


def test_w_col_follows_w():
    params = GEOMETRIES[0]
    _, layer = _pair_of_layers(params)
    layer.forward(np.random.default_rng(6).standard_normal((2, *params[:3])))
    n_flt = params[3]
    w_col = layer.w_col
    assert np.shares_memory(w_col, layer.w)  # a view, as the teaching layer's
    layer.w -= 1.0  # in place (what update() does)
    np.testing.assert_array_equal(layer.w_col, layer.w.reshape(n_flt, -1))
    np.testing.assert_array_equal(w_col, layer.w.reshape(n_flt, -1))
    new_w = np.random.default_rng(7).standard_normal(layer.w.shape)
    layer.w = new_w  # by assignment: the teaching layer's w_col would be stale until forward
    assert np.shares_memory(layer.w_col, new_w)
    np.testing.assert_array_equal(layer.w_col, new_w.reshape(n_flt, -1))
    layer.w_col[0, 0] = 42.0  # writes through, as through the teaching view
    assert layer.w[0, 0, 0, 0] == 42.0
    # A non-contiguous w still gives the right matrix (a copy then).
    layer.w = np.asfortranarray(new_w)
    np.testing.assert_array_equal(layer.w_col, new_w.reshape(n_flt, -1))


def test_forward_does_not_build_the_columns():
    """forward allocates no columns (direct kernel); the first read of cols does, once."""
    layer = nc.ConvLayer(8, 16, 16, 4, 5, 5, 1, 2, kernel="direct", rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((4, 8, 16, 16))
    layer.forward(x)  # compile outside the measurement
    cols_bytes = (8 * 5 * 5) * (4 * 16 * 16) * 8
    tracemalloc.start()
    try:
        layer.forward(x)
        _, forward_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        cols = layer.cols
        _, cols_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cols.nbytes == cols_bytes
    # x's copy is 66 kB, u and y 33 kB each; the columns 1.6 MB.
    assert forward_peak < cols_bytes / 2
    assert cols_peak >= cols_bytes


def _columns_by_loops(x, flt_h, flt_w, y_h, y_w, stride, dilation, top, left):
    """cols[(c, r, s), (n, oh, ow)] = x[n, c, oh*sh + r*dh - top, ow*sw + s*dw - left] or 0."""
    (sh, sw), (dh, dw) = as_pair(stride), as_pair(dilation)
    n_b, n_c, h, w = x.shape
    cols = np.zeros((n_c * flt_h * flt_w, n_b * y_h * y_w))
    for c, r, s, n, oh, ow in itertools.product(
        range(n_c), range(flt_h), range(flt_w), range(n_b), range(y_h), range(y_w)
    ):
        ih = oh * sh + r * dh - top
        iw = ow * sw + s * dw - left
        if 0 <= ih < h and 0 <= iw < w:
            cols[(c * flt_h + r) * flt_w + s, (n * y_h + oh) * y_w + ow] = x[n, c, ih, iw]
    return cols


@pytest.mark.parametrize(
    "options",
    [
        dict(stride=1, pad=1, dilation=2),
        dict(stride=(2, 1), pad=(1, 2), dilation=(1, 2)),
        dict(stride=1, pad="same"),  # 2x4 filter: one more row and column at the bottom/right
        dict(stride=1, pad="same", dilation=(3, 1)),
        dict(stride=1, pad="valid", groups=2),
        dict(stride=2, pad=1, groups=4, dilation=2),  # depthwise
    ],
    ids=str,
)
def test_cols_and_w_col_beyond_the_teaching_geometry(dtype, options):
    """Dilation, pairs, 'same' and groups: cols is the (dilated) im2col of every channel, w_col
    is ``w.reshape(n_flt, -1)``, and each group's filters times its rows of cols give u."""
    groups = options.pop("groups", 1)
    dilation = options.get("dilation", 1)
    x_ch, n_flt, flt_h, flt_w = 4, 4, 2, 4
    layer = nc.ConvLayer(
        x_ch,
        9,
        10,
        n_flt,
        flt_h,
        flt_w,
        options["stride"],
        options["pad"],
        dilation=dilation,
        groups=groups,
        dtype=dtype,
        rng=np.random.default_rng(8),
    )
    x = np.random.default_rng(9).standard_normal((2, x_ch, 9, 10)).astype(dtype)
    layer.forward(x)
    top, _, left, _ = padding4(
        options["pad"], (flt_h, flt_w), as_pair(options["stride"]), as_pair(dilation)
    )
    y_h, y_w = layer.y_h, layer.y_w
    expected = _columns_by_loops(x, flt_h, flt_w, y_h, y_w, options["stride"], dilation, top, left)
    assert layer.cols.dtype == dtype and layer.cols.shape == (x_ch * flt_h * flt_w, 2 * y_h * y_w)
    np.testing.assert_array_equal(layer.cols, expected.astype(dtype))
    taps = x_ch // groups * flt_h * flt_w
    assert layer.w_col.shape == (n_flt, taps) and layer.w_col.dtype == dtype
    assert np.shares_memory(layer.w_col, layer.w)
    per_group = n_flt // groups
    u = np.empty((n_flt, 2 * y_h * y_w))
    for g in range(groups):
        filters = slice(g * per_group, (g + 1) * per_group)
        u[filters] = layer.w_col[filters] @ layer.cols[g * taps : (g + 1) * taps]
    u = (u.T + layer.b).reshape(2, y_h, y_w, n_flt).transpose(0, 3, 1, 2)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer.u, u, rtol=tol, atol=tol)


def test_empty_batch():
    layer = nc.ConvLayer(2, 5, 5, 3, 3, 3, 2, 1, rng=np.random.default_rng(0))
    layer.forward(np.zeros((0, 2, 5, 5)))
    assert layer.u.shape == (0, 3, 3, 3)
    assert layer.cols.shape == (18, 0)
    assert layer.w_col.shape == (3, 18)
