"""One MPI job of tests/test_mpi.py: ``mpiexec -n N python -m mpi4py tests/mpi_job.py OUT``.

Every check raises on failure (``python -m mpi4py`` then aborts the whole job with a non-zero
exit status). Checks, at this job's N ranks:

1. sharded steps equal one process bit for bit (float32 and both 8-bit formats, clipping,
   amsgrad, a skipped step), the gradients of rank r being a fixed tree of seed r whose sums
   are exact in any order (multiples of 2**-10);
2. a bad leaf on one rank raises on every rank, with nothing changed;
3. save (sharded and consolidated) into OUT, then load every checkpoint earlier jobs (other N)
   left in OUT and continue: equal to one process continuing the consolidated state.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from mpi4py import MPI

import adamnp
import adamnp.distributed as ad

SHAPES = {"a": (1000,), "b": (7,), "c": (3, 700), "d": (5000,), "e": (0,), "f": ()}
KW = {"min_8bit_size": 1000, "block_size": 64}
CASES = {
    # a schedule given as a function: its repr (an address) differs between the processes
    "fp32": ({}, adamnp.adamw(lr=lambda t: 1e-2 * 0.9**t, max_grad_norm=0.5)),
    "sqrt": ({"state_bits": 8}, adamnp.adam(lr=1e-2, amsgrad=True, max_grad_norm=0.5)),
    "bnb": (
        {"state_bits": 8, "state_format": "bnb", "v_rounding": "stochastic"},
        adamnp.adamw(lr=1e-2, nonfinite="skip"),
    ),
}


def tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: np.array(rng.integers(-512, 512, size=s) / 1024, np.float32)
            for k, s in SHAPES.items()}  # fmt: skip


def mean(seeds) -> dict:
    trees = [tree(s) for s in seeds]
    return {k: np.array(sum(t[k] for t in trees) / np.float32(len(trees)), np.float32)
            for k in SHAPES}  # fmt: skip


def same(a, b, what: str) -> None:
    da, db = adamnp.state_dict(a), adamnp.state_dict(b)
    for key in da["arrays"]:
        if da["arrays"][key].tobytes() != db["arrays"][key].tobytes():
            raise AssertionError(f"{what}: {key} differs")
    if (a.step, a.skipped_steps) != (b.step, b.skipped_steps):
        raise AssertionError(f"{what}: step counters differ")


def same_params(p, q, what: str) -> None:
    for k in SHAPES:
        if p[k].tobytes() != q[k].tobytes():
            raise AssertionError(f"{what}: params[{k!r}] differs")


def steps(comm, n: int, out: str) -> None:
    for name, (kw, cfg) in CASES.items():
        p0 = tree(999)
        state = ad.init({k: v.copy() for k, v in p0.items()}, cfg, comm, backend="numba",
                        **KW, **kw)  # fmt: skip
        grads = [tree(100 * t + comm.rank) for t in range(3)]
        if name == "bnb":
            grads[1]["d"][5] = np.nan if comm.rank == n - 1 else grads[1]["d"][5]
        for g in grads:
            ad.step(state.params, g, state)
        full = ad.consolidate(state)
        p = {k: v.copy() for k, v in p0.items()}
        single = adamnp.init(p, cfg, backend="numba", **KW, **kw)
        for t in range(3):
            m = mean([100 * t + r for r in range(n)])
            if name == "bnb" and t == 1:
                m["d"][5] = np.nan
            adamnp.step(p, m, single)
        same_params(state.params, p, f"{name} at {n} ranks, rank {comm.rank}")
        if comm.rank == 0:
            same(full, single, f"{name} at {n} ranks")
        if name == "sqrt":
            ad.save_state(os.path.join(out, f"ckpt-{n}"), state)
            ad.save_state(os.path.join(out, f"whole-{n}.npz"), state, consolidated=True)
            np.savez(os.path.join(out, f"params-{n}.npz"), **state.params)


def threads(comm) -> None:
    """Ranks sharing a machine share its cores (NUMBA_NUM_THREADS is not set here)."""
    import numba

    ad.init({"w": np.ones(10, np.float32)}, adamnp.adam(), comm, backend="numba")
    want = max(1, numba.config.NUMBA_NUM_THREADS // comm.Get_size())  # one machine here
    if numba.get_num_threads() != want:
        raise AssertionError(f"{numba.get_num_threads()} Numba threads, expected {want}")


def errors(comm) -> None:
    state = ad.init({"w": np.ones(3000, np.float32)}, adamnp.adamw(), comm, backend="numba")
    before = state.params["w"].copy()
    g = {"w": np.ones(3000 if comm.rank != comm.size - 1 else 2999, np.float32)}
    try:
        ad.step(state.params, g, state)
    except ValueError as exc:
        if "has shape (2999,)" not in str(exc):
            raise AssertionError(f"unexpected message: {exc}") from None
    else:
        raise AssertionError("a bad leaf on the last rank did not raise here")
    if state.step != 0 or state.params["w"].tobytes() != before.tobytes():
        raise AssertionError("a refused step changed the state")


def reshard(comm, n: int, out: str) -> None:
    for j in range(1, 5):
        folder = os.path.join(out, f"ckpt-{j}")
        if not os.path.isdir(folder):
            continue
        params = dict(np.load(os.path.join(out, f"params-{j}.npz")))
        whole = adamnp.load_state(os.path.join(out, f"whole-{j}.npz"), backend="numba")
        for source in (folder, os.path.join(out, f"whole-{j}.npz")):
            state = ad.load_state(source, params, comm, backend="numba")
            full = ad.consolidate(state)
            if comm.rank == 0:
                same(full, whole, f"{source} loaded at {n} ranks")
            ad.step(state.params, tree(7000 + comm.rank), state)
            p = {k: v.copy() for k, v in params.items()}
            single = adamnp.load_state(os.path.join(out, f"whole-{j}.npz"), backend="numba")
            adamnp.step(p, mean([7000 + r for r in range(n)]), single)
            same_params(state.params, p, f"{source} continued at {n} ranks")
            full = ad.consolidate(state)
            if comm.rank == 0:
                same(full, single, f"{source} continued at {n} ranks")


def main() -> None:
    out = sys.argv[1]
    comm = MPI.COMM_WORLD
    n = comm.Get_size()
    steps(comm, n, out)
    errors(comm)
    if "NUMBA_NUM_THREADS" not in os.environ:
        threads(comm)
    reshard(comm, n, out)
    comm.Barrier()
    if comm.Get_rank() == 0:
        print(f"mpi_job: {n} ranks ok")


if __name__ == "__main__":
    main()
