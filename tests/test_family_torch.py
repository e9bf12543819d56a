"""Optional: the new functions against PyTorch itself (float64, autograd for the gradients).

Skipped when torch is not installed; the loop references in ``naive_family.py`` are what the
main tests use.
"""

from __future__ import annotations

import numpy as np
import pytest

import numbaconv as nc

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_grads(fn, gy, *arrays):
    """``fn(*tensors)`` and the gradients of ``sum(fn(...) * gy)`` with respect to each array."""
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    y = fn(*tensors)
    y.backward(torch.tensor(gy))
    return y.detach().numpy(), [t.grad.numpy() for t in tensors]


def _check(got, expected):
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-11, atol=1e-11)


TRANSPOSED_2D = [
    dict(stride=2, padding=1, output_padding=1, groups=2, dilation=1),
    dict(stride=(3, 2), padding=(0, 2), output_padding=(2, 0), groups=1, dilation=(1, 2)),
    dict(stride=1, padding=1, output_padding=1, groups=4, dilation=2),
]


@pytest.mark.parametrize("options", TRANSPOSED_2D, ids=str)
def test_conv_transpose2d(options, kernel):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 4))
    w = rng.standard_normal((4, 8 // options["groups"], 3, 4))
    b = rng.standard_normal(8)
    y = nc.conv_transpose2d(x, w, b, kernel=kernel, **options)
    gy = rng.standard_normal(y.shape)
    ty, tgrads = _torch_grads(lambda *t: F.conv_transpose2d(*t, **options), gy, x, w, b)
    _check([y], [ty])
    _check(nc.conv_transpose2d_backward(gy, x, w, kernel=kernel, **options), tgrads)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_padding_mode(mode, kernel):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 5, 6))
    conv = torch.nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), groups=2)
    conv = conv.double()
    conv.padding_mode = mode
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    y = nc.conv2d(x, w, b, stride=(1, 2), padding=(2, 1), groups=2, padding_mode=mode)
    gy = rng.standard_normal(y.shape)
    tx = torch.tensor(x, requires_grad=True)
    ty = conv(tx)
    ty.backward(torch.tensor(gy))
    _check([y], [ty.detach().numpy()])
    got = nc.conv2d_backward(
        gy, x, w, stride=(1, 2), padding=(2, 1), groups=2, padding_mode=mode, kernel=kernel
    )
    _check(got, [tx.grad.numpy(), conv.weight.grad.numpy(), conv.bias.grad.numpy()])


def test_conv1d_same_reflect(kernel):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 17))
    conv = torch.nn.Conv1d(3, 4, 4, padding="same", dilation=2, padding_mode="reflect").double()
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    opts = dict(padding="same", dilation=2, padding_mode="reflect", kernel=kernel)
    y = nc.conv1d(x, w, b, **opts)
    gy = rng.standard_normal(y.shape)
    tx = torch.tensor(x, requires_grad=True)
    ty = conv(tx)
    ty.backward(torch.tensor(gy))
    _check([y], [ty.detach().numpy()])
    got = nc.conv1d_backward(gy, x, w, **opts)
    _check(got, [tx.grad.numpy(), conv.weight.grad.numpy(), conv.bias.grad.numpy()])


def test_conv_transpose1d(kernel):
    rng = np.random.default_rng(3)
    options = dict(stride=3, padding=2, output_padding=1, groups=2, dilation=2)
    x = rng.standard_normal((2, 4, 7))
    w = rng.standard_normal((4, 3, 5))
    b = rng.standard_normal(6)
    y = nc.conv_transpose1d(x, w, b, kernel=kernel, **options)
    gy = rng.standard_normal(y.shape)
    ty, tgrads = _torch_grads(lambda *t: F.conv_transpose1d(*t, **options), gy, x, w, b)
    _check([y], [ty])
    _check(nc.conv_transpose1d_backward(gy, x, w, kernel=kernel, **options), tgrads)


def test_conv_transpose_layer_matches_torch_module():
    layer = nc.ConvTransposeLayer(4, 5, 5, 6, 3, 3, 2, 1, 1, groups=2, activation=None)
    module = torch.nn.ConvTranspose2d(4, 6, 3, 2, 1, 1, groups=2).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor(layer.w))  # the same (C_in, C_out // groups, R, S) layout
        module.bias.copy_(torch.tensor(layer.b[0]))
    x = np.random.default_rng(5).standard_normal((2, 4, 5, 5))
    _check([layer.forward(x)], [module(torch.tensor(x)).detach().numpy()])
