"""``python -m adamnp bench-dist``: the phases of a sharded step under MPI, against a
replicated data-parallel step in the same run.

Run it under ``mpiexec -n N python -m mpi4py -m adamnp bench-dist``. Each time is the median
over steps of the slowest rank's time (every phase is reduced with MAX across ranks).
"""

from __future__ import annotations

import time

import numpy as np

from .. import adamw, init, step

PHASES = ("validate", "reduce_scatter", "grad_check", "allreduce", "step", "allgather")


def _slowest(comm, values: list[float]) -> np.ndarray:
    buf = np.array(values, np.float64)
    comm.allreduce(buf, "max")
    return buf


def _replicated(comm, n: int, backend: str, bits: int, repeats: int) -> float:
    """Median seconds of a replicated step: allreduce of the gradients, mean, full step."""
    p = np.zeros(n, np.float32)
    state = init(p, adamw(lr=1e-3), backend=backend, state_bits=bits)
    g = np.full(n, 1e-3, np.float32)
    mean = np.empty_like(g)
    times = []
    for _ in range(repeats + 1):
        comm.barrier()
        t = time.perf_counter()
        mean[:] = g
        if comm.size > 1:
            comm.allreduce(mean, "sum")
        np.divide(mean, np.float32(comm.size), out=mean)
        step(p, mean, state)
        times.append(time.perf_counter() - t)
    return float(np.median(_slowest(comm, times[1:])))


def main(args) -> int:
    from ..distributed import init as dinit
    from ..distributed import step as dstep
    from ..distributed.comm import as_comm

    comm = as_comm(None)
    rows = []
    for n in args.sizes:
        state = dinit({"w": np.zeros(n, np.float32)}, adamw(lr=1e-3), comm,
                      backend=args.backend, state_bits=int(args.bits), min_8bit_size=1)  # fmt: skip
        state.grads["w"][...] = 1e-3
        phases = []
        for _ in range(args.repeats + 1):
            comm.barrier()
            dstep(state.params, state.grads, state)
            phases.append([state.timings[k] for k in PHASES])
        slow = np.array([_slowest(comm, row) for row in phases[1:]])
        med = np.median(slow, axis=0)
        total = float(np.median(slow.sum(axis=1)))
        base = _replicated(comm, n, state.local.backend, int(args.bits), args.repeats)
        padded = sum(b.size * b.grad_dtype.itemsize for b in state.layout.buckets)
        sent = 2 * (comm.size - 1) / comm.size * padded  # reduce-scatter + all-gather, ring
        ring_min = 2 * (comm.size - 1) / comm.size * n * 4
        state_bytes = np.array([state.nbytes()], np.float64)
        comm.allreduce(state_bytes, "max")
        block = state.layout.layout.block_size
        one_rank = n * 8 if int(args.bits) == 32 else n * 2 + -(-n // block) * 8
        rows.append((n, med, total, base, sent, ring_min, float(state_bytes[0]), one_rank))
    if comm.rank == 0:
        print(f"ranks: {comm.size}, state bits: {args.bits}, backend: {state.local.backend}; "
              "times in ms, median over steps of the slowest rank")  # fmt: skip
        head = ["elements", *PHASES, "sharded step", "replicated step", "bytes sent/rank",
                "ring minimum", "state bytes/rank", "one rank's"]  # fmt: skip
        print(" | ".join(head))
        for n, med, total, base, sent, ring, sb, one in rows:
            cells = [f"{n}", *(f"{x * 1e3:.3f}" for x in med), f"{total * 1e3:.3f}",
                     f"{base * 1e3:.3f}", f"{sent:.0f}", f"{ring:.0f}",
                     f"{sb:.0f} ({sb / one:.3f})", f"{one}"]  # fmt: skip
            print(" | ".join(cells))
    return 0
