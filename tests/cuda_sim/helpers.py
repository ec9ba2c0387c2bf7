"""Shared helpers of the simulator tests: trees on the "device", runs against the reference."""

from __future__ import annotations

import numpy as np
from numba import cuda

import adamnp
from adamnp import backends
from adamnp._tree import flatten, unflatten


def to_device(tree):
    leaves, treedef, _ = flatten(tree)
    return unflatten(treedef, [cuda.to_device(a) for a in leaves])


def to_host(tree):
    leaves, treedef, _ = flatten(tree)
    return unflatten(treedef, [a.copy_to_host() for a in leaves])


def state_arrays(state) -> list:
    """Every moment array of every slot, on the host, in slot order."""
    be = backends.get(state.backend)
    return [be.to_host(arr) for slot in state.slots for arr in slot[:3] if arr is not None]


def snapshot(params, state) -> tuple:
    """Everything step() may change, as bytes."""
    leaves, _, _ = flatten(params)
    host = [a.copy_to_host() if hasattr(a, "copy_to_host") else a for a in leaves]
    return (
        [a.tobytes() for a in host],
        [a.tobytes() for a in state_arrays(state)],
        state.step,
        state.skipped_steps,
    )


def run_both(params, grads_seq, config, **init_kw):
    """Run the same steps with the NumPy reference (host) and the CUDA backend (device)."""
    leaves, treedef, _ = flatten(params)
    host_params = unflatten(treedef, [a.copy() for a in leaves])
    dev_params = to_device(params)
    s_ref = adamnp.init(host_params, config, backend="numpy", **init_kw)
    s_dev = adamnp.init(dev_params, config, backend="cuda", **init_kw)
    for grads in grads_seq:
        adamnp.step(host_params, grads, s_ref)
        adamnp.step(dev_params, to_device(grads), s_dev)
    return host_params, dev_params, s_ref, s_dev


def assert_same(host_params, dev_params, s_ref, s_dev) -> None:
    """Bitwise equality of params and moments (NaNs compare equal wherever they are)."""
    got = flatten(to_host(dev_params))[0] + state_arrays(s_dev)
    expected = flatten(host_params)[0] + state_arrays(s_ref)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b, strict=True)
        finite = np.isfinite(b)
        assert a[finite].tobytes() == b[finite].tobytes()  # also tells -0.0 from 0.0
    assert (s_dev.step, s_dev.skipped_steps) == (s_ref.step, s_ref.skipped_steps)


def grads_like(params, rng, steps: int, scale: float = 1.0) -> list:
    leaves, treedef, _ = flatten(params)
    return [
        unflatten(
            treedef, [np.asarray(rng.standard_normal(a.shape) * scale, a.dtype) for a in leaves]
        )
        for _ in range(steps)
    ]


# Gradient magnitudes per leaf dtype (as in tests/test_backends_agree.py): "sub_v" makes v
# subnormal, "sub_m" (log10 range) makes m subnormal (v then underflows to 0).
EDGE_MAGNITUDES = {
    np.dtype(np.float32): dict(sub_v=1e-20, sub_m=(-44.0, -38.0)),
    np.dtype(np.float64): dict(sub_v=1e-160, sub_m=(-322.0, -307.0)),
}


def edge_grads(params, rng, steps: int, run: int = 64) -> list:
    """Gradients whose runs of ``run`` elements (8-bit blocks) are, in turn, normal, make v
    subnormal, make m subnormal, or lie just below the gradient limit (``grad_limit``, its
    largest accepted value included); the same runs at every step."""
    from adamnp.backends.math import grad_limit

    leaves, treedef, _ = flatten(params)
    out = []
    for _ in range(steps):
        grads = []
        for index, a in enumerate(leaves):
            dtype, n = a.dtype, a.size
            mag, limit = EDGE_MAGNITUDES[dtype], grad_limit(dtype)
            sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
            kind = (index + np.arange(n) // run) % 4
            g = rng.standard_normal(n)
            g = np.where(kind == 1, g * mag["sub_v"], g)
            g = np.where(kind == 2, sign * 10.0 ** rng.uniform(*mag["sub_m"], n), g)
            g = np.where(kind == 3, sign * limit * rng.uniform(0.5, 0.999, n), g).astype(dtype)
            top = np.nextafter(dtype.type(limit), dtype.type(0))
            g[(kind == 3) & (rng.random(n) < 0.1)] = top
            grads.append(g.reshape(a.shape))
        out.append(unflatten(treedef, grads))
    return out
