"""Random small configurations (hypothesis) vs the loop reference, every kernel, both dtypes.

Each example runs twice: as users get it (these layers are under the serial threshold, so on
one thread) and with the serial shortcut off (on all of Numba's threads). The reference, the
slow part, is computed once for both.
"""

from __future__ import annotations

import os

import numpy as np
from helpers import DTYPES, Cfg, check_against_reference, make_data, naive_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from threadprobe import forced_parallel


def _extent(size, k, stride, lo, hi, dil):
    return (size + lo + hi - dil * (k - 1) - 1) // stride + 1


@st.composite
def configs(draw):
    groups = draw(st.integers(1, 3))
    c = groups * draw(st.integers(1, 3))
    k = groups * draw(st.integers(1, 3))
    n = draw(st.integers(1, 3))
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    # The input is at least as large as the dilated filter most of the time, sometimes smaller
    # (then padding has to make up for it).
    h = draw(st.integers(max(1, dh * (r - 1) + 1 - 2), dh * (r - 1) + 5))
    w = draw(st.integers(max(1, dw * (s - 1) + 1 - 2), dw * (s - 1) + 5))
    kind = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    if kind == "same":
        stride = 1
        padding = "same"
        pads = (dh * (r - 1), dw * (s - 1))
    else:
        sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        stride = sh if sh == sw and draw(st.booleans()) else (sh, sw)
        if kind == "int":
            p = draw(st.integers(0, 2))
            padding, pads = p, (2 * p, 2 * p)
        elif kind == "pair":
            ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
            padding, pads = (ph, pw), (2 * ph, 2 * pw)
        else:
            padding, pads = "valid", (0, 0)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if _extent(h, r, sh, pads[0], 0, dh) < 1:
        h = dh * (r - 1) + 1
    if _extent(w, s, sw, pads[1], 0, dw) < 1:
        w = dw * (s - 1) + 1
    dilation = dh if dh == dw and draw(st.booleans()) else (dh, dw)
    bias = draw(st.booleans())
    return Cfg(n, c, h, w, k, r, s, stride, padding, dilation, groups, bias)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_random_configs_match_reference(kernel, cfg, seed):
    for dtype in DTYPES:
        ref = naive_reference(cfg, *make_data(cfg, dtype, seed))
        check_against_reference(cfg, kernel, dtype, seed, ref=ref)
        with forced_parallel():
            check_against_reference(cfg, kernel, dtype, seed, ref=ref)


@st.composite
def configs_3x3(draw):
    """3x3, stride 1, no dilation, one group: the configurations 3x3 fast paths take."""
    n = draw(st.integers(1, 3))
    c, k = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    padding = draw(st.sampled_from([0, 1, 2, 3, (0, 1), (2, 1), (1, 0), "same", "valid"]))
    ph, pw = (0, 0) if padding == "valid" else (1, 1) if padding == "same" else _pair(padding)
    h = draw(st.integers(max(1, 3 - 2 * ph), 10))
    w = draw(st.integers(max(1, 3 - 2 * pw), 10))
    return Cfg(n, c, h, w, k, 3, 3, 1, padding, 1, 1, draw(st.booleans()))


def _pair(p):
    return p if isinstance(p, tuple) else (p, p)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs_3x3(), seed=st.integers(0, 2**16))
def test_random_3x3_configs_match_reference(kernel, cfg, seed):
    for dtype in DTYPES:
        ref = naive_reference(cfg, *make_data(cfg, dtype, seed))
        check_against_reference(cfg, kernel, dtype, seed, ref=ref)
        with forced_parallel():
            check_against_reference(cfg, kernel, dtype, seed, ref=ref)


def test_strategy_produces_valid_configs():
    """The strategy itself: every drawn config has a positive output size."""

    @settings(max_examples=200, deadline=None)
    @given(cfg=st.one_of(configs(), configs_3x3()))
    def inner(cfg):
        n, k, oh, ow = cfg.y_shape
        assert oh >= 1 and ow >= 1
        assert cfg.c % cfg.groups == 0 and cfg.k % cfg.groups == 0
        assert make_data(cfg, np.float64)[0].shape == cfg.x_shape

    inner()


def test_ci_replays_the_same_examples():
    """With CI set (conftest.py loads the "ci" profile), the tests above run derandomised, so a
    failure in CI replays; their own @settings keep that from the profile."""
    profile = settings.get_profile("ci")
    assert profile.derandomize and profile.print_blob and profile.database is None
    if os.environ.get("CI"):
        for test in (test_random_configs_match_reference, test_random_3x3_configs_match_reference):
            assert test._hypothesis_internal_use_settings.derandomize, test.__name__
