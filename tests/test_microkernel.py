"""numbaconv's own GEMM (``numbaconv.kernels.microkernel``) against NumPy in float64.

Sizes straddle every blocking boundary: the tile's rows (MR) and columns (NR), the K block, the
ragged last panel, the rows left below the last full tile; operands in place, transposed,
strided; overwrite and accumulate; both dtypes; and the tiles of the other vector widths,
compiled in subprocesses for other CPUs.
"""

from __future__ import annotations

import itertools
import textwrap

import numba
import numpy as np
import pytest
from helpers import GEMM_GATES, OTHER_CPUS, run_for_cpu

from numbaconv.kernels import microkernel as mk

MR, NR32 = mk.nn_tile(np.float32)
KB = mk.K_BLOCK
SIZES = sorted(
    {
        (1, 1, 1),
        (MR, KB, NR32),
        (MR + 1, KB + 1, NR32 + 1),
        (MR - 1, KB - 1, NR32 - 1),
        (4 * MR, 2 * KB + 3, 3 * NR32 + 5),  # packed panels (4 row blocks)
        (4 * MR + 3, 5, 2 * NR32),
        (3, 300, 70),
        (17, 2, 9),
        (64, 75, 100),
        # A ragged last panel of exactly one vector (float32 / float64): the narrow tile
        # stores in place.
        (2 * MR + 1, KB + 5, NR32 + NR32 // 2),
        (3 * MR, 9, NR32 // 2 + NR32 // 4),
    }
)


def _tolerance(dtype, depth):
    eps = np.finfo(dtype).eps
    return 8 * eps * max(1, depth) ** 0.5


def _reference(a, b):
    return a.astype(np.float64) @ b.astype(np.float64)


def _operands(rng, m, k, n, dtype):
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    return a, b


def _assert_product(c, expected, a, b, depth):
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64) + 1
    err = np.abs(c.astype(np.float64) - expected) / scale
    assert err.max(initial=0) <= _tolerance(c.dtype, depth), err.max()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_nn_overwrites_and_accumulates(size, dtype):
    m, k, n = size
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    a, b = _operands(rng, m, k, n, dtype)
    expected = _reference(a, b)
    c = np.full((m, n), np.nan, dtype)  # overwritten: the NaNs must all go
    mk.gemm_nn(a, b, c, False)
    _assert_product(c, expected, a, b, k)
    start = rng.standard_normal((m, n)).astype(dtype)
    c = start.copy()
    mk.gemm_nn(a, b, c, True)
    _assert_product(c - start, expected, a, b, k)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_nn_takes_transposed_and_strided_operands(size, dtype):
    """a and b as transposed views (what im2col's grad-x and grad-w pass), c a window into a
    wider array (rows not contiguous with each other)."""
    m, k, n = size
    rng = np.random.default_rng(n)
    a, b = _operands(rng, m, k, n, dtype)
    a_t = np.ascontiguousarray(a.T).T
    b_t = np.ascontiguousarray(b.T).T
    wide = np.zeros((m, n + 7), dtype)
    c = wide[:, 3 : 3 + n]
    mk.gemm_nn(a_t, b_t, c, False)
    _assert_product(c, _reference(a, b), a, b, k)
    assert not wide[:, :3].any() and not wide[:, 3 + n :].any()
    every_other = np.repeat(b, 2, axis=0)[::2]  # rows two apart in memory
    mk.gemm_nn(a, every_other, c, False)
    _assert_product(c, _reference(a, b), a, b, k)


def test_empty_and_zero_depth_products(dtype):
    a = np.ones((3, 0), dtype)
    b = np.ones((0, 4), dtype)
    c = np.full((3, 4), 5, dtype)
    mk.gemm_nn(a, b, c, True)
    assert (c == 5).all()
    mk.gemm_nn(a, b, c, False)
    assert (c == 0).all()
    mk.gemm_nn(np.ones((0, 2), dtype), np.ones((2, 4), dtype), np.ones((0, 4), dtype), False)


def test_bits_do_not_depend_on_the_columns_computed(dtype):
    """Each element is the same sequence of operations whatever else is computed with it: a
    product over some of b's columns equals those columns of the full product, bit for bit (so
    im2col's results cannot depend on how its bands cut the output)."""
    rng = np.random.default_rng(5)
    m, k, n = 4 * MR + 3, 2 * KB + 9, 3 * NR32 + 11
    a, b = _operands(rng, m, k, n, dtype)
    full = np.empty((m, n), dtype)
    mk.gemm_nn(a, b, full, False)
    for j0, j1 in [(0, 7), (5, NR32 + 3), (NR32, n), (n - 1, n)]:
        part = np.empty((m, j1 - j0), dtype)
        mk.gemm_nn(a, np.ascontiguousarray(b[:, j0:j1]), part, False)
        np.testing.assert_array_equal(part, full[:, j0:j1])
    again = np.empty_like(full)
    mk.gemm_nn(a, b, again, False)
    np.testing.assert_array_equal(again, full)


def test_bits_do_not_depend_on_the_rows_computed(dtype):
    """Likewise along the rows: the last M % MR rows run on a short tile with the full tile's
    operations, so a product over some of a's rows equals those rows of the full product, bit
    for bit, wherever the rows fall in the tiles (gemm_nn, in place and packed, and the
    implicit drivers gemm_nn_rows and gemm_rows_nn), and where 1 or 2 rows past the last full
    tile make it two short tiles (_row_tiles)."""
    rng = np.random.default_rng(6)
    m, k, n = 5 * MR + 3, KB + 9, 2 * NR32 + 5
    a, b = _operands(rng, m, k, n, dtype)
    full = np.empty((m, n), dtype)
    mk.gemm_nn(a, b, full, False)
    flat_b = np.ascontiguousarray(b).ravel()
    b_rows = np.arange(k, dtype=np.int64) * n
    flat_a = np.ascontiguousarray(a).ravel()
    # Rows (1, MR + 2) and (3, 2*MR + 4) leave 1 past their full tiles, (0, 4*MR + 2) 2 (packed).
    ranges = [(0, 1), (1, MR + 2), (MR - 1, m), (2, 5 * MR + 1), (0, MR - 1)]
    for i0, i1 in ranges + [(3, 2 * MR + 4), (0, 4 * MR + 2)]:
        rows = np.ascontiguousarray(a[i0:i1])
        part = np.empty((i1 - i0, n), dtype)
        mk.gemm_nn(rows, b, part, False)
        np.testing.assert_array_equal(part, full[i0:i1])
        mk.gemm_nn(rows, b[:, : 2 * NR32], part[:, : 2 * NR32], False)  # b in place if few rows
        np.testing.assert_array_equal(part[:, : 2 * NR32], full[i0:i1, : 2 * NR32])
        mk.gemm_nn_rows(rows, flat_b, b_rows, part, False)
        np.testing.assert_array_equal(part, full[i0:i1])
        a_rows = np.arange(i0, i1, dtype=np.int64) * k
        mk.gemm_rows_nn(flat_a, a_rows, b, part, False)
        np.testing.assert_array_equal(part, full[i0:i1])


def test_row_tiles_cover_the_rows_without_tiles_of_one_or_two_rows():
    """_row_tiles: full tiles then short ones cover the M rows exactly, short tiles are shorter
    than MR, and past the first MR rows none is shorter than SPLIT_REST_BELOW."""
    for m in range(1, 6 * MR):
        full, short = mk._row_tiles.py_func(m)
        tiles = [MR] * full + [min(short, m - i0) for i0 in range(full * MR, m, short)]
        assert sum(tiles) == m, m
        assert all(rows < MR for rows in tiles[full:]), (m, tiles)
        if m >= MR:
            assert min(tiles) >= mk.SPLIT_REST_BELOW, (m, tiles)


def test_nan_and_inf_propagate(dtype):
    rng = np.random.default_rng(2)
    m, k, n = 2 * MR + 1, KB + 5, NR32 + 3
    a, b = _operands(rng, m, k, n, dtype)
    a[1, 3] = np.nan
    b[4, n - 1] = np.inf
    c = np.empty((m, n), dtype)
    mk.gemm_nn(a, b, c, False)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(c), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(c), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(c[finite], expected[finite], rtol=1e-4, atol=1e-3)


def test_bad_operands_are_refused():
    a = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match="shapes do not match"):
        mk.gemm_nn(a, np.ones((6, 3), np.float32), np.ones((4, 3), np.float32), False)
    with pytest.raises(ValueError, match="c needs unit stride"):
        mk.gemm_nn(a, np.ones((5, 3), np.float32), np.ones((4, 6), np.float32)[:, ::2], False)
    # Mixed dtypes never reach the tiles: the intrinsic refuses to type them.
    with pytest.raises(numba.core.errors.TypingError):
        mk.gemm_nn(a, np.ones((5, 3), np.float64), np.ones((4, 3), np.float32), False)


