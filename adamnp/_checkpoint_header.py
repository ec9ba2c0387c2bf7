"""Checkpoints: the header, and every check of it that does not concern the configuration.

The header is a JSON object (see :mod:`adamnp._checkpoint` and docs/checkpoints.md). Whether
it came from a file or from a :func:`adamnp.state_dict`, it is checked here, by the same code,
before anything it declares is allocated. Every problem is a :class:`CheckpointError` naming
where the checkpoint came from (``where``: a file name, ``"state_dict"``) and the key at fault.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import reprlib

import numpy as np

from . import backends
from ._config import AdamConfig
from ._state import MIN_8BIT_SIZE, Layout
from ._tree import flatten, treedef_from_json, unflatten
from ._validate import FLOAT_DTYPES, validate_layout
from .backends.math import compute_dtype
from .lowbit import half
from .lowbit.maps import SQRT_MAP_V_BEFORE_WIDE, map_names
from .lowbit.reference import n_blocks

FORMAT = "adamnp-state"
VERSION = 1
HEADER = "__adamnp__"
_SLOT_KINDS = ("fp32", "q8")  # a leaf entry's "slot"

#: Header keys of the layout: the fields of :class:`~adamnp._state.Layout`.
LAYOUT_KEYS = tuple(f.name for f in dataclasses.fields(Layout))
# Layout keys that files written before they were recorded lack; see layout_from_header.
_LATER_LAYOUT_KEYS = ("state_format", "v_rounding", "min_8bit_size", "keep_fp32")
#: Keys of a state with per-leaf configs (both, or neither): ``{label: config}`` and a
#: label per leaf; ``config`` then holds the first leaf's label's config.
LABEL_KEYS = ("configs", "labels")
#: Every key of a header (all but _LATER_LAYOUT_KEYS and LABEL_KEYS required), in the order
#: saved.
HEADER_KEYS = (
    "format",
    "version",
    "config",
    *LABEL_KEYS,
    "backend",
    "step",
    "skipped_steps",
    *LAYOUT_KEYS,
    "treedef",
    "leaves",
)


# -- errors


class CheckpointError(ValueError):
    """A file or state_dict that is not a readable adamnp checkpoint of a supported version.

    Raised by :func:`load_state` for truncated, corrupted (CRC mismatch), foreign or
    newer-format files, for headers that are malformed or inconsistent, and for arrays that
    disagree with the header; by :func:`load_state_dict` for the same problems of a
    state_dict (and arrays that are not plain, C-contiguous ``np.ndarray``). The message
    names the file (or ``state_dict``) and the key at fault. A ``ValueError``.
    """


_REPR = reprlib.Repr()  # short reprs of values from the file in messages
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlevel = 3


def show(value) -> str:
    return _REPR.repr(value)


def fail(where: str, key: str, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: {key}: {what}")


def expect(cond: bool, where: str, key: str, what: str) -> None:
    if not cond:
        raise fail(where, key, what)


def clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# -- the header

INT64_MAX = 2**63 - 1
_MAX_NDIM = 32
_LEAF_DTYPES = {d.str: d for d in FLOAT_DTYPES}  # "<f4", "<f8" on little-endian hosts
#: The header's tags of the half-precision leaf dtypes: named, since bfloat16's ``dtype.str``
#: (``"<V2"``, any 2-byte void) says nothing; bfloat16's dtype comes from ``ml_dtypes``.
HALF_TAGS = half.HALF_FORMATS  # ("float16", "bfloat16"), by format id
LEAF_DTYPE_TAGS = (*_LEAF_DTYPES, *HALF_TAGS)
_FLOAT32 = np.dtype(np.float32)
_CODES = np.dtype(np.uint8)
_LEAF_KEYS = ("path", "shape", "dtype", "slot", "arrays")


@dataclasses.dataclass(frozen=True)
class Header:
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
    arrays: dict  # array name (``leaf0/m``) -> Array
    labels: tuple | None = None  # per leaf, for a state with per-leaf configs
    configs: dict | None = None  # label -> AdamConfig (lr 0.0 for a schedule), or None
    configs_json: dict | None = None  # label -> as stored, defaults filled in

    def label(self, name: str) -> str:
        """How messages name a stored array: ``array leaf0/m (params['w'])``."""
        return f"array {name} ({self.paths[self.arrays[name].leaf]})"


@dataclasses.dataclass(frozen=True)
class Array:
    """A stored array as the header implies it: leaf ``leaf``'s field ``field``."""

    leaf: int
    field: str
    dtype: np.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def check_format(header, where: str) -> dict:
    """``header`` itself, when it is a JSON object that says it describes an adamnp state."""
    expect(
        isinstance(header, dict) and header.get("format") == FORMAT,
        where,
        HEADER,
        "header does not describe an adamnp state",
    )
    return header


