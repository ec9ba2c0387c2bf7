"""Stochastic rounding of the 8-bit second moment (``v_rounding="stochastic"``).

The backends' bit-for-bit agreement is in test_backends_agree.py ("+sr" cases), the
checkpoint round trip in test_checkpoint.py; here: the definition itself (bracketing,
unbiasedness, the hash), the compiled helpers against it, and what it is for (a decaying ``v``
that nearest rounding keeps stuck).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import adamnp
from adamnp.lowbit import stochastic as sr
from adamnp.lowbit.reference import round_stochastic
from adamnp.quant import dynamic_map, quantize_blockwise

V_MAP = dynamic_map(False)
U64 = np.uint64


def _uniforms(key, first, n):
    index = np.arange(first, first + n, dtype=U64)
    return sr.uniform(sr.block_key(key, index >> U64(32)), index & U64(0xFFFFFFFF))


def test_uniforms_are_uniform_and_independent_across_steps():
    u1 = _uniforms(sr.step_key(1, 0), 0, 1 << 16)
    u2 = _uniforms(sr.step_key(2, 0), 0, 1 << 16)
    assert u1.dtype == np.float32 and 0 <= u1.min() and u1.max() < 1
    assert np.all((u1 * 2**24) % 1 == 0)  # 24-bit grid
    assert stats.kstest(u1, "uniform").pvalue > 1e-3
    assert stats.kstest(u2, "uniform").pvalue > 1e-3
    assert abs(stats.pearsonr(u1, u2).statistic) < 0.02  # 5 sigma at n = 65536 is 0.0195
    assert abs(stats.pearsonr(u1[:-1], u1[1:]).statistic) < 0.02  # neighbours


def _sticky_block(n=256, seed=0):
    """A block of non-negative values spread over the unsigned map's decades."""
    x = np.random.default_rng(seed).random(n).astype(np.float32) ** 6
    x[0] = 1.0  # absmax 1: s = x
    return x


def test_codes_bracket_the_value_and_are_unbiased():
    x = _sticky_block()
    nearest, absmax = quantize_blockwise(x, V_MAP, 256, backend="numpy")
    trials = 4000
    total = np.zeros(x.size)
    lo = np.searchsorted(V_MAP.astype(np.float64), x, side="right") - 1  # map[lo] <= x
    hi = np.minimum(lo + 1, 255)
    for t in range(trials):
        codes = nearest.copy()
        round_stochastic(x, V_MAP, 256, codes, absmax, sr.step_key(t + 1, 0), 0)
        assert np.all((codes == lo) | (codes == hi))
        total += V_MAP[codes]
    gap = V_MAP[hi].astype(np.float64) - V_MAP[lo]
    p = np.divide(x - V_MAP[lo], gap, out=np.zeros(x.size), where=gap > 0)
    sigma = np.sqrt(p * (1 - p) / trials) * gap
    error = total / trials - x
    assert np.all(np.abs(error) <= 5 * sigma + 1e-7 * x)
    assert np.mean(sigma > 0) > 0.9  # most values do move between two codes


def test_scalar_round_up_matches_the_array_definition():
    x = _sticky_block(4096, seed=2)
    nearest, absmax = quantize_blockwise(x, V_MAP, 4096, backend="numpy")
    codes = nearest.copy()
    key = sr.step_key(7, 3)
    round_stochastic(x, V_MAP, 4096, codes, absmax, key, 12345)
    u = _uniforms(key, 12345, x.size)
    scalar = [int(sr.round_up(s, c, V_MAP, w)) for s, c, w in zip(x, nearest, u)]
    assert scalar == codes.tolist()
    # the ends of the map: no code beyond them, whatever u
    top = np.float32(1) + np.float32(2**-23)
    assert sr.round_up(top, 255, V_MAP, np.float32(0)) == 255
    signed = dynamic_map(True)
    assert sr.round_up(np.float32(-1) - np.float32(2**-23), 0, signed, np.float32(0)) == 0


def test_compiled_uniform_crosses_2_to_the_32():
    numba_kernels = pytest.importorskip("adamnp.backends.numba.quant")
    key = sr.step_key(3, 1)
    e = 2**32 - 100  # a block whose indices cross 2**32
    key0, key1, low = numba_kernels.block_keys(np.uint32(key), U64(e))
    got = [numba_kernels.element_uniform(U64(i), key0, key1, low) for i in range(256)]
    np.testing.assert_array_equal(np.float32(got), _uniforms(key, e, 256))


def test_stochastic_v_follows_a_shrinking_gradient(backend):
    """Element 1's gradient drops from 0.1 to 0.01 while element 0 keeps absmax at 1."""
    found = {}
    for rounding in ("nearest", "stochastic"):
        params = {"w": np.zeros(256, np.float32)}
        state = adamnp.init(params, adamnp.adam(lr=1e-6), backend=backend, state_bits=8,
                            min_8bit_size=0, v_rounding=rounding, state_format="bnb")  # fmt: skip
        g = np.zeros(256, np.float32)
        for t in range(1, 4001):
            g[0], g[1] = 1.0, 0.1 if t <= 1000 else 0.01
            adamnp.step(params, {"w": g}, state)
        slot = state.slots[0]
        found[rounding] = float(V_MAP[slot.codes_v[1]]) * float(slot.absmax_v[0])
    exact = 0.01**2 * (1 - 0.999**3000) + 0.1**2 * (1 - 0.999**1000) * 0.999**3000
    assert found["nearest"] > 10 * exact  # stuck near its value at step 1000 (~6e-3)
    assert 0.5 * exact < found["stochastic"] < 2 * exact


def test_v_rounding_is_checked():
    with pytest.raises(ValueError, match="v_rounding"):
        adamnp.init(np.zeros(3, np.float32), adamnp.adam(), v_rounding="stochastic ")
    state = adamnp.init(np.zeros(5000, np.float32), adamnp.adam(), backend="numpy",
                        state_bits=8, v_rounding="stochastic", state_format="bnb")  # fmt: skip
    assert state.v_rounding == "stochastic" and state.groups[0].v_rounding == "stochastic"
    # the format's own rounding by default: nearest for bnb, stochastic (the only one) for sqrt
    for fmt, rounding in (("bnb", "nearest"), ("sqrt", "stochastic")):
        state = adamnp.init(np.zeros(5000, np.float32), adamnp.adam(), backend="numpy",
                            state_bits=8, state_format=fmt)  # fmt: skip
        assert state.v_rounding == rounding
    with pytest.raises(ValueError, match="v_rounding='nearest' is only available with"):
        adamnp.init(np.zeros(5000, np.float32), adamnp.adam(), state_bits=8, v_rounding="nearest")
    with pytest.raises(ValueError, match="state_format must be one of"):
        adamnp.init(np.zeros(5000, np.float32), adamnp.adam(), state_bits=8, state_format="fp8")
