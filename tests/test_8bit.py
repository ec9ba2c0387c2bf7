"""Blockwise 8-bit state: selection, layout, memory, the reference step, convergence."""

from __future__ import annotations

import numpy as np
import pytest

import adamnp
from adamnp import quant
from adamnp.backends import numpy as ref


def test_state_bytes_per_element(backend):
    n = 1 << 16
    p = np.zeros(n, np.float32)
    fp32 = adamnp.init(p, adamnp.adamw(), backend=backend)
    assert fp32.nbytes() == 8 * n
    for bs in (64, 256, 4096):
        q8 = adamnp.init(p, adamnp.adamw(), backend=backend, state_bits=8, block_size=bs)
        assert q8.nbytes() == n * (2 + 8 / bs)


def test_which_leaves_get_8bit(backend):
    params = {
        "big": np.zeros(5000, np.float32),
        "small": np.zeros(4095, np.float32),
        "f64": np.zeros(5000, np.float64),
        "emb": np.zeros((100, 50), np.float32),
    }
    kinds = lambda s: {p: type(x).__name__ for p, x in zip(s.paths, s.slots)}  # noqa: E731
    s = adamnp.init(params, adamnp.adamw(), backend=backend, state_bits=8)
    assert kinds(s) == {
        "params['big']": "QuantSlot",
        "params['emb']": "QuantSlot",
        "params['f64']": "Fp32Slot",
        "params['small']": "Fp32Slot",
    }
    s = adamnp.init(params, adamnp.adamw(), backend=backend, state_bits=8,
                    keep_fp32=["params['emb']"], min_8bit_size=100)  # fmt: skip
    assert kinds(s)["params['emb']"] == "Fp32Slot" and kinds(s)["params['small']"] == "QuantSlot"
    s = adamnp.init(params, adamnp.adamw(), backend=backend, state_bits=8,
                    keep_fp32=lambda path, a: a.ndim == 2)  # fmt: skip
    assert kinds(s)["params['emb']"] == "Fp32Slot"


