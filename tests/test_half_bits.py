"""adamnp.lowbit.half, the bit-level definition of float16 / bfloat16 params, against
independent sources.

* Nearest rounding equals NumPy's ``astype(np.float16)`` and ``ml_dtypes``' ``astype(bfloat16)``
  bit for bit: on 2**22 random float32 bit patterns, 2**20 more within float16's range, and
  edge cases (ties of both parities, the subnormals of both formats, float16's overflow
  boundary 65504 / 65520, Inf, -0, float32 subnormals); NaN gives NaN with its sign. (An
  exhaustive run over all 2**32 float32 patterns, done once offline, gave no mismatch; it
  takes ten minutes, so it is not a test.)
* The upcasts equal ``astype(np.float32)`` for all 65536 patterns of each format.
* The scalar functions (what the Numba kernels compile) equal the NumPy twins, plain and
  compiled with ``numba.njit``, both roundings.
* Stochastic rounding lands on one of the two neighbours of ``x`` in the format (computed
  with ``np.nextafter`` in the format), keeps the sign, rounds toward zero for ``u = 0`` and
  away for ``u = 2**32 - 1``; it is unbiased (exactly, enumerating every value of the random
  bits it uses, and statistically over random ``u``); an exactly representable value comes
  back for every ``u``.
"""

from __future__ import annotations

import numpy as np
import pytest

from adamnp.lowbit import half

ml_dtypes = pytest.importorskip("ml_dtypes")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
U32_MAX = np.uint32(0xFFFFFFFF)

#: per format: (name, its NumPy dtype, the array rounding, the array upcast, format id)
FORMATS = {
    "float16": (F16, half.f16_round_array, half.f16_to_f32_array, 0),
    "bfloat16": (BF16, half.bf16_round_array, half.bf16_to_f32_array, 1),
}
FORMAT_NAMES = sorted(FORMATS)


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, np.uint32).view(np.float32)


def _bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def _astype(x: np.ndarray, dtype) -> np.ndarray:
    """The independent rounding: NumPy's / ml_dtypes' cast, as uint16 bits."""
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype).view(np.uint16)


def _random_patterns(n: int, seed: int) -> np.ndarray:
    """``n`` float32 values of uniformly random bit patterns (NaNs included)."""
    return _f32(np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint32))


def _in_f16_range(n: int, seed: int) -> np.ndarray:
    """``n`` float32 values of random sign and significand with exponents from 2**-30 to
    2**17: float16's subnormals, normals and overflow, densely."""
    rng = np.random.default_rng(seed)
    exponent = rng.integers(127 - 30, 127 + 17, n, dtype=np.uint32)
    bits = (rng.integers(0, 2, n, dtype=np.uint32) << 31) | (exponent << 23)
    return _f32(bits | rng.integers(0, 1 << 23, n, dtype=np.uint32))


def _edge_cases() -> np.ndarray:
    """Ties, subnormals of both formats, float16's overflow boundary, Inf, zeros, float32
    subnormals, and the float32 neighbours of each; both signs."""
    f16_sub = np.arange(1, 1024) * 2.0**-24  # every float16 subnormal
    f16_ties = np.concatenate(
        [
            1.0 + np.arange(8) * 2.0**-10 + 2.0**-11,  # normal ties, both parities
            2.0**-14 + np.arange(8) * 2.0**-24 + 2.0**-25,  # first normals' ties
            np.arange(16) * 2.0**-24 + 2.0**-25,  # subnormal ties (0 and 2**-24 first)
            np.arange(1000, 1024) * 2.0**-24 + 2.0**-25,  # ties up to 2**-14
            [3.0 * 2.0**-26, 2.0**-26, 2.0**-14 - 2.0**-25],
        ]
    )
    f16_edges = [
        65504.0,  # float16's largest
        65519.0,
        65520.0,  # the tie above it: to Inf
        65536.0,  # 2**16
        65535.0,
        2.0**-14,  # float16's smallest normal
        2.0**-24,  # its smallest subnormal
        2.0**-25,  # half of it: a tie, to 0
        6.0e-8,
        float(np.finfo(np.float32).max),
        np.inf,
        0.0,
    ]
    bf16_ties = _f32([0x3F808000, 0x3F818000, 0x00008000, 0x00018000, 0x7F7F8000, 0x7F7FFFFF])
    f32_sub = _f32([1, 2, 0x7FFF, 0x8000, 0x8001, 0x00400000, 0x007FFFFF, 0x00800000])
    bf16_sub = _f32(np.arange(1, 128, dtype=np.uint32) << 16)  # bfloat16 subnormals
    values = np.concatenate(
        [f16_sub, f16_ties, f16_edges, bf16_ties, f32_sub, bf16_sub, [1.0, 3.14159, 1e-3]]
    ).astype(np.float32)
    with np.errstate(over="ignore"):
        near = [
            values,
            np.nextafter(values, np.float32(np.inf)),
            np.nextafter(values, np.float32(0)),
        ]
    both = np.concatenate(near)
    return np.concatenate([both, -both])


