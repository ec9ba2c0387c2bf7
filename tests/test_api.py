"""init/step contract: validation before mutation, nonfinite policies, basic invariants."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import snapshot

import adamnp


def make_tree(rng, dtype=np.float32):
    return {
        "w": rng.standard_normal((5, 7)).astype(dtype),
        "layers": [rng.standard_normal(300).astype(dtype), rng.standard_normal(3).astype(dtype)],
    }


def like(tree, rng):
    return {
        "w": rng.standard_normal(tree["w"].shape).astype(tree["w"].dtype),
        "layers": [rng.standard_normal(a.shape).astype(a.dtype) for a in tree["layers"]],
    }


def warm(backend, **cfg):
    """params, grads and a state that has already taken two steps (non-zero moments)."""
    rng = np.random.default_rng(0)
    params = make_tree(rng)
    state = adamnp.init(params, adamnp.adamw(**cfg), backend=backend)
    for _ in range(2):
        adamnp.step(params, like(params, rng), state)
    return params, like(params, rng), state


def _readonly(p, g, s):
    p["w"].flags.writeable = False
    return p, g, s


def _alias(p, g, s):
    g["w"] = p["w"]
    return p, g, s


def _alias_view(p, g, s):
    g["layers"][0] = p["w"].reshape(-1)[: 300 - 265].copy()  # not aliased: a copy is fine
    g["layers"][0] = np.resize(g["layers"][0], 300).astype(np.float32)
    g["layers"][1] = p["layers"][0][10:13]  # aliases another param's memory
    return p, g, s


def _params_alias_each_other(p, g, s):
    p["layers"][1] = p["layers"][0][:3]
    return p, g, s


def _noncontig(p, g, s):
    g["w"] = np.asfortranarray(g["w"])
    return p, g, s


def _set(key, value):
    def change(p, g, s):
        g[key] = value(g[key])
        return p, g, s

    return change


BAD_INPUTS = {
    "missing leaf": (lambda p, g, s: (p, {"w": g["w"]}, s), ValueError, "tree structure"),
    "extra leaf": (
        lambda p, g, s: (p, {**g, "extra": np.zeros(1, np.float32)}, s),
        ValueError,
        "tree structure",
    ),
    "list vs tuple": (
        lambda p, g, s: (p, {"w": g["w"], "layers": tuple(g["layers"])}, s),
        ValueError,
        "tree structure",
    ),
    "shape": (_set("w", lambda a: a.reshape(7, 5)), ValueError, r"grads\['w'\] has shape"),
    "dtype": (_set("w", lambda a: a.astype(np.float64)), TypeError, r"grads\['w'\] has dtype"),
    "int grads": (
        _set("w", lambda a: a.astype(np.int32)),
        TypeError,
        "float32, float64, float16 and bfloat16",
    ),
    "complex grads": (_set("w", lambda a: a.astype(np.complex64)), TypeError, "float32"),
    "object grads": (_set("w", lambda a: a.astype(object)), TypeError, "float32"),
    "list leaf": (_set("w", lambda a: 3.0), TypeError, "not an array"),
    "read-only params": (_readonly, ValueError, "read-only"),
    "grads alias params": (_alias, ValueError, "shares memory"),
    "grad aliases another param": (_alias_view, ValueError, "shares memory"),
    "params alias each other": (_params_alias_each_other, ValueError, "shares memory"),
    "non-contiguous": (_noncontig, ValueError, "C-contiguous"),
    "nan grad": (
        _set("w", lambda a: np.where(a > 1, np.nan, a)),
        ValueError,
        "contains NaN, Inf or",
    ),
    "inf grad": (_set("w", lambda a: np.where(a > 1, np.inf, a)), ValueError, r"grads\['w'\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_changes_nothing(backend, case):
    params, grads, state = warm(backend)
    change, exc, words = BAD_INPUTS[case]
    params, grads, state = change(params, grads, state)
    before = snapshot(params, state)
    with pytest.raises(exc, match=words):
        adamnp.step(params, grads, state)
    assert snapshot(params, state) == before


@pytest.mark.parametrize("lr", [lambda c: float("nan"), lambda c: -1.0])
def test_bad_schedule_changes_nothing(backend, lr):
    params, grads, _ = warm(backend)
    state = adamnp.init(params, adamnp.adamw(lr=lr), backend=backend)
    before = snapshot(params, state)
    with pytest.raises(ValueError, match="lr schedule"):
        adamnp.step(params, grads, state)
    assert snapshot(params, state) == before


def test_state_from_another_tree(backend):
    params, grads, state = warm(backend)
    other = {"w": np.zeros((5, 7), np.float32), "layers": [np.zeros(300, np.float32)]}
    before = snapshot(params, state)
    with pytest.raises(ValueError, match="tree structure"):
        adamnp.step(other, {"w": grads["w"], "layers": [grads["layers"][0]]}, state)
    same_structure = {"w": np.zeros((7, 5), np.float32), "layers": params["layers"]}
    with pytest.raises(ValueError, match="has shape"):
        adamnp.step(same_structure, grads, state)
    assert snapshot(params, state) == before


def test_bad_init_arguments():
    p = np.zeros(10, np.float32)
    cfg = adamnp.adamw()
    with pytest.raises(TypeError, match="AdamConfig"):
        adamnp.init(p, {"lr": 1e-3})
    with pytest.raises(ValueError, match="state_bits"):
        adamnp.init(p, cfg, state_bits=16)
    with pytest.raises(ValueError, match="block_size"):
        adamnp.init(p, cfg, state_bits=8, block_size=100)
    with pytest.raises(ValueError, match="unknown backend"):
        adamnp.init(p, cfg, backend="tpu")
    with pytest.raises(TypeError, match="dtype int64"):
        adamnp.init(np.zeros(3, np.int64), cfg)
    with pytest.raises(ValueError, match="keep_fp32"):
        adamnp.init({"a": p}, cfg, state_bits=8, keep_fp32=["params['b']"])


def test_nonfinite_skip_counts_and_changes_nothing_else(backend):
    params, grads, state = warm(backend, nonfinite="skip")
    grads["layers"][1][0] = np.nan
    before = snapshot(params, state)
    adamnp.step(params, grads, state)
    after = snapshot(params, state)
    assert after[:3] == before[:3]
    assert state.skipped_steps == 1 and state.step == 2


def test_nonfinite_propagate_matches_torch_behaviour(backend):
    params, grads, state = warm(backend, nonfinite="propagate")
    grads["layers"][1][0] = np.nan
    adamnp.step(params, grads, state)
    assert state.step == 3
    assert np.isnan(params["layers"][1][0])
    assert np.isfinite(params["layers"][1][1:]).all() and np.isfinite(params["w"]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_lr_changes_only_moments(backend, dtype):
    rng = np.random.default_rng(3)
    params = make_tree(rng, dtype)
    frozen = [a.copy() for a in (params["w"], *params["layers"])]
    state = adamnp.init(params, adamnp.adamw(lr=0.0, weight_decay=0.1), backend=backend)
    adamnp.step(params, like(params, rng), state)
    for a, b in zip((params["w"], *params["layers"]), frozen):
        assert a.dtype == dtype and np.array_equal(a, b)
    assert state.step == 1
    assert all(np.any(s.m != 0) and s.m.dtype == dtype for s in state.slots)


def test_first_step_is_lr_times_sign(backend):
    # With bias correction the first Adam step is lr * g / (|g| + eps') = lr * sign(g).
    p = np.zeros(1000, np.float32)
    g = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    state = adamnp.init(p, adamnp.adam(lr=0.01, eps=0.0), backend=backend)
    adamnp.step(p, g, state)
    np.testing.assert_allclose(p, -0.01 * np.sign(g), rtol=2e-7)


def test_single_array_and_empty_leaves(backend):
    p = np.ones((0, 3), np.float32)
    state = adamnp.init(p, adamnp.adamw(), backend=backend)
    adamnp.step(p, np.ones((0, 3), np.float32), state)
    assert state.step == 1
    tree = {"a": np.ones(1, np.float32), "e": np.zeros(0, np.float64)}
    state = adamnp.init(tree, adamnp.adam(lr=0.5), backend=backend)
    adamnp.step(tree, {"a": np.ones(1, np.float32), "e": np.zeros(0, np.float64)}, state)
    np.testing.assert_allclose(tree["a"], [0.5], rtol=1e-6)


def test_max_grad_norm_scales_gradients(backend):
    rng = np.random.default_rng(5)
    g = rng.standard_normal(500).astype(np.float32) * 10
    p1, p2 = np.zeros(500, np.float32), np.zeros(500, np.float32)
    s1 = adamnp.init(p1, adamnp.adam(max_grad_norm=1.0), backend=backend)
    s2 = adamnp.init(p2, adamnp.adam(), backend=backend)
    adamnp.step(p1, g, s1)
    norm = np.sqrt(np.sum(g.astype(np.float64) ** 2))
    adamnp.step(p2, (g * np.float32(1.0 / (norm + 1e-6))).astype(np.float32), s2)
    np.testing.assert_allclose(s1.slots[0].m, s2.slots[0].m, rtol=1e-6, atol=0)


def test_layout_is_one_record_shared_by_state_and_groups():
    params = {
        "big": np.zeros(5000, np.float32),
        "f64": np.zeros(5000, np.float64),
        "emb": np.zeros((100, 50), np.float32),
        "small": np.zeros(10, np.float32),
    }
    state = adamnp.init(params, adamnp.adamw(), backend="numpy", state_bits=8, block_size=128,
                        min_8bit_size=np.int64(100), v_rounding="stochastic",
                        keep_fp32=lambda path, a: a.ndim == 2)  # fmt: skip
    layout = state.layout
    assert (layout.state_bits, layout.block_size, layout.min_8bit_size) == (8, 128, 100)
    assert type(layout.min_8bit_size) is int
    assert layout.v_rounding == "stochastic" and layout.keep_fp32 == ("params['emb']",)
    assert (state.state_bits, state.block_size, state.v_rounding) == (8, 128, "stochastic")
    assert all(g.layout is layout for g in state.groups)
    for g in state.groups:  # fp32 groups have no blocks and round nothing
        q8 = g.kind == "q8"
        assert g.block_size == (128 if q8 else 0)
        assert g.v_rounding == ("stochastic" if q8 else "nearest")
    with pytest.raises(AttributeError):
        layout.block_size = 64
    with pytest.raises(AttributeError):
        state.block_size = 64
    # paths are resolved the same way, in tree order and without repeats
    names = ["params['small']", "params['emb']", "params['emb']"]
    again = adamnp.init(params, adamnp.adamw(), backend="numpy", state_bits=8, keep_fp32=names)
    assert again.layout.keep_fp32 == ("params['emb']", "params['small']")


@pytest.mark.parametrize(
    ("options", "exc", "words"),
    [
        ({"state_bits": 4}, ValueError, "state_bits must be 32 or 8, got 4"),
        ({"block_size": 96}, ValueError, "block_size must be a power of two in 64..4096"),
        ({"block_size": 8192}, ValueError, "block_size"),
        ({"block_size": True}, TypeError, "block_size must be an int, got True"),
        ({"min_8bit_size": 1.5}, TypeError, "min_8bit_size must be an int"),
        ({"min_8bit_size": -1}, ValueError, "min_8bit_size must be >= 0"),
        ({"v_rounding": "up"}, ValueError, "v_rounding must be 'nearest' or 'stochastic'"),
        ({"keep_fp32": ["params['x']"]}, ValueError, r"keep_fp32 names \"params\['x'\]\""),
    ],
)
def test_bad_layout_options_are_named(options, exc, words):
    with pytest.raises(exc, match=words):
        adamnp.init({"w": np.zeros(3, np.float32)}, adamnp.adam(), backend="numpy", **options)


def test_leaf_errors_come_before_option_errors():
    with pytest.raises(TypeError, match=r"params\['w'\] has dtype int32"):
        adamnp.init({"w": np.zeros(3, np.int32)}, adamnp.adam(), state_bits=4)
