"""Time the first adamnp step in a fresh process, with an empty and then a warm Numba cache.

    python tools/first_use.py                  # float32 (small and 1M), 8-bit sqrt and bnb
    python tools/first_use.py --cases f32-1M   # one of them

Each case runs twice in a new Python process sharing one temporary ``NUMBA_CACHE_DIR``: the
first run compiles, the second loads. Prints import + init time and the first step's time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CASES = {
    "f32-1K": ("{}", 1_000),
    "f32-1M": ("{}", 1_000_000),
    "sqrt-1M": ("dict(state_bits=8)", 1_000_000),
    "bnb-1M": ("dict(state_bits=8, state_format='bnb')", 1_000_000),
}

_SCRIPT = """
import time
t0 = time.perf_counter()
import numpy as np, adamnp
p = np.ones({n}, np.float32); g = np.full({n}, 0.1, np.float32)
state = adamnp.init(p, adamnp.adamw(), backend="numba", **{options})
t1 = time.perf_counter()
adamnp.step(p, g, state)
print(f"{{t1 - t0:.2f}} {{time.perf_counter() - t1:.2f}}")
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    print("case       import+init  first step (empty cache)  first step (warm cache)")
    for name in args.cases:
        options, n = CASES[name]
        code = _SCRIPT.format(n=n, options=options)
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            command = [sys.executable, "-c", code]
            runs = [
                subprocess.run(
                    command, env=env, capture_output=True, text=True, check=True
                ).stdout.split()
                for _ in range(2)
            ]
        print(f"{name:<10} {runs[0][0]:>9} s  {runs[0][1]:>20} s  {runs[1][1]:>21} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
