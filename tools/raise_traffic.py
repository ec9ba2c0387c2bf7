"""A half-precision step under ``nonfinite="raise"`` and ``"propagate"`` against the traffic
kernel with and without the check's read of g, interleaved in one process.

The default step checks every gradient before it writes (a refused step changes nothing),
so it reads g twice: its traffic kernel is ``traffic_kernel_half(..., check_pass=True)``
(24 bytes per element); ``"propagate"``'s is the plain one (22 bytes). The numbers are in
docs/mixed_precision.md ("The default check's read of g").

    python tools/raise_traffic.py [--dtype bfloat16|float16] [--n 16000000] [--budget 6]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# times compiled steps from the first on (adamnp._background)
os.environ.setdefault("ADAMNP_BACKGROUND_COMPILE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adamnp
from adamnp.backends.numba import traffic_kernel_half
from benchmarks._common import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--n", type=int, default=16_000_000)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing")
    args = parser.parse_args()
    if args.dtype == "bfloat16":
        import ml_dtypes

        half = np.dtype(ml_dtypes.bfloat16)
    else:
        half = np.dtype(np.float16)
    rng = np.random.default_rng(0)
    p_raise = rng.standard_normal(args.n, dtype=np.float32).astype(half)
    p_propagate = p_raise.copy()
    g = rng.standard_normal(args.n, dtype=np.float32).astype(half)
    raising = adamnp.init(p_raise, adamnp.adamw(), backend="numba")
    propagating = adamnp.init(p_propagate, adamnp.adamw(nonfinite="propagate"), backend="numba")
    # the traffic kernels' arrays in written memory (an untouched np.zeros reads the zero page)
    arrays = [np.ones(args.n, half), np.ones(args.n, half)]
    arrays += [np.ones(args.n, np.float32), np.ones(args.n, np.float32)]
    runs = {
        "traffic 22 B": lambda: traffic_kernel_half(*arrays),
        "traffic 24 B": lambda: traffic_kernel_half(*arrays, check_pass=True),
        "raise": lambda: adamnp.step(p_raise, g, raising),
        "propagate": lambda: adamnp.step(p_propagate, g, propagating),
    }
    for run in runs.values():  # compile
        run()
    t = dict(zip(runs, interleaved_medians(*runs.values(), budget_s=args.budget)))
    times = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items())
    print(f"{args.dtype}, n = {args.n}: {times}")
    print(
        f"raise / traffic 24 B = {t['raise'] / t['traffic 24 B']:.3f}, "
        f"raise / traffic 22 B = {t['raise'] / t['traffic 22 B']:.3f}, "
        f"propagate / traffic 22 B = {t['propagate'] / t['traffic 22 B']:.3f}"
    )


if __name__ == "__main__":
    main()
