"""The ``"sqrt"`` 8-bit state format (:mod:`adamnp.lowbit.sqrt`), the default of ``state_bits=8``.

What it is for: with bitsandbytes' format (``state_format="bnb"``) a gradient small against
the largest of its block rounds ``v`` toward zero and the step ``m / sqrt(v)`` explodes. The
``"sqrt"`` format must keep the largest single-step ``|dp|`` of a run within 1.5 times that of
the float32-state run on the same data, whatever the blocks hold (the hazard battery and the
property test), and converge where float32 converges (the shuffled quadratic). Then the
definition itself: stochastic rounding unbiased in ``s`` and in ``r``, decoding, zero and NaN
blocks, memory, numpy/numba agreement and the checkpoint round trip.

The full numpy-vs-numba matrix of the default 8-bit format (every config, size and block size)
is in test_backends_agree.py; the agreement test here is a small complement with gradients
spanning 1e-8..1.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST_BACKENDS, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import adamnp
from adamnp.backends import numpy as ref
from adamnp.backends.math import host_scalars, kernel_scalars
from adamnp.lowbit import sqrt as fmt
from adamnp.lowbit.maps import map_names
from adamnp.lowbit.stochastic import block_key, group_key, mix32, root_keys

S_MAP = fmt.s_map()
W_MAP = fmt.s_map(wide=True)
# the first code of each region of a map and the last of the one below (0 aside)
BORDER_CODES = [c for c, _, _ in fmt._regions() if c > 0]
W_BORDER_CODES = [c for c, _, _ in fmt._regions(fmt.WIDE_REGIONS) if c > 0]
WIDE_BELOW = np.float32(fmt.WIDE_FACTOR)  # a block with a positive s below this (x S) is wide
LONG = "numba" if "numba" in HOST_BACKENDS else "numpy"  # long runs: the compiled backend
BOUND = 1.5  # largest 8-bit step / largest float32 step


def _decode(slot):
    """The moments a QuantSlot decodes to (:func:`adamnp.lowbit.sqrt.dequantize_into`)."""
    names = ("m", "v", "vmax") if slot.codes_vmax is not None else ("m", "v")
    codes = {x: getattr(slot, f"codes_{x}").reshape(-1) for x in names}
    absmax = {x: getattr(slot, f"absmax_{x}") for x in names}
    out = {x: np.empty(codes["v"].size, np.float32) for x in names}
    with np.errstate(invalid="ignore"):
        fmt.dequantize_into(codes, absmax, slot.block_size, out)
    return out


def _same_bits(got, want):
    """Bitwise equality of float32 arrays; any NaN equals any NaN."""
    nan = np.isnan(want)
    return bool(
        np.array_equal(np.isnan(got), nan)
        and np.array_equal(
            np.where(nan, 0, got).view(np.int32), np.where(nan, 0, want).view(np.int32)
        )
    )


# -- 1. the hazard battery: largest step of a run, 8-bit against float32


def _largest_step(n, make_scales, backend, cfg=None, steps=200, grad_seed=1, noise=None,
                  **init):  # fmt: skip
    """Largest |dp| over all steps and elements of a run from zeros; gradients ``scale *
    normal`` (or ``scale * (1 + noise * normal)``) with the same seeds whatever the state
    (``make_scales()`` is a fresh function of the step)."""
    p = np.zeros(n, np.float32)
    cfg = cfg or adamnp.adamw(lr=1e-3)
    state = adamnp.init(p, cfg, backend=backend, min_8bit_size=0, **init)
    scales = make_scales()
    rng = np.random.default_rng(grad_seed)
    largest = 0.0
    for t in range(steps):
        z = rng.standard_normal(n)
        g = (scales(t) * (z if noise is None else 1 + noise * z)).astype(np.float32)
        before = p.copy()
        adamnp.step(p, g, state)
        largest = max(largest, float(np.max(np.abs(p - before))))
    return largest


def _ratios(n, make_scales, backend, formats=("sqrt",), **kw):
    fp32 = _largest_step(n, make_scales, backend, state_bits=32, **kw)
    assert fp32 > 0
    return {f: _largest_step(n, make_scales, backend, state_bits=8, state_format=f, **kw) / fp32
            for f in formats}  # fmt: skip


def _one_small(ratio):
    """One block of 256: element 0's gradient ``ratio`` times the others' (all fixed)."""

    def make():
        s = np.ones(256)
        s[0] = ratio
        return lambda t: s

    return make


def _sparse():
    """One block: scales log-uniform in [1e-8, 1], 10% exact zeros, and from step 100 every
    other element's gradient exactly 0."""
    rng = np.random.default_rng(2)
    s = 10.0 ** rng.uniform(-8, 0, 256)
    s[rng.random(256) < 0.1] = 0.0
    late = s.copy()
    late[1::2] = 0.0
    return lambda t: s if t < 100 else late


