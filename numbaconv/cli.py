"""The ``numbaconv`` command line: ``demo``, ``bench``, ``compile`` and ``info``.

- ``numbaconv demo`` trains a small CNN on scikit-learn's digits (:mod:`numbaconv.demo`);
- ``numbaconv bench`` times forward and backward of every kernel on layer shapes, through the
  timing harness :mod:`numbaconv.bench`;
- ``numbaconv compile`` fills Numba's on-disk cache with every kernel (:mod:`numbaconv.cache`);
- ``numbaconv info`` reports versions, threading, the Numba cache, the CPU and the default kernel
  (:mod:`numbaconv.info`).

This module parses arguments and prints; the work is done by the modules named above.

Bad arguments print one line, ``numbaconv: error: ...``, and exit with status 2. The optional
packages (scikit-learn, tqdm, matplotlib) are imported only by the subcommands that use them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import numpy as np

from . import __version__, bench, cache, info, registry
from . import demo as demo_module
from .bench import BenchResult
from .geometry import make_geometry
from .shapes import ALL_SHAPES, LAYER_SHAPES, LayerShape

PROG = "numbaconv"
DEMO_HINT = 'the demo needs {}: pip install "numbaconv[demo]"'
#: Default ``bench --repeat``: with the numpy kernel's few hundred ms on the big shapes, a full
#: default run (8 shapes x every kernel, one warm-up plus 3 timed rounds) stays within 1-2 minutes.
DEFAULT_REPEAT = 3


class UsageError(Exception):
    """A bad argument: reported as one ``numbaconv: error: ...`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and never exit the interpreter."""

    def error(self, message):
        raise UsageError(message)


# --------------------------------------------------------------------------------------------
# Argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    return value


def _kernel_name(text: str) -> str:
    if text not in registry.KERNELS:
        raise argparse.ArgumentTypeError(
            f"unknown kernel {text!r}; valid kernels: {', '.join(registry.KERNELS)}"
        )
    return text


def _kernel_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of kernel names")
    return list(dict.fromkeys(_kernel_name(name) for name in names))


SHAPE_FORMAT = "N,C,H,W,K,R,S[,stride[,pad[,dilation[,groups]]]]"


def parse_shape(text: str) -> LayerShape:
    """Parse ``N,C,H,W,K,R,S[,stride[,pad[,dilation[,groups]]]]`` or a benchmark layer's name
    (:data:`numbaconv.shapes.ALL_SHAPES`) and check that the convolution is valid.

    Parameters
    ----------
    text : str
        Batch, input channels, height, width, filters, filter height and width, then optionally
        the stride (default 1), the padding (default 0), the dilation (default 1) and the groups
        (default 1); or a layer name such as ``resnet3x3``.

    Returns
    -------
    LayerShape

    Raises
    ------
    argparse.ArgumentTypeError
        With a one-line reason when the text is malformed or the convolution is invalid
        (for example, an empty output).
    """
    if text.strip() in ALL_SHAPES:
        return ALL_SHAPES[text.strip()]
    fields = text.split(",")
    if not 7 <= len(fields) <= 11:
        raise argparse.ArgumentTypeError(
            f"expected {SHAPE_FORMAT} (7 to 11 integers) or a layer name, got {text!r}"
        )
    try:
        values = [int(field) for field in fields]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {SHAPE_FORMAT} as integers, or a layer name, got {text!r}"
        ) from None
    shape = LayerShape(*values)
    if shape.batch < 1:
        raise argparse.ArgumentTypeError(f"the batch N must be >= 1, got {text!r}")
    try:
        make_geometry(shape.input_shape, shape.weight_shape, **shape.options)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return shape


def _shape_text(shape) -> str:
    """The layer's name when it is a benchmark layer, else its numbers."""
    for name, known in ALL_SHAPES.items():
        if type(known) is type(shape) and known == shape:
            return name
    fields = list(shape)
    while len(fields) > 9 and fields[-1] == 1:  # dilation and groups at their defaults
        fields.pop()
    return ",".join(str(v) for v in fields)


# --------------------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``numbaconv`` command.

    Returns
    -------
    argparse.ArgumentParser
        Its ``error`` raises :class:`UsageError` instead of exiting.
    """
    parser = _Parser(prog=PROG, description="numbaconv: fast CPU 2-D convolution with Numba.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's handwritten digits",
        description="Train a small CNN (numbaconv.ConvLayer, 2x2 max-pool, dense layers) on "
        "scikit-learn's 8x8 handwritten digits; print loss and accuracy per epoch.",
    )
    demo.add_argument(
        "--kernel",
        type=_kernel_name,
        help=f"convolution kernel: {', '.join(registry.KERNELS)} (default: the default kernel)",
    )
    demo.add_argument(
        "--epochs", type=_positive_int, default=demo_module.EPOCHS, help="default: %(default)s"
    )
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        default=demo_module.BATCH_SIZE,
        help="default: %(default)s",
    )
    demo.add_argument("--seed", type=_seed, default=0, help="default: %(default)s")
    demo.add_argument("--plot", metavar="FILE.png", help="write the learning curves as a PNG")
    # Train on the first N training images only: for quick checks and tests.
    demo.add_argument("--limit", type=_positive_int, help=argparse.SUPPRESS)

    bench_command = commands.add_parser(
        "bench",
        help="time forward and backward of each kernel on benchmark layers",
        description="Time each kernel's forward pass and backward pass (all three gradients) on "
        "layers (conv2d; the zoo's transposed and 1-D layers with their own ops): warm-up first, "
        "median of --repeat runs, kernels one after the other; print a table.",
    )
    bench_command.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        metavar=SHAPE_FORMAT,
        help="a conv2d layer shape or a layer's name (e.g. resnet3x3, dw3x3_112, unet_up2x2); "
        "repeatable (default: the suite's eight layer shapes)",
    )
    bench_command.add_argument(
        "--zoo",
        action="store_true",
        help="all benchmark layers: the suite's eight and the model zoo (numbaconv.shapes)",
    )
    bench_command.add_argument(
        "--kernels",
        type=_kernel_list,
        metavar="A,B",
        help=f"comma-separated kernels (default: all of {', '.join(registry.KERNELS)})",
    )
    bench_command.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    bench_command.add_argument(
        "--threads",
        type=_positive_int,
        help="Numba threads (numba.set_num_threads; BLAS keeps its own setting)",
    )
    bench_command.add_argument(
        "--repeat", type=_positive_int, default=DEFAULT_REPEAT, help="timed runs (default: 3)"
    )
    bench_command.add_argument("--json", metavar="FILE", help="also write the results as JSON")

    compile_ = commands.add_parser(
        "compile",
        help="compile every kernel into Numba's on-disk cache, so no later call compiles",
        description="Compile every kernel, both dtypes and every code path, in parallel worker "
        "processes, into Numba's on-disk cache; print where the cache is.",
    )
    compile_.add_argument(
        "--jobs", type=_positive_int, help="worker processes (default: one per CPU)"
    )

    commands.add_parser(
        "info",
        help="versions, threading, cache, CPU and default kernel",
        description="Report numbaconv's environment: versions, threading layer and threads, "
        "Numba cache directory, CPU and SIMD width, and the default kernel.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``numbaconv`` command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success, 2 for bad arguments or a missing optional package.
    """
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version
            return exc.code if isinstance(exc.code, int) else 0
        if args.command == "demo":
            return run_demo(args)
        if args.command == "bench":
            return run_bench(args)
        if args.command == "compile":
            return cache.run(args.jobs)
        return run_info()
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------------------------
# demo


def run_demo(args: argparse.Namespace) -> int:
    """``numbaconv demo``: train, print a line per epoch, optionally plot; return the status."""
    missing = demo_module.missing_packages(with_plot=args.plot is not None)
    if missing:
        raise UsageError(DEMO_HINT.format(", ".join(missing)))
    if args.plot is not None:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            raise UsageError(f"--plot: folder {folder!r} does not exist")
    try:
        kernel = registry.resolve(args.kernel)  # None: the default, maybe from NUMBACONV_KERNEL
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    x_train, _, x_test, _ = demo_module.load_digits_split(args.seed, args.limit)
    print(
        f"numbaconv demo: {len(x_train)} training and {len(x_test)} test digits (8x8), "
        f"kernel {kernel}, {args.epochs} epochs, batch size {args.batch_size}, seed {args.seed}"
    )
    history = []
    training = demo_module.train(
        kernel=kernel,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        limit=args.limit,
    )
    for stats in training:
        history.append(stats)
        print(
            f"epoch {stats.epoch}/{args.epochs}  loss {stats.loss:.4f}  "
            f"train acc {stats.train_accuracy:.4f}  test acc {stats.test_accuracy:.4f}  "
            f"{stats.seconds:.2f} s",
            flush=True,
        )
    if args.plot is not None:
        demo_module.plot_curves(
            history, args.plot, title=f"numbaconv demo: digits, kernel {kernel}, seed {args.seed}"
        )
        print(f"learning curves written to {args.plot}")
    return 0


# --------------------------------------------------------------------------------------------
# bench


def _progress(total: int):
    """A tqdm bar on stderr, or a stand-in that does nothing when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc="bench", unit="run", leave=False, file=sys.stderr)


class _NoProgress:
    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _milliseconds(value: float) -> str:
    """Three significant digits or more: 0.0412, 3.14, 27.2, 312."""
    return f"{value:.{max(0, 2 - int(np.floor(np.log10(value))))}f}" if value > 0 else "0"


def format_table(results: list[BenchResult]) -> str:
    """The bench results as a plain-text table, one row per shape and kernel.

    The speedup columns appear when the numpy kernel was timed; the "auto picks" column when the
    registry can say which kernel ``auto`` would use. A shape's label and ``auto``'s pick are
    written on the first row of the shape only.
    """
    with_speedup = any(r.forward_speedup is not None for r in results)
    with_auto = any(r.auto_forward is not None for r in results)
    header = ["shape", "kernel", "fwd ms", "bwd ms", "fwd GFLOP/s", "bwd GFLOP/s"]
    if with_speedup:
        header += ["fwd vs numpy", "bwd vs numpy"]
    if with_auto:
        header += ["auto picks (fwd/bwd)"]
    rows = []
    previous = None
    for r in results:
        first = r.shape != previous
        previous = r.shape
        row = [
            r.shape if first else "",
            r.kernel,
            _milliseconds(r.forward_ms),
            _milliseconds(r.backward_ms),
            f"{r.forward_gflops:.1f}",
            f"{r.backward_gflops:.1f}",
        ]
        if with_speedup:
            row += [f"{r.forward_speedup:.2f}x", f"{r.backward_speedup:.2f}x"]
        if with_auto:
            if r.auto_forward is None:  # a transposed or 1-D layer: auto decides inside its op
                picks = "-"
            elif r.auto_forward == r.auto_backward:
                picks = r.auto_forward
            else:
                picks = f"{r.auto_forward}/{r.auto_backward}"
            row += [picks if first else ""]
        rows.append(row)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    # Text columns flush left, numbers flush right.
    left = {0, 1, len(header) - 1} if with_auto else {0, 1}

    def line(cells):
        return "  ".join(
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *map(line, rows)])


def run_bench(args: argparse.Namespace) -> int:
    """``numbaconv bench``: time the kernels, print the table, optionally write JSON."""
    import numba

    if args.threads is not None:
        if args.threads > numba.config.NUMBA_NUM_THREADS:
            raise UsageError(
                f"--threads {args.threads}: at most NUMBA_NUM_THREADS="
                f"{numba.config.NUMBA_NUM_THREADS} threads are available"
            )
        numba.set_num_threads(args.threads)
    if args.json is not None:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise UsageError(f"--json: folder {folder!r} does not exist")
    shapes = dict(ALL_SHAPES) if args.zoo else {}
    if args.shape:
        shapes.update((_shape_text(shape), shape) for shape in args.shape)
    if not shapes:
        shapes = dict(LAYER_SHAPES)
    kernels = args.kernels or list(registry.KERNELS)
    dtype = np.dtype(args.dtype)

    print(
        f"numbaconv {__version__} bench: {dtype.name}, {numba.get_num_threads()} Numba threads, "
        f"median of {args.repeat} run(s) after a warm-up"
    )
    for variable in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(variable):
            print(f"note: {variable}={os.environ[variable]} is set; BLAS may run slower than usual")
    results = []
    with _progress(len(shapes) * len(kernels) * (args.repeat + 1)) as progress:
        for name, shape in shapes.items():
            results += bench.bench_layer(name, shape, kernels, dtype, args.repeat, progress)
    print(format_table(results))
    print(
        "GFLOP/s: forward 2*N*K*OH*OW*C*R*S flops (transposed: 2*N*C_in*H*W*C_out*R*S), "
        "backward twice that (grad-x and grad-w)"
    )

    if args.json is not None:
        report = {
            "numbaconv": __version__,
            "numba": numba.__version__,
            "numpy": np.__version__,
            "dtype": dtype.name,
            "threads": numba.get_num_threads(),
            "threading_layer": info.threading_layer(),
            "repeat": args.repeat,
            "cpu": info.cpu_model(),
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
        print(f"results written to {args.json}")
    return 0


# --------------------------------------------------------------------------------------------
# info


def run_info() -> int:
    """``numbaconv info``: print the report (:func:`numbaconv.info.info_lines`)."""
    lines = info.info_lines()
    width = max(len(field) for field, _ in lines)
    for field, value in lines:
        print(f"{field + ':':<{width + 1}} {value}")
    return 0
