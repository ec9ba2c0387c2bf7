"""Checkpoints: `save_state` / `load_state` in a versioned, self-describing ``.npz`` file, and
`state_dict` / `load_state_dict`, the same contents as plain values.

Layout: a zip archive (NumPy ``.npz``, written uncompressed) holding one JSON header,
``__adamnp__`` (a 0-d unicode array), and one array per leaf and moment, named
``leaf<i>/<field>``. The header records the format name and version, the configuration, the
step counters, the tree structure and, for every leaf, its path, shape, dtype (``"<f4"``,
``"<f8"``, ``"float16"`` or ``"bfloat16"``: :func:`~adamnp._checkpoint_header.dtype_tag`), slot
kind and the dtype and shape of each stored array. A state_dict is ``{"header": <that header>,
"arrays": {"leaf<i>/<field>": ndarray}}``.

Loading trusts nothing, wherever the checkpoint comes from (a path, a file object, a
state_dict: a *source*, :mod:`adamnp._checkpoint_read`). :func:`_load` checks the whole
header first (:func:`_check_header`: types, ranges and consistency: tree against leaf table,
slot kinds against dtypes, stored arrays against leaf shapes and block sizes, amsgrad buffers
against the configuration), then has the source check that it holds exactly the arrays the
header declares, each of the size the header implies (a zip member's declared size, before
it decompresses or allocates anything; a state_dict's array's type, dtype, shape and order),
and only then allocates the state and copies each array into it. Every problem with the
checkpoint is a :class:`CheckpointError` naming the file (or ``state_dict``) and the key at
fault. Nothing is cast; no pickle is involved.

Modules: this one (public functions, what is stored, the configuration in the header, the
order of the checks); :mod:`adamnp._checkpoint_header` (the header's other checks and
:class:`CheckpointError`); :mod:`adamnp._checkpoint_read` (the sources);
:mod:`adamnp._checkpoint_files` (paths and file objects; atomic writes).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np

from . import backends
from ._checkpoint_files import resolve, write
from ._checkpoint_header import (
    FORMAT,
    HEADER,
    HEADER_KEYS,
    LAYOUT_KEYS,
    VERSION,
    CheckpointError,
    Header,
    check_backend,
    check_count,
    check_leaf_arrays,
    check_leaf_table,
    check_slots,
    check_tree,
    check_version_and_keys,
    dtype_tag,
    expect,
    fail,
    layout_from_header,
    show,
)
from ._checkpoint_read import DictSource, zip_source
from ._config import OPTION_NAMES, AdamConfig, adam, adamw, check_configs
from ._state import AdamState, Layout, QuantSlot, amsgrad_of, build_groups
from ._tree import treedef_to_json

__all__ = [  # what other modules and tests use; the public functions are adamnp's
    "FORMAT",
    "HEADER",
    "HEADER_KEYS",
    "LAYOUT_KEYS",
    "VERSION",
    "CheckpointError",
    "load_state",
    "load_state_dict",
    "save_state",
    "state_dict",
]

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


#: Options added after the format: stored only when they differ from their default, so that
#: a file that does not use them stays readable by the adamnp versions before them (which
#: refuse unknown options); :func:`_saved_config` gives a file that lacks one the default.
_LATER_OPTIONS = ("param_rounding",)


def _config_to_store(cfg: AdamConfig) -> dict:
    """:func:`_config_to_json` less the :data:`_LATER_OPTIONS` at their defaults."""
    out = _config_to_json(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(AdamConfig)}
    for name in _LATER_OPTIONS:
        if out[name] == defaults[name]:
            del out[name]
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


def _layout_to_json(layout: Layout) -> dict:
    return {name: _json(value) for name, value in dataclasses.asdict(layout).items()}


def _slot_arrays(slot) -> dict:
    """The arrays of a slot by field name (without amsgrad's, which are None otherwise)."""
    return {n: v for n, v in slot._asdict().items() if not isinstance(v, _SCALARS | None)}


def _slot_scalars(slot) -> dict:
    """The other fields of a slot (a :class:`QuantSlot`'s block size and maps), by name."""
    return {n: v for n, v in slot._asdict().items() if isinstance(v, _SCALARS)}


# -- saving


def _leaf_entry(state: AdamState, i: int, be, arrays: dict) -> dict:
    """Leaf ``i``'s entry of the header; its arrays, on the host, go into ``arrays``."""
    slot = state.slots[i]
    fields = {}
    for name, arr in _slot_arrays(slot).items():
        host = be.to_host(arr)
        arrays[f"leaf{i}/{name}"] = host
        fields[name] = {"dtype": host.dtype.str, "shape": list(host.shape)}
    entry = {
        "path": state.paths[i],
        "shape": list(state.shapes[i]),
        "dtype": dtype_tag(state.dtypes[i]),
        "slot": "q8" if isinstance(slot, QuantSlot) else "fp32",
        "arrays": fields,
    }
    entry.update(_slot_scalars(slot))
    return entry


def _labels_to_json(state: AdamState) -> dict:
    """``configs`` and ``labels`` of a state with per-leaf configs; nothing otherwise."""
    if state.configs is None:
        return {}
    configs = {label: _config_to_store(cfg) for label, cfg in state.configs.items()}
    return {"configs": configs, "labels": list(state.labels)}


def _contents(state: AdamState) -> tuple[dict, dict]:
    """``(header, arrays)``: the header as JSON data, and every array (a host copy) by name."""
    if not isinstance(state, AdamState):
        raise TypeError(f"state must be an AdamState, got {type(state).__name__}")
    be = backends.get(state.backend)
    arrays = {}
    leaves = [_leaf_entry(state, i, be, arrays) for i in range(len(state.slots))]
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": _config_to_store(state.config),
        **_labels_to_json(state),
        "backend": state.backend,
        "step": int(state.step),
        "skipped_steps": int(state.skipped_steps),
        **_layout_to_json(state.layout),
        "treedef": treedef_to_json(state.treedef),
        "leaves": leaves,
    }
    return json.loads(json.dumps(header)), arrays  # plain JSON types, as a file gives them


