"""The CUDA backend gives exactly the NumPy reference's numbers (in the simulator)."""

from __future__ import annotations

import numpy as np
import pytest

import adamnp

from .helpers import assert_same, edge_grads, grads_like, run_both, to_device, to_host

SIZES = [0, 1, 255, 256, 257, 2000]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
def test_sizes_match_reference_bitwise(n, dtype):
    rng = np.random.default_rng(n)
    params = rng.standard_normal(n).astype(dtype)
    out = run_both(params, grads_like(params, rng, 2), adamnp.adamw(lr=1e-2, weight_decay=0.1))
    assert_same(*out)


def tree(rng):
    return {
        "w": rng.standard_normal((17, 19)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
        "d": rng.standard_normal(300).astype(np.float64),
        "layers": [np.zeros(0, np.float32), rng.standard_normal((3, 2)).astype(np.float64)],
        "s": np.float32([0.25]),
        "scalar": np.array(-1.5, np.float64),  # 0-d
    }


CONFIGS = {
    "adam": adamnp.adam(lr=1e-2),
    "adam-l2": adamnp.adam(lr=1e-2, weight_decay=0.05),
    "adamw": adamnp.adamw(lr=1e-2, weight_decay=0.1),
    "amsgrad": adamnp.adamw(lr=1e-2, amsgrad=True),
    "maximize": adamnp.adam(lr=1e-2, maximize=True, amsgrad=True),
    "small-beta1": adamnp.adamw(lr=1e-2, betas=(0.3, 0.9)),  # torch's lerp with weight >= 0.5
    "schedule": adamnp.adamw(lr=lambda t: 1e-2 / (1 + t), eps=1e-6),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tree_configs_match_reference_bitwise(name):
    rng = np.random.default_rng(1)
    params = tree(rng)
    out = run_both(params, grads_like(params, rng, 3), CONFIGS[name])
    assert_same(*out)


def test_many_leaves_one_launch_each_group():
    # 40 leaves of assorted sizes (some empty, some spanning several chunks), two dtypes.
    rng = np.random.default_rng(2)
    sizes = [int(x) for x in rng.integers(0, 300, 40)]
    params = [
        rng.standard_normal(n).astype(np.float32 if i % 3 else np.float64)
        for i, n in enumerate(sizes)
    ]
    out = run_both(params, grads_like(params, rng, 2), adamnp.adamw(lr=1e-2, amsgrad=True))
    assert_same(*out)


def test_reused_and_new_gradient_buffers():
    # The address table is uploaded only when it changes: same buffers with new contents,
    # new buffers, and the first buffers again must all update correctly.
    rng = np.random.default_rng(3)
    params = tree(rng)
    host, dev = to_host(to_device(params)), to_device(params)
    s_ref = adamnp.init(host, adamnp.adam(lr=1e-2), backend="numpy")
    s_dev = adamnp.init(dev, adamnp.adam(lr=1e-2), backend="cuda")
    first, second = (to_device(g) for g in grads_like(params, rng, 2))
    for g in (first, first, second, first):
        adamnp.step(host, to_host(g), s_ref)
        adamnp.step(dev, g, s_dev)
        g["w"].copy_to_device(rng.standard_normal((17, 19)).astype(np.float32))
    assert_same(host, dev, s_ref, s_dev)


def test_nonfinite_propagate_matches_reference():
    rng = np.random.default_rng(4)
    params = tree(rng)
    grads = grads_like(params, rng, 3)
    grads[1]["b"][2] = np.nan  # (Inf would make NumPy warn "invalid value", an error here)
    grads[1]["d"][7] = np.nan
    out = run_both(params, grads, adamnp.adamw(lr=1e-2, nonfinite="propagate", amsgrad=True))
    assert_same(*out)
    assert np.isnan(to_host(out[1])["b"][2])


def test_nonfinite_skip_matches_reference():
    rng = np.random.default_rng(5)
    params = tree(rng)
    grads = grads_like(params, rng, 3)
    grads[1]["layers"][1][0, 1] = -np.inf
    out = run_both(params, grads, adamnp.adamw(lr=1e-2, nonfinite="skip"))
    assert_same(*out)
    assert out[3].skipped_steps == 1 and out[3].step == 2


def test_max_grad_norm_matches_reference_closely():
    # The norm is summed in another order than NumPy's, so the clipping factor may differ
    # in its last bit; everything else is the same arithmetic.
    rng = np.random.default_rng(6)
    params = tree(rng)
    cfg = adamnp.adamw(lr=1e-2, max_grad_norm=0.5)
    host, dev, _, _ = run_both(params, grads_like(params, rng, 3, scale=10.0), cfg)
    for a, b in zip(adamnp._tree.flatten(to_host(dev))[0], adamnp._tree.flatten(host)[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["adam", "amsgrad", "maximize"])
def test_subnormal_and_near_limit_gradients_match_reference(name):
    # Runs of gradients that make v or m subnormal, or lie just below the gradient limit
    # (2**63 for float32, 2**480 for float64): float32 and float64 leaves.
    rng = np.random.default_rng(17)
    params = {"f": rng.standard_normal(300).astype(np.float32),
              "d": rng.standard_normal(300).astype(np.float64)}  # fmt: skip
    out = run_both(params, edge_grads(params, rng, 3), CONFIGS[name])
    assert_same(*out)
    for slot in out[3].slots:  # the runs are there: subnormal and large v, all finite
        v = adamnp.backends.get("cuda").to_host(slot.v)
        info = np.finfo(v.dtype)
        assert ((v > 0) & (v < info.tiny)).any() and np.isfinite(v).all()
        assert v.max() > info.max**0.5
