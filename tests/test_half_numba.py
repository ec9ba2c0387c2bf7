"""float16 / bfloat16 params on the Numba CPU backend: the NumPy reference's bits everywhere.

Params (bits), float32 moments, 8-bit codes and absmax of both formats, gradients of the
param dtype or float32 (mixed in one tree), both roundings, the non-finite check and the
gradient norm of half gradients, thread independence; and the reference's own definition: a
half step rounded to nearest is the float32 step on the upcast params, then ``astype``.
"""

from __future__ import annotations

import numpy as np
import pytest

import adamnp
from adamnp import backends

if not backends.available("numba"):
    pytest.skip("the numba backend is not available", allow_module_level=True)
ml_dtypes = pytest.importorskip("ml_dtypes")

import numba  # noqa: E402

from adamnp.backends import numba as numba_cpu  # noqa: E402
from adamnp.backends import numpy as numpy_ref  # noqa: E402
from adamnp.backends.numba import half as numba_half  # noqa: E402
from adamnp.lowbit import half as half_fmt  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = [F16, BF16]
SIZES = (70_001, 300, 4097, 5)  # > 2 chunks, blocks cut short, below a block
EIGHT = dict(state_bits=8, min_8bit_size=1, block_size=256)

CASES = {
    "adamw": ({}, {}),
    "amsgrad-maximize-clip": ({}, dict(amsgrad=True, maximize=True, max_grad_norm=5.0)),
    "adam-l2": ({}, dict(decoupled=False, weight_decay=0.1)),
    "sqrt-amsgrad": (dict(EIGHT, state_format="sqrt"), dict(amsgrad=True)),
    "sqrt-block64-clip": (dict(EIGHT, block_size=64), dict(max_grad_norm=1.0, weight_decay=0.1)),
    "bnb-nearest-clip": (dict(EIGHT, state_format="bnb"), dict(max_grad_norm=5.0)),
    "bnb-stochastic-amsgrad": (
        dict(EIGHT, state_format="bnb", v_rounding="stochastic"),
        dict(amsgrad=True, maximize=True),
    ),
}


def _config(rounding, **options):
    options = {"lr": 0.01, "weight_decay": 0.01, **options}
    if options.pop("decoupled", True):
        return adamnp.adamw(param_rounding=rounding, **options)
    return adamnp.adam(param_rounding=rounding, **options)


def _params(dtypes, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"l{i}": rng.standard_normal(n).astype(np.float32).astype(dtypes[i % len(dtypes)])
        for i, n in enumerate(SIZES)
    }


def _grads(params, kinds, rng):
    """Gradients of the params' dtype (``"half"``), float32, or alternating (``"mixed"``)."""
    out = {}
    for i, (name, p) in enumerate(params.items()):
        half = kinds == "half" or (kinds == "mixed" and i % 2 == 0)
        dtype = p.dtype if half or p.itemsize != 2 else np.float32
        out[name] = (rng.standard_normal(p.size) * 3).astype(np.float32).astype(dtype)
    return out


def _run(backend, params, cfg, kinds, steps=3, seed=1, **init):
    params = {k: a.copy() for k, a in params.items()}
    state = adamnp.init(params, cfg, backend=backend, **init)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        adamnp.step(params, _grads(params, kinds, rng), state)
    return params, state


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    for name in pa:
        assert pa[name].dtype == pb[name].dtype
        bits = f"u{pa[name].itemsize}"
        assert np.array_equal(pa[name].view(bits), pb[name].view(bits)), name
    assert sa.step == sb.step and sa.skipped_steps == sb.skipped_steps
    for ga, gb in zip(sa.groups, sb.groups):
        assert ga.buffers.keys() == gb.buffers.keys()
        for key in ga.buffers:
            x, y = ga.buffers[key], gb.buffers[key]
            assert x.tobytes() == y.tobytes(), (ga.param_dtype, key)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("kinds", ["half", "float32", "mixed"])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: d.name)
def test_numba_equals_the_reference(dtype, kinds, rounding, case):
    init, options = CASES[case]
    params = _params([dtype])
    cfg = _config(rounding, **options)
    ref = _run("numpy", params, cfg, kinds, **init)
    _assert_same(_run("numba", params, cfg, kinds, **init), ref)
    assert any(not np.array_equal(ref[0][k].view(np.uint16), params[k].view(np.uint16))
               for k in params)  # fmt: skip


@pytest.mark.parametrize("bits", [32, 8])
def test_a_tree_mixing_float32_float64_and_half_leaves(bits):
    params = _params([np.float32, F16, np.float64, BF16, F16, BF16])
    params.update({f"m{k}": v for k, v in _params([BF16, np.float32, F16], seed=3).items()})
    init = EIGHT if bits == 8 else {}
    cfg = _config("stochastic", amsgrad=True)  # no clipping: the norms' last bits may differ
    ref = _run("numpy", params, cfg, "mixed", **init)
    assert len(ref[1].groups) >= 4
    _assert_same(_run("numba", params, cfg, "mixed", **init), ref)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