def save_state(file, state: AdamState) -> None:
    """Write ``state`` to a path atomically (temporary file, fsync, rename), or into a file.

    A crash while writing a path leaves any previous file there intact. Device (CUDA) state
    is copied to the host first. The file is a NumPy ``.npz`` readable with
    ``allow_pickle=False``; see :func:`load_state`. A new file gets the mode a plain
    ``open()`` would give it (``0o666`` less the umask); overwriting keeps the old file's
    mode. The temporary file, ``.<name>.adamnp-tmp-<random>`` next to the path, is removed on
    failure; temporary files of the path that crashed saves left behind (older than ten
    minutes and, where the platform has ``flock``, not locked by a live save) are removed.

    A binary file object (``io.BytesIO()``, ``open(path, "wb")``, ...) gets the same bytes,
    written from its current position; it is flushed but not closed, and nothing about it is
    atomic (no temporary file, no rename, no ``fsync``): a crash can leave it partly written.

    Parameters
    ----------
    file : str, os.PathLike or binary file object
        A path (written exactly as given: no suffix is added), or a file object open for
        writing in binary mode (it need not be seekable).
    state : AdamState

    Raises
    ------
    OSError
        When the file cannot be written; the error names the path, not the temporary file.
    TypeError
        For ``file`` neither a path nor a file object, or a file open in text mode.
    ValueError
        For a closed file object, or one not open for writing.

    See Also
    --------
    state_dict : the same contents as a dict of plain values.

    Examples
    --------
    >>> import io, os, tempfile, numpy as np, adamnp
    >>> p = np.ones(3, np.float32)
    >>> state = adamnp.init(p, adamnp.adamw(), backend="numpy")
    >>> adamnp.step(p, np.ones(3, np.float32), state)
    >>> path = os.path.join(tempfile.mkdtemp(), "opt.npz")
    >>> adamnp.save_state(path, state)
    >>> adamnp.load_state(path).step
    1
    >>> buf = io.BytesIO()
    >>> adamnp.save_state(buf, state)
    >>> _ = buf.seek(0)
    >>> adamnp.load_state(buf).step
    1
    >>> with open(path, "w") as text:
    ...     adamnp.save_state(text, state)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    TypeError: save_state: ...opt.npz is open in text mode; open it in binary mode ('wb' ...
    """
    path, f = resolve(file, "save_state", writing=True)
    header, arrays = _contents(state)
    write(path, f, {**arrays, HEADER: np.array(json.dumps(header))})