def _wide(redraw, seed=3):
    """65,536 elements with scales log-uniform in [1e-4, 1], fixed or redrawn each step."""

    def make():
        rng = np.random.default_rng(seed)
        s = 10.0 ** rng.uniform(-4, 0, 1 << 16)
        return (lambda t: 10.0 ** rng.uniform(-4, 0, 1 << 16)) if redraw else (lambda t: s)

    return make


ONE_BLOCK = {f"small-{r:g}": _one_small(r) for r in (1e-2, 1e-3, 3e-4, 1e-4, 1e-6, 1e-8)}
ONE_BLOCK["sparse"] = _sparse
# bnb breaks the bound here (measured: 1e-4 about 240x, wide-fixed about 2.2e4x)
BNB_BREAKS = ("small-0.0001", "wide-fixed")


@pytest.mark.parametrize("case", list(ONE_BLOCK))
def test_hazard_one_block(backend, case):
    formats = ("sqrt", "bnb") if case in BNB_BREAKS else ("sqrt",)
    ratios = _ratios(256, ONE_BLOCK[case], backend, formats)
    assert ratios["sqrt"] <= BOUND, ratios
    if case in BNB_BREAKS:
        assert ratios["bnb"] > BOUND, ratios  # the hazard the format removes


@pytest.mark.parametrize("redraw", [True, False], ids=["wide-redrawn", "wide-fixed"])
def test_hazard_wide(redraw):
    case = "wide-redrawn" if redraw else "wide-fixed"
    formats = ("sqrt", "bnb") if case in BNB_BREAKS else ("sqrt",)
    ratios = _ratios(1 << 16, _wide(redraw), LONG, formats)
    assert ratios["sqrt"] <= BOUND, ratios
    if case in BNB_BREAKS:
        assert ratios["bnb"] > BOUND, ratios


def test_hazard_wide_fixed_other_data():
    """The wide-fixed case with other data (scales seed 4, gradients seed 104). A map with
    2 mantissa bits below 1/32 (an earlier version) measured 1.64x here: the noise stochastic
    rounding leaves in v grows with the gap and built up to 0.2-2.7x float32's v."""
    ratios = _ratios(1 << 16, _wide(False, seed=4), LONG, grad_seed=104)
    assert ratios["sqrt"] <= BOUND, ratios


@pytest.mark.parametrize("noise", [0.3, 1.0])
@pytest.mark.parametrize("ratio", [3e-2, 1e-3, 1e-4])
def test_hazard_steady_small_gradients(ratio, noise):
    """One block: the others' gradients ``ratio`` times element 0's, all with one sign and a
    noisy size, for 3000 steps (v remembers about 1000), so that the noise stochastic rounding
    leaves in v builds up fully. Measured 1.19-1.24x on the narrow map (3e-2, 1e-3), 1.36x
    and 1.46x at 1e-4, where the block goes to the wide map (3 mantissa bits there); over
    four data seeds 1.34-1.59x at 1e-4: the edge of the bound (docs/eight_bit.md). One map
    20.9 binades wide for every block took up to 1.62x at 3e-2 and 1e-3: rejected."""
    ratios = _ratios(256, _one_small(1 / ratio), LONG, steps=3000, noise=noise)
    assert ratios["sqrt"] <= BOUND, ratios


# -- 2. the same bound on random block contents and configs


@st.composite
def block_contents(draw):
    """``(block_size, scales)``: 1-3 blocks of 64 or 256, scales 10**[-8, 0], some zeros."""
    bs = draw(st.sampled_from([64, 256]))
    n = bs * draw(st.integers(1, 3))
    exps = draw(hnp.arrays(np.float64, n, elements=st.floats(-8, 0)))
    zeros = draw(hnp.arrays(np.bool_, n, elements=st.booleans()))
    zeros[0] = False  # some gradient: a float32 step to compare with
    return bs, np.where(zeros, 0.0, 10.0**exps)


