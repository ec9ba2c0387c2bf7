"""Shared helpers of the asv suite: data, warm states, interleaved median timing."""

from __future__ import annotations

import time

import numpy as np

import adamnp
from adamnp import backends

BACKENDS = [name for name in ("numpy", "numba") if backends.available(name)]


def leaves(count: int, size: int, seed: int = 0) -> dict:
    """``count`` float32 leaves of ``size`` standard-normal elements."""
    rng = np.random.default_rng(seed)
    return {f"l{i:05d}": rng.standard_normal(size, dtype=np.float32) for i in range(count)}


def warm_state(backend: str, count: int, size: int, *, state_bits=32, block_size=256,
               state_format="sqrt", v_rounding=None, **config):  # fmt: skip
    """``(params, grads, state)`` after one step: kernels compiled, state pages touched.

    ``state_bits=8`` gives every leaf 8-bit moments of ``state_format`` in blocks of
    ``block_size`` (``v_rounding`` for the bnb format); ``config`` goes to
    :func:`adamnp.adamw`.
    """
    params, grads = leaves(count, size, 0), leaves(count, size, 1)
    bits = {}
    if state_bits == 8:
        bits = dict(state_bits=8, block_size=block_size, min_8bit_size=1,
                    state_format=state_format, v_rounding=v_rounding)  # fmt: skip
    state = adamnp.init(params, adamnp.adamw(**config), backend=backend, **bits)
    adamnp.step(params, grads, state)
    return params, grads, state


def interleaved_medians(*fns, budget_s: float = 2.0, min_repeats: int = 5) -> list[float]:
    """Median wall time of each function, timed in alternation so that drift hits all alike."""
    start = time.perf_counter()
    for f in fns:
        f()
    per_round = time.perf_counter() - start
    rounds = max(min_repeats, min(101, int(budget_s / max(per_round, 1e-9))))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]