def state_dict(state: AdamState) -> dict:
    """The contents of a checkpoint as plain values, to store in a format of your own.

    The counterpart of :func:`load_state_dict`, as ``torch.optim.Optimizer.state_dict`` is of
    ``load_state_dict``: what :func:`save_state` writes, as a dict instead of a file. Nothing
    in it refers to ``state``: the arrays are host copies (of device arrays too), so later
    steps do not change a saved dict, and changing the dict does not change the state.

    Parameters
    ----------
    state : AdamState

    Returns
    -------
    dict
        ``{"header": header, "arrays": arrays}``. ``header`` is JSON data (dicts, lists, str,
        int, float, bool, None; ``json.dumps`` takes it) describing the configuration, step
        counters, tree, layout and every stored array: the header of the ``.npz`` file,
        docs/checkpoints.md. ``arrays`` maps names such as ``"leaf0/m"`` or
        ``"leaf3/codes_v"`` to C-contiguous ``np.ndarray`` (float32 or float64 moments,
        uint8 codes, float32 absmax), in the state's own dtypes (float32 moments for
        float16 and bfloat16 leaves, whose dtype the header names ``"float16"`` and
        ``"bfloat16"``).

    See Also
    --------
    load_state_dict, save_state

    Examples
    --------
    >>> import json, numpy as np, adamnp
    >>> p = {"w": np.ones(3, np.float32)}
    >>> state = adamnp.init(p, adamnp.adamw(), backend="numpy")
    >>> adamnp.step(p, {"w": np.ones(3, np.float32)}, state)
    >>> d = adamnp.state_dict(state)
    >>> sorted(d["arrays"])
    ['leaf0/m', 'leaf0/v']
    >>> d["header"]["step"], d["arrays"]["leaf0/m"]
    (1, array([0.1, 0.1, 0.1], dtype=float32))
    >>> text = json.dumps(d["header"])  # store it with the arrays as you like
    """
    header, arrays = _contents(state)
    return {"header": header, "arrays": arrays}


# -- loading: the header, in the order the checks run
def _check_config(c, where: str, key: str = "header['config']") -> tuple[dict, AdamConfig, bool]:
    """``(the stored configuration, validated as adam()/adamw() do, saved with a schedule)``."""
    if not isinstance(c, dict):
        raise fail(where, key, f"bad configuration in header: {show(c)}")
    theirs = _saved_config(c)
    known = ("optimizer", "lr_schedule", *OPTION_NAMES)
    missing = [k for k in known if k not in theirs]
    unknown = sorted(k for k in theirs if k not in known)
    if missing or unknown:
        what = f"{missing[0]!r} is missing" if missing else f"unknown option {unknown[0]!r}"
        raise fail(where, key, f"bad configuration in header: {what}")
    name = theirs["optimizer"]
    make = {"adam": adam, "adamw": adamw}.get(name) if isinstance(name, str) else None
    if make is None:
        raise fail(where, key, f"unknown optimizer {show(name)} in header")
    scheduled = theirs["lr"] is None
    schedule = theirs["lr_schedule"]
    expect(
        isinstance(schedule, str) if scheduled else schedule is None,
        where,
        key,
        "bad configuration in header: lr_schedule must be a string exactly when lr is null",
    )
    options = {n: theirs[n] for n in OPTION_NAMES}
    if scheduled:
        options["lr"] = 0.0  # stands in for the schedule, which the caller passes again
    try:
        return theirs, make(**options), scheduled
    except (TypeError, ValueError) as exc:
        raise fail(where, key, f"bad configuration in header: {exc}") from exc


