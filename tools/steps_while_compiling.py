"""Step times of a new process's first steps, while the kernels compile in the background and
with the first step compiling them (``ADAMNP_BACKGROUND_COMPILE=0``), and whether both end in
the same bits.

    python tools/steps_while_compiling.py               # 8-bit MLP tree with clipping, 60 steps
    python tools/steps_while_compiling.py --elements 4000000 --steps 40

Each mode runs in a fresh process with an empty ``NUMBA_CACHE_DIR``: an 8-bit "sqrt" state of
a weight of ``--elements`` elements and a bias of 1,000 (a float32 group), AdamW with
``max_grad_norm=1.0``, random gradients. Prints the first steps' times, when the kernels were
ready (from the first step's start) and when the last step ended; then whether the two runs'
params and state are equal bit for bit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_SCRIPT = """
import sys, time, hashlib
import numpy as np, adamnp
from adamnp import _background
n, steps = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
params = {"w": rng.standard_normal((n // 1000, 1000)).astype(np.float32),
          "b": np.zeros(1000, np.float32)}
state = adamnp.init(params, adamnp.adamw(lr=1e-3, max_grad_norm=1.0), backend="numba",
                    state_bits=8)
times, ready = [], None
t0 = time.perf_counter()
for i in range(steps):
    g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    t = time.perf_counter()
    adamnp.step(params, g, state)
    times.append(time.perf_counter() - t)
    if ready is None and not _background.compiling(state):
        ready = time.perf_counter() - t0
end = time.perf_counter() - t0
_background.wait(state)
ready = ready if ready is not None else time.perf_counter() - t0
digest = hashlib.sha256()
for a in (params["w"], params["b"], *[b for g in state.groups for b in g.buffers.values()]):
    digest.update(a.tobytes())
print(" ".join(f"{x:.3f}" for x in times))
print(f"{ready:.2f} {end:.2f} {digest.hexdigest()}")
"""


def run(background: bool, elements: int, steps: int) -> tuple[list, float, float, str]:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env["ADAMNP_BACKGROUND_COMPILE"] = "1" if background else "0"
        out = subprocess.run([sys.executable, "-c", _SCRIPT, str(elements), str(steps)],
                             env=env, capture_output=True, text=True, check=True)  # fmt: skip
    lines = out.stdout.split("\n")
    ready, end, digest = lines[1].split()
    return [float(x) for x in lines[0].split()], float(ready), float(end), digest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    digests = []
    for background in (True, False):
        times, ready, end, digest = run(background, args.elements, args.steps)
        digests.append(digest)
        name = "background" if background else "foreground"
        shown = " ".join(f"{t:.2f}" for t in times[:12])
        print(f"{name}: first steps {shown} s ... median {sorted(times)[len(times) // 2]:.4f} s")
        print(f"  kernels ready at {ready:.2f} s, {args.steps} steps done at {end:.2f} s")
    print("same bits:", digests[0] == digests[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
