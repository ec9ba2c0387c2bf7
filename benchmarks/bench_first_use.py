"""First use: the first ``adamnp.step`` in a new process, with an empty and a warm Numba cache.

Goals (issue 17): with an empty cache at most 2.5 s for float32 state and 5 s for 8-bit
state (every format); with a warm cache at most 0.5 s. One leaf of 1M float32 elements
(float32 state also at 1,000 elements, the small path), and a small MLP's tree (:data:`MLP`:
two weights, two biases) whose 8-bit state also holds a float32 group for the biases. Each
sample starts two Python processes sharing a temporary ``NUMBA_CACHE_DIR``: the first
compiles, the second loads. The time is the first step's alone (import and ``init`` are
timed apart by ``tools/first_use.py``, which runs the same cases and more).

By default the first step runs on NumPy while the kernels compile in the background
(:mod:`adamnp._background`); ``track_cold_compiled`` is the time from the first step's start
until the kernels are ready (what the first step took before, when it compiled them itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

SQRT, BNB = "dict(state_bits=8)", "dict(state_bits=8, state_format='bnb')"
BNB_SR = "dict(state_bits=8, state_format='bnb', v_rounding='stochastic')"
#: A tree of a 1000-1000-10 MLP's leaves (shapes): in an 8-bit state the weights are 8-bit
#: and the biases (below ``min_8bit_size``) a float32 group; the leaves are checked by the
#: compiled scan (:data:`adamnp._validate.SCAN_MAX_MEAN_LEAF`).
MLP = ((1000, 1000), (1000,), (1000, 10), (10,))
#: name: (init options, elements of one leaf or a tree's shapes, adamw options, param dtype,
#: environment)
CASES = {
    "f32-1K": ("{}", 1_000, "", "float32", {}),
    "f32-1M": ("{}", 1_000_000, "", "float32", {}),
    "sqrt-1M": (SQRT, 1_000_000, "", "float32", {}),
    "bnb-1M": (BNB, 1_000_000, "", "float32", {}),
    "bnb-sr-1M": (BNB_SR, 1_000_000, "", "float32", {}),
    "bnb-gather-1M": (BNB, 1_000_000, "", "float32", {"ADAMNP_Q8_KERNEL": "gather"}),
    "sqrt-ams-1M": (SQRT, 1_000_000, "amsgrad=True", "float32", {}),
    "bnb-ams-1M": (BNB, 1_000_000, "amsgrad=True", "float32", {}),
    "bf16-1K": ("{}", 1_000, "", "bfloat16", {}),
    "f16-1M": ("{}", 1_000_000, "", "float16", {}),
    "sqrt-bf16-1M": (SQRT, 1_000_000, "", "bfloat16", {}),
    "bnb-f16-1M": (BNB, 1_000_000, "", "float16", {}),
    # two options at once (docs/backends.md: over the goals)
    "f16sr-1K": ("{}", 1_000, "param_rounding='stochastic'", "float16", {}),
    "bf16sr-1K": ("{}", 1_000, "param_rounding='stochastic'", "bfloat16", {}),
    "bf16sr-ams-1K": ("{}", 1_000, "param_rounding='stochastic', amsgrad=True", "bfloat16", {}),
    "f16sr-ams-1M": ("{}", 1_000_000, "param_rounding='stochastic', amsgrad=True", "float16", {}),
    "sqrt-f16sr-1M": (SQRT, 1_000_000, "param_rounding='stochastic'", "float16", {}),
    "sqrt-bf16-ams-1M": (SQRT, 1_000_000, "amsgrad=True", "bfloat16", {}),
    "bnb-sr-ams-1M": (BNB_SR, 1_000_000, "amsgrad=True", "float32", {}),
    # trees of two groups (8-bit weights, float32 biases)
    "mlp-sqrt": (SQRT, MLP, "", "float32", {}),
    "mlp-sqrt-clip": (SQRT, MLP, "max_grad_norm=1.0", "float32", {}),
    "mlp-bnb-clip": (BNB, MLP, "max_grad_norm=1.0", "float32", {}),
    "mlp-sqrt-bf16": (SQRT, MLP, "", "bfloat16", {}),
    "mlp-f32-clip": ("{}", MLP, "max_grad_norm=1.0", "float32", {}),
    # over adamnp._background.INTERIM_MAX: one NumPy step, the second waits for the compile
    "sqrt-16M": (SQRT, 16_000_000, "", "float32", {}),
    "f32-16M": ("{}", 16_000_000, "", "float32", {}),
}

_SCRIPT = """
import time
t0 = time.perf_counter()
import numpy as np, adamnp
from adamnp.lowbit.half import bfloat16_dtype
dtype = bfloat16_dtype() if "{dtype}" == "bfloat16" else np.dtype("{dtype}")
shapes = {shapes}
p = {{f"leaf{{i}}": np.ones(s, dtype) for i, s in enumerate(shapes)}}
g = {{k: np.full(a.shape, 0.1, dtype) for k, a in p.items()}}
if len(shapes) == 1:
    p, g = p["leaf0"], g["leaf0"]
state = adamnp.init(p, adamnp.adamw({adamw}), backend="numba", **{options})
t1 = time.perf_counter()
adamnp.step(p, g, state)
t2 = time.perf_counter()
from adamnp import _background
_background.wait(state)
print(f"{{t1 - t0:.3f}} {{t2 - t1:.3f}} {{time.perf_counter() - t1:.3f}}")
"""


def first_step_times(case: str, background: bool = True) -> tuple[tuple, tuple]:
    """``((import + init, first step, kernels ready) with an empty cache, (the same) with
    it warm)`` of ``case`` (a key of :data:`CASES`), in seconds; "kernels ready" counts from
    the first step's start. ``background=False`` sets ``ADAMNP_BACKGROUND_COMPILE=0``: the
    first step compiles."""
    options, n, adamw, dtype, extra = CASES[case]
    shapes = ((n,),) if isinstance(n, int) else n
    code = _SCRIPT.format(shapes=shapes, options=options, adamw=adamw, dtype=dtype)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, **extra, "NUMBA_CACHE_DIR": cache}
        env["ADAMNP_BACKGROUND_COMPILE"] = "1" if background else "0"
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, check=True).stdout.split()  # fmt: skip
            runs.append(tuple(map(float, out)))
    return runs[0], runs[1]


class FirstUse:
    """The first step's seconds with an empty cache (``track_cold``) and a warm one
    (``track_warm``); with an empty cache, also the seconds until the kernels are ready
    (``track_cold_compiled``)."""

    params = ["f32-1K", "f32-1M", "sqrt-1M", "bnb-1M", "bnb-sr-1M", "mlp-sqrt-clip"]
    param_names = ["case"]
    unit = "seconds"
    timeout = 300

    def setup_cache(self):
        return {case: first_step_times(case) for case in self.params}

    def track_cold(self, times, case):
        return times[case][0][1]

    def track_cold_compiled(self, times, case):
        return times[case][0][2]

    def track_warm(self, times, case):
        return times[case][1][1]