def _check_header(header: dict, where: str) -> Header:
    """Every field of the header, and every field against the others (see the module)."""
    check_version_and_keys(header, where)
    theirs, config, scheduled = _check_config(header["config"], where)
    treedef, paths = check_tree(header["treedef"], where)
    shapes, dtypes, kinds = check_leaf_table(header["leaves"], paths, where)
    labels, configs, configs_json = _check_labels(header, len(paths), where)
    if labels is not None:
        scheduled = any(c["lr"] is None for c in configs_json.values())
    use_q8 = [kind == "q8" for kind in kinds]
    layout = layout_from_header(header, paths, shapes, dtypes, use_q8, where)
    check_slots(layout, paths, shapes, dtypes, use_q8, where)
    arrays = {}
    for i, entry in enumerate(header["leaves"]):
        amsgrad = (config if labels is None else configs[labels[i]]).amsgrad
        args = (kinds[i], dtypes[i], shapes[i], layout, amsgrad, where)
        arrays.update(check_leaf_arrays(entry, i, *args))
    return Header(
        config=config,
        config_json=theirs,
        scheduled=scheduled,
        backend=check_backend(header["backend"], where),
        step=check_count(header, "step", where),
        skipped_steps=check_count(header, "skipped_steps", where),
        treedef=treedef,
        paths=tuple(paths),
        shapes=tuple(shapes),
        dtypes=tuple(dtypes),
        layout=layout,
        arrays=arrays,
        labels=labels,
        configs=configs,
        configs_json=configs_json,
    )


def _check_labels(header: dict, n: int, where: str):
    """``(labels, {label: AdamConfig}, {label: stored config})``, or three None."""
    present = [k in header for k in ("configs", "labels")]
    if not any(present):
        return None, None, None
    expect(all(present), where, HEADER, "configs and labels must be stored together")
    stored, labels = header["configs"], header["labels"]
    key = "header['configs']"
    if not (isinstance(stored, dict) and stored):
        raise fail(where, key, f"bad per-label configs {show(stored)}")
    configs, configs_json = {}, {}
    for label, c in stored.items():
        theirs, cfg, _ = _check_config(c, where, f"{key}[{label!r}]")
        configs[label], configs_json[label] = cfg, theirs
    try:
        check_configs(configs)
    except (TypeError, ValueError) as exc:
        raise fail(where, key, f"bad per-label configs: {exc}") from exc
    key = "header['labels']"
    if not (type(labels) is list and len(labels) == n):
        raise fail(where, key, f"bad labels {show(labels)}: must be a list of {n} labels")
    for i, label in enumerate(labels):
        if not (type(label) is str and label in configs):
            raise fail(where, f"{key}[{i}]", f"label {show(label)} is not one of the configs")
    return tuple(labels), configs, configs_json


# -- loading: the caller's arguments and the state


def _check_arguments(backend, config) -> None:
    """The caller's options (checked before the file is opened)."""
    if backend is not None and not (
        isinstance(backend, str) and backend in (*backends.NAMES, "auto")
    ):
        raise ValueError(f"backend must be one of {backends.NAMES} or 'auto', got {backend!r}")
    if config is not None and not isinstance(config, AdamConfig | Mapping):
        raise TypeError(
            f"config must be an AdamConfig or a mapping {{label: AdamConfig}}, "
            f"got {type(config).__name__}"
        )


def _configs_for(h: Header, config, where: str, func: str) -> dict:
    """The saved per-label configs, or the caller's mapping, equal to them but for ``lr``."""
    if config is None:
        if h.scheduled:
            raise ValueError(
                f"{where} was saved with an lr schedule in some label; pass config={{label: "
                f"config}} to {func}"
            )
        return h.configs
    if not isinstance(config, Mapping):
        raise TypeError(
            f"{where} holds per-leaf configs (labels {sorted(h.configs)}): pass config as a "
            f"mapping {{label: AdamConfig}}"
        )
    configs = check_configs(config)
    if sorted(configs) != sorted(h.configs):
        raise ValueError(f"config has labels {sorted(configs)}, the checkpoint {sorted(h.configs)}")
    for label, cfg in configs.items():
        _same_but_lr(cfg, h.configs_json[label], f"config[{label!r}]")
    return configs


def _same_but_lr(config: AdamConfig, saved: dict, name: str) -> None:
    mine = _config_to_json(config)
    for key in mine:
        if key not in ("lr", "lr_schedule") and mine[key] != saved[key]:
            raise ValueError(
                f"{name}.{key} is {mine[key]!r} but the checkpoint was saved with "
                f"{show(saved[key])}"
            )


