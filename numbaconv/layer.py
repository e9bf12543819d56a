"""``ConvLayer``, the teaching convolution layer, drop-in compatible, on numbaconv's kernels;
and ``ConvTransposeLayer``, its transposed twin with the same conventions."""

from __future__ import annotations

import numpy as np

from . import registry
from .functional import (
    conv2d,
    conv2d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    im2col,
    pad_input,
)
from .geometry import (
    SUPPORTED_DTYPES,
    as_array,
    check_padding_mode,
    make_geometry,
    make_transposed_geometry,
)

_ACTIVATIONS = ("relu", None)


class ForwardNotCalledError(RuntimeError, AttributeError):
    """An attribute that :meth:`ConvLayer.forward` sets (``u``, ``cols``, ``w_col``) was read first.

    A :class:`RuntimeError`, like calling ``backward`` before ``forward``; also an
    :class:`AttributeError`, because the teaching layer has no such attribute before its first
    ``forward``, so code written against it (``hasattr(layer, "u")``,
    ``getattr(layer, "cols", None)``) keeps working.
    """


def _checked_options(dtype, activation) -> np.dtype:
    """The layer's dtype, after checking it and the activation."""
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported; use float32 or float64")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
    return dtype


class _Layer:
    """What both layers share: initial parameters, the kernel setting, the activation, AdaGrad.

    Subclasses set ``params`` and call :meth:`_init_parameters` from their ``__init__``.
    """

    def _init_parameters(self, weight_shape, n_flt, kernel, activation, dtype, wb_width, rng):
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
        # AdaGrad accumulators of the teaching implementation's update().
        self.h_w = np.zeros(weight_shape, dtype=dtype) + 1e-8
        self.h_b = np.zeros((1, n_flt), dtype=dtype) + 1e-8
        self.x = None
        self.y = None
        self._u = None

    @property
    def kernel(self) -> str | None:
        return self._kernel

    @kernel.setter
    def kernel(self, name: str | None) -> None:
        if name is not None:
            registry.resolve(name)  # raises ValueError for an unknown name
        self._kernel = name

    def _after_forward(self, name: str) -> None:
        # u is set by forward only (x is a plain attribute a user may assign).
        if self._u is None:
            raise ForwardNotCalledError(
                f"{type(self).__name__}.{name} read before forward(): forward() sets "
                f"{self._set_by_forward}"
            )

    _set_by_forward = "u"

    @property
    def u(self) -> np.ndarray:
        """The last output before the activation, (N, n_flt, y_h, y_w)."""
        self._after_forward("u")
        return self._u

    def _check_input(self, x) -> np.ndarray:
        x = as_array(x, "x")
        expected = self.params[:3]
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, {expected[0]}, {expected[1]}, "
                f"{expected[2]}), got {x.shape}"
            )
        return x

    def _store_forward(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Apply the activation to ``u``; store ``x`` (a copy), ``u`` and ``y``; return ``y``."""
        y = np.where(u <= 0, u.dtype.type(0), u) if self.activation == "relu" else u
        # A copy, as the teaching layer's im2col columns are: changing the caller's array between
        # forward and backward must not change the gradients (nor the columns read later).
        self.x = x.copy()
        self._u = u
        self.y = y
        return y

    def _grad_before_activation(self, grad_y) -> np.ndarray:
        """``grad_y`` checked and carried back through the activation."""
        if self.x is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        grad_y = as_array(grad_y, "grad_y")
        if grad_y.shape != self.y.shape:
            raise ValueError(
                f"grad_y must have the shape of the last output {self.y.shape}, got {grad_y.shape}"
            )
        if self.activation == "relu":
            # The teaching layer's grad_y * np.where(u <= 0, 0, 1), without leaving the dtype.
            grad_y = grad_y * ~(self.y <= 0)
        return grad_y

    def update(self, eta: float) -> None:
        """The teaching implementation's AdaGrad step on ``w`` and ``b``."""
        self.h_w += self.grad_w * self.grad_w
        self.w -= eta / np.sqrt(self.h_w) * self.grad_w
        self.h_b += self.grad_b * self.grad_b
        self.b -= eta / np.sqrt(self.h_b) * self.grad_b


class ConvLayer(_Layer):
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
    padding_mode : ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``, keyword-only
        What the padding holds, as in ``torch.nn.Conv2d`` (see :func:`numbaconv.conv2d`); the
        teaching layer pads with zeros. ``cols`` holds the padding of this mode.
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
    x : ndarray (N, x_ch, x_h, x_w) or None
        A copy of the last input to :meth:`forward` (None before it).
    y : ndarray (N, n_flt, y_h, y_w) or None
        The last output, after the activation (None before :meth:`forward`).
    u : ndarray (N, n_flt, y_h, y_w)
        The last output before the activation (convolution plus bias); the same array as ``y``
        when ``activation=None``. Equal to the teaching layer's ``u``, though stored
        C-contiguous rather than as its transposed view.
    cols : ndarray (x_ch * flt_h * flt_w, N * y_h * y_w)
        The teaching im2col matrix of the last input (rows ordered (c, r, s), columns
        (n, oh, ow); see :func:`numbaconv.im2col`). ``forward`` does not build it: the first read
        after each ``forward`` does, with the fast im2col kernel, and keeps it until the next
        ``forward``. That costs ``x_ch*flt_h*flt_w * N*y_h*y_w`` elements of memory (for 16
        images of 64 channels at 56x56 and a 3x3 filter, 29 million: 116 MB in float32) and a
        pass over them. With ``dilation`` the taps are the dilated ones; with ``groups`` it holds
        every input channel, and the rows of group ``g`` are
        ``cols[g*k : (g+1)*k]``, ``k = x_ch // groups * flt_h * flt_w``.
    w_col : ndarray (n_flt, x_ch // groups * flt_h * flt_w)
        ``w`` as a matrix, ``w.reshape(n_flt, -1)`` of the current ``w``: a view (so it follows
        in-place updates and writes through it change ``w``) unless ``w`` was assigned a
        non-contiguous array. With ``groups=1``, as in the teaching layer,
        ``u == ((w_col @ cols).T + b).reshape(N, y_h, y_w, n_flt).transpose(0, 3, 1, 2)``; with
        groups, the filters of group ``g`` (``w_col`` rows ``g*n_flt//groups`` onwards) multiply
        that group's rows of ``cols``.
    grad_x, grad_w, grad_b : ndarray
        Set by :meth:`backward`; ``grad_b`` has shape (n_flt,).
    h_w, h_b : ndarray
        The AdaGrad sums of squared gradients that :meth:`update` keeps (shapes of ``w`` and
        ``b``), starting at 1e-8 as in the teaching layer.

    Reading ``u``, ``cols`` or ``w_col`` before the first :meth:`forward` raises
    :class:`ForwardNotCalledError`.
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
        padding_mode: str = "zeros",
        kernel: str | None = None,
        activation: str | None = "relu",
        dtype=np.float64,
        wb_width: float = 0.1,
        rng: np.random.Generator | None = None,
    ):
        dtype = _checked_options(dtype, activation)
        weight_shape = (n_flt, x_ch // groups if groups else 0, flt_h, flt_w)
        geom = make_geometry(
            (1, x_ch, x_h, x_w),
            weight_shape,
            stride=stride,
            padding=pad,
            dilation=dilation,
            groups=groups,
        )
        pads = (geom.pad_top, geom.pad_bottom, geom.pad_left, geom.pad_right)
        self.padding_mode = check_padding_mode(padding_mode, pads, (x_h, x_w))
        self.params = (x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad)
        self.dilation = dilation
        self.groups = groups
        self._init_parameters(weight_shape, n_flt, kernel, activation, dtype, wb_width, rng)
        self._geometry = geom  # batch 1; cols needs its padding, stride and dilation
        self.y_ch, self.y_h, self.y_w = n_flt, geom.out_height, geom.out_width
        # The columns and the input they were built from: a forward stores a new x, and an
        # identity check against it is what invalidates the cache.
        self._cols = None
        self._cols_input = None

    _set_by_forward = "u, cols and w_col"

    @property
    def cols(self) -> np.ndarray:
        """The im2col matrix of the last input, (x_ch*flt_h*flt_w, N*y_h*y_w); built on first read.

        Costs ``x_ch*flt_h*flt_w * N*y_h*y_w`` elements, kept until the next :meth:`forward`.
        """
        self._after_forward("cols")
        if self._cols_input is not self.x:
            self._cols = self._columns(self.x)
            self._cols_input = self.x
        return self._cols

    @property
    def w_col(self) -> np.ndarray:
        """``w`` as an (n_flt, x_ch // groups * flt_h * flt_w) matrix, a view of the current ``w``.

        Built at each read, so it follows both in-place updates and assignments of ``w``.
        """
        self._after_forward("w_col")
        return self.w.reshape(self.w.shape[0], -1)

    def _columns(self, x: np.ndarray) -> np.ndarray:
        """The teaching im2col of ``x`` for this layer's geometry."""
        geom = self._geometry
        pads = (geom.pad_top, geom.pad_bottom, geom.pad_left, geom.pad_right)
        if self.padding_mode != "zeros":
            # The columns read the padding the convolution reads: pad explicitly, im2col unpadded.
            x = pad_input(x, pads, self.padding_mode)
            pad = (0, 0)
        else:
            extra_h = geom.pad_bottom - geom.pad_top
            extra_w = geom.pad_right - geom.pad_left
            if extra_h or extra_w:
                # padding='same' with an even (dilated) filter extent pads one more row/column
                # at the bottom/right (PyTorch's rule); im2col pads both sides alike, so the
                # extra zeros go into a copy of the input.
                x = np.pad(x, [(0, 0), (0, 0), (0, extra_h), (0, extra_w)])
            pad = (geom.pad_top, geom.pad_left)
        return im2col(
            x,
            geom.filter_height,
            geom.filter_width,
            geom.out_height,
            geom.out_width,
            stride=(geom.stride_h, geom.stride_w),
            pad=pad,
            dilation=(geom.dilation_h, geom.dilation_w),
        )

    def _conv_options(self) -> dict:
        return dict(
            stride=self.params[6],
            padding=self.params[7],
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
            kernel=self._kernel,
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Convolve ``x`` (N, x_ch, x_h, x_w), add the bias, apply the activation.

        Stores ``x`` (a copy), ``u`` (before the activation) and ``y``, and returns ``y``. The
        columns (``cols``) are not built here, only when read.
        """
        x = self._check_input(x)
        u = conv2d(x, self.w, np.reshape(self.b, -1), **self._conv_options())
        return self._store_forward(x, u)

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        """Back-propagate ``grad_y`` through the activation and the convolution.

        Stores ``grad_w``, ``grad_b`` (n_flt,) and ``grad_x``, and returns ``grad_x``.
        """
        grad_y = self._grad_before_activation(grad_y)
        self.grad_x, self.grad_w, self.grad_b = conv2d_backward(
            grad_y, self.x, self.w, **self._conv_options()
        )
        return self.grad_x

    def __repr__(self) -> str:
        x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad = self.params
        mode = "" if self.padding_mode == "zeros" else f"padding_mode={self.padding_mode!r}, "
        return (
            f"ConvLayer({x_ch}, {x_h}, {x_w}, {n_flt}, {flt_h}, {flt_w}, stride={stride!r}, "
            f"pad={pad!r}, groups={self.groups}, {mode}kernel={self._kernel!r}, "
            f"activation={self.activation!r}, dtype={self.dtype.name})"
        )


class ConvTransposeLayer(_Layer):
    """A 2-D transposed convolution layer with an optional ReLU, in ``ConvLayer``'s style.

    ``ConvTransposeLayer(x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad, output_padding)``
    computes :func:`numbaconv.conv_transpose2d` (``torch.nn.ConvTranspose2d``'s semantics) plus
    a bias, then the activation. Its attributes, methods and initialisation follow
    :class:`ConvLayer`: with ``rng=None`` the initial weights are ``wb_width *
    np.random.randn(...)`` (first ``w``, then ``b``), so ``np.random.seed`` fixes them.

    Parameters
    ----------
    x_ch, x_h, x_w : int
        Input channels, height and width.
    n_flt, flt_h, flt_w : int
        Output channels (filters) and filter height and width.
    stride : int or (int, int)
    pad : int or (int, int)
        Rows/columns removed from each side of the full output.
    output_padding : int or (int, int)
        Rows/columns added at the bottom/right of the output; smaller than the stride or the
        dilation along each axis.
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
        ``(x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad)``; ``output_padding``,
        ``dilation`` and ``groups`` are attributes of their own.
    w : ndarray (x_ch, n_flt // groups, flt_h, flt_w)
        PyTorch's layout for transposed convolutions: input channels first.
    b : ndarray (1, n_flt)
    y_ch, y_h, y_w : int
        Output channels, height and width:
        ``y_h = (x_h - 1)*stride - 2*pad + dilation*(flt_h - 1) + output_padding + 1``.
    x : ndarray (N, x_ch, x_h, x_w) or None
        A copy of the last input to :meth:`forward` (None before it).
    y : ndarray (N, n_flt, y_h, y_w) or None
        The last output, after the activation (None before :meth:`forward`).
    u : ndarray (N, n_flt, y_h, y_w)
        The last output before the activation; the same array as ``y`` when
        ``activation=None``. Reading it before the first :meth:`forward` raises
        :class:`ForwardNotCalledError`.
    grad_x, grad_w, grad_b : ndarray
        Set by :meth:`backward`; ``grad_b`` has shape (n_flt,).
    h_w, h_b : ndarray
        The AdaGrad sums of squared gradients that :meth:`update` keeps, starting at 1e-8.

    There is no ``padding_mode``: PyTorch's transposed convolutions pad with zeros only.
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
        output_padding=0,
        *,
        dilation=1,
        groups: int = 1,
        kernel: str | None = None,
        activation: str | None = "relu",
        dtype=np.float64,
        wb_width: float = 0.1,
        rng: np.random.Generator | None = None,
    ):
        dtype = _checked_options(dtype, activation)
        weight_shape = (x_ch, n_flt // groups if groups else 0, flt_h, flt_w)
        adjoint = make_transposed_geometry(
            (1, x_ch, x_h, x_w),
            weight_shape,
            stride=stride,
            padding=pad,
            output_padding=output_padding,
            dilation=dilation,
            groups=groups,
        )
        if n_flt % groups:
            raise ValueError(f"out_channels ({n_flt}) must be divisible by groups ({groups})")
        self.params = (x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad)
        self.output_padding = output_padding
        self.dilation = dilation
        self.groups = groups
        self._init_parameters(weight_shape, n_flt, kernel, activation, dtype, wb_width, rng)
        # The adjoint convolution's input is this layer's output.
        self.y_ch, self.y_h, self.y_w = n_flt, adjoint.in_height, adjoint.in_width

    def _conv_options(self) -> dict:
        return dict(
            stride=self.params[6],
            padding=self.params[7],
            output_padding=self.output_padding,
            dilation=self.dilation,
            groups=self.groups,
            kernel=self._kernel,
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Transposed-convolve ``x`` (N, x_ch, x_h, x_w), add the bias, apply the activation.

        Stores ``x`` (a copy), ``u`` (before the activation) and ``y``, and returns ``y``.
        """
        x = self._check_input(x)
        u = conv_transpose2d(x, self.w, np.reshape(self.b, -1), **self._conv_options())
        return self._store_forward(x, u)

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        """Back-propagate ``grad_y`` through the activation and the transposed convolution.

        Stores ``grad_w``, ``grad_b`` (n_flt,) and ``grad_x``, and returns ``grad_x``.
        """
        grad_y = self._grad_before_activation(grad_y)
        self.grad_x, self.grad_w, self.grad_b = conv_transpose2d_backward(
            grad_y, self.x, self.w, **self._conv_options()
        )
        return self.grad_x

    def __repr__(self) -> str:
        x_ch, x_h, x_w, n_flt, flt_h, flt_w, stride, pad = self.params
        return (
            f"ConvTransposeLayer({x_ch}, {x_h}, {x_w}, {n_flt}, {flt_h}, {flt_w}, "
            f"stride={stride!r}, pad={pad!r}, output_padding={self.output_padding!r}, "
            f"groups={self.groups}, kernel={self._kernel!r}, activation={self.activation!r}, "
            f"dtype={self.dtype.name})"
        )
