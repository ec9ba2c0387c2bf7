"""Checkpoints: `save_state` / `load_state` in a versioned, self-describing ``.npz`` file.

Layout: an uncompressed zip (NumPy ``.npz``) holding one JSON header, ``__adamnp__`` (a 0-d
unicode array), and one array per leaf and moment, named ``leaf<i>/<field>``. The header records
the format name and version, the configuration, the step counters, the tree structure and, for
every leaf, its path, shape, dtype, slot kind and the dtype and shape of each stored array.
Loading checks all of it and every CRC; nothing is cast. No pickle is involved.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

from . import backends
from ._config import AdamConfig, adam, adamw
from ._state import AdamState, Fp32Slot, QuantSlot, build_groups
from ._tree import treedef_from_json, treedef_to_json

FORMAT = "adamnp-state"
VERSION = 1
HEADER = "__adamnp__"


def _config_to_json(cfg: AdamConfig) -> dict:
    return {
        "optimizer": cfg.name,
        "lr": None if callable(cfg.lr) else cfg.lr,
        "lr_schedule": repr(cfg.lr) if callable(cfg.lr) else None,
        "betas": list(cfg.betas),
        "eps": cfg.eps,
        "weight_decay": cfg.weight_decay,
        "amsgrad": cfg.amsgrad,
        "maximize": cfg.maximize,
        "nonfinite": cfg.nonfinite,
        "max_grad_norm": cfg.max_grad_norm,
    }


def _slot_fields(slot) -> dict:
    names = Fp32Slot._fields[:3] if isinstance(slot, Fp32Slot) else QuantSlot._fields[:6]
    return {n: getattr(slot, n) for n in names if getattr(slot, n) is not None}


def save_state(path, state: AdamState) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename).

    A crash while writing leaves any previous file at ``path`` intact. Device (CUDA) state
    is copied to the host first. The file is a NumPy ``.npz`` readable with
    ``allow_pickle=False``; see :func:`load_state`.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; written exactly as given (no suffix is added).
    state : AdamState

    Examples
    --------
    >>> import os, tempfile, numpy as np, adamnp
    >>> p = np.ones(3, np.float32)
    >>> state = adamnp.init(p, adamnp.adamw(), backend="numpy")
    >>> adamnp.step(p, np.ones(3, np.float32), state)
    >>> path = os.path.join(tempfile.mkdtemp(), "opt.npz")
    >>> adamnp.save_state(path, state)
    >>> adamnp.load_state(path).step
    1
    """
    if not isinstance(state, AdamState):
        raise TypeError(f"state must be an AdamState, got {type(state).__name__}")
    be = backends.get(state.backend)
    arrays = {}
    leaves = []
    for i, slot in enumerate(state.slots):
        fields = {}
        for name, arr in _slot_fields(slot).items():
            host = be.to_host(arr)
            arrays[f"leaf{i}/{name}"] = host
            fields[name] = {"dtype": host.dtype.str, "shape": list(host.shape)}
        entry = {
            "path": state.paths[i],
            "shape": list(state.shapes[i]),
            "dtype": state.dtypes[i].str,
            "slot": "fp32" if isinstance(slot, Fp32Slot) else "q8",
            "arrays": fields,
        }
        if isinstance(slot, QuantSlot):
            entry.update(block_size=slot.block_size, map_m=slot.map_m, map_v=slot.map_v)
        leaves.append(entry)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": _config_to_json(state.config),
        "backend": state.backend,
        "step": int(state.step),
        "skipped_steps": int(state.skipped_steps),
        "state_bits": state.state_bits,
        "block_size": state.block_size,
        "v_rounding": state.v_rounding,
        "treedef": treedef_to_json(state.treedef),
        "leaves": leaves,
    }
    arrays[HEADER] = np.array(json.dumps(header))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adamnp-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable where the platform allows it
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - e.g. Windows
        pass


class CheckpointError(ValueError):
    """A file that is not a readable adamnp checkpoint of a supported version.

    Raised by :func:`load_state` for truncated, corrupted (CRC mismatch), foreign or
    newer-format files and for arrays that disagree with the header. A ``ValueError``.
    """


def _read_all(path) -> dict:
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise CheckpointError(
            f"{os.fspath(path)} is not a readable adamnp checkpoint (damaged, truncated or "
            f"not an .npz file): {exc}"
        ) from exc


