"""The sharded state (:class:`DistState`), :func:`init` and :func:`step`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from types import SimpleNamespace

import numpy as np

from .. import backends
from .._api import check_init
from .._config import AdamConfig
from .._state import MIN_8BIT_SIZE, AdamState, Layout, amsgrad_of, build_groups
from .._tree import first_difference, flatten, unflatten
from .._validate import as_base_array, leaf_error, nonfinite_verdict, warn_layout
from ..backends.math import clip_scale, host_scalars, square_bound
from ..lowbit.half import half_format, to_f32_array
from .comm import agree, as_comm
from .layout import DistLayout

REDUCTIONS = ("mean", "sum")


class DistState:
    """A ZeRO-1 optimizer state: each rank holds the moments of its shard of the params.

    Made by :func:`init` or :func:`~adamnp.distributed.load_state`; stepped by :func:`step`.

    Attributes
    ----------
    params, grads : tree
        Trees shaped like the params given to :func:`init`, whose leaves are views into the
        state's flat buffers (one per dtype). Use ``params`` as the model's parameters (they
        are updated in place, the same on every rank) and write gradients into ``grads``
        (``grads['w'][...] = g``), or pass other gradient arrays to :func:`step` (copied).
    local : AdamState
        This rank's shard: an ordinary state whose leaves (a list) are the pieces of the
        params this rank owns (``layout.pieces(rank)``), with its moments.
    layout : DistLayout
        Where every element lives (:mod:`adamnp.distributed.layout`).
    rank, nranks : int
    reduce : {"mean", "sum"}
        How gradients are combined across ranks.
    timings : dict
        Seconds the last step spent in each phase: ``"validate"`` (the inputs, agreed by all
        ranks), ``"reduce_scatter"`` (with the division of ``"mean"``), ``"grad_check"``
        (this rank's non-finite check and squared norm), ``"allreduce"`` (of those two),
        ``"step"`` (the kernels on this rank's shard), ``"allgather"`` (the params).
    """

    def __init__(self, comm, layout: DistLayout, local: AdamState, reduce: str, treedef, be):
        self.comm = comm
        self.layout = layout
        self.local = local
        self.reduce = reduce
        self.treedef = treedef
        self.rank, self.nranks = comm.rank, comm.size
        self._be = be
        self.flat_params, self.flat_grads, self._shard_grads = {}, {}, {}
        p_leaves: list = [None] * len(layout.paths)
        g_leaves: list = [None] * len(layout.paths)
        for b in layout.buckets:
            name = b.param_dtype.name
            fp = self.flat_params[name] = np.zeros(b.size, b.param_dtype)
            fg = self.flat_grads[name] = np.zeros(b.size, b.grad_dtype)
            for leaf, start in zip(b.leaf_ids, b.starts):
                n, shape = layout.sizes[leaf], layout.shapes[leaf]
                p_leaves[leaf] = fp[start : start + n].reshape(shape)
                g_leaves[leaf] = fg[start : start + n].reshape(shape)
            # this rank's reduced gradients (a one-rank state steps on the gradients given)
            self._shard_grads[name] = np.zeros(b.shard if comm.size > 1 else 0, b.grad_dtype)
        self._p_leaves, self._g_leaves = p_leaves, g_leaves
        self.params = unflatten(treedef, p_leaves)
        self.grads = unflatten(treedef, g_leaves)
        bucket_of = {b.param_dtype.name: b for b in layout.buckets}
        self._pieces = layout.pieces(self.rank)
        self._p_pieces, self._g_pieces = [], []
        for piece in self._pieces:
            name = layout.dtypes[piece.leaf].name
            n = piece.stop - piece.start
            self._p_pieces.append(self.flat_params[name][piece.flat : piece.flat + n])
            lo = piece.flat - self.rank * bucket_of[name].shard
            self._g_pieces.append(self._shard_grads[name][lo : lo + n])
        # below it, a shard's sum of squares proves its gradients good (clipping's step)
        self._square_bound = square_bound(layout.dtypes)
        self.timings: dict = {}

    @property
    def step(self) -> int:
        """Steps taken (every rank the same)."""
        return self.local.step

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (``nonfinite="skip"``)."""
        return self.local.skipped_steps

    @property
    def config(self) -> AdamConfig:
        return self.local.config

    def nbytes(self) -> int:
        """Bytes of this rank's moment buffers."""
        return self.local.nbytes()

    def __repr__(self) -> str:
        return (
            f"DistState(rank={self.rank}/{self.nranks}, step={self.step}, "
            f"leaves={len(self.layout.paths)}, pieces={len(self._pieces)}, "
            f"state_bytes={self.nbytes()})"
        )


def _digest(*parts) -> np.ndarray:
    """Four int64 words of a SHA-256 of ``parts`` (compared across ranks). Memory addresses
    in reprs (a schedule's function, ``<function f at 0x...>``) differ between processes
    and are left out."""
    text = json.dumps([re.sub(r" at 0x[0-9a-fA-F]+", "", repr(p)) for p in parts]).encode()
    return np.frombuffer(hashlib.sha256(text).digest(), np.int64).copy()


def check_same(comm, what: str, *parts) -> None:
    """Raise ``ValueError`` on every rank unless every rank passed equal ``parts``."""
    if comm.size == 1:
        return
    lo, hi = _digest(*parts), _digest(*parts)
    comm.allreduce(lo, "min")
    comm.allreduce(hi, "max")
    if not np.array_equal(lo, hi):
        raise ValueError(f"the ranks disagree on {what}: every rank must pass the same ones")


def _local_state(layout: DistLayout, rank: int, config, configs, backend: str, be, step=0,
                 skipped=0) -> AdamState:  # fmt: skip
    """This rank's shard as an :class:`AdamState` over its pieces, zeroed, its groups keyed
    for stochastic rounding as the unsharded groups are."""
    pieces = layout.pieces(rank)
    treedef, paths = flatten([np.zeros(0)] * len(pieces))[1:]  # a list: params[0], ...
    shapes = [(p.stop - p.start,) for p in pieces]
    dtypes = [layout.dtypes[p.leaf] for p in pieces]
    labels = None if layout.labels is None else [layout.labels[p.leaf] for p in pieces]
    q8 = {leaf for g in layout.groups if g.kind == "q8" for leaf in g.leaf_ids.tolist()}
    lay = layout.layout
    kept = tuple(p for p, pc in zip(paths, pieces) if pc.leaf not in q8)
    local_layout = Layout(lay.state_bits, lay.state_format, lay.block_size, 1, lay.v_rounding, kept)
    amsgrad = amsgrad_of(config, configs)
    slots, groups = build_groups(paths, shapes, dtypes, local_layout, amsgrad, be, labels)
    index = {(g.label, g.kind, g.param_dtype.name): gi for gi, g in enumerate(layout.groups)}
    for group in groups:
        gi = index[(group.label, group.kind, group.param_dtype.name)]
        group.hash_tag = int(layout.groups[gi].leaf_ids[0])
        group.index_base = layout.arena_range(rank, gi)[0]
    return AdamState(
        config=config,
        backend=backend,
        step=step,
        skipped_steps=skipped,
        treedef=treedef,
        paths=tuple(paths),
        shapes=tuple(shapes),
        dtypes=tuple(dtypes),
        slots=slots,
        groups=groups,
        layout=local_layout,
        labels=None if labels is None else tuple(labels),
        configs=configs,
    )


def _host_backend(backend: str, leaves) -> tuple[str, object]:
    name = backends.resolve(backend, leaves)
    if name == "cuda":
        raise ValueError(
            "adamnp.distributed runs on host arrays (backend 'numpy' or 'numba'); CUDA device "
            "arrays are not supported yet (docs/distributed.md has the GPU plan)"
        )
    return name, backends.get(name)


def init(
    params,
    config: AdamConfig | Mapping[str, AdamConfig],
    comm=None,
    *,
    reduce: str = "mean",
    labels: Callable[[str, object], str] | object | None = None,
    backend: str = "auto",
    state_bits: int = 32,
    block_size: int = 256,
    min_8bit_size: int = MIN_8BIT_SIZE,
    keep_fp32: Collection[str] | Callable[[str, object], bool] | None = None,
    state_format: str = "sqrt",
    v_rounding: str | None = None,
) -> DistState:
    """A sharded (ZeRO-1) state for ``params`` over the ranks of ``comm``. Collective.

    Every rank passes the same tree (shapes, dtypes) and options; the values of rank 0's
    params become every rank's. With the numba backend and several ranks on one machine,
    the calling thread's Numba threads are set to the rank's share of the cores
    (:func:`share_cores`) unless ``NUMBA_NUM_THREADS`` is set. The state copies the params
    into flat buffers: from here on use ``state.params`` (views into those buffers) as the
    parameters, and ``state.grads`` for the gradients (:class:`DistState`).

    Parameters
    ----------
    params, config, labels, backend, state_bits, block_size, min_8bit_size, keep_fp32,
    state_format, v_rounding
        As for :func:`adamnp.init`; the 8-bit or full-precision choice is made per whole
        leaf. ``backend`` is ``"numpy"``, ``"numba"`` or ``"auto"`` (host arrays only).
    comm : mpi4py communicator, comm of :func:`simulate`, or None
        None: ``MPI.COMM_WORLD``.
    reduce : {"mean", "sum"}
        Gradients are summed over ranks, then divided by the number of ranks (``"mean"``,
        float division, as ``sum / nranks``) or not.

    Returns
    -------
    DistState

    Raises
    ------
    TypeError, ValueError
        As :func:`adamnp.init`, on every rank when any rank's input is bad (no rank is
        left waiting), or when the ranks disagree on the tree or the options.

    Examples
    --------
    >>> import numpy as np, adamnp, adamnp.distributed as ad
    >>> def train(comm):
    ...     state = ad.init({"w": np.ones(1000, np.float32)}, adamnp.adam(lr=0.1), comm,
    ...                     backend="numpy")
    ...     state.grads["w"][...] = comm.rank + 1.0  # the mean over 2 ranks is 1.5
    ...     ad.step(state.params, state.grads, state)
    ...     return round(float(state.params["w"][0]), 6), state.nbytes()
    >>> ad.simulate(2, train)  # moments (2 x 4 bytes) of 512 and 488 elements
    [(0.9, 4096), (0.9, 3904)]
    """
    comm = as_comm(comm)
    error = got = None
    try:
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        # validated as host arrays; the backend is resolved below (host backends only)
        got = check_init(params, config, labels, "numpy", state_bits=state_bits,
                         state_format=state_format, block_size=block_size,
                         min_8bit_size=min_8bit_size, v_rounding=v_rounding,
                         keep_fp32=keep_fp32)  # fmt: skip
        name, be = _host_backend(backend, got.leaves)
        warn_layout(got.layout, got.paths, got.shapes, got.dtypes)
    except (TypeError, ValueError) as exc:
        error = exc
    agree(comm, error)
    check_same(comm, "the params tree and options", got.paths, got.shapes,
               [d.name for d in got.dtypes], got.layout, got.labels, got.config, got.configs,
               name, reduce)  # fmt: skip
    dlayout = DistLayout(got.paths, got.shapes, got.dtypes, got.layout, got.labels, comm.size)
    local = _local_state(dlayout, comm.rank, got.config, got.configs, name, be)
    return assemble(comm, dlayout, local, reduce, got.treedef, be, got.leaves)


def assemble(comm, layout: DistLayout, local: AdamState, reduce: str, treedef, be,
             leaves) -> DistState:  # fmt: skip
    """The :class:`DistState` of this rank's ``local`` state, its flat buffers holding rank
    0's values of the param ``leaves`` (what :func:`init` and
    :func:`~adamnp.distributed.load_state` end with); the rank's threads set by
    :func:`share_cores`."""
    share_cores(comm, local.backend)
    state = DistState(comm, layout, local, reduce, treedef, be)
    for leaf, dst in zip(leaves, state._p_leaves):
        dst[...] = as_base_array(leaf)
    if comm.size > 1:
        for flat in state.flat_params.values():
            comm.bcast(_bits(flat), 0)
    return state


def share_cores(comm, backend: str) -> None:
    """Give the calling thread's Numba kernels this rank's share of the machine's cores:
    ``cores // ranks on this machine`` (at least 1), unless ``NUMBA_NUM_THREADS`` is set
    (then it is the user's choice) or one rank runs here. Without it every rank would start
    a thread per core and the ranks' threads would compete for them."""
    if backend != "numba" or "NUMBA_NUM_THREADS" in os.environ:
        return
    here = comm.ranks_on_this_machine()
    if here > 1:
        import numba

        numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS // here))


def _bits(flat: np.ndarray) -> np.ndarray:
    """``flat`` as MPI can move it: half-precision values as their uint16 bits."""
    return flat.view(np.uint16) if half_format(flat.dtype) >= 0 else flat


def _check(params, grads, state: DistState) -> list:
    """The gradient leaves of a step, or the error that refuses it (nothing changed)."""
    lay = state.layout
    p_leaves, p_def, p_paths = flatten(params)
    diff = first_difference(p_def, state.treedef, "params", "the state's params")
    if diff is not None:
        raise ValueError(f"params do not match the state: {diff}")
    for path, a, own in zip(p_paths, p_leaves, state._p_leaves):
        if not (isinstance(a, np.ndarray) and a.shape == own.shape and a.dtype == own.dtype
                and a.__array_interface__["data"][0] == own.__array_interface__["data"][0]
                and a.flags.c_contiguous):  # fmt: skip
            raise ValueError(
                f"{path} is not the state's own parameter array: a sharded state keeps the "
                "params in flat buffers that every rank updates; use state.params (its "
                "leaves, unchanged) as the parameters"
            )
    g_leaves, g_def, g_paths = flatten(grads, "grads")
    diff = first_difference(g_def, state.treedef, "grads", "params")
    if diff is not None:
        raise ValueError(f"grads do not match params: {diff}")
    out = []
    owned = [b for b in state.flat_params.values()]
    owned += [buf for g in state.local.groups for buf in g.buffers.values()]
    for i, (path, a) in enumerate(zip(g_paths, g_leaves)):
        err = leaf_error(path, a, state._be, "grads", lay.shapes[i], lay.dtypes[i])
        if err is not None:
            raise err
        a = as_base_array(a)
        if state.nranks == 1 and any(np.may_share_memory(a, b) for b in owned):
            raise ValueError(
                f"{path} shares memory with the params or the optimizer state; pass a "
                "separate gradient array (state.grads has one per leaf)"
            )
        out.append(a)
    return out


def _first_bad_leaf(state: DistState, g_pieces) -> int:
    """The smallest tree index of a leaf whose gradient is non-finite, over all ranks."""
    be = state._be
    mine = [p.leaf for p, g in zip(state._pieces, g_pieces) if be.nonfinite_leaf([g]) >= 0]
    bad = np.array([min(mine, default=len(state.layout.paths))], np.int64)
    if state.nranks > 1:
        state.comm.allreduce(bad, "min")
    return int(bad[0])


def step(params, grads, state: DistState) -> None:
    """One Adam/AdamW step of a sharded state. Collective: every rank calls it.

    Reduce-scatters the gradients (each rank gets the mean, or sum, of its shard over all
    ranks), checks them for non-finite values and computes the global norm with one
    allreduce, steps this rank's shard with the backend's kernels, and all-gathers the
    params. Params and state end equal, bit for bit, to :func:`adamnp.step` on one process
    given the reduced gradients; stochastic rounding is keyed by the unsharded element
    indices.

    Parameters
    ----------
    params : tree
        ``state.params``.
    grads : tree
        Gradients shaped like params (this rank's): ``state.grads`` (no copy) or other
        arrays (copied into it first). Float16/bfloat16 params take float32 gradient
        buffers (sums in float32).
    state : DistState

    Raises
    ------
    TypeError, ValueError
        A bad leaf on any rank, or non-finite gradients under ``nonfinite="raise"`` (named),
        raise on every rank; nothing is changed on any rank.

    Examples
    --------
    See :func:`init`.
    """
    if not isinstance(state, DistState):
        raise TypeError(
            f"state must be a DistState from adamnp.distributed.init or load_state, got "
            f"{type(state).__name__}"
        )
    comm, local, be, lay = state.comm, state.local, state._be, state.layout
    timings = state.timings = {}
    t0 = time.perf_counter()
    with local._lock:
        error, g_leaves = None, None
        try:
            g_leaves = _check(params, grads, state)
            configs = {g.label: local.config_of(g) for g in local.groups}
            lrs = {label: c.lr_at(local.step) for label, c in configs.items()}
        except (TypeError, ValueError) as exc:
            error = exc
        agree(comm, error)
        cfg = local.config
        if state.nranks == 1:  # no communication and no copies: step on the grads given
            g_pieces = [g_leaves[p.leaf].reshape(-1) for p in state._pieces]
        else:
            g_pieces = state._g_pieces
            for a, own in zip(g_leaves, state._g_leaves):
                if a.__array_interface__["data"][0] != own.__array_interface__["data"][0]:
                    fmt = half_format(a.dtype)
                    own[...] = a if fmt < 0 else to_f32_array(a.view(np.uint16), fmt)
        t1 = time.perf_counter()
        timings["validate"] = t1 - t0
        if state.nranks > 1:
            for name, flat in state.flat_grads.items():
                shard = state._shard_grads[name]
                comm.reduce_scatter(flat, shard)
                if state.reduce == "mean":
                    np.divide(shard, shard.dtype.type(state.nranks), out=shard)
        t2 = time.perf_counter()
        timings["reduce_scatter"] = t2 - t1
        totals = np.zeros(2, np.float64)  # sum of squares, ranks with a non-finite gradient
        if cfg.max_grad_norm is not None:
            totals[0] = be.grad_sq_norm(g_pieces)
        # a local sum of squares below the bound proves this rank's gradients good
        clipped_ok = cfg.max_grad_norm is not None and totals[0] < state._square_bound
        if cfg.nonfinite != "propagate" and not clipped_ok:
            totals[1] = float(be.nonfinite_leaf(g_pieces) >= 0)
        t3 = time.perf_counter()
        timings["grad_check"] = t3 - t2
        if state.nranks > 1 and (cfg.nonfinite != "propagate" or cfg.max_grad_norm is not None):
            comm.allreduce(totals, "sum")
        t4 = time.perf_counter()
        timings["allreduce"] = t4 - t3
        if totals[1] > 0:
            bad = _first_bad_leaf(state, g_pieces)
            shim = SimpleNamespace(config=cfg, dtypes=lay.dtypes)
            if not nonfinite_verdict(bad, lay.paths, shim):
                local.skipped_steps += 1
                return
        grad_scale = 1.0
        if cfg.max_grad_norm is not None:
            grad_scale = clip_scale(float(totals[0]), cfg.max_grad_norm)
        for group in local.groups:
            s = host_scalars(configs[group.label], local.step + 1, lrs[group.label], grad_scale)
            be.step_group(group, state._p_pieces, g_pieces, s)
        t5 = time.perf_counter()
        timings["step"] = t5 - t4
        if state.nranks > 1:
            for flat in state.flat_params.values():
                comm.allgather(_bits(flat))
        timings["allgather"] = time.perf_counter() - t5
        local.step += 1