def _config_for(h: Header, config: AdamConfig | None, where: str, func: str) -> AdamConfig:
    """The saved configuration, or the caller's, which must equal it but for ``lr``."""
    if isinstance(config, Mapping):
        raise TypeError(f"{where} holds a single config: pass config as an AdamConfig")
    if config is None:
        if h.scheduled:
            raise ValueError(
                f"{where} was saved with an lr schedule "
                f"({show(h.config_json['lr_schedule'])}); pass config=... to {func}"
            )
        return h.config
    _same_but_lr(config, h.config_json, "config")
    return config


def _backend_for(backend: str | None, saved: str):
    """``(name, module)`` of the backend to load onto: ``backend``, else the saved one."""
    name = saved if backend is None else backend
    if name == "auto":
        name = backends.resolve("auto")
    be = backends.get(name)
    why = be.availability()
    if why is not None:
        raise RuntimeError(f"backend {name!r} cannot run here: {why}; pass backend=...")
    return name, be


def _load(source, backend, config, func: str) -> AdamState:
    """The state ``source`` holds (see the module for the order of the checks)."""
    h = _check_header(source.header(), source.where)
    source.check_arrays(h)  # before anything the header declares is allocated
    configs = None
    if h.labels is None:
        config = _config_for(h, config, source.where, func)
    else:
        configs = _configs_for(h, config, source.where, func)
        config = configs[h.labels[0]]
    backend, be = _backend_for(backend, h.backend)
    amsgrad = amsgrad_of(config, configs)
    slots, groups = build_groups(h.paths, h.shapes, h.dtypes, h.layout, amsgrad, be, h.labels)
    for i, slot in enumerate(slots):  # one array at a time
        for field, dst in _slot_arrays(slot).items():
            name = f"leaf{i}/{field}"
            spec = h.arrays[name]
            if (spec.dtype, spec.shape) != (np.dtype(dst.dtype), tuple(dst.shape)):
                raise RuntimeError(  # pragma: no cover - _expected_arrays disagrees with _state
                    f"internal error: {name} is {spec} in the checkpoint, {dst.dtype}"
                    f"{tuple(dst.shape)} in the state"
                )
            be.copy_from_host(dst, source.array(name, h))
    return AdamState(
        config=config,
        backend=backend,
        step=h.step,
        skipped_steps=h.skipped_steps,
        treedef=h.treedef,
        paths=h.paths,
        shapes=h.shapes,
        dtypes=h.dtypes,
        slots=slots,
        groups=groups,
        layout=h.layout,
        labels=h.labels,
        configs=configs,
    )


def load_state(file, *, backend: str | None = None, config=None) -> AdamState:
    """Read a checkpoint written by :func:`save_state`, from a path or a binary file object.

    The whole header is validated before anything is allocated, and each stored array
    against it before it is read; a state loaded is one :func:`adamnp.init` could have built,
    so no step can read or write out of bounds. See docs/checkpoints.md for every check.

    Parameters
    ----------
    file : str, os.PathLike or binary file object
        A path, or a file object open for reading in binary mode and seekable (a zip
        archive is read from its end, so the checkpoint must end where the file ends). A
        file object is not closed; its position afterwards is unspecified.
    backend : {"numpy", "numba", "cuda", "auto"}, optional
        Where to put the state; default: the backend it was saved from. ``"auto"`` picks as
        :func:`adamnp.init` does for host arrays (``"numba"`` when it runs, else ``"numpy"``).
    config : AdamConfig, optional
        Required when the saved configuration had a schedule for ``lr`` (a callable cannot be
        stored). When given, every field except ``lr`` must equal the saved one.
        A state saved with per-leaf configs (``init(params, {label: config}, labels=...)``)
        comes back with its labels and configs; ``config`` is then a mapping ``{label:
        AdamConfig}`` with the same labels.

    Returns
    -------
    AdamState
        Bit-identical to the saved state (no dtype is ever converted).

    Raises
    ------
    CheckpointError
        (a ``ValueError``) for a truncated, corrupted, foreign or newer-format file, a header
        that is malformed or inconsistent, or arrays that do not match the header; the
        message names the file and the key at fault.
    FileNotFoundError
        When there is no file at the path.
    TypeError
        For ``file`` neither a path nor a file object, or a file open in text mode.
    ValueError
        For a closed file object, one not open for reading or not seekable (read a stream
        into ``io.BytesIO`` first); for an unknown ``backend``; when the state was saved
        with an ``lr`` schedule and no ``config`` is given, or ``config`` differs from the
        saved one in anything but ``lr``.
    RuntimeError
        When the backend cannot run here.

    See Also
    --------
    load_state_dict : the same from a :func:`state_dict`.

    Examples
    --------
    >>> import os, tempfile, numpy as np, adamnp
    >>> state = adamnp.init(np.ones(3, np.float32), adamnp.adam(), backend="numpy")
    >>> path = os.path.join(tempfile.mkdtemp(), "opt.npz")
    >>> adamnp.save_state(path, state)
    >>> adamnp.load_state(path, backend="numpy").config == state.config
    True
    >>> with open(path, "r+b") as f:
    ...     _ = f.truncate(100)
    >>> adamnp.load_state(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    adamnp._checkpoint_header.CheckpointError: ...opt.npz: zip directory: not readable (damaged, ...
    """
    _check_arguments(backend, config)
    with zip_source(file) as source:
        return _load(source, backend, config, "load_state")


