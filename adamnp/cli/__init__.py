"""Command line: ``python -m adamnp {demo,verify,bench,bench-dist,consolidate}``.

demo         train built-in problems (logistic regression, Rosenbrock, a small MLP) with
             AdamW on every available backend, with float32 and 8-bit state, and print a
             results table
verify       check every available backend against the NumPy reference on this machine
bench        measure optimizer-step throughput (ns/element, GB/s) per backend and state size
bench-dist   time a sharded step's phases under MPI (mpiexec -n N python -m adamnp bench-dist)
consolidate  turn a sharded checkpoint directory into one plain checkpoint file
"""

from __future__ import annotations

import argparse
import os

from .. import backends
from .._background import ENV

BACKEND_HELP = (
    "which backends to run: 'all' (default) = every backend that works here, 'auto' = the one "
    "adamnp.init picks for NumPy arrays (numba if installed, else numpy), or one name; "
    "with all/auto, backends that cannot run here are listed with the reason and skipped; "
    "a backend named explicitly that cannot run here is an error (exit status 1)"
)
BITS_HELP = "optimizer state: 32 (float32 moments), 8 (blockwise 8-bit moments) or both (default)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return sizes


def _common(p: argparse.ArgumentParser, bits=True) -> None:
    p.add_argument(
        "--backend", default="all", choices=["auto", "all", *backends.NAMES], help=BACKEND_HELP
    )
    if bits:
        p.add_argument("--bits", default="both", choices=["32", "8", "both"], help=BITS_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m adamnp``."""
    parser = argparse.ArgumentParser(
        prog="python -m adamnp",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{demo,verify,bench,bench-dist,consolidate}"
    )

    demo = sub.add_parser(
        "demo",
        help="train built-in problems on every backend and print a results table",
        description="Train built-in problems with AdamW (synthetic data, no downloads) on the "
        "selected backends, with float32 and 8-bit optimizer state. Prints the loss as training "
        "goes, then a table: final loss, optimizer steps per second, optimizer-state size and "
        "the largest parameter difference from the NumPy reference run.",
    )
    demo.add_argument(
        "--problem",
        default="all",
        choices=["logistic", "rosenbrock", "mlp", "all"],
        help="logistic: softmax regression on Gaussian clusters (float32); rosenbrock: "
        "scipy.optimize.rosen in 10-D (float64); mlp: a one-hidden-layer network trained "
        "by manual backprop (float32); all (default): the three",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="optimizer steps per run (default: per problem, 400 / 2000 / 600)",
    )
    _common(demo)

    verify = sub.add_parser(
        "verify",
        help="check every available backend against the NumPy reference",
        description="Run the same few steps on each selected backend and on the NumPy reference, "
        "over several leaf sizes, dtypes and hyperparameter sets, with float32 and 8-bit "
        "state, and print the measured deviations. Exit status 1 if any check fails.",
    )
    verify.add_argument(
        "--size",
        type=_positive_int,
        default=65_537,
        help="elements of the largest leaf (default 65537; use e.g. 50000000 on a GPU)",
    )
    verify.add_argument(
        "--steps", type=_positive_int, default=5, help="steps per check (default 5)"
    )
    _common(verify)

    bench = sub.add_parser(
        "bench",
        help="optimizer-step throughput per backend, state size and array size",
        description="Time adamnp.step on one float32 leaf per size (median of repeats after a "
        "warm-up) and report ns/element, the memory bandwidth it implies under a stated "
        "byte model, and its fraction of a same-process kernel moving the same bytes. "
        "Adds torch.optim.AdamW(fused=True) on the CPU when torch is installed.",
    )
    bench.add_argument(
        "--sizes",
        type=_sizes,
        default=[4096, 65536, 1 << 20, 1 << 22],
        help="comma-separated element counts (default 4096,65536,1048576,4194304)",
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        help="timed repeats; the median is shown (default 5)",
    )
    bench.add_argument(
        "--torch",
        choices=["auto", "no"],
        default="auto",
        help="auto (default): include torch's fused CPU AdamW when torch imports; no: skip it",
    )
    _common(bench)

    dist = sub.add_parser(
        "bench-dist",
        help="time a sharded (ZeRO-1) step's phases under MPI",
        description="Run under mpiexec (mpiexec -n N python -m mpi4py -m adamnp bench-dist). "
        "Times adamnp.distributed.step on one float32 model per size: reduce-scatter, "
        "allreduce, local step and all-gather from the slowest rank, bytes each rank sends "
        "against the ring minimum 2(N-1)/N x gradient bytes, state bytes per rank, and the "
        "same run's replicated data-parallel baseline (allreduce of the gradients, then a "
        "full step on every rank).",
    )
    dist.add_argument("--sizes", type=_sizes, default=[1 << 20, 1 << 23],
                      help="comma-separated element counts (default 1048576,8388608)")  # fmt: skip
    dist.add_argument("--repeats", type=_positive_int, default=7,
                      help="timed steps; the median is shown (default 7)")  # fmt: skip
    dist.add_argument("--bits", default="32", choices=["32", "8"], help="state bits (default 32)")
    dist.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba"])

    cons = sub.add_parser(
        "consolidate",
        help="turn a sharded checkpoint directory into one plain checkpoint",
        description="Read a checkpoint directory written by adamnp.distributed.save_state "
        "(index.json and one file per rank), validate every file, and write the whole state "
        "as one plain checkpoint (adamnp.load_state reads it; adamnp.distributed.load_state "
        "reads it at any number of ranks). No MPI needed.",
    )
    cons.add_argument("folder", help="the sharded checkpoint directory")
    cons.add_argument("out", help="the checkpoint file to write (e.g. whole.npz)")
    return parser


def main(argv=None) -> int:
    """Run ``python -m adamnp`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    # the commands compare and time the compiled kernels from the first step on: no NumPy
    # steps while they compile (adamnp._background), unless asked for
    os.environ.setdefault(ENV, "0")
    if args.command == "demo":
        from .demo import main as run
    elif args.command == "verify":
        from .verify import main as run
    elif args.command == "consolidate":
        return _consolidate(args)
    elif args.command == "bench-dist":
        from .bench_dist import main as run
    else:
        from .bench import main as run
    return run(args)


def _consolidate(args) -> int:
    import sys

    from .. import CheckpointError, save_state
    from ..distributed.files import read_sharded

    try:
        state = read_sharded(args.folder)
        save_state(args.out, state)
    except (CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: {len(state.paths)} leaves, step {state.step}, {state.nbytes()} bytes of state"
    )
    return 0
