"""Tests of adamnp.quant: the maps, the rounding rule, the backends and the O(1) quantizer."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adamnp.lowbit import exact as _q8_elem
from adamnp.lowbit import maps
from adamnp.lowbit.reference import nearest_code
from adamnp.quant import dequantize_blockwise, dynamic_map, quantize_blockwise

VECTORS = Path(__file__).parent / "vectors" / "dynamic_maps.npz"
ROOT = Path(__file__).resolve().parent.parent

numba_quant = pytest.importorskip("adamnp.backends.numba.quant")

LINEAR = np.linspace(-1, 1, 256, dtype=np.float32)
RANDOM = np.sort(np.random.default_rng(7).uniform(-1, 1, 256).astype(np.float32))
MAPS = {
    "signed": dynamic_map(True),
    "unsigned": dynamic_map(False),
    "linear": LINEAR,
    "random": RANDOM,
}


def bits_of(x):
    return np.ascontiguousarray(x, dtype=np.float32).view(np.int32)


def fast_codes(x, code):
    """Codes of the scaled values `x` from the table quantizer (Numba-compiled)."""
    t = _q8_elem.build_quant_tables(code)
    out = np.empty(np.size(x), dtype=np.uint8)
    numba_quant.quantize_bits_array(bits_of(x).reshape(-1), t.table, t.shift, t.lo, t.nb, out)
    return out


# --- maps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_torch_vectors_bitwise(signed):
    key = "signed" if signed else "unsigned"
    with np.load(VECTORS) as f:
        expected = f[key]
    got = dynamic_map(signed)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("signed", [True, False])
def test_linspace_emulation_matches_torch_default_kernel_too(signed):
    key = "signed_default" if signed else "unsigned_default"
    with np.load(VECTORS) as f:
        expected = f[key]
    got = maps._dynamic_map_values(signed, fused=False)
    np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape_order_and_endpoints(signed):
    m = dynamic_map(signed)
    assert m.shape == (256,)
    assert np.all(np.diff(m) > 0)
    assert 0.0 in m and m[-1] == 1.0
    assert (m[0] < 0) == signed
    assert not m.flags.writeable
    assert dynamic_map(signed) is m
    if signed:  # negatives mirror the positives below 1
        np.testing.assert_array_equal(-m[:127][::-1], m[128:255])


# --- the reference rounding rule --------------------------------------------------------------


@pytest.mark.parametrize("name", MAPS)
def test_reference_rounding_is_nearest_with_ties_low(name):
    """searchsorted on float64 midpoints == brute-force argmin of the exact distance."""
    code = MAPS[name]
    wide = code.astype(np.float64)
    mids = (wide[:-1] + wide[1:]) / 2
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.uniform(-1, 1, 2000).astype(np.float32),
            mids.astype(np.float32),  # many midpoints are float32 exactly: ties
            code,
            np.float32([0.0, -0.0, 1.0, -1.0]),
        ]
    )
    dist = np.abs(x.astype(np.float64)[:, None] - wide[None, :])
    expected = np.argmin(dist, axis=1)  # first minimum: ties to the lower index
    np.testing.assert_array_equal(nearest_code(x, code), expected)


# --- the O(1) table quantizer -----------------------------------------------------------------


def structured_points(code):
    """Every float32 where the reference code or the table code can change, and neighbours.

    Both are step functions of the float32 bit pattern on each side of zero (the table one by
    construction: it changes only at bucket starts and at one offset per bucket). Agreeing at
    every point where either may change -- and at pattern 0 -- means agreeing on all 2**32
    patterns; the neighbours (a few ulps either side) and special values are extra margin.
    """
    t = _q8_elem.build_quant_tables(code)
    wide = code.astype(np.float64)
    mids = (wide[:-1] + wide[1:]) / 2
    near = [np.abs(mids).astype(np.float32), np.abs(code)]
    tiny = np.float32(2.0) ** np.arange(-149, 1, dtype=np.float32)  # powers of two
    near += [tiny, np.float32([0.0, 1.0, 1e-45, 1.1754942e-38, 1.1754944e-38, 0.5])]
    pats = np.concatenate([bits_of(v) for v in near]).astype(np.int64)
    starts = (np.arange(t.lo, t.lo + t.nb + 1, dtype=np.int64)) << t.shift
    table = t.table.astype(np.int64)
    change = starts[:-1] + (table[: t.nb] >> 8)  # sign bit clear
    change_neg = starts[:-1] + (table[t.nb :] >> 8)  # sign bit set
    pats = np.concatenate([pats, starts, change, change_neg, [0, 0x3F800000]])
    pats = (pats[:, None] + np.arange(-4, 5)[None, :]).reshape(-1)
    pats = np.unique(np.clip(pats, 0, 0x3F800000)).astype(np.int32)
    both = np.concatenate([pats, pats | np.int32(-0x80000000)])  # the negatives
    return both.view(np.float32)


@pytest.mark.parametrize("name", MAPS)
def test_table_quantizer_exact_at_every_change_point(name):
    code = MAPS[name]
    x = structured_points(code)
    assert x.size > 5000
    np.testing.assert_array_equal(fast_codes(x, code), nearest_code(x, code))


@pytest.mark.parametrize("name", MAPS)
def test_table_quantizer_exact_on_random_and_strided_patterns(name):
    code = MAPS[name]
    rng = np.random.default_rng(2)
    uniform = rng.uniform(-1, 1, 500_000).astype(np.float32)
    logs = np.float32(10.0) ** rng.uniform(-12, 0, 500_000).astype(np.float32)
    logs *= rng.choice(np.float32([-1, 1]), logs.size)
    strided = np.arange(0, 0x3F800001, 1021, dtype=np.int32)  # 1.04M of the 2**30 patterns
    strided = np.concatenate([strided, strided | np.int32(-0x80000000)]).view(np.float32)
    for x in (uniform, logs, strided):
        np.testing.assert_array_equal(fast_codes(x, code), nearest_code(x, code))


def test_quantize_bits_is_plain_python():
    code = dynamic_map(True)
    t = _q8_elem.build_quant_tables(code)
    x = np.float32([-1.0, -0.3, -0.0, 0.0, 1e-30, 0.0071, 0.9, 1.0])
    got = [int(_q8_elem.quantize_bits(b, t.table, t.shift, t.lo, t.nb)) for b in bits_of(x)]
    assert got == nearest_code(x, code).tolist()


@pytest.mark.parametrize("signed", [True, False])
def test_table_sizes_of_the_dynamic_maps(signed):
    t = _q8_elem.build_quant_tables(dynamic_map(signed))
    assert t.table.dtype == np.int32 and t.table.size == 2 * t.nb
    assert t.table.nbytes <= 24 * 1024  # fits in L1 next to the data


def test_too_dense_map_is_rejected_by_the_table_builder_only():
    code = LINEAR.copy()  # three values 1 ulp apart: change points on adjacent patterns
    code[200] = np.nextafter(code[201], np.float32(-1))
    code[199] = np.nextafter(code[200], np.float32(-1))
    with pytest.raises(ValueError, match="too close"):
        _q8_elem.build_quant_tables(code)
    x = np.float32([0.99999, 1.0, 0.5])
    expected = quantize_blockwise(x, code, 64, backend="numpy")
    got = quantize_blockwise(x, code, 64, backend="auto")  # falls back to NumPy
    np.testing.assert_array_equal(got[0], expected[0])
    with pytest.raises(ValueError, match="too close"):
        quantize_blockwise(x, code, 64, backend="numba")


# --- blockwise functions: backends agree ------------------------------------------------------


def sample(n, rng):
    """float32 data with blocks of different scales, some all-zero blocks and signed zeros."""
    x = rng.standard_normal(n).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-8, 3, n).astype(np.float32)
    if n > 600:
        x[64:320] = 0.0
        x[320:384] = -0.0
    return x


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 4095, 4096, 100_000])
@pytest.mark.parametrize("block_size", [64, 256, 4096])
@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_backends_agree_exactly(n, block_size, name):
    code = MAPS[name]
    x = sample(n, np.random.default_rng(n + block_size))
    if name == "unsigned":
        x[: n // 2] = np.abs(x[: n // 2])  # the rest negative: clamps to code 0
    c_ref, a_ref = quantize_blockwise(x, code, block_size, backend="numpy")
    c_nb, a_nb = quantize_blockwise(x, code, block_size, backend="numba")
    assert c_ref.dtype == np.uint8 and c_ref.shape == x.shape
    assert a_ref.dtype == np.float32 and a_ref.shape == (-(-n // block_size),)
    np.testing.assert_array_equal(c_nb, c_ref)
    np.testing.assert_array_equal(a_nb.view(np.int32), a_ref.view(np.int32))
    d_ref = dequantize_blockwise(c_ref, a_ref, code, block_size, backend="numpy")
    d_nb = dequantize_blockwise(c_ref, a_ref, code, block_size, backend="numba")
    np.testing.assert_array_equal(d_nb.view(np.int32), d_ref.view(np.int32))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_absmax_and_partial_last_block(backend):
    x = np.arange(1, 301, dtype=np.float32) * np.float32(-0.5)
    codes, absmax = quantize_blockwise(x, block_size=128, backend=backend)
    np.testing.assert_array_equal(absmax, np.float32([64.0, 128.0, 150.0]))
    assert codes[127] == 0 and codes[299] == 0  # -absmax -> the most negative map value


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_zero_blocks_store_absmax_zero_and_the_code_of_zero(backend):
    zero_code = int(np.flatnonzero(dynamic_map(True) == 0)[0])
    x = np.zeros(200, dtype=np.float32)
    x[64:128] = -0.0
    x[128:] = np.linspace(-1, 1, 72, dtype=np.float32)
    codes, absmax = quantize_blockwise(x, block_size=64, backend=backend)
    np.testing.assert_array_equal(absmax[:2], [0.0, 0.0])
    assert np.all(codes[:128] == zero_code)
    out = dequantize_blockwise(codes, absmax, block_size=64, backend=backend)
    assert np.all(out[:128] == 0.0)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_shapes_layouts_and_empty(backend):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 50, 3)).astype(np.float32)
    flat = quantize_blockwise(x.reshape(-1), backend=backend)
    for view in (x, np.asfortranarray(x)):
        codes, absmax = quantize_blockwise(view, backend=backend)
        assert codes.shape == x.shape
        np.testing.assert_array_equal(codes.reshape(-1), flat[0])
        np.testing.assert_array_equal(absmax, flat[1])
    strided = quantize_blockwise(x.reshape(-1)[::2], backend=backend)
    np.testing.assert_array_equal(strided[0], quantize_blockwise(x.reshape(-1)[::2].copy())[0])
    codes, absmax = quantize_blockwise(np.empty((3, 0), np.float32), backend=backend)
    assert codes.shape == (3, 0) and absmax.shape == (0,)
    out = dequantize_blockwise(codes, absmax, backend=backend)
    assert out.shape == (3, 0) and out.dtype == np.float32


# --- round-trip error budget ------------------------------------------------------------------


def error_bound(x, absmax, code, block_size):
    """Half the gap between the map values around x / absmax, times absmax, plus rounding.

    The chosen code is the nearest map value to ``s = fl(x / absmax)``, so its distance to
    ``s`` is at most half the enclosing gap (or the distance to the end of the map when ``s``
    lies beyond it, e.g. below the signed map's -0.99297). Two float32 roundings separate
    that from the error on ``x``: ``fl(x / A)`` is off by at most ``u |x| / A`` (u = 2**-24),
    i.e. ``u |x| <= u A`` after scaling back, and ``fl(code * A)`` by at most
    ``u |code * A| <= u A``. Subnormal results are off by at most half of 2**-149 instead.
    Hence the slack ``2**-23 * A + 2**-148``.
    """
    a = np.repeat(absmax, block_size)[: x.size].astype(np.float64)
    safe = np.where(a > 0, a, 1).astype(np.float32)
    s = (x / safe).astype(np.float64)
    wide = code.astype(np.float64)
    j = np.clip(np.searchsorted(wide, s), 1, 255)
    below, above = wide[j - 1], wide[j]
    half_gap = (above - below) / 2
    reach = np.maximum(half_gap, np.maximum(below - s, s - above))  # beyond the map's ends
    return reach * a + 2.0**-23 * a + 2.0**-148


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.integers(0, 700), elements=finite32),
    block_size=st.sampled_from([64, 128, 256]),
    signed=st.booleans(),
    backend=st.sampled_from(["numpy", "numba"]),
)
def test_round_trip_error_within_half_a_code_step(x, block_size, signed, backend):
    code = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, code, block_size, backend=backend)
    out = dequantize_blockwise(codes, absmax, code, block_size, backend=backend)
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= error_bound(x, absmax, code, block_size))


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_is_rejected(backend, bad):
    x = np.ones(300, dtype=np.float32)
    x[299] = bad  # in the partial last block
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_blockwise(x, backend=backend)


@pytest.mark.parametrize("block_size", [0, 1, 32, 100, 255, 8192, -256])
def test_bad_block_sizes_are_rejected(block_size):
    x = np.ones(10, dtype=np.float32)
    with pytest.raises(ValueError, match="power of two"):
        quantize_blockwise(x, block_size=block_size)
    with pytest.raises(ValueError, match="power of two"):
        dequantize_blockwise(np.zeros(10, np.uint8), np.ones(1, np.float32), None, block_size)


@pytest.mark.parametrize("block_size", [256.0, True, "256"])
def test_non_integer_block_sizes_are_rejected(block_size):
    with pytest.raises(TypeError, match="block_size"):
        quantize_blockwise(np.ones(10, dtype=np.float32), block_size=block_size)


def test_bad_inputs_are_rejected():
    x = np.ones(10, dtype=np.float32)
    with pytest.raises(TypeError, match="float32"):
        quantize_blockwise(x.astype(np.float64))
    with pytest.raises(TypeError, match="float32"):
        quantize_blockwise(x, LINEAR.astype(np.float64))
    with pytest.raises(ValueError, match=r"shape \(256,\)"):
        quantize_blockwise(x, LINEAR[:255])
    with pytest.raises(ValueError, match="increasing"):
        quantize_blockwise(x, LINEAR[::-1].copy())
    with pytest.raises(ValueError, match="backend"):
        quantize_blockwise(x, backend="cuda")
    codes, absmax = quantize_blockwise(x)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_blockwise(codes.astype(np.int32), absmax)
    with pytest.raises(TypeError, match="float32"):
        dequantize_blockwise(codes, absmax.astype(np.float64))
    with pytest.raises(ValueError, match="absmax must have shape"):
        dequantize_blockwise(np.zeros(300, np.uint8), absmax, block_size=64)
    with pytest.raises(ValueError, match="non-negative"):
        dequantize_blockwise(codes, -absmax)


# --- CUDA: the element function under Numba's simulator ---------------------------------------

SIMULATED = """
import numpy as np
from numba import cuda
from adamnp.lowbit import exact as _q8_elem
from adamnp.lowbit.reference import nearest_code
from adamnp.quant import dynamic_map

quantize = cuda.jit(device=True)(_q8_elem.quantize_bits)

@cuda.jit
def kernel(x, scale, table, shift, lo, nb, out):
    i = cuda.grid(1)
    if i < x.size:
        s = x[i] / scale
        # on a real GPU: cuda.libdevice.float_as_int(s); the simulator has no libdevice
        out[i] = quantize(np.float32(s).view(np.int32), table, shift, lo, nb)

for signed in (True, False):
    code = dynamic_map(signed)
    t = _q8_elem.build_quant_tables(code)
    x = np.linspace(-1.5, 1.5, 1001).astype(np.float32)
    out = np.zeros(x.size, np.uint8)
    kernel[8, 128](x, np.float32(1.5), cuda.to_device(t.table), t.shift, t.lo, t.nb, out)
    assert np.array_equal(out, nearest_code(x / np.float32(1.5), code)), signed
print("ok")
"""


def test_element_function_runs_in_the_cuda_simulator():
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", SIMULATED], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
