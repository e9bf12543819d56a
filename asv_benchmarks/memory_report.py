"""Peak memory each kernel allocates beyond its inputs and outputs, per layer shape and batch.

Uses ``tracemalloc`` (NumPy reports its allocations to it), so the figures are the arrays a call
allocates: outputs, workspace and temporaries. Printed in MiB: the outputs, then each kernel's
peak minus its outputs (the workspace), forward and backward.

    python asv_benchmarks/memory_report.py --dtype float32 --batches 16,64
"""

from __future__ import annotations

import argparse
import tracemalloc
from functools import partial

import numpy as np

import numbaconv as nc
from numbaconv.shapes import ALL_SHAPES, LAYER_SHAPES

MIB = 2**20


def peak_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    result = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batches", default="16,64", help="batch sizes, comma-separated")
    parser.add_argument("--shapes", default=",".join(LAYER_SHAPES), help="any of numbaconv.shapes")
    parser.add_argument("--kernels", default="im2col,winograd,direct,numpy")
    args = parser.parse_args(argv)
    kernels = args.kernels.split(",")
    header = f"{'shape':10s} {'N':>4s} {'pass':4s} {'outputs':>8s} "
    print(header + " ".join(f"{k:>9s}" for k in kernels))
    for name in args.shapes.split(","):
        shape = ALL_SHAPES[name]
        k = shape.out_channels
        for batch in (int(b) for b in args.batches.split(",")):
            rng = np.random.default_rng(0)
            x = rng.standard_normal((batch, *shape.input_shape[1:])).astype(args.dtype)
            weight = rng.standard_normal(shape.weight_shape).astype(args.dtype)
            opts = shape.options
            y = nc.conv2d(x, weight, **opts, kernel="im2col")
            passes = (
                ("fwd", y.nbytes, partial(nc.conv2d, x, weight, **opts)),
                (
                    "bwd",
                    x.nbytes + weight.nbytes + k * x.itemsize,
                    partial(nc.conv2d_backward, y, x, weight, **opts),
                ),
            )
            for label, out_bytes, call in passes:
                extra = []
                for kern in kernels:
                    call(kernel=kern)  # compile outside the measurement
                    extra.append((peak_bytes(partial(call, kernel=kern)) - out_bytes) / MIB)
                print(
                    f"{name:10s} {batch:4d} {label:4s} {out_bytes / MIB:8.1f} "
                    + " ".join(f"{e:9.1f}" for e in extra),
                    flush=True,
                )


if __name__ == "__main__":
    main()