@pytest.mark.parametrize(
    ("features", "bits"),
    [
        ("+64bit,+avx,+avx2,+fma,+avx512f,+avx512bw", 512),
        ("+avx,+avx2,+fma,-avx512f", 256),
        ("+avx,-avx2,+fma", 128),
        ("+sse2,+sse4.2", 128),
        ("", 128),
        ("+neon", 128),
    ],
)
def test_vector_width_from_features(features, bits):
    assert mk.vector_bits_for(features) == bits


def test_own_gemm_runs_on_avx2_and_avx512_targets(monkeypatch):
    """``own_gemm_pays``: the size bounds (measured on AVX-512) on targets at least
    OWN_GEMM_MIN_VECTOR_BITS (AVX2) wide in float32 and OWN_GEMM_FLOAT64_MIN_VECTOR_BITS
    (AVX-512) in float64, BLAS for every product elsewhere; ``own_gemm_pays_transposed`` from
    OWN_TRANSPOSED_GEMM_MIN_VECTOR_BITS (AVX-512). The gates are the vector width, so they too
    follow the cache key alone."""
    assert mk.OWN_GEMM_MIN_VECTOR_BITS == 256
    assert mk.OWN_GEMM_FLOAT64_MIN_VECTOR_BITS == mk.OWN_TRANSPOSED_GEMM_MIN_VECTOR_BITS == 512
    assert mk.OWN_GEMM_ON_THIS_TARGET == (mk.VECTOR_BITS >= 256)
    assert mk.OWN_GEMM_FLOAT64_ON_THIS_TARGET == (mk.VECTOR_BITS >= 512)
    assert mk.OWN_TRANSPOSED_GEMM_ON_THIS_TARGET == (mk.VECTOR_BITS >= 512)
    shape = (64, 256, 3136, 4)  # ResNet's 1x1 reduce in float32: within every size bound
    shape64 = (64, 256, 1568, 8)  # and in float64, on half the columns
    transposed = (64, 64, 3136, 4)  # shallow: within the transposed operand's bounds too
    for size in (shape, shape64, transposed):
        assert mk.own_gemm_size_pays.py_func(*size)
    # Compiled first: a compilation reads the module's globals as they are at that moment.
    assert numba.njit(lambda: mk.own_gemm_pays(64, 256, 3136, 4))() == (mk.VECTOR_BITS >= 256)
    assert numba.njit(lambda: mk.own_gemm_pays(64, 256, 1568, 8))() == (mk.VECTOR_BITS >= 512)
    compiled = numba.njit(lambda: mk.own_gemm_pays_transposed(64, 64, 3136, 4))()
    assert compiled == (mk.VECTOR_BITS >= 512)
    for gates in itertools.product((True, False), repeat=3):
        for gate, on in zip(GEMM_GATES, gates, strict=True):
            monkeypatch.setattr(mk, gate, on)
        assert mk.own_gemm_pays.py_func(*shape) is gates[0]
        assert mk.own_gemm_pays.py_func(*shape64) is gates[1]
        assert bool(mk.own_gemm_pays_transposed.py_func(*transposed)) is gates[2]


