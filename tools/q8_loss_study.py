"""Final loss with 8-bit against float32 optimizer state, over a few thousand steps.

Trains the demo's logistic and MLP problems (losses heading to 0) and two variants with 15%
of the labels flipped (a loss floor above 0; the MLP on 20,000 samples so it cannot memorise
them) with float32 and 8-bit state, three data seeds each, and prints the full-data loss at
1000, 2000 and 3000 steps with the relative difference of the 8-bit runs: ``v`` rounded to
nearest (bitsandbytes' rule, the default) and stochastically (``v_rounding="stochastic"``).
The last column trains float32 on another minibatch order: the size of a difference that
means nothing. The numbers are in docs/eight_bit.md. About 15 minutes on 2 cores:

    python tools/q8_loss_study.py
    python tools/q8_loss_study.py --mechanism   # one block: sticky v, and v rounded to 0
"""

import itertools
import sys

import numpy as np

import adamnp
from adamnp.cli.problems import MLP, Logistic, _Minibatches
from adamnp.quant import dynamic_map

MARKS = (1000, 2000, 3000)


def _flip_labels(y, k, fraction, seed):
    """Replace `fraction` of the labels by another class, chosen uniformly."""
    rng = np.random.default_rng(seed)
    y = y.copy()
    idx = rng.choice(len(y), round(fraction * len(y)), replace=False)
    y[idx] = (y[idx] + rng.integers(1, k, len(idx))) % k
    return y


class NoisyLogistic(Logistic):
    name = "logistic, 15% labels flipped"

    def __init__(self, seed=0):
        super().__init__(seed=seed)
        self.y = _flip_labels(self.y, self.k, 0.15, seed + 2)


class NoisyMLP(MLP):
    name = "mlp, 20k samples, 15% labels flipped"

    def __init__(self, seed=0):
        super().__init__(n=20_000, seed=seed)
        self.y = _flip_labels(self.y, self.shape[2], 0.15, seed + 12)


def losses(problem, bits, batch_seed=None, v_rounding="nearest"):
    """Full-data loss after each of MARKS steps (8-bit where a leaf has >= 4096 elements)."""
    if batch_seed is not None:
        b = problem.batches
        problem.batches = _Minibatches(b.n, b.batch, batch_seed)
    params = problem.params0()
    state = adamnp.init(params, problem.config(), backend="auto", state_bits=bits,
                        v_rounding=v_rounding)  # fmt: skip
    out = []
    for t in range(MARKS[-1]):
        adamnp.step(params, problem.grad(params, t), state)
        if t + 1 in MARKS:
            out.append(problem.loss(params))
    return np.array(out)


def mechanism() -> None:
    """One block of 256: element 0 has gradient 1 (it sets absmax), element 1 varies."""
    code_v = dynamic_map(False).astype(np.float64)
    for (before, after), rounding in itertools.product(
        ((0.1, 0.01), (0.01, 0.1), (0.1, 0.0)), ("nearest", "stochastic")
    ):
        params = {"w": np.zeros(256, np.float32)}
        state = adamnp.init(params, adamnp.adam(lr=1e-6), backend="numpy", state_bits=8,
                            min_8bit_size=0, v_rounding=rounding)  # fmt: skip
        g, exact = np.zeros(256, np.float32), 0.0
        line = f"v {rounding:10s} g[1] {before} -> {after} after step 1000:"
        for t in range(1, 6001):
            g[0], g[1] = 1.0, before if t <= 1000 else after
            adamnp.step(params, {"w": g}, state)
            exact = 0.999 * exact + 0.001 * float(g[1]) ** 2
            if t in (1000, 6000):
                slot = state.slots[0]
                stored = code_v[slot.codes_v[1]] * float(slot.absmax_v[0])
                line += f"  step {t}: v 8-bit {stored:.3g}, exact {exact:.3g}"
        print(line)
    for bits in (32, 8):
        params = {"w": np.zeros(256, np.float32)}
        state = adamnp.init(params, adamnp.adam(lr=1e-3), backend="numpy", state_bits=bits,
                            min_8bit_size=0)  # fmt: skip
        g = np.zeros(256, np.float32)
        g[0], g[1] = 1.0, 1e-4
        adamnp.step(params, {"w": g}, state)
        before = params["w"][1]
        g[1] = 0.0  # element 1's v now rounds to 0 in 8 bits, its m does not
        adamnp.step(params, {"w": g}, state)
        print(f"{bits:2d}-bit state: second update of element 1: {params['w'][1] - before:.3g}")


def main() -> None:
    if "--mechanism" in sys.argv[1:]:
        mechanism()
        return
    print("relative difference of the final full-data loss to float32 (seeds 0 / 1 / 2)")
    print(f"{'problem':38s} {'steps':>5s} {'float32 loss':>24s} {'8-bit, v nearest':>24s} "
          f"{'8-bit, v stochastic':>24s} {'float32, other batches':>24s}")  # fmt: skip
    for make in (Logistic, MLP, NoisyLogistic, NoisyMLP):
        rows = {"fp32": [], "q8": [], "sr": [], "other": []}
        for seed in (0, 1, 2):
            rows["fp32"].append(losses(make(seed=seed), 32))
            rows["q8"].append(losses(make(seed=seed), 8))
            rows["sr"].append(losses(make(seed=seed), 8, v_rounding="stochastic"))
            rows["other"].append(losses(make(seed=seed), 32, batch_seed=1000 + seed))
        base = np.array(rows["fp32"])
        for i, steps in enumerate(MARKS):
            q8, sr, other = (_relative(rows[key], base, i) for key in ("q8", "sr", "other"))
            fp32 = " / ".join(f"{b[i]:.4g}" for b in base)
            print(f"{make.name:38s} {steps:5d} {fp32:>24s} {q8:>24s} {sr:>24s} {other:>24s}",
                  flush=True)  # fmt: skip


def _relative(runs, base, i):
    return " / ".join(f"{100 * (r[i] / b[i] - 1):+.2f}%" for r, b in zip(runs, base, strict=True))


if __name__ == "__main__":
    main()
