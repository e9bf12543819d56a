"""Compare numbaconv with PyTorch's CPU conv2d and with the ``numpy`` teaching kernel.

For each layer shape of the suite: forward and backward (grad input + grad weight + grad bias)
times, measured interleaved (one call of each contender per round, rounds repeated), medians,
the ratios PyTorch/numbaconv and numpy/numbaconv, and their geometric means. PyTorch is a
development-only dependency of this script (``pip install torch``).

Run with ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` unset:

    OMP_WAIT_POLICY=PASSIVE python asv_benchmarks/compare_torch.py --kernel auto --repeat 9

``OMP_WAIT_POLICY=PASSIVE`` for the whole process: torch is imported first, and with its default
policy its OpenMP workers spin after each call, so the numbaconv call that follows in the
interleaving waits for a core (a scheduler tick, ~8 ms on small layers). numbaconv sets the
passive policy for its own pool on import; setting it in the environment applies it to torch too,
which costs torch a little. Quote which setting a table used.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch

import numbaconv as nc
from numbaconv.shapes import LAYER_SHAPES


def _timer(fn):
    def timed():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def contenders(shape, dtype, kernels, with_numpy):
    n, c, h, w, k, r, s, stride, pad = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = (rng.standard_normal((k, c, r, s)) / math.sqrt(c * r * s)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    y = nc.conv2d(x, weight, bias, stride=stride, padding=pad, kernel="numpy")
    grad_y = rng.standard_normal(y.shape).astype(dtype)
    tx, tw, tb, tgy = (torch.from_numpy(a) for a in (x, weight, bias, grad_y))

    def torch_forward():
        torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=pad)

    def torch_backward():
        torch.ops.aten.convolution_backward(
            tgy,
            tx,
            tw,
            [k],
            [stride] * 2,
            [pad] * 2,
            [1, 1],
            False,
            [0, 0],
            1,
            [True, True, True],
        )

    out = {"torch": (torch_forward, torch_backward)}
    names = list(kernels) + (["numpy"] if with_numpy else [])
    for name in names:
        out[name] = (
            lambda name=name: nc.conv2d(x, weight, bias, stride=stride, padding=pad, kernel=name),
            lambda name=name: nc.conv2d_backward(
                grad_y, x, weight, stride=stride, padding=pad, kernel=name
            ),
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="auto", help="numbaconv kernel(s), comma-separated")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--numpy-repeat", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(LAYER_SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(var):
            print(f"warning: {var}={os.environ[var]} is set; results are not representative")
    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(args.threads)
    kernels = [name for name in args.kernel.split(",") if name in nc.KERNELS]
    dtype = np.dtype(args.dtype)
    rows = []
    print(
        f"torch {torch.__version__}, numbaconv {nc.__version__}, {args.dtype}, "
        f"{args.threads} threads, medians of {args.repeat} interleaved rounds (ms)"
    )
    header = (
        f"{'shape':10s} {'pass':4s} {'torch':>8s} {'numpy':>8s} "
        + " ".join(f"{k:>8s}" for k in kernels)
        + "  torch/nc  numpy/nc"
    )
    print(header)
    for shape_name in args.shapes.split(","):
        shape = LAYER_SHAPES[shape_name]
        fns = contenders(shape, dtype, kernels, with_numpy=True)
        for which, label in ((0, "fwd"), (1, "bwd")):
            times = {name: [] for name in fns}
            for pair in fns.values():  # warm-up: compilation and caches
                pair[which]()
            for round_ in range(args.repeat):
                for name, pair in fns.items():
                    if name == "numpy" and round_ >= args.numpy_repeat:
                        continue
                    times[name].append(_timer(pair[which])())
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            best = kernels[0]
            rows.append((shape_name, label, med["torch"] / med[best], med["numpy"] / med[best]))
            print(
                f"{shape_name:10s} {label:4s} {med['torch']:8.2f} {med['numpy']:8.2f} "
                + " ".join(f"{med[k]:8.2f}" for k in kernels)
                + f"  {rows[-1][2]:8.2f}  {rows[-1][3]:8.1f}",
                flush=True,
            )

    def gmean(values):
        return math.exp(sum(math.log(v) for v in values) / len(values))

    for label in ("fwd", "bwd"):
        ratios = [r[2] for r in rows if r[1] == label]
        print(
            f"geometric mean torch/{kernels[0]} {label}: {gmean(ratios):.2f}  "
            f"(min {min(ratios):.2f})"
        )
    both = [r[3] for r in rows]
    print(f"geometric mean numpy/{kernels[0]} (fwd and bwd): {gmean(both):.1f}")


if __name__ == "__main__":
    main()
