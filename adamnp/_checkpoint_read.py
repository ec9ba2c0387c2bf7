"""Checkpoints: where the header and the arrays come from, and reading them boundedly.

Loading takes its header and arrays from a *source*, and checks both with the same code
whatever the source (:func:`adamnp._checkpoint._load`):

* :func:`zip_source`: an ``.npz`` file (a path or a seekable binary file object). Every zip
  member's declared size is checked against what the header implies before anything is
  decompressed or allocated; each member is read with bounded reads, its ``.npy`` header
  parsed without ``np.load`` and its CRC checked.
* :class:`DictSource`: a :func:`adamnp.state_dict`. The header must be JSON data exactly as
  ``json.loads`` gives it; each array must be a plain C-contiguous ``np.ndarray`` of the dtype
  and shape the header implies, checked before anything is allocated.

A source has ``where`` (how messages name it), ``header()`` (the header, not yet checked but
for being an adamnp header), ``check_arrays(h)`` (exactly the arrays a checked header ``h``
declares, each of its size: before any is allocated) and ``array(name, h)`` (array ``name``,
exactly as ``h`` declares it).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

from ._checkpoint_files import describe, resolve
from ._checkpoint_header import (
    HEADER,
    Array,
    CheckpointError,
    Header,
    check_format,
    clip,
    expect,
    fail,
    show,
)
from ._tree import MAX_DEPTH

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
        raise fail(
            where,
            key,
            "not readable (damaged, truncated or not an .npz file): "
            f"{type(exc).__name__}: {clip(str(exc))}",
        ) from exc


# -- the zip archive and its .npy members

_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_MAX = 10_000  # bytes of a .npy header's dict (numpy's own limit when reading)
_NPY_PREFIX = (10, 12 + _NPY_HEADER_MAX)  # fewest and most bytes before a .npy's data
_HEADER_BASE = 16 << 20  # bytes the JSON header's member may take, plus ...
_HEADER_PER_MEMBER = 4 << 10  # ... this much per member of the zip
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this
_READ_CHUNK = 1 << 24
_UNICODE = np.dtype("U1").str[:2]  # "<U" on little-endian hosts
_UTF32 = "utf-32-le" if _UNICODE[0] == "<" else "utf-32-be"


def _members(zf: zipfile.ZipFile, where: str) -> dict:
    """The zip's members by name; each unique, unencrypted, stored or deflated."""
    members = {}
    for info in zf.infolist():
        key = f"zip member {info.filename!r}"
        expect(info.filename not in members, where, key, "appears twice")
        expect(
            info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED),
            where,
            key,
            f"unsupported compression method {info.compress_type}",
        )
        expect(not info.flag_bits & 0x1, where, key, "encrypted")
        members[info.filename] = info
    return members


def _check_declared(info, low: int, high: int, size: int, where: str, key: str) -> None:
    """Check a member's declared sizes, before anything is decompressed: ``low..high`` bytes
    (what the header implies), data within the file, no more than deflate can produce."""
    declared = info.file_size
    expect(
        low <= declared <= high,
        where,
        key,
        f"the zip member declares {declared} bytes; the header implies {low}..{high}",
    )
    if info.compress_type == zipfile.ZIP_STORED:
        expect(info.compress_size == declared, where, key, "stored member of two sizes")
    else:
        expect(
            declared <= _DEFLATE_MAX_RATIO * info.compress_size,
            where,
            key,
            f"the zip member declares {declared} bytes from {info.compress_size} compressed",
        )
    expect(
        info.header_offset + info.compress_size <= size,
        where,
        key,
        "the zip member extends past the end of the file",
    )


def _npy_prefix(ext, where: str, key: str) -> tuple[object, int]:
    """Read a ``.npy`` member's header: ``(its dict, unchecked; bytes read)``."""
    start = ext.read(10)
    expect(len(start) == 10 and start[:6] == _NPY_MAGIC, where, key, "not a .npy array")
    major, minor = start[6], start[7]
    expect(major in (1, 2, 3) and minor == 0, where, key, f"unknown .npy version {major}.{minor}")
    if major > 1:
        start += ext.read(2)
        expect(len(start) == 12, where, key, "truncated .npy header")
    length = int.from_bytes(start[8:], "little")
    expect(length <= _NPY_HEADER_MAX, where, key, f".npy header of {length} bytes")
    text = ext.read(length)
    expect(len(text) == length, where, key, "truncated .npy header")
    try:
        meta = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin1"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise fail(where, key, f"unreadable .npy header: {clip(str(exc))}") from exc
    return meta, len(start) + length