configs = st.builds(
    lambda decoupled, amsgrad, betas: (adamnp.adamw if decoupled else adamnp.adam)(
        lr=1e-3, betas=betas, amsgrad=amsgrad
    ),
    st.booleans(),
    st.booleans(),
    st.sampled_from([(0.9, 0.999), (0.5, 0.99), (0.9, 0.95)]),
)


@settings(max_examples=40, deadline=None)
@given(block_contents(), configs, st.integers(30, 60))
def test_largest_step_bound_on_random_blocks(content, cfg, steps):
    bs, scales = content
    ratios = _ratios(scales.size, lambda: lambda t: scales, LONG, cfg=cfg, steps=steps,
                     block_size=bs)  # fmt: skip
    assert ratios["sqrt"] <= BOUND, ratios


# -- 3. convergence on the shuffled quadratic 0.5 * sum(c * x**2)


def _quadratic(n, steps, x0, backend, tail=1, seed=0, **init):
    """Mean loss over the last ``tail`` steps of Adam(lr=1e-3) from ``x0`` ("normal" or
    "ones"), c = geomspace(1, 1e6, n) shuffled."""
    rng = np.random.default_rng(seed)
    c = np.geomspace(1, 1e6, n).astype(np.float32)
    rng.shuffle(c)
    x = rng.standard_normal(n).astype(np.float32) if x0 == "normal" else np.ones(n, np.float32)
    state = adamnp.init(x, adamnp.adam(lr=1e-3), backend=backend, min_8bit_size=0, **init)
    c64, losses = c.astype(np.float64), []
    for t in range(steps):
        adamnp.step(x, c * x, state)
        if t >= steps - tail:
            losses.append(0.5 * float(c64 @ np.square(x.astype(np.float64))))
    return float(np.mean(losses))


def test_quadratic_one_block_converges_as_float32(backend):
    # From ~9e6 the loss is still falling ~2.5x per 250 steps at step 5000, so the 8-bit run
    # may be ahead (measured 197 against 323 for float32): only "not behind by 2x" is asked.
    fp32 = _quadratic(256, 5000, "normal", backend, state_bits=32)
    q8 = _quadratic(256, 5000, "normal", backend, state_bits=8)
    assert fp32 < 1e3 and q8 <= 2 * fp32, (q8, fp32)
    bnb = _quadratic(256, 5000, "normal", backend, state_bits=8, state_format="bnb")
    assert bnb > 100 * fp32, (bnb, fp32)  # bnb nearest fails (measured 4.2e6)


@pytest.mark.skipif("numba" not in HOST_BACKENDS, reason="needs numba")
def test_quadratic_large_converges_as_float32():
    # 20000 steps of 16384 elements: about 7 s for both runs on numba. After ~8000 steps
    # both runs sit in Adam's limit cycle, where the float32 loss itself swings between 1e-5
    # and 1e-2 from one thousand steps to the next (the final losses of seeds 0-3 differ by
    # factors 0.0001-1.05, and 2.2 with an earlier version of the format): the loss compared
    # is the mean over the last 1000 steps (measured, seeds 0-3: 8-bit 0.001-0.25 times
    # float32's).
    fp32 = _quadratic(16384, 20000, "normal", "numba", tail=1000, state_bits=32)
    q8 = _quadratic(16384, 20000, "normal", "numba", tail=1000, state_bits=8)
    assert fp32 < 1e-1 and q8 <= 2 * fp32, (q8, fp32)  # from ~6e8: both converged


def test_quadratic_from_ones_shows_the_range_limit(backend):
    """From x0 = ones (loss 0.5 * sum(c) ~ 9.5e6) float32 reaches round-off (1.6e-20 after
    5000 steps). The 8-bit map covers 12.9 binades of s below the block's largest: once the
    stiff elements have converged and only oscillate, the gradients of the least curved ones
    (c ~ 1, x ~ 1e-3) sit below it, their v is held at the map's bottom and they creep
    (measured 14). A documented limit of the format (docs/eight_bit.md), not divergence: a
    map 20.9 binades wide converges here (2.9e-20) but breaks the step bound on steady noisy
    blocks (test_hazard_steady_small_gradients)."""
    assert _quadratic(256, 5000, "ones", backend, state_bits=32) < 1e-10
    assert _quadratic(256, 5000, "ones", backend, state_bits=8) < 1e2