@pytest.mark.parametrize("init", [{}, dict(EIGHT, state_format="sqrt"),
                                  dict(EIGHT, state_format="bnb", v_rounding="stochastic")],
                         ids=["fp32", "sqrt", "bnb"])  # fmt: skip
def test_results_do_not_depend_on_threads(monkeypatch, init):
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN", 1)  # every thread, even for small trees
    params = _params([BF16, F16])
    cfg = _config("stochastic", amsgrad=True, max_grad_norm=20.0)
    runs = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            runs.append(_run("numba", params, cfg, "mixed", **init))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    _assert_same(*runs)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: d.name)
def test_a_nearest_half_step_is_the_float32_step_rounded(dtype, bits, backend):
    """The definition: upcast, the float32 step with a float32 twin state, ``astype``."""
    params = _params([dtype])
    init = EIGHT if bits == 8 else {}
    cfg = _config("nearest", amsgrad=True, decoupled=False, weight_decay=0.1)
    twin = {k: a.astype(np.float32) for k, a in params.items()}
    state = adamnp.init(params, cfg, backend=backend, **init)
    state32 = adamnp.init(twin, cfg, backend=backend, **init)
    rng = np.random.default_rng(2)
    for _ in range(3):
        grads = _grads(params, "mixed", rng)
        for k in twin:
            twin[k][...] = params[k].astype(np.float32)  # exact
        adamnp.step(params, grads, state)
        adamnp.step(twin, {k: g.astype(np.float32) for k, g in grads.items()}, state32)
        for k in params:
            assert np.array_equal(twin[k].astype(dtype).view(np.uint16), params[k].view(np.uint16))
        for ga, gb in zip(state.groups, state32.groups):
            assert all(ga.buffers[x].tobytes() == gb.buffers[x].tobytes() for x in ga.buffers)


def _bad_grads(dtype):
    """Gradient lists whose first non-finite leaf is known (bfloat16 holds 2**63; float16
    cannot, its largest finite value 65504 passes)."""
    big = np.finfo(np.float16).max
    cases = [
        ([np.ones(5, dtype), np.array([1.0, np.nan], dtype)], 1),
        ([np.array([0.0, -np.inf], dtype), np.ones(3, np.float32)], 0),
        ([np.ones(3, np.float32), np.zeros(40_000, dtype), np.array([big], dtype)], -1),
        ([np.ones(3, np.float64), np.full(70_000, -big, dtype)], -1),
    ]
    long = np.ones(70_000, dtype)
    long[69_999] = np.inf
    cases.append(([np.ones(4, dtype), long], 1))
    if dtype == BF16:
        limit = np.array([2.0**63], np.float32).astype(BF16)
        below = np.array([np.nextafter(2.0**63, 0, dtype=np.float32)], np.float32).astype(BF16)
        cases += [([np.ones(3, BF16), -limit], 1), ([np.ones(3, BF16), below], 1)]
        below = np.array([2.0**63 - 2.0**55], np.float32).astype(BF16)  # the last below
        cases.append(([below, np.ones(3, F16)], -1))
    return cases


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: d.name)
def test_nonfinite_leaf_and_norm_of_half_gradients(dtype):
    for grads, expected in _bad_grads(dtype):
        assert numpy_ref.nonfinite_leaf(grads) == expected
        assert numba_cpu.nonfinite_leaf(grads) == expected
    rng = np.random.default_rng(4)
    grads = [(rng.standard_normal(n) * 100).astype(dtype) for n in (70_001, 3, 9, 1000)]
    grads.insert(1, rng.standard_normal(50).astype(np.float32))
    upcast = [g.astype(np.float32) for g in grads]
    assert numba_cpu.grad_sq_norm(grads) == numba_cpu.grad_sq_norm(upcast)  # same order
    assert numba_cpu.grad_sq_norm(grads) == pytest.approx(numpy_ref.grad_sq_norm(grads), 1e-12)


