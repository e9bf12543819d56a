"""numbaconv's own GEMM: explicit-SIMD register tiles in LLVM IR, and the loops that drive them.

Why not BLAS: single-threaded OpenBLAS ran convolution-sized products at 75-150 GFLOP/s per core,
its rounding follows its version and the machine, holding it to one thread is process-wide
state, and importing it costs start-up time. Why not plain Numba loops: LLVM spills a register
tile written as scalars (13-18 GFLOP/s, ``../shared/research/simd_gemm_prototype.py``). So the
innermost loop is written here as LLVM vector IR through :func:`numba.extending.intrinsic`:
accumulators are ``<lanes x float>`` values carried as loop phis, which LLVM keeps in registers,
and every multiply-add is one ``llvm.fma``.

The tile, :func:`tile_nn`: ``C[i, j] (+)= sum_k A[i, k] * B[k, j]`` on an ``MR x (NV * lanes)``
block of C, A read by broadcasts at any strides (so ``A`` may be a transposed view), B rows
contiguous. :func:`gemm_nn` cuts any product into such tiles (blocks of ``K``, panels of ``B``
packed when reused, ragged edges through a zero-padded panel and shorter or narrower tiles)
and is called from inside the kernels' parallel regions, one call per lane: it is serial and
allocates only a panel and a tile. Where it beats BLAS is measured, and :func:`own_gemm_pays`
says so to the kernels (for ``im2col``'s columns and ``taps``, on AVX-512 targets, and on AVX2
in float32: :data:`OWN_GEMM_MIN_VECTOR_BITS`, :data:`OWN_GEMM_FLOAT64_MIN_VECTOR_BITS`; their
products with a transposed operand on AVX-512 only: :data:`OWN_TRANSPOSED_GEMM_MIN_VECTOR_BITS`).

Tile shapes follow the host's vector width: :data:`VECTOR_BITS` comes from the CPU features in
Numba's own code-generation target (``codegen.magic_tuple()``). Other CPUs get the 128-bit
shapes, whose IR LLVM legalises for whatever vectors the target has.

The cache-key caveat: an intrinsic's IR is generated from Python values (here the tile shapes),
and Numba's cache key for a ``cache=True`` function holds its signature, its bytecode and the
target's ``magic_tuple()`` (triple, CPU name, CPU features), not such values. A cache written
with other tile shapes would be loaded without complaint. This module makes that impossible by
deriving the tile shapes from nothing but that magic tuple (no environment variable, no
setting, no timing): two processes with the same cache key generate the same IR. Changing the
tables below is a source change, which (like any change to a helper in another module: Numba
tracks no dependencies between files) needs the callers' caches cleared by removing their
``__pycache__`` folders (``numbaconv info`` says where they are).

Rounding: each output element is a fixed sequence of FMAs in ``k`` order, each block of
:data:`K_BLOCK` summed apart and then added to the stored value, whichever tile (full, short or
narrow) computes it. So an element's bits depend on neither M nor N nor on which rows or columns
are computed together: results repeat bit for bit across calls and threads, whatever the band
widths, and on every machine with the same vector width (where the K blocks are the same; FMA
rounds alike everywhere).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.registry import cpu_target
from numba.extending import intrinsic

from .._threading import blas_runs_avx512


def _target_features() -> str:
    """The CPU features Numba compiles for (``NUMBA_CPU_FEATURES`` or the host's), exactly as
    they enter Numba's cache key."""
    return cpu_target.target_context.codegen().magic_tuple()[2]


def vector_bits_for(features: str) -> int:
    """The vector width the tiles are shaped for, from an LLVM feature string."""
    enabled = {flag[1:] for flag in features.split(",") if flag.startswith("+")}
    if "avx512f" in enabled:
        return 512
    if {"avx2", "fma"} <= enabled:
        return 256
    return 128


VECTOR_BITS = vector_bits_for(_target_features())

#: Register tiles per vector width: (MR rows, NV vectors per row) of :func:`tile_nn`, for
#: float32 and float64 alike (a vector holds half as many float64). AVX-512 has 32 vector
#: registers: 8 x 2 keeps 16 accumulators, 2 B vectors and a broadcast in registers. The tile
#: alone on L1-resident panels ran at 208 GFLOP/s (8x2), 221 (12x2), 212 (14x2), 196 (6x4) and
#: 157 (4x4) against a 238 FMA peak; on whole products 12x2 and 6x4 were not better than 8x2
#: beyond the noise of a shared machine, so 8x2, the prototype's best, stays. AVX2 and 128-bit
#: targets have 16 registers: 6 x 2 (12 accumulators), the shape BLIS uses on Haswell.
NN_TILES = {512: (8, 2), 256: (6, 2), 128: (6, 2)}

#: Rows of K per pass of :func:`gemm_nn`: a (K_BLOCK x NV*lanes) panel of B stays in L1 (16 KiB
#: in float32 on AVX-512) while every MR-row block of A runs over it. 128 was the prototype's best
#: on K = 576 against 64 and 256; here 256 was within the noise of 128 on most products and
#: slower on 256x256x256 (181 against 197 GFLOP/s).
K_BLOCK = 128

#: Row blocks of ``a`` from which :func:`gemm_nn` packs each panel of ``b`` rather than reading
#: it in place: the copy paid for itself from about 4 (16 x 64 @ 64 x 784, two row blocks, ran
#: 0.6x as fast packed; 256 x 256 @ 256 x 256 gained 5-15 %).
PACK_MIN_ROW_BLOCKS = 4

#: ... except in :func:`gemm_nn_rows` where B's rows all lie within this many bytes (the span of
#: implicit GEMM's padded planes), per vector width: there the tiles read them in place, from
#: L1 or L2, and the copy cost more than it saved. AVX2 (AMD EPYC Zen 3, one core, float32,
#: GFLOP/s, packed by :func:`copy_panel_rows` -> in place, two alternated runs): 32x75 @
#: 75x1152 on 15 KB of planes (first5x5) 75-77 -> 86-89, 32x144 @ 144x1088 (72 KB) 76 -> 87,
#: 64x288 @ 288x288 (40 KB) 87 -> 95, 64x576 @ 576x840 (225 KB) 58-86 -> 90-91, 128x1152 @
#: 1152x840 (450 KB) 86-88 -> 89-90. Whole layers (2 threads, forward ms, with the slower
#: copy of slices before copy_panel_rows): first5x5 1.84 -> 1.45-1.54, Inception's 1x7 (195 KB)
#: 7.75 -> 7.23, but ResNet's 16x64x56x56 stride 2 (841 KB of phase planes) 13.9 -> 15.0. AVX-512
#: is held to planes that fit in L1: there a 16x256x14x14 3x3 layer's planes (256 KB) read in
#: place ran 0.93x its explicit columns (before the short tiles), and nothing between was
#: measured.
IN_PLACE_MAX_BYTES_BY_WIDTH = {512: 32 * 2**10, 256: 512 * 2**10, 128: 512 * 2**10}

#: :func:`own_gemm_pays`' bounds, from single-threaded float32 products at convolution sizes
#: (M x K @ K x N, this module against OpenBLAS 0.3.x's sgemm, 2026-11-27, AVX-512): with fewer
#: than 32 rows or M*K under 1536 the tile's fixed costs (C loads and stores, an edge panel)
#: outweigh its K loop, and OpenBLAS's small-matrix kernels won (8x9x784: 0.6x, 32x32x784:
#: 0.75x, 4x576x784: 0.8x); above both it won (32x75x1024: 1.4x, 64x27x3136: 1.3x,
#: 64x576x448: 1.3x, 256x256x256: 1.05x) or drew (128x576x784).
OWN_GEMM_MIN_ROWS = 32
OWN_GEMM_MIN_PRODUCT = 1536

#: ... and products whose rows of B and C are longer than this many bytes went to BLAS, which
#: blocks its panels of B for the cache where :func:`gemm_nn` streams each row of B and C.
#: float32: 576x64 @ 64x16000 (a 1-D layer's gradient columns) ran at 77 GFLOP/s against
#: OpenBLAS's 126, 576x64 @ 64x4000 at 152 against 147 (im2col's forward pass cuts such rows
#: into segments, see ``im2col.row_segment``). float64, 2 threads, ms forward / backward,
#: micro-kernel -> BLAS on ResNet's 1x1 layers (56x56 images: 3136 columns, 25 KB rows):
#: 16x256 -> 64 filters 27.3-27.6 / 54-57 -> 14.8-15.1 / 39.5, 16x64 -> 256 30-31 / 47 ->
#: 22-24 / 36-37; in float32 (12.5 KB rows) the micro-kernel kept them (forward 10.3-11.0
#: against 14.5-14.9 ms on BLAS).
OWN_GEMM_MAX_ROW_BYTES = 16 * 2**10

#: ... and so did products whose left operand exceeds this many elements (the deepest layers:
#: 512 filters x 4608 taps, at 196 columns 0.86x OpenBLAS, at 49 0.91-0.96x), while 256 x 2304
#: drew (0.93-1.10x over 196-784 columns) and 64 x 3136 won (1.26-1.29x at 576 columns).
OWN_GEMM_MAX_PRODUCT = 2**20

#: ... and so did products with a transposed left operand (its rows strided, its columns
#: contiguous: im2col's filters in the input gradient) at least this deep and with more than
#: OWN_GEMM_MAX_TRANSPOSED_PRODUCT elements: :func:`tile_nn` broadcasts each of its K columns
#: from its own cache line (at power-of-two row lengths from its own page), where OpenBLAS packs
#: it. Single-threaded float32, transposed ``a``, this module / OpenBLAS in GFLOP/s: 2048x256 @
#: 256x256 113 / 156, 1152x128 @ 128x784 104 / 127, 288x256 @ 256x784 144 / 163; drawn at
#: 256x128 @ 128x784 (161 / 166) and 576x128 @ 128x448 (145 / 148); won at depth 64
#: (1152x64 @ 64x784 133-148 / 116-122) and at 128x128 @ 128x784 (164 / 159). float64 alike:
#: 2048x256 @ 256x256 42 / 64. DCGAN's transposed 4x4 layer ran 7.3-7.4 -> 6.7 ms forward.
OWN_GEMM_TRANSPOSED_MIN_DEPTH = 128
OWN_GEMM_MAX_TRANSPOSED_PRODUCT = 2**15

#: The vector widths on which :func:`own_gemm_pays` lets the micro-kernel run the products of
#: ``im2col``'s and ``taps``' filters with columns or input rows, in float32: AVX-512 and AVX2
#: (float64: :data:`OWN_GEMM_FLOAT64_MIN_VECTOR_BITS`). On AVX2 (``lscpu`` "AMD EPYC", family
#: 25 model 1: Zen 3 under KVM, 32 KiB L1d, 2 cores) the 6 x 2 tile first lost to OpenBLAS's
#: Zen kernels on every product (2026-11-28: 0.56-0.96x; the cube 70 against 80 GFLOP/s, 256x64
#: @ 64x3136 31 against 55), and ``im2col``'s and ``taps``' layers ran up to 3x faster on BLAS
#: (ResNet's 16x256x56x56 1x1 reduce 61-65 -> 19-20 ms forward). Since the short tiles, in-place
#: rows and vector panel copies (2026-12-06) it matches or beats OpenBLAS there (256x64 @
#: 64x3136 88 against 78 GFLOP/s, one core), and the forward passes gained: float32, 2 threads,
#: auto, medians of 11 alternating rounds, ms, BLAS -> micro-kernel: ResNet's 16x256x14x14 1x1
#: 1.35 -> 1.21, 16x64x56x56 1x1 stride 2 2.76 -> 2.29, 16x256x56x56 1x1 13.35 -> 12.66,
#: 16x64x56x56 1x1 to 256 15.08 -> 14.82, Inception's 7x1 (taps) 6.70 -> 6.13, DeepLab's
#: dilation 12 (taps) 21.2 -> 21.2, 16x512x7x7 3x3 24.2 -> 23.8, mnist 0.75 -> 0.75; their
#: backward passes (grad-x products) 0.98-1.03x. 128-bit targets keep BLAS. Derived from
#: :data:`VECTOR_BITS` alone, so from Numba's cache key (see the module's docstring).
#: Winograd's products and implicit GEMM ask :func:`own_gemm_size_pays` instead, on every
#: target: there, two lanes each calling OpenBLAS for many small products lost to the
#: micro-kernel even when the tile lost on its own (Zen 3, zoo runs, ms: cifar forward 20
#: against 27, ResNet's 16x64x56x56 3x3 forward 23 against 30, first5x5 4.3 against 5.3).
OWN_GEMM_MIN_VECTOR_BITS = 256
OWN_GEMM_ON_THIS_TARGET = VECTOR_BITS >= OWN_GEMM_MIN_VECTOR_BITS

#: ... in float64: AVX-512 only. On AVX2 (same machine and run, medians of 9 rounds, float64,
#: ms, BLAS -> micro-kernel) the forward passes were mixed: 16x256x14x14 1x1 1.63 -> 1.50,
#: but 16x64x56x56 1x1 stride 2 4.34 -> 4.63 and DeepLab's dilation 12 (taps) 41.7 -> 47.1;
#: 16x256x56x56 1x1 23.6 -> 23.2, Inception's 7x1 12.6 -> 12.2, 16x512x7x7 3x3 69.2 -> 69.1.
OWN_GEMM_FLOAT64_MIN_VECTOR_BITS = 512
OWN_GEMM_FLOAT64_ON_THIS_TARGET = VECTOR_BITS >= OWN_GEMM_FLOAT64_MIN_VECTOR_BITS

#: ... and on which the products with a transposed operand run on it: grad-w's (``grad_y @
#: columns.T``, :func:`own_weight_gradient`) and grad-x's transposed filters
#: (:func:`own_gemm_pays_transposed`): AVX-512 only. On AVX2 (Zen 3, same run, with the
#: float32 products above on the micro-kernel too) they were mixed against OpenBLAS: backward
#: ms, 16x256x14x14 1x1 1.82 -> 1.70, 16x64x56x56 1x1 to 256 26.2 -> 23.9, but 16x512x7x7 3x3
#: 47.1 -> 51.9 and mnist 1.85 -> 1.95.
OWN_TRANSPOSED_GEMM_MIN_VECTOR_BITS = 512
OWN_TRANSPOSED_GEMM_ON_THIS_TARGET = VECTOR_BITS >= OWN_TRANSPOSED_GEMM_MIN_VECTOR_BITS

#: ... and products of M*K*N up to this went to BLAS too: OpenBLAS's AVX-512 builds run them
#: with kernels that skip packing (see ``im2col.SMALL_GEMM_SIZE``), which beat the tile on
#: Winograd's and thin bands' narrow products (64x64x196: 167 against 125 GFLOP/s, 32x75x224:
#: 185 against 142), while just above it the tile won (64x64x392: 1.13x, 32x75x1024: 1.35x).
OWN_GEMM_MIN_VOLUME = 1_000_000

#: The rows past the last full MR-row tile run on short tiles (:func:`tile_nn_short` and its
#: twins). Where fewer than this many are left (1 or 2: AVX2's 6-row tile on M = 32, 128, 512),
#: the last full tile's rows join them and the MR + 1 or MR + 2 rows run as two short tiles of
#: about half that (:func:`_row_tiles`; 4 + 4 rows for 8): a 2-row tile keeps 4 accumulators,
#: too few to hide the FMA's latency (4 cycles on each of 2 pipes wants 8 in flight), a 4-row
#: tile 8. The bits do not change (see the module's docstring: an element's sums do not depend
#: on its tile). AMD EPYC Zen 3, one core, float32, GFLOP/s of M = 128 rows against the first
#: 126 alone (no short tile), the two alternating in one process, 2-row tile -> 4 + 4 rows:
#: ResNet's 16x64x56x56 stride-2 implicit product, 128x576 @ 576x812 packed, 0.93-0.94 ->
#: 0.97-0.99; first5x5's 32x75 @ 75x1152 in place (M = 32 against 30) 0.88-0.90 both ways
#: (75 deep, the short tiles' calls cost as much as their latency).
SPLIT_REST_BELOW = 3


def nn_tile(dtype) -> tuple[int, int]:
    """``(MR, NR)``: rows and columns of :func:`tile_nn`'s tile for a NumPy dtype."""
    mr, nv = NN_TILES[VECTOR_BITS]
    return mr, nv * VECTOR_BITS // (8 * np.dtype(dtype).itemsize)


def _float_ir(dtype):
    if dtype == types.float32:
        return ir.FloatType(), "f32", 4
    if dtype == types.float64:
        return ir.DoubleType(), "f64", 8
    raise TypeError(f"microkernel tiles take float32 or float64 arrays, not {dtype}")


def _data_pointer(context, builder, array_type, array):
    return context.make_array(array_type)(context, builder, array).data


def _as_i64(context, builder, values, value_types):
    return [
        context.cast(builder, v, t, types.int64) for v, t in zip(values, value_types, strict=True)
    ]


def _fma(builder, vector_type, suffix):
    fn_type = ir.FunctionType(vector_type, [vector_type] * 3)
    return cgutils.get_or_insert_function(builder.module, fn_type, f"llvm.fma.{suffix}")


def _store_tile(builder, pointers, values, accumulate, align):
    """Store ``values`` at ``pointers``, adding what is there when ``accumulate`` (an i1)."""
    with builder.if_else(accumulate) as (add, overwrite):
        with add:
            for ptr, value in zip(pointers, values, strict=True):
                old = builder.load(ptr, align=align)
                builder.store(builder.fadd(old, value), ptr, align=align)
        with overwrite:
            for ptr, value in zip(pointers, values, strict=True):
                builder.store(value, ptr, align=align)


def _emit_tile(
    context, builder, dtype, a_row_at, a_col_, b_row_at, pc, c_row_, depth_, acc_, nv=None,
    rows=None,
):  # fmt: skip
    """The IR of one register tile: ``MR x NV`` vector accumulators carried as phis through the
    loop over ``k < depth_``, each step broadcasting element ``k`` (``a_col_`` apart) of each of
    A's MR rows (row ``i`` at ``a_row_at(builder, i)``, a pointer) and loading NV vectors of B's
    row ``k`` (``b_row_at(builder, k)``), then the tile stored (or added, when ``acc_``) at
    ``pc``, rows ``c_row_`` apart. ``nv``, ``rows``: fewer vectors per row, or fewer rows, than
    the tile's (a narrow tile for a ragged last panel, a short one for the last M % MR rows)."""
    elem, suffix, align = _float_ir(dtype)
    tile_rows, tile_nv = NN_TILES[VECTOR_BITS]
    nv = tile_nv if nv is None else nv
    rows = tile_rows if rows is None else rows
    lanes = VECTOR_BITS // (8 * align)
    vec = ir.VectorType(elem, lanes)
    vec_ptr = vec.as_pointer()
    i64 = ir.IntType(64)
    fma = _fma(builder, vec, f"v{lanes}{suffix}")
    zero = ir.Constant(vec, [0.0] * lanes)
    undef = ir.Constant(vec, ir.Undefined)
    splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    a_rows = [a_row_at(builder, i) for i in range(rows)]

    entry = builder.block
    loop = builder.append_basic_block("tile_nn.loop")
    done = builder.append_basic_block("tile_nn.done")
    builder.cbranch(builder.icmp_signed(">", depth_, ir.Constant(i64, 0)), loop, done)

    builder.position_at_end(loop)
    k = builder.phi(i64, "k")
    k.add_incoming(ir.Constant(i64, 0), entry)
    accs = [[builder.phi(vec) for _ in range(nv)] for _ in range(rows)]
    for row in accs:
        for phi in row:
            phi.add_incoming(zero, entry)
    b_k = b_row_at(builder, k)
    b_vecs = [
        builder.load(
            builder.bitcast(builder.gep(b_k, [ir.Constant(i64, lanes * v)]), vec_ptr), align=align
        )
        for v in range(nv)
    ]
    a_k = builder.mul(k, a_col_)
    updated = []
    for i in range(rows):
        a_value = builder.load(builder.gep(a_rows[i], [a_k]), align=align)
        splat = builder.shuffle_vector(
            builder.insert_element(undef, a_value, ir.Constant(i64, 0)), undef, splat_mask
        )
        updated.append([builder.call(fma, [splat, b_vecs[v], accs[i][v]]) for v in range(nv)])
    k_next = builder.add(k, ir.Constant(i64, 1))
    loop_end = builder.block
    k.add_incoming(k_next, loop_end)
    for i in range(rows):
        for v in range(nv):
            accs[i][v].add_incoming(updated[i][v], loop_end)
    builder.cbranch(builder.icmp_signed("<", k_next, depth_), loop, done)

    builder.position_at_end(done)
    values = []  # the phis first: LLVM wants them at the top of the block
    for i in range(rows):
        for v in range(nv):
            result = builder.phi(vec)
            result.add_incoming(zero, entry)
            result.add_incoming(updated[i][v], loop_end)
            values.append(result)
    pointers = []
    for i in range(rows):
        c_i = builder.gep(pc, [builder.mul(c_row_, ir.Constant(i64, i))])
        for v in range(nv):
            pointers.append(
                builder.bitcast(builder.gep(c_i, [ir.Constant(i64, lanes * v)]), vec_ptr)
            )
    _store_tile(builder, pointers, values, acc_, align)


def _strided_rows(pa, a_row_):
    """``a_row_at`` of :func:`_emit_tile` for rows ``a_row_`` elements apart from ``pa``."""

    def a_row_at(builder, i):
        return builder.gep(pa, [builder.mul(a_row_, ir.Constant(ir.IntType(64), i))])

    return a_row_at


def _strided_tile_codegen(nv, short=False):
    """The codegen of :func:`tile_nn` (``nv`` None: the tile's vectors per row), of
    :func:`tile_nn_narrow` (``nv`` 1) and of :func:`tile_nn_short` (``short``: a last
    argument, the rows): A's rows and B's rows at fixed strides."""

    def codegen(context, builder, signature, args):
        tys = signature.args
        a_, a_off_, a_row_, a_col_, b_, b_off_, b_row_, c_, c_off_, c_row_, depth_, acc_ = args[:12]
        a_off_, a_row_, a_col_, b_off_, b_row_, c_off_, c_row_, depth_ = _as_i64(
            context,
            builder,
            (a_off_, a_row_, a_col_, b_off_, b_row_, c_off_, c_row_, depth_),
            (tys[1], tys[2], tys[3], tys[5], tys[6], tys[8], tys[9], tys[10]),
        )
        pa = builder.gep(_data_pointer(context, builder, tys[0], a_), [a_off_])
        pb = builder.gep(_data_pointer(context, builder, tys[4], b_), [b_off_])
        pc = builder.gep(_data_pointer(context, builder, tys[7], c_), [c_off_])

        def b_row_at(builder, k):
            return builder.gep(pb, [builder.mul(k, b_row_)])

        accumulate_ = context.cast(builder, acc_, tys[11], types.boolean)

        def emit(rows=None):
            _emit_tile(
                context, builder, tys[0].dtype, _strided_rows(pa, a_row_), a_col_, b_row_at,
                pc, c_row_, depth_, accumulate_, nv=nv, rows=rows,
            )  # fmt: skip

        if short:
            (rows_,) = _as_i64(context, builder, (args[12],), (tys[12],))
            _emit_short_tile(builder, rows_, emit)
        else:
            emit()
        return context.get_dummy_value()

    return codegen


@intrinsic
def tile_nn(typingctx, a, a_off, a_row, a_col, b, b_off, b_row, c, c_off, c_row, depth, accumulate):
    """``C[c_off + i*c_row + j] (+)= sum_{k < depth} A[a_off + i*a_row + k*a_col] *
    B[b_off + k*b_row + j]`` for ``i < MR``, ``j < NR`` (:func:`nn_tile`), in flat element
    offsets into the arrays' data. Adds to C when ``accumulate``, else overwrites it. No bounds
    checks: the caller keeps every offset inside its array. ``depth`` may be 0 (C gets zeros or
    stays)."""
    if not (a.dtype == b.dtype == c.dtype):
        return None
    sig = types.void(a, a_off, a_row, a_col, b, b_off, b_row, c, c_off, c_row, depth, accumulate)
    return sig, _strided_tile_codegen(None)


@intrinsic
def tile_nn_narrow(
    typingctx, a, a_off, a_row, a_col, b, b_off, b_row, c, c_off, c_row, depth, accumulate
):  # fmt: skip
    """:func:`tile_nn` on one vector of columns (NR / NV of them): for a ragged last panel of at
    most that many columns, which the full tile would compute NV times over. The same sums, in
    the same order, for each element it computes."""
    if not (a.dtype == b.dtype == c.dtype):
        return None
    sig = types.void(a, a_off, a_row, a_col, b, b_off, b_row, c, c_off, c_row, depth, accumulate)
    return sig, _strided_tile_codegen(1)


def _emit_short_tile(builder, rows_, emit):
    """Branch on the run-time ``rows_`` (an i64, 1 to MR - 1) to a tile of that many rows,
    ``emit(rows)`` writing its IR; other values do nothing. (One tile per row count: each is
    compiled wherever this is, so the drivers call it from one place.)"""
    mr = NN_TILES[VECTOR_BITS][0]
    exit_ = builder.append_basic_block("tile_short.exit")
    switch = builder.switch(rows_, exit_)
    for rows in range(1, mr):
        block = builder.append_basic_block(f"tile_short.{rows}")
        switch.add_case(ir.Constant(rows_.type, rows), block)
        builder.position_at_end(block)
        emit(rows)
        builder.branch(exit_)
    builder.position_at_end(exit_)


@intrinsic
def tile_nn_short(
    typingctx, a, a_off, a_row, a_col, b, b_off, b_row, c, c_off, c_row, depth, accumulate, rows
):  # fmt: skip
    """:func:`tile_nn` on its first ``rows`` rows (1 to MR - 1): the rows of a product past
    its last full tile (:func:`_row_tiles`). Each element gets the same sums, in the same order,
    as in the full tile, so a product's bits do not depend on which rows share a tile."""
    if not (a.dtype == b.dtype == c.dtype):
        return None
    sig = types.void(
        a, a_off, a_row, a_col, b, b_off, b_row, c, c_off, c_row, depth, accumulate, rows
    )
    return sig, _strided_tile_codegen(None, short=True)


def _table_tile_codegen(short):
    """The codegen of :func:`tile_nn_rows` (``short`` False) and :func:`tile_nn_rows_short`
    (True: a last argument, the rows): B's rows through a table of offsets."""

    def codegen(context, builder, signature, args):
        tys = signature.args
        (a_, a_off_, a_row_, a_col_, b_, b_rows_, rows_off_, b_col_, c_, c_off_, c_row_, depth_,
         acc_) = args[:13]  # fmt: skip
        a_off_, a_row_, a_col_, rows_off_, b_col_, c_off_, c_row_, depth_ = _as_i64(
            context,
            builder,
            (a_off_, a_row_, a_col_, rows_off_, b_col_, c_off_, c_row_, depth_),
            (tys[1], tys[2], tys[3], tys[6], tys[7], tys[9], tys[10], tys[11]),
        )
        pa = builder.gep(_data_pointer(context, builder, tys[0], a_), [a_off_])
        pb = builder.gep(_data_pointer(context, builder, tys[4], b_), [b_col_])
        p_rows = builder.gep(_data_pointer(context, builder, tys[5], b_rows_), [rows_off_])
        pc = builder.gep(_data_pointer(context, builder, tys[8], c_), [c_off_])

        def b_row_at(builder, k):
            return builder.gep(pb, [builder.load(builder.gep(p_rows, [k]), align=8)])

        accumulate_ = context.cast(builder, acc_, tys[12], types.boolean)

        def emit(rows=None):
            _emit_tile(
                context, builder, tys[0].dtype, _strided_rows(pa, a_row_), a_col_, b_row_at, pc,
                c_row_, depth_, accumulate_, rows=rows,
            )  # fmt: skip

        if short:
            (rows_,) = _as_i64(context, builder, (args[13],), (tys[13],))
            _emit_short_tile(builder, rows_, emit)
        else:
            emit()
        return context.get_dummy_value()

    return codegen


@intrinsic
def tile_nn_rows(
    typingctx, a, a_off, a_row, a_col, b, b_rows, rows_off, b_col, c, c_off, c_row, depth,
    accumulate,
):  # fmt: skip
    """:func:`tile_nn` with B's rows anywhere in ``b``: row ``k`` starts at element
    ``b_rows[rows_off + k] + b_col`` of ``b``'s data (``b_rows`` an int64 array). For implicit
    GEMM: B's rows are windows of an image, no columns copied. No bounds checks."""
    if not (a.dtype == b.dtype == c.dtype) or b_rows.dtype != types.int64:
        return None
    sig = types.void(
        a, a_off, a_row, a_col, b, b_rows, rows_off, b_col, c, c_off, c_row, depth, accumulate
    )
    return sig, _table_tile_codegen(False)


@intrinsic
def tile_nn_rows_short(
    typingctx, a, a_off, a_row, a_col, b, b_rows, rows_off, b_col, c, c_off, c_row, depth,
    accumulate, rows,
):  # fmt: skip
    """:func:`tile_nn_rows` on its first ``rows`` rows (1 to MR - 1), as :func:`tile_nn_short`."""
    if not (a.dtype == b.dtype == c.dtype) or b_rows.dtype != types.int64:
        return None
    sig = types.void(
        a, a_off, a_row, a_col, b, b_rows, rows_off, b_col, c, c_off, c_row, depth, accumulate,
        rows,
    )  # fmt: skip
    return sig, _table_tile_codegen(True)


def _rows_tile_codegen(short):
    """The codegen of :func:`tile_rows_nn` (``short`` False) and :func:`tile_rows_nn_short`
    (True: a last argument, the rows)."""

    def codegen(context, builder, signature, args):
        tys = signature.args
        (a_, a_rows_, rows_off_, a_col_, b_, b_off_, b_row_, c_, c_off_, c_row_, depth_,
         acc_) = args[:12]  # fmt: skip
        rows_off_, a_col_, b_off_, b_row_, c_off_, c_row_, depth_ = _as_i64(
            context,
            builder,
            (rows_off_, a_col_, b_off_, b_row_, c_off_, c_row_, depth_),
            (tys[2], tys[3], tys[5], tys[6], tys[8], tys[9], tys[10]),
        )
        i64 = ir.IntType(64)
        pa = builder.gep(_data_pointer(context, builder, tys[0], a_), [a_col_])
        p_rows = builder.gep(_data_pointer(context, builder, tys[1], a_rows_), [rows_off_])
        pb = builder.gep(_data_pointer(context, builder, tys[4], b_), [b_off_])
        pc = builder.gep(_data_pointer(context, builder, tys[7], c_), [c_off_])

        def a_row_at(builder, i):
            start = builder.load(builder.gep(p_rows, [ir.Constant(i64, i)]), align=8)
            return builder.gep(pa, [start])

        def b_row_at(builder, k):
            return builder.gep(pb, [builder.mul(k, b_row_)])

        accumulate_ = context.cast(builder, acc_, tys[11], types.boolean)

        def emit(rows=None):
            _emit_tile(
                context, builder, tys[0].dtype, a_row_at, ir.Constant(i64, 1), b_row_at, pc,
                c_row_, depth_, accumulate_, rows=rows,
            )  # fmt: skip

        if short:
            (rows_,) = _as_i64(context, builder, (args[12],), (tys[12],))
            _emit_short_tile(builder, rows_, emit)
        else:
            emit()
        return context.get_dummy_value()

    return codegen


@intrinsic
def tile_rows_nn(
    typingctx, a, a_rows, rows_off, a_col, b, b_off, b_row, c, c_off, c_row, depth, accumulate
):  # fmt: skip
    """:func:`tile_nn` with A's rows anywhere in ``a``: row ``i`` is ``depth`` consecutive
    elements from element ``a_rows[rows_off + i] + a_col`` of ``a``'s data (``a_rows`` an int64
    array). For implicit GEMM's weight gradient, whose left operand's rows are windows of an
    image. No bounds checks."""
    if not (a.dtype == b.dtype == c.dtype) or a_rows.dtype != types.int64:
        return None
    sig = types.void(
        a, a_rows, rows_off, a_col, b, b_off, b_row, c, c_off, c_row, depth, accumulate
    )
    return sig, _rows_tile_codegen(False)


@intrinsic
def tile_rows_nn_short(
    typingctx, a, a_rows, rows_off, a_col, b, b_off, b_row, c, c_off, c_row, depth, accumulate,
    rows,
):  # fmt: skip
    """:func:`tile_rows_nn` on its first ``rows`` rows (1 to MR - 1), as
    :func:`tile_nn_short`."""
    if not (a.dtype == b.dtype == c.dtype) or a_rows.dtype != types.int64:
        return None
    sig = types.void(
        a, a_rows, rows_off, a_col, b, b_off, b_row, c, c_off, c_row, depth, accumulate, rows
    )
    return sig, _rows_tile_codegen(True)


def _emit_panel_copy(builder, dtype, b_row_at, pd, depth_):
    """The IR of a panel copy: for ``k < depth_``, the NV vectors of B's row ``k``
    (``b_row_at(builder, k)``, a pointer) stored at ``pd + k*NR``, contiguous."""
    elem, _, align = _float_ir(dtype)
    lanes = VECTOR_BITS // (8 * align)
    nv = NN_TILES[VECTOR_BITS][1]
    vec_ptr = ir.VectorType(elem, lanes).as_pointer()
    i64 = ir.IntType(64)
    entry = builder.block
    loop = builder.append_basic_block("panel_copy.loop")
    done = builder.append_basic_block("panel_copy.done")
    builder.cbranch(builder.icmp_signed(">", depth_, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(i64, "k")
    k.add_incoming(ir.Constant(i64, 0), entry)
    src = b_row_at(builder, k)
    dst = builder.gep(pd, [builder.mul(k, ir.Constant(i64, nv * lanes))])
    for v in range(nv):
        offset = [ir.Constant(i64, lanes * v)]
        value = builder.load(builder.bitcast(builder.gep(src, offset), vec_ptr), align=align)
        builder.store(value, builder.bitcast(builder.gep(dst, offset), vec_ptr), align=align)
    k_next = builder.add(k, ir.Constant(i64, 1))
    k.add_incoming(k_next, builder.block)
    builder.cbranch(builder.icmp_signed("<", k_next, depth_), loop, done)
    builder.position_at_end(done)


@intrinsic
def copy_panel(typingctx, b, b_off, b_row, dst, depth):
    """``dst[k, :NR] = B[b_off + k*b_row : ... + NR]`` for ``k < depth``: a full panel of B,
    packed contiguous, NR (:func:`nn_tile`) elements a row, by whole vectors. (As a Numba loop
    over slices of runtime length a row cost about 10 cycles: a 75-row panel 254 ns.) No bounds
    checks: ``dst`` holds ``depth`` x NR elements and every row of B NR."""
    if not (b.dtype == dst.dtype):
        return None
    sig = types.void(b, b_off, b_row, dst, depth)

    def codegen(context, builder, signature, args):
        tys = signature.args
        b_, b_off_, b_row_, dst_, depth_ = args
        b_off_, b_row_, depth_ = _as_i64(
            context, builder, (b_off_, b_row_, depth_), (tys[1], tys[2], tys[4])
        )
        pb = builder.gep(_data_pointer(context, builder, tys[0], b_), [b_off_])

        def b_row_at(builder, k):
            return builder.gep(pb, [builder.mul(k, b_row_)])

        pd = _data_pointer(context, builder, tys[3], dst_)
        _emit_panel_copy(builder, tys[0].dtype, b_row_at, pd, depth_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_panel_rows(typingctx, b, b_rows, rows_off, b_col, dst, depth):
    """:func:`copy_panel` with B's rows through a table, as :func:`tile_nn_rows`: row ``k`` at
    element ``b_rows[rows_off + k] + b_col`` of ``b``."""
    if not (b.dtype == dst.dtype) or b_rows.dtype != types.int64:
        return None
    sig = types.void(b, b_rows, rows_off, b_col, dst, depth)

    def codegen(context, builder, signature, args):
        tys = signature.args
        b_, b_rows_, rows_off_, b_col_, dst_, depth_ = args
        rows_off_, b_col_, depth_ = _as_i64(
            context, builder, (rows_off_, b_col_, depth_), (tys[2], tys[3], tys[5])
        )
        pb = builder.gep(_data_pointer(context, builder, tys[0], b_), [b_col_])
        p_rows = builder.gep(_data_pointer(context, builder, tys[1], b_rows_), [rows_off_])

        def b_row_at(builder, k):
            return builder.gep(pb, [builder.load(builder.gep(p_rows, [k]), align=8)])

        pd = _data_pointer(context, builder, tys[4], dst_)
        _emit_panel_copy(builder, tys[0].dtype, b_row_at, pd, depth_)
        return context.get_dummy_value()

    return sig, codegen


# The tile shapes as plain globals, which Numba freezes into the compiled drivers.
NN_ROWS, NN_VECTORS = NN_TILES[VECTOR_BITS]
IN_PLACE_MAX_BYTES = IN_PLACE_MAX_BYTES_BY_WIDTH[VECTOR_BITS]
VECTOR_BYTES = VECTOR_BITS // 8


@njit(cache=True, inline="always")
def own_gemm_pays(rows, depth, columns, itemsize):
    """Whether :func:`gemm_nn` beats BLAS on a ``rows x depth`` by ``depth x columns`` product of
    ``itemsize``-byte floats, on this target (:data:`OWN_GEMM_ON_THIS_TARGET`, in float64
    :data:`OWN_GEMM_FLOAT64_ON_THIS_TARGET`)."""
    on_target = OWN_GEMM_FLOAT64_ON_THIS_TARGET if itemsize == 8 else OWN_GEMM_ON_THIS_TARGET
    return on_target and own_gemm_size_pays(rows, depth, columns, itemsize)


def own_weight_gradient() -> bool:
    """Whether the grad-w products (``grad_y @ columns.T``) of im2col and taps run on the
    micro-kernel rather than BLAS: on AVX-512 targets (:data:`OWN_TRANSPOSED_GEMM_ON_THIS_TARGET`)
    whose OpenBLAS does not run its AVX-512 kernels
    (:func:`numbaconv._threading.blas_runs_avx512`).

    Measured on AMD EPYC Zen 5, 2 threads: products alone (4 jobs of single-threaded products,
    GFLOP/s, BLAS / micro-kernel), with OpenBLAS's AVX2 ``Haswell`` kernels, float32 256x128 @
    128x2048 232 / 448, 512x49 @ 49x4608 201 / 463, 64x784 @ 784x576 197 / 278, 64x12544 @
    12544x256 179 / 213, float64 91-119 / 161-233; with its AVX-512 ``SkylakeX`` kernels, float32
    364 / 420, 274 / 425, 300 / 262, 295 / 253 (mixed), float64 123-177 / 149-226. grad-w alone in
    the fused bands, ms, BLAS -> micro-kernel: under ``Haswell`` DCGAN's 16x256x8x8 4x4 stride-2
    layer 6.53 -> 4.56, U-Net's 2x2 6.34 -> 4.69, ResNet's 16x256x14x14 3x3 18.6 -> 11.7 (float64
    12.3 -> 8.7, 11.7 -> 8.4, 33.8 -> 21.3); under ``SkylakeX`` 4.57 / 4.73, 4.92 / 4.80, 11.3 /
    11.6 (float64 8.5 / 8.9, 9.8 / 9.0, 21.5 / 20.0): a draw, so BLAS stays there, as on
    Sapphire Rapids, where its AVX-512 kernels ran im2col's band products at 150-200 GFLOP/s per
    core against 110-150. The BLAS a process loads is a run-time fact, not in Numba's cache key,
    so the kernels take the answer as an argument."""
    return OWN_TRANSPOSED_GEMM_ON_THIS_TARGET and not blas_runs_avx512()


@njit(cache=True, inline="always")
def own_gemm_size_pays(rows, depth, columns, itemsize):
    """:func:`own_gemm_pays`' bounds on the product's size (measured on AVX-512), on every
    target: what Winograd's products and implicit GEMM ask (see OWN_GEMM_MIN_VECTOR_BITS)."""
    return (
        rows >= OWN_GEMM_MIN_ROWS
        and OWN_GEMM_MIN_PRODUCT <= rows * depth <= OWN_GEMM_MAX_PRODUCT
        and columns * itemsize <= OWN_GEMM_MAX_ROW_BYTES
        and rows * depth * columns > OWN_GEMM_MIN_VOLUME
    )


@njit(cache=True, inline="always")
def own_gemm_pays_transposed(rows, depth, columns, itemsize):
    """:func:`own_gemm_pays` for a left operand that is a transposed view (its rows strided,
    its columns contiguous), such as im2col's filters in the input gradient."""
    # The gate is read here, not through own_gemm_pays: called from Python (``py_func``, as the
    # tests do), this body would reach the compiled own_gemm_pays, whose gate is frozen.
    return (
        OWN_TRANSPOSED_GEMM_ON_THIS_TARGET and own_gemm_size_pays(rows, depth, columns, itemsize)
    ) and (depth < OWN_GEMM_TRANSPOSED_MIN_DEPTH or rows * depth <= OWN_GEMM_MAX_TRANSPOSED_PRODUCT)


@njit(cache=True, inline="always")
def _row_tiles(m):
    """``(full, short)``: an M-row product runs full MR-row tiles over its first ``full * MR``
    rows, then short tiles of ``short`` rows (the last one fewer) over the rest: one, or two
    where fewer than :data:`SPLIT_REST_BELOW` rows would be left for it."""
    mr = NN_ROWS
    full, rest = m // mr, m % mr
    if 0 < rest < SPLIT_REST_BELOW and full > 0:
        return full - 1, (mr + rest + 1) // 2
    return full, mr - 1


def row_blocks(m: int) -> list[tuple[int, int]]:
    """``(first row, rows)`` of each block of rows that the tiles of an M-row product take, in
    order (:func:`_row_tiles`): the layout of :func:`pack_rows`."""
    full, short = _row_tiles.py_func(m)
    return [(i * NN_ROWS, NN_ROWS) for i in range(full)] + [
        (i0, min(short, m - i0)) for i0 in range(full * NN_ROWS, m, short)
    ]


@njit(cache=True)
def pack_rows(a, out, groups=1):
    """``a`` (M, K) at any strides into ``out`` (M, K, contiguous) laid out for the tiles: the
    block of ``rows`` rows from row ``i0`` (:func:`row_blocks`) fills ``out``'s rows ``i0`` to
    ``i0 + rows``, column by column (element ``(i0 + i, k)`` at ``k*rows + i`` past the block's
    start), so a tile reads its rows of A as one stream instead of MR. Products given
    ``a_packed`` (:func:`gemm_nn_rows`) read it so. With ``groups``, each group's M / groups
    rows are packed as a matrix of their own (a grouped convolution's products)."""
    m, depth = a.shape
    flat = out.reshape(-1)
    m_g = m // groups
    full, short = _row_tiles(m_g)
    for g in range(groups):
        i0 = 0
        while i0 < m_g:
            rows = NN_ROWS if i0 < full * NN_ROWS else min(short, m_g - i0)
            base = (g * m_g + i0) * depth
            for k in range(depth):
                for i in range(rows):
                    flat[base + k * rows + i] = a[g * m_g + i0 + i, k]
            i0 += rows


@njit(cache=True, inline="always")
def _a_block(a, a_packed, i0, rows, k0):
    """``(offset, row step, column step)`` in elements of the block of ``a`` from row ``i0``
    (``rows`` of them, a tile's) and column ``k0``: ``a`` as its strides say, or laid out by
    :func:`pack_rows` when ``a_packed``."""
    if a_packed:
        return i0 * a.shape[1] + k0 * rows, 1, rows
    item = a.itemsize
    a_row, a_col = a.strides[0] // item, a.strides[1] // item
    return i0 * a_row + k0 * a_col, a_row, a_col


@njit(cache=True, inline="always")
def _merge(c, i0, j0, tile, rows, cols, accumulate):
    """``c[i0:i0+rows, j0:j0+cols] (+)= tile[:rows, :cols]``."""
    for i in range(rows):
        dst = c[i0 + i, j0 : j0 + cols]
        src = tile[i]
        if accumulate:
            for j in range(cols):
                dst[j] += src[j]
        else:
            for j in range(cols):
                dst[j] = src[j]


@njit(cache=True)
def _rest_rows(a, a_packed, i0, rows, k0, kb, b, b_off, b_row, c, j0, cols, tile, accumulate):
    """``c[i0:i0+rows, j0:j0+cols] (+)= a[i0:i0+rows, k0:k0+kb] @ B``, B the ``kb x cols``
    block of ``b`` from element ``b_off``, its rows ``b_row`` apart and readable NR columns wide
    (a zero-padded packed panel, or ``b`` in place when ``cols`` is NR): rows past a product's
    last full tile (:func:`_row_tiles`), on a short tile (:func:`tile_nn_short`) into ``tile``,
    then merged. (As plain loops these rows cost more than the tiles: 64 x 576 @ 576 x 1792 ran
    at 43 GFLOP/s against 70 for its first 60 rows alone, AVX2, whose 6-row tile leaves 4 rows
    of every power of two. One call of the tile, in a function of its own, because each holds
    MR - 1 tiles of code.)"""
    nr = tile.shape[1]
    a_off, a_row, a_col = _a_block(a, a_packed, i0, rows, k0)
    tile_nn_short(a, a_off, a_row, a_col, b, b_off, b_row, tile, 0, nr, kb, False, rows)
    _merge(c, i0, j0, tile, rows, cols, accumulate)


@njit(cache=True, inline="always")
def _empty_product(m, n, depth, c, accumulate):
    """Whether an M x K @ K x N product has nothing for the tiles: no output, or K = 0 (then
    ``c`` is zeroed, or left as it is when accumulating)."""
    if m == 0 or n == 0:
        return True
    if depth == 0:
        if not accumulate:
            c[:] = 0
        return True
    return False


@njit(cache=True, inline="always")
def _over_packed_panel(a, a_packed, k0, kb, b_pack, c, j0, cols, tile, accumulate):
    """Every row block of ``a`` (columns ``k0:k0+kb``) over a packed panel ``b_pack`` (kb x NR,
    ``cols`` of them real, the rest zeros) into ``c[:, j0:j0+cols]``: tiles written in place,
    or through ``tile`` and merged for a ragged panel (one vector wide, :func:`tile_nn_narrow`,
    where the ragged columns fit in one), then the rows below the last full tile."""
    m = a.shape[0]
    item = c.itemsize
    mr = NN_ROWS
    nr = b_pack.shape[1]
    narrow = nr // NN_VECTORS  # one vector
    c_row = c.strides[0] // item
    m_full, short = _row_tiles(m)
    for ib in range(m_full):
        a_off, a_row, a_col = _a_block(a, a_packed, ib * mr, mr, k0)
        if cols == nr:
            tile_nn(
                a, a_off, a_row, a_col,
                b_pack, 0, nr, c, ib * mr * c_row + j0, c_row, kb, accumulate,
            )  # fmt: skip
        elif cols == narrow:
            tile_nn_narrow(
                a, a_off, a_row, a_col,
                b_pack, 0, nr, c, ib * mr * c_row + j0, c_row, kb, accumulate,
            )  # fmt: skip
        elif cols < narrow:
            tile_nn_narrow(
                a, a_off, a_row, a_col,
                b_pack, 0, nr, tile, 0, nr, kb, False,
            )  # fmt: skip
            _merge(c, ib * mr, j0, tile, mr, cols, accumulate)
        else:
            tile_nn(
                a, a_off, a_row, a_col,
                b_pack, 0, nr, tile, 0, nr, kb, False,
            )  # fmt: skip
            _merge(c, ib * mr, j0, tile, mr, cols, accumulate)
    for i0 in range(m_full * mr, m, short):
        rows = min(short, m - i0)
        _rest_rows(a, a_packed, i0, rows, k0, kb, b_pack, 0, nr, c, j0, cols, tile, accumulate)


@njit(cache=True)
def gemm_nn(a, b, c, accumulate):
    """``c (+)= a @ b`` with :func:`tile_nn`: ``a`` (M, K) and ``b`` (K, N) at any strides (a
    transposed view is fine), ``c`` (M, N) with unit stride along its rows. Adds to ``c`` when
    ``accumulate``, else overwrites it.

    K is cut into blocks of :data:`K_BLOCK`, each added to ``c`` in turn. Per block, each panel of
    NR columns of ``b`` is read in place when its rows are contiguous, else copied into a
    contiguous panel (a transposed ``b``, and the last, ragged panel, zero-padded), and every
    MR-row block of ``a`` runs over it; a ragged last panel goes through a small tile merged into
    ``c``, and the rows past the last full tile through short tiles (:func:`_row_tiles`,
    :func:`_rest_rows`). Serial: call it from inside a parallel region, one call per lane."""
    m, depth = a.shape
    n = b.shape[1]
    item = c.itemsize
    if b.shape[0] != depth or c.shape[0] != m or c.shape[1] != n:
        raise ValueError("gemm_nn: shapes do not match")
    if _empty_product(m, n, depth, c, accumulate):
        return
    # (Checked after the empty cases: NumPy gives empty arrays zero strides.)
    if n > 1 and c.strides[1] != item:
        raise ValueError("gemm_nn: c needs unit stride along its rows")
    mr = NN_ROWS
    nr = NN_VECTORS * VECTOR_BYTES // item
    a_row, a_col = a.strides[0] // item, a.strides[1] // item
    b_row, c_row = b.strides[0] // item, c.strides[0] // item
    # b's panels are read in place unless PACK_MIN_ROW_BLOCKS row blocks reuse them: a packed,
    # contiguous panel avoids cache-set conflicts between b's rows (power-of-two row lengths)
    # and a TLB entry per row (long rows), and costs one copy of b.
    in_place = (n == 1 or b.strides[1] == item) and m // NN_ROWS < PACK_MIN_ROW_BLOCKS
    m_full, short = _row_tiles(m)
    panels = (n + nr - 1) // nr
    n_rest = n - (panels - 1) * nr
    kb_max = min(K_BLOCK, depth)
    packed = not in_place or n_rest < nr
    b_pack = np.empty((kb_max if packed else 0, nr), c.dtype)
    tile = np.empty((mr if n_rest < nr or m % mr else 0, nr), c.dtype)  # ragged edges
    # K blocks outermost, then panels, then row blocks: a packed or in-place B panel is reused
    # by every row block while it is in L1. (Panels outermost, keeping c's column in cache,
    # re-read all of a per panel: 256^3 ran at 143 GFLOP/s instead of 196.)
    for k0 in range(0, depth, K_BLOCK):
        kb = min(K_BLOCK, depth - k0)
        acc = accumulate or k0 > 0
        for jb in range(panels):
            j0 = jb * nr
            cols = min(nr, n - j0)
            if in_place and cols == nr:
                for ib in range(m_full):
                    tile_nn(
                        a, ib * mr * a_row + k0 * a_col, a_row, a_col,
                        b, k0 * b_row + j0, b_row,
                        c, ib * mr * c_row + j0, c_row, kb, acc,
                    )  # fmt: skip
                for i0 in range(m_full * mr, m, short):
                    _rest_rows(
                        a, False, i0, min(short, m - i0), k0, kb, b, k0 * b_row + j0, b_row,
                        c, j0, cols, tile, acc,
                    )  # fmt: skip
                continue
            # (Loops over 0-based slices: Numba's negative-index checks on b[k, j] keep LLVM
            # from vectorising the copy.)
            if b.strides[1] == item and cols == nr:
                copy_panel(b, k0 * b_row + j0, b_row, b_pack, kb)
            elif b.strides[1] == item:  # rows copied, a ragged last panel zero-padded
                for k in range(kb):
                    src = b[k0 + k, j0 : j0 + cols]
                    dst = b_pack[k]
                    for j in range(cols):
                        dst[j] = src[j]
                    for j in range(cols, nr):
                        dst[j] = 0
            else:  # a transposed b: read along its columns, which are contiguous
                for j in range(cols):
                    src = b[k0 : k0 + kb, j0 + j]
                    dst = b_pack[:kb, j]
                    for k in range(kb):
                        dst[k] = src[k]
                for k in range(kb):
                    dst = b_pack[k]
                    for j in range(cols, nr):
                        dst[j] = 0
            _over_packed_panel(a, False, k0, kb, b_pack, c, j0, cols, tile, acc)


@njit(cache=True)
def gemm_nn_rows(a, b, b_rows, c, accumulate, width=0, b_step=0, a_packed=False):
    """``c (+)= a @ B`` where row ``k`` of B (K, N) is ``b[b_rows[k] : b_rows[k] + N]``: ``b``
    1-D, ``b_rows`` int64 (K,), ``c`` (M, N) with unit stride along its rows, ``a`` (M, K) at
    any strides. Implicit GEMM: the rows of B are windows of an image (see
    ``im2col.padded_planes``), read in place, so no columns are built. The same blocks, tiles
    and edges as :func:`gemm_nn`, in the same order, so each element gets the same bits as
    :func:`gemm_nn` on the explicit B. The caller keeps every row inside ``b``. Serial.

    With ``width`` > 0 (dividing N), row ``k`` of B is N / ``width`` windows of ``width``
    elements, ``b_step`` apart: window ``r`` is ``b[b_rows[k] + r*b_step :][:width]``. (Implicit
    GEMM then computes output rows of their own width straight into ``y``, none of the padded
    width's extra columns.)

    With ``a_packed``, ``a`` (M, K, contiguous) holds A laid out by :func:`pack_rows`: a
    caller that runs many products on the same A packs it once (the transposed forward pass
    stacks its filters so), for the same bits as A itself."""
    m, depth = a.shape
    n = c.shape[1]
    item = c.itemsize
    width = n if width <= 0 else width
    if b_rows.shape[0] != depth or c.shape[0] != m or n % width:
        raise ValueError("gemm_nn_rows: shapes do not match")
    if _empty_product(m, n, depth, c, accumulate):
        return
    if n > 1 and c.strides[1] != item:
        raise ValueError("gemm_nn_rows: c needs unit stride along its rows")
    if a_packed and not a.flags.c_contiguous:
        raise ValueError("gemm_nn_rows: a packed a needs to be contiguous")
    mr = NN_ROWS
    nr = NN_VECTORS * VECTOR_BYTES // item
    c_row = c.strides[0] // item
    m_full, short = _row_tiles(m)
    windows = n // width
    panels = (width + nr - 1) // nr
    n_rest = width - (panels - 1) * nr
    kb_max = min(K_BLOCK, depth)
    b_pack = np.empty((kb_max, nr), c.dtype)
    tile = np.empty((mr if n_rest < nr or m % mr else 0, nr), c.dtype)  # ragged edges
    # Packed when reused, as in gemm_nn: a panel read in place is kb rows spread over the
    # planes, which every row block would fetch again from L2 (16x256x14x14 3x3 forward ran
    # 0.93x the columns path that way); but not when B's rows all lie in a span that stays in
    # L1 (IN_PLACE_MAX_BYTES), where the copy costs more than it saves.
    span = 0
    if m // mr >= PACK_MIN_ROW_BLOCKS:
        lo, hi = b_rows[0], b_rows[0]
        for k in range(depth):
            lo = min(lo, b_rows[k])
            hi = max(hi, b_rows[k])
        span = (hi - lo + (windows - 1) * b_step + width) * item
    pack = m // mr >= PACK_MIN_ROW_BLOCKS and span > IN_PLACE_MAX_BYTES
    for k0 in range(0, depth, K_BLOCK):
        kb = min(K_BLOCK, depth - k0)
        acc = accumulate or k0 > 0
        for jw in range(windows * panels):
            window, jb = jw // panels, jw % panels
            j0 = window * width + jb * nr  # in c
            b_col = window * b_step + jb * nr  # in b, past each row's start
            cols = min(nr, width - jb * nr)
            if cols == nr and not pack:
                for ib in range(m_full):
                    a_off, a_row, a_col = _a_block(a, a_packed, ib * mr, mr, k0)
                    tile_nn_rows(
                        a, a_off, a_row, a_col,
                        b, b_rows, k0, b_col, c, ib * mr * c_row + j0, c_row, kb, acc,
                    )  # fmt: skip
                for i0 in range(m_full * mr, m, short):
                    rows = min(short, m - i0)
                    _rest_rows_in_place(
                        a, a_packed, i0, rows, k0, kb, b, b_rows, b_col, c, j0, acc
                    )  # fmt: skip
                continue
            if cols == nr:
                copy_panel_rows(b, b_rows, k0, b_col, b_pack, kb)
            for k in range(kb if cols < nr else 0):  # zero-padded (0-based slices: see gemm_nn)
                start = b_rows[k0 + k] + b_col
                src = b[start : start + cols]
                dst = b_pack[k]
                for j in range(cols):
                    dst[j] = src[j]
                for j in range(cols, nr):
                    dst[j] = 0
            _over_packed_panel(a, a_packed, k0, kb, b_pack, c, j0, cols, tile, acc)


@njit(cache=True)
def _rest_rows_in_place(a, a_packed, i0, rows, k0, kb, b, b_rows, b_col, c, j0, accumulate):
    """``c[i0:i0+rows, j0:j0+NR] (+)= a[i0:i0+rows, k0:k0+kb] @ B`` with B's rows read in place
    from ``b_col`` past ``b_rows[k0:k0+kb]`` (a full panel): :func:`gemm_nn_rows`' rows past its
    last full tile, stored straight into ``c`` by a short tile (:func:`tile_nn_rows_short`). In
    a function of its own, as :func:`_rest_rows`."""
    c_row = c.strides[0] // c.itemsize
    a_off, a_row, a_col = _a_block(a, a_packed, i0, rows, k0)
    tile_nn_rows_short(
        a, a_off, a_row, a_col, b, b_rows, k0, b_col,
        c, i0 * c_row + j0, c_row, kb, accumulate, rows,
    )  # fmt: skip


@njit(cache=True)
def gemm_rows_nn(a, a_rows, b, c, accumulate):
    """``c (+)= A @ b`` where row ``i`` of A (M, K) is ``a[a_rows[i] : a_rows[i] + K]``: ``a``
    1-D, ``a_rows`` int64 (M,), ``b`` (K, N) at any strides, ``c`` (M, N) with unit stride
    along its rows. The implicit GEMM of a weight gradient, ``grad_w.T (+)= windows @ grad_y.T``,
    whose left operand's rows (one per tap) are windows of an image's padded planes, read in
    place. Blocks of K as in :func:`gemm_nn`, every panel of ``b`` packed (zero-padded when
    ragged) and reused by every row block, the rows past the last full tile on short ones. Each
    element is one FMA per ``k`` in order per block of :data:`K_BLOCK`, as in :func:`gemm_nn`.
    The caller keeps every row inside ``a``. Serial."""
    m = a_rows.shape[0]
    depth, n = b.shape
    item = c.itemsize
    if c.shape[0] != m or c.shape[1] != n:
        raise ValueError("gemm_rows_nn: shapes do not match")
    if _empty_product(m, n, depth, c, accumulate):
        return
    if n > 1 and c.strides[1] != item:
        raise ValueError("gemm_rows_nn: c needs unit stride along its rows")
    mr = NN_ROWS
    nr = NN_VECTORS * VECTOR_BYTES // item
    c_row = c.strides[0] // item
    b_row = b.strides[0] // item
    m_full, short = _row_tiles(m)
    panels = (n + nr - 1) // nr
    n_rest = n - (panels - 1) * nr
    b_pack = np.empty((min(K_BLOCK, depth), nr), c.dtype)
    tile = np.empty((mr if n_rest < nr or m % mr else 0, nr), c.dtype)  # ragged edges
    for k0 in range(0, depth, K_BLOCK):
        kb = min(K_BLOCK, depth - k0)
        acc = accumulate or k0 > 0
        for jb in range(panels):
            j0 = jb * nr
            cols = min(nr, n - j0)
            contiguous = cols == nr and b.strides[1] == item
            if contiguous:
                copy_panel(b, k0 * b_row + j0, b_row, b_pack, kb)
            for k in range(0 if contiguous else kb):  # 0-based slices, as in gemm_nn
                src = b[k0 + k, j0 : j0 + cols]
                dst = b_pack[k]
                for j in range(cols):
                    dst[j] = src[j]
                for j in range(cols, nr):
                    dst[j] = 0
            for ib in range(m_full):
                if cols == nr:
                    tile_rows_nn(
                        a, a_rows, ib * mr, k0, b_pack, 0, nr,
                        c, ib * mr * c_row + j0, c_row, kb, acc,
                    )  # fmt: skip
                else:
                    tile_rows_nn(a, a_rows, ib * mr, k0, b_pack, 0, nr, tile, 0, nr, kb, False)
                    _merge(c, ib * mr, j0, tile, mr, cols, acc)
            for i0 in range(m_full * mr, m, short):
                rows = min(short, m - i0)
                tile_rows_nn_short(a, a_rows, i0, k0, b_pack, 0, nr, tile, 0, nr, kb, False, rows)
                _merge(c, i0, j0, tile, rows, cols, acc)
