"""Final loss with bfloat16 and float16 params against float32 params, over 3000 steps.

Trains the demo's logistic and MLP problems, their 15%-flipped-label variants and the least
squares fit of tools/q8_loss_study.py with the params stored in float32, and in bfloat16 and
float16 with the update rounded to nearest and stochastically (float32 moments; gradients
and losses computed in float32 on the upcast params, as a mixed-precision script would).
Prints the full-data loss at 1000, 2000 and 3000 steps, relative to float32 params, for three
data seeds. The numbers are in docs/mixed_precision.md. About 10 minutes on 2 cores:

    python tools/half_params_study.py [--backend numpy|numba] [--seeds 0 1 2]
    python tools/half_params_study.py --demo   # logistic and MLP at the demo's step counts
"""

import argparse

import ml_dtypes
import numpy as np
from q8_loss_study import MARKS, LeastSquares, NoisyLogistic, NoisyMLP

import adamnp
from adamnp.cli.problems import MLP, Logistic

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def losses(problem, dtype, rounding, backend, marks=MARKS):
    """Full-data loss after each of ``marks`` steps with params stored in ``dtype``."""
    params = {k: v.astype(dtype) for k, v in problem.params0().items()}
    config = problem.config()
    config = adamnp.adamw(
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        param_rounding=rounding,
    )
    state = adamnp.init(params, config, backend=backend)
    out = []
    for t in range(marks[-1]):
        upcast = {k: v.astype(np.float32) for k, v in params.items()}
        adamnp.step(params, problem.grad(upcast, t), state)
        if t + 1 in marks:
            out.append(problem.loss({k: v.astype(np.float32) for k, v in params.items()}))
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--demo", action="store_true", help="logistic and MLP, demo step counts")
    args = ap.parse_args()
    runs = [(d, r) for d in ("bfloat16", "float16") for r in ("nearest", "stochastic")]
    names = [f"{d} {r}" for d, r in runs]
    print(f"relative difference of the full-data loss to float32 params (seeds {args.seeds})")
    print(f"| problem | steps | float32 loss | {' | '.join(names)} |")
    print(f"|---|---|---|{'---|' * len(names)}")
    problems = (Logistic, MLP) if args.demo else (Logistic, MLP, NoisyLogistic, NoisyMLP,
                                                  LeastSquares)  # fmt: skip
    for make in problems:
        marks = (make.steps,) if args.demo else MARKS
        base = [losses(make(seed=s), np.float32, "nearest", args.backend, marks)
                for s in args.seeds]  # fmt: skip
        rows = {
            name: [losses(make(seed=s), DTYPES[d], r, args.backend, marks) for s in args.seeds]
            for name, (d, r) in zip(names, runs)
        }
        for i, steps in enumerate(marks):
            cells = [
                " / ".join(f"{100 * (x[i] / b[i] - 1):+.2f}%" for x, b in zip(rows[n], base))
                for n in names
            ]
            fp32 = " / ".join(f"{b[i]:.4g}" for b in base)
            print(f"| {make.name} | {steps} | {fp32} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
