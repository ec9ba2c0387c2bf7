"""Checkpoints: `save_state` / `load_state` in a versioned, self-describing ``.npz`` file.

Layout: a zip archive (NumPy ``.npz``, written uncompressed) holding one JSON header,
``__adamnp__`` (a 0-d unicode array), and one array per leaf and moment, named
``leaf<i>/<field>``. The header records the format name and version, the configuration, the
step counters, the tree structure and, for every leaf, its path, shape, dtype, slot kind and
the dtype and shape of each stored array.

Loading trusts nothing in the file. It checks the whole header first (types, ranges and
consistency: tree against leaf table, slot kinds against dtypes, stored arrays against leaf
shapes and block sizes, amsgrad buffers against the configuration), then each zip member's
declared size against what the header implies, before it decompresses or allocates anything;
it reads each member with a bounded read and checks its ``.npy`` header and its CRC. Every
problem with the file is a :class:`CheckpointError` naming the file and the key at fault.
Nothing is cast; no pickle is involved.

Saving writes a temporary file next to the target (``.<name>.adamnp-tmp-<16 hex digits>``)
and renames it; see docs/checkpoints.md for the file mode and the removal of temporary files
that crashed saves left behind.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import reprlib
import secrets
import stat
import struct
import time
import zipfile
import zlib

import numpy as np

from . import backends
from ._config import OPTION_NAMES, AdamConfig, adam, adamw
from ._state import MIN_8BIT_SIZE, AdamState, Layout, QuantSlot, build_groups
from ._tree import flatten, treedef_from_json, treedef_to_json, unflatten
from ._validate import FLOAT_DTYPES, validate_layout
from .lowbit.maps import map_names
from .lowbit.reference import n_blocks

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

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
_LATER_LAYOUT_KEYS = ("state_format", "v_rounding", "min_8bit_size", "keep_fp32")
#: Every key of a header (all but _LATER_LAYOUT_KEYS required), in the order saved.
HEADER_KEYS = (
    "format",
    "version",
    "config",
    "backend",
    "step",
    "skipped_steps",
    *LAYOUT_KEYS,
    "treedef",
    "leaves",
)


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
        "dtype": state.dtypes[i].str,
        "slot": "q8" if isinstance(slot, QuantSlot) else "fp32",
        "arrays": fields,
    }
    entry.update(_slot_scalars(slot))
    return entry


def _contents(state: AdamState) -> dict:
    """Every array of the file by member name (without ``.npy``), the header included."""
    be = backends.get(state.backend)
    arrays = {}
    leaves = [_leaf_entry(state, i, be, arrays) for i in range(len(state.slots))]
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
    return arrays


def save_state(path, state: AdamState) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename).

    A crash while writing leaves any previous file at ``path`` intact. Device (CUDA) state
    is copied to the host first. The file is a NumPy ``.npz`` readable with
    ``allow_pickle=False``; see :func:`load_state`. A new file gets the mode a plain
    ``open()`` would give it (``0o666`` less the umask); overwriting keeps the old file's
    mode. The temporary file, ``.<name>.adamnp-tmp-<random>`` next to ``path``, is removed on
    failure; temporary files of ``path`` that crashed saves left behind (older than ten
    minutes and, where the platform has ``flock``, not locked by a live save) are removed.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; written exactly as given (no suffix is added).
    state : AdamState

    Raises
    ------
    OSError
        When the file cannot be written; the error names ``path``, not the temporary file.

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
    _write_atomically(os.fspath(path), _contents(state))


_TEMP_MARK = ".adamnp-tmp-"
_TEMP_TOKEN = re.compile("[0-9a-f]{16}")  # the random part of a temporary file's name
_STALE_AFTER_S = 600.0  # a temporary file untouched this long is a crashed save's ...
_LONG_NAME = 160  # ... and a target name of more bytes is shortened in its temporaries' names


def _temp_prefix(name: str) -> str:
    """``.<name>.adamnp-tmp-``: how the temporary files of target ``name`` begin.

    A long name is cut short and made unique again by a hash of it, so that the temporary
    file's name stays within file system limits.

    Examples
    --------
    >>> _temp_prefix("opt.npz")
    '.opt.npz.adamnp-tmp-'
    """
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) > _LONG_NAME:
        name = f"{name[:40]}~{hashlib.sha256(raw).hexdigest()[:16]}"
    return f".{name}{_TEMP_MARK}"


def _write_atomically(path: str, arrays: dict) -> None:
    """Write ``arrays`` as an ``.npz`` to a temporary file, fsync it and rename it to ``path``.

    The temporary file is locked (``flock``) until it is renamed, so that a concurrent save
    of the same target never takes it for a crashed save's leftover.
    """
    folder, name = os.path.split(os.path.abspath(path))
    _remove_stale_temps(folder, name)
    fd, tmp = _create_temp(path, folder, name)
    try:
        with os.fdopen(fd, "wb") as f:
            _hold_lock(f)
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
            if os.name != "nt":  # rename while the lock is held
                os.replace(tmp, path)
        if os.name == "nt":  # pragma: no cover - Windows cannot rename an open file
            os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_folder(folder)


def _create_temp(path: str, folder: str, name: str) -> tuple[int, str]:
    """Create the temporary file for ``path``: ``(descriptor, its path)``.

    Its mode is what ``path`` will keep: that of the file it replaces, else ``0o666`` less
    the umask (as ``open()`` gives). Errors name ``path``, the file the caller asked for.
    """
    tmp = os.path.join(folder, _temp_prefix(name) + secrets.token_hex(8))
    mode = _kept_mode(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(tmp, flags, 0o666)  # the umask applies
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, path) from None
    if mode is not None and hasattr(os, "fchmod"):
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            _discard(tmp)
            raise
    return fd, tmp


def _kept_mode(path: str) -> int | None:
    """The permission bits of the regular file at ``path``, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else None


