"""Dilated stride-1 convolutions as undilated ones on polyphase sub-images.

Along an axis with dilation ``d`` and stride 1, output ``o`` reads the inputs ``o - pad + d*r``,
all congruent to ``o - pad`` modulo ``d``. So the outputs of phase ``phi`` (those with
``(o - pad) % d == phi``) read only the sub-image ``x[phi::d]``, through the undilated filter:
a dilation-``(dh, dw)`` convolution is ``dh * dw`` undilated ones. Each phase's sub-image is
copied, shifted by the padding that phase needs, into a zero-filled plane of one common size;
the planes of all phases go into the batch of one undilated convolution without padding
(``phases * N`` images), whose outputs are then scattered back, cropped to the outputs each
phase has. The zeros around a sub-image are the zeros the dilated convolution pads with, so the
sums hold the same products (in another order, and none of padding on a phase's extra outputs,
which are dropped).

The backward pass runs the same way: ``grad_y`` gathered into the phases' outputs (zeros on the
dropped ones, so they add nothing), the undilated backward pass on the planes, ``grad_x`` cut
back out of the planes' gradient; grad-w and grad-b are the batch's sums already.

Winograd covers only undilated 3x3 filters; through this, DeepLab's atrous layers run it too
(:func:`numbaconv.kernels.winograd.forward`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..geometry import ConvGeometry, make_geometry


@dataclass(frozen=True)
class AxisPhases:
    """One axis's phases: for phase ``phi`` (``range(d)``), its sub-image ``x[phi::d]`` goes to
    rows ``shift[phi]:shift[phi] + rows[phi]`` of a plane of ``plane`` rows (the sub-image's
    rows that fit), and output row ``t < outputs[phi]`` of that plane's undilated convolution
    is output row ``first[phi] + d*t`` of the dilated one."""

    dilation: int
    shift: tuple[int, ...]
    rows: tuple[int, ...]
    outputs: tuple[int, ...]
    first: tuple[int, ...]
    plane: int
    plane_outputs: int


def axis_phases(size: int, pad: int, out_size: int, dilation: int, taps: int) -> AxisPhases:
    """The phases along one axis of ``size`` inputs, ``pad`` before them, ``out_size`` outputs
    and a ``taps``-tap filter at ``dilation`` (stride 1)."""
    shift, outputs, first = [], [], []
    for phi in range(dilation):
        lowest = -((pad + phi) // dilation)  # the first output's index among the phase's rows
        highest = (out_size - pad - 1 - phi) // dilation
        shift.append(-lowest)
        outputs.append(max(0, highest - lowest + 1))
        first.append(pad + phi + dilation * lowest)
    plane_outputs = max(outputs)
    plane = plane_outputs + taps - 1
    rows = [
        max(0, min(len(range(phi, size, dilation)), plane - shift[phi])) for phi in range(dilation)
    ]
    return AxisPhases(
        dilation, tuple(shift), tuple(rows), tuple(outputs), tuple(first), plane, plane_outputs
    )


@dataclass(frozen=True)
class Phases:
    """A dilated stride-1 geometry as an undilated one (``sub``) on ``dh * dw`` planes a
    sub-image each, phase-major in the batch: planes ``p*N:(p+1)*N`` are phase ``p = i*dw + j``
    (``i``, ``j``: the phases along height and width)."""

    geom: ConvGeometry
    height: AxisPhases
    width: AxisPhases
    sub: ConvGeometry

    def pairs(self):
        """``(p, i, j)`` for every phase."""
        for i in range(self.height.dilation):
            for j in range(self.width.dilation):
                yield i * self.width.dilation + j, i, j


def applies(geom: ConvGeometry) -> bool:
    """Dilated, stride 1, one group (what the planes' batch can carry as it is)."""
    return (
        max(geom.dilation_h, geom.dilation_w) > 1
        and geom.stride_h == geom.stride_w == 1
        and geom.groups == 1
    )


def plan(geom: ConvGeometry) -> Phases:
    """The phases of a geometry for which :func:`applies`."""
    height = axis_phases(
        geom.in_height, geom.pad_top, geom.out_height, geom.dilation_h, geom.filter_height
    )
    width = axis_phases(
        geom.in_width, geom.pad_left, geom.out_width, geom.dilation_w, geom.filter_width
    )
    phases = geom.dilation_h * geom.dilation_w
    sub = make_geometry(
        (phases * geom.batch, geom.in_channels, height.plane, width.plane),
        (geom.out_channels, geom.in_channels, geom.filter_height, geom.filter_width),
    )
    return Phases(geom, height, width, sub)


def _every(first: int, count: int, step: int) -> slice:
    """``count`` indices from ``first``, ``step`` apart."""
    return slice(first, first + step * (count - 1) + 1, step) if count > 0 else slice(0, 0)


def _input_slices(phases: Phases):
    """For each phase: (its planes' rows and columns that hold its sub-image, the input's rows
    and columns they hold), as index tuples of 4-D arrays."""
    n = phases.geom.batch
    h, w = phases.height, phases.width
    for p, i, j in phases.pairs():
        rows, cols = h.rows[i], w.rows[j]
        top, left = h.shift[i], w.shift[j]
        plane = (
            slice(p * n, (p + 1) * n),
            slice(None),
            slice(top, top + rows),
            slice(left, left + cols),
        )
        image = (slice(None), slice(None), _every(i, rows, h.dilation), _every(j, cols, w.dilation))
        yield plane, image


def _output_slices(phases: Phases):
    """For each phase: (its planes' outputs that are kept, the dilated layer's outputs they
    are), as index tuples of 4-D arrays."""
    n = phases.geom.batch
    h, w = phases.height, phases.width
    for p, i, j in phases.pairs():
        rows, cols = h.outputs[i], w.outputs[j]
        plane = (slice(p * n, (p + 1) * n), slice(None), slice(0, rows), slice(0, cols))
        image = (
            slice(None),
            slice(None),
            _every(h.first[i], rows, h.dilation),
            _every(w.first[j], cols, w.dilation),
        )
        yield plane, image


def to_planes(x: np.ndarray, phases: Phases) -> np.ndarray:
    """The planes (``sub``'s input) of ``x``."""
    planes = np.zeros(phases.sub.input_shape, dtype=x.dtype)
    for plane, image in _input_slices(phases):
        planes[plane] = x[image]
    return planes


def from_planes(sub_y: np.ndarray, phases: Phases) -> np.ndarray:
    """The dilated convolution's output from ``sub``'s output on the planes."""
    y = np.empty(phases.geom.output_shape, dtype=sub_y.dtype)
    for plane, image in _output_slices(phases):
        y[image] = sub_y[plane]
    return y


def grad_to_planes(grad_y: np.ndarray, phases: Phases) -> np.ndarray:
    """``grad_y`` in the layout of ``sub``'s output: zeros on the outputs a phase drops."""
    sub_grad = np.zeros(phases.sub.output_shape, dtype=grad_y.dtype)
    for plane, image in _output_slices(phases):
        sub_grad[plane] = grad_y[image]
    return sub_grad


def grad_from_planes(grad_planes: np.ndarray, phases: Phases) -> np.ndarray:
    """grad-x from the planes' gradient (zeros where an input reaches no output)."""
    grad_x = np.zeros(phases.geom.input_shape, dtype=grad_planes.dtype)
    for plane, image in _input_slices(phases):
        grad_x[image] = grad_planes[plane]
    return grad_x


def forward(x, w, b, phases: Phases, run: Callable) -> np.ndarray:
    """The dilated forward pass, ``run(planes, w, b, sub_geometry)`` computing the undilated
    one."""
    return from_planes(run(to_planes(x, phases), w, b, phases.sub), phases)


def backward(grad_y, x, w, phases: Phases, run: Callable):
    """``(grad_x, grad_w, grad_b)`` of the dilated layer, ``run(sub_grad_y, planes, w,
    sub_geometry)`` computing the undilated backward pass."""
    grad_planes, grad_w, grad_b = run(
        grad_to_planes(grad_y, phases), to_planes(x, phases), w, phases.sub
    )
    return grad_from_planes(grad_planes, phases), grad_w, grad_b
