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