def _hold_lock(f) -> None:
    """Lock our temporary file while it is written (where ``flock`` exists and works)."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _remove_stale_temps(folder: str, name: str) -> None:
    """Remove the temporary files of target ``name`` in ``folder`` that crashed saves left:
    named as :func:`_temp_prefix` says plus 16 hex digits, and stale (:func:`_is_stale`).
    Nothing else is touched, and nothing here raises."""
    prefix = _temp_prefix(name)
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.name.startswith(prefix)]
    except OSError:
        return
    now = time.time()
    for n in names:
        candidate = os.path.join(folder, n)
        if _TEMP_TOKEN.fullmatch(n[len(prefix) :]) and _is_stale(candidate, now):
            _discard(candidate)


def _is_stale(tmp: str, now: float) -> bool:
    """Whether temporary file ``tmp`` is a crashed save's: a regular file not modified for
    ``_STALE_AFTER_S`` seconds that no live save holds locked."""
    try:
        st = os.lstat(tmp)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < _STALE_AFTER_S:
        return False
    return not _locked(tmp)


def _locked(tmp: str) -> bool:
    """Whether a live save holds ``tmp`` locked; True when that cannot be told (a file we
    cannot open), False where the platform or file system has no ``flock``."""
    if fcntl is None:  # pragma: no cover - Windows: the file's age alone decides
        return False
    try:
        fd = os.open(tmp, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # pragma: no cover - no locks on this file system
        return False
    finally:
        os.close(fd)
    return False


def _discard(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable where the platform allows it."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - e.g. Windows
        pass


# -- loading: errors


class CheckpointError(ValueError):
    """A file that is not a readable adamnp checkpoint of a supported version.

    Raised by :func:`load_state` for truncated, corrupted (CRC mismatch), foreign or
    newer-format files, for headers that are malformed or inconsistent, and for arrays that
    disagree with the header. The message names the file and the key at fault. A
    ``ValueError``.
    """


_REPR = reprlib.Repr()  # short reprs of values from the file in messages
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlevel = 3


def _show(value) -> str:
    return _REPR.repr(value)


def _fail(where: str, key: str, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: {key}: {what}")


def _expect(cond: bool, where: str, key: str, what: str) -> None:
    if not cond:
        raise _fail(where, key, what)


# What reading a damaged zip member raises (zipfile, zlib and the file underneath).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    OverflowError,
    struct.error,
    zlib.error,
)


@contextlib.contextmanager
def _readable(where: str, key: str):
    """Turn what a damaged zip raises while reading ``key`` into a :class:`CheckpointError`."""
    try:
        yield
    except CheckpointError:
        raise
    except _ZIP_ERRORS as exc:
        raise _fail(
            where,
            key,
            "not readable (damaged, truncated or not an .npz file): "
            f"{type(exc).__name__}: {_clip(str(exc))}",
        ) from exc


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# -- loading: the zip archive and its .npy members

_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_MAX = 10_000  # bytes of a .npy header's dict (numpy's own limit when reading)
_NPY_PREFIX = (10, 12 + _NPY_HEADER_MAX)  # fewest and most bytes before a .npy's data
_HEADER_BASE = 16 << 20  # bytes the JSON header's member may take, plus ...
_HEADER_PER_MEMBER = 4 << 10  # ... this much per member of the zip
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this
_READ_CHUNK = 1 << 24
_UNICODE = np.dtype("U1").str[:2]  # "<U" on little-endian hosts
_UTF32 = "utf-32-le" if _UNICODE[0] == "<" else "utf-32-be"


@contextlib.contextmanager
def _open_archive(where: str):
    """``(zip file, size of the file)``; a missing file raises ``FileNotFoundError``."""
    try:
        f = open(where, "rb")  # closed below
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _fail(where, "file", f"not readable: {exc}") from exc
    with f:
        with _readable(where, "zip directory"):
            size = os.fstat(f.fileno()).st_size
            zf = zipfile.ZipFile(f)
        with zf:
            yield zf, size


def _members(zf: zipfile.ZipFile, where: str) -> dict:
    """The zip's members by name; each unique, unencrypted, stored or deflated."""
    members = {}
    for info in zf.infolist():
        key = f"zip member {info.filename!r}"
        _expect(info.filename not in members, where, key, "appears twice")
        _expect(
            info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED),
            where,
            key,
            f"unsupported compression method {info.compress_type}",
        )
        _expect(not info.flag_bits & 0x1, where, key, "encrypted")
        members[info.filename] = info
    return members