# -- 4. stochastic rounding: unbiased in s (s_code) and in r (r_code)

N_HASH = 20_000


def _hashes():
    # requantize_into hashes element i with mix32(i ^ block_key(key, 0)); key 0 gives mix32(i)
    assert int(block_key(np.uint32(0), np.uint32(0))) == 0
    return mix32(np.arange(N_HASH, dtype=np.uint32))


def _requantize_column(m, v):
    """Codes of ``N_HASH`` elements with moments ``m``, ``v`` (scalars) in one block whose
    last, extra element (m = 1, v = 1) sets both absmax to 1: the scaled values are ``sqrt(v)``
    and ``m / sqrt(v) * 127``, element i hashed with ``mix32(i)``."""
    n = N_HASH + 1
    mm = np.full(n, m, np.float32)
    vv = np.full(n, v, np.float32)
    mm[-1] = vv[-1] = 1.0
    codes = {"m": np.empty(n, np.uint8), "v": np.empty(n, np.uint8)}
    absmax = {"m": np.empty(1, np.float32), "v": np.empty(1, np.float32)}
    fmt.requantize_into(mm, vv, None, codes, absmax, n, 0, 0, (0, 0))  # roots hashed alike
    assert abs(absmax["v"][0]) == 1 and absmax["m"][0] == 1  # -1: on the wide map
    return codes["m"][:-1].view(np.int8).astype(np.int64), codes["v"][:-1].astype(np.int64)


def _s_values():
    """Scaled roots on the narrow map (a block whose other element is 1 stays narrow) and on
    the wide one below 2**-13 (such a block goes wide)."""
    rng = np.random.default_rng(4)
    out = []
    for smap, borders, top in ((S_MAP, BORDER_CODES, 0), (W_MAP, W_BORDER_CODES, -13)):
        s64 = smap.astype(np.float64)
        random = 2.0 ** rng.uniform(np.log2(s64[0]), top, 24)  # within the map
        codes = [c for c in (0, 1, 6, 7, 8, *borders, 254) if s64[c + 1] <= 2.0**top]
        mid = [(s64[c] + s64[c + 1]) / 2 for c in codes]
        exact = [c for c in (0, 1, 7, 8, *borders, 255) if s64[c] <= 2.0**top]
        out.append(np.float32(np.concatenate([random, mid, smap[exact]])))
    return np.concatenate(out)


@pytest.mark.parametrize("x", _s_values(), ids=lambda x: f"{x:.6g}")
def test_s_rounding_is_unbiased_in_s(x):
    h = _hashes()
    v = np.float32(x) * np.float32(x)
    assert np.sqrt(v) == x  # the scaled root the reference rounds is x itself
    _, codes = _requantize_column(0.0, v)
    wide = bool(x < WIDE_BELOW)
    scalar = [int(fmt.s_code(np.int32(x.view(np.int32)), hh, wide)) for hh in h[:200]]
    assert scalar == codes[:200].tolist()  # the scalar definition (compiled by Numba) agrees
    s64 = (W_MAP if wide else S_MAP).astype(np.float64)
    lo = int(np.searchsorted(s64, float(x), side="right")) - 1
    if s64[lo] == x:  # a value of the map is stored exactly
        assert np.all(codes == lo)
        return
    hi = lo + 1
    assert np.all((codes == lo) | (codes == hi))
    gap = s64[hi] - s64[lo]
    p = (float(x) - s64[lo]) / gap
    mean = np.mean(s64[codes])
    se = np.sqrt(p * (1 - p) / N_HASH) * gap
    # 5 standard errors, plus the resolution of the decision (u and the position t: 20 bits)
    assert abs(mean - float(x)) <= 5 * se + 2.0**-20 * gap, (mean, float(x), se)


@pytest.mark.parametrize("x", [0.0, 1e-40, 1e-20, 1e-10, float(np.nextafter(W_MAP[0], 0)),
                               float(np.nextafter(S_MAP[0], 0))])  # fmt: skip
