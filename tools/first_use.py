"""Time the first adamnp step in a fresh process, with an empty and then a warm Numba cache.

    python tools/first_use.py                  # float32 (small and 1M), 8-bit sqrt and bnb
    python tools/first_use.py --cases f32-1M   # one of them
    python tools/first_use.py --cases all      # also amsgrad, stochastic v, half params, the
                                               # bnb gather kernel, MLP trees
    python tools/first_use.py --repeats 3      # each case three times, rounds over all cases
                                               # (a drifting machine hits every case alike)
    python tools/first_use.py --foreground     # ADAMNP_BACKGROUND_COMPILE=0: the first step
                                               # compiles (as before 2026-12-06)

Each case runs twice in a new Python process sharing one temporary ``NUMBA_CACHE_DIR``: the
first run compiles, the second loads. Prints import + init time, the first step's time and,
with an empty cache, the time from the first step's start until the kernels are ready (the
first step runs on NumPy while they compile in the background: adamnp._background).
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
    parser.add_argument("--foreground", action="store_true",
                        help="ADAMNP_BACKGROUND_COMPILE=0: the first step compiles")  # fmt: skip
    args = parser.parse_args(argv)
    names = list(CASES) if args.cases == ["all"] else args.cases
    runs = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            (setup, cold, ready), (_, warm, _) = first_step_times(name, not args.foreground)
            runs[name].append((setup, cold, ready, warm))
    print(f"{'':<32}{'empty cache':^32}{'warm cache':>17}")
    print(
        f"{'case':<17}{'import+init':>15}{'first step':>15}{'kernels ready':>17}{'first step':>17}"
    )
    for name, samples in runs.items():
        cols = [_span([s[i] for s in samples]) for i in range(4)]
        print(f"{name:<17}{cols[0]:>15}{cols[1]:>15}{cols[2]:>17}{cols[3]:>17}")
    return 0


def _span(values) -> str:
    """``"x.xx s"``, or ``"lo - hi s"`` for several samples."""
    lo, hi = min(values), max(values)
    return f"{lo:.2f} s" if len(values) == 1 else f"{lo:.2f} - {hi:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
