"""Small @njit helpers shared by the Numba kernel families."""

from __future__ import annotations

from numba import njit


@njit(cache=True, inline="always")
def valid_range(n_out, stride, offset, size):
    """Output indices ``o`` in ``[0, n_out)`` whose input index ``o*stride + offset`` lies in
    ``[0, size)``, as a half-open range ``(lo, hi)``; the rest read zero padding.

    Hoisting this test out of the inner loop leaves a branch-free, vectorisable loop body.
    """
    lo = 0
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    hi = n_out
    last = (size - 1 - offset) // stride + 1  # Python floor division, as in Numba
    if last < hi:
        hi = last
    if hi < lo:
        hi = lo
    return lo, hi


# Row loops below index 0-based slices: Numba checks every index that might be negative
# (Python's wraparound), and such a check in a loop body keeps LLVM from vectorising it. Strides
# 1 and 2 get loops with a constant stride (contiguous or interleaved vector loads and stores).
#
# At stride 2 the loops run in blocks of STRIDE2_BLOCK elements with a constant trip count, which
# LLVM turns into fixed shuffles: a plain loop over a runtime count was vectorised only with a
# width times interleave (32 elements on AVX-512) above the rows of small maps, which then ran
# scalar. AMD EPYC Zen 4, 1 thread, rows of 28 from 56-wide planes (ResNet's stride-2 layers),
# ms per 1024 planes, plain -> blocks of 8: gather float64 3.19 -> 1.32, float32 1.27 -> 0.43;
# scatter-add 4.91 -> 1.40 and 3.74 -> 0.42; scatter 2.39 -> 1.37 and 1.44 -> 0.48; rows of
# 112: gather 2.32 -> 1.63 and 1.76 -> 0.97, scatter-add 3.90 -> 1.59 and 3.53 -> 1.05. (Blocks
# of 4 and 16 were no better overall; at stride 1 blocks lost, 28-wide copies 0.20 -> 0.29.)
STRIDE2_BLOCK = 8


@njit(cache=True, inline="always")
def gather_row(dst, src, first, stride):
    """``dst[i] = src[first + i*stride]`` for every ``i`` of ``dst``."""
    count = dst.shape[0]
    if stride == 1:
        s1 = src[first : first + count]
        for i in range(count):
            dst[i] = s1[i]
    elif stride == 2:
        s2 = src[first : first + 2 * count]
        full = count - count % STRIDE2_BLOCK
        for i0 in range(0, full, STRIDE2_BLOCK):
            for j in range(STRIDE2_BLOCK):
                dst[i0 + j] = s2[2 * (i0 + j)]
        for i in range(full, count):
            dst[i] = s2[2 * i]
    else:
        for i in range(count):
            dst[i] = src[first + i * stride]


@njit(cache=True, inline="always")
def deinterleave_row(phase0, phase1, src, pad):
    """A row ``src`` padded with ``pad`` >= 0 zeros on the left, split by the parity of the padded
    index: element ``w`` to ``(phase0, phase1)[(w + pad) % 2][(w + pad) // 2]``, those that
    fall past the end of its phase row dropped. (Both phases of a stride-2 filter's columns,
    :func:`gather_row` twice at stride 2, in one pass over ``src``.) The padding is not written."""
    even, odd = (phase0, phase1) if pad % 2 == 0 else (phase1, phase0)
    even_q0, odd_q0 = pad // 2, (pad + 1) // 2  # where src[0] and src[1] land
    n_even = max(0, min((src.shape[0] + 1) // 2, even.shape[0] - even_q0))
    n_odd = max(0, min(src.shape[0] // 2, odd.shape[0] - odd_q0))
    pairs = min(n_even, n_odd)
    s2 = src[: 2 * pairs]
    de = even[even_q0 : even_q0 + pairs]
    do = odd[odd_q0 : odd_q0 + pairs]
    for i in range(pairs):
        de[i] = s2[2 * i]
        do[i] = s2[2 * i + 1]
    for i in range(pairs, n_even):
        even[even_q0 + i] = src[2 * i]
    for i in range(pairs, n_odd):
        odd[odd_q0 + i] = src[2 * i + 1]


@njit(cache=True, inline="always")
def scatter_row(dst, src, first, stride):
    """``dst[first + i*stride] = src[i]`` for every ``i`` of ``src``."""
    count = src.shape[0]
    if stride == 1:
        d1 = dst[first : first + count]
        for i in range(count):
            d1[i] = src[i]
    elif stride == 2:
        d2 = dst[first : first + 2 * count - 1]
        full = count - count % STRIDE2_BLOCK
        for i0 in range(0, full, STRIDE2_BLOCK):
            for j in range(STRIDE2_BLOCK):
                d2[2 * (i0 + j)] = src[i0 + j]
        for i in range(full, count):
            d2[2 * i] = src[i]
    else:
        for i in range(count):
            dst[first + i * stride] = src[i]


@njit(cache=True, inline="always")
def scatter_add_row(dst, src, first, stride):
    """``dst[first + i*stride] += src[i]`` for every ``i`` of ``src``."""
    count = src.shape[0]
    if stride == 1:
        d1 = dst[first : first + count]
        for i in range(count):
            d1[i] += src[i]
    elif stride == 2:
        d2 = dst[first : first + 2 * count]
        full = count - count % STRIDE2_BLOCK
        for i0 in range(0, full, STRIDE2_BLOCK):
            for j in range(STRIDE2_BLOCK):
                d2[2 * (i0 + j)] += src[i0 + j]
        for i in range(full, count):
            d2[2 * i] += src[i]
    else:
        for i in range(count):
            dst[first + i * stride] += src[i]


@njit(cache=True, inline="always")
def zero_row(dst):
    for i in range(dst.shape[0]):
        dst[i] = 0
