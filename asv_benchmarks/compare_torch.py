"""Compare numbaconv with PyTorch's CPU conv2d and with the ``numpy`` teaching kernel.

For each layer shape of the suite (``--zoo``: and of the model zoo, ``numbaconv.shapes``, whose
transposed and 1-D layers run ``conv_transpose2d`` and ``conv1d``): forward and backward (grad
input + grad weight + grad bias, PyTorch's ``aten.convolution_backward``) times,
measured interleaved (one call of each contender per round, rounds repeated), medians, the ratios
PyTorch/numbaconv and numpy/numbaconv, and their geometric means. PyTorch is a development-only
dependency of this script (``pip install torch``).

Each library runs in its own worker process, started from this environment, as a user would run
it: PyTorch never sees numbaconv's ``OMP_WAIT_POLICY=PASSIVE`` default, and numbaconv never sees
PyTorch's OpenMP runtime. (In one process their thread pools interfere: one library's spinning
workers hold the cores the other's next call needs.) Each round gives every contender one turn:
untimed calls for ``--warm-ms`` (by then the other process's threads have stopped spinning, and
this one's thread pools and the cores' clocks are awake), then ``--burst`` timed calls back to
back, as in a training loop; a turn counts as the median of those, the table holds the median of
the turns. (Idle gaps instead of the warm-up made every library look slower after them, numbaconv
most: its OpenMP workers sleep between calls.) The workers time the calls themselves, with
numbaconv's timing harness (``numbaconv/bench.py``, loaded by path: the PyTorch worker never
imports numbaconv), which also builds both sides' seeded data and calls.

Run with ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` unset, on a quiet machine:

    python asv_benchmarks/compare_torch.py --kernel auto --repeat 9
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------
# Worker side: one library per process, driven line by line over stdin/stdout.
# ------------------------------------------------------------------------------------------


def _harness():
    """numbaconv's timing harness (``numbaconv/bench.py``) loaded by path, without importing
    numbaconv (which would choose its threading layer and set its OpenMP defaults in this
    process, and so in the PyTorch worker)."""
    name = "_numbaconv_bench"
    if name not in sys.modules:
        path = HERE.parent.parent / "numbaconv" / "bench.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and NamedTuples look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def _calls(library, kernels, shape, dtype, threads):
    """name -> (forward, backward) of each contender in this worker, on the harness's data."""
    harness = _harness()
    if library == "torch":
        data = harness.make_data(shape, dtype, output_shape=harness.torch_output_shape)
        return {"torch": harness.torch_calls(data, threads)}
    import numba

    numba.set_num_threads(threads)
    data = harness.make_data(shape, dtype)
    return {name: harness.numbaconv_calls(name, data) for name in kernels}


def worker(library: str, kernels: list[str], threads: int) -> None:
    """Serve ``setup SHAPE DTYPE`` (answers ``ok``) and ``run NAME PASS COUNT WARM_MS`` (untimed
    calls for WARM_MS, then COUNT timed ones back to back; answers their median in seconds)."""
    harness = _harness()
    calls = {}
    for line in sys.stdin:
        words = line.split()
        if words[0] == "setup":
            shape = harness.shapes.ALL_SHAPES[words[1]]
            calls = _calls(library, kernels, shape, words[2], threads)
            for forward, backward in calls.values():  # warm-up: compilation, caches
                forward()
                backward()
            print("ok", flush=True)
        elif words[0] == "run":
            fn = calls[words[1]][0 if words[2] == "fwd" else 1]
            count, warm_seconds = int(words[3]), float(words[4]) / 1e3
            # Untimed calls first: they wake thread pools and clock speed after the other's turn.
            print(harness.time_turn(fn, count, warm_seconds), flush=True)


