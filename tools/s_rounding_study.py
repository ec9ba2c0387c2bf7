"""How the ``"sqrt"`` format's rounding of ``s`` behaves over many steps, through the library.

    python tools/s_rounding_study.py           # a shrinking gradient: the stored v over 4080
                                               # elements; the quadratic, data seeds 0-9
    python tools/s_rounding_study.py --ones    # the quadratic from x0 = 1 with four
                                               # offsets of the draws
    python tools/s_rounding_study.py --trace   # the same from x0 = 1: float32, float64 and
                                               # 8-bit losses every 500 steps to 6000, and
                                               # the spread of x over the elements

Run it on two versions (e.g. a worktree of an older commit on ``PYTHONPATH``) to compare
roundings; the numbers are in docs/eight_bit.md ("Rounding of ``s``").
"""

import sys
from pathlib import Path

import numpy as np

import adamnp
from adamnp.lowbit.sqrt import _roots

sys.path.insert(0, str(Path(__file__).parent))
from lowbit_options import quadratic


def shrinking(blocks: int = 16) -> None:
    """Element 0 of each block has gradient 1, the others 0.1 for 1000 steps, then 0.01 for
    3000: v decays at the rate ``b2`` allows, 0.05% of ``s`` per step, far below a code."""
    p = np.zeros(256 * blocks, np.float32)
    state = adamnp.init(p, adamnp.adam(lr=1e-6), backend="numba", state_bits=8,
                        min_8bit_size=0)  # fmt: skip
    g = np.empty_like(p)
    for t in range(1, 4001):
        g[:] = 0.1 if t <= 1000 else 0.01
        g[::256] = 1.0
        adamnp.step(p, g, state)
    b = state.groups[0].buffers
    s = _roots(b["codes_v"], b["absmax_v"], 256).astype(np.float64)
    others = np.ones(p.size, bool)
    others[::256] = False
    exact = 0.01**2 * (1 - 0.999**3000) + 0.1**2 * (1 - 0.999**1000) * 0.999**3000
    r = s[others] ** 2 / exact
    print(f"shrinking gradient, {r.size} elements: v / exact {r.min():.3f} - {r.max():.3f}, "
          f"median {np.median(r):.3f}; mean s / exact s {np.sqrt(r).mean():.4f}")  # fmt: skip


def run_quadratic(start, seed, bits, before=0):
    """Final loss; ``before`` empty leaves ahead of the quadratic shift the group's tag (the
    key of its draws)."""
    grad, loss, x0 = quadratic(256, start, seed)
    params = [np.zeros(3, np.float32) for _ in range(before)] + [x0.copy()]
    state = adamnp.init(params, adamnp.adam(lr=1e-3), backend="numba", min_8bit_size=256,
                        state_bits=bits)  # fmt: skip
    for t in range(1, 5001):
        grads = [np.zeros(3, np.float32) for _ in range(before)] + [grad(params[-1], t)]
        adamnp.step(params, grads, state)
    return loss(params[-1])


def trace_ones(seed: int = 5, steps: int = 6000) -> None:
    """From ``x0 = 1`` every element of the quadratic follows the same path in exact
    arithmetic (Adam's step does not depend on the scale of an element's gradients, and
    here every gradient is ``c * x``): float32 and float64 agree until float32 underflows,
    all elements equal. Prints the three losses every 500 steps and, at the end of 5000
    steps, how far the 8-bit run's elements spread around that path."""
    grad, loss, x0 = quadratic(256, "ones", seed)
    runs = {}
    for name, dtype, bits in (("float32", np.float32, 32), ("float64", np.float64, 32),
                              ("8-bit", np.float32, 8)):  # fmt: skip
        p = x0.astype(dtype)
        state = adamnp.init(p, adamnp.adam(lr=1e-3), backend="numba", min_8bit_size=256,
                            state_bits=bits)  # fmt: skip
        losses = []
        for t in range(1, steps + 1):
            adamnp.step(p, grad(p, t).astype(dtype), state)
            if t % 500 == 0:
                losses.append(loss(p))
            if t == 5000:
                runs[name + " x"] = np.abs(p.astype(np.float64))
                b = state.groups[0].buffers
                v = _roots(b["codes_v"], b["absmax_v"], 256) ** 2 if bits == 8 else b["v"]
                runs[name + " v"] = v.astype(np.float64)
        runs[name] = losses
    for i, t in enumerate(range(500, steps + 1, 500)):
        print(f"step {t}: " + ", ".join(f"{k} {runs[k][i]:.3g}"
                                        for k in ("float32", "float64", "8-bit")))  # fmt: skip
    for name in ("float32", "8-bit"):
        x = runs[name + " x"]
        print(f"{name} at step 5000: |x| from {x.min():.3g} to {x.max():.3g}, "
              f"median {np.median(x):.3g}")  # fmt: skip
    ratio = runs["8-bit v"] / runs["float32 v"]
    print(f"8-bit v / float32 v at step 5000: {ratio.min():.3f} - {ratio.max():.3f}")


def main() -> None:
    if "--trace" in sys.argv[1:]:
        trace_ones()
        return
    if "--ones" in sys.argv[1:]:
        for before in range(4):
            f32, q8 = (run_quadratic("ones", 5, bits, before) for bits in (32, 8))
            print(f"x0 = 1, {before} leaves before: float32 {f32:.3g}, 8-bit {q8:.3g}, "
                  f"ratio {q8 / f32:.2f}")  # fmt: skip
        return
    shrinking()
    ratios = [run_quadratic("normal", seed, 8) / run_quadratic("normal", seed, 32)
              for seed in range(10)]  # fmt: skip
    print("quadratic x0 normal, seeds 0-9, 8-bit / float32:",
          " ".join(f"{r:.2f}" for r in ratios))  # fmt: skip


if __name__ == "__main__":
    main()
