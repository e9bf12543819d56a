"""Throughput of numbaconv.dask against the in-memory call on the same data.

For each case (a layer and a chunk layout) it times, forward (``conv2d``) and backward
(``conv2d_backward``, all three gradients):

* ``in memory``: ``numbaconv.conv2d`` on the NumPy arrays in this process (Numba's threads: all
  cores), the baseline;
* ``threads``: ``numbaconv.dask`` on Dask's threaded scheduler in this process, the result
  concatenated into one NumPy array (``.compute()``); ``threads, blocks``: the same, the result
  left in its blocks (``dask.persist``);
* ``N workers``: a ``distributed.LocalCluster`` of N worker processes, one task thread each and
  Numba's threads shared out among them (cores // N each), with the input already on the workers
  (``persist``) and the result left there: the computation alone, data movement between workers
  (halos, the weight-gradient tree) included; and ``round trip``, the same with the input sent
  from this process and the result gathered back into it; and ``empty graph``, one task per
  input block that does nothing, persisted the same way: distributed's own cost of a graph.

Each cluster size gets its own cluster and its own rounds: every round times each variant once
(in memory, threads, the cluster with the data on it), so that whatever else the machine runs
weighs on all of them alike; then the round trips, in rounds of their own. The figures are
medians over ``--repeat`` rounds, after one untimed call of each variant (the workers load
Numba's cache then): milliseconds, images (or megapixels) per second, and the in-memory time of
the same rounds divided by the time (1.00: as fast as in memory). Each worker's peak resident
memory is read after the rounds with the data on the workers.

    python asv_benchmarks/dask_throughput.py                   # the default cases, a few minutes
    python asv_benchmarks/dask_throughput.py --case resnet-b16 --repeat 9 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial

import numpy as np

#: name -> (input shape, weight shape, conv2d options, chunks of the input).
CASES = {
    # resnet3x3's layer (numbaconv.shapes) with 64 images: batch chunks of 32, 16 and 8 images.
    "resnet-b32": ((64, 64, 56, 56), (64, 64, 3, 3), dict(padding=1), (32, -1, -1, -1)),
    "resnet-b16": ((64, 64, 56, 56), (64, 64, 3, 3), dict(padding=1), (16, -1, -1, -1)),
    "resnet-b8": ((64, 64, 56, 56), (64, 64, 3, 3), dict(padding=1), (8, -1, -1, -1)),
    # Large chunks: 160 images of that layer are 128.5 MB in float32, about Dask's default
    # chunk size (the ``array.chunk-size`` setting, 128 MiB).
    "resnet-b160": ((320, 64, 56, 56), (64, 64, 3, 3), dict(padding=1), (160, -1, -1, -1)),
    # One large image, 64 channels, in 4 and 16 tiles: the halos cross chunk boundaries.
    "image-t224": ((1, 64, 448, 448), (64, 64, 3, 3), dict(padding=1), (1, -1, 224, 224)),
    "image-t112": ((1, 64, 448, 448), (64, 64, 3, 3), dict(padding=1), (1, -1, 112, 112)),
    # A grayscale image through a 5x5 filter bank (the Zarr example's layer, in memory).
    "gray-t1024": ((1, 1, 4096, 4096), (2, 1, 5, 5), dict(padding="same"), (1, 1, 1024, 1024)),
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def peak_rss_mib() -> float:
    """This process's peak resident memory, MiB (run on each worker).

    Linux: ``VmHWM``, the high-water mark of this process's own memory. Not ``ru_maxrss``: a
    spawned worker starts with its parent's (the nanny runs in the process that started the
    cluster, which may hold large arrays), since Linux keeps ``ru_maxrss`` across ``exec``.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def interleaved_medians(runs: dict, repeat: int) -> dict:
    """Median wall time of each ``run()`` over ``repeat`` rounds that run each once in turn.

    ``runs`` maps a key to ``(run, cleanup)``; ``cleanup(result)``, if not None, runs after
    each call, outside the timing. Every run is called once, untimed, first.
    """
    samples = {key: [] for key in runs}
    for round_index in range(repeat + 1):
        for key, (run, cleanup) in runs.items():
            start = time.perf_counter()
            result = run()
            elapsed = time.perf_counter() - start
            if cleanup is not None:
                cleanup(result)
            del result
            if round_index:
                samples[key].append(elapsed)
    return {key: statistics.median(values) for key, values in samples.items()}