def test_bitsandbytes_layout(backend):
    p = np.zeros((300, 7), np.float32)
    s = adamnp.init(p, adamnp.adamw(amsgrad=True), backend=backend, state_bits=8, min_8bit_size=1,
                    state_format="bnb")  # fmt: skip
    slot = s.slots[0]
    for codes in (slot.codes_m, slot.codes_v, slot.codes_vmax):
        assert codes.dtype == np.uint8 and codes.shape == (300, 7)
    for absmax in (slot.absmax_m, slot.absmax_v, slot.absmax_vmax):
        assert absmax.dtype == np.float32 and absmax.shape == (-(-2100 // 256),)
    # zero state: every code decodes to exactly 0
    assert np.all(quant.dynamic_map(True)[slot.codes_m] == 0)
    assert np.all(quant.dynamic_map(False)[slot.codes_v] == 0)


def test_reference_step_is_dequantize_update_requantize():
    """One reference step equals the three public pieces composed by hand."""
    rng = np.random.default_rng(0)
    n, bs = 3000, 256  # partial last block
    p = rng.standard_normal(n).astype(np.float32)
    state = adamnp.init(p, adamnp.adam(lr=1e-2), backend="numpy", state_bits=8, min_8bit_size=1,
                        state_format="bnb")  # fmt: skip
    adamnp.step(p, rng.standard_normal(n).astype(np.float32), state)  # non-trivial state
    slot = state.slots[0]
    cm, cv = quant.dynamic_map(True), quant.dynamic_map(False)
    m = quant.dequantize_blockwise(slot.codes_m, slot.absmax_m, cm, bs)
    v = quant.dequantize_blockwise(slot.codes_v, slot.absmax_v, cv, bs)
    g = rng.standard_normal(n).astype(np.float32)
    expect_p = p.copy()
    s = adamnp.backends.math.host_scalars(state.config, 2, 1e-2)
    k = adamnp.backends.math.kernel_scalars(s, np.float32)
    ref.update_chunk(expect_p, g, m, v, None, k, s, np.empty(n, np.float32),
                     np.empty(n, np.float32))  # fmt: skip
    adamnp.step(p, g, state)
    assert p.tobytes() == expect_p.tobytes()
    for codes, absmax, x, code in ((slot.codes_m, slot.absmax_m, m, cm),
                                   (slot.codes_v, slot.absmax_v, v, cv)):  # fmt: skip
        want_codes, want_absmax = quant.quantize_blockwise(x, code, bs, backend="numpy")
        assert np.array_equal(codes, want_codes) and np.array_equal(absmax, want_absmax)


def test_moments_within_quantization_error(backend):
    """8-bit moments track float32 moments within the map's local step times absmax."""
    rng = np.random.default_rng(1)
    n = 8192
    p32, p8 = [rng.standard_normal(n).astype(np.float32)] * 2
    p32, p8 = p32.copy(), p8.copy()
    cfg = adamnp.adamw(lr=1e-3)
    s32 = adamnp.init(p32, cfg, backend=backend)
    s8 = adamnp.init(p8, cfg, backend=backend, state_bits=8, state_format="bnb")
    for _ in range(20):
        g = rng.standard_normal(n).astype(np.float32)
        adamnp.step(p32, g, s32)
        adamnp.step(p8, g, s8)
    m8 = quant.dequantize_blockwise(s8.slots[0].codes_m, s8.slots[0].absmax_m)
    # Each requantization moves m by at most half a gap of the signed map; the widest gap is
    # 1 - 0.99297 ~ 0.0070 absmax at the top, the top decade's gaps are 0.9 / 64 ~ 0.0141.
    # Old errors decay by beta1 per step, so the accumulated error stays below
    # half_gap / (1 - beta1) = 10 half gaps in the worst case and about one half gap on average.
    rel = np.abs(m8 - s32.slots[0].m) / np.repeat(s8.slots[0].absmax_m, 256)
    top_gap = 0.9 / 64
    assert rel.max() <= 10 * top_gap / 2
    assert rel.mean() <= top_gap


def test_zero_block_and_nan_block(backend):
    n = 1024
    p = np.ones(n, np.float32)
    cfg = adamnp.adam(nonfinite="propagate")
    s = adamnp.init(p, cfg, backend=backend, state_bits=8, min_8bit_size=1, state_format="bnb")
    g = np.zeros(n, np.float32)
    g[300] = np.nan  # block 1
    g[600] = 1.0  # block 2
    adamnp.step(p, g, s)
    slot = s.slots[0]
    zero_m = int(np.flatnonzero(quant.dynamic_map(True) == 0)[0])
    assert slot.absmax_m[0] == 0 and np.all(slot.codes_m[:256] == zero_m)
    assert np.isnan(slot.absmax_m[1]) and np.all(slot.codes_m[256:512] == zero_m)
    assert slot.absmax_m[2] > 0 and not np.isnan(slot.absmax_m[2])
    assert np.isnan(p[300]) and np.isfinite(np.delete(p, 300)).all()


def _least_squares(bits, backend, steps=1500):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((256, 64)).astype(np.float32)
    w_true = rng.standard_normal((64, 80)).astype(np.float32)
    y = a @ w_true + 0.1 * rng.standard_normal((256, 80)).astype(np.float32)
    params = {"w": np.zeros((64, 80), np.float32), "b": np.zeros(80, np.float32)}
    state = adamnp.init(params, adamnp.adamw(lr=1e-2, weight_decay=0.0), backend=backend,
                        state_bits=bits)  # fmt: skip
    for _ in range(steps):
        r = a @ params["w"] + params["b"] - y
        grads = {"w": (a.T @ r) / np.float32(len(a)), "b": r.mean(axis=0)}
        adamnp.step(params, grads, state)
    r = a @ params["w"] + params["b"] - y
    return float(np.mean(r.astype(np.float64) ** 2) / 2)


@pytest.mark.parametrize("bs", [256])
def test_8bit_training_matches_float32_loss(backend, bs):
    loss32 = _least_squares(32, backend)
    loss8 = _least_squares(8, backend)
    # both reach the noise floor (0.1**2 / 2 = 0.005); the 8-bit run within 1% of float32
    assert loss32 < 0.006
    assert abs(loss8 - loss32) <= 0.01 * loss32, (loss8, loss32)


@pytest.mark.parametrize(
    "options",
    [
        dict(state_bits=8),
        dict(state_bits=8, min_8bit_size=0),
        dict(state_bits=8, min_8bit_size=100, keep_fp32=["params['emb']"]),
        dict(state_bits=8, keep_fp32=lambda path, a: a.ndim == 2),
        dict(state_bits=32, min_8bit_size=0),
    ],
)
def test_layout_decides_the_slots(options):
    params = {"big": np.zeros(5000, np.float32), "small": np.zeros(4095, np.float32),
              "f64": np.zeros(5000, np.float64), "emb": np.zeros((100, 50), np.float32),
              "empty": np.zeros(0, np.float32)}  # fmt: skip
    s = adamnp.init(params, adamnp.adamw(), backend="numpy", **options)
    q8 = [isinstance(x, adamnp.QuantSlot) for x in s.slots]
    assert s.layout.eight_bit(s.paths, s.shapes, s.dtypes) == q8
    assert q8[s.paths.index("params['empty']")] is False  # never 8-bit, even with min 0
    assert all(x.block_size == s.layout.block_size for x in s.slots if hasattr(x, "codes_m"))
