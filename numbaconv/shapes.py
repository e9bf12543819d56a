"""The layer shapes that numbaconv is benchmarked on (asv suite, ``numbaconv bench``, comparisons).

One place, so the benchmarks, the CLI and the comparison script always measure the same layers.
:data:`LAYER_SHAPES` holds the suite's first eight layers (their names and values key the asv
history: never change them); :data:`ZOO_SHAPES` adds layers taken from real networks, so that
speed is judged on the layers users run, not on eight; :data:`FAMILY` groups all of them.

Each shape type says which operation it is (its ``op`` class attribute): :class:`LayerShape` is a
``conv2d`` layer, :class:`TransposedLayerShape` a ``conv_transpose2d`` one and
:class:`Conv1dLayerShape` a ``conv1d`` one; :mod:`numbaconv.bench` builds each one's data and calls.

This module imports nothing from numbaconv: ``compare_torch.py`` and the asv suite load it by
path, without importing numbaconv (which would set its threading defaults in their process).
"""

from __future__ import annotations

from typing import NamedTuple


class LayerShape(NamedTuple):
    """One convolution layer: input (N, C, H, W), K filters of R x S, and conv2d's options."""

    #: The function of ``numbaconv`` (and of ``torch.nn.functional``) that runs this layer; a
    #: class attribute, not a field, so the tuple's values (which key the asv history) stay nine
    #: to eleven integers.
    op = "conv2d"

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    filter_height: int
    filter_width: int
    stride: int = 1
    pad: int | tuple[int, int] = 0
    dilation: int = 1
    groups: int = 1

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """(K, C // groups, R, S), as ``conv2d`` takes it."""
        channels = self.in_channels // self.groups
        return (self.out_channels, channels, self.filter_height, self.filter_width)

    @property
    def options(self) -> dict:
        """The keyword arguments of ``conv2d`` (and of ``torch.nn.functional.conv2d``)."""
        return dict(
            stride=self.stride, padding=self.pad, dilation=self.dilation, groups=self.groups
        )

    @property
    def pad_pair(self) -> tuple[int, int]:
        return tuple(self.pad) if isinstance(self.pad, tuple | list) else (self.pad, self.pad)


class TransposedLayerShape(NamedTuple):
    """One transposed convolution layer (``conv_transpose2d``): input (N, C_in, H, W), C_out
    output channels, R x S filters, and conv_transpose2d's options."""

    op = "conv_transpose2d"

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    filter_height: int
    filter_width: int
    stride: int = 1
    pad: int = 0
    output_padding: int = 0
    dilation: int = 1
    groups: int = 1

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """(C_in, C_out // groups, R, S), as ``conv_transpose2d`` takes it."""
        channels = self.out_channels // self.groups
        return (self.in_channels, channels, self.filter_height, self.filter_width)

    @property
    def options(self) -> dict:
        """The keyword arguments of ``conv_transpose2d`` (numbaconv's and PyTorch's)."""
        return dict(
            stride=self.stride,
            padding=self.pad,
            output_padding=self.output_padding,
            dilation=self.dilation,
            groups=self.groups,
        )


