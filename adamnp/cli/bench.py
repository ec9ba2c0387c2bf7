"""``python -m adamnp bench``: optimizer-step throughput per backend, state size and array size.

Byte model (bytes that must cross the memory bus per element of a float32 leaf, per step):

* 32-bit state: read ``p, g, m, v`` and write ``p, m, v``: 7 x 4 = 28 B;
* 8-bit state: read ``p, g`` (8 B) and two codes (2 B), write ``p`` (4 B) and two codes (2 B):
  16 B, plus two float32 absmax per block read and written: 16 B / 256 = 0.0625 B.

GB/s is that many bytes divided by the median step time. The *traffic kernel* of a backend
(``traffic_kernel(p, g, m, v)``: ``p, m, v += g`` with the step's parallel layout) moves the
28 B of a float32 step with no arithmetic; "% traffic" is the step's GB/s over the traffic
kernel's GB/s, measured in the same process on arrays of the same size: near 100% means the
step runs at the speed of memory. The step uses the default ``nonfinite="raise"``, whose check
reads g once more (4 B per element beyond the model: a float32 step at the speed of memory
shows about 88%).
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


#: Interquartile range over median above which a timing counts as unstable.
UNSTABLE_SPREAD = 0.2


def interleaved_times(calls, repeats: int = 5, min_time: float = 0.05) -> list[tuple]:
    """``(median seconds per call, spread)`` of each ``(fn, sync)`` in ``calls``, timed in
    alternation: ``repeats`` rounds in which each function runs one timed batch in turn, so
    that drift and other processes hit all of them alike. ``spread`` is the interquartile
    range of the batches over their median.

    Two untimed calls of each warm up (JIT compilation, caches); each batch repeats ``fn``
    enough times to last about ``min_time`` seconds; ``sync`` runs before each clock read.

    Examples
    --------
    >>> [(t < 1e-3, s >= 0) for t, s in interleaved_times([(lambda: None, lambda: None)], 3, 1e-4)]
    [(True, True)]
    """
    inner = []
    for fn, sync in calls:
        fn()
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        once = max(time.perf_counter() - start, 1e-9)
        inner.append(max(1, min(10_000, int(min_time / once))))
    samples = [[] for _ in calls]
    for _ in range(repeats):
        for (fn, sync), count, out in zip(calls, inner, samples):
            start = time.perf_counter()
            for _ in range(count):
                fn()
            sync()
            out.append((time.perf_counter() - start) / count)
    result = []
    for out in samples:
        median = statistics.median(out)
        q1, q3 = np.percentile(out, [25, 75])
        result.append((median, float((q3 - q1) / median) if median > 0 else 0.0))
    return result


def median_time(fn, sync=lambda: None, repeats: int = 5, min_time: float = 0.05) -> float:
    """Median seconds per call of ``fn`` (:func:`interleaved_times` of ``fn`` alone).

    Examples
    --------
    >>> median_time(lambda: None, repeats=3, min_time=1e-4) < 1e-3
    True
    """
    return interleaved_times([(fn, sync)], repeats, min_time)[0][0]


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


def traffic_call(backend: str, n: int):
    """``((fn, sync), owner)``: a call of the traffic kernel on ``n`` float32 elements for
    ``backend`` and whose kernel it is, or ``(None, None)``."""
    kernel, owner = traffic_function(backend)
    if kernel is None:
        return None, None
    mover = cli.Mover(owner)
    p, g = _arrays(n)
    p, g, m, v = (mover.to_backend(a) for a in (p, g, np.zeros_like(p), np.zeros_like(p)))
    return (lambda: kernel(p, g, m, v), mover.sync), owner


def time_traffic(backend: str, n: int, repeats: int):
    """Seconds per traffic-kernel call on ``n`` float32 elements, and whose kernel it was."""
    call, owner = traffic_call(backend, n)
    if call is None:
        return None, None
    return median_time(*call, repeats), owner


def step_call(backend: str, bits: int, n: int):
    """``((fn, sync), state is 8-bit)``: ``adamnp.step`` on one float32 leaf of ``n``
    elements, its first step (the compile) taken."""
    import adamnp

    mover = cli.Mover(backend)
    p, g = (mover.to_backend(a) for a in _arrays(n))
    with warnings.catch_warnings():  # the table says whether the state is 8-bit
        warnings.simplefilter("ignore", UserWarning)
        state = adamnp.init(p, adamnp.adamw(lr=1e-4), backend=backend, state_bits=bits)
    quantized = any(isinstance(s, adamnp.QuantSlot) for s in state.slots)
    with cli.compile_notice(f"{backend}, {bits}-bit state"):
        adamnp.step(p, g, state)
    return (lambda: adamnp.step(p, g, state), mover.sync), quantized


def time_step(backend: str, bits: int, n: int, repeats: int):
    """``(seconds per adamnp.step, state is 8-bit)`` for one float32 leaf of ``n`` elements."""
    call, quantized = step_call(backend, bits, n)
    return median_time(*call, repeats), quantized


def torch_call(n: int):
    """``(fn, sync)``: ``torch.optim.AdamW(fused=True).step()`` on the CPU (raises without
    torch)."""
    import torch

    p, g = _arrays(n)
    param = torch.nn.Parameter(torch.from_numpy(p))
    param.grad = torch.from_numpy(g)
    opt = torch.optim.AdamW([param], lr=1e-4, fused=True)
    return opt.step, lambda: None


def time_torch(n: int, repeats: int):
    """Seconds per ``torch.optim.AdamW(fused=True).step()`` on the CPU, or raise."""
    return median_time(*torch_call(n), repeats=repeats)


UNSTABLE_NOTE = (
    "? : the repeats of this row varied by more than "
    f"{UNSTABLE_SPREAD:.0%} (interquartile range over median; other work on this machine?): "
    "its numbers and its % traffic are not reliable; rerun with more --repeats on a quieter "
    "machine"
)


def measure(call, traffic, repeats: int):
    """``(seconds, spread, traffic seconds or None, owner)``: the step ``call`` and the
    traffic kernel ``traffic = ((fn, sync), owner)`` timed in alternation."""
    (traffic_fn, owner) = traffic
    calls = [call] if traffic_fn is None else [call, traffic_fn]
    times = interleaved_times(calls, repeats)
    seconds, spread = times[0]
    if traffic_fn is None:
        return seconds, spread, None, None
    return seconds, max(spread, times[1][1]), times[1][0], owner


def _row(name, bits, n, seconds, nbytes, traffic, spread=0.0):
    gbs = nbytes * n / seconds / 1e9
    row = [name, bits, f"{n:,}", f"{seconds * 1e6:,.1f}", f"{seconds / n * 1e9:.3f}", f"{gbs:.2f}"]
    data = {"backend": name, "bits": bits, "size": n, "seconds": seconds, "gbs": gbs}
    data["spread"] = spread
    unstable = spread > UNSTABLE_SPREAD
    if traffic[0] is None:
        row += ["-", "-"]
    else:
        tgbs = 28.0 * n / traffic[0] / 1e9
        share = 100 * gbs / tgbs
        unstable = unstable or share > 150  # faster than moving its bytes: a timing artefact
        row += [f"{tgbs:.2f} ({traffic[1]})", "?" if unstable else f"{share:.0f}%"]
        data["traffic_gbs"] = tgbs
    data["unstable"] = unstable
    if unstable:
        row[3] += " ?"
    return row, data


def bench(backends, bits, sizes, repeats, torch_too, out=None):
    """Measure everything; print ``.`` per measurement; return ``(rows, records, notes)``.

    Each row's step and its traffic kernel are timed in alternation (:func:`measure`); a row
    whose repeats vary too much is marked ``?`` with a note instead of a ratio."""
    out = sys.stdout if out is None else out
    rows, records, notes = [], [], {}
    traffic_calls = {}

    def add(name, k, n, call, nbytes, on_host, kernel_of=None):
        key = (on_host, n)  # one traffic kernel per memory and size, as in the byte model
        if key not in traffic_calls:
            traffic_calls[key] = traffic_call(kernel_of or name, n)
        seconds, spread, t_seconds, owner = measure(call, traffic_calls[key], repeats)
        row, data = _row(name, k, n, seconds, nbytes, (t_seconds, owner), spread)
        if data["unstable"]:
            notes[UNSTABLE_NOTE] = None
        rows.append(row)
        records.append(data)
        print(".", end="", file=out, flush=True)
        return row

    for name in backends:
        for k in bits:
            for n in sizes:
                try:
                    call, quantized = step_call(name, k, n)
                except cli.EIGHT_BIT_ERRORS as exc:
                    if k != 8:
                        raise
                    notes[f"8-bit state not available: {type(exc).__name__}: {exc}"] = None
                    rows.append([name, k, "any", "n/a", "-", "-", "-", "-"])
                    break
                nbytes = bytes_per_element(8 if quantized else 32)
                row = add(name, k, n, call, nbytes, cli.Mover(name).on_host)
                if k == 8 and not quantized:
                    notes["8-bit rows marked * keep float32 moments (leaf < 4096 elements)"] = None
                    row[1] = "8*"
    if torch_too:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            for n in sizes:
                try:
                    call = torch_call(n)
                    add("torch", 32, n, call, 28.0, True, kernel_of="numpy")
                except (RuntimeError, TypeError, ValueError) as exc:
                    notes[f"torch fused AdamW skipped: {exc}"] = None
                    break
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
