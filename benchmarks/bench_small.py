"""Small problems: the step's fixed cost against the simplest alternatives, as same-run ratios.

Goals (issue 17): one 1,000-element float32 leaf steps in at most the time of a naive NumPy
Adam (six array expressions) and half the time of torch's fused AdamW on one tensor; 100
leaves of 1,000 elements in half the time of torch's fused AdamW on 100 tensors; an
iteration of ``minimize(..., method=adam_method)`` costs at most 1.5x a hand-written loop
calling ``adamnp.step``. Each ratio is a median of interleaved repeats; the adamnp step
runs right after the NumPy or torch step it is compared with in every round, so it pays
whatever cache state that leaves behind, as it would in a training loop.
"""

from __future__ import annotations

import numpy as np

import adamnp

from ._common import BACKENDS, interleaved_medians


def _naive_adam(n: int, seed: int = 0):
    """A hand-written NumPy AdamW step on ``n`` float32 elements: the six expressions."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.01
    t = [0]

    def step():
        t[0] += 1
        np.multiply(p, np.float32(1 - lr * wd), out=p)
        m[:] = b1 * m + (1 - b1) * g
        v[:] = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t[0]), v / (1 - b2 ** t[0])
        np.subtract(p, lr * m_hat / (np.sqrt(v_hat) + eps), out=p)

    return step


def _torch_fused(count: int, n: int):
    """torch.optim.AdamW(fused=True) stepping ``count`` tensors of ``n`` elements (its own
    default threads), or NotImplementedError without torch."""
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    tensors = [torch.nn.Parameter(torch.randn(n)) for _ in range(count)]
    for t in tensors:
        t.grad = torch.randn(n)
    return torch.optim.AdamW(tensors, fused=True).step


def _adamnp(count: int, n: int, backend: str):
    rng = np.random.default_rng(1)
    if count == 1:
        p, g = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    else:
        p = [rng.standard_normal(n, dtype=np.float32) for _ in range(count)]
        g = [rng.standard_normal(n, dtype=np.float32) for _ in range(count)]
    state = adamnp.init(p, adamnp.adamw(), backend=backend)
    adamnp.step(p, g, state)
    return lambda: adamnp.step(p, g, state)


class SmallStep:
    """One float32 leaf: adamnp's step over a naive NumPy Adam (goal <= 1.0 at 1,000) and
    over torch's fused AdamW on one tensor (goal <= 0.5)."""

    params = (["numba", "numpy"], [10, 1000])
    param_names = ["backend", "n"]
    timeout = 300

    def setup(self, backend, n):
        if backend not in BACKENDS:
            raise NotImplementedError(f"backend {backend!r} is not available")
        self.step = _adamnp(1, n, backend)
        self.naive = _naive_adam(n)
        self.naive()

    def track_over_naive_numpy(self, backend, n):
        naive, step = interleaved_medians(self.naive, self.step, budget_s=2.0)
        return step / naive

    track_over_naive_numpy.unit = "ratio"

    def track_over_torch_fused(self, backend, n):
        torch_step = _torch_fused(1, n)
        torch_step()
        torch_time, step = interleaved_medians(torch_step, self.step, budget_s=2.0)
        return step / torch_time

    track_over_torch_fused.unit = "ratio"


class ManySmallLeaves:
    """100 float32 leaves of 1,000 elements over torch's fused AdamW on 100 such tensors
    (goal <= 0.5)."""

    params = ["numba"]
    param_names = ["backend"]
    timeout = 300

    def setup(self, backend):
        if backend not in BACKENDS:
            raise NotImplementedError(f"backend {backend!r} is not available")
        self.torch_step = _torch_fused(100, 1000)
        self.torch_step()
        self.step = _adamnp(100, 1000, backend)

    def track_over_torch_fused(self, backend):
        torch_time, step = interleaved_medians(self.torch_step, self.step, budget_s=3.0)
        return step / torch_time

    track_over_torch_fused.unit = "ratio"


class ScipyMethod:
    """An iteration of ``scipy.optimize.minimize(fun, x0, jac=True, method=adam_method)``
    over one of a hand-written loop ``f, g = fun(x); adamnp.step(x, g, state)`` on the same
    backend (goal <= 1.5): 1,000 float64 elements, a quadratic, 300 iterations each."""

    params = ["numba", "numpy"]
    param_names = ["backend"]
    timeout = 300
    iterations = 300

    def setup(self, backend):
        if backend not in BACKENDS:
            raise NotImplementedError(f"backend {backend!r} is not available")
        import scipy.optimize

        from adamnp.scipy import adam_method

        x0 = np.random.default_rng(0).standard_normal(1000)

        def fun(x):
            return float(x @ x), 2 * x

        options = dict(maxiter=self.iterations, gtol=0.0, backend=backend)

        def method():
            scipy.optimize.minimize(fun, x0, jac=True, method=adam_method, options=options)

        def loop():
            x = x0.copy()
            state = adamnp.init(x, adamnp.adamw(lr=1e-3, weight_decay=0.0), backend=backend)
            for _ in range(self.iterations):
                _, g = fun(x)
                adamnp.step(x, g, state)
            return x

        self.method, self.loop = method, loop
        method()
        loop()

    def track_method_over_loop(self, backend):
        loop, method = interleaved_medians(self.loop, self.method, budget_s=3.0)
        return method / loop

    track_method_over_loop.unit = "ratio"
