"""Tests for adamnp.schedules."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adamnp import schedules
from adamnp.schedules import constant, exponential, linear, warmup_cosine

VECTORS = Path(__file__).parent / "vectors"

# -- independent formulas (numpy, vectorised over counts) ------------------------------------


def ref_linear(init, end, steps, counts):
    counts = np.asarray(counts, dtype=np.float64)
    if steps == 0:
        return np.full_like(counts, end)
    frac = np.clip(counts / steps, 0.0, 1.0)
    return (1.0 - frac) * init + frac * end


def ref_warmup_cosine(peak, warmup, decay, end, init, counts):
    counts = np.asarray(counts, dtype=np.float64)
    out = np.full_like(counts, end)
    if warmup:
        w = counts < warmup
        out[w] = np.interp(counts[w], [0.0, warmup], [init, peak])
    if decay:
        d = (counts >= warmup) & (counts < warmup + decay)
        theta = np.pi * (counts[d] - warmup) / decay
        # cos^2(theta/2) == (1 + cos(theta)) / 2
        out[d] = end + (peak - end) * np.cos(theta / 2) ** 2
    return out


def ref_exponential(init, rate, steps, staircase, end, counts):
    counts = np.asarray(counts, dtype=np.float64)
    e = np.floor(counts / steps) if staircase else counts / steps
    return np.maximum(end, init * np.exp(e * np.log(rate)))


def values(f, counts):
    return np.array([f(int(k)) for k in counts])


# -- key points --------------------------------------------------------------------------------


def test_constant_values():
    f = constant(3e-4)
    assert [f(0), f(1), f(10**9)] == [3e-4, 3e-4, 3e-4]
    assert constant(0).lr == 0.0
    assert type(constant(1).lr) is float


def test_linear_key_points():
    f = linear(1.0, 0.1, steps=10)
    assert f(0) == 1.0
    assert f(5) == pytest.approx(0.55, rel=1e-15)
    assert f(10) == 0.1
    assert f(11) == 0.1
    assert f(10**12) == 0.1


def test_linear_increasing_is_a_warmup():
    f = linear(0.0, 2e-3, steps=4)
    assert [f(k) for k in range(6)] == pytest.approx([0, 5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3])


def test_linear_zero_steps_is_end():
    f = linear(1.0, 0.25, steps=0)
    assert f(0) == 0.25
    assert f(7) == 0.25


def test_warmup_cosine_key_points():
    peak, warm, decay, end, init = 3e-3, 30, 270, 1e-4, 1e-5
    f = warmup_cosine(peak, warm, decay, end=end, init=init)
    assert f(0) == init
    assert f(15) == pytest.approx((init + peak) / 2, rel=1e-14)
    assert f(warm) == peak  # end of warmup: exactly the peak
    assert f(warm + decay // 2) == pytest.approx((peak + end) / 2, rel=1e-14)  # cosine midpoint
    assert f(warm + decay - 1) == pytest.approx(end, rel=1e-3)
    assert f(warm + decay) == end
    assert f(warm + decay + 1) == end
    assert f(10**12) == end


def test_warmup_cosine_defaults():
    f = warmup_cosine(1.0, 10, 10)
    assert (f.end, f.init) == (0.0, 0.0)
    assert f(0) == 0.0
    assert f(10) == 1.0
    assert f(20) == 0.0


def test_warmup_cosine_without_warmup_or_decay():
    f = warmup_cosine(1.0, 0, 4, end=0.0)
    assert f(0) == 1.0
    assert f(2) == pytest.approx(0.5, rel=1e-15)
    assert f(4) == 0.0
    g = warmup_cosine(1.0, 4, 0, end=0.2)
    assert [g(k) for k in range(6)] == [0.0, 0.25, 0.5, 0.75, 0.2, 0.2]
    h = warmup_cosine(1.0, 0, 0, end=0.2)
    assert h(0) == 0.2


def test_exponential_key_points():
    f = exponential(1e-2, 0.1, steps=100)
    assert f(0) == 1e-2
    assert f(50) == pytest.approx(1e-2 * math.sqrt(0.1), rel=1e-14)
    assert f(100) == pytest.approx(1e-3, rel=1e-14)
    assert f(300) == pytest.approx(1e-5, rel=1e-13)


def test_exponential_staircase_and_floor():
    f = exponential(1.0, 0.5, steps=3, staircase=True)
    assert [f(k) for k in range(7)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    g = exponential(1.0, 0.5, steps=1, end=1e-3)
    assert g(20) == 1e-3
    assert g(10**9) == 1e-3  # no overflow, no underflow error
    assert exponential(1.0, 1.0, steps=1)(10**6) == 1.0


# -- monotonicity and agreement with the independent formulas ---------------------------------


def test_warmup_cosine_monotone_and_matches_reference():
    peak, warm, decay, end, init = 3e-3, 30, 270, 1e-4, 0.0
    f = warmup_cosine(peak, warm, decay, end=end, init=init)
    counts = np.arange(0, warm + decay + 20)
    got = values(f, counts)
    np.testing.assert_allclose(
        got, ref_warmup_cosine(peak, warm, decay, end, init, counts), rtol=1e-13, atol=1e-18
    )
    assert np.all(np.diff(got[: warm + 1]) > 0)  # strictly rising warmup
    assert np.all(np.diff(got[warm:]) <= 0)  # non-increasing afterwards
    assert got.max() == peak
    assert got.min() == 0.0


def test_linear_and_exponential_monotone_and_match_reference():
    counts = np.arange(0, 130)
    f = linear(5e-3, 1e-4, steps=100)
    got = values(f, counts)
    np.testing.assert_allclose(got, ref_linear(5e-3, 1e-4, 100, counts), rtol=1e-13)
    assert np.all(np.diff(got) <= 0)
    g = exponential(5e-3, 0.3, steps=25)
    got = values(g, counts)
    np.testing.assert_allclose(got, ref_exponential(5e-3, 0.3, 25, False, 0.0, counts), rtol=1e-12)
    assert np.all(np.diff(got) < 0)


lr_values = st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_infinity=False)
step_counts = st.integers(min_value=0, max_value=500)


@given(lr_values, lr_values, lr_values, step_counts, step_counts)
def test_warmup_cosine_property(peak, end, init, warm, decay):
    f = warmup_cosine(peak, warm, decay, end=end, init=init)
    counts = np.arange(0, warm + decay + 3)
    got = values(f, counts)
    ref = ref_warmup_cosine(peak, warm, decay, end, init, counts)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15 * max(peak, end, init, 1e-300))
    assert np.all((got >= min(init, peak)) & (got <= max(init, peak)) | (counts >= warm))
    assert np.all((got >= min(end, peak)) & (got <= max(end, peak)) | (counts < warm))
    rise = np.diff(got[: warm + 1]) if decay else np.diff(got[:warm])
    assert np.all(rise >= 0) if peak >= init else np.all(rise <= 0)
    fall = np.diff(got[warm:])
    assert np.all(fall <= 0) if peak >= end else np.all(fall >= 0)
    assert f(0) == (init if warm else peak if decay else end)
    assert f(warm) == (peak if decay else end)
    assert f(warm + decay) == end


@given(lr_values, lr_values, step_counts, st.integers(min_value=0, max_value=600))
def test_linear_property(init, end, steps, count):
    f = linear(init, end, steps)
    ref = ref_linear(init, end, steps, [count])[0]
    assert f(count) == pytest.approx(ref, rel=1e-12, abs=1e-300)
    assert min(init, end) <= f(count) <= max(init, end)
    step = f(count + 1) - f(count)
    assert step <= 0 if end <= init else step >= 0


@given(
    lr_values,
    st.floats(min_value=1e-3, max_value=1.0),
    st.integers(min_value=1, max_value=100),
    st.booleans(),
    st.integers(min_value=0, max_value=10_000),
)
def test_exponential_property(init, rate, steps, staircase, count):
    f = exponential(init, rate, steps, staircase=staircase)
    ref = ref_exponential(init, rate, steps, staircase, 0.0, [count])[0]
    assert f(count) == pytest.approx(ref, rel=1e-10, abs=1e-300)
    assert 0.0 <= f(count) <= init
    assert f(count + 1) <= f(count)


# -- agreement with the torch vectors ---------------------------------------------------------


def test_warmup_cosine_reproduces_torch_vector_lrs_exactly():
    path = VECTORS / "torch_adamw_schedule.npz"
    if not path.exists():
        pytest.skip("torch vectors not present")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"][()])
        lrs = z["lr_per_step"]
    sched = meta["schedule"]
    f = warmup_cosine(
        sched["peak"],
        sched["warmup_steps"],
        sched["decay_steps"],
        end=sched["end"],
        init=sched["init"],
    )
    got = np.array([f(k) for k in range(meta["steps"])])
    np.testing.assert_array_equal(got, lrs)


# -- object behaviour ------------------------------------------------------------------------

ALL = [
    constant(1e-3),
    linear(1e-3, 0.0, 10),
    warmup_cosine(1e-3, 5, 10, end=1e-5, init=1e-6),
    exponential(1e-3, 0.5, 7, staircase=True, end=1e-6),
]


@pytest.mark.parametrize("f", ALL, ids=lambda f: type(f).__name__)
def test_frozen_hashable_picklable_and_pure(f):
    first = dataclasses.fields(f)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(f, first, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.other = 1.0  # type: ignore[attr-defined]
    assert hash(f) == hash(pickle.loads(pickle.dumps(f)))
    assert pickle.loads(pickle.dumps(f)) == f
    assert eval(repr(f), vars(schedules)) == f
    for k in (0, 1, 5, 17, 10**6):
        v = f(k)
        assert type(v) is float
        assert f(k) == v
        assert f(np.int64(k)) == v


def test_repr():
    assert repr(linear(1, 0, 3)) == "Linear(init=1.0, end=0.0, steps=3)"
    assert repr(exponential(1, 0.5, 2)) == (
        "Exponential(init=1.0, rate=0.5, steps=2, staircase=False, end=0.0)"
    )


def test_arguments_are_normalised_to_python_types():
    f = warmup_cosine(np.float32(0.5), np.int64(3), np.int32(4), end=np.float64(0.1))
    assert type(f.peak) is float and type(f.end) is float and type(f.init) is float
    assert type(f.warmup_steps) is int and type(f.decay_steps) is int
    assert f == warmup_cosine(float(np.float32(0.5)), 3, 4, end=0.1)


# -- argument errors ---------------------------------------------------------------------------

BAD = [
    (lambda: constant(-1e-3), ValueError, "lr"),
    (lambda: constant(math.nan), ValueError, "lr"),
    (lambda: constant(math.inf), ValueError, "lr"),
    (lambda: constant("0.1"), TypeError, "lr"),
    (lambda: constant(True), TypeError, "lr"),
    (lambda: linear(-1.0, 0.0, 3), ValueError, "init"),
    (lambda: linear(1.0, -0.5, 3), ValueError, "end"),
    (lambda: linear(1.0, math.inf, 3), ValueError, "end"),
    (lambda: linear(1.0, 0.0, -1), ValueError, "steps"),
    (lambda: linear(1.0, 0.0, 2.5), TypeError, "steps"),
    (lambda: linear(1.0, 0.0, 3.0), TypeError, "steps"),
    (lambda: warmup_cosine(-1.0, 1, 1), ValueError, "peak"),
    (lambda: warmup_cosine(math.nan, 1, 1), ValueError, "peak"),
    (lambda: warmup_cosine(1.0, -1, 1), ValueError, "warmup_steps"),
    (lambda: warmup_cosine(1.0, 1, -5), ValueError, "decay_steps"),
    (lambda: warmup_cosine(1.0, 1, 1, end=-1e-9), ValueError, "end"),
    (lambda: warmup_cosine(1.0, 1, 1, init=math.inf), ValueError, "init"),
    (lambda: warmup_cosine(1.0, None, 1), TypeError, "warmup_steps"),
    (lambda: exponential(-1.0, 0.5, 1), ValueError, "init"),
    (lambda: exponential(1.0, 0.0, 1), ValueError, "rate"),
    (lambda: exponential(1.0, 1.5, 1), ValueError, "rate"),
    (lambda: exponential(1.0, math.nan, 1), ValueError, "rate"),
    (lambda: exponential(1.0, 0.5, 0), ValueError, "steps"),
    (lambda: exponential(1.0, 0.5, 1, end=2.0), ValueError, "end"),
    (lambda: exponential(1.0, 0.5, 1, staircase=1), TypeError, "staircase"),
]


@pytest.mark.parametrize(("make", "exc", "name"), BAD)
def test_argument_errors_name_the_argument(make, exc, name):
    with pytest.raises(exc, match=rf"^{name} "):
        make()


@pytest.mark.parametrize("f", ALL, ids=lambda f: type(f).__name__)
def test_bad_count(f):
    with pytest.raises(ValueError, match=r"^count "):
        f(-1)
    with pytest.raises(TypeError, match=r"^count "):
        f(1.5)
    with pytest.raises(TypeError, match=r"^count "):
        f(True)
