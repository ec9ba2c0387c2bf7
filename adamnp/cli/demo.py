"""``python -m adamnp demo``: train the built-in problems on every backend, print a table."""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .._tree import flatten
from . import common as cli
from .problems import PROBLEMS


@dataclass
class Run:
    """Outcome of training one problem on one backend with one ``state_bits``."""

    problem: str
    backend: str
    bits: int
    error: str | None = None  # why it could not run (e.g. 8-bit state not available)
    loss: float = float("nan")
    steps_per_s: float = float("nan")  # optimizer steps only; the first (JIT) step excluded
    state_mb: float = float("nan")
    history: list = field(default_factory=list)  # (step, full-data loss)
    params: object = None  # final params, host arrays


def train(
    problem, backend: str, bits: int, steps: int | None = None, *, checkpoints=5, on_loss=None
):
    """Train ``problem`` with AdamW; return a :class:`Run`.

    The loss on the whole data set is recorded at ``checkpoints + 1`` evenly spaced steps
    (including 0 and ``steps``) and passed to ``on_loss(step, loss)`` as it is computed.
    Only :func:`adamnp.step` is timed. Missing 8-bit support (``ImportError`` or
    ``NotImplementedError``) is reported in ``Run.error`` instead of raised.

    Examples
    --------
    >>> from adamnp.cli.problems import Rosenbrock
    >>> run = train(Rosenbrock(), "numpy", 32, steps=500)
    >>> run.loss < 0.1, len(run.history)
    (True, 6)
    """
    import adamnp

    steps = problem.steps if steps is None else int(steps)
    run = Run(problem.name, backend, bits)
    mover = cli.Mover(backend)
    host = problem.params0()
    params = mover.to_backend(host)
    marks = sorted({round(steps * i / checkpoints) for i in range(checkpoints + 1)})

    def record(t):
        loss = problem.loss(host)
        run.history.append((t, loss))
        if on_loss is not None:
            on_loss(t, loss)

    try:
        with warnings.catch_warnings():  # the table says whether the state is 8-bit
            warnings.simplefilter("ignore", UserWarning)
            state = adamnp.init(params, problem.config(), backend=backend, state_bits=bits)
        record(0)
        elapsed = 0.0
        for t in range(steps):
            grads = mover.to_backend(problem.grad(host, t))
            start = time.perf_counter()
            if t == 0:
                with cli.compile_notice(f"{backend}, {bits}-bit state"):
                    adamnp.step(params, grads, state)
            else:
                adamnp.step(params, grads, state)
            mover.sync()
            if t > 0:
                elapsed += time.perf_counter() - start
            host = mover.to_host(params)
            if t + 1 in marks:
                record(t + 1)
    except cli.EIGHT_BIT_ERRORS as exc:
        if bits != 8:
            raise
        run.error = f"8-bit state not available: {type(exc).__name__}: {exc}"
        return run
    run.loss = run.history[-1][1]
    run.steps_per_s = (steps - 1) / elapsed if steps > 1 and elapsed > 0 else float("nan")
    run.state_mb = state.nbytes() / 1e6
    run.params = mover.to_host(params, copy=True)
    return run


def max_deviation(a, b) -> float:
    """Largest absolute difference between two trees of arrays (float64 arithmetic)."""
    la, _, _ = flatten(a)
    lb, _, _ = flatten(b)
    return max(
        (
            float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))
            for x, y in zip(la, lb)
        ),
        default=0.0,
    )


def _fmt(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)


def run_demo(problems, backends, bits, steps=None, out=None) -> list[Run]:
    """Train every problem x backend x bits, print progress and a results table."""
    out = sys.stdout if out is None else out
    runs = []
    jobs = [
        (p, b, k)
        for p in problems
        for k in bits
        if not (k == 8 and p.name == "rosenbrock")
        for b in backends
    ]
    width = max(len(p.name) for p in problems)
    for i, (problem, backend, k) in enumerate(jobs, 1):
        count = f"[{i:{len(str(len(jobs)))}d}/{len(jobs)}]"
        prefix = f"{count} {problem.name:<{width}}  {backend:<5}  {k:2d}-bit  loss"
        print(prefix, end="", file=out, flush=True)
        arrow = [""]

        def show(t, loss, arrow=arrow):
            print(f"{arrow[0]} {loss:.4g}", end="", file=out, flush=True)
            arrow[0] = " ->"

        start = time.perf_counter()
        run = train(problem, backend, k, steps, on_loss=show)
        tail = "  n/a (see below)" if run.error else f"  ({time.perf_counter() - start:.1f} s)"
        print(tail, file=out, flush=True)
        runs.append(run)
    ref = {(r.problem, r.bits): r for r in runs if r.backend == "numpy" and r.error is None}
    rows = []
    for r in runs:
        if r.error:
            rows.append([r.problem, r.backend, r.bits, "n/a", "-", "-", "-"])
            continue
        base = ref.get((r.problem, r.bits))
        if r.backend == "numpy":
            dev = "reference"
        elif base is None:
            dev = "-"
        else:
            dev = f"{max_deviation(r.params, base.params):.3g}"
        rows.append(
            [r.problem, r.backend, r.bits, _fmt(r.loss, ".5g"), _fmt(r.steps_per_s, ",.0f"),
             _fmt(r.state_mb, ".4f"), dev]
        )  # fmt: skip
    headers = [
        "problem",
        "backend",
        "bits",
        "final loss",
        "steps/s",
        "state MB",
        "max |dp| vs numpy",
    ]
    print(file=out)
    print(cli.table(headers, rows), file=out)
    for reason in dict.fromkeys(r.error for r in runs if r.error):
        print(f"n/a: {reason}", file=out)
    return runs


def main(args, out=None) -> int:
    """Entry point of ``python -m adamnp demo`` (``args`` from argparse)."""
    out = sys.stdout if out is None else out
    names = list(PROBLEMS) if args.problem == "all" else [args.problem]
    problems = [PROBLEMS[n]() for n in names]
    backends, skipped = cli.select(args.backend)
    bits = cli.bits_list(args.bits)
    print("adamnp demo: AdamW on built-in problems (synthetic data, nothing downloaded)", file=out)
    for p in problems:
        print(f"  {p.name:<10}  {p.summary}", file=out)
    cli.print_backends(backends, skipped, bits, out)
    if cli.refuse_unavailable(args.backend, skipped, out):
        return 1
    if 8 in bits and any(p.name == "rosenbrock" for p in problems):
        print(
            "  rosenbrock runs with 32-bit state only: 8-bit moments apply to float32 leaves "
            "of >= 4096 elements, so its 10 float64 values keep full-precision moments",
            file=out,
        )
    print("training (loss on all data at 0%, 20%, ..., 100% of the steps):", file=out)
    run_demo(problems, backends, bits, args.steps, out=out)
    print(
        "\nsteps/s: adamnp.step calls per second; gradients and the first step (which may "
        "compile) excluded\nstate MB: optimizer state, state.nbytes() / 1e6\n"
        "max |dp| vs numpy: largest parameter difference from the NumPy reference run with "
        "the same bits",
        file=out,
    )
    return 0
