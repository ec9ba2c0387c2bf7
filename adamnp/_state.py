"""Optimizer state: typed per-leaf moment slots stored as views into flat per-group arenas.

Every leaf gets one slot. Leaves that share a kind of slot and a dtype form a
:class:`LeafGroup`, whose moments live in a few flat buffers (the *arena*); the slots are views
into them. A backend can therefore update a whole group in one compiled call, while users and
checkpoints see one array per leaf and moment.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ._config import AdamConfig
from .backends.math import compute_dtype
from .lowbit.half import half_format
from .lowbit.maps import SIGNED_MAP, UNSIGNED_MAP, initial_code, map_names
from .lowbit.reference import n_blocks


class Fp32Slot(NamedTuple):
    """Full-precision moments of one leaf: float64 for float64 leaves, float32 for float32,
    float16 and bfloat16 leaves (:func:`~adamnp.backends.math.compute_dtype`).

    The arrays are views into the state's flat buffers: writing into them changes the state.

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> state = adamnp.init(np.zeros(3, np.float32), adamnp.adam(), backend="numpy")
    >>> state.slots[0].m.dtype, state.slots[0].vmax
    (dtype('float32'), None)
    """

    m: np.ndarray  # shape=leaf.shape, dtype=compute dtype; first moment
    v: np.ndarray  # shape=leaf.shape, dtype=compute dtype; second moment
    vmax: np.ndarray | None  # shape=leaf.shape, dtype=compute dtype; amsgrad's max, else None


class QuantSlot(NamedTuple):
    """Blockwise 8-bit moments of one float32, float16 or bfloat16 leaf: codes per element, a
    scale per block.

    What the codes mean depends on the state format, named by ``map_m`` and ``map_v``
    (docs/eight_bit.md): ``"sqrt"`` (the default) stores ``sqrt(v)`` and ``m / sqrt(v)``
    (:mod:`adamnp.lowbit.sqrt`); ``"bnb"`` stores ``m`` and ``v`` as bitsandbytes does,
    element ``i`` being ``dynamic_map(signed)[codes[i]] * absmax[i // block_size]``.

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> p = np.zeros(1000, np.float32)
    >>> slot = adamnp.init(p, adamnp.adamw(), state_bits=8, min_8bit_size=1,
    ...                    backend="numpy").slots[0]
    >>> slot.codes_m.dtype, slot.absmax_m.shape, slot.block_size
    (dtype('uint8'), (4,), 256)
    """

    codes_m: np.ndarray  # shape=leaf.shape, uint8; codes of m (bnb) or of m / sqrt(v) (sqrt)
    codes_v: np.ndarray  # shape=leaf.shape, uint8; codes of v (bnb) or of sqrt(v) (sqrt)
    absmax_m: np.ndarray  # shape=(ceil(n / block_size),), float32; per-block scale of codes_m
    absmax_v: np.ndarray  # shape=(ceil(n / block_size),), float32; per-block scale of codes_v
    codes_vmax: np.ndarray | None  # like codes_v, amsgrad only
    absmax_vmax: np.ndarray | None  # like absmax_v, amsgrad only
    block_size: int  # elements per block of the flattened leaf (power of two, 64..4096)
    map_m: str = SIGNED_MAP
    map_v: str = UNSIGNED_MAP


Slot = Fp32Slot | QuantSlot


MIN_8BIT_SIZE = 4096  # default of init(min_8bit_size=...): smaller leaves keep float32 moments


@dataclass(frozen=True)
class Layout:
    """How the moments are stored: the layout options of :func:`adamnp.init`, validated.

    One record per state (``state.layout``), shared by its leaf groups and saved in
    checkpoints. Which leaves get 8-bit moments follows from it alone (:meth:`eight_bit`).

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> params = {"emb": np.zeros(5000, np.float32), "w": np.zeros(5000, np.float32)}
    >>> state = adamnp.init(params, adamnp.adamw(), backend="numpy", state_bits=8,
    ...                     keep_fp32=lambda path, a: "emb" in path)
    >>> state.layout.keep_fp32, state.layout.block_size
    (("params['emb']",), 256)
    """

    state_bits: int  # 32 or 8
    state_format: str  # 8-bit format: "sqrt" or "bnb" (adamnp.lowbit.maps.STATE_FORMATS)
    block_size: int  # elements per quantization block (power of two, 64..4096); 8-bit only
    min_8bit_size: int  # float32 leaves with fewer elements keep float32 moments
    v_rounding: str  # "nearest" or "stochastic": how 8-bit state requantizes v ("sqrt": the latter)
    keep_fp32: tuple[str, ...]  # paths of the leaves opted out of 8-bit state, in tree order

    def eight_bit(self, paths, shapes, dtypes) -> list[bool]:
        """Whether each leaf gets 8-bit moments: float32, float16 and bfloat16 leaves of at
        least ``min_8bit_size`` (and 1) elements not in ``keep_fp32``, when ``state_bits``
        is 8."""
        kept = frozenset(self.keep_fp32)
        least = max(self.min_8bit_size, 1)
        return [
            self.state_bits == 8
            and compute_dtype(d) == np.float32
            and math.prod(s) >= least
            and p not in kept
            for p, s, d in zip(paths, shapes, dtypes)
        ]


@dataclass(eq=False)
class LeafGroup:
    """Leaves whose moments share one flat arena; what a backend updates in one call.

    ``kind`` is ``"fp32"`` (full-precision moments in ``dtype``) or ``"q8"`` (8-bit moments).
    ``param_dtype`` is the leaves' dtype, ``dtype`` the one the arithmetic and full-precision
    moments use (:func:`~adamnp.backends.math.compute_dtype`: float32 for float16 and
    bfloat16 leaves, which are upcast, updated and rounded back). Leaf ``j`` of the group is
    leaf ``leaf_ids[j]`` of the tree and owns elements ``offsets[j]:offsets[j+1]`` of the
    element buffers and, for ``"q8"``, blocks ``block_offsets[j]:block_offsets[j+1]`` of the
    absmax buffers. ``layout`` is the state's :class:`Layout` (the same record, not a copy).
    """

    kind: str
    dtype: np.dtype
    leaf_ids: np.ndarray  # shape=(k,), int64
    offsets: np.ndarray  # shape=(k + 1,), int64
    block_offsets: np.ndarray | None  # shape=(k + 1,), int64; q8 only
    layout: Layout
    buffers: dict = field(default_factory=dict)  # name -> flat array (m, v, vmax / codes_*, ...)
    label: str | None = None  # the leaves' label (AdamState.labels), None without labels
    param_dtype: np.dtype | None = None  # the leaves' dtype; None: ``dtype``
    # Stochastic rounding's coordinates (adamnp.lowbit.stochastic): the group's hash tag (None:
    # its first leaf's tree index) and the hash index of the arena's first element. A shard of
    # a distributed state (adamnp.distributed) sets both to the unsharded group's, so that it
    # rounds exactly as the unsharded state does.
    hash_tag: int | None = None
    index_base: int = 0

    def __post_init__(self):
        if self.param_dtype is None:
            self.param_dtype = self.dtype

    @property
    def tag(self) -> int:
        """The tag that keys the group's stochastic rounding (``step_key(step, tag)``):
        ``hash_tag``, or the tree index of the group's first leaf."""
        return int(self.leaf_ids[0]) if self.hash_tag is None else int(self.hash_tag)

    @property
    def half(self) -> int:
        """The leaves' half-precision format (:func:`adamnp.lowbit.half.half_format`): 0
        float16, 1 bfloat16, -1 for float32 and float64 leaves."""
        return half_format(self.param_dtype)

    @property
    def block_size(self) -> int:
        """Elements per quantization block: the layout's for ``"q8"``, 0 for other kinds."""
        return self.layout.block_size if self.kind == "q8" else 0

    @property
    def v_rounding(self) -> str:
        """``"q8"``: the layout's requantization of ``v``; other kinds round nothing."""
        return self.layout.v_rounding if self.kind == "q8" else "nearest"

    @property
    def state_format(self) -> str:
        """``"q8"``: the layout's 8-bit format (``"sqrt"`` or ``"bnb"``); other kinds: ``""``."""
        return self.layout.state_format if self.kind == "q8" else ""


@dataclass(eq=False)
class AdamState:
    """Everything :func:`adamnp.step` needs besides params and grads.

    Attributes
    ----------
    config : AdamConfig
    backend : str
        ``"numpy"``, ``"numba"`` or ``"cuda"``.
    step : int
        Number of steps taken (stored as int64 in checkpoints). Checked on assignment: an
        ``int`` (or NumPy integer, stored as ``int``) in ``0 .. 2**63 - 1``; anything else,
        ``bool`` included, raises ``TypeError`` or ``ValueError``.
    skipped_steps : int
        Steps skipped because of non-finite gradients (``nonfinite="skip"``); checked like
        ``step``.
    paths, shapes, dtypes : tuple
        Name, shape and dtype of every leaf, in flattening order.
    slots : tuple of Fp32Slot or QuantSlot
        One per leaf, in the same order.
    layout : Layout
        The layout options given to :func:`adamnp.init` (``state_bits``, ``state_format``,
        ``block_size``, ``min_8bit_size``, ``v_rounding``, and ``keep_fp32`` as the paths it
        kept).
    state_bits, state_format, block_size, v_rounding
        Read-only shortcuts to the fields of ``layout``.
    labels : tuple of str or None
        Each leaf's label, for a state built from a mapping ``{label: config}``; else None.
    configs : dict or None
        ``{label: AdamConfig}`` of such a state (change it with :func:`adamnp.configure`);
        else None. ``config`` is then the first leaf's label's config (its ``nonfinite`` and
        ``max_grad_norm`` are every label's).

    Notes
    -----
    Each state holds a lock (created with it, also by :func:`adamnp.load_state`, and anew for
    a copy or an unpickled state) that :func:`adamnp.step` holds from start to end, so steps
    on one state from several threads run one after the other. The lock does not make a
    shared *params* tree safe to read while a step writes it.

    Examples
    --------
    >>> import numpy as np, adamnp
    >>> state = adamnp.init(np.zeros(3, np.float32), adamnp.adam(), backend="numpy")
    >>> state.step += 1
    >>> state.step = 2.5
    Traceback (most recent call last):
      ...
    TypeError: state.step must be an int (a count of steps), got float 2.5
    """

    config: AdamConfig
    backend: str
    step: int
    skipped_steps: int
    treedef: object
    paths: tuple
    shapes: tuple
    dtypes: tuple
    slots: tuple
    groups: tuple
    layout: Layout
    labels: tuple | None = None
    configs: dict | None = None
    # held by adamnp.step for its whole duration; not an argument, not part of repr/pickle
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # a lock cannot be copied or pickled; each copy gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name in _COUNTERS:  # checked like any assignment
            setattr(self, name, state[name])
        self._lock = threading.Lock()

    @property
    def state_bits(self) -> int:
        """32 or 8 (``layout.state_bits``)."""
        return self.layout.state_bits

    @property
    def state_format(self) -> str:
        """The 8-bit format, ``"sqrt"`` or ``"bnb"`` (``layout.state_format``)."""
        return self.layout.state_format

    @property
    def block_size(self) -> int:
        """Elements per quantization block of 8-bit leaves (``layout.block_size``)."""
        return self.layout.block_size

    @property
    def v_rounding(self) -> str:
        """``"nearest"`` or ``"stochastic"`` (``layout.v_rounding``)."""
        return self.layout.v_rounding

    def config_of(self, group) -> AdamConfig:
        """The config that steps ``group`` (one of :attr:`groups`)."""
        return self.config if group.label is None else self.configs[group.label]

    def nbytes(self) -> int:
        """Bytes held by the moment buffers (all slots, all groups)."""
        return int(sum(b.nbytes for g in self.groups for b in g.buffers.values()))

    def __repr__(self) -> str:
        kinds = sorted({type(s).__name__ for s in self.slots})
        return (
            f"AdamState({self.config.name}, backend={self.backend!r}, step={self.step}, "
            f"leaves={len(self.slots)}, slots={'/'.join(kinds) or '-'}, "
            f"state_bytes={self.nbytes()})"
        )


_COUNTERS = ("step", "skipped_steps")
_COUNT_END = 2**63  # counters are stored as int64 in checkpoints


def _count(name: str, value) -> int:
    """``value`` as a step count for ``state.<name>``, or ``TypeError`` / ``ValueError``."""
    if type(value) is not int:
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise TypeError(
                f"state.{name} must be an int (a count of steps), "
                f"got {type(value).__name__} {shown}"
            )
        value = int(value)
    if not 0 <= value < _COUNT_END:
        raise ValueError(f"state.{name} must be in 0 .. 2**63 - 1, got {value}")
    return value


class _Count:
    """A validated ``int`` attribute of :class:`AdamState` (``step``, ``skipped_steps``).

    A data descriptor with ``__set__`` only: every assignment is checked (:func:`_count`),
    while a read finds the value in the instance's ``__dict__`` at plain-attribute speed.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __set__(self, obj, value) -> None:
        if type(value) is not int or not 0 <= value < _COUNT_END:
            value = _count(self.name, value)
        obj.__dict__[self.name] = value


# Installed after @dataclass has read the fields: __init__ assigns through them, so a state is
# checked when it is built (init, load_state) as well as on every later assignment.
for _name in _COUNTERS:
    setattr(AdamState, _name, _Count(_name))
del _name


def _views(buffer, offsets, shapes):
    return [buffer[offsets[j] : offsets[j + 1]].reshape(shapes[j]) for j in range(len(shapes))]


def amsgrad_of(config: AdamConfig, configs: dict | None):
    """:func:`build_groups`' ``amsgrad``: ``config``'s, or ``{label: amsgrad}`` of
    per-leaf ``configs``."""
    if configs is None:
        return config.amsgrad
    return {label: c.amsgrad for label, c in configs.items()}


class GroupPlan(NamedTuple):
    """Where one leaf group's moments live, from shapes alone (:func:`plan_groups`)."""

    label: str | None  # the leaves' label, None without labels
    kind: str  # "fp32" or "q8"
    param_dtype: np.dtype  # the leaves' dtype
    leaf_ids: np.ndarray  # shape=(k,), int64: tree indices of the group's leaves, ascending
    offsets: np.ndarray  # shape=(k + 1,), int64: leaf j owns elements offsets[j]:offsets[j+1]
    block_offsets: np.ndarray | None  # shape=(k + 1,), int64; "q8" only: its absmax blocks


def plan_groups(paths, shapes, dtypes, layout: Layout, labels=None) -> list[GroupPlan]:
    """The leaf groups of a state, in the order :func:`build_groups` makes them: one per
    label, kind and dtype (sorted by them), leaves in tree order, no allocation.

    Examples
    --------
    >>> import numpy as np
    >>> lay = Layout(8, "sqrt", 256, 1000, "stochastic", ())
    >>> [(g.kind, g.leaf_ids.tolist(), g.offsets.tolist())
    ...  for g in plan_groups(["a", "b", "c"], [(10,), (1000,), (2000,)], [np.float32] * 3, lay)]
    [('fp32', [0], [0, 10]), ('q8', [1, 2], [0, 1000, 3000])]
    """
    use_q8 = layout.eight_bit(paths, shapes, dtypes)
    by_name = {np.dtype(d).name: np.dtype(d) for d in dtypes}  # bfloat16's .str is "<V2"
    tags = [("" if labels is None else labels[i], "q8" if q else "fp32", np.dtype(d).name)
            for i, (d, q) in enumerate(zip(dtypes, use_q8))]  # fmt: skip
    plans = []
    for key in sorted(set(tags)):
        label, kind, dname = key
        ids = [i for i, tag in enumerate(tags) if tag == key]
        sizes = [int(np.prod(shapes[i], dtype=np.int64)) for i in ids]
        offsets = np.zeros(len(ids) + 1, np.int64)
        offsets[1:] = np.cumsum(sizes)
        blocks = None
        if kind == "q8":
            blocks = np.zeros(len(ids) + 1, np.int64)
            blocks[1:] = np.cumsum([n_blocks(n, layout.block_size) for n in sizes])
        plans.append(GroupPlan(None if labels is None else label, kind, by_name[dname],
                               np.array(ids, np.int64), offsets, blocks))  # fmt: skip
    return plans


def build_groups(paths, shapes, dtypes, layout: Layout, amsgrad, xp, labels=None):
    """Allocate zero moments for every leaf as ``layout`` says; return ``(slots, groups)``.

    ``xp`` is the backend module, which provides ``zeros(n, dtype)`` and
    ``full(n, value, dtype)`` (host or device memory). ``labels``: one per leaf (a group per
    label, kind and dtype, :func:`plan_groups`) or None; ``amsgrad`` is then a bool or
    ``{label: bool}``.
    """
    block_size = layout.block_size
    slots: list = [None] * len(shapes)
    groups = []
    for plan in plan_groups(paths, shapes, dtypes, layout, labels):
        kind, param_dtype, offsets, blocks = (
            plan.kind,
            plan.param_dtype,
            plan.offsets,
            plan.block_offsets,
        )
        dtype = compute_dtype(param_dtype)
        ids = plan.leaf_ids.tolist()
        ams = amsgrad[plan.label or ""] if isinstance(amsgrad, dict) else amsgrad
        total = int(offsets[-1])
        gshapes = [shapes[i] for i in ids]
        if kind == "fp32":
            names = ("m", "v", "vmax") if ams else ("m", "v")
            buffers = {name: xp.zeros(total, dtype) for name in names}
            views = {name: _views(buffers[name], offsets, gshapes) for name in names}
            for j, i in enumerate(ids):
                slots[i] = Fp32Slot(views["m"][j], views["v"][j], views["vmax"][j] if ams else None)
        else:
            nb = int(blocks[-1])
            moments = ("m", "v", "vmax") if ams else ("m", "v")
            buffers = {}
            fmt = layout.state_format
            for name in moments:
                buffers[f"codes_{name}"] = xp.full(total, initial_code(fmt, name), np.uint8)
                buffers[f"absmax_{name}"] = xp.zeros(nb, np.float32)
            bshapes = [(int(blocks[j + 1] - blocks[j]),) for j in range(len(ids))]
            views = {}
            for name in moments:
                views[f"codes_{name}"] = _views(buffers[f"codes_{name}"], offsets, gshapes)
                views[f"absmax_{name}"] = _views(buffers[f"absmax_{name}"], blocks, bshapes)
            for j, i in enumerate(ids):
                slots[i] = QuantSlot(
                    views["codes_m"][j],
                    views["codes_v"][j],
                    views["absmax_m"][j],
                    views["absmax_v"][j],
                    views["codes_vmax"][j] if ams else None,
                    views["absmax_vmax"][j] if ams else None,
                    block_size,
                    *map_names(fmt),
                )
        groups.append(
            LeafGroup(
                kind,
                dtype,
                plan.leaf_ids,
                offsets,
                blocks,
                layout,
                buffers,
                plan.label,
                param_dtype,
            )
        )
    return tuple(slots), tuple(groups)
