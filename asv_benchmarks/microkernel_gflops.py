"""GFLOP/s of numbaconv's own GEMM (numbaconv.kernels.microkernel) against single-threaded
OpenBLAS, and the core's FMA peak, on one core.

    python asv_benchmarks/microkernel_gflops.py [--dtype float32|float64] [--rounds 5]

The peak is a register-only loop of independent ``llvm.fma`` vector operations (no loads or
stores), as wide as the tiles. The products are those of issue "Own the inner loop" and the
convolution-sized GEMMs the kernels call; each is timed alternately with OpenBLAS (SciPy's, via
``np.dot`` in Numba, OPENBLAS_NUM_THREADS=1), best of ``--rounds`` medians of 11 calls.
Unsets OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE, as users have them. Quote ``lscpu``'s model name.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ["OPENBLAS_NUM_THREADS"] = "1"
for _name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(_name, None)

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from numbaconv.kernels import microkernel as mk  # noqa: E402

#: (M, K, N, what): the issue's three products, a cube, and the GEMMs of zoo layers.
PRODUCTS = [
    (256, 256, 256, "cube"),
    (64, 576, 448, "issue: 64x576 @ 576x448"),
    (128, 576, 784, "issue: 128x576 @ 576x784"),
    (32, 75, 1024, "issue: 32x75 @ 75x1024 (first5x5)"),
    (64, 576, 1792, "resnet3x3 band (forward)"),
    (576, 64, 1792, "resnet3x3 band (grad-x columns, a = w.T)"),
    (512, 4608, 196, "resnet_3x3_7, 4 images per GEMM"),
    (256, 64, 3136, "resnet_expand (1x1)"),
]

#: Independent accumulators of the peak loop: more than FMA latency x FMA ports (4 x 2), and,
#: with the loop's two constant vectors, no more than the vector registers (32 on AVX-512, 16
#: on AVX2 and SSE): with 24 on AVX2 they spilled, and the "peak" read 34.7 GFLOP/s where the
#: 256x256x256 product ran at 70 (AMD EPYC, Zen 3).
PEAK_ACCUMULATORS = 24 if mk.VECTOR_BITS >= 512 else 12


@intrinsic
def _fma_loop(typingctx, count, like):
    """``count`` iterations of PEAK_ACCUMULATORS independent vector FMAs, in registers."""
    sig = like.dtype(count, like)

    def codegen(context, builder, signature, args):
        count_ = args[0]
        is_f32 = signature.args[1].dtype == types.float32
        elem = ir.FloatType() if is_f32 else ir.DoubleType()
        lanes = mk.VECTOR_BITS // (32 if is_f32 else 64)
        vec = ir.VectorType(elem, lanes)
        suffix = f"v{lanes}{'f32' if is_f32 else 'f64'}"
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.{suffix}"
        )
        i64 = ir.IntType(64)
        entry = builder.block
        loop = builder.append_basic_block("peak.loop")
        done = builder.append_basic_block("peak.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        i = builder.phi(i64)
        i.add_incoming(ir.Constant(i64, 0), entry)
        accs = [builder.phi(vec) for _ in range(PEAK_ACCUMULATORS)]
        for j, acc in enumerate(accs):
            acc.add_incoming(ir.Constant(vec, [1e-3 * (j + 1)] * lanes), entry)
        scale, shift = ir.Constant(vec, [0.999] * lanes), ir.Constant(vec, [1e-4] * lanes)
        new = [builder.call(fma, [acc, scale, shift]) for acc in accs]
        i_next = builder.add(i, ir.Constant(i64, 1))
        for acc, value in zip(accs, new, strict=True):
            acc.add_incoming(value, loop)
        i.add_incoming(i_next, loop)
        builder.cbranch(builder.icmp_signed("<", i_next, count_), loop, done)
        builder.position_at_end(done)
        total = new[0]
        for value in new[1:]:
            total = builder.fadd(total, value)
        return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))

    return sig, codegen


@njit
def _peak(count, like):
    return _fma_loop(count, like)


@njit
def _blas(a, b, c):
    np.dot(a, b, c)


def _median_seconds(call, calls=11):
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def fma_peak(dtype) -> float:
    """GFLOP/s of the register-only FMA loop on one core."""
    like = np.zeros(1, dtype)
    _peak(10, like)
    count = 20_000_000
    lanes = mk.VECTOR_BITS // (8 * np.dtype(dtype).itemsize)
    best = min(_median_seconds(lambda: _peak(count, like), 3) for _ in range(3))
    return count * PEAK_ACCUMULATORS * lanes * 2 / best / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = np.dtype(args.dtype)
    peak = fma_peak(dtype)
    mr, nr = mk.nn_tile(dtype)
    print(f"{dtype.name}, {mk.VECTOR_BITS}-bit vectors, tile {mr}x{nr}, K block {mk.K_BLOCK}")
    print(f"FMA peak, one core (register-only loop): {peak:.1f} GFLOP/s\n")
    print("| product (M x K @ K x N) | what | own | OpenBLAS | own/OpenBLAS | own/peak |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for m, k, n, what in PRODUCTS:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        if "a = w.T" in what:
            a = np.ascontiguousarray(a.T).T
        c, c_blas = np.empty((m, n), dtype), np.empty((m, n), dtype)
        mk.gemm_nn(a, b, c, False)
        _blas(a, b, c_blas)
        own_call = functools.partial(mk.gemm_nn, a, b, c, False)
        blas_call = functools.partial(_blas, a, b, c_blas)
        own, blas = [], []
        for _ in range(args.rounds):  # alternately
            own.append(_median_seconds(own_call))
            blas.append(_median_seconds(blas_call))
        flops = 2 * m * k * n
        g_own, g_blas = flops / min(own) / 1e9, flops / min(blas) / 1e9
        print(
            f"| {m}x{k} @ {k}x{n} | {what} | {g_own:.0f} | {g_blas:.0f} | {g_own / g_blas:.2f} "
            f"| {g_own / peak:.0%} |"
        )


if __name__ == "__main__":
    main()
