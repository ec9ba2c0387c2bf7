"""float16 / bfloat16 params with float32 moments: how close the step runs to memory bandwidth."""

from __future__ import annotations

import numpy as np

import adamnp

from ._common import BACKENDS, interleaved_medians

N = 16_000_000


class HalfOverTraffic:
    """Half-precision step time over ``traffic_kernel_half`` time on the same arrays.

    One leaf of ``n`` float16 or bfloat16 params with half gradients and float32 moments
    (AdamW defaults: rounding to nearest). ``traffic_kernel_half`` reads p, g (2 bytes each),
    m, v and writes p, m, v with trivial arithmetic (22 bytes per element), so 1.0 is
    bandwidth-bound. Under ``nonfinite="raise"`` (the default) the step checks every gradient
    before it writes anything, so that a refused step changes nothing: it must read g twice,
    and its traffic kernel does too (``check_pass=True``, 24 bytes per element).
    ``"propagate"`` reads g once. Interleaved medians in one process; the traffic kernel runs
    on arrays of the step's sizes and dtypes.
    """

    params = ([N], ["float16", "bfloat16"], ["raise", "propagate"])
    param_names = ["n", "dtype", "nonfinite"]
    timeout = 600

    def setup(self, n, dtype, nonfinite):
        if "numba" not in BACKENDS:
            raise NotImplementedError("the numba backend is not available")
        try:
            import ml_dtypes
        except ImportError:
            raise NotImplementedError("bfloat16 needs ml_dtypes") from None
        from adamnp.backends.numba import traffic_kernel_half

        half = np.dtype(np.float16 if dtype == "float16" else ml_dtypes.bfloat16)
        rng = np.random.default_rng(0)
        self.p = rng.standard_normal(n, dtype=np.float32).astype(half)
        self.g = rng.standard_normal(n, dtype=np.float32).astype(half)
        self.state = adamnp.init(self.p, adamnp.adamw(nonfinite=nonfinite), backend="numba")
        adamnp.step(self.p, self.g, self.state)
        # the same sizes and dtypes, in written memory: an untouched np.zeros array maps
        # every page to the kernel's one zero page, so reading g would cost no memory traffic
        arrays = [np.ones(n, half), np.ones(n, half)]
        arrays += [np.ones(n, np.float32), np.ones(n, np.float32)]
        check = nonfinite == "raise"
        self.traffic = lambda: traffic_kernel_half(*arrays, check_pass=check)
        self.traffic()

    def track_half_over_traffic(self, n, dtype, nonfinite):
        step, traffic = interleaved_medians(
            lambda: adamnp.step(self.p, self.g, self.state), self.traffic, budget_s=4.0
        )
        return step / traffic

    track_half_over_traffic.unit = "ratio"
