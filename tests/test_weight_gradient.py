"""The grad-w products of im2col and taps, ``grad_y @ columns.T``: on the micro-kernel or on
BLAS, as ``microkernel.own_weight_gradient`` says (both are forced here, whatever this machine
picks), in the fused bands, the blocked pass and grad-w alone over the whole batch (a transposed
convolution's backward pass); and the rule that picks between them."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from helpers import Cfg, assert_same_bits, check_against_reference
from test_conv_transpose import TCfg, check, make_data

import numbaconv as nc
from numbaconv import _threading
from numbaconv.kernels import im2col, microkernel, taps


@pytest.fixture(params=[True, False], ids=["micro-kernel", "blas"])
def own(request, monkeypatch):
    for module in (im2col, taps):
        monkeypatch.setattr(module, "own_weight_gradient", lambda: request.param)
    return request.param


CONV_CFGS = [
    # Fused bands, lanes of whole images: ragged filters (7) and taps (54) against the tile.
    Cfg(5, 6, 9, 10, 7, 3, 3, padding=1, name="fused"),
    # 272 pixels a band: more than one K block of the micro-kernel.
    Cfg(4, 5, 16, 17, 9, 3, 3, padding=1, name="deep-bands"),
    Cfg(4, 8, 7, 7, 12, 3, 3, stride=2, groups=2, name="groups"),
    # Small maps: images side by side in one product.
    Cfg(8, 16, 4, 4, 33, 3, 3, padding=1, name="images-side-by-side"),
    Cfg(4, 8, 6, 6, 40, 1, 1, name="pointwise"),
    # Fewer images than lanes and under 16 channels: bands in phases.
    Cfg(2, 4, 12, 9, 5, 3, 3, padding=1, dilation=(2, 1), name="phases"),
    # Blocked (batches of 1-3 with 16+ channels): one product over the batch per block.
    Cfg(1, 17, 11, 9, 6, 3, 2, stride=(2, 1), padding=(2, 1), name="blocked-one-image"),
    Cfg(3, 16, 7, 8, 40, 3, 3, padding=1, bias=False, name="blocked-three-images"),
]


@pytest.mark.usefixtures("force_parallel")
@pytest.mark.parametrize("cfg", CONV_CFGS, ids=str)
def test_conv2d_gradients_match_the_reference(cfg, dtype, own):
    check_against_reference(cfg, "im2col", dtype, seed=61)


@pytest.mark.usefixtures("force_parallel")
@pytest.mark.parametrize("cfg", CONV_CFGS[:3], ids=str)
def test_taps_gradients_match_the_reference(cfg, dtype, own):
    check_against_reference(cfg, "taps", dtype, seed=66)


#: Transposed layers whose grad-w (a convolution of grad_y, 16+ channels, with x as its output
#: gradient) runs alone over the whole batch: DCGAN's and U-Net's geometries, small.
TRANSPOSED = [
    TCfg(4, 8, 5, 5, 16, 4, 4, stride=2, padding=1),
    TCfg(6, 5, 3, 4, 20, 2, 2, stride=2, bias=False),
    TCfg(4, 3, 4, 4, 18, 3, 3, stride=2, padding=1, output_padding=1),
]


@pytest.mark.usefixtures("force_parallel")
@pytest.mark.parametrize("cfg", TRANSPOSED, ids=str)
def test_grad_w_alone_runs_over_the_whole_batch(cfg, dtype, own, thread_probe):
    check(cfg, "im2col", dtype, seed=62)
    names = [r.name for r in thread_probe.regions]
    assert "im2col.blocked_weight_gradient_kernel" in names
    assert "im2col.blocked_input_gradient_kernel" not in names


@pytest.mark.usefixtures("force_parallel")
def test_winograd_backward_with_grad_w_alone(dtype, own):
    check_against_reference(Cfg(4, 16, 8, 8, 16, 3, 3, padding=1), "winograd", dtype, seed=63)


@pytest.mark.parametrize("cfg", TRANSPOSED[:2], ids=str)
def test_bits_do_not_depend_on_the_thread_count(cfg, own, restore_num_threads, monkeypatch):
    monkeypatch.setattr(_threading, "SERIAL_FLOPS", 0)
    x, w, _, gy = make_data(cfg, np.float32, seed=64)
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        results.append(nc.conv_transpose2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs))
    for name, one, two in zip(("grad_x", "grad_w", "grad_b"), *results, strict=True):
        assert_same_bits(two, one, f"{name} on 1 and 2 threads [{cfg}]")


def test_a_nan_in_grad_y_reaches_grad_w_alone_as_in_a_plain_computation(own):
    cfg = TRANSPOSED[0]
    x, w, _, gy = make_data(cfg, np.float64, seed=65)
    gy[2, 5, 3, 4] = np.nan  # the adjoint convolution's input: columns of filter 5's channel
    _, gw, gb = nc.conv_transpose2d_backward(gy, x, w, kernel="im2col", **cfg.kwargs)
    assert np.isnan(gw[:, 5]).any() and not np.isnan(np.delete(gw, 5, axis=1)).any()
    assert np.isnan(gb[5]) and not np.isnan(np.delete(gb, 5)).any()


def _fake_openblas(core):
    return _threading.BundledOpenBLAS("libfake.so", lambda: 1, lambda n: None, "fake", core)


@pytest.mark.parametrize(
    ("core", "avx512"),
    [
        ("SkylakeX", True),
        ("Cooperlake", True),
        ("SAPPHIRERAPIDS", True),
        ("Haswell", False),
        ("Zen", False),
        (None, False),
    ],
)
def test_which_openblas_cores_run_avx512(core, avx512, monkeypatch):
    monkeypatch.setattr(_threading, "_scipy_openblas_found", (_fake_openblas(core), "fake"))
    assert _threading.blas_runs_avx512() is avx512


def test_grad_w_on_the_micro_kernel_where_blas_lacks_avx512(monkeypatch):
    for target, blas, expected in [
        (True, False, True),  # AMD Zen 5 under OpenBLAS's Haswell kernels
        (True, True, False),  # Sapphire Rapids: OpenBLAS's AVX-512 kernels measured faster
        (False, False, False),  # AVX2 targets: BLAS measured as fast for grad-w's products
    ]:
        monkeypatch.setattr(microkernel, "OWN_TRANSPOSED_GEMM_ON_THIS_TARGET", target)
        monkeypatch.setattr(microkernel, "blas_runs_avx512", lambda blas=blas: blas)
        assert microkernel.own_weight_gradient() is expected


def test_the_bundled_openblas_names_its_kernels():
    found = _threading._openblas()
    if found is None:
        assert not _threading.blas_runs_avx512()
        return
    # openblas_get_corename exists in every OpenBLAS the supported SciPy wheels bundle.
    assert isinstance(found.core, str) and found.core, found
    assert f", {found.core} kernels)" in _threading.blas_mode()


def test_which_weight_gradients_run_over_the_whole_batch():
    from numbaconv.geometry import make_geometry

    alone = im2col.batch_weight_gradient
    # DCGAN's grad-w: 2048 taps x 1024 pixels (8x8 maps), 8 MiB of float32 columns.
    assert alone(make_geometry((16, 128, 16, 16), (256, 128, 4, 4), stride=2, padding=1), 4)
    # U-Net's: 28x28 maps (784 pixels an image, more than MIN_GEMM_COLUMNS), measured slower.
    assert not alone(make_geometry((16, 64, 56, 56), (128, 64, 2, 2), stride=2), 4)
    assert im2col.MIN_GEMM_COLUMNS == 196
    assert not alone(make_geometry((16, 64, 14, 14), (64, 64, 3, 3), padding=1), 4)
    assert alone(make_geometry((16, 64, 13, 14), (64, 64, 3, 3), padding=1), 4)
    # Columns over WORKSPACE_BYTES (32 MiB): 4608 taps x 32 x 49 pixels x 8 bytes; 16 images fit.
    assert not alone(make_geometry((32, 512, 7, 7), (512, 512, 3, 3), padding=1), 8)
    assert alone(make_geometry((16, 512, 7, 7), (512, 512, 3, 3), padding=1), 8)
    assert not alone(make_geometry((16, 15, 8, 8), (16, 15, 3, 3)), 4)  # under 16 channels
    assert not alone(make_geometry((16, 32, 8, 8), (32, 16, 3, 3), groups=2), 4)
