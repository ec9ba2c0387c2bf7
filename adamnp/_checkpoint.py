"""Checkpoints: `save_state` / `load_state` in a versioned, self-describing ``.npz`` file.

Layout: an uncompressed zip (NumPy ``.npz``) holding one JSON header, ``__adamnp__`` (a 0-d
unicode array), and one array per leaf and moment, named ``leaf<i>/<field>``. The header records
the format name and version, the configuration, the step counters, the tree structure and, for
every leaf, its path, shape, dtype, slot kind and the dtype and shape of each stored array.
Loading checks all of it and every CRC; nothing is cast. No pickle is involved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import zipfile

import numpy as np

from . import backends
from ._config import OPTION_NAMES, AdamConfig, adam, adamw
from ._state import MIN_8BIT_SIZE, AdamState, Layout, QuantSlot, build_groups
from ._tree import treedef_from_json, treedef_to_json
from ._validate import FLOAT_DTYPES, validate_layout

FORMAT = "adamnp-state"
VERSION = 1
HEADER = "__adamnp__"
_SLOT_KINDS = ("fp32", "q8")  # a leaf entry's "slot"
_SCALARS = int | str  # fields of a slot stored in its leaf entry; arrays are stored apart


def _json(value):
    return list(value) if isinstance(value, tuple) else value


def _config_to_json(cfg: AdamConfig) -> dict:
    """``optimizer`` (adam or adamw) and every option; a schedule is stored as its repr."""
    out = {"optimizer": cfg.name}
    for name in OPTION_NAMES:
        value = getattr(cfg, name)
        if name == "lr":
            out["lr"] = None if callable(value) else value
            out["lr_schedule"] = repr(value) if callable(value) else None
        else:
            out[name] = _json(value)
    return out


def _saved_config(c) -> dict:
    """The header's configuration; an option with a default in :class:`AdamConfig` (one added
    after the file was written) that it lacks gets that default."""
    if not isinstance(c, dict):
        return c
    defaults = {
        f.name: _json(f.default)
        for f in dataclasses.fields(AdamConfig)
        if f.default is not dataclasses.MISSING
    }
    return {**defaults, **c}


#: Header keys of the layout: the fields of :class:`~adamnp._state.Layout`.
LAYOUT_KEYS = tuple(f.name for f in dataclasses.fields(Layout))
# Layout keys that files written before they were recorded lack; see _layout_from_header.
_LATER_LAYOUT_KEYS = ("v_rounding", "min_8bit_size", "keep_fp32")


def _layout_to_json(layout: Layout) -> dict:
    return {name: _json(value) for name, value in dataclasses.asdict(layout).items()}


def _slot_arrays(slot) -> dict:
    """The arrays of a slot by field name (without amsgrad's, which are None otherwise)."""
    return {n: v for n, v in slot._asdict().items() if not isinstance(v, _SCALARS | None)}


def _slot_scalars(slot) -> dict:
    """The other fields of a slot (a :class:`QuantSlot`'s block size and maps), by name."""
    return {n: v for n, v in slot._asdict().items() if isinstance(v, _SCALARS)}


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
        for name, arr in _slot_arrays(slot).items():
            host = be.to_host(arr)
            arrays[f"leaf{i}/{name}"] = host
            fields[name] = {"dtype": host.dtype.str, "shape": list(host.shape)}
        entry = {
            "path": state.paths[i],
            "shape": list(state.shapes[i]),
            "dtype": state.dtypes[i].str,
            "slot": "q8" if isinstance(slot, QuantSlot) else "fp32",
            "arrays": fields,
        }
        entry.update(_slot_scalars(slot))
        leaves.append(entry)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": _config_to_json(state.config),
        "backend": state.backend,
        "step": int(state.step),
        "skipped_steps": int(state.skipped_steps),
        **_layout_to_json(state.layout),
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
    _expect(isinstance(c, dict), path, f"bad configuration in header: {c!r}")
    make = {"adam": adam, "adamw": adamw}.get(c.get("optimizer"))
    _expect(make is not None, path, f"unknown optimizer {c.get('optimizer')!r} in header")
    if c.get("lr") is None:
        return None
    try:
        return make(**{name: c[name] for name in OPTION_NAMES})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{os.fspath(path)}: bad configuration in header: {exc}") from exc


def _layout_from_header(header: dict, paths, shapes, dtypes, use_q8, path) -> Layout:
    """The saved layout, checked as :func:`adamnp.init` checks its options.

    Files written before some layout keys were recorded get the values that describe their
    slots: ``v_rounding="nearest"`` (the only rounding then); as ``min_8bit_size`` the default
    when that explains the 8-bit leaves, else the size of the smallest one; as ``keep_fp32``
    the float32 leaves that would then be 8-bit but are not.
    """
    saved = {k: header[k] for k in LAYOUT_KEYS if k in header}
    missing = [k for k in LAYOUT_KEYS if k not in saved and k not in _LATER_LAYOUT_KEYS]
    _expect(not missing, path, f"incomplete header: no {', '.join(missing)}")
    saved.setdefault("v_rounding", "nearest")
    if "min_8bit_size" not in saved:
        sizes = [math.prod(s) for s, q in zip(shapes, use_q8) if q]
        saved["min_8bit_size"] = min([*sizes, MIN_8BIT_SIZE])
    keep = saved.pop("keep_fp32", None)
    _expect(
        "keep_fp32" not in header
        or (isinstance(keep, list) and all(isinstance(p, str) for p in keep)),
        path,
        f"bad layout in header: keep_fp32 must be a list of leaf paths, got {keep!r}",
    )
    try:
        layout = validate_layout(paths, None, keep_fp32=keep, **saved)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{os.fspath(path)}: bad layout in header: {exc}") from exc
    if "keep_fp32" not in header:
        would = layout.eight_bit(paths, shapes, dtypes)
        kept = tuple(p for p, w, q in zip(paths, would, use_q8) if w and not q)
        layout = dataclasses.replace(layout, keep_fp32=kept)
    return layout


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
        theirs = _saved_config(header["config"])
        saved_cfg = _config_from_json(theirs, path)
        treedef = treedef_from_json(header["treedef"])
        leaves = header["leaves"]
        step, skipped = header["step"], header["skipped_steps"]
        saved_backend = header["backend"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{os.fspath(path)}: incomplete header: {exc}") from exc
    if config is None:
        if saved_cfg is None:
            raise ValueError(
                f"{os.fspath(path)} was saved with an lr schedule "
                f"({theirs.get('lr_schedule')}); pass config=... to load_state"
            )
        config = saved_cfg
    else:
        if not isinstance(config, AdamConfig):
            raise TypeError(f"config must be an AdamConfig, got {type(config).__name__}")
        mine = _config_to_json(config)
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
    shapes, dtypes, kinds, paths = [], [], [], []
    for entry in leaves:
        try:
            shapes.append(tuple(int(d) for d in entry["shape"]))
            dtypes.append(np.dtype(entry["dtype"]))
            kinds.append(entry["slot"])
            paths.append(entry["path"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{os.fspath(path)}: bad leaf entry: {exc}") from exc
        _expect(
            isinstance(paths[-1], str) and kinds[-1] in _SLOT_KINDS and dtypes[-1] in FLOAT_DTYPES,
            path,
            f"bad leaf entry: {paths[-1]!r} with slot {kinds[-1]!r} and dtype {dtypes[-1]}",
        )
    use_q8 = [kind == "q8" for kind in kinds]
    layout = _layout_from_header(header, paths, shapes, dtypes, use_q8, path)
    slots, groups = build_groups(paths, shapes, dtypes, layout, config.amsgrad, be)
    expected = set()
    for i, slot in enumerate(slots):
        _expect(
            isinstance(slot, QuantSlot) == use_q8[i],
            path,
            f"{paths[i]} has {kinds[i]} moments, which its layout in the header does not give it",
        )
        for field, dst in _slot_arrays(slot).items():
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
        _expect(
            all(leaves[i].get(n) == v for n, v in _slot_scalars(slot).items()),
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
        layout=layout,
    )
