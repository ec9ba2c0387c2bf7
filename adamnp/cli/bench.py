"""``python -m adamnp bench``: optimizer-step throughput per backend, state size and array size.

Byte model (bytes that must cross the memory bus per element of a float32 leaf, per step):

* 32-bit state: read ``p, g, m, v`` and write ``p, m, v``: 7 x 4 = 28 B;
* 8-bit state: read ``p, g`` (8 B) and two codes (2 B), write ``p`` (4 B) and two codes (2 B):
  16 B, plus two float32 absmax per block read and written: 16 B / 256 = 0.0625 B.

GB/s is that many bytes divided by the median step time. The *traffic kernel* of a backend
(``traffic_kernel(p, g, m, v)``: ``p, m, v += g`` with the step's parallel layout) moves the
28 B of a float32 step with no arithmetic; "% traffic" is the step's GB/s over the traffic
kernel's GB/s, measured in the same process on arrays of the same size: near 100% means the
step runs at the speed of memory.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import numpy as np

from . import common as cli

BLOCK = 256


def bytes_per_element(bits: int, block_size: int = BLOCK) -> float:
    """Bytes moved per float32 element and step under the byte model above.

    Examples
    --------
    >>> bytes_per_element(32), bytes_per_element(8)
    (28.0, 16.0625)
    """
    if bits == 32:
        return 28.0
    return 16.0 + 16.0 / block_size


def median_time(fn, sync=lambda: None, repeats: int = 5, min_time: float = 0.05) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` timed batches, after a warm-up.

    Two untimed calls warm up (JIT compilation, caches); each timed batch repeats ``fn`` enough
    times to last about ``min_time`` seconds; ``sync`` runs before each clock read.

    Examples
    --------
    >>> median_time(lambda: None, repeats=3, min_time=1e-4) < 1e-3
    True
    """
    fn()
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - start, 1e-9)
    inner = max(1, min(10_000, int(min_time / once)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def _arrays(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = (1e-2 * rng.standard_normal(n)).astype(np.float32)
    return p, g


def traffic_function(backend: str):
    """``(kernel, owner)``: the traffic kernel to compare ``backend`` with, or ``(None, None)``.

    A backend without one (the NumPy reference) is compared with the traffic kernel of another
    backend in the same memory (the host's Numba kernel).
    """
    from .. import backends

    candidates = [backend] + (["numba"] if backend in ("numpy", "torch") else [])
    for name in candidates:
        if backends.why_unavailable(name) is None:
            kernel = getattr(backends.get(name), "traffic_kernel", None)
            if kernel is not None:
                return kernel, name
    return None, None


def time_traffic(backend: str, n: int, repeats: int):
    """Seconds per traffic-kernel call on ``n`` float32 elements, and whose kernel it was."""
    kernel, owner = traffic_function(backend)
    if kernel is None:
        return None, None
    mover = cli.Mover(owner)
    p, g = _arrays(n)
    p, g, m, v = (mover.to_backend(a) for a in (p, g, np.zeros_like(p), np.zeros_like(p)))
    return median_time(lambda: kernel(p, g, m, v), mover.sync, repeats), owner


def time_step(backend: str, bits: int, n: int, repeats: int):
    """``(seconds per adamnp.step, state is 8-bit)`` for one float32 leaf of ``n`` elements."""
    import adamnp

    mover = cli.Mover(backend)
    p, g = (mover.to_backend(a) for a in _arrays(n))
    with warnings.catch_warnings():  # the table says whether the state is 8-bit
        warnings.simplefilter("ignore", UserWarning)
        state = adamnp.init(p, adamnp.adamw(lr=1e-4), backend=backend, state_bits=bits)
    quantized = any(isinstance(s, adamnp.QuantSlot) for s in state.slots)
    with cli.compile_notice(f"{backend}, {bits}-bit state"):
        adamnp.step(p, g, state)
    return median_time(lambda: adamnp.step(p, g, state), mover.sync, repeats), quantized


def time_torch(n: int, repeats: int):
    """Seconds per ``torch.optim.AdamW(fused=True).step()`` on the CPU, or raise."""
    import torch

    p, g = _arrays(n)
    param = torch.nn.Parameter(torch.from_numpy(p))
    param.grad = torch.from_numpy(g)
    opt = torch.optim.AdamW([param], lr=1e-4, fused=True)
    return median_time(opt.step, repeats=repeats)


def _row(name, bits, n, seconds, nbytes, traffic):
    gbs = nbytes * n / seconds / 1e9
    row = [name, bits, f"{n:,}", f"{seconds * 1e6:,.1f}", f"{seconds / n * 1e9:.3f}", f"{gbs:.2f}"]
    data = {"backend": name, "bits": bits, "size": n, "seconds": seconds, "gbs": gbs}
    if traffic[0] is None:
        row += ["-", "-"]
    else:
        tgbs = 28.0 * n / traffic[0] / 1e9
        share = 100 * gbs / tgbs
        row += [f"{tgbs:.2f} ({traffic[1]})", f"{share:.0f}%" if share < 1000 else ">999%"]
        data["traffic_gbs"] = tgbs
    return row, data


def bench(backends, bits, sizes, repeats, torch_too, out=None):
    """Measure everything; print ``.`` per measurement; return ``(rows, records, notes)``."""
    out = sys.stdout if out is None else out
    rows, records, notes = [], [], {}
    traffic_cache = {}
    for name in backends:
        for k in bits:
            for n in sizes:
                key = (cli.Mover(name).on_host, n)
                if key not in traffic_cache:
                    traffic_cache[key] = time_traffic(name, n, repeats)
                try:
                    seconds, quantized = time_step(name, k, n, repeats)
                except cli.EIGHT_BIT_ERRORS as exc:
                    if k != 8:
                        raise
                    notes[f"8-bit state not available: {type(exc).__name__}: {exc}"] = None
                    rows.append([name, k, "any", "n/a", "-", "-", "-", "-"])
                    break
                nbytes = bytes_per_element(8 if quantized else 32)
                if k == 8 and not quantized:
                    notes["8-bit rows marked * keep float32 moments (leaf < 4096 elements)"] = None
                row, data = _row(name, k, n, seconds, nbytes, traffic_cache[key])
                if k == 8 and not quantized:
                    row[1] = "8*"
                rows.append(row)
                records.append(data)
                print(".", end="", file=out, flush=True)
    if torch_too:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            for n in sizes:
                key = (True, n)
                if key not in traffic_cache:
                    traffic_cache[key] = time_traffic("torch", n, repeats)
                try:
                    seconds = time_torch(n, repeats)
                except (RuntimeError, TypeError, ValueError) as exc:
                    notes[f"torch fused AdamW skipped: {exc}"] = None
                    break
                row, data = _row("torch", 32, n, seconds, 28.0, traffic_cache[key])
                rows.append(row)
                records.append(data)
                print(".", end="", file=out, flush=True)
            notes[
                f"torch: torch.optim.AdamW(fused=True) on the CPU, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads"
            ] = None
    print(file=out)
    return rows, records, list(notes)


def main(args, out=None) -> int:
    """Entry point of ``python -m adamnp bench`` (``args`` from argparse)."""
    out = sys.stdout if out is None else out
    backends, skipped = cli.select(args.backend, with_reference=False)
    bits = cli.bits_list(args.bits)
    print(
        "adamnp bench: adamnp.step (AdamW) on one float32 leaf; median of "
        f"{args.repeats} timed repeats after a warm-up",
        file=out,
    )
    print(
        "byte model per element: 32-bit state 28 B (read p,g,m,v; write p,m,v); 8-bit state "
        "16.0625 B (read p,g + 2 codes; write p + 2 codes; 2 float32 absmax per 256 block, "
        "read and written)\n% traffic: GB/s of the step / GB/s of a same-process kernel "
        "moving the 28 B of a float32 step (the backend's traffic_kernel; numba's for numpy "
        "and torch)",
        file=out,
    )
    cli.print_backends(backends, skipped, bits, out)
    if cli.refuse_unavailable(args.backend, skipped, out):
        return 1
    print("measuring: ", end="", file=out, flush=True)
    rows, _, notes = bench(backends, bits, args.sizes, args.repeats, args.torch == "auto", out)
    headers = ["backend", "bits", "size", "us/step", "ns/elem", "GB/s", "traffic GB/s", "% traffic"]
    print(file=out)
    print(cli.table(headers, rows, right={1, 2, 3, 4, 5, 6, 7}), file=out)
    for note in notes:
        print(f"note: {note}", file=out)
    return 0