def test_tiles_follow_the_cache_key_alone():
    """The tile shapes come from nothing but the CPU features of Numba's target, which are in
    every cache entry's key (codegen.magic_tuple()), so a cached kernel built for other tiles is
    never loaded."""
    from numba.core.registry import cpu_target

    features = cpu_target.target_context.codegen().magic_tuple()[2]
    assert mk.VECTOR_BITS == mk.vector_bits_for(features)
    assert (mk.NN_ROWS, mk.NN_VECTORS) == mk.NN_TILES[mk.VECTOR_BITS]
    source = open(mk.__file__).read()
    assert "os.environ" not in source and "getenv" not in source


_OTHER_CPU = textwrap.dedent(
    """
    import json
    import numpy as np
    from numbaconv.kernels import microkernel as mk
    rng = np.random.default_rng(0)
    errors = {}
    for dtype in (np.float32, np.float64):
        for m, k, n in [(1, 1, 1), (9, 130, 33), (37, 75, 70)]:
            a = rng.standard_normal((m, k)).astype(dtype)
            b = rng.standard_normal((k, n)).astype(dtype)
            c = np.empty((m, n), dtype)
            mk.gemm_nn(a, np.ascontiguousarray(b.T).T if m > 30 else b, c, False)
            ref = a.astype(np.float64) @ b
            scale = np.abs(a).astype(np.float64) @ np.abs(b) + 1
            errors[f"{np.dtype(dtype).name} {m}x{k}x{n}"] = float((np.abs(c - ref) / scale).max())
    from numba import njit

    # The gates as the compiled kernels see them (globals frozen at compile time).
    pays = njit(lambda: mk.own_gemm_pays(64, 256, 3136, 4))()
    pays64 = njit(lambda: mk.own_gemm_pays(64, 256, 1568, 8))()
    transposed = njit(lambda: mk.own_gemm_pays_transposed(64, 64, 3136, 4))()
    report = {"bits": mk.VECTOR_BITS, "errors": errors, "own_gemm": bool(pays)}
    print(json.dumps(dict(report, own_float64=bool(pays64), own_transposed=bool(transposed))))
    """
)


