"""float16 / bfloat16 params through the public API: what is accepted, what is refused (and
that a refused step changes nothing), per-label rounding and live changes."""

from __future__ import annotations

import numpy as np
import pytest

import adamnp

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
HALF = [np.dtype(np.float16), BF16]


def _bits(a):
    return a.view(np.uint16).copy()


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: d.name)
def test_grads_of_another_dtype_are_refused_and_nothing_changes(dtype):
    params = {"w": np.ones(8, dtype), "b": np.zeros(3, np.float32)}
    state = adamnp.init(params, adamnp.adamw(lr=0.1), backend="numpy")
    good = {"w": np.ones(8, np.float32), "b": np.ones(3, np.float32)}
    adamnp.step(params, good, state)
    before = {k: v.copy() for k, v in params.items()}
    moments = [b.copy() for g in state.groups for b in g.buffers.values()]
    for bad, expected in ((np.float64, f"{dtype.name} or float32"), (np.int32, "float16 and")):
        grads = {"w": np.ones(8, bad), "b": np.ones(3, np.float32)}
        with pytest.raises(TypeError, match=rf"grads\['w'\] has dtype .*{expected}"):
            adamnp.step(params, grads, state)
    other = np.float16 if dtype == BF16 else BF16  # the other half format is no grad here
    with pytest.raises(TypeError, match=rf"expected {dtype.name} or float32"):
        adamnp.step(params, {"w": np.ones(8, other), "b": np.ones(3, np.float32)}, state)
    assert state.step == 1
    assert np.array_equal(_bits(before["w"]), _bits(params["w"]))
    assert np.array_equal(before["b"], params["b"])
    now = [b for g in state.groups for b in g.buffers.values()]
    assert all(np.array_equal(a, b) for a, b in zip(moments, now))


def test_a_float32_leaf_takes_no_half_gradient():
    p = np.zeros(4, np.float32)
    state = adamnp.init(p, adamnp.adamw(), backend="numpy")
    with pytest.raises(TypeError, match=r"grads has dtype float16, expected float32$"):
        adamnp.step(p, np.zeros(4, np.float16), state)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: d.name)
def test_moments_are_float32_and_8bit_state_covers_half_leaves(dtype):
    params = {"big": np.zeros(5000, dtype), "small": np.zeros(10, dtype)}
    state = adamnp.init(params, adamnp.adamw(), backend="numpy", state_bits=8)
    kinds = {p: type(s).__name__ for p, s in zip(state.paths, state.slots)}
    assert kinds == {"params['big']": "QuantSlot", "params['small']": "Fp32Slot"}
    assert state.slots[1].m.dtype == np.float32
    assert {g.param_dtype for g in state.groups} == {dtype}


def test_rounding_per_label_and_changed_live():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(4096).astype(np.float32)
    grads = [rng.standard_normal(4096).astype(np.float32) * 1e-3 for _ in range(4)]

    def run(configs, labels, change=None):
        params = {"a": p0.astype(BF16), "b": p0.astype(BF16)}
        state = adamnp.init(params, configs, labels=labels, backend="numpy")
        for t, g in enumerate(grads):
            if change is not None and t == 2:
                adamnp.configure(state, change[0], param_rounding=change[1])
            adamnp.step(params, {"a": g, "b": g.copy()}, state)
        return params

    near = adamnp.adamw(lr=1e-4)
    sto = adamnp.adamw(lr=1e-4, param_rounding="stochastic")
    mixed = run({"n": near, "s": sto}, lambda path, a: "n" if "'a'" in path else "s")
    all_near = run(near, None)
    all_sto = run(sto, None)
    assert np.array_equal(_bits(mixed["a"]), _bits(all_near["a"]))
    assert not np.array_equal(_bits(all_near["b"]), _bits(all_sto["b"]))  # rounding matters
    changed = run({"x": near}, lambda path, a: "x", change=("x", "stochastic"))
    assert not np.array_equal(_bits(changed["a"]), _bits(all_near["a"]))


def test_stochastic_rounding_keeps_small_updates_that_nearest_loses():
    p = np.ones(4096, BF16)  # gap above 1: 2**-7; Adam's step: lr
    for rounding, moves in (("nearest", False), ("stochastic", True)):
        x = p.copy()
        state = adamnp.init(x, adamnp.adam(lr=1e-3, param_rounding=rounding), backend="numpy")
        for _ in range(50):
            adamnp.step(x, np.ones(4096, np.float32), state)
        mean = float(x.astype(np.float64).mean())
        if moves:  # 50 steps of lr down from 1: 0.95 on average, within a few gaps / sqrt(n)
            assert abs(mean - 0.95) < 1e-3
        else:
            assert mean == 1.0