def make_data(case: str, dtype: str):
    x_shape, w_shape, options, chunks = CASES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    return x, w, b, options, chunks


def _collections(function, *args, **options) -> list:
    """The Dask collections ``function(*args, **options)`` returns (one, or a tuple of
    gradients), as a list."""
    result = function(*args, **options)
    return list(result) if isinstance(result, tuple) else [result]


def _persisted(client, timeout, function, *args, **options):
    """Build the graph, run it on the cluster, leave the result on the workers."""
    from distributed import futures_of, wait

    done = client.persist(_collections(function, *args, **options))
    wait(done, timeout=timeout)
    return list(futures_of(done))


def _round_trip(client, timeout, function, *args, **options):
    """Build the graph, run it on the cluster, gather the result into this process."""
    futures = client.compute(_collections(function, *args, **options))
    for future in futures:
        future.result(timeout=timeout)
    return futures


def _corner(block):
    """A block's first element: a task that does nothing, to time the scheduling alone."""
    return block[:1, :1, :1, :1]


def _task_count(dask_scheduler=None) -> int:
    return len(dask_scheduler.tasks)


def _release(client, baseline: int, futures) -> None:
    """Release a run's results and wait until the scheduler has forgotten all its tasks.

    The keys are deterministic, so the next run has the same ones: a result still held would
    be handed back instead of computed again, and a release still under way would cancel it.
    """
    futures.clear()  # the last references to the run's futures: the client releases them
    while client.run_on_scheduler(_task_count) > baseline:
        time.sleep(0.005)


