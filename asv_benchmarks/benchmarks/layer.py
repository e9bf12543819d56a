"""``ConvLayer``: one training step of the digits-sized layer, the teaching code's use case."""

import numpy as np

import numbaconv

from .common import DTYPE_NAMES, NUMBACONV_KERNEL_NAMES, Timed, layer_shape, require_kernel


class ConvLayerTrainStep(Timed):
    """``forward`` (with ReLU), ``backward``, then the plain SGD update of ``w`` and ``b``.

    ``version``: as in :mod:`.conv2d`, the one asv derived before issue 14 (same measurement).
    """

    version = "b63ac6d00f277a6e9541787156ccb1857529ac74075cd01bc92af77e75b90b2b"

    params = (NUMBACONV_KERNEL_NAMES, DTYPE_NAMES)
    param_names = ("kernel", "dtype")

    def setup(self, kernel, dtype):
        require_kernel(kernel)
        n, c, h, w, k, r, s, stride, pad = layer_shape("digits")[:9]
        rng = np.random.default_rng(0)
        self.layer = numbaconv.ConvLayer(
            c, h, w, k, r, s, stride, pad, kernel=kernel, dtype=dtype, rng=rng
        )
        self.x = rng.standard_normal((n, c, h, w), dtype=dtype)
        out_shape = (n, self.layer.y_ch, self.layer.y_h, self.layer.y_w)
        self.grad_y = rng.standard_normal(out_shape, dtype=dtype)
        # Small enough that thousands of timed steps leave the weights O(1).
        self.eta = 1e-5
        self.time_train_step(kernel, dtype)

    def time_train_step(self, kernel, dtype):
        layer = self.layer
        layer.forward(self.x)
        layer.backward(self.grad_y)
        layer.w -= self.eta * layer.grad_w
        layer.b -= self.eta * layer.grad_b
