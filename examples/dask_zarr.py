"""Convolve an image stored as a Zarr array on disk, chunk by chunk, with numbaconv.dask.

A local Dask cluster of worker processes, each allowed less memory than the image, writes a
synthetic grayscale image to Zarr, convolves it with a small filter bank (a Gaussian blur and a
Laplacian of Gaussian, ``padding='same'``) and writes the result to another Zarr array; no
process ever holds the whole image. Then it checks a window that straddles four chunks against
the in-memory ``numbaconv.conv2d`` of the same pixels, and reports the time and each worker's
peak memory against its limit.

    pip install "numbaconv[dask]"
    python examples/dask_zarr.py                # 16384 x 16384 float32: 1 GiB, 2.6x the limit
    python examples/dask_zarr.py --size 20480   # 1.56 GiB: 4x each worker's 400 MiB
    python examples/dask_zarr.py --size 32768   # 4 GiB: 10x

The Zarr arrays go to a temporary folder, removed at the end (``--dir`` keeps them elsewhere).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16384, help="image height and width")
    parser.add_argument("--chunk", type=int, default=1024, help="Zarr chunk height and width")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--memory-limit",
        default="400MiB",
        help="memory limit of each worker process, its whole resident size (default: 400MiB, of "
        "which about 250 MiB is the interpreter, NumPy, Numba, Zarr and distributed themselves)",
    )
    parser.add_argument("--dir", type=Path, help="folder for the Zarr arrays (kept)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before giving up")
    return parser.parse_args(argv)


def synthetic_block(block, block_info=None):
    """One chunk of the image: smooth structure plus noise, the same wherever it is computed.

    The noise of each chunk is seeded by the chunk's position, so the image does not depend on
    the chunking of the computation or on which worker computes which chunk.
    """
    (rows, cols) = block_info[None]["array-location"][2:]
    shape = block_info[None]["chunk-shape"]
    y = np.arange(*rows, dtype=np.float32)[:, None]
    x = np.arange(*cols, dtype=np.float32)[None, :]
    seed = block_info[None]["chunk-location"]
    noise = np.random.default_rng(seed).standard_normal(shape[2:], dtype=np.float32)
    image = np.sin(y / 37.0) * np.cos(x / 23.0) + 0.25 * noise
    return image.reshape(shape)


def filter_bank() -> np.ndarray:
    """Two 5x5 filters, ``(K, C, R, S) = (2, 1, 5, 5)``: Gaussian blur and its Laplacian."""
    offsets = np.arange(-2, 3, dtype=np.float64)
    r2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    sigma2 = 1.0
    gaussian = np.exp(-r2 / (2 * sigma2))
    gaussian /= gaussian.sum()
    log = (r2 - 2 * sigma2) / sigma2**2 * gaussian
    log -= log.mean()  # a flat image gives zero response
    return np.stack([gaussian, log])[:, None].astype(np.float32)


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


def main(argv=None) -> int:
    args = parse_args(argv)
    import dask.array as da
    from dask.utils import format_bytes, parse_bytes
    from distributed import Client, LocalCluster, wait

    import numbaconv as nc
    import numbaconv.dask as ncd

    folder = args.dir or Path(tempfile.mkdtemp(prefix="numbaconv-dask-zarr-"))
    in_path, out_path = folder / "image.zarr", folder / "filtered.zarr"
    for path in (in_path, out_path):
        shutil.rmtree(path, ignore_errors=True)
    size, chunk = args.size, args.chunk
    limit = parse_bytes(args.memory_limit)
    image_bytes = size * size * 4
    w = filter_bank()

    # One thread per worker, and Numba's threads shared out among the workers, so that the
    # workers' kernels do not fight over the cores.
    numba_threads = max(1, (os.cpu_count() or 1) // args.workers)
    cluster = LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=limit,
        dashboard_address=None,
        # The workers' warnings when they pause near their limit are expected here.
        silence_logs=logging.ERROR,
        env={"NUMBA_NUM_THREADS": str(numba_threads)},
    )
    client = Client(cluster, timeout=args.timeout)
    try:
        print(
            f"image {size}x{size} float32 ({format_bytes(image_bytes)}) in {chunk}x{chunk} "
            f"chunks, {image_bytes / limit:.1f}x the memory limit of each of {args.workers} "
            f"workers ({format_bytes(limit)}); {numba_threads} Numba thread(s) per worker"
        )
        start = time.perf_counter()
        image = da.zeros((1, 1, size, size), chunks=(1, 1, chunk, chunk), dtype=np.float32)
        image = image.map_blocks(synthetic_block, dtype=np.float32)
        wait(client.compute(da.to_zarr(image, str(in_path), compute=False)), args.timeout)
        written = time.perf_counter()
        print(f"wrote {in_path} in {written - start:.1f} s")

        x = da.from_zarr(str(in_path))
        y = ncd.conv2d(x, w, padding="same")  # (1, 2, size, size), x's chunks
        wait(client.compute(da.to_zarr(y, str(out_path), compute=False)), args.timeout)
        done = time.perf_counter()
        rate = image_bytes / (done - written)
        print(
            f"convolved into {out_path} ({format_bytes(2 * image_bytes)}) in "
            f"{done - written:.1f} s, {format_bytes(rate)}/s of input"
        )

        peaks = client.run(peak_rss_mib)
        worst = max(peaks.values())
        for address, peak in sorted(peaks.items()):
            print(f"worker {address}: peak resident memory {peak:.0f} MiB")
        print(f"limit {limit / 2**20:.0f} MiB; highest peak {100 * worst * 2**20 / limit:.0f}%")

        # A window around the point where four chunks meet, with the filter's 2-pixel halo, from
        # the Zarr input, convolved in memory: it must match the Dask result read back.
        centre = min(chunk, size // 2)
        lo, hi = max(centre - 8, 0), min(centre + 8, size)
        x_window = x[:, :, max(lo - 2, 0) : hi + 2, max(lo - 2, 0) : hi + 2].compute()
        pads = (2 - (lo - max(lo - 2, 0)), 2 - (min(hi + 2, size) - hi))
        x_window = np.pad(x_window, [(0, 0), (0, 0), pads, pads])
        expected = nc.conv2d(x_window, w)
        got = da.from_zarr(str(out_path))[:, :, lo:hi, lo:hi].compute()
        same_bits = np.array_equal(got, expected)
        error = float(np.max(np.abs(got - expected)))
        print(f"window check: max |difference| {error:.2e}, identical bits: {same_bits}")
        ok = error <= 1e-5 and worst * 2**20 < limit
    finally:
        client.close(timeout=60)
        cluster.close(timeout=60)
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
