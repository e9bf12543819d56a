"""``conv2d`` and ``conv2d_backward``: time and peak memory, per kernel x layer shape x dtype.

``setup`` builds seeded data and calls the kernel once, so compilation is never timed (asv's
``--quick`` has no warm-up of its own); the timing classes also compare the kernel with the
``numpy`` kernel on the first images of the batch.

``peakmem_*`` is the benchmark process's peak RSS: the interpreter and imports (Numba's JIT
runtime included, once a Numba kernel has run), the layer's data, the output and the kernel's
workspace. PyTorch is left out there: its libraries alone outweigh any layer's workspace.
"""

from .common import (
    DTYPE_NAMES,
    KERNEL_NAMES,
    NUMBACONV_KERNEL_NAMES,
    SHAPE_NAMES,
    WarmCache,
    backward_call,
    check_backward,
    check_forward,
    forward_call,
    prepare,
)


class _Conv2dCase(WarmCache):
    params = (KERNEL_NAMES, SHAPE_NAMES, DTYPE_NAMES)
    param_names = ("kernel", "shape", "dtype")


class Forward(_Conv2dCase):
    """``y = conv2d(x, w, b)``."""

    def setup(self, kernel, shape, dtype):
        data = prepare(kernel, shape, dtype)
        self.forward = forward_call(kernel, data)
        check_forward(kernel, data, self.forward(), dtype)

    def time_forward(self, kernel, shape, dtype):
        self.forward()


class Backward(_Conv2dCase):
    """``grad_x, grad_w, grad_b = conv2d_backward(grad_y, x, w)``: all three gradients."""

    def setup(self, kernel, shape, dtype):
        data = prepare(kernel, shape, dtype)
        self.backward = backward_call(kernel, data)
        self.backward()
        check_backward(kernel, data, dtype)

    def time_backward(self, kernel, shape, dtype):
        self.backward()


class _Conv2dMemoryCase(WarmCache):
    params = (NUMBACONV_KERNEL_NAMES, SHAPE_NAMES, DTYPE_NAMES)
    param_names = ("kernel", "shape", "dtype")


class ForwardMemory(_Conv2dMemoryCase):
    def setup(self, kernel, shape, dtype):
        self.forward = forward_call(kernel, prepare(kernel, shape, dtype))
        self.forward()

    def peakmem_forward(self, kernel, shape, dtype):
        self.forward()


class BackwardMemory(_Conv2dMemoryCase):
    def setup(self, kernel, shape, dtype):
        self.backward = backward_call(kernel, prepare(kernel, shape, dtype))
        self.backward()

    def peakmem_backward(self, kernel, shape, dtype):
        self.backward()
