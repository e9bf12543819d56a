"""The layer shapes that numbaconv is benchmarked on (asv suite, ``numbaconv bench``, comparisons).

One place, so the benchmarks, the CLI and the comparison script always measure the same layers.
"""

from __future__ import annotations

from typing import NamedTuple


class LayerShape(NamedTuple):
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    filter_height: int
    filter_width: int
    stride: int = 1
    pad: int = 0


#: name -> (N, C, H, W, K, R, S, stride, pad)
LAYER_SHAPES: dict[str, LayerShape] = {
    "digits": LayerShape(8, 1, 8, 8, 10, 3, 3, 1, 1),
    "mnist": LayerShape(64, 1, 28, 28, 32, 3, 3, 1, 1),
    "cifar": LayerShape(64, 32, 32, 32, 64, 3, 3, 1, 1),
    "resnet3x3": LayerShape(16, 64, 56, 56, 64, 3, 3, 1, 1),
    "strided": LayerShape(16, 64, 56, 56, 128, 3, 3, 2, 1),
    "pointwise": LayerShape(16, 256, 14, 14, 64, 1, 1, 1, 0),
    "first5x5": LayerShape(32, 3, 32, 32, 32, 5, 5, 1, 2),
    "stem7x7": LayerShape(8, 3, 224, 224, 64, 7, 7, 2, 3),
}