def load_state_dict(d: dict, *, backend: str | None = None, config=None) -> AdamState:
    """The state that a :func:`state_dict` describes, checked as strictly as a file.

    ``d`` is trusted in nothing, whatever stored and returned it: the checks are those of
    :func:`load_state`, by the same code (docs/checkpoints.md). The whole header is checked
    before anything is allocated, then every array against it: it must be a plain
    ``np.ndarray`` (not a subclass, such as ``np.memmap`` or a masked array: pass
    ``np.asarray(x)``), of exactly the dtype (byte order included; nothing is cast) and shape
    the header implies, and C-contiguous. ``d`` and the header are exactly
    ``{"header", "arrays"}`` and the arrays the header declares: a key missing or extra is an
    error. The header must be JSON data as ``json.loads`` gives it: dicts with str keys,
    lists (not tuples), str, int, float, bool and None (not NumPy scalars), nested no deeper
    than the deepest tree adamnp takes needs. The state copies the arrays: ``d`` can be
    changed or dropped afterwards.

    Parameters
    ----------
    d : dict
        ``{"header": dict, "arrays": {name: np.ndarray}}``, as :func:`state_dict` returns it
        (``arrays`` may be any mapping, such as the ``NpzFile`` of ``np.load``).
    backend : {"numpy", "numba", "cuda", "auto"}, optional
        Where to put the state; default: the backend it was taken from (as for
        :func:`load_state`).
    config : AdamConfig, optional
        Required when the configuration had a schedule for ``lr``; else, when given, every
        field except ``lr`` must equal the saved one.
        A state saved with per-leaf configs (``init(params, {label: config}, labels=...)``)
        comes back with its labels and configs; ``config`` is then a mapping ``{label:
        AdamConfig}`` with the same labels.

    Returns
    -------
    AdamState
        Bit-identical to the state ``d`` was taken from: steps on it continue bit for bit.

    Raises
    ------
    CheckpointError
        (a ``ValueError``) for anything wrong with ``d``; the message begins with
        ``state_dict:`` and names the key at fault (``header['step']``, ``array leaf0/m
        (params['w'])``, ``arrays``, ...).
    ValueError, RuntimeError
        For the arguments and the backend, as :func:`load_state` raises them.

    See Also
    --------
    state_dict, load_state

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> p = {"w": np.ones(3, np.float32)}
    >>> state = adamnp.init(p, adamnp.adamw(), backend="numpy")
    >>> adamnp.step(p, {"w": np.ones(3, np.float32)}, state)
    >>> d = adamnp.state_dict(state)
    >>> adamnp.load_state_dict(d).step
    1
    >>> d["arrays"]["leaf0/m"] = d["arrays"]["leaf0/m"].astype(np.float64)
    >>> adamnp.load_state_dict(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    adamnp._checkpoint_header.CheckpointError: state_dict: array leaf0/m (params['w']): ...
    """
    _check_arguments(backend, config)
    return _load(DictSource(d), backend, config, "load_state_dict")