def test_s_below_the_map_gets_code_0(x):
    """Below the wide map in a wide block (a positive value below 2**-13), below the narrow
    map in a narrow one; 0 has no positive value and stays narrow."""
    x = np.float32(x)
    _, codes = _requantize_column(0.0, x * x)
    assert np.all(codes == 0)  # v is rounded up to the map's smallest value, never to 0
    wide = bool(0 < x < WIDE_BELOW)
    for hh in _hashes()[:50]:
        assert int(fmt.s_code(np.int32(x.view(np.int32)), hh, wide)) == 0


def _border_cases():
    cases = []
    for wide, borders in ((False, BORDER_CODES), (True, W_BORDER_CODES)):
        codes = sorted({0, 1, 2, 3, 254} | {c + d for c in borders for d in (-2, -1, 0, 1)})
        cases += [(wide, c) for c in codes]
    return cases


@pytest.mark.parametrize("frac", [0.13, 0.5, 0.91])
@pytest.mark.parametrize(("wide", "code"), _border_cases())
def test_s_round_up_probability_is_exact(wide, code, frac):
    """P(up) over a stratified grid of 4096 values of u equals ``(x - lo) / (hi - lo)``
    within the grid's resolution 1/4096, for x a fraction ``frac`` (in bits) of the way
    between two codes: every mantissa position of both maps' regions and their borders."""
    lo_bits, hi_bits = int(fmt.s_bits(code, wide)), int(fmt.s_bits(code + 1, wide))
    bits = np.int32(lo_bits + round(frac * (hi_bits - lo_bits)))
    x = float(bits.view(np.float32))
    smap = W_MAP if wide else S_MAP
    lo, hi = float(smap[code]), float(smap[code + 1])
    assert lo < x < hi
    h = (np.arange(4096, dtype=np.uint32) << np.uint32(8)) << np.uint32(12)  # u = j / 4096
    up = np.mean([int(fmt.s_code(bits, hh, wide)) == code + 1 for hh in h])
    want = (x - lo) / (hi - lo)
    assert abs(up - want) <= 1 / 4096 + 1e-6, (up, want)


def test_block_goes_wide_below_2_to_minus_13():
    """The rule that picks the map, at its border: a positive s just below ``S * 2**-13``
    makes the block wide (absmax stored negative), one at it does not; on every backend."""
    for backend in HOST_BACKENDS:
        for below, wide in ((np.nextafter(np.float32(2.0**-13), 0), True),
                            (np.float32(2.0**-13), False)):  # fmt: skip
            p = np.zeros(512, np.float32)
            state = adamnp.init(p, adamnp.adam(lr=1e-3), backend=backend, state_bits=8,
                                min_8bit_size=0)  # fmt: skip
            g = np.ones(512, np.float32)
            g[300] = below  # block 1; block 0 is all ones
            adamnp.step(p, g, state)
            absmax = state.slots[0].absmax_v
            assert absmax[0] > 0 and (absmax[1] < 0) == wide, (backend, below, absmax)
            d = _decode(state.slots[0])
            s = np.sqrt(d["v"])
            assert np.all(s[256:] > 0)
            np.testing.assert_allclose(s[300], np.sqrt(0.001) * below, rtol=1 / 8)


def _r_values():
    rng = np.random.default_rng(5)
    exact = [-127.0, -3.0, 0.0, 5.0, 127.0]
    near = [0.001, 0.999, -0.001, -126.999, 126.5, -0.5]
    return np.concatenate([rng.uniform(-127, 127, 20), exact, near])


@pytest.mark.parametrize("target", _r_values(), ids=lambda t: f"{t:.4g}")
def test_r_rounding_is_unbiased(target):
    h = _hashes()
    m = np.float32(target / 127)
    t = float(m * np.float32(127))  # the reference's scaled ratio: (r / R) * 127 with R = 1
    codes, _ = _requantize_column(m, 1.0)
    scalar = [int(fmt.r_code(np.float32(t), hh)) for hh in h[:200]]
    assert scalar == codes[:200].tolist()
    lo = np.floor(t)
    allowed = {int(np.clip(lo, -127, 127)), int(np.clip(lo + 1, -127, 127))}
    assert set(np.unique(codes).tolist()) <= allowed
    if t == lo:
        assert np.all(codes == t)
        return
    p = t - lo
    se = np.sqrt(p * (1 - p) / N_HASH)
    # 5 standard errors, plus the resolution of u (12 bits)
    assert abs(codes.mean() - t) <= 5 * se + 2.0**-12, (codes.mean(), t, se)