def _read_into(ext, out, where: str, key: str) -> None:
    """Fill the byte buffer ``out`` from ``ext``, which must hold exactly that many more
    bytes; reads never ask for more than that (plus one byte to see the end)."""
    view = memoryview(out).cast("B")
    pos = 0
    while pos < len(view):
        chunk = ext.read(min(_READ_CHUNK, len(view) - pos))
        expect(len(chunk) > 0, where, key, "truncated zip member")
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    expect(ext.read(1) == b"", where, key, "zip member longer than its .npy header says")


def _header_text(zf: zipfile.ZipFile, members: dict, size: int, where: str) -> str:
    """The JSON text of the header member, read within a limit set by the member count."""
    info = members.get(HEADER + ".npy")
    expect(info is not None, where, HEADER, "no adamnp header: not an adamnp checkpoint")
    limit = _HEADER_BASE + _HEADER_PER_MEMBER * len(members)
    _check_declared(info, _NPY_PREFIX[0], limit, size, where, HEADER)
    with _readable(where, HEADER), zf.open(info) as ext:
        meta, used = _npy_prefix(ext, where, HEADER)
        n = info.file_size - used
        want = {"descr": f"{_UNICODE}{n // 4}", "fortran_order": False, "shape": ()}
        if not (n >= 0 and n % 4 == 0 and meta == want):
            raise fail(where, HEADER, f"not a string: {show(meta)}")
        data = bytearray(n)
        _read_into(ext, data, where, HEADER)
    try:
        return data.decode(_UTF32).rstrip("\0")
    except UnicodeDecodeError as exc:
        raise fail(where, HEADER, f"unreadable header: {exc}") from exc


def _read_array(zf: zipfile.ZipFile, info, spec: Array, where: str, key: str) -> np.ndarray:
    """Member ``info``, which must hold exactly the array ``spec`` (C order, no pickle)."""
    with _readable(where, key), zf.open(info) as ext:
        meta, used = _npy_prefix(ext, where, key)
        want = {"descr": spec.dtype.str, "fortran_order": False, "shape": spec.shape}
        if meta != want:
            raise fail(
                where,
                key,
                f"its .npy header {show(meta)} disagrees with the checkpoint's header "
                f"(dtype {spec.dtype}, shape {spec.shape}, C order)",
            )
        expect(info.file_size == used + spec.nbytes, where, key, "wrong size for its array")
        out = np.empty(spec.shape, spec.dtype)
        _read_into(ext, out.reshape(-1).view(np.uint8), where, key)
    return out


def _parse_header(text: str, where: str) -> dict:
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise fail(where, HEADER, f"unreadable header: {clip(str(exc))}") from exc
    return check_format(header, where)


def _check_members(members: dict, h: Header, size: int, where: str) -> None:
    """The zip holds exactly the header's arrays, each of the size the header implies."""
    missing = [name for name in h.arrays if name + ".npy" not in members]
    if missing:
        raise fail(where, h.label(missing[0]), "missing array")
    wanted = {name + ".npy" for name in h.arrays}
    extra = sorted(n for n in members if n not in wanted and n != HEADER + ".npy")
    if extra:
        raise fail(where, "zip directory", f"unexpected arrays {show(extra)}")
    for name, spec in h.arrays.items():
        low, high = (spec.nbytes + n for n in _NPY_PREFIX)
        _check_declared(members[name + ".npy"], low, high, size, where, h.label(name))


@contextlib.contextmanager
def zip_source(file):
    """The source of an ``.npz`` checkpoint at path ``file``, or in binary file object ``file``
    (see :func:`adamnp._checkpoint_files.resolve`); a missing file raises
    ``FileNotFoundError``. A file object is not closed, and its position afterwards is
    unspecified."""
    path, f = resolve(file, "load_state", writing=False)
    where = path if f is None else describe(f)
    if f is None:
        try:
            f = open(path, "rb")  # closed below
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise fail(where, "file", f"not readable: {exc}") from exc
        opened = f
    else:
        opened = contextlib.nullcontext()
    with opened:
        with _readable(where, "zip directory"):
            size = _size(f, path is not None)
            zf = zipfile.ZipFile(f)  # closing it leaves a file object passed in open
        with zf:
            yield _ZipSource(zf, size, where)


def _size(f, own: bool) -> int:
    """The size of file ``f`` (a zip is located from the end: the whole file counts)."""
    if own:
        return os.fstat(f.fileno()).st_size
    here = f.tell()
    end = f.seek(0, os.SEEK_END)
    f.seek(here)
    return end


class _ZipSource:
    """The header and arrays of an open zip archive of ``size`` bytes."""

    def __init__(self, zf: zipfile.ZipFile, size: int, where: str):
        self.zf, self.size, self.where = zf, size, where
        self.members = None

    def header(self) -> dict:
        self.members = _members(self.zf, self.where)
        return _parse_header(_header_text(self.zf, self.members, self.size, self.where), self.where)

    def check_arrays(self, h: Header) -> None:
        _check_members(self.members, h, self.size, self.where)

    def array(self, name: str, h: Header) -> np.ndarray:
        info = self.members[name + ".npy"]
        return _read_array(self.zf, info, h.arrays[name], self.where, h.label(name))