# ------------------------------------------------------------------------------------------
# Coordinator side.
# ------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, library, kernels, threads):
        cmd = [sys.executable, str(HERE), "--worker", library, "--kernel", ",".join(kernels)]
        cmd += ["--threads", str(threads)]
        env = dict(os.environ)
        if library == "numbaconv":
            # The numpy kernel's GEMMs run on NumPy's OpenBLAS: hold it to --threads as well.
            env.setdefault("OPENBLAS_NUM_THREADS", str(threads))
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.names = ["torch"] if library == "torch" else kernels

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"worker {self.names} exited (see its error above)")
        return answer.strip()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def gmean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="auto", help="numbaconv kernel(s), comma-separated")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--numpy-repeat", type=int, default=3)
    parser.add_argument(
        "--shapes", default=None, help="comma-separated layer names (default: the suite's eight)"
    )
    parser.add_argument(
        "--zoo", action="store_true", help="all layers: the suite's eight and the model zoo"
    )
    parser.add_argument(
        "--numpy", action=argparse.BooleanOptionalAction, default=True,
        help="also time the numpy teaching kernel (default: yes)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warm-ms", type=float, default=200.0, help="untimed calls per turn")
    parser.add_argument("--burst", type=int, default=3, help="timed calls per turn")
    parser.add_argument("--worker", choices=["torch", "numbaconv"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    kernels = args.kernel.split(",")
    if args.worker:
        return worker(args.worker, kernels, args.threads)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(var):
            print(f"warning: {var}={os.environ[var]} is set; results are not representative")
    shapes_module = _harness().shapes
    if args.shapes:
        shape_names = args.shapes.split(",")
    elif args.zoo:
        shape_names = list(shapes_module.ALL_SHAPES)
    else:
        shape_names = list(shapes_module.LAYER_SHAPES)
    unknown = [name for name in shape_names if name not in shapes_module.ALL_SHAPES]
    if unknown:
        parser.error(f"unknown layer names: {', '.join(unknown)}")
    baseline = ["numpy"] if args.numpy else []
    # Versions from the metadata: importing numbaconv here would set OMP_WAIT_POLICY for the
    # workers this process starts (and so for PyTorch's).
    from importlib.metadata import PackageNotFoundError, version

    def version_of(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return "(not installed)"

    print(
        f"torch {version_of('torch')}, numbaconv {version_of('numbaconv')}, "
        f"{args.dtype}, {args.threads} threads, medians of {args.repeat} interleaved rounds (ms),"
        f" one process per library, turns of {args.warm_ms:g} ms untimed + {args.burst} timed calls"
    )
    workers = [
        Worker("torch", ["torch"], args.threads),
        Worker("numbaconv", kernels + baseline, args.threads),
    ]
    header = f"{'shape':16s} {'pass':4s} {'torch':>8s} {'numpy':>8s} "
    print(header + " ".join(f"{k:>8s}" for k in kernels) + "  torch/nc  numpy/nc")
    rows = []
    try:
        for shape_name in shape_names:
            for w in workers:
                if w.ask(f"setup {shape_name} {args.dtype}") != "ok":
                    raise RuntimeError(f"setup failed in {w.names}")
            for label in ("fwd", "bwd"):
                times = {}
                for round_ in range(args.repeat):
                    for w in workers:
                        for name in w.names:
                            if name == "numpy" and round_ >= args.numpy_repeat:
                                continue
                            turn = f"run {name} {label} {args.burst} {args.warm_ms}"
                            seconds = float(w.ask(turn))
                            times.setdefault(name, []).append(seconds)
                med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                ours = med[kernels[0]]
                numpy_ms = med.get("numpy", math.nan)
                rows.append((shape_name, label, med["torch"] / ours, numpy_ms / ours))
                print(
                    f"{shape_name:16s} {label:4s} {med['torch']:8.2f} {numpy_ms:8.2f} "
                    + " ".join(f"{med[k]:8.2f}" for k in kernels)
                    + f"  {rows[-1][2]:8.2f}  {rows[-1][3]:8.1f}",
                    flush=True,
                )
    finally:
        for w in workers:
            w.close()
    for label in ("fwd", "bwd"):
        ratios = [r[2] for r in rows if r[1] == label]
        print(
            f"geometric mean torch/{kernels[0]} {label}: {gmean(ratios):.2f}  "
            f"(min {min(ratios):.2f})"
        )
    families = {}
    for name, label, ratio, _ in rows:
        families.setdefault(shapes_module.FAMILY[name], {}).setdefault(label, []).append(ratio)
    if len(families) > 1:
        print(f"per family, geometric mean torch/{kernels[0]} (fwd, bwd):")
        for family, by_pass in families.items():
            cells = ", ".join(f"{gmean(by_pass[label]):.2f}" for label in ("fwd", "bwd"))
            print(f"  {family:18s} {cells}")
    if args.numpy:
        numpy_ratios = [r[3] for r in rows]
        print(f"geometric mean numpy/{kernels[0]} (fwd and bwd): {gmean(numpy_ratios):.1f}")


if __name__ == "__main__":
    main()