# -- 5. s follows a shrinking gradient


def _shrinking_run(backend):
    """Element 0's gradient is 1 (the block's absmax); elements 1..255 get 0.1 for 1000
    steps, then 0.01 for 3000. Returns (decoded v of elements 1..255, exact v)."""
    params = {"w": np.zeros(256, np.float32)}
    state = adamnp.init(params, adamnp.adam(lr=1e-6), backend=backend, state_bits=8,
                        min_8bit_size=0)  # fmt: skip
    g = np.zeros(256, np.float32)
    for t in range(1, 4001):
        g[0], g[1:] = 1.0, 0.1 if t <= 1000 else 0.01
        adamnp.step(params, {"w": g}, state)
    slot = state.slots[0]
    assert slot.absmax_v[0] > 0  # narrow: 0.01 is 2**-6.6 of the largest
    v = (S_MAP[slot.codes_v[1:]].astype(np.float64) * float(slot.absmax_v[0])) ** 2
    exact = 0.01**2 * (1 - 0.999**3000) + 0.1**2 * (1 - 0.999**1000) * 0.999**3000
    return v, exact


def test_s_follows_a_shrinking_gradient(backend):
    v, exact = _shrinking_run(backend)
    assert 0.5 * exact < v[0] < 2 * exact, v[0] / exact


def test_s_follows_a_shrinking_gradient_on_average(backend):
    """255 elements with the same gradients, each with its own offset of the roots' draws
    (:func:`~adamnp.lowbit.stochastic.root_keys`): every one keeps its v within 0.6x-1.5x
    of the exact one, and their mean s is the exact one within 5%. (Independent draws at
    every step, the rounding before 2026-12-06, let the stored s wander: over 4080 such
    elements v ended between 0.25x and 5.3x; the evenly spread draws keep 0.66x-1.32x, with
    a mean s 3% low: tools/s_rounding_study.py.) Nearest rounding would stay near the value
    of step 1000, 15 times the exact one."""
    v, exact = _shrinking_run(backend)
    ratio = v / exact
    assert 0.6 < ratio.min() and ratio.max() < 1.5, (ratio.min(), ratio.max())
    assert abs(np.sqrt(ratio).mean() - 1) < 0.05, np.sqrt(ratio).mean()


# -- 6. decoding, and the reference step as its three pieces


def test_fresh_state_decodes_to_zero(backend):
    p = np.zeros(3000, np.float32)
    state = adamnp.init(p, adamnp.adamw(amsgrad=True), backend=backend, state_bits=8,
                        min_8bit_size=1)  # fmt: skip
    assert state.state_format == "sqrt" and state.v_rounding == "stochastic"
    slot = state.slots[0]
    assert (slot.map_m, slot.map_v) == map_names("sqrt")
    for x, moment in _decode(slot).items():
        assert np.all(moment == 0) and not np.signbit(moment).any(), x


