"""Each layer's op (``conv2d``; the zoo's transposed and 1-D layers: ``conv_transpose2d`` and
``conv1d``) and its backward pass: time and peak memory, per kernel x layer shape x dtype. The
module and class names predate the other ops; they key the asv history, so they stay.

``setup`` builds the harness's seeded data and calls the kernel once, so compilation is never
timed (asv's ``--quick`` has no warm-up of its own) and only what the case runs is compiled; the
timing classes also compare the kernel with the ``numpy`` kernel on the first images of the batch.

``version``: asv drops the results of a benchmark whose version changes, and derives the default
from the benchmark's source code. The versions below are those asv derived before the timing
harness (issue 14) moved the data and calls into ``numbaconv/bench.py``: the measured quantity
(same arrays, same calls) did not change, so the history stays one series. Change a version when
what a benchmark measures changes.

``peakmem_*`` is the benchmark process's peak RSS: the interpreter and imports (Numba's JIT
runtime included, once a Numba kernel has run), the layer's data, the output and the kernel's
workspace. PyTorch is left out there: its libraries alone outweigh any layer's workspace.
"""

from .common import (
    DTYPE_NAMES,
    KERNEL_NAMES,
    NUMBACONV_KERNEL_NAMES,
    SHAPE_NAMES,
    Timed,
    backward_call,
    check_backward,
    check_forward,
    compile_apart,
    forward_call,
    prepare,
)


class _Conv2dCase(Timed):
    params = (KERNEL_NAMES, SHAPE_NAMES, DTYPE_NAMES)
    param_names = ("kernel", "shape", "dtype")


class Forward(_Conv2dCase):
    """``y = conv2d(x, w, b)`` (or the layer's other op)."""

    version = "1060700099474df2846a13df755165c1075cb0766a43b480216275dffbad8a36"

    def setup(self, kernel, shape, dtype):
        data = prepare(kernel, shape, dtype)
        self.forward = forward_call(kernel, data)
        check_forward(kernel, data, self.forward(), dtype)

    def time_forward(self, kernel, shape, dtype):
        self.forward()


class Backward(_Conv2dCase):
    """``grad_x, grad_w, grad_b = conv2d_backward(grad_y, x, w)``: all three gradients."""

    version = "8e66a2fee9d31dc16738a777cde0383c6ce1d9bc95106e81a9a171f6f81d1a37"

    def setup(self, kernel, shape, dtype):
        data = prepare(kernel, shape, dtype)
        self.backward = backward_call(kernel, data)
        self.backward()
        check_backward(kernel, data, dtype)

    def time_backward(self, kernel, shape, dtype):
        self.backward()


class _Conv2dMemoryCase:
    params = (NUMBACONV_KERNEL_NAMES, SHAPE_NAMES, DTYPE_NAMES)
    param_names = ("kernel", "shape", "dtype")
    timeout = 300


class ForwardMemory(_Conv2dMemoryCase):
    version = "aabd72394dbc4a573d3bc8ef6904eb5103ae257d27717592139298be0ef2d9f4"

    def setup(self, kernel, shape, dtype):
        data = prepare(kernel, shape, dtype)
        compile_apart(kernel, shape, dtype)  # LLVM's memory is not the kernel's
        self.forward = forward_call(kernel, data)
        self.forward()

    def peakmem_forward(self, kernel, shape, dtype):
        self.forward()


class BackwardMemory(_Conv2dMemoryCase):
    version = "ef4189ce5466f02a0ecc45e89eb4962bcf39593db9cf4a2ef880bed3eb9c43db"

    def setup(self, kernel, shape, dtype):
        data = prepare(kernel, shape, dtype)
        compile_apart(kernel, shape, dtype)
        self.backward = backward_call(kernel, data)
        self.backward()

    def peakmem_backward(self, kernel, shape, dtype):
        self.backward()
