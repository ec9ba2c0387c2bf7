"""Command line: ``python -m adamnp demo``."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from ._demo import run_logistic

    print(f"adamnp demo: logistic regression (4000 x 32, synthetic), AdamW, backend={args.backend}")
    loss, acc, state = run_logistic(epochs=args.epochs, backend=args.backend)
    print(f"final loss {loss:.5f}, accuracy {acc:.3f}, {state.step} steps, {state!r}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adamnp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train built-in problems and print the results")
    demo.add_argument("--epochs", type=int, default=20, help="passes over the data (default 20)")
    demo.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "numpy", "numba", "cuda"],
        help="which backend runs the step (default: auto)",
    )
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