@pytest.mark.parametrize(("cpu", "features", "bits"), OTHER_CPUS)
def test_other_vector_widths_compile_and_agree(tmp_path, cpu, features, bits):
    """The AVX2 tiles, and the 128-bit ones that LLVM legalises for any CPU, compiled for those
    CPUs (in a fresh cache) and run here, which can run their instructions; the kernels compiled
    for AVX2 run the filters' products on the micro-kernel in float32, and on BLAS in float64
    and those with a transposed operand; those for 128-bit targets every product on BLAS
    (where it measured faster)."""
    report = run_for_cpu(_OTHER_CPU, cpu, features, tmp_path, timeout=600)
    assert report["bits"] == bits
    assert report["own_gemm"] is (bits >= 256)  # OWN_GEMM_MIN_VECTOR_BITS
    assert report["own_float64"] is False  # OWN_GEMM_FLOAT64_MIN_VECTOR_BITS
    assert report["own_transposed"] is False  # OWN_TRANSPOSED_GEMM_MIN_VECTOR_BITS
    for case, error in report["errors"].items():
        limit = 1e-5 if case.startswith("float32") else 1e-13
        assert error < limit, (case, error)


def _assert_rows_give_gemm_nn_bits(a, flat, rows, explicit, *windows):
    """gemm_nn_rows of ``a`` with B's rows named in ``flat`` (``windows``: its width and b_step,
    or none) gives gemm_nn's bits on the ``explicit`` B, and is right against float64."""
    m, k = a.shape
    expected = np.empty((m, explicit.shape[1]), a.dtype)
    mk.gemm_nn(a, explicit, expected, False)
    c = np.full_like(expected, np.nan)
    mk.gemm_nn_rows(a, flat, rows, c, False, *windows)
    np.testing.assert_array_equal(c, expected)
    _assert_product(c, _reference(a, explicit), a, explicit, k)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_nn_rows_is_gemm_nn_on_the_rows_it_names(size, dtype):
    """B's rows given as offsets into a flat array (overlapping windows, in any order): the
    same bits as gemm_nn on the explicit matrix, and right against float64."""
    m, k, n = size
    rng = np.random.default_rng(m + 7 * k + 13 * n)
    flat = rng.standard_normal(3 * n + k + 40).astype(dtype)
    rows = rng.integers(0, flat.shape[0] - n + 1, size=k).astype(np.int64)
    explicit = np.stack([flat[r : r + n] for r in rows]) if k else np.zeros((0, n), dtype)
    a = rng.standard_normal((m, k)).astype(dtype)
    _assert_rows_give_gemm_nn_bits(a, flat, rows, explicit)
    start = rng.standard_normal((m, n)).astype(dtype)
    c = start.copy()
    mk.gemm_nn_rows(np.ascontiguousarray(a.T).T, flat, rows, c, True)
    _assert_product(c - start, _reference(a, explicit), a, explicit, k)