def time_session(case: str, dtype: str, workers: int, repeat: int, timeout: float):
    """One case: in memory, on threads, and on a new LocalCluster of ``workers`` processes.

    Returns the medians (keyed by (label, direction)) and each worker's peak resident memory
    over the rounds with the data on the workers (read before the round trips, whose graphs
    carry the input).
    """
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    import numbaconv as nc
    import numbaconv.dask as ncd

    x, w, b, options, chunks = make_data(case, dtype)
    grad_y = np.ones_like(nc.conv2d(x, w, b, **options))
    x_lazy = da.from_array(x, chunks=chunks)
    y_chunks = ncd.conv2d(x_lazy, w, b, **options).chunks
    grad_y_lazy = da.from_array(grad_y, chunks=y_chunks)
    forward = partial(ncd.conv2d, x_lazy, w, b, **options)
    backward = partial(ncd.conv2d_backward, grad_y_lazy, x_lazy, w, **options)
    in_process = {
        ("in memory", "forward"): (partial(nc.conv2d, x, w, b, **options), None),
        ("in memory", "backward"): (partial(nc.conv2d_backward, grad_y, x, w, **options), None),
        ("threads", "forward"): (lambda: forward().compute(scheduler="threads"), None),
        ("threads", "backward"): (lambda: dask.compute(*backward(), scheduler="threads"), None),
        # The same, leaving the result in blocks: .compute() above also concatenates them.
        ("threads, blocks", "forward"): (
            lambda: dask.persist(forward(), scheduler="threads"),
            None,
        ),
        ("threads, blocks", "backward"): (
            lambda: dask.persist(*backward(), scheduler="threads"),
            None,
        ),
    }

    numba_threads = max(1, (os.cpu_count() or 1) // workers)
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        env={"NUMBA_NUM_THREADS": str(numba_threads)},
    )
    client = Client(cluster, timeout=timeout)
    label = f"{workers} worker{'s' if workers > 1 else ''}"
    try:
        x_on_workers = client.persist(x_lazy)
        grad_y_on_workers = client.persist(grad_y_lazy)
        wait([x_on_workers, grad_y_on_workers], timeout=timeout)
        cleanup = partial(_release, client, client.run_on_scheduler(_task_count))
        persisted = partial(_persisted, client, timeout)
        runs = {
            **in_process,
            (label, "forward"): (
                partial(persisted, ncd.conv2d, x_on_workers, w, b, **options),
                cleanup,
            ),
            (label, "backward"): (
                partial(
                    persisted, ncd.conv2d_backward, grad_y_on_workers, x_on_workers, w, **options
                ),
                cleanup,
            ),
            # distributed's own cost of a graph: one task per input block that does nothing,
            # persisted and waited for like the runs above.
            (f"{label}, empty graph", "forward"): (
                lambda: _persisted(
                    client,
                    timeout,
                    lambda: x_on_workers.map_blocks(_corner, chunks=(1, 1, 1, 1), dtype=x.dtype),
                ),
                cleanup,
            ),
        }
        medians = interleaved_medians(runs, repeat)
        peaks = sorted(client.run(peak_rss_mib).values())

        round_trip = partial(_round_trip, client, timeout)
        runs = {
            (f"{label}, round trip", "forward"): (partial(round_trip, forward), cleanup),
            (f"{label}, round trip", "backward"): (partial(round_trip, backward), cleanup),
        }
        medians.update(interleaved_medians(runs, repeat))
    finally:
        client.close(timeout=timeout)
        cluster.close(timeout=timeout)
    return medians, peaks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=list(CASES), help="default: all")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--workers", default="1,2", help="cluster sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per wait")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    cases = args.case or list(CASES)
    worker_counts = [int(n) for n in args.workers.split(",")]

    import dask
    import distributed

    import numbaconv as nc

    # The round trips embed the NumPy input in the graph on purpose (that is what they measure);
    # distributed warns about large graphs each time.
    warnings.filterwarnings("ignore", message="Sending large graph")
    print(
        f"numbaconv {nc.__version__}, dask {dask.__version__}, distributed "
        f"{distributed.__version__}; {os.cpu_count()} CPUs: {cpu_model()}; {args.dtype}, "
        f"median of {args.repeat}"
    )
    times, peaks = {}, {}
    for case in cases:
        x_shape, w_shape, options, chunks = CASES[case]
        print(f"\n{case}: x {x_shape}, w {w_shape}, {options}, chunks {chunks}")
        print(f"  {'':24s} {'forward':>28s} {'backward':>28s}")
        n, _, h, w = x_shape
        per_second, unit = (n, "img/s") if n > 1 else (h * w / 1e6, "Mpx/s")
        for workers in worker_counts:
            medians, peak = time_session(case, args.dtype, workers, args.repeat, args.timeout)
            times[f"{case} / {workers} workers"] = medians
            peaks[f"{case} / {workers} workers"] = peak
            labels = dict.fromkeys(label for label, _ in medians)
            for label in [label for label in labels if not label.endswith("empty graph")]:
                cells = []
                for direction in ("forward", "backward"):
                    seconds = medians[(label, direction)]
                    ratio = medians[("in memory", direction)] / seconds
                    cells.append(
                        f"{1e3 * seconds:8.1f} ms {per_second / seconds:7.1f} {unit} {ratio:5.2f}"
                    )
                print(f"  {label:24s} {cells[0]:>28s} {cells[1]:>28s}")
            for label in [label for label in labels if label.endswith("empty graph")]:
                seconds = medians[(label, "forward")]
                print(f"  {label:24s} {1e3 * seconds:8.1f} ms: a no-op task per input block")
            listed = ", ".join(f"{v:.0f}" for v in peak)
            print(f"  peak resident memory per worker: {listed} MiB")
            sys.stdout.flush()

    if args.json:
        record = {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "dtype": args.dtype,
            "repeat": args.repeat,
            "seconds": {
                session: {f"{label} / {direction}": t for (label, direction), t in values.items()}
                for session, values in times.items()
            },
            "peak_rss_mib": peaks,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
