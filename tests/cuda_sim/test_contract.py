"""The CUDA backend's contract in the simulator: validation, reductions, checkpoints, helpers."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import adamnp
from adamnp import backends
from adamnp.backends import cuda as be
from adamnp.backends import numpy as ref
from adamnp.backends.math import grad_limit

from .helpers import assert_same, grads_like, snapshot, to_device, to_host


def warm(**cfg):
    """Device params, device grads and a cuda state that has taken two steps."""
    rng = np.random.default_rng(0)
    params = to_device({"w": rng.standard_normal((5, 7)).astype(np.float32),
                        "layers": [rng.standard_normal(300).astype(np.float32),
                                   rng.standard_normal(3).astype(np.float64)]})  # fmt: skip
    state = adamnp.init(params, adamnp.adamw(**cfg), backend="cuda")
    for g in grads_like(to_host(params), rng, 2):
        adamnp.step(params, to_device(g), state)
    return params, to_device(grads_like(to_host(params), rng, 1)[0]), state


def test_simulator_and_availability():
    assert be.availability() is None
    assert backends.available("cuda")


def test_auto_picks_cuda_for_device_arrays():
    params = to_device({"a": np.ones(3, np.float32)})
    assert adamnp.init(params, adamnp.adam()).backend == "cuda"


def _host_grad(p, g, s):
    g["w"] = g["w"].copy_to_host()
    return p, g, s


def _host_param(p, g, s):
    p["layers"][0] = p["layers"][0].copy_to_host()
    return p, g, s


def _alias(p, g, s):
    g["w"] = p["w"]
    return p, g, s


def _alias_view(p, g, s):
    g["w"] = p["layers"][0][:35].reshape(5, 7)  # a view of another param's memory
    return p, g, s


def _strided(p, g, s):
    g["layers"][0] = cuda.to_device(np.zeros(600, np.float32))[::2]
    return p, g, s


def _fortran(p, g, s):
    g["w"] = cuda.to_device(np.asfortranarray(np.zeros((5, 7), np.float32)))
    return p, g, s


def _set(key, value):
    def change(p, g, s):
        g[key] = value(g[key])
        return p, g, s

    return change


def _nan(p, g, s):
    host = g["layers"][1].copy_to_host()
    host[2] = np.nan
    g["layers"][1] = cuda.to_device(host)
    return p, g, s


def _huge(p, g, s):
    host = g["layers"][0].copy_to_host()
    host[250] = -1e21
    g["layers"][0] = cuda.to_device(host)
    return p, g, s


BAD_INPUTS = {
    "host grad, device params": (
        _host_grad,
        TypeError,
        "is a host NumPy array, but this state uses the 'cuda' backend",
    ),
    "host param": (_host_param, TypeError, r"params\['layers'\]\[0\] is a host NumPy array"),
    "grads alias params": (_alias, ValueError, "shares memory"),
    "grad is a view of another param": (_alias_view, ValueError, "shares memory"),
    "strided grad": (_strided, ValueError, "C-contiguous"),
    "fortran grad": (_fortran, ValueError, "C-contiguous"),
    "shape": (_set("w", lambda a: a.reshape(7, 5)), ValueError, r"grads\['w'\] has shape"),
    "dtype": (_set("w", lambda a: cuda.to_device(np.zeros((5, 7)))), TypeError, "has dtype"),
    "int grads": (
        _set("w", lambda a: cuda.to_device(np.zeros((5, 7), np.int32))),
        TypeError,
        "float32, float64, float16 and bfloat16",
    ),
    "nan grad": (_nan, ValueError, r"grads\['layers'\]\[1\] .*nonfinite='raise'"),
    # finite, but its square overflows v: rejected like NaN (backends.math.grad_limit)
    "huge grad": (_huge, ValueError, r"grads\['layers'\]\[0\] .*nonfinite='raise'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_changes_nothing(case):
    params, grads, state = warm()
    change, exc, words = BAD_INPUTS[case]
    params, grads, state = change(params, grads, state)
    before = snapshot(params, state)
    with pytest.raises(exc, match=words):
        adamnp.step(params, grads, state)
    assert snapshot(params, state) == before


def test_device_arrays_given_to_a_host_state():
    params = {"w": np.zeros(4, np.float32)}
    state = adamnp.init(params, adamnp.adam(), backend="numpy")
    with pytest.raises(TypeError, match="is a CUDA device array, but this state uses the 'numpy'"):
        adamnp.step(params, {"w": cuda.to_device(np.ones(4, np.float32))}, state)
    with pytest.raises(TypeError, match="is a CUDA device array, but this state uses the 'numpy'"):
        adamnp.init(to_device(params), adamnp.adam(), backend="numpy")


def test_mixed_tree_at_init():
    mixed = {"a": cuda.to_device(np.ones(2, np.float32)), "b": np.ones(2, np.float32)}
    with pytest.raises(TypeError, match=r"params\['b'\] is a host NumPy array, but this state "
                       "uses the 'cuda' backend"):  # fmt: skip
        adamnp.init(mixed, adamnp.adam())


def test_nonfinite_leaf_finds_the_first_leaf_across_dtypes():
    rng = np.random.default_rng(7)
    grads = [rng.standard_normal(n).astype(d) for n, d in
             [(5, np.float64), (300, np.float32), (0, np.float32), (700, np.float64),
              (40, np.float32)]]  # fmt: skip
    assert be.nonfinite_leaf([cuda.to_device(g) for g in grads]) == -1
    # the largest accepted magnitudes (just below grad_limit) pass
    for g in grads:
        if g.size:
            g[0] = np.nextafter(g.dtype.type(grad_limit(g.dtype)), g.dtype.type(0))
    assert be.nonfinite_leaf([cuda.to_device(g) for g in grads]) == ref.nonfinite_leaf(grads) == -1
    for bad, where, value in ((4, 3, grad_limit(np.float32)), (3, 650, -grad_limit(np.float64)),
                              (1, 299, np.nan), (0, 4, np.inf)):  # fmt: skip
        grads[bad][where] = value
        got = be.nonfinite_leaf([cuda.to_device(g) for g in grads])
        assert got == ref.nonfinite_leaf(grads) == bad
    assert be.nonfinite_leaf([]) == -1


def test_grad_sq_norm_is_deterministic_and_accurate():
    rng = np.random.default_rng(8)
    host = [rng.standard_normal(n).astype(d) * 3 for n, d in
            [(1000, np.float32), (0, np.float64), (257, np.float64), (1, np.float32)]]  # fmt: skip
    dev = [cuda.to_device(g) for g in host]
    got = be.grad_sq_norm(dev)
    exact = sum(float(np.sum(g.astype(np.float64) ** 2)) for g in host)
    assert got == be.grad_sq_norm(dev)
    assert got == pytest.approx(exact, rel=1e-13)
    assert got == pytest.approx(ref.grad_sq_norm(host), rel=1e-13)
    assert be.grad_sq_norm([]) == 0.0


@pytest.mark.parametrize("target", ["cuda", "numpy"])
def test_checkpoint_round_trip(tmp_path, target):
    # cuda state -> file -> `target` backend; continuing gives the uninterrupted numbers.
    rng = np.random.default_rng(9)
    start = {"w": rng.standard_normal((9, 31)).astype(np.float32),
             "b": rng.standard_normal(7).astype(np.float64)}  # fmt: skip
    grads = grads_like(start, rng, 4)
    cfg = adamnp.adamw(lr=1e-2, amsgrad=True)
    full = to_device(start)
    s_full = adamnp.init(full, cfg, backend="cuda")
    for g in grads:
        adamnp.step(full, to_device(g), s_full)
    part = to_device(start)
    s_part = adamnp.init(part, cfg, backend="cuda")
    for g in grads[:2]:
        adamnp.step(part, to_device(g), s_part)
    path = tmp_path / "state.npz"
    adamnp.save_state(path, s_part)
    loaded = adamnp.load_state(path, backend=target)
    assert loaded.backend == target and loaded.step == 2
    resumed = part if target == "cuda" else to_host(part)
    for g in grads[2:]:
        adamnp.step(resumed, to_device(g) if target == "cuda" else g, loaded)
    assert_same(resumed if target == "numpy" else to_host(resumed), full, loaded, s_full)


def test_host_checkpoint_loads_onto_the_device(tmp_path):
    rng = np.random.default_rng(10)
    p = rng.standard_normal(300).astype(np.float32)
    s = adamnp.init(p, adamnp.adam(lr=1e-2), backend="numpy")
    adamnp.step(p, rng.standard_normal(300).astype(np.float32), s)
    adamnp.save_state(tmp_path / "s.npz", s)
    loaded = adamnp.load_state(tmp_path / "s.npz", backend="cuda")
    assert be.owns(loaded.slots[0].m)
    np.testing.assert_array_equal(be.to_host(loaded.slots[0].v), s.slots[0].v)


def test_state_lives_on_the_device():
    _, _, state = warm(amsgrad=True)
    assert all(be.owns(b) for g in state.groups for b in g.buffers.values())
    assert state.nbytes() == 4 * 3 * (35 + 300) + 8 * 3 * 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
@pytest.mark.parametrize("n", [0, 1, 300])
def test_allocation_and_copies(n, dtype):
    z, f = be.zeros(n, dtype), be.full(n, 2.5, dtype)
    assert be.owns(z) and be.to_host(z).dtype == dtype
    np.testing.assert_array_equal(be.to_host(z), np.zeros(n, dtype))
    np.testing.assert_array_equal(be.to_host(f), np.full(n, 2.5, dtype))
    src = np.arange(n, dtype=dtype)
    np.testing.assert_array_equal(be.to_host(be.from_host(src)), src)
    be.copy_from_host(z, src)
    np.testing.assert_array_equal(be.to_host(z), src)


def test_traffic_kernel_touches_the_step_bytes():
    n = 700
    host = [np.full(n, x, np.float32) for x in (1.0, 2.0, 3.0, 4.0)]
    p, g, m, v = (cuda.to_device(a) for a in host)
    be.traffic_kernel(p, g, m, v)
    be.synchronize()
    np.testing.assert_array_equal(p.copy_to_host(), host[0] + host[1])
    np.testing.assert_array_equal(m.copy_to_host(), host[2] + host[1])
    np.testing.assert_array_equal(v.copy_to_host(), host[3] + host[1])
    np.testing.assert_array_equal(g.copy_to_host(), host[1])


def test_interface_helpers_on_device_arrays():
    a = cuda.to_device(np.zeros((4, 6), np.float32))
    lo, hi = be.address_range(a)
    assert hi - lo == 96
    assert be.is_contiguous(a) and be.is_writeable(a)
    assert not be.is_contiguous(a[:, ::2])
    assert be.address_range(a[1:2]) == (lo + 24, lo + 48)


def test_gpu_check_script_runs(capsys):
    # The GPU check cannot run without a GPU; exercise its code paths at simulator sizes.
    from adamnp.cli import gpu_check as check

    assert check.main([]) == 2  # refuses the simulator
    assert check.reductions(cuda, sizes=(300, 3, 700))
    assert check.agreement(cuda, [300, 5], np.float32, "adam-l2-amsgrad", steps=2)
    assert check.agreement(cuda, [257], np.float64, "maximize-clip", steps=2)
    check.bandwidth(cuda, n=600, repeat=1, many=3)
    assert check.agreement_q8(cuda, [300, 5], "adam-l2-amsgrad", 64, steps=2)
    assert check.agreement_q8(cuda, [257], "maximize-clip", 256, steps=2)
    check.bandwidth_q8(cuda, n=600, repeat=1, many=3, block_sizes=(64,))
    out = capsys.readouterr().out
    # float32: 1 and 3 leaves, kernel and step; 8-bit: the same for each of the two formats
    assert "FAIL" not in out and out.count("of traffic") == 4 + 2 * 4
    assert out.count("8-bit sqrt/64") == out.count("8-bit bnb /64") == 4
    assert out.count("0 of 915 codes differ") == 1  # m, v, vmax
