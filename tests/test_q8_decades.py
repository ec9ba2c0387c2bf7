"""The quantizer's fast path (decade arithmetic) and the AVX-512 VBMI kernels built on it.

The fast path must give the exact code wherever it does not flag a value, for every value
within 4 ulps (the kernels scale by a reciprocal, up to 3 ulps off the exact quotient);
``tools/sweep_fast_quantizer.py`` checks all 2**31 patterns of [-1, 1], these tests check
every code boundary and random samples. The in-register kernels must equal the scalar fast
path bit for bit, and the gather kernel (CPUs without VBMI) must still equal the reference.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from adamnp import quant
from adamnp.lowbit import decades as _q8_decades
from adamnp.lowbit.reference import nearest_code
from adamnp.quant import dynamic_map

numba = pytest.importorskip("numba")
simd = pytest.importorskip("adamnp.backends.numba.avx512")

ROOT = Path(__file__).resolve().parent.parent
MAPS = {"signed": dynamic_map(True), "unsigned": dynamic_map(False)}
fast_code = numba.njit(error_model="numpy")(simd.fast_code)
needs_vbmi = pytest.mark.skipif(not simd.HAVE_VBMI, reason="CPU without AVX-512 VBMI")


@numba.njit(error_model="numpy")
def _fast_codes(bits, binades, lines, zero, codes, flags):
    for i in range(bits.size):
        codes[i], flags[i] = fast_code(bits[i], binades, lines, zero)


def fast_codes(x, code):
    t = _q8_decades.build_decade_tables(code)
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).reshape(-1)
    codes, flags = np.empty(bits.size, np.int32), np.empty(bits.size, np.bool_)
    _fast_codes(bits, t.binades, t.lines, t.zero, codes, flags)
    return codes, flags


def boundary_points(code):
    """Every midpoint, map value and decade boundary with 64 patterns either side, both signs."""
    wide = code.astype(np.float64)
    mids = np.abs((wide[:-1] + wide[1:]) / 2).astype(np.float32)
    centres = np.concatenate([mids, np.abs(code), np.float32([0, 1, 2.0**-31, 2.0**-30])])
    pats = centres.view(np.int32).astype(np.int64)[:, None] + np.arange(-64, 65)[None, :]
    pats = np.unique(np.clip(pats, 0, 0x3F800004)).astype(np.int32)
    return np.concatenate([pats, pats | np.int32(-0x80000000)]).view(np.float32)


def log_spread(n, seed, signed=True):
    rng = np.random.default_rng(seed)
    x = (np.float32(10.0) ** rng.uniform(-12, 0, n)).astype(np.float32)
    return x * rng.choice(np.float32([-1, 1]), n) if signed else x


def assert_exact_where_unflagged(x, code):
    """Unflagged codes equal the exact code of x and of every value within 4 ulps of x."""
    codes, flags = fast_codes(x, code)
    keep = ~flags
    bits = x.view(np.int32)[keep]
    magnitude, sign = bits & 0x7FFFFFFF, bits & np.int32(-0x80000000)
    for shift in (-4, 0, 4):  # the exact code is monotone in the pattern on each side
        near = (np.clip(magnitude + shift, 0, None) | sign).view(np.float32)
        np.testing.assert_array_equal(codes[keep], nearest_code(near, code))
    return flags


def test_fma32_rounds_once():
    """(1 + 2**-12)**2 - 1 is 2**-11 + 2**-24: exact when fused, 2**-11 when the product rounds."""
    fma32 = simd.fma32
    fused = numba.njit(lambda a, b, c: fma32(a, b, c))
    a = np.float32(1 + 2.0**-12)
    assert fused(a, a, np.float32(-1)) == np.float32(2.0**-11 + 2.0**-24)
    assert a * a - np.float32(1) == np.float32(2.0**-11)  # what two roundings give


@pytest.mark.parametrize("name", MAPS)
def test_dynamic_maps_have_decade_tables(name):
    t = _q8_decades.build_decade_tables(MAPS[name])
    assert t.binades.dtype == np.int32 and t.binades.shape == (32,)
    assert t.lines.dtype == np.float32 and t.lines.shape == (3, 16)
    assert t.zero == (127 if name == "signed" else 0)
    assert not t.binades.flags.writeable and not t.lines.flags.writeable


def test_maps_without_the_decade_form_get_none():
    lopsided = dynamic_map(True).copy()
    lopsided[3] = np.float32(-0.9)  # negatives no longer mirror the positives
    no_zero = np.linspace(-1, 1, 256, dtype=np.float32)  # 256 values: 0 is not one of them
    dense = np.concatenate([[0], np.linspace(2.0**-30, 1, 255)]).astype(np.float32)
    for code in (lopsided, no_zero):
        assert _q8_decades.build_decade_tables(code) is None
    assert _q8_decades.build_decade_tables(dense) is None  # first value below 2**-30


@pytest.mark.parametrize("name", MAPS)
def test_fast_path_exact_or_flagged_at_every_boundary(name):
    code = MAPS[name]
    x = boundary_points(code)
    flags = assert_exact_where_unflagged(x, code)
    assert 0 < flags.mean() < 0.5  # boundaries are where the flags are


@pytest.mark.parametrize("name", MAPS)
def test_fast_path_exact_on_random_values_and_flags_few(name):
    code = MAPS[name]
    for x in (log_spread(400_000, 1), np.random.default_rng(2).uniform(-1, 1, 400_000)):
        flags = assert_exact_where_unflagged(x.astype(np.float32), code)
        assert flags.mean() < 2e-4


@numba.njit(error_model="numpy")
def _requant(x, inverse, codes, binades, lines, zero, nonneg):
    flags = np.zeros(x.size, np.bool_)
    for j in range(0, x.size, 64):
        src, dst = x.ctypes.data + 4 * j, codes.ctypes.data + j
        if nonneg:
            mask = simd.requant64_nonneg(src, inverse, dst, binades.ctypes.data,
                                         lines.ctypes.data, zero)  # fmt: skip
        else:
            mask = simd.requant64(src, inverse, dst, binades.ctypes.data, lines.ctypes.data, zero)
        for i in range(64):
            flags[j + i] = (mask >> np.uint64(i)) & np.uint64(1)
    return flags


@numba.njit(error_model="numpy")
def _dequant(codes, planes, scale, out):
    for j in range(0, codes.size, 64):
        simd.dequant64(codes.ctypes.data + j, planes.ctypes.data, out.ctypes.data + 4 * j, scale)


@needs_vbmi
@pytest.mark.parametrize(
    ("name", "nonneg"), [("signed", False), ("unsigned", False), ("unsigned", True)]
)
def test_requant64_equals_the_scalar_fast_path(name, nonneg):
    code = MAPS[name]
    t = _q8_decades.build_decade_tables(code)
    x = np.concatenate([boundary_points(code), log_spread(200_000, 3), np.float32([0, -0.0, 1])])
    x = np.abs(x) if nonneg else x
    x = np.resize(x, -(-x.size // 64) * 64).astype(np.float32)
    for absmax in (np.float32(1), np.float32(3.7e-3), np.float32(2.5e7)):
        inverse = np.float32(1) / absmax
        codes = np.empty(x.size, np.uint8)
        flags = _requant(x * absmax, inverse, codes, t.binades, t.lines, t.zero, nonneg)
        expected, expected_flags = fast_codes((x * absmax) * inverse, code)
        np.testing.assert_array_equal(codes, expected.astype(np.uint8))
        np.testing.assert_array_equal(flags, expected_flags)


@needs_vbmi
@pytest.mark.parametrize("name", MAPS)
def test_dequant64_is_map_times_scale(name):
    code = MAPS[name]
    planes = simd.byte_planes(code)
    codes = np.tile(np.arange(256, dtype=np.uint8), 3)
    np.random.default_rng(4).shuffle(codes)
    for scale in np.float32([1, 0.37, 0, np.nan, 3e-39, 3e38]):
        out = np.empty(codes.size, np.float32)
        _dequant(codes, planes, scale, out)
        np.testing.assert_array_equal(out.view(np.int32), (code[codes] * scale).view(np.int32))


@pytest.mark.parametrize("name", MAPS)
def test_quantize_blockwise_on_midpoints_matches_the_reference(name):
    """Values on and next to every midpoint: the flagged ones take the exact path."""
    code = MAPS[name]
    x = boundary_points(code)
    x = x[np.abs(x) <= 1]
    x = np.concatenate([x, np.float32([1.0])])  # absmax 1 in every block: x / absmax == x
    x = np.repeat(x[None, :], 1, 0).reshape(-1)
    blocks = -(-x.size // 255)
    x = np.resize(x, blocks * 255).reshape(blocks, 255)
    x = np.concatenate([x, np.ones((blocks, 1), np.float32)], axis=1).reshape(-1)
    assert fast_codes(x, code)[1].sum() > 100  # many values go through the exact path
    c_ref, a_ref = quant.quantize_blockwise(x, code, 256, backend="numpy")
    c_nb, a_nb = quant.quantize_blockwise(x, code, 256, backend="numba")
    np.testing.assert_array_equal(c_nb, c_ref)
    np.testing.assert_array_equal(a_nb, a_ref)


def test_gather_kernels_without_vbmi_match_the_reference(tmp_path):
    """Under NUMBA_CPU_NAME=haswell (AVX2) the gather kernels run; same bits as NumPy (both
    roundings of v)."""
    script = textwrap.dedent(
        """
        import numpy as np, adamnp
        from adamnp import quant
        from adamnp.backends.numba import avx512 as _numba_simd
        assert not _numba_simd.HAVE_VBMI
        rng = np.random.default_rng(5)
        for amsgrad, block_size, rounding in ((False, 64, "nearest"), (True, 256, "nearest"),
                                          (False, 256, "stochastic"), (True, 64, "stochastic")):
            params = [rng.standard_normal(n).astype(np.float32) for n in (5000, 70_001)]
            cfg = adamnp.adamw(lr=1e-2, amsgrad=amsgrad, nonfinite="propagate")
            states, ps = [], []
            for backend in ("numpy", "numba"):
                p = [a.copy() for a in params]
                states.append(adamnp.init(p, cfg, backend=backend, state_bits=8,
                                          block_size=block_size, min_8bit_size=1,
                                          v_rounding=rounding, state_format="bnb"))
                ps.append(p)
            for t in range(4):
                grads = [rng.standard_normal(a.size).astype(np.float32) for a in params]
                if t == 2:
                    grads[1][300] = np.nan
                for p, s in zip(ps, states):
                    adamnp.step(p, [g.copy() for g in grads], s)
            for a, b in zip(ps[0], ps[1]):
                assert np.array_equal(a.view(np.int32), b.view(np.int32))
            for a, b in zip(states[0].groups, states[1].groups):
                for key in a.buffers:
                    assert np.array_equal(a.buffers[key].view(np.uint8),
                                          b.buffers[key].view(np.uint8)), key
        x = rng.standard_normal(100_000).astype(np.float32)
        ref = quant.quantize_blockwise(x, backend="numpy")
        got = quant.quantize_blockwise(x, backend="numba")
        assert np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1])
        print("ok")
        """
    )
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CACHE_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