def _check_declared(info, low: int, high: int, size: int, where: str, key: str) -> None:
    """Check a member's declared sizes, before anything is decompressed: ``low..high`` bytes
    (what the header implies), data within the file, no more than deflate can produce."""
    declared = info.file_size
    _expect(
        low <= declared <= high,
        where,
        key,
        f"the zip member declares {declared} bytes; the header implies {low}..{high}",
    )
    if info.compress_type == zipfile.ZIP_STORED:
        _expect(info.compress_size == declared, where, key, "stored member of two sizes")
    else:
        _expect(
            declared <= _DEFLATE_MAX_RATIO * info.compress_size,
            where,
            key,
            f"the zip member declares {declared} bytes from {info.compress_size} compressed",
        )
    _expect(
        info.header_offset + info.compress_size <= size,
        where,
        key,
        "the zip member extends past the end of the file",
    )


def _npy_prefix(ext, where: str, key: str) -> tuple[object, int]:
    """Read a ``.npy`` member's header: ``(its dict, unchecked; bytes read)``."""
    start = ext.read(10)
    _expect(len(start) == 10 and start[:6] == _NPY_MAGIC, where, key, "not a .npy array")
    major, minor = start[6], start[7]
    _expect(major in (1, 2, 3) and minor == 0, where, key, f"unknown .npy version {major}.{minor}")
    if major > 1:
        start += ext.read(2)
        _expect(len(start) == 12, where, key, "truncated .npy header")
    length = int.from_bytes(start[8:], "little")
    _expect(length <= _NPY_HEADER_MAX, where, key, f".npy header of {length} bytes")
    text = ext.read(length)
    _expect(len(text) == length, where, key, "truncated .npy header")
    try:
        meta = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin1"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise _fail(where, key, f"unreadable .npy header: {_clip(str(exc))}") from exc
    return meta, len(start) + length


def _read_into(ext, out, where: str, key: str) -> None:
    """Fill the byte buffer ``out`` from ``ext``, which must hold exactly that many more
    bytes; reads never ask for more than that (plus one byte to see the end)."""
    view = memoryview(out).cast("B")
    pos = 0
    while pos < len(view):
        chunk = ext.read(min(_READ_CHUNK, len(view) - pos))
        _expect(len(chunk) > 0, where, key, "truncated zip member")
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    _expect(ext.read(1) == b"", where, key, "zip member longer than its .npy header says")


