"""Step time on a busy machine: the default threads against one thread, with competitors.

Starts its own competing processes (a second process stepping adamnp on 1M elements with its
default threads, and a single-threaded NumPy job streaming through memory), then times
``adamnp.step`` in this process at several sizes, alternating blocks of steps with the
default number of threads and with one thread, and prints the mean and median step time of
each and their ratio. Means, not medians: the stalls this measures are rare and long
(whole scheduler quanta), and a mean is what a training loop pays.

    python tools/busy_machine.py                 # busy: with the competitors
    python tools/busy_machine.py --idle          # the same without them
    python tools/busy_machine.py --sizes 65536 1000000 --steps 300

Issue 17's goal: with the competitors, the default step's mean at most 1.25x the
single-thread step's at 64K, 1M and 16M elements.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

# times compiled steps from the first on: no NumPy steps while the kernels compile
# (adamnp._background)
os.environ.setdefault("ADAMNP_BACKGROUND_COMPILE", "0")

_STEPPER = """
import numpy as np, adamnp, time
p = np.ones(1_000_000, np.float32); g = np.full_like(p, 1e-3)
state = adamnp.init(p, adamnp.adamw(), backend="numba")
end = time.time() + {seconds}
while time.time() < end:
    adamnp.step(p, g, state)
"""

_STREAMER = """
import os, time
os.environ["OMP_NUM_THREADS"] = "1"
import numpy as np
a = np.ones(32_000_000, np.float32); b = np.ones_like(a)
end = time.time() + {seconds}
while time.time() < end:
    np.add(a, b, out=a)
"""


def _competitors(seconds: float) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return [
        subprocess.Popen([sys.executable, "-c", code.format(seconds=seconds)], env=env)
        for code in (_STEPPER, _STREAMER)
    ]


def _block(step, n_steps: int) -> list[float]:
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def measure(sizes, steps: int, rounds: int) -> list[tuple]:
    """Per size: (n, default threads, mean and median with them, mean and median with one)."""
    import numba

    import adamnp

    default = numba.get_num_threads()
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        p = rng.standard_normal(n, dtype=np.float32)
        g = rng.standard_normal(n, dtype=np.float32) * 1e-3
        state = adamnp.init(p, adamnp.adamw(), backend="numba")

        def step(p=p, g=g, state=state):
            adamnp.step(p, g, state)

        step()
        many, one = [], []
        per_block = max(1, steps // rounds)
        for _ in range(rounds):  # alternate, so that both see the same conditions
            numba.set_num_threads(default)
            many += _block(step, per_block)
            numba.set_num_threads(1)
            one += _block(step, per_block)
        numba.set_num_threads(default)
        rows.append((n, default, np.mean(many), np.median(many), np.mean(one), np.median(one)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[65_536, 1_000_000, 16_000_000])
    parser.add_argument("--steps", type=int, default=300, help="steps per size and setting")
    parser.add_argument("--rounds", type=int, default=10, help="alternations per size")
    parser.add_argument("--idle", action="store_true", help="no competing processes")
    args = parser.parse_args(argv)
    procs = [] if args.idle else _competitors(seconds=600)
    try:
        if procs:
            time.sleep(3.0)  # let them compile and start
        rows = measure(args.sizes, args.steps, args.rounds)
    finally:
        for proc in procs:
            proc.kill()
    import numba

    print(f"threading layer: {numba.threading_layer()}; {'idle' if args.idle else 'busy'}")
    print("elements   threads  mean ms (median)   1 thread mean ms (median)   mean ratio")
    for n, k, mean_k, med_k, mean_1, med_1 in rows:
        print(
            f"{n:>10,}  {k:>6}  {mean_k * 1e3:8.3f} ({med_k * 1e3:7.3f})"
            f"     {mean_1 * 1e3:8.3f} ({med_1 * 1e3:7.3f})      {mean_k / mean_1:6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
