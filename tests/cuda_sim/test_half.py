"""float16 and bfloat16 params on the CUDA backend give the NumPy reference's bits (in the
simulator).

The kernels (:mod:`adamnp.backends.cuda.half`, and the 8-bit kernels built for a half format)
upcast the params' bits with the functions of :mod:`adamnp.lowbit.half`, run the float32
step, and round back to nearest or stochastically with the reference's hash per element. So
after every step the params' bits, the moments (float32, or codes and absmax) and the step
counters must equal the reference's: float32-moment and 8-bit state (both formats), half and
float32 gradients per leaf, amsgrad, the non-finite check and clipping over half gradients.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from numba import cuda

import adamnp
from adamnp._state import QuantSlot
from adamnp.backends import cuda as be
from adamnp.backends import numpy as ref
from adamnp.backends.math import host_scalars, kernel_scalars

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
DTYPES = {"f16": F16, "bf16": BF16}
STATES = {
    "fp32": {},
    "sqrt": dict(state_bits=8, min_8bit_size=1, block_size=64),
    "bnb": dict(state_bits=8, min_8bit_size=1, block_size=64, state_format="bnb"),
}
QUANT_FIELDS = ("codes_m", "codes_v", "codes_vmax", "absmax_m", "absmax_v", "absmax_vmax")
SIZES = (700, 257)  # several simulator chunks and tiles; partial last chunk, tile and block


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal dtype, shape and bits; for floats (half ones too) any NaN equals any NaN."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.dtype.kind not in "fV":
        return got.tobytes() == want.tobytes()
    nan = np.isnan(want.astype(np.float32))
    if not np.array_equal(np.isnan(got.astype(np.float32)), nan):
        return False
    return got[~nan].tobytes() == want[~nan].tobytes()


def half_params(dtype, rng, sizes=SIZES) -> list:
    """Normal params with rounding edge cases: subnormal values of the format and (float16)
    values next to its largest finite number, which an update can round to Inf."""
    out = []
    for n in sizes:
        x = rng.standard_normal(n)
        tiny = 2.0**-20 if dtype == F16 else 2.0**-130
        x[::17] *= tiny
        if dtype == F16:
            x[5::41] = 65500.0 * np.sign(x[5::41])
        x[9] = np.inf  # stays Inf under AdamW: the rounding's Inf case
        out.append(x.astype(dtype))
    return out


def half_grads(params, rng, steps: int, kinds, scale: float = 1.0) -> list:
    """Gradients per step; leaf ``j`` gets the params' dtype if ``kinds[j]`` is "half",
    float32 if "float32"."""
    return [
        [(rng.standard_normal(p.size) * scale).astype(p.dtype if kind == "half" else np.float32)
         for p, kind in zip(params, kinds, strict=True)]
        for _ in range(steps)
    ]  # fmt: skip


def assert_same(host, dev, s_ref, s_dev, step: int) -> None:
    """Params (bits), every moment array and the counters of both runs are equal."""
    for i, (a, b) in enumerate(zip(dev, host, strict=True)):
        got = a.copy_to_host()
        if not same_bits(got, b):
            bad = np.flatnonzero(got.view(np.uint16) != b.view(np.uint16))
            raise AssertionError(f"step {step}, params[{i}]: {bad.size} differ, first at "
                                 f"{bad[:5]}: {got[bad[:5]]} vs {b[bad[:5]]}")  # fmt: skip
    for i, (want_slot, got_slot) in enumerate(zip(s_ref.slots, s_dev.slots, strict=True)):
        names = QUANT_FIELDS if isinstance(want_slot, QuantSlot) else ("m", "v", "vmax")
        for name in names:
            want = getattr(want_slot, name)
            if want is None:
                assert getattr(got_slot, name) is None, (step, i, name)
                continue
            assert same_bits(be.to_host(getattr(got_slot, name)), want), (step, i, name)
    assert (s_dev.step, s_dev.skipped_steps) == (s_ref.step, s_ref.skipped_steps)


def run_both(params, grads_seq, config, **init) -> tuple:
    """Run the reference (host) and the CUDA backend (device), comparing after each step."""
    host = [p.copy() for p in params]
    dev = [cuda.to_device(p) for p in params]
    s_ref = adamnp.init(host, config, backend="numpy", **init)
    s_dev = adamnp.init(dev, config, backend="cuda", **init)
    assert [g.half for g in s_dev.groups] == [g.half for g in s_ref.groups]
    assert all(g.half >= 0 for g in s_dev.groups)
    for t, grads in enumerate(grads_seq, 1):
        with np.errstate(invalid="ignore", over="ignore"):  # Inf params, NaN steps
            adamnp.step(host, grads, s_ref)
        adamnp.step(dev, [cuda.to_device(g) for g in grads], s_dev)
        assert_same(host, dev, s_ref, s_dev, t)
    return host, dev, s_ref, s_dev


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("grads", ["half", "mixed"])
@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_half_params_match_reference(dtype, state, grads, rounding):
    # One group of two leaves (one launch per step); "mixed": the first leaf's gradient has
    # the params' dtype, the second's is float32.
    rng = np.random.default_rng([len(dtype), len(state), len(grads), len(rounding)])
    params = half_params(DTYPES[dtype], rng)
    kinds = ("half", "half") if grads == "half" else ("half", "float32")
    # float16: steps of ~3e-5 take the tiny params to float16 subnormals (below 6.1e-5)
    lr = 3e-5 if dtype == "f16" else 1e-2
    cfg = adamnp.adamw(lr=lr, weight_decay=0.1, param_rounding=rounding)
    host, _, _, _ = run_both(params, half_grads(params, rng, 3, kinds), cfg, **STATES[state])
    x = host[0].astype(np.float32)  # the edge cases are there: Inf and subnormal params
    assert np.isinf(x[9])
    if dtype == "f16":
        assert ((x != 0) & (abs(x) < np.finfo(np.float16).tiny)).sum() > 10


@pytest.mark.parametrize("state", sorted(STATES))
def test_amsgrad_l2_maximize(state):
    rng = np.random.default_rng([7, len(state)])
    params = half_params(BF16, rng) + half_params(F16, rng, (300,))  # two groups
    for p in params:
        p[9] = 1.0  # no Inf: Adam's L2 term would make NaN moments of it
    cfg = adamnp.adam(lr=1e-2, weight_decay=0.05, amsgrad=True, maximize=True,
                      param_rounding="stochastic")  # fmt: skip
    grads = half_grads(params, rng, 3, ("float32", "half", "half"))
    run_both(params, grads, cfg, **STATES[state])


def test_many_elements_and_elements_per_thread():
    # ~3000 elements: several chunks of the float32-moment kernel; block size 1024 gives the
    # 8-bit kernels 16 elements per thread.
    rng = np.random.default_rng(31)
    params = half_params(F16, rng, (3001,))
    grads = half_grads(params, rng, 2, ("half",))
    cfg = adamnp.adamw(lr=1e-3, param_rounding="stochastic")
    run_both(params, grads, cfg)
    run_both(params, grads, cfg, state_bits=8, min_8bit_size=1, block_size=1024)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_nonfinite_half_grad_skips_the_step(dtype):
    rng = np.random.default_rng(41)
    params = half_params(DTYPES[dtype], rng)
    grads = half_grads(params, rng, 3, ("float32", "half"))
    grads[1][1][100] = np.nan  # a NaN in the half gradient of step 2
    cfg = adamnp.adamw(lr=1e-2, nonfinite="skip", param_rounding="stochastic")
    for state in ("fp32", "sqrt"):
        out = run_both(params, grads, cfg, **STATES[state])
        assert out[3].skipped_steps == 1 and out[3].step == 2


def test_nonfinite_leaf_over_half_grads():
    # float16: NaN and Inf only (65504 is finite and far below 2**63); bfloat16: its float32
    # value, so 2**63 and above count too (bits 0x5F00), as in the reference.
    top = np.float32(np.nextafter(np.float32(2.0**63), np.float32(0)))
    cases = [
        ([np.float16([1.0, 65504.0, -65504.0])], -1),
        ([np.float32([1.0]), np.float16([0.0, np.inf])], 1),
        ([np.float16([np.nan]), np.float32([np.inf])], 0),
        ([np.array([1.0, top], BF16)], 0),  # rounds to nearest: 2**63 in bfloat16
        ([np.array([1.0, 2.0**62 * 1.9921875], BF16)], -1),  # the largest below 2**63
        ([np.array([-(2.0**63)], BF16), np.float32([1.0])], 0),
        ([np.float32([2.0]), np.array([3.0e38], BF16)], 1),
        ([np.float16([1.0]), np.array([np.nan], BF16), np.float32([np.nan])], 1),
    ]
    for grads, expected in cases:
        assert ref.nonfinite_leaf(grads) == expected, grads
        assert be.nonfinite_leaf([cuda.to_device(g) for g in grads]) == expected, grads


def test_clipping_over_half_grads_matches_reference():
    # The norm is summed in another order than NumPy's; the float32 clipping factor the
    # kernels multiply by is the same here (checked first), so all bits are.
    rng = np.random.default_rng(51)
    params = half_params(BF16, rng) + half_params(F16, rng, (300,))
    grads = half_grads(params, rng, 2, ("half", "float32", "half"), scale=10.0)
    cfg = adamnp.adamw(lr=1e-2, max_grad_norm=0.5)
    for g in grads:
        norms = ref.grad_sq_norm(g), be.grad_sq_norm([cuda.to_device(x) for x in g])
        assert np.isclose(norms[0], norms[1], rtol=1e-12, atol=0)
        scales = [kernel_scalars(host_scalars(cfg, 1, 1e-2, 0.5 / (x**0.5 + 1e-6)),
                                 np.float32).grad_scale for x in norms]  # fmt: skip
        assert scales[0] == scales[1] < 1
    run_both(params, grads, cfg)
    run_both(params, grads, cfg, **STATES["bnb"])


class Interface:
    """A device array known only by ``__cuda_array_interface__`` (as torch exports a bfloat16
    CUDA tensor: typestr ``<V2``); in the simulator "device" memory is host memory."""

    def __init__(self, host: np.ndarray, typestr: str):
        self.host = host
        self.__cuda_array_interface__ = {
            "shape": host.shape,
            "typestr": typestr,
            "data": (host.__array_interface__["data"][0], False),
            "strides": None,
            "version": 3,
        }


def test_bfloat16_typestr_v2_is_read_as_bfloat16():
    g = np.array([1.0, -2.0, 3.0e38, 0.5], BF16)
    assert be.device_dtype(cuda.to_device(g)) == BF16  # a Numba array carries its dtype
    assert be.device_dtype(Interface(g, "<V2")) == BF16  # torch's typestr for bfloat16
    assert be.device_dtype(Interface(g.view(np.float16), "<f2")) == F16
    assert be.nonfinite_leaf([Interface(g, "<V2")]) == 0
    g[2] = 7.0
    assert be.nonfinite_leaf([Interface(g, "<V2")]) == -1
    assert be.grad_sq_norm([Interface(g, "<V2")]) == ref.grad_sq_norm([g]) == 54.25
