"""Time the first adamnp step in a fresh process, with an empty and then a warm Numba cache.

    python tools/first_use.py                  # float32 (small and 1M), 8-bit sqrt and bnb
    python tools/first_use.py --cases f32-1M   # one of them
    python tools/first_use.py --cases all      # also amsgrad, stochastic v, half params, the
                                               # bnb gather kernel, MLP trees
    python tools/first_use.py --repeats 3      # each case three times, rounds over all cases
                                               # (a drifting machine hits every case alike)

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
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all cases")
    args = parser.parse_args(argv)
    names = list(CASES) if args.cases == ["all"] else args.cases
    runs = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            (setup, cold), (_, warm) = first_step_times(name)
            runs[name].append((setup, cold, warm))
    print("case            import+init   first step (empty cache)   first step (warm cache)")
    for name, samples in runs.items():
        cols = [_span([s[i] for s in samples]) for i in range(3)]
        print(f"{name:<15} {cols[0]:>11}   {cols[1]:>24}   {cols[2]:>23}")
    return 0


def _span(values) -> str:
    """``"x.xx s"``, or ``"lo - hi s"`` for several samples."""
    lo, hi = min(values), max(values)
    return f"{lo:.2f} s" if len(values) == 1 else f"{lo:.2f} - {hi:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
