"""numbaconv: fast CPU 2-D convolution layers for Python, written with Numba.

>>> import numpy as np, numbaconv as nc
>>> x = np.ones((1, 1, 4, 4), dtype=np.float32)
>>> w = np.ones((1, 1, 3, 3), dtype=np.float32)
>>> nc.conv2d(x, w, padding=1)[0, 0, 0]
array([4., 6., 6., 4.], dtype=float32)
"""

from ._threading import ForkedOpenMPError, configure_threading_layer

configure_threading_layer()

from ._workspace import free_workspace  # noqa: E402
from .functional import col2im, conv2d, conv2d_backward, im2col  # noqa: E402
from .layer import ConvLayer  # noqa: E402
from .registry import KERNELS  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "KERNELS",
    "ConvLayer",
    "ForkedOpenMPError",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "free_workspace",
    "im2col",
    "__version__",
]
