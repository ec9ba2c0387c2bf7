"""The 8-bit ``"sqrt"`` format's largest step over float32's on random blocks, through the
library (numba): scales ``10**U(-8, 0)`` with a random share of exact zeros, blocks of 64 or
256 (1-3 of them), Adam or AdamW with one of three beta pairs and amsgrad or not, 30-300
steps, gradients ``scale * normal`` or of one sign, ``scale * (1 + noise * normal)`` with
noise 0.1, 0.3 or 1. Prints the five largest ratios with their case and the quantiles; the
numbers are in docs/eight_bit.md. About 3 minutes on 2 cores:

    python tools/step_bound_random_blocks.py [seed] [count]
"""

import sys
from pathlib import Path

import numpy as np

import adamnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_sqrt_format import _ratios

BETAS = [(0.9, 0.999), (0.5, 0.99), (0.9, 0.95)]


def main(seed: int = 0, count: int = 300) -> None:
    rng = np.random.default_rng(seed)
    worst = []
    for k in range(count):
        bs = int(rng.choice([64, 256]))
        n = bs * int(rng.integers(1, 4))
        scales = 10.0 ** rng.uniform(-8, 0, n)
        scales[rng.random(n) < rng.random()] = 0
        scales[0] = 10.0 ** rng.uniform(-8, 0)
        decoupled = bool(rng.integers(2))
        amsgrad = bool(rng.integers(2))
        betas = BETAS[rng.integers(3)]
        cfg = (adamnp.adamw if decoupled else adamnp.adam)(lr=1e-3, betas=betas, amsgrad=amsgrad)
        steps = int(rng.integers(30, 300))
        noise = None if rng.random() < 0.5 else float(rng.choice([0.1, 0.3, 1.0]))
        r = _ratios(n, lambda s=scales: lambda t: s, "numba", cfg=cfg, steps=steps,
                    block_size=bs, noise=noise, grad_seed=k)["sqrt"]  # fmt: skip
        worst.append((round(r, 3), bs, betas, amsgrad, steps, noise))
    worst.sort(key=lambda w: -w[0])
    print("largest (ratio, block size, betas, amsgrad, steps, noise):", worst[:5])
    print("quantiles 50/90/99/100%:", np.percentile([w[0] for w in worst], [50, 90, 99, 100]))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
