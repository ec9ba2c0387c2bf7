"""Time the first adamnp step in a fresh process, with an empty and then a warm Numba cache.

    python tools/first_use.py                  # float32 (small and 1M), 8-bit sqrt and bnb
    python tools/first_use.py --cases f32-1M   # one of them
    python tools/first_use.py --cases all      # also amsgrad, stochastic v, half params, the
                                               # bnb gather kernel

Each case runs twice in a new Python process sharing one temporary ``NUMBA_CACHE_DIR``: the
first run compiles, the second loads. Prints import + init time and the first step's time.
The cases live in ``benchmarks/bench_first_use.py``, whose asv benchmark ``FirstUse`` times
the same first steps.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.bench_first_use import CASES, first_step_times

DEFAULT = ["f32-1K", "f32-1M", "sqrt-1M", "bnb-1M"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=[*sorted(CASES), "all"], default=DEFAULT)
    args = parser.parse_args(argv)
    print("case           import+init  first step (empty cache)  first step (warm cache)")
    for name in list(CASES) if args.cases == ["all"] else args.cases:
        (setup, cold), (_, warm) = first_step_times(name)
        print(f"{name:<14} {setup:>9.2f} s  {cold:>20.2f} s  {warm:>21.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
