"""The 8-bit hazard battery and the shuffled quadratics through the library itself.

For float32 state, the default 8-bit ``"sqrt"`` format and bitsandbytes' format (``v``
rounded to nearest and stochastically): the largest single-step ``|dp|`` of each run over the
float32 run's on the same data (AdamW, lr 1e-3, 200 steps or 3000, the cases of
``tools/lowbit_options.py``), and the final loss on the shuffled quadratics. The numbers are
in docs/eight_bit.md. About 3 minutes on 2 cores (numba backend):

    python tools/lowbit_battery.py
"""

import sys
from pathlib import Path

import numpy as np

import adamnp

sys.path.insert(0, str(Path(__file__).parent))
from lowbit_options import BATTERY, quadratic, steps

FORMATS = {
    "float32": dict(state_bits=32),
    "8-bit sqrt (default)": dict(state_bits=8),
    "8-bit bnb, v nearest": dict(state_bits=8, state_format="bnb", v_rounding="nearest"),
    "8-bit bnb, v stochastic": dict(state_bits=8, state_format="bnb", v_rounding="stochastic"),
}
QUADRATICS = [(256, 5000, "ones"), (256, 5000, "normal"), (16384, 20000, "normal")]


def run(options, grad, n, steps, config, p0=None, loss=None):
    p = np.zeros(n, np.float32) if p0 is None else p0.copy()
    state = adamnp.init(p, config, backend="numba", min_8bit_size=0, **options)
    worst = 0.0
    for t in range(1, steps + 1):
        g = grad(p, t)
        old = p.copy()
        adamnp.step(p, g, state)
        worst = max(worst, float(np.abs(p - old).max()))
    return worst, (loss(p) if loss else None)


def main() -> None:
    print("| case | " + " | ".join(FORMATS) + " |")
    worst = dict.fromkeys(FORMATS, 0.0)
    for case, make in BATTERY.items():
        largest = {}
        for name, options in FORMATS.items():
            grad, n = make()
            largest[name] = run(options, grad, n, steps(case), adamnp.adamw(lr=1e-3))[0]
        ratios = {name: largest[name] / largest["float32"] for name in FORMATS}
        for name in FORMATS:
            worst[name] = max(worst[name], ratios[name])
        cells = [f"{largest['float32'] / 1e-3:.3g} lr"]
        cells += [f"{ratios[k]:.3g}x" for k in FORMATS if k != "float32"]
        print(f"| {case} | " + " | ".join(cells) + " |", flush=True)
    cells = [f"**{worst[k]:.3g}x**" for k in FORMATS if k != "float32"]
    print("| **worst** | 1 | " + " | ".join(cells) + " |")
    for n, count, start in QUADRATICS:
        cells = []
        for options in FORMATS.values():
            grad, loss, x0 = quadratic(n, start)
            cells.append(f"{run(options, grad, n, count, adamnp.adam(lr=1e-3), x0, loss)[1]:.3g}")
        print(f"| quadratic {n} x {count} steps, x0 {start} | " + " | ".join(cells) + " |",
              flush=True)  # fmt: skip
    # The 256-element quadratic from x0 ~ N(0, 1) with data seeds 0-9: final losses over
    # float32's, the largest and the smallest.
    ratios = {name: [] for name in FORMATS}
    for seed in range(10):
        for name, options in FORMATS.items():
            grad, loss, x0 = quadratic(256, "normal", seed)
            ratios[name].append(run(options, grad, 256, 5000, adamnp.adam(lr=1e-3), x0, loss)[1])
    fp32 = np.array(ratios["float32"])
    cells = [f"{(np.array(r) / fp32).max():.3g} ({(np.array(r) / fp32).min():.3g})"
             for name, r in ratios.items() if name != "float32"]  # fmt: skip
    print("| quadratic 256 x 5000 steps, x0 normal, seeds 0-9: largest (smallest) ratio | 1 | "
          + " | ".join(cells) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