def _nans() -> np.ndarray:
    """NaNs of both signs: quiet, signalling, with payloads in the low and high bits."""
    payloads = np.array([1, 2, 0x1FFF, 0x2000, 0xFFFF, 0x10000, 0x3FFFFF, 0x400000, 0x7FFFFF])
    bits = (np.uint32(0x7F800000) | payloads.astype(np.uint32)).astype(np.uint32)
    return _f32(np.concatenate([bits, bits | np.uint32(0x80000000)]))


# -- nearest rounding against NumPy and ml_dtypes


def _check_nearest(x: np.ndarray, name: str) -> None:
    dtype, round_array, _, _ = FORMATS[name]
    ok = ~np.isnan(x)
    got = round_array(x[ok])
    want = _astype(x[ok], dtype)
    bad = np.flatnonzero(got != want)
    if bad.size:
        i = bad[0]
        raise AssertionError(
            f"{name}: {bad.size} mismatches, first x={x[ok][i]!r} (bits "
            f"{hex(_bits(x[ok])[i])}): got {hex(got[i])}, astype gives {hex(want[i])}"
        )


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_nearest_equals_astype_on_random_patterns(name):
    _check_nearest(_random_patterns(1 << 22, seed=1), name)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_nearest_equals_astype_densely_in_float16_range(name):
    _check_nearest(_in_f16_range(1 << 20, seed=2), name)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_nearest_equals_astype_on_edge_cases(name):
    x = _edge_cases()
    assert np.isfinite(x).sum() > 2000  # the cases are there
    _check_nearest(x, name)


def test_edge_cases_round_as_the_formats_say():
    """A few cases spelled out (so the oracle's own behaviour is pinned too)."""
    x = np.float32([65504, 65519, 65520, 2.0**-25, 3 * 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11])
    assert half.f16_round_array(x).tolist() == [
        0x7BFF,  # max
        0x7BFF,  # below the tie
        0x7C00,  # the tie: Inf (65504's last bit is odd)
        0x0000,  # half the smallest subnormal: to even, 0
        0x0002,  # 1.5 subnormal units: to even, 2
        0x3C00,  # tie down to even
        0x3C02,  # tie up to even
    ]
    assert half.f16_round_array(np.float32([-0.0, -np.inf]))[0] == 0x8000
    assert half.bf16_round_array(np.float32([-0.0]))[0] == 0x8000
    assert half.bf16_round_array(_f32([0x7F7FFFFF]))[0] == 0x7F80  # float32 max: Inf


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_nan_stays_nan_with_its_sign(name, stochastic):
    _, round_array, to_f32, _ = FORMATS[name]
    x = np.concatenate([_nans(), _random_patterns(1 << 16, seed=3)])
    x = x[np.isnan(x)]
    assert x.size > 100
    u = np.random.default_rng(4).integers(0, 2**32, x.size, dtype=np.uint32)
    got = round_array(x, u if stochastic else None)
    assert np.all(np.isnan(to_f32(got)))
    assert np.array_equal(got >> 15, _bits(x) >> 31)  # the sign
    quiet = 0x7E00 if name == "float16" else 0x7FC0  # the module's documented NaN
    assert np.all(got & 0x7FFF == quiet)


