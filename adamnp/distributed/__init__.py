"""Sharded optimizer state over MPI (ZeRO stage 1), bit-identical to one process.

Each of ``N`` ranks holds the moments of ``1/N`` of the params. A step reduce-scatters the
gradients (each rank gets the mean of its shard), decides clipping and non-finite gradients
together (one allreduce), steps its shard with the usual kernels and all-gathers the params.
Built on mpi4py (``pip install adamnp[mpi]``; ``pip install mpich`` gives an ``mpiexec``);
:func:`simulate` runs ranks as threads of one process, without MPI. See docs/distributed.md.

Examples
--------
>>> import numpy as np, adamnp, adamnp.distributed as ad
>>> def train(comm):
...     params = {"w": np.zeros(3000, np.float32), "b": np.zeros(3, np.float32)}
...     state = ad.init(params, adamnp.adamw(lr=0.01), comm, backend="numpy", state_bits=8,
...                     min_8bit_size=1000)
...     for _ in range(3):
...         for name, g in state.grads.items():
...             g[...] = 1.0  # this rank's gradients
...         ad.step(state.params, state.grads, state)
...     return round(float(state.params["w"][0]), 4), state.step
>>> ad.simulate(2, train)
[(-0.03, 3), (-0.03, 3)]
"""

from .comm import MPIComm, ThreadComm, simulate
from .files import consolidate, load_state, save_state
from .layout import DistLayout, Piece
from .state import DistState, init, step

__all__ = [
    "DistLayout",
    "DistState",
    "MPIComm",
    "Piece",
    "ThreadComm",
    "consolidate",
    "init",
    "load_state",
    "save_state",
    "simulate",
    "step",
]