@pytest.mark.parametrize("spread", [False, True], ids=["in-place", "packed"])
def test_gemm_nn_rows_packs_only_rows_spread_wider_than_the_cache(spread, dtype):
    """gemm_nn_rows reads B's rows in place where they all lie within IN_PLACE_MAX_BYTES, and
    packs them into panels (reused by every row block) where they are spread wider: both give
    gemm_nn's bits on the explicit matrix, with full tiles, the short tile of the last M % MR
    rows and a ragged last panel, overwriting and accumulating."""
    m, k, n = 4 * mk.NN_ROWS + 3, KB + 7, 3 * NR32 + 5
    itemsize = np.dtype(dtype).itemsize
    span = (2 * mk.IN_PLACE_MAX_BYTES // itemsize) if spread else 4 * n
    rng = np.random.default_rng(11 + spread)
    flat = rng.standard_normal(span + n).astype(dtype)
    rows = rng.integers(0, span + 1, size=k).astype(np.int64)
    rows[:2] = 0, span  # the span itself, whatever the draw
    assert ((rows.max() - rows.min() + n) * itemsize > mk.IN_PLACE_MAX_BYTES) == spread
    explicit = np.stack([flat[r : r + n] for r in rows])
    a = rng.standard_normal((m, k)).astype(dtype)
    _assert_rows_give_gemm_nn_bits(a, flat, rows, explicit)
    start = rng.standard_normal((m, n)).astype(dtype)
    c, summed = start.copy(), start.copy()
    mk.gemm_nn_rows(a, flat, rows, c, True)
    mk.gemm_nn(a, explicit, summed, True)
    np.testing.assert_array_equal(c, summed)


@pytest.mark.parametrize("width_panels", [1, 2, 3])
@pytest.mark.parametrize("spread", [False, True], ids=["in-place", "packed"])
def test_gemm_nn_rows_on_windows_of_rows(width_panels, spread, dtype):
    """With ``width`` and ``b_step``, each row of B is N / width windows ``b_step`` apart (the
    output rows of implicit GEMM, straight into y): gemm_nn's bits on the explicit matrix, in
    place and packed, with a short tile; a width that does not divide N is refused."""
    m, k = 4 * mk.NN_ROWS + 5, KB + 3
    width = width_panels * NR32 // (2 if dtype == np.float64 else 1)
    windows, b_step = 3, width + 7
    itemsize = np.dtype(dtype).itemsize
    span = (2 * mk.IN_PLACE_MAX_BYTES // itemsize) if spread else 50
    rng = np.random.default_rng(21 + width_panels)
    flat = rng.standard_normal(span + windows * b_step).astype(dtype)
    rows = rng.integers(0, span + 1, size=k).astype(np.int64)
    explicit = np.stack(
        [np.concatenate([flat[r + i * b_step : r + i * b_step + width] for i in range(windows)])
         for r in rows]
    )  # fmt: skip
    a = rng.standard_normal((m, k)).astype(dtype)
    _assert_rows_give_gemm_nn_bits(a, flat, rows, explicit, width, b_step)
    c = np.empty((m, windows * width - 1), dtype)
    with pytest.raises(ValueError, match="shapes"):
        mk.gemm_nn_rows(a, flat, rows, c, False, width, b_step)


@pytest.mark.parametrize("m", [1, 5, mk.NN_ROWS, 2 * mk.NN_ROWS + 1, 3 * mk.NN_ROWS + 2, 22])
@pytest.mark.parametrize("groups", [1, 3])
def test_pack_rows_lays_out_each_tiles_rows_column_by_column(m, groups, dtype):
    """pack_rows: the block of each tile (row_blocks: full tiles, then the short ones) holds its
    rows of A column by column, the blocks in order, covering every row once; with groups, each
    group's rows as a matrix of their own."""
    k = 9
    a = np.random.default_rng(m).standard_normal((k, m * groups)).astype(dtype).T  # any strides
    out = np.full(a.shape, np.nan, dtype)
    mk.pack_rows(a, out, groups)
    blocks = mk.row_blocks(m)
    assert [i0 for i0, _ in blocks] == list(itertools.accumulate([0] + [r for _, r in blocks]))[:-1]
    assert sum(rows for _, rows in blocks) == m
    assert all(rows == mk.NN_ROWS for _, rows in blocks[: m // mk.NN_ROWS - 1])
    for g in range(groups):
        flat = out[g * m : (g + 1) * m].reshape(-1)
        for i0, rows in blocks:
            block = flat[i0 * k : (i0 + rows) * k].reshape(k, rows)
            np.testing.assert_array_equal(block, a[g * m + i0 : g * m + i0 + rows].T)


@pytest.mark.parametrize("m", [5, 4 * mk.NN_ROWS + 1, 4 * mk.NN_ROWS + 3, 9 * mk.NN_ROWS])
@pytest.mark.parametrize("spread", [False, True], ids=["in-place", "packed"])
def test_gemm_nn_rows_on_packed_rows_of_a(m, spread, dtype):
    """``a_packed``: A laid out by pack_rows gives the bits of A itself, with B's rows in place
    or packed, windows, a ragged last panel, short tiles (one, or two where M % MR is 1 or 2),
    overwriting and accumulating."""
    k, width, windows = KB + 5, NR32 + 3, 2
    b_step = width + 4
    itemsize = np.dtype(dtype).itemsize
    span = (2 * mk.IN_PLACE_MAX_BYTES // itemsize) if spread else 60
    rng = np.random.default_rng(m + spread)
    flat = rng.standard_normal(span + windows * b_step).astype(dtype)
    rows = rng.integers(0, span + 1, size=k).astype(np.int64)
    a = rng.standard_normal((m, k)).astype(dtype)
    packed = np.empty_like(a)
    mk.pack_rows(a, packed)
    start = rng.standard_normal((m, windows * width)).astype(dtype)
    for accumulate in (False, True):
        expected, c = start.copy(), start.copy()
        mk.gemm_nn_rows(a, flat, rows, expected, accumulate, width, b_step)
        mk.gemm_nn_rows(packed, flat, rows, c, accumulate, width, b_step, True)
        np.testing.assert_array_equal(c, expected)
    with pytest.raises(ValueError, match="contiguous"):
        mk.gemm_nn_rows(packed.T.T[:, ::-1], flat, rows, c, False, width, b_step, True)


@pytest.mark.usefixtures("own_gemm_everywhere")
def test_deep_products_with_a_transposed_left_operand_go_to_blas():
    """``own_gemm_pays_transposed``: BLAS for products at least OWN_GEMM_TRANSPOSED_MIN_DEPTH
    deep with more than OWN_GEMM_MAX_TRANSPOSED_PRODUCT elements on the left, the micro-kernel
    elsewhere that ``own_gemm_pays`` says so."""
    pays, pays_t = mk.own_gemm_pays.py_func, mk.own_gemm_pays_transposed.py_func
    depth = mk.OWN_GEMM_TRANSPOSED_MIN_DEPTH
    rows = mk.OWN_GEMM_MAX_TRANSPOSED_PRODUCT // depth
    for m, k, n in [(2048, 256, 256), (1152, 128, 784), (rows + 1, depth, 784)]:
        assert pays(m, k, n, 4) and not pays_t(m, k, n, 4), (m, k, n)
    for m, k, n in [(1152, 64, 784), (128, 128, 784), (rows, depth, 784), (rows + 1, 64, 784)]:
        assert pays(m, k, n, 4) and pays_t(m, k, n, 4), (m, k, n)
    assert not pays(16, 64, 784, 4) and not pays_t(16, 64, 784, 4)


@pytest.mark.usefixtures("own_gemm_everywhere")
def test_long_rows_go_to_blas_by_their_bytes():
    """``own_gemm_pays``' bound on the rows of B and C is in bytes: ResNet's 1x1 layers (3136
    columns) stay on the micro-kernel in float32 and go to BLAS in float64."""
    longest = mk.OWN_GEMM_MAX_ROW_BYTES
    assert mk.own_gemm_pays.py_func(64, 256, longest // 4, 4)
    assert not mk.own_gemm_pays.py_func(64, 256, longest // 4 + 1, 4)
    assert mk.own_gemm_pays.py_func(64, 256, longest // 8, 8)
    assert not mk.own_gemm_pays.py_func(64, 256, longest // 8 + 1, 8)
    assert mk.own_gemm_pays.py_func(64, 256, 3136, 4) and not mk.own_gemm_pays.py_func(
        64, 256, 3136, 8
    )


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_rows_nn_is_gemm_nn_on_the_rows_it_names(size, dtype):
    """A's rows given as offsets into a flat array (overlapping windows, in any order; implicit
    grad-w): the same bits as gemm_nn on the explicit matrix, b packed whatever its strides,
    overwrite and accumulate, and right against float64."""
    m, k, n = size
    rng = np.random.default_rng(3 * m + 5 * k + n)
    flat = rng.standard_normal(3 * m + k + 40).astype(dtype)
    rows = rng.integers(0, flat.shape[0] - k + 1, size=m).astype(np.int64)
    explicit = np.stack([flat[r : r + k] for r in rows]) if m else np.zeros((0, k), dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    expected = np.empty((m, n), dtype)
    mk.gemm_nn(explicit, b, expected, False)
    c = np.full((m, n), np.nan, dtype)  # overwritten: the NaNs must all go
    mk.gemm_rows_nn(flat, rows, b, c, False)
    np.testing.assert_array_equal(c, expected)
    _assert_product(c, _reference(explicit, b), explicit, b, k)
    start = rng.standard_normal((m, n)).astype(dtype)
    wide = np.zeros((m, n + 5), dtype)
    c = wide[:, 2 : 2 + n]  # rows not contiguous with each other
    c[...] = start
    mk.gemm_rows_nn(flat, rows, np.ascontiguousarray(b.T).T, c, True)
    _assert_product(c - start, _reference(explicit, b), explicit, b, k)
    assert not wide[:, :2].any() and not wide[:, 2 + n :].any()


def test_gemm_rows_nn_refuses_mismatched_shapes():
    flat = np.ones(50, np.float32)
    with pytest.raises(ValueError, match="shapes"):
        mk.gemm_rows_nn(flat, np.zeros(4, np.int64), np.ones((3, 5), np.float32),
                        np.empty((3, 5), np.float32), False)  # fmt: skip