# -- upcasts


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_upcast_equals_astype_for_every_pattern(name):
    dtype, _, to_f32, _ = FORMATS[name]
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = to_f32(h)
    assert got.dtype == np.float32
    want = h.view(dtype).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_nearest_round_trips_every_pattern(name):
    """Upcast then round gives back every non-NaN pattern."""
    _, round_array, to_f32, _ = FORMATS[name]
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = to_f32(h)
    ok = ~np.isnan(x)
    assert np.array_equal(round_array(x[ok]), h[ok])


# -- the scalar functions equal the array twins (plain Python and compiled)


def _sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(
        [_edge_cases(), _nans(), _random_patterns(20_000, seed), _in_f16_range(20_000, seed)]
    )
    u = np.random.default_rng(seed + 1).integers(0, 2**32, x.size, dtype=np.uint32)
    u[:4] = [0, 1, 1 << 31, U32_MAX]
    return x, u


SCALARS = {
    "float16": (half.f16_round, half.f16_to_f32),
    "bfloat16": (half.bf16_round, half.bf16_to_f32),
}


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_plain_scalar_functions_equal_the_arrays(name):
    _, round_array, to_f32, fmt = FORMATS[name]
    x, u = _sample(5)
    pick = np.random.default_rng(6).choice(x.size, 1500, replace=False)
    with np.errstate(over="ignore"):  # the plain functions wrap uint32 where Numba would
        _compare_plain(x[pick], u[pick], round_array, fmt)
    for h in np.random.default_rng(7).integers(0, 1 << 16, 1500).astype(np.uint32):
        got = half.to_f32(h, fmt)
        assert _bits(got) == _bits(to_f32(np.uint16(h))), hex(h)


def _compare_plain(x, u, round_array, fmt):
    for i in range(x.size):
        for stochastic in (False, True):
            want = round_array(x[i : i + 1], u[i : i + 1] if stochastic else None)[0]
            got = half.round_half(x[i], u[i], fmt, stochastic)
            assert got == want, (x[i], u[i], stochastic)


def _loops(numba, round_fn, upcast_fn):
    """``round_fn`` and ``upcast_fn`` compiled with ``numba.njit``, each applied in a loop."""
    rnd, up = numba.njit(round_fn), numba.njit(upcast_fn)

    @numba.njit
    def round_all(xs, us, stochastic):
        res = np.empty(xs.size, np.uint32)
        for i in range(xs.size):
            res[i] = rnd(xs[i], us[i], stochastic)
        return res

    @numba.njit
    def upcast_all(hs):
        res = np.empty(hs.size, np.float32)
        for i in range(hs.size):
            res[i] = up(hs[i])
        return res

    return round_all, upcast_all


@pytest.fixture(scope="module")
def compiled():
    """``{format: (round_all, upcast_all)}``: the scalar functions compiled by Numba."""
    numba = pytest.importorskip("numba")
    return {name: _loops(numba, *fns) for name, fns in SCALARS.items()}


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_compiled_scalar_functions_equal_the_arrays(name, compiled):
    _, round_array, to_f32, _ = FORMATS[name]
    round_all, upcast_all = compiled[name]
    x, u = _sample(8)
    assert np.array_equal(round_all(x, u, False), round_array(x))
    assert np.array_equal(round_all(x, u, True), round_array(x, u))
    h = np.arange(1 << 16, dtype=np.uint32)
    assert np.array_equal(upcast_all(h).view(np.uint32), to_f32(h).view(np.uint32))


# -- stochastic rounding


