"""Shared fixtures: the host backends available here, and byte snapshots of params + state."""

from __future__ import annotations

import os

# The suite tests the kernels from the first step on: no NumPy steps while they compile
# (adamnp._background; tests/test_background_compile.py turns it back on).
os.environ["ADAMNP_BACKGROUND_COMPILE"] = "0"

import numpy as np
import pytest

from adamnp import backends

HOST_BACKENDS = [name for name in ("numpy", "numba") if backends.available(name)]


@pytest.fixture(params=HOST_BACKENDS)
def backend(request):
    return request.param


def snapshot(params, state) -> tuple:
    """Everything step() may change, as bytes, for exact before/after comparisons."""
    from adamnp._tree import flatten

    leaves, _, _ = flatten(params)
    buffers = [
        (g.kind, name, np.asarray(backends.get(state.backend).to_host(b)).tobytes())
        for g in state.groups
        for name, b in sorted(g.buffers.items())
    ]
    return (
        [np.asarray(a).tobytes() for a in leaves],
        buffers,
        state.step,
        state.skipped_steps,
    )
