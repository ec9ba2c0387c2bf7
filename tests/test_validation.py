"""Validation gaps: array subclasses, aliasing with the state, init-time overlap, tree
mismatches that name the key, layout option types, the step counters, deep trees, concurrent
steps on one state and the 8-bit-but-nothing-quantized warning.

Every error leaves params and state byte-identical (``snapshot``) and names the leaf, key or
option at fault.
"""

from __future__ import annotations

import copy
import pickle
import sys
import threading
import warnings

import numpy as np
import pytest
from conftest import snapshot

import adamnp
from adamnp._tree import MAX_DEPTH, flatten


def _tree(rng, n=300):
    return {
        "w": rng.standard_normal((5, 7)).astype(np.float32),
        "layers": [rng.standard_normal(n).astype(np.float32), np.ones(3, np.float32)],
    }


def _like(tree, rng):
    return {
        "w": rng.standard_normal((5, 7)).astype(np.float32),
        "layers": [rng.standard_normal(a.shape).astype(np.float32) for a in tree["layers"]],
    }


def _warm(backend, **cfg):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    state = adamnp.init(params, adamnp.adamw(**cfg), backend=backend)
    for _ in range(2):
        adamnp.step(params, _like(params, rng), state)
    return params, _like(params, rng), state


# -- ndarray subclasses: one policy on every backend


