"""The numbers of docs/backends.md, 8-bit state on the CPU: `python -m benchmarks.q8_vs_fp32`.

Not an asv benchmark (asv finds nothing to run here): one process, every comparison timed
as medians of interleaved repeats (:func:`._common.interleaved_medians`), so ratios stay
meaningful on a machine whose speed drifts. Takes about two minutes and 3 GB of memory.
"""

from __future__ import annotations

import numba
import numpy as np

import adamnp
from adamnp import quant
from adamnp.backends import numba as numba_cpu

from ._common import interleaved_medians, warm_state


def _step(state):
    return lambda: adamnp.step(*state)


def compare(n: int, nonfinite: str, budget_s: float = 6.0) -> str:
    """8-bit and float32 step, and both traffic kernels, on ``n`` elements."""
    q8 = warm_state("numba", 1, n, state_bits=8, nonfinite=nonfinite)
    fp32 = warm_state("numba", 1, n, nonfinite=nonfinite)
    a32 = [np.ones(n, np.float32) for _ in range(4)]
    a8 = [
        np.ones(n, np.float32),
        np.ones(n, np.float32),
        np.zeros(n, np.uint8),
        np.zeros(n, np.uint8),
    ]
    t8, t32, tr8, tr32 = interleaved_medians(
        _step(q8), _step(fp32),
        lambda: numba_cpu.traffic_kernel_q8(*a8), lambda: numba_cpu.traffic_kernel(*a32),
        budget_s=budget_s,
    )  # fmt: skip
    return (
        f"n={n:.1e} {nonfinite:9s} threads={numba.get_num_threads()}: "
        f"8-bit {t8 / n * 1e9:.3f} ns/el, float32 {t32 / n * 1e9:.3f} ns/el, "
        f"ratio {t8 / t32:.2f}; 8-bit/traffic_q8 {t8 / tr8:.2f}, float32/traffic {t32 / tr32:.2f}"
    )


def block_sizes(n: int = 16_000_000) -> str:
    """The 8-bit step with blocks of 64, 256 and 4096 against the float32 step."""
    fp32 = warm_state("numba", 1, n, nonfinite="propagate")
    sizes = (64, 256, 4096)
    q8 = [
        warm_state("numba", 1, n, state_bits=8, block_size=b, nonfinite="propagate") for b in sizes
    ]
    t32, *t8 = interleaved_medians(_step(fp32), *map(_step, q8), budget_s=8.0)
    parts = [f"block {b}: {t / n * 1e9:.3f} ns/el ({t / t32:.2f}x)" for b, t in zip(sizes, t8)]
    return f"n={n:.1e} propagate: float32 {t32 / n * 1e9:.3f} ns/el; " + ", ".join(parts)


def quantization(n: int = 16_000_000) -> str:
    """Public quantize_blockwise / dequantize_blockwise (outputs allocated per call)."""
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    codes, absmax = quant.quantize_blockwise(x, backend="numba")
    tq, td = interleaved_medians(
        lambda: quant.quantize_blockwise(x, backend="numba"),
        lambda: quant.dequantize_blockwise(codes, absmax, backend="numba"),
        budget_s=6.0,
    )
    return (
        f"n={n:.1e}: quantize_blockwise {n / tq / 1e9:.2f} G el/s ({tq / n * 1e9:.3f} ns/el), "
        f"dequantize_blockwise {n / td / 1e9:.2f} G el/s ({td / n * 1e9:.3f} ns/el)"
    )


def reference(n: int = 1_000_000) -> str:
    """The NumPy reference's 8-bit and float32 steps, and the Numba 8-bit step."""
    ref8, ref32 = warm_state("numpy", 1, n, state_bits=8), warm_state("numpy", 1, n)
    nb8 = warm_state("numba", 1, n, state_bits=8)
    t8, t32, tn = interleaved_medians(_step(ref8), _step(ref32), _step(nb8), budget_s=6.0)
    return (
        f"n={n:.1e} numpy: 8-bit {t8 / n * 1e9:.1f} ns/el, float32 {t32 / n * 1e9:.2f} ns/el "
        f"({t8 / t32:.0f}x); numba 8-bit {tn / n * 1e9:.3f} ns/el ({t8 / tn:.0f}x faster)"
    )


def main() -> None:
    for nonfinite in ("raise", "propagate"):
        for n in (1_000_000, 16_000_000, 64_000_000):
            print(compare(n, nonfinite), flush=True)
    print(block_sizes(), flush=True)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        print(compare(16_000_000, "propagate"), flush=True)
    finally:
        numba.set_num_threads(threads)
    print(quantization(), flush=True)
    print(reference(), flush=True)


if __name__ == "__main__":
    main()
