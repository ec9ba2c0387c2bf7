"""Finite gradients keep a finite state under nonfinite="raise" and "skip".

A gradient whose second-moment update could overflow (``|g| >= grad_limit(dtype)``: 2**63 for
float32, 2**480 for float64) counts as non-finite, like NaN and Inf: "raise" raises before
anything changes, "skip" skips the step. Below the limit, ``v`` stays at most ``2 * T**2``
and ``|m|`` at most ``2 * T`` whatever beta2, clipping or maximize (docs/formulas.md, "What
is guaranteed"). The CUDA backend runs the same checks in the simulator (tests/cuda_sim).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import snapshot

import adamnp
from adamnp import backends
from adamnp.backends.math import grad_limit, grad_limit_bits

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
STATE_BITS = {"full-precision state": {}, "8-bit state": dict(state_bits=8, min_8bit_size=1,
                                                       block_size=64)}  # fmt: skip


def below(dtype):
    """The largest float of ``dtype`` under the limit: the largest gradient that is used."""
    dtype = np.dtype(dtype)
    return np.nextafter(dtype.type(grad_limit(dtype)), dtype.type(0))


def test_limit_per_dtype():
    for dtype, exp, bits in ((F32, 63, 0x5F000000), (F64, 480, 0x5DF0000000000000)):
        limit = grad_limit(dtype)
        assert limit == 2.0**exp and grad_limit_bits(dtype) == bits
        assert np.array(limit, dtype).view(f"i{dtype.itemsize}") == bits
        # the bound on v (2 T**2) is at most half the largest power of two of the dtype
        assert 2 * limit**2 <= 2.0 ** (np.finfo(dtype).maxexp - 1) < np.finfo(dtype).max
        assert np.isfinite(below(dtype) * below(dtype))
        # the float64 sum of squares of clipping: 2**62 squares stay below 2**1023
        assert float(limit) ** 2 * 2.0**62 <= 2.0**1022


@pytest.mark.parametrize("dtype", [F32, F64])
def test_nonfinite_leaf_rejects_magnitudes_from_the_limit_on(backend, dtype):
    be = backends.get(backend)
    limit, ok = dtype.type(grad_limit(dtype)), below(dtype)
    grads = [np.ones(n, dtype) for n in (3, 70_000, 1)]
    for x in (ok, -ok, np.finfo(dtype).smallest_subnormal):
        grads[1][-1] = x
        assert be.nonfinite_leaf(grads) == -1, x
    for x in (limit, -limit, np.finfo(dtype).max, np.inf, np.nan):
        grads[1][-1] = x
        assert be.nonfinite_leaf(grads) == 1, x
    grads = [np.full(5, 1e21, dtype)]
    assert be.nonfinite_leaf(grads) == (0 if dtype == F32 else -1)  # float64: its own limit


def warm(backend, config, bits, rng):
    """A float32 leaf, a float64 leaf and a float32 leaf, after two ordinary steps."""
    params = {"a": rng.standard_normal(200).astype(np.float32),
              "b": rng.standard_normal(3).astype(np.float64),
              "c": rng.standard_normal(130).astype(np.float32)}  # fmt: skip
    state = adamnp.init(params, config, backend=backend, **STATE_BITS[bits])
    for _ in range(2):
        adamnp.step(params, {k: rng.standard_normal(a.shape).astype(a.dtype)
                             for k, a in params.items()}, state)  # fmt: skip
    grads = {k: rng.standard_normal(a.shape).astype(a.dtype) for k, a in params.items()}
    return params, grads, state


HUGE = {
    # leaf, position, value: float32 gradients from 1e21 (v overflows with beta2 = 0.999)
    # down to the limit itself; float64 ones from their own limit
    "1e21": ("c", 100, 1e21),
    "-1e21": ("c", 3, -1e21),
    "limit": ("a", 0, grad_limit(F32)),
    "float32 max": ("a", 199, np.finfo(F32).max),
    "float64 limit": ("b", 1, -grad_limit(F64)),
}
CONFIGS = {
    "adam": lambda policy: adamnp.adam(nonfinite=policy),
    "adamw-amsgrad-clip": lambda policy: adamnp.adamw(
        nonfinite=policy, amsgrad=True, max_grad_norm=1.0
    ),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("bits", sorted(STATE_BITS))
@pytest.mark.parametrize("huge", sorted(HUGE))
def test_huge_gradient_raises_and_changes_nothing(backend, bits, huge, config):
    params, grads, state = warm(backend, CONFIGS[config]("raise"), bits,
                                np.random.default_rng(1))  # fmt: skip
    leaf, pos, value = HUGE[huge]
    grads[leaf][pos] = value
    before = snapshot(params, state)
    with pytest.raises(ValueError, match=rf"grads\['{leaf}'\].*nonfinite='raise'"):
        adamnp.step(params, grads, state)
    assert snapshot(params, state) == before


@pytest.mark.parametrize("bits", sorted(STATE_BITS))
@pytest.mark.parametrize("huge", sorted(HUGE))
def test_huge_gradient_is_skipped(backend, bits, huge):
    params, grads, state = warm(backend, adamnp.adamw(nonfinite="skip"), bits,
                                np.random.default_rng(2))  # fmt: skip
    leaf, pos, value = HUGE[huge]
    grads[leaf][pos] = value
    leaves, buffers, step, skipped = snapshot(params, state)
    adamnp.step(params, grads, state)
    assert snapshot(params, state) == (leaves, buffers, step, skipped + 1)
    grads[leaf][pos] = 0.0
    adamnp.step(params, grads, state)  # the next ordinary step runs
    assert (state.step, state.skipped_steps) == (step + 1, skipped + 1)


def test_float64_leaves_have_their_own_limit(backend):
    params, grads, state = warm(backend, adamnp.adam(), "full-precision state",
                                np.random.default_rng(3))  # fmt: skip
    grads["b"][:] = [1e21, -1e140, below(F64)]  # fine for float64
    adamnp.step(params, grads, state)
    assert state.step == 3
    v = state.slots[1].v
    assert np.isfinite(v).all() and v.max() <= 2 * grad_limit(F64) ** 2


# Betas at the edges: beta2 = 0, beta2 rounding to 1 in float32 (1 - b2 far below its ulp),
# beta2 = 1 - 2**-24 (1 - b2 one float32 ulp), beta1 close to 1 and 0.
EDGES = {
    "default": dict(),
    "zero-betas": dict(betas=(0.0, 0.0)),
    "beta2-half": dict(betas=(0.9, 0.5)),
    "beta2-rounds-to-1": dict(betas=(0.5, 1 - 2.0**-30)),
    "beta2-one-ulp": dict(betas=(0.99999, 1 - 2.0**-24)),
    "beta2-close": dict(betas=(0.0, 0.9999999)),
    "maximize-amsgrad": dict(maximize=True, amsgrad=True, betas=(0.3, 0.999)),
    "clip": dict(max_grad_norm=1e19, amsgrad=True),  # a scale < 1 that keeps g large
}


def _moment_bounds(state):
    """Largest |m| and v (and vmax) of the state, as float64 (8-bit: from the absmax)."""
    hi = {"m": 0.0, "v": 0.0}
    for group in state.groups:
        for name, buf in group.buffers.items():
            if name.startswith("codes"):
                continue
            x = np.asarray(buf, np.float64)
            assert np.isfinite(x).all(), name
            key = "m" if name.endswith("m") else "v"
            if x.size:
                hi[key] = max(hi[key], float(np.abs(x).max()))
    return hi


LEAVES = {  # leaf dtype, state
    "float32": (F32, "full-precision state"),
    "float32-8bit": (F32, "8-bit state"),
    "float64": (F64, "full-precision state"),  # (float64 leaves keep float64 moments)
}


@pytest.mark.parametrize("leaf", sorted(LEAVES))
@pytest.mark.parametrize("edge", sorted(EDGES))
def test_gradients_just_below_the_limit_keep_the_state_finite(backend, edge, leaf):
    dtype, bits = LEAVES[leaf]
    rng = np.random.default_rng(4)
    n = 300
    params = {"w": rng.standard_normal(n).astype(dtype)}
    config = adamnp.adam(nonfinite="raise", **EDGES[edge])
    state = adamnp.init(params, config, backend=backend, **STATE_BITS[bits])
    top = below(dtype)
    limit = grad_limit(dtype)
    for t in range(40):
        # the largest gradient, with a sign that changes in runs (m moves both ways), and a
        # few smaller values
        sign = np.where(rng.random(n) < (0.1 if t % 10 else 0.9), -1, 1).astype(dtype)
        g = sign * top
        g[::7] *= dtype.type(0.75)
        adamnp.step(params, {"w": g}, state)
        hi = _moment_bounds(state)
        assert hi["v"] <= 2 * limit**2 and hi["m"] <= 2 * limit, (t, hi)
        assert np.isfinite(params["w"]).all()
    assert state.step == 40 and state.skipped_steps == 0


def test_clipping_norm_answers_the_check_below_the_bound(backend, monkeypatch):
    # with max_grad_norm the step sums the squares first: a sum below the smallest squared
    # limit (2**126 with a float32 leaf) proves every element finite and under its limit, so
    # the gradients are not read again; a NaN, Inf or larger sum is checked element by
    # element, which accepts large but valid gradients and names a bad one
    be = backends.get(backend)
    calls = []
    real = be.nonfinite_leaf
    monkeypatch.setattr(be, "nonfinite_leaf", lambda g: calls.append(1) or real(g))
    config = adamnp.adamw(nonfinite="skip", max_grad_norm=1.0)
    params, grads, state = warm(backend, config, "full-precision state",
                                np.random.default_rng(4))  # fmt: skip
    calls.clear()
    adamnp.step(params, grads, state)
    assert (calls, state.step, state.skipped_steps) == ([], 3, 0)
    grads["a"][:8] = below(F32)  # 8 squares of just under 2**63: the sum passes 2**126
    grads["b"][:] = below(F64)  # float64: its own limit
    adamnp.step(params, grads, state)
    assert (len(calls), state.step, state.skipped_steps) == (1, 4, 0)
    for bad in (np.nan, np.inf, grad_limit(F32)):
        grads["c"][7] = bad
        before = snapshot(params, state)
        adamnp.step(params, grads, state)
        assert snapshot(params, state)[:3] == before[:3] and state.skipped_steps == before[3] + 1