@pytest.mark.parametrize("amsgrad", [False, True])
def test_reference_step_is_dequantize_update_requantize(amsgrad):
    """One reference step equals dequantize_into, update_chunk and requantize_into composed by
    hand, bit for bit (3000 elements: a partial last block)."""
    rng = np.random.default_rng(6)
    n, bs = 3000, 256
    p = rng.standard_normal(n).astype(np.float32)
    cfg = adamnp.adam(lr=1e-2, amsgrad=amsgrad)
    state = adamnp.init(p, cfg, backend="numpy", state_bits=8, min_8bit_size=1)
    adamnp.step(p, rng.standard_normal(n).astype(np.float32), state)  # non-trivial state
    slot = state.slots[0]
    moments = _decode(slot)
    assert all(np.isfinite(x).all() and np.any(x != 0) for x in moments.values())
    g = rng.standard_normal(n).astype(np.float32)
    expect_p = p.copy()
    s = host_scalars(state.config, 2, 1e-2)
    ref.update_chunk(expect_p, g, moments["m"], moments["v"], moments.get("vmax"),
                     kernel_scalars(s, np.float32), s, np.empty(n, np.float32),
                     np.empty(n, np.float32))  # fmt: skip
    nb = -(-n // bs)
    codes = {x: np.empty(n, np.uint8) for x in moments}
    absmax = {x: np.empty(nb, np.float32) for x in moments}
    group = state.groups[0]
    fmt.requantize_into(moments["m"], moments["v"], moments.get("vmax"), codes, absmax, bs,
                        group_key(group, 2), 0, root_keys(group, 2))  # fmt: skip
    adamnp.step(p, g, state)
    assert p.tobytes() == expect_p.tobytes()
    for x in moments:
        assert np.array_equal(getattr(slot, f"codes_{x}"), codes[x]), x
        assert getattr(slot, f"absmax_{x}").tobytes() == absmax[x].tobytes(), x


# -- 7. zero block and NaN block


def _zero_and_nan_blocks(backend):
    """Blocks 0 and 4 see zero gradients, 1 a NaN, 2 a finite one, 3 an infinite one."""
    n = 5 * 256
    p = np.ones(n, np.float32)
    cfg = adamnp.adam(nonfinite="propagate", amsgrad=True)
    state = adamnp.init(p, cfg, backend=backend, state_bits=8, min_8bit_size=1)
    g = np.zeros(n, np.float32)
    g[300], g[600], g[900] = np.nan, 1.0, np.inf
    with np.errstate(invalid="ignore"):  # the reference computes inf / inf
        adamnp.step(p, g, state)
    return p, state


def test_zero_block_and_nan_block(backend):
    p, state = _zero_and_nan_blocks(backend)
    slot = state.slots[0]
    decoded = _decode(slot)
    block = [slice(b * 256, (b + 1) * 256) for b in range(5)]
    for x in ("m", "v", "vmax"):
        absmax, codes = getattr(slot, f"absmax_{x}"), getattr(slot, f"codes_{x}")
        for b in (0, 4):  # zero blocks: absmax 0, decode to exactly 0
            assert absmax[b] == 0 and np.all(decoded[x][block[b]] == 0), (x, b)
        for b in (1, 3):  # non-finite blocks: code 0 everywhere, decode to NaN
            assert np.all(codes[block[b]] == 0), (x, b)
            assert np.isnan(decoded[x][block[b]]).all(), (x, b)
        assert np.isfinite(absmax[2]) and absmax[2] > 0, x
        assert np.isfinite(decoded[x][block[2]]).all(), x
        assert np.isnan(absmax[3]), x  # inf gradient: s = inf and r = inf / inf = NaN
    for x in ("m", "v", "vmax"):  # NaN gradient: s = NaN and r = m / s = NaN
        assert np.isnan(getattr(slot, f"absmax_{x}")[1]), x
    assert decoded["v"][600] > 0 and decoded["m"][600] > 0
    bad = [300, 900]
    assert np.isnan(p[bad]).all() and np.isfinite(np.delete(p, bad)).all()


@pytest.mark.skipif("numba" not in HOST_BACKENDS, reason="needs numba")
def test_zero_block_and_nan_block_agree():
    _assert_runs_agree(_zero_and_nan_blocks)


def _assert_runs_agree(run):
    """``run(backend) -> (params, state)`` gives the same bits on numpy and numba."""
    (p1, s1), (p2, s2) = run("numpy"), run("numba")
    assert _same_bits(p2, p1)
    for name, want in s1.groups[0].buffers.items():
        got = s2.groups[0].buffers[name]
        assert np.array_equal(got, want) if want.dtype == np.uint8 else _same_bits(got, want), name


def _tiny_ratio_block(backend):
    """Block 0 holds ratios ``m / s`` of about 1e-37, below :data:`fmt.R_FLOOR` (m decoded
    from an absmax of 1e-37, s = 1, zero gradients); block 1 ordinary ones."""
    n = 2 * 256
    p = np.ones(n, np.float32)
    state = adamnp.init(p, adamnp.adam(lr=1e-3), backend=backend, state_bits=8, min_8bit_size=1)
    slot = state.slots[0]
    slot.codes_m[:] = np.arange(n) % 255  # -127..127 as two's complement bytes
    slot.codes_v[:] = 255
    slot.absmax_m[:] = np.float32([1e-37, 1.0])
    slot.absmax_v[:] = 1.0
    g = np.zeros(n, np.float32)
    g[256:] = np.linspace(-1, 1, 256, dtype=np.float32)
    adamnp.step(p, g, state)
    return p, state


def test_ratios_below_the_floor_store_the_floor(backend):
    p, state = _tiny_ratio_block(backend)
    slot = state.slots[0]
    assert slot.absmax_m[0] == np.float32(fmt.R_FLOOR)  # raised: 127 / R stays finite
    assert np.isfinite(slot.absmax_m[1]) and slot.absmax_m[1] > fmt.R_FLOOR
    decoded = _decode(slot)["m"][:256]
    assert np.isfinite(decoded).all() and np.abs(decoded).max() <= 1e-36
    assert np.isfinite(p).all()


@pytest.mark.skipif("numba" not in HOST_BACKENDS, reason="needs numba")
def test_ratios_below_the_floor_agree():
    _assert_runs_agree(_tiny_ratio_block)


# -- 8. memory


@pytest.mark.parametrize("bs", [64, 256, 4096])
def test_state_bytes(backend, bs):
    n = 100_003  # a partial last block for every block size
    state = adamnp.init(np.zeros(n, np.float32), adamnp.adamw(), backend=backend, state_bits=8,
                        block_size=bs)  # fmt: skip
    assert state.nbytes() == 2 * n + 8 * -(-n // bs)
    assert state.nbytes() <= n * (2 + 8 / bs) + 8


# -- 9. numpy and numba agree bit for bit


def _tree_and_grads(rng, steps):
    sizes = (257, 1000, 4097, 70, 64)
    params = {f"p{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}

    def grad(n):
        g = 10.0 ** rng.uniform(-8, 0, n) * rng.standard_normal(n)
        g[rng.random(n) < 0.1] = 0.0
        return g.astype(np.float32)

    grads = [{k: grad(a.size) for k, a in params.items()} for _ in range(steps)]
    return params, grads


AGREE_CONFIGS = {
    "adam-l2-amsgrad-maximize-clip": lambda: adamnp.adam(
        lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True, max_grad_norm=0.5
    ),
    "adamw-amsgrad": lambda: adamnp.adamw(lr=1e-2, amsgrad=True),
    "adamw-betas": lambda: adamnp.adamw(lr=1e-2, betas=(0.5, 0.95)),
}


@pytest.mark.skipif("numba" not in HOST_BACKENDS, reason="needs numba")
@pytest.mark.parametrize("config", list(AGREE_CONFIGS))
@pytest.mark.parametrize("bs", [64, 256, 4096])
def test_numpy_and_numba_agree(config, bs):
    results = []
    for backend in ("numpy", "numba"):
        params, grads = _tree_and_grads(np.random.default_rng(7), 5)
        state = adamnp.init(params, AGREE_CONFIGS[config](), backend=backend, state_bits=8,
                            block_size=bs, min_8bit_size=1)  # fmt: skip
        assert all(isinstance(s, adamnp.QuantSlot) for s in state.slots)
        for g in grads:
            adamnp.step(params, g, state)
        results.append(snapshot(params, state))
    assert results[0] == results[1]


# -- 10. checkpoint round trip


def test_checkpoint_round_trip_continues_bit_for_bit(backend, tmp_path):
    rng = np.random.default_rng(8)
    start = {"a": rng.standard_normal(5000).astype(np.float32),
             "b": rng.standard_normal((30, 10)).astype(np.float32)}  # fmt: skip
    grads = [{k: rng.standard_normal(a.shape).astype(np.float32) for k, a in start.items()}
             for _ in range(6)]  # fmt: skip
    cfg = adamnp.adamw(lr=1e-2, amsgrad=True)
    init = dict(backend=backend, state_bits=8, min_8bit_size=1)
    whole = {k: a.copy() for k, a in start.items()}
    state = adamnp.init(whole, cfg, **init)
    for g in grads:
        adamnp.step(whole, g, state)
    resumed = {k: a.copy() for k, a in start.items()}
    first = adamnp.init(resumed, cfg, **init)
    for g in grads[:3]:
        adamnp.step(resumed, g, first)
    adamnp.save_state(tmp_path / "s.npz", first)
    loaded = adamnp.load_state(tmp_path / "s.npz")
    assert loaded.state_format == "sqrt" and loaded.v_rounding == "stochastic"
    assert loaded.backend == backend and loaded.step == 3
    assert snapshot(resumed, loaded) == snapshot(resumed, first)
    for g in grads[3:]:
        adamnp.step(resumed, g, loaded)
    assert snapshot(resumed, loaded) == snapshot(whole, state)
