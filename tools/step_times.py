"""Median times of the numba float32 step, an 8-bit step ("sqrt" or "bnb") and the float32
traffic kernel, interleaved in one process: an A/B of two versions of the kernels is this
script run once per version, alternately (each version's kernels compile on its first run).

    python tools/step_times.py [label] [--n 16000000] [--repeats 15] [--format sqrt|bnb]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

# times compiled steps from the first on: no NumPy steps while the kernels compile
# (adamnp._background)
os.environ.setdefault("ADAMNP_BACKGROUND_COMPILE", "0")

import adamnp
from adamnp.backends import numba as backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label", nargs="?", default="")
    parser.add_argument("--n", type=int, default=16_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--format", choices=["sqrt", "bnb"], default="sqrt")
    args = parser.parse_args()
    n = args.n

    def stepper(**options):
        p, g = np.ones(n, np.float32), np.full(n, 1e-3, np.float32)
        state = adamnp.init(p, adamnp.adamw(), backend="numba", **options)
        adamnp.step(p, g, state)  # compile, warm
        return lambda: adamnp.step(p, g, state)

    buffers = [np.ones(n, np.float32) for _ in range(4)]
    runs = {
        "float32": stepper(),
        args.format: stepper(state_bits=8, state_format=args.format),
        "traffic": lambda: backend.traffic_kernel(*buffers),
    }
    runs["traffic"]()
    times: dict = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    ms = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    print(
        args.label,
        " ".join(f"{name}={t:.2f}ms" for name, t in ms.items()),
        f"{args.format}/float32={ms[args.format] / ms['float32']:.3f}",
        f"float32/traffic={ms['float32'] / ms['traffic']:.3f}",
    )


if __name__ == "__main__":
    main()