class Conv1dLayerShape(NamedTuple):
    """One 1-D convolution layer (``conv1d``): input (N, C, L), K filters of length k, and
    conv1d's options."""

    op = "conv1d"

    batch: int
    in_channels: int
    length: int
    out_channels: int
    filter_length: int
    stride: int = 1
    pad: int = 0
    dilation: int = 1
    groups: int = 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.batch, self.in_channels, self.length)

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        """(K, C // groups, k), as ``conv1d`` takes it."""
        return (self.out_channels, self.in_channels // self.groups, self.filter_length)

    @property
    def options(self) -> dict:
        """The keyword arguments of ``conv1d`` (numbaconv's and PyTorch's)."""
        return dict(
            stride=self.stride, padding=self.pad, dilation=self.dilation, groups=self.groups
        )


#: Any benchmark layer.
AnyLayerShape = LayerShape | TransposedLayerShape | Conv1dLayerShape

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

#: Layers from real networks (issue "Fast on every layer"): name -> (N, C, H, W, K, R, S, stride,
#: pad, dilation, groups), batch 16 where the network trains so, smaller where a layer is large.
ZOO_SHAPES: dict[str, AnyLayerShape] = {
    # ResNet-50: the 1x1 stride-2 shortcut, deep 3x3 layers, bottleneck 1x1s, batch of one.
    "resnet_shortcut": LayerShape(16, 64, 56, 56, 128, 1, 1, 2, 0),
    "resnet_3x3_14": LayerShape(16, 256, 14, 14, 256, 3, 3, 1, 1),
    "resnet_3x3_7": LayerShape(16, 512, 7, 7, 512, 3, 3, 1, 1),
    "resnet_reduce": LayerShape(16, 256, 56, 56, 64, 1, 1, 1, 0),
    "resnet_expand": LayerShape(16, 64, 56, 56, 256, 1, 1, 1, 0),
    "resnet_batch1": LayerShape(1, 128, 28, 28, 128, 3, 3, 1, 1),
    # MobileNetV2 / EfficientNet depthwise layers (groups = channels).
    "dw3x3_112": LayerShape(16, 32, 112, 112, 32, 3, 3, 1, 1, 1, 32),
    "dw3x3_s2": LayerShape(16, 144, 56, 56, 144, 3, 3, 2, 1, 1, 144),
    "dw3x3_14": LayerShape(16, 384, 14, 14, 384, 3, 3, 1, 1, 1, 384),
    "dw5x5_28": LayerShape(16, 240, 28, 28, 240, 5, 5, 1, 2, 1, 240),
    # ResNeXt: 32 groups of 4 channels.
    "resnext_grouped": LayerShape(16, 128, 56, 56, 128, 3, 3, 1, 1, 1, 32),
    # DeepLab: atrous 3x3 layers.
    "dilated_2": LayerShape(4, 256, 28, 28, 256, 3, 3, 1, 2, 2),
    "dilated_12": LayerShape(4, 256, 33, 33, 256, 3, 3, 1, 12, 12),
    # Inception: asymmetric 1x7 and 7x1 filters.
    "inception_1x7": LayerShape(16, 128, 17, 17, 128, 1, 7, 1, (0, 3)),
    "inception_7x1": LayerShape(16, 128, 17, 17, 128, 7, 1, 1, (3, 0)),
    # U-Net: one large image.
    "unet_large": LayerShape(1, 32, 256, 256, 32, 3, 3, 1, 1),
    # Transposed and 1-D layers (issue "The convolution family complete"): a U-Net decoder's 2x2
    # stride-2 up-convolution, a DCGAN generator's 4x4 stride-2 one, a 1-D audio layer (one
    # second at 16 kHz).
    "unet_up2x2": TransposedLayerShape(16, 128, 28, 28, 64, 2, 2, 2, 0),
    "dcgan_up4x4": TransposedLayerShape(16, 256, 8, 8, 128, 4, 4, 2, 1),
    "audio_conv1d": Conv1dLayerShape(16, 64, 16000, 64, 9, 1, 4),
}

#: Every benchmark layer: the suite's eight, then the zoo.
ALL_SHAPES: dict[str, AnyLayerShape] = {**LAYER_SHAPES, **ZOO_SHAPES}

#: The family of each layer, for per-family summaries (``compare_torch.py --zoo``).
FAMILY: dict[str, str] = {
    "digits": "tiny",
    "mnist": "first layers",
    "cifar": "dense 3x3",
    "resnet3x3": "dense 3x3",
    "strided": "strided",
    "pointwise": "1x1",
    "first5x5": "first layers",
    "stem7x7": "first layers",
    "resnet_shortcut": "strided",
    "resnet_3x3_14": "deep, small maps",
    "resnet_3x3_7": "deep, small maps",
    "resnet_reduce": "1x1",
    "resnet_expand": "1x1",
    "resnet_batch1": "batch of one",
    "dw3x3_112": "depthwise",
    "dw3x3_s2": "depthwise",
    "dw3x3_14": "depthwise",
    "dw5x5_28": "depthwise",
    "resnext_grouped": "grouped",
    "dilated_2": "dilated",
    "dilated_12": "dilated",
    "inception_1x7": "asymmetric",
    "inception_7x1": "asymmetric",
    "unet_large": "large image",
    "unet_up2x2": "transposed",
    "dcgan_up4x4": "transposed",
    "audio_conv1d": "1-D",
}
