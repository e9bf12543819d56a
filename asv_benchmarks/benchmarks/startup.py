"""A new process: ``import numbaconv`` and the first ``conv2d`` call, loading Numba's disk cache.

Each sample is a fresh interpreter (asv's ``timeraw_``), so this is what a user's script pays
before its first result. ``setup`` has run the same code beforehand, in a process of its own, so
the kernel comes from the cache: a compile here would be a regression (lost ``cache=True``).
"""

import subprocess
import sys

from .common import NUMBACONV_KERNEL_NAMES, require_kernel

_FIRST_CALL = """
import numpy as np
import numbaconv
x = np.ones((8, 1, 8, 8), dtype=np.float32)
w = np.ones((10, 1, 3, 3), dtype=np.float32)
numbaconv.conv2d(x, w, padding=1, kernel={kernel!r})
"""


class ImportAndFirstCall:
    # As in .conv2d: the version asv derived before issue 14 (same measurement).
    version = "dd0bb47284f7d0a969491e2049bebb3d82b160350720eb0ce03996d86251cc61"
    params = (NUMBACONV_KERNEL_NAMES,)
    param_names = ("kernel",)
    timeout = 300

    def setup(self, kernel):
        require_kernel(kernel)
        subprocess.run([sys.executable, "-c", _FIRST_CALL.format(kernel=kernel)], check=True)

    def timeraw_import_and_first_conv2d(self, kernel):
        return _FIRST_CALL.format(kernel=kernel)
