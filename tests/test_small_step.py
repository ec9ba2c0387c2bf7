"""The small-step path (adamnp._small): the same bits, the same errors, nothing written on
a refusal, and taken exactly when it applies."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from conftest import snapshot

import adamnp
from adamnp import _small, backends
from adamnp.lowbit.half import bfloat16_dtype

if not backends.available("numba"):
    pytest.skip("the numba backend is not available", allow_module_level=True)

CONFIGS = {
    "adamw": dict(),
    "adamw-amsgrad-maximize": dict(amsgrad=True, maximize=True, weight_decay=0.1),
    "adam-l2": dict(decoupled=False, weight_decay=0.05),
    "adam-no-decay-schedule": dict(decoupled=False, lr=lambda c: 1e-2 / (1 + c)),
    "betas-lerp-large": dict(betas=(0.3, 0.99), eps=1e-6),
}


def _config(decoupled=True, **options):
    return (adamnp.adamw if decoupled else adamnp.adam)(**options)


def _run(backend, p0, grads, config, small, tree=False):
    """Params and state bytes after stepping through ``grads`` with the small path on or off
    (off: ``SMALL_MAX`` 0), and how many steps the small path took."""
    p = {"x": p0.copy()} if tree else p0.copy()
    old, _small.SMALL_MAX = _small.SMALL_MAX, (_small.SMALL_MAX if small else 0)
    try:
        state = adamnp.init(p, config, backend=backend)
        taken = 0
        for g in grads:
            g = {"x": g} if tree else g
            with state._lock:
                done = _small.try_step(p, g, state)
            taken += done
            if not done:
                adamnp.step(p, g, state)
    finally:
        _small.SMALL_MAX = old
    return snapshot(p, state), taken


def _assert_small_path_agrees(p0, grads, config):
    """The small path takes every step and ends with the bits of the reference and of the
    group kernels (the small path off)."""
    reference, _ = _run("numpy", p0, grads, config, small=False)
    full, none = _run("numba", p0, grads, config, small=False)
    fast, taken = _run("numba", p0, grads, config, small=True)
    assert none == 0 and taken == len(grads)
    assert fast == reference
    assert fast == full


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(CONFIGS))
@pytest.mark.parametrize("shape", [(1,), (1000,), (7, 33), (1 << 16,)])
def test_equals_the_reference_and_the_group_kernels(dtype, case, shape):
    rng = np.random.default_rng(len(shape) + shape[0])
    p0 = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) * 10.0**k for k in (-3, 0, 2, -6, 0)]
    config = _config(**CONFIGS[case])
    _assert_small_path_agrees(p0, grads, config)


HALF = [np.dtype(np.float16)] + ([bfloat16_dtype()] if bfloat16_dtype() is not None else [])


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("grad_dtype", ["param", "float32"])
@pytest.mark.parametrize("case", ["adamw", "adamw-amsgrad-maximize", "adam-l2"])
@pytest.mark.parametrize("shape", [(1,), (1000,), (3, 700), (1 << 16,)])
def test_half_params_equal_the_reference_and_the_group_kernels(
    dtype, rounding, grad_dtype, case, shape
):
    """float16/bfloat16 leaves (pieces of 1024, a partial last one) with gradients of their
    own format or float32: the same bits as the reference and the group kernels."""
    rng = np.random.default_rng(shape[0] + len(case))
    p0 = rng.standard_normal(shape).astype(dtype)
    g_dtype = dtype if grad_dtype == "param" else np.float32
    grads = [(rng.standard_normal(shape) * 10.0**k).astype(g_dtype) for k in (-3, 0, -6, 1)]
    config = _config(**CONFIGS[case], param_rounding=rounding)
    _assert_small_path_agrees(p0, grads, config)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("bad", [np.nan, -np.inf, 2.0**64])
@pytest.mark.parametrize("grad_dtype", ["param", "float32"])
def test_half_params_refuse_non_finite_gradients_as_before(dtype, bad, grad_dtype):
    """A NaN, an infinity or (bfloat16, float32 gradients) a magnitude at or above the
    limit: nothing written, the same error as the full path; under "skip" a skipped step.
    (2**64 is Inf in float16, a finite bfloat16 above the limit.)"""
    g = np.ones(2000, np.float64)
    g[1500] = bad
    with np.errstate(over="ignore"):  # 2**64 is Inf in float16
        g = g.astype(dtype if grad_dtype == "param" else np.float32)
    messages = []
    for small_max in (_small.SMALL_MAX, 0):
        p = np.linspace(-1, 1, 2000).astype(dtype)
        state = _state(p)
        _small._PLANS.pop(state, None)
        messages.append(_refusal(p, g, state, ValueError, small_max))
    assert messages[0] == messages[1]
    p = np.ones(2000, dtype)
    state = _state(p, config=dict(nonfinite="skip"))
    before = snapshot(p, state)
    with state._lock:
        assert _small.try_step(p, g, state)
    after = snapshot(p, state)
    assert after[:3] == before[:3] and state.skipped_steps == 1


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_params_refuse_shared_memory_and_wrong_gradients(dtype):
    """Aliasing between the leaf, its gradient and the moments, or a gradient of a third
    dtype: the small path steps aside, writes nothing, and the full path names it."""
    p = np.linspace(-1, 1, 3000).astype(dtype)
    state = _state(p)
    adamnp.step(p, np.ones_like(p), state)
    cases = [(p, p), (p, p.astype(np.float64)), (state.slots[0].m.view(dtype)[:3000], p)]
    for pp, gg in cases:
        before = snapshot(p, state)
        with state._lock:
            assert not _small.try_step(pp, gg, state)
        assert snapshot(p, state) == before


def test_a_one_leaf_tree_takes_it_too():
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(500).astype(np.float32)
    grads = [rng.standard_normal(500).astype(np.float32) for _ in range(4)]
    fast, taken = _run("numba", p0, grads, adamnp.adamw(), small=True, tree=True)
    reference, _ = _run("numpy", p0, grads, adamnp.adamw(), small=False, tree=True)
    assert taken == 4 and fast == reference


def _state(p, **options):
    return adamnp.init(p, adamnp.adamw(**options.pop("config", {})), backend="numba", **options)


@pytest.mark.parametrize(
    "why",
    ["8-bit", "two leaves", "too large", "clipping", "numpy backend", "float16, 8-bit", "labels"],
)
def test_it_steps_aside_where_it_does_not_apply(why):
    p = np.ones(5000, np.float32)
    g = np.ones_like(p)
    if why == "8-bit":
        state = _state(p, state_bits=8, min_8bit_size=1)
    elif why == "two leaves":
        p, g = [p, p.copy()], [g, g.copy()]
        state = _state(p)
    elif why == "too large":
        p = np.ones(_small.SMALL_MAX + 1, np.float32)
        g = np.ones_like(p)
        state = _state(p)
    elif why == "clipping":
        state = _state(p, config=dict(max_grad_norm=1.0))
    elif why == "numpy backend":
        state = adamnp.init(p, adamnp.adamw(), backend="numpy")
    elif why == "float16, 8-bit":
        p, g = p.astype(np.float16), g.astype(np.float16)
        state = _state(p, state_bits=8, min_8bit_size=1)
    else:
        p, g = {"a": p}, {"a": g}
        state = adamnp.init(p, {"x": adamnp.adamw()}, labels={"a": "x"}, backend="numba")
    before = snapshot(p, state)
    with state._lock:
        took = _small.try_step(p, g, state)
    if why == "labels":  # one leaf with a label: the path applies, with that label's config
        assert took and state.step == 1
        return
    assert not took
    assert snapshot(p, state) == before


def _bad_inputs():
    """(name, change(p, g, state) -> (p, g), exception or None for a skip)."""

    def alias(p, g, s):
        return p, p

    def grad_view_of_param(p, g, s):
        return p, p[::1]

    def grad_is_moment(p, g, s):
        return p, s.slots[0].m

    def param_is_moment(p, g, s):
        return s.slots[0].v, g

    def read_only(p, g, s):
        p.flags.writeable = False
        return p, g

    def strided(p, g, s):
        return p, np.repeat(g, 2)[::2]

    def wrong_dtype(p, g, s):
        return p, g.astype(np.float64)

    def wrong_shape(p, g, s):
        return p, g[:-1].copy()

    def subclass(p, g, s):
        return p, np.ma.masked_array(g)

    def nan(p, g, s):
        g = g.copy()
        g[17] = np.nan
        return p, g

    def huge(p, g, s):
        g = g.copy()
        g[3] = 2.0**64
        return p, g

    return {
        "alias": (alias, ValueError),
        "grad view of param": (grad_view_of_param, ValueError),
        "grad is the state's m": (grad_is_moment, ValueError),
        "param is the state's v": (param_is_moment, ValueError),
        "read-only param": (read_only, ValueError),
        "strided grad": (strided, ValueError),
        "wrong dtype": (wrong_dtype, TypeError),
        "wrong shape": (wrong_shape, ValueError),
        "masked grad": (subclass, TypeError),
        "nan grad": (nan, ValueError),
        "huge grad": (huge, ValueError),
    }


@pytest.mark.parametrize("case", sorted(_bad_inputs()))
def test_refusals_change_nothing_and_name_the_problem_as_before(case):
    change, exc = _bad_inputs()[case]
    messages = []
    for small_max in (_small.SMALL_MAX, 0):  # the small path, then the full path alone
        rng = np.random.default_rng(3)
        p = rng.standard_normal(300).astype(np.float32)
        state = _state(p)
        adamnp.step(p, rng.standard_normal(300).astype(np.float32), state)
        _small._PLANS.pop(state, None)  # made again under the SMALL_MAX below
        pp, gg = change(p, rng.standard_normal(300).astype(np.float32), state)
        messages.append(_refusal(pp, gg, state, exc, small_max))
    assert messages[0] == messages[1]


def _refusal(p, g, state, exc, small_max) -> str:
    """The message of the ``exc`` that a step raises with ``SMALL_MAX`` set to ``small_max``
    (the small path, or 0: the full path alone), after checking that it wrote nothing."""
    old, _small.SMALL_MAX = _small.SMALL_MAX, small_max
    try:
        before = snapshot(p, state)
        with pytest.raises(exc) as info:
            adamnp.step(p, g, state)
        assert snapshot(p, state) == before
        return str(info.value)
    finally:
        _small.SMALL_MAX = old


def test_skip_counts_and_writes_nothing():
    p = np.ones(100, np.float32)
    state = _state(p, config=dict(nonfinite="skip"))
    g = np.ones_like(p)
    g[50] = np.inf
    before = snapshot(p, state)
    adamnp.step(p, g, state)
    after = snapshot(p, state)
    assert after[:3] == before[:3] and state.skipped_steps == 1 and state.step == 0


def test_propagate_computes_through_nan_as_the_reference():
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal(64).astype(np.float32)
    g = rng.standard_normal(64).astype(np.float32)
    g[5] = np.nan
    config = adamnp.adamw(nonfinite="propagate")
    fast, taken = _run("numba", p0, [g, g * 0.5], config, small=True)
    reference, _ = _run("numpy", p0, [g, g * 0.5], config, small=False)
    assert taken == 2 and fast == reference


def test_configure_and_copies_keep_working():
    """A live change reaches the next small step; a pickled or deep-copied state makes its
    own plan (the cache is not part of the state's data) and steps like the original."""
    p = np.linspace(-1, 1, 50, dtype=np.float32)
    g = np.full_like(p, 0.5)
    state = _state(p)
    adamnp.step(p, g, state)
    before = p.copy()
    adamnp.configure(state, lr=0.5)
    adamnp.step(p, g, state)
    assert np.abs(p - before).max() > 0.4  # lr 0.5 reached the step
    for twin in (pickle.loads(pickle.dumps(state)), copy.deepcopy(state)):
        assert twin not in _small._PLANS  # a copy makes its own plan
        q = p.copy()
        adamnp.step(q, g, twin)
        assert twin.step == state.step + 1
        r = p.copy()
        mirror = copy.deepcopy(state)
        adamnp.step(r, g, mirror)
        assert np.array_equal(q, r)
