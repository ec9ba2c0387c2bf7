"""Checkpoints of a sharded state, at any number of ranks; consolidation into a plain state.

Two forms, both read at any number of ranks:

* **sharded** (a directory): one ordinary adamnp checkpoint per rank holding pieces
  (``shard-00001-of-00004.npz``, written by that rank: :func:`adamnp.save_state` of its
  ``state.local``) and ``index.json``, written last, naming the tree, the layout options and
  each file's pieces. A rank that loads reads only the files holding elements of its shard.
* **consolidated** (one file): the plain :func:`adamnp.save_state` checkpoint of the whole
  state, as one process would have written it (:func:`consolidate`).

Every rank's part of an unsharded leaf group is a contiguous range of that group's arena
(:meth:`~.layout.DistLayout.arena_range`), so both forms are moved by copying ranges. Files are
validated by :func:`adamnp.load_state` (whole, before use) and against the index.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .. import backends
from .._checkpoint import CheckpointError
from .._checkpoint import load_state as load_plain
from .._checkpoint import save_state as save_plain
from .._config import adam
from .._state import AdamState, Layout, amsgrad_of, build_groups
from .._tree import flatten, treedef_from_json, treedef_to_json, unflatten
from .._validate import validate_layout, validate_params
from ..backends.math import compute_dtype
from .comm import agree, as_comm
from .layout import DistLayout
from .state import (
    REDUCTIONS,
    DistState,
    _host_backend,
    _local_state,
    assemble,
    check_same,
)

INDEX = "index.json"
FORMAT = "adamnp-sharded-state"
VERSION = 1
_MAX_INDEX_BYTES = 64 << 20


def _shard_file(rank: int, nranks: int) -> str:
    return f"shard-{rank:05d}-of-{nranks:05d}.npz"


def _buffer_names(group, config, configs) -> list[str]:
    ams = (config if group.label is None else configs[group.label]).amsgrad
    moments = ("m", "v", "vmax") if ams else ("m", "v")
    if group.kind == "fp32":
        return list(moments)
    return [f"{p}_{x}" for x in moments for p in ("codes", "absmax")]


def _empty_like(group, name: str) -> np.ndarray:
    """An empty array of the dtype of ``group``'s buffer ``name`` (a rank holding none of
    the group sends it to a gather)."""
    if name.startswith("codes_"):
        return np.zeros(0, np.uint8)
    if name.startswith("absmax_"):
        return np.zeros(0, np.float32)
    return np.zeros(0, compute_dtype(group.param_dtype))


def _local_buffers(state: AdamState, layout: DistLayout) -> dict:
    """Global group index -> that group's buffers in ``state`` (a rank's local state)."""
    index = {(g.label, g.kind, g.param_dtype.name): gi for gi, g in enumerate(layout.groups)}
    return {index[(g.label, g.kind, g.param_dtype.name)]: g.buffers for g in state.groups}


def _plain_state(lay: DistLayout, config, configs, step, skipped, treedef, backend):
    """A zeroed plain state of the whole tree (host memory), to be filled."""
    amsgrad = amsgrad_of(config, configs)
    slots, groups = build_groups(lay.paths, lay.shapes, lay.dtypes, lay.layout, amsgrad,
                                 backends.get("numpy"), lay.labels)  # fmt: skip
    return AdamState(config=config, backend=backend, step=step, skipped_steps=skipped,
                     treedef=treedef, paths=lay.paths, shapes=lay.shapes, dtypes=lay.dtypes,
                     slots=slots, groups=groups, layout=lay.layout, labels=lay.labels,
                     configs=configs)  # fmt: skip


def consolidate(state: DistState, root: int = 0) -> AdamState | None:
    """The whole state as one plain :class:`~adamnp.AdamState` on rank ``root`` (None on the
    others). Collective: every rank calls it.

    The result is what :func:`adamnp.init` and :func:`adamnp.step` on one process would hold
    after the same steps, bit for bit: it can be saved with :func:`adamnp.save_state`,
    stepped with :func:`adamnp.step`, or compared. Each buffer is gathered with one
    ``Gatherv`` straight into the arrays of the result (no pickling).

    Examples
    --------
    >>> import numpy as np, adamnp, adamnp.distributed as ad
    >>> def run(comm):
    ...     state = ad.init({"w": np.ones(600, np.float32)}, adamnp.adam(), comm,
    ...                     backend="numpy", block_size=64)
    ...     full = ad.consolidate(state)
    ...     return None if full is None else full.slots[0].m.shape
    >>> ad.simulate(3, run)
    [(600,), None, None]
    """
    comm, lay, local = state.comm, state.layout, state.local
    if not (type(root) is int and 0 <= root < comm.size):
        raise ValueError(f"root must be a rank in 0..{comm.size - 1}, got {root!r}")
    full = None
    if comm.rank == root:
        full = _plain_state(lay, local.config, local.configs, local.step, local.skipped_steps,
                            state.treedef, local.backend)  # fmt: skip
    mine = _local_buffers(local, lay)
    for gi, g in enumerate(lay.groups):
        ranges = [lay.arena_range(r, gi) for r in range(comm.size)]
        for name in _buffer_names(g, local.config, local.configs):
            blocks = name.startswith("absmax_")
            counts = [(r[3] - r[2]) if blocks else (r[1] - r[0]) for r in ranges]
            send = mine[gi][name] if gi in mine else _empty_like(g, name)
            recv = full.groups[gi].buffers[name] if full is not None else None
            if comm.size == 1:
                recv[:] = send
            else:
                comm.gatherv(send, recv, counts, root)
    return full


def _write_index(folder: str, index: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".index.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, INDEX))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state(path, state: DistState, *, consolidated: bool = False) -> None:
    """Save a sharded state. Collective: every rank calls it with the same ``path``.

    ``consolidated=False`` (default): ``path`` is a directory (created if missing) that gets
    one ordinary adamnp checkpoint per rank with pieces of the state, then ``index.json``
    (written last, atomically: a directory whose index names files of an earlier save still
    loads that save). ``consolidated=True``: ``path`` is one plain checkpoint of the whole
    state (:func:`consolidate` on rank 0, then :func:`adamnp.save_state` there), readable by
    :func:`adamnp.load_state` too. Both load at any number of ranks (:func:`load_state`).

    Raises
    ------
    OSError, ValueError
        On every rank when any rank fails to write.

    Examples
    --------
    >>> import os, tempfile, numpy as np, adamnp, adamnp.distributed as ad
    >>> folder = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> def save(comm):
    ...     state = ad.init({"w": np.ones(1000, np.float32)}, adamnp.adam(), comm,
    ...                     backend="numpy")
    ...     ad.save_state(folder, state)
    >>> _ = ad.simulate(2, save)
    >>> sorted(os.listdir(folder))
    ['index.json', 'shard-00000-of-00002.npz', 'shard-00001-of-00002.npz']
    """
    comm, lay = state.comm, state.layout
    path = os.fspath(path)
    if consolidated:
        full = consolidate(state, 0)
        error = None
        if comm.rank == 0:
            try:
                save_plain(path, full)
            except (OSError, ValueError) as exc:
                error = exc
        agree(comm, error)
        return
    error = None
    if comm.rank == 0:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            error = exc
    agree(comm, error)
    pieces = state._pieces
    error = None
    if pieces:
        try:
            save_plain(os.path.join(path, _shard_file(comm.rank, comm.size)), state.local)
        except (OSError, ValueError) as exc:
            error = exc
    agree(comm, error)
    if comm.rank == 0:
        files = []
        for r in range(comm.size):
            cut = [[p.leaf, p.start, p.stop] for p in lay.pieces(r)]
            files.append({"file": _shard_file(r, comm.size) if cut else None, "pieces": cut})
        index = {
            "format": FORMAT,
            "version": VERSION,
            "nranks": comm.size,
            "step": state.step,
            "skipped_steps": state.skipped_steps,
            "reduce": state.reduce,
            "paths": list(lay.paths),
            "shapes": [list(s) for s in lay.shapes],
            "dtypes": [d.name for d in lay.dtypes],
            "labels": None if lay.labels is None else list(lay.labels),
            "treedef": treedef_to_json(state.treedef),
            "layout": {f: getattr(lay.layout, f) for f in Layout.__dataclass_fields__},
            "files": files,
        }
        try:
            _write_index(path, index)
        except OSError as exc:
            error = exc
    agree(comm, error)


def _bad(where: str, key: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {key} {why}")


def _read_index(folder: str) -> dict:
    """The validated index of a sharded checkpoint (sizes, types, consistency)."""
    where = os.path.join(folder, INDEX)
    size = os.path.getsize(where)
    if size > _MAX_INDEX_BYTES:
        raise _bad(where, "the index", f"has {size} bytes, more than {_MAX_INDEX_BYTES}")
    with open(where, "rb") as f:
        try:
            index = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _bad(where, "the index", f"is not JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise _bad(where, "'format'", f"is not {FORMAT!r}: not a sharded adamnp checkpoint")
    if index.get("version") != VERSION:
        raise _bad(where, "'version'", f"is {index.get('version')!r}; this adamnp reads {VERSION}")
    n = index.get("nranks")
    if type(n) is not int or not 1 <= n <= 1 << 20:
        raise _bad(where, "'nranks'", f"is {n!r}, not a positive int")
    for key in ("step", "skipped_steps"):
        if type(index.get(key)) is not int or not 0 <= index[key] < 2**63:
            raise _bad(where, repr(key), "is not a step count")
    if index.get("reduce") not in REDUCTIONS:
        raise _bad(where, "'reduce'", f"is not one of {REDUCTIONS}")
    paths, shapes, dtypes = index.get("paths"), index.get("shapes"), index.get("dtypes")
    if not (isinstance(paths, list) and isinstance(shapes, list) and isinstance(dtypes, list)
            and len(paths) == len(shapes) == len(dtypes)):  # fmt: skip
        raise _bad(where, "'paths', 'shapes', 'dtypes'", "are not lists of one length")
    for i, (p, s, d) in enumerate(zip(paths, shapes, dtypes)):
        if not isinstance(p, str):
            raise _bad(where, f"'paths'[{i}]", "is not a str")
        if not (isinstance(s, list) and all(type(x) is int and x >= 0 for x in s)):
            raise _bad(where, f"'shapes'[{i}]", "is not a list of sizes")
        if d not in ("float32", "float64", "float16", "bfloat16"):
            raise _bad(where, f"'dtypes'[{i}]", f"is {d!r}, not a param dtype")
    labels = index.get("labels")
    if labels is not None and not (isinstance(labels, list) and len(labels) == len(paths)
                                   and all(isinstance(x, str) for x in labels)):  # fmt: skip
        raise _bad(where, "'labels'", "is not null or one str per leaf")
    lay = index.get("layout")
    if not isinstance(lay, dict) or set(lay) != set(Layout.__dataclass_fields__):
        raise _bad(
            where, "'layout'", f"must have exactly the keys {list(Layout.__dataclass_fields__)}"
        )
    try:
        index["layout"] = validate_layout(
            paths,
            None,
            **{k: v for k, v in lay.items() if k != "state_bits"},
            state_bits=lay["state_bits"],
        )
    except (TypeError, ValueError) as exc:
        raise _bad(where, "'layout'", f"is invalid: {exc}") from None
    try:
        index["treedef"] = treedef_from_json(index.get("treedef"))
        _, _, tree_paths = flatten(unflatten(index["treedef"], [0] * len(paths)))
    except (TypeError, ValueError, StopIteration) as exc:
        raise _bad(where, "'treedef'", f"is invalid ({exc})") from None
    if tree_paths != paths:
        raise _bad(where, "'treedef'", "does not give the paths of 'paths'")
    files = index.get("files")
    if not (isinstance(files, list) and len(files) == n):
        raise _bad(where, "'files'", "is not one entry per rank")
    return index


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - depends on the environment
            raise CheckpointError(
                "the checkpoint holds bfloat16 leaves: pip install ml_dtypes to read it"
            ) from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _saved_layout(folder: str, index: dict) -> DistLayout:
    where = os.path.join(folder, INDEX)
    saved = DistLayout(index["paths"], [tuple(s) for s in index["shapes"]],
                       [_dtype(d) for d in index["dtypes"]], index["layout"], index["labels"],
                       index["nranks"])  # fmt: skip
    for r, entry in enumerate(index["files"]):
        cut = [[p.leaf, p.start, p.stop] for p in saved.pieces(r)]
        want = _shard_file(r, saved.nranks) if cut else None
        if not isinstance(entry, dict) or entry.get("pieces") != cut or entry.get("file") != want:
            raise _bad(where, f"'files'[{r}]", "does not match the layout the index describes")
    return saved


def _fill(folder: str, index: dict, saved: DistLayout, targets: dict, config,
          read_one: bool, loaded: dict) -> AdamState | None:  # fmt: skip
    """Copy into ``targets`` (global group -> ``(e0, e1, b0, b1, buffers)``) the ranges the
    saved files hold; read only the files that overlap them (with ``read_one``, at least
    one). Returns the last file's state (its config), or None when no file was read."""
    needed = []
    for r in range(saved.nranks):
        for gi, (e0, e1, _, _, _) in targets.items():
            f0, f1, _, _ = saved.arena_range(r, gi)
            if max(e0, f0) < min(e1, f1):
                needed.append(r)
                break
    if not needed and read_one:
        needed = [r for r in range(saved.nranks) if saved.pieces(r)][:1]
    st = None
    for r in needed:
        name = os.path.join(folder, index["files"][r]["file"])
        st = loaded.get(r)
        if st is None:
            st = loaded[r] = load_plain(name, backend="numpy", config=config)
        pieces = saved.pieces(r)
        if (list(st.shapes) != [(p.stop - p.start,) for p in pieces]
                or list(st.dtypes) != [saved.dtypes[p.leaf] for p in pieces]
                or st.step != index["step"] or st.skipped_steps != index["skipped_steps"]
                or st.layout.state_bits != saved.layout.state_bits
                or st.layout.block_size != saved.layout.block_size
                or st.layout.state_format != saved.layout.state_format
                or (st.labels is None) != (saved.labels is None)):  # fmt: skip
            raise CheckpointError(
                f"{name}: its leaves, step or layout do not match {INDEX} (a file of another "
                "save, or renamed)"
            )
        have = _local_buffers(st, saved)
        for gi, (e0, e1, b0, _b1, dst) in targets.items():
            f0, f1, c0, _c1 = saved.arena_range(r, gi)
            lo, hi = max(e0, f0), min(e1, f1)
            if lo >= hi:
                continue
            if gi not in have or set(have[gi]) != set(dst):
                raise CheckpointError(f"{name}: its moments do not match {INDEX}")
            for key, buf in dst.items():
                src = have[gi][key]
                if key.startswith("absmax_"):
                    blo, bhi = saved.block_range(gi, lo, hi)
                    buf[blo - b0 : bhi - b0] = src[blo - c0 : bhi - c0]
                else:
                    buf[lo - e0 : hi - e0] = src[lo - f0 : hi - f0]
    return st