@pytest.mark.parametrize("size", [3000, (1 << 19) + 5000])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: d.name)
def test_the_half_step_checks_its_gradients_before_writing(dtype, size):
    """A state of one half group checks its gradients in its step kernel (one batch: in the
    updating call; several: a check-only call first), with :func:`nonfinite_leaf`'s test:
    the same leaf named, nothing written, and a valid step equal to the reference's."""
    big = np.float32(np.finfo(np.float16).max)
    limit = np.float32(2.0**63)
    cases = [(0, size - 1, np.nan, "half", 0), (1, 3, -np.inf, "half", 1)]
    cases += [(1, 2, 2.0**64, "float32", 1), (0, 0, big, "half", -1)]
    cases += [(1, 6, np.nextafter(limit, 0), "float32", -1)]
    if dtype == BF16:
        cases += [(1, 4, -limit, "half", 1), (0, 7, limit - 2.0**55, "half", -1)]
    for leaf, at, value, kind, bad in cases:
        p0 = [np.linspace(-1, 1, size).astype(dtype), np.linspace(-1, 1, 7).astype(dtype)]
        grads = [np.full(size, 0.5, dtype), np.full(7, -0.25, dtype)]
        if kind == "float32":
            grads[leaf] = grads[leaf].astype(np.float32)
        grads[leaf][at] = value
        expected = numpy_ref.nonfinite_leaf(grads)
        assert numba_cpu.nonfinite_leaf(grads) == expected == bad
        results = []
        for backend in ("numpy", "numba"):
            p = [a.copy() for a in p0]
            state = adamnp.init(p, _config("stochastic"), backend=backend)
            if expected >= 0:
                with pytest.raises(ValueError, match=rf"grads\[{expected}\]"):
                    adamnp.step(p, grads, state)
                assert state.step == 0 and all(a.tobytes() == b.tobytes() for a, b in zip(p, p0))
                assert all(not b.any() for g in state.groups for b in g.buffers.values())
            else:
                adamnp.step(p, grads, state)
                results.append([a.tobytes() for a in p])
        assert results == [] or results[0] == results[1]


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: d.name)
def test_nan_and_inf_in_half_gradients_change_nothing(dtype, nonfinite):
    params = _params([dtype])
    for backend in ("numpy", "numba"):
        p = {k: a.copy() for k, a in params.items()}
        state = adamnp.init(p, _config("stochastic", nonfinite=nonfinite), backend=backend)
        for bad in (np.nan, -np.inf):
            grads = _grads(p, "half", np.random.default_rng(5))
            grads["l0"][70_000] = bad
            if nonfinite == "raise":
                with pytest.raises(ValueError, match="NaN, Inf"):
                    adamnp.step(p, grads, state)
            else:
                adamnp.step(p, grads, state)
        assert all(p[k].tobytes() == params[k].tobytes() for k in p)
        assert state.step == 0 and state.skipped_steps == (2 if nonfinite == "skip" else 0)
        assert all(not b.any() for g in state.groups for b in g.buffers.values())


def test_half_bnb_groups_run_the_gather_kernel(monkeypatch):
    """The AVX-512 VBMI kernel takes float32 params only: half groups use the gather one."""

    def refuse(*args):
        raise AssertionError("the VBMI kernel ran on half-precision params")

    monkeypatch.setattr(numba_cpu, "q8_kernel", lambda: "vbmi")
    monkeypatch.setattr(numba_cpu, "step_q8_simd", refuse)
    params = _params([BF16])
    cfg = _config("nearest")
    init = dict(EIGHT, state_format="bnb")
    _assert_same(_run("numba", params, cfg, "half", **init),
                 _run("numpy", params, cfg, "half", **init))  # fmt: skip


def test_traffic_kernel_half_touches_what_a_half_step_touches():
    p, g = np.ones(70_001, BF16), np.full(70_001, 2, np.uint16)
    m, v = np.zeros(70_001, np.float32), np.ones(70_001, np.float32)
    before = p.view(np.uint16).copy()
    numba_cpu.traffic_kernel_half(p, g, m, v)
    assert np.array_equal(p.view(np.uint16), before + 2)
    assert (m == 2).all() and (v == 3).all()


@numba.njit
def _convert_all(bits, x, up, down):
    for i in range(bits.size):
        up[i] = numba_half.f16_to_f32(bits[i])
    for i in range(x.size):
        down[i] = np.uint16(numba_half.f16_round(x[i], np.uint32(0), False))


def test_backend_float16_conversions_are_the_reference_bits():
    """The kernels' float16 conversions (the CPU's F16C instructions where Numba compiles
    for them, else the bit arithmetic) give the reference's bits: every float16 pattern
    upcast, NaN payloads and signalling NaNs included, and float32 patterns rounded across
    float16's range (dense around its subnormals, normals and overflow threshold, plus
    random bits); the CPU's upcast sets a signalling NaN's quiet bit. An exhaustive run
    over all 2**32 float32 patterns agreed too (2 minutes)."""
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    rng = np.random.default_rng(5)
    dense = [np.arange(b, b + 2**20, dtype=np.uint32) for b in (0x33000000, 0x387F0000, 0x477F0000)]
    patterns = np.concatenate(
        [*dense, rng.integers(0, 2**32, 2**20, dtype=np.uint32), every.astype(np.uint32) << 16]
    )
    x = np.concatenate([patterns, patterns | np.uint32(0x80000000)]).view(np.float32)
    up, down = np.empty(every.size, np.float32), np.empty(x.size, np.uint16)
    _convert_all(every, x, up, down)
    exact = half_fmt.f16_to_f32_array(every).view(np.uint32)
    nan = (every & 0x7FFF) > 0x7C00
    if numba_half.HARDWARE_F16:  # the CPU's conversion quiets signalling NaNs (and only them)
        exact = np.where(nan, exact | np.uint32(0x400000), exact)
    assert np.array_equal(up.view(np.uint32), exact)
    assert np.array_equal(down, half_fmt.f16_round_array(x))
