"""Draw the figures of the docs: ``docs/img/convergence.png`` and ``docs/img/throughput.png``.

Usage (needs matplotlib, the ``docs`` extra)::

    python tools/make_plots.py                  # both figures, every backend available here
    python tools/make_plots.py --only throughput --sizes 1e3,1e5,1e7

convergence.png: full-data loss against the optimizer step for the demo problems
(``adamnp.cli.problems``), float32 vs 8-bit state, one line per available backend.
throughput.png: GB/s of ``adamnp.step`` (byte model of ``adamnp.cli.bench``) against the leaf
size, per backend and state size, with the traffic kernel (same bytes, no math) as the
ceiling, and torch's fused CPU AdamW when torch is installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's adamnp, even when another copy is installed

from adamnp.cli import bench as _bench  # noqa: E402
from adamnp.cli import common as _cli_common  # noqa: E402
from adamnp.cli.demo import train  # noqa: E402
from adamnp.cli.problems import PROBLEMS  # noqa: E402

OUT = ROOT / "docs" / "img"
STYLE = {"numpy": "-", "numba": "--", "cuda": ":", "torch": "-."}
COLOR = {32: "C0", 8: "C3"}


def machine() -> str:
    """A short description of this machine for figure titles."""
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}"


def convergence(path: Path, steps: int | None) -> None:
    """Loss vs step for each demo problem, backend and state size."""
    names, skipped = _cli_common.select("all")
    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(13, 4.2), layout="constrained")
    for ax, cls in zip(axes, PROBLEMS.values()):
        problem = cls()
        for bits in (32, 8):
            if bits == 8 and problem.name == "rosenbrock":
                continue
            for name in names:
                run = train(problem, name, bits, steps, checkpoints=60)
                if run.error:
                    print(f"{problem.name} {name} {bits}-bit: {run.error}", file=sys.stderr)
                    continue
                t, loss = zip(*run.history)
                ax.plot(t, loss, STYLE[name], color=COLOR[bits], lw=3.0 if bits == 32 else 1.4,
                        label=f"{name}, {bits}-bit state (final {run.loss:.4g})")  # fmt: skip
                print(f"{problem.name:<10} {name:<6} {bits:2d}-bit  final loss {run.loss:.4g}")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{problem.name}", fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("loss on the whole data set")
    note = f"AdamW; backends not available here: {', '.join(skipped)}" if skipped else "AdamW"
    fig.suptitle(f"adamnp demo problems: convergence ({note})", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput(path: Path, sizes: list[int], repeats: int) -> None:
    """GB/s against leaf size per backend and state size, with traffic-kernel ceilings."""
    names, skipped = _cli_common.select("all", with_reference=False)
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for name in names:
        for bits in (32, 8):
            xs, ys = [], []
            for n in sizes:
                try:
                    seconds, quantized = _bench.time_step(name, bits, n, repeats)
                except _cli_common.EIGHT_BIT_ERRORS as exc:
                    print(f"{name} 8-bit: {exc}", file=sys.stderr)
                    break
                if bits == 8 and not quantized:
                    continue  # below min_8bit_size: the state is float32
                xs.append(n)
                ys.append(_bench.bytes_per_element(8 if quantized else 32) * n / seconds / 1e9)
                print(f"{name:<6} {bits:2d}-bit n={n:>10,}  {ys[-1]:7.2f} GB/s")
            if xs:
                ax.plot(xs, ys, STYLE[name], marker="o", ms=4, color=COLOR[bits],
                        label=f"{name}, {bits}-bit state")  # fmt: skip
        kernel, owner = _bench.traffic_function(name)
        if kernel is not None and owner == name:
            ys = [28.0 * n / _bench.time_traffic(name, n, repeats)[0] / 1e9 for n in sizes]
            ax.plot(sizes, ys, STYLE[name], color="black", lw=1,
                    label=f"{name} traffic kernel (28 B/element, no math)")  # fmt: skip
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        ys = [28.0 * n / _bench.time_torch(n, repeats) / 1e9 for n in sizes]
        ax.plot(sizes, ys, STYLE["torch"], marker="s", ms=4, color="C2",
                label="torch AdamW(fused=True), CPU")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("elements in the leaf (float32)")
    ax.set_ylabel("GB/s (28 B/element at 32-bit state, 16.06 B at 8-bit)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    missing = f"; not available: {', '.join(skipped)}" if skipped else ""
    ax.set_title(f"adamnp.step throughput, median of {repeats}\n{machine()}{missing}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["convergence", "throughput"], default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per demo run")
    parser.add_argument(
        "--sizes",
        default="1e3,1e4,1e5,3e5,1e6,3e6,1e7",
        help="comma-separated leaf sizes for the throughput figure",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "convergence"):
        convergence(args.out / "convergence.png", args.steps)
    if args.only in (None, "throughput"):
        sizes = [int(float(s)) for s in args.sizes.split(",")]
        throughput(args.out / "throughput.png", sizes, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