class UfuncHijacker(np.ndarray):
    """A subclass that takes over every ufunc applied to it (as unit-aware arrays do)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        raise RuntimeError("UfuncHijacker does not do arithmetic")


def _reference_run(backend, p0, grads, steps=3):
    p = p0.copy()
    state = adamnp.init(p, adamnp.adamw(lr=0.1), backend=backend)
    for _ in range(steps):
        adamnp.step(p, grads, state)
    return p, state


@pytest.mark.parametrize("kind", ["matrix", "ufunc override", "memmap"])
def test_ndarray_subclasses_are_updated_in_place_as_plain_arrays(backend, kind, tmp_path):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((4, 6)).astype(np.float32)
    g0 = rng.standard_normal((4, 6)).astype(np.float32)
    want_p, want_state = _reference_run(backend, p0, g0)
    if kind == "matrix":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)  # "use regular ndarray"
            p, g = np.asmatrix(p0.copy()), np.asmatrix(g0.copy())
    elif kind == "ufunc override":
        p, g = p0.copy().view(UfuncHijacker), g0.copy().view(UfuncHijacker)
    else:
        p = np.memmap(tmp_path / "p.bin", np.float32, "w+", shape=p0.shape)
        p[...] = p0
        g = g0.copy()
    tree, grads = {"a": np.ones(3, np.float32), "s": p}, {"a": np.ones(3, np.float32), "s": g}
    state = adamnp.init(tree, adamnp.adamw(lr=0.1), backend=backend)
    for _ in range(3):
        adamnp.step(tree, grads, state)
    assert type(tree["s"]) is type(p) and tree["s"] is p  # the same object, updated in place
    np.testing.assert_array_equal(np.asarray(p).view(np.ndarray), want_p)
    np.testing.assert_array_equal(state.slots[1].m, want_state.slots[0].m)
    if kind == "memmap":
        p.flush()
        on_disk = np.fromfile(tmp_path / "p.bin", np.float32).reshape(p0.shape)
        np.testing.assert_array_equal(on_disk, want_p)


@pytest.mark.parametrize("role", ["params", "grads"])
def test_masked_arrays_are_refused_naming_the_leaf(backend, role):
    params, grads, state = _warm(backend)
    # NaN under the mask: were the mask ignored, it would reach params despite nonfinite="raise"
    data = np.where(np.eye(5, 7, dtype=bool), np.nan, 0.5).astype(np.float32)
    masked = np.ma.masked_invalid(data)
    (params if role == "params" else grads)["w"] = masked
    before = snapshot(params, state)
    with pytest.raises(TypeError, match=rf"{role}\['w'\] is a masked array.*mask"):
        adamnp.step(params, grads, state)
    assert snapshot(params, state) == before


def test_masked_params_are_refused_at_init():
    with pytest.raises(TypeError, match=r"params\['m'\] is a masked array"):
        adamnp.init({"m": np.ma.zeros(4, np.float32)}, adamnp.adam(), backend="numpy")


# -- params or grads that alias the state's own buffers


@pytest.mark.parametrize(
    "case",
    ["params are v", "grads are m", "grads view into v", "many leaves: grads are m"],
)
def test_leaves_aliasing_the_state_are_refused(backend, case):
    n = 80 if case.startswith("many") else 2
    params = {f"k{i:02d}": np.full(10, 1.0, np.float32) for i in range(n)}
    grads = {k: np.full(10, 0.5, np.float32) for k in params}
    state = adamnp.init(params, adamnp.adamw(), backend=backend)
    adamnp.step(params, grads, state)
    if case == "params are v":
        params["k01"] = state.slots[1].v
        leaf = r"params\['k01'\]"
    elif case == "grads view into v":
        grads["k00"] = state.groups[0].buffers["v"][5:15]  # straddles two leaves' moments
        leaf = r"grads\['k00'\]"
    else:
        grads["k01"] = state.slots[1].m
        leaf = r"grads\['k01'\]"
    before = snapshot(params, state)
    with pytest.raises(ValueError, match=leaf + " shares memory with the optimizer state"):
        adamnp.step(params, grads, state)
    assert snapshot(params, state) == before


def test_single_array_aliasing_its_own_state(backend):
    p = np.ones(10, np.float32)
    state = adamnp.init(p, adamnp.adam(), backend=backend)
    adamnp.step(p, np.ones(10, np.float32), state)
    v = state.slots[0].v
    before = snapshot(v, state)
    with pytest.raises(ValueError, match=r"^params shares memory with the optimizer state"):
        adamnp.step(v, np.ones(10, np.float32), state)
    with pytest.raises(ValueError, match=r"^grads shares memory with the optimizer state"):
        adamnp.step(p, state.slots[0].m, state)
    assert snapshot(v, state) == before


# -- overlapping params are refused at init, with step's message


@pytest.mark.parametrize("n", [2, 80])
def test_overlapping_params_are_refused_at_init(backend, n):
    base = np.zeros(1000, np.float32)
    params = {f"k{i:02d}": np.zeros(5, np.float32) for i in range(n)}
    params["k00"], params["k01"] = base[:10], base[5:15]
    grads = {k: np.ones(a.shape, np.float32) for k, a in params.items()}
    params_ok = dict(params, k00=np.zeros(10, np.float32), k01=np.zeros(10, np.float32))
    good = adamnp.init(params_ok, adamnp.adam(), backend=backend)
    with pytest.raises(ValueError) as at_step:
        adamnp.step(params, grads, good)
    with pytest.raises(ValueError) as at_init:
        adamnp.init(params, adamnp.adam(), backend=backend)
    assert str(at_init.value) == str(at_step.value)
    assert "params['k01'] shares memory with params['k00']" in str(at_init.value)


# -- tree mismatches name the first differing key


GRAD_MISMATCHES = {
    "missing key": (
        lambda g: {"w": g["w"]},
        r"grads is missing key 'layers', which params has",
    ),
    "extra key": (
        lambda g: {**g, "extra": np.zeros(1, np.float32)},
        r"grads has an extra key 'extra', which params does not have",
    ),
    "shorter list": (
        lambda g: {"w": g["w"], "layers": g["layers"][:1]},
        r"grads\['layers'\] is a list of 1 item, params\['layers'\] a list of 2",
    ),
    "list vs tuple": (
        lambda g: {"w": g["w"], "layers": tuple(g["layers"])},
        r"grads\['layers'\] is a tuple, params\['layers'\] a list",
    ),
    "container for a leaf": (
        lambda g: {"w": [g["w"]], "layers": g["layers"]},
        r"grads\['w'\] is a list, params\['w'\] a leaf",
    ),
    "leaf for a container": (
        lambda g: {"w": g["w"], "layers": g["w"]},
        r"grads\['layers'\] is a leaf, params\['layers'\] a list",
    ),
    "nested key": (
        lambda g: {"w": g["w"], "layers": [g["layers"][0], {"b": g["layers"][1]}]},
        r"grads\['layers'\]\[1\] is a dict, params\['layers'\]\[1\] a leaf",
    ),
}


@pytest.mark.parametrize("case", sorted(GRAD_MISMATCHES))
def test_grad_tree_mismatch_names_the_key(backend, case):
    params, grads, state = _warm(backend)
    change, words = GRAD_MISMATCHES[case]
    before = snapshot(params, state)
    with pytest.raises(ValueError, match=words):
        adamnp.step(params, change(grads), state)
    assert snapshot(params, state) == before


def test_params_tree_mismatch_names_the_key(backend):
    params, grads, state = _warm(backend)
    before = snapshot(params, state)
    words = r"built for: params is missing key 'layers', which the state's params has"
    with pytest.raises(ValueError, match=words):
        adamnp.step({"w": params["w"]}, {"w": grads["w"]}, state)
    other = {**params, "bias": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match=r"params has an extra key 'bias', which the state's"):
        adamnp.step(other, {**grads, "bias": np.zeros(2, np.float32)}, state)
    assert snapshot(params, state) == before


# -- layout options: keep_fp32 as one string, integer state_bits / block_size


def test_keep_fp32_accepts_one_path_as_a_string():
    params = {"a": np.zeros(5000, np.float32), "b": np.zeros(5000, np.float32)}
    state = adamnp.init(params, adamnp.adamw(), backend="numpy", state_bits=8,
                        keep_fp32="params['a']")  # fmt: skip
    assert state.layout.keep_fp32 == ("params['a']",)
    assert [type(s).__name__ for s in state.slots] == ["Fp32Slot", "QuantSlot"]
    with pytest.raises(ValueError, match=r"keep_fp32 names \"params\['c'\]\""):
        adamnp.init(params, adamnp.adamw(), backend="numpy", state_bits=8,
                    keep_fp32="params['c']")  # fmt: skip
    with pytest.raises(TypeError, match="keep_fp32"):
        adamnp.init(params, adamnp.adamw(), backend="numpy", state_bits=8, keep_fp32=3)


@pytest.mark.parametrize(
    ("options", "exc", "words"),
    [
        ({"state_bits": 8.0}, TypeError, "state_bits must be an int, got 8.0"),
        ({"state_bits": 32.0}, TypeError, "state_bits must be an int"),
        ({"state_bits": True}, TypeError, "state_bits must be an int, got True"),
        ({"state_bits": "8"}, TypeError, "state_bits must be an int"),
        ({"block_size": 256.0}, TypeError, "block_size must be an int, got 256.0"),
        ({"block_size": True}, TypeError, "block_size must be an int"),
        ({"block_size": 100}, ValueError, "block_size must be a power of two"),
    ],
)
def test_layout_integers_must_be_ints(options, exc, words):
    with pytest.raises(exc, match=words):
        adamnp.init({"w": np.zeros(3, np.float32)}, adamnp.adam(), backend="numpy", **options)


def test_numpy_integer_layout_options_become_ints():
    state = adamnp.init(np.zeros(5000, np.float32), adamnp.adam(), backend="numpy",
                        state_bits=np.int64(8), block_size=np.int32(128))  # fmt: skip
    assert type(state.layout.state_bits) is int and state.layout.state_bits == 8
    assert type(state.layout.block_size) is int and state.layout.block_size == 128


# -- the step counters are validated on assignment


@pytest.mark.parametrize("name", ["step", "skipped_steps"])
@pytest.mark.parametrize(
    ("value", "exc"),
    [
        (6.5, TypeError),
        (7.0, TypeError),
        (np.ones(3), TypeError),
        (np.int64(5) * np.ones(()), TypeError),  # a 0-d array is not an int
        (True, TypeError),
        (np.bool_(True), TypeError),
        ("3", TypeError),
        (None, TypeError),
        (-1, ValueError),
        (2**63, ValueError),
    ],
)
def test_step_counters_refuse_non_counts(name, value, exc):
    state = adamnp.init(np.zeros(3, np.float32), adamnp.adam(), backend="numpy")
    with pytest.raises(exc, match=f"state.{name} must be"):
        setattr(state, name, value)
    assert getattr(state, name) == 0


@pytest.mark.parametrize("name", ["step", "skipped_steps"])
def test_step_counters_accept_ints(name):
    state = adamnp.init(np.zeros(3, np.float32), adamnp.adam(), backend="numpy")
    setattr(state, name, np.int64(5))
    assert type(getattr(state, name)) is int and getattr(state, name) == 5
    setattr(state, name, getattr(state, name) + 1)
    assert getattr(state, name) == 6
    setattr(state, name, 2**63 - 1)
    assert getattr(state, name) == 2**63 - 1


def test_step_counters_are_checked_at_construction():
    good = adamnp.init(np.zeros(3, np.float32), adamnp.adam(), backend="numpy")
    fields = {f: getattr(good, f) for f in good.__dataclass_fields__ if not f.startswith("_")}
    with pytest.raises(TypeError, match=r"state\.step must be"):
        adamnp.AdamState(**{**fields, "step": 1.5})
    assert adamnp.AdamState(**{**fields, "step": np.int32(4)}).step == 4


# -- deep trees


def _nested(depth, leaf):
    tree = leaf
    for _ in range(depth):
        tree = [tree]
    return tree


def test_flatten_refuses_trees_that_are_too_deep():
    leaf = np.zeros(1, np.float32)
    assert flatten(_nested(MAX_DEPTH, leaf))[2] == ["params" + "[0]" * MAX_DEPTH]
    with pytest.raises(ValueError, match=rf"grads is nested more than {MAX_DEPTH} levels deep"):
        flatten(_nested(900, leaf), "grads")
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="nested more than"):
        flatten({"a": loop})


def test_deep_params_and_grads_give_a_clear_error(backend):
    leaf = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="params is nested more than"):
        adamnp.init(_nested(900, leaf), adamnp.adam(), backend=backend)
    p = [np.zeros(2, np.float32)]
    state = adamnp.init(p, adamnp.adam(), backend=backend)
    before = snapshot(p, state)
    with pytest.raises(ValueError, match="grads is nested more than"):
        adamnp.step(p, [_nested(900, leaf)], state)
    assert snapshot(p, state) == before


# -- concurrent steps on one state are serialised


def _serial(backend, p0, g, n_steps):
    p = p0.copy()
    state = adamnp.init(p, adamnp.adamw(lr=1e-2), backend=backend)
    for _ in range(n_steps):
        adamnp.step(p, g, state)
    return p, state


def test_concurrent_steps_on_one_state_are_serialised(backend):
    # Identical gradients every step: the result of n serialised steps does not depend on
    # which thread takes which step, so it must equal n steps taken by one thread.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        rng = np.random.default_rng(7)
        n_threads, k_steps = 6, 8
        p0 = rng.standard_normal(100_000).astype(np.float32)
        g = rng.standard_normal(100_000).astype(np.float32)
        p = p0.copy()
        state = adamnp.init(p, adamnp.adamw(lr=1e-2), backend=backend)
        start = threading.Barrier(n_threads)
        errors = []

        def worker():
            try:
                start.wait()
                for _ in range(k_steps):
                    adamnp.step(p, g, state)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors
    want_p, want_state = _serial(backend, p0, g, n_threads * k_steps)
    assert state.step == n_threads * k_steps
    np.testing.assert_array_equal(p, want_p)
    np.testing.assert_array_equal(state.slots[0].m, want_state.slots[0].m)
    np.testing.assert_array_equal(state.slots[0].v, want_state.slots[0].v)


def test_each_state_has_its_own_lock_and_copies_still_work():
    p = np.ones(4, np.float32)
    a = adamnp.init(p, adamnp.adam(), backend="numpy")
    b = adamnp.init(p.copy(), adamnp.adam(), backend="numpy")
    assert a._lock is not b._lock
    adamnp.step(p, np.ones(4, np.float32), a)
    for c in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert c._lock is not a._lock and not c._lock.locked()
        assert c.step == 1
        q = p.copy()
        adamnp.step(q, np.ones(4, np.float32), c)
        assert c.step == 2 and a.step == 1


# -- state_bits=8 that quantizes nothing says so


def test_eight_bit_state_with_nothing_quantized_warns():
    small = {"a": np.zeros(100, np.float32), "b": np.zeros(10, np.float32)}
    with pytest.warns(UserWarning, match=r"state_bits=8.*min_8bit_size=4096.*keep_fp32"):
        adamnp.init(small, adamnp.adam(), backend="numpy", state_bits=8)
    with pytest.warns(UserWarning, match="no leaf got 8-bit moments"):
        adamnp.init(small, adamnp.adam(), backend="numpy", state_bits=8, min_8bit_size=1,
                    keep_fp32=lambda path, a: True)  # fmt: skip
    with pytest.warns(UserWarning, match="float32"):  # float64 leaves never get 8-bit moments
        adamnp.init(np.zeros(5000), adamnp.adam(), backend="numpy", state_bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adamnp.init(small, adamnp.adam(), backend="numpy", state_bits=8, min_8bit_size=50)
        adamnp.init(small, adamnp.adam(), backend="numpy", state_bits=32)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_numpy_scalar_params_are_refused_scalar_grads_are_read(backend):
    # np.float32(x) exports the array interface, but np.asarray of it is a new array: a step
    # "in place" would have changed a temporary copy and left the param as it was, silently
    with pytest.raises(TypeError, match=r"params\['f'\] is a NumPy scalar \(float32\)"):
        adamnp.init({"f": np.float32(0.3)}, adamnp.adam(), backend=backend)
    p = {"f": np.array(0.5, np.float32)}
    state = adamnp.init(p, adamnp.adam(lr=0.1), backend=backend)
    adamnp.step(p, {"f": np.float32(1.0)}, state)  # a scalar gradient is only read
    assert p["f"] == np.float32(0.4)
    with pytest.raises(TypeError, match="NumPy scalar"):
        adamnp.step({"f": np.float32(0.4)}, {"f": np.float32(1.0)}, state)
    assert state.step == 1