def _open_sharded(folder: str, config):
    """``(index, saved layout, state of one saved file, fill)`` of the sharded checkpoint
    directory ``folder``. The state (read to learn the configs) is of the first file that
    holds elements; ``fill(targets)`` copies the ranges of ``targets`` from the files (as
    :func:`_fill`), reading each file at most once over all calls."""
    index = _read_index(folder)
    saved = _saved_layout(folder, index)
    loaded: dict = {}
    probe = _fill(folder, index, saved, {}, config, read_one=True, loaded=loaded)
    if probe is None:
        raise CheckpointError(f"{folder}: the checkpoint holds no elements")

    def fill(targets):
        _fill(folder, index, saved, targets, config, read_one=False, loaded=loaded)

    return index, saved, probe, fill


def _targets(layout: DistLayout, rank: int, state: AdamState) -> dict:
    have = _local_buffers(state, layout)
    return {gi: (*layout.arena_range(rank, gi), have[gi]) for gi in have}


def read_sharded(folder, *, config=None) -> AdamState:
    """The whole state of a sharded checkpoint directory as one plain
    :class:`~adamnp.AdamState` (numpy backend), without MPI: what ``python -m adamnp
    consolidate`` writes."""
    folder = os.fspath(folder)
    index, saved, probe, fill = _open_sharded(folder, config)
    treedef = index["treedef"]
    full = _plain_state(saved, probe.config, probe.configs, index["step"],
                        index["skipped_steps"], treedef, "numpy")  # fmt: skip
    targets = {}
    for gi, g in enumerate(full.groups):
        nb = 0 if g.block_offsets is None else int(g.block_offsets[-1])
        targets[gi] = (0, int(g.offsets[-1]), 0, nb, g.buffers)
    fill(targets)
    return full


