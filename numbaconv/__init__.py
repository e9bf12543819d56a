"""numbaconv: fast CPU convolution layers for Python, written with Numba.

>>> import numpy as np, numbaconv as nc
>>> x = np.ones((1, 1, 4, 4), dtype=np.float32)
>>> w = np.ones((1, 1, 3, 3), dtype=np.float32)
>>> nc.conv2d(x, w, padding=1)[0, 0, 0]
array([4., 6., 6., 4.], dtype=float32)
"""

from ._threading import ForkedOpenMPError, configure_threading_layer

configure_threading_layer()

from . import cache  # noqa: E402
from ._workspace import free_workspace  # noqa: E402
from .functional import (  # noqa: E402
    col2im,
    conv1d,
    conv1d_backward,
    conv2d,
    conv2d_backward,
    conv_transpose1d,
    conv_transpose1d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    im2col,
)
from .layer import ConvLayer, ConvTransposeLayer  # noqa: E402
from .registry import KERNELS  # noqa: E402

# Numba would load kernels compiled against an older version of a helper in another module.
cache.guard_shared_helpers()
# Processes that compile one kernel at once could otherwise corrupt its cache index.
cache.lock_cache_files()

__version__ = "0.1.0"

__all__ = [
    "KERNELS",
    "ConvLayer",
    "ConvTransposeLayer",
    "ForkedOpenMPError",
    "col2im",
    "conv1d",
    "conv1d_backward",
    "conv2d",
    "conv2d_backward",
    "conv_transpose1d",
    "conv_transpose1d_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "free_workspace",
    "im2col",
    "__version__",
]