def _neighbours(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(below, above)``: the largest value of the format at most ``x`` and the smallest at
    least ``x`` (both ``x`` when it is representable), as float64, from NumPy's / ml_dtypes'
    nearest cast and ``np.nextafter`` in the format."""
    with np.errstate(over="ignore", invalid="ignore"):
        r = x.astype(dtype)
        rf = r.astype(np.float64)
        up = np.nextafter(r, np.full_like(r, np.inf)).astype(np.float64)
        down = np.nextafter(r, np.full_like(r, -np.inf)).astype(np.float64)
    xf = x.astype(np.float64)
    below = np.where(rf <= xf, rf, down)
    above = np.where(rf >= xf, rf, up)
    return below, above


def _finite_sample(name: str, seed: int) -> np.ndarray:
    x = np.concatenate(
        [_edge_cases(), _random_patterns(1 << 18, seed), _in_f16_range(1 << 18, seed)]
    )
    return x[np.isfinite(x)]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_stochastic_lands_on_a_neighbour_with_the_sign(name):
    dtype, round_array, to_f32, _ = FORMATS[name]
    x = _finite_sample(name, 9)
    below, above = _neighbours(x, dtype)
    assert np.all(below <= x) and np.all(x <= above)
    rng = np.random.default_rng(10)
    for u in (np.zeros(x.size, np.uint32), np.full(x.size, U32_MAX),
              rng.integers(0, 2**32, x.size, dtype=np.uint32)):  # fmt: skip
        got = round_array(x, u)
        value = to_f32(got).astype(np.float64)
        assert np.all((value == below) | (value == above))
        assert np.array_equal(got >> 15, _bits(x) >> 31)  # -0 for a small negative, too


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_stochastic_extreme_u_truncates_or_rounds_away(name):
    """u = 0 adds no random bits: toward zero; u = 2**32 - 1 carries whenever anything was
    cut off: away from zero. (float16 values below 2**-32 are shifted without rounding
    first, so the second holds from there up.)"""
    dtype, round_array, to_f32, _ = FORMATS[name]
    x = _finite_sample(name, 11)
    below, above = _neighbours(x, dtype)
    toward = np.where(x >= 0, below, above)
    away = np.where(x >= 0, above, below)
    if name == "float16":  # from 2**16 on (a gap above 65504) the format's next value, Inf
        toward = np.where(np.abs(x) >= 2.0**16, np.copysign(np.inf, x), toward)
    zero = to_f32(round_array(x, np.zeros(x.size, np.uint32))).astype(np.float64)
    assert np.array_equal(zero, toward)
    top = to_f32(round_array(x, np.full(x.size, U32_MAX))).astype(np.float64)
    big = np.abs(x) >= 2.0**-32 if name == "float16" else np.ones(x.size, bool)
    assert np.array_equal(top[big], away[big])


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_representable_values_come_back_for_every_u(name):
    _, round_array, to_f32, _ = FORMATS[name]
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = to_f32(h)
    ok = ~np.isnan(x)
    h, x = h[ok], x[ok]
    rng = np.random.default_rng(12)
    fixed = [0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x1FFF << 19, 1 << 31, 0xFFFFFFFF]
    for u in fixed:
        assert np.array_equal(round_array(x, np.full(x.size, u, np.uint32)), h), hex(u)
    for _ in range(8):
        assert np.array_equal(round_array(x, rng.integers(0, 2**32, x.size, dtype=np.uint32)), h)


def _random_bits_used(x: np.ndarray, name: str) -> np.ndarray:
    """How many top bits of ``u`` the stochastic rounding of each ``x`` reads: 16 for
    bfloat16; for float16 13 in the normal range, ``126 - exponent`` (<= 31) below it."""
    if name == "bfloat16":
        return np.full(x.size, 16)
    e = (_bits(x) >> 23) & 0xFF
    return np.where(e >= 113, 13, np.minimum(126 - np.maximum(e, 1), 31)).astype(int)


def _exact_sample(name: str, rng) -> np.ndarray:
    """Values whose rounding reads at most 16 bits of ``u``, both signs: bfloat16 over its
    whole range; float16 normals and subnormals down to 2**-17."""
    n = 300
    if name == "bfloat16":
        bits = rng.integers(1 << 23, 0x7F7F0000, n, dtype=np.uint32)
        x = np.concatenate([_f32(bits), _f32(rng.integers(1, 1 << 23, 50, dtype=np.uint32))])
    else:
        x = np.concatenate([rng.uniform(2.0**-14, 65504, n), rng.uniform(2.0**-17, 2.0**-14, 100)])
        x = x.astype(np.float32)
    sign = np.where(rng.integers(0, 2, x.size) == 1, -1, 1).astype(np.float32)
    return x * sign


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_stochastic_is_exactly_unbiased_over_all_its_random_bits(name):
    """Enumerate every value of the top ``k`` bits of ``u`` (the only ones read): the mean
    of the rounded values is ``x`` exactly (in float64), so the rounding is unbiased over a
    uniform 32-bit ``u``."""
    _, round_array, to_f32, _ = FORMATS[name]
    rng = np.random.default_rng(13)
    x = _exact_sample(name, rng)
    k = _random_bits_used(x, name)
    assert k.max() <= 16
    for xi, ki in zip(x, k):
        u = (np.arange(1 << ki, dtype=np.uint32) << np.uint32(32 - ki)).astype(np.uint32)
        values = to_f32(round_array(np.full(u.size, xi, np.float32), u)).astype(np.float64)
        assert values.sum() == float(xi) * u.size, (name, xi)


def _statistical_sample(name: str, rng) -> dict:
    """``{range name: values}``, both signs."""
    n = 40
    ranges = {
        "bfloat16": {
            "normal": (2.0**-20, 2.0**20),
            "subnormal": (2.0**-133, 2.0**-127),
        },
        "float16": {
            "normal": (2.0**-14, 60000.0),
            "subnormal": (2.0**-24, 2.0**-14),
            "below the smallest subnormal": (2.0**-31, 2.0**-24),
        },
    }[name]
    out = {}
    for what, (lo, hi) in ranges.items():
        x = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.float32)
        out[what] = x * np.where(rng.integers(0, 2, n) == 1, -1, 1).astype(np.float32)
    return out


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_stochastic_is_unbiased_over_random_u(name):
    """The mean over ``N`` random ``u`` of the rounded value matches ``x``.

    Unbiased rounding gives ``R = below + gap * B`` with ``B`` Bernoulli of ``p = (x -
    below) / gap``, so ``mean(R) - x = gap * (mean(B) - p)``, of standard deviation
    ``gap * sqrt(p (1 - p) / N)``. Each ``x`` must be within 6 of those (plus one count,
    ``gap / N``, for the discreteness when ``p`` is tiny): a false alarm has probability
    about 1e-9 per value. All values together: the sum of the count deviations must be
    within 6 of its standard deviation ``sqrt(sum N p (1 - p))``, which catches a bias far
    smaller than one value's bound.
    """
    dtype, round_array, to_f32, _ = FORMATS[name]
    rng = np.random.default_rng(14)
    n = 20_000
    total_dev, total_var = 0.0, 0.0
    for what, xs in _statistical_sample(name, rng).items():
        below, above = _neighbours(xs, dtype)
        for xi, lo, hi in zip(xs, below, above):
            gap = hi - lo
            assert gap > 0, (what, xi)  # not representable: a real test of the rounding
            u = rng.integers(0, 2**32, n, dtype=np.uint32)
            values = to_f32(round_array(np.full(n, xi, np.float32), u)).astype(np.float64)
            p = (float(xi) - lo) / gap
            sd = gap * np.sqrt(p * (1 - p) / n)
            assert abs(values.mean() - float(xi)) <= 6 * sd + gap / n, (what, xi, p)
            total_dev += (values == hi).sum() - n * p
            total_var += n * p * (1 - p)
    assert abs(total_dev) <= 6 * np.sqrt(total_var)


def test_stochastic_sign_symmetry():
    """Rounding ``-x`` with the same ``u`` gives the negated result (magnitude rounding)."""
    x = _finite_sample("float16", 15)
    u = np.random.default_rng(16).integers(0, 2**32, x.size, dtype=np.uint32)
    for round_array in (half.f16_round_array, half.bf16_round_array):
        assert np.array_equal(round_array(x, u) ^ np.uint16(0x8000), round_array(-x, u))