def _header_text(zf: zipfile.ZipFile, members: dict, size: int, where: str) -> str:
    """The JSON text of the header member, read within a limit set by the member count."""
    info = members.get(HEADER + ".npy")
    _expect(info is not None, where, HEADER, "no adamnp header: not an adamnp checkpoint")
    limit = _HEADER_BASE + _HEADER_PER_MEMBER * len(members)
    _check_declared(info, _NPY_PREFIX[0], limit, size, where, HEADER)
    with _readable(where, HEADER), zf.open(info) as ext:
        meta, used = _npy_prefix(ext, where, HEADER)
        n = info.file_size - used
        want = {"descr": f"{_UNICODE}{n // 4}", "fortran_order": False, "shape": ()}
        if not (n >= 0 and n % 4 == 0 and meta == want):
            raise _fail(where, HEADER, f"not a string: {_show(meta)}")
        data = bytearray(n)
        _read_into(ext, data, where, HEADER)
    try:
        return data.decode(_UTF32).rstrip("\0")
    except UnicodeDecodeError as exc:
        raise _fail(where, HEADER, f"unreadable header: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class _Array:
    """A stored array as the header implies it: leaf ``leaf``'s field ``field``."""

    leaf: int
    field: str
    dtype: np.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def _read_array(zf: zipfile.ZipFile, info, spec: _Array, where: str, key: str) -> np.ndarray:
    """Member ``info``, which must hold exactly the array ``spec`` (C order, no pickle)."""
    with _readable(where, key), zf.open(info) as ext:
        meta, used = _npy_prefix(ext, where, key)
        want = {"descr": spec.dtype.str, "fortran_order": False, "shape": spec.shape}
        if meta != want:
            raise _fail(
                where,
                key,
                f"its .npy header {_show(meta)} disagrees with the checkpoint's header "
                f"(dtype {spec.dtype}, shape {spec.shape}, C order)",
            )
        _expect(info.file_size == used + spec.nbytes, where, key, "wrong size for its array")
        out = np.empty(spec.shape, spec.dtype)
        _read_into(ext, out.reshape(-1).view(np.uint8), where, key)
    return out


# -- loading: the header

_INT64_MAX = 2**63 - 1
_MAX_NDIM = 32
_LEAF_DTYPES = {d.str: d for d in FLOAT_DTYPES}  # "<f4", "<f8" on little-endian hosts
_FLOAT32 = np.dtype(np.float32)
_CODES = np.dtype(np.uint8)
_LEAF_KEYS = ("path", "shape", "dtype", "slot", "arrays")


@dataclasses.dataclass(frozen=True)
class _Header:
    """A validated header: every field checked, and checked against the others."""

    config: AdamConfig  # the saved one (lr 0.0 in place of a schedule when `scheduled`)
    config_json: dict  # as stored, defaults filled in; compared with a caller's config
    scheduled: bool  # saved with an lr schedule, which the caller must pass again
    backend: str
    step: int
    skipped_steps: int
    treedef: object
    paths: tuple
    shapes: tuple
    dtypes: tuple
    layout: Layout
    arrays: dict  # zip member name -> _Array

    def label(self, member: str) -> str:
        """How messages name a stored array: ``array leaf0/m (params['w'])``."""
        return f"array {member.removesuffix('.npy')} ({self.paths[self.arrays[member].leaf]})"


def _parse_header(text: str, where: str) -> dict:
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _fail(where, HEADER, f"unreadable header: {_clip(str(exc))}") from exc
    _expect(
        isinstance(header, dict) and header.get("format") == FORMAT,
        where,
        HEADER,
        "header does not describe an adamnp state",
    )
    return header


def _check_version_and_keys(header: dict, where: str) -> None:
    version = header.get("version")
    key = "header['version']"
    if type(version) is not int:
        raise _fail(where, key, f"bad format version {_show(version)}")
    if version > VERSION:
        raise _fail(
            where,
            key,
            f"format version {version}, newer than this adamnp reads ({VERSION}); upgrade adamnp",
        )
    _expect(version == VERSION, where, key, f"unsupported format version {version}")
    missing = [k for k in HEADER_KEYS if k not in header and k not in _LATER_LAYOUT_KEYS]
    _expect(not missing, where, HEADER, f"incomplete header: no {', '.join(missing)}")
    unknown = sorted(k for k in header if k not in HEADER_KEYS)
    if unknown:
        raise _fail(where, HEADER, f"unknown header keys {_show(unknown)}")


def _count(header: dict, key: str, where: str) -> int:
    value = header[key]
    if not (type(value) is int and 0 <= value < _INT64_MAX):
        raise _fail(
            where,
            f"header[{key!r}]",
            f"bad step counter {_show(value)}: must be an int in 0..2**63-2",
        )
    return value


def _check_backend(name, where: str) -> str:
    if not (isinstance(name, str) and name in backends.NAMES):
        raise _fail(
            where,
            "header['backend']",
            f"unknown backend {_show(name)}; expected one of {backends.NAMES}",
        )
    return name


def _check_config(c, where: str) -> tuple[dict, AdamConfig, bool]:
    """``(the stored configuration, validated as adam()/adamw() do, saved with a schedule)``."""
    key = "header['config']"
    if not isinstance(c, dict):
        raise _fail(where, key, f"bad configuration in header: {_show(c)}")
    theirs = _saved_config(c)
    known = ("optimizer", "lr_schedule", *OPTION_NAMES)
    missing = [k for k in known if k not in theirs]
    unknown = sorted(k for k in theirs if k not in known)
    if missing or unknown:
        what = f"{missing[0]!r} is missing" if missing else f"unknown option {unknown[0]!r}"
        raise _fail(where, key, f"bad configuration in header: {what}")
    name = theirs["optimizer"]
    make = {"adam": adam, "adamw": adamw}.get(name) if isinstance(name, str) else None
    if make is None:
        raise _fail(where, key, f"unknown optimizer {_show(name)} in header")
    scheduled = theirs["lr"] is None
    schedule = theirs["lr_schedule"]
    _expect(
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
        raise _fail(where, key, f"bad configuration in header: {exc}") from exc


def _check_tree(obj, where: str) -> tuple[object, list]:
    """The tree definition and its leaves' paths; it must be as :func:`flatten` gives it
    (dict keys sorted and unique), so that the paths are those of the params it fits."""
    key = "header['treedef']"
    try:
        treedef = treedef_from_json(obj)
        _, canonical, paths = flatten(unflatten(treedef, itertools.repeat(None)))
        same = canonical == treedef
    except (TypeError, ValueError, RecursionError) as exc:
        raise _fail(where, key, f"bad tree definition: {_clip(str(exc))}") from exc
    _expect(same, where, key, "bad tree definition: dict keys unsorted or repeated")
    return treedef, paths


def _check_shape(value, where: str, key: str) -> tuple:
    ok = isinstance(value, list) and len(value) <= _MAX_NDIM
    ok = ok and all(type(d) is int and 0 <= d <= _INT64_MAX for d in value)
    if not (ok and math.prod(value) <= _INT64_MAX // 8):
        raise _fail(
            where,
            key,
            f"bad leaf entry: shape {_show(value)}; expected a list of at most {_MAX_NDIM} "
            "ints >= 0 with fewer than 2**60 elements",
        )
    return tuple(value)


def _check_leaf(entry, i: int, path: str, where: str) -> tuple[tuple, np.dtype, str]:
    """``(shape, dtype, slot kind)`` of leaf ``i``, whose path in the tree is ``path``."""
    key = f"header['leaves'][{i}]"
    if not isinstance(entry, dict):
        raise _fail(where, key, f"bad leaf entry {_show(entry)}")
    missing = [k for k in _LEAF_KEYS if k not in entry]
    if missing:
        raise _fail(where, key, f"bad leaf entry: no {missing[0]!r}")
    if entry["path"] != path:
        raise _fail(
            where,
            key,
            f"bad leaf entry: path {_show(entry['path'])}, but leaf {i} of the tree is {path}",
        )
    shape = _check_shape(entry["shape"], where, key)
    dstr, kind = entry["dtype"], entry["slot"]
    if not (isinstance(dstr, str) and dstr in _LEAF_DTYPES):
        raise _fail(
            where,
            key,
            f"bad leaf entry: {path} has dtype {_show(dstr)}; leaves are float32 or float64 "
            f"({', '.join(map(repr, _LEAF_DTYPES))})",
        )
    if kind not in _SLOT_KINDS:
        raise _fail(
            where, key, f"bad leaf entry: {path} has slot {_show(kind)}, not one of {_SLOT_KINDS}"
        )
    dtype = _LEAF_DTYPES[dstr]
    _expect(
        kind != "q8" or dtype == _FLOAT32,
        where,
        key,
        f"bad leaf entry: {path} is {dtype}; an 8-bit ('q8') slot is for float32 leaves only",
    )
    return shape, dtype, kind


def _check_leaf_table(entries, paths: list, where: str) -> tuple[list, list, list]:
    """``(shapes, dtypes, slot kinds)``: one entry per leaf of the tree, in its order."""
    key = "header['leaves']"
    _expect(isinstance(entries, list), where, key, "bad leaf table: not a list")
    _expect(
        len(entries) == len(paths),
        where,
        key,
        f"bad leaf table: {len(entries)} entries, but the tree has {len(paths)} leaves",
    )
    shapes, dtypes, kinds = [], [], []
    for i, (entry, path) in enumerate(zip(entries, paths)):
        shape, dtype, kind = _check_leaf(entry, i, path, where)
        shapes.append(shape)
        dtypes.append(dtype)
        kinds.append(kind)
    return shapes, dtypes, kinds


def _layout_from_header(header: dict, paths, shapes, dtypes, use_q8, where: str) -> Layout:
    """The saved layout, checked as :func:`adamnp.init` checks its options.

    Files written before some layout keys were recorded get the values that describe their
    slots: ``state_format="bnb"`` and ``v_rounding="nearest"`` (the only format and rounding
    then); as ``min_8bit_size`` the default
    when that explains the 8-bit leaves, else the size of the smallest one; as ``keep_fp32``
    the float32 leaves that would then be 8-bit but are not.
    """
    saved = {k: header[k] for k in LAYOUT_KEYS if k in header}
    for k in ("state_bits", "block_size", "min_8bit_size"):
        if k in saved and not (type(saved[k]) is int and abs(saved[k]) <= _INT64_MAX):
            what = f"bad layout in header: {k} must be an int, got {_show(saved[k])}"
            raise _fail(where, f"header[{k!r}]", what)
    if "state_format" not in saved:
        saved["state_format"] = "bnb"
    saved.setdefault("v_rounding", None)  # the format's rounding
    if "min_8bit_size" not in saved:
        sizes = [math.prod(s) for s, q in zip(shapes, use_q8) if q]
        saved["min_8bit_size"] = min([*sizes, MIN_8BIT_SIZE])
    keep = saved.pop("keep_fp32", None)
    if "keep_fp32" in header and not (
        isinstance(keep, list) and all(isinstance(p, str) for p in keep)
    ):
        raise _fail(
            where,
            "header['keep_fp32']",
            f"bad layout in header: keep_fp32 must be a list of leaf paths, got {_show(keep)}",
        )
    try:
        layout = validate_layout(paths, None, keep_fp32=keep, **saved)
    except (TypeError, ValueError) as exc:
        key = next((f"header[{k!r}]" for k in LAYOUT_KEYS if str(exc).startswith(k)), HEADER)
        raise _fail(where, key, f"bad layout in header: {exc}") from exc
    if "keep_fp32" not in header:
        would = layout.eight_bit(paths, shapes, dtypes)
        kept = tuple(p for p, w, q in zip(paths, would, use_q8) if w and not q)
        layout = dataclasses.replace(layout, keep_fp32=kept)
    return layout


def _check_slots(layout: Layout, paths, shapes, dtypes, use_q8, where: str) -> None:
    """Each leaf's slot kind must be the one its layout gives it."""
    would = layout.eight_bit(paths, shapes, dtypes)
    for i, (w, q) in enumerate(zip(would, use_q8)):
        if w != q:
            raise _fail(
                where,
                f"header['leaves'][{i}]",
                f"{paths[i]} has {'q8' if q else 'fp32'} moments, which its layout in the "
                "header does not give it",
            )


def _expected_arrays(kind: str, dtype, shape: tuple, block_size: int, amsgrad: bool) -> dict:
    """``{field: (dtype, shape)}`` of the arrays of a slot (see Fp32Slot and QuantSlot)."""
    moments = ("m", "v", "vmax") if amsgrad else ("m", "v")
    if kind == "fp32":
        return {m: (dtype, shape) for m in moments}
    blocks = (n_blocks(math.prod(shape), block_size),)
    codes = {f"codes_{m}": (_CODES, shape) for m in moments}
    return {**codes, **{f"absmax_{m}": (_FLOAT32, blocks) for m in moments}}


def _expected_scalars(kind: str, layout: Layout) -> dict:
    """The other fields of a slot, stored in its leaf entry: none for ``"fp32"``."""
    if kind != "q8":
        return {}
    map_m, map_v = map_names(layout.state_format)
    return {"block_size": layout.block_size, "map_m": map_m, "map_v": map_v}


def _check_leaf_arrays(entry: dict, i, kind, dtype, shape, layout, amsgrad, where) -> dict:
    """``{zip member name: _Array}`` of leaf ``i``, whose entry must declare exactly these."""
    key = f"header['leaves'][{i}]"
    expected = _expected_arrays(kind, dtype, shape, layout.block_size, amsgrad)
    declared = entry["arrays"]
    names = sorted(expected)
    if not (isinstance(declared, dict) and sorted(declared) == names):
        shown = sorted(declared) if isinstance(declared, dict) else declared
        raise _fail(
            where,
            key,
            f"bad leaf entry: {entry['path']} declares arrays {_show(shown)}, but a {kind} "
            f"slot with amsgrad={amsgrad} (as configured) has {names}",
        )
    for name, (dt, shp) in expected.items():
        want = {"dtype": dt.str, "shape": list(shp)}
        if declared[name] != want:
            raise _fail(
                where,
                f"{key}['arrays'][{name!r}]",
                f"bad leaf entry: {_show(declared[name])}, expected {want}",
            )
    scalars = _expected_scalars(kind, layout)
    unknown = sorted(k for k in entry if k not in _LEAF_KEYS and k not in scalars)
    if unknown:
        raise _fail(where, key, f"bad leaf entry: unknown keys {_show(unknown)}")
    if any(entry.get(n) != v for n, v in scalars.items()):
        raise _fail(
            where,
            key,
            f"{entry['path']}: 8-bit layout (block size or maps) not supported: "
            f"{_show({n: entry.get(n) for n in scalars})}, expected {scalars}",
        )
    return {f"leaf{i}/{n}.npy": _Array(i, n, dt, shp) for n, (dt, shp) in expected.items()}


def _check_header(header: dict, where: str) -> _Header:
    """Every field of the header, and every field against the others (see the module)."""
    _check_version_and_keys(header, where)
    theirs, config, scheduled = _check_config(header["config"], where)
    treedef, paths = _check_tree(header["treedef"], where)
    shapes, dtypes, kinds = _check_leaf_table(header["leaves"], paths, where)
    use_q8 = [kind == "q8" for kind in kinds]
    layout = _layout_from_header(header, paths, shapes, dtypes, use_q8, where)
    _check_slots(layout, paths, shapes, dtypes, use_q8, where)
    arrays = {}
    for i, entry in enumerate(header["leaves"]):
        args = (kinds[i], dtypes[i], shapes[i], layout, config.amsgrad, where)
        arrays.update(_check_leaf_arrays(entry, i, *args))
    return _Header(
        config=config,
        config_json=theirs,
        scheduled=scheduled,
        backend=_check_backend(header["backend"], where),
        step=_count(header, "step", where),
        skipped_steps=_count(header, "skipped_steps", where),
        treedef=treedef,
        paths=tuple(paths),
        shapes=tuple(shapes),
        dtypes=tuple(dtypes),
        layout=layout,
        arrays=arrays,
    )


def _check_members(members: dict, h: _Header, size: int, where: str) -> None:
    """The zip holds exactly the header's arrays, each of the size the header implies."""
    missing = [name for name in h.arrays if name not in members]
    if missing:
        raise _fail(where, h.label(missing[0]), "missing array")
    extra = sorted(n for n in members if n not in h.arrays and n != HEADER + ".npy")
    if extra:
        raise _fail(where, "zip directory", f"unexpected arrays {_show(extra)}")
    for name, spec in h.arrays.items():
        low, high = (spec.nbytes + n for n in _NPY_PREFIX)
        _check_declared(members[name], low, high, size, where, h.label(name))


# -- loading: the caller's arguments and the state


def _check_arguments(backend, config) -> None:
    """The caller's options (checked before the file is opened)."""
    if backend is not None and not (
        isinstance(backend, str) and backend in (*backends.NAMES, "auto")
    ):
        raise ValueError(f"backend must be one of {backends.NAMES} or 'auto', got {backend!r}")
    if config is not None and not isinstance(config, AdamConfig):
        raise TypeError(f"config must be an AdamConfig, got {type(config).__name__}")


def _config_for(h: _Header, config: AdamConfig | None, where: str) -> AdamConfig:
    """The saved configuration, or the caller's, which must equal it but for ``lr``."""
    if config is None:
        if h.scheduled:
            raise ValueError(
                f"{where} was saved with an lr schedule "
                f"({_show(h.config_json['lr_schedule'])}); pass config=... to load_state"
            )
        return h.config
    mine = _config_to_json(config)
    for key in mine:
        if key not in ("lr", "lr_schedule") and mine[key] != h.config_json[key]:
            raise ValueError(
                f"config.{key} is {mine[key]!r} but the checkpoint was saved with "
                f"{_show(h.config_json[key])}"
            )
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


def _fill(zf, members: dict, h: _Header, slots, be, where: str) -> None:
    """Copy every stored array into the state's slots, one member at a time."""
    for i, slot in enumerate(slots):
        for field, dst in _slot_arrays(slot).items():
            name = f"leaf{i}/{field}.npy"
            spec = h.arrays[name]
            if (spec.dtype, spec.shape) != (np.dtype(dst.dtype), tuple(dst.shape)):
                raise RuntimeError(  # pragma: no cover - _expected_arrays disagrees with _state
                    f"internal error: {name} is {spec} in the file, {dst.dtype}"
                    f"{tuple(dst.shape)} in the state"
                )
            be.copy_from_host(dst, _read_array(zf, members[name], spec, where, h.label(name)))


def load_state(path, *, backend: str | None = None, config: AdamConfig | None = None) -> AdamState:
    """Read a checkpoint written by :func:`save_state`.

    The whole header is validated before anything is allocated, and each stored array
    against it before it is read; a state loaded is one :func:`adamnp.init` could have built,
    so no step can read or write out of bounds. See docs/checkpoints.md for every check.

    Parameters
    ----------
    path : str or os.PathLike
    backend : {"numpy", "numba", "cuda", "auto"}, optional
        Where to put the state; default: the backend it was saved from. ``"auto"`` picks as
        :func:`adamnp.init` does for host arrays (``"numba"`` when it runs, else ``"numpy"``).
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
        (a ``ValueError``) for a truncated, corrupted, foreign or newer-format file, a header
        that is malformed or inconsistent, or arrays that do not match the header; the
        message names the file and the key at fault.
    FileNotFoundError
        When there is no file at ``path``.
    ValueError
        For an unknown ``backend``; when the state was saved with an ``lr`` schedule and no
        ``config`` is given, or ``config`` differs from the saved one in anything but ``lr``.
    RuntimeError
        When the backend cannot run here.

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
    adamnp._checkpoint.CheckpointError: ...opt.npz: zip directory: not readable (damaged, ...
    """
    where = os.fspath(path)
    _check_arguments(backend, config)
    with _open_archive(where) as (zf, size):
        members = _members(zf, where)
        h = _check_header(_parse_header(_header_text(zf, members, size, where), where), where)
        _check_members(members, h, size, where)
        config = _config_for(h, config, where)
        name, be = _backend_for(backend, h.backend)
        slots, groups = build_groups(h.paths, h.shapes, h.dtypes, h.layout, config.amsgrad, be)
        _fill(zf, members, h, slots, be, where)
    return AdamState(
        config=config,
        backend=name,
        step=h.step,
        skipped_steps=h.skipped_steps,
        treedef=h.treedef,
        paths=h.paths,
        shapes=h.shapes,
        dtypes=h.dtypes,
        slots=slots,
        groups=groups,
        layout=h.layout,
    )