def load_state(path, params, comm=None, *, backend: str = "auto", config=None,
               reduce: str | None = None) -> DistState:  # fmt: skip
    """Load a sharded or consolidated checkpoint at this run's number of ranks. Collective.

    ``params`` (every rank the same tree; rank 0's values are used, as in :func:`init`) must
    have the saved paths, shapes and dtypes. A directory is read as a sharded checkpoint
    (each rank reads only the files holding elements of its shard), a file as a plain one
    (every rank reads it whole). The result continues bit for bit as the saved state would
    have, at any number of ranks.

    Parameters
    ----------
    path : str or os.PathLike
    params : tree of arrays
    comm : mpi4py communicator, comm of :func:`simulate`, or None
    backend : {"auto", "numpy", "numba"}
    config : AdamConfig or mapping, optional
        As for :func:`adamnp.load_state` (needed when ``lr`` had a schedule).
    reduce : {"mean", "sum"}, optional
        Default: the saved one (``"mean"`` for a consolidated file).

    Raises
    ------
    CheckpointError
        A file that is corrupt, of another save, or does not match the params; raised on
        every rank.

    Examples
    --------
    >>> import os, tempfile, numpy as np, adamnp, adamnp.distributed as ad
    >>> folder = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> params = {"w": np.ones(1000, np.float32)}
    >>> def save(comm):  # 3 ranks save, 2 load
    ...     state = ad.init(params, adamnp.adam(), comm, backend="numpy")
    ...     ad.step(state.params, {"w": np.ones(1000, np.float32)}, state)
    ...     ad.save_state(folder, state)
    >>> _ = ad.simulate(3, save)
    >>> ad.simulate(2, lambda comm: ad.load_state(folder, params, comm).step)
    [1, 1]
    """
    comm = as_comm(comm)
    path = os.fspath(path)
    error = result = None
    try:
        result = _load_local(path, params, comm, backend, config, reduce)
    except (CheckpointError, TypeError, ValueError, OSError) as exc:
        error = exc
    agree(comm, error)
    dlayout, local, reduce, treedef, be, leaves = result
    check_same(comm, "the checkpoint and params", dlayout.paths, dlayout.shapes,
               [d.name for d in dlayout.dtypes], dlayout.layout, local.step, reduce)  # fmt: skip
    return assemble(comm, dlayout, local, reduce, treedef, be, leaves)