def _expect(cond: bool, path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{os.fspath(path)}: {what}")


def _config_from_json(c: dict, path) -> AdamConfig | None:
    make = {"adam": adam, "adamw": adamw}.get(c.get("optimizer"))
    _expect(make is not None, path, f"unknown optimizer {c.get('optimizer')!r} in header")
    if c.get("lr") is None:
        return None
    try:
        return make(
            lr=c["lr"],
            betas=tuple(c["betas"]),
            eps=c["eps"],
            weight_decay=c["weight_decay"],
            amsgrad=c["amsgrad"],
            maximize=c["maximize"],
            nonfinite=c["nonfinite"],
            max_grad_norm=c["max_grad_norm"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{os.fspath(path)}: bad configuration in header: {exc}") from exc


def load_state(path, *, backend: str | None = None, config: AdamConfig | None = None) -> AdamState:
    """Read a checkpoint written by :func:`save_state`.

    Parameters
    ----------
    path : str or os.PathLike
    backend : {"numpy", "numba", "cuda"}, optional
        Where to put the state; default: the backend it was saved from.
    config : AdamConfig, optional
        Required when the saved configuration had a schedule for ``lr`` (a callable cannot be
        stored). When given, every field except ``lr`` must equal the saved one.

    Returns
    -------
    AdamState
        Bit-identical to the saved state (no dtype is ever converted).

    Raises
    ------
    CheckpointError
        (a ``ValueError``) for a truncated, corrupted, foreign or newer-format file, or one
        whose arrays do not match its header.

    Examples
    --------
    See :func:`save_state`.
    """
    data = _read_all(path)
    _expect(HEADER in data, path, "no adamnp header: not an adamnp checkpoint")
    try:
        header = json.loads(str(data.pop(HEADER)[()]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{os.fspath(path)}: unreadable header: {exc}") from exc
    _expect(
        isinstance(header, dict) and header.get("format") == FORMAT,
        path,
        "header does not describe an adamnp state",
    )
    version = header.get("version")
    _expect(isinstance(version, int), path, f"bad format version {version!r}")
    if version > VERSION:
        raise CheckpointError(
            f"{os.fspath(path)} has format version {version}, newer than this adamnp reads "
            f"({VERSION}); upgrade adamnp"
        )
    _expect(version == VERSION, path, f"unsupported format version {version}")
    try:
        saved_cfg = _config_from_json(header["config"], path)
        treedef = treedef_from_json(header["treedef"])
        leaves = header["leaves"]
        step, skipped = header["step"], header["skipped_steps"]
        state_bits, block_size = header["state_bits"], header["block_size"]
        saved_backend = header["backend"]
        v_rounding = header.get("v_rounding", "nearest")  # files from before the option
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{os.fspath(path)}: incomplete header: {exc}") from exc
    if config is None:
        if saved_cfg is None:
            raise ValueError(
                f"{os.fspath(path)} was saved with an lr schedule "
                f"({header['config'].get('lr_schedule')}); pass config=... to load_state"
            )
        config = saved_cfg
    else:
        if not isinstance(config, AdamConfig):
            raise TypeError(f"config must be an AdamConfig, got {type(config).__name__}")
        mine = _config_to_json(config)
        theirs = header["config"]
        for key in mine:
            if key not in ("lr", "lr_schedule") and mine[key] != theirs.get(key):
                raise ValueError(
                    f"config.{key} is {mine[key]!r} but the checkpoint was saved with "
                    f"{theirs.get(key)!r}"
                )
    name = saved_backend if backend is None else backend
    be = backends.get(name)
    why = be.availability()
    if why is not None:
        raise RuntimeError(f"backend {name!r} cannot run here: {why}; pass backend=...")
    _expect(
        isinstance(step, int) and step >= 0 and isinstance(skipped, int) and skipped >= 0,
        path,
        "bad step counters",
    )
    _expect(isinstance(leaves, list), path, "bad leaf table")
    _expect(v_rounding in ("nearest", "stochastic"), path, f"bad v_rounding {v_rounding!r}")
    shapes, dtypes, use_q8, paths = [], [], [], []
    for entry in leaves:
        try:
            shapes.append(tuple(int(d) for d in entry["shape"]))
            dtypes.append(np.dtype(entry["dtype"]))
            use_q8.append(entry["slot"] == "q8")
            paths.append(entry["path"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{os.fspath(path)}: bad leaf entry: {exc}") from exc
    slots, groups = build_groups(shapes, dtypes, use_q8, config.amsgrad, block_size, be, v_rounding)
    expected = set()
    for i, slot in enumerate(slots):
        for field, dst in _slot_fields(slot).items():
            key = f"leaf{i}/{field}"
            expected.add(key)
            _expect(key in data, path, f"missing array {key} ({paths[i]})")
            src = data[key]
            _expect(
                src.dtype == np.dtype(dst.dtype),
                path,
                f"{key} ({paths[i]}) has dtype {src.dtype}, expected {np.dtype(dst.dtype)}",
            )
            _expect(
                src.shape == tuple(dst.shape),
                path,
                f"{key} ({paths[i]}) has shape {src.shape}, expected {tuple(dst.shape)}",
            )
            be.copy_from_host(dst, src)
        if isinstance(slot, QuantSlot):
            e = leaves[i]
            _expect(
                e.get("block_size") == slot.block_size
                and e.get("map_m") == slot.map_m
                and e.get("map_v") == slot.map_v,
                path,
                f"{paths[i]}: 8-bit layout (block size or maps) not supported",
            )
    extra = sorted(set(data) - expected)
    _expect(not extra, path, f"unexpected arrays {extra[:3]}")
    return AdamState(
        config=config,
        backend=name,
        step=step,
        skipped_steps=skipped,
        treedef=treedef,
        paths=tuple(paths),
        shapes=tuple(shapes),
        dtypes=tuple(dtypes),
        slots=slots,
        groups=groups,
        state_bits=state_bits,
        block_size=block_size,
        v_rounding=v_rounding,
    )
