"""``ConvLayer``: the teaching convolution layer, drop-in compatible, on numbaconv's kernels."""

from __future__ import annotations

import numpy as np

from . import registry
from .functional import conv2d, conv2d_backward
from .geometry import SUPPORTED_DTYPES, as_array, make_geometry

_ACTIVATIONS = ("relu", None)


class ConvLayer:
    """A 2-D convolution layer with an optional ReLU, with the teaching ``ConvLayer`` interface.

    ``ConvLayer(x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad)`` builds the same layer as the
    teaching implementation: with ``rng=None`` the initial weights are drawn from NumPy's global
    generator exactly as it does (``wb_width * np.random.randn(...)``), so ``np.random.seed``
    gives the same numbers. ``forward``/``backward`` compute what it computes, with any kernel.

    Parameters
    ----------
    x_ch, x_h, x_w : int
        Input channels, height and width.
    n_flt, flt_h, flt_w : int
        Number of filters and filter height and width.
    stride : int or (int, int)
    pad : int, (int, int), ``'valid'`` or ``'same'``
    dilation : int or (int, int), keyword-only
    groups : int, keyword-only
    kernel : str or None
        A name from :data:`numbaconv.KERNELS`, or None for the default; settable later.
    activation : ``"relu"`` or None
    dtype : float32 or float64
    wb_width : float
        Standard deviation of the initial weights and biases.
    rng : numpy.random.Generator, optional
        Source of the initial weights; by default NumPy's global generator.

    Attributes
    ----------
    params : tuple
        ``(x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad)``.
    w : ndarray (n_flt, x_ch // groups, flt_h, flt_w)
    b : ndarray (1, n_flt)
    y_ch, y_h, y_w : int
        Output channels, height and width.
    y, grad_x, grad_w, grad_b : ndarray
        Set by :meth:`forward` and :meth:`backward`; ``grad_b`` has shape (n_flt,).
    """

    def __init__(
        self,
        x_ch: int,
        x_h: int,
        x_w: int,
        n_flt: int,
        flt_h: int,
        flt_w: int,
        stride=1,
        pad=0,
        *,
        dilation=1,
        groups: int = 1,
        kernel: str | None = None,
        activation: str | None = "relu",
        dtype=np.float64,
        wb_width: float = 0.1,
        rng: np.random.Generator | None = None,
    ):
        dtype = np.dtype(dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype {dtype} is not supported; use float32 or float64")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
        weight_shape = (n_flt, x_ch // groups if groups else 0, flt_h, flt_w)
        geom = make_geometry(
            (1, x_ch, x_h, x_w),
            weight_shape,
            stride=stride,
            padding=pad,
            dilation=dilation,
            groups=groups,
        )
        self.params = (x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad)
        self.dilation = dilation
        self.groups = groups
        self.activation = activation
        self.kernel = kernel
        self.dtype = dtype

        if rng is None:
            w = wb_width * np.random.randn(*weight_shape)  # noqa: NPY002 (teaching init)
            b = wb_width * np.random.randn(1, n_flt)  # noqa: NPY002
        else:
            w = wb_width * rng.standard_normal(weight_shape)
            b = wb_width * rng.standard_normal((1, n_flt))
        self.w = w.astype(dtype, copy=False)
        self.b = b.astype(dtype, copy=False)
        self.y_ch, self.y_h, self.y_w = n_flt, geom.out_height, geom.out_width
        # AdaGrad accumulators of the teaching implementation's update().
        self.h_w = np.zeros(weight_shape, dtype=dtype) + 1e-8
        self.h_b = np.zeros((1, n_flt), dtype=dtype) + 1e-8
        self.x = None
        self.y = None

    @property
    def kernel(self) -> str | None:
        return self._kernel

    @kernel.setter
    def kernel(self, name: str | None) -> None:
        if name is not None:
            registry.resolve(name)  # raises ValueError for an unknown name
        self._kernel = name

    def _conv_options(self) -> dict:
        return dict(
            stride=self.params[6],
            padding=self.params[7],
            dilation=self.dilation,
            groups=self.groups,
            kernel=self._kernel,
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Convolve ``x`` (N, x_ch, x_h, x_w), add the bias, apply the activation; store ``y``."""
        x = as_array(x, "x")
        expected = self.params[:3]
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"ConvLayer expects input of shape (N, {expected[0]}, {expected[1]}, "
                f"{expected[2]}), got {x.shape}"
            )
        u = conv2d(x, self.w, np.reshape(self.b, -1), **self._conv_options())
        if self.activation == "relu":
            u = np.where(u <= 0, u.dtype.type(0), u)
        # A copy, as the teaching layer's im2col columns are: changing the caller's array between
        # forward and backward must not change the gradients.
        self.x = x.copy()
        self.y = u
        return u

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        """Back-propagate ``grad_y`` through the activation and the convolution.

        Stores ``grad_w``, ``grad_b`` (n_flt,) and ``grad_x``, and returns ``grad_x``.
        """
        if self.x is None:
            raise RuntimeError("ConvLayer.backward() called before forward()")
        grad_y = as_array(grad_y, "grad_y")
        if grad_y.shape != self.y.shape:
            raise ValueError(
                f"grad_y must have the shape of the last output {self.y.shape}, got {grad_y.shape}"
            )
        if self.activation == "relu":
            # The teaching layer's grad_y * np.where(u <= 0, 0, 1), without leaving the dtype.
            grad_y = grad_y * ~(self.y <= 0)
        self.grad_x, self.grad_w, self.grad_b = conv2d_backward(
            grad_y, self.x, self.w, **self._conv_options()
        )
        return self.grad_x

    def update(self, eta: float) -> None:
        """The teaching implementation's AdaGrad step on ``w`` and ``b``."""
        self.h_w += self.grad_w * self.grad_w
        self.w -= eta / np.sqrt(self.h_w) * self.grad_w
        self.h_b += self.grad_b * self.grad_b
        self.b -= eta / np.sqrt(self.h_b) * self.grad_b

    def __repr__(self) -> str:
        x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad = self.params
        return (
            f"ConvLayer({x_ch}, {x_h}, {x_w}, {n_flt}, {flt_h}, {flt_w}, stride={stride!r}, "
            f"pad={pad!r}, groups={self.groups}, kernel={self._kernel!r}, "
            f"activation={self.activation!r}, dtype={self.dtype.name})"
        )