def check_version_and_keys(header: dict, where: str) -> None:
    version = header.get("version")
    key = "header['version']"
    if type(version) is not int:
        raise fail(where, key, f"bad format version {show(version)}")
    if version > VERSION:
        raise fail(
            where,
            key,
            f"format version {version}, newer than this adamnp reads ({VERSION}); upgrade adamnp",
        )
    expect(version == VERSION, where, key, f"unsupported format version {version}")
    optional = (*_LATER_LAYOUT_KEYS, *LABEL_KEYS)
    missing = [k for k in HEADER_KEYS if k not in header and k not in optional]
    expect(not missing, where, HEADER, f"incomplete header: no {', '.join(missing)}")
    unknown = sorted(k for k in header if k not in HEADER_KEYS)
    if unknown:
        raise fail(where, HEADER, f"unknown header keys {show(unknown)}")


def check_count(header: dict, key: str, where: str) -> int:
    value = header[key]
    if not (type(value) is int and 0 <= value < INT64_MAX):
        raise fail(
            where,
            f"header[{key!r}]",
            f"bad step counter {show(value)}: must be an int in 0..2**63-2",
        )
    return value


def check_backend(name, where: str) -> str:
    if not (isinstance(name, str) and name in backends.NAMES):
        raise fail(
            where,
            "header['backend']",
            f"unknown backend {show(name)}; expected one of {backends.NAMES}",
        )
    return name


def check_tree(obj, where: str) -> tuple[object, list]:
    """The tree definition and its leaves' paths; it must be as :func:`flatten` gives it
    (dict keys sorted and unique), so that the paths are those of the params it fits."""
    key = "header['treedef']"
    try:
        treedef = treedef_from_json(obj)
        _, canonical, paths = flatten(unflatten(treedef, itertools.repeat(None)))
        same = canonical == treedef
    except (TypeError, ValueError, RecursionError) as exc:
        raise fail(where, key, f"bad tree definition: {clip(str(exc))}") from exc
    expect(same, where, key, "bad tree definition: dict keys unsorted or repeated")
    return treedef, paths


def dtype_tag(dtype) -> str:
    """How the header names a leaf dtype: ``dtype.str`` for float32 and float64 (``"<f4"``,
    ``"<f8"``: what every file has stored), ``"float16"`` and ``"bfloat16"`` for the
    half-precision formats.

    Examples
    --------
    >>> dtype_tag(np.float32), dtype_tag(np.float16)
    ('<f4', 'float16')
    """
    fmt = half.half_format(dtype)
    return np.dtype(dtype).str if fmt < 0 else HALF_TAGS[fmt]


def leaf_dtype(tag, path: str, where: str, key: str) -> np.dtype:
    """The leaf dtype that header tag ``tag`` names (:func:`dtype_tag`), for leaf ``path``;
    a :class:`CheckpointError` for any other tag, and for ``"bfloat16"`` when ``ml_dtypes``
    (which defines NumPy's bfloat16) is not installed."""
    if isinstance(tag, str) and tag in _LEAF_DTYPES:
        return _LEAF_DTYPES[tag]
    if tag == "float16":
        return np.dtype(np.float16)
    if tag == "bfloat16":
        dtype = half.bfloat16_dtype()
        if dtype is None:
            raise fail(
                where,
                key,
                f"{path} is a bfloat16 leaf, and NumPy's bfloat16 dtype comes from ml_dtypes, "
                "which is not installed: pip install ml_dtypes",
            )
        return dtype
    raise fail(
        where,
        key,
        f"bad leaf entry: {path} has dtype {show(tag)}; leaves are float32, float64, float16 "
        f"or bfloat16 ({', '.join(map(repr, LEAF_DTYPE_TAGS))})",
    )