# -- a state_dict

_STATE_DICT_KEYS = ("header", "arrays")
# Levels a header may nest: a loadable one has its tree's (at most MAX_DEPTH dicts, each three
# levels of JSON: {"dict": [[key, child], ...]}) and two more.
_MAX_JSON_DEPTH = 3 * MAX_DEPTH + 8


class DictSource:
    """The header and arrays of a :func:`adamnp.state_dict`: ``{"header": ..., "arrays":
    {name: ndarray}}``, trusted in nothing. Each value is read from it once."""

    where = "state_dict"

    def __init__(self, d):
        if not isinstance(d, Mapping):
            raise fail(
                self.where,
                "state_dict",
                f"a {type(d).__name__}, not a dict with keys {list(_STATE_DICT_KEYS)} as "
                "adamnp.state_dict returns (to read a file, use adamnp.load_state)",
            )
        keys = list(d.keys())
        missing = [k for k in _STATE_DICT_KEYS if k not in keys]
        if missing:
            raise fail(self.where, missing[0], "missing")
        extra = [k for k in keys if k not in _STATE_DICT_KEYS]
        if extra:
            raise fail(self.where, "state_dict", f"unexpected keys {show(sorted(extra, key=repr))}")
        self._header, arrays = d["header"], d["arrays"]
        if not isinstance(arrays, Mapping):
            raise fail(self.where, "arrays", f"a {type(arrays).__name__}, not a dict of arrays")
        self._arrays = arrays
        self._checked = {}

    def header(self) -> dict:
        return check_format(_plain_json(self._header, self.where, "header", 0), self.where)

    def check_arrays(self, h: Header) -> None:
        names = list(self._arrays.keys())
        present = set(names)
        missing = [name for name in h.arrays if name not in present]
        if missing:
            raise fail(self.where, h.label(missing[0]), "missing array")
        extra = [n for n in names if n not in h.arrays]
        if extra:
            raise fail(self.where, "arrays", f"unexpected arrays {show(sorted(extra, key=repr))}")
        for name, spec in h.arrays.items():
            self._checked[name] = _checked_array(
                self._arrays[name], spec, self.where, h.label(name)
            )

    def array(self, name: str, h: Header) -> np.ndarray:
        return self._checked[name]


def _checked_array(a, spec, where: str, key: str) -> np.ndarray:
    """``a`` itself, when it is exactly the array ``spec`` describes: a plain ``np.ndarray``
    (no subclass: its methods could read or report anything), of that dtype (byte order
    included) and shape, in C order."""
    if type(a) is not np.ndarray:
        raise fail(
            where,
            key,
            f"a {type(a).__module__}.{type(a).__qualname__}, not a numpy.ndarray (subclasses "
            "are refused; pass np.asarray(x))",
        )
    _expect_same(a.dtype == spec.dtype, where, key, f"dtype {a.dtype.str}", spec.dtype.str)
    _expect_same(a.shape == spec.shape, where, key, f"shape {a.shape}", spec.shape)
    expect(
        a.flags.c_contiguous,
        where,
        key,
        "not C-contiguous, as stored arrays are; pass np.ascontiguousarray(x)",
    )
    return a


def _expect_same(cond: bool, where: str, key: str, got: str, want) -> None:
    expect(cond, where, key, f"{got}, but the header implies {want}")


_JSON_SCALARS = (str, int, float, bool)


def _plain_json(value, where: str, key: str, depth: int):
    """A copy of ``value``, which must be JSON data as ``json.loads`` gives it: dicts with str
    keys, lists, str, int, float, bool and None, each of exactly that type (no subclass, no
    tuple, no NumPy scalar), nested at most ``_MAX_JSON_DEPTH`` levels (so no cycle)."""
    kind = type(value)
    if value is None or kind in _JSON_SCALARS:
        return value
    if kind not in (list, dict):
        raise fail(
            where,
            key,
            f"a {kind.__module__}.{kind.__qualname__} ({show(value)}), not JSON data (dict "
            "with str keys, list, str, int, float, bool or None)",
        )
    expect(depth < _MAX_JSON_DEPTH, where, key, f"nested more than {_MAX_JSON_DEPTH} levels")
    if kind is list:
        return [_plain_json(v, where, f"{key}[{i}]", depth + 1) for i, v in enumerate(value)]
    out = {}
    for k, v in value.items():
        if type(k) is not str:
            raise fail(where, key, f"key {show(k)} is not a str")
        out[k] = _plain_json(v, where, f"{key}[{show(k)}]", depth + 1)
    return out