def _load_local(path, params, comm, backend, config, reduce):
    """What :func:`load_state` builds on this rank, before it agrees with the others."""
    if reduce is not None and reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    first = next(iter(config.values())) if isinstance(config, dict) else config
    leaves, treedef, paths, shapes, dtypes, _, _ = validate_params(
        params, first if first is not None else adam(), "numpy"
    )
    name, be = _host_backend(backend, leaves)
    if os.path.isdir(path):  # sharded: the index, and one file for the configs
        index, saved, source, fill = _open_sharded(path, config)
        step, skipped, reduce = index["step"], index["skipped_steps"], reduce or index["reduce"]
    else:  # consolidated: one plain checkpoint, read whole
        saved = source = load_plain(path, backend="numpy", config=config)
        step, skipped, reduce = source.step, source.skipped_steps, reduce or "mean"

        def fill(targets):
            have = _local_buffers(source, dlayout)
            for gi, (e0, e1, b0, b1, dst) in targets.items():
                for key, buf in dst.items():
                    lo, hi = (b0, b1) if key.startswith("absmax_") else (e0, e1)
                    buf[:] = have[gi][key][lo:hi]

    mine = list(zip(paths, shapes, dtypes))
    theirs = list(zip(saved.paths, saved.shapes, saved.dtypes))
    if mine != theirs:
        diff = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b),
                    min(len(mine), len(theirs)))  # fmt: skip
        where = paths[diff] if diff < len(paths) else f"leaf {diff}"
        raise CheckpointError(
            f"{path}: the params do not match the checkpoint (first at {where}; the "
            f"checkpoint has {len(theirs)} leaves, params {len(mine)})"
        )
    dlayout = DistLayout(paths, shapes, dtypes, saved.layout, saved.labels, comm.size)
    local = _local_state(dlayout, comm.rank, source.config, source.configs, name, be, step,
                         skipped)  # fmt: skip
    fill(_targets(dlayout, comm.rank, local))
    return dlayout, local, reduce, treedef, be, leaves