def _check_shape(value, where: str, key: str) -> tuple:
    ok = isinstance(value, list) and len(value) <= _MAX_NDIM
    ok = ok and all(type(d) is int and 0 <= d <= INT64_MAX for d in value)
    if not (ok and math.prod(value) <= INT64_MAX // 8):
        raise fail(
            where,
            key,
            f"bad leaf entry: shape {show(value)}; expected a list of at most {_MAX_NDIM} "
            "ints >= 0 with fewer than 2**60 elements",
        )
    return tuple(value)


def _check_leaf(entry, i: int, path: str, where: str) -> tuple[tuple, np.dtype, str]:
    """``(shape, dtype, slot kind)`` of leaf ``i``, whose path in the tree is ``path``."""
    key = f"header['leaves'][{i}]"
    if not isinstance(entry, dict):
        raise fail(where, key, f"bad leaf entry {show(entry)}")
    missing = [k for k in _LEAF_KEYS if k not in entry]
    if missing:
        raise fail(where, key, f"bad leaf entry: no {missing[0]!r}")
    if entry["path"] != path:
        raise fail(
            where,
            key,
            f"bad leaf entry: path {show(entry['path'])}, but leaf {i} of the tree is {path}",
        )
    shape = _check_shape(entry["shape"], where, key)
    kind = entry["slot"]
    dtype = leaf_dtype(entry["dtype"], path, where, key)
    if kind not in _SLOT_KINDS:
        raise fail(
            where, key, f"bad leaf entry: {path} has slot {show(kind)}, not one of {_SLOT_KINDS}"
        )
    expect(
        kind != "q8" or compute_dtype(dtype) == _FLOAT32,
        where,
        key,
        f"bad leaf entry: {path} is {dtype}; an 8-bit ('q8') slot is for float16, bfloat16 "
        "and float32 leaves only",
    )
    return shape, dtype, kind


def check_leaf_table(entries, paths: list, where: str) -> tuple[list, list, list]:
    """``(shapes, dtypes, slot kinds)``: one entry per leaf of the tree, in its order."""
    key = "header['leaves']"
    expect(isinstance(entries, list), where, key, "bad leaf table: not a list")
    expect(
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


def layout_from_header(header: dict, paths, shapes, dtypes, use_q8, where: str) -> Layout:
    """The saved layout, checked as :func:`adamnp.init` checks its options.

    Files written before some layout keys were recorded get the values that describe their
    slots: ``state_format="bnb"`` and ``v_rounding="nearest"`` (the only format and rounding
    then); as ``min_8bit_size`` the default
    when that explains the 8-bit leaves, else the size of the smallest one; as ``keep_fp32``
    the float32 leaves that would then be 8-bit but are not.
    """
    saved = {k: header[k] for k in LAYOUT_KEYS if k in header}
    for k in ("state_bits", "block_size", "min_8bit_size"):
        if k in saved and not (type(saved[k]) is int and abs(saved[k]) <= INT64_MAX):
            what = f"bad layout in header: {k} must be an int, got {show(saved[k])}"
            raise fail(where, f"header[{k!r}]", what)
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
        raise fail(
            where,
            "header['keep_fp32']",
            f"bad layout in header: keep_fp32 must be a list of leaf paths, got {show(keep)}",
        )
    try:
        layout = validate_layout(paths, None, keep_fp32=keep, **saved)
    except (TypeError, ValueError) as exc:
        key = next((f"header[{k!r}]" for k in LAYOUT_KEYS if str(exc).startswith(k)), HEADER)
        raise fail(where, key, f"bad layout in header: {exc}") from exc
    if "keep_fp32" not in header:
        would = layout.eight_bit(paths, shapes, dtypes)
        kept = tuple(p for p, w, q in zip(paths, would, use_q8) if w and not q)
        layout = dataclasses.replace(layout, keep_fp32=kept)
    return layout


def check_slots(layout: Layout, paths, shapes, dtypes, use_q8, where: str) -> None:
    """Each leaf's slot kind must be the one its layout gives it."""
    would = layout.eight_bit(paths, shapes, dtypes)
    for i, (w, q) in enumerate(zip(would, use_q8)):
        if w != q:
            raise fail(
                where,
                f"header['leaves'][{i}]",
                f"{paths[i]} has {'q8' if q else 'fp32'} moments, which its layout in the "
                "header does not give it",
            )


def _expected_arrays(kind: str, dtype, shape: tuple, block_size: int, amsgrad: bool) -> dict:
    """``{field: (dtype, shape)}`` of the arrays of a slot (see Fp32Slot and QuantSlot) of a
    leaf of ``dtype``: full-precision moments in its compute dtype (float32 for float16 and
    bfloat16 leaves)."""
    moments = ("m", "v", "vmax") if amsgrad else ("m", "v")
    if kind == "fp32":
        return {m: (compute_dtype(dtype), shape) for m in moments}
    blocks = (n_blocks(math.prod(shape), block_size),)
    codes = {f"codes_{m}": (_CODES, shape) for m in moments}
    return {**codes, **{f"absmax_{m}": (_FLOAT32, blocks) for m in moments}}


def _expected_scalars(kind: str, layout: Layout, entry: dict) -> dict:
    """The other fields of a slot, stored in its leaf entry: none for ``"fp32"``. A
    ``"sqrt"`` leaf may name the map of ``s`` of files written before the wide map existed
    (:data:`~adamnp.lowbit.maps.SQRT_MAP_V_BEFORE_WIDE`): such a file means the same now."""
    if kind != "q8":
        return {}
    map_m, map_v = map_names(layout.state_format)
    if layout.state_format == "sqrt" and entry.get("map_v") == SQRT_MAP_V_BEFORE_WIDE:
        map_v = SQRT_MAP_V_BEFORE_WIDE
    return {"block_size": layout.block_size, "map_m": map_m, "map_v": map_v}


def check_leaf_arrays(entry: dict, i, kind, dtype, shape, layout, amsgrad, where) -> dict:
    """``{array name: Array}`` of leaf ``i``, whose entry must declare exactly these."""
    key = f"header['leaves'][{i}]"
    expected = _expected_arrays(kind, dtype, shape, layout.block_size, amsgrad)
    declared = entry["arrays"]
    names = sorted(expected)
    if not (isinstance(declared, dict) and sorted(declared) == names):
        shown = sorted(declared) if isinstance(declared, dict) else declared
        raise fail(
            where,
            key,
            f"bad leaf entry: {entry['path']} declares arrays {show(shown)}, but a {kind} "
            f"slot with amsgrad={amsgrad} (as configured) has {names}",
        )
    for name, (dt, shp) in expected.items():
        want = {"dtype": dt.str, "shape": list(shp)}
        if declared[name] != want:
            raise fail(
                where,
                f"{key}['arrays'][{name!r}]",
                f"bad leaf entry: {show(declared[name])}, expected {want}",
            )
    scalars = _expected_scalars(kind, layout, entry)
    unknown = sorted(k for k in entry if k not in _LEAF_KEYS and k not in scalars)
    if unknown:
        raise fail(where, key, f"bad leaf entry: unknown keys {show(unknown)}")
    if any(entry.get(n) != v for n, v in scalars.items()):
        raise fail(
            where,
            key,
            f"{entry['path']}: 8-bit layout (block size or maps) not supported: "
            f"{show({n: entry.get(n) for n in scalars})}, expected {scalars}",
        )
    return {f"leaf{i}/{n}": Array(i, n, dt, shp) for n, (dt, shp) in expected.items()}
