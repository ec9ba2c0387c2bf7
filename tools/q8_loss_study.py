"""Final loss with 8-bit against float32 optimizer state, over a few thousand steps.

Trains the demo's logistic and MLP problems (losses heading to 0), two variants with 15%
of the labels flipped (a loss floor above 0; the MLP on 20,000 samples so it cannot memorise
them) and a least-squares fit with float32 and 8-bit state, three data seeds each, and prints
the full-data loss at 1000, 2000 and 3000 steps with the relative difference of the 8-bit
runs: the default ``"sqrt"`` format, and bitsandbytes' format with ``v`` rounded to nearest
(bitsandbytes' rule) and stochastically. The last column trains float32 on another minibatch
order: the size of a difference that means nothing. The numbers are in docs/eight_bit.md.
About 20 minutes on 2 cores:

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


class LeastSquares:
    """``min |A W + b - Y|^2 / 2n`` over a 64 x 80 ``W`` (5120 elements: 8-bit) and ``b``."""

    name = "least squares (256 x 64 -> 80)"

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.a = rng.standard_normal((256, 64)).astype(np.float32)
        w_true = rng.standard_normal((64, 80)).astype(np.float32)
        self.y = self.a @ w_true + 0.1 * rng.standard_normal((256, 80)).astype(np.float32)
        self.batches = None

    def config(self):
        return adamnp.adamw(lr=1e-2, weight_decay=0.0)

    def params0(self):
        return {"w": np.zeros((64, 80), np.float32), "b": np.zeros(80, np.float32)}

    def grad(self, params, t):
        r = self.a @ params["w"] + params["b"] - self.y
        return {"w": (self.a.T @ r) / np.float32(len(self.a)), "b": r.mean(axis=0)}

    def loss(self, params):
        r = self.a @ params["w"] + params["b"] - self.y
        return float(np.mean(r.astype(np.float64) ** 2) / 2)


def losses(problem, bits, batch_seed=None, state_format="sqrt", v_rounding=None):
    """Full-data loss after each of MARKS steps (8-bit where a leaf has >= 4096 elements)."""
    if batch_seed is not None:
        if problem.batches is None:  # full-batch problem: no other order
            return np.full(len(MARKS), np.nan)
        b = problem.batches
        problem.batches = _Minibatches(b.n, b.batch, batch_seed)
    params = problem.params0()
    state = adamnp.init(params, problem.config(), backend="auto", state_bits=bits,
                        state_format=state_format, v_rounding=v_rounding)  # fmt: skip
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
                            min_8bit_size=0, v_rounding=rounding,
                            state_format="bnb")  # fmt: skip
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
                            min_8bit_size=0, state_format="bnb")  # fmt: skip
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
    runs = {
        "8-bit sqrt (default)": dict(bits=8),
        "8-bit bnb, v nearest": dict(bits=8, state_format="bnb", v_rounding="nearest"),
        "8-bit bnb, v stochastic": dict(bits=8, state_format="bnb", v_rounding="stochastic"),
        "float32, other batches": dict(bits=32, batch_seed=1000),
    }
    print(f"| problem | steps | float32 loss | {' | '.join(runs)} |")
    for make in (Logistic, MLP, NoisyLogistic, NoisyMLP, LeastSquares):
        base, rows = [], {name: [] for name in runs}
        for seed in (0, 1, 2):
            base.append(losses(make(seed=seed), 32))
            for name, kw in runs.items():
                kw = dict(kw)
                if "batch_seed" in kw:
                    kw["batch_seed"] += seed
                rows[name].append(losses(make(seed=seed), **kw))
        base = np.array(base)
        for i, steps in enumerate(MARKS):
            cells = [_relative(rows[name], base, i) for name in runs]
            fp32 = " / ".join(f"{b[i]:.4g}" for b in base)
            print(f"| {make.name} | {steps} | {fp32} | {' | '.join(cells)} |", flush=True)


def _relative(runs, base, i):
    return " / ".join(f"{100 * (r[i] / b[i] - 1):+.2f}%" for r, b in zip(runs, base, strict=True))


if __name__ == "__main__":
    main()
